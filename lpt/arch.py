"""Architecture descriptions: where the projections of a decoder block live, and its head geometry.

Head count, key/value head count and head size always come from the model config, never from constants.
A family is supported when its blocks follow the Llama layout (q/k/v/o attention, gate/up/down SwiGLU MLP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lpt.errors import LptError

ATTN_OUT = ("q_proj", "k_proj", "v_proj")  # fan-out: a head is a block of output rows
ATTN_IN = ("o_proj",)  # fan-in: a head is a block of input columns
MLP_OUT = ("gate_proj", "up_proj")
MLP_IN = ("down_proj",)
PROJECTIONS = ATTN_OUT + ATTN_IN + MLP_OUT + MLP_IN


@dataclass(frozen=True)
class Family:
    """Where things are in one decoder family (module paths relative to the causal-LM model)."""

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    attn: str = "self_attn"
    mlp: str = "mlp"
    # projection name -> attribute inside attn / mlp
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"

    def module_path(self, layer: int, proj: str) -> str:
        parent = self.attn if proj in ATTN_OUT + ATTN_IN else self.mlp
        return f"{self.layers}.{layer}.{parent}.{getattr(self, proj.split('_')[0])}"


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", ("llama",)),
    "mistral": Family("mistral", ("mistral",)),
    "qwen2": Family("qwen2", ("qwen2",)),
}


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES.values() for t in f.model_types)


@dataclass(frozen=True)
class Arch:
    """The geometry of one model, read from its config."""

    family: Family
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    # per-layer widths when the model was already sliced with a per-layer layout (None = uniform)
    layer_heads: tuple[int, ...] | None = None
    layer_kv_heads: tuple[int, ...] | None = None
    layer_intermediate: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def heads(self, layer: int) -> int:
        return self.layer_heads[layer] if self.layer_heads else self.num_heads

    def kv_heads(self, layer: int) -> int:
        return self.layer_kv_heads[layer] if self.layer_kv_heads else self.num_kv_heads

    def intermediate(self, layer: int) -> int:
        return self.layer_intermediate[layer] if self.layer_intermediate else self.intermediate_size

    def block_linear_params(self, layer: int) -> int:
        """Parameters of the seven linear projections of one block (weights and biases)."""
        h, hd, d = self.heads(layer), self.head_dim, self.hidden_size
        kv, inter = self.kv_heads(layer), self.intermediate(layer)
        weights = 2 * h * hd * d + 2 * kv * hd * d + 3 * inter * d
        biases = (h + 2 * kv) * hd if self.family.name == "qwen2" else 0
        return weights + biases

    def module_path(self, layer: int, proj: str) -> str:
        return self.family.module_path(layer, proj)

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.family.name,
            "model_type": self.model_type,
            "num_hidden_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
        }


def describe(config: Any) -> Arch:
    """Read an ``Arch`` from a transformers config (or anything with the same attributes)."""
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            break
    else:
        raise LptError(
            f"unsupported architecture '{model_type}'; supported: {', '.join(supported_model_types())}"
        )
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    hidden = int(config.hidden_size)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if heads % kv:
        raise LptError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")

    def _tuple(name: str):
        v = getattr(config, name, None)
        return tuple(int(x) for x in v) if v else None

    return Arch(
        family=fam,
        model_type=model_type,
        num_layers=int(config.num_hidden_layers),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=int(head_dim),
        intermediate_size=int(config.intermediate_size),
        vocab_size=int(config.vocab_size),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        layer_heads=_tuple("lpt_layer_num_attention_heads"),
        layer_kv_heads=_tuple("lpt_layer_num_key_value_heads"),
        layer_intermediate=_tuple("lpt_layer_intermediate_size"),
    )


def get_module(model: Any, path: str):
    mod = model
    for part in path.split("."):
        mod = getattr(mod, part) if not part.isdigit() else mod[int(part)]
    return mod


def set_module(model: Any, path: str, new) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_module(model, parent_path) if parent_path else model
    setattr(parent, name, new)
