"""Names of every file lpt writes, schema versions, and atomic output directories.

All stages write into a temporary sibling directory and rename it into place only when everything is written, so
an interrupted run never leaves a directory that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from lpt.errors import LptError

# calibrate
TOKENS = "tokens.safetensors"
VAL_TOKENS = "val_tokens.safetensors"
CALIB_META = "calib.json"
CALIB_SCHEMA = 1

# prune (the adapter files are PEFT's own names, so peft.PeftModel.from_pretrained loads the directory)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MASKS = "masks.json"
MASKS_SCHEMA = 1
IMPORTANCE = "importance.safetensors"
TRAIN_LOG = "log.jsonl"
RESOLVED_CONFIG = "lpt_config.json"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_STATE = "trainer_state.pt"
CHECKPOINT_META = "checkpoint.json"

# merge / slice
PROVENANCE = "lpt_provenance.json"

# eval / bench
RESULTS_SCHEMA = 1


def dump_json(obj: Any) -> str:
    """JSON as every lpt artifact writes it: sorted keys, two-space indent, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    path = Path(path)
    path.write_text(dump_json(obj), encoding="utf-8")
    return path


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise LptError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LptError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def partial_dir(output: str | os.PathLike) -> Path:
    """Where ``lpt prune`` works while it runs (``OUTPUT.partial``: its log and ``--save-every`` checkpoints)."""
    output = Path(output)
    return output.parent / f"{output.name}.partial"


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; call before any expensive work."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise LptError(f"output {path} already exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise LptError(f"output {path} exists and is not a directory")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        trash = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, trash)
        os.replace(tmp, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, path)
    os.chmod(path, 0o755)
    for f in path.rglob("*"):
        os.chmod(f, 0o755 if f.is_dir() else 0o644)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; renamed over ``path`` only on success."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise LptError(f"output {path} already exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    os.chmod(path, 0o644)


def save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """safetensors file with string metadata, byte-identical for identical inputs.

    safetensors writes ``__metadata__`` in hash-map order; the header is re-serialised with sorted keys (same
    length, so tensor offsets are untouched).
    """
    import struct

    from safetensors.torch import save

    blob = bytearray(save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    text = json.dumps(header, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
    assert len(text) <= n, "re-serialised safetensors header grew"
    blob[8:8 + n] = text + b" " * (n - len(text))
    path = Path(path)
    path.write_bytes(bytes(blob))
    return path


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary (token -> id), stable across tokenizer classes and library versions."""
    vocab = tokenizer.get_vocab()
    return sha256_text(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False))[:16]


def versions() -> dict[str, str]:
    """Versions of lpt and the libraries whose behaviour shapes the numbers, for provenance records."""
    import importlib.metadata as md

    import lpt

    out = {"lpt": lpt.__version__}
    for name in ("torch", "transformers", "peft", "safetensors", "bitsandbytes", "lm_eval", "accelerate", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out
