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
    """Per-layer L2 normalisation (as in the authors' code): makes layers comparable in a global ranking."""
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


def uniform_counts(arch: Arch, ratio: float, gqa: str, multiple_of: int = 1) -> tuple[int, int]:
    """Attention units and MLP channels to prune in every layer so that ``ratio`` of the block parameters goes.

    Heads are rounded to the nearest unit; channels then make up the difference (nearest channel). With
    ``multiple_of > 1`` the number of *kept* channels is rounded to the nearest multiple of it (at least one
    multiple): llama.cpp's quantised types and CPU kernels want row lengths divisible by 32 (see the README's
    llama.cpp table), at the price of a ratio up to ``multiple_of / 2`` channels off.
    """
    if not 0.0 <= ratio < 1.0:
        raise LptError(f"--ratio must be in [0, 1) (got {ratio})")
    units = head_units(arch, gqa)
    p_head, p_chan = unit_params(arch, gqa)
    target = ratio * arch.block_linear_params(0)
    n_heads = min(units - 1, int(math.floor(ratio * units + 0.5)))
    n_chan = int(math.floor((target - n_heads * p_head) / p_chan + 0.5))
    n_chan = max(0, min(arch.intermediate_size - 1, n_chan))
    if multiple_of > 1 and n_chan > 0:
        keep = arch.intermediate_size - n_chan
        keep = max(multiple_of, int(math.floor(keep / multiple_of + 0.5)) * multiple_of)
        n_chan = max(0, min(arch.intermediate_size - 1, arch.intermediate_size - keep))
    return n_heads, n_chan


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
