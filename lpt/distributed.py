"""Running a stage on several processes (data parallel) or over several devices (model parallel).

Data parallel: ``torchrun --nproc_per_node N -m lpt prune ...`` or ``accelerate launch --multi_gpu --num_processes N
-m lpt prune ...`` start N copies of the same command; the launcher puts RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR
in the environment. :func:`process_group` turns that environment into a ``torch.distributed`` process group through
accelerate's ``PartialState`` (gloo on CPU, nccl on CUDA, the CUDA device set from LOCAL_RANK), and tears it down
at the end. Every rank holds the whole model and the whole (small) token set; :func:`shard` says which
micro-batches of each global batch a rank computes, and :func:`all_reduce_sum_` / :func:`broadcast_` keep the
ranks in step with one bucketed collective per dtype and device.

Model parallel: ``--device-map`` (accelerate's big-model placement, see :func:`parse_device_map`) spreads the
layers of one model over the visible devices of one process; :func:`check_placement` refuses layers offloaded to
CPU RAM or disk, which LoRA cannot train.

Collectives and launch only; the memory arithmetic behind docs/scaling.md is ``lpt.benchmarking.scaling``.
Nothing here imports torch at module level.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from lpt.errors import LptError

PLACEMENTS = ("auto", "balanced", "balanced_low_0", "sequential")
UNSUPPORTED_LAUNCHES = {
    "ACCELERATE_USE_FSDP": "FSDP",
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
}


# ------------------------------------------------------------------------------------------------ environment
def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise LptError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def launched_world_size() -> int:
    """Processes the launcher (torchrun / accelerate launch) started; 1 for a plain ``lpt`` command."""
    return env_int("WORLD_SIZE", 1)


def is_initialized() -> bool:
    import torch

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    import torch

    return torch.distributed.get_rank() if is_initialized() else env_int("RANK", 0)


def world_size() -> int:
    import torch

    return torch.distributed.get_world_size() if is_initialized() else 1


def check_launch(device: str, device_map: str | None) -> None:
    """Refuse launch configurations lpt does not support, before any process group or model exists."""
    for var, name in UNSUPPORTED_LAUNCHES.items():
        if os.environ.get(var, "false").lower() in ("1", "true", "yes"):
            raise LptError(f"{name} launches are not supported yet (the LoRA criterion needs each layer's whole weight "
                           f"and LoRA gradients on one rank; see docs/scaling.md): use plain data parallel "
                           f"(accelerate config: multi-GPU, no {name}) or --device-map auto")
    if launched_world_size() > 1:
        if device_map:
            raise LptError("--device-map spreads one model over all visible devices and cannot be combined with "
                           "several processes; use one or the other (docs/scaling.md)")
        if device.startswith("cuda:"):
            raise LptError(f"--device {device} would put every process on the same GPU; under torchrun / accelerate "
                           f"launch leave --device auto (each process takes the GPU of its LOCAL_RANK)")


@dataclass
class World:
    """Where this process stands: its rank, the number of processes, and the device it computes on."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None
    owned: bool = False  # this process group was created by lpt (and is destroyed by it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _wants_cpu(device: str) -> bool:
    import torch

    if os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes"):
        return True
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[World]:
    """The process group of a torchrun / accelerate launch (a no-op for a single process).

    Yields a :class:`World` whose ``device`` replaces ``--device``: under a multi-process launch, ``auto`` / ``cuda``
    become the GPU of LOCAL_RANK. Output of the rank-0 console is silenced on other ranks while inside (errors
    raised out of the block are still printed by every rank). On a normal exit the ranks meet at a barrier and the
    process group lpt created is destroyed.
    """
    import torch

    from lpt.progress import console

    if launched_world_size() <= 1 and not is_initialized():
        cpu_only = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
        yield World(device="cpu" if cpu_only and device == "auto" else device)  # accelerate launch --cpu
        return
    owned = not is_initialized()
    if owned:
        from accelerate import PartialState

        state = PartialState(cpu=_wants_cpu(device))
        if not torch.distributed.is_initialized():
            raise LptError(f"WORLD_SIZE={launched_world_size()} but no process group could be started on "
                           f"{'CPU' if _wants_cpu(device) else 'this accelerator'}")
        dev = "cpu" if state.device.type == "cpu" else str(state.device)
        world = World(rank=state.process_index, size=state.num_processes, local_rank=state.local_process_index,
                      device=dev, backend=state.backend, owned=True)
    else:
        dev = device
        if torch.distributed.get_backend() == "nccl" and not device.startswith("cuda:"):
            dev = f"cuda:{torch.cuda.current_device()}"
        world = World(rank=torch.distributed.get_rank(), size=torch.distributed.get_world_size(),
                      local_rank=env_int("LOCAL_RANK", 0), device=dev, backend=torch.distributed.get_backend())
    quiet = console.quiet
    console.quiet = quiet or not world.main
    try:
        yield world
        barrier()
    finally:
        console.quiet = quiet
        if owned:
            from accelerate import PartialState

            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            PartialState._reset_state()


# ------------------------------------------------------------------------------------------------ work sharing
def shard(n: int, r: int | None = None, size: int | None = None) -> range:
    """The contiguous share of ``range(n)`` that rank ``r`` of ``size`` processes takes (default: this process's); the
    first ``n % size`` ranks take one item more. Concatenated over the ranks in order, the shares are ``range(n)``."""
    r = rank() if r is None else r
    size = world_size() if size is None else size
    if not 0 <= r < size:
        raise ValueError(f"rank {r} is not in [0, {size})")
    base, extra = divmod(n, size)
    lo = r * base + min(r, extra)
    return range(lo, lo + base + (1 if r < extra else 0))


BUCKET_BYTES = 256 * 2**20


def _buckets(tensors: Iterable[Any], cap: int = BUCKET_BYTES) -> list[list[Any]]:
    """Tensors grouped by (device, dtype), each group cut into buckets of at most ``cap`` bytes (a larger tensor
    makes a bucket of its own), so flattening never copies more than ``cap`` bytes at once."""
    groups: dict[tuple[Any, Any], list[list[Any]]] = {}
    sizes: dict[tuple[Any, Any], int] = {}
    for t in tensors:
        key, nbytes = (t.device, t.dtype), t.numel() * t.element_size()
        runs = groups.setdefault(key, [[]])
        if runs[-1] and sizes[key] + nbytes > cap:
            runs.append([])
            sizes[key] = 0
        runs[-1].append(t)
        sizes[key] = sizes.get(key, 0) + nbytes
    return [b for runs in groups.values() for b in runs if b]


def _collective(tensors: Iterable[Any], op) -> None:
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for bucket in _buckets(tensors):
        if len(bucket) == 1 and bucket[0].is_contiguous():
            op(bucket[0])
            continue
        flat = _flatten_dense_tensors(bucket)
        op(flat)
        for t, r in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(r)


def all_reduce_sum_(tensors: Iterable[Any]) -> None:
    """Sum each tensor over all ranks, in place (one flat all-reduce per bucket)."""
    import torch

    if is_initialized() and world_size() > 1:
        _collective(tensors, lambda t: torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM))


def broadcast_(tensors: Iterable[Any], src: int = 0) -> None:
    """Overwrite each tensor with rank ``src``'s copy, in place (one flat broadcast per bucket)."""
    import torch

    if is_initialized() and world_size() > 1:
        _collective(tensors, lambda t: torch.distributed.broadcast(t, src=src))


def broadcast_object(obj: Any = None, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled, one collective; for small things such as calibration blocks).
    Without a process group of more than one rank it returns ``obj`` unchanged."""
    import torch

    if not (is_initialized() and world_size() > 1):
        return obj
    box = [obj if rank() == src else None]
    device = None
    if torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    torch.distributed.broadcast_object_list(box, src=src, device=device)
    return box[0]


def barrier() -> None:
    import torch

    if is_initialized() and world_size() > 1:
        torch.distributed.barrier()


def seed_rank(seed: int, step: int = 0) -> None:
    """Give ranks other than 0 their own random stream (LoRA dropout), derived from ``seed``, the rank and the step
    to resume from. Rank 0 keeps the stream a single process would have."""
    import torch

    r = rank()
    if r > 0:
        torch.manual_seed((seed * 1_000_003 + r * 7919 + step) % (2**63))


# ------------------------------------------------------------------------------------------------ model parallel
def parse_device_map(spec: str | dict | None) -> str | dict | None:
    """``--device-map``: auto / balanced / balanced_low_0 / sequential, a JSON object (``{"model.layers.0": 0,
    ...}``) or the path of a .json file holding one. Returns what ``from_pretrained(device_map=...)`` takes."""
    if spec is None or isinstance(spec, dict):
        return spec
    spec = spec.strip()
    if not spec:
        return None
    if spec in PLACEMENTS:
        return spec
    text, where = spec, "--device-map"
    if not spec.startswith("{"):
        if not spec.endswith(".json"):
            raise LptError(f"--device-map '{spec}': use {', '.join(PLACEMENTS)}, a JSON object or a .json file")
        p = Path(spec)
        if not p.is_file():
            raise LptError(f"--device-map file not found: {spec}")
        text, where = p.read_text(encoding="utf-8"), spec
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise LptError(f"{where} is not valid JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(doc, dict) or not doc:
        raise LptError(f"{where} must be a non-empty JSON object mapping module names to devices")
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for k, v in doc.items():
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise LptError(f"{where}: device of '{k}' must be a GPU index or a device name (got {v!r})")
        index = v if isinstance(v, int) else (int(v[5:]) if v.startswith("cuda:") and v[5:].isdigit() else None)
        if (index is not None or v == "cuda") and (index or 0) >= gpus:
            raise LptError(f"{where}: '{k}' is mapped to GPU {v} but {gpus or 'no'} CUDA device(s) are visible")
    return doc


def check_placement(model) -> None:
    """Refuse a model whose layers accelerate offloaded to CPU RAM or disk (their weights are not resident, and
    LoRA factors and optimiser state cannot live there)."""
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    dm = getattr(model, "hf_device_map", None) or {}
    names = sorted({k for k, v in dm.items() if v == "disk" or any(n.startswith(f"{k}.") for n in meta)}) or meta
    if names:
        more = f" and {len(names) - 1} more module(s)" if len(names) > 1 else ""
        raise LptError(f"the device map offloads {names[0]}{more} to CPU RAM or disk, which lpt prune cannot train; "
                       f"add GPUs or use --8bit (docs/scaling.md)")


def devices_of(model) -> list[str]:
    return sorted({str(p.device) for p in model.parameters()})
