"""lpt.masks: the masks.json contract -- building, validating, (de)serialising and applying masks."""

import json

import pytest
import torch

from conftest import build_model, tiny_config
from lpt import artifacts, lora, masks
from lpt.arch import describe
from lpt.errors import LptError, MismatchError

ARCH = describe(tiny_config(gqa=True))  # 4 query heads in 2 key/value groups, 96 MLP channels, 2 layers


def _masks(gqa="kv-groups"):
    hp = [torch.tensor([False, True]), torch.tensor([False, False])] if gqa == "kv-groups" else \
        [torch.tensor([True, False, False, True]), torch.zeros(4, dtype=torch.bool)]
    cp = [torch.arange(96) < 16, torch.arange(96) >= 90]
    return masks.Masks.from_pruned(ARCH, hp, cp, gqa, model="m")


def test_from_pruned_keeps_whole_groups_or_balanced_query_heads():
    m = _masks("kv-groups")
    assert (m.layers[0].heads, m.layers[0].kv_heads) == ([0, 1], [0])
    assert m.layers[0].channels == list(range(16, 96)) and len(m.layers[1].channels) == 90
    q = _masks("query-heads")
    assert (q.layers[0].heads, q.layers[0].kv_heads) == ([1, 2], [0, 1])
    assert not m.is_uniform() and m.width_layout() == "per-layer"
    assert masks.Masks.full(ARCH).width_layout() == "uniform"


def test_json_round_trip_and_the_recorded_layout(tmp_path):
    m = _masks()
    m.save(tmp_path / artifacts.MASKS)
    doc = json.loads((tmp_path / artifacts.MASKS).read_text())
    assert doc["schema_version"] == artifacts.MASKS_SCHEMA and doc["layout"] == "per-layer"
    back = masks.Masks.load(tmp_path / artifacts.MASKS, ARCH)
    assert [vars(x) for x in back.layers] == [vars(x) for x in m.layers] and back.model == "m"
    again = masks.Masks.from_json(doc)  # the architecture read back from the file
    assert again.arch.num_heads == 4 and again.block_params() == m.block_params()


def test_a_file_for_another_model_or_a_broken_file_is_refused():
    doc = _masks().to_json()
    with pytest.raises(MismatchError, match="num_attention_heads"):
        masks.Masks.from_json({**doc, "num_attention_heads": 8}, ARCH)
    with pytest.raises(MismatchError, match="schema_version"):
        masks.Masks.from_json({**doc, "schema_version": 99})
    bad = json.loads(json.dumps(doc))
    bad["layers"][0]["attention_heads"] = [0, 2]  # query head 2 belongs to the pruned key/value head 1
    with pytest.raises(MismatchError, match="pruned key/value head"):
        masks.Masks.from_json(bad, ARCH)
    bad["layers"][0]["attention_heads"] = [1, 0]
    with pytest.raises(MismatchError, match="sorted"):
        masks.Masks.from_json(bad, ARCH)
    bad = json.loads(json.dumps(doc))
    bad["layers"][1]["mlp_channels"] = []
    with pytest.raises(MismatchError, match="at least one"):
        masks.Masks.from_json(bad, ARCH)


def test_row_masks_and_round_to_violations():
    m = _masks()
    rm = m.row_masks(0)
    assert rm["q_proj"].sum() == 2 * ARCH.head_dim and rm["k_proj"].sum() == ARCH.head_dim
    assert torch.equal(rm["o_proj"], rm["q_proj"]) and rm["down_proj"].sum() == 80
    assert masks.round_to_violations(m) == []
    m.info["round_to"] = 8
    assert masks.round_to_violations(m) == [1]  # 90 kept channels; layer 0 keeps 80


def test_apply_masks_sets_the_lora_layers_buffers():
    model = build_model(tiny_config(gqa=True))
    with pytest.raises(LptError, match="no LoRA layer"):
        masks.apply_masks(model, _masks())
    layers = lora.inject(model, ARCH, r=0, alpha=1)
    m = _masks()
    masks.apply_masks(model, m)
    for proj, v in m.row_masks(0).items():
        layer = layers[ARCH.module_path(0, proj)]
        buf = layer.in_mask if proj in ("o_proj", "down_proj") else layer.out_mask
        assert torch.equal(buf.cpu().float(), v)
