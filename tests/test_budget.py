"""lpt.budget: the targets of a run, built once from (config, arch) -- width-only budgets as lpt computed them before,
whole-model targets, tensor-parallel sizes, and the parameter formulas against the modules of every family."""

from __future__ import annotations

import pytest
import torch

from lpt import budget, groups
from lpt.arch import describe, supported_model_types
from lpt.config import PruneConfig
from lpt.errors import LptError
from lpt.config import resolved
from test_families import family_config

SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)


def smol():
    return describe(family_config("llama", **SMOL))


def plan(arch, **kw):
    return budget.plan(resolved(PruneConfig(**kw)), arch)


@pytest.mark.parametrize("model_type", supported_model_types())
@pytest.mark.parametrize("tied", [False, True])
def test_model_params_match_the_modules(model_type, tied):
    from transformers import AutoModelForCausalLM

    cfg = family_config(model_type, tie_word_embeddings=tied, attention_bias=True)
    arch = describe(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert arch.model_params() == sum(p.numel() for p in model.parameters())
    # one block fewer / one hidden channel fewer: what the formulas say the config with those sizes has
    for kw in (dict(num_hidden_layers=cfg.num_hidden_layers - 1), dict(hidden_size=cfg.hidden_size - 8)):
        smaller = family_config(model_type, tie_word_embeddings=tied, attention_bias=True, head_dim=arch.head_dim,
                                **kw)
        with torch.device("meta"):
            m2 = AutoModelForCausalLM.from_config(smaller)
        blocks = arch.num_layers - kw.get("num_hidden_layers", arch.num_layers)
        hidden = arch.hidden_size - kw.get("hidden_size", arch.hidden_size)
        assert budget.shrunk(arch, blocks, hidden).model_params() == sum(p.numel() for p in m2.parameters())


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.5])
@pytest.mark.parametrize("gqa", ["kv-groups", "query-heads"])
@pytest.mark.parametrize("balance", ["search", "proportional", "1"])
@pytest.mark.parametrize("round_to", [1, 8, 32])
def test_width_only_budget_is_what_lpt_computed_before(ratio, gqa, balance, round_to):
    """The counts groups.balance_candidates / uniform_counts give for a --ratio, as the pruner used them."""
    arch = smol()
    b = plan(arch, ratio=ratio, gqa=gqa, balance=balance, round_to=round_to)
    assert not b.model_level and b.layer_ratio == ratio
    if balance == "search":
        want = groups.balance_candidates(arch, ratio, gqa, round_to)
    else:
        want = [groups.uniform_counts(arch, ratio, gqa, round_to=round_to, heads=groups.parse_balance(balance))]
    assert [c.width for c in b.candidates] == want
    assert all(c.blocks == 0 and c.hidden == 0 for c in b.candidates)
    assert b.search == (balance == "search" and len(want) > 1)


def test_skip_layers_spread_the_ratio_over_the_others():
    arch = smol()
    b = plan(arch, ratio=0.3, skip_layers="paper", balance="proportional")
    assert b.layout == "per-layer" and len(b.prunable) == 26
    assert b.layer_ratio == pytest.approx(groups.layer_ratio(arch, 0.3, b.prunable))


@pytest.mark.parametrize("round_to", ["cpu", "auto"])
@pytest.mark.parametrize("target", [0.2, 0.4])
@pytest.mark.parametrize("axes", ["width", "depth", "hidden", "width,depth", "width,depth,hidden"])
def test_whole_model_candidates_meet_the_target(target, axes, round_to):
    """Every candidate within 1% of the whole-model target, on the named axes only, widths and hidden sizes in
    --round-to steps (auto: 32 here, so SmolLM2's hidden size, 576 with 9 heads, moves in steps of lcm(32, 9) = 288
    with every head kept: the hidden axis has fewer choices than with cpu's 8)."""
    arch = smol()
    b = plan(arch, model_ratio=target, axes=axes, round_to=round_to)
    assert b.round_to == (8 if round_to == "cpu" else 32)
    assert b.model_level and b.search and b.goal_params == round((1 - target) * arch.model_params())
    names = axes.split(",")
    for c in b.candidates:
        params = budget.candidate_params(arch, b.gqa, c)
        assert abs(params - b.goal_params) <= 0.01 * arch.model_params() or len(b.candidates) == 1
        assert ("depth" in names) or c.blocks == 0
        assert ("hidden" in names) or c.hidden == 0
        assert ("width" in names) or (c.heads, c.channels) == (0, 0)
        assert (arch.hidden_size - c.hidden) % b.round_to == 0
        assert (arch.intermediate_size - c.channels) % b.round_to == 0
    if names == ["width"]:  # today's width pruning, at the block ratio that meets the whole-model target
        assert all(c.blocks == 0 and c.hidden == 0 for c in b.candidates) and len(b.candidates) >= 2
    if len(names) == 3 and round_to == "cpu":  # the search has real choices between the axes
        assert len({(c.blocks > 0, c.hidden > 0, c.channels > 0) for c in b.candidates}) >= 3


def test_target_params_and_parsing():
    arch = smol()
    b = plan(arch, target_params="100M", axes="width,depth")
    assert b.goal_params == 100_000_000
    assert budget.parse_params("1.5B") == 1_500_000_000 and budget.parse_params("350k") == 350_000
    for bad in ("lots", "-3M", "0"):
        with pytest.raises(LptError, match="--target-params"):
            budget.parse_params(bad)
    with pytest.raises(LptError, match="already"):
        plan(arch, target_params="200M")
    with pytest.raises(LptError, match="--axes"):
        plan(arch, model_ratio=0.2, axes="width,breadth")
    with pytest.raises(LptError, match="one or the other"):
        plan(arch, model_ratio=0.2, prune_layers=2)


def test_fixed_axes():
    arch = smol()
    b = plan(arch, prune_layers=6)  # --ratio defaults to 0 with another axis
    assert b.candidates == (budget.Candidate(6, 0, 0, 0),) and b.model_level and not b.search
    assert plan(arch, prune_layers=0.2).candidates[0].blocks == 6
    c = plan(arch, hidden_ratio=0.25, round_to="cpu").candidates[0]
    assert c.hidden == 144 and (arch.hidden_size - c.hidden) % 8 == 0
    # the default (auto: 32 here) and the 9 heads: steps of 288, so a quarter rounds to nothing -- said, not ignored
    with pytest.raises(LptError, match=r"--hidden-ratio 0.25 removes no channel.*steps of 288 \(--round-to 32 and"):
        plan(arch, hidden_ratio=0.25)
    assert plan(arch, hidden_ratio=0.3).candidates[0].hidden == 288
    c = plan(arch, hidden_ratio=0.25, round_to="gpu").candidates[0]
    assert (arch.hidden_size - c.hidden) % 128 == 0
    both = plan(arch, prune_layers=2, ratio=0.2, balance="proportional").candidates[0]
    assert both.blocks == 2 and both.channels > 0
    with pytest.raises(LptError, match="at least one"):
        plan(arch, prune_layers=30)
    with pytest.raises(LptError, match="whole number"):
        plan(arch, prune_layers=2.5)


@pytest.mark.parametrize("tp", [[2], [4], [2, 4]])
def test_tensor_parallel_sizes_hold_in_every_candidate(tp):
    """A GQA model with 8 query heads and 4 key/value heads: every candidate's kept widths shard at every size."""
    arch = describe(family_config("llama", num_attention_heads=8, num_key_value_heads=4, intermediate_size=512,
                                  hidden_size=256, head_dim=32))
    for gqa in ("kv-groups", "query-heads"):
        b = plan(arch, ratio=0.4, gqa=gqa, tp=[str(t) for t in tp], round_to=8)
        assert b.candidates
        for c in b.candidates:
            h, kv, ch = budget.kept_widths(arch, b.gqa, c.heads, c.channels)
            for t in tp:
                assert budget.shards(h, kv, ch, t, 8), (gqa, c, t)


def test_tensor_parallel_refusals():
    arch = describe(family_config("llama", num_attention_heads=6, num_key_value_heads=3, hidden_size=96))
    with pytest.raises(LptError, match="does not shard"):
        plan(arch, ratio=0.3, tp=["4"])
    arch = describe(family_config("llama", num_attention_heads=8, num_key_value_heads=4))
    with pytest.raises(LptError, match="per-layer"):
        plan(arch, ratio=0.3, tp=["2"], layout="per-layer")
    with pytest.raises(LptError, match="transformers refuses"):  # 6 heads: Llama's config refuses hidden 64
        plan(arch, ratio=0.3, balance="1")
    mistral = describe(family_config("mistral", num_attention_heads=8, num_key_value_heads=4))
    with pytest.raises(LptError, match="--tp"):
        plan(mistral, ratio=0.3, tp=["2"], balance="1")  # 3 kv heads left: not divisible by 2
    assert budget.supported_tp([(8, 4, 96), (6, 3, 96)]) == [1]
    assert budget.supported_tp([(8, 4, 96), (8, 2, 64)]) == [1, 2, 4, 8]  # kv 2 replicated at 4 and 8


def test_share_grid():
    g = budget.share_grid(("width", "depth", "hidden"), 4)
    assert len(g) == 15 and all(abs(sum(s.values()) - 1) < 1e-9 for s in g)
    assert budget.share_grid(("depth",), 4) == [{"depth": 1.0}]


def test_sliced_configs_load_in_transformers():
    """Llama's and Gemma 2 / 3's configs refuse a hidden size that is not a multiple of the heads: no candidate
    of a uniform budget breaks that, at a width-only ratio or a whole-model target."""
    arch = describe(family_config("llama", num_attention_heads=8, num_key_value_heads=8, hidden_size=256,
                                  head_dim=32, intermediate_size=512))
    b = plan(arch, ratio=0.3, gqa="kv-groups")
    assert b.candidates and all(256 % budget.kept_widths(arch, b.gqa, c.heads, 0)[0] == 0 for c in b.candidates)
    assert {budget.kept_widths(arch, b.gqa, c.heads, 0)[0] for c in b.candidates} <= {8, 4, 2, 1}
    t = plan(arch, model_ratio=0.3, axes="width,hidden")
    for c in t.candidates:
        assert (256 - c.hidden) % budget.kept_widths(arch, t.gqa, c.heads, 0)[0] == 0
    mistral = describe(family_config("mistral", num_attention_heads=8, num_key_value_heads=8, hidden_size=256,
                                     head_dim=32, intermediate_size=512))
    assert len(plan(mistral, ratio=0.3, gqa="kv-groups").candidates) > len(b.candidates)  # no such rule there
