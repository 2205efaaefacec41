"""Depth and hidden-size pruning: masks with removed blocks and hidden channels -> masked model == sliced model reloaded
by plain transformers, for every family, tied and untied embeddings; parameter counts; the adapter sliced with them;
merge == masked."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lpt import lora
from lpt.arch import describe, supported_model_types
from lpt.masks import Masks, apply_masks
from test_families import EXTRA, SEQ, build, family_config

# float32 masked vs sliced; the sliced RMS norms act as if their epsilon were eps * k / d (lpt.slicing), so the
# tiny random models (mean square of the residual ~1e-2) use eps=1e-12 to test the slicing, not the epsilon.
TOL = dict(rtol=1e-4, atol=1e-4)
EPS = dict(rms_norm_eps=1e-12)


def axes_masks(arch, removed, hidden_keep, seed=0, per_layer=False) -> Masks:
    """Masks removing blocks ``removed``, keeping ``hidden_keep`` hidden channels (random choice), one kv group and a
    third of the MLP channels of every layer (``per_layer``: the kv group of layer 0 only)."""
    g = torch.Generator().manual_seed(seed)
    hp = [torch.tensor([u == (i % arch.num_kv_heads) for u in range(arch.num_kv_heads)]) if i == 0 or not per_layer
          else torch.zeros(arch.num_kv_heads, dtype=torch.bool) for i in range(arch.num_layers)]
    cp = [torch.arange(arch.intermediate_size) % 3 == (i % 3) for i in range(arch.num_layers)]
    blocks = torch.zeros(arch.num_layers, dtype=torch.bool)
    blocks[removed] = True
    hidden = None
    if hidden_keep is not None:
        hidden = torch.ones(arch.hidden_size, dtype=torch.bool)
        hidden[torch.randperm(arch.hidden_size, generator=g)[:hidden_keep]] = False
    return Masks.from_pruned(arch, hp, cp, "kv-groups", blocks_pruned=blocks, hidden_pruned=hidden)


CASES = {f"{mt}-{what}": (mt, what) for mt in supported_model_types() for what in ("depth", "hidden", "both")}
CASES.update({f"{mt}-both-tied": (mt, "both-tied") for mt in ("llama", "gemma2", "qwen2")})
CASES["llama-both-per-layer"] = ("llama", "both-per-layer")


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, tiny_tokenizer_dir):
    from lpt.config import SliceConfig
    from lpt.stages import slice as slice_stage

    model_type, what = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    extra = {**EXTRA.get(model_type, {}), **EPS, "num_hidden_layers": 4}
    extra["tie_word_embeddings"] = what.endswith("tied")
    cfg = family_config(model_type, **extra)
    build(cfg, split=False).save_pretrained(tmp / "model")  # as transformers writes it (Phi-3: fused layers)
    model = build(cfg)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, tmp / "model" / f.name)
    arch = describe(cfg)
    removed = [] if what == "hidden" else [1, 2] if what.startswith("both") else [2]
    masks = axes_masks(arch, removed, None if what == "depth" else 40, per_layer=what.endswith("per-layer"))
    masks.save(tmp / "masks.json")
    lora.inject(model, arch, r=4, alpha=8.0)
    with torch.no_grad():  # non-zero B: LoRA changes the function, and the adapter must be sliced with the model
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.05)
    apply_masks(model, masks)
    with torch.no_grad():
        masked = model(SEQ).logits
    lora.save_adapter(model, tmp / "adapter", base_model=str(tmp / "model"))
    out = slice_stage.run(SliceConfig(model=str(tmp / "model"), masks=str(tmp / "masks.json"),
                                      adapter=str(tmp / "adapter"), merge=True, output=str(tmp / "sliced"),
                                      device="cpu", dtype="float32"))
    return dict(arch=arch, masks=masks, masked=masked, out=out, cfg=cfg, tmp=tmp, model_type=model_type)


def test_masked_equals_sliced_reloaded_in_plain_transformers(case):
    from transformers import AutoModelForCausalLM

    per_layer = not case["masks"].is_uniform()
    sliced = AutoModelForCausalLM.from_pretrained(case["out"], dtype=torch.float32, trust_remote_code=per_layer)
    with torch.no_grad():
        got = sliced.eval()(SEQ).logits
    torch.testing.assert_close(got, case["masked"], **TOL)
    doc = json.loads((case["out"] / "config.json").read_text())
    m = case["masks"]
    assert doc["num_hidden_layers"] == case["arch"].num_layers - len(m.removed)
    assert doc["hidden_size"] == m.hidden_size()
    before, after = m.model_params()
    assert before == sum(p.numel() for p in build(case["cfg"]).parameters())
    assert sum(p.numel() for p in sliced.parameters()) == after
    for key, value in doc.items():  # per-layer lists (layer_types) renumbered with the blocks
        if "layer" in key and isinstance(value, list):
            assert len(value) == doc["num_hidden_layers"], key


def test_sliced_adapter_on_sliced_base_equals_masked(case, tmp_path):
    """slice without --merge: the sliced adapter on the sliced (unmerged) base computes the masked model."""
    from lpt import models
    from lpt.config import SliceConfig
    from lpt.stages import slice as slice_stage

    tmp = case["tmp"]
    out = slice_stage.run(SliceConfig(model=str(tmp / "model"), masks=str(tmp / "masks.json"),
                                      adapter=str(tmp / "adapter"), output=str(tmp_path / "s"), device="cpu",
                                      dtype="float32"))
    loaded = models.load(str(out), models.LoadOptions(adapter=out / "adapter", dtype="float32", device="cpu"))
    with torch.no_grad():
        got = loaded.model(SEQ).logits
    torch.testing.assert_close(got, case["masked"], **TOL)


def test_merge_with_masks_equals_masked(case, tmp_path):
    """lpt merge keeps the shapes: removed blocks' o_proj / down_proj and the removed hidden channels are zero."""
    from transformers import AutoModelForCausalLM

    from lpt.config import MergeConfig
    from lpt.stages import merge as merge_stage

    tmp = case["tmp"]
    out = merge_stage.run(MergeConfig(model=str(tmp / "model"), adapter=str(tmp / "adapter"),
                                      masks=str(tmp / "masks.json"), output=str(tmp_path / "m"), device="cpu",
                                      dtype="float32"))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():  # shapes as the source's: no per-layer classes
        got = merged.eval()(SEQ).logits
    torch.testing.assert_close(got, case["masked"], rtol=1e-5, atol=1e-5)


def test_masks_json_v1_still_reads(tmp_path):
    cfg = family_config("llama")
    arch = describe(cfg)
    m = axes_masks(arch, [], None)
    doc = m.to_json()
    doc["schema_version"] = 1
    for key in ("removed_layers", "hidden_channels", "vocab_size", "tie_word_embeddings"):
        doc.pop(key)
    back = Masks.from_json(doc, arch)
    assert back.removed == [] and back.hidden is None and back.layers == m.layers


@pytest.mark.parametrize("bad, msg", [
    ({"removed_layers": [0, 1]}, "every block"),
    ({"removed_layers": [3]}, "out of range"),
    ({"removed_layers": [True]}, "not an integer"),
    ({"hidden_channels": []}, "keeps no channel"),
    ({"hidden_channels": [5, 2]}, "sorted and unique"),
])
def test_masks_v2_fields_are_validated(bad, msg):
    from lpt.errors import MismatchError

    arch = describe(family_config("llama"))
    doc = {**axes_masks(arch, [], None).to_json(), **bad}
    with pytest.raises(MismatchError, match=msg):
        Masks.from_json(doc, arch)


def test_report_masks_picture_and_text_show_removed_blocks_and_hidden_channels(tmp_path):
    """lpt run's report: the masks picture draws removed blocks (whole grey rows, marked on the layer axis) and the
    hidden-channel strip; the section's text names the removed blocks, the kept hidden size and the searched mix."""
    pytest.importorskip("matplotlib")
    from lpt import report

    cfg = family_config("llama")
    arch = describe(cfg)
    masks = axes_masks(arch, [1], arch.hidden_size - 8)
    doc = json.loads(json.dumps(masks.to_json()))
    doc["info"] = {"search": {"axes": ["width", "depth", "hidden"], "target": {"blocks": 1, "hidden_channels": 8,
                                                                               "attention_units": 1, "mlp_channels": 4},
                              "candidates": [{"loss": 1.0}, {"loss": 2.0}]}}
    png = report.plot_masks(doc, tmp_path / "masks.png")
    assert png is not None and png.stat().st_size > 0
    plain = dict(doc, removed_layers=[], hidden_channels=None)
    report.plot_masks(plain, tmp_path / "plain.png")
    # the hidden strip makes the picture taller than the one without it
    from PIL import Image

    assert Image.open(png).size[1] > Image.open(tmp_path / "plain.png").size[1]
    run = report.RunFiles(tmp_path, {}, {}, [], None, None, None, None, doc, None)
    text = " ".join(b[1] for b in report._masks_section(run, pictures=False) if b[0] == "p")
    assert f"Depth: 1 of {arch.num_layers} blocks removed (1)" in text
    assert f"Hidden size: {arch.hidden_size - 8} of {arch.hidden_size} residual channels kept" in text
    assert "Search over width, depth, hidden (2 candidates" in text and "1 block(s), 8 hidden channel(s)" in text
