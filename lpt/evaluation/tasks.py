"""Zero-shot and few-shot tasks through lm-evaluation-harness, on the in-memory model.

The model lpt loaded (dense, sliced with per-layer widths, or a base with an unmerged adapter and masks) is
handed to lm-eval's ``HFLM`` wrapper as an object, so nothing is saved or reloaded. Local tasks are lm-eval task
YAML files in ``--include-path DIR``; relative ``data_files`` in them are resolved against the YAML's directory.

Scores are reported as lm-eval computes them (``acc``, ``acc_norm`` and their standard errors, fractions in
[0, 1]). ``PAPER_METRICS`` names the metric the pruning literature quotes per task (LLM-Pruner, LoRAPrune):
plain accuracy for BoolQ, PIQA, WinoGrande and ARC-e; length-normalised accuracy for HellaSwag, ARC-c and OBQA.
Their mean over the seven tasks is the "7-task average" of the paper's tables.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from lpt.errors import LptError
from lpt.evaluation import local_tasks

PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
PAPER_METRICS = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc", "arc_easy": "acc",
                 "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
ALIASES = {"paper": PAPER_TASKS}  # --tasks paper = the seven zero-shot tasks of the paper
METRICS = ("acc", "acc_norm")


def parse_task_specs(spec: str | Sequence[str] | None) -> list[tuple[str, int | None]]:
    """Comma-separated task names with an optional ``:N`` (that task's few-shot examples): aliases expanded,
    duplicates dropped (the first one wins), order kept. ``'paper,mmlu:5'`` -> the seven tasks (shots None: the
    task's own / ``--num-fewshot``) and ``('mmlu', 5)``."""
    items = spec.split(",") if isinstance(spec, str) else list(spec or [])
    out: dict[str, int | None] = {}
    for raw in items:
        name, _, shots = raw.strip().partition(":")
        name = name.strip()
        if not name:
            continue
        n: int | None = None
        if shots.strip():
            if not shots.strip().isdigit():
                raise LptError(f"--tasks {raw.strip()}: the few-shot count after ':' must be a whole number")
            n = int(shots)
        for t in ALIASES.get(name, (name,)):
            out.setdefault(t, n)
    return list(out.items())


def parse_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """Comma-separated task names (aliases expanded, duplicates dropped, order kept; ``:N`` suffixes dropped)."""
    return [name for name, _ in parse_task_specs(spec)]


def score_metric(task: str) -> str:
    """The metric quoted for ``task``: the paper's choice for its seven tasks, plain accuracy otherwise."""
    return PAPER_METRICS.get(task, "acc")


def paper_average(scores: dict[str, dict[str, Any]]) -> float | None:
    """Mean of the paper metric over the seven zero-shot tasks; None unless all seven were evaluated."""
    vals = []
    for t in PAPER_TASKS:
        v = (scores.get(t) or {}).get(PAPER_METRICS[t])
        if v is None:
            return None
        vals.append(float(v))
    return sum(vals) / len(vals)


def extract_scores(raw: dict[str, Any], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per requested task: acc / acc_norm (+ stderr), the quoted score, shots, samples and version.

    ``raw`` is what ``lm_eval.simple_evaluate`` returns; keys there are ``"<metric>,<filter>"``.
    """
    results = raw.get("results", {})
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        row = results.get(name)
        if row is None:
            raise LptError(f"lm-eval returned no result for task '{name}'")
        metrics: dict[str, float] = {}
        for key, value in row.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            if metric not in metrics or filt == "none":  # prefer the unfiltered value
                metrics[metric] = float(value)
        entry: dict[str, Any] = {m: metrics.get(m) for m in METRICS}
        entry.update({f"{m}_stderr": _finite(metrics.get(f"{m}_stderr")) for m in METRICS})
        others = {k: v for k, v in metrics.items() if k not in METRICS and not k.endswith("_stderr")}
        if others:
            entry["other_metrics"] = others
        metric = score_metric(name)
        if entry.get(metric) is None:
            metric = next((m for m in METRICS if entry.get(m) is not None), next(iter(others), metric))
        entry["metric"] = metric
        entry["score"] = entry.get(metric, others.get(metric))
        entry["num_fewshot"] = _shots(raw, name)
        entry["samples"] = _samples(raw, name)
        entry["version"] = raw.get("versions", {}).get(name)
        subtasks = _leaves(raw, name)
        if subtasks:
            entry["subtasks"] = len(subtasks)
        out[name] = entry
    return out


def _finite(v):
    import math

    return v if isinstance(v, float) and math.isfinite(v) else None


def _leaves(raw: dict[str, Any], name: str) -> list[str]:
    groups = raw.get("group_subtasks", {})
    if not groups.get(name):
        return []
    out: list[str] = []
    for child in groups[name]:
        out.extend(_leaves(raw, child) or [child])
    return out


def _samples(raw: dict[str, Any], name: str) -> int | None:
    ns = raw.get("n-samples", {})
    if name in ns:
        return int(ns[name].get("effective", ns[name].get("original", 0)))
    leaves = _leaves(raw, name)
    if leaves and all(leaf in ns for leaf in leaves):
        return sum(int(ns[leaf].get("effective", 0)) for leaf in leaves)
    return None


def _shots(raw: dict[str, Any], name: str) -> int | None:
    shots = raw.get("n-shot", {})
    if name in shots:
        return int(shots[name])
    vals = {int(shots[leaf]) for leaf in _leaves(raw, name) if leaf in shots}
    return vals.pop() if len(vals) == 1 else None


# ----------------------------------------------------------------------------------------------- lm-eval glue
@contextlib.contextmanager
def _quiet_lm_eval(debug: bool = False) -> Iterator[None]:
    """lm-eval logs every override at INFO/WARNING; keep the terminal to its progress bars unless debugging."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    if not debug:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


@contextlib.contextmanager
def _cwd(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def task_manager(names: Sequence[str], include_path: str | None = None, local_dir: str | Path | None = None):
    """An lm-eval TaskManager that knows every name in ``names``; unknown names are a one-line error.

    ``local_dir``: lpt's local task copies (``local_tasks.write_tasks``). When every name is found in
    ``include_path`` / ``local_dir``, lm-eval's own registry (thousands of YAML files) is not indexed at all.
    """
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise LptError(f"--include-path {include_path} is not a directory")
    paths = [str(p) for p in (local_dir, include_path) if p is not None]
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    tm = TaskManager(include_path=paths or None)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        n = unknown[0]
        close = difflib.get_close_matches(n, tm.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        where = "lm-eval's registry" + (f" or {include_path}" if include_path
                                        else " (local task YAML: --include-path DIR)")
        raise LptError(f"unknown task '{n}' (not in {where}){hint}")
    return tm


def load_tasks(tm, names: Sequence[str], include_path: str | None = None) -> tuple[list[Any], dict[str, list[Any]]]:
    """Build each task (this reads its data), so that a task whose data cannot be loaded is named in the error.

    Returns what ``simple_evaluate`` takes (Task / Group objects) and, per name, its leaf tasks.
    """
    root = Path(include_path) if include_path else None
    specs: list[Any] = []
    leaves: dict[str, list[Any]] = {}
    for name in names:
        entry = tm.task_index.get(name) if hasattr(tm, "task_index") else None
        yaml_path = getattr(entry, "yaml_path", None)
        local_dir = Path(yaml_path).parent if (root and yaml_path and _under(Path(yaml_path), root)) else None
        try:
            with _cwd(local_dir):
                loaded = tm.load([name])
        except Exception as e:  # noqa: BLE001 - datasets / lm-eval raise many types; the user needs one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            hint = "" if local_dir else (" (lm-eval tasks read their data from the hub; offline, use lpt's local "
                                         f"copies of the paper's tasks and mmlu: {local_tasks.DATA_INSTALL}, or a "
                                         "local task YAML with --include-path DIR)")
            raise LptError(f"task '{name}' could not load its data: {first}{hint}") from None
        if name in loaded["groups"]:
            specs.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            specs.append(loaded["tasks"][name])
        else:  # a tag: its tasks
            specs.extend(loaded["tasks"].values())
        leaves[name] = list(loaded["tasks"].values())
    return specs, leaves


@dataclass
class Prepared:
    """Tasks resolved and their data loaded (before the model is): what ``run_tasks`` evaluates."""

    names: list[str]
    manager: Any
    specs: list[Any]
    leaves: dict[str, list[Any]] = field(default_factory=dict)  # name -> its leaf Task objects
    sources: dict[str, str] = field(default_factory=dict)  # name -> "hub", "local" or "include-path"
    local: local_tasks.LocalTasks | None = None

    def task_data(self) -> dict[str, Any]:
        """Where the documents came from, for the results file."""
        out: dict[str, Any] = {"sources": dict(self.sources)}
        if self.local is not None:
            out["local"] = {**local_tasks.describe(self.local.root), "notes": dict(self.local.notes)}
        return out

    def cleanup(self) -> None:
        if self.local is not None:
            self.local.cleanup()


def _include_tasks(include_path: str | None) -> dict[str, Path | None]:
    """The tasks defined under ``include_path``: name -> its YAML file (read as text only: nothing is imported)."""
    if include_path is None:
        return {}
    from lm_eval.tasks import TaskManager

    if not Path(include_path).is_dir():
        raise LptError(f"--include-path {include_path} is not a directory")
    tm = TaskManager(include_path=str(include_path), include_defaults=False)
    index = getattr(tm, "task_index", {})
    return {n: (Path(p) if (p := getattr(index.get(n), "yaml_path", None)) else None) for n in tm.all_tasks}


_FUNCTION = re.compile(r"!function\s+([\w.]+)")
_INCLUDE = re.compile(r"^include:\s*['\"]?([^'\"#\n]+?)['\"]?\s*(?:#.*)?$", re.MULTILINE)


def task_python(yaml_path: Path) -> list[str]:
    """The Python a task YAML (and the YAMLs it includes) makes lm-eval import and run: every ``!function
    module.name`` tag, as ``name`` in ``DIR/module.py``. Read as text; nothing is imported here."""
    out: list[str] = []
    seen: set[Path] = set()

    def walk(path: Path) -> None:
        if path in seen or not path.is_file():
            return
        seen.add(path)
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in _FUNCTION.finditer(text):
            module, _, name = m.group(1).rpartition(".")
            out.append(f"{name} in {path.parent / (module.replace('.', '/') + '.py')}")
        for inc in _INCLUDE.findall(text):
            walk((path.parent / inc.strip()).resolve())

    walk(Path(yaml_path).resolve())
    return list(dict.fromkeys(out))


def announce_python(tasks: dict[str, Path | None], names: Sequence[str]) -> None:
    """Say which of the requested tasks from --include-path bring Python that lm-eval will run (its ``!function``
    tags): the flag trusts that directory's code, and the user should see what it is."""
    from lpt.progress import console

    for name in names:
        code = task_python(tasks[name]) if tasks.get(name) else []
        if code:
            console.print(f"[yellow]note:[/] task {name} from --include-path runs Python code: {', '.join(code)}",
                          soft_wrap=True)


def prepare(specs: Sequence[str] | Sequence[tuple[str, int | None]], include_path: str | None = None,
            debug: bool = False, task_data: str = "auto", num_fewshot: int | None = None) -> Prepared:
    """Resolve task names (unknown ones are an error) and load their data (unreachable data is an error).

    ``specs``: names, or ``(name, shots)`` pairs from :func:`parse_task_specs`. Tasks defined in ``include_path``
    come from there; the others from lm-eval's registry, with their documents from the hub or from lpt's local
    copies (``task_data``: auto, hub, local or a directory; see ``lpt.evaluation.local_tasks.choose``).
    ``num_fewshot`` applies to the tasks without their own ``:N``.
    """
    pairs = [(s, None) if isinstance(s, str) else (s[0], s[1]) for s in specs]
    names = [n for n, _ in pairs]
    if include_path is not None:  # resolved once: lm-eval and the YAMLs' data_files then agree on where it is
        include_path = str(Path(include_path).expanduser().resolve())
    if not debug:  # datasets' per-split "Generating" / "Map" bars while the documents load
        import datasets

        datasets.disable_progress_bars()
    with _quiet_lm_eval(debug):
        own = _include_tasks(include_path)
        announce_python(own, [n for n in names if n in own])
        others = [n for n in names if n not in own]
        root = local_tasks.choose(task_data, others) if others else None
        local = local_tasks.write_tasks(others, root) if root is not None else None
        try:
            tm = task_manager(names, include_path, local.directory if local else None)
            built, leaves = load_tasks(tm, names, include_path)
        except BaseException:
            if local is not None:
                local.cleanup()
            raise
    prepared = Prepared(names, tm, built, leaves, {n: "include-path" if n in own else ("local" if local else "hub")
                                                  for n in names}, local)
    for name, shots in pairs:
        shots = num_fewshot if shots is None else shots
        if shots is None:
            continue
        if shots > 0 and prepared.sources[name] == "local" and name not in local_tasks.MMLU_GROUPS \
                and not name.startswith("mmlu_"):
            prepared.cleanup()
            raise LptError(f"task '{name}': the local copies have no training split to draw {shots} few-shot "
                           f"examples from (only mmlu's dev split); run it zero-shot, or with --task-data hub")
        for t in leaves[name]:
            t.set_config(key="num_fewshot", value=int(shots))
    return prepared


def subsample(prepared: Prepared, n: int, seed: int = 0) -> dict[str, list[int]]:
    """A seeded random subset of ``n`` documents of every leaf task (all of a task with ``n`` or fewer):
    lm-eval's ``samples`` argument, indices into each task's evaluation split, sorted. The subsets are nested: the
    first ``n`` of one seeded permutation per task, so a smaller ``n`` picks a subset of a larger one (rows
    evaluated on different ``n`` compare on their common documents)."""
    import random

    out: dict[str, list[int]] = {}
    for leaves in prepared.leaves.values():
        for t in leaves:
            order = list(range(len(t.eval_docs)))
            random.Random(f"{seed}:{t.task_name}").shuffle(order)
            out[t.task_name] = sorted(order[:n])
    return out


def task_splits(prepared: Prepared) -> dict[str, dict[str, Any]]:
    """Per requested name: the split evaluated and its number of documents (summed over a group's leaves)."""
    out: dict[str, dict[str, Any]] = {}
    for name, leaves in prepared.leaves.items():
        splits = sorted({t.config.test_split or t.config.validation_split for t in leaves} - {None})
        out[name] = {"split": splits[0] if len(splits) == 1 else ",".join(splits),
                     "docs_total": sum(len(t.eval_docs) for t in leaves), "data": prepared.sources.get(name)}
    return out


def run_tasks(model, tokenizer, prepared: Prepared, *, num_fewshot: int | None = None, batch_size: int | str = 8,
              limit: float | None = None, samples: dict[str, list[int]] | None = None, log_samples: bool = False,
              debug: bool = False) -> dict[str, Any]:
    """Evaluate the prepared tasks with lm-evaluation-harness on the in-memory ``model``.

    ``samples``: document indices per leaf task (:func:`subsample`), instead of ``limit``. Returns
    ``simple_evaluate``'s dictionary (``results``, ``n-shot``, ``n-samples``, ``versions``, and ``samples`` with
    ``log_samples``). Few-shot counts set by :func:`prepare` stay; ``num_fewshot`` overrides every other task's.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if num_fewshot is not None and num_fewshot < 0:
        raise LptError(f"--num-fewshot must be >= 0 (got {num_fewshot})")
    if limit is not None and limit <= 0:
        raise LptError(f"--limit must be positive (got {limit})")
    if limit is not None and samples is not None:
        raise LptError("give --limit or --samples, not both")
    bs = parse_batch_size(batch_size)
    with _quiet_lm_eval(debug):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=bs)
        kwargs = {"samples": samples} if samples is not None else {}
        raw = lm_eval.simple_evaluate(model=lm, tasks=prepared.specs, num_fewshot=num_fewshot,
                                      task_manager=prepared.manager, limit=limit, log_samples=log_samples, **kwargs)
    if raw is None:
        raise LptError("lm-eval returned no results (not the main process?)")
    return raw


def per_doc(raw: dict[str, Any], prepared: Prepared) -> dict[str, dict[str, Any]]:
    """Per requested name: every evaluated document's id (``leaf/doc_id`` for groups) and its acc / acc_norm, from
    ``simple_evaluate(log_samples=True)``: what paired comparisons of two models on the same documents need."""
    out: dict[str, dict[str, Any]] = {}
    logged = raw.get("samples") or {}
    for name, leaves in prepared.leaves.items():
        ids: list[str] = []
        vals: dict[str, list[float]] = {m: [] for m in METRICS}
        for t in leaves:
            for s in sorted(logged.get(t.task_name, []), key=lambda s: s["doc_id"]):
                ids.append(str(s["doc_id"]) if len(leaves) == 1 else f"{t.task_name}/{s['doc_id']}")
                for m in METRICS:
                    vals[m].append(float(s[m]) if s.get(m) is not None else float("nan"))
        out[name] = {"ids": ids, **{m: v for m, v in vals.items() if any(x == x for x in v)}}
    return out


def parse_batch_size(value: int | str) -> int | str:
    """An lm-eval batch size: a positive integer, 'auto' or 'auto:N'."""
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        if int(value) < 1:
            raise LptError(f"--task-batch-size must be positive (got {value})")
        return int(value)
    if value == "auto" or (value.startswith("auto:") and value[5:].isdigit()):
        return value
    raise LptError(f"--task-batch-size must be a positive integer or 'auto' (got {value})")
