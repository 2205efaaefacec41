"""Models with random weights at real shapes, so runtime and memory can be measured without downloading weights.

A ``--random-init`` spec is ``SHAPE[@RATIO]``: ``SHAPE`` is a name from ``SHAPES``, a JSON file (a Hugging Face
``config.json`` works) or inline JSON; ``@RATIO`` (e.g. ``@0.5`` or ``@50%``) gives the shape that ``lpt prune
--layout uniform --gqa kv-groups --ratio RATIO`` followed by ``lpt slice`` would produce.
An adapter spec ``random:R`` puts a LoRA adapter of rank R with random, non-zero A and B on all seven projections.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lpt.errors import LptError

# Hugging Face config fields of well-known models (public architecture hyper-parameters, no weights).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, head_dim=128, vocab_size=32000,
                     max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False),
    "llama-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=40, head_dim=128, vocab_size=32000,
                      max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                       tie_word_embeddings=False),
    "tinyllama-1.1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, head_dim=64, vocab_size=32000,
                           max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                           tie_word_embeddings=False),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True),
}
RANDOM_ADAPTER = "random:"


@dataclass(frozen=True)
class ShapeSpec:
    spec: str  # as the user wrote it
    name: str  # shape name, or the JSON file / "inline JSON"
    fields: dict[str, Any]
    ratio: float | None = None


def _parse_ratio(text: str) -> float | None:
    text = text.strip()
    try:
        r = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None
    return r


def parse_shape(spec: str) -> ShapeSpec:
    """``SHAPE[@RATIO]`` -> config fields and the uniform pruning ratio (None: dense)."""
    spec = (spec or "").strip()
    if not spec:
        raise LptError("--random-init: empty shape (use a name such as llama-7b, a JSON file, or inline JSON)")
    base, ratio = spec, None
    m = re.fullmatch(r"(.+)@([^@{}]*)", spec, flags=re.DOTALL)
    if m:
        base, ratio = m.group(1).strip(), _parse_ratio(m.group(2))
        if ratio is None:
            raise LptError(f"--random-init {spec}: cannot read the pruning ratio '{m.group(2)}' "
                           f"(use e.g. @0.5 or @50%)")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise LptError(f"--random-init {spec}: the pruning ratio must be in [0, 1)")
    if base in SHAPES:
        return ShapeSpec(spec, base, dict(SHAPES[base]), ratio)
    if base.startswith("{"):
        try:
            fields = json.loads(base)
        except json.JSONDecodeError as e:
            raise LptError(f"--random-init: inline JSON is not valid ({e.msg} at column {e.colno})") from None
        name = "inline JSON"
    elif base.endswith(".json") or Path(base).is_file():
        from lpt.artifacts import read_json

        fields = read_json(base)
        name = base
    else:
        raise LptError(f"--random-init: unknown shape '{base}' (built in: {', '.join(sorted(SHAPES))}; or give a "
                       f"JSON config file or inline JSON)")
    if not isinstance(fields, dict):
        raise LptError(f"--random-init {base}: the JSON must be an object of config fields")
    fields = dict(fields)
    fields.setdefault("model_type", "llama")
    return ShapeSpec(spec, name, fields, ratio)


def make_config(shape: ShapeSpec):
    """A transformers config for the shape (pruned to ``shape.ratio`` when given)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in shape.fields.items() if k not in ("architectures", "transformers_version", "dtype",
                                                                   "torch_dtype", "quantization_config")}
    model_type = fields.pop("model_type")
    try:
        cfg = AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError, KeyError) as e:
        raise LptError(f"--random-init {shape.spec}: cannot build a '{model_type}' config ({e})") from None
    if shape.ratio:
        cfg = pruned_config(cfg, shape.ratio)
    cfg.use_cache = False
    return cfg


def pruned_config(cfg, ratio: float, gqa: str = "kv-groups"):
    """The config of a model uniformly pruned to ``ratio`` of its block parameters and sliced."""
    from lpt import groups
    from lpt.arch import describe

    a = describe(cfg)
    n_units, n_chan = groups.uniform_counts(a, ratio, gqa)
    if gqa == "kv-groups":
        kv = a.num_kv_heads - n_units
        heads = kv * a.group_size
    else:
        kv = a.num_kv_heads
        heads = kv * (a.group_size - n_units)
    cfg.num_attention_heads = heads
    cfg.num_key_value_heads = kv
    cfg.intermediate_size = a.intermediate_size - n_chan
    cfg.head_dim = a.head_dim
    return cfg


def init_random_(model, seed: int = 0, std: float | None = None) -> None:
    """Fill every parameter in place: matrices ~ N(0, std), norm weights 1, other vectors (biases) 0."""
    import torch

    std = std if std is not None else float(getattr(model.config, "initializer_range", 0.02) or 0.02)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():  # int8 codes: filled by build_random_model(int8=True)
                continue
            gen = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            if p.dim() >= 2:
                p.normal_(0.0, std, generator=gen)
            elif "norm" in name.lower():
                p.fill_(1.0)
            else:
                p.zero_()


def build_random_model(cfg, dtype, device, seed: int = 0, int8: bool = False):
    """Allocate ``AutoModelForCausalLM.from_config(cfg)`` directly on ``device`` in ``dtype`` (no full init pass on
    CPU first), fill it with random weights, and rebuild the rotary-embedding buffers. Frozen, eval mode.

    ``int8``: the block projections are ``lpt.int8.Int8Linear`` layers (``--8bit --int8-backend torch``), each
    quantized from its random ``dtype`` weights (the same ones the 16-bit model gets) one matrix at a time, so the
    16-bit weights of the whole model never exist."""
    import torch
    from transformers import AutoModelForCausalLM

    from lpt.arch import PROJECTIONS, describe, get_module, set_module
    from lpt.int8 import Int8Linear

    from lpt import fused

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    fused.split(model)  # as lpt.models loads a model: fused projections (Phi-3) split into lpt's
    quantized = []
    if int8:
        arch = describe(cfg)
        for p in (arch.module_path(i, q) for i in range(arch.num_layers) for q in PROJECTIONS):
            lin = get_module(model, p)
            set_module(model, p, Int8Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                            device="meta", dense_dtype=dtype))
            quantized.append(p)
    model.to_empty(device=device)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    init_random_(model, seed)
    std = float(getattr(model.config, "initializer_range", 0.02) or 0.02)
    for p in quantized:  # the weight init_random_ would draw for p.weight, quantized
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(f"{p}.weight".encode()))
        layer = get_module(model, p)
        w = torch.empty(layer.out_features, layer.in_features, dtype=dtype, device=device).normal_(0.0, std,
                                                                                                   generator=gen)
        layer.set_weight(w)
        del w
    for name, mod in list(model.named_modules()):
        bufs = [b for b in mod._non_persistent_buffers_set if getattr(mod, b, None) is not None]
        if not bufs:
            continue
        if not type(mod).__name__.endswith("RotaryEmbedding"):
            raise LptError(f"--random-init: cannot rebuild the buffers {bufs} of {name} ({type(mod).__name__})")
        with torch.device(device):
            new = type(mod)(config=mod.config)
        if name:
            set_module(model, name, new)
        assert get_module(model, name) is new
    model.eval()
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def random_adapter_rank(spec: str | None) -> int | None:
    """``random:R`` -> R; None for anything else (an adapter directory)."""
    if not spec or not spec.startswith(RANDOM_ADAPTER):
        return None
    try:
        r = int(spec[len(RANDOM_ADAPTER):])
    except ValueError:
        r = 0
    if r <= 0:
        raise LptError(f"--adapter {spec}: the rank must be a positive integer (e.g. random:8)")
    return r


def add_random_adapter(model, arch, rank: int, seed: int = 0):
    """Wrap all seven projections of every block with LoRA of rank ``rank`` (alpha = 2·rank), A and B random."""
    import torch

    from lpt import lora
    from lpt.arch import PROJECTIONS

    layers = lora.inject(model, arch, r=rank, alpha=2.0 * rank, targets=PROJECTIONS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            if layer.r:
                layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.02)
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.02)
    model.requires_grad_(False)
    return layers
