"""Other libraries' noise, and which optional library gets imported when.

lpt prints its own messages and progress bars on stderr (``lpt.progress``). What the libraries under it print on
their own -- warnings at import or load (bitsandbytes' "Failed to load CPU gemm_4bit_forward from
kernels-community" on CPUs with AVX512-BF16, transformers' and peft's advice), transformers' "Loading weights" and
"Writing model shards" bars -- is hidden unless ``--debug``: the CLI calls :func:`configure` once per command. With
``quiet`` lpt's own output goes too, and every tqdm bar of those libraries (also in child processes).

bitsandbytes is imported only where int8 weights need it (``--8bit``, an int8 checkpoint): peft imports it whenever
it is installed (``peft.helpers``) and transformers imports peft, so under the CLI bitsandbytes is hidden while peft
is imported (:func:`import_discipline`); the Python API leaves imports alone unless :func:`configure` was called.
Nothing here imports torch or transformers.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import logging
import os
import sys
import warnings
from typing import Callable, Iterator

# loggers of the libraries lpt drives; their warnings are not lpt's
LIBRARY_LOGGERS = ("bitsandbytes", "transformers", "peft", "datasets", "accelerate", "huggingface_hub", "torch",
                   "torchao", "gguf", "urllib3", "filelock", "fsspec")
# read at import by tqdm, datasets and huggingface_hub: set for --quiet (inherited by child processes)
QUIET_ENV = {"TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "LPT_QUIET": "1"}


class _State:
    debug = False
    quiet = False
    env_set: dict[str, str] = {}  # variables configure() set (restored by the next call)
    filters: list = []  # warnings filters configure() added


_STATE = _State()


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def configure(debug: bool = False, quiet: bool = False) -> None:
    """Hide other libraries' warnings and bars unless ``debug``; with ``quiet`` hide lpt's own output too.

    Idempotent, and each call undoes what the previous one set (the CLI calls it once per command, also in-process).
    """
    from lpt import progress

    _STATE.debug, _STATE.quiet = debug, quiet
    for f in _STATE.filters:
        with contextlib.suppress(ValueError):
            warnings.filters.remove(f)
    _STATE.filters = []
    for k, v in _STATE.env_set.items():
        if os.environ.get(k) == v:
            os.environ.pop(k)
    _STATE.env_set = {}
    for k, v in {**({"LPT_DEBUG": "1"} if debug else {}), **(QUIET_ENV if quiet else {})}.items():
        if k not in os.environ:  # child processes (lpt bench's) follow; the user's own settings stay
            os.environ[k] = _STATE.env_set[k] = v
    level = logging.NOTSET if debug else logging.ERROR
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if not debug:
        before = list(warnings.filters)
        warnings.filterwarnings("ignore")  # every warning ...
        warnings.filterwarnings("default", module=r"lpt(\.|$)")  # ... except lpt's own
        _STATE.filters = [f for f in warnings.filters if f not in before]
    progress.console.quiet = quiet
    when_imported("transformers", _transformers)
    import_discipline()


def _transformers() -> None:
    """transformers keeps its own logger level and bar switch: set them (now, or once it is imported)."""
    from transformers.utils import logging as tlog

    if _STATE.debug:
        tlog.set_verbosity_warning()
        tlog.enable_progress_bar()
    else:
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()


# ----------------------------------------------------------------------------------------- import hooks
class _ImportHooks(importlib.abc.MetaPathFinder):
    """Runs code around a module's first import: ``around[name]`` wraps its execution (a context manager factory),
    ``after[name]`` runs once it is done (Python has no import hooks of this kind of its own)."""

    def __init__(self) -> None:
        self.after: dict[str, Callable[[], None]] = {}
        self.around: dict[str, Callable[[], contextlib.AbstractContextManager]] = {}
        self.busy: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):
        # answered for every lookup (availability checks look a module up without importing it), until it runs
        if fullname in self.busy or (fullname not in self.after and fullname not in self.around):
            return None
        self.busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)  # the other finders
        finally:
            self.busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_with_hooks(module):
            after, around = self.after.pop(fullname, None), self.around.pop(fullname, None)
            with around() if around is not None else contextlib.nullcontext():
                exec_module(module)
            if after is not None:
                after()

        spec.loader.exec_module = exec_with_hooks  # this module's own loader object
        return spec

    def install(self) -> None:
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)


_HOOKS = _ImportHooks()


def when_imported(name: str, fn: Callable[[], None]) -> None:
    """Call ``fn`` now if module ``name`` is imported, else right after its first import."""
    if name in sys.modules:
        _HOOKS.after.pop(name, None)
        fn()
        return
    _HOOKS.after[name] = fn
    _HOOKS.install()


# ----------------------------------------------------------------------------------------- optional imports
@contextlib.contextmanager
def hidden(name: str) -> Iterator[None]:
    """While inside, ``import name`` fails with ImportError and ``importlib.util.find_spec(name)`` is None (unless
    the module is already imported: then nothing changes)."""
    if name in sys.modules:
        yield
        return
    sys.modules[name] = None  # type: ignore[assignment]  # the import system's own "not available" marker
    try:
        yield
    finally:
        if sys.modules.get(name, 0) is None:
            del sys.modules[name]


def _peft_without_bitsandbytes() -> contextlib.AbstractContextManager:
    """peft imports bitsandbytes whenever it is installed (``peft.helpers``); transformers imports peft whenever
    *it* is installed. lpt uses peft only for its adapter config format, never for int8 layers: hide bitsandbytes
    while peft itself is imported (transformers' quantizer and lpt's int8 layers still find it later)."""
    return hidden("bitsandbytes")


def _forget_bitsandbytes_checks() -> None:
    """Availability checks cached while bitsandbytes was hidden would say it is missing: drop them."""
    for module, names in (("transformers.utils.import_utils", ("is_bitsandbytes_available",)),
                          ("peft.import_utils", ("is_bnb_available", "is_bnb_4bit_available"))):
        mod = sys.modules.get(module)
        for n in names:
            fn = getattr(mod, n, None)
            if hasattr(fn, "cache_clear"):
                fn.cache_clear()


def import_discipline() -> None:
    """Under the CLI: bitsandbytes is imported only by :func:`import_bitsandbytes` (int8 weights)."""
    if "peft" not in sys.modules and "bitsandbytes" not in sys.modules:
        _HOOKS.around["peft"] = _peft_without_bitsandbytes
        _HOOKS.after["peft"] = _forget_bitsandbytes_checks
        _HOOKS.install()


def quiet_import(name: str):
    """Import module ``name`` with its loggers' warnings hidden during the import unless --debug (bitsandbytes warns
    at import about optional CPU kernels it could not load, which reads like a failure and is not one)."""
    if name in sys.modules:
        return sys.modules[name]
    log = logging.getLogger(name.split(".")[0])
    level = log.level
    if not _STATE.debug:
        log.setLevel(logging.ERROR)
    try:
        return importlib.import_module(name)
    finally:
        log.setLevel(level)


def import_bitsandbytes():
    """bitsandbytes, for int8 weights (``--8bit``, int8 checkpoints): the one place lpt imports it."""
    return quiet_import("bitsandbytes")
