"""FLOPs per token of a forward pass: a pure function of the model's shapes.

Counted: every matrix multiply with a weight (2 FLOPs per multiply-add), the LM head included, and the two
attention products (scores ``QKᵀ`` and weighted values ``AV``) at the average causal context of a ``seq_len``
forward, ``(seq_len + 1) / 2``. Embedding lookups are free; norms, rotary embeddings, activations, softmax and
residual additions are left out (a few percent at most). An unmerged LoRA adapter adds ``2·r·(in + out)`` per
adapted layer; masks add nothing (masked rows are still multiplied).
"""

from __future__ import annotations

from typing import Any, Sequence

from lpt.benchmarking.schema import Flops

FORMULA = ("total = linear + lora + attention per token, where linear = 2 x (weights of every linear layer, lm_head "
           "included; embeddings are lookups), lora = 2 x (LoRA A and B weights of an unmerged adapter), attention = "
           "2 x sum over layers of (query heads x head_dim) x (seq_len + 1), i.e. QK^T and AV at 2 FLOPs per "
           "multiply-add over the average causal context (seq_len + 1) / 2")


def attention_flops(heads_per_layer: Sequence[int], head_dim: int, seq_len: int) -> int:
    """FLOPs per token of ``QKᵀ`` and ``AV`` summed over layers, at the mean causal context ``(seq_len+1)/2``."""
    return 2 * int(sum(heads_per_layer)) * int(head_dim) * (int(seq_len) + 1)


def flops_per_token(linear_weights: int, lora_weights: int, heads_per_layer: Sequence[int], head_dim: int,
                    seq_len: int) -> Flops:
    linear = 2 * int(linear_weights)
    lora = 2 * int(lora_weights)
    attn = attention_flops(heads_per_layer, head_dim, seq_len)
    return {"linear": linear, "lora": lora, "attention": attn, "total": linear + lora + attn}


def linear_weights(model: Any) -> tuple[int, int]:
    """(weights of the model's linear layers, weights of LoRA A/B layers) — each counted once per use.

    A tied LM head shares its tensor with the embedding but still costs a matrix multiply, so it is counted here.
    """
    from torch import nn

    from lpt.lora import LoraLinear

    base = lora = 0
    lora_children = set()
    for mod in model.modules():
        if isinstance(mod, LoraLinear) and mod.r:
            lora_children.update((id(mod.lora_A), id(mod.lora_B)))
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            n = int(mod.in_features) * int(mod.out_features)
            if id(mod) in lora_children:
                lora += n
            else:
                base += n
    return base, lora


def attention_shape(config: Any) -> tuple[list[int], int]:
    """(query heads per layer, head_dim) from a config, per-layer widths of sliced models included."""
    from lpt.arch import describe
    from lpt.errors import LptError

    try:
        a = describe(config)
        return [a.heads(i) for i in range(a.num_layers)], a.head_dim
    except LptError:  # not a Llama-layout family: read the standard attributes
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return [heads] * int(config.num_hidden_layers), head_dim


def model_flops(model: Any, seq_len: int) -> Flops:
    base, lora = linear_weights(model)
    heads, head_dim = attention_shape(model.config)
    return flops_per_token(base, lora, heads, head_dim, seq_len)
