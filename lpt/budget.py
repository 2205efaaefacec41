"""What a pruning run removes where: the ``Budget``, built once from ``(PruneConfig, Arch)`` before any weight is read.

Three axes (``--axes``):

- ``width``  -- attention units and MLP channels inside every block (the paper's groups), the same counts in every
  prunable block (``--ratio`` of the block parameters; ``--balance`` divides it between attention and MLP);
- ``depth``  -- whole decoder blocks (``--prune-layers``);
- ``hidden`` -- channels of the residual stream, shared by every block and the embedding (``--hidden-ratio``).

A run either fixes each axis (``--ratio``, ``--prune-layers``, ``--hidden-ratio``) or names a whole-model target
(``--model-ratio`` / ``--target-params``) and the axes that may meet it: then every way of dividing the removed
parameters between the axes on a grid of shares (``--search-grid``) is a candidate, and the pruner keeps the one
with the lowest loss after pruning by its scores (as ``--balance search`` does for attention against MLP).

A ``Candidate`` is one complete target: blocks removed, hidden channels removed, and the attention units and MLP
channels removed from every kept prunable block. Tensor-parallel sizes (``--tp``) and ``--round-to`` are constraints
every candidate meets. Everything here is arithmetic on the config; which blocks, channels and heads go is decided
by the scores (``lpt.selection``, ``lpt.pruner``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

from lpt import groups
from lpt.arch import Arch, default_gqa
from lpt.errors import LptError

AXES = ("width", "depth", "hidden")
SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
MAX_WIDTH_RATIO = 0.95  # a block keeps at least 5% of its parameters when the search fills the width axis
GOAL_TOLERANCE = 0.01  # candidates of a whole-model target are within 1% of all parameters of it


@dataclass(frozen=True)
class Candidate:
    """One complete target: ``blocks`` removed, ``hidden`` channels removed, and ``heads`` attention units (of the
    ``gqa`` unit space) and ``channels`` MLP channels removed from every kept prunable block."""

    blocks: int
    hidden: int
    heads: int
    channels: int

    @property
    def width(self) -> tuple[int, int]:
        return self.heads, self.channels

    def to_dict(self) -> dict[str, int]:
        return {"blocks": self.blocks, "hidden_channels": self.hidden, "attention_units": self.heads,
                "mlp_channels": self.channels}


@dataclass(frozen=True)
class Budget:
    """The targets of one pruning run (see the module docstring)."""

    gqa: str
    note: str | None  # what --gqa auto chose and why, for the user
    layout: str  # uniform | per-layer (skip layers imply per-layer)
    prunable: tuple[int, ...]  # blocks whose width may be pruned and which may be removed (not --skip-layers)
    layer_ratio: float  # --ratio spread over the prunable blocks (fixed mode)
    candidates: tuple[Candidate, ...]  # one for a fixed target; several when they are measured
    search: bool  # whether the pruner measures the candidates (balance search or the whole-model search)
    model_level: bool  # depth or hidden size is pruned, or a whole-model target is set
    round_to: int  # MLP widths (and hidden sizes) kept a multiple of this
    hidden_round: int  # kept hidden sizes a multiple of this
    tp: tuple[int, ...]  # tensor-parallel sizes every kept block must shard at
    goal_params: int | None = None  # whole-model parameters asked for (target mode)

    @property
    def width_only(self) -> bool:
        return not self.model_level

    def fixed(self) -> Candidate | None:
        """The target when there is nothing to measure, else None."""
        return None if self.search else self.candidates[0]


# ------------------------------------------------------------------------------------------------ parsing
def parse_params(text: str | int | float) -> int:
    """``--target-params``: 100M, 1.5B, 350k or a plain number of parameters."""
    s = str(text).strip().lower().replace("_", "").replace(",", "")
    mult = 1.0
    if s and s[-1] in SUFFIXES:
        mult, s = SUFFIXES[s[-1]], s[:-1]
    try:
        value = float(s) * mult
    except ValueError:
        raise LptError(f"--target-params: cannot read '{text}' (use e.g. 100M, 1.5B or 350000)") from None
    if not math.isfinite(value) or value <= 0:
        raise LptError(f"--target-params must be a positive number of parameters (got {text})")
    return int(round(value))


def parse_axes(spec: str) -> tuple[str, ...]:
    """``--axes``: a comma list of width, depth, hidden (any subset, in any order)."""
    axes = tuple(dict.fromkeys(a.strip() for a in str(spec).split(",") if a.strip()))
    bad = [a for a in axes if a not in AXES]
    if bad or not axes:
        raise LptError(f"--axes: unknown axis '{bad[0] if bad else spec}' (use a comma list of {', '.join(AXES)})")
    return axes


def block_count(spec: float, layers: int) -> int:
    """``--prune-layers``: a number of blocks (1, 2, ...) or a fraction of them (0 < f < 1)."""
    if spec < 0 or (spec >= 1 and spec != int(spec)):
        raise LptError(f"--prune-layers must be a whole number of blocks or a fraction in (0, 1) (got {spec:g})")
    n = int(spec) if spec >= 1 else int(math.floor(spec * layers + 0.5))
    if n >= layers:
        raise LptError(f"--prune-layers {spec:g} removes {n} of the model's {layers} blocks; a model keeps at least one")
    return n


def tp_sizes(values: Sequence[int | str]) -> tuple[int, ...]:
    """``--tp``: tensor-parallel sizes (repeatable, or a comma list), sorted and unique."""
    out = set()
    for v in values:
        for part in str(v).split(","):
            if not part.strip():
                continue
            try:
                n = int(part)
            except ValueError:
                raise LptError(f"--tp: '{part.strip()}' is not a whole number") from None
            if n < 1:
                raise LptError(f"--tp sizes must be positive (got {n})")
            out.add(n)
    return tuple(sorted(out))


# ------------------------------------------------------------------------------------------------ constraints
def kept_widths(arch: Arch, gqa: str, heads: int, channels: int) -> tuple[int, int, int]:
    """(query heads, key/value heads, MLP channels) a block keeps after removing ``heads`` units and ``channels``."""
    if gqa == "kv-groups":
        kv = arch.num_kv_heads - heads
        return kv * arch.group_size, kv, arch.intermediate_size - channels
    return arch.num_kv_heads * (arch.group_size - heads), arch.num_kv_heads, arch.intermediate_size - channels


def shards(heads: int, kv_heads: int, channels: int, tp: int, block: int = 1) -> bool:
    """Whether a block of these widths shards over ``tp`` devices the way vLLM and SGLang split it: query heads
    divisible by ``tp``; key/value heads divisible by ``tp``, or ``tp`` divisible by them (each key/value head
    replicated on ``tp / kv`` devices); the MLP width divisible by ``tp × block`` (each device's share a multiple of
    the kernel block)."""
    kv_ok = kv_heads % tp == 0 or tp % kv_heads == 0
    return heads % tp == 0 and kv_ok and channels % (tp * block) == 0


def supported_tp(widths: Sequence[tuple[int, int, int]], sizes: Sequence[int] = (1, 2, 4, 8), block: int = 1
                 ) -> list[int]:
    """The tensor-parallel sizes among ``sizes`` at which every block of ``widths`` (heads, kv heads, MLP) shards."""
    return [t for t in sizes if all(shards(h, kv, c, t, block) for h, kv, c in widths)]


def channel_unit(round_to: int, tp: Sequence[int]) -> int:
    """What kept MLP widths must be a multiple of: ``round_to`` on each of ``tp`` devices, for every size."""
    unit = max(1, int(round_to))
    for t in tp:
        unit = math.lcm(unit, t * max(1, int(round_to)))
    return unit


# ------------------------------------------------------------------------------------------------ the budget
def plan(cfg: Any, arch: Arch) -> Budget:
    """The ``Budget`` of ``cfg`` (a ``PruneConfig``) for a model of ``arch``: every model-dependent rule of the flags
    checked here, once, before any weight is read (one-line errors naming the flag)."""
    from lpt.config import round_to_channels

    gqa, note = default_gqa(arch, None if cfg.gqa == "auto" else cfg.gqa)
    tp = tp_sizes(cfg.tp)
    skip = groups.parse_layers(cfg.skip_layers, arch.num_layers)
    layout = "per-layer" if skip else cfg.layout
    prunable = tuple(i for i in range(arch.num_layers) if i not in skip)
    widths = arch.layer_intermediate or [arch.intermediate_size]
    round_to = round_to_channels(cfg.round_to, min(widths))
    unit = channel_unit(round_to, tp)
    target_mode = cfg.model_ratio is not None or cfg.target_params is not None
    depth = block_count(cfg.prune_layers, arch.num_layers) if cfg.prune_layers else 0
    model_level = target_mode or depth > 0 or cfg.hidden_ratio > 0
    if model_level and arch.per_layer:
        raise LptError("this model was already sliced with per-layer widths; prune depth or hidden size on the "
                       "original (unsliced) model")
    if tp and layout == "per-layer":
        raise LptError("--tp keeps uniform widths divisible by the tensor-parallel size; per-layer widths (--layout "
                       "per-layer, --skip-layers) load only in transformers, not in vLLM / SGLang")
    if round_to > min(widths):
        raise LptError(f"--round-to {round_to} is larger than the MLP width {min(widths)} of {cfg.model}")
    if unit > min(widths):
        raise LptError(f"--tp {','.join(map(str, tp))} with --round-to {round_to} needs MLP widths that are multiples "
                       f"of {unit}, more than the model's {min(widths)}")
    for t in tp:
        if not shards(arch.num_heads, arch.num_kv_heads, arch.intermediate_size, t):
            raise LptError(f"--tp {t}: the unpruned model itself does not shard at {t} ({arch.num_heads} heads, "
                           f"{arch.num_kv_heads} key/value heads, MLP {arch.intermediate_size})")
    hidden_round = round_to if round_to <= arch.hidden_size else 1
    common = dict(gqa=gqa, note=note, layout=layout, prunable=prunable, round_to=round_to,
                  hidden_round=hidden_round, tp=tp)
    if target_mode:
        return _target_budget(cfg, arch, common, unit)
    ratio = cfg.ratio
    if len(prunable) - depth < 1:
        raise LptError(f"--prune-layers {cfg.prune_layers:g} leaves no prunable block with --skip-layers "
                       f"{cfg.skip_layers}")
    hidden = 0
    if cfg.hidden_ratio > 0:
        h_unit = hidden_unit(arch, arch.num_heads, hidden_round, layout)
        hidden = hidden_count(arch, cfg.hidden_ratio, h_unit)
        if hidden == 0:
            heads = f" and the {arch.num_heads} query heads" if h_unit != hidden_round else ""
            raise LptError(f"--hidden-ratio {cfg.hidden_ratio:g} removes no channel: this model's hidden size "
                           f"({arch.hidden_size}) moves in steps of {h_unit} (--round-to {round_to}{heads}); ask for "
                           f"at least {h_unit / 2 / arch.hidden_size:.2f} or a smaller --round-to (cpu: 8)")
    at = shrunk(arch, depth, hidden)
    layer_ratio = _layer_ratio(at, ratio, prunable, depth) if ratio > 0 else 0.0
    if ratio <= 0:
        width = [(0, 0)]
    elif cfg.balance == "search":
        width = groups.balance_candidates(at, layer_ratio, gqa, unit)
    else:
        width = [groups.uniform_counts(at, layer_ratio, gqa, round_to=unit, heads=groups.parse_balance(cfg.balance))]
    cands = [Candidate(depth, hidden, h, c) for h, c in width]
    cands = _loadable(cands, arch, gqa, layout)
    cands = _meeting_tp(cands, arch, gqa, tp, unit)
    search = ratio > 0 and cfg.balance == "search" and len(cands) > 1
    return Budget(**common, layer_ratio=layer_ratio, candidates=tuple(cands), search=search,
                  model_level=model_level)


def _layer_ratio(at: Arch, ratio: float, prunable: Sequence[int], depth: int) -> float:
    """``--ratio`` of the kept blocks' parameters spread over the kept prunable blocks (``groups.layer_ratio``; with
    blocks removed, the blocks are alike: a model with per-layer widths is refused earlier)."""
    if not depth:
        return groups.layer_ratio(at, ratio, prunable)
    r = ratio * at.num_layers / (len(prunable) - depth)
    if r >= 1.0:
        raise LptError(f"--ratio {ratio} cannot be reached in the {len(prunable) - depth} prunable blocks left")
    return r


def shrunk(arch: Arch, blocks: int = 0, hidden: int = 0) -> Arch:
    """``arch`` with ``blocks`` fewer decoder blocks and ``hidden`` fewer hidden channels (uniform widths): the
    geometry every width count of a candidate is computed on."""
    return dataclasses.replace(arch, num_layers=arch.num_layers - blocks, hidden_size=arch.hidden_size - hidden)


def hidden_count(arch: Arch, ratio: float, unit: int) -> int:
    """Hidden channels to remove for ``--hidden-ratio``: the kept size the multiple of ``unit`` nearest to
    ``(1 - ratio) · hidden`` (at least ``unit``)."""
    if not 0.0 <= ratio < 1.0:
        raise LptError(f"--hidden-ratio must be in [0, 1) (got {ratio})")
    d = arch.hidden_size
    kept = max(unit, int(math.floor((1.0 - ratio) * d / unit + 0.5)) * unit)
    return max(0, d - min(kept, d // unit * unit if unit > 1 else d))


def hidden_unit(arch: Arch, heads: int, round_to: int, layout: str = "uniform") -> int:
    """What a kept hidden size must be a multiple of: ``round_to``, and -- for families whose transformers config
    refuses a hidden size that is not a multiple of ``num_attention_heads`` (``Family.heads_divide_hidden``) --
    ``heads`` (the kept query heads of a uniform prune; the unpruned count, which a per-layer config keeps)."""
    if not arch.family.heads_divide_hidden:
        return round_to
    return math.lcm(round_to, arch.num_heads if layout == "per-layer" else heads)


def loadable(arch: Arch, gqa: str, c: Candidate, layout: str = "uniform") -> bool:
    """Whether the sliced config of candidate ``c`` loads in transformers (``hidden_unit``'s rule)."""
    if not arch.family.heads_divide_hidden:
        return True
    heads = arch.num_heads if layout == "per-layer" else kept_widths(arch, gqa, c.heads, c.channels)[0]
    return (arch.hidden_size - c.hidden) % heads == 0


def _loadable(cands: list[Candidate], arch: Arch, gqa: str, layout: str) -> list[Candidate]:
    ok = [c for c in cands if loadable(arch, gqa, c, layout)]
    if cands and not ok:
        c = cands[0]
        heads = kept_widths(arch, gqa, c.heads, c.channels)[0]
        raise LptError(f"{arch.name}: transformers refuses a hidden size ({arch.hidden_size - c.hidden}) that is not a "
                       f"multiple of the attention heads ({heads}); choose another --balance or --hidden-ratio")
    return ok


def _meeting_tp(cands: list[Candidate], arch: Arch, gqa: str, tp: tuple[int, ...], unit: int) -> list[Candidate]:
    if not tp:
        return cands
    ok = [c for c in cands if all(shards(*kept_widths(arch, gqa, c.heads, c.channels), t) for t in tp)]
    if not ok:
        sizes = ",".join(map(str, tp))
        raise LptError(f"--tp {sizes}: no division of the target keeps the attention heads divisible by "
                       f"{sizes} (use --balance search or a --balance N that keeps them, or --gqa query-heads)")
    return ok


def _target_budget(cfg: Any, arch: Arch, common: dict[str, Any], unit: int) -> Budget:
    """Candidates over ``--axes`` for a whole-model target (``--model-ratio`` / ``--target-params``)."""
    if cfg.model_ratio is not None and cfg.target_params is not None:
        raise LptError("--model-ratio and --target-params both set the whole-model target; give one")
    if cfg.prune_layers or cfg.hidden_ratio > 0:
        raise LptError("--prune-layers / --hidden-ratio fix an axis, --model-ratio / --target-params search over "
                       "--axes: give one or the other")
    total = arch.model_params()
    if cfg.model_ratio is not None:
        if not 0.0 < cfg.model_ratio < 1.0:
            raise LptError(f"--model-ratio must be in (0, 1) (got {cfg.model_ratio})")
        goal = int(round((1.0 - cfg.model_ratio) * total))
    else:
        goal = parse_params(cfg.target_params)
        if goal >= total:
            raise LptError(f"--target-params {cfg.target_params}: the model has {total:,} parameters already")
    axes = parse_axes(cfg.axes)
    gqa, prunable = common["gqa"], common["prunable"]
    cands = []
    layout = common["layout"]
    kept_heads = sorted({kept_widths(arch, gqa, h, 0)[0] for h in range(groups.head_units(arch, gqa))
                         } if "width" in axes else {arch.num_heads}, reverse=True)
    for shares in share_grid(axes, max(1, int(cfg.search_grid))):
        for heads in kept_heads:  # the hidden sizes each kept head count allows (hidden_unit)
            hround = hidden_unit(arch, heads, common["hidden_round"], layout)
            cands.extend(meet(arch, total - goal, shares, gqa, unit, hround, len(prunable)))
    cands = [c for c in dict.fromkeys(cands) if loadable(arch, gqa, c, layout)]
    cands = _meeting_tp(cands, arch, gqa, common["tp"], unit) if cands else []
    if not cands:
        raise LptError(f"no division of --axes {','.join(axes)} reaches {goal:,} parameters (of {total:,}); add an "
                       f"axis or ask for less")
    # the loss decides between candidates of (nearly) the same size: those within GOAL_TOLERANCE of the goal, or the
    # nearest when none is (axes without width move in whole blocks or rounding steps)
    miss = {c: abs(candidate_params(arch, gqa, c, len(prunable)) - goal) for c in cands}
    near = [c for c in cands if miss[c] <= GOAL_TOLERANCE * total]
    cands = near or [min(cands, key=miss.__getitem__)]
    return Budget(**common, layer_ratio=0.0, candidates=tuple(cands), search=True, model_level=True,
                  goal_params=goal)


def share_grid(axes: Sequence[str], steps: int) -> list[dict[str, float]]:
    """Every division of the removed parameters between ``axes`` in shares of ``1 / steps`` (each axis named gets a
    share of 0 or more; the shares add up to 1)."""
    out = []

    def rec(i: int, left: int, acc: dict[str, float]) -> None:
        if i == len(axes) - 1:
            out.append({**acc, axes[i]: left / steps})
            return
        for k in range(left + 1):
            rec(i + 1, left - k, {**acc, axes[i]: k / steps})

    rec(0, steps, {})
    return out


def meet(arch: Arch, remove: int, shares: dict[str, float], gqa: str, unit: int, hidden_round: int,
         prunable: int) -> list[Candidate]:
    """The candidates that remove ``remove`` parameters with ``shares`` of them from each axis: hidden channels
    first (they shrink every block), then whole blocks, then the width of the kept blocks makes up the rest exactly
    (one candidate per division of that width between attention and MLP, as ``--balance search``). Empty when the
    shares cannot be met (a share the axis cannot carry)."""
    d, n_layers = arch.hidden_size, arch.num_layers
    hidden = 0
    if shares.get("hidden", 0.0) > 0:
        per = (arch.model_params() - shrunk(arch, 0, 1).model_params())  # one hidden channel
        kept = d - shares["hidden"] * remove / per
        kept = max(hidden_round, int(math.floor(kept / hidden_round + 0.5)) * hidden_round)
        hidden = d - min(kept, d)
    at = shrunk(arch, 0, hidden)
    blocks = 0
    if shares.get("depth", 0.0) > 0:
        per_block = at.block_linear_params(0) + at.block_other_params()
        blocks = int(math.floor(shares["depth"] * remove / per_block + 0.5))
        if blocks >= prunable:
            return []
    at = shrunk(arch, blocks, hidden)
    left = remove - (arch.model_params() - at.model_params())
    if "width" not in shares:
        return [Candidate(blocks, hidden, 0, 0)] if left <= _tolerance(arch, hidden_round) else []
    kept_prunable = prunable - blocks
    ratio = max(0.0, left / (kept_prunable * at.block_linear_params(0)))
    if ratio >= MAX_WIDTH_RATIO:
        return []
    if ratio <= 0.0:
        return [Candidate(blocks, hidden, 0, 0)]
    return [Candidate(blocks, hidden, h, c) for h, c in groups.balance_candidates(at, ratio, gqa, unit)]


def _tolerance(arch: Arch, hidden_round: int) -> int:
    """How far a candidate without the width axis may miss the target: half a block or half a rounding step of the
    hidden size, whichever its axes move in."""
    per_hidden = arch.model_params() - shrunk(arch, 0, 1).model_params()
    return max(arch.block_linear_params(0) // 2, per_hidden * hidden_round // 2)


def candidate_params(arch: Arch, gqa: str, c: Candidate, prunable: int | None = None) -> int:
    """Whole-model parameters of ``arch`` pruned to candidate ``c``: ``c.blocks`` of the ``prunable`` blocks (all
    when None) removed and the rest of them cut to the candidate's widths; the other blocks keep theirs (uniform
    models)."""
    prunable = arch.num_layers if prunable is None else prunable
    h, kv, ch = kept_widths(arch, gqa, c.heads, c.channels)
    at = shrunk(arch, 0, c.hidden)
    full = at.block_linear_params(0) + at.block_other_params()
    cut = at.block_params_for(h, kv, ch) + at.block_other_params()
    return at.embedding_params() + (prunable - c.blocks) * cut + (arch.num_layers - prunable) * full


def model_widths(arch: Arch, masks: Any = None) -> list[tuple[int, int, int]]:
    """(query heads, key/value heads, MLP channels) of every block of ``arch`` (per-layer widths included), or of
    every kept block of ``masks`` (an ``lpt.masks.Masks``) when given."""
    if masks is not None:
        return [(len(masks.layers[i].heads), len(masks.layers[i].kv_heads), len(masks.layers[i].channels))
                for i in masks.kept_layers()]
    return [(arch.heads(i), arch.kv_heads(i), arch.intermediate(i)) for i in range(arch.num_layers)]


def tp_warnings(arch: Arch, sizes: Sequence[int | str], masks: Any = None) -> list[str]:
    """One line per tensor-parallel size of ``sizes`` at which the model (or its masked shape) does not shard the way
    vLLM and SGLang split it (``shards``)."""
    out = []
    widths = model_widths(arch, masks)
    for t in tp_sizes(sizes):
        bad = next(((i, w) for i, w in enumerate(widths) if not shards(*w, t)), None)
        if bad is not None:
            i, (h, kv, c) = bad
            out.append(f"this model does not shard at tensor-parallel size {t} (vLLM / SGLang): block {i} has {h} "
                       f"query heads, {kv} key/value heads and an MLP width of {c}, which {t} devices cannot split "
                       f"evenly (lpt prune --tp {t} keeps them divisible)")
    return out


def tp_list(values: Sequence[int | str]) -> list[int]:
    """``--tp`` as a config records it: the sorted, unique sizes (``tp_sizes``)."""
    return list(tp_sizes(values))
