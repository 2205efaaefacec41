"""The model family is checked from the config (or a GGUF file's header) before any weight is read."""

import json
import struct

import pytest

from conftest import invoke
from lpt import gguf_file, models
from lpt.errors import LptError


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to load weights fails the test."""
    from transformers import AutoModelForCausalLM

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the architecture was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def _gpt2_dir(tmp_path):
    from transformers import GPT2Config

    d = tmp_path / "gpt2"
    d.mkdir()
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(d)
    with open(d / "model.safetensors", "wb") as f:  # a 4 GiB (sparse) "checkpoint" that must never be opened
        f.truncate(4 * 2**30)
    return d


def test_unsupported_config_refused_before_weights(tmp_path, no_weights, runner):
    d = _gpt2_dir(tmp_path)
    with pytest.raises(LptError, match=r"unsupported architecture 'gpt2'.*supported: .*llama, mistral, .*qwen2"):
        models.load_model(str(d), device="cpu")
    r = invoke(runner, ["prune", d, "--max-steps", "1", "-o", tmp_path / "out"])
    assert r.exit_code == 2 and "unsupported architecture 'gpt2'" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_supported_config_still_loads(tiny_llama_dir):
    m, tok = models.load_model(str(tiny_llama_dir), device="cpu", tokenizer=False)
    assert m.config.model_type == "llama" and tok is None


def _write_gguf(path, arch, name="test"):
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch, model_type", [("gpt2", "gpt2"), ("qwen2moe", "qwen2_moe"), ("gemma4", "gemma4_text")])
def test_unsupported_gguf_refused_from_its_header(tmp_path, no_weights, arch, model_type):
    pytest.importorskip("gguf")
    f = tmp_path / f"{arch}.gguf"
    _write_gguf(f, arch)
    assert gguf_file.architecture(f) == arch
    with pytest.raises(LptError, match=f"unsupported architecture '{model_type}'.*GGUF general.architecture"):
        models.load_model(str(f), device="cpu")


def test_gguf_header_reader_skips_other_keys(tmp_path):
    def s(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    kvs = [
        s(b"general.alignment") + struct.pack("<I", 4) + struct.pack("<I", 32),  # uint32
        s(b"tokenizer.ggml.tokens") + struct.pack("<I", 9) + struct.pack("<IQ", 8, 2) + s(b"ab") + s(b"c"),  # strings
        s(b"tokenizer.ggml.scores") + struct.pack("<I", 9) + struct.pack("<IQ", 6, 3) + b"\0" * 12,  # float32 array
        s(b"general.name") + struct.pack("<I", 8) + s(b"x"),
        s(b"general.architecture") + struct.pack("<I", 8) + s(b"qwen2"),
    ]
    f = tmp_path / "h.gguf"
    f.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs))
    assert gguf_file.architecture(f) == "qwen2"
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + b"\0" * 40)
    with pytest.raises(LptError, match="not a readable GGUF"):
        gguf_file.architecture(tmp_path / "bad.gguf")
    (tmp_path / "short.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 5) + kvs[0])
    with pytest.raises(LptError, match="truncated"):
        gguf_file.architecture(tmp_path / "short.gguf")


@pytest.mark.smollm2
def test_smollm2_gguf_header_agrees_with_gguf_reader(smollm2_path):
    gguf = pytest.importorskip("gguf")
    field = gguf.GGUFReader(smollm2_path).fields["general.architecture"]
    assert gguf_file.architecture(smollm2_path) == bytes(field.parts[field.data[0]]).decode() == "llama"
    assert models.check_architecture(models.resolve("smollm2-135m")) is None


@pytest.mark.smollm2
def test_gguf_cache_gives_the_same_model_and_tokenizer(smollm2_path, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("LPT_CACHE_DIR", str(tmp_path / "cache"))
    ref = models.resolve("smollm2-135m")
    where = models.gguf_cache_path(ref)
    assert where is not None and where.parent.parent == tmp_path / "cache" and not where.exists()
    m1, t1 = models.load_model(ref)  # from the GGUF file; writes the cache
    assert (where / "config.json").is_file() and (where / "model.safetensors").is_file()
    assert not [p for p in where.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left
    m2, t2 = models.load_model(ref)  # from the cache
    a, b = m1.state_dict(), m2.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert t1.get_vocab() == t2.get_vocab() and t1.pad_token_id == t2.pad_token_id
    text = "def f(x):\n    return x ** 2  # squares"
    assert t1(text)["input_ids"] == t2(text)["input_ids"]
    assert m2.config.to_dict() | {"_name_or_path": ""} == m1.config.to_dict() | {"_name_or_path": ""}
    assert models.load_config(ref).num_hidden_layers == 30
    assert m2.lpt_ref == ref  # provenance still names the GGUF file
    monkeypatch.setenv("LPT_GGUF_CACHE", "0")
    assert models.gguf_cache_path(ref) is None


def test_config_json_kept_as_is(tmp_path):
    d = _gpt2_dir(tmp_path)
    assert json.loads((d / "config.json").read_text())["model_type"] == "gpt2"
    assert models.model_type_of(models.resolve(str(d)))[0] == "gpt2"


def _gguf_with_type(path, file_type=None, tensor_dtype="float32"):
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    if file_type is not None:
        w.add_file_type(file_type)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=tensor_dtype))
    w.add_tensor("output_norm.weight", np.zeros(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_output_dtype_auto_is_what_the_source_was_trained_in(tmp_path):
    """--dtype auto of merge / slice: the checkpoint's declared dtype, a GGUF file's float type, bfloat16 for a
    quantized GGUF file or a checkpoint declaring none; an explicit --dtype always wins; every choice says why."""
    import torch
    from gguf import LlamaFileType

    from lpt import gguf_file

    class Cfg:
        def __init__(self, dtype):
            self.dtype = dtype

    from lpt.model_dir import choose_output_dtype as choose
    assert choose("auto", Cfg("bfloat16"))[0] == torch.bfloat16
    assert choose("auto", Cfg(torch.float16))[0] == torch.float16
    dtype, why = choose("auto", Cfg("float32"))
    assert dtype == torch.float32 and "declares float32" in why
    dtype, why = choose("auto", Cfg(None))
    assert dtype == torch.bfloat16 and "declares no" in why
    assert choose("float32", Cfg("bfloat16")) == (torch.float32, "--dtype float32")
    for ftype, want, kind in ((LlamaFileType.MOSTLY_Q4_1, torch.bfloat16, "Q4_1"),
                              (LlamaFileType.MOSTLY_Q4_K_M, torch.bfloat16, "Q4_K_M"),
                              (LlamaFileType.MOSTLY_F16, torch.float16, "F16"),
                              (LlamaFileType.MOSTLY_BF16, torch.bfloat16, "BF16"),
                              (LlamaFileType.ALL_F32, torch.float32, "F32")):
        f = _gguf_with_type(tmp_path / f"{kind}.gguf", ftype)
        assert gguf_file.file_type(f) == kind
        ref = models.resolve(str(f))
        dtype, why = choose("auto", Cfg("float32"), ref)  # a GGUF cache's config says float32: the file decides
        assert dtype == want and kind in why and ("quantized" in why) == (kind not in gguf_file.FLOAT_TYPES)
    # no general.file_type in the header: the weights' own type
    assert gguf_file.file_type(_gguf_with_type(tmp_path / "plain.gguf", None, "float16")) == "F16"


@pytest.mark.smollm2
def test_smollm2_gguf_is_q4_1_and_slices_to_bfloat16(smollm2_path):
    import torch

    from lpt import gguf_file

    assert gguf_file.file_type(smollm2_path) == "Q4_1"
    from lpt.model_dir import choose_output_dtype

    assert choose_output_dtype("auto", None, models.resolve("smollm2-135m"))[0] == torch.bfloat16
