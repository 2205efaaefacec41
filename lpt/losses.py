"""Training losses: the language-model loss and self-distillation against the unpruned base (beyond the paper).

Pure functions of tensors. The teacher comes from the same model run with LoRA and masks switched off
(``lora.disabled``), so distillation holds no second copy of the weights.

Two ways to the same numbers:
- :func:`head_loss` (what ``lpt prune`` trains with): from the last hidden states, through the frozen output layer
  (``Head``) a chunk of tokens at a time, for the student and, with distillation, the teacher; the gradient is
  written for the hidden states only, so no logits tensor of the whole batch (batch x tokens x vocabulary) is ever
  held, forward or backward;
- :func:`kl_distill` over logits the model already computed (kept for callers that have them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lpt.data import IGNORE_INDEX as IGNORE

HEAD_CHUNK_BYTES = 16 << 20  # float32 logits of one chunk: 16 MiB (about 85 tokens at a 49k vocabulary)


def _next_labels(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` shifted left by one (the target of every position), ``IGNORE`` at the end, flattened."""
    nxt = torch.full_like(labels, IGNORE)
    nxt[:, :-1] = labels[:, 1:]
    return nxt.reshape(-1)


def _predicting_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rows of ``x.reshape(-1, d)`` (``x`` ``[batch, tokens, d]``) whose position predicts a label (the next token's
    label is not ``IGNORE``): the positions the LM loss counts, without copying ``x``."""
    return (_next_labels(labels) != IGNORE).nonzero().squeeze(1).to(logits.device)


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


# ------------------------------------------------------------------------------------------------ the output layer
@dataclass(frozen=True)
class Head:
    """A causal LM's frozen output layer as its forward computes it: ``z = (h Wᵀ + b) · scale``, then
    ``cap · tanh(z / cap)`` when ``softcap`` is set (Gemma 2's final logit soft-capping). ``W`` is ``[vocab, hidden]``
    in the model's dtype; ``z`` is upcast to float32, as transformers' loss does."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits of hidden states ``h`` ``[n, hidden]`` (the model's own arithmetic, then upcast)."""
        z = F.linear(h.to(self.weight.dtype), self.weight, self.bias).float()
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def backward(self, z: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
        """The gradient of the hidden states from that of the logits ``dz`` (``z`` the logits it was taken at)."""
        if self.softcap:
            dz = dz * (1.0 - (z / self.softcap).square())
        if self.scale != 1.0:
            dz = dz * self.scale
        return dz.to(self.weight.dtype) @ self.weight

    def chunk_rows(self) -> int:
        return max(1, HEAD_CHUNK_BYTES // (4 * self.weight.shape[0]))


class _HeadLoss(torch.autograd.Function):
    """``(1 − w)·CE + w·T²·KL`` from hidden states, a chunk of rows at a time; see :func:`head_loss`."""

    @staticmethod
    def _terms(head: Head, hs, ht, target, T: float, w: float, n: int, grad: bool):
        """Loss contribution of one chunk (a float32 scalar) and, with ``grad``, the gradient of its logits."""
        zs = head.logits(hs)
        ce = torch.logsumexp(zs, -1) - zs.gather(1, target.unsqueeze(1)).squeeze(1)
        loss = (1.0 - w) * ce.sum() / n if w < 1.0 else zs.new_zeros(())
        dz = None
        if grad and w < 1.0:
            dz = F.softmax(zs, -1)
            dz[torch.arange(dz.shape[0], device=dz.device), target] -= 1.0
            dz *= (1.0 - w) / n
        if ht is not None and w > 0.0:
            ls, lt = F.log_softmax(zs / T, -1), F.log_softmax(head.logits(ht) / T, -1)
            loss = loss + w * T * T * (lt.exp() * (lt - ls)).sum() / n
            if grad:
                dk = (ls.exp() - lt.exp()) * (w * T / n)  # T² · (softmax(s/T) − softmax(t/T)) / T
                dz = dk if dz is None else dz + dk
        return loss, zs, dz

    @staticmethod
    def forward(ctx, h, ht, rows, target, head: Head, temperature: float, weight: float, chunk: int):
        # When the hidden states need a gradient it is formed here, chunk by chunk, from the same logits as the loss
        # (the gradient of a scalar loss is fixed up to the incoming scale): the backward pass only scales it, so no
        # logits, student or teacher, are computed twice and nothing vocabulary-sized outlives its chunk.
        n = max(1, rows.numel())
        need = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.zeros_like(h) if need else None
        for i in range(0, rows.numel(), chunk):
            r = rows[i:i + chunk]
            loss, zs, dz = _HeadLoss._terms(head, h.index_select(0, r), None if ht is None else ht.index_select(0, r),
                                            target[i:i + chunk], temperature, weight, n, grad=need)
            total += loss
            if need:
                dh.index_copy_(0, r, head.backward(zs, dz).to(h.dtype))
        if need:
            ctx.save_for_backward(dh)
        return total

    @staticmethod
    def backward(ctx, grad):
        (dh,) = ctx.saved_tensors
        return dh * grad.to(dh.dtype), None, None, None, None, None, None, None


def head_loss(hidden: torch.Tensor, head: Head, labels: torch.Tensor, teacher_hidden: torch.Tensor | None = None,
              temperature: float = 1.0, weight: float = 0.0, chunk: int | None = None) -> torch.Tensor:
    """``(1 − w)·LM + w·T²·KL(teacher ‖ student)`` of a causal LM from its last hidden states ``[batch, tokens,
    hidden]``, without ever holding the logits of the whole batch.

    LM: the mean next-token cross-entropy over the positions whose next label is not ``IGNORE`` (what transformers'
    ``model(..., labels=labels).loss`` computes); KL: :func:`kl_distill`'s, over the same positions, against
    ``teacher_hidden`` (detached) through the same ``head``. ``weight`` 0 (the default) is the LM loss alone. The
    logits are formed ``chunk`` positions at a time (default: ``Head.chunk_rows``, ``HEAD_CHUNK_BYTES`` of float32
    logits), once: when ``hidden`` needs a gradient, the forward pass also forms it from the same chunk's logits (the
    head is frozen, so that is the only gradient), and the backward pass scales it.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1] (got {weight})")
    if weight > 0.0 and teacher_hidden is None:
        raise ValueError("a distillation weight needs teacher_hidden")
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d).to(head.weight.device)  # the head's device (a model spread with --device-map)
    target = _next_labels(labels.to(h.device))
    rows = (target != IGNORE).nonzero().squeeze(1)
    if rows.numel() == 0:
        return h.sum() * 0.0
    ht = teacher_hidden.detach().reshape(-1, d).to(h.device) if teacher_hidden is not None and weight > 0.0 else None
    return _HeadLoss.apply(h, ht, rows, target.index_select(0, rows), head, float(temperature), float(weight),
                           int(chunk or head.chunk_rows()))


# transformers families whose causal-LM head lpt knows: logits = lm_head(h) [· 1/logits_scaling] [soft-capped]
HEAD_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite", "olmo2",
                 "phi3")


def head_of(model) -> Head | None:
    """The output layer of ``model`` as a :class:`Head`, or None for a model whose forward lpt does not know
    (its callers then use the model's own logits)."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in HEAD_FAMILIES:
        return None
    lin = model.get_output_embeddings()
    if not isinstance(lin, torch.nn.Linear):
        return None
    scaling = getattr(cfg, "logits_scaling", None) if cfg.model_type == "granite" else None
    return Head(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(),
                1.0 / float(scaling) if scaling else 1.0, getattr(cfg, "final_logit_softcapping", None) or None)


def last_hidden(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``model``'s last hidden states (after its final norm) for ``batch``, from a forward pass of the whole model
    (so every hook on it runs) that computes the logits of the last position only (``logits_to_keep=1``)."""
    got = {}

    def grab(module, args, output):
        got["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = model.get_decoder().register_forward_hook(grab)
    try:
        model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    return got["h"]
