"""Training checkpoints without pickle: every tensor in one safetensors file, everything else in JSON.

``save(directory, tensors, meta)`` writes ``trainer_state.safetensors`` (tensors by name) and ``checkpoint.json``
(plain data) into a temporary sibling that replaces ``directory`` in one rename, so a crash leaves either the old
checkpoint or the new one. ``load`` reads them back; nothing in a checkpoint is ever executed.
Optimiser states are flattened with ``flatten_optimizer`` / ``unflatten_optimizer``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from lpt import artifacts
from lpt.errors import LptError

TENSORS = artifacts.CHECKPOINT_TENSORS
META = artifacts.CHECKPOINT_META
LEGACY = artifacts.CHECKPOINT_STATE  # pickled checkpoints of lpt 0.1 (never read: unpickling can run code)


def save(directory: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    directory = Path(directory)
    tmp = directory.parent / f".{directory.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        artifacts.save_tensors({k: v.detach().cpu() for k, v in tensors.items()}, tmp / TENSORS)
        artifacts.write_json(tmp / META, dict(meta))
    except BaseException:  # a full disk: the previous checkpoint stays, the half-written one goes
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def exists(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / TENSORS).is_file() and (d / META).is_file()


def require(directory: str | Path) -> None:
    """Raise the one-line reason why ``directory`` holds no checkpoint this version can resume from."""
    d = Path(directory)
    if exists(d):
        return
    if (d / LEGACY).is_file():
        raise LptError(f"{d} holds a pickled checkpoint from an older lpt, which this version does not load "
                       f"(pickles can run code); start the run again")
    raise LptError(f"--resume: no checkpoint in {d} (run with --save-every N to make one)")


def load(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The checkpoint's tensors and its record (``step``, ``config`` and the trainer's ``state``); a record that is not
    one is a one-line error naming it."""
    require(directory)
    d = Path(directory)
    meta = artifacts.read_object(d / META, "checkpoint record")
    missing = [k for k in ("step", "config", "state") if k not in meta]
    if missing:
        raise LptError(f"{d / META} has no '{missing[0]}': the checkpoint is incomplete; start the run again without "
                       f"--resume")
    artifacts.check_types(meta, d / META, {"step": int, "config": dict, "state": dict})
    return artifacts.load_tensors(d / TENSORS), meta


@contextlib.contextmanager
def restoring(directory: str | Path) -> Iterator[None]:
    """Around putting a checkpoint's contents back into a trainer: what the trainer does not find there (a missing
    key, a tensor of another shape) is a one-line error naming the checkpoint, not a ``KeyError``."""
    try:
        yield
    except KeyError as e:
        raise LptError(f"checkpoint {directory} has no {e}: it is incomplete or from another version; start the run "
                       f"again without --resume") from None
    except (TypeError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LptError(f"checkpoint {directory} does not fit this run ({first}); start the run again without "
                       f"--resume") from None


def flatten_optimizer(state: Mapping[str, Any], prefix: str = "optimizer") -> tuple[dict[str, torch.Tensor], dict]:
    """A torch optimiser ``state_dict`` as (tensors by name, JSON-able rest)."""
    tensors, plain = {}, {}
    for pid, st in state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.state.{pid}.{k}"] = v
            else:
                plain[f"{pid}.{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": plain}


def unflatten_optimizer(tensors: Mapping[str, torch.Tensor], plain: Mapping[str, Any], prefix: str = "optimizer"
                        ) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    head = f"{prefix}.state."
    for name, t in tensors.items():
        if name.startswith(head):
            pid, k = name[len(head):].split(".", 1)
            state.setdefault(int(pid), {})[k] = t
    for name, v in plain.get("scalars", {}).items():
        pid, k = name.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in plain["param_groups"]]
    return {"state": state, "param_groups": groups}
