"""LoRA layer, masks and group selection on tiny models."""

import pytest
import torch

from conftest import build_model, tiny_config
from lpt import groups, lora
from lpt.masks import Masks, apply_masks, round_to_violations
from lpt.arch import describe
from lpt.errors import LptError


@pytest.mark.parametrize("gqa", [True, False])
def test_masked_unmerged_equals_merged_with_zeroed_weights(gqa):
    cfg = tiny_config(gqa=gqa)
    m = build_model(cfg)
    arch = describe(cfg)
    layers = lora.inject(m, arch, r=4, alpha=8)
    torch.manual_seed(1)
    for layer in layers.values():
        if layer.r:
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    hp = [torch.tensor([False, True]) if gqa else torch.tensor([False, True, False, True])] * 2
    cp = [torch.arange(96) % 3 == 0] * 2
    masks = Masks.from_pruned(arch, hp, cp, "kv-groups")
    apply_masks(m, masks)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    got = m(x).logits
    # reference: merged weights with the pruned rows / columns zeroed, in plain nn.Linear layers
    merged = lora.merge_lora(m)
    want = merged(x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


SHAPES = [
    dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4, head_dim=64),  # TinyLlama
    dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64),  # SmolLM2
    dict(hidden_size=64, intermediate_size=100, num_attention_heads=4, num_key_value_heads=4, head_dim=16),
]


def _one_block(shape: dict):
    """A one-block arch of ``shape``, its block's linear parameters, and the parameters of one MLP channel."""
    arch = describe(tiny_config(num_hidden_layers=1, **shape))
    return arch, arch.block_linear_params(0), 3 * arch.hidden_size


def test_uniform_counts_hit_ratio():
    arch = describe(tiny_config(gqa=False, intermediate_size=256))
    for ratio in (0.2, 0.5):
        nh, nc = groups.uniform_counts(arch, ratio, "kv-groups")
        hp = [torch.arange(arch.num_kv_heads) < nh]
        cp = [torch.arange(arch.intermediate_size) < nc]
        masks = Masks.from_pruned(describe(tiny_config(gqa=False, intermediate_size=256, num_hidden_layers=1)),
                                  hp, cp, "kv-groups")
        before, after = masks.block_params()
        p_chan = 3 * arch.hidden_size
        assert abs((before - after) - ratio * before) <= p_chan / 2 + 1


@pytest.mark.parametrize("shape", SHAPES)
def test_uniform_counts_round_to(shape):
    arch, before, p_chan = _one_block(shape)
    for gqa in ("kv-groups", "query-heads"):
        p_head = groups.unit_params(arch, gqa)[0]
        for ratio in (0.0, 0.1, 0.2, 0.3, 0.5, 0.7):
            plain = groups.uniform_counts(arch, ratio, gqa)
            assert groups.uniform_counts(arch, ratio, gqa, round_to=1) == plain
            for n in (2, 8, 32, 64, 128):
                if n > arch.intermediate_size:
                    continue
                nh, nc = groups.uniform_counts(arch, ratio, gqa, round_to=n)
                assert nh == plain[0]  # heads are not rounded
                kept = arch.intermediate_size - nc
                assert (kept % n == 0 and n <= kept) or nc == 0  # unpruned widths stay whole
                assert kept <= arch.intermediate_size
                removed, plain_removed = nh * p_head + nc * p_chan, plain[0] * p_head + plain[1] * p_chan
                assert abs(removed - plain_removed) < n * p_chan  # less than one rounding step moved
                if abs(plain_removed - ratio * before) <= p_chan / 2 + 1:  # the target is reachable at this shape
                    assert abs(removed - ratio * before) <= n * p_chan  # within one rounding step of the target


@pytest.mark.parametrize("shape", SHAPES)
def test_balance_candidates_hit_ratio(shape):
    arch, before, p_chan = _one_block(shape)
    for gqa in ("kv-groups", "query-heads"):
        p_head = groups.unit_params(arch, gqa)[0]
        units = groups.head_units(arch, gqa)
        for ratio in (0.1, 0.2, 0.5, 0.7):
            for n in (1, 8):
                cands = groups.balance_candidates(arch, ratio, gqa, round_to=n)
                heads = [h for h, _ in cands]
                assert heads == sorted(set(heads)) and all(0 <= h < units for h in heads)
                for h, c in cands:
                    assert 0 <= c < arch.intermediate_size
                    assert groups.uniform_counts(arch, ratio, gqa, round_to=n, heads=h) == (h, c)
                    if abs(h * p_head + c * p_chan - ratio * before) > n * p_chan:  # every one hits the ratio ...
                        # ... unless none can (one query head per group at 70%): then the clamped proportional one
                        assert cands == [groups.uniform_counts(arch, ratio, gqa, round_to=n)]
                # the proportional balance is one of them whenever the MLP can make up its difference
                prop = groups.uniform_counts(arch, ratio, gqa, round_to=n)
                if abs(prop[0] * p_head + prop[1] * p_chan - ratio * before) <= p_chan / 2 + n * p_chan:
                    assert prop in cands
        assert groups.balance_candidates(arch, 0.0, gqa) == [(0, 0)]
    # SmolLM2 at 20%: no attention, one or two key/value groups; at 50% all three counts are possible
    smol = describe(tiny_config(num_hidden_layers=1, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                num_key_value_heads=3, head_dim=64))
    assert [h for h, _ in groups.balance_candidates(smol, 0.5, "kv-groups", 8)] == [0, 1, 2]
    assert groups.balance_candidates(smol, 0.2, "kv-groups", 8)[0] == (0, 1536 - 1128)


def test_parse_balance():
    assert groups.parse_balance("search") is None and groups.parse_balance("proportional") is None
    assert groups.parse_balance("2") == 2 and groups.parse_balance(0) == 0
    for bad in ("many", "-1", "1.5"):
        with pytest.raises(LptError, match="--balance"):
            groups.parse_balance(bad)
    arch = describe(tiny_config())
    with pytest.raises(LptError, match="--balance 2"):
        groups.uniform_counts(arch, 0.5, "kv-groups", heads=2)  # 2 key/value groups: prune 0 or 1


def test_round_channels_and_violations():
    assert groups.round_channels(2815, 5632, 128) == 5632 - 2816  # kept 2817 -> 2816
    assert groups.round_channels(2816 - 64, 5632, 128) == 5632 - 2944  # a tie keeps more
    assert groups.round_channels(5600, 5632, 128) == 5632 - 128  # at least one step kept
    assert groups.round_channels(7, 100, 1) == 7
    assert groups.round_channels(0, 100, 64) == 0  # nothing to prune: the width stays whole
    assert groups.round_channels(3, 100, 64) == 100 - 64  # 100 is not a multiple: the largest multiple is kept
    for bad in (0, -4, 101):
        with pytest.raises(Exception, match="--round-to"):
            groups.round_channels(10, 100, bad)
    arch = describe(tiny_config(gqa=False))
    hp = [torch.zeros(arch.num_kv_heads, dtype=torch.bool)] * 2
    cp = [torch.arange(96) < 32, torch.arange(96) < 30]  # kept 64 and 66
    masks = Masks.from_pruned(arch, hp, cp, "kv-groups")
    assert round_to_violations(masks) == []
    masks.info["round_to"] = 32
    assert round_to_violations(masks) == [1]


def test_slice_warns_when_masks_break_their_round_to(tmp_path, runner, tiny_llama_dir):
    from conftest import invoke
    from lpt.models import load_config

    arch = describe(load_config(str(tiny_llama_dir)))
    assert round_to_violations(Masks.full(arch, info={"round_to": 7})) == []  # unpruned: fine
    cp = [torch.arange(96) < 6] * 2  # 90 kept channels: not a multiple of 7
    masks = Masks.from_pruned(arch, [torch.zeros(arch.num_kv_heads, dtype=torch.bool)] * 2, cp, "kv-groups",
                              info={"round_to": 7})
    masks.save(tmp_path / "masks.json")
    r = invoke(runner, ["slice", tiny_llama_dir, "--masks", tmp_path / "masks.json", "-o", tmp_path / "s"])
    assert r.exit_code == 0, r.output
    assert "--round-to 7" in r.output and "not a multiple" in r.output
    masks.info["round_to"] = 30
    masks.save(tmp_path / "masks32.json")
    r = invoke(runner, ["slice", tiny_llama_dir, "--masks", tmp_path / "masks32.json", "-o", tmp_path / "s32"])
    assert r.exit_code == 0 and "not a multiple" not in r.output
