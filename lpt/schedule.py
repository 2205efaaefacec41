"""Sparsity schedule and moving average: pure functions of numbers and tensors."""

from __future__ import annotations

import math

import torch


def ramp_bounds(total_steps: int, warmup: float, cooldown: float) -> tuple[int, int]:
    """Optimiser steps (1-based, inclusive end) over which sparsity rises: ``(start, end)``.

    Sparsity is 0 up to ``start``, reaches the target at ``end``, then recovery fine-tuning runs to the end.
    """
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    start = int(round(warmup * total_steps))
    end = total_steps - int(round(cooldown * total_steps))
    end = max(end, start + 1)
    return min(start, total_steps - 1), min(end, total_steps)


def cubic_sparsity(step: int, target: float, start: int, end: int, initial: float = 0.0) -> float:
    """Cubic schedule (Zhu & Gupta): ``s_t = S + (s0 − S)·(1 − (t − start)/(end − start))³``, clamped."""
    if step <= start:
        return initial
    if step >= end:
        return target
    frac = (step - start) / (end - start)
    return target + (initial - target) * (1.0 - frac) ** 3


def is_prune_step(step: int, freq: int, start: int, end: int) -> bool:
    """Masks change every ``freq`` optimiser steps inside the ramp, and always at its last step."""
    if step <= start or step > end:
        return False
    return (step - start) % max(1, freq) == 0 or step == end


def ema(previous: torch.Tensor | None, current: torch.Tensor, lam: float) -> torch.Tensor:
    """Moving average ``Ḡ_t = λ·Ḡ_{t−1} + (1−λ)·Ĝ_t`` (Eq. 11), started at zero as in Algorithm 1 and the authors'
    code: ``previous=None`` is ``Ḡ_0 = 0``, so the first observation gets weight ``1 − λ``, not 1."""
    if not 0.0 <= lam < 1.0:
        raise ValueError(f"λ must be in [0, 1) (got {lam})")
    if previous is None:
        return (1.0 - lam) * current
    return lam * previous + (1.0 - lam) * current


def num_steps(nsamples: int, batch_size: int, epochs: float, max_steps: int | None) -> int:
    if max_steps:
        return int(max_steps)
    return max(1, int(math.ceil(epochs * nsamples / batch_size)))


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Sample indices of optimiser step ``step`` (1-based): epochs are seeded permutations, concatenated."""
    lo, hi = (step - 1) * batch_size, step * batch_size
    idx = []
    epoch = lo // n
    while len(idx) < hi - lo:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        start = max(lo - epoch * n, 0)
        idx.extend(perm[start:min(n, hi - epoch * n)].tolist())
        epoch += 1
    return torch.tensor(idx[: hi - lo], dtype=torch.long)
