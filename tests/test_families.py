"""Every supported decoder family: a tiny random model, masks -> lpt slice -> plain transformers reload -> the logits
of the masked model; parameter counting against the modules; the error for an unsupported family."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import VOCAB
from lpt import groups, lora
from lpt.masks import Masks, apply_masks
from lpt.arch import FAMILIES, default_gqa, describe, supported_model_types
from lpt.errors import LptError

SEQ = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
# masked model vs sliced model reloaded by transformers: the same float32 arithmetic on fewer rows / columns. OLMo 2's
# full-width query / key norms are rescaled when sliced, which is exact up to their epsilon (the sliced norm acts as
# if eps were eps * kept / full); the tiny random models have very small query / key activations (mean square ~1e-3,
# where real checkpoints have ~1), so the OLMo 2 cases use eps=1e-12 to test the slicing and not the epsilon, and
# test_full_width_norm_slicing checks the epsilon effect separately.
TOL = dict(rtol=1e-4, atol=1e-4)
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
              pad_token_id=2)
# model type -> extra config fields that exercise what the family has (sliding windows shorter than the test input,
# soft-capping, multipliers, biases)
EXTRA = {
    "olmo2": dict(rms_norm_eps=1e-12),
    "gemma2": dict(sliding_window=4),
    "gemma3_text": dict(sliding_window=4),
    "granite": dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.125,
                    logits_scaling=2.0),
}
# name -> (model type, config overrides, gqa mode, pruned heads per layer (gqa-unit space), layout)
CASES = {mt: (mt, EXTRA.get(mt, {}), "kv-groups", [[1], [0]], "uniform") for mt in supported_model_types()}
CASES.update({
    # Phi-3 / Phi-4-mini: fused qkv_proj / gate_up_proj; rope on part of head_dim (Phi-4-mini: 0.75)
    "phi3-partial-rotary": ("phi3", dict(partial_rotary_factor=0.5), "kv-groups", [[0], [1]], "uniform"),
    "phi3-mha-queryheads": ("phi3", dict(num_key_value_heads=4, partial_rotary_factor=0.75), "query-heads",
                            [[0, 3], [1, 2]], "uniform"),
    "olmo2-queryheads-perlayer": ("olmo2", dict(rms_norm_eps=1e-12), "query-heads", [[1, 2], []], "per-layer"),
    "qwen3-mha-bias": ("qwen3", dict(num_key_value_heads=4, attention_bias=True), "kv-groups", [[0, 3], [2]],
                       "per-layer"),
    "granite-bias": ("granite", dict(attention_bias=True, mlp_bias=True), "kv-groups", [[0], [1]], "uniform"),
    "gemma-one-kv-head": ("gemma", dict(num_key_value_heads=1), "query-heads", [[0, 2], [1, 3]], "uniform"),
})


def family_config(model_type: str, **kw):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**COMMON, **kw})


def build(cfg, seed=0, split=True):
    """A tiny random model of the family, its fused projections split as lpt.models loads them (``split``)."""
    from transformers import AutoModelForCausalLM

    from lpt import fused

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger spread than the default init; non-trivial norm weights and biases
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return (fused.split(m) if split else m).eval()


def channel_rule(layer: int, inter: int) -> torch.Tensor:
    c = torch.arange(inter)
    return c % 4 == 1 if layer == 0 else c % 3 == 0


def make_masks(arch, gqa_mode, heads, layout):
    units = arch.num_kv_heads if gqa_mode == "kv-groups" else arch.num_heads
    hp = [torch.tensor([u in h for u in range(units)]) for h in heads]
    cp = [channel_rule(i if layout == "per-layer" else 0, arch.intermediate_size) for i in range(arch.num_layers)]
    return Masks.from_pruned(arch, hp, cp, gqa_mode)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, tiny_tokenizer_dir):
    from lpt.stages import slice as slice_stage

    name = request.param
    model_type, overrides, gqa_mode, heads, layout = CASES[name]
    tmp = tmp_path_factory.mktemp(name)
    cfg = family_config(model_type, **overrides)
    build(cfg, split=False).save_pretrained(tmp / "model")
    model = build(cfg)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, tmp / "model" / f.name)
    arch = describe(cfg)
    masks = make_masks(arch, gqa_mode, heads, layout)
    assert masks.is_uniform() == (layout == "uniform")
    masks.save(tmp / "masks.json")
    lora.inject(model, arch, r=4, alpha=8.0)  # B starts at zero: the masks alone change the function
    apply_masks(model, masks)
    with torch.no_grad():
        masked = model(SEQ).logits
    out = slice_stage.run(slice_stage.SliceConfig(model=str(tmp / "model"), masks=str(tmp / "masks.json"),
                                                  output=str(tmp / "sliced"), device="cpu", dtype="float32"))
    return dict(name=name, model_type=model_type, arch=arch, masks=masks, masked=masked, out=out, cfg=cfg)


def test_sliced_reloads_with_plain_transformers_and_matches_masked(case):
    from transformers import AutoModelForCausalLM

    per_layer = not case["masks"].is_uniform()
    sliced = AutoModelForCausalLM.from_pretrained(case["out"], dtype=torch.float32, trust_remote_code=per_layer)
    assert type(sliced).__name__ == ("Lpt" if per_layer else "") + FAMILIES[describe(case["cfg"]).name].hf_class
    with torch.no_grad():
        got = sliced.eval()(SEQ).logits
    torch.testing.assert_close(got, case["masked"], **TOL)
    doc = json.loads((case["out"] / "config.json").read_text())
    assert doc["model_type"] == case["model_type"]
    m0 = case["masks"].layers[0]
    if not per_layer:
        assert (doc["num_attention_heads"], doc["num_key_value_heads"], doc["intermediate_size"]) == (
            len(m0.heads), len(m0.kv_heads), len(m0.channels))
    # what masks.json promised is what the sliced model has
    before, after = case["masks"].block_params()
    assert sum(p.numel() for p in sliced.parameters()) == sum(
        p.numel() for p in build(case["cfg"], split=False).parameters()) - (before - after)


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_full_width_norm_slicing(eps):
    """A norm over a projection's full width, sliced, gives the masked model's output on the kept entries."""
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    from lpt.slicing import slice_norm

    g = torch.Generator().manual_seed(0)
    norm = Olmo2RMSNorm(64, eps=eps)
    norm.weight.data = torch.rand(64, generator=g) + 0.5
    keep = torch.tensor([q for q in range(64) if q // 16 in (0, 2, 3)])
    mask = torch.zeros(64)
    mask[keep] = 1.0
    x = torch.randn(3, 64, generator=g)  # mean square ~1, as in real checkpoints
    want = norm(x * mask)[:, keep]
    slice_norm(norm, keep)
    torch.testing.assert_close(norm(x[:, keep]), want, rtol=1e-5, atol=1e-5)


def _module_block_params(model, arch) -> int:
    """Projection weights and biases of block 0, plus q/k norms when they span the projection width."""
    from lpt.arch import PROJECTIONS, get_module

    total = 0
    for proj in PROJECTIONS:
        mod = get_module(model, arch.module_path(0, proj))
        total += sum(p.numel() for p in mod.parameters())
    if arch.family.qk_norm == "full":
        attn = get_module(model, f"{arch.family.layers}.0.{arch.family.attn}")
        total += sum(getattr(attn, n).weight.numel() for n in (arch.family.q_norm, arch.family.k_norm))
    return total


@pytest.mark.parametrize("model_type", supported_model_types())
@pytest.mark.parametrize("bias", [False, True])
def test_block_params_match_the_modules(model_type, bias):
    kw = dict(attention_bias=True, mlp_bias=True) if bias else {}
    cfg = family_config(model_type, **kw)
    arch = describe(cfg)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        from lpt import fused

        model = fused.split(AutoModelForCausalLM.from_config(cfg))
    assert arch.block_linear_params(0) == _module_block_params(model, arch)
    # removing one unit of each kind removes what unit_params says
    for gqa in groups.GQA_MODES:
        head, chan = groups.unit_params(arch, gqa)
        full = Masks.full(arch, gqa=gqa)
        m = full.layers[0]
        if gqa == "kv-groups":
            m.kv_heads = m.kv_heads[1:]
            m.heads = [q for q in m.heads if q // arch.group_size != 0]
        else:
            m.heads = [q for q in m.heads if q % arch.group_size != 0]
        m.channels = m.channels[1:]
        before, after = full.block_params()
        assert before - after == head + chan


def test_unsupported_family_lists_the_supported_ones():
    cfg = family_config("starcoder2", pad_token_id=2)
    with pytest.raises(LptError) as e:
        describe(cfg)
    msg = str(e.value)
    assert "starcoder2" in msg and all(t in msg for t in supported_model_types())


def test_every_supported_family_exists_in_transformers():
    import transformers

    from lpt.modeling import modeling_lpt

    for fam in FAMILIES.values():
        for mt in fam.model_types:
            assert family_config(mt).model_type == mt
        assert hasattr(modeling_lpt, f"Lpt{fam.hf_class}") == fam.per_layer_widths
        assert getattr(transformers, fam.hf_class).__name__ == fam.hf_class
        for f in fam.fused:  # q / k / v / gate / up name the children of the fused layers
            assert all(getattr(fam, p.split("_")[0]) == f"{f.name}.{p}" for p in f.parts)


def test_default_gqa_for_a_single_key_value_head():
    one = describe(family_config("gemma", num_key_value_heads=1))
    assert default_gqa(one) == ("query-heads", default_gqa(one)[1]) and "single key/value head" in default_gqa(one)[1]
    assert default_gqa(one, "query-heads") == ("query-heads", None)
    mode, note = default_gqa(one, "kv-groups")
    assert mode == "kv-groups" and "MLP channels only" in note
    # kv-groups on one key/value head: no attention unit can go, the ratio comes from the MLP
    assert groups.uniform_counts(one, 0.3, "kv-groups")[0] == 0
    assert groups.uniform_counts(one, 0.3, "query-heads")[0] >= 1
    gqa = describe(family_config("qwen3"))
    assert default_gqa(gqa) == ("kv-groups", None) and default_gqa(gqa, "query-heads") == ("query-heads", None)


def test_prune_runs_on_a_new_family(tmp_path, tiny_tokenizer_dir, tiny_calib_dir):
    """lpt prune end to end (two steps) on OLMo 2: full-width q/k norms between the projections and attention."""
    from lpt.config import PruneConfig
    from lpt.stages import prune, slice as slice_stage

    d = tmp_path / "olmo2"
    build(family_config("olmo2")).save_pretrained(d)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    out = prune.run(PruneConfig(model=str(d), calib=str(tiny_calib_dir), ratio=0.3, max_steps=2, batch_size=4,
                                micro_batch_size=2, prune_freq=1, warmup=0.0, cooldown=0.0, lora_r=4, lora_alpha=8,
                                lora_dropout=0.0, device="cpu", output=str(tmp_path / "prune")))
    out = tmp_path / "prune" if out is None else out
    masks = Masks.load(out / "masks.json", describe(family_config("olmo2")))
    assert masks.block_params()[1] < masks.block_params()[0]
    sliced = slice_stage.run(slice_stage.SliceConfig(model=str(d), masks=str(out / "masks.json"),
                                                     adapter=str(out), merge=True, output=str(tmp_path / "s"),
                                                     device="cpu"))
    assert (sliced / "config.json").is_file()


def test_uniform_counts_can_keep_a_round_to_32_channels():
    """SmolLM2-135M's shape: the plain count leaves 1297 channels at 20% (not a multiple of 32, see the README's
    llama.cpp table); round_to=32 keeps a multiple of 32, close to the requested ratio."""
    from transformers import LlamaConfig

    arch = describe(LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                                num_hidden_layers=30, head_dim=64, vocab_size=49152))
    for ratio in (0.2, 0.5):
        heads, chans = groups.uniform_counts(arch, ratio, "kv-groups")
        heads32, chans32 = groups.uniform_counts(arch, ratio, "kv-groups", round_to=32)
        assert heads32 == heads and (arch.intermediate_size - chans32) % 32 == 0
        assert abs(chans32 - chans) <= 16
    assert groups.uniform_counts(arch, 0.2, "kv-groups")[1] == 1536 - 1297
    assert groups.uniform_counts(arch, 0.0, "kv-groups", round_to=32) == (0, 0)


@pytest.mark.parametrize("model_type", supported_model_types())
def test_sequential_reconstruction_runs_on_every_family(model_type):
    """The layer-by-layer refit calls each decoder layer on its own with the arguments the model gave it (rotary
    embeddings, sliding-window masks, multipliers): on every family it must bring the pruned model closer to the
    unpruned one on the blocks it was fitted on, and give the weights back when nothing is pruned."""
    from lpt import models, reconstruct
    from lpt.arch import get_module

    cfg = family_config(model_type, **EXTRA.get(model_type, {}))
    arch = describe(cfg)
    ids = torch.randint(3, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[i:i + 4]} for i in (0, 4)]
    with torch.no_grad():
        dense = build(cfg)(ids).logits
    model = build(cfg)
    masks = make_masks(arch, "kv-groups", [[1], [0]], "uniform")
    models.attach(model, arch, masks=masks)
    with torch.no_grad():
        plain = model(ids).logits
    refit = reconstruct.sequential_refit(model, arch, batches, masks, damp=1e-3)
    for (i, proj), w in refit.items():
        get_module(model, arch.module_path(i, proj)).base_layer.weight.data.copy_(w)
    with torch.no_grad():
        fitted = model(ids).logits
    assert ((fitted - dense) ** 2).mean() < 0.8 * ((plain - dense) ** 2).mean()

    model = build(cfg)
    nothing = Masks.from_pruned(arch, [torch.zeros(arch.num_kv_heads, dtype=torch.bool)] * arch.num_layers,
                                [torch.zeros(arch.intermediate_size, dtype=torch.bool)] * arch.num_layers,
                                       "kv-groups")
    models.attach(model, arch, masks=nothing)
    refit = reconstruct.sequential_refit(model, arch, batches, nothing, damp=0.0)
    for (i, proj), w in refit.items():
        torch.testing.assert_close(w, get_module(model, arch.module_path(i, proj)).base_layer.weight,
                                   rtol=1e-4, atol=1e-5)



def test_sequential_reconstruction_regresses_on_the_masked_inputs_where_a_norm_couples_heads():
    """OLMo 2 normalises q and k over every head, so a head's attention output changes when others are masked: the
    refit must regress the full output on the *masked* pass's kept columns (lstsq on both passes' activations)."""
    from lpt import models, reconstruct
    from lpt.arch import ATTN_IN, ATTN_OUT, get_module

    cfg = family_config("olmo2", **EXTRA["olmo2"])
    arch = describe(cfg)
    ids = torch.randint(3, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0))
    model = build(cfg)
    masks = make_masks(arch, "kv-groups", [[1], [0]], "uniform")
    models.attach(model, arch, masks=masks)
    refit = reconstruct.sequential_refit(model, arch, [{"input_ids": ids[:4]}, {"input_ids": ids[4:]}], masks,
                                         damp=0.0)
    o = get_module(model, arch.module_path(0, "o_proj"))
    got = []
    h = o.register_forward_pre_hook(lambda m, a: got.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    attn = [get_module(model, arch.module_path(0, p)) for p in ATTN_OUT + ATTN_IN]
    with torch.no_grad():
        model(ids)
        for m in attn:
            m._mask_in = m._mask_out = False
        model(ids)
    h.remove()
    keep = reconstruct.kept_columns(masks, arch, 0, "o_proj")
    x_masked, x_full = got[0][:, keep], got[1]
    assert not torch.allclose(x_masked, x_full[:, keep], rtol=1e-3, atol=1e-6)  # the heads are coupled
    want = torch.linalg.lstsq(x_masked, x_full @ o.base_layer.weight.double().T).solution.T
    torch.testing.assert_close(refit[(0, "o_proj")][:, keep].double(), want, rtol=1e-3, atol=1e-4)
