"""benchmarks/wanda.py: llm-compressor's Wanda math gives exactly 2 zeros in every 4 consecutive inputs of every
block projection, keeping the larger |W|·||X|| (skipped without llm-compressor)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import build_model, tiny_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llmcompressor") is None,
                                reason="llm-compressor is not installed (pip install --no-deps llmcompressor)")
ROOT = Path(__file__).resolve().parents[1]


def _wanda():
    spec = importlib.util.spec_from_file_location("wanda_bench", ROOT / "benchmarks" / "wanda.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_two_of_four_by_weight_times_activation_norm():
    from lpt.arch import PROJECTIONS, describe, get_module

    cfg = tiny_config()
    model = build_model(cfg)
    arch = describe(cfg)
    before = {p: get_module(model, arch.module_path(0, p)).weight.detach().clone() for p in PROJECTIONS}
    ids = torch.randint(0, cfg.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    zeros = _wanda().prune_2of4(model, arch, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    assert all(z == pytest.approx(0.5) for z in zeros.values())
    for p in PROJECTIONS:
        w = get_module(model, arch.module_path(0, p)).weight.detach()
        groups = (w == 0).view(w.shape[0], -1, 4).sum(-1)
        assert bool((groups == 2).all()), p
        kept = w != 0
        torch.testing.assert_close(w[kept], before[p][kept])  # the kept weights are untouched
