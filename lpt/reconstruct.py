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

from lpt.arch import Arch

FAN_IN = ("o_proj", "down_proj")


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
    from lpt.arch import get_module

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
