"""Phi-3 / Phi-4-mini: fused qkv_proj / gate_up_proj split while lpt works on the model (lpt.fused), fused again in
what it writes. Tiny random Phi-3 models built in-process: the split is exact, adapters are PEFT's layout of the
stock model and round-trip through lpt, prune -> slice -> merge -> eval on the command line, plain transformers
reloads the result, GGUF export where llama.cpp can load it, and one-line refusals where it cannot."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from conftest import VOCAB, invoke
from lpt import artifacts, fused, int8, llamacpp, lora, models
from lpt.arch import PROJECTIONS, describe, get_module
from lpt.errors import LptError
from lpt.masks import Masks

SEQ = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
TOL = dict(rtol=1e-4, atol=1e-4)
PHI3 = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2)
LONGROPE = dict(rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0, 1.1, 1.2, 1.3],
                                     long_factor=[2.0, 2.1, 2.2, 2.3], partial_rotary_factor=0.5),
                max_position_embeddings=1024, original_max_position_embeddings=256)


def F32(**kw):
    """lpt's loader options for the comparisons here: float32 on the CPU, no tokenizer."""
    return models.LoadOptions(**{"dtype": "float32", "device": "cpu", "tokenizer": False, **kw})


def phi3_config(**kw):
    from transformers import AutoConfig

    return AutoConfig.for_model("phi3", **{**PHI3, **kw})


def stock(cfg, seed=0):
    """A tiny random Phi-3 as transformers builds it (fused layers), weights with a larger spread."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return m.eval()


def model_dir(tmp_path, tok_dir, name="phi3", **kw):
    d = tmp_path / name
    stock(phi3_config(**kw)).save_pretrained(d)
    for f in tok_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d


def one_line(r, code=2):
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == code and len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


def logits(model, seq=SEQ):
    with torch.no_grad():
        return model(seq).logits


def plain(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------------ the split
@pytest.mark.parametrize("kw", [dict(partial_rotary_factor=0.5), dict(num_key_value_heads=4)])
def test_split_is_exact_and_fuse_gives_the_checkpoint_back(kw):
    m = stock(phi3_config(**kw))
    want = logits(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fused.split(m)
    arch = describe(m.config)
    for i in range(arch.num_layers):
        for p in PROJECTIONS:
            assert type(get_module(m, arch.module_path(i, p))) is torch.nn.Linear
    attn = m.model.layers[0].self_attn.qkv_proj
    assert isinstance(attn, fused.Split) and attn.names == ("q_proj", "k_proj", "v_proj")
    assert (attn.q_proj.out_features, attn.k_proj.out_features) == (64, arch.num_kv_heads * 16)
    assert torch.equal(logits(m), want)
    assert fused.split(m) is m and isinstance(m.model.layers[0].mlp.gate_up_proj, fused.Split)  # idempotent
    fused.fuse(m)
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_split_refuses_an_offloaded_layer_and_a_config_that_does_not_add_up():
    m = stock(phi3_config())
    m.model.layers[1].self_attn.qkv_proj.to("meta")
    with pytest.raises(LptError, match="offloaded"):
        fused.split(m)
    m = stock(phi3_config())
    m.config.intermediate_size = 90
    with pytest.raises(LptError, match="192 output rows but the config gives 90 \\+ 90"):
        fused.split(m)


def test_load_splits_and_every_int8_backend_and_device_map_work(tmp_path, tiny_tokenizer_dir):
    """lpt's one loader splits the fused layers: plain, --8bit (torch backend, quantized after the split) and
    --device-map (every layer on a device) give the stock model's logits (int8: close to them)."""
    d = model_dir(tmp_path, tiny_tokenizer_dir)
    want = logits(plain(d))
    got = models.load(str(d), F32())
    assert isinstance(got.model.model.layers[0].self_attn.qkv_proj, fused.Split) and got.arch.name == "phi3"
    torch.testing.assert_close(logits(got.model), want, rtol=0, atol=0)
    mapped = models.load(str(d), F32(device_map="auto"))
    torch.testing.assert_close(logits(mapped.model), want, **TOL)
    q = models.load(str(d), F32(load_8bit=True, int8_backend="torch"))
    paths = [q.arch.module_path(i, p) for i in range(2) for p in PROJECTIONS]
    assert "model.layers.0.self_attn.qkv_proj.q_proj" in paths
    assert all(int8.is_int8(get_module(q.model, p)) for p in paths)
    assert (logits(q.model) - want).abs().max() < 0.05 * want.abs().max()


# ------------------------------------------------------------------------------------------------ adapters
def _trained(cfg, targets=("q_proj", "o_proj", "up_proj")):
    m = fused.split(stock(cfg))
    arch = describe(m.config)
    lora.inject(m, arch, r=4, alpha=8.0, targets=targets)
    g = torch.Generator().manual_seed(1)
    for layer in lora.lora_layers(m).values():
        if layer.r:
            layer.lora_B.weight.data = torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05
    return m, arch


def test_adapter_is_peft_layout_of_the_stock_model_and_round_trips(tmp_path):
    """A fused layer's LoRA is one LoRA of rank n·r (all its parts: a fused layer is one target), block-diagonal B,
    rank / alpha patterns: peft loads it onto the stock model with lpt's logits; lpt reads it back exactly."""
    from peft import PeftModel

    cfg = phi3_config(partial_rotary_factor=0.5)
    base = tmp_path / "base"
    stock(cfg).save_pretrained(base)
    m, arch = _trained(cfg)
    want = logits(m)
    lora.save_adapter(m, tmp_path / "a", base_model=str(base))
    acfg = json.loads((tmp_path / "a" / artifacts.ADAPTER_CONFIG).read_text())
    assert acfg["target_modules"] == ["gate_up_proj", "o_proj", "qkv_proj"] and acfg["r"] == 4
    assert acfg["rank_pattern"] == {"qkv_proj": 12, "gate_up_proj": 8}
    assert acfg["alpha_pattern"] == {"qkv_proj": 24.0, "gate_up_proj": 16.0}
    sd = artifacts.load_tensors(tmp_path / "a" / artifacts.ADAPTER_WEIGHTS)
    b = sd["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"]
    assert b.shape == (128, 12) and not b[:64, 4:].any() and not b[64:96, :4].any()
    assert not any(".q_proj." in k or ".gate_proj." in k for k in sd)
    got = PeftModel.from_pretrained(plain(base), tmp_path / "a").eval()
    torch.testing.assert_close(logits(got), want, **TOL)
    again = models.load(str(base), F32(adapter=tmp_path / "a"))
    torch.testing.assert_close(logits(again.model), want, rtol=0, atol=0)
    # an adapter of the fused layer that is not block-diagonal (trained on it elsewhere) is refused in one line
    b[0, 5] = 0.1
    artifacts.save_tensors(sd, tmp_path / "a" / artifacts.ADAPTER_WEIGHTS)
    with pytest.raises(LptError, match="not block-diagonal"):
        models.load(str(base), F32(adapter=tmp_path / "a"))


# ------------------------------------------------------------------------------------------------ the command line
@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_tokenizer_dir, tiny_calib_dir):
    """lpt prune (3 steps, attention and MLP), then slice with the adapter, merge of the sliced pair, slice --merge."""
    from typer.testing import CliRunner

    tmp = tmp_path_factory.mktemp("phi3")
    d = model_dir(tmp, tiny_tokenizer_dir, partial_rotary_factor=0.5)
    runner = CliRunner()
    out = tmp / "prune"
    r = invoke(runner, ["prune", d, "--calib", tiny_calib_dir, "--ratio", "0.4", "--balance", "1", "--max-steps", "3",
                        "--batch-size", "4", "--micro-batch-size", "2", "--prune-freq", "1", "--warmup", "0",
                        "--cooldown", "0", "--lora-r", "4", "--device", "cpu", "-o", out])
    assert r.exit_code == 0, r.output
    f32 = ["--device", "cpu", "--dtype", "float32"]
    m = out / artifacts.MASKS
    for args in (["slice", d, "--masks", m, "--adapter", out, "-o", tmp / "sliced", *f32],
                 ["merge", tmp / "sliced", "--adapter", tmp / "sliced" / "adapter", "-o", tmp / "sliced-merged", *f32],
                 ["slice", d, "--masks", m, "--adapter", out, "--merge", "-o", tmp / "slice-merge", *f32]):
        r = invoke(runner, args)
        assert r.exit_code == 0, r.output
    return dict(model=d, prune=out, tmp=tmp, masks=Masks.load(m, describe(phi3_config())))


def test_prune_slice_merge_reload_in_plain_transformers(pruned):
    """The masked model (base + adapter + masks, unmerged) == the sliced, merged model reloaded by transformers with
    no remote code, both ways round; the directory is a standard Phi-3 one (fused names, sliced config)."""
    masks, tmp = pruned["masks"], pruned["tmp"]
    m0 = masks.layers[0]
    assert len(m0.kv_heads) == 1 and masks.is_uniform() and len(m0.channels) < 96  # heads and channels pruned
    masked = models.load(str(pruned["model"]), F32(adapter=pruned["prune"], masks=masks))
    want = logits(masked.model)
    for name in ("sliced-merged", "slice-merge"):
        got = plain(tmp / name)
        assert type(got).__name__ == "Phi3ForCausalLM"
        torch.testing.assert_close(logits(got), want, **TOL)
        doc = json.loads((tmp / name / "config.json").read_text())
        assert (doc["num_attention_heads"], doc["num_key_value_heads"], doc["intermediate_size"], doc["head_dim"]) == (
            len(m0.heads), len(m0.kv_heads), len(m0.channels), 16)
        keys = list(artifacts.load_tensors(tmp / name / "model.safetensors"))
        assert "model.layers.0.self_attn.qkv_proj.weight" in keys and not any(".q_proj." in k for k in keys)
    # the sliced adapter is PEFT's layout of the sliced model: peft on the plain sliced model == merged
    from peft import PeftModel

    acfg = json.loads((tmp / "sliced" / "adapter" / artifacts.ADAPTER_CONFIG).read_text())
    assert acfg["rank_pattern"] == {"qkv_proj": 12, "gate_up_proj": 8}
    got = PeftModel.from_pretrained(plain(tmp / "sliced"), tmp / "sliced" / "adapter").eval()
    torch.testing.assert_close(logits(got), want, **TOL)


def test_eval_unmerged_equals_eval_of_the_sliced_model(pruned, runner, tmp_path):
    args = ["--ppl", "builtin:pydoc:test", "--seq-len", "64", "--max-segments", "3", "--device", "cpu"]
    r = invoke(runner, ["--json", "eval", pruned["model"], "--adapter", pruned["prune"], "--masks",
                        pruned["prune"] / artifacts.MASKS, *args, "-o", tmp_path / "u.json"])
    assert r.exit_code == 0, r.output
    r = invoke(runner, ["--json", "eval", pruned["tmp"] / "slice-merge", *args, "-o", tmp_path / "s.json"])
    assert r.exit_code == 0, r.output
    u, s = (json.loads((tmp_path / f).read_text())["perplexity"]["builtin:pydoc:test"]["ppl"]
            for f in ("u.json", "s.json"))
    assert u == pytest.approx(s, rel=1e-4)


def test_per_layer_widths_and_longrope_head_pruning_are_refused_in_one_line(runner, tmp_path, tiny_tokenizer_dir,
                                                                           tiny_calib_dir):
    d = model_dir(tmp_path, tiny_tokenizer_dir)
    base = ["prune", d, "--calib", tiny_calib_dir, "--max-steps", "1", "--batch-size", "2", "--micro-batch-size", "2",
            "--device", "cpu"]
    line = one_line(invoke(runner, [*base, "--layout", "per-layer", "-o", tmp_path / "p"]))
    assert "per-layer widths are not supported for model type 'phi3'" in line and "--layout uniform" in line
    assert not (tmp_path / "p").exists()
    # longrope (Phi-3-mini-128k, Phi-3.5, Phi-4-mini): transformers checks its factors against hidden / heads
    lr = model_dir(tmp_path, tiny_tokenizer_dir, "longrope", head_dim=16, **LONGROPE)
    assert describe(phi3_config(head_dim=16, **LONGROPE)).heads_locked
    line = one_line(invoke(runner, [*base[:1], lr, *base[2:], "-o", tmp_path / "q"]))
    assert "longrope" in line and "--balance 0" in line and not (tmp_path / "q").exists()
    line = one_line(invoke(runner, [*base[:1], lr, *base[2:], "--balance", "0", "--hidden-ratio", "0.25", "-o",
                                    tmp_path / "h"]))
    assert "smaller hidden size would not load" in line and not (tmp_path / "h").exists()
    r = invoke(runner, [*base[:1], lr, *base[2:], "--balance", "0", "--ratio", "0.2", "-o", tmp_path / "mlp"])
    assert r.exit_code == 0, r.output
    masks = Masks.load(tmp_path / "mlp" / artifacts.MASKS, describe(phi3_config(head_dim=16, **LONGROPE)))
    assert all(len(m.heads) == 4 for m in masks.layers)
    r = invoke(runner, ["slice", lr, "--masks", tmp_path / "mlp" / artifacts.MASKS, "-o", tmp_path / "ok",
                        "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    assert plain(tmp_path / "ok").config.intermediate_size == len(masks.layers[0].channels)
    # masks keeping fewer heads (made another way) are refused by slice before any weight is read
    arch = describe(phi3_config(head_dim=16, **LONGROPE))
    heads = Masks.from_pruned(arch, [torch.tensor([True, False])] * 2, [torch.zeros(96, dtype=torch.bool)] * 2,
                                     "kv-groups")
    heads.save(tmp_path / "heads.json")
    line = one_line(invoke(runner, ["slice", lr, "--masks", tmp_path / "heads.json", "-o", tmp_path / "no"]))
    assert "keeping 2 of 4 query heads would not load" in line and not (tmp_path / "no").exists()


# ------------------------------------------------------------------------------------------------ GGUF
NEEDS_CONVERTER = pytest.mark.skipif(llamacpp.find_converter() is None,
                                     reason="llama.cpp's converter is not installed (LPT_GGUF_CONVERTER=DIR)")


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    """A SentencePiece tokenizer.model (llama.cpp's converter reads one for Phi-3), trained on the pydoc topics by the
    converter's own environment, which has sentencepiece (the README's test command installs it there)."""
    from lpt.data import pydoc_topics

    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    text = path.parent / "pydoc.txt"
    text.write_text("\n".join(t for _, t in pydoc_topics()))
    conv = llamacpp.find_converter()
    script = ("import sys, sentencepiece as spm; spm.SentencePieceTrainer.train(input=sys.argv[1], "
              "model_prefix=sys.argv[2], vocab_size=%d, model_type='bpe', byte_fallback=True, unk_id=0, bos_id=1, "
              "eos_id=2, pad_id=-1, num_threads=1, minloglevel=2, hard_vocab_limit=False)" % VOCAB)
    p = subprocess.run([conv.python, "-c", script, str(text), str(path.with_suffix(""))], env=conv.env(),
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"no sentencepiece next to llama.cpp's converter: {p.stderr.strip().splitlines()[-1:]}")
    return path


@NEEDS_CONVERTER
@pytest.mark.parametrize("rotary", [1.0, 0.5])
def test_mlp_pruned_phi3_exports_to_gguf(runner, tmp_path, tiny_tokenizer_dir, sentencepiece_model, rotary):
    """MLP channels pruned, every head kept: lpt export writes a GGUF llama.cpp's phi3 graph loads (attention as wide
    as the hidden size, the rope on head_dim x partial_rotary_factor), and transformers reads it back with the sliced
    directory's logits (full rope: transformers' GGUF reader ignores a partial rope's width)."""
    d = model_dir(tmp_path, tiny_tokenizer_dir, partial_rotary_factor=rotary)
    shutil.copy(sentencepiece_model, d / "tokenizer.model")
    arch = describe(phi3_config(partial_rotary_factor=rotary))
    masks = Masks.from_pruned(arch, [torch.zeros(2, dtype=torch.bool)] * 2,
                                     [torch.arange(96) % 3 == 0, torch.arange(96) % 3 == 0], "kv-groups")
    masks.save(tmp_path / "masks.json")
    r = invoke(runner, ["slice", d, "--masks", tmp_path / "masks.json", "-o", tmp_path / "s", "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s" / "tokenizer.model").is_file()  # the source's SentencePiece model, for the converter
    out = tmp_path / "s.gguf"
    r = invoke(runner, ["export", tmp_path / "s", "--gguf", "--outtype", "f32", "-o", out])
    assert r.exit_code == 0, r.output
    from lpt import gguf_file

    head = gguf_file.header_values(out, ("general.architecture", "phi3.rope.dimension_count",
                                         "phi3.feed_forward_length", "phi3.attention.head_count"))
    assert head == {"general.architecture": "phi3", "phi3.rope.dimension_count": int(16 * rotary),
                    "phi3.feed_forward_length": 64, "phi3.attention.head_count": 4}
    if rotary == 1.0:
        from transformers import AutoModelForCausalLM

        got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
        torch.testing.assert_close(logits(got), logits(plain(tmp_path / "s")), rtol=1e-5, atol=1e-5)


def test_head_pruned_phi3_is_refused_by_export(runner, pruned, tmp_path):
    """llama.cpp sizes Phi-3's attention from the hidden size: a model that keeps fewer heads is refused before the
    converter runs (it would convert, and not load)."""
    line = one_line(invoke(runner, ["export", pruned["tmp"] / "slice-merge", "--gguf", "-o", tmp_path / "x.gguf"]))
    assert "llama.cpp sizes phi3's attention from the hidden size" in line and "--balance 0" in line
    assert not (tmp_path / "x.gguf").exists()
