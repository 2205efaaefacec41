"""Names of every file lpt writes, schema versions, and atomic output directories.

All stages write into a temporary sibling directory and rename it into place only when everything is written, so
an interrupted run never leaves a directory that looks finished. While a run writes an output it holds that output's
lock (``output_lock``: a ``.NAME.lock`` file next to it, locked by the kernel, so it is free again the moment its
process dies), and a second run on the same output is refused at once.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

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
MASKS_SCHEMA = 2  # 2: removed_layers and hidden_channels (depth and hidden-size pruning)
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


# ------------------------------------------------------------------------------------------------ output locks
_HELD: dict[str, int] = {}  # lock file -> how many output_lock blocks of this process hold it


def lock_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.parent / f".{path.name}.lock"


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its pid yet"


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Claim the output ``path`` for this process while the block runs; refuse at once if another process holds it.

    The claim is an exclusive ``flock`` on ``.NAME.lock`` next to ``path`` (holding the owner's pid and host for the
    message): the kernel drops it when the owner exits or is killed, so a dead run never blocks a new one. Nested
    claims of the same output in one process are allowed. The lock file is removed when the outermost block ends.
    Where ``fcntl`` does not exist (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux / macOS
        yield lock_path(path)
        return
    lock = Path(os.path.abspath(lock_path(path)))
    key = str(lock)
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield lock
        finally:
            _HELD[key] -= 1
        return
    made = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()]  # removed again if left empty
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LptError(f"cannot create the directory of output {path}: {e.strerror or e}") from None
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise LptError(f"cannot write next to output {path} ({lock}): {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise LptError(f"output {path} is in use by another lpt run ({_holder(lock)}; lock {lock}); wait for it "
                           f"to finish or write to another output") from None
        try:  # the file may have been unlinked by its previous holder between our open and flock: lock the new one
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    _HELD[key] = 1
    try:
        yield lock
    finally:
        del _HELD[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # before the flock is released: a waiting process then re-checks the inode
        os.close(fd)
        for d in made:  # deepest first: directories only this claim created, if nothing was written into them
            with contextlib.suppress(OSError):
                d.rmdir()


def claims_output(fn: Callable) -> Callable:
    """Decorator for a stage's ``run(cfg)``: the whole run holds ``cfg.output``'s lock (see :func:`output_lock`)."""

    @functools.wraps(fn)
    def run(cfg, *args, **kwargs):
        if not getattr(cfg, "output", None):
            return fn(cfg, *args, **kwargs)
        with output_lock(cfg.output):
            return fn(cfg, *args, **kwargs)

    return run


def remove_stale_partials(path: str | os.PathLike) -> list[Path]:
    """Remove the hidden temporaries (``.NAME.partial-*``, ``.NAME.old-*``) that runs killed while writing ``path``
    left next to it, and say so. Call while holding ``path``'s lock: every writer of them holds it, so none is live."""
    path = Path(path)
    # ``..NAME.partial-*``: temporaries made next to a temporary (export's f16 file before quantizing)
    found = [Path(p) for pattern in (".{}.partial-*", ".{}.old-*", "..{}.partial-*")
             for p in glob.glob(os.path.join(glob.escape(str(path.parent)), pattern.format(glob.escape(path.name))))]
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    if found:
        from lpt.progress import console

        console.print(f"removed {len(found)} temporary file(s) an interrupted run left next to {path} "
                      f"({', '.join(p.name for p in found[:3])}{', ...' if len(found) > 3 else ''})")
    return found


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path``, on failure it is removed.
    Holds ``path``'s lock throughout (:func:`output_lock`) and first removes what killed runs left there."""
    path = Path(path)
    with output_lock(path):
        with _atomic_dir(path, overwrite) as tmp:
            yield tmp


@contextlib.contextmanager
def _atomic_dir(path: Path, overwrite: bool) -> Iterator[Path]:
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
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
    """Yield a temporary file path next to ``path``; renamed over ``path`` only on success. Holds ``path``'s lock
    throughout and first removes what killed runs left there, as :func:`atomic_dir`."""
    path = Path(path)
    with output_lock(path):
        with _atomic_file(path, overwrite) as tmp:
            yield tmp


@contextlib.contextmanager
def _atomic_file(path: Path, overwrite: bool) -> Iterator[Path]:
    if path.exists() and not overwrite:
        raise LptError(f"output {path} already exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
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


def load_tensors(path: str | os.PathLike) -> dict:
    """A safetensors file's tensors; a truncated or corrupt file is one line naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise LptError(f"{path} is not a readable safetensors file ({str(e).strip() or type(e).__name__}); it is "
                       f"truncated or corrupt: write it again") from None


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


# ------------------------------------------------------------------------------------------------ provenance
def adapter_record(directory: str | os.PathLike) -> dict[str, Any]:
    """What ``lpt_provenance.json`` records of an adapter directory (path, SHA-256 of the weights, LoRA settings)."""
    d = Path(directory)
    cfg = read_json(d / ADAPTER_CONFIG)
    return {"path": str(directory), "sha256": sha256_file(d / ADAPTER_WEIGHTS),
            "base_model": cfg.get("base_model_name_or_path"), "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"),
            "target_modules": cfg.get("target_modules")}


def masks_record(path: str | os.PathLike, masks) -> dict[str, Any]:
    """What ``lpt_provenance.json`` records of a ``masks.json`` (``masks``: the parsed ``lpt.masks.Masks``)."""
    doc = masks.to_json()
    return {"path": str(path), "sha256": sha256_file(path), "gqa": masks.gqa, "layout": masks.width_layout(),
            "params": doc["params"], "ratio": doc["ratio"], "made_for": masks.model or None}


def provenance(stage: str, cfg: Any, **records: Any) -> dict[str, Any]:
    """``lpt_provenance.json`` of a model directory written by ``stage`` from the config ``cfg``."""
    import dataclasses

    import lpt

    return {"stage": stage, "lpt_version": lpt.__version__, "source_model": cfg.model,
            "config": dataclasses.asdict(cfg), **records, "versions": versions()}
