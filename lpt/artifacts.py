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
from typing import Any, Callable, Iterator, Mapping

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
CHECKPOINT_TENSORS = "trainer_state.safetensors"
CHECKPOINT_STATE = "trainer_state.pt"  # the pickled checkpoints of lpt 0.1: never read
CHECKPOINT_META = "checkpoint.json"

# merge / slice
PROVENANCE = "lpt_provenance.json"
ADAPTER_SUBDIR = "adapter"  # slice --adapter without --merge: OUTPUT/adapter/ (the sliced adapter, PEFT format)

# eval / bench
RESULTS_SCHEMA = 1

# lpt run: RUN_DIR/<stage>/ as each stage command writes it (calibrate/, prune/, slice/), and these
RUN_EVAL_DENSE, RUN_EVAL_PRUNED = "eval/dense.json", "eval/pruned.json"
RUN_EXPORT = "export/pruned-{outtype}.gguf"
RUN_BENCH = "bench/bench.json"
RUN_STATE = "run.json"
RUN_SCHEMA = 1
RUN_KIND = "lpt-run"
REPORT_MD, REPORT_HTML = "report.md", "report.html"
REPORT_PICTURES = "report"  # RUN_DIR/report/*.png
MASKS_PNG, TRAINING_PNG = "masks.png", "training.png"
LEGACY_RUN_LOCK = ".lock"  # RUN_DIR/.lock of an earlier lpt: tolerated, never opened (lpt run claims RUN_DIR with
# output_lock, as every stage claims its output)


def dump_json(obj: Any) -> str:
    """JSON as every lpt artifact writes it: sorted keys, two-space indent, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_file(path, dump_json(obj).encode("utf-8"))


def write_file(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` into ``path`` whole or not at all: written to a hidden sibling (``.NAME.partial-*``) that replaces
    ``path`` in one rename, so a full disk or a kill never leaves a truncated file under the name. A write that
    fails (no space left, file too large) removes the sibling and is one line naming ``path``."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    try:
        try:
            os.fchmod(fd, 0o644)
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(name, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        if isinstance(e, OSError):
            raise LptError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    return path


JSON_MAX_BYTES = 256 * 2**20  # no JSON file lpt reads is near this (a results file with --per-doc: a few MB)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """A JSON file lpt reads (``what`` names it in errors: "masks file", "run record", ...). Whatever is wrong with
    it -- missing, too large, not UTF-8, not JSON, nested deeper than the parser goes -- is one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise LptError(f"file not found: {path}")
    size = path.stat().st_size
    if size > JSON_MAX_BYTES:
        raise LptError(f"{path} is {size:,} bytes, more than any {what} lpt reads ({JSON_MAX_BYTES:,}); refused")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LptError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}), so not a {what}"
                       ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LptError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise LptError(f"{path} nests its JSON deeper than the parser goes, so it is not a {what}") from None


def json_type(value: Any) -> str:
    """How a JSON value is named in errors: an object, an array, a string, a number, true/false, null."""
    if isinstance(value, bool):
        return "true/false"
    return {dict: "an object", list: "an array", str: "a string", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def read_object(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """:func:`read_json` of a file that must hold one JSON object (every JSON file lpt writes does)."""
    doc = read_json(path, what)
    if not isinstance(doc, dict):
        raise LptError(f"{path} is not a {what}: it holds {json_type(doc)}, not a JSON object")
    return doc


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a whole number", float: "a number",
               bool: "true or false", type(None): "null"}


def check_types(doc: Mapping[str, Any], path: str | os.PathLike, types: Mapping[str, type | tuple[type, ...]],
                where: str = "") -> None:
    """Refuse a field of ``doc`` (read from ``path``) whose JSON type is not the one its reader expects: one line
    naming the file, the field and both types. Absent fields are the reader's business; true/false is never a
    number (JSON has no integer booleans) and a whole number is a number. ``where`` prefixes the field's name
    (``layers[3].``)."""
    for key, want in types.items():
        if key not in doc:
            continue
        wants = want if isinstance(want, tuple) else (want,)
        v = doc[key]
        ok = any(isinstance(v, t) and not (isinstance(v, bool) and t in (int, float))
                 or (t is float and isinstance(v, int) and not isinstance(v, bool)) for t in wants)
        if not ok:
            expected = " or ".join(_JSON_TYPES.get(t, t.__name__) for t in wants)
            raise LptError(f"{path}: '{where}{key}' must be {expected}, not {json_type(v)}")


# ------------------------------------------------------------------------------------------------ partial outputs
# One convention: whatever an unfinished run writes lives hidden next to its output, as ``.NAME.partial*``. Atomic
# writes use ``.NAME.partial-XXXX`` (random; removed by ``remove_stale_partials`` once their writer is dead); a run
# that can be resumed (prune's log and ``--save-every`` checkpoints) uses the one fixed name ``.NAME.partial``, which
# the stale cleanup leaves alone: the stage itself resumes from it or discards it.
def partial_dir(output: str | os.PathLike) -> Path:
    """Where ``lpt prune`` works while it runs (``.OUTPUT.partial``: its log and ``--save-every`` checkpoints)."""
    output = Path(output)
    return output.parent / f".{output.name}.partial"


def legacy_partial_dir(output: str | os.PathLike) -> Path:
    """Where an earlier lpt kept prune's work (``OUTPUT.partial``, visible)."""
    output = Path(output)
    return output.parent / f"{output.name}.partial"


def work_dir(output: str | os.PathLike) -> Path:
    """The directory a resumable run of ``output`` works in: ``.OUTPUT.partial`` -- or, when only that exists, an
    earlier lpt's ``OUTPUT.partial``, so that ``--resume`` continues from checkpoints made before the rename (and a
    fresh run discards it as it discards its own)."""
    new, old = partial_dir(output), legacy_partial_dir(output)
    if not new.exists() and old.is_dir() and not old.is_symlink():
        return old
    return new


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
    It is opened without following a symbolic link and must be a plain file with one name, so a link planted there
    never makes lpt truncate the file it points to; a lock that cannot be written (a full disk) is removed again.
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
    try:
        fd = _claim(lock, path, fcntl)
    except BaseException:
        _remove_empty(made)
        raise
    _HELD[key] = 1
    try:
        yield lock
    finally:
        del _HELD[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # before the flock is released: a waiting process then re-checks the inode
        os.close(fd)
        _remove_empty(made)


_NOFOLLOW = os.O_NOFOLLOW if hasattr(os, "O_NOFOLLOW") else 0


def _claim(lock: Path, path: str | os.PathLike, fcntl) -> int:
    """Open, lock and fill ``lock``; returns its descriptor (see :func:`output_lock`)."""
    import stat

    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            if os.path.islink(lock):
                raise LptError(f"the lock {lock} of output {path} is a symbolic link, which lpt never follows; "
                               f"remove it (the file it points to was not touched)") from None
            raise LptError(f"cannot write next to output {path} ({lock}): {e.strerror or e}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            what = "a plain file" if stat.S_ISREG(st.st_mode) else "not a plain file"
            raise LptError(f"the lock {lock} of output {path} is {what} with {st.st_nlink} name(s), not one lpt "
                           f"made; remove it (lpt did not write to it)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise LptError(f"output {path} is in use by another lpt run ({_holder(lock)}; lock {lock}); wait for it "
                           f"to finish or write to another output") from None
        try:  # the file may have been unlinked by its previous holder between our open and flock: lock the new one
            same = os.lstat(lock).st_ino == st.st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        _write_all(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    except OSError as e:  # a full disk: no empty or half-written lock stays behind
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)
        raise LptError(f"cannot write the lock {lock} of output {path}: {e.strerror or e}") from None
    return fd


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a short write near a full disk raises on the next call)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _remove_empty(made: list[Path]) -> None:
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
    return write_file(path, bytes(blob))


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
    cfg = read_object(d / ADAPTER_CONFIG, "PEFT adapter config")
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
