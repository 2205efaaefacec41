"""Device memory as lpt reads it: the peak since the process started (or since ``lpt.benchmarking.memory``'s
meter reset it) and the current resident set. The pruning loop records each step's peak with :func:`peak_bytes`;
``lpt bench`` measures with the same readers (``lpt.benchmarking.memory.MemoryMeter``).

On a GPU the peak is what PyTorch's CUDA caching allocator allocated; on CPU the resident set's high-water mark
(``VmHWM`` in ``/proc/self/status``, ``ru_maxrss`` where ``/proc`` is unavailable). torch is imported only when a
GPU is read.
"""

from __future__ import annotations

import re
import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")


def status_kb(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or None where it cannot be read."""
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def rss_bytes() -> int:
    """Current resident set size of this process (0 where /proc is unavailable)."""
    kb = status_kb("VmRSS")
    return kb * 1024 if kb is not None else 0


def maxrss_bytes() -> int:
    """The peak resident set size of this process since it started (``ru_maxrss``; no reset reaches it)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def peak_bytes(device) -> int:
    """Peak memory of ``device`` since the process started or the last reset: bytes allocated by the CUDA caching
    allocator on a GPU (after a synchronize), the resident set's high-water mark on CPU."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        return int(torch.cuda.max_memory_allocated(dev))
    kb = status_kb("VmHWM")
    return kb * 1024 if kb is not None else maxrss_bytes()
