"""lpt.selection: which units are cut, over the pruner's small state object (pure functions)."""

import pytest
import torch

from conftest import tiny_config
from lpt import selection
from lpt.arch import describe
from lpt.errors import LptError

ARCH = describe(tiny_config(gqa=True, num_hidden_layers=3))  # 4 query heads, 2 key/value groups, 96 channels


def _state(gqa="kv-groups", seed=0, layers=3):
    s = selection.State.empty(ARCH, gqa)
    g = torch.Generator().manual_seed(seed)
    s.head_scores = [torch.rand(s.heads_pruned[i].numel(), generator=g) for i in range(layers)]
    s.channel_scores = [torch.rand(ARCH.intermediate_size, generator=g) for _ in range(layers)]
    return s


def test_prune_lowest_keeps_what_is_pruned_and_adds_the_lowest():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3])
    pruned = torch.tensor([False, False, True, False])
    assert selection.prune_lowest(scores, pruned, 2).tolist() == [False, True, True, False]
    assert selection.prune_lowest(scores, pruned, 0).tolist() == pruned.tolist()  # never fewer than pruned
    kept = selection.prune_query_heads(torch.tensor([0.1, 0.2, 0.9, 0.05]), torch.zeros(4, dtype=torch.bool), 1, 2)
    assert kept.tolist() == [True, False, False, True]  # one query head inside every group


def test_global_counts_keep_one_unit_per_layer():
    a, b = torch.tensor([0.0, 0.1, 0.2]), torch.tensor([5.0, 6.0, 7.0])
    assert selection.global_counts([a, b], 2) == [2, 0]
    assert selection.global_counts([a, b], 3) == [2, 1]  # the last unit of layer 0 is never counted
    q = selection.sorted_unit_scores(torch.tensor([1.0, 3.0, 2.0, 0.5]), torch.tensor([False, False, True, False]), 2)
    assert q[0] == -float("inf") and q[1] == 3.5  # j-th weakest head of every group together; pruned first


def test_state_empty_and_policy():
    s = selection.State.empty(ARCH, "query-heads")
    assert [t.numel() for t in s.heads_pruned] == [4, 4, 4] and s.head_scores == [None] * 3
    assert selection.State.empty(ARCH, "kv-groups").heads_pruned[0].numel() == 2
    p = selection.Policy.of(ARCH, layout="uniform", prunable=[0, 2], gqa="query-heads", round_to=8)
    assert (p.prunable, p.num_layers, p.kv_groups, p.intermediate) == ((0, 2), 3, 2, 96)
    assert selection.Policy.of(ARCH, layout="uniform", prunable=[0], gqa="kv-groups").kv_groups is None


def test_uniform_counts_grow_with_the_schedule_and_skip_unprunable_layers():
    policy = selection.Policy.of(ARCH, layout="uniform", prunable=[0, 2], gqa="kv-groups")
    state = _state()
    counts = [selection.step_counts(f, (1, 40), policy, state) for f in (0.0, 0.3, 1.0)]
    assert counts[0] == [(0, 0)] * 3
    assert counts[1] == [(0, 12), (0, 0), (0, 12)]
    assert counts[2] == [(1, 40), (0, 0), (1, 40)]
    hp, cp = selection.grow(counts[2], policy, state)
    assert [int(h.sum()) for h in hp] == [1, 0, 1] and [int(c.sum()) for c in cp] == [40, 0, 40]
    assert not state.heads_pruned[0].any()  # grow returns new sets; the state is unchanged


def test_per_layer_counts_keep_the_totals_and_round_at_the_target():
    policy = selection.Policy.of(ARCH, layout="per-layer", prunable=[0, 1, 2], gqa="kv-groups", round_to=8)
    state = _state(seed=3)
    mid = selection.step_counts(0.5, (1, 40), policy, state)
    assert sum(h for h, _ in mid) == 2 and sum(c for _, c in mid) == 60  # round(0.5 * 40 * 3)
    end = selection.step_counts(1.0, (1, 40), policy, state)
    assert sum(h for h, _ in end) == 3
    assert all((96 - c) % 8 == 0 for _, c in end)  # kept widths a multiple of --round-to at the target


def test_grown_sets_never_shrink_and_query_heads_stay_balanced():
    policy = selection.Policy.of(ARCH, layout="uniform", prunable=[0, 1, 2], gqa="query-heads")
    state = _state("query-heads", seed=1)
    hp, cp = selection.grow(selection.step_counts(0.5, (1, 48), policy, state), policy, state)
    state.heads_pruned, state.channels_pruned = hp, cp
    state.head_scores = [torch.rand(4) for _ in range(3)]  # new scores: what is pruned must stay pruned
    hp2, cp2 = selection.grow(selection.step_counts(1.0, (1, 48), policy, state), policy, state)
    for a, b in zip(hp + cp, hp2 + cp2):
        assert bool((b | ~a).all())
    assert all(h.view(2, 2).sum(1).tolist() == [1, 1] for h in hp2)


def test_no_scores_before_the_first_update_is_an_error():
    policy = selection.Policy.of(ARCH, layout="per-layer", prunable=[0], gqa="kv-groups")
    with pytest.raises(LptError, match="lower --warmup"):
        selection.step_counts(1.0, (1, 8), policy, selection.State.empty(ARCH, "kv-groups"))
    with pytest.raises(LptError, match="--layout"):
        selection.step_counts(1.0, (1, 8), selection.Policy.of(ARCH, layout="x", prunable=[0], gqa="kv-groups"),
                              _state())
