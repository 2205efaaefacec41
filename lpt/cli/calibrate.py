"""``lpt calibrate``."""

from __future__ import annotations

import typer

from lpt.cli._common import RECIPE_HELP, arg, make_config, opt, run_stage
from lpt.config import CalibrateConfig as C

EPILOG = """[b]Examples[/b]

  lpt calibrate smollm2-135m --data builtin:pydoc:train --nsamples 64 --seq-len 256 -o calib/

  lpt calibrate meta-llama/Llama-2-7b-hf --data MBZUAI/LaMini-instruction --nsamples 20000 --seq-len 256 -o calib-lamini/

  lpt calibrate meta-llama/Llama-2-13b-hf --data allenai/c4 --data-files en/c4-train.00000-of-01024.json.gz --nsamples 20000 -o calib-c4/

[b]Writes[/b] OUTPUT/tokens.safetensors (input_ids, attention_mask, labels), OUTPUT/calib.json (provenance),
and OUTPUT/val_tokens.safetensors with --val-fraction. Same inputs and --seed give byte-identical files.
"""


def calibrate(
    ctx: typer.Context,
    model: str = arg(C, "model", show_default=True),
    data: str = opt(C, "data"),
    subset: str = opt(C, "subset"),
    split: str = opt(C, "split"),
    data_files: str = opt(C, "data_files"),
    text_field: str = opt(C, "text_field"),
    format: str = opt(C, "format"),
    template: str = opt(C, "template"),
    train_on_inputs: bool = opt(C, "train_on_inputs"),
    nsamples: int = opt(C, "nsamples", "--nsamples", "-n"),
    seq_len: int = opt(C, "seq_len"),
    seed: int = opt(C, "seed"),
    val_fraction: float = opt(C, "val_fraction"),
    output: str = opt(C, "output", "--output", "-o"),
    overwrite: bool = opt(C, "overwrite"),
    revision: str = opt(C, "revision"),
    trust_remote_code: bool = opt(C, "trust_remote_code"),
    dtype: str = opt(C, "dtype", hidden=True),
    device: str = opt(C, "device", hidden=True),
    recipe: str = typer.Option(None, "--recipe", help=RECIPE_HELP),
) -> None:
    """Turn a data source into fixed-length token blocks for prune / eval (only the tokenizer is loaded)."""

    def go():
        from lpt.stages import calibrate as stage

        return stage.run(make_config(ctx, C, "calibrate"))

    run_stage(go)


def register(app: typer.Typer) -> None:
    app.command("calibrate", epilog=EPILOG)(calibrate)
