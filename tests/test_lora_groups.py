"""LoRA layer, masks and group selection on tiny models."""

import pytest
import torch

from conftest import build_model, tiny_config
from lpt import groups, lora
from lpt.arch import describe


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
    masks = groups.Masks.from_pruned(arch, hp, cp, "kv-groups")
    groups.apply_masks(m, masks)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    got = m(x).logits
    # reference: merged weights with the pruned rows / columns zeroed, in plain nn.Linear layers
    merged = lora.merge_lora(m)
    want = merged(x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_uniform_counts_hit_ratio():
    arch = describe(tiny_config(gqa=False, intermediate_size=256))
    for ratio in (0.2, 0.5):
        nh, nc = groups.uniform_counts(arch, ratio, "kv-groups")
        hp = [torch.arange(arch.num_kv_heads) < nh]
        cp = [torch.arange(arch.intermediate_size) < nc]
        masks = groups.Masks.from_pruned(describe(tiny_config(gqa=False, intermediate_size=256, num_hidden_layers=1)),
                                         hp, cp, "kv-groups")
        before, after = masks.block_params()
        p_chan = 3 * arch.hidden_size
        assert abs((before - after) - ratio * before) <= p_chan / 2 + 1
