"""Which units to cut: the masking policy of ``lpt prune`` over one small state object.

A *unit* is what one mask decision removes: an attention unit (a key/value group under ``--gqa kv-groups``, one
query head in every group under ``query-heads``) or an MLP channel. ``State`` holds, per decoder block, the
moving-average scores and the boolean pruned sets; ``Policy`` what is fixed for a run (layout, prunable layers,
GQA mode, widths, ``--round-to``). ``step_counts`` says how many units every layer has pruned at a point of the
schedule, ``grow`` which ones: what is pruned stays pruned, the lowest-scoring of the rest are added.

Pure functions of tensors and plain data; the group sums and the budgets they start from are ``lpt.groups``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from lpt import groups
from lpt.arch import Arch
from lpt.errors import LptError


@dataclass(frozen=True)
class Policy:
    """What decides the selection and stays fixed for a run."""

    layout: str  # uniform | per-layer (groups.LAYOUTS)
    prunable: tuple[int, ...]  # layers that may be pruned (the others keep every unit)
    num_layers: int
    gqa: str  # kv-groups | query-heads (groups.GQA_MODES)
    num_kv_heads: int
    intermediate: int  # MLP width of every layer
    round_to: int = 1  # per-layer layouts: kept MLP widths a multiple of this at the target

    @classmethod
    def of(cls, arch: Arch, *, layout: str, prunable: Sequence[int], gqa: str, round_to: int = 1) -> "Policy":
        return cls(layout, tuple(prunable), arch.num_layers, gqa, arch.num_kv_heads, arch.intermediate_size,
                   round_to)

    @property
    def kv_groups(self) -> int | None:
        """Key/value heads when a unit is one query head in every group (``query-heads``), else None."""
        return self.num_kv_heads if self.gqa == "query-heads" else None


@dataclass
class State:
    """Per decoder block: the units' scores (None until first observed) and the boolean pruned sets."""

    head_scores: list[torch.Tensor | None]
    channel_scores: list[torch.Tensor | None]
    heads_pruned: list[torch.Tensor]
    channels_pruned: list[torch.Tensor]
    # the model-level axes: one score and one pruned flag per block (depth) and per hidden channel (hidden size)
    block_scores: torch.Tensor | None = None
    hidden_scores: torch.Tensor | None = None
    blocks_pruned: torch.Tensor | None = None
    hidden_pruned: torch.Tensor | None = None

    @classmethod
    def empty(cls, arch: Arch, gqa: str) -> "State":
        """Nothing observed, nothing pruned."""
        n = arch.num_layers
        units = groups.head_scores_len(arch, gqa)
        return cls([None] * n, [None] * n, [torch.zeros(units, dtype=torch.bool) for _ in range(n)],
                   [torch.zeros(arch.intermediate_size, dtype=torch.bool) for _ in range(n)],
                   blocks_pruned=torch.zeros(n, dtype=torch.bool),
                   hidden_pruned=torch.zeros(arch.hidden_size, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------ primitives
def prune_lowest(scores: torch.Tensor, pruned: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean pruned-mask with exactly ``max(k, already pruned)`` entries: keep what is pruned, add the lowest."""
    k = max(int(k), int(pruned.sum()))
    s = scores.float().clone()
    s[pruned] = -math.inf
    order = torch.argsort(s, stable=True)
    out = torch.zeros_like(pruned)
    out[order[:k]] = True
    return out


def prune_query_heads(scores: torch.Tensor, pruned: torch.Tensor, k_per_group: int, kv: int) -> torch.Tensor:
    """Prune ``k_per_group`` query heads inside every key/value group (scores and masks are ``[heads]``)."""
    s, p = scores.view(kv, -1), pruned.view(kv, -1)
    return torch.stack([prune_lowest(s[i], p[i], k_per_group) for i in range(kv)]).view(-1)


def sorted_unit_scores(scores: torch.Tensor, pruned: torch.Tensor, kv: int | None) -> torch.Tensor:
    """Per-layer scores of pruning 1, 2, ... more units, in order (for a global ranking across layers).

    For query-heads (``kv`` given) the j-th unit is the j-th weakest query head of every group together.
    Already pruned units score -inf so they are always chosen first.
    """
    s = scores.float().clone()
    s[pruned] = -math.inf
    if kv is None:
        return torch.sort(s).values
    return torch.sort(s.view(kv, -1), dim=1).values.sum(0)


def global_counts(unit_scores: Sequence[torch.Tensor], total: int) -> list[int]:
    """Split ``total`` units over layers by a global ranking; each layer keeps at least one unit."""
    flat = []
    for layer, s in enumerate(unit_scores):
        for j, v in enumerate(s[:-1].tolist()):  # never the last unit of a layer
            flat.append((v, layer, j))
    flat.sort()
    counts = [0] * len(unit_scores)
    for _, layer, _ in flat[:total]:
        counts[layer] += 1
    return counts


# ------------------------------------------------------------------------------------------------ policy
def step_counts(frac: float, target: tuple[int, int], policy: Policy, state: State) -> list[tuple[int, int]]:
    """Attention units and MLP channels to have pruned in every layer at ``frac`` of the way to the target.

    ``target`` is the per-layer count at the target (``groups.uniform_counts``). Counts grow in proportion to
    ``frac`` so the masks only ever grow and end exactly at the target. ``uniform``: every prunable layer gets the
    same counts; ``per-layer``: the same totals, split over layers by a global ranking of the scores (already
    pruned units count first; every layer keeps at least one unit). Layers that are not prunable get ``(0, 0)``.
    At the target (``frac >= 1``) each per-layer channel count is rounded so the kept width is a multiple of
    ``policy.round_to`` (``groups.round_channels``; uniform target counts are rounded already by
    ``groups.uniform_counts``).
    """
    nh_t, nc_t = target
    prunable = policy.prunable
    counts = [(0, 0)] * policy.num_layers
    if policy.layout == "uniform":
        for i in prunable:
            counts[i] = (int(math.floor(frac * nh_t + 0.5)), int(math.floor(frac * nc_t + 0.5)))
        return counts
    if policy.layout != "per-layer":
        raise LptError(f"unknown --layout '{policy.layout}' (use {', '.join(groups.LAYOUTS)})")
    total_h = int(math.floor(frac * nh_t * len(prunable) + 0.5))
    total_c = int(math.floor(frac * nc_t * len(prunable) + 0.5))
    kv = policy.kv_groups
    hc = global_counts([sorted_unit_scores(_need(state.head_scores[i]), state.heads_pruned[i], kv)
                        for i in prunable], total_h)
    cc = global_counts([sorted_unit_scores(_need(state.channel_scores[i]), state.channels_pruned[i], None)
                        for i in prunable], total_c)
    for j, i in enumerate(prunable):
        nc = cc[j] if frac < 1.0 else groups.round_channels(cc[j], policy.intermediate, policy.round_to)
        counts[i] = (hc[j], nc)
    return counts


def grow(counts: Sequence[tuple[int, int]], policy: Policy, state: State
         ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """New boolean pruned sets per layer (heads, channels) with ``counts`` units pruned: what is pruned stays
    pruned (never grows back), the lowest-scoring of the rest are added. ``state`` is not changed."""
    hp, cp = list(state.heads_pruned), list(state.channels_pruned)
    for i in policy.prunable:
        nh, nc = counts[i]
        hs, cs = _need(state.head_scores[i]), _need(state.channel_scores[i])
        hp[i] = (prune_lowest(hs, hp[i], nh) if policy.gqa == "kv-groups" else
                 prune_query_heads(hs, hp[i], nh, policy.num_kv_heads))
        cp[i] = prune_lowest(cs, cp[i], nc)
    return hp, cp


def _need(t: torch.Tensor | None) -> torch.Tensor:
    if t is None:
        raise LptError("no importance gathered before the first mask update; lower --warmup")
    return t
