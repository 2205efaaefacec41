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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from lpt.errors import LptError

PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
PAPER_METRICS = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc", "arc_easy": "acc",
                 "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
ALIASES = {"paper": PAPER_TASKS}  # --tasks paper = the seven zero-shot tasks of the paper
METRICS = ("acc", "acc_norm")


def parse_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """Comma-separated task names (aliases expanded, duplicates dropped, order kept)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec or [])
    out: list[str] = []
    for raw in items:
        name = raw.strip()
        if not name:
            continue
        for n in ALIASES.get(name, (name,)):
            if n not in out:
                out.append(n)
    return out


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


def task_manager(names: Sequence[str], include_path: str | None = None):
    """An lm-eval TaskManager that knows every name in ``names``; unknown names are a one-line error.

    When every name is a local task in ``include_path``, lm-eval's own registry (thousands of YAML files) is not
    indexed at all.
    """
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        p = Path(include_path)
        if not p.is_dir():
            raise LptError(f"--include-path {include_path} is not a directory")
        local = TaskManager(include_path=str(p), include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    tm = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        n = unknown[0]
        close = difflib.get_close_matches(n, tm.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        where = "lm-eval's registry" + (f" or {include_path}" if include_path
                                        else " (local task YAML: --include-path DIR)")
        raise LptError(f"unknown task '{n}' (not in {where}){hint}")
    return tm


def load_tasks(tm, names: Sequence[str], include_path: str | None = None) -> list[Any]:
    """Build each task (this reads its data), so that a task whose data cannot be loaded is named in the error.

    Returns what ``simple_evaluate`` takes: Task / Group objects (or the names with an lm-eval too old to build
    them separately).
    """
    if not hasattr(tm, "load"):
        return list(names)
    root = Path(include_path) if include_path else None
    specs: list[Any] = []
    for name in names:
        entry = tm.task_index.get(name) if hasattr(tm, "task_index") else None
        yaml_path = getattr(entry, "yaml_path", None)
        local_dir = Path(yaml_path).parent if (root and yaml_path and _under(Path(yaml_path), root)) else None
        try:
            with _cwd(local_dir):
                loaded = tm.load([name])
        except Exception as e:  # noqa: BLE001 - datasets / lm-eval raise many types; the user needs one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            hint = "" if local_dir else " (lm-eval tasks read their data from the hub; offline, use a local task " \
                                        "YAML with --include-path DIR)"
            raise LptError(f"task '{name}' could not load its data: {first}{hint}") from None
        if name in loaded["groups"]:
            specs.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            specs.append(loaded["tasks"][name])
        else:  # a tag: its tasks
            specs.extend(loaded["tasks"].values())
    return specs


@dataclass
class Prepared:
    """Tasks resolved and their data loaded (before the model is): what ``run_tasks`` evaluates."""

    names: list[str]
    manager: Any
    specs: list[Any]


def prepare(names: Sequence[str], include_path: str | None = None, debug: bool = False) -> Prepared:
    """Resolve task names (unknown ones are an error) and load their data (unreachable data is an error)."""
    with _quiet_lm_eval(debug):
        tm = task_manager(names, include_path)
        return Prepared(list(names), tm, load_tasks(tm, names, include_path))


def run_tasks(model, tokenizer, prepared: Prepared, *, num_fewshot: int | None = None, batch_size: int | str = 8,
              limit: float | None = None, debug: bool = False) -> dict[str, Any]:
    """Evaluate the prepared tasks with lm-evaluation-harness on the in-memory ``model``.

    Returns ``simple_evaluate``'s dictionary (``results``, ``n-shot``, ``n-samples``, ``versions``, ...).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if num_fewshot is not None and num_fewshot < 0:
        raise LptError(f"--num-fewshot must be >= 0 (got {num_fewshot})")
    if limit is not None and limit <= 0:
        raise LptError(f"--limit must be positive (got {limit})")
    bs = parse_batch_size(batch_size)
    with _quiet_lm_eval(debug):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=bs)
        raw = lm_eval.simple_evaluate(model=lm, tasks=prepared.specs, num_fewshot=num_fewshot,
                                      task_manager=prepared.manager, limit=limit, log_samples=False)
    if raw is None:
        raise LptError("lm-eval returned no results (not the main process?)")
    return raw


def parse_batch_size(value: int | str) -> int | str:
    """An lm-eval batch size: a positive integer, 'auto' or 'auto:N'."""
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        if int(value) < 1:
            raise LptError(f"--task-batch-size must be positive (got {value})")
        return int(value)
    if value == "auto" or (value.startswith("auto:") and value[5:].isdigit()):
        return value
    raise LptError(f"--task-batch-size must be a positive integer or 'auto' (got {value})")
