"""lpt prune with depth, hidden size and whole-model targets, driven through the CLI on tiny random Llamas: what is
removed, the block / hidden estimators, resume, one-shot, tensor-parallel sizes, and everything downstream (slice,
slice --reconstruct, merge, eval unmerged == sliced)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import build_model, invoke, tiny_config
from lpt import artifacts, importance, lora
from lpt.arch import describe
from lpt.stages import prune

FAST = ["--max-steps", "6", "--batch-size", "4", "--micro-batch-size", "2", "--prune-freq", "2", "--lr", "1e-3",
        "--warmup", "0.0", "--cooldown", "0.3"]


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A 4-layer Llama with grouped-query attention: 8 query heads, 4 key/value heads, hidden 64."""
    d = tmp_path_factory.mktemp("deep")
    build_model(tiny_config(layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=8)).save_pretrained(d)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d


def masks_of(out):
    return json.loads((out / artifacts.MASKS).read_text())


@pytest.mark.parametrize("flags, blocks, hidden", [
    (["--prune-layers", "1"], 1, None),
    (["--prune-layers", "0.5", "--block-criterion", "influence"], 2, None),
    (["--prune-layers", "1", "--block-criterion", "loss"], 1, None),
    (["--prune-layers", "1", "--block-criterion", "random"], 1, None),
    (["--hidden-ratio", "0.25"], 0, 48),
    (["--hidden-ratio", "0.25", "--hidden-criterion", "activation"], 0, 48),
    (["--hidden-ratio", "0.25", "--hidden-criterion", "random", "--prune-layers", "1", "--ratio", "0.2"], 1, 48),
])
def test_fixed_axes_remove_what_they_say(tmp_path, runner, deep_dir, tiny_calib_dir, flags, blocks, hidden):
    out = tmp_path / "out"
    r = invoke(runner, ["prune", deep_dir, "--calib", tiny_calib_dir, *FAST, *flags, "-o", out])
    assert r.exit_code == 0, r.output
    m = masks_of(out)
    assert m["schema_version"] == 2 and len(m["removed_layers"]) == blocks
    assert (m["hidden_channels"] is None) == (hidden is None)
    if hidden is not None:
        assert len(m["hidden_channels"]) == hidden
    width = "--ratio" in flags
    assert all(len(layer["mlp_channels"]) < 96 for layer in m["layers"]) == width
    imp = artifacts.load_tensors(out / artifacts.IMPORTANCE)
    assert ("blocks" in imp) == (blocks > 0) and ("hidden" in imp) == (hidden is not None)
    before, after = m["params"]["model_before"], m["params"]["model_after"]
    assert after < before and m["ratio"]["model"] == pytest.approx(1 - after / before)
    search = m["info"]["search"]
    assert search["target"]["blocks"] == blocks


def test_whole_model_target_searches_and_slices(tmp_path, runner, deep_dir, tiny_calib_dir):
    out = tmp_path / "out"
    r = invoke(runner, ["prune", deep_dir, "--calib", tiny_calib_dir, *FAST, "--model-ratio", "0.3", "--axes",
                        "width,depth,hidden", "-o", out])
    assert r.exit_code == 0, r.output
    m = masks_of(out)
    s = m["info"]["search"]
    assert s["goal_params"] == round(0.7 * m["params"]["model_before"]) and len(s["candidates"]) >= 2
    best = min(s["candidates"], key=lambda c: c["loss"])
    assert s["target"] == {k: best[k] for k in ("blocks", "hidden_channels", "attention_units", "mlp_channels")}
    assert abs(m["params"]["model_after"] - s["goal_params"]) <= 0.01 * m["params"]["model_before"]
    sliced = tmp_path / "sliced"
    r = invoke(runner, ["slice", deep_dir, "--masks", out / artifacts.MASKS, "--adapter", out, "--merge",
                        "--dtype", "float32", "-o", sliced])
    assert r.exit_code == 0, r.output
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sliced)
    assert sum(p.numel() for p in model.parameters()) == m["params"]["model_after"]


def test_eval_unmerged_equals_sliced_and_reconstruct(tmp_path, runner, deep_dir, tiny_calib_dir):
    """The prune output evaluated unmerged (base + adapter + masks: the residual mask and the gated blocks at run
    time) gives the sliced model's perplexity; slice --reconstruct refits the kept blocks."""
    out = tmp_path / "out"
    assert invoke(runner, ["prune", deep_dir, "--calib", tiny_calib_dir, *FAST, "--prune-layers", "1",
                           "--hidden-ratio", "0.25", "--ratio", "0.3", "-o", out]).exit_code == 0
    sliced = tmp_path / "sliced"
    assert invoke(runner, ["slice", deep_dir, "--masks", out / artifacts.MASKS, "--adapter", out, "--merge",
                           "--dtype", "float32", "-o", sliced]).exit_code == 0
    ppl = {}
    for name, args in (("unmerged", [deep_dir, "--adapter", out, "--masks", out / artifacts.MASKS]),
                       ("sliced", [sliced])):
        r = invoke(runner, ["eval", *args, "--ppl", "builtin:pydoc:test", "--seq-len", "64", "--max-segments", "4",
                            "--dtype", "float32", "-o", tmp_path / f"{name}.json"])
        assert r.exit_code == 0, r.output
        ppl[name] = json.loads((tmp_path / f"{name}.json").read_text())["perplexity"]["builtin:pydoc:test"]["ppl"]
    assert ppl["unmerged"] == pytest.approx(ppl["sliced"], rel=1e-3)
    rec = tmp_path / "rec"
    r = invoke(runner, ["slice", deep_dir, "--masks", out / artifacts.MASKS, "--adapter", out, "--merge",
                        "--reconstruct", tiny_calib_dir, "--dtype", "float32", "-o", rec])
    assert r.exit_code == 0, r.output
    cfg = json.loads((rec / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["hidden_size"] == 48


def test_resume_equals_uninterrupted_with_axes(tmp_path, runner, deep_dir, tiny_calib_dir, monkeypatch):
    args = ["prune", deep_dir, "--calib", tiny_calib_dir, *FAST, "--model-ratio", "0.3", "--lora-dropout", "0.1"]
    full = tmp_path / "full"
    assert invoke(runner, [*args, "-o", full]).exit_code == 0
    cut = tmp_path / "cut"
    real_step = prune.Pruner.train_step

    def crash(self, batch):
        if self.step == 4:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(prune.Pruner, "train_step", crash)
    assert invoke(runner, [*args, "--save-every", "2", "-o", cut]).exit_code != 0
    monkeypatch.setattr(prune.Pruner, "train_step", real_step)
    r = invoke(runner, [*args, "--save-every", "2", "--resume", "-o", cut])
    assert r.exit_code == 0, r.output
    a, b = masks_of(full), masks_of(cut)
    for key in ("layers", "removed_layers", "hidden_channels", "params"):
        assert a[key] == b[key], key
    assert a["info"]["search"] == b["info"]["search"]
    wa, wb = (artifacts.load_tensors(d / artifacts.ADAPTER_WEIGHTS) for d in (full, cut))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)


def test_one_shot_with_axes(tmp_path, runner, deep_dir, tiny_calib_dir):
    out = tmp_path / "out"
    r = invoke(runner, ["prune", deep_dir, "--calib", tiny_calib_dir, *FAST, "--one-shot", "--prune-layers", "1",
                        "--hidden-ratio", "0.25", "-o", out])
    assert r.exit_code == 0, r.output
    m = masks_of(out)
    assert len(m["removed_layers"]) == 1 and len(m["hidden_channels"]) == 48
    log = [json.loads(x) for x in (out / artifacts.TRAIN_LOG).read_text().splitlines()]
    assert all(rec["sparsity"] == pytest.approx(log[0]["sparsity"]) for rec in log)  # at the target from step 1


@pytest.mark.parametrize("sizes", [["2"], ["4"], ["2,4"]])
def test_tensor_parallel_sizes_are_honoured_and_recorded(tmp_path, runner, deep_dir, tiny_calib_dir, sizes):
    out = tmp_path / "out"
    flags = [x for s in sizes for x in ("--tp", s)]
    r = invoke(runner, ["prune", deep_dir, "--calib", tiny_calib_dir, *FAST, "--ratio", "0.5", *flags, "-o", out])
    assert r.exit_code == 0, r.output
    m = masks_of(out)
    want = [int(t) for s in sizes for t in s.split(",")]
    assert m["info"]["tp"]["requested"] == sorted(want)
    for layer in m["layers"]:
        h, kv, ch = len(layer["attention_heads"]), len(layer["kv_heads"]), len(layer["mlp_channels"])
        for t in want:
            assert h % t == 0 and (kv % t == 0 or t % kv == 0) and ch % (t * 8) == 0, (layer, t)
    assert set(want) <= set(m["info"]["tp"]["supported"])
    assert json.loads((out / artifacts.RESOLVED_CONFIG).read_text())["config"]["tp"] == sorted(want)
    sliced = tmp_path / "sliced"
    r = invoke(runner, ["slice", deep_dir, "--masks", out / artifacts.MASKS, "-o", sliced])
    assert r.exit_code == 0 and "shards at tensor-parallel" in r.output.replace("\n", " ")
    assert set(want) <= set(json.loads((sliced / artifacts.PROVENANCE).read_text())["tensor_parallel"])


def test_eval_warns_when_a_model_cannot_shard(tmp_path, runner, deep_dir):
    r = invoke(runner, ["eval", deep_dir, "--tp", "3", "--ppl", "builtin:pydoc:test", "--seq-len", "32",
                        "--max-segments", "1", "-o", tmp_path / "r.json"])
    assert r.exit_code == 0, r.output
    assert "does not shard at tensor-parallel size 3" in r.output.replace("\n", " ")
    r = invoke(runner, ["eval", deep_dir, "--tp", "4", "--ppl", "builtin:pydoc:test", "--seq-len", "32",
                        "--max-segments", "1", "-o", tmp_path / "r4.json"])
    assert "does not shard" not in r.output.replace("\n", " ")


@pytest.mark.parametrize("flags, message", [
    (["--model-ratio", "0.3", "--ratio", "0.2"], "one or the other"),
    (["--model-ratio", "1.5"], "--model-ratio must be in (0, 1)"),
    (["--prune-layers", "4"], "at least one"),
    (["--target-params", "lots"], "--target-params"),
    (["--axes", "width,breadth", "--model-ratio", "0.2"], "--axes"),
    (["--block-criterion", "vibes", "--prune-layers", "1"], "--block-criterion"),
    (["--tp", "3", "--ratio", "0.2"], "--tp 3"),
])
def test_bad_axes_flags_are_one_line(tmp_path, runner, deep_dir, tiny_calib_dir, flags, message):
    out = tmp_path / "out"
    r = invoke(runner, ["prune", deep_dir, "--calib", tiny_calib_dir, *FAST, *flags, "-o", out])
    assert r.exit_code != 0 and message in r.output.replace("\n", " "), r.output
    assert not out.exists()


def test_block_and_hidden_fisher_match_autograd():
    """The estimators' d(b, n) and d(c, n): the gradient of the loss of each sequence with respect to a gate on the
    block's residual contribution and a mask on the hidden channel (embedding and every o_proj / down_proj output),
    checked against autograd with explicit gates."""
    from lpt.gates import decoder_layers

    cfg = tiny_config(layers=3)
    model = build_model(cfg)
    arch = describe(cfg)
    lora.inject(model, arch, r=0, alpha=1)
    est = importance.AxesImportance("fisher", "fisher", normalize=False).attach(model, arch)
    ids = torch.randint(0, cfg.vocab_size, (3, 10), generator=torch.Generator().manual_seed(1))
    for n in range(3):  # one sequence per backward pass: the estimator squares per sequence
        model(input_ids=ids[n:n + 1], labels=ids[n:n + 1]).loss.backward()
    blocks, hidden = est.scores()
    est.detach()

    # reference: explicit gates m_b (blocks) and m_c (hidden, at every write to the residual), gradients by autograd
    ref_b, ref_h = torch.zeros(arch.num_layers), torch.zeros(arch.hidden_size)
    for n in range(3):
        gb = torch.ones(arch.num_layers, requires_grad=True)
        gh = torch.ones(arch.hidden_size, requires_grad=True)
        handles = [model.get_input_embeddings().register_forward_hook(lambda m, a, o: o * gh)]
        for i, layer in enumerate(decoder_layers(model, arch)):
            handles.append(layer.register_forward_hook(
                lambda m, a, k, o, i=i: a[0] + gb[i] * ((o[0] if isinstance(o, tuple) else o) - a[0]),
                with_kwargs=True))
            for proj in ("o_proj", "down_proj"):
                from lpt.arch import get_module

                handles.append(get_module(model, arch.module_path(i, proj)).register_forward_hook(
                    lambda m, a, o: o * gh))
        loss = model(input_ids=ids[n:n + 1], labels=ids[n:n + 1]).loss
        db, dh = torch.autograd.grad(loss, [gb, gh])
        for h in handles:
            h.remove()
        ref_b += db.square()
        ref_h += dh.square()
    torch.testing.assert_close(blocks, ref_b.float(), rtol=1e-3, atol=1e-8)
    torch.testing.assert_close(hidden, ref_h.float(), rtol=1e-3, atol=1e-8)
