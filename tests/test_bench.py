"""lpt bench on tiny random Llamas: FLOP counting, random-init shapes, runtime and prune-step JSON end to end.

No timing is asserted anywhere: only what the numbers are computed from (shapes, parameters, FLOPs), the JSON
schema, the pairing of models and adapters, and the refusal of bad input.
"""

import importlib.metadata
import importlib.util
import json
import math
import sys

import pytest
import torch

from conftest import build_model, invoke, tiny_config
from lpt import artifacts, lora
from lpt.masks import Masks
from lpt.arch import describe
from lpt.benchmarking import flops, schema, shapes
from lpt.errors import LptError
from lpt.stages import bench

SEQ = 16
TINY_JSON = json.dumps(dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=384,
                            tie_word_embeddings=True))
FAST = ["--seq-len", SEQ, "--trials", 2, "--warmup", 1]
# --plot needs matplotlib (the `bench` extra): exercised whenever it is installed
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
PLOT = ["--plot"] if HAVE_MPL else []
# (in, out) of q, k, v, o, gate, up, down in the tiny GQA Llama
PROJ_SHAPES = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 96), (64, 96), (96, 64)]


def _hand_linear(cfg, heads, kv, inter):
    """Linear weights of a Llama block stack + LM head, written out from the config."""
    d, hd, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    per_layer = d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * inter
    return L * per_layer + cfg.vocab_size * d


@pytest.fixture(scope="module")
def prune_dir(tmp_path_factory, tiny_llama_dir):
    """What lpt prune writes: a PEFT adapter (non-zero B) and masks.json for the tiny GQA model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    arch = describe(model.config)
    layers = lora.inject(model, arch, r=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers.values():
            if layer.r:
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
    heads = [torch.tensor([False, True]) for _ in range(2)]  # prune key/value group 1 (query heads 2, 3)
    chans = [torch.arange(96) % 4 == 0 for _ in range(2)]  # prune 24 of 96 channels
    masks = Masks.from_pruned(arch, heads, chans, "kv-groups", model=str(tiny_llama_dir))
    out = tmp_path_factory.mktemp("prune") / "prune-out"
    lora.save_adapter(model, out, base_model=str(tiny_llama_dir))
    masks.save(out / artifacts.MASKS)
    return out


@pytest.fixture(scope="module")
def sliced_dirs(tmp_path_factory, tiny_tokenizer_dir):
    """A model at the sliced shape of ``prune_dir`` (1 kv head, 2 query heads, 72 channels) and an adapter for it."""
    cfg = tiny_config(num_attention_heads=2, num_key_value_heads=1, intermediate_size=72)
    root = tmp_path_factory.mktemp("sliced")
    model = build_model(cfg, seed=3)
    model.save_pretrained(root / "sliced")
    layers = lora.inject(model, describe(cfg), r=4, alpha=8)
    with torch.no_grad():
        for layer in layers.values():
            if layer.r:
                layer.lora_B.weight.normal_(0, 0.05)
    lora.save_adapter(model, root / "sliced" / "adapter", base_model=str(root / "sliced"))
    return root / "sliced", root / "sliced" / "adapter"


def _leftovers(d):
    return sorted(p.name for p in d.iterdir() if ".partial" in p.name)


# ------------------------------------------------------------------------------------------------ pure parts
def test_flops_match_a_hand_count_for_dense_sliced_and_lora():
    cfg = tiny_config()
    model = build_model(cfg)
    got = flops.model_flops(model, SEQ)
    linear = _hand_linear(cfg, 4, 2, 96)
    attn = 2 * 2 * 4 * 16 * (SEQ + 1)  # 2 x layers x heads x head_dim x (S + 1)
    assert got == {"linear": 2 * linear, "lora": 0, "attention": attn, "total": 2 * linear + attn}

    lora.inject(model, describe(cfg), r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    with_lora = flops.model_flops(model, SEQ)
    per_layer = 4 * (64 + 64) + 4 * (64 + 32) + 4 * (96 + 64)  # r * (in + out) of q, v, down
    assert with_lora["linear"] == 2 * linear and with_lora["lora"] == 2 * 2 * per_layer

    small = tiny_config(num_attention_heads=2, num_key_value_heads=1, intermediate_size=72)
    got_small = flops.model_flops(build_model(small), SEQ)
    assert got_small["linear"] == 2 * _hand_linear(small, 2, 1, 72)
    assert got_small["attention"] == attn // 2


def test_tied_lm_head_costs_a_matmul_but_one_tensor():
    cfg = tiny_config(tie_word_embeddings=True)
    model = build_model(cfg)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    base, _ = flops.linear_weights(model)
    assert base == _hand_linear(cfg, 4, 2, 96)  # LM head included although its tensor is the embedding's


@pytest.mark.parametrize("name", sorted(shapes.SHAPES))
def test_builtin_shapes_and_pruned_shapes_hit_the_ratio(name):
    shape = shapes.parse_shape(name)
    dense = describe(shapes.make_config(shape))
    assert dense.num_layers == shape.fields["num_hidden_layers"]
    for ratio in (0.2, 0.5):
        pruned = describe(shapes.make_config(shapes.parse_shape(f"{name}@{ratio}")))
        assert pruned.head_dim == dense.head_dim and pruned.group_size == dense.group_size
        kept = pruned.block_linear_params(0) / dense.block_linear_params(0)
        # whole key/value groups plus single channels: within a few percent of the target for these shapes
        assert abs((1 - kept) - ratio) < 0.05, (name, ratio, kept)
    assert shapes.parse_shape(f"{name}@50%").ratio == 0.5


def test_llama7b_shape_is_the_paper_model():
    cfg = shapes.make_config(shapes.parse_shape("llama-7b"))
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_config(cfg)
    assert abs(sum(p.numel() for p in m.parameters()) - 6.74e9) < 0.01e9


def test_random_model_is_finite_tied_and_has_real_rotary_buffers():
    cfg = shapes.make_config(shapes.parse_shape(TINY_JSON))
    model = shapes.build_random_model(cfg, torch.float32, "cpu", seed=0)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ref = build_model(cfg)  # conventional init: its rotary buffers are the reference
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert float(model.model.layers[0].self_attn.q_proj.weight.std()) == pytest.approx(0.02, rel=0.1)
    assert bool((model.model.norm.weight == 1).all())
    ids = torch.randint(0, 384, (2, SEQ))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    again = shapes.build_random_model(cfg, torch.float32, "cpu", seed=0)
    torch.testing.assert_close(again.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)


@pytest.mark.parametrize("spec, msg", [("llama-70q", "unknown shape"), ("llama-7b@1.5", "ratio"),
                                       ("llama-7b@abc", "ratio"), ("{not json", "not valid")])
def test_bad_shapes_are_refused(spec, msg):
    with pytest.raises(LptError, match=msg):
        shapes.parse_shape(spec)


def test_entries_pair_models_adapters_and_labels():
    cfg = bench.BenchRuntimeConfig(models=["a/", "b"], random_init=["llama-7b@0.5"], adapter=["-", "x/ad", "random:8"])
    e = bench.build_entries(cfg)
    assert [(x.model, x.random_init, x.adapter) for x in e] == [
        ("a/", None, None), ("b", None, "x/ad"), (None, "llama-7b@0.5", "random:8")]
    assert [x.label for x in e] == ["a", "b + ad", "llama-7b@0.5 + LoRA r8"]
    assert [x.label for x in bench.build_entries(bench.BenchRuntimeConfig(models=["m", "m"]))] == ["m", "m (2)"]
    with pytest.raises(LptError, match="one --adapter per model"):
        bench.build_entries(bench.BenchRuntimeConfig(models=["a", "b"], adapter=["x"]))
    assert bench.int_list(["1,4", 16], "--batch-size") == [1, 4, 16]
    with pytest.raises(LptError):
        bench.int_list(["0"], "--batch-size")


def test_schema_checker_rejects_what_does_not_fit():
    stats = {"median": 1.0, "min": 1.0, "max": 1.0, "mean": 1.0, "stdev": 0.0, "n": 1, "values": [1.0]}
    schema.check(stats, schema.Stats)
    for bad, msg in (({k: v for k, v in stats.items() if k != "max"}, "missing key 'max'"),
                     ({**stats, "extra": 1}, "unknown key 'extra'"), ({**stats, "n": 1.5}, "integer"),
                     ({**stats, "median": math.nan}, "finite"), ({**stats, "values": "1"}, "list")):
        with pytest.raises(LptError, match=msg):
            schema.check(bad, schema.Stats)


# ------------------------------------------------------------------------------------------------ runtime CLI
def test_runtime_end_to_end_dense_unmerged_merged_and_random(runner, tmp_path, tiny_llama_dir, prune_dir,
                                                            sliced_dirs):
    sliced, sliced_adapter = sliced_dirs
    out = tmp_path / "bench.json"
    r = invoke(runner, ["bench", "runtime", tiny_llama_dir, tiny_llama_dir, sliced, sliced,
                        "--random-init", TINY_JSON + "@0.5",
                        "--adapter", "-", "--adapter", prune_dir, "--adapter", "-", "--adapter", sliced_adapter,
                        "--adapter", "random:2",
                        "--masks", "-", "--masks", prune_dir / "masks.json", "--masks", "-", "--masks", "-",
                        "--masks", "-",
                        "--label", "dense", "--label", "dense unmerged", "--label", "merged", "--label", "unmerged",
                        "--label", "random", *FAST, "--batch-size", "1,2", "--new-tokens", 3, "--decode-trials", 1,
                        "--no-isolate", *PLOT, "-o", out])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    schema.check(doc, schema.RuntimeResults)
    if HAVE_MPL:
        assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _leftovers(tmp_path) == []
    labels = ["dense", "dense unmerged", "merged", "unmerged", "random"]
    assert [m["label"] for m in doc["models"]] == labels
    assert [(x["label"], x["batch_size"]) for x in doc["results"]] == [(l, b) for b in (1, 2) for l in labels]
    info = {m["label"]: m for m in doc["models"]}
    assert info["dense unmerged"]["masks"] == str(prune_dir / "masks.json") and info["dense unmerged"]["unmerged"]
    assert info["unmerged"]["masks"] == "none" and info["unmerged"]["lora_rank"] == 4
    assert info["random"]["random_weights"] and doc["random_weights"]
    assert not info["dense"]["random_weights"] and info["dense"]["lora_params"] == 0
    assert info["random"]["architecture"]["num_key_value_heads"] == 1  # @0.5 dropped one of two key/value groups

    # FLOPs and parameters come from the loaded models: recompute them independently here
    dense_model = build_model(tiny_config())
    want = flops.model_flops(dense_model, SEQ)
    rows = {(x["label"], x["batch_size"]): x for x in doc["results"]}
    assert rows[("dense", 1)]["flops_per_token"] == want
    assert rows[("dense", 1)]["params"] == sum(p.numel() for p in dense_model.parameters())
    lora_dense = 2 * 2 * 4 * sum(i + o for i, o in PROJ_SHAPES)
    assert rows[("dense unmerged", 1)]["flops_per_token"]["lora"] == lora_dense
    assert rows[("unmerged", 2)]["flops_per_token"]["linear"] == rows[("merged", 2)]["flops_per_token"]["linear"]
    assert rows[("merged", 1)]["flops_per_token"]["linear"] < want["linear"]
    for x in doc["results"]:
        ref = rows[("dense", x["batch_size"])]
        assert x["relative"]["flops_per_token"] == pytest.approx(x["flops_per_token"]["total"]
                                                                 / ref["flops_per_token"]["total"])
        assert x["relative"]["latency"] == pytest.approx(x["latency_s"]["median"] / ref["latency_s"]["median"])
        assert x["latency_s"]["n"] == 2 and x["peak_memory_bytes"] > 0
        assert x["decode"]["new_tokens"] == 3 and x["decode"]["seconds"]["n"] == 1
    assert doc["protocol"]["trials"] == 2 and doc["protocol"]["seq_len"] == SEQ
    assert doc["protocol"]["order"].startswith("sequential")
    assert doc["hardware"]["device"] == "cpu" and doc["versions"]["torch"] == importlib.metadata.version("torch")


def test_runtime_isolated_interleaved_and_overwrite(runner, tmp_path, tiny_llama_dir, prune_dir):
    out = tmp_path / "iso.json"
    args = ["bench", "runtime", tiny_llama_dir, "--random-init", TINY_JSON, "--adapter", prune_dir, "--adapter", "-",
            *FAST, "--interleave", "-o", out]
    r = invoke(runner, args)
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    schema.check(doc, schema.RuntimeResults)
    assert "own Python process" in doc["protocol"]["isolation"]
    assert doc["protocol"]["order"].startswith("interleaved")
    # masks only when given: the adapter directory's masks.json is not picked up silently
    assert [m["masks"] for m in doc["models"]] == ["none", "none"]
    for row in doc["results"]:  # latency from the interleaved turns, memory from each model's own process
        assert row["latency_s"]["n"] == 2 and len(row["latency_s"]["values"]) == 2 and row["peak_memory_bytes"] > 0
        assert row["tokens_per_s"] == pytest.approx(SEQ / row["latency_s"]["median"])
    first = out.read_text()
    r = invoke(runner, args)  # refused: the file is left as it was
    assert r.exit_code == 2 and "--overwrite" in r.output and out.read_text() == first


def test_runtime_wrong_adapter_is_one_line_and_writes_nothing(runner, tmp_path, sliced_dirs, prune_dir):
    sliced, _ = sliced_dirs
    out = tmp_path / "bad.json"
    r = invoke(runner, ["bench", "runtime", sliced, "--adapter", prune_dir, *FAST, "-o", out])  # dense adapter
    assert r.exit_code == 2
    assert "error:" in r.output and "adapter" in r.output and len(r.output.strip().splitlines()) <= 3
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("extra, msg", [
    (["--adapter", "-", "--adapter", "-"], "one --adapter per model"),
    (["--random-init", "llama-70q"], "unknown shape"),
    (["--batch-size", "0"], "must be positive"),
    (["--adapter", "random:x"], "rank"),
    (["-o", "bench.txt"], "JSON"),
])
def test_runtime_bad_input_is_refused_before_loading(runner, tmp_path, tiny_llama_dir, extra, msg):
    args = ["bench", "runtime", tiny_llama_dir, *FAST, *extra]
    if "-o" not in extra:
        args += ["-o", tmp_path / "x.json"]
    r = invoke(runner, args)
    assert r.exit_code == 2 and msg in r.output, r.output
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ prune-step CLI
def test_prune_step_criteria_8bit_and_plain_lora(runner, tmp_path, tiny_llama_dir):
    out = tmp_path / "cost.json"
    r = invoke(runner, ["bench", "prune-step", tiny_llama_dir, "--criterion", "lora", "--criterion", "vanilla",
                        "--plain-lora", "--8bit", "--seq-len", SEQ, "--batch-size", 4, "--micro-batch-size", 2,
                        "--lora-r", 4, "--trials", 2, "--warmup", 1, "--no-isolate", *PLOT, "-o", out])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    schema.check(doc, schema.PruneStepResults)
    assert out.with_suffix(".png").is_file() == HAVE_MPL and _leftovers(tmp_path) == []
    rows = {x["label"]: x for x in doc["results"]}
    assert list(rows) == ["lora", "lora 8-bit", "vanilla", "plain LoRA", "plain LoRA 8-bit"]
    assert [s["label"] for s in doc["skipped"]] == ["vanilla 8-bit"]
    assert [x["criterion"] for x in doc["results"]] == ["lora", "lora", "vanilla", "none", "none"]
    assert [x["load_8bit"] for x in doc["results"]] == [False, True, False, False, True]
    # LoRA on all seven projections of both layers: r * (in + out) each
    a = describe(tiny_config())
    lora_params = 2 * 4 * sum(i + o for i, o in PROJ_SHAPES)
    base_linear = a.num_layers * a.block_linear_params(0)
    for x in doc["results"]:
        assert x["trainable_params"] == lora_params
        want_grad = lora_params + (base_linear if x["criterion"] == "vanilla" else 0)
        assert x["gradient_params"] == want_grad  # vanilla needs every base weight's gradient, LoRA-guided none
        assert x["seconds_per_step"]["n"] == 2 and x["peak_memory_bytes"] > 0
    assert doc["protocol"]["micro_batch_size"] == 2 and doc["model"]["random_weights"] is False


def test_prune_step_random_init_isolated(runner, tmp_path):
    out = tmp_path / "cost.json"
    r = invoke(runner, ["bench", "prune-step", "--random-init", TINY_JSON, "--criterion", "lora", "--seq-len", SEQ,
                        "--batch-size", 2, "--trials", 1, "--warmup", 0, "-o", out])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    schema.check(doc, schema.PruneStepResults)
    assert doc["random_weights"] and doc["model"]["random_init"] == TINY_JSON and doc["model"]["model"] is None


def test_prune_step_fisher_checkpointing_and_distill(runner, tmp_path, tiny_llama_dir):
    """fisher needs no base-weight gradient; --gradient-checkpointing and --distill reach the timed step."""
    out = tmp_path / "cost.json"
    r = invoke(runner, ["bench", "prune-step", tiny_llama_dir, "--criterion", "fisher", "--plain-lora",
                        "--gradient-checkpointing", "--distill", "--seq-len", SEQ, "--batch-size", 2, "--lora-r", 4,
                        "--trials", 1, "--warmup", 1, "--no-isolate", "-o", out])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    schema.check(doc, schema.PruneStepResults)
    assert doc["protocol"]["gradient_checkpointing"] is True and doc["protocol"]["distill"] is True
    rows = {x["label"]: x for x in doc["results"]}
    assert rows["fisher"]["gradient_params"] == rows["plain LoRA"]["gradient_params"] == rows["fisher"][
        "trainable_params"]


@pytest.mark.parametrize("extra, msg", [
    (["--criterion", "magic"], "unknown --criterion"),
    (["--batch-size", "3", "--micro-batch-size", "2"], "multiple"),
    (["--random-init", "llama-7b"], "not both"),
])
def test_prune_step_bad_input(runner, tmp_path, tiny_llama_dir, extra, msg):
    r = invoke(runner, ["bench", "prune-step", tiny_llama_dir, *extra, "-o", tmp_path / "c.json"])
    assert r.exit_code == 2 and msg in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_plot_without_matplotlib_fails_before_measuring(runner, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    r = invoke(runner, ["bench", "runtime", "--random-init", "llama-13b", "--plot", "-o", tmp_path / "b.json"])
    assert r.exit_code == 2 and "matplotlib" in r.output  # refused at once, not after building a 13B model
    assert list(tmp_path.iterdir()) == []


def test_help_has_working_examples(runner):
    for cmd in ("runtime", "prune-step"):
        r = invoke(runner, ["bench", cmd, "--help"])
        assert r.exit_code == 0 and "Examples" in r.output and f"lpt bench {cmd}" in r.output


def test_recipe_section_and_flags_override(runner, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("bench:\n  runtime:\n    seq-len: 8\n    trials: 1\n    warmup: 0\n    isolate: false\n"
                      "  prune-step:\n    criterion: [vanilla]\n")
    out = tmp_path / "o.json"
    r = invoke(runner, ["bench", "runtime", "--random-init", TINY_JSON, "--recipe", recipe, "--trials", 2, "-o", out])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert (doc["protocol"]["seq_len"], doc["protocol"]["trials"], doc["protocol"]["warmup"]) == (8, 2, 0)
    assert "one process" in doc["protocol"]["isolation"]
    recipe.write_text("bench:\n  runtime:\n    bogus: 1\n")
    r = invoke(runner, ["bench", "runtime", "--random-init", TINY_JSON, "--recipe", recipe, "-o", tmp_path / "p.json"])
    assert r.exit_code == 2 and "bogus" in r.output
