"""The JSON that ``lpt bench`` writes, as TypedDicts (the documented schema), and a checker for it.

``lpt bench runtime`` writes a ``RuntimeResults``, ``lpt bench prune-step`` a ``PruneStepResults``. Times are in
seconds, memory in bytes, FLOPs per token as integers. ``relative`` values are ratios to the first row of the
same batch size (runtime) or to the first row (prune-step): 0.53 means 47% less; None when undefined.
``check(doc, RuntimeResults)`` raises ``LptError`` naming the first key or value that does not fit.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, TypedDict, Union

from lpt.errors import LptError

SCHEMA_VERSION = 1


class Stats(TypedDict):
    """Statistics over timed trials (seconds); ``values`` are the trials in the order they ran."""

    median: float
    min: float
    max: float
    mean: float
    stdev: float
    n: int
    values: list[float]


class Flops(TypedDict):
    """FLOPs per token of one forward pass (see ``protocol.flops``)."""

    linear: int
    lora: int
    attention: int
    total: int


class Hardware(TypedDict):
    device: str  # cpu, cuda, cuda:1, ...
    device_name: str  # CPU model or GPU name
    device_memory_bytes: int | None  # GPU memory (None on CPU)
    compute_capability: str | None
    cuda: str | None  # CUDA version torch was built with
    cpu: str
    cpu_count: int | None
    torch_threads: int
    memory_bytes: int | None  # host memory
    platform: str
    python: str


class ModelInfo(TypedDict):
    label: str
    model: str | None  # what was given (hub id, directory, .gguf, alias); None for random-init models
    random_init: str | None  # the --random-init spec
    random_weights: bool  # True: weights are random (shape-only); latency and memory are real, outputs are not
    adapter: str | None  # adapter directory or random:R; None for a plain model
    unmerged: bool  # LoRA layers run beside the base weights
    lora_rank: int
    masks: str  # none, or the masks.json given with --masks (applied unmerged)
    architecture: dict[str, Any]
    dtype: str
    params: int  # all parameters, LoRA included, tied tensors once
    lora_params: int
    provenance: dict[str, Any] | None  # lpt_provenance.json of the model directory, when present


class Relative(TypedDict):
    latency: float | None
    tokens_per_s: float | None
    peak_memory: float | None
    params: float | None
    flops_per_token: float | None


class DecodeResult(TypedDict):
    prompt_tokens: int
    new_tokens: int
    seconds: Stats  # for all ``new_tokens`` steps of the batch, prefill excluded
    tokens_per_s: float  # batch_size * new_tokens / median
    peak_memory_bytes: int


class RuntimeRow(TypedDict):
    label: str
    batch_size: int
    seq_len: int
    latency_s: Stats  # one forward pass over batch_size x seq_len tokens
    tokens_per_s: float  # batch_size * seq_len / median
    peak_memory_bytes: int
    params: int
    flops_per_token: Flops
    decode: DecodeResult | None
    relative: Relative


class RuntimeProtocolRecord(TypedDict):
    """The ``protocol`` section of a ``RuntimeResults``: how the rows were measured (the settings themselves are
    ``lpt.benchmarking.protocol.RuntimeProtocol``)."""

    description: str
    seq_len: int
    batch_sizes: list[int]
    warmup: int
    trials: int
    decode_trials: int
    new_tokens: int
    inputs: str
    dtype: str
    device: str
    timer: str
    memory: str
    flops: str
    isolation: str
    order: str  # sequential, or interleaved (--interleave)
    reference: str


class RuntimeResults(TypedDict):
    schema_version: int
    kind: Literal["runtime"]
    lpt_version: str
    created: str
    random_weights: bool  # any model with random weights
    versions: dict[str, str]
    hardware: Hardware
    protocol: RuntimeProtocolRecord
    config: dict[str, Any]
    models: list[ModelInfo]
    results: list[RuntimeRow]


class PruneStepRelative(TypedDict):
    seconds_per_step: float | None
    peak_memory: float | None


class PruneStepRow(TypedDict):
    label: str
    criterion: str  # lora, vanilla, none (plain LoRA fine-tuning)
    load_8bit: bool
    int8_backend: str | None  # bitsandbytes or torch for 8-bit rows
    seconds_per_step: Stats
    peak_memory_bytes: int
    trainable_params: int  # LoRA A and B
    gradient_params: int  # parameters that receive a gradient (vanilla: every adapted base weight too)
    params: int
    relative: PruneStepRelative


class Skipped(TypedDict):
    label: str
    reason: str


class PruneStepProtocolRecord(TypedDict):
    """The ``protocol`` section of a ``PruneStepResults`` (the settings themselves are
    ``lpt.benchmarking.protocol.PruneStepProtocol``)."""

    description: str
    seq_len: int
    batch_size: int
    micro_batch_size: int
    warmup: int
    trials: int
    ratio: float
    lora_r: int
    gradient_checkpointing: bool
    distill: bool
    loss_head: bool
    inputs: str
    dtype: str
    device: str
    timer: str
    memory: str
    isolation: str
    reference: str


class PruneStepResults(TypedDict):
    schema_version: int
    kind: Literal["prune-step"]
    lpt_version: str
    created: str
    random_weights: bool
    versions: dict[str, str]
    hardware: Hardware
    protocol: PruneStepProtocolRecord
    config: dict[str, Any]
    model: ModelInfo
    results: list[PruneStepRow]
    skipped: list[Skipped]


# ------------------------------------------------------------------------------------------------ checking
def _is_typeddict(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, dict) and hasattr(tp, "__total__")


def _fail(path: str, what: str) -> None:
    raise LptError(f"results schema: {path} {what}")


def check(value: Any, tp: Any, path: str = "$") -> None:
    """Raise ``LptError`` unless ``value`` fits the type ``tp`` (TypedDicts checked strictly: no missing or extra
    keys)."""
    if tp is Any:
        return
    if _is_typeddict(tp):
        if not isinstance(value, dict):
            _fail(path, f"must be an object, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        missing = sorted(set(hints) - set(value))
        if missing:
            _fail(path, f"is missing key '{missing[0]}'")
        extra = sorted(set(value) - set(hints))
        if extra:
            _fail(path, f"has unknown key '{extra[0]}'")
        for k, sub in hints.items():
            check(value[k], sub, f"{path}.{k}")
        return
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for a in args:
            try:
                check(value, a, path)
                return
            except LptError as e:
                errors.append(str(e))
        _fail(path, f"fits none of {[getattr(a, '__name__', str(a)) for a in args]}: {errors[0]}")
    if origin is Literal:
        if value not in args:
            _fail(path, f"must be one of {list(args)}, got {value!r}")
        return
    if origin is list:
        if not isinstance(value, list):
            _fail(path, f"must be a list, got {type(value).__name__}")
        for i, v in enumerate(value):
            check(v, args[0] if args else Any, f"{path}[{i}]")
        return
    if origin is dict:
        if not isinstance(value, dict):
            _fail(path, f"must be an object, got {type(value).__name__}")
        for k, v in value.items():
            if not isinstance(k, str):
                _fail(path, f"has a non-string key {k!r}")
            check(v, args[1] if args else Any, f"{path}.{k}")
        return
    if tp is type(None) or tp is None:
        if value is not None:
            _fail(path, f"must be null, got {value!r}")
        return
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, f"must be true/false, got {value!r}")
        return
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, f"must be an integer, got {value!r}")
        return
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, f"must be a number, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            _fail(path, f"must be finite, got {value!r}")
        return
    if tp is str:
        if not isinstance(value, str):
            _fail(path, f"must be a string, got {value!r}")
        return
    raise TypeError(f"schema checker: unsupported type {tp!r} at {path}")
