"""Importance estimators against autograd on tiny random Llamas: fisher, vanilla, lora; no base-weight gradients."""

import pytest
import torch

from conftest import build_model, tiny_config
from lpt import importance, lora
from lpt.arch import PROJECTIONS, describe


def _batch(cfg, n=3, seq=12, seed=0):
    ids = torch.randint(0, cfg.vocab_size, (n, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _model(gqa=True, r=4, seed=0):
    cfg = tiny_config(gqa=gqa)
    model = build_model(cfg, seed=seed)
    arch = describe(cfg)
    layers = lora.inject(model, arch, r=r, alpha=2 * r)
    for layer in layers.values():  # non-zero B: every term matters
        if layer.r:
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    return model, arch, cfg


@pytest.mark.parametrize("gqa_mode", ["kv-groups", "query-heads"])
def test_fisher_equals_autograd_of_explicit_per_sequence_masks(gqa_mode):
    """d(g, n) is the gradient of sequence n's loss with respect to an explicit mask on group g."""
    model, arch, cfg = _model()
    batch = _batch(cfg)
    n, hd = batch["input_ids"].shape[0], arch.head_dim
    got = importance.score(model, [batch], "fisher", arch=arch, gqa=gqa_mode)

    # the same quantity from explicit mask parameters, one per sequence and group ([n, groups]), multiplied into the
    # projections' inputs by hooks: the gradient of the batch loss with respect to mask (n, g) is d(g, n)
    units = arch.num_kv_heads if gqa_mode == "kv-groups" else arch.num_heads
    mh = torch.ones(arch.num_layers, n, units, requires_grad=True)
    mc = torch.ones(arch.num_layers, n, arch.intermediate_size, requires_grad=True)
    handles = []
    for i in range(arch.num_layers):
        def head_hook(mod, args, i=i):
            m = mh[i] if gqa_mode == "query-heads" else mh[i].repeat_interleave(arch.group_size, dim=1)
            return (args[0] * m.repeat_interleave(hd, dim=1).unsqueeze(1),)

        def chan_hook(mod, args, i=i):
            return (args[0] * mc[i].unsqueeze(1),)

        handles.append(model.model.layers[i].self_attn.o_proj.register_forward_pre_hook(head_hook))
        handles.append(model.model.layers[i].mlp.down_proj.register_forward_pre_hook(chan_hook))
    model(**batch).loss.backward()
    for h in handles:
        h.remove()
    want_h, want_c = (mh.grad ** 2).sum(1), (mc.grad ** 2).sum(1)
    for i in range(arch.num_layers):
        torch.testing.assert_close(got[i][0], want_h[i], rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(got[i][1], want_c[i], rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("criterion", ["fisher", "lora"])
def test_gradient_criteria_allocate_no_base_weight_gradient(criterion):
    model, arch, cfg = _model()
    est = importance.make(criterion).attach(model, arch)
    model(**_batch(cfg)).loss.backward()
    for layer in lora.lora_layers(model).values():
        assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    scores = est.scores()
    assert all(s is not None and float(s[0].sum()) > 0 and float(s[1].sum()) > 0 for s in scores)
    est.detach()


def test_vanilla_equals_autograd_of_merged_weight():
    """vanilla's group scores are sums of (∂L/∂W ⊙ W)² over each group, W = W0 + s·B·A, from plain autograd."""
    model, arch, cfg = _model()
    batch = _batch(cfg)
    got = importance.score(model, [batch], "vanilla", arch=arch, gqa="kv-groups")
    assert all(not layer.base_layer.weight.requires_grad for layer in lora.lora_layers(model).values())

    # independent: a model whose weights are the merged W as leaves, differentiated by autograd
    ref = build_model(cfg)
    with torch.no_grad():
        for path, layer in lora.lora_layers(model).items():
            dict(ref.named_modules())[path].weight.copy_(layer.merged_linear(dtype=torch.float32).weight)
    ref.requires_grad_(True)
    ref(**batch).loss.backward()
    mods = dict(ref.named_modules())
    hd, g, kv = arch.head_dim, arch.group_size, arch.num_kv_heads
    for i in range(arch.num_layers):
        I = {p: (mods[arch.module_path(i, p)].weight.grad * mods[arch.module_path(i, p)].weight) ** 2
             for p in PROJECTIONS}
        q = I["q_proj"].view(arch.num_heads, hd, -1).sum((1, 2)) + I["o_proj"].view(-1, arch.num_heads, hd).sum((0, 2))
        want_h = q.view(kv, g).sum(1) + I["k_proj"].view(kv, hd, -1).sum((1, 2)) + I["v_proj"].view(kv, hd, -1).sum((1, 2))
        want_c = I["gate_proj"].sum(1) + I["up_proj"].sum(1) + I["down_proj"].sum(0)
        torch.testing.assert_close(got[i][0], want_h, rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(got[i][1], want_c, rtol=1e-4, atol=1e-10)


def test_normalisation_scopes():
    """group: each layer's group vector has unit norm; projection (the authors'): each projection's vector does
    before the sum, which changes the ranking inside a layer in general."""
    model, arch, cfg = _model()
    batch = _batch(cfg)
    raw = importance.score(model, [batch], "lora", arch=arch)
    grp = importance.score(model, [batch], "lora", arch=arch, normalize="group")
    proj = importance.score(model, [batch], "lora", arch=arch, normalize="projection")
    for i in range(arch.num_layers):
        torch.testing.assert_close(grp[i][1], raw[i][1] / raw[i][1].norm())
        torch.testing.assert_close(grp[i][1].norm(), torch.tensor(1.0))
        assert not torch.allclose(proj[i][1] / proj[i][1].norm(), grp[i][1], rtol=1e-3)
        assert float(proj[i][1].sum()) > 0


@pytest.mark.parametrize("gqa_mode", ["kv-groups", "query-heads"])
def test_fisher_under_gradient_checkpointing_matches(gqa_mode):
    """Under checkpointing the activation of the recomputation is paired with the gradient: same scores."""
    model, arch, cfg = _model()
    batch = _batch(cfg)
    plain = importance.score(model, [batch], "fisher", arch=arch, gqa=gqa_mode)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        assert model.is_activation_checkpointing
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert model.is_gradient_checkpointing
    model.train()
    ckpt = importance.score(model, [batch], "fisher", arch=arch, gqa=gqa_mode)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-12)


def test_unknown_criterion_and_missing_lora():
    from lpt.errors import LptError

    with pytest.raises(LptError, match="unknown --criterion"):
        importance.make("oracle")
    cfg = tiny_config()
    with pytest.raises(LptError, match="no LoRA layer"):
        importance.make("fisher").attach(build_model(cfg), describe(cfg))


@pytest.mark.parametrize("gqa_mode", ["kv-groups", "query-heads"])
def test_fisher_keeps_no_activation_alive_between_steps(gqa_mode):
    """No reference cycle through the gradient hooks: without a GC pass, live tensors do not pile up per step."""
    import gc

    model, arch, cfg = _model()
    est = importance.make("fisher").attach(model, arch, gqa=gqa_mode)
    batch = _batch(cfg)

    def step():
        model(**batch).loss.backward()
        est.scores()
        est.clear()
        model.zero_grad(set_to_none=True)

    def live_tensors():
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    step()
    gc.collect()
    gc.disable()
    try:
        before = live_tensors()
        for _ in range(3):
            step()
        after = live_tensors()
    finally:
        gc.enable()
    assert after <= before + 2, (before, after)


def test_the_criterion_names_come_from_the_estimator_registry():
    from lpt.config import BenchPruneStepConfig, PruneConfig, help_of
    from lpt.errors import LptError

    assert importance.CRITERIA == tuple(importance.ESTIMATORS)
    for cls in (PruneConfig, BenchPruneStepConfig):  # the help text names every registered criterion
        assert all(c in help_of(cls, "criterion") for c in importance.CRITERIA), cls.__name__
    assert [c for c in importance.CRITERIA if importance.int8_conflict(c)] == ["vanilla"]
    with pytest.raises(LptError, match="--criterion vanilla needs the gradients of the base weights"):
        importance.check_int8("vanilla", True)
    importance.check_int8("vanilla", False)
