"""lpt prune on tiny random Llamas: groups, ratio, criterion vs autograd, resume, int8, PEFT compatibility."""

import json

import pytest
import torch

from conftest import build_model, invoke, tiny_config
from lpt import artifacts, groups, int8, lora, selection
from lpt.masks import Masks, apply_masks
from lpt.arch import describe
from lpt.config import PruneConfig
from lpt.stages import prune

FAST = ["--max-steps", "6", "--batch-size", "4", "--micro-batch-size", "2", "--prune-freq", "2", "--lr", "1e-3",
        "--warmup", "0.0", "--cooldown", "0.3"]


def _pruner(gqa_model=True, **kw):
    cfg = tiny_config(gqa=gqa_model)
    model = build_model(cfg)
    pc = PruneConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0, **{"balance": "proportional", **kw})  # fixed targets
    return prune.Pruner(model, describe(cfg), pc, total_steps=10), cfg


def _batch(cfg, n=4, seq=16, seed=0):
    ids = torch.randint(0, cfg.vocab_size, (n, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.mark.parametrize("gqa_mode", ["kv-groups", "query-heads"])
def test_group_importance_matches_autograd_and_no_base_gradients(gqa_mode):
    p, cfg = _pruner(gqa_model=True, gqa=gqa_mode, normalize=False, criterion="lora")
    for layer in p.layers.values():  # non-zero B so that every term of Eq. 10 matters
        if layer.r:
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    p.forward_backward(_batch(cfg))
    # no base weight has (or can get) a gradient: the criterion never needs one
    for layer in p.layers.values():
        assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad
    got = p.group_importance()
    a = p.arch
    for i in range(a.num_layers):
        full = {}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            L = p.layers[a.module_path(i, proj)]
            A, B, gA, gB = L.lora_A.weight, L.lora_B.weight, L.lora_A.weight.grad, L.lora_B.weight.grad
            G = gB @ A + B @ gA - gB @ gA  # Eq. 10, written out independently
            full[proj] = ((G * (L.base_layer.weight + L.scaling * B @ A)) ** 2).detach()
        hd, g = a.head_dim, a.group_size
        q = full["q_proj"].view(a.num_heads, hd, -1).sum((1, 2)) + full["o_proj"].view(-1, a.num_heads, hd).sum((0, 2))
        if gqa_mode == "kv-groups":
            want_h = q.view(a.num_kv_heads, g).sum(1) + full["k_proj"].view(a.num_kv_heads, hd, -1).sum((1, 2)) \
                + full["v_proj"].view(a.num_kv_heads, hd, -1).sum((1, 2))
        else:
            want_h = q
        want_c = full["gate_proj"].sum(1) + full["up_proj"].sum(1) + full["down_proj"].sum(0)
        torch.testing.assert_close(got[i][0], want_h, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(got[i][1], want_c, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("gqa, mode", [(True, "kv-groups"), (True, "query-heads"), (False, "kv-groups")])
def test_masked_forward_equals_zeroed_heads_and_channels(gqa, mode):
    p, cfg = _pruner(gqa_model=gqa, gqa=mode)
    ref = build_model(cfg)  # same seed: same weights, no LoRA (B = 0 at the start anyway)
    p.state.head_scores = [torch.rand(p.heads_pruned[0].numel()) for _ in range(cfg.num_hidden_layers)]
    p.state.channel_scores = [torch.rand(cfg.intermediate_size) for _ in range(cfg.num_hidden_layers)]
    p.prune_to(0.5)
    masks = p.masks()
    x = _batch(cfg)["input_ids"]
    with torch.no_grad():
        got = p.model(x).logits
        a = describe(cfg)
        for i, m in enumerate(masks.layers):
            attn, mlp = ref.model.layers[i].self_attn, ref.model.layers[i].mlp
            for h in range(a.num_heads):
                if h not in m.heads:
                    attn.q_proj.weight[h * 16:(h + 1) * 16] = 0
                    attn.o_proj.weight[:, h * 16:(h + 1) * 16] = 0
            for kv in range(a.num_kv_heads):
                if kv not in m.kv_heads:
                    attn.k_proj.weight[kv * 16:(kv + 1) * 16] = 0
                    attn.v_proj.weight[kv * 16:(kv + 1) * 16] = 0
            drop = [c for c in range(a.intermediate_size) if c not in m.channels]
            mlp.gate_proj.weight[drop] = 0
            mlp.up_proj.weight[drop] = 0
            mlp.down_proj.weight[:, drop] = 0
        want = ref(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["uniform", "per-layer"])
def test_balance_search_keeps_the_candidate_with_the_lowest_loss(layout):
    p, cfg = _pruner(gqa_model=False, gqa="kv-groups", layout=layout, ratio=0.5, balance="search")  # 0..3 heads
    g = torch.Generator().manual_seed(3)
    p.state.head_scores = [torch.rand(4, generator=g) for _ in range(cfg.num_hidden_layers)]
    p.state.channel_scores = [torch.rand(cfg.intermediate_size, generator=g) for _ in range(cfg.num_hidden_layers)]
    batch = _batch(cfg, n=4, seq=24, seed=5)
    before = p.model(batch["input_ids"]).logits.detach()
    assert p.target_counts is None  # decided at the first mask update
    p.search(batch)
    cands = p.search_losses
    # uniform: not the 1-unit candidate -- 3 heads of a hidden size of 64 is a config Llama's refuses to load
    assert [(c["attention_units"], c["mlp_channels"]) for c in cands] == \
        [w for w in groups.balance_candidates(p.arch, 0.5, "kv-groups", p.budget.round_to)
         if layout == "per-layer" or 64 % (4 - w[0]) == 0]
    assert len(cands) >= 3
    # the same losses, computed here from the candidates' masks by hand
    ref = build_model(cfg)
    arch = describe(cfg)
    lora.inject(ref, arch, r=4, alpha=8)
    policy = selection.Policy.of(arch, layout=layout, prunable=[0, 1], gqa="kv-groups", round_to=p.budget.round_to)
    state = selection.State(p.state.head_scores, p.state.channel_scores, p.heads_pruned, p.channels_pruned)
    for c in cands:
        counts = selection.step_counts(1.0, (c["attention_units"], c["mlp_channels"]), policy, state)
        hp, cp = selection.grow(counts, policy, state)
        apply_masks(ref, Masks.from_pruned(arch, hp, cp, "kv-groups"))
        with torch.no_grad():
            want = float(ref(**batch).loss)
        assert c["loss"] == pytest.approx(want, rel=1e-4, abs=1e-5)
    best = min(cands, key=lambda c: c["loss"])
    assert p.target_counts == (best["attention_units"], best["mlp_channels"])
    assert len({round(c["loss"], 4) for c in cands}) > 1  # the candidates do differ
    # nothing is left pruned by the search itself
    torch.testing.assert_close(p.model(batch["input_ids"]).logits.detach(), before, rtol=1e-5, atol=1e-6)
    p.prune_to(0.5)
    assert all(int(h.sum()) == p.target_counts[0] for h in p.heads_pruned) or layout == "per-layer"
    assert sum(int(h.sum()) for h in p.heads_pruned) == 2 * p.target_counts[0]


@pytest.mark.parametrize("balance, heads_left", [("0", 4), ("2", 2), ("proportional", 2)])
def test_balance_fixed_counts(tmp_path, runner, tiny_mha_dir, tiny_calib_dir, balance, heads_left):
    out = tmp_path / "out"
    r = invoke(runner, ["prune", tiny_mha_dir, "--calib", tiny_calib_dir, "--ratio", "0.5", "--balance", balance,
                        *FAST, "-o", out])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / artifacts.MASKS).read_text())
    assert [len(layer["attention_heads"]) for layer in doc["layers"]] == [heads_left] * 2
    assert doc["info"]["balance"]["mode"] == balance and "candidates" not in doc["info"]["balance"]
    assert abs(doc["ratio"]["blocks"] - 0.5) < 0.05


def test_balance_refuses_counts_transformers_cannot_load(tmp_path, runner, tiny_mha_dir, tiny_calib_dir):
    """3 of 4 heads with a hidden size of 64: Llama's config (transformers 5) refuses it, so prune does first."""
    r = invoke(runner, ["prune", tiny_mha_dir, "--calib", tiny_calib_dir, "--ratio", "0.5", "--balance", "1",
                        *FAST, "-o", tmp_path / "out"])
    assert r.exit_code != 0 and "not a multiple of the attention heads (3)" in r.output.replace("\n", " ")
    assert not (tmp_path / "out").exists()


def test_balance_search_is_recorded(tmp_path, runner, tiny_mha_dir, tiny_calib_dir):
    out = tmp_path / "out"
    r = invoke(runner, ["prune", tiny_mha_dir, "--calib", tiny_calib_dir, "--ratio", "0.5", *FAST, "-o", out])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / artifacts.MASKS).read_text())
    b = doc["info"]["balance"]
    assert b["mode"] == "search" and [c["attention_units"] for c in b["candidates"]] == [0, 2, 3]  # not 3 heads
    best = min(b["candidates"], key=lambda c: c["loss"])
    assert (b["attention_units"], b["mlp_channels"]) == (best["attention_units"], best["mlp_channels"])
    assert [len(layer["attention_heads"]) for layer in doc["layers"]] == [4 - b["attention_units"]] * 2


@pytest.mark.parametrize("ratio", [0.2, 0.5])
@pytest.mark.parametrize("gqa_mode", ["kv-groups", "query-heads"])
def test_cli_prune_respects_groups_and_ratio(tmp_path, runner, tiny_llama_dir, tiny_calib_dir, ratio, gqa_mode):
    out = tmp_path / "out"
    r = invoke(runner, ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, "--ratio", ratio, "--gqa", gqa_mode,
                        *FAST, "-o", out])
    assert r.exit_code == 0, r.output
    for name in (artifacts.ADAPTER_CONFIG, artifacts.ADAPTER_WEIGHTS, artifacts.MASKS, artifacts.IMPORTANCE,
                 artifacts.TRAIN_LOG, artifacts.RESOLVED_CONFIG):
        assert (out / name).is_file(), name
    arch = describe(tiny_config(gqa=True))
    masks = Masks.load(out / artifacts.MASKS, arch)  # validates groups under GQA
    g = arch.group_size
    for m in masks.layers:
        if gqa_mode == "kv-groups":  # whole key/value groups: every kept kv head keeps all its query heads
            assert m.heads == [q for kv in m.kv_heads for q in range(kv * g, (kv + 1) * g)]
        else:
            assert m.kv_heads == list(range(arch.num_kv_heads))
            assert len({sum(1 for q in m.heads if q // g == kv) for kv in m.kv_heads}) == 1
    doc = json.loads((out / artifacts.MASKS).read_text())
    before, after = masks.block_params()
    assert doc["params"]["blocks_before"] == before and doc["params"]["blocks_after"] == after
    # achieved ratio equals the requested one to the nearest group: within half the largest group's share
    p_head, p_chan = groups.unit_params(arch, gqa_mode)
    assert abs((before - after) - ratio * before) <= arch.num_layers * (p_head / 2 + p_chan / 2)
    log = [json.loads(line) for line in (out / artifacts.TRAIN_LOG).read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert log[-1]["sparsity"] == pytest.approx(doc["ratio"]["blocks"], abs=1e-5)


def test_adapter_loads_in_peft_and_matches(tmp_path, runner, tiny_mha_dir, tiny_calib_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    r = invoke(runner, ["prune", tiny_mha_dir, "--calib", tiny_calib_dir, "--ratio", "0.2", *FAST, "-o", out])
    assert r.exit_code == 0, r.output
    base = AutoModelForCausalLM.from_pretrained(tiny_mha_dir)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    ours = AutoModelForCausalLM.from_pretrained(tiny_mha_dir).eval()
    lora.load_adapter(ours, out, describe(ours.config))
    assert any(float(layer.lora_B.weight.detach().abs().sum()) > 0 for layer in lora.lora_layers(ours).values() if layer.r)
    x = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, ours(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["hidden", "earlier-lpt"])
def test_resume_equals_uninterrupted(tmp_path, runner, tiny_llama_dir, tiny_calib_dir, monkeypatch, layout):
    """Checkpoints live in the hidden .OUTPUT.partial/ (the one partial-output convention); those an earlier lpt left
    in a visible OUTPUT.partial/ resume too."""
    args = ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, "--ratio", "0.5", *FAST, "--lora-dropout", "0.1"]
    full = tmp_path / "full"
    assert invoke(runner, [*args, "-o", full]).exit_code == 0

    cut = tmp_path / "cut"
    real_step = prune.Pruner.train_step

    def crash_at_5(self, batch):
        if self.step == 4:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(prune.Pruner, "train_step", crash_at_5)
    r = invoke(runner, [*args, "--save-every", "2", "-o", cut])
    assert r.exit_code != 0
    assert not cut.exists()  # nothing that looks finished
    assert (prune.partial_dir(cut) / artifacts.CHECKPOINT_DIR).is_dir()
    assert prune.partial_dir(cut).name == ".cut.partial" and sorted(p.name for p in tmp_path.iterdir()) == [
        ".cut.partial", "full"]  # nothing visible
    if layout == "earlier-lpt":
        prune.partial_dir(cut).rename(artifacts.legacy_partial_dir(cut))
    monkeypatch.setattr(prune.Pruner, "train_step", real_step)
    r = invoke(runner, [*args, "--save-every", "2", "--resume", "-o", cut])
    assert r.exit_code == 0, r.output
    assert "resuming from step 4" in r.output
    assert (full / artifacts.MASKS).read_text() == (cut / artifacts.MASKS).read_text()
    from safetensors.torch import load_file

    a, b = load_file(full / artifacts.ADAPTER_WEIGHTS), load_file(cut / artifacts.ADAPTER_WEIGHTS)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    logs = [(full / artifacts.TRAIN_LOG).read_text().splitlines(), (cut / artifacts.TRAIN_LOG).read_text().splitlines()]
    assert [json.loads(x)["loss"] for x in logs[0]] == [json.loads(x)["loss"] for x in logs[1]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "full"]


def test_8bit_prune_runs_and_stays_int8(tmp_path, runner, tiny_llama_dir, tiny_calib_dir):
    out = tmp_path / "out8"
    r = invoke(runner, ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, "--ratio", "0.5", "--8bit", *FAST,
                        "-o", out])
    assert r.exit_code == 0, r.output
    masks = Masks.load(out / artifacts.MASKS)
    assert masks.block_params()[1] < masks.block_params()[0]
    p, cfg = _pruner(load_8bit=True)
    assert all(int8.is_int8(layer.base_layer) for layer in p.layers.values())
    p.train_step(_batch(cfg))
    # int8 de-quantisation is close to the dense weight it came from
    dense = build_model(cfg)
    w8 = int8.dense_weight(p.layers["model.layers.0.mlp.up_proj"].base_layer)
    torch.testing.assert_close(w8, dense.model.layers[0].mlp.up_proj.weight, rtol=0, atol=0.08 * 4 / 127)


@pytest.mark.parametrize("criterion", ["vanilla", "magnitude", "random"])
def test_baseline_criteria(tmp_path, runner, tiny_llama_dir, tiny_calib_dir, criterion):
    out = tmp_path / criterion
    r = invoke(runner, ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, "--criterion", criterion,
                        "--ratio", "0.5", *FAST, "-o", out])
    assert r.exit_code == 0, r.output
    assert json.loads((out / artifacts.MASKS).read_text())["info"]["criterion"] == criterion


def test_vanilla_gets_base_gradients_lora_does_not():
    p, cfg = _pruner(criterion="vanilla")
    p.forward_backward(_batch(cfg))
    assert all(layer.base_layer.weight.grad is not None for layer in p.layers.values())


def test_one_shot_and_per_layer(tmp_path, runner, tiny_llama_dir, tiny_calib_dir):
    out = tmp_path / "oneshot"
    r = invoke(runner, ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, "--one-shot", "--ratio", "0.5",
                        "--layout", "per-layer", *FAST, "-o", out])
    assert r.exit_code == 0, r.output
    log = [json.loads(x) for x in (out / artifacts.TRAIN_LOG).read_text().splitlines()]
    assert log[0]["sparsity"] > 0.3  # pruned before the first step
    assert len({x["sparsity"] for x in log}) == 1


def test_skip_layers(tmp_path, runner, tiny_llama_dir, tiny_calib_dir):
    out = tmp_path / "skip"
    r = invoke(runner, ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, "--skip-layers", "0", "--ratio", "0.3",
                        *FAST, "-o", out])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / artifacts.MASKS).read_text())
    assert doc["layout"] == "per-layer"
    assert doc["layers"][0]["mlp_channels"] == list(range(96)) and len(doc["layers"][0]["attention_heads"]) == 4
    assert len(doc["layers"][1]["mlp_channels"]) < 96


@pytest.mark.parametrize("args, message", [
    (["--criterion", "vanilla", "--8bit"], "int8"),
    (["--ratio", "1.5"], "--ratio"),
    (["--criterion", "nope"], "--criterion"),
    (["--batch-size", "6", "--micro-batch-size", "4"], "multiple"),
    (["--skip-layers", "7"], "does not exist"),
    (["--targets", "q_proj,foo"], "foo"),
    (["--resume"], "no checkpoint"),
    (["--balance", "many"], "--balance"),
    (["--balance", "3"], "--balance 3"),
])
def test_bad_input_is_one_line(tmp_path, runner, tiny_llama_dir, tiny_calib_dir, args, message):
    out = tmp_path / "bad"
    r = invoke(runner, ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, *FAST, *args, "-o", out])
    assert r.exit_code == 2
    assert message in r.output and "Traceback" not in r.output
    assert not out.exists() and not prune.partial_dir(out).exists()


def test_calib_from_another_tokenizer_is_refused(tmp_path, runner, tiny_llama_dir):
    import shutil

    from lpt.stages import calibrate

    calib = tmp_path / "calib"
    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    calibrate.run(calibrate.CalibrateConfig(model=str(tiny_llama_dir), nsamples=4, seq_len=16, output=str(calib)))
    meta = json.loads((calib / artifacts.CALIB_META).read_text())
    meta["tokenizer_fingerprint"] = "0" * 16
    (calib / artifacts.CALIB_META).write_text(json.dumps(meta))
    r = invoke(runner, ["prune", tmp_path / "m", "--calib", calib, *FAST, "-o", tmp_path / "o"])
    assert r.exit_code == 2 and "does not match" in r.output


KILL_DRIVER = """
import os, signal, sys
from lpt.pruner import Pruner
step = Pruner.train_step
def killed(self, batch):
    if self.step == int(os.environ["LPT_KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)  # no exception, no cleanup: as if the machine went away
    return step(self, batch)
Pruner.train_step = killed
from lpt.cli import app
app(sys.argv[1:], prog_name="lpt")
"""


def test_resume_after_the_process_is_killed(tmp_path, runner, tiny_llama_dir, tiny_calib_dir):
    import signal
    import subprocess
    import sys

    args = ["prune", str(tiny_llama_dir), "--calib", str(tiny_calib_dir), "--ratio", "0.5", *FAST,
            "--criterion", "fisher", "--save-every", "2"]
    full = tmp_path / "full"
    assert invoke(runner, [*args, "-o", full]).exit_code == 0
    cut = tmp_path / "cut"
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER)
    r = subprocess.run([sys.executable, str(driver), *args, "-o", str(cut)], capture_output=True, text=True,
                       env={**__import__("os").environ, "LPT_KILL_AT": "5"}, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    ckpt = prune.partial_dir(cut) / artifacts.CHECKPOINT_DIR
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint.json", "trainer_state.safetensors"]  # no pickle
    assert not cut.exists()
    r = invoke(runner, [*args, "--resume", "-o", cut])
    assert r.exit_code == 0, r.output
    assert "resuming from step 4" in r.output
    assert (full / artifacts.MASKS).read_text() == (cut / artifacts.MASKS).read_text()
    from safetensors.torch import load_file

    a, b = load_file(full / artifacts.ADAPTER_WEIGHTS), load_file(cut / artifacts.ADAPTER_WEIGHTS)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_distill_teacher_is_the_unpruned_base_without_a_copy():
    p, cfg = _pruner(gqa_model=True, distill=True)
    ref = build_model(cfg)  # same seed: the unpruned base
    for layer in p.layers.values():
        if layer.r:
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    p.state.head_scores = [torch.rand(p.heads_pruned[0].numel()) for _ in range(cfg.num_hidden_layers)]
    p.state.channel_scores = [torch.rand(cfg.intermediate_size) for _ in range(cfg.num_hidden_layers)]
    p.prune_to(0.5)
    x = _batch(cfg)["input_ids"]
    storages = {t.untyped_storage().data_ptr() for t in p.model.parameters()}
    with torch.no_grad():
        student = p.model(x).logits
        with lora.disabled(p.model):
            teacher = p.model(x).logits
        torch.testing.assert_close(teacher, ref(x).logits, rtol=1e-5, atol=1e-5)
        assert (student - teacher).abs().max() > 1e-3  # the student is pruned and adapted; the teacher is not
        torch.testing.assert_close(p.model(x).logits, student)  # switched back on afterwards
    assert {t.untyped_storage().data_ptr() for t in p.model.parameters()} == storages  # no weight copy
    loss = p.forward_backward(_batch(cfg))
    assert loss > 0 and all(q.grad is not None for q in p.params)


def test_kl_gradient_is_zero_while_student_equals_teacher():
    from lpt import losses

    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :3] = -100
    kl = losses.kl_distill(logits, logits.detach(), labels, temperature=2.0)
    kl.backward()
    assert float(kl.detach()) == pytest.approx(0.0, abs=1e-6) and float(logits.grad.abs().max()) < 1e-6
    other = torch.randn(2, 5, 11)
    assert float(losses.kl_distill(logits, other, labels, 1.0).detach()) > 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_kl_equals_the_plain_formula(temperature):
    """The chunked KL (value and gradient) equals F.kl_div over the shifted, label-carrying positions."""
    import torch.nn.functional as F

    from lpt import losses

    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 7, 13, generator=g, requires_grad=True)
    t = torch.randn(2, 7, 13, generator=g)
    labels = torch.randint(0, 13, (2, 7), generator=g)
    labels[0, :4] = -100
    labels[1, 6] = -100
    kl = losses.kl_distill(s, t, labels, temperature, chunk=3)  # chunks smaller than the 8 counted positions
    (grad,) = torch.autograd.grad(kl, s)
    keep = labels[:, 1:].reshape(-1) != -100
    ss, tt = s[:, :-1].reshape(-1, 13)[keep] / temperature, t[:, :-1].reshape(-1, 13)[keep] / temperature
    ref = F.kl_div(F.log_softmax(ss, -1), F.log_softmax(tt, -1), log_target=True, reduction="batchmean")
    ref = ref * temperature**2
    (ref_grad,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_distill_cli_and_refused_weight(tmp_path, runner, tiny_llama_dir, tiny_calib_dir):
    base = ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, "--ratio", "0.5", *FAST]
    r = invoke(runner, [*base, "--distill", "--distill-weight", "1", "-o", tmp_path / "bad"])
    assert r.exit_code == 2 and "--distill-weight 1" in r.output and not (tmp_path / "bad").exists()
    out = tmp_path / "d"
    r = invoke(runner, [*base, "--criterion", "fisher", "--distill", "--distill-temperature", "2", "-o", out])
    assert r.exit_code == 0, r.output
    info = json.loads((out / artifacts.MASKS).read_text())["info"]
    assert info["distill"] == {"temperature": 2.0, "weight": 0.5} and info["criterion"] == "fisher"


def test_pickled_checkpoint_is_refused_not_loaded(tmp_path, runner, tiny_llama_dir, tiny_calib_dir):
    out = tmp_path / "o"
    ckpt = prune.partial_dir(out) / artifacts.CHECKPOINT_DIR
    ckpt.mkdir(parents=True)
    (ckpt / artifacts.CHECKPOINT_STATE).write_bytes(b"\x80\x04not really a pickle")
    r = invoke(runner, ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, *FAST, "--resume", "-o", out])
    assert r.exit_code == 2 and "pickled checkpoint" in r.output
    assert not out.exists()


def test_gqa_auto_prunes_query_heads_with_a_single_key_value_head():
    """With one key/value head, kv-groups could prune no attention: auto picks query-heads and says so."""
    cfg = tiny_config(num_attention_heads=4, num_key_value_heads=1)
    p = prune.Pruner(build_model(cfg), describe(cfg), PruneConfig(lora_r=4, ratio=0.5, balance="proportional"),
                     total_steps=4)
    assert p.cfg.gqa == "query-heads" and "single key/value head" in p.note
    p.state.head_scores = [torch.rand(4) for _ in range(cfg.num_hidden_layers)]
    p.state.channel_scores = [torch.rand(cfg.intermediate_size) for _ in range(cfg.num_hidden_layers)]
    p.prune_to(0.5)
    assert all(len(m.heads) < 4 and m.kv_heads == [0] for m in p.masks().layers)
    # with several key/value heads auto is kv-groups, the paper's grouping
    cfg2 = tiny_config()
    p2 = prune.Pruner(build_model(cfg2), describe(cfg2), PruneConfig(lora_r=4, ratio=0.5), total_steps=4)
    assert p2.cfg.gqa == "kv-groups" and p2.note is None


def test_normalize_can_be_switched_off_on_the_command_line(tmp_path, runner, tiny_llama_dir, tiny_calib_dir):
    out = tmp_path / "out"
    r = invoke(runner, ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, "--ratio", "0.5", *FAST,
                        "--no-normalize", "-o", out])
    assert r.exit_code == 0, r.output
    assert json.loads((out / artifacts.RESOLVED_CONFIG).read_text())["config"]["normalize"] is False
    assert json.loads((out / artifacts.MASKS).read_text())["info"]["normalize"] is False
