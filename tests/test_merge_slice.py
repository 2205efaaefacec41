"""lpt merge / lpt slice on tiny random Llamas (with and without grouped-query attention), end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import invoke, tiny_config
from lpt import artifacts, int8, lora, slicing
from lpt.masks import Masks
from lpt.arch import describe

SEQ = torch.randint(0, 384, (2, 10), generator=torch.Generator().manual_seed(7))
TOL = dict(rtol=1e-4, atol=1e-4)

# name -> (model fixture, gqa mode, pruned heads per layer (in gqa-unit space), pruned-channel rule per layer)
CASES = {
    "gqa-kvgroups-uniform": ("tiny_llama_dir", "kv-groups", [[1], [0]], [lambda c: c % 4 == 1, lambda c: c % 4 == 2]),
    "gqa-queryheads-perlayer": ("tiny_llama_dir", "query-heads", [[1, 2], []], [lambda c: c % 3 == 0,
                                                                                lambda c: c % 5 == 0]),
    "mha-uniform": ("tiny_mha_dir", "kv-groups", [[0, 3], [1, 2]], [lambda c: c < 30, lambda c: c >= 66]),
    "mha-perlayer": ("tiny_mha_dir", "kv-groups", [[2], [0, 1, 3]], [lambda c: c % 2 == 0, lambda c: c < 10]),
}


def load(path, lora_dir=None, masks=None, load_8bit=False):
    """A model directory as lpt loads it (per-layer directories through lpt.modeling), optionally with LoRA + masks."""
    from lpt import models

    return models.load(str(path), models.LoadOptions(dtype="float32", device="cpu", tokenizer=False, adapter=lora_dir,
                                                     masks=masks, load_8bit=load_8bit)).model


def make_prune_dir(model_dir, out, gqa_mode, heads, channels, seed=0, nan=False):
    """What lpt prune writes: a PEFT adapter with non-zero B and masks.json (made the same way prune makes them)."""
    model = load(model_dir)
    arch = describe(model.config)
    lora.inject(model, arch, r=4, alpha=8.0)
    g = torch.Generator().manual_seed(seed)
    for layer in lora.lora_layers(model).values():
        layer.lora_B.weight.data = torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05
        layer.lora_A.weight.data = torch.randn(layer.lora_A.weight.shape, generator=g) * 0.1
    units = arch.num_kv_heads if gqa_mode == "kv-groups" else arch.num_heads
    hp = [torch.tensor([u in h for u in range(units)]) for h in heads]
    cp = [rule(torch.arange(arch.intermediate_size)) for rule in channels]
    masks = Masks.from_pruned(arch, hp, cp, gqa_mode, model=str(model_dir))
    out.mkdir(parents=True)
    lora.save_adapter(model, out, base_model=str(model_dir))
    if nan:  # what a diverged run of an older lpt wrote (save_adapter refuses non-finite factors now)
        from safetensors.torch import load_file

        sd = load_file(out / artifacts.ADAPTER_WEIGHTS)
        sd[next(k for k in sorted(sd) if k.endswith("lora_B.weight"))][0, 0] = float("nan")
        artifacts.save_tensors(sd, out / artifacts.ADAPTER_WEIGHTS)
    masks.save(out / artifacts.MASKS)
    return out, masks


def ok(runner, args):
    r = invoke(runner, args)
    assert r.exit_code == 0, r.output
    return r


def weights(path):
    from safetensors.torch import load_file

    files = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
    out = {}
    for f in files:
        out.update(load_file(os.path.join(path, f)))
    return out


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """One pruned tiny model run through slice (+adapter), merge of the sliced pair, and merge-then-slice."""
    from typer.testing import CliRunner

    name = request.param
    fixture, gqa_mode, heads, channels = CASES[name]
    model_dir = request.getfixturevalue(fixture)
    tmp = tmp_path_factory.mktemp(name)
    prune_dir, masks = make_prune_dir(model_dir, tmp / "prune", gqa_mode, heads, channels)
    runner = CliRunner()
    m = str(prune_dir / artifacts.MASKS)
    f32 = ["--device", "cpu", "--dtype", "float32"]  # the equivalences below compare float32 numbers
    ok(runner, ["slice", model_dir, "--masks", m, "--adapter", prune_dir, "-o", tmp / "sliced", *f32])
    ok(runner, ["merge", tmp / "sliced", "--adapter", tmp / "sliced" / "adapter", "-o", tmp / "sliced-merged",
                *f32, "--max-shard-size", "200KB"])
    ok(runner, ["merge", model_dir, "--adapter", prune_dir, "--masks", m, "-o", tmp / "merged", *f32])
    ok(runner, ["slice", tmp / "merged", "--masks", m, "-o", tmp / "merged-sliced", *f32])
    with torch.no_grad():
        masked = load(model_dir, prune_dir, masks)(SEQ).logits
    return dict(name=name, model_dir=model_dir, prune=prune_dir, masks=masks, tmp=tmp, masked=masked)


def test_sliced_config_and_files(case):
    cfg = json.loads((case["tmp"] / "sliced" / "config.json").read_text())
    masks, uniform = case["masks"], case["name"].endswith("uniform")
    assert masks.is_uniform() == uniform
    assert cfg["head_dim"] == 16 and cfg["model_type"] == "llama" and cfg["use_cache"] is True
    if uniform:
        m0 = masks.layers[0]
        assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == (
            len(m0.heads), len(m0.kv_heads), len(m0.channels))
        assert not any(k.startswith("lpt_layer_") for k in cfg) and "auto_map" not in cfg
        assert cfg["architectures"] == ["LlamaForCausalLM"]
    else:
        assert cfg["lpt_layer_num_attention_heads"] == [len(m.heads) for m in masks.layers]
        assert cfg["lpt_layer_num_key_value_heads"] == [len(m.kv_heads) for m in masks.layers]
        assert cfg["lpt_layer_intermediate_size"] == [len(m.channels) for m in masks.layers]
        assert cfg["auto_map"] == {"AutoModelForCausalLM": "modeling_lpt.LptLlamaForCausalLM"}
        assert (case["tmp"] / "sliced" / "modeling_lpt.py").is_file()
    assert (case["tmp"] / "sliced" / "tokenizer.json").is_file()
    assert not (case["tmp"] / "sliced" / artifacts.ADAPTER_CONFIG).exists()  # would hijack from_pretrained
    # the sliced adapter is a PEFT directory for the sliced model
    acfg = json.loads((case["tmp"] / "sliced" / "adapter" / artifacts.ADAPTER_CONFIG).read_text())
    assert acfg["peft_type"] == "LORA" and acfg["r"] == 4
    # provenance: source model, adapter and masks with hashes, lpt version
    for d, stage in (("sliced", "slice"), ("sliced-merged", "merge"), ("merged", "merge")):
        prov = json.loads((case["tmp"] / d / artifacts.PROVENANCE).read_text())
        assert prov["stage"] == stage and prov["lpt_version"] and prov["versions"]["torch"]
        assert prov["adapter"]["sha256"] and prov["source_model"]
    prov = json.loads((case["tmp"] / "sliced" / artifacts.PROVENANCE).read_text())
    assert prov["masks"]["sha256"] == slicing_sha(case["prune"] / artifacts.MASKS)
    # --max-shard-size: sharded with an index
    assert (case["tmp"] / "sliced-merged" / "model.safetensors.index.json").is_file()


def slicing_sha(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_masked_equals_sliced(case):
    masks = case["masks"]
    with torch.no_grad():
        # sliced base + sliced adapter, unmerged
        unmerged = load(case["tmp"] / "sliced", case["tmp"] / "sliced" / "adapter")
        torch.testing.assert_close(unmerged(SEQ).logits, case["masked"], **TOL)
        # ... and peft reads the sliced adapter for the sliced model too
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(load(case["tmp"] / "sliced"), str(case["tmp"] / "sliced" / "adapter"))
        torch.testing.assert_close(peft_model(SEQ).logits, case["masked"], **TOL)
        # sliced, merged (slice -> merge); eager attention reads each layer's key/value group size from the module
        sliced = load(case["tmp"] / "sliced-merged")
        torch.testing.assert_close(sliced(SEQ).logits, case["masked"], **TOL)
        sliced.set_attn_implementation("eager")
        torch.testing.assert_close(sliced(SEQ).logits, case["masked"], **TOL)
        # masked merged (shape preserving) and merged -> sliced
        torch.testing.assert_close(load(case["tmp"] / "merged")(SEQ).logits, case["masked"], **TOL)
        torch.testing.assert_close(load(case["tmp"] / "merged-sliced")(SEQ).logits, case["masked"], **TOL)
    # merge-then-slice and slice-then-merge give the same weights
    a, b = weights(case["tmp"] / "merged-sliced"), weights(case["tmp"] / "sliced-merged")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    # the in-memory API agrees with the files: slice a LoRA-carrying masked model, still unmerged
    model = load(case["model_dir"], case["prune"], masks)
    slicing.slice_model(model, masks)
    assert all(not layer._mask_out and not layer._mask_in for layer in lora.lora_layers(model).values())
    model.set_attn_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(model(SEQ).logits, case["masked"], **TOL)


def test_param_count_is_what_masks_promised(case):
    masks = case["masks"]
    before, after = masks.block_params()
    assert after < before
    base = load(case["model_dir"])
    sliced = load(case["tmp"] / "sliced-merged")
    arch = describe(sliced.config)
    assert slicing.linear_block_params(sliced, arch) == after
    assert sum(p.numel() for p in sliced.parameters()) == sum(p.numel() for p in base.parameters()) - (before - after)
    assert sum(arch.block_linear_params(i) for i in range(arch.num_layers)) == after
    doc = json.loads((case["prune"] / artifacts.MASKS).read_text())
    assert doc["params"]["blocks_after"] == after


def test_fresh_process_plain_transformers(case):
    """The sliced merged directory loads in a Python that never imports lpt, and gives the same logits."""
    out = case["tmp"] / "fresh.pt"
    torch.save(SEQ, case["tmp"] / "seq.pt")
    trust = not case["name"].endswith("uniform")
    code = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(case['tmp'] / 'sliced-merged')!r}, trust_remote_code={trust})
        seq = torch.load({str(case['tmp'] / 'seq.pt')!r})
        with torch.no_grad():
            logits = m(seq).logits
            # generation with the key/value cache (per-layer key/value widths) == greedy decoding without it
            gen = m.generate(seq[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=2)
            ids = seq[:1, :4]
            for _ in range(5):
                ids = torch.cat([ids, m(ids).logits[:, -1:].argmax(-1)], 1)
        assert gen.tolist() == ids.tolist(), (gen, ids)
        if {trust}:  # without trust_remote_code the per-layer directory is refused, never silently mis-loaded
            try:
                AutoModelForCausalLM.from_pretrained({str(case['tmp'] / 'sliced-merged')!r})
            except Exception:
                pass
            else:
                raise AssertionError("per-layer model loaded without its modeling code")
        assert not any(k == "lpt" or k.startswith("lpt.") for k in sys.modules), "lpt was imported"
        torch.save({{"logits": logits, "cls": type(m).__name__}}, {str(out)!r})
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    r = subprocess.run([sys.executable, "-c", code], cwd=case["tmp"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(out)
    assert got["cls"] == ("LptLlamaForCausalLM" if trust else "LlamaForCausalLM")
    torch.testing.assert_close(got["logits"], case["masked"], **TOL)


# ------------------------------------------------------------------------------------------------ contract
def _write_masks(path, doc):
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def gqa_prune(tiny_llama_dir, tmp_path_factory):
    d, masks = make_prune_dir(tiny_llama_dir, tmp_path_factory.mktemp("gp") / "prune", "kv-groups", [[0], [1]],
                              [lambda c: c < 8, lambda c: c < 8])
    return d, masks


def _mismatched(doc, kind):
    doc = json.loads(json.dumps(doc))
    if kind == "layers":
        doc["num_hidden_layers"] = 3
        doc["layers"].append(dict(doc["layers"][0], layer=2))
    elif kind == "layers-unlabelled":  # no header: the layer list itself disagrees with the model
        del doc["num_hidden_layers"]
        doc["layers"] = doc["layers"][:1]
    elif kind == "partial-head":  # query heads of one key/value group only partly kept (group size 2)
        doc["layers"][0]["attention_heads"] = [2]
        doc["layers"][0]["kv_heads"] = [1]
        doc["layers"][1]["attention_heads"] = [0, 1, 2]
        doc["layers"][1]["kv_heads"] = [0, 1]
    elif kind == "architecture":
        doc["model_type"] = "mistral"
        doc["architecture"] = "mistral"
    elif kind == "head-size":
        doc["head_dim"] = 32
    return doc


@pytest.mark.parametrize("kind,needle", [
    ("layers", "num_hidden_layers=3"),
    ("layers-unlabelled", "masks have 1 layers but the model has 2"),
    ("partial-head", "same number"),
    ("architecture", "architecture=mistral"),
    ("head-size", "head_dim=32"),
])
def test_mismatched_masks_refused(runner, tiny_llama_dir, gqa_prune, tmp_path, kind, needle):
    doc = json.loads((gqa_prune[0] / artifacts.MASKS).read_text())
    bad = _write_masks(tmp_path / "bad.json", _mismatched(doc, kind))
    for cmd in (["slice", tiny_llama_dir, "--masks", bad], ["merge", tiny_llama_dir, "--adapter", gqa_prune[0],
                                                             "--masks", bad]):
        r = invoke(runner, [*cmd, "-o", tmp_path / "out", "--device", "cpu"])
        assert r.exit_code == 2, r.output
        assert needle in r.output and r.output.strip().count("\n") == 0, r.output
        assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_masks_for_other_model_and_wrong_adapter_refused(runner, tiny_llama_dir, tiny_mha_dir, gqa_prune, tmp_path):
    m = gqa_prune[0] / artifacts.MASKS
    r = invoke(runner, ["slice", tiny_mha_dir, "--masks", m, "-o", tmp_path / "o1", "--device", "cpu"])
    assert r.exit_code == 2 and "num_key_value_heads=2 but the model has num_key_value_heads=4" in r.output
    # an adapter made for the GQA model does not fit the MHA model
    r = invoke(runner, ["merge", tiny_mha_dir, "--adapter", gqa_prune[0], "-o", tmp_path / "o2", "--device", "cpu"])
    assert r.exit_code == 2 and "k_proj" in r.output, r.output
    # a sliced adapter is not the unsliced model's
    ok(runner, ["slice", tiny_llama_dir, "--masks", m, "--adapter", gqa_prune[0], "-o", tmp_path / "s"])
    r = invoke(runner, ["merge", tiny_llama_dir, "--adapter", tmp_path / "s" / "adapter", "-o", tmp_path / "o3"])
    assert r.exit_code == 2 and "sliced one" in r.output, r.output
    # slicing an already per-layer sliced model, --merge without --adapter, missing --adapter / --masks
    r = invoke(runner, ["slice", tiny_llama_dir, "--masks", m, "--merge", "-o", tmp_path / "o4"])
    assert r.exit_code == 2 and "--merge needs --adapter" in r.output
    assert invoke(runner, ["slice", tiny_llama_dir, "-o", tmp_path / "o5"]).exit_code == 2
    assert invoke(runner, ["merge", tiny_llama_dir, "-o", tmp_path / "o6"]).exit_code == 2
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))
    # existing output refused without --overwrite, replaced with it
    r = invoke(runner, ["slice", tiny_llama_dir, "--masks", m, "-o", tmp_path / "s"])
    assert r.exit_code == 2 and "--overwrite" in r.output
    ok(runner, ["slice", tiny_llama_dir, "--masks", m, "-o", tmp_path / "s", "--overwrite"])
    assert not (tmp_path / "s" / "adapter").exists()


def test_all_ones_mask_is_identity(runner, tiny_llama_dir, tmp_path):
    arch = describe(tiny_config())
    full = Masks.full(arch)
    full.save(tmp_path / "full.json")
    (tmp_path / "recipe.yaml").write_text(f"slice:\n  masks: {tmp_path / 'full.json'}\n  dtype: float32\n")
    ok(runner, ["slice", tiny_llama_dir, "--recipe", tmp_path / "recipe.yaml", "-o", tmp_path / "same"])
    assert json.loads((tmp_path / "same" / artifacts.PROVENANCE).read_text())["masks"]["layout"] == "uniform"
    a, b = weights(tiny_llama_dir), weights(tmp_path / "same")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (tiny_llama_dir, tmp_path / "same"))
    for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim", "hidden_size"):
        assert ca[k] == cb[k]


def test_auto_dtype_is_the_checkpoints_and_recorded(runner, tiny_llama_dir, gqa_prune, tmp_path):
    """A checkpoint that declares bfloat16 is sliced and merged to bfloat16 (about half the float32 bytes), float32
    only with --dtype float32; lpt_provenance.json says which and why; bfloat16 stays close to float32."""
    prune_dir, masks = gqa_prune
    src = tmp_path / "bf16"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).save_pretrained(src)
    for f in tiny_llama_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, src / f.name)
    assert json.loads((src / "config.json").read_text())["dtype"] == "bfloat16"
    m = prune_dir / artifacts.MASKS
    ok(runner, ["slice", src, "--masks", m, "--adapter", prune_dir, "--merge", "-o", tmp_path / "s16"])
    ok(runner, ["slice", src, "--masks", m, "--adapter", prune_dir, "--merge", "--dtype", "float32",
                "-o", tmp_path / "s32"])
    ok(runner, ["merge", src, "--adapter", prune_dir, "-o", tmp_path / "m16"])
    for d, want, why in (("s16", torch.bfloat16, "declares bfloat16"), ("s32", torch.float32, "--dtype float32"),
                         ("m16", torch.bfloat16, "declares bfloat16")):
        prov = json.loads((tmp_path / d / artifacts.PROVENANCE).read_text())
        assert prov["dtype"] == str(want).replace("torch.", "") and why in prov["dtype_reason"]
        assert all(t.dtype == want for t in weights(tmp_path / d).values())
    size = {d: sum(f.stat().st_size for f in (tmp_path / d).glob("*.safetensors")) for d in ("s16", "s32")}
    assert size["s16"] < 0.52 * size["s32"]
    with torch.no_grad():
        l16 = load(tmp_path / "s16")(SEQ).logits
        l32 = load(tmp_path / "s32")(SEQ).logits
    assert (l16 - l32).abs().max() < 0.05 * l32.abs().max()


def test_merge_8bit_base_and_dtype(runner, tiny_llama_dir, gqa_prune, tmp_path):
    prune_dir, masks = gqa_prune
    ok(runner, ["merge", tiny_llama_dir, "--adapter", prune_dir, "--load-8bit", "--dtype", "float16",
                "-o", tmp_path / "m8"])
    cfg = json.loads((tmp_path / "m8" / "config.json").read_text())
    assert cfg["dtype"] == "float16" and "quantization_config" not in cfg
    got = weights(tmp_path / "m8")
    assert got["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float16
    # every projection is de-quantized int8 + s·B·A
    ref = load(tiny_llama_dir, prune_dir, load_8bit=True)
    for path, layer in lora.lora_layers(ref).items():
        want = (int8.dense_weight(layer.base_layer) + layer.delta()).half()
        torch.testing.assert_close(got[f"{path}.weight"], want, rtol=0, atol=1e-3)
    # int8 ≈ dense: the 8-bit merge stays close to the full-precision one
    ok(runner, ["merge", tiny_llama_dir, "--adapter", prune_dir, "-o", tmp_path / "m32"])
    with torch.no_grad():
        l8 = load(tmp_path / "m8")(SEQ).logits
        l32 = load(tmp_path / "m32")(SEQ).logits
    assert (l8 - l32).abs().max() < 0.05 * l32.abs().max()
    prov = json.loads((tmp_path / "m8" / artifacts.PROVENANCE).read_text())
    assert prov["load_8bit"] is True and prov["dtype"] == "float16"
    # an adapter directory that records prune --load-8bit is merged onto the int8 base by default
    import shutil

    rec = shutil.copytree(prune_dir, tmp_path / "p8")
    (rec / artifacts.RESOLVED_CONFIG).write_text(json.dumps({"stage": "prune", "config": {"load_8bit": True,
                                                                                          "int8_backend": "torch"}}))
    ok(runner, ["merge", tiny_llama_dir, "--adapter", rec, "--dtype", "float16", "-o", tmp_path / "m8b"])
    again = weights(tmp_path / "m8b")
    assert all(torch.equal(again[k], got[k]) for k in got)
    ok(runner, ["merge", tiny_llama_dir, "--adapter", rec, "--no-load-8bit", "-o", tmp_path / "m32b"])
    assert torch.equal(weights(tmp_path / "m32b")["model.layers.0.mlp.up_proj.weight"],
                       weights(tmp_path / "m32")["model.layers.0.mlp.up_proj.weight"])


def test_slice_model_int8_lora(tiny_llama_dir, gqa_prune):
    """slice_model on a model whose LoRA layers wrap int8 bases (as prune --load-8bit holds it)."""
    prune_dir, masks = gqa_prune
    model = load(tiny_llama_dir, prune_dir, masks, load_8bit=True)
    with torch.no_grad():
        want = model(SEQ).logits
        slicing.slice_model(model, masks)
        got = model(SEQ).logits
    layer = lora.lora_layers(model)["model.layers.0.self_attn.k_proj"]
    assert int8.is_int8(layer.base_layer) and layer.out_features == 16 and layer.lora_B.weight.shape == (16, 4)
    assert (got - want).abs().max() < 0.02 * want.abs().max()


def test_non_finite_adapter_refused(runner, tiny_llama_dir, tmp_path):
    d, _ = make_prune_dir(tiny_llama_dir, tmp_path / "p", "kv-groups", [[1], [1]], [lambda c: c < 4] * 2, nan=True)
    r = invoke(runner, ["merge", tiny_llama_dir, "--adapter", d, "-o", tmp_path / "m"])
    assert r.exit_code == 2 and "non-finite" in r.output and not (tmp_path / "m").exists()
    r = invoke(runner, ["slice", tiny_llama_dir, "--masks", d / artifacts.MASKS, "--adapter", d, "--merge",
                        "-o", tmp_path / "s"])
    assert r.exit_code == 2 and "non-finite" in r.output and not (tmp_path / "s").exists()
    # without --merge the adapter is not copied through into OUT/adapter/, and eval does not measure it
    r = invoke(runner, ["slice", tiny_llama_dir, "--masks", d / artifacts.MASKS, "--adapter", d, "-o", tmp_path / "s"])
    assert r.exit_code == 2 and "non-finite" in r.output and str(d) in r.output and not (tmp_path / "s").exists()
    r = invoke(runner, ["eval", tiny_llama_dir, "--adapter", d, "--ppl", "builtin:pydoc:test", "--seq-len", "64",
                        "--max-segments", "1", "-o", tmp_path / "r.json"])
    assert r.exit_code == 2 and "non-finite" in r.output and not (tmp_path / "r.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no lock or temporary file left either


def test_slice_adapter_shapes(gqa_prune):
    prune_dir, masks = gqa_prune
    _, sd = lora.read_adapter(prune_dir)
    out = slicing.slice_adapter(sd, masks)
    p = "base_model.model.model.layers.0."
    assert out[p + "self_attn.q_proj.lora_B.weight"].shape == (32, 4)  # 2 of 4 query heads x 16
    assert out[p + "self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert out[p + "self_attn.o_proj.lora_A.weight"].shape == (4, 32)
    assert out[p + "self_attn.o_proj.lora_B.weight"].shape == (64, 4)
    assert out[p + "mlp.down_proj.lora_A.weight"].shape == (4, 88)
    kept = masks.layers[0].channels
    torch.testing.assert_close(out[p + "mlp.up_proj.lora_B.weight"], sd[p + "mlp.up_proj.lora_B.weight"][kept])


# ------------------------------------------------------------------------------------------------ reconstruction
def test_ridge_refit_is_least_squares():
    from lpt import reconstruct

    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 12, generator=g, dtype=torch.float64)
    X[:, 3] += 0.8 * X[:, 7]  # correlated inputs, so the kept columns can stand in for pruned ones
    W = torch.randn(5, 12, generator=g, dtype=torch.float64)
    keep = torch.tensor([0, 1, 2, 3, 5, 8, 9])
    got = reconstruct.ridge_refit(W, X.T @ X, keep, damp=0.0)
    want = torch.linalg.lstsq(X[:, keep], X @ W.T).solution.T
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)
    # keeping every column with no damping returns the weight itself
    torch.testing.assert_close(reconstruct.ridge_refit(W, X.T @ X, torch.arange(12), damp=0.0), W)
    # the refit explains the dense output better than dropping the columns
    err_fit = ((X[:, keep] @ got.T - X @ W.T) ** 2).sum()
    err_drop = ((X[:, keep] @ W[:, keep].T - X @ W.T) ** 2).sum()
    assert err_fit < err_drop


@pytest.mark.parametrize("mode", ["sequential", "independent"])
def test_slice_reconstruct_gets_closer_to_dense(runner, tiny_llama_dir, tiny_calib_dir, tmp_path, mode):
    from lpt import calibration

    arch = describe(tiny_config())
    heads = [torch.tensor([False, True]), torch.tensor([True, False])]
    chans = [torch.arange(96) % 3 == 0, torch.arange(96) < 40]
    masks = Masks.from_pruned(arch, heads, chans, "kv-groups", model=str(tiny_llama_dir))
    masks.save(tmp_path / "m.json")
    ok(runner, ["slice", tiny_llama_dir, "--masks", tmp_path / "m.json", "--dtype", "float32", "-o", tmp_path / "a"])
    ok(runner, ["slice", tiny_llama_dir, "--masks", tmp_path / "m.json", "--dtype", "float32",
                "--reconstruct", tiny_calib_dir, "--reconstruct-mode", mode, "-o", tmp_path / "b"])
    prov = json.loads((tmp_path / "b" / artifacts.PROVENANCE).read_text())
    assert prov["config"]["reconstruct"] == str(tiny_calib_dir)
    assert prov["config"]["reconstruct_mode"] == mode
    ids = calibration.load(tiny_calib_dir).tensors["input_ids"][:8]
    with torch.no_grad():
        dense = load(tiny_llama_dir)(ids).logits
        plain = load(tmp_path / "a")(ids).logits
        refit = load(tmp_path / "b")(ids).logits
    assert plain.shape == refit.shape
    e_refit, e_plain = float(((refit - dense) ** 2).mean()), float(((plain - dense) ** 2).mean())
    assert e_refit < 0.9 * e_plain
    # an unmerged adapter was not trained on refitted weights: refused before anything is written
    r = invoke(runner, ["slice", tiny_llama_dir, "--masks", tmp_path / "m.json", "--adapter", tmp_path,
                        "--reconstruct", tiny_calib_dir, "-o", tmp_path / "c"])
    assert r.exit_code == 2 and "--merge" in r.output and not (tmp_path / "c").exists()


@pytest.mark.parametrize("mode", ["sequential", "independent"])
def test_reconstruct_with_nothing_pruned_and_no_damping_is_the_plain_merge(runner, tiny_llama_dir, tiny_calib_dir,
                                                                           tmp_path, mode):
    """With every column kept and no damping the refit must return the merged weight itself (W0 + s·B·A): a check
    that the base weight is never changed in place and that LoRA's delta is counted once."""
    d, _ = make_prune_dir(tiny_llama_dir, tmp_path / "p", "kv-groups", [[], []], [lambda c: c < 0, lambda c: c < 0])
    base = ["slice", tiny_llama_dir, "--masks", d / artifacts.MASKS, "--adapter", d, "--merge", "--dtype", "float32"]
    ok(runner, [*base, "-o", tmp_path / "plain"])
    ok(runner, [*base, "--reconstruct", tiny_calib_dir, "--reconstruct-damp", "0", "--reconstruct-mode", mode,
                "-o", tmp_path / "refit"])
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "refit")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)


def _masked_tiny(layers: int = 3, seed: int = 0):
    from conftest import build_model

    from lpt import models

    cfg = tiny_config(layers=layers)
    arch = describe(cfg)
    heads = [torch.tensor([i % 2 == 0, i % 2 == 1]) for i in range(layers)]
    chans = [(torch.arange(96) + i) % 3 == 0 for i in range(layers)]
    masks = Masks.from_pruned(arch, heads, chans, "kv-groups")
    model = build_model(cfg, seed=seed)
    models.attach(model, arch, masks=masks)
    return model, arch, masks, build_model(cfg, seed=seed)


def _batches(n: int = 12, seq: int = 24, bs: int = 4):
    ids = torch.randint(3, 200, (n, seq), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": ids[i:i + bs]} for i in range(0, n, bs)], ids


def test_sequential_refit_first_layer_is_the_independent_fit_and_leaves_the_model_as_it_was():
    """Layer 0's o_proj sees the same inputs in the pruned and the unpruned model, so the sequential and the
    independent refit agree there; later layers see the pruned model's own inputs and differ. The model comes back
    unchanged (modules, masks, outputs)."""
    from lpt import reconstruct

    model, arch, masks, _ = _masked_tiny()
    batches, ids = _batches()
    with torch.no_grad():
        before = model(ids).logits
    modules = {n: type(m) for n, m in model.named_modules()}
    seq = reconstruct.sequential_refit(model, arch, batches, masks, damp=0.01)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    assert {n: type(m) for n, m in model.named_modules()} == modules
    with lora.disabled(model):
        grams = reconstruct.collect_grams(model, arch, batches, range(arch.num_layers))
    ws = {k: int8.dense_weight(get(model, arch.module_path(*k)).base_layer) for k in seq}
    ind = reconstruct.refit_weights(ws, grams, masks, arch, damp=0.01)
    torch.testing.assert_close(seq[(0, "o_proj")], ind[(0, "o_proj")], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(seq[(2, "down_proj")], ind[(2, "down_proj")], rtol=1e-3, atol=1e-4)
    for (i, proj), w in seq.items():  # pruned columns stay zero
        pruned = torch.ones(w.shape[1], dtype=torch.bool)
        pruned[reconstruct.kept_columns(masks, arch, i, proj)] = False
        assert w[:, pruned].abs().max() == 0


def test_sequential_refit_is_least_squares_on_the_pruned_models_inputs():
    """The refit of the last layer's down_proj is the least-squares fit of that projection's full output from its
    kept inputs, both read from the pruned model with every earlier refit in place (checked against lstsq)."""
    from lpt import reconstruct

    model, arch, masks, _ = _masked_tiny()
    batches, ids = _batches()
    seq = reconstruct.sequential_refit(model, arch, batches, masks, damp=0.0)
    last = arch.num_layers - 1
    for (i, proj), w in seq.items():  # every refit but the last one in place: plain layers, masks as they were
        if (i, proj) != (last, "down_proj"):
            get(model, arch.module_path(i, proj)).base_layer.weight.data.copy_(w)
    down = get(model, arch.module_path(last, "down_proj"))
    got = {}
    h = down.register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(ids)  # masked: the kept inputs
        xk = got["x"][:, reconstruct.kept_columns(masks, arch, last, "down_proj")].double()
        gate_up = [get(model, arch.module_path(last, p)) for p in ("gate_proj", "up_proj")]
        for m in gate_up:
            m._mask_out = False
        model(ids)  # this layer's channels on: the full input
        for m in gate_up:
            m._mask_out = True
    h.remove()
    x = got["x"].double()
    want = torch.linalg.lstsq(xk, x @ down.base_layer.weight.double().T).solution.T
    keep = reconstruct.kept_columns(masks, arch, last, "down_proj")
    torch.testing.assert_close(seq[(last, "down_proj")][:, keep].double(), want, rtol=1e-3, atol=1e-4)


def get(model, path):
    from lpt.arch import get_module

    return get_module(model, path)


def test_unknown_reconstruct_mode_is_one_line(runner, tiny_llama_dir, tiny_calib_dir, tmp_path):
    d, _ = make_prune_dir(tiny_llama_dir, tmp_path / "p", "kv-groups", [[], []], [lambda c: c < 0, lambda c: c < 0])
    r = invoke(runner, ["slice", tiny_llama_dir, "--masks", d / artifacts.MASKS, "--reconstruct", tiny_calib_dir,
                        "--reconstruct-mode", "greedy", "-o", tmp_path / "s"])
    assert r.exit_code == 2 and "unknown --reconstruct-mode 'greedy'" in r.output and not (tmp_path / "s").exists()
