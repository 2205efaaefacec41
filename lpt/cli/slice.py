"""``lpt slice``."""

from __future__ import annotations

import typer

from lpt.cli._common import RECIPE_HELP, arg, make_config, opt, run_stage
from lpt.config import SliceConfig as C

EPILOG = """[b]Examples[/b]

  lpt slice smollm2-135m --masks prune-out/masks.json -o sliced/

  lpt slice smollm2-135m --masks prune-out/masks.json --adapter prune-out/ -o sliced/   (+ sliced/adapter/)

  lpt slice smollm2-135m --masks prune-out/masks.json --adapter prune-out/ --merge --dtype bfloat16 -o sliced-merged/

  lpt slice merged/ --masks prune-out/masks.json -o sliced/   (merge first, then slice: same weights)

  lpt calibrate smollm2-135m -n 32 -o calib/ && lpt slice smollm2-135m --masks prune-out/masks.json --adapter prune-out/ --merge --reconstruct calib/ -o sliced-refit/

[b]Writes[/b] a smaller Hugging Face model directory and lpt_provenance.json (with --adapter: OUTPUT/adapter/, the
adapter sliced for the new shapes, in PEFT format). Uniform widths give a standard config that transformers, vLLM
and llama.cpp's converter read (lpt export OUTPUT --gguf -o FILE.gguf); per-layer widths add lpt_layer_* lists and
modeling_lpt.py: load those with AutoModelForCausalLM.from_pretrained(OUTPUT, trust_remote_code=True).
"""


def slice_(
    ctx: typer.Context,
    model: str = arg(C, "model", show_default=True),
    masks: str = opt(C, "masks"),
    adapter: str = opt(C, "adapter"),
    merge: bool = opt(C, "merge"),
    reconstruct: str = opt(C, "reconstruct"),
    reconstruct_damp: float = opt(C, "reconstruct_damp"),
    reconstruct_mode: str = opt(C, "reconstruct_mode"),
    output: str = opt(C, "output", "--output", "-o"),
    overwrite: bool = opt(C, "overwrite"),
    dtype: str = opt(C, "dtype"),
    max_shard_size: str = opt(C, "max_shard_size"),
    device: str = opt(C, "device"),
    revision: str = opt(C, "revision"),
    trust_remote_code: bool = opt(C, "trust_remote_code"),
    recipe: str = typer.Option(None, "--recipe", help=RECIPE_HELP),
) -> None:
    """Remove the pruned heads and channels from the weights (and the adapter) -> a smaller dense model."""

    def go():
        from lpt.stages import slice as stage

        return stage.run(make_config(ctx, C, "slice"))

    run_stage(go)


def register(app: typer.Typer) -> None:
    app.command("slice", epilog=EPILOG)(slice_)
