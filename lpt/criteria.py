"""Importance criteria: pure functions of tensors (no model, no optimiser).

Element-wise scores have the shape of the weight ``[out, in]``; ``reduce`` turns them into the per-row (fan-out
projections) or per-column (fan-in projections) sums that ``groups.group_scores`` adds up per group (Eq. 4).
"""

from __future__ import annotations

import torch

SCORES = ("square", "abs")


def _score(x: torch.Tensor, score: str) -> torch.Tensor:
    if score == "square":
        return x.square()
    if score == "abs":
        return x.abs()
    raise ValueError(f"unknown score '{score}' (use {', '.join(SCORES)})")


def lora_weight_grad(A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor) -> torch.Tensor:
    """Estimate of the full weight's gradient from LoRA alone: ``G = gB·A + B·gA − gB·gA`` (Eq. 10, lr = 1).

    Shapes: ``A [r, in]``, ``B [out, r]``, ``gA`` like ``A``, ``gB`` like ``B``; returns ``[out, in]``.
    Computed as one matmul with inner size ``2r``: ``[gB, B − gB] · [A; gA]``.
    """
    A, B, gA, gB = (t.float() for t in (A, B, gA, gB))
    return torch.cat([gB, B - gB], dim=1) @ torch.cat([A, gA], dim=0)


def lora_importance(W0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor,
                    scaling: float, score: str = "square") -> torch.Tensor:
    """LoRA-guided importance ``I = (G ⊙ (W0 + s·B·A))²`` (or ``|·|`` with ``score='abs'``), element-wise.

    Two full-size temporaries (G and the merged weight), everything else in place: this runs every step.
    """
    G = lora_weight_grad(A, B, gA, gB)
    W = torch.addmm(W0.float(), B.float(), A.float(), alpha=scaling)
    G.mul_(W)
    del W
    return G.square_() if score == "square" else _abs_(G, score)


def _abs_(x: torch.Tensor, score: str) -> torch.Tensor:
    if score != "abs":
        raise ValueError(f"unknown score '{score}' (use {', '.join(SCORES)})")
    return x.abs_()


def chunk_rows(out_f: int, in_f: int, device: torch.device | str = "cpu", budget_bytes: int | None = None) -> int:
    """Rows of an ``[out_f, in_f]`` weight that ``lora_group_sums`` processes at once.

    Each chunk allocates two float32 temporaries of ``rows × in_f`` (the merged weight and ``G``). The budget for
    them is cache-sized on CPU (2 MiB: 2**18 elements each, where memory bandwidth, not kernel launches, limits the
    criterion) and 256 MiB on CUDA (the whole matrix for most projections up to 70B, so one launch per operation);
    ``budget_bytes`` overrides it. Always at least one row, at most ``out_f``.
    """
    if budget_bytes is None:
        budget_bytes = (256 << 20) if torch.device(device).type == "cuda" else (2 << 20)
    return max(1, min(int(out_f), int(budget_bytes) // (8 * max(1, int(in_f)))))


def lora_group_sums(W0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor,
                    scaling: float, score: str = "square", fan_in: bool = False,
                    row_scale: torch.Tensor | None = None, chunk_elems: int | None = None) -> torch.Tensor:
    """``reduce(lora_importance(...), fan_in)`` without ever forming a full-size matrix.

    Rows are processed in chunks sized for ``W0``'s device (:func:`chunk_rows`: cache-sized on CPU, up to the whole
    matrix on CUDA), or of about ``chunk_elems`` elements when given, so the per-step cost is one read of ``W0`` plus
    two thin matmuls. ``W0`` may be int8 codes with a per-row ``row_scale`` (bitsandbytes' CB and SCB / 127): each
    chunk is de-quantized on the fly. The chunking changes only the order of float sums, not the result.
    """
    if score not in SCORES:
        raise ValueError(f"unknown score '{score}' (use {', '.join(SCORES)})")
    A, B, gA, gB = (t.float() for t in (A, B, gA, gB))
    left = torch.cat([gB, B - gB], dim=1)  # [out, 2r]
    right = torch.cat([A, gA], dim=0)  # [2r, in]
    out_f, in_f = W0.shape
    rows = chunk_rows(out_f, in_f, W0.device) if chunk_elems is None else max(1, chunk_elems // max(1, in_f))
    acc = torch.zeros(in_f if fan_in else out_f, device=W0.device, dtype=torch.float32)
    for i in range(0, out_f, rows):
        w = W0[i:i + rows].float()
        if row_scale is not None:
            w.mul_(row_scale[i:i + rows].float().unsqueeze(1))
        w = torch.addmm(w, B[i:i + rows], A, alpha=scaling)  # W0 + s·B·A for these rows
        g = left[i:i + rows] @ right  # G for these rows
        g.mul_(w)
        g = g.square_() if score == "square" else g.abs_()
        if fan_in:
            acc += g.sum(0)
        else:
            acc[i:i + rows] = g.sum(1)
    return acc


def vanilla_importance(W: torch.Tensor, gW: torch.Tensor, score: str = "square") -> torch.Tensor:
    """First-order Taylor importance ``I = (∂L/∂W ⊙ W)²`` (Eq. 3), needing the full weight's gradient."""
    return _score(gW.float() * W.float(), score)


def magnitude_importance(W: torch.Tensor, score: str = "square") -> torch.Tensor:
    """Weight magnitude: summed over a group, ``square`` gives the squared L2 norm of the group's weights."""
    return _score(W.float(), score)


def random_scores(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator)


def fisher_group_grads(grad: torch.Tensor, width: int) -> torch.Tensor:
    """Per-sequence mask gradients ``d(g, n)`` of groups that are ``width`` consecutive input dimensions.

    ``grad`` is ``[batch, in]``: for every sequence, ``Σ_tokens x · ∂L/∂x`` per input dimension (the gradient of a
    mask of ones on the input); returns ``[batch, in / width]`` (one column per head of size ``width``).
    """
    n, d = grad.shape
    return grad.reshape(n, d // width, width).sum(-1)


def fisher_scores(d: torch.Tensor) -> torch.Tensor:
    """Empirical Fisher of group masks ``I(g) = Σ_n d(g, n)²`` from per-sequence mask gradients ``d`` ``[batch, groups]``.

    Squared per sequence, then summed: squaring the gradient summed over all tokens of all sequences (the plain
    first-order Taylor term) lets positive and negative contributions cancel and ranks groups far worse.
    """
    return d.float().square().sum(0)


def reduce(I: torch.Tensor, fan_in: bool) -> torch.Tensor:
    """Row sums ``[out]`` for fan-out projections, column sums ``[in]`` for fan-in projections."""
    return I.sum(0) if fan_in else I.sum(1)
