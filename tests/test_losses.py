"""The loss head that never holds the logits of a batch (``losses.head_loss``) against the plain formulas: value and
gradient, with and without distillation, soft-capping and scaling, every family; and a tiny prune through it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import build_model, tiny_config
from lpt import losses
from lpt.arch import describe, supported_model_types
from lpt.config import PruneConfig
from lpt.pruner import Pruner

TOL = dict(rtol=1e-5, atol=1e-6)


def _labels(b, t, vocab, g):
    labels = torch.randint(0, vocab, (b, t), generator=g)
    labels[0, :4] = -100  # a prompt that carries no loss
    labels[1, -2:] = -100  # padding
    return labels


def _plain(hidden, head, labels, teacher=None, temperature=1.0, weight=0.0):
    """transformers' causal LM loss on the logits, mixed with ``kl_distill`` as before."""
    b, t, d = hidden.shape
    logits = head.logits(hidden.reshape(-1, d)).reshape(b, t, -1)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    if teacher is None:
        return ce
    tl = head.logits(teacher.reshape(-1, d)).reshape(b, t, -1)
    return losses.mixed(ce, losses.kl_distill(logits, tl, labels, temperature), weight)


@pytest.mark.parametrize("scale, softcap", [(1.0, None), (0.5, None), (1.0, 3.0)])
@pytest.mark.parametrize("distill", [None, (1.0, 0.5), (2.0, 1.0)])
def test_head_loss_equals_the_plain_formula(scale, softcap, distill):
    g = torch.Generator().manual_seed(0)
    b, t, d, v = 2, 9, 8, 37
    head = losses.Head(torch.randn(v, d, generator=g), None, scale, softcap)
    h = torch.randn(b, t, d, generator=g, requires_grad=True)
    teacher = torch.randn(b, t, d, generator=g) if distill else None
    labels = _labels(b, t, v, g)
    temperature, weight = distill or (1.0, 0.0)
    got = losses.head_loss(h, head, labels, teacher, temperature, weight, chunk=4)  # chunks smaller than the rows
    want = _plain(h, head, labels, teacher, temperature, weight)
    (g1,) = torch.autograd.grad(got, h)
    (g2,) = torch.autograd.grad(want, h)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_head_loss_with_no_labelled_token_is_zero_with_a_gradient():
    head = losses.Head(torch.randn(11, 4))
    h = torch.randn(1, 3, 4, requires_grad=True)
    loss = losses.head_loss(h, head, torch.full((1, 3), -100))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(h.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("model_type", supported_model_types())
def test_head_of_every_family_gives_the_models_own_loss(model_type):
    """``head_of`` + ``last_hidden`` + ``head_loss`` == ``model(..., labels=...).loss`` (Gemma 2's soft-capping,
    Granite's logit scaling, tied and untied heads)."""
    from test_families import EXTRA, build, family_config

    extra = dict(EXTRA.get(model_type, {}))
    if model_type in ("gemma2", "gemma3_text"):
        extra["final_logit_softcapping"] = 5.0
    model = build(family_config(model_type, **extra))
    head = losses.head_of(model)
    assert head is not None
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        want = model(**batch).loss
        got = losses.head_loss(losses.last_hidden(model, batch), head, labels, chunk=5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _pruner(head: bool, **kw):
    cfg = tiny_config()
    model = build_model(cfg)
    pc = PruneConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0, balance="proportional", lr=1e-2, ratio=0.5,
                     criterion="fisher", prune_freq=2, warmup=0.0, cooldown=0.25, seed=0, loss_head=head, **kw)
    torch.manual_seed(0)
    p = Pruner(model, describe(cfg), pc, total_steps=8)
    assert (p.head is not None) == head  # --no-loss-head: the model's own logits (as for unknown families)
    return p, cfg


def _batches(cfg, n=8):
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        ids = torch.randint(0, cfg.vocab_size, (4, 16), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


@pytest.mark.parametrize("distill", [False, True])
def test_pruner_loss_and_gradients_equal_the_logits_path(distill):
    (a, cfg), (b, _) = _pruner(True, distill=distill), _pruner(False, distill=distill)
    for layer in list(a.layers.values()) + list(b.layers.values()):  # B != 0, so the student is not the teacher
        if layer.r:
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05, generator=torch.Generator().manual_seed(2))
    batch = _batches(cfg, 1)[0]
    la, lb = a.forward_backward(batch), b.forward_backward(batch)
    assert la == pytest.approx(lb, rel=1e-5)
    for pa, pb in zip(a.params, b.params):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("distill", [False, True])
def test_a_tiny_prune_is_unchanged_by_the_loss_head(distill):
    """The masks and the adapter of a tiny prune through the loss head equal those through the model's logits."""
    (a, cfg), (b, _) = _pruner(True, distill=distill), _pruner(False, distill=distill)
    for batch in _batches(cfg):
        ra, rb = a.train_step(batch), b.train_step(batch)
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4)
    assert a.masks().to_json()["layers"] == b.masks().to_json()["layers"] and a.sparsity > 0.3
    for pa, pb in zip(a.params, b.params):
        torch.testing.assert_close(pa, pb, rtol=1e-3, atol=1e-5)
