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
    trust_remote_code: bool = _f(False, "Allow model code from the hub / directory (needed for per-layer sliced models).")


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
