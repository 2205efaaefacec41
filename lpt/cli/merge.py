"""``lpt merge``."""

from __future__ import annotations

import typer

from lpt.cli._common import RECIPE_HELP, arg, make_config, opt, run_stage
from lpt.stages.merge import MergeConfig as C

EPILOG = """[b]Examples[/b]

  lpt merge smollm2-135m --adapter prune-out/ -o merged/

  lpt merge smollm2-135m --adapter prune-out/ --masks prune-out/masks.json --dtype bfloat16 -o merged-masked/

  lpt merge meta-llama/Llama-2-7b-hf --adapter prune-7b/ --load-8bit --dtype float16 -o merged-7b/

  lpt merge sliced/ --adapter sliced/adapter/ -o sliced-merged/   (after lpt slice --adapter)

[b]Writes[/b] a Hugging Face model directory (config.json, model.safetensors or shards + index, tokenizer,
generation_config.json) and lpt_provenance.json. The shapes are the base model's: pruned rows stay (zeroed with
--masks); lpt slice removes them. Load it with AutoModelForCausalLM.from_pretrained(OUTPUT).
"""


def merge(
    ctx: typer.Context,
    model: str = arg(C, "model", show_default=True),
    adapter: str = opt(C, "adapter"),
    masks: str = opt(C, "masks"),
    output: str = opt(C, "output", "--output", "-o"),
    overwrite: bool = opt(C, "overwrite"),
    dtype: str = opt(C, "dtype"),
    load_8bit: bool = opt(C, "load_8bit", "--8bit/--no-8bit", "--load-8bit/--no-load-8bit", show_default=False),
    int8_backend: str = opt(C, "int8_backend"),
    max_shard_size: str = opt(C, "max_shard_size"),
    device: str = opt(C, "device"),
    revision: str = opt(C, "revision"),
    trust_remote_code: bool = opt(C, "trust_remote_code"),
    recipe: str = typer.Option(None, "--recipe", help=RECIPE_HELP),
) -> None:
    """Fold the LoRA adapter into the base weights (W0 + s·B·A) -> a Hugging Face model directory."""

    def go():
        from lpt.stages import merge as stage

        return stage.run(make_config(ctx, C, "merge"))

    run_stage(go)


def register(app: typer.Typer) -> None:
    app.command("merge", epilog=EPILOG)(merge)
