"""Trial timing: warm-up runs, timed runs with device synchronisation, and their statistics."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

from lpt.benchmarking.schema import Stats

TIMER = "time.perf_counter around each call; on CUDA, torch.cuda.synchronize() before starting and before stopping"


def summarize(values: Sequence[float]) -> Stats:
    """Median, min, max, mean and sample standard deviation of the trial values (seconds)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no trial values to summarise")
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "mean": statistics.fmean(vals),
        "stdev": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
        "values": vals,
    }


def synchronizer(device) -> Callable[[], None]:
    """A function that waits for queued work on ``device`` (a no-op on CPU)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def time_calls(fn: Callable[[], object], *, warmup: int, trials: int, sync: Callable[[], None] = lambda: None,
               on_call: Callable[[], None] | None = None) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``trials`` times timed; returns the timed durations (seconds).

    ``on_call`` runs after every call (warm-up included), outside the timed region (progress bars).
    """
    if trials <= 0:
        raise ValueError("trials must be positive")
    for _ in range(max(0, warmup)):
        fn()
        sync()
        if on_call:
            on_call()
    out = []
    for _ in range(trials):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
        if on_call:
            on_call()
    return out


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``; None when either is missing or the reference is zero."""
    if value is None or not reference:
        return None
    return float(value) / float(reference)
