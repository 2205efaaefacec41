"""--8bit with the torch backend (lpt.int8: weight-only int8, PyTorch's int8 matmul): forward close to dense, the
input gradient of the de-quantized weight, merge / slice from int8, loading, the CLI round trip, what is recorded,
and that bitsandbytes stays unimported."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import build_model, invoke, tiny_config
from lpt import int8, lora, models, slicing
from lpt.arch import PROJECTIONS, describe, get_module


def _linear(in_f=64, out_f=48, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.1)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g) * 0.1)
    return lin.to(dtype).requires_grad_(False)


def test_backend_resolution_and_refusal():
    assert int8.resolve_backend("auto", "cpu") == "torch"
    assert int8.resolve_backend("auto", "cuda") == "bitsandbytes"
    assert int8.resolve_backend("bitsandbytes", "cpu") == "bitsandbytes"
    with pytest.raises(Exception, match="--int8-backend"):
        int8.resolve_backend("gptq", "cpu")


def test_quantize_rows_is_within_half_a_step():
    w = torch.randn(40, 24) * torch.linspace(0.01, 3.0, 40).unsqueeze(1)
    q, s = int8.quantize_rows(w)
    assert q.dtype == torch.int8 and s.shape == (40,)
    err = (q.float() * s.unsqueeze(1) - w).abs()
    assert (err <= 0.5 * s.unsqueeze(1) * (1 + 1e-5) + 1e-7).all()
    assert (q.abs().amax(1) == 127).all()  # every row uses the full range


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_close_to_dense_and_to_the_dequantized_weight(dtype):
    lin = _linear(dtype=dtype)
    q = int8.quantize_8bit(lin, backend="torch")
    assert int8.is_int8(q) and int8.backend_of(q) == "torch" and q.weight.dtype == torch.int8
    assert q.dense_dtype == dtype
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        y, dense = q(x).float(), lin(x).float()
        # against the de-quantized weight: only the matmul's rounding
        deq = x.float() @ int8.dense_weight(q).t() + lin.bias.float()
    assert y.shape == (3, 5, 48) and y.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, deq, rtol=tol, atol=tol)
    # against the float weight: the quantization error, bounded by half a step per weight times |x|
    step = lin.weight.float().abs().amax(1) / 127
    bound = 0.5 * x.float().abs().sum(-1, keepdim=True) * step + (0.05 if dtype == torch.bfloat16 else 1e-4)
    assert ((y - dense).abs() <= bound).all()
    assert (y - dense).abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_gradient_matches_autograd_of_the_dequantized_weight(dtype):
    lin = _linear(dtype=dtype, seed=2)
    q = int8.quantize_8bit(lin, backend="torch")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 64, generator=g).to(dtype).requires_grad_(True)
    dy = torch.randn(2, 7, 48, generator=g).to(dtype)
    q(x).backward(dy)
    ref_x = x.detach().float().requires_grad_(True)
    (ref_x @ int8.dense_weight(q).t()).backward(dy.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(x.grad.float(), ref_x.grad, rtol=tol, atol=tol)
    assert not q.weight.requires_grad and q.weight.grad is None  # the frozen base gets no gradient


def test_odd_widths_take_the_fallback_path():
    lin = _linear(in_f=13, out_f=7, dtype=torch.bfloat16)  # the int8 kernel needs in_features % 8 == 0
    q = int8.quantize_8bit(lin, backend="torch")
    x = torch.randn(4, 13).to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(q(x).float(), x.float() @ int8.dense_weight(q).t() + lin.bias.float(),
                                   rtol=2e-2, atol=2e-2)


def test_merge_from_torch_int8_is_within_half_a_step_of_dense_merge():
    cfg = tiny_config()
    m = build_model(cfg)
    arch = describe(cfg)
    ref = {p: get_module(m, p).weight.detach().clone() for p in (arch.module_path(i, q) for i in range(2)
                                                                for q in PROJECTIONS)}
    layers = lora.inject(m, arch, r=4, alpha=8, load_8bit=True, int8_backend="torch")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
    for p, layer in layers.items():
        assert int8.backend_of(layer.base_layer) == "torch"
        merged = layer.merged_linear().weight
        assert merged.dtype == torch.float32  # dense_dtype: the dtype it was quantized from
        want = ref[p] + layer.delta()
        step = ref[p].abs().amax(1, keepdim=True) / 127
        assert ((merged - want).abs() <= 0.5 * step * (1 + 1e-5) + 1e-6).all(), p
        assert (merged - want).abs().max() > 0


def test_slice_keeps_codes_and_outputs():
    lin = _linear(in_f=64, out_f=48)
    q = int8.quantize_8bit(lin, backend="torch")
    rows, cols = torch.tensor([0, 3, 4, 10, 47]), torch.arange(0, 64, 2)
    r = slicing.slice_linear(q, rows, 0)
    c = slicing.slice_linear(q, cols, 1)
    assert isinstance(r, int8.Int8Linear) and isinstance(c, int8.Int8Linear)
    assert (r.in_features, r.out_features, c.in_features, c.out_features) == (64, 5, 32, 48)
    torch.testing.assert_close(int8.dense_weight(r), int8.dense_weight(q)[rows], rtol=0, atol=0)
    torch.testing.assert_close(int8.dense_weight(c), int8.dense_weight(q)[:, cols], rtol=0, atol=0)
    x = torch.randn(6, 64)
    with torch.no_grad():
        full = q(x)
        torch.testing.assert_close(r(x), full[:, rows], rtol=1e-5, atol=1e-5)
        xm = torch.zeros_like(x)
        xm[:, cols] = x[:, cols]  # masked input columns == sliced layer
        torch.testing.assert_close(c(x[:, cols]), q(xm), rtol=1e-5, atol=1e-5)


def test_masked_int8_model_equals_sliced_int8_model():
    from lpt.masks import Masks, apply_masks

    cfg = tiny_config()
    m = build_model(cfg)
    arch = describe(cfg)
    lora.inject(m, arch, r=0, alpha=1, load_8bit=True, int8_backend="torch")
    heads = [torch.tensor([True, False]), torch.tensor([False, False])]
    chans = [torch.arange(96) % 3 == 0, torch.arange(96) < 8]
    masks = Masks.from_pruned(arch, heads, chans, "kv-groups")
    apply_masks(m, masks)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        masked = m(x).logits
        slicing.slice_model(m, masks, arch)
        assert all(int8.backend_of(l.base_layer) == "torch" for l in lora.lora_layers(m).values())
        torch.testing.assert_close(m(x).logits, masked, rtol=1e-4, atol=1e-4)


def test_load_int8_torch_streams_the_same_weights(tiny_llama_dir):
    got = models.load_int8(str(tiny_llama_dir), models.LoadOptions(device="cpu", dtype="bfloat16",
                                                              int8_backend="torch"))
    assert got is not None
    model, tok = got
    ref, _ = models.load_model(str(tiny_llama_dir), device="cpu", dtype="bfloat16", tokenizer=False)
    arch = describe(ref.config)
    lora.inject(ref, arch, r=0, alpha=1, load_8bit=True, int8_backend="torch")
    for i in range(arch.num_layers):
        for p in PROJECTIONS:
            a = get_module(model, arch.module_path(i, p))
            b = get_module(ref, arch.module_path(i, p)).base_layer
            assert isinstance(a, int8.Int8Linear) and a.dense_dtype == torch.bfloat16
            assert torch.equal(a.weight, b.weight) and torch.equal(a.scale, b.scale)
    sd_ref = {k: v for k, v in ref.state_dict().items() if "_proj" not in k}
    sd = model.state_dict()
    for k, v in sd_ref.items():
        assert torch.equal(sd[k], v), k
    assert not any(p.device.type == "meta" for p in model.parameters())
    x = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=0)


def test_random_init_int8_is_the_quantized_random_model():
    from lpt.benchmarking import shapes

    cfg = tiny_config()
    dense = shapes.build_random_model(cfg, torch.bfloat16, "cpu", seed=3)
    q = shapes.build_random_model(cfg, torch.bfloat16, "cpu", seed=3, int8=True)
    arch = describe(cfg)
    for i in range(arch.num_layers):
        for p in PROJECTIONS:
            a = get_module(q, arch.module_path(i, p))
            want = int8.Int8Linear.from_linear(get_module(dense, arch.module_path(i, p)))
            assert torch.equal(a.weight, want.weight) and torch.equal(a.scale, want.scale)


def test_vanilla_refused_with_torch_int8():
    from lpt import importance

    cfg = tiny_config()
    m = build_model(cfg)
    lora.inject(m, describe(cfg), r=2, alpha=4, load_8bit=True, int8_backend="torch")
    with pytest.raises(Exception, match="int8"):
        importance.make("vanilla").attach(m, describe(cfg))


@pytest.mark.parametrize("criterion", ["fisher", "lora"])
def test_cli_prune_slice_merge_round_trip_torch_backend(runner, tmp_path, tiny_llama_dir, criterion):
    out = tmp_path / "p"
    r = invoke(runner, ["prune", str(tiny_llama_dir), "--8bit", "--int8-backend", "torch", "--criterion", criterion,
                        "--ratio", "0.3", "--max-steps", "4", "--prune-freq", "1", "--warmup", "0", "--batch-size",
                        "2", "--micro-batch-size", "2", "--nsamples", "8", "--seq-len", "32", "--lora-r", "4",
                        "--lr", "1e-2", "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "lpt_config.json").read_text())["config"]
    assert cfg["load_8bit"] is True and cfg["int8_backend"] == "torch"
    info = json.loads((out / "masks.json").read_text())["info"]
    assert info["int8"] == {"backend": "torch"}
    # merge onto the recorded int8 base; slice --merge; the two give the same model (merge-then-slice order aside)
    merged = tmp_path / "m"
    r = invoke(runner, ["merge", str(tiny_llama_dir), "--adapter", str(out), "--masks", str(out / "masks.json"),
                        "--device", "cpu", "-o", str(merged)])
    assert r.exit_code == 0, r.output
    assert "int8 base (torch)" in r.output.replace("\n", " ") or "(torch)" in r.output
    prov = json.loads((merged / "lpt_provenance.json").read_text())
    assert prov["load_8bit"] is True and prov["int8_backend"] == "torch"
    sliced = tmp_path / "s"
    r = invoke(runner, ["slice", str(tiny_llama_dir), "--masks", str(out / "masks.json"), "--adapter", str(out),
                        "--merge", "--device", "cpu", "-o", str(sliced)])
    assert r.exit_code == 0, r.output
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(merged).eval()
    b = AutoModelForCausalLM.from_pretrained(sliced).eval()
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        la, lb = a(x).logits, b(x).logits
    assert torch.isfinite(la).all()
    # slice --merge merges onto the full-precision base (no --8bit there): within the int8 rounding of merge's
    assert (la - lb).abs().max() < 0.5 * la.abs().max()
    # merged onto the int8 base: its pruned rows are zero and it differs from a full-precision merge only slightly
    fp = tmp_path / "fp"
    r = invoke(runner, ["merge", str(tiny_llama_dir), "--adapter", str(out), "--no-8bit", "--device", "cpu",
                        "-o", str(fp)])
    assert r.exit_code == 0, r.output


def test_bitsandbytes_not_imported_with_the_torch_backend(tmp_path, tiny_llama_dir):
    code = f"""
import sys, json
from typer.testing import CliRunner
from lpt.cli import app
r = CliRunner().invoke(app, ["prune", {str(tiny_llama_dir)!r}, "--8bit", "--criterion", "fisher", "--ratio", "0.2",
    "--max-steps", "2", "--warmup", "0", "--batch-size", "2", "--micro-batch-size", "2", "--nsamples", "4",
    "--seq-len", "16", "--device", "cpu", "-o", {str(tmp_path / 'o')!r}])
assert r.exit_code == 0, r.output
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "bitsandbytes")))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == []
    info = json.loads((tmp_path / "o" / "masks.json").read_text())["info"]
    assert info["int8"]["backend"] == "torch"  # auto on CPU


def test_merge_reads_the_recorded_backend(tmp_path):
    from lpt.stages import merge

    d = tmp_path / "a"
    d.mkdir()
    assert merge.recorded_int8_backend(d) is None
    (d / "lpt_config.json").write_text(json.dumps({"config": {"load_8bit": True}}))
    assert merge.recorded_int8_backend(d) == "bitsandbytes"  # an --8bit output of lpt before the choice existed
    (d / "lpt_config.json").write_text(json.dumps({"config": {"load_8bit": True, "int8_backend": "torch"}}))
    assert merge.recorded_int8_backend(d) == "torch"


def test_bench_rows_per_backend():
    from lpt.stages import bench

    runs, skipped = bench.prune_step_runs(["fisher", "vanilla"], False, True, ["bitsandbytes", "torch"])
    assert [(r.label, r.int8_backend) for r in runs] == [
        ("fisher", None), ("fisher 8-bit (bitsandbytes)", "bitsandbytes"), ("fisher 8-bit (torch)", "torch"),
        ("vanilla", None)]
    assert [s["label"] for s in skipped] == ["vanilla 8-bit (bitsandbytes)", "vanilla 8-bit (torch)"]
    runs, _ = bench.prune_step_runs(["fisher"], False, True, ["torch"])
    assert [r.label for r in runs] == ["fisher", "fisher 8-bit"]
