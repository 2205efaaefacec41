"""One dataclass per stage. Field metadata carries the help text the CLI shows.

Precedence: dataclass defaults < recipe file section < flags given on the command line.
This module imports neither torch nor transformers so ``lpt --help`` stays instant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lpt.errors import LptError


def _f(default: Any, help: str, **kw) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def help_of(cls: type, name: str) -> str:
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata["help"]


def default_of(cls: type, name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


@dataclass
class ModelOptions:
    """How a model argument is loaded. Shared by every stage that loads a model."""

    model: str = _f("smollm2-135m", "Hub id, local HF directory, .gguf file, or the alias smollm2-135m.")
    dtype: str = _f("auto", "Weights dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.")
    device: str = _f("auto", "Device: auto (cuda when present, else cpu), cpu, cuda, cuda:N.")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the model.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub / directory (lpt's own per-layer sliced models do "
                                        "not need it).")


@dataclass
class DataOptions:
    """A calibration data source and how it becomes token blocks. Shared by calibrate and prune."""

    data: str = _f(
        "builtin:pydoc:train",
        "Data source: hub dataset name, local .txt/.json/.jsonl/.parquet file, or builtin:pydoc[:train|:test].",
    )
    subset: str | None = _f(None, "Hub dataset configuration name (e.g. wikitext-2-raw-v1).")
    split: str = _f("train", "Hub dataset split.")
    data_files: str | None = _f(None, "Data file(s) within a hub dataset (e.g. en/c4-train.00000-of-01024.json.gz).")
    text_field: str | None = _f(None, "Field holding raw text (default: auto-detect 'text' / 'content').")
    format: str = _f("auto", "auto, raw (packed text) or instruction (Alpaca / LaMini records).")
    template: str = _f("alpaca", "Prompt template for instruction records: alpaca or chat (the tokenizer's).")
    train_on_inputs: bool = _f(False, "Compute the loss on prompt tokens of instruction records too.")
    nsamples: int = _f(128, "Number of calibration blocks.")
    seq_len: int = _f(256, "Tokens per block.")
    seed: int = _f(0, "Seed for block selection (and, in prune, for training).")
    val_fraction: float = _f(0.0, "Extra held-out blocks, as a fraction of --nsamples, written to val_tokens.safetensors.")


@dataclass
class CalibrateConfig(ModelOptions, DataOptions):
    output: str = _f("calib", "Output directory.")
    overwrite: bool = _f(False, "Replace an existing output directory.")


PROJECTION_LIST = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class PruneConfig(ModelOptions, DataOptions):
    """``lpt prune``: iterative LoRA-guided structured pruning with joint LoRA fine-tuning (Algorithm 1)."""

    # data (same flags as calibrate, or a calibrate output directory)
    data: str | None = _f(None, "Data source when --calib is not given (default: MBZUAI/LaMini-instruction for hub "
                                "models, as in the paper; builtin:pydoc:train for local models and aliases).")
    calib: str | None = _f(None, "A calibrate output directory to train on (instead of --data).")
    nsamples: int = _f(1024, "Calibration blocks when calibrating inline from --data.")
    seq_len: int = _f(256, "Tokens per block when calibrating inline from --data.")
    # what to prune
    ratio: float = _f(0.5, "Fraction of the transformer blocks' linear-layer parameters to remove.")
    round_to: int = _f(8, "Keep pruned MLP widths a multiple of N channels (8: on CPU, widths not a multiple of 8 ran the MLP ~25% slower; 64 or 128 may suit GPUs, unmeasured); the ratio stays within one N-channel step of --ratio. Heads are not rounded; 1 disables.")
    criterion: str = _f("lora", "Importance: lora (LoRA-guided, Eq. 10), vanilla (full-gradient Taylor, Eq. 3), "
                                "magnitude, random.")
    score: str = _f("square", "Element score: square (paper) or abs (authors' released code).")
    normalize: bool = _f(True, "Normalise each layer's group scores by their L2 norm (matters for --layout per-layer).")
    gqa: str = _f("kv-groups", "Grouped-query attention: kv-groups (prune whole key/value groups) or query-heads "
                               "(prune the same number of query heads inside every group).")
    layout: str = _f("uniform", "uniform (every layer keeps the same widths: a standard config) or per-layer.")
    skip_layers: str = _f("", "Layers never pruned: comma list / ranges (e.g. 0-2,31), or 'paper' for the first 10% "
                              "and the last layer. Implies --layout per-layer.")
    # schedule
    ema: float = _f(0.9, "Moving-average factor λ of the group importance (Eq. 11).")
    prune_freq: int = _f(10, "Optimiser steps between mask updates.")
    warmup: float = _f(0.1, "Fraction of the steps before pruning starts.")
    cooldown: float = _f(0.3, "Fraction of the steps after the target is reached (recovery fine-tuning).")
    one_shot: bool = _f(False, "Score once over the calibration set, prune to --ratio at once, then fine-tune "
                               "(the paper's 'separate' ablation).")
    # LoRA
    lora_r: int = _f(8, "LoRA rank.")
    lora_alpha: float = _f(16.0, "LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    targets: str = _f(PROJECTION_LIST, "Comma-separated projections that get LoRA.")
    # training
    lr: float = _f(1e-4, "Peak learning rate (AdamW, cosine decay).")
    lr_warmup: float = _f(0.03, "Fraction of the steps of linear learning-rate warm-up.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    batch_size: int = _f(16, "Samples per optimiser step.")
    micro_batch_size: int = _f(4, "Samples per forward/backward (gradient accumulation = batch / micro-batch).")
    epochs: float = _f(2.0, "Passes over the calibration blocks (ignored with --max-steps).")
    max_steps: int = _f(0, "Optimiser steps (0: from --epochs).")
    max_grad_norm: float = _f(1.0, "Gradient clipping (0 disables).")
    load_8bit: bool = _f(False, "Freeze the base weights in bitsandbytes int8 (LLM.int8).")
    int8_threshold: float = _f(6.0, "LLM.int8 outlier threshold with --8bit: inputs of this magnitude or more are multiplied in 16 bits (bitsandbytes' default 6.0; 0 quantizes every input).")
    device_map: str | None = _f(None, "Spread one model over several devices with accelerate: auto, balanced, sequential, a JSON object or a .json file.")
    # outputs
    output: str = _f("prune-out", "Output directory.")
    overwrite: bool = _f(False, "Replace an existing output directory.")
    save_every: int = _f(0, "Checkpoint every N optimiser steps into OUTPUT.partial/ (0: never).")
    resume: bool = _f(False, "Continue an interrupted run from OUTPUT.partial/checkpoint.")
    log_every: int = _f(1, "Optimiser steps between log lines.")


def load_recipe(path: str | Path, stage: str) -> dict[str, Any]:
    """Read one stage's section from a recipe YAML (keys are flag names, dashes or underscores)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LptError(f"recipe not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LptError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise LptError(f"recipe {path} must be a mapping with one section per stage")
    section = doc.get(stage, {}) or {}
    if not isinstance(section, dict):
        raise LptError(f"recipe {path}: section '{stage}' must be a mapping")
    return {str(k).replace("-", "_"): v for k, v in section.items()}


def build(cls: type, values: Mapping[str, Any], explicit: set[str] | None = None,
          recipe: Mapping[str, Any] | None = None) -> Any:
    """Make a config: recipe values override defaults, explicitly given values override the recipe.

    ``values`` are all CLI parameter values (defaults included); ``explicit`` names those the user typed.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    recipe = dict(recipe or {})
    unknown = sorted(set(recipe) - names)
    if unknown:
        raise LptError(f"unknown key(s) in recipe: {', '.join(unknown)} (valid: {', '.join(sorted(names))})")
    kwargs = {k: v for k, v in values.items() if k in names}
    explicit = set(values) if explicit is None else explicit
    for k, v in recipe.items():
        if k not in explicit:
            kwargs[k] = v
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise LptError(str(e)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
