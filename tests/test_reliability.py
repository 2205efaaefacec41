"""Never write a broken model and call it done: diverging training, flags refused before any file is written,
degenerate calibration, non-finite adapters, binary text, typed recipe values, two runs on one output, corrupt
files, interrupted runs' leftovers, the export converter's process group, comparisons across tokenizers.

Every case is driven through the CLI on a tiny model and checks the promise: one line naming the flag, key or file,
a non-zero exit, nothing on disk that looks complete. No test depends on a timing: the lock is held by a live child
process, the export converter kills its own parent.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import build_model, invoke, tiny_config
from lpt import artifacts
from lpt.stages import prune

FAST = ["--max-steps", "6", "--batch-size", "4", "--micro-batch-size", "2", "--prune-freq", "2", "--lr", "1e-3",
        "--warmup", "0.0", "--cooldown", "0.3", "--lora-r", "4"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                    os.environ.get("PYTHONPATH", "")])}


def refused(r, *needles, code=2):
    """One error line naming every needle, exit ``code``, no traceback."""
    assert r.exit_code == code, r.output
    errors = [line for line in r.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    for n in needles:
        assert str(n) in r.output, (n, r.output)
    return errors[0]


def nothing_left(tmp_path, *keep):
    """Only ``keep`` in ``tmp_path``: no output, no OUT.partial/, no lock file, no hidden temporary."""
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


# ------------------------------------------------------------------------------------------------ 1. divergence
@pytest.mark.parametrize("args, needle", [
    (["--distill", "--distill-temperature", "inf"], "--distill-temperature must be a finite number"),
    (["--lora-alpha", "nan"], "--lora-alpha must be a finite number"),
    (["--ratio", "nan"], "--ratio"),
    (["--ema", "inf"], "--ema"),
    (["--lr", "1e30", "--save-every", "1"], "--lr 1e+30"),  # diverges at a step: found by the finite-loss check
    (["--lora-alpha", "-1"], "--lora-alpha must be positive"),
    (["--lora-dropout", "1"], "--lora-dropout"),
    (["--max-grad-norm", "-1"], "--max-grad-norm"),
])
def test_diverging_or_non_finite_training_is_refused(tmp_path, runner, tiny_llama_dir, tiny_calib_dir, args, needle):
    out = tmp_path / "o"
    r = invoke(runner, ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, *FAST, *args, "-o", out])
    line = refused(r, needle)
    if "1e30" in args:
        assert "step 2: the loss is nan" in line and "Nothing was saved" in line
    nothing_left(tmp_path)  # the step-1 checkpoint of --save-every 1 went too: resuming would diverge again


def test_non_finite_weights_after_a_step_stop_the_run(tmp_path, runner, tiny_llama_dir, tiny_calib_dir, monkeypatch):
    """A finite loss whose gradient overflows: the optimiser step makes LoRA weights NaN; the run stops right there,
    before the next checkpoint or the adapter is written."""
    real = prune.Pruner.reduce_gradients

    def overflow_at_3(self):
        real(self)
        if self.step == 3:
            self.params[0].grad.fill_(float("inf"))

    monkeypatch.setattr(prune.Pruner, "reduce_gradients", overflow_at_3)
    r = invoke(runner, ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, *FAST, "--save-every", "1",
                        "-o", tmp_path / "o"])
    refused(r, "step 3: the optimiser step made LoRA weights non-finite")
    nothing_left(tmp_path)


# ------------------------------------------------------------------------------------------------ 2. validation first
def test_model_dependent_flags_are_refused_before_the_weights_load(tmp_path, runner, tiny_llama_dir, tiny_calib_dir,
                                                                   monkeypatch):
    from lpt import models

    def no_weights(*a, **k):
        raise AssertionError("the weights were loaded before the flags were checked")

    monkeypatch.setattr(models, "load_model", no_weights)
    monkeypatch.setattr(models, "load_int8", no_weights)
    for args, needle in ((["--round-to", "1000000", "--save-every", "1"], "--round-to 1000000 is larger than the MLP "
                                                                          "width 96"),
                         (["--balance", "proportional", "--round-to", "200"], "--round-to 200"),
                         (["--balance", "5"], "--balance 5"),
                         (["--skip-layers", "0", "--ratio", "0.9"], "--ratio 0.9 cannot be reached")):
        r = invoke(runner, ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, *FAST, *args, "-o", tmp_path / "o"])
        refused(r, needle)
        nothing_left(tmp_path)


# ------------------------------------------------------------------------------------------------ 3. calibration
def _calib_copy(tmp_path, tiny_calib_dir, **tensors):
    d = tmp_path / "calib"
    shutil.copytree(tiny_calib_dir, d)
    data = artifacts.load_tensors(d / artifacts.TOKENS)
    data.update(tensors)
    artifacts.save_tensors(data, d / artifacts.TOKENS)
    return d


def test_calibration_without_loss_tokens_is_refused(tmp_path, runner, tiny_llama_dir):
    refused(invoke(runner, ["calibrate", tiny_llama_dir, "-n", "8", "--seq-len", "1", "-o", tmp_path / "c"]),
            "--seq-len must be at least 2")
    refused(invoke(runner, ["prune", tiny_llama_dir, *FAST, "-n", "8", "--seq-len", "1", "-o", tmp_path / "o"]),
            "--seq-len must be at least 2")
    nothing_left(tmp_path)


@pytest.mark.parametrize("kind", ["no-blocks", "all-masked"])
def test_degenerate_calibration_dir_is_refused_where_it_is_read(tmp_path, runner, tiny_llama_dir, tiny_calib_dir,
                                                                kind):
    empty = torch.zeros((0, 32), dtype=torch.long)
    if kind == "no-blocks":
        calib = _calib_copy(tmp_path, tiny_calib_dir, input_ids=empty, attention_mask=empty, labels=empty)
        needle = "holds no calibration blocks"
    else:
        labels = torch.full((16, 32), -100, dtype=torch.long)
        calib = _calib_copy(tmp_path, tiny_calib_dir, labels=labels)
        needle = "no token to predict"
    refused(invoke(runner, ["prune", tiny_llama_dir, "--calib", calib, *FAST, "-o", tmp_path / "o"]),
            needle, calib / artifacts.TOKENS)
    masks = tmp_path / "masks.json"
    _masks_file(tiny_llama_dir, masks)
    refused(invoke(runner, ["slice", tiny_llama_dir, "--masks", masks, "--reconstruct", calib, "-o", tmp_path / "s"]),
            needle, calib / artifacts.TOKENS)
    nothing_left(tmp_path, "calib", "masks.json")


def _masks_file(model_dir, path):
    from lpt import models
    from lpt.masks import Masks
    from lpt.arch import describe

    arch = describe(models.load_config(str(model_dir)))
    hp = [torch.tensor([False, True]), torch.tensor([True, False])]
    cp = [torch.arange(arch.intermediate_size) % 2 == 0] * arch.num_layers
    Masks.from_pruned(arch, hp, cp, "kv-groups", model=str(model_dir)).save(path)


# ------------------------------------------------------------------------------------------------ 5. binary text
def test_binary_text_is_refused_with_the_file_named(tmp_path, runner, tiny_llama_dir):
    from lpt import data

    b = tmp_path / "b.txt"
    b.write_bytes(random.Random(0).randbytes(4096))
    u16 = tmp_path / "u16.txt"
    u16.write_bytes(("plain words " * 200).encode("utf-16"))
    nul = tmp_path / "nul.txt"
    nul.write_text("a\x00" * 2000, encoding="utf-8")  # valid UTF-8, but half of it NUL characters
    for f, needle in ((b, "is not UTF-8 text"), (u16, "is not UTF-8 text"), (nul, "does not look like text")):
        refused(invoke(runner, ["eval", tiny_llama_dir, "--ppl", f, "--seq-len", "64", "-o", tmp_path / "r.json"]),
                needle, f)
        refused(invoke(runner, ["calibrate", tiny_llama_dir, "--data", f, "-o", tmp_path / "c"]), needle, f)
    nothing_left(tmp_path, "b.txt", "u16.txt", "nul.txt")
    ok = tmp_path / "ok.txt"  # real text with a byte-order mark, accents, tabs and an emoji reads as before
    ok.write_bytes("\ufeffCaf\u00e9\tna\u00efve \U0001f680 text\nline two\n".encode("utf-8"))
    assert data.load_text(str(ok)) == "Caf\u00e9\tna\u00efve \U0001f680 text\nline two\n"


# ------------------------------------------------------------------------------------------------ 6. typed recipes
def test_recipe_values_are_typed_and_checked_like_flags(tmp_path, runner, tiny_llama_dir, tiny_calib_dir):
    from lpt.config import PruneConfig, build

    recipe = tmp_path / "r.yaml"
    base = ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, *FAST, "--recipe", recipe, "-o", tmp_path / "o"]
    for body, needle in (("ratio: half", "key 'ratio': expected a number, got 'half'"),
                         ("ratio: .nan", "key 'ratio': expected a finite number"),
                         ("nsamples: 2.5", "key 'nsamples': expected a whole number"),
                         ("normalize: maybe", "key 'normalize': expected true or false")):
        recipe.write_text(f"prune:\n  {body}\n")
        refused(invoke(runner, base), str(recipe), needle)
    recipe.write_text("prune:\n  ratio: half\n")
    refused(invoke(runner, [*base, "--ratio", "0.3"]), "'ratio'")  # checked even though the flag overrides it
    nothing_left(tmp_path, "r.yaml")
    # what PyYAML reads as strings (1e-4) or ints where a float is meant becomes the field's type
    cfg = build(PruneConfig, {}, set(), {"lr": "1e-4", "lora_alpha": 16, "balance": 2, "max_steps": 20.0})
    assert (cfg.lr, cfg.lora_alpha, cfg.balance, cfg.max_steps) == (1e-4, 16.0, "2", 20)
    assert isinstance(cfg.lora_alpha, float) and isinstance(cfg.max_steps, int)
    # a field of several types (--round-to N or a preset name) takes the first that fits
    assert build(PruneConfig, {}, set(), {"round_to": "cpu"}).round_to == "cpu"
    assert build(PruneConfig, {}, set(), {"round_to": "32"}).round_to == 32
    # and the explicit flag still wins over a valid recipe value
    cfg = build(PruneConfig, {"ratio": 0.3}, {"ratio"}, {"ratio": 0.2})
    assert cfg.ratio == 0.3


# -------------------------------------------------------------------------------------------- 7. one output, one run
HOLD = """
import os, sys
from lpt import artifacts
claim = artifacts.output_lock(sys.argv[1])
claim.__enter__()
print("held", flush=True)
sys.stdin.read()  # holds the lock until the test closes stdin
os._exit(0)  # no cleanup, as if killed: the lock file stays, the kernel drops the lock
"""


@pytest.fixture
def held(tmp_path):
    """A live child process holding the lock of an output path (``held(path)``); ended at teardown."""
    procs = []

    def hold(path):
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=ENV)
        assert p.stdout.readline().strip() == "held"
        procs.append(p)
        return p

    yield hold
    for p in procs:
        p.stdin.close()
        p.wait()


def release(p):
    p.stdin.close()
    assert p.wait() == 0


def test_a_second_run_on_the_same_output_is_refused(tmp_path, runner, tiny_llama_dir, tiny_calib_dir, held):
    from lpt import checkpoint

    out = tmp_path / "o"
    work = prune.partial_dir(out)
    checkpoint.save(work / artifacts.CHECKPOINT_DIR, {"x": torch.zeros(1)}, {"step": 2})  # the live run's state
    holder = held(out)
    args = ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, *FAST, "-o", out]
    refused(invoke(runner, args), f"output {out} is in use by another lpt run (pid {holder.pid}")
    refused(invoke(runner, [*args[:-2], "--resume", "-o", out]), "in use")
    assert checkpoint.exists(work / artifacts.CHECKPOINT_DIR) and not out.exists()  # the first run's files untouched
    # the holder dies without releasing (its lock file stays): the kernel dropped its lock, a new run proceeds
    release(holder)
    assert artifacts.lock_path(out).exists()
    r = invoke(runner, args)
    assert r.exit_code == 0, r.output
    assert f"removing {work} left by an interrupted run (its checkpoint at step 2" in " ".join(r.output.split())
    nothing_left(tmp_path, "o")
    assert (out / artifacts.MASKS).is_file()


@pytest.mark.parametrize("stage", ["calibrate", "slice", "eval"])
def test_other_stages_claim_their_output_too(tmp_path, runner, tiny_llama_dir, held, stage):
    masks = tmp_path / "masks.json"
    _masks_file(tiny_llama_dir, masks)
    out = tmp_path / ("r.json" if stage == "eval" else "o")
    args = {"calibrate": ["calibrate", tiny_llama_dir, "-n", "2", "--seq-len", "16"],
            "slice": ["slice", tiny_llama_dir, "--masks", masks],
            "eval": ["eval", tiny_llama_dir, "--ppl", "builtin:pydoc:test", "--seq-len", "64", "--max-segments", "1"]}
    held(out)
    refused(invoke(runner, [*args[stage], "-o", out]), "in use by another lpt run")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ 8. smaller holes
def test_reconstruct_damp_nan_names_the_flag(tmp_path, runner, tiny_llama_dir, tiny_calib_dir):
    masks = tmp_path / "masks.json"
    _masks_file(tiny_llama_dir, masks)
    for v in ("nan", "inf"):
        refused(invoke(runner, ["slice", tiny_llama_dir, "--masks", masks, "--reconstruct", tiny_calib_dir,
                                "--reconstruct-damp", v, "-o", tmp_path / "s"]),
                f"--reconstruct-damp must be a finite number (got {v})")
    nothing_left(tmp_path, "masks.json")


def test_truncated_safetensors_names_the_file(tmp_path, runner, tiny_llama_dir, tiny_calib_dir):
    model = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, model)
    w = model / "model.safetensors"
    with open(w, "r+b") as f:
        f.truncate(w.stat().st_size // 2)
    r = invoke(runner, ["eval", model, "--ppl", "builtin:pydoc:test", "--seq-len", "64", "-o", tmp_path / "r.json"])
    refused(r, f"{w} is not a readable safetensors file", "truncated or corrupt")
    calib = tmp_path / "calib"
    shutil.copytree(tiny_calib_dir, calib)
    (calib / artifacts.TOKENS).write_bytes((calib / artifacts.TOKENS).read_bytes()[:100])
    refused(invoke(runner, ["prune", tiny_llama_dir, "--calib", calib, *FAST, "-o", tmp_path / "o"]),
            f"{calib / artifacts.TOKENS} is not a readable safetensors file")
    nothing_left(tmp_path, "m", "calib")


def test_leftovers_of_killed_runs_are_removed(tmp_path, runner, tiny_llama_dir):
    out = tmp_path / "c"
    (tmp_path / ".c.partial-abc123").mkdir()  # what SIGKILL leaves of atomic_dir / atomic_file
    (tmp_path / ".c.partial-abc123" / artifacts.TOKENS).write_bytes(b"half")
    (tmp_path / ".c.old-4242").mkdir()
    (tmp_path / ".other.partial-x").mkdir()  # another output's: not ours to remove
    r = invoke(runner, ["calibrate", tiny_llama_dir, "-n", "2", "--seq-len", "16", "-o", out])
    assert r.exit_code == 0, r.output
    assert "removed 2 temporary file(s) an interrupted run left next to" in " ".join(r.output.split())
    nothing_left(tmp_path, "c", ".other.partial-x")


def test_non_finite_model_output_is_not_written_as_a_result(tmp_path, runner, tiny_llama_dir):
    model = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, model)
    m = build_model(tiny_config())
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    m.save_pretrained(model)
    refused(invoke(runner, ["eval", model, "--ppl", "builtin:pydoc:test", "--seq-len", "64", "--max-segments", "1",
                            "-o", tmp_path / "r.json"]), "non-finite log-probabilities")
    nothing_left(tmp_path, "m")


def test_compare_notes_different_tokenizers(tmp_path, runner, tiny_llama_dir):
    a = tmp_path / "a.json"
    r = invoke(runner, ["eval", tiny_llama_dir, "--ppl", "builtin:pydoc:test", "--seq-len", "64", "--max-segments",
                        "1", "-o", a])
    assert r.exit_code == 0, r.output
    doc = json.loads(a.read_text())
    assert len(doc["model"]["tokenizer_fingerprint"]) == 16
    r = invoke(runner, ["eval", "--compare", a, a])
    assert r.exit_code == 0 and "different tokenizers" not in r.output
    doc["model"]["tokenizer_fingerprint"] = "0" * 16
    b = tmp_path / "b.json"
    b.write_text(json.dumps(doc))
    r = invoke(runner, ["eval", "--compare", a, b])
    assert r.exit_code == 0, r.output
    assert "different tokenizers" in r.output and "0" * 16 in r.output


# the converter replaced by a stand-in that opens a FIFO for writing, then kills lpt (its parent) and sleeps; the test
# reads the FIFO to its end, which comes only when every writer is gone: when the stand-in was ended with lpt
FAKE_CONVERTER = """
import os, signal, sys, time
w = open(os.environ["LPT_TEST_FIFO"], "wb", buffering=0)
os.kill(os.getppid(), getattr(signal, os.environ["LPT_TEST_SIGNAL"]))
time.sleep(120)
w.write(b"survived")
"""
EXPORT_DRIVER = """
import sys
from lpt import llamacpp

class StandIn(llamacpp.Converter):
    def command(self, model, outfile, outtype):
        return [sys.executable, "-c", sys.argv[1]]

llamacpp.find_converter = lambda spec=None: StandIn(sys.executable)
from lpt.cli import app
app(sys.argv[2:], prog_name="lpt")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the converter dies with lpt through Linux's prctl")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_killed_export_ends_the_converter(tmp_path, runner, tiny_llama_dir, monkeypatch, sig):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out = tmp_path / "m.gguf"
    lpt = subprocess.Popen([sys.executable, "-c", EXPORT_DRIVER, FAKE_CONVERTER, "export", str(tiny_llama_dir),
                            "--gguf", "-o", str(out)], env={**ENV, "LPT_TEST_FIFO": str(fifo), "LPT_TEST_SIGNAL": sig},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def unblock():  # if lpt exits without starting the stand-in, open the FIFO once so the read below returns
        lpt.wait()
        with open(fifo, "wb"):
            pass

    threading.Thread(target=unblock, daemon=True).start()
    with open(fifo, "rb") as f:
        assert f.read() == b""  # end of file, and the stand-in never wrote "survived": it was ended with lpt
    log = lpt.communicate()[0]
    if sig == "SIGTERM":
        assert lpt.returncode == 130 and "interrupted; no output was written" in log, log
        nothing_left(tmp_path, "fifo")
    else:
        assert lpt.returncode == -signal.SIGKILL, log
        assert not out.exists() and list(tmp_path.glob(".m.gguf.partial-*"))  # what SIGKILL leaves behind
        # the next export removes it (the stand-in converter now writes a GGUF header and exits)
        from lpt import llamacpp

        class Writes(llamacpp.Converter):
            def command(self, model, outfile, outtype):
                return [sys.executable, "-c", f"open({str(outfile)!r}, 'wb').write(b'GGUF')"]

        monkeypatch.setattr(llamacpp, "find_converter", lambda spec=None: Writes(sys.executable))
        monkeypatch.setattr(llamacpp, "report", lambda path, outtype: {})  # no tensors to read back
        monkeypatch.setattr(llamacpp, "report_lines", lambda rep: [])
        r = invoke(runner, ["export", tiny_llama_dir, "--gguf", "-o", out])
        assert r.exit_code == 0 and "removed 1 temporary file(s)" in " ".join(r.output.split()), r.output
        nothing_left(tmp_path, "fifo", "m.gguf")


def test_read_adapter_refuses_a_non_finite_scale(tmp_path, runner, tiny_llama_dir, tiny_calib_dir):
    out = tmp_path / "p"
    assert invoke(runner, ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, *FAST, "-o", out]).exit_code == 0
    cfg = json.loads((out / artifacts.ADAPTER_CONFIG).read_text())
    cfg["lora_alpha"] = float("nan")
    (out / artifacts.ADAPTER_CONFIG).write_text(json.dumps(cfg))
    refused(invoke(runner, ["merge", tiny_llama_dir, "--adapter", out, "-o", tmp_path / "m"]), "'lora_alpha' is nan")
    assert not (tmp_path / "m").exists()

