"""Fused projections (Phi-3's ``qkv_proj`` and ``gate_up_proj``) as lpt's separate ones while lpt works on a model,
and fused again in what it writes.

Some families compute several of lpt's projections with one linear layer: Phi-3 / Phi-4-mini's ``self_attn.qkv_proj``
(output rows: query, key, value) and ``mlp.gate_up_proj`` (rows: gate, up; the MLP takes ``gate, up =
chunk(2)``). lpt keeps one picture of a block -- seven projections, each a linear with its own LoRA and mask -- so
the loader (``lpt.models``) calls :func:`split`: every such layer becomes a :class:`Split` container whose children
are ordinary linears named like lpt's projections (``qkv_proj.q_proj``, ``qkv_proj.k_proj``, ``qkv_proj.v_proj``;
``gate_up_proj.gate_proj``, ``gate_up_proj.up_proj``), holding those rows, and whose forward concatenates their
outputs. The model computes what it did, and the family (``lpt.arch.Family``: ``fused``, and q / k / v / gate / up
naming the children) sends LoRA injection, masks, the estimators' hooks, slicing, reconstruction and merging to the
children unchanged. Before a model directory is written (``model_dir.write_model_dir``), :func:`fuse` concatenates the
children (sliced or not) back into one linear with the standard name; with the sliced config the directory loads in
plain transformers.

Adapters are written in PEFT's layout for the unsplit model (:func:`adapter_to_file`), so ``peft`` loads them onto
the stock transformers model: the LoRA of each part (rank r) becomes one LoRA of the fused layer with rank ``n·r``
(``A`` the parts' ``A`` stacked, ``B`` block-diagonal: part ``j``'s ``B`` in its rows and columns ``j·r`` to
``(j+1)·r``), ``rank_pattern`` / ``alpha_pattern`` giving the fused layer rank ``n·r`` and alpha ``n·alpha`` so its
scaling ``alpha / r`` is the parts'. That is exact, and exactly invertible (:func:`adapter_from_file`) for the
block-diagonal adapters lpt writes; an adapter of the fused layer trained elsewhere (not block-diagonal) is refused.
LoRA on a fused layer covers all its parts (:func:`expand_targets`), as in PEFT, where the fused layer is one target.

What is fused, and where, is data on the family; nothing here names a family.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from lpt.arch import FAMILIES, Arch, Family, Fused, get_module, set_module
from lpt.errors import LptError, MismatchError


class Split(nn.Module):
    """A fused linear layer as one child module per projection; forward concatenates their outputs (last dim)."""

    def __init__(self, parts: Mapping[str, nn.Module]):
        super().__init__()
        self.names = tuple(parts)
        for name, mod in parts.items():
            self.add_module(name, mod)

    @property
    def in_features(self) -> int:
        return getattr(self, self.names[0]).in_features

    @property
    def out_features(self) -> int:
        return sum(getattr(self, n).out_features for n in self.names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, n)(x) for n in self.names], dim=-1)


def family_for(model_type: str | None) -> Family | None:
    """The family of ``model_type`` when it has fused layers (None for any other model, supported or not)."""
    for fam in FAMILIES.values():
        if model_type in fam.model_types and fam.fused:
            return fam
    return None


def _containers(family: Family, layer: int) -> list[tuple[str, Fused]]:
    return [(f"{family.layers}.{layer}.{getattr(family, f.parent)}.{f.name}", f) for f in family.fused]


def part_rows(arch: Arch, layer: int, proj: str) -> int:
    """Output rows of projection ``proj`` (a fan-out one) in block ``layer``."""
    if proj == "q_proj":
        return arch.heads(layer) * arch.head_dim
    if proj in ("k_proj", "v_proj"):
        return arch.kv_heads(layer) * arch.head_dim
    if proj in ("gate_proj", "up_proj"):
        return arch.intermediate(layer)
    raise LptError(f"{proj} cannot be part of a fused layer (its rows are not the layer's outputs)")


def _piece(lin: nn.Linear, start: int, stop: int) -> nn.Linear:
    out = nn.Linear(lin.in_features, stop - start, bias=lin.bias is not None, device=lin.weight.device,
                    dtype=lin.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(lin.weight[start:stop])
        if lin.bias is not None:
            out.bias.copy_(lin.bias[start:stop])
    out.requires_grad_(lin.weight.requires_grad)
    return out


def split(model: nn.Module) -> nn.Module:
    """Replace every fused linear of ``model`` (its family's ``Family.fused``) by a :class:`Split` of plain linears
    holding the same rows, in place; a model of any other family is returned as it is. The row counts come from the
    model's config (``lpt.arch.describe``) and must add up to the fused layer's."""
    from lpt.arch import describe

    family = family_for(getattr(getattr(model, "config", None), "model_type", None))
    if family is None:
        return model
    arch = describe(model.config)
    for i in range(arch.num_layers):
        for path, f in _containers(family, i):
            lin = get_module(model, path)
            if isinstance(lin, Split):
                continue
            if not isinstance(lin, nn.Linear):
                raise LptError(f"{path} is a {type(lin).__name__}, not a linear layer lpt can split into "
                               f"{', '.join(f.parts)}")
            if lin.weight.device.type == "meta" and not _all_meta(model):
                raise LptError(f"{path} is offloaded (--device-map put it on disk or the CPU's meta device): lpt "
                               f"cannot split {family.name}'s fused projections there; use a device map that keeps "
                               f"every layer on a device")
            rows = [part_rows(arch, i, p) for p in f.parts]
            if sum(rows) != lin.out_features:
                raise MismatchError(f"{path} has {lin.out_features} output rows but the config gives "
                                    f"{' + '.join(map(str, rows))} for {', '.join(f.parts)}")
            starts = [sum(rows[:j]) for j in range(len(rows))]
            set_module(model, path, Split({p: _piece(lin, a, a + n) for p, a, n in zip(f.parts, starts, rows)}))
    return model


def _all_meta(model: nn.Module) -> bool:
    return all(p.device.type == "meta" for p in model.parameters())


def fuse(model: nn.Module) -> nn.Module:
    """Concatenate the children of every :class:`Split` of ``model`` back into one linear layer (the standard name
    and layout of the family), in place. The children must be plain linears (LoRA merged, int8 de-quantized)."""
    for path, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, Split)]:
        parts = [getattr(mod, n) for n in mod.names]
        bad = [n for n, p in zip(mod.names, parts) if type(p) is not nn.Linear]
        if bad:
            raise LptError(f"{path}.{bad[0]} is a {type(getattr(mod, bad[0])).__name__}: merge LoRA and de-quantize "
                           f"before fusing {path}")
        w = torch.cat([p.weight.detach() for p in parts], dim=0)
        bias = [p.bias for p in parts]
        out = nn.Linear(w.shape[1], w.shape[0], bias=bias[0] is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if bias[0] is not None:
                out.bias.copy_(torch.cat([b.detach() for b in bias]))
        out.requires_grad_(False)
        set_module(model, path, out)
    return model


def expand_targets(family: Family, targets: set[str]) -> set[str]:
    """LoRA targets with every part of a fused layer when one part is a target (a fused layer is one LoRA in
    PEFT's layout of the model)."""
    out = set(targets)
    for f in family.fused:
        if out & set(f.parts):
            out |= set(f.parts)
    return out


# ------------------------------------------------------------------------------------------------ adapters
def _specs() -> list[Fused]:
    return [f for fam in FAMILIES.values() for f in fam.fused]


def adapter_to_file(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """LoRA factors and ``adapter_config.json`` of a split model -> PEFT's layout for the unsplit model: the parts of
    each fused layer become one LoRA of rank ``n·r`` (stacked ``A``, block-diagonal ``B``), with ``rank_pattern`` /
    ``alpha_pattern`` entries for the fused layer. Anything else is returned as it is."""
    sd, cfg = dict(state_dict), dict(config)
    groups: dict[str, tuple[Fused, dict[str, str]]] = {}  # fused layer's key prefix -> (spec, part -> key prefix)
    for key in sd:
        for f in _specs():
            for p in f.parts:
                marker = f".{f.name}.{p}.lora_"
                if marker in key:
                    at = key.index(marker)
                    groups.setdefault(key[:at + 1] + f.name, (f, {}))[1][p] = key[:at + len(marker) - len("lora_")]
    if not groups:
        return sd, cfg
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    for prefix, (f, found) in groups.items():
        missing = [p for p in f.parts if p not in found]
        if missing:
            raise LptError(f"{prefix} has LoRA on {', '.join(found)} but not on {', '.join(missing)}: PEFT's layout "
                           f"needs one LoRA for the whole fused layer")
        a = [sd.pop(f"{found[p]}lora_A.weight") for p in f.parts]
        b = [sd.pop(f"{found[p]}lora_B.weight") for p in f.parts]
        if any(t.shape[0] != r for t in a):
            raise LptError(f"{prefix}: a part's LoRA rank is not the adapter's r={r}")
        sd[f"{prefix}.lora_A.weight"] = torch.cat(a, dim=0).contiguous()
        sd[f"{prefix}.lora_B.weight"] = torch.block_diag(*b).contiguous()
    fused = {f.name: f for f, _ in groups.values()}
    parts = {p for f in fused.values() for p in f.parts}
    cfg["target_modules"] = sorted((set(cfg.get("target_modules") or []) - parts) | set(fused))
    cfg["rank_pattern"] = {**(cfg.get("rank_pattern") or {}), **{n: len(f.parts) * r for n, f in fused.items()}}
    cfg["alpha_pattern"] = {**(cfg.get("alpha_pattern") or {}), **{n: len(f.parts) * alpha for n, f in fused.items()}}
    return sd, cfg


def adapter_from_file(state_dict: Mapping[str, torch.Tensor], arch: Arch, where: str = "adapter"
                      ) -> dict[str, torch.Tensor]:
    """The inverse of :func:`adapter_to_file` for the model ``arch`` describes (split in memory): each fused layer's
    LoRA (rank ``n·r``, block-diagonal ``B``) becomes one rank-``r`` LoRA per part. Factors of other layers are
    returned as they are; a fused layer's LoRA that is not block-diagonal (trained on the fused layer elsewhere) is
    refused."""
    from lpt.lora import PEFT_PREFIX

    family = arch.family
    sd = dict(state_dict)
    if not family.fused:
        return sd
    for i in range(arch.num_layers):
        for path, f in _containers(family, i):
            ka, kb = f"{PEFT_PREFIX}{path}.lora_A.weight", f"{PEFT_PREFIX}{path}.lora_B.weight"
            if ka not in sd and kb not in sd:
                continue
            if ka not in sd or kb not in sd:
                raise MismatchError(f"{where}: {path} has only one of its LoRA factors")
            a, b = sd.pop(ka), sd.pop(kb)
            n = len(f.parts)
            rows = [part_rows(arch, i, p) for p in f.parts]
            if a.shape[0] % n or b.shape != (sum(rows), a.shape[0]):
                raise MismatchError(f"{where}: {path} has A {tuple(a.shape)} / B {tuple(b.shape)}, not a LoRA of "
                                    f"{' + '.join(map(str, rows))} rows made of {n} equal-rank parts (was it made "
                                    f"for another model, or for the sliced one?)")
            r = a.shape[0] // n
            starts = [sum(rows[:j]) for j in range(n)]
            pieces = [b[s:s + m, j * r:(j + 1) * r] for j, (s, m) in enumerate(zip(starts, rows))]
            off = b.clone()
            for j, (s, m) in enumerate(zip(starts, rows)):
                off[s:s + m, j * r:(j + 1) * r] = 0
            if off.abs().max() > 0:
                raise LptError(f"{where}: the LoRA of {path} is not block-diagonal over {', '.join(f.parts)} (not "
                               f"written by lpt); lpt reads adapters of fused layers in the layout it writes")
            for j, p in enumerate(f.parts):
                sd[f"{PEFT_PREFIX}{path}.{p}.lora_A.weight"] = a[j * r:(j + 1) * r].contiguous()
                sd[f"{PEFT_PREFIX}{path}.{p}.lora_B.weight"] = pieces[j].contiguous()
    return sd
