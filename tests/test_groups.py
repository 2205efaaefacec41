"""lpt.groups: group sums (Eq. 4), normalisation, and the budget rules, as pure functions."""

import pytest
import torch

from conftest import tiny_config
from lpt import groups
from lpt.arch import describe
from lpt.errors import LptError

GQA = describe(tiny_config(gqa=True))  # 4 query heads in 2 key/value groups, head_dim 16, 96 MLP channels


def _proj(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, kv, ch = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim, arch.intermediate_size
    sizes = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": q, "gate_proj": ch, "up_proj": ch, "down_proj": ch}
    return {p: torch.rand(n, generator=g) for p, n in sizes.items()}


def test_group_scores_sum_rows_and_columns_of_each_group():
    proj = _proj(GQA)
    hd = GQA.head_dim
    heads, channels = groups.group_scores(GQA, proj, "kv-groups")
    for kv in range(GQA.num_kv_heads):  # a key/value group: its query heads' q rows / o columns, its k and v rows
        q = slice(kv * 2 * hd, (kv + 1) * 2 * hd)
        k = slice(kv * hd, (kv + 1) * hd)
        want = proj["q_proj"][q].sum() + proj["o_proj"][q].sum() + proj["k_proj"][k].sum() + proj["v_proj"][k].sum()
        torch.testing.assert_close(heads[kv], want)
    torch.testing.assert_close(channels, proj["gate_proj"] + proj["up_proj"] + proj["down_proj"])
    qh, ch2 = groups.group_scores(GQA, proj, "query-heads")
    assert qh.shape == (GQA.num_heads,)
    torch.testing.assert_close(qh, (proj["q_proj"] + proj["o_proj"]).view(GQA.num_heads, hd).sum(1))
    torch.testing.assert_close(ch2, channels)


def test_group_scores_skip_missing_projections_and_refuse_unknown_modes():
    proj = {k: v for k, v in _proj(GQA).items() if k in ("q_proj", "up_proj")}
    heads, channels = groups.group_scores(GQA, proj, "kv-groups")
    torch.testing.assert_close(channels, proj["up_proj"])
    torch.testing.assert_close(heads.sum(), proj["q_proj"].sum())
    with pytest.raises(LptError, match="--gqa"):
        groups.group_scores(GQA, proj, "heads")


def test_normalize_divides_by_the_l2_norm_and_keeps_zero_vectors():
    v = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(groups.normalize(v), torch.tensor([0.6, 0.8]))
    assert torch.equal(groups.normalize(torch.zeros(3)), torch.zeros(3))


def test_head_units_and_score_lengths_per_gqa_mode():
    assert groups.head_units(GQA, "kv-groups") == groups.head_scores_len(GQA, "kv-groups") == 2
    assert groups.head_units(GQA, "query-heads") == 2  # query heads per group
    assert groups.head_scores_len(GQA, "query-heads") == 4  # one score per query head


@pytest.mark.parametrize("ratio, positive, ok", [(0.0, False, True), (0.99, False, True), (1.0, False, False),
                                                 (-0.1, False, False), (0.0, True, False), (0.5, True, True)])
def test_the_ratio_bound_is_declared_once_with_its_field(ratio, positive, ok):
    """--ratio's bound lives on the config field: [0, 1) for prune, (0, 1) for lpt bench prune-step."""
    from lpt.config import BenchPruneStepConfig, PruneConfig, check

    cfg = BenchPruneStepConfig(ratio=ratio) if positive else PruneConfig(ratio=ratio)
    if ok:
        check(cfg)
    else:
        with pytest.raises(LptError, match=r"--ratio must be in \(0, 1\)" if positive else r"--ratio must be in \[0, 1\)"):
            check(cfg)


def test_unit_params_add_up_to_the_block():
    p_head, p_chan = groups.unit_params(GQA, "kv-groups")
    # every key/value group and every channel together are all of the block's linear parameters
    assert GQA.num_kv_heads * p_head + GQA.intermediate_size * p_chan == GQA.block_linear_params(0)
    q_head, _ = groups.unit_params(GQA, "query-heads")
    # a query-head unit (one query head in every group) takes q rows and o columns only: k and v stay
    assert GQA.group_size * q_head + GQA.num_kv_heads * GQA.kv_head_params() + GQA.intermediate_size * p_chan == \
        GQA.block_linear_params(0)


def test_parse_layers_and_the_ratio_of_the_layers_left():
    assert groups.parse_layers("", 32) == []
    assert groups.parse_layers("0-2,31", 32) == [0, 1, 2, 31]
    assert groups.parse_layers("paper", 32) == [0, 1, 2, 31]
    for bad, msg in (("x", "cannot parse"), ("40", "does not exist"), ("0-31", "no layer to prune")):
        with pytest.raises(LptError, match=msg):
            groups.parse_layers(bad, 32)
    arch = describe(tiny_config(num_hidden_layers=4))
    assert groups.layer_ratio(arch, 0.3, [0, 1, 2, 3]) == pytest.approx(0.3)
    assert groups.layer_ratio(arch, 0.3, [1, 2]) == pytest.approx(0.6)
    with pytest.raises(LptError, match="cannot be reached"):
        groups.layer_ratio(arch, 0.6, [1, 2])
