"""Closed-form reconstruction of the fan-in projections after pruning (beyond the paper; FLAP, SlimGPT, Kwon et al.).

When heads or channels go, the kept input columns of ``o_proj`` and ``down_proj`` can be refitted so the layer
reproduces its unpruned output on calibration activations: with ``X`` the layer's inputs (all columns) and ``W`` its
weight, the ridge least-squares fit of ``X W^T`` from the kept columns ``X_K`` is

    W_K = W · G[:, K] · (G[K, K] + λ·I)^{-1},     G = X^T X  (summed over calibration tokens),
    λ = damp · mean(diag G[K, K]).

Only the Gram matrix ``G`` of each layer's input is needed (``[in, in]``, one layer at a time). The correction is
full-rank, so it belongs in the weights ``lpt slice`` writes, not in LoRA. Pure functions here; ``collect_grams``
reads the inputs through hooks.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from lpt import int8, lora
from lpt.arch import ATTN_IN, ATTN_OUT, FAN_IN, MLP_IN, MLP_OUT, Arch, get_module, set_module

MODES = ("sequential", "independent")  # lpt slice --reconstruct-mode


def ridge_refit(W: torch.Tensor, G: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Kept columns ``[out, len(keep)]`` that best reproduce ``X W^T`` from ``X[:, keep]`` (float64 solve)."""
    W64, G64 = W.double(), G.double()
    gkk = G64[keep][:, keep]
    lam = damp * float(gkk.diagonal().mean()) if gkk.numel() else 0.0
    gkk = gkk + lam * torch.eye(len(keep), dtype=torch.float64, device=G.device)
    rhs = W64 @ G64[:, keep]  # [out, k]
    return torch.linalg.solve(gkk, rhs.T).T.to(W.dtype)  # gkk is symmetric: (rhs gkk^-1)^T = gkk^-1 rhs^T


def kept_columns(masks, arch: Arch, layer: int, proj: str) -> torch.Tensor:
    """Input columns of ``proj`` (o_proj: kept heads' dims; down_proj: kept channels) in layer ``layer``."""
    m = masks.layers[layer]
    if proj == "o_proj":
        hd = arch.head_dim
        return torch.tensor([h * hd + j for h in m.heads for j in range(hd)], dtype=torch.long)
    return torch.tensor(m.channels, dtype=torch.long)


@torch.no_grad()
def collect_grams(model, arch: Arch, batches: Iterable[Mapping[str, torch.Tensor]], layers: Iterable[int]
                  ) -> dict[tuple[int, str], torch.Tensor]:
    """``G = X^T X`` (accumulated in float64, on the CPU) of the inputs of every ``o_proj`` / ``down_proj`` in ``layers``, over
    ``batches`` run through ``model`` as it is (pass the unpruned model for dense inputs)."""
    grams: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i in layers:
        for proj in FAN_IN:
            def hook(mod, args, key=(i, proj)):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                g = (x.T @ x).double().cpu()  # one batch's sum in float32, the running sum in float64
                grams[key] = g if key not in grams else grams[key] + g

            handles.append(get_module(model, arch.module_path(i, proj)).register_forward_pre_hook(hook))
    dev = next(model.parameters()).device
    try:
        for b in batches:
            model(**{k: v.to(dev) for k, v in b.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
    return grams


@torch.no_grad()
def refit_weights(weights: Mapping[tuple[int, str], torch.Tensor], grams: Mapping[tuple[int, str], torch.Tensor],
                  masks, arch: Arch, damp: float = 0.01) -> dict[tuple[int, str], torch.Tensor]:
    """New full-width weights of every fan-in projection in ``weights``: kept columns refitted, pruned ones zero."""
    out = {}
    for key, W in weights.items():
        i, proj = key
        keep = kept_columns(masks, arch, i, proj)
        new = torch.zeros_like(W, dtype=torch.float32)
        new[:, keep] = ridge_refit(W.float().cpu(), grams[key], keep, damp).to(new.device)
        out[key] = new.to(W.dtype)
    return out


def refit(model, arch: Arch, batches: Iterable[Mapping[str, torch.Tensor]], masks, damp: float = 0.01,
          mode: str = "sequential", on_layer=None) -> dict[tuple[int, str], torch.Tensor]:
    """Refitted full-width o_proj / down_proj weights (pruned columns zero) on ``batches``; ``model`` carries the
    masks in LoRA layers (and the adapter, when it is merged afterwards): ``lpt slice --reconstruct``.

    ``sequential``: layer by layer on the pruned model's own inputs (:func:`sequential_refit`).
    ``independent``: every layer from the unpruned model's inputs in one pass; with LoRA layers the target is the
    base weight with LoRA's change on the kept columns (``W0 + s·B·A`` there; the pruned columns as the base had
    them, since LoRA never saw them). ``on_layer(i)`` is called as each layer is done (sequential)."""
    if mode == "sequential":
        return sequential_refit(model, arch, batches, masks, damp, on_layer=on_layer)
    layers = range(arch.num_layers)
    with lora.disabled(model):  # dense inputs: no LoRA, no masks
        grams = collect_grams(model, arch, batches, layers)
    weights = {}
    for i in layers:
        for proj in FAN_IN:
            mod = get_module(model, arch.module_path(i, proj))
            if isinstance(mod, lora.LoraLinear):  # LoRA's change on the kept columns; the pruned ones as trained on
                keep = kept_columns(masks, arch, i, proj).to(mod.base_layer.weight.device)
                w = int8.dense_weight(mod.base_layer).clone()  # never the base weight itself
                w[:, keep] += mod.delta().to(w.device)[:, keep]
            else:
                w = mod.weight.detach().float()
            weights[(i, proj)] = w
    return refit_weights(weights, grams, masks, arch, damp)


def set_weights(model, arch: Arch, weights: Mapping[tuple[int, str], torch.Tensor]) -> None:
    """Copy refitted weights (``{(layer, projection): weight}``) into ``model``'s plain linear layers."""
    with torch.no_grad():
        for (i, proj), w in weights.items():
            mod = get_module(model, arch.module_path(i, proj))
            mod.weight.copy_(w.to(mod.weight.dtype))


# ------------------------------------------------------------------------------------------------ layer by layer
class _Stop(Exception):
    """Raised by a hook to end a forward pass once the input it wanted has been read."""


def _layer_call(layer, h: torch.Tensor, call, capture=None, stop: bool = False):
    """``layer(h, *args, **kwargs)`` -> (output hidden states or None when stopped, input of module ``capture``)."""
    got = {}
    handle = None
    if capture is not None:
        def hook(mod, args):
            got["x"] = args[0]
            if stop:
                raise _Stop

        handle = capture.register_forward_pre_hook(hook)
    try:
        out = layer(h, *call[0], **call[1])
        out = out[0] if isinstance(out, tuple) else out
    except _Stop:
        out = None
    finally:
        if handle is not None:
            handle.remove()
    return out, got.get("x")


def _layer_inputs(model, decoder, batches, dev):
    """Hidden states entering the first decoder layer, per batch, and every layer's other call arguments (recorded
    once per batch shape: positional embeddings, attention masks, ...), read from forwards of the unpruned model."""
    hidden, calls, n = [], {}, len(decoder)
    for b in batches:
        b = {k: v.to(dev) for k, v in b.items() if k != "labels"}
        shape = tuple(b["input_ids"].shape)
        rec = None if shape in calls else []
        handles = []
        for i, layer in enumerate(decoder):
            def pre(mod, args, kwargs, i=i, rec=rec):
                if i == 0:
                    hidden.append((args[0] if args else kwargs["hidden_states"]).detach())
                if rec is not None:
                    rec.append((tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
                if rec is None or i == n - 1:
                    raise _Stop

            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        try:
            model(**b, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if rec is not None:
            calls[shape] = rec
    return hidden, calls


@torch.no_grad()
def sequential_refit(model, arch: Arch, batches: Iterable[Mapping[str, torch.Tensor]], masks, damp: float = 0.01,
                     on_layer=None) -> dict[tuple[int, str], torch.Tensor]:
    """Refit every ``o_proj`` / ``down_proj`` layer by layer on the pruned model's own inputs (the order of
    SparseGPT and SlimGPT): in layer ``i`` the kept columns ``W_K`` of a fan-in projection minimise

        || X W^T  -  X_K' W_K^T ||^2 + λ ||W_K||^2,    W_K = W · C · (G + λ·I)^{-1},
        C = X^T X_K',   G = X_K'^T X_K',   λ = damp · mean(diag G),

    where every input comes from the *pruned* model with every earlier refit in place (so each layer sees, and
    adapts to, the distribution the pruned model will feed it), ``X`` is the projection's input with this layer's
    heads (for ``o_proj``) or channels (for ``down_proj``) all switched back on, ``X_K'`` its kept columns with them
    masked, and ``W`` the layer's own weight (``W0 + s·B·A`` with an adapter; LoRA's change on the pruned columns
    left out, as LoRA never trained them). Inside a layer ``o_proj`` goes first: its refit changes what
    ``down_proj`` sees. With nothing pruned ``X_K' = X`` and the refit is ``W`` itself (up to the damping). For most
    families the kept columns of ``X`` and ``X_K'`` are the same numbers; they differ where a norm spans every head
    (OLMo 2's q/k norms).

    ``model`` carries the masks in ``lpt.lora.LoraLinear`` layers (``lpt.models.attach``). Returns the new full-width
    weights (pruned columns zero); ``model`` is left as it was. Memory: the hidden states of every calibration block
    and one projection's ``C`` and ``G``; time: about two forwards of each layer per block.
    """
    decoder = get_module(model, arch.family.layers)
    dev = next(model.parameters()).device
    with lora.disabled(model):
        hidden, calls = _layer_inputs(model, decoder, batches, dev)
    shapes = [tuple(h.shape[:2]) for h in hidden]
    out: dict[tuple[int, str], torch.Tensor] = {}
    scopes = {"o_proj": ATTN_OUT + ATTN_IN, "down_proj": MLP_OUT + MLP_IN}
    for i, layer in enumerate(decoder):
        originals = {p: get_module(model, arch.module_path(i, p)) for p in FAN_IN}
        try:
            for proj in FAN_IN:
                mod = originals[proj]
                scope = [get_module(model, arch.module_path(i, p)) for p in scopes[proj]]
                scope = [m for m in scope if isinstance(m, lora.LoraLinear)]
                keep = kept_columns(masks, arch, i, proj).to(dev)
                C = G = None
                # heads and channels do not see each other, so the kept columns of X are X_K' -- except where a
                # norm spans every head (OLMo 2's q/k norms): there the masked pass is run too
                coupled = proj == "o_proj" and arch.family.qk_norm == "full"
                for b, h in enumerate(hidden):
                    call = calls[shapes[b]][i]
                    with _unmasked(scope):
                        _, x = _layer_call(layer, h, call, mod, stop=True)
                    x = x.reshape(-1, x.shape[-1]).float()
                    if coupled:
                        _, xp = _layer_call(layer, h, call, mod, stop=True)
                        xk = xp.reshape(-1, xp.shape[-1]).float()[:, keep]
                    else:
                        xk = x[:, keep]
                    c, g = (x.T @ xk).double().cpu(), (xk.T @ xk).double().cpu()
                    C, G = (c, g) if C is None else (C + c, G + g)
                W = int8.dense_weight(mod.base_layer).float().clone()
                if mod.r:  # LoRA's change on the kept columns only
                    W[:, keep] += mod.delta().to(W.device).float()[:, keep]
                new = torch.zeros_like(W)
                new[:, keep] = _solve(W.cpu(), C, G, damp).to(new.device)
                out[(i, proj)] = new
                set_module(model, arch.module_path(i, proj), _linear(new, mod))
            for b, h in enumerate(hidden):
                hidden[b], _ = _layer_call(layer, h, calls[shapes[b]][i])
        finally:  # the model as it was
            for p, m in originals.items():
                set_module(model, arch.module_path(i, p), m)
        if on_layer is not None:
            on_layer(i)
    return out


class _unmasked:
    """Switch the masks of some LoRA layers off inside the block (LoRA stays on)."""

    def __init__(self, layers):
        self.layers = layers

    def __enter__(self):
        self.saved = [(m._mask_in, m._mask_out) for m in self.layers]
        for m in self.layers:
            m._mask_in = m._mask_out = False

    def __exit__(self, *exc):
        for m, (a, b) in zip(self.layers, self.saved):
            m._mask_in, m._mask_out = a, b


def _linear(weight: torch.Tensor, like) -> nn.Linear:
    """A plain layer with ``weight`` and the bias of LoRA layer ``like``'s base (in the base's float dtype)."""
    base = like.base_layer
    dtype = base.weight.dtype if base.weight.is_floating_point() else torch.float16
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=base.bias is not None, device=weight.device, dtype=dtype)
    lin.weight.copy_(weight.to(dtype))
    if base.bias is not None:
        lin.bias.copy_(base.bias.detach().to(dtype))
    lin.requires_grad_(False)
    return lin


def _solve(W: torch.Tensor, C: torch.Tensor, G: torch.Tensor, damp: float) -> torch.Tensor:
    """``W · C · (G + λ·I)^{-1}`` in float64, ``λ = damp · mean(diag G)``."""
    lam = damp * float(G.diagonal().mean()) if G.numel() else 0.0
    G = G + lam * torch.eye(G.shape[0], dtype=torch.float64)
    rhs = W.double() @ C  # [out, k]
    return torch.linalg.solve(G, rhs.T).T.float()
