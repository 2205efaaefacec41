"""GGUF files: the architecture named in a file's header (read without touching a tensor), and lpt's cache of
de-quantized copies.

transformers re-reads a GGUF file's whole header (for SmolLM2, ~600k tokenizer fields) for the config, again for
the tokenizer and again for the weights, and de-quantizes every tensor: ~30 s per load on 2 CPU cores, paid by
every stage. The first float32 load of a small GGUF file therefore also writes its de-quantized model and
tokenizer as a plain Hugging Face directory (``write_cache``), and later loads read that (same weights, same
tokenizer). ``lpt.models`` decides when; this module knows only files and directories.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
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
_UINT32 = 4
_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}

# What a header may hold before lpt hands the file to a reader that allocates per entry (transformers' GGUF loader
# took 5.4 GB for one array of 10 million strings). Real files hold a few dozen keys, vocabularies of up to ~260k
# tokens and ~300k merges, chat templates of some kB, at most a few thousand tensors.
MAX_KEYS = 1 << 16
MAX_TENSORS = 1 << 17
MAX_DIMS = 8
MAX_STRING = 32 << 20  # bytes of one string (a whole tokenizer.json fits)
MAX_ARRAY = 1 << 20  # entries of one array
MAX_ENTRIES = 1 << 22  # array entries in the whole header
VALUE_STRING = 1 << 10  # strings up to this many bytes are kept as header values (names, types; not templates)


@dataclass(frozen=True)
class Header:
    """What :func:`check` read from a GGUF file's header."""

    version: int
    n_tensors: int
    n_kv: int
    architecture: str | None  # general.architecture
    data_offset: int  # where the tensor data starts
    values: dict[str, Any]  # every scalar key's value, and every string key's of at most VALUE_STRING bytes


def check(path: str | Path) -> Header:
    """Read and check the whole header of the GGUF file at ``path`` with bounds, before anything allocates for it:
    at most ``MAX_KEYS`` keys and ``MAX_TENSORS`` tensors, strings of at most ``MAX_STRING`` bytes, arrays of at most
    ``MAX_ARRAY`` entries (``MAX_ENTRIES`` in all), every tensor's data inside the file. A file that breaks one, is
    truncated or is not GGUF (v2 or later) is one line naming it. The file is mapped, never read into memory; the
    result is cached per (path, size, modification time)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise LptError(f"{path} is not a readable GGUF file ({e.strerror or e})") from None
    return _check(str(p.resolve()), st.st_size, st.st_mtime_ns, str(path))


@functools.lru_cache(maxsize=16)
def _check(resolved: str, size: int, mtime_ns: int, name: str) -> Header:
    import mmap
    import struct

    def fail(why: str) -> LptError:
        return LptError(f"{name} is not a readable GGUF file ({why})")

    if size < 24:
        raise fail("truncated: no GGUF header" if size else "empty file")
    with open(resolved, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pos = 0

        def take(n: int) -> int:
            nonlocal pos
            if pos + n > size:
                raise fail(f"truncated: the header runs past the end of the file at byte {size:,}")
            start, pos = pos, pos + n
            return start

        def u32() -> int:
            return struct.unpack_from("<I", m, take(4))[0]

        def u64() -> int:
            return struct.unpack_from("<Q", m, take(8))[0]

        def string(what: str) -> int:
            n = u64()
            if n > MAX_STRING:
                raise fail(f"{what} is a string of {n:,} bytes, more than {MAX_STRING:,}")
            return take(n)

        if m[:4] != MAGIC:
            raise fail("no GGUF magic")
        pos = 4
        version = u32()
        if version < 2 or version > 0xFFFF:
            raise fail(f"unsupported GGUF version {version}")
        n_tensors, n_kv = u64(), u64()
        if n_kv > MAX_KEYS:
            raise fail(f"its header declares {n_kv:,} keys, more than {MAX_KEYS:,}")
        if n_tensors > MAX_TENSORS:
            raise fail(f"its header declares {n_tensors:,} tensors, more than {MAX_TENSORS:,}")
        entries, values = 0, {}
        for _ in range(n_kv):
            k = string("a key")
            key = bytes(m[k:pos]).decode("utf-8", errors="replace")
            vtype = u32()
            if vtype in _SCALARS:
                values[key] = struct.unpack_from(_FORMATS[vtype], m, take(_SCALARS[vtype]))[0]
            elif vtype == _STRING:
                at = string(f"key {key}")
                if pos - at <= VALUE_STRING:
                    values[key] = bytes(m[at:pos]).decode("utf-8", errors="replace")
            elif vtype == _ARRAY:
                etype, n = u32(), u64()
                entries += n
                if n > MAX_ARRAY:
                    raise fail(f"key {key} is an array of {n:,} entries, more than {MAX_ARRAY:,}")
                if entries > MAX_ENTRIES:
                    raise fail(f"its arrays hold more than {MAX_ENTRIES:,} entries in all (key {key}: {n:,})")
                if etype in _SCALARS:
                    take(_SCALARS[etype] * n)
                elif etype == _STRING:
                    for _ in range(n):
                        string(f"an entry of key {key}")
                else:
                    raise fail(f"key {key} is an array of value type {etype}, which lpt does not read")
            else:
                raise fail(f"key {key} has unknown value type {vtype}")
        alignment = values.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
            raise fail(f"general.alignment {alignment} is not a power of two")
        tensors = []
        for _ in range(n_tensors):
            t = string("a tensor name")
            tname = bytes(m[t:pos]).decode("utf-8", errors="replace")
            n_dims = u32()
            if n_dims > MAX_DIMS:
                raise fail(f"tensor {tname} has {n_dims} dimensions")
            dims = [u64() for _ in range(n_dims)]
            tensors.append((tname, dims, u32(), u64()))
        data_offset = -(-pos // alignment) * alignment
    for tname, dims, ttype, offset in tensors:
        nbytes = _tensor_bytes(dims, ttype)
        if nbytes is None:
            raise fail(f"tensor {tname} has unknown type {ttype}")
        if data_offset + offset + nbytes > size:
            raise fail(f"truncated: tensor {tname} ends at byte {data_offset + offset + nbytes:,}, past the end of "
                       f"the file at {size:,}")
    arch = values.get("general.architecture")
    return Header(version, n_tensors, n_kv, arch if isinstance(arch, str) else None, data_offset, values)


def _tensor_bytes(dims: list[int], ttype: int) -> int | None:
    """Bytes of a tensor of ``dims`` and GGML type ``ttype`` (gguf's block sizes), None for a type gguf does not
    know."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
    except (ValueError, KeyError):
        return None
    n = 1
    for d in dims:
        n *= d
    return -(-n // block) * nbytes


def header_values(path: str | Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """The scalar and (short: up to ``VALUE_STRING`` bytes) string values of ``keys`` in a GGUF file's header, as
    :func:`check` read it, never a tensor. Keys the header lacks are absent from the result. Raises LptError for a
    file that is not GGUF (v2 or later) or breaks a bound."""
    values = check(path).values
    return {k: values[k] for k in keys if k in values}


def architecture(path: str | Path) -> str:
    """``general.architecture`` from a GGUF file's header (checked whole by :func:`check`, never a tensor read).
    Raises LptError for a file that is not GGUF (v2 or later) or breaks a bound."""
    arch = check(path).architecture
    if arch is None:
        raise LptError(f"{path} is not a readable GGUF file (no general.architecture)")
    return arch


FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # ggml float types -> torch dtype names


def file_type(path: str | Path) -> str:
    """The tensor type of a GGUF file's weights: ``F32``, ``F16``, ``BF16`` or the quantization (``Q4_1``,
    ``Q4_K_M``, ...), from the header's ``general.file_type`` (llama.cpp's ``LLAMA_FTYPE``, which its converter and
    quantizer write); a file without it is read with gguf's ``GGUFReader`` (after :func:`check`): the type holding
    most weight values."""
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
