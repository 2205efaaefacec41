"""Other libraries' noise, and which optional library gets imported when.

lpt prints its own messages and progress bars on stderr (``lpt.progress``). What the libraries under it print on
their own -- warnings at import or load (bitsandbytes' "Failed to load CPU gemm_4bit_forward from
kernels-community" on CPUs with AVX512-BF16, transformers' and peft's advice), transformers' "Loading weights" and
"Writing model shards" bars -- is hidden unless ``--debug``: the CLI calls :func:`configure` once per command. With
``quiet`` lpt's own output goes too, and every tqdm bar of those libraries (also in child processes).

bitsandbytes is imported only where its int8 backend needs it, through :func:`import_bitsandbytes` (its
import-time warnings hidden unless --debug); peft and ``transformers.optimization``, which would import it at
start-up, are imported without it (``lpt.int8.import_without_bitsandbytes``). Nothing here imports torch or
transformers.
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
from typing import Callable

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


def debug() -> bool:
    """Whether lpt runs with ``--debug`` (set by :func:`configure`, which the CLI calls once per command) or with
    ``LPT_DEBUG`` set (the Python API, child processes)."""
    return _STATE.debug or bool(os.environ.get("LPT_DEBUG"))


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


def _transformers() -> None:
    """transformers keeps its own logger level and bar switch: set them (now, or once it is imported)."""
    from transformers.utils import logging as tlog

    if _STATE.debug:
        tlog.set_verbosity_warning()
        tlog.enable_progress_bar()
    else:
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()


# ----------------------------------------------------------------------------------------- post-import hooks
class _PostImport(importlib.abc.MetaPathFinder):
    """Runs a function right after a module's first import (Python has no post-import hooks of its own)."""

    def __init__(self) -> None:
        self.hooks: dict[str, Callable[[], None]] = {}
        self.busy: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):
        # answered for every lookup (availability checks look a module up without importing it) until it is run
        if fullname in self.busy or fullname not in self.hooks:
            return None
        self.busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)  # the other finders
        finally:
            self.busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_hook(module):
            exec_module(module)
            hook = self.hooks.pop(fullname, None)
            if hook is not None:
                hook()

        spec.loader.exec_module = exec_then_hook  # this module's own loader object
        return spec


_HOOKS = _PostImport()


def when_imported(name: str, fn: Callable[[], None]) -> None:
    """Call ``fn`` now if module ``name`` is imported, else right after its first import."""
    if name in sys.modules:
        _HOOKS.hooks.pop(name, None)
        fn()
        return
    _HOOKS.hooks[name] = fn
    if _HOOKS not in sys.meta_path:
        sys.meta_path.insert(0, _HOOKS)


# ----------------------------------------------------------------------------------------- optional imports
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
