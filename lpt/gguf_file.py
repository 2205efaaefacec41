"""GGUF files: the architecture named in a file's header (read without touching a tensor), and lpt's cache of
de-quantized copies.

transformers re-reads a GGUF file's whole header (for SmolLM2, ~600k tokenizer fields) for the config, again for
the tokenizer and again for the weights, and de-quantizes every tensor: ~30 s per load on 2 CPU cores, paid by
every stage. The first float32 load of a small GGUF file therefore also writes its de-quantized model and
tokenizer as a plain Hugging Face directory (``write_cache``), and later loads read that (same weights, same
tokenizer). ``lpt.models`` decides when; this module knows only files and directories.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lpt.errors import LptError

MAGIC = b"GGUF"
CACHE_MAX_BYTES = 2**30  # GGUF files up to 1 GiB (a ~1B-parameter model; its float32 copy is ~4-8x larger)
CACHE_VERSION = 1

# GGUF ``general.architecture`` names that differ from transformers' ``model_type`` (as transformers' GGUF loader maps
# them); llama.cpp also writes Mistral models as 'llama', which lpt handles as the same layout.
MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2",
               "gemma3": "gemma3_text", "gemma4": "gemma4_text", "t5encoder": "t5"}
_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_STRING, _ARRAY = 8, 9
_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def header_values(path: str | Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """The string and scalar values of ``keys`` in a GGUF file's header, reading the key/value pairs only until all
    were found (the ``general.*`` keys come first, before the tokenizer's large arrays), never a tensor. Keys the
    header lacks are absent from the result. Raises LptError for a file that is not GGUF (v2 or later)."""
    import struct

    def fail(why: str) -> LptError:
        return LptError(f"{path} is not a readable GGUF file ({why})")

    wanted = {k.encode(): k for k in keys}
    found: dict[str, Any] = {}
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != MAGIC:
            raise fail("no GGUF magic")
        version = struct.unpack("<I", head[4:8])[0]
        if version < 2 or version > 0xFFFF:
            raise fail(f"unsupported GGUF version {version}")
        n_kv = struct.unpack("<Q", head[16:24])[0]

        def read(n: int) -> bytes:
            b = f.read(n)
            if len(b) < n:
                raise fail("truncated header")
            return b

        def u32() -> int:
            return struct.unpack("<I", read(4))[0]

        def u64() -> int:
            return struct.unpack("<Q", read(8))[0]

        def string() -> bytes:
            n = u64()
            if n > 1 << 20:
                raise fail("implausible string length")
            return read(n)

        def skip(vtype: int) -> None:
            if vtype in _SCALARS:
                f.seek(_SCALARS[vtype], 1)
            elif vtype == _STRING:
                f.seek(u64(), 1)
            elif vtype == _ARRAY:
                etype, n = u32(), u64()
                if etype in _SCALARS:
                    f.seek(_SCALARS[etype] * n, 1)
                else:
                    for _ in range(n):
                        skip(etype)
            else:
                raise fail(f"unknown value type {vtype}")

        for _ in range(n_kv):
            key, vtype = string(), u32()
            if key in wanted and vtype == _STRING:
                found[wanted[key]] = string().decode("utf-8", errors="replace")
            elif key in wanted and vtype in _FORMATS:
                found[wanted[key]] = struct.unpack(_FORMATS[vtype], read(_SCALARS[vtype]))[0]
            else:
                skip(vtype)
            if len(found) == len(wanted):
                break
    return found


def architecture(path: str | Path) -> str:
    """``general.architecture`` from a GGUF file's header, reading only the key/value pairs before it (usually the
    first), never a tensor. Raises LptError for a file that is not GGUF (v2 or later)."""
    arch = header_values(path, ("general.architecture",)).get("general.architecture")
    if not isinstance(arch, str):
        raise LptError(f"{path} is not a readable GGUF file (no general.architecture)")
    return arch


FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # ggml float types -> torch dtype names


def file_type(path: str | Path) -> str:
    """The tensor type of a GGUF file's weights: ``F32``, ``F16``, ``BF16`` or the quantization (``Q4_1``,
    ``Q4_K_M``, ...), from the header's ``general.file_type`` (llama.cpp's ``LLAMA_FTYPE``, which its converter and
    quantizer write); a file without it is read with gguf's ``GGUFReader``: the type holding most weight values."""
    import gguf

    ftype = header_values(path, ("general.file_type",)).get("general.file_type")
    if isinstance(ftype, int) and ftype in {t.value for t in gguf.LlamaFileType}:
        name = gguf.LlamaFileType(ftype).name
        if name != "GUESSED":
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        if len(t.shape) >= 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
    if not counts:
        raise LptError(f"{path} holds no weight matrix")
    return max(counts, key=counts.get)


def model_type(path: str | Path) -> str:
    """transformers' ``model_type`` for the GGUF file at ``path`` (its header's architecture, mapped)."""
    arch = architecture(path)
    return MODEL_TYPES.get(arch, arch)


# ------------------------------------------------------------------------------------------------ cache
def cache_dir() -> Path:
    """``$LPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lpt``, else ``~/.cache/lpt``."""
    import os

    if os.environ.get("LPT_CACHE_DIR"):
        return Path(os.environ["LPT_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lpt"


def cache_path(file: str | Path) -> Path | None:
    """Where the de-quantized copy of the GGUF ``file`` lives (keyed by the file's path, size and modification
    time, and the transformers version that de-quantized it); None when it is not cached (over
    ``CACHE_MAX_BYTES``, or ``LPT_GGUF_CACHE=0``)."""
    import hashlib
    import os

    import transformers

    if os.environ.get("LPT_GGUF_CACHE", "1") == "0":
        return None
    f = Path(file)
    st = f.stat()
    if st.st_size > CACHE_MAX_BYTES:
        return None
    key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}|{CACHE_VERSION}"
    return cache_dir() / "gguf" / f"{f.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def cached(file: str | Path) -> Path | None:
    """The complete cache directory of the GGUF ``file``, or None."""
    d = cache_path(file)
    if d is not None and (d / "config.json").is_file() and (d / "tokenizer_config.json").is_file():
        return d
    return None


def write_cache(file: str | Path, model, tokenizer) -> None:
    """Save the de-quantized float32 ``model`` and ``tokenizer`` of the GGUF ``file`` into its cache directory,
    atomically (a concurrent writer's copy is kept). A cache that cannot be written is skipped: it only saves time."""
    import os
    import shutil
    import tempfile

    d = cache_path(file)
    if d is None or d.exists():
        return
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", dir=d.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, d)
        except OSError:
            if not d.exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass
