"""Training checkpoints without pickle: every tensor in one safetensors file, everything else in JSON.

``save(directory, tensors, meta)`` writes ``trainer_state.safetensors`` (tensors by name) and ``checkpoint.json``
(plain data) into a temporary sibling that replaces ``directory`` in one rename, so a crash leaves either the old
checkpoint or the new one. ``load`` reads them back; nothing in a checkpoint is ever executed.
Optimiser states are flattened with ``flatten_optimizer`` / ``unflatten_optimizer``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from lpt import artifacts
from lpt.errors import LptError

TENSORS = "trainer_state.safetensors"
META = artifacts.CHECKPOINT_META
LEGACY = artifacts.CHECKPOINT_STATE  # pickled checkpoints of lpt 0.1 (never read: unpickling can run code)


def save(directory: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    tmp = directory.parent / f".{directory.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / TENSORS))
    artifacts.write_json(tmp / META, dict(meta))
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
    require(directory)
    d = Path(directory)
    return artifacts.load_tensors(d / TENSORS), artifacts.read_json(d / META)


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
