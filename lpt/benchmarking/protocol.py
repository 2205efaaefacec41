"""What ``lpt bench`` measures, as typed objects: the models of a runtime comparison (``Entry``), the fixed
settings of a measurement (``RuntimeProtocol``, ``PruneStepProtocol``), one configuration of a prune-step
comparison (``StepRun``), and ``Task``, the spec one measuring process receives. Also the parsing that turns the
command line's lists into them (``build_entries``, ``prune_step_runs``).

Every object is a dataclass of JSON values: ``Task.to_json`` / ``Task.from_json`` carry it across the process
boundary (``python -m lpt.benchmarking.worker``) unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from lpt.config import BenchRuntimeConfig
from lpt.errors import LptError

NO_ADAPTER = ("-", "none", "")


@dataclass(frozen=True)
class Entry:
    """One model to measure: a checkpoint (``model``) or random weights at a shape (``random_init``), with an
    optional adapter (a directory or ``random:R``) and masks file, unmerged."""

    label: str
    model: str | None = None
    random_init: str | None = None
    adapter: str | None = None
    masks: str | None = None


@dataclass(frozen=True)
class RuntimeProtocol:
    """Settings shared by every model of ``lpt bench runtime`` (``device`` resolved, trial counts filled in)."""

    dtype: str
    device: str
    revision: str | None
    trust_remote_code: bool
    seq_len: int
    batch_sizes: tuple[int, ...]
    trials: int
    warmup: int
    new_tokens: int
    decode_trials: int
    threads: int
    seed: int


@dataclass(frozen=True)
class PruneStepProtocol:
    """Settings shared by every configuration of ``lpt bench prune-step``."""

    dtype: str
    device: str
    revision: str | None
    trust_remote_code: bool
    seq_len: int
    batch_size: int
    micro_batch_size: int
    ratio: float
    lora_r: int
    lora_alpha: float
    trials: int
    warmup: int
    threads: int
    seed: int
    gradient_checkpointing: bool = False
    distill: bool = False
    loss_head: bool = True


@dataclass(frozen=True)
class StepRun:
    """One configuration of ``lpt bench prune-step``: a criterion (``none``: plain LoRA), float or int8 base (and
    then its backend, ``bitsandbytes`` or ``torch``)."""

    label: str
    criterion: str
    load_8bit: bool = False
    int8_backend: str | None = None


TASKS = ("runtime", "runtime-interleaved", "prune-step")


@dataclass(frozen=True)
class Task:
    """One measurement: ``runtime`` (``entries[0]`` timed at every batch size), ``runtime-interleaved`` (all
    ``entries`` timed in turns) or ``prune-step`` (``run`` on ``entries[0]``)."""

    task: str
    entries: tuple[Entry, ...]
    runtime: RuntimeProtocol | None = None
    prune_step: PruneStepProtocol | None = None
    run: StepRun | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "Task":
        if doc.get("task") not in TASKS:
            raise LptError(f"unknown bench task {doc.get('task')!r}")
        rt, ps, run = doc.get("runtime"), doc.get("prune_step"), doc.get("run")
        return cls(doc["task"], tuple(Entry(**e) for e in doc["entries"]),
                   RuntimeProtocol(**{**rt, "batch_sizes": tuple(rt["batch_sizes"])}) if rt else None,
                   PruneStepProtocol(**ps) if ps else None, StepRun(**run) if run else None)


# ------------------------------------------------------------------------------------------------ parsing
def int_list(values: Iterable[Any], flag: str) -> list[int]:
    """[1, '4,16'] -> [1, 4, 16]; every value positive."""
    out: list[int] = []
    for v in values if not isinstance(values, (int, str)) else [values]:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                n = int(part)
            except ValueError:
                raise LptError(f"{flag}: '{part}' is not an integer") from None
            if n <= 0:
                raise LptError(f"{flag} must be positive (got {n})")
            out.append(n)
    if not out:
        raise LptError(f"{flag}: give at least one value")
    return out


def auto_label(model: str | None, random_init: str | None, adapter: str | None) -> str:
    if random_init:
        base = random_init
        if random_init.lstrip().startswith("{"):  # inline JSON: keep only the ratio suffix
            tail = random_init.rsplit("}", 1)[-1].strip()
            base = "random-init" + (tail if tail.startswith("@") else "")
    else:
        p = Path(str(model).rstrip("/"))
        base = p.stem if p.suffix == ".gguf" else (p.name or str(model))
    if adapter:
        if adapter.startswith("random:"):
            return f"{base} + LoRA r{adapter.split(':', 1)[1]}"
        return f"{base} + {Path(adapter.rstrip('/')).name or adapter}"
    return base


def build_entries(cfg: BenchRuntimeConfig) -> list[Entry]:
    """One ``Entry`` per model to time (validated pairing of the MODEL, --random-init, --adapter, --masks and
    --label lists)."""
    pairs: list[tuple[str | None, str | None]] = [(m, None) for m in cfg.models]
    pairs += [(None, r) for r in cfg.random_init]
    if not pairs:
        pairs = [(cfg.model, None)]
    n = len(pairs)
    adapters = list(cfg.adapter)
    if adapters and len(adapters) != n:
        raise LptError(f"give one --adapter per model ({n} model(s), {len(adapters)} --adapter); use - for none")
    adapters = [None if a is None or str(a).strip().lower() in NO_ADAPTER else str(a) for a in adapters] or [None] * n
    if cfg.label and len(cfg.label) != n:
        raise LptError(f"give one --label per model ({n} model(s), {len(cfg.label)} --label)")
    masks = list(cfg.masks)
    if masks and len(masks) != n:
        raise LptError(f"give one --masks per model ({n} model(s), {len(masks)} --masks); use - for none")
    masks = [None if m is None or str(m).strip().lower() in NO_ADAPTER else str(m) for m in masks] or [None] * n
    for m in masks:
        if m is not None and not Path(m).is_file():
            raise LptError(f"masks file not found: {m}")
    labels = list(cfg.label) or [auto_label(m, r, a) for (m, r), a in zip(pairs, adapters)]
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):
        if lab in seen:
            seen[lab] += 1
            labels[i] = f"{lab} ({seen[lab]})"
        else:
            seen[lab] = 1
    return [Entry(lab, m, r, a, k) for lab, (m, r), a, k in zip(labels, pairs, adapters, masks)]


def prune_step_runs(criteria: Iterable[str], plain_lora: bool, load_8bit: bool, backends: Iterable[str] = ("auto",)
                    ) -> tuple[list[StepRun], list[dict[str, str]]]:
    """(configurations to time, skipped ones with the reason) in table order; one 8-bit row per int8 backend
    (labelled ``... 8-bit (BACKEND)`` when there are several)."""
    from lpt import importance

    backends = list(dict.fromkeys(backends)) or ["auto"]
    names = []
    for c in criteria:
        for part in str(c).split(","):
            part = part.strip()
            if part and part not in names:
                names.append(part)
    bad = [c for c in names if c not in importance.CRITERIA]
    if bad:
        raise LptError(f"unknown --criterion '{bad[0]}' (use {', '.join(importance.CRITERIA)})")
    if not names and not plain_lora:
        raise LptError("nothing to time: give --criterion and/or --plain-lora")
    runs, skipped = [], []
    for c in names + (["none"] if plain_lora else []):
        base = "plain LoRA" if c == "none" else c
        runs.append(StepRun(base, c, False, None))
        for b in backends if load_8bit else ():
            label = f"{base} 8-bit" + (f" ({b})" if len(backends) > 1 else "")
            why = importance.int8_conflict(c)
            if why:
                skipped.append({"label": label, "reason": why})
            else:
                runs.append(StepRun(label, c, True, b))
    return runs, skipped
