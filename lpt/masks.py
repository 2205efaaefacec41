"""The ``masks.json`` contract: which heads and channels every layer keeps (``Masks``), its validation against a
model, its (de)serialisation, and applying it to a model's LoRA layers (``apply_masks``).

``masks.json`` is what ``lpt prune`` writes and ``slice``, ``merge``, ``eval`` and ``bench`` read; its schema
version is ``artifacts.MASKS_SCHEMA``. Kept indices are sorted and unique; a layer keeps at least one query head,
key/value head and MLP channel, and under grouped-query attention every kept key/value head keeps the same number
of query heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from lpt import artifacts
from lpt.arch import Arch
from lpt.errors import LptError, MismatchError


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

    def width_layout(self) -> str:
        """``uniform`` when every layer keeps the same widths, else ``per-layer`` (what ``masks.json`` records)."""
        return "uniform" if self.is_uniform() else "per-layer"

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
                if any(isinstance(k, bool) for k in kept):  # JSON true/false would mask as a 0/1 vector
                    raise MismatchError(f"layer {i}: {name} holds true/false; it lists kept indices")
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
            "layout": self.width_layout(),
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
        keys = ("attention_heads", "kv_heads", "mlp_channels")
        if not isinstance(doc.get("layers"), list) or not all(
                isinstance(m, dict) and all(isinstance(m.get(k), list) for k in keys) for m in doc["layers"]):
            raise MismatchError(f"masks file is malformed: 'layers' must be a list of objects with the lists "
                                f"{', '.join(keys)}")
        layers = [LayerMask(*(list(m[k]) for k in keys)) for m in doc["layers"]]
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
        """``masks.json`` at ``path``; whatever is wrong with it is one line naming the file."""
        doc = artifacts.read_object(path, "masks file")
        sizes = ("num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim", "num_hidden_layers",
                 "intermediate_size")
        artifacts.check_types(doc, path, {"gqa": str, "layout": str, "model": (str, type(None)), "info": dict,
                                          "params": dict, "ratio": dict, **dict.fromkeys(sizes, int)})
        try:
            return cls.from_json(doc, arch)
        except MismatchError as e:
            raise MismatchError(f"{path}: {e}") from None


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


def round_to_violations(masks: Masks) -> list[int]:
    """Layers whose kept MLP width is not a multiple of the ``round_to`` that ``masks.info`` records (prune's
    ``--round-to``); empty when it records none or 1. Unpruned layers keep their width and never count."""
    n = int(masks.info.get("round_to", 1) or 1)
    full = masks.arch.intermediate_size
    return [i for i, m in enumerate(masks.layers) if n > 1 and len(m.channels) % n and len(m.channels) != full]
