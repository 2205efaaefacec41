"""Dependency groups (Eq. 4) and pruning budgets: group sums of projection scores, what one unit costs in
parameters, and how many units every layer loses for a ``--ratio`` (``--balance``, ``--round-to``, ``--skip-layers``).

Groups, per decoder block:
- attention, ``gqa='kv-groups'``: one key/value head with all its query heads — rows of q, k, v and columns of o;
- attention, ``gqa='query-heads'``: one query head — its q rows and o columns; every key/value group keeps the
  same number of query heads, so the sliced model is a valid grouped-query attention model;
- MLP: one channel — its row in gate and up and its column in down.
Without grouped-query attention (kv heads == heads) both modes are the same thing.

Everything here is a function of tensors and plain data; no model is touched. Which units go is
``lpt.selection``; the ``masks.json`` contract and applying it to a model is ``lpt.masks``. The flags' own rules
(``--ratio`` in [0, 1), the ``--balance`` syntax of :func:`parse_balance`) are declared with their fields in
``lpt.config``; what needs a model's widths and layers is checked here, as the counts are made.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from lpt.arch import Arch
from lpt.errors import LptError

GQA_MODES = ("kv-groups", "query-heads")
LAYOUTS = ("uniform", "per-layer")
BALANCES = ("search", "proportional")


# ------------------------------------------------------------------------------------------------ group sums
def head_units(arch: Arch, gqa: str) -> int:
    """Number of prunable attention units per layer: key/value groups, or query heads per group."""
    return arch.num_kv_heads if gqa == "kv-groups" else arch.group_size


def head_scores_len(arch: Arch, gqa: str) -> int:
    """Length of a layer's attention score (and pruned-set) vector: one entry per key/value group under
    ``kv-groups``, one per query head under ``query-heads``."""
    return head_units(arch, gqa) if gqa == "kv-groups" else arch.num_heads


def group_scores(arch: Arch, proj: Mapping[str, torch.Tensor], gqa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce per-row / per-column scores of one block's projections to group scores (Eq. 4).

    ``proj`` maps projection name to a 1-D tensor: row sums for q/k/v/gate/up, column sums for o/down. Missing
    projections (not LoRA targets) contribute nothing. Returns ``(heads, channels)``: ``heads`` is ``[kv]`` for
    kv-groups and ``[heads]`` (one score per query head) for query-heads; ``channels`` is ``[intermediate]``.
    """
    h, kv, hd, inter = arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.intermediate_size
    dev = next(iter(proj.values())).device if proj else "cpu"
    zero_q = torch.zeros(h, device=dev)
    q = sum((proj[p].float().view(h, hd).sum(1) for p in ("q_proj", "o_proj") if p in proj), zero_q)
    if gqa == "kv-groups":
        heads = q.view(kv, h // kv).sum(1)
        for p in ("k_proj", "v_proj"):
            if p in proj:
                heads = heads + proj[p].float().view(kv, hd).sum(1)
    elif gqa == "query-heads":
        heads = q
    else:
        raise LptError(f"unknown --gqa mode '{gqa}' (use {', '.join(GQA_MODES)})")
    channels = sum((proj[p].float() for p in ("gate_proj", "up_proj", "down_proj") if p in proj),
                   torch.zeros(inter, device=dev))
    return heads, channels


def normalize(scores: torch.Tensor) -> torch.Tensor:
    """Divide a score vector by its L2 norm (zero vectors unchanged).

    Applied to each layer's group vector this is lpt's ``--normalize-by group``; applied to each projection's
    row/column vector before the group sum it is the authors' released code (``--normalize-by projection``).
    Either makes layers comparable in a global ranking (``--layout per-layer``).
    """
    n = scores.float().norm()
    return scores / n if n > 0 else scores


# ------------------------------------------------------------------------------------------------ counting
def unit_params(arch: Arch, gqa: str) -> tuple[int, int]:
    """Block parameters removed by pruning one attention unit and one MLP channel (biases and full-width query /
    key norms included, as ``Arch`` describes them)."""
    if gqa == "kv-groups":
        head = arch.group_size * arch.head_params() + arch.kv_head_params()
    else:
        head = arch.num_kv_heads * arch.head_params()
    return head, arch.channel_params()


def round_channels(n_pruned: int, intermediate: int, round_to: int = 1) -> int:
    """Channels to prune so that the kept MLP width ``intermediate - n`` is the multiple of ``round_to`` nearest to
    ``intermediate - n_pruned`` (ties keep more), at least ``round_to`` and at most ``intermediate``.

    With ``round_to == 1`` it returns ``n_pruned`` unchanged, and nothing is pruned when nothing was to be (a
    width that is not a multiple stays whole). Works for any layer's width (per-layer layouts too).
    """
    round_to = int(round_to)
    if round_to < 1:
        raise LptError(f"--round-to must be a positive number of channels (got {round_to})")
    if round_to == 1 or n_pruned <= 0:
        return max(0, int(n_pruned))
    if round_to > intermediate:
        raise LptError(f"--round-to {round_to} is larger than the MLP width {intermediate}")
    kept = intermediate - int(n_pruned)
    kept = max(round_to, min(intermediate // round_to * round_to, int(math.floor(kept / round_to + 0.5)) * round_to))
    return intermediate - kept


def _channels_for(target: float, n_heads: int, p_head: int, p_chan: int) -> int:
    """MLP channels that make up ``target`` block parameters after ``n_heads`` attention units (nearest channel; may
    be negative or more than the layer has)."""
    return int(math.floor((target - n_heads * p_head) / p_chan + 0.5))


def uniform_counts(arch: Arch, ratio: float, gqa: str, round_to: int = 1, heads: int | None = None
                   ) -> tuple[int, int]:
    """Attention units and MLP channels to prune in every layer so that ``ratio`` of the block parameters goes.

    ``heads``: attention units per layer (see :func:`balance_candidates`); None for the proportional balance, where
    heads are pruned in the proportion ``ratio`` (nearest unit). Channels then make up the difference (nearest
    channel). With ``round_to`` N > 1 the kept MLP width is a multiple of N
    (:func:`round_channels`), so the achieved ratio is within one step of N channels (``N · 3 · hidden`` parameters
    per layer) of ``ratio``. Head counts are never rounded: a layer has a few dozen heads at most, and a head is
    already ``head_dim`` (64-128) rows wide.
    """
    units = head_units(arch, gqa)
    p_head, p_chan = unit_params(arch, gqa)
    target = ratio * arch.block_linear_params(0)
    if heads is None:
        heads = min(units - 1, int(math.floor(ratio * units + 0.5)))
    elif not 0 <= heads < units:
        raise LptError(f"--balance {heads}: a layer has {units} attention units under --gqa {gqa}; prune 0 to "
                       f"{units - 1} of them")
    n_chan = max(0, min(arch.intermediate_size - 1, _channels_for(target, heads, p_head, p_chan)))
    return heads, round_channels(n_chan, arch.intermediate_size, round_to)


def balance_candidates(arch: Arch, ratio: float, gqa: str, round_to: int = 1) -> list[tuple[int, int]]:
    """Every uniform way to remove ``ratio`` of the block parameters: ``(attention units, MLP channels)`` per layer,
    one for each number of attention units from none to all but one, the MLP channels making up the rest. Counts
    the MLP cannot make up are left out; with ``ratio`` 0 the only candidate is ``(0, 0)``."""
    if ratio <= 0:
        return [(0, 0)]
    p_head, p_chan = unit_params(arch, gqa)
    target = ratio * arch.block_linear_params(0)
    out = []
    for h in range(head_units(arch, gqa)):
        c = _channels_for(target, h, p_head, p_chan)
        if 0 <= c < arch.intermediate_size:
            out.append((h, round_channels(c, arch.intermediate_size, round_to)))
    return out or [uniform_counts(arch, ratio, gqa, round_to)]


def parse_balance(spec: str | int) -> int | None:
    """``--balance``: 'search' / 'proportional' -> None (decided elsewhere), 'N' -> N attention units per layer."""
    spec = str(spec).strip()
    if spec in BALANCES:
        return None
    try:
        n = int(spec)
    except ValueError:
        raise LptError(f"unknown --balance '{spec}' (use {', '.join(BALANCES)}, or a number of attention units "
                       "per layer)") from None
    if n < 0:
        raise LptError(f"--balance {n}: the number of attention units must be 0 or more")
    return n


# ------------------------------------------------------------------------------------------------ layers
def parse_layers(spec: str, num_layers: int) -> list[int]:
    """'0-2,31' -> [0, 1, 2, 31]; 'paper' -> first 10% and the last layer (the authors' choice); '' -> []."""
    spec = (spec or "").strip()
    if not spec:
        return []
    if spec == "paper":
        return sorted(set(range(max(1, int(round(0.1 * num_layers))))) | {num_layers - 1})
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise LptError(f"--skip-layers: cannot parse '{part}' (use e.g. 0-2,31 or paper)") from None
    bad = sorted(i for i in out if not 0 <= i < num_layers)
    if bad:
        raise LptError(f"--skip-layers: layer {bad[0]} does not exist (the model has {num_layers} layers)")
    if len(out) >= num_layers:
        raise LptError("--skip-layers leaves no layer to prune")
    return sorted(out)


def layer_ratio(arch: Arch, ratio: float, prunable: Sequence[int]) -> float:
    """Ratio to apply to each prunable layer so that all blocks together lose ``ratio`` of their parameters."""
    total = sum(arch.block_linear_params(i) for i in range(arch.num_layers))
    part = sum(arch.block_linear_params(i) for i in prunable)
    r = ratio * total / part
    if r >= 1.0:
        skipped = [i for i in range(arch.num_layers) if i not in set(prunable)]
        raise LptError(f"--ratio {ratio} cannot be reached with layers {skipped} left unpruned")
    return r
