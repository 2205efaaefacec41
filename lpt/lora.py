"""A LoRA layer that wraps a frozen base linear (full precision or int8: bitsandbytes LLM.int8 or lpt's weight-only
``lpt.int8.Int8Linear``) and carries group masks.

Forward (Eq. 13 of the paper): ``z = ((x ⊙ m_in) W0ᵀ + s · (x ⊙ m_in) Aᵀ Bᵀ) ⊙ m_out``.
Fan-out projections (q, k, v, gate, up) use ``m_out``; fan-in projections (o, down) use ``m_in`` so a pruned
head or channel contributes nothing even when its query rows alone are masked (grouped-query attention).
Merging is explicit (``merge_lora``), never a side effect of ``.eval()``.

Adapters are saved in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``) so
``peft.PeftModel.from_pretrained`` loads them onto the unpruned base model.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from lpt import artifacts, fused, int8
from lpt.arch import PROJECTIONS, Arch, get_module, set_module
from lpt.config import INT8_THRESHOLD
from lpt.errors import LptError, MismatchError

PEFT_PREFIX = "base_model.model."


class LoraLinear(nn.Module):
    """``base_layer`` plus LoRA ``A`` ``[r, in]`` and ``B`` ``[out, r]``, scaling ``alpha / r``, and group masks."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 lora_dtype: torch.dtype = torch.float32):
        super().__init__()
        if r < 0:
            raise LptError(f"--lora-r must be positive (got {r})")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r  # r == 0: a mask carrier only (a projection that is not a LoRA target)
        self.lora_alpha = alpha
        self.scaling = alpha / r if r else 0.0
        dev = base_layer.weight.device
        self.lora_A = self.lora_B = None
        if r:
            self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=lora_dtype)
            self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=lora_dtype)
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("out_mask", torch.ones(self.out_features, device=dev), persistent=False)
        self.register_buffer("in_mask", torch.ones(self.in_features, device=dev), persistent=False)
        self._mask_out = False
        self._mask_in = False
        self.bypass = False

    # ------------------------------------------------------------------ masks
    def set_masks(self, out_mask: torch.Tensor | None = None, in_mask: torch.Tensor | None = None) -> None:
        if out_mask is not None:
            self.out_mask.copy_(out_mask.to(self.out_mask))
            self._mask_out = bool((self.out_mask == 0).any())
        if in_mask is not None:
            self.in_mask.copy_(in_mask.to(self.in_mask))
            self._mask_in = bool((self.in_mask == 0).any())

    # ------------------------------------------------------------------ math
    def delta(self) -> torch.Tensor:
        """``s · B A`` as ``[out, in]`` float32."""
        if not self.r:
            return torch.zeros(self.out_features, self.in_features, device=self.base_layer.weight.device)
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:  # the frozen base alone: no LoRA, no masks (the dense teacher)
            return self.base_layer(x)
        if self._mask_in:
            x = x * self.in_mask.to(x.dtype)
        y = self.base_layer(x)
        if self.r:
            a = self.lora_A.weight
            y = y + (self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype)))) * self.scaling).to(y.dtype)
        if self._mask_out:
            y = y * self.out_mask.to(y.dtype)
        return y

    def merged_linear(self, dtype: torch.dtype | None = None, apply_masks: bool = True) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``W0 + s·B·A`` (masked rows/columns zeroed when ``apply_masks``)."""
        w = int8.dense_weight(self.base_layer) + self.delta().to(self.base_layer.weight.device)
        bias = self.base_layer.bias.detach().float() if self.base_layer.bias is not None else None
        if apply_masks:
            w = w * self.out_mask.float().unsqueeze(1) * self.in_mask.float().unsqueeze(0)
            if bias is not None:
                bias = bias * self.out_mask.float()
        if not torch.isfinite(w).all() or (bias is not None and not torch.isfinite(bias).all()):
            raise LptError("merging produced non-finite weights (NaN/Inf); the adapter is broken")
        if dtype is None:
            dtype = (getattr(self.base_layer, "dense_dtype", torch.float16) if int8.is_int8(self.base_layer)
                     else self.base_layer.weight.dtype)
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            out.weight.copy_(w.to(dtype))
            if bias is not None:
                out.bias.copy_(bias.to(dtype))
        out.requires_grad_(False)
        return out


# ---------------------------------------------------------------------------------------------- model level
def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Module path (as in the unwrapped model) -> LoRA layer, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_param_count(model: nn.Module) -> int:
    """Parameters of LoRA's A and B factors in ``model`` (0 without LoRA)."""
    return sum(p.numel() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n)


def target_paths(arch: Arch, targets: Iterable[str], layers: Iterable[int] | None = None) -> list[str]:
    targets = list(targets)
    bad = [t for t in targets if t not in PROJECTIONS]
    if bad:
        raise LptError(f"unknown LoRA target module(s) {', '.join(bad)} (choose from {', '.join(PROJECTIONS)})")
    layers = range(arch.num_layers) if layers is None else layers
    return [arch.module_path(i, t) for i in layers for t in PROJECTIONS if t in targets]


def inject(model: nn.Module, arch: Arch, *, r: int, alpha: float, dropout: float = 0.0,
           targets: Iterable[str] = PROJECTIONS, load_8bit: bool = False,
           int8_threshold: float = INT8_THRESHOLD, int8_backend: str = "auto") -> dict[str, LoraLinear]:
    """Wrap all seven projections of every block in a ``LoraLinear`` (rank ``r`` for ``targets``, rank 0 — a mask
    carrier only — for the others); optionally freeze the bases in int8 first (``int8_backend``: ``auto`` picks by
    each layer's device, see ``lpt.int8.resolve_backend``; LLM.int8 outlier threshold ``int8_threshold``). Only
    LoRA A and B train.
    """
    targets = set(targets)
    target_paths(arch, targets)  # validates the names
    targets = fused.expand_targets(arch.family, targets)  # a fused layer (Phi-3's qkv_proj) is one LoRA target
    out = {}
    for p in target_paths(arch, PROJECTIONS):
        base = get_module(model, p)
        if isinstance(base, LoraLinear):
            raise LptError(f"{p} already carries a LoRA layer")
        if load_8bit and isinstance(base, nn.Linear) and not int8.is_int8(base):
            base = int8.quantize_8bit(base, int8_threshold, int8.resolve_backend(int8_backend, base.weight.device))
        layer = LoraLinear(base, r if p.rsplit(".", 1)[1] in targets else 0, alpha, dropout)
        set_module(model, p, layer)
        out[p] = layer
    model.requires_grad_(False)
    for layer in out.values():
        if layer.r:
            layer.lora_A.weight.requires_grad_(True)
            layer.lora_B.weight.requires_grad_(True)
    return out


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its frozen base inside the block: every LoRA layer skips LoRA and masks (no weight copy)."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.bypass = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.bypass = False


def merge_lora(model: nn.Module, dtype: torch.dtype | None = None, apply_masks: bool = True) -> nn.Module:
    """Replace every ``LoraLinear`` by its merged ``nn.Linear`` (in place; returns the model). With ``apply_masks``
    the masked rows and columns are zeroed, and so are the embedding's masked hidden channels (the residual mask of
    ``lpt.gates`` is baked into the weights): the plain model computes what the masked one did."""
    from lpt import gates

    for path, layer in list(lora_layers(model).items()):
        set_module(model, path, layer.merged_linear(dtype=dtype, apply_masks=apply_masks))
    gates.uninstall(model, bake=apply_masks)
    return model


def dequantize_bases(model: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """Replace int8 base layers (wrapped or not) by dense ``nn.Linear`` layers of ``dtype``."""
    for name, mod in list(model.named_modules()):
        if int8.is_int8(mod):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                            device=mod.weight.device, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(int8.dense_weight(mod).to(dtype))
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias.detach().to(dtype))
            lin.requires_grad_(False)
            set_module(model, name, lin)
    return model


# ---------------------------------------------------------------------------------------------- PEFT format
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = {}
    for path, layer in lora_layers(model).items():
        if not layer.r:
            continue
        sd[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous().cpu()
        sd[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous().cpu()
    return sd


def adapter_config(model: nn.Module, base_model: str, targets: Iterable[str] | None = None) -> dict[str, Any]:
    """PEFT ``LoraConfig`` fields for the LoRA layers in ``model``."""
    LoraConfig = int8.import_without_bitsandbytes("peft").LoraConfig
    named = {p: m for p, m in lora_layers(model).items() if m.r}
    if not named:
        raise LptError("model has no LoRA layers")
    first = next(iter(named.values()))
    if targets is None:
        targets = sorted({p.rsplit(".", 1)[1] for p in named})
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    cfg = LoraConfig(r=first.r, lora_alpha=first.lora_alpha, lora_dropout=dropout, target_modules=sorted(targets),
                     bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model, inference_mode=True)
    d = cfg.to_dict()
    d["target_modules"] = sorted(targets)
    for k, v in list(d.items()):
        if isinstance(v, set):
            d[k] = sorted(v)
    return d


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_adapter_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse LoRA factors with NaN / Inf values: one line naming ``where`` and the first bad tensor."""
    bad = nonfinite(tensors)
    if bad:
        raise LptError(f"{where}: non-finite values (NaN/Inf) in {len(bad)} LoRA tensor(s), first "
                       f"{bad[0][len(PEFT_PREFIX):] if bad[0].startswith(PEFT_PREFIX) else bad[0]} (training "
                       f"diverged?); nothing was written")


def save_adapter(model: nn.Module, directory: str | Path, base_model: str, metadata: dict[str, str] | None = None
                 ) -> None:
    """Write ``model``'s LoRA layers as a PEFT adapter directory; non-finite factors are refused before any byte."""
    directory = Path(directory)
    sd = adapter_state_dict(model)
    check_adapter_finite(sd, "the trained adapter")
    sd, cfg = fused.adapter_to_file(sd, adapter_config(model, base_model))  # fused layers in PEFT's layout
    directory.mkdir(parents=True, exist_ok=True)
    artifacts.write_json(directory / artifacts.ADAPTER_CONFIG, cfg)
    artifacts.save_tensors(sd, directory / artifacts.ADAPTER_WEIGHTS, {"format": "pt", **(metadata or {})})


def write_adapter(directory: str | Path, adapter_cfg: dict[str, Any], state_dict: dict[str, torch.Tensor],
                  base_model: str, metadata: dict[str, str] | None = None) -> None:
    """A PEFT adapter directory from a config and LoRA factors (e.g. ``slicing.slice_adapter``'s, for the sliced
    model): the same LoRA settings, ``base_model_name_or_path`` set to ``base_model``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_dict, doc = fused.adapter_to_file(state_dict, adapter_cfg)  # fused layers in PEFT's layout
    doc["base_model_name_or_path"] = base_model
    artifacts.write_json(directory / artifacts.ADAPTER_CONFIG, doc)
    artifacts.save_tensors(state_dict, directory / artifacts.ADAPTER_WEIGHTS, {"format": "pt", **(metadata or {})})


def read_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config.json, tensors)`` of a PEFT LoRA adapter directory; refuses non-finite factors or scale."""
    directory = Path(directory)
    cfg_path, w_path = directory / artifacts.ADAPTER_CONFIG, directory / artifacts.ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise LptError(f"{directory} is not an adapter directory (missing {artifacts.ADAPTER_CONFIG} or "
                       f"{artifacts.ADAPTER_WEIGHTS})")
    cfg = artifacts.read_object(cfg_path, "PEFT adapter config")
    artifacts.check_types(cfg, cfg_path, {"r": int, "lora_alpha": float, "target_modules": (list, str),
                                          "peft_type": str, "base_model_name_or_path": (str, type(None))})
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LptError(f"{directory}: only LoRA adapters are supported (peft_type={cfg.get('peft_type')})")
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise LptError(f"{cfg_path}: '{key}' is {v!r}, not a finite number")
    sd = artifacts.load_tensors(w_path)
    check_adapter_finite(sd, f"adapter {directory}")
    return cfg, sd


def load_adapter(model: nn.Module, directory: str | Path, arch: Arch, load_8bit: bool = False,
                 int8_threshold: float = INT8_THRESHOLD, int8_backend: str = "auto") -> dict[str, LoraLinear]:
    """Wrap ``model`` with the LoRA layers of a PEFT adapter directory and load their weights (a fused layer's LoRA
    split into its parts', as the model is: ``lpt.fused``)."""
    cfg, sd = read_adapter(directory)
    sd = fused.adapter_from_file(sd, arch, f"adapter {directory}")
    paths = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in sd if k.startswith(PEFT_PREFIX)})
    if not paths:
        raise LptError(f"{directory}: adapter holds no LoRA weights")
    targets = sorted({p.rsplit(".", 1)[1] for p in paths})
    layers = inject(model, arch, r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=0.0, targets=targets,
                    load_8bit=load_8bit, int8_threshold=int8_threshold, int8_backend=int8_backend)
    missing = [p for p, m in layers.items() if m.r and p not in paths]
    extra = [p for p in paths if p not in layers]
    if extra:
        raise MismatchError(f"adapter {directory} has LoRA weights for {extra[0]}, which this model does not have")
    with torch.no_grad():
        for p, layer in layers.items():
            if p in missing or not layer.r:  # not in the adapter: no LoRA (rank 0) or B = 0
                continue
            a, b = sd[f"{PEFT_PREFIX}{p}.lora_A.weight"], sd[f"{PEFT_PREFIX}{p}.lora_B.weight"]
            if tuple(a.shape) != tuple(layer.lora_A.weight.shape) or tuple(b.shape) != tuple(layer.lora_B.weight.shape):
                raise MismatchError(
                    f"adapter {directory}: {p} has A {tuple(a.shape)} / B {tuple(b.shape)} but the model needs "
                    f"A {tuple(layer.lora_A.weight.shape)} / B {tuple(layer.lora_B.weight.shape)} "
                    f"(was it made for another model, or for the sliced one?)"
                )
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
    return layers
