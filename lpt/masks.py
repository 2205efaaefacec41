"""The ``masks.json`` contract: which heads and channels every layer keeps, which whole blocks are removed and which
hidden (residual-stream) channels are kept (``Masks``), its validation against a model, its (de)serialisation, and
applying it to a model (``apply_masks``: LoRA layers' mask buffers, and the residual mask of ``lpt.gates``).

``masks.json`` is what ``lpt prune`` writes and ``slice``, ``merge``, ``eval`` and ``bench`` read; its schema
version is ``artifacts.MASKS_SCHEMA`` (2: ``removed_layers`` and ``hidden_channels``; version 1 files, which have
neither, are still read). Kept indices are sorted and unique; a layer keeps at least one query head, key/value head
and MLP channel, and under grouped-query attention every kept key/value head keeps the same number of query heads;
at least one block and one hidden channel are kept. A removed block's head and channel lists say what it held when
it was removed; they do not count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from lpt import artifacts
from lpt.arch import FAN_IN, Arch
from lpt.errors import LptError, MismatchError

READS = (1, 2)  # masks.json schema versions this lpt reads


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
    model: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # criterion, requested ratio, steps, ...
    removed: list[int] = field(default_factory=list)  # whole blocks removed (depth pruning), sorted
    hidden: list[int] | None = None  # kept hidden channels (None: all; hidden-size pruning), sorted

    # ---- construction
    @classmethod
    def full(cls, arch: Arch, **kw) -> "Masks":
        return cls(arch, [LayerMask(list(range(arch.num_heads)), list(range(arch.num_kv_heads)),
                                    list(range(arch.intermediate_size))) for _ in range(arch.num_layers)], **kw)

    @classmethod
    def from_pruned(cls, arch: Arch, heads_pruned: Sequence[torch.Tensor], channels_pruned: Sequence[torch.Tensor],
                    gqa: str, blocks_pruned: torch.Tensor | None = None, hidden_pruned: torch.Tensor | None = None,
                    **kw) -> "Masks":
        """From boolean pruned-masks per layer (heads in the unit space of ``gqa``), and optionally of the blocks
        (``[layers]``) and the hidden channels (``[hidden_size]``)."""
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
        removed = [] if blocks_pruned is None else torch.nonzero(blocks_pruned, as_tuple=True)[0].tolist()
        hidden = None
        if hidden_pruned is not None and bool(hidden_pruned.any()):
            hidden = torch.nonzero(~hidden_pruned.bool(), as_tuple=True)[0].tolist()
        return cls(arch, layers, gqa=gqa, removed=removed, hidden=hidden, **kw)

    # ---- derived
    def kept_layers(self) -> list[int]:
        """Indices of the blocks that stay (in order)."""
        gone = set(self.removed)
        return [i for i in range(len(self.layers)) if i not in gone]

    def hidden_size(self) -> int:
        """The hidden size after slicing."""
        return self.arch.hidden_size if self.hidden is None else len(self.hidden)

    def is_uniform(self) -> bool:
        """Whether every kept block keeps the same widths."""
        return len({(len(m.heads), len(m.kv_heads), len(m.channels))
                    for i, m in enumerate(self.layers) if i not in set(self.removed)}) <= 1

    def width_layout(self) -> str:
        """``uniform`` when every kept layer keeps the same widths, else ``per-layer`` (what ``masks.json``
        records)."""
        return "uniform" if self.is_uniform() else "per-layer"

    def prunes_model_axes(self) -> bool:
        """Whether whole blocks or hidden channels are removed (depth or hidden-size pruning)."""
        return bool(self.removed) or self.hidden is not None

    def layer_params(self, i: int) -> int:
        """Linear parameters of block ``i`` after slicing (0 for a removed block)."""
        if i in set(self.removed):
            return 0
        m = self.layers[i]
        return self.arch.block_params_for(len(m.heads), len(m.kv_heads), len(m.channels), self.hidden_size())

    def block_params(self) -> tuple[int, int]:
        """(before, after) linear-layer parameters of all transformer blocks."""
        before = sum(self.arch.block_linear_params(i) for i in range(self.arch.num_layers))
        return before, sum(self.layer_params(i) for i in range(self.arch.num_layers))

    def model_params(self) -> tuple[int, int]:
        """(before, after) parameters of the whole model as ``Arch`` counts them: embedding (and an untied output
        layer), blocks with their norms, final norm."""
        a, d = self.arch, self.hidden_size()
        after = a.embedding_params(d) + sum(self.layer_params(i) + a.block_other_params(d) for i in self.kept_layers())
        return a.model_params(), after

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

    def hidden_vector(self, device=None) -> torch.Tensor | None:
        """0/1 vector over the hidden channels (None when every channel is kept): the output rows of o_proj /
        down_proj and the input columns of q/k/v/gate/up that hidden-size pruning removes."""
        if self.hidden is None:
            return None
        v = torch.zeros(self.arch.hidden_size, device=device)
        v[self.hidden] = 1.0
        return v

    # ---- validation
    def validate(self) -> None:
        a = self.arch
        if len(self.layers) != a.num_layers:
            raise MismatchError(f"masks have {len(self.layers)} layers but the model has {a.num_layers}")
        _check_indices("removed_layers", self.removed, a.num_layers, "")
        if len(self.removed) >= a.num_layers:
            raise MismatchError("removed_layers removes every block (a model must keep at least one)")
        if self.hidden is not None:
            _check_indices("hidden_channels", self.hidden, a.hidden_size, "")
            if not self.hidden:
                raise MismatchError("hidden_channels keeps no channel (a model must keep at least one)")
        g = a.group_size
        for i, m in enumerate(self.layers):
            for name, kept, n in (("attention_heads", m.heads, a.num_heads), ("kv_heads", m.kv_heads, a.num_kv_heads),
                                  ("mlp_channels", m.channels, a.intermediate_size)):
                _check_indices(name, kept, n, f"layer {i}: ")
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
            "removed_layers": list(self.removed),
            "hidden_channels": None if self.hidden is None else list(self.hidden),
            "layers": [m.to_dict(i) for i, m in enumerate(self.layers)],
            "params": {"blocks_before": before, "blocks_after": after, **self.info.get("params", {})},
            "ratio": {"blocks": 1.0 - after / before, **self.info.get("ratio", {})},
            "info": {k: v for k, v in self.info.items() if k not in ("params", "ratio")},
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], arch: Arch | None = None) -> "Masks":
        """Parse ``masks.json``; with ``arch`` (the model's), refuse a file made for a different model."""
        if doc.get("schema_version") not in READS or isinstance(doc.get("schema_version"), bool):
            raise MismatchError(f"unsupported masks schema_version {doc.get('schema_version')} "
                                f"(this lpt reads {', '.join(map(str, READS))})")
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
            removed = list(doc.get("removed_layers") or [])
            hidden = doc.get("hidden_channels")
            hidden = None if hidden is None else list(hidden)
        except (KeyError, TypeError) as e:
            raise MismatchError(f"masks file is malformed (missing {e})") from None
        m = cls(arch, layers, gqa=doc.get("gqa", "kv-groups"), model=doc.get("model", ""),
                info=dict(doc.get("info", {})), removed=removed, hidden=hidden)
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
        self.vocab_size = doc.get("vocab_size") or 0
        self.tie_word_embeddings = doc.get("tie_word_embeddings", False)


def apply_masks(model, masks: Masks) -> None:
    """Set the mask buffers of the model's LoRA layers from ``masks`` (the layers must already be injected): the
    heads' and channels' rows and columns; the output rows of o_proj / down_proj of the hidden channels removed and
    of every removed block (its residual contribution, ``lpt.gates``); and the residual mask on the embedding's
    output (installed on first use, when hidden channels go)."""
    from lpt.arch import get_module
    from lpt.gates import ATTR, ResidualMask
    from lpt.lora import LoraLinear

    masks.validate()
    hidden = masks.hidden_vector()
    removed = set(masks.removed)
    for i in range(masks.arch.num_layers):
        for proj, v in masks.row_masks(i).items():
            path = masks.arch.module_path(i, proj)
            mod = get_module(model, path)
            if not isinstance(mod, LoraLinear):
                raise LptError(f"{path} has no LoRA layer to carry its mask")
            if proj in FAN_IN:
                out = torch.ones(mod.out_features) if hidden is None else hidden
                mod.set_masks(in_mask=v, out_mask=out * 0.0 if i in removed else out)
            else:
                mod.set_masks(out_mask=v)
    if masks.hidden is not None or getattr(model, ATTR, None) is not None:
        ResidualMask.of(model, masks.arch).set(masks.hidden)


def round_to_violations(masks: Masks) -> list[int]:
    """Kept layers whose kept MLP width is not a multiple of the ``round_to`` that ``masks.info`` records (prune's
    ``--round-to``); empty when it records none or 1. Unpruned layers keep their width and never count."""
    n = int(masks.info.get("round_to", 1) or 1)
    full = masks.arch.intermediate_size
    return [i for i in masks.kept_layers() if n > 1 and len(masks.layers[i].channels) % n
            and len(masks.layers[i].channels) != full]


def _check_indices(name: str, kept: Sequence[Any], n: int, where: str) -> None:
    """Sorted, unique integer indices in ``0..n-1`` (JSON booleans are not indices)."""
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 or k >= n for k in kept):
        raise MismatchError(f"{where}{name} index out of range 0..{n - 1} (or not an integer)")
    if sorted(set(kept)) != list(kept):
        raise MismatchError(f"{where}{name} must be sorted and unique")
