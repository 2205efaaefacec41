"""Decoder models whose blocks have different widths (per-layer pruned by lpt), for ``trust_remote_code``.

lpt copies this file next to the weights of a per-layer sliced model and points ``auto_map`` at it, so that

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

loads the model with plain transformers. The config is the family's own (``model_type`` unchanged) plus three
lists with one entry per block:

    lpt_layer_num_attention_heads, lpt_layer_num_key_value_heads, lpt_layer_intermediate_size

Block ``i`` gets that many query heads, key/value heads and MLP channels (``head_dim`` is the config's). The scalar
fields keep the widths of the unpruned parent. Without the lists these classes are exactly the family's own.
This file depends only on torch and transformers.
"""

from torch import nn
from transformers.models.llama.modeling_llama import LlamaForCausalLM

LAYER_FIELDS = ("lpt_layer_num_attention_heads", "lpt_layer_num_key_value_heads", "lpt_layer_intermediate_size")


def _linear(old, in_features, out_features):
    if old.in_features == in_features and old.out_features == out_features:
        return old
    return nn.Linear(in_features, out_features, bias=old.bias is not None, device=old.weight.device,
                     dtype=old.weight.dtype)


def apply_layer_widths(model, config):
    """Give every decoder block of ``model`` the widths listed in ``config`` (no-op without the lists)."""
    lists = [getattr(config, f, None) for f in LAYER_FIELDS]
    if not any(lists):
        return
    layers = model.model.layers
    heads, kv_heads, inter = (list(v) if v else None for v in lists)
    for name, v in zip(LAYER_FIELDS, (heads, kv_heads, inter)):
        if v is not None and len(v) != len(layers):
            raise ValueError(f"config.{name} has {len(v)} entries but the model has {len(layers)} layers")
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    for i, block in enumerate(layers):
        attn, mlp = block.self_attn, block.mlp
        h = heads[i] if heads else config.num_attention_heads
        kv = kv_heads[i] if kv_heads else config.num_key_value_heads
        if h % kv:
            raise ValueError(f"layer {i}: {h} query heads is not a multiple of {kv} key/value heads")
        attn.q_proj = _linear(attn.q_proj, hidden, h * head_dim)
        attn.k_proj = _linear(attn.k_proj, hidden, kv * head_dim)
        attn.v_proj = _linear(attn.v_proj, hidden, kv * head_dim)
        attn.o_proj = _linear(attn.o_proj, h * head_dim, hidden)
        attn.num_key_value_groups = h // kv
        if inter:
            mlp.gate_proj = _linear(mlp.gate_proj, hidden, inter[i])
            mlp.up_proj = _linear(mlp.up_proj, hidden, inter[i])
            mlp.down_proj = _linear(mlp.down_proj, inter[i], hidden)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = inter[i]


class LptLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        apply_layer_widths(self, config)
        self.post_init()


try:  # Mistral and Qwen2 share the Llama block layout
    from transformers.models.mistral.modeling_mistral import MistralForCausalLM

    class LptMistralForCausalLM(MistralForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            apply_layer_widths(self, config)
            self.post_init()
except ImportError:  # pragma: no cover - very old transformers
    pass

try:
    from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

    class LptQwen2ForCausalLM(Qwen2ForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            apply_layer_widths(self, config)
            self.post_init()
except ImportError:  # pragma: no cover
    pass
