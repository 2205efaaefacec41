"""Peak memory of one measured phase: the CUDA caching allocator on GPU, the process's resident set on CPU.

On CPU the peak resident set size (``VmHWM``) only grows over a process's life; on Linux it can be reset by
writing ``5`` to ``/proc/self/clear_refs``, which ``MemoryMeter.reset`` does (after returning freed heap pages to
the system with ``malloc_trim``). Where that is impossible the peak counts from the process start, and the
``method`` string says so. ``lpt bench`` measures each configuration in its own process either way. The readers
themselves are ``lpt.memory``'s (the pruning loop uses them too).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from lpt.memory import maxrss_bytes, peak_bytes, rss_bytes, status_kb

_CLEAR_REFS = Path("/proc/self/clear_refs")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return status_kb("VmHWM") is not None


class MemoryMeter:
    """``reset()`` before a phase, ``peak()`` after it (bytes)."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.resettable = True
        if self.cuda:
            self.method = ("peak bytes allocated by the PyTorch CUDA caching allocator (torch.cuda."
                           "max_memory_allocated), reset before each measured phase; weights included")
        else:
            self.resettable = _reset_hwm()
            self.method = ("peak resident set size of the measuring process (VmHWM), reset before each measured "
                           "phase; weights, libraries and interpreter included" if self.resettable else
                           "peak resident set size of the measuring process since it started (ru_maxrss); "
                           "weights, libraries and interpreter included")

    def reset(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            _malloc_trim()
            _reset_hwm()

    def current(self) -> int:
        if self.cuda:
            import torch

            return int(torch.cuda.memory_allocated(self.device))
        return rss_bytes()

    def peak(self) -> int:
        if self.cuda or self.resettable:
            return peak_bytes(self.device)
        return maxrss_bytes()
