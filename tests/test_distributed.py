"""lpt prune on several processes (torchrun, gloo) and over a device map: same masks and adapter as one process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import build_model, invoke, tiny_config
from lpt import artifacts, distributed, int8, lora, models
from lpt.benchmarking import scaling
from lpt.arch import describe, get_module
from lpt.config import PruneConfig
from lpt.errors import LptError
from lpt.stages import prune

# 3 micro-batches per step: with 2 processes rank 0 computes 2 and rank 1 computes 1 (an uneven split on purpose)
ARGS = ["--criterion", "lora", "--ratio", "0.5", "--max-steps", "6", "--batch-size", "6", "--micro-batch-size", "2", "--prune-freq", "2",
        "--lr", "1e-3", "--warmup", "0.0", "--cooldown", "0.3", "--lora-dropout", "0"]

# Runs the real CLI under torchrun; each rank also records its masks and moving averages after every step and its
# final LoRA factors (test-only instrumentation through monkeypatching, nothing in lpt knows about it).
DRIVER = textwrap.dedent("""
    import os, sys
    import torch
    from lpt import lora
    from lpt.stages import prune

    seen, trace = [], []
    init, step = prune.Pruner.__init__, prune.Pruner.train_step

    def init_(self, *a, **k):
        init(self, *a, **k)
        seen.append(self)

    def step_(self, batch):
        rec = step(self, batch)
        trace.append({"heads": [t.clone() for t in self.heads_pruned],
                      "channels": [t.clone() for t in self.channels_pruned],
                      "ema": [t.clone() for t in self.state.head_scores + self.state.channel_scores if t is not None],
                      "loss": rec["loss"]})
        return rec

    prune.Pruner.__init__, prune.Pruner.train_step = init_, step_
    from lpt.cli import app
    try:
        app(sys.argv[1:], prog_name="lpt")
    finally:
        torch.save({"trace": trace, "lora": lora.adapter_state_dict(seen[0].model)},
                   os.path.join(os.environ["LPT_TEST_DUMP"], f"rank{os.environ['RANK']}.pt"))
""")


def _torchrun(tmp_path, args, nproc=2):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "LPT_TEST_DUMP": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(driver),
           *[str(a) for a in args]]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def _adapters_close(a_dir, b_dir, rtol=1e-5, atol=1e-6):
    from safetensors.torch import load_file

    a, b = load_file(a_dir / artifacts.ADAPTER_WEIGHTS), load_file(b_dir / artifacts.ADAPTER_WEIGHTS)
    assert a.keys() == b.keys()
    assert any(float(v.abs().sum()) > 0 for k, v in a.items() if "lora_B" in k)  # the adapter trained at all
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_llama_dir, tiny_calib_dir):
    """The one-process, one-device reference run."""
    from typer.testing import CliRunner

    out = tmp_path_factory.mktemp("single") / "single"
    r = invoke(CliRunner(), ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, *ARGS, "-o", out])
    assert r.exit_code == 0, r.output
    return out


# ------------------------------------------------------------------------------------------------ data parallel
def test_two_processes_equal_one_process(tmp_path, single, tiny_llama_dir, tiny_calib_dir):
    dp = tmp_path / "dp"
    r = _torchrun(tmp_path, ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, *ARGS, "-o", dp])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(2)]

    # every rank took the same mask decisions from the same moving averages at every step, and ends with the same LoRA
    t0, t1 = ranks[0]["trace"], ranks[1]["trace"]
    assert len(t0) == len(t1) == 6
    for s0, s1 in zip(t0, t1):
        for key in ("heads", "channels", "ema"):
            assert len(s0[key]) == len(s1[key]) > 0
            assert all(torch.equal(x, y) for x, y in zip(s0[key], s1[key])), key
        assert s0["loss"] == s1["loss"]
    assert any(bool(h.any()) for h in t0[-1]["heads"])  # something was pruned
    assert ranks[0]["lora"].keys() == ranks[1]["lora"].keys()
    assert all(torch.equal(ranks[0]["lora"][k], ranks[1]["lora"][k]) for k in ranks[0]["lora"])

    # the result is the single-process result with the same global batch
    assert (dp / artifacts.MASKS).read_text() == (single / artifacts.MASKS).read_text()
    _adapters_close(dp, single)
    logs = [[json.loads(x) for x in (d / artifacts.TRAIN_LOG).read_text().splitlines()] for d in (dp, single)]
    assert [x["step"] for x in logs[0]] == list(range(1, 7))
    for a, b in zip(*logs):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["sparsity"] == b["sparsity"]

    # rank 0 alone wrote the output and printed; nothing half-written is left behind
    launch = json.loads((dp / artifacts.RESOLVED_CONFIG).read_text())["launch"]
    assert launch["processes"] == 2 and launch["backend"] == "gloo"
    out = r.stdout + r.stderr
    assert out.count("pruning ") == 1 and out.count("removed ") == 1, out[-3000:]
    assert "data parallel over 2 processes" in out
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("dp")) == ["dp"]


def test_fisher_two_processes_equal_one_process(tmp_path, tiny_llama_dir, tiny_calib_dir, runner):
    """Mask Fisher under data parallel: per-rank sums of squares are all-reduced, so the masks are one process's."""
    args = ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, *ARGS, "--criterion", "fisher"]
    one = tmp_path / "one"
    assert invoke(runner, [*args, "-o", one]).exit_code == 0
    r = _torchrun(tmp_path, [*args, "-o", tmp_path / "dp"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(2)]
    for s0, s1 in zip(ranks[0]["trace"], ranks[1]["trace"]):
        assert all(torch.equal(x, y) for x, y in zip(s0["heads"] + s0["channels"], s1["heads"] + s1["channels"]))
    assert (tmp_path / "dp" / artifacts.MASKS).read_text().replace(str(tmp_path / "dp"), "") == \
        (one / artifacts.MASKS).read_text().replace(str(one), "")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "dp" / artifacts.IMPORTANCE), load_file(one / artifacts.IMPORTANCE)
    for k in a:  # sums in a different order: equal within float rounding
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=0)


def test_collectives_bucket_and_shard():
    # shards are contiguous, balanced and cover every item exactly once, in order
    for n in range(0, 12):
        for size in range(1, 5):
            parts = [distributed.shard(n, r, size) for r in range(size)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        distributed.shard(4, 2, 2)
    # buckets keep (device, dtype) apart and respect the byte cap, a large tensor alone
    ts = [torch.zeros(10), torch.zeros(10, dtype=torch.float64), torch.zeros(300), torch.zeros(10), torch.zeros(5)]
    buckets = distributed._buckets(ts, cap=400)
    assert sorted(len(b) for b in buckets) == [1, 1, 1, 2]
    assert all(len({(t.dtype, t.device) for t in b}) == 1 for b in buckets)
    assert all(sum(t.numel() * t.element_size() for t in b) <= 400 or len(b) == 1 for b in buckets)
    assert sorted(id(t) for b in buckets for t in b) == sorted(id(t) for t in ts)


def _collective_worker(rank, path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        a = torch.full((3, 2), float(rank + 1))
        b = torch.arange(4, dtype=torch.float64) * (rank + 1)
        c = torch.full((7,), float(rank + 1)).as_strided((3,), (2,))  # not contiguous
        distributed.all_reduce_sum_([a, b, c])
        assert torch.equal(a, torch.full((3, 2), 3.0)) and torch.equal(b, torch.arange(4, dtype=torch.float64) * 3)
        assert torch.equal(c, torch.full((3,), 3.0))
        x = torch.full((5,), float(rank))
        distributed.broadcast_([x])
        assert torch.equal(x, torch.zeros(5))
    finally:
        dist.destroy_process_group()


def test_collectives_over_two_gloo_processes(tmp_path):
    torch.multiprocessing.spawn(_collective_worker, args=(str(tmp_path / "rdzv"),), nprocs=2, join=True)


# ------------------------------------------------------------------------------------------------ model parallel
DICT_MAP = json.dumps({"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                       "model.layers.1": "cpu", "model.norm": "cpu", "lm_head": "cpu"})


@pytest.mark.parametrize("eight_bit", [False, True], ids=["dense", "int8"])
def test_device_map_gives_the_unsplit_masks(tmp_path, runner, single, tiny_llama_dir, tiny_calib_dir, eight_bit):
    extra = ["--8bit"] if eight_bit else []
    plain = single
    if eight_bit:
        plain = tmp_path / "plain"
        r = invoke(runner, ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, *ARGS, *extra, "-o", plain])
        assert r.exit_code == 0, r.output
    for name, spec in (("auto", "auto"),) if eight_bit else (("auto", "auto"), ("dict", DICT_MAP)):
        out = tmp_path / name
        r = invoke(runner, ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, *ARGS, *extra, "--device-map", spec,
                            "-o", out])
        assert r.exit_code == 0, r.output
        assert "model spread over cpu" in r.output
        assert (out / artifacts.MASKS).read_text() == (plain / artifacts.MASKS).read_text()
        _adapters_close(out, plain, rtol=0, atol=0)


def test_int8_quantized_while_loading_is_bit_identical(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    pytest.importorskip("bitsandbytes")
    model, tok = models.load_int8(str(tiny_llama_dir), models.LoadOptions(device="cpu", dtype="float32",
                                                                           int8_backend="bitsandbytes"))
    assert tok is not None
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    arch = describe(model.config)
    for i in range(arch.num_layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            path = arch.module_path(i, proj)
            q, ref = get_module(model, path), int8.quantize_8bit(get_module(dense, path))
            assert int8.is_int8(q)
            torch.testing.assert_close(int8.dense_weight(q), int8.dense_weight(ref), rtol=0, atol=0)
    assert not int8.is_int8(model.lm_head)
    # lora.inject keeps the bases quantized on load as they are (no second quantization)
    p = prune.Pruner(model, arch, PruneConfig(load_8bit=True, int8_backend="bitsandbytes", lora_r=4), total_steps=4)
    torch.testing.assert_close(int8.dense_weight(p.layers[arch.module_path(0, "q_proj")].base_layer),
                               int8.dense_weight(int8.quantize_8bit(dense.model.layers[0].self_attn.q_proj)),
                               rtol=0, atol=0)


def _batch(cfg, seed):
    ids = torch.randint(0, cfg.vocab_size, (4, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_accelerate_hooks_do_not_change_the_criterion():
    """A model dispatched by accelerate (align-device hooks on every block, as --device-map over several GPUs
    installs them) prunes exactly like the plain model, step by step."""
    from accelerate import dispatch_model

    cfg = tiny_config()
    pc = PruneConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0, ratio=0.5, prune_freq=1, warmup=0.0, cooldown=0.3,
                     lr=1e-3, batch_size=4, micro_batch_size=2)
    pruners = []
    for hooks in (False, True):
        model = build_model(cfg)
        if hooks:
            dm = json.loads(DICT_MAP)
            model = dispatch_model(model, device_map=dm, main_device="cpu", force_hooks=True)
            assert hasattr(model.model.layers[0], "_hf_hook")
        torch.manual_seed(0)
        pruners.append(prune.Pruner(model, describe(cfg), pc, total_steps=4))
    for s in range(4):
        recs = [p.train_step(_batch(cfg, s)) for p in pruners]
        assert recs[0]["loss"] == recs[1]["loss"]
        assert all(torch.equal(a, b) for a, b in zip(pruners[0].heads_pruned, pruners[1].heads_pruned))
        assert all(torch.equal(a, b) for a, b in zip(pruners[0].channels_pruned, pruners[1].channels_pruned))
    assert pruners[0].masks().block_params()[1] < pruners[0].masks().block_params()[0]


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("env, args, message", [
    ({"ACCELERATE_USE_FSDP": "true"}, [], "FSDP launches are not supported"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, [], "DeepSpeed launches are not supported"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, ["--device-map", "auto"], "cannot be combined with several processes"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, ["--device", "cuda:0"], "same GPU"),
    ({}, ["--device-map", "everywhere"], "--device-map 'everywhere'"),
    ({}, ["--device-map", "{not json"], "not valid JSON"),
    ({}, ["--device-map", '{"model.layers.0": [0]}'], "must be a GPU index"),
    ({}, ["--device-map", "missing.json"], "file not found"),
    ({}, ["--device-map", json.dumps({"": 9})], "GPU 9"),
    ({}, ["--device-map", json.dumps({"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                                       "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"})],
     "offloads model.layers.1"),
])
def test_unsupported_layouts_are_one_line_errors(tmp_path, runner, tiny_llama_dir, tiny_calib_dir, monkeypatch,
                                                 env, args, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bad"
    r = invoke(runner, ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, *ARGS, *args, "-o", out])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len([line for line in r.output.splitlines() if "error:" in line]) == 1
    assert not out.exists() and not prune.partial_dir(out).exists()


def test_device_map_file_is_read(tmp_path):
    f = tmp_path / "map.json"
    f.write_text(DICT_MAP)
    assert distributed.parse_device_map(str(f)) == json.loads(DICT_MAP)
    assert distributed.parse_device_map("balanced") == "balanced" and distributed.parse_device_map(None) is None
    f.write_text("[1, 2]")
    with pytest.raises(LptError, match="JSON object"):
        distributed.parse_device_map(str(f))


# ------------------------------------------------------------------------------------------------ arithmetic
def test_parameter_counts_of_the_published_shapes():
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    published = {"7B": 6_738_415_616, "13B": 13_015_864_320, "30B": 32_528_943_616, "65B": 65_285_660_672,
                 "70B": 68_976_648_192}
    for key, s in scaling.SHAPES.items():
        assert s.params() == published[key], key
    s = scaling.SHAPES["70B"]
    cfg = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=2,
                      num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, vocab_size=s.vocab)
    with init_empty_weights():
        m = AutoModelForCausalLM.from_config(cfg)
    a = describe(cfg)
    assert sum(a.block_linear_params(i) for i in range(2)) == 2 * s.block_linear()
    lora_layers = lora.inject(m, a, r=8, alpha=16)
    n_lora = sum(p.numel() for layer in lora_layers.values() for p in (layer.lora_A.weight, layer.lora_B.weight))
    assert n_lora * s.layers // 2 == s.lora_params(8)


@pytest.mark.parametrize("dtype, nbytes", [(torch.bfloat16, 2), (torch.float32, 4)])
def test_activation_formula_matches_saved_tensors(dtype, nbytes):
    """docs/scaling.md's activation memory: the bytes autograd saves per token, measured with saved-tensor hooks."""

    def saved(layers):
        cfg = tiny_config(layers=layers, hidden_size=128, intermediate_size=352, num_attention_heads=8,
                          num_key_value_heads=2, head_dim=16)
        m = build_model(cfg).to(dtype)
        lora.inject(m, describe(cfg), r=8, alpha=16)
        m.train()
        store = {}
        frozen = {t.untyped_storage().data_ptr() for t in [*m.parameters(), *m.buffers()]}

        def pack(t):
            store.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        ids = torch.randint(0, cfg.vocab_size, (2, 32))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(input_ids=ids, labels=ids)
        return sum(v for k, v in store.items() if k not in frozen)

    per_layer = (saved(3) - saved(1)) / 2 / 64
    shape = scaling.Shape("tiny", 1, 128, 352, 8, 2, 384)
    assert per_layer == pytest.approx(shape.activation_bytes_per_token(8, model_bytes=nbytes), rel=0.02)


def test_memory_estimate_and_layouts():
    gib = 2**30
    m7 = scaling.memory_estimate(scaling.SHAPES["7B"], load_8bit=False)
    assert m7["weights"] == pytest.approx(2 * 6_738_415_616, rel=1e-9)
    m65 = scaling.memory_estimate(scaling.SHAPES["65B"], load_8bit=True, micro_batch=1)
    assert 60 * gib < m65["weights"] < 63 * gib  # int8 projections + bf16 embeddings: the paper's one-GPU setting
    assert m65["total"] < 0.95 * 80 * gib
    table = scaling.memory_table()
    assert table.count("\n") == 11 and "| 65B | 65.29 B | int8 |" in table
    row70 = [line for line in table.splitlines() if line.startswith("| 70B |") and "| bf16 |" in line]
    assert len(row70) == 1 and "`--device-map auto` over" in row70[0]


NO_RATIO = [a for i, a in enumerate(ARGS) if a != "--ratio" and (i == 0 or ARGS[i - 1] != "--ratio")]


def test_axes_two_processes_equal_one_process(tmp_path, tiny_llama_dir, tiny_calib_dir, runner):
    """Depth and hidden-size scores under data parallel: the block and hidden accumulators are all-reduced, so the
    search, the removed blocks and hidden channels are one process's."""
    args = ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, *NO_RATIO, "--model-ratio", "0.3"]
    one = tmp_path / "one"
    assert invoke(runner, [*args, "-o", one]).exit_code == 0
    r = _torchrun(tmp_path, [*args, "-o", tmp_path / "dp"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = (json.loads((d / artifacts.MASKS).read_text()) for d in (tmp_path / "dp", one))
    for key in ("layers", "removed_layers", "hidden_channels", "params"):
        assert a[key] == b[key], key
    assert a["info"]["search"]["target"] == b["info"]["search"]["target"]
    from safetensors.torch import load_file

    ia, ib = load_file(tmp_path / "dp" / artifacts.IMPORTANCE), load_file(one / artifacts.IMPORTANCE)
    assert ia.keys() == ib.keys()
    for k in ia:
        torch.testing.assert_close(ia[k], ib[k], rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("eight_bit", [False, True], ids=["dense", "int8"])
def test_axes_over_a_device_map_and_int8(tmp_path, runner, tiny_llama_dir, tiny_calib_dir, eight_bit):
    """Depth and hidden-size pruning with --device-map (and an int8 base): the masks of one device, and the int8
    model slices along the hidden size."""
    extra = ["--prune-layers", "1", "--hidden-ratio", "0.25", "--ratio", "0.2", *(["--8bit"] if eight_bit else [])]
    base = NO_RATIO
    plain, mapped = tmp_path / "plain", tmp_path / "mapped"
    assert invoke(runner, ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, *base, *extra, "-o", plain]
                  ).exit_code == 0
    r = invoke(runner, ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, *base, *extra, "--device-map", "auto",
                        "-o", mapped])
    assert r.exit_code == 0, r.output
    assert (mapped / artifacts.MASKS).read_text().replace(str(mapped), "") == \
        (plain / artifacts.MASKS).read_text().replace(str(plain), "")
    r = invoke(runner, ["slice", tiny_llama_dir, "--masks", plain / artifacts.MASKS, "--adapter", plain, "--merge",
                        "-o", tmp_path / "sliced"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "sliced" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"]) == (1, 48)
