"""Slicing: physically remove the pruned heads and channels, whole blocks and hidden channels of a model (and of its
LoRA adapter).

Everything here works in memory on tensors and modules; the ``lpt slice`` stage only loads, calls and writes.

Which dimension is cut (torch layout ``[out, in]``):
- fan-out projections (q, k, v, gate, up): output rows (and bias entries); LoRA ``B`` rows;
- fan-in projections (o, down): input columns; LoRA ``A`` columns.
Query heads are kept in ``masks.json`` order (sorted), so the j-th kept query head of a key/value group still reads
that group's key/value head after slicing: a valid grouped-query attention model.

Hidden channels (``masks.hidden``) go from the residual stream everywhere: input columns of q/k/v/gate/up (LoRA ``A``
columns), output rows of o/down (and their biases; LoRA ``B`` rows), the embedding's columns (the output layer's when
untied) and every norm over the hidden size. An RMS norm of the sliced model averages over the ``k`` kept channels
where the masked one averaged over all ``d`` (zeros included), so its scale is multiplied by ``sqrt(d / k)``: the same
output up to the norm's epsilon (it acts as if it were ``eps · k / d``). Families that multiply embeddings by
``sqrt(hidden_size)`` (Gemma) get embeddings scaled by ``sqrt(d / k)`` to keep that product, and, when the output
layer is tied to them, a final norm scaled back by ``sqrt(k / d)``: exact.

Removed blocks (``masks.removed``) are deleted and the rest renumbered (``num_hidden_layers``, every per-layer list
of the config such as ``layer_types``, Qwen's ``max_window_layers``, the attention modules' ``layer_idx``).

The sliced config:
- every layer keeps the same widths (``Masks.is_uniform()``): ``num_attention_heads``, ``num_key_value_heads``,
  ``intermediate_size`` (and ``num_hidden_layers``, ``hidden_size``) are rewritten and ``head_dim`` is written
  explicitly — a standard config any runtime reads;
- per-layer widths: the lists ``lpt_layer_num_attention_heads``, ``lpt_layer_num_key_value_heads``,
  ``lpt_layer_intermediate_size`` hold the actual widths (``lpt.arch.describe`` reads them) and the scalar fields
  keep the unsliced (parent) values; ``lpt.modeling`` builds such a model.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from lpt.arch import (FAN_IN, FAN_OUT, LAYER_FIELDS, MLP_IN, MLP_OUT, PROJECTIONS, Arch, describe, get_module,
                      set_module)
from lpt.errors import LptError, MismatchError
from lpt.masks import Masks


# ------------------------------------------------------------------------------------------------ indices
def kept_indices(masks: Masks, layer: int, device=None) -> dict[str, torch.Tensor]:
    """Per projection, the kept output rows (fan-out) or input columns (fan-in) as sorted int64 indices."""
    return {p: torch.nonzero(v, as_tuple=True)[0].to(device) for p, v in masks.row_masks(layer).items()}


def layer_widths(masks: Masks) -> tuple[list[int], list[int], list[int]]:
    """(query heads, key/value heads, MLP channels) kept per kept layer."""
    kept = [masks.layers[i] for i in masks.kept_layers()]
    return [len(m.heads) for m in kept], [len(m.kv_heads) for m in kept], [len(m.channels) for m in kept]


def check_sliceable(arch: Arch) -> None:
    if arch.per_layer:
        raise LptError("this model was already sliced with per-layer widths; slice the original (unsliced) model "
                       "with the masks instead")


# ------------------------------------------------------------------------------------------------ tensors
def slice_weight(w: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.index_select(w, dim, index.to(w.device)).contiguous()


def slice_linear(layer: nn.Module, index: torch.Tensor, dim: int) -> nn.Module:
    """A new linear layer keeping rows (``dim=0``, bias too) or columns (``dim=1``) ``index`` of ``layer``.

    bitsandbytes int8 layers are de-quantized, sliced and quantized again; lpt's weight-only int8 layers
    (``--int8-backend torch``) keep their codes and row scales as they are (``Int8Linear.sliced``).
    """
    from lpt.config import INT8_THRESHOLD
    from lpt.int8 import Int8Linear, dense_weight, is_int8, quantize_8bit

    if isinstance(layer, Int8Linear):
        return layer.sliced(index, dim)
    int8 = is_int8(layer)
    w = dense_weight(layer, torch.float32) if int8 else layer.weight.detach()
    w = slice_weight(w, index, dim)
    bias = layer.bias.detach() if layer.bias is not None else None
    if bias is not None and dim == 0:
        bias = slice_weight(bias, index, 0)
    out = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device,
                    dtype=torch.float16 if int8 else w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if bias is not None:
            out.bias.copy_(bias)
    out.requires_grad_(False)
    if not int8:
        return out
    threshold = getattr(getattr(layer, "state", None), "threshold", INT8_THRESHOLD)
    return quantize_8bit(out, threshold)  # the same LLM.int8 outlier threshold as the layer it replaces


def _slice_param(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Cut a LoRA factor (a bias-free ``nn.Linear``) in place, keeping its ``requires_grad``."""
    grad = linear.weight.requires_grad
    w = slice_weight(linear.weight.detach(), index, dim)
    linear.weight = nn.Parameter(w, requires_grad=grad)
    linear.out_features, linear.in_features = w.shape


def slice_lora(layer, index: torch.Tensor, dim: int):
    """Cut a ``LoraLinear`` in place: base rows / columns, ``B`` rows (fan-out) or ``A`` columns (fan-in), masks."""
    layer.base_layer = slice_linear(layer.base_layer, index, dim)
    if dim == 0:
        if layer.r:
            _slice_param(layer.lora_B, index, 0)
        layer.out_mask = slice_weight(layer.out_mask, index, 0)
        layer.out_features = layer.base_layer.out_features
        layer.set_masks(out_mask=layer.out_mask)
    else:
        if layer.r:
            _slice_param(layer.lora_A, index, 1)
        layer.in_mask = slice_weight(layer.in_mask, index, 0)
        layer.in_features = layer.base_layer.in_features
        layer.set_masks(in_mask=layer.in_mask)
    return layer


# ------------------------------------------------------------------------------------------------ config
def sliced_config_values(masks: Masks) -> dict[str, Any]:
    """Config fields of the sliced model (``None`` values mean: remove the field)."""
    a = masks.arch
    heads, kv, inter = layer_widths(masks)
    values: dict[str, Any] = {"head_dim": a.head_dim, "num_hidden_layers": len(heads),
                              "hidden_size": masks.hidden_size()}
    if masks.is_uniform():
        values.update(num_attention_heads=heads[0], num_key_value_heads=kv[0], intermediate_size=inter[0])
        values.update({f: None for f in LAYER_FIELDS})
    else:
        values.update(num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads,
                      intermediate_size=a.intermediate_size)
        values.update(dict(zip(LAYER_FIELDS, (heads, kv, inter))))
    return values


def apply_config_values(config: Any, values: Mapping[str, Any]) -> None:
    for k, v in values.items():
        if v is None:
            if hasattr(config, k):
                delattr(config, k)
        else:
            setattr(config, k, v)


# ------------------------------------------------------------------------------------------------ model
def slice_model(model: nn.Module, masks: Masks, arch: Arch | None = None) -> nn.Module:
    """Remove the pruned heads and channels, hidden channels and whole blocks from ``model`` in place (and return it).

    Works on a plain model and on one carrying ``LoraLinear`` layers (base weights, LoRA ``B`` rows of fan-out and
    ``A`` columns of fan-in layers, and the mask buffers are cut). The model config is rewritten, so
    ``save_pretrained`` writes the smaller architecture. ``masks`` must describe this model (``Masks.load(path,
    arch)`` checks that).
    """
    from lpt import gates
    from lpt.lora import LoraLinear

    arch = arch or describe(model.config)
    check_sliceable(arch)
    if arch.to_dict() != masks.arch.to_dict():
        want, got = arch.to_dict(), masks.arch.to_dict()
        key = next(k for k in want if want[k] != got[k])
        raise MismatchError(f"masks were made for {key}={got[key]} but the model has {key}={want[key]}")
    masks.validate()
    gates.uninstall(model)  # the residual mask's hook: the sliced model has no masked channels
    removed = set(masks.removed)
    for i, m in enumerate(masks.layers):
        if i in removed:
            continue
        idx = kept_indices(masks, i)
        for proj in PROJECTIONS:
            path = arch.module_path(i, proj)
            mod = get_module(model, path)
            dim = 0 if proj in FAN_OUT else 1
            if isinstance(mod, LoraLinear):
                slice_lora(mod, idx[proj], dim)
            else:
                set_module(model, path, slice_linear(mod, idx[proj], dim))
        attn = get_module(model, f"{arch.family.layers}.{i}.{arch.family.attn}")
        if arch.family.qk_norm == "full":
            slice_qk_norms(attn, arch, idx)
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = len(m.heads) // len(m.kv_heads)
        for name, value in (("num_heads", len(m.heads)), ("num_key_value_heads", len(m.kv_heads))):
            if hasattr(attn, name):
                setattr(attn, name, value)
        mlp = get_module(model, f"{arch.family.layers}.{i}.{arch.family.mlp}")
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(m.channels)
    if masks.hidden is not None:
        slice_hidden(model, arch, torch.tensor(masks.hidden, dtype=torch.long), skip=removed)
    if removed:
        remove_blocks(model, arch, sorted(removed))
    apply_config_values(model.config, sliced_config_values(masks))
    return model


# ------------------------------------------------------------------------------------------------ hidden size
def slice_hidden(model: nn.Module, arch: Arch, index: torch.Tensor, skip: set[int] | frozenset = frozenset()) -> None:
    """Keep hidden channels ``index`` everywhere (see the module docstring); blocks in ``skip`` (about to be
    deleted) are left alone."""
    from lpt.arch import hidden_norms
    from lpt.lora import LoraLinear

    d, k = arch.hidden_size, index.numel()
    scale = (d / k) ** 0.5
    fam = arch.family
    norms = hidden_norms(model, arch)
    final = norms[-1]
    for i in range(arch.num_layers):
        if i in skip:
            continue
        for proj in PROJECTIONS:
            path = arch.module_path(i, proj)
            mod = get_module(model, path)
            dim = 1 if proj in FAN_OUT else 0  # fan-out layers read the residual, fan-in layers write it
            if isinstance(mod, LoraLinear):
                slice_lora(mod, index, dim)
            else:
                set_module(model, path, slice_linear(mod, index, dim))
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    emb_scale = scale if fam.embed_scale else 1.0
    for path in norms:
        if any(path.startswith(f"{fam.layers}.{i}.") for i in skip):
            continue
        extra = 1.0 / emb_scale if (path == final and tied) else 1.0  # a tied output layer reads the scaled embedding
        slice_norm(get_module(model, path), index, scale=scale * extra, offset=fam.norm_offset)
    with torch.no_grad():
        w = emb.weight.detach()
        emb.weight = nn.Parameter((slice_weight(w.float(), index, 1) * emb_scale).to(w.dtype),
                                  requires_grad=emb.weight.requires_grad)
    emb.embedding_dim = k
    if fam.embed_scale and hasattr(emb, "embed_scale"):  # Gemma: sqrt(hidden_size), fixed when the module was built
        emb.scalar_embed_scale = k ** 0.5
        emb.embed_scale.fill_(k ** 0.5)
    if tied:
        head.weight = emb.weight
    elif head is not None:
        set_module(model, _path_of(model, head), slice_linear(head, index, 1))
    model.config.hidden_size = k


def _path_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def remove_blocks(model: nn.Module, arch: Arch, removed: list[int]) -> None:
    """Delete decoder blocks ``removed`` and renumber the rest (modules' ``layer_idx`` and the config's per-layer
    lists, so that a KV cache and per-layer attention types line up)."""
    layers = get_module(model, arch.family.layers)
    n = len(layers)
    keep = [i for i in range(n) if i not in set(removed)]
    new = nn.ModuleList([layers[i] for i in keep])
    for j, layer in enumerate(new):
        for mod in layer.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = j
    set_module(model, arch.family.layers, new)
    cfg = model.config
    for key, value in list(vars(cfg).items()):  # layer_types and other per-layer lists
        if "layer" in key and isinstance(value, (list, tuple)) and len(value) == n:
            setattr(cfg, key, type(value)(value[i] for i in keep))
    if isinstance(getattr(cfg, "max_window_layers", None), int):  # Qwen: the first N layers attend without a window
        cfg.max_window_layers = sum(1 for i in keep if i < cfg.max_window_layers)
    cfg.num_hidden_layers = len(keep)


def slice_norm(norm: nn.Module, index: torch.Tensor, scale: float | None = None, offset: float = 0.0) -> None:
    """Keep entries ``index`` of an RMS norm, rescaled so that the sliced model computes what the masked one did.

    The masked model normalises ``n`` entries of which only ``k`` are non-zero (mean of squares ``S / n``); the sliced
    one normalises the ``k`` kept entries (``S / k``). Scaling the kept weights by ``sqrt(n / k)`` (the default
    ``scale``) gives the same output up to the norm's epsilon (the sliced norm acts as if its epsilon were
    ``eps * k / n``). ``offset``: the norm scales by ``offset + weight`` (Gemma's ``1 + w``), and that sum is what is
    rescaled.
    """
    w = norm.weight.detach()
    n, k = w.shape[0], index.numel()
    scale = (n / k) ** 0.5 if scale is None else scale
    kept = (slice_weight(w.float(), index, 0) + offset) * scale - offset
    norm.weight = nn.Parameter(kept.to(w.dtype), requires_grad=norm.weight.requires_grad)
    for attr in ("hidden_size", "normalized_shape", "dim"):
        if isinstance(getattr(norm, attr, None), int):
            setattr(norm, attr, k)


def slice_qk_norms(attn: nn.Module, arch: Arch, idx: Mapping[str, torch.Tensor]) -> None:
    """Slice the full-width query / key norms of one attention module (``Family.qk_norm == "full"``) with the rows of
    q_proj / k_proj."""
    fam = arch.family
    for norm_name, proj in ((fam.q_norm, "q_proj"), (fam.k_norm, "k_proj")):
        norm = getattr(attn, norm_name, None)
        if norm is None:
            raise LptError(f"{fam.name}: the attention module has no {norm_name} (the family description is wrong)")
        if norm.weight.shape[0] != idx[proj].numel():
            slice_norm(norm, idx[proj])


def linear_block_params(model: nn.Module, arch: Arch) -> int:
    """Parameters of the seven projections of every block, counted on the modules (LoRA factors excluded)."""
    from lpt.lora import LoraLinear

    total = 0
    for i in range(arch.num_layers):
        for proj in PROJECTIONS:
            mod = get_module(model, arch.module_path(i, proj))
            base = mod.base_layer if isinstance(mod, LoraLinear) else mod
            total += base.in_features * base.out_features + (base.bias.numel() if base.bias is not None else 0)
    return total


# ------------------------------------------------------------------------------------------------ adapter
def slice_adapter(state_dict: Mapping[str, torch.Tensor], masks: Masks) -> dict[str, torch.Tensor]:
    """Cut a PEFT LoRA state dict (``base_model.model.<path>.lora_A.weight`` keys) to the sliced model.

    ``B`` loses the pruned rows of fan-out layers, ``A`` the pruned columns of fan-in layers; with hidden channels
    removed, ``A`` of fan-out layers loses their columns and ``B`` of fan-in layers their rows. Removed blocks' factors
    are dropped and the others renamed to their block's new index. Keys of modules that are not block projections
    are refused.
    """
    from lpt.fused import adapter_from_file
    from lpt.lora import PEFT_PREFIX

    arch = masks.arch
    state_dict = adapter_from_file(state_dict, arch)  # a fused layer's LoRA as its parts' (lpt.fused)
    where: dict[str, tuple[int, str]] = {arch.module_path(i, p): (i, p) for i in range(arch.num_layers)
                                          for p in PROJECTIONS}
    new_index = {old: new for new, old in enumerate(masks.kept_layers())}
    hidden = None if masks.hidden is None else torch.tensor(masks.hidden, dtype=torch.long)
    cache: dict[int, dict[str, torch.Tensor]] = {}
    out = {}
    for key, t in state_dict.items():
        path, _, factor = key[len(PEFT_PREFIX):].rpartition(".lora_") if key.startswith(PEFT_PREFIX) else ("", "", "")
        if path not in where or factor not in ("A.weight", "B.weight"):
            raise MismatchError(f"adapter tensor {key} is not a LoRA factor of a block projection of this model")
        i, proj = where[path]
        idx = cache.setdefault(i, kept_indices(masks, i))[proj]
        full = arch.intermediate_size if proj in MLP_OUT + MLP_IN else (
            arch.num_heads * arch.head_dim if proj in ("q_proj", "o_proj") else arch.num_kv_heads * arch.head_dim)
        if proj in FAN_OUT and factor == "B.weight":
            if t.shape[0] != full:
                raise MismatchError(f"adapter {path} has B with {t.shape[0]} rows but the model has {full}")
            t = slice_weight(t, idx, 0)
        elif proj in FAN_IN and factor == "A.weight":
            if t.shape[1] != full:
                raise MismatchError(f"adapter {path} has A with {t.shape[1]} columns but the model has {full}")
            t = slice_weight(t, idx, 1)
        elif hidden is not None:  # the factor on the residual side: A of fan-out, B of fan-in
            t = slice_weight(t, hidden, 1 if factor == "A.weight" else 0)
        if i not in new_index:
            continue
        out[PEFT_PREFIX + arch.module_path(new_index[i], proj) + ".lora_" + factor] = t.contiguous()
    return out
