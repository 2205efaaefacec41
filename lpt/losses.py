"""Training losses: the language-model loss and self-distillation against the unpruned base (beyond the paper).

Pure functions of logits and labels; the teacher's logits come from the same model run with LoRA and masks switched
off (``lora.disabled``), so distillation holds no second copy of the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lpt.data import IGNORE_INDEX as IGNORE


def _predicting_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rows of ``logits.reshape(-1, vocab)`` whose position predicts a label (the next token's label is not
    ``IGNORE``): the positions the LM loss counts, without copying the logits."""
    nxt = torch.full_like(labels, IGNORE)
    nxt[:, :-1] = labels[:, 1:]
    return (nxt.reshape(-1) != IGNORE).nonzero().squeeze(1).to(logits.device)


class _ChunkedKL(torch.autograd.Function):
    """``Σ_rows KL(softmax(t/T) ‖ softmax(s/T))`` over ``rows`` of ``[n, vocab]`` logits, ``chunk`` rows at a time.

    Saves only the two logits tensors (which exist anyway) and computes the gradient ``(softmax(s/T) −
    softmax(t/T)) / T`` chunk by chunk in the backward pass, so no vocabulary-sized intermediate of the whole batch
    (shifted copies, log-probabilities, the elementwise KL) is ever held."""

    @staticmethod
    def _chunks(rows: torch.Tensor, chunk: int, T: float, *logits: torch.Tensor):
        """``(r, x[r].float() / T for x in logits)`` for every ``chunk`` rows ``r`` of ``rows``."""
        for i in range(0, rows.numel(), chunk):
            r = rows[i:i + chunk]
            yield r, *(x.index_select(0, r).float() / T for x in logits)

    @staticmethod
    def forward(ctx, s, t, rows, temperature: float, chunk: int):
        total = torch.zeros((), dtype=torch.float32, device=s.device)
        for _, sr, tr in _ChunkedKL._chunks(rows, chunk, temperature, s, t):
            ls, lt = F.log_softmax(sr, -1), F.log_softmax(tr, -1)
            total += (lt.exp() * (lt - ls)).sum()
        ctx.save_for_backward(s, t, rows)
        ctx.temperature, ctx.chunk = temperature, chunk
        return total

    @staticmethod
    def backward(ctx, grad):
        s, t, rows = ctx.saved_tensors
        out = torch.zeros_like(s)
        for r, sr, tr in _ChunkedKL._chunks(rows, ctx.chunk, ctx.temperature, s, t):
            d = F.softmax(sr, -1) - F.softmax(tr, -1)
            out.index_copy_(0, r, (d * (grad / ctx.temperature)).to(s.dtype))
        return out, None, None, None, None


def kl_distill(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
               chunk: int = 256) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` per predicted token, averaged over the tokens that carry
    a label (the positions the LM loss counts). Computed in float32, ``chunk`` tokens at a time (``_ChunkedKL``):
    beyond the two logits tensors it holds one chunk's vocabulary-sized temporaries and the student's gradient."""
    rows = _predicting_rows(student, labels)
    if rows.numel() == 0:
        return student.sum() * 0.0
    vocab = student.shape[-1]
    kl = _ChunkedKL.apply(student.reshape(-1, vocab), teacher.detach().reshape(-1, vocab), rows,
                          float(temperature), int(chunk))
    return kl * temperature**2 / rows.numel()


def mixed(lm: torch.Tensor, kl: torch.Tensor, weight: float) -> torch.Tensor:
    """``(1 − w)·LM + w·KL``."""
    return (1.0 - weight) * lm + weight * kl
