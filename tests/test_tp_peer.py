"""benchmarks/tp_peer.py: Torch-Pruning as the external peer of the quality study, on tiny random Llamas."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch_pruning")

import torch  # noqa: E402
from conftest import invoke  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "tp_peer.py"


@pytest.fixture(scope="module")
def tp_peer():
    spec = importlib.util.spec_from_file_location("tp_peer", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tp_peer"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("tp_peer", None)


def dense(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def masked_by_hand(model, doc):
    """Zero the o_proj columns of the removed query heads and the down_proj columns of the removed channels."""
    hd, heads, inter = doc["head_dim"], doc["num_attention_heads"], doc["intermediate_size"]
    with torch.no_grad():
        for i, layer in enumerate(doc["layers"]):
            blk = model.model.layers[i]
            for h in set(range(heads)) - set(layer["attention_heads"]):
                blk.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            gone = sorted(set(range(inter)) - set(layer["mlp_channels"]))
            blk.mlp.down_proj.weight[:, gone] = 0
    return model


def calib_ids(calib_dir, n=2):
    from lpt import calibration

    return calibration.load(calib_dir).tensors["input_ids"][:n]


def lowest(scores: torch.Tensor, k: int) -> set[int]:
    return set(torch.argsort(scores)[:k].tolist())


def test_kv_groups_l2_end_to_end(tp_peer, tiny_llama_dir, tiny_calib_dir, tmp_path, runner):
    from transformers import AutoModelForCausalLM

    from lpt import models
    from lpt.arch import describe

    out = tmp_path / "tp50"
    assert tp_peer.main([str(tiny_llama_dir), "--ratio", "0.5", "--calib", str(tiny_calib_dir), "-o", str(out)]) == 0
    rec = json.loads((out / "tp_peer.json").read_text())
    # 4 heads / 2 kv heads / 96 channels, head_dim 16, hidden 64, 2 layers; lpt at 50%: 1 kv group + 48 channels
    before = 2 * (2 * 4 * 16 * 64 + 2 * 2 * 16 * 64 + 3 * 96 * 64)
    after = 2 * (2 * 2 * 16 * 64 + 2 * 1 * 16 * 64 + 3 * 48 * 64)
    assert rec["block_params"] == {"before": before, "after": after}
    assert rec["ratio_blocks"] == pytest.approx(1 - after / before) == pytest.approx(0.5)
    assert rec["lpt_ratio_blocks"] == pytest.approx(rec["ratio_blocks"])
    assert rec["importance"] == "l2" and rec["importance_class"] == "GroupMagnitudeImportance"
    assert rec["torch_pruning"]["version"] and rec["gqa"] == "kv-groups"
    assert rec["checks"]["reloaded_vs_in_memory_max_abs_diff"] <= 1e-4

    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["head_dim"],
            cfg["hidden_size"]) == (2, 1, 48, 16, 64)
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert rec["model_params"]["after"] == sum(p.numel() for p in pruned.parameters())
    m, tok = models.load_model(str(out), dtype="float32", device="cpu")
    a = describe(m.config)
    assert (a.num_heads, a.num_kv_heads, a.intermediate_size) == (2, 1, 48) and tok is not None

    # the example's l2 importance: per kv group, q rows + o columns (Torch-Pruning skips k/v under GQA); per MLP
    # channel, gate row + up row + down column (squared L2 norms)
    src = dense(tiny_llama_dir)
    doc = json.loads((out / "tp_masks.json").read_text())
    for i, layer in enumerate(doc["layers"]):
        blk = src.model.layers[i]
        q = blk.self_attn.q_proj.weight.pow(2).sum(1).view(2, -1).sum(1)
        o = blk.self_attn.o_proj.weight.pow(2).sum(0).view(2, -1).sum(1)
        assert set(range(2)) - set(layer["kv_heads"]) == lowest(q + o, 1)
        ch = (blk.mlp.gate_proj.weight.pow(2).sum(1) + blk.mlp.up_proj.weight.pow(2).sum(1)
              + blk.mlp.down_proj.weight.pow(2).sum(0))
        assert set(range(96)) - set(layer["mlp_channels"]) == lowest(ch, 48)
        assert layer["attention_heads"] == [2 * k + j for k in layer["kv_heads"] for j in range(2)]

    # the saved model computes what the dense model computes with those heads and channels masked out
    ids = calib_ids(tiny_calib_dir)
    ref = logits(masked_by_hand(dense(tiny_llama_dir), doc), ids)
    got = logits(pruned, ids)
    assert torch.allclose(got, ref, atol=1e-5)
    assert (logits(src, ids) - got).abs().max() > 1e-3  # pruning changed the model: the check above has teeth

    # the study's next step: plain LoRA recovery of the pruned directory
    rec_dir = tmp_path / "tp50-lora"
    r = invoke(runner, ["prune", out, "--ratio", "0", "--calib", tiny_calib_dir, "--max-steps", "1", "--batch-size",
                        "4", "--micro-batch-size", "4", "-o", rec_dir])
    assert r.exit_code == 0, r.output
    assert (rec_dir / "adapter_model.safetensors").is_file()


def test_query_heads_taylor(tp_peer, tiny_llama_dir, tiny_calib_dir, tmp_path):
    """Torch-Pruning's own GQA handling; here it removes all but one query head per group (k/v must stay)."""
    out = tmp_path / "tpq"
    assert tp_peer.main([str(tiny_llama_dir), "--ratio", "0.5", "--calib", str(tiny_calib_dir), "-o", str(out),
                         "--gqa", "query-heads", "--importance", "taylor", "--nsamples", "4"]) == 0
    rec = json.loads((out / "tp_peer.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    # lpt query-heads at 50%: 1 query head per group (q rows + o columns: 4,096 params) + 59 channels (nearest)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (2, 2)
    from lpt import groups
    from lpt.arch import describe

    arch = describe(dense(tiny_llama_dir).config)
    n_heads, n_ch = groups.uniform_counts(arch, 0.5, "query-heads")
    assert n_heads == 1 and cfg["intermediate_size"] == 96 - n_ch
    assert rec["ratio_blocks"] == pytest.approx(rec["lpt_ratio_blocks"]) and abs(rec["ratio_blocks"] - 0.5) < 0.01
    assert rec["importance_class"] == "GroupTaylorImportance" and rec["calibration"]["taylor_blocks"] == 4

    # Taylor scores |W * dL/dW| from the same 4 blocks, computed here with plain autograd
    src = dense(tiny_llama_dir)
    from lpt import calibration

    blocks = calibration.load(tiny_calib_dir).tensors
    for s in range(4):
        (src(**{k: v[s:s + 1] for k, v in blocks.items()}, use_cache=False).loss / 4).backward()
    doc = json.loads((out / "tp_masks.json").read_text())
    for i, layer in enumerate(doc["layers"]):
        mlp = src.model.layers[i].mlp
        score = sum((lin.weight * lin.weight.grad).abs().sum(d) for lin, d in
                    ((mlp.gate_proj, 1), (mlp.up_proj, 1), (mlp.down_proj, 0))).detach()
        assert set(range(96)) - set(layer["mlp_channels"]) == lowest(score, n_ch)
        assert layer["kv_heads"] == [0, 1] and len(layer["attention_heads"]) == 2
        assert sorted(h // 2 for h in layer["attention_heads"]) == [0, 1]  # one query head kept in each group

    ids = calib_ids(tiny_calib_dir)
    from transformers import AutoModelForCausalLM

    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert pruned.model.layers[0].self_attn.k_proj.out_features == 32  # k/v untouched
    ref = logits(masked_by_hand(dense(tiny_llama_dir), doc), ids)
    assert torch.allclose(logits(pruned, ids), ref, atol=1e-5)


def test_heads_fixes_the_attention_units(tp_peer, tiny_llama_dir, tiny_calib_dir, tmp_path):
    """--heads 0: Torch-Pruning cuts MLP channels only, as many as lpt's --balance 0 would, and nothing else."""
    from lpt import groups
    from lpt.arch import describe

    out = tmp_path / "tp-h0"
    assert tp_peer.main([str(tiny_llama_dir), "--ratio", "0.3", "--calib", str(tiny_calib_dir), "--heads", "0",
                         "-o", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    arch = describe(dense(tiny_llama_dir).config)
    n_heads, n_ch = groups.uniform_counts(arch, 0.3, "kv-groups", heads=0)
    assert n_heads == 0 and groups.uniform_counts(arch, 0.3, "kv-groups")[0] == 1  # without --heads: one group
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == (4, 2, 96 - n_ch)
    rec = json.loads((out / "tp_peer.json").read_text())
    assert rec["ratio_blocks"] == pytest.approx(rec["lpt_ratio_blocks"]) and abs(rec["ratio_blocks"] - 0.3) < 0.02


def test_bad_input_one_line_nothing_written(tp_peer, tiny_llama_dir, tiny_calib_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert tp_peer.main([str(tiny_llama_dir), "--ratio", "1.5", "--calib", str(tiny_calib_dir), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--ratio" in err and len(err.splitlines()) == 1
    assert not out.exists()

    assert tp_peer.main([str(tiny_llama_dir), "--ratio", "0.2", "--calib", str(tmp_path / "nope"), "-o",
                         str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "calibrate output" in err and len(err.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".o.partial-*"))

    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert tp_peer.main([str(tiny_llama_dir), "--ratio", "0.2", "--calib", str(tiny_calib_dir), "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_help_has_examples():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert "--importance {l2,taylor}" in r.stdout and "--gqa {kv-groups,query-heads}" in r.stdout
    assert "python benchmarks/tp_peer.py smollm2-135m --ratio 0.5" in r.stdout
