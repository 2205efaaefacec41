"""Hostile inputs, round two: every file lpt reads is read with bounded memory and typed, nothing it reads runs code
unless a flag says so, and an interrupted or starved run leaves nothing that looks finished.

Every case goes through the CLI on a tiny model and checks the promise of ``test_reliability``: one line naming the
file (or flag) and what is wrong, a non-zero exit, nothing written, earlier outputs intact -- or the right behaviour.
Memory is measured as the peak RSS of a child process, with a bound proportional to what is read; nothing depends on
a timing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import invoke
from lpt import artifacts
from test_reliability import FAST, _masks_file, nothing_left, refused

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

BAD_JSON = {  # what a hostile or damaged JSON file holds -> what the one-line error says
    "latin1": (b'{"kind": "caf\xe9"}', "is not UTF-8 text"),
    "array": (b"[1, 2, 3]", "it holds an array, not a JSON object"),
    "deep": (b"[" * 200_000 + b"]" * 200_000, "nests its JSON deeper than the parser goes"),
    "truncated": (b'{"kind": ', "is not valid JSON"),
}


def _same_bytes(path: Path, body: bytes) -> None:
    assert path.read_bytes() == body  # the file lpt refused is left as it was


def _adapter_dir(model_dir: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from lpt import lora
    from lpt.arch import describe

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora.inject(m, describe(m.config), r=4, alpha=8)
    lora.save_adapter(m, out, str(model_dir))
    return out


# ------------------------------------------------------------------------------------------------ typed JSON readers
@pytest.mark.parametrize("kind", sorted(BAD_JSON))
def test_every_json_artifact_is_read_typed_and_named(tmp_path, runner, tiny_llama_dir, tiny_calib_dir, kind):
    body, needle = BAD_JSON[kind]
    # masks.json (slice)
    masks = tmp_path / "masks.json"
    masks.write_bytes(body)
    refused(invoke(runner, ["slice", tiny_llama_dir, "--masks", masks, "-o", tmp_path / "s"]), str(masks), needle)
    # calib.json (prune --calib)
    calib = tmp_path / "calib"
    shutil.copytree(tiny_calib_dir, calib)
    (calib / artifacts.CALIB_META).write_bytes(body)
    refused(invoke(runner, ["prune", tiny_llama_dir, "--calib", calib, *FAST, "-o", tmp_path / "p"]),
            str(calib / artifacts.CALIB_META), needle)
    # adapter_config.json (merge)
    adapter = _adapter_dir(tiny_llama_dir, tmp_path / "adapter")
    (adapter / artifacts.ADAPTER_CONFIG).write_bytes(body)
    refused(invoke(runner, ["merge", tiny_llama_dir, "--adapter", adapter, "-o", tmp_path / "m"]),
            str(adapter / artifacts.ADAPTER_CONFIG), needle)
    # a results file (eval --compare)
    res = tmp_path / "r.json"
    res.write_bytes(body)
    refused(invoke(runner, ["eval", "--compare", res]), str(res), needle)
    # run.json (lpt run): refused, and left as it was
    run = tmp_path / "run"
    run.mkdir()
    (run / artifacts.RUN_STATE).write_bytes(body)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibrate:\n  nsamples: 2\n  seq_len: 16\n")
    refused(invoke(runner, ["run", recipe, "--model", tiny_llama_dir, "--stages", "calibrate", "-o", run]),
            str(run / artifacts.RUN_STATE), needle)
    _same_bytes(run / artifacts.RUN_STATE, body)
    nothing_left(tmp_path, "masks.json", "calib", "adapter", "r.json", "run", "r.yaml")
    assert sorted(p.name for p in run.iterdir()) == [artifacts.RUN_STATE]


def test_fields_of_the_wrong_type_are_named(tmp_path, runner, tiny_llama_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / artifacts.RUN_STATE).write_text(json.dumps({"kind": "lpt-run", "schema_version": 1, "steps": []}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibrate:\n  nsamples: 2\n  seq_len: 16\n")
    refused(invoke(runner, ["run", recipe, "--model", tiny_llama_dir, "--stages", "calibrate", "-o", run]),
            f"{run / artifacts.RUN_STATE}: 'steps' must be an object, not an array")
    (run / artifacts.RUN_STATE).write_text(json.dumps(
        {"kind": "lpt-run", "schema_version": 1, "steps": {"calibrate": {"status": 1}}}))
    refused(invoke(runner, ["run", recipe, "--model", tiny_llama_dir, "--stages", "calibrate", "-o", run]),
            "'steps.calibrate.status' must be a string, not a number")
    a = tmp_path / "a.json"
    r = invoke(runner, ["eval", tiny_llama_dir, "--ppl", "builtin:pydoc:test", "--seq-len", "32", "--max-segments",
                        "1", "-o", a])
    assert r.exit_code == 0, r.output
    doc = json.loads(a.read_text())
    doc["perplexity"]["builtin:pydoc:test"]["seq_len"] = "32"
    b = tmp_path / "b.json"
    b.write_text(json.dumps(doc))
    refused(invoke(runner, ["eval", "--compare", a, b]),
            f"{b}: 'perplexity.builtin:pydoc:test.seq_len' must be a whole number, not a string")
    doc["perplexity"] = {"x": [1]}
    b.write_text(json.dumps(doc))
    refused(invoke(runner, ["eval", "--compare", a, b]), "'perplexity.x' must be an object, not an array")


def test_masks_with_json_booleans_as_indices_are_refused(tmp_path, runner, tiny_llama_dir):
    """[true, false, true] would pass as the indices 1, 0, 1 -- and mask as a boolean vector. It is refused."""
    masks = tmp_path / "masks.json"
    _masks_file(tiny_llama_dir, masks)
    doc = json.loads(masks.read_text())
    doc["layers"][0]["kv_heads"] = [False, True]
    masks.write_text(json.dumps(doc))
    refused(invoke(runner, ["slice", tiny_llama_dir, "--masks", masks, "-o", tmp_path / "s"]),
            str(masks), "layer 0: kv_heads index out of range 0..1 (or not an integer)")
    refused(invoke(runner, ["eval", tiny_llama_dir, "--masks", masks, "--ppl", "builtin:pydoc:test",
                            "-o", tmp_path / "e.json"]), str(masks), "not an integer")
    doc["layers"][0]["kv_heads"] = {"0": 1}
    masks.write_text(json.dumps(doc))
    refused(invoke(runner, ["slice", tiny_llama_dir, "--masks", masks, "-o", tmp_path / "s"]),
            str(masks), "'layers' must be a list of objects")
    nothing_left(tmp_path, "masks.json")


def test_a_checkpoint_missing_a_key_is_one_line(tmp_path, runner, tiny_llama_dir, tiny_calib_dir, monkeypatch):
    from lpt.stages import prune

    real_step = prune.Pruner.train_step

    def stop_at_4(self, batch):
        if self.step == 4:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(prune.Pruner, "train_step", stop_at_4)
    out = tmp_path / "o"
    args = ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, *FAST, "--save-every", "2", "-o", out]
    assert invoke(runner, args).exit_code == 130
    monkeypatch.setattr(prune.Pruner, "train_step", real_step)
    meta = artifacts.work_dir(out) / artifacts.CHECKPOINT_DIR / artifacts.CHECKPOINT_META
    doc = json.loads(meta.read_text())
    del doc["state"]["optimizer"]
    meta.write_text(json.dumps(doc))
    body = meta.read_bytes()
    refused(invoke(runner, [*args, "--resume"]), "has no 'optimizer'", str(artifacts.work_dir(out)))
    _same_bytes(meta, body)  # the checkpoint is left for the user to look at
    del doc["state"]
    meta.write_text(json.dumps(doc))
    refused(invoke(runner, [*args, "--resume"]), f"{meta} has no 'state'")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ locks and full disks
def test_a_planted_lock_link_is_never_followed(tmp_path, runner, tiny_llama_dir):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "c"
    lock = artifacts.lock_path(out)
    lock.symlink_to(victim)
    args = ["calibrate", tiny_llama_dir, "-n", "2", "--seq-len", "16", "-o", out]
    refused(invoke(runner, args), f"the lock {lock} of output {out} is a symbolic link")
    assert victim.read_text() == "precious" and lock.is_symlink() and not out.exists()
    lock.unlink()
    os.link(victim, lock)  # a second name of the victim: not a lock lpt made either
    refused(invoke(runner, args), "with 2 name(s), not one lpt made")
    assert victim.read_text() == "precious"
    lock.unlink()
    # lpt run: RUN_DIR is claimed by .RUN_DIR.lock next to it; an earlier lpt's RUN_DIR/.lock is never opened
    run = tmp_path / "run"
    run.mkdir()
    (run / artifacts.LEGACY_RUN_LOCK).symlink_to(victim)
    artifacts.lock_path(run).symlink_to(victim)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibrate:\n  nsamples: 2\n  seq_len: 16\n")
    run_args = ["run", recipe, "--model", tiny_llama_dir, "--stages", "calibrate", "-o", run]
    refused(invoke(runner, run_args), f"the lock {artifacts.lock_path(run)} of output {run} is a symbolic link")
    assert victim.read_text() == "precious" and sorted(p.name for p in run.iterdir()) == [".lock"]
    artifacts.lock_path(run).unlink()
    r = invoke(runner, run_args)
    assert r.exit_code == 0, r.output
    assert victim.read_text() == "precious" and (run / "calibrate" / artifacts.TOKENS).is_file()


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from lpt.cli import app
app(sys.argv[2:], prog_name="lpt")
"""


def _starved(limit: int, *args) -> subprocess.CompletedProcess:
    """lpt ARGS in a child process where no file may grow past ``limit`` bytes (what a full disk does to a write)."""
    return subprocess.run([sys.executable, "-c", FULL_DISK, str(limit), *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=600)


def test_a_full_disk_leaves_no_empty_lock_nor_truncated_file(tmp_path, runner, tiny_llama_dir, tiny_calib_dir):
    # not even the lock's few bytes fit: refused in one line, and no (empty) lock file stays behind
    p = _starved(0, "calibrate", tiny_llama_dir, "-n", "2", "--seq-len", "16", "-o", tmp_path / "c")
    assert p.returncode == 2 and p.stderr.count("error:") == 1, p.stderr
    assert f"cannot write the lock {artifacts.lock_path(tmp_path / 'c')}" in p.stderr
    nothing_left(tmp_path)
    # room for the lock, the log and the JSON files, not for the adapter's weights: the one line names the file, and
    # no truncated adapter stays in the work directory (or anywhere)
    out = tmp_path / "p"
    p = _starved(8192, "prune", tiny_llama_dir, "--calib", tiny_calib_dir, *FAST, "-o", out)
    assert p.returncode == 2 and p.stderr.count("error:") == 1, p.stderr
    assert f"cannot write {artifacts.partial_dir(out) / artifacts.ADAPTER_WEIGHTS}" in " ".join(p.stderr.split())
    assert not out.exists() and not artifacts.lock_path(out).exists()
    left = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert not [f for f in left if "safetensors" in f.name or ".partial-" in f.name], left
    # the next run, with room, discards what the starved one left and finishes
    r = invoke(runner, ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, *FAST, "-o", out])
    assert r.exit_code == 0, r.output
    nothing_left(tmp_path, "p")


# ------------------------------------------------------------------------------------------------ text read as needed
RSS = """
import resource, sys
from lpt.cli import app
try:
    app(sys.argv[1:], prog_name="lpt")
    code = 0
except SystemExit as e:
    code = e.code
print("peak-rss-kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def _peak_rss(*args) -> int:
    """Peak resident memory (bytes) of ``lpt ARGS`` run in a child process."""
    p = subprocess.run([sys.executable, "-c", RSS, *map(str, args)], capture_output=True, text=True, env=ENV,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return int(p.stderr.rsplit("peak-rss-kib", 1)[1].split()[0]) * 1024


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """The same prose as a small file (~100 kB) and a large one (~16 MB)."""
    from lpt.data import load_text

    d = tmp_path_factory.mktemp("texts")
    prose = load_text("builtin:pydoc:test")
    small, big = d / "small.txt", d / "big.txt"
    small.write_text(prose[:100_000], encoding="utf-8")
    with big.open("w", encoding="utf-8") as f:
        while f.tell() < 16 * 2**20:
            f.write(prose)
    return small, big


def test_eval_and_calibrate_read_only_what_their_segments_need(tmp_path, tiny_llama_dir, texts):
    """Peak memory does not grow with the file: a 16 MB text at 2 segments (or 4 blocks) peaks within a fixed
    bound of the same run on 100 kB (what is read: a window of 8x the tokens asked, at most a 1 MiB piece ahead)."""
    from lpt import data

    small, big = texts
    bound = 8 * data.TEXT_PIECE_BYTES  # the piece read ahead, its decoded copy, the joined window: a few MiB
    for stage in ("eval", "calibrate"):
        peaks = []
        for f in (small, big):
            out = tmp_path / f"{stage}-{f.stem}"
            if stage == "eval":
                args = ["eval", tiny_llama_dir, "--ppl", f, "--seq-len", "64", "--max-segments", "2",
                        "-o", f"{out}.json"]
            else:
                args = ["calibrate", tiny_llama_dir, "--data", f, "-n", "4", "--seq-len", "64", "-o", out]
            peaks.append(_peak_rss(*args))
        assert peaks[1] - peaks[0] < bound, (stage, peaks, big.stat().st_size)
    # and the segments are those of the whole text: the same perplexity and blocks from either file
    a, b = (json.loads((tmp_path / f"eval-{n}.json").read_text())["perplexity"] for n in ("small", "big"))
    assert a[str(small)]["ppl"] == pytest.approx(b[str(big)]["ppl"], rel=1e-6)
    assert b[str(big)]["text_tokens"] is None and b[str(big)]["segments"] == 2  # not read to its end
    x, y = (artifacts.load_tensors(tmp_path / f"calibrate-{n}" / artifacts.TOKENS) for n in ("small", "big"))
    assert torch.equal(x["input_ids"], y["input_ids"])


def test_streamed_tokens_are_those_of_the_whole_text(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from lpt import data

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    text = data.load_text("builtin:pydoc:test") + "\n\n  trailing words.\n"
    whole = tok(text)["input_ids"]
    for size in (1, 97, 4096, len(text)):
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        for need in (1, 64, 1000, 9000, len(whole), 10 * len(whole)):
            got = data.stream_tokens(tok, pieces, need)
            assert got.ids[:need] == whole[:need], (size, need)
            assert got.whole == (len(got.ids) == len(whole))
        assert data.stream_tokens(tok, pieces).ids == whole


@pytest.mark.parametrize("body", ["", " \n\t\n   \r\n", "\ufeff\n\n"])
def test_empty_or_whitespace_text_is_refused(tmp_path, runner, tiny_llama_dir, body):
    f = tmp_path / "blank.txt"
    f.write_text(body, encoding="utf-8")
    refused(invoke(runner, ["eval", tiny_llama_dir, "--ppl", f, "--seq-len", "8", "-o", tmp_path / "r.json"]),
            str(f), "empty or only whitespace")
    refused(invoke(runner, ["calibrate", tiny_llama_dir, "--data", f, "-n", "2", "--seq-len", "8", "-o",
                            tmp_path / "c"]), str(f), "only whitespace")
    nothing_left(tmp_path, "blank.txt")
    f.write_text(" " * 100_000 + "words at the end", encoding="utf-8")  # what the segments would read is blank
    refused(invoke(runner, ["eval", tiny_llama_dir, "--ppl", f, "--seq-len", "8", "--max-segments", "1",
                            "-o", tmp_path / "r.json"]), "are only whitespace")


# ------------------------------------------------------------------------------------------------ recipes
LAUGHS = "\n".join(["run:", "  model: m", "lol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
                   + [f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
                   + ["prune:", "  ratio: *l8"]) + "\n"


@pytest.mark.parametrize("body, needle", [
    (LAUGHS, "its aliases expand to more than 100,000 YAML nodes"),
    ("prune: &a\n  x: *a\n", "an alias refers to the node that holds it"),
    ("prune:\n  ratio: 0.2\nprune:\n  ratio: 0.9\n", "key 'prune' given twice in one mapping (line 3)"),
    ("prnue:\n  ratio: 0.2\n", "unknown section prnue (valid: calibrate, prune, merge, slice, eval, export, bench, "
                               "run)"),
    ("prune:\n  ratio: !!python/object/apply:os.system [echo hi]\n", "is not valid YAML"),
    ("[" * 5000 + "]" * 5000 + "\n", "deeper than the parser goes"),
])
def test_hostile_recipes_are_refused_unexpanded(tmp_path, runner, tiny_llama_dir, tiny_calib_dir, body, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(body)
    line = refused(invoke(runner, ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, *FAST, "--recipe", recipe,
                                   "-o", tmp_path / "o"]), str(recipe), needle)
    assert len(line) < 300  # never the expanded value
    run_dir = tmp_path / "run"
    refused(invoke(runner, ["run", recipe, "--model", tiny_llama_dir, "--stages", "prune", "-o", run_dir]), needle)
    nothing_left(tmp_path, "r.yaml")
    recipe.write_bytes(b"x: " + b"y" * (2 << 20))
    refused(invoke(runner, ["calibrate", tiny_llama_dir, "--recipe", recipe, "-o", tmp_path / "c"]),
            "more than a recipe holds")


# ------------------------------------------------------------------------------------------------ GGUF headers
def _gguf(path: Path, kv: list[bytes], tensors: list[bytes] = (), data: bytes = b"") -> Path:
    import struct

    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)) + b"".join(kv) + b"".join(tensors)
    path.write_bytes(head + b"\0" * (-len(head) % 32) + data)
    return path


def _str(s: str) -> bytes:
    import struct

    return struct.pack("<Q", len(s.encode())) + s.encode()


def _kv_str(key: str, value: str) -> bytes:
    import struct

    return _str(key) + struct.pack("<I", 8) + _str(value)


def test_gguf_headers_are_read_with_bounds_and_named(tmp_path, runner):
    import struct

    arch = _kv_str("general.architecture", "llama")
    cases = {  # a bomb is refused from its declared size, before anything is read or allocated for it
        "strings.gguf": ([arch, _str("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 10_000_000)],
                         "key tokenizer.ggml.tokens is an array of 10,000,000 entries, more than 1,048,576"),
        "string.gguf": ([_str("tokenizer.chat_template") + struct.pack("<IQ", 8, 1 << 40), arch],
                        "key tokenizer.chat_template is a string of 1,099,511,627,776 bytes"),
        "keys.gguf": ([arch] * 3, None),  # n_kv patched below
        "cut.gguf": ([arch, _kv_str("general.name", "lpt")], "truncated: the header runs past the end"),
    }
    for name, (kv, needle) in cases.items():
        f = _gguf(tmp_path / name, kv)
        if name == "keys.gguf":
            f.write_bytes(f.read_bytes()[:16] + struct.pack("<Q", 1 << 40) + f.read_bytes()[24:])
            needle = "declares 1,099,511,627,776 keys"
        if name == "cut.gguf":
            f.write_bytes(f.read_bytes()[:24 + sum(map(len, kv)) - 2])
        refused(invoke(runner, ["eval", f, "--ppl", "builtin:pydoc:test", "-o", tmp_path / "r.json"]), str(f), needle)
    # a tensor whose data lies past the end of the file (a truncated download)
    tensor = _str("token_embd.weight") + struct.pack("<IQQIQ", 2, 64, 384, 0, 0)  # 64 x 384 float32 at offset 0
    f = _gguf(tmp_path / "short.gguf", [arch], [tensor], data=b"\0" * 1000)
    refused(invoke(runner, ["prune", f, "-o", tmp_path / "p"]), str(f),
            "truncated: tensor token_embd.weight ends at byte")
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "p").exists()


@pytest.mark.smollm2
def test_a_truncated_real_gguf_names_the_file(tmp_path, runner, smollm2_path):
    f = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src, open(f, "wb") as dst:
        dst.write(src.read(smollm2_path.stat().st_size // 2))
    refused(invoke(runner, ["eval", f, "--ppl", "builtin:pydoc:test", "-o", tmp_path / "r.json"]),
            f"{f} is not a readable GGUF file (truncated: tensor")


# ------------------------------------------------------------------------------------------------ chat templates
@pytest.mark.parametrize("template, needle", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran for more than 0.5 s"),
    ("{{ 'x' * 10 ** 11 }}", "needed more than 1,024 MiB"),
])
def test_a_chat_template_renders_within_bounds(tmp_path, runner, tiny_llama_dir, monkeypatch, template, needle):
    from lpt import data

    monkeypatch.setattr(data, "TEMPLATE_SECONDS", 0.5)
    model = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    records = tmp_path / "r.jsonl"
    records.write_text("\n".join(json.dumps({"instruction": f"Say {i}.", "response": f"{i}."}) for i in range(4)))
    refused(invoke(runner, ["calibrate", model, "--data", records, "--template", "chat", "-n", "2", "--seq-len", "32",
                            "-o", tmp_path / "c"]), f"the chat template of {model}", needle)
    nothing_left(tmp_path, "m", "r.jsonl")
    # a real template still renders, and the bounds are lifted afterwards
    import resource

    before = resource.getrlimit(resource.RLIMIT_AS), signal.getsignal(signal.SIGALRM)
    cfg["chat_template"] = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = invoke(runner, ["calibrate", model, "--data", records, "--template", "chat", "-n", "2", "--seq-len", "32",
                        "-o", tmp_path / "c"])
    assert r.exit_code == 0, r.output
    assert (resource.getrlimit(resource.RLIMIT_AS), signal.getsignal(signal.SIGALRM)) == before


# ------------------------------------------------------------------------------------------------ code from a task dir
def test_include_path_names_the_code_it_runs_and_resolves_relative_paths_once(tmp_path, runner, tiny_llama_dir,
                                                                               monkeypatch):
    from lpt.config import EvalConfig, help_of

    assert "Runs code" in help_of(EvalConfig, "include_path") and "!function" in help_of(EvalConfig, "include_path")
    text = " ".join(invoke(runner, ["eval", "--help"]).output.replace("│", " ").split())
    assert "Runs code: a task YAML may name Python with !function" in text
    # the README's relative example, from the repository root
    monkeypatch.chdir(ROOT)
    out = tmp_path / "local.json"
    r = invoke(runner, ["eval", tiny_llama_dir, "--tasks", "lpt_tiny_mc", "--include-path", "tests/data/tasks",
                        "--limit", "4", "-o", out])
    assert r.exit_code == 0, r.output
    assert "runs Python code" not in r.output  # this task brings none
    # a task that names Python: said before lm-eval imports it (the flag trusts the directory; nothing else runs it)
    tasks = tmp_path / "tasks"
    shutil.copytree(ROOT / "tests" / "data" / "tasks", tasks)
    (tasks / "helpers.py").write_text("import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('x')\n"
                                      "def keep(dataset):\n    return dataset\n")
    body = (tasks / "lpt_tiny_mc.yaml").read_text().replace("task: lpt_tiny_mc", "task: lpt_code_mc")
    (tasks / "code.yaml").write_text(body + "process_docs: !function helpers.keep\n")
    monkeypatch.chdir(tmp_path)
    r = invoke(runner, ["eval", tiny_llama_dir, "--tasks", "lpt_code_mc", "--include-path", "tasks", "--limit", "4",
                        "-o", tmp_path / "code.json"])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert f"task lpt_code_mc from --include-path runs Python code: keep in {tasks / 'helpers.py'}" in said
    assert (tasks / "RAN").exists()


# ------------------------------------------------------------------------------------------------ lpt run
def _recipe(path: Path, steps: int = 2) -> Path:
    path.write_text(f"""calibrate:
  nsamples: 4
  seq_len: 16
prune:
  data: builtin:pydoc:train
  nsamples: 4
  seq_len: 16
  batch_size: 2
  micro_batch_size: 2
  max_steps: {steps}
  prune_freq: 1
  ratio: 0.3
eval:
  ppl: builtin:pydoc:test
  seq_len: 32
  max_segments: 1
""")
    return path


def test_a_model_replaced_in_place_reruns_what_reads_it(tmp_path, runner, tiny_llama_dir):
    from conftest import build_model, tiny_config

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    recipe = _recipe(tmp_path / "r.yaml")
    args = ["run", recipe, "--model", model, "--stages", "calibrate,prune", "-o", tmp_path / "run"]
    assert invoke(runner, args).exit_code == 0
    r = invoke(runner, args)
    assert r.exit_code == 0 and "nothing to do" in r.output, r.output
    state = json.loads((tmp_path / "run" / artifacts.RUN_STATE).read_text())
    assert state["model_fingerprint"] and state["steps"]["prune"]["inputs"]["model"] == state["model_fingerprint"]
    build_model(tiny_config(), seed=1).save_pretrained(model)  # new weights, same path, same config
    r = invoke(runner, args)
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "calibrate: running (model changed)" in out and "prune: running (calibrate and model changed)" in out, out


@pytest.mark.parametrize("extra, stage, needle", [
    (["--set", "slice.reconstruct-mode=fast"], "slice", "unknown --reconstruct-mode 'fast'"),
    (["--set", "eval.batch-size=0"], "eval", "--batch-size must be"),
    (["--set", "eval.ppl=missing.txt"], "eval-dense", "--ppl missing.txt: file not found"),
    (["--set", "bench.seq-len=0"], "bench", "--seq-len must be"),
    (["--set", "export.outtype=q9"], "export", "'q9'"),
    (["--set", "prune.layout=per-layer"], "export", "needs a model with the same widths in every layer"),
    (["--model", "no/such/model/dir"], "", "model path not found: no/such/model/dir"),
])
@pytest.mark.parametrize("dry", [False, True])
def test_lpt_run_checks_every_stage_before_the_first_runs(tmp_path, runner, tiny_llama_dir, extra, stage, needle,
                                                          dry):
    """A setting of a later stage is refused before the first stage runs (by the plan, which builds every stage's
    config, or by pipeline.check, which runs every stage's validate); --dry-run refuses it too."""
    recipe = _recipe(tmp_path / "r.yaml")
    run = tmp_path / "run"
    stages = "calibrate,prune,slice,eval,bench" + (",export" if stage == "export" else "")  # export: the converter
    args = ["run", recipe, "--model", tiny_llama_dir, "--stages", stages, *extra, "-o", run,
            *(["--dry-run"] if dry else [])]
    r = invoke(runner, args)
    line = refused(r, needle)
    assert stage in line
    assert "would run" not in r.output and "running" not in r.output
    nothing_left(tmp_path, "r.yaml")  # not even RUN_DIR


# ------------------------------------------------------------------------------------------------ SIGTERM
TERM_DRIVER = """
import os, signal, sys
from lpt import pruner, slicing
where = os.environ["LPT_TERM_IN"]
if where == "prune":
    step = pruner.Pruner.train_step
    def train_step(self, batch):
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch)
    pruner.Pruner.train_step = train_step
else:
    cut = slicing.slice_model
    def slice_model(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return cut(*a, **k)
    slicing.slice_model = slice_model
from lpt.cli import app
app(sys.argv[1:], prog_name="lpt")
"""


@pytest.mark.parametrize("where, save_every", [("prune", "0"), ("prune", "2"), ("slice", None)])
def test_sigterm_is_handled_like_ctrl_c(tmp_path, tiny_llama_dir, tiny_calib_dir, where, save_every):
    out = tmp_path / "o"
    if where == "prune":
        args = ["prune", tiny_llama_dir, "--calib", tiny_calib_dir, *FAST, "--save-every", save_every, "-o", out]
    else:
        masks = tmp_path / "masks.json"
        _masks_file(tiny_llama_dir, masks)
        args = ["slice", tiny_llama_dir, "--masks", masks, "-o", out]
    p = subprocess.run([sys.executable, "-c", TERM_DRIVER, *map(str, args)], capture_output=True, text=True,
                       env={**ENV, "LPT_TERM_IN": where}, timeout=600)
    assert p.returncode == 130 and "error: interrupted; no output was written" in p.stderr, p.stderr[-2000:]
    assert p.stderr.count("error:") == 1 and "Traceback" not in p.stderr
    if save_every == "2":  # as after Ctrl-C: the checkpoint stays for --resume, nothing else
        nothing_left(tmp_path, ".o.partial")
        assert (tmp_path / ".o.partial" / artifacts.CHECKPOINT_DIR / artifacts.CHECKPOINT_META).is_file()
    else:
        nothing_left(tmp_path, *(["masks.json"] if where == "slice" else []))


# ------------------------------------------------------------------------------------------------ display
def test_compare_tables_are_never_wrapped_nor_cut(tmp_path, runner, tiny_llama_dir):
    a = tmp_path / "a.json"
    r = invoke(runner, ["eval", tiny_llama_dir, "--ppl", "builtin:pydoc:test", "--seq-len", "32", "--max-segments",
                        "1", "-o", a])
    assert r.exit_code == 0, r.output
    doc = json.loads(a.read_text())
    files = []
    for i in range(8):  # eight wide columns: far more than 80 terminal columns
        doc["label"] = f"a-rather-long-model-label-{i}"
        doc["perplexity"]["builtin:pydoc:test"]["ppl"] = 4.6123 + 1234.5 * i
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(doc))
    from lpt.cli import app

    md = runner.invoke(app, ["eval", "--compare", *map(str, files), "--markdown"], env={"COLUMNS": "80"})
    assert md.exit_code == 0, md.output
    lines = md.stdout.splitlines()  # a header, the alignment row and two rows, one line each
    assert len(lines) == 4 and all(x.startswith("|") and x.endswith("|") for x in lines), md.stdout
    assert lines[2].count("|") == 10 and "8646.11" in lines[3]
    plain = runner.invoke(app, ["eval", "--compare", *map(str, files)], env={"COLUMNS": "80"})
    assert plain.exit_code == 0 and "…" not in plain.stdout, plain.stdout
    for i in range(8):
        assert f"{4.6123 + 1234.5 * i:.2f}" in plain.stdout and f"a-rather-long-model-label-{i}" in plain.stdout


def test_help_is_legible_at_80_columns(runner):
    import click
    import typer.main

    from lpt.cli import app

    root = typer.main.get_command(app)
    for args in (["calibrate"], ["prune"], ["merge"], ["slice"], ["export"], ["eval"], ["run"], ["bench", "runtime"],
                 ["bench", "prune-step"]):
        r = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "80"})
        assert r.exit_code == 0 and "…" not in r.output, (args, r.output)
        assert max(map(len, r.output.splitlines())) <= 80
        cmd = root
        for a in args:
            cmd = cmd.commands[a]
        text = r.output.replace("│", " ").replace(",", " ") + " "
        for flag in (o for p in cmd.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)
                     if o.startswith("--")):
            assert f" {flag} " in text, (args, flag)  # e.g. --gradient-checkpointing, whole
