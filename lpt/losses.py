"""Training losses: the language-model loss and self-distillation against the unpruned base (beyond the paper).

Pure functions of logits and labels; the teacher's logits come from the same model run with LoRA and masks switched
off (``lora.disabled``), so distillation holds no second copy of the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of positions that predict a label, flattened to ``[n, vocab]``, and the matching valid-token mask."""
    logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    valid = labels[:, 1:].reshape(-1) != IGNORE
    return logits, valid


def kl_distill(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
               ) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` per predicted token, averaged over the tokens that carry
    a label (the positions the LM loss counts). Computed in float32."""
    s, valid = _shifted(student, labels)
    t, _ = _shifted(teacher, labels)
    if not bool(valid.any()):
        return student.sum() * 0.0
    s, t = s[valid].float() / temperature, t[valid].float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return kl * temperature**2


def mixed(lm: torch.Tensor, kl: torch.Tensor, weight: float) -> torch.Tensor:
    """``(1 − w)·LM + w·KL``."""
    return (1.0 - weight) * lm + weight * kl
