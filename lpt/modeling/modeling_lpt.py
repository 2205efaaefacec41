"""Decoder models whose blocks have different widths (per-layer pruned by lpt), for ``trust_remote_code``.

lpt copies this file next to the weights of a per-layer sliced model and points ``auto_map`` at it, so that

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

loads the model with plain transformers. The config is the family's own (``model_type`` unchanged) plus three
lists with one entry per block:

    lpt_layer_num_attention_heads, lpt_layer_num_key_value_heads, lpt_layer_intermediate_size

Block ``i`` gets that many query heads, key/value heads and MLP channels (``head_dim`` is the config's). The scalar
fields keep the widths of the unpruned parent. Query / key norms over the whole projection width (OLMo 2) get the
block's width too. Without the lists these classes are exactly the family's own.
This file depends only on torch and transformers.
"""

import importlib

from torch import nn

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
        full_q = config.num_attention_heads * head_dim
        full_kv = config.num_key_value_heads * head_dim
        for norm_name, full, width in (("q_norm", full_q, h * head_dim), ("k_norm", full_kv, kv * head_dim)):
            norm = getattr(attn, norm_name, None)  # a norm over the whole projection width shrinks with it
            if norm is not None and norm.weight.shape[0] == full and width != full:
                setattr(attn, norm_name, type(norm)(width, eps=norm.variance_epsilon).to(norm.weight.device,
                                                                                           norm.weight.dtype))
        attn.num_key_value_groups = h // kv
        if inter:
            mlp.gate_proj = _linear(mlp.gate_proj, hidden, inter[i])
            mlp.up_proj = _linear(mlp.up_proj, hidden, inter[i])
            mlp.down_proj = _linear(mlp.down_proj, inter[i], hidden)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = inter[i]


def _subclass(base):
    def __init__(self, config):
        base.__init__(self, config)
        apply_layer_widths(self, config)
        self.post_init()

    return type(f"Lpt{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})


# transformers module -> causal-LM class; every class gets an Lpt<Class> subclass here (see lpt.arch.FAMILIES)
FAMILY_CLASSES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM", "granite": "GraniteForCausalLM", "olmo2": "Olmo2ForCausalLM",
}

for _module, _name in FAMILY_CLASSES.items():
    try:
        _base = getattr(importlib.import_module(f"transformers.models.{_module}.modeling_{_module}"), _name)
    except (ImportError, AttributeError):  # pragma: no cover - an older transformers without this family
        continue
    globals()[f"Lpt{_name}"] = _subclass(_base)
