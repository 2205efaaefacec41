"""Dependency groups (Eq. 4), mask selection, and the ``masks.json`` contract.

Groups, per decoder block:
- attention, ``gqa='kv-groups'``: one key/value head with all its query heads — rows of q, k, v and columns of o;
- attention, ``gqa='query-heads'``: one query head — its q rows and o columns; every key/value group keeps the
  same number of query heads, so the sliced model is a valid grouped-query attention model;
- MLP: one channel — its row in gate and up and its column in down.
Without grouped-query attention (kv heads == heads) both modes are the same thing.

Everything here is a function of tensors and plain data; no model is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from lpt import artifacts
from lpt.arch import Arch
from lpt.errors import LptError, MismatchError

GQA_MODES = ("kv-groups", "query-heads")
LAYOUTS = ("uniform", "per-layer")
BALANCES = ("search", "proportional")


# ------------------------------------------------------------------------------------------------ group sums
def head_units(arch: Arch, gqa: str) -> int:
    """Number of prunable attention units per layer: key/value groups, or query heads per group."""
    return arch.num_kv_heads if gqa == "kv-groups" else arch.group_size


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


def normalise(scores: torch.Tensor) -> torch.Tensor:
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
    heads are pruned in the proportion ``ratio`` (nearest unit) -- lpt 0.2's only balance. Channels then make up the
    difference (nearest channel). With ``round_to`` N > 1 the kept MLP width is a multiple of N
    (:func:`round_channels`), so the achieved ratio is within one step of N channels (``N · 3 · hidden`` parameters
    per layer) of ``ratio``. Head counts are never rounded: a layer has a few dozen heads at most, and a head is
    already ``head_dim`` (64-128) rows wide.
    """
    if not 0.0 <= ratio < 1.0:
        raise LptError(f"--ratio must be in [0, 1) (got {ratio})")
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


def round_to_violations(masks: "Masks") -> list[int]:
    """Layers whose kept MLP width is not a multiple of the ``round_to`` that ``masks.info`` records (prune's
    ``--round-to``); empty when it records none or 1. Unpruned layers keep their width and never count."""
    n = int(masks.info.get("round_to", 1) or 1)
    full = masks.arch.intermediate_size
    return [i for i, m in enumerate(masks.layers) if n > 1 and len(m.channels) % n and len(m.channels) != full]


# ------------------------------------------------------------------------------------------------ selection
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


def step_counts(frac: float, final: tuple[int, int], layout: str, prunable: Sequence[int], num_layers: int,
                head_scores: Sequence[torch.Tensor | None], channel_scores: Sequence[torch.Tensor | None],
                heads_pruned: Sequence[torch.Tensor], channels_pruned: Sequence[torch.Tensor],
                kv: int | None, round_to: int = 1, intermediate: int | None = None) -> list[tuple[int, int]]:
    """Attention units and MLP channels to have pruned in every layer at ``frac`` of the way to the target.

    ``final`` is the per-layer count at the target (``uniform_counts``). Counts grow in proportion to ``frac`` so the
    masks only ever grow and end exactly at the target. ``uniform``: every prunable layer gets the same counts;
    ``per-layer``: the same totals, split over layers by a global ranking of the scores (already pruned units count
    first; every layer keeps at least one unit). ``kv``: key/value heads under ``--gqa query-heads`` (a unit is then
    one query head in every group), else None. Skipped layers get ``(0, 0)``. At the target (``frac >= 1``) each
    per-layer channel count is rounded so the kept width is a multiple of ``round_to`` (:func:`round_channels`;
    uniform ``final`` counts are rounded already by :func:`uniform_counts`).
    """
    nh_f, nc_f = final
    counts = [(0, 0)] * num_layers
    if layout == "uniform":
        for i in prunable:
            counts[i] = (int(math.floor(frac * nh_f + 0.5)), int(math.floor(frac * nc_f + 0.5)))
        return counts
    if layout != "per-layer":
        raise LptError(f"unknown --layout '{layout}' (use {', '.join(LAYOUTS)})")
    total_h = int(math.floor(frac * nh_f * len(prunable) + 0.5))
    total_c = int(math.floor(frac * nc_f * len(prunable) + 0.5))
    hc = global_counts([sorted_unit_scores(_need(head_scores[i]), heads_pruned[i], kv) for i in prunable], total_h)
    cc = global_counts([sorted_unit_scores(_need(channel_scores[i]), channels_pruned[i], None) for i in prunable],
                       total_c)
    for j, i in enumerate(prunable):
        nc = cc[j] if frac < 1.0 or intermediate is None else round_channels(cc[j], intermediate, round_to)
        counts[i] = (hc[j], nc)
    return counts


def grow_masks(counts: Sequence[tuple[int, int]], prunable: Sequence[int],
               head_scores: Sequence[torch.Tensor | None], channel_scores: Sequence[torch.Tensor | None],
               heads_pruned: Sequence[torch.Tensor], channels_pruned: Sequence[torch.Tensor], gqa: str, kv: int
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """New boolean pruned-masks per layer with ``counts`` units pruned: what is pruned stays pruned (never grows
    back), the lowest-scoring of the rest are added. ``kv``: the model's key/value heads."""
    hp, cp = list(heads_pruned), list(channels_pruned)
    for i in prunable:
        nh, nc = counts[i]
        hs, cs = _need(head_scores[i]), _need(channel_scores[i])
        hp[i] = prune_lowest(hs, hp[i], nh) if gqa == "kv-groups" else prune_query_heads(hs, hp[i], nh, kv)
        cp[i] = prune_lowest(cs, cp[i], nc)
    return hp, cp


def _need(t: torch.Tensor | None) -> torch.Tensor:
    if t is None:
        raise LptError("no importance gathered before the first mask update; lower --warmup")
    return t


# ------------------------------------------------------------------------------------------------ masks
@dataclass
class LayerMask:
    """Kept indices of one block. ``heads`` are query heads, ``kv_heads`` key/value heads, ``channels`` MLP."""

    heads: list[int]
    kv_heads: list[int]
    channels: list[int]

    def to_dict(self, index: int) -> dict[str, Any]:
        return {"layer": index, "attention_heads": self.heads, "kv_heads": self.kv_heads, "mlp_channels": self.channels}


@dataclass
class Masks:
    """What ``masks.json`` holds: the architecture, the kept groups per layer, and what they amount to."""

    arch: Arch
    layers: list[LayerMask]
    gqa: str = "kv-groups"
    layout: str = "uniform"
    model: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # criterion, requested ratio, steps, ...

    # ---- construction
    @classmethod
    def full(cls, arch: Arch, **kw) -> "Masks":
        return cls(arch, [LayerMask(list(range(arch.num_heads)), list(range(arch.num_kv_heads)),
                                    list(range(arch.intermediate_size))) for _ in range(arch.num_layers)], **kw)

    @classmethod
    def from_pruned(cls, arch: Arch, heads_pruned: Sequence[torch.Tensor], channels_pruned: Sequence[torch.Tensor],
                    gqa: str, **kw) -> "Masks":
        """From boolean pruned-masks per layer (heads in the unit space of ``gqa``)."""
        g = arch.group_size
        layers = []
        for hp, cp in zip(heads_pruned, channels_pruned):
            if gqa == "kv-groups":
                kv_keep = [i for i in range(arch.num_kv_heads) if not bool(hp[i])]
                q_keep = [q for kvh in kv_keep for q in range(kvh * g, (kvh + 1) * g)]
            else:
                q_keep = [i for i in range(arch.num_heads) if not bool(hp[i])]
                kv_keep = sorted({q // g for q in q_keep})
            ch_keep = [i for i in range(arch.intermediate_size) if not bool(cp[i])]
            layers.append(LayerMask(q_keep, kv_keep, ch_keep))
        return cls(arch, layers, gqa=gqa, **kw)

    # ---- derived
    def is_uniform(self) -> bool:
        return len({(len(m.heads), len(m.kv_heads), len(m.channels)) for m in self.layers}) == 1

    def layer_params(self, i: int) -> int:
        m = self.layers[i]
        return self.arch.block_params_for(len(m.heads), len(m.kv_heads), len(m.channels))

    def block_params(self) -> tuple[int, int]:
        """(before, after) linear-layer parameters of all transformer blocks."""
        before = sum(self.arch.block_linear_params(i) for i in range(self.arch.num_layers))
        return before, sum(self.layer_params(i) for i in range(self.arch.num_layers))

    def row_masks(self, i: int, device=None) -> dict[str, torch.Tensor]:
        """Per-projection 0/1 vectors: output rows for q/k/v/gate/up, input columns for o/down."""
        a, m = self.arch, self.layers[i]
        hd = a.head_dim

        def vec(n_units: int, kept: list[int], width: int) -> torch.Tensor:
            v = torch.zeros(n_units, width, device=device)
            v[kept] = 1.0
            return v.view(-1)

        q = vec(a.num_heads, m.heads, hd)
        kv = vec(a.num_kv_heads, m.kv_heads, hd)
        ch = vec(a.intermediate_size, m.channels, 1)
        return {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": q, "gate_proj": ch, "up_proj": ch, "down_proj": ch}

    # ---- validation
    def validate(self) -> None:
        a = self.arch
        if len(self.layers) != a.num_layers:
            raise MismatchError(f"masks have {len(self.layers)} layers but the model has {a.num_layers}")
        g = a.group_size
        for i, m in enumerate(self.layers):
            for name, kept, n in (("attention_heads", m.heads, a.num_heads), ("kv_heads", m.kv_heads, a.num_kv_heads),
                                  ("mlp_channels", m.channels, a.intermediate_size)):
                if any((not isinstance(k, int)) or k < 0 or k >= n for k in kept):
                    raise MismatchError(f"layer {i}: {name} index out of range 0..{n - 1}")
                if sorted(set(kept)) != list(kept):
                    raise MismatchError(f"layer {i}: {name} must be sorted and unique")
                if not kept:
                    raise MismatchError(f"layer {i}: no {name} kept (a layer must keep at least one)")
            per_group = {kvh: [q for q in m.heads if q // g == kvh] for kvh in m.kv_heads}
            if sorted(q // g for q in m.heads if q // g not in per_group):
                raise MismatchError(f"layer {i}: a kept query head belongs to a pruned key/value head")
            if len({len(v) for v in per_group.values()}) != 1 or any(not v for v in per_group.values()):
                raise MismatchError(
                    f"layer {i}: every kept key/value head must keep the same number (>0) of query heads "
                    f"(grouped-query attention with {g} query heads per key/value head)")

    # ---- (de)serialisation
    def to_json(self) -> dict[str, Any]:
        import lpt

        before, after = self.block_params()
        return {
            "schema_version": artifacts.MASKS_SCHEMA,
            "lpt_version": lpt.__version__,
            "model": self.model,
            **self.arch.to_dict(),
            "gqa": self.gqa,
            "layout": "uniform" if self.is_uniform() else "per-layer",
            "layers": [m.to_dict(i) for i, m in enumerate(self.layers)],
            "params": {"blocks_before": before, "blocks_after": after, **self.info.get("params", {})},
            "ratio": {"blocks": 1.0 - after / before, **self.info.get("ratio", {})},
            "info": {k: v for k, v in self.info.items() if k not in ("params", "ratio")},
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], arch: Arch | None = None) -> "Masks":
        """Parse ``masks.json``; with ``arch`` (the model's), refuse a file made for a different model."""
        if doc.get("schema_version") != artifacts.MASKS_SCHEMA:
            raise MismatchError(f"unsupported masks schema_version {doc.get('schema_version')} "
                                f"(this lpt reads {artifacts.MASKS_SCHEMA})")
        if arch is not None:
            for key, want in arch.to_dict().items():
                if key in doc and doc[key] != want:
                    raise MismatchError(f"masks were made for {key}={doc[key]} but the model has {key}={want}")
        else:
            from lpt.arch import describe

            arch = describe(_ConfigView(doc))
        try:
            layers = [LayerMask(list(m["attention_heads"]), list(m["kv_heads"]), list(m["mlp_channels"]))
                      for m in doc["layers"]]
        except (KeyError, TypeError) as e:
            raise MismatchError(f"masks file is malformed (missing {e})") from None
        m = cls(arch, layers, gqa=doc.get("gqa", "kv-groups"), layout=doc.get("layout", "uniform"),
                model=doc.get("model", ""), info=dict(doc.get("info", {})))
        m.info["params"] = doc.get("params", {})
        m.info["ratio"] = doc.get("ratio", {})
        m.validate()
        return m

    def save(self, path) -> None:
        artifacts.write_json(path, self.to_json())

    @classmethod
    def load(cls, path, arch: Arch | None = None) -> "Masks":
        return cls.from_json(artifacts.read_json(path), arch)


class _ConfigView:
    """Lets ``arch.describe`` read the architecture fields stored in masks.json."""

    def __init__(self, doc: Mapping[str, Any]):
        self.model_type = doc.get("model_type")
        self.num_attention_heads = doc.get("num_attention_heads")
        self.num_key_value_heads = doc.get("num_key_value_heads")
        self.hidden_size = doc.get("hidden_size")
        self.head_dim = doc.get("head_dim")
        self.num_hidden_layers = doc.get("num_hidden_layers")
        self.intermediate_size = doc.get("intermediate_size")
        self.vocab_size = 0


def apply_masks(model, masks: Masks) -> None:
    """Set the mask buffers of the model's LoRA layers from ``masks`` (the layers must already be injected)."""
    from lpt.arch import get_module
    from lpt.lora import LoraLinear

    masks.validate()
    for i in range(masks.arch.num_layers):
        vecs = masks.row_masks(i)
        for proj, v in vecs.items():
            mod = get_module(model, masks.arch.module_path(i, proj))
            if not isinstance(mod, LoraLinear):
                raise LptError(f"{masks.arch.module_path(i, proj)} has no LoRA layer to carry its mask")
            if proj in ("o_proj", "down_proj"):
                mod.set_masks(in_mask=v)
            else:
                mod.set_masks(out_mask=v)
