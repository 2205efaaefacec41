"""--8bit with LLM.int8's outlier threshold: the threshold reaches bitsandbytes on both quantization paths, changes
only the forward pass, and merging from an int8 base stays within the int8 rounding error of the float weights."""

import pytest
import torch

from conftest import build_model, tiny_config
from lpt import int8, lora, models
from lpt.arch import PROJECTIONS, describe, get_module
from lpt.config import INT8_THRESHOLD, PruneConfig

pytest.importorskip("bitsandbytes")


def _int8_layers(model, arch):
    return {arch.module_path(i, p): get_module(model, arch.module_path(i, p))
            for i in range(arch.num_layers) for p in PROJECTIONS}


def test_threshold_default_and_forward(tiny_llama_dir):
    lin = torch.nn.Linear(64, 32)
    # one constant: --int8-threshold's default, the loader's and every int8 function's
    assert INT8_THRESHOLD == 6.0 == PruneConfig().int8_threshold == models.LoadOptions().int8_threshold
    q6, q0 = int8.quantize_8bit(lin), int8.quantize_8bit(lin, threshold=0.0)
    assert q6.state.threshold == 6.0 and q0.state.threshold == 0.0
    # the stored codes and scales hold the whole weight whatever the threshold
    torch.testing.assert_close(int8.dense_weight(q6), int8.dense_weight(q0), rtol=0, atol=0)
    # inference with outlier inputs: threshold 6 multiplies the outlier feature in 16 bits, threshold 0 quantizes it
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    x[:, 5] = 100.0
    with torch.no_grad():
        want = lin(x)
        err6 = (q6.eval()(x).float() - want).abs().max()
        err0 = (q0.eval()(x).float() - want).abs().max()
    assert err6 < err0
    # both quantization paths take the threshold: lpt's own (inject) and quantize-while-loading (load_int8)
    cfg = tiny_config()
    m = build_model(cfg)
    layers = lora.inject(m, describe(cfg), r=2, alpha=4, load_8bit=True, int8_threshold=3.5,
                         int8_backend="bitsandbytes")
    assert {l.base_layer.state.threshold for l in layers.values()} == {3.5}
    model, _ = models.load_int8(str(tiny_llama_dir), models.LoadOptions(device="cpu", dtype="float32",
                                                                         int8_backend="bitsandbytes"))
    assert {l.state.threshold for l in _int8_layers(model, describe(model.config)).values()} == {6.0}
    model, _ = models.load_int8(str(tiny_llama_dir), models.LoadOptions(device="cpu", dtype="float32",
                                                                         int8_threshold=0.0,
                                                                         int8_backend="bitsandbytes"))
    assert {l.state.threshold for l in _int8_layers(model, describe(model.config)).values()} == {0.0}


@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_merge_from_int8_base_close_to_float(threshold):
    cfg = tiny_config()
    dense = build_model(cfg)
    arch = describe(cfg)
    ref = {p: w.weight.detach().clone() for p, w in _int8_layers(dense, arch).items()}
    layers = lora.inject(dense, arch, r=4, alpha=8, load_8bit=True, int8_threshold=threshold,
                         int8_backend="bitsandbytes")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
    # run forward passes first (training and inference mode): bitsandbytes moves CB into its state on the first one
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    dense.train()(x)
    with torch.no_grad():
        dense.eval()(x)
    for p, layer in layers.items():
        merged = layer.merged_linear(dtype=torch.float32).weight
        want = ref[p] + layer.delta()
        # int8 vector-wise rounding: at most half a step (row absmax / 127) per element, plus fp16 rounding of W0
        step = ref[p].abs().amax(1, keepdim=True) / 127
        assert ((merged - want).abs() <= 0.5 * step + 1e-3 * ref[p].abs() + 1e-6).all(), p
        assert (merged - want).abs().max() > 0  # it is the int8 base that was merged
