"""lpt run end to end on a tiny model: stages into RUN_DIR/<stage>/, a killed prune resumed, reruns that skip what
is up to date and rerun what changed, the report; the output contract of every command (stdout = the path)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import invoke

from lpt import artifacts, pipeline
from lpt.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["calibrate", "prune", "slice", "eval-dense", "eval-pruned"]


def write_recipe(path: Path, model: Path, steps: int = 8) -> Path:
    path.write_text(f"""# lpt run {path.name} -o RUN
run:
  model: {model}
  stages: [calibrate, prune, slice, eval]
  reconstruct: true
calibrate:
  data: builtin:pydoc:train
  nsamples: 8
  seq_len: 32
prune:
  data: builtin:pydoc:train
  nsamples: 8
  seq_len: 32
  ratio: 0.3
  batch_size: 4
  micro_batch_size: 2
  max_steps: {steps}
  prune_freq: 2
  lr: 1.0e-3
eval:
  ppl: builtin:pydoc:test
  seq_len: 64
  max_segments: 2
""")
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(d / "model.safetensors")


def _mtimes(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*")
            if p.is_file() and p.parent.name != "report" and p.name not in ("run.json", ".lock")}


def test_run_resumes_a_killed_prune_then_skips_then_reruns_what_changed(tmp_path, runner, tiny_llama_dir):
    from test_prune import KILL_DRIVER

    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir)
    full = tmp_path / "full"
    r = invoke(runner, ["run", recipe, "-o", full])
    assert r.exit_code == 0, r.output
    assert r.stdout == f"{full}\n"  # stdout: the run directory, nothing else
    for name in ("calibrate", "prune", "slice"):
        assert (full / name).is_dir()
    assert (full / "slice" / artifacts.PROVENANCE).is_file() and (full / "eval" / "pruned.json").is_file()
    state = json.loads((full / artifacts.RUN_STATE).read_text())
    assert state["stages"] == STAGES and sorted(state["steps"]) == sorted(STAGES) and all(s["status"] == "done" for s in state["steps"].values())
    assert state["steps"]["prune"]["config"]["calib"] == "$RUN_DIR/calibrate"  # same blocks: read, not rebuilt
    # ... and the same model as the stage command that builds them itself (lpt prune --recipe, as the README did)
    inline = tmp_path / "inline"
    assert invoke(runner, ["prune", tiny_llama_dir, "--recipe", recipe, "-o", inline]).exit_code == 0
    assert (inline / artifacts.MASKS).read_text().replace(str(inline), "") == \
        (full / "prune" / artifacts.MASKS).read_text().replace(str(full / "prune"), "")
    from safetensors.torch import load_file

    a, b = load_file(inline / artifacts.ADAPTER_WEIGHTS), load_file(full / "prune" / artifacts.ADAPTER_WEIGHTS)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)

    # killed during prune (SIGKILL at step 5, checkpoints every 2 steps), then the same command again
    cut = tmp_path / "cut"
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER)
    args = ["run", str(recipe), "-o", str(cut), "--save-every", "2"]
    p = subprocess.run([sys.executable, str(driver), *args], capture_output=True, text=True, timeout=600,
                       env={**_env(), "LPT_KILL_AT": "5"})
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert (cut / "calibrate").is_dir() and not (cut / "prune").exists()
    assert json.loads((cut / artifacts.RUN_STATE).read_text())["steps"]["prune"]["status"] == "running"
    r = invoke(runner, [*args])
    assert r.exit_code == 0, r.output
    assert "calibrate: up to date, skipped" in r.output
    assert "prune: resuming (interrupted; resuming from its checkpoint at step 4)" in r.output
    assert (full / "prune" / artifacts.MASKS).read_text() == (cut / "prune" / artifacts.MASKS).read_text()
    a, b = _weights(full / "slice"), _weights(cut / "slice")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    ppl = [json.loads((d / "eval" / "pruned.json").read_text())["perplexity"]["builtin:pydoc:test"]["ppl"]
           for d in (full, cut)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-4)

    # again: nothing to do, nothing written
    before = _mtimes(cut)
    r = invoke(runner, [*args])
    assert r.exit_code == 0, r.output
    assert "nothing to do, every stage is up to date" in r.output
    assert r.output.count("up to date, skipped") == len(STAGES)
    assert _mtimes(cut) == before

    # a changed flag: that stage and the ones reading its output run again, the others are skipped
    r = invoke(runner, [*args, "--set", "slice.reconstruct-damp=0.05"])
    assert r.exit_code == 0, r.output
    assert "slice: running (changed: reconstruct_damp 0.01 -> 0.05)" in r.output
    assert "eval-pruned: running (slice changed)" in r.output
    for name in ("calibrate", "prune", "eval-dense"):
        assert f"{name}: up to date, skipped" in r.output
    after = _mtimes(cut)
    assert after["prune/masks.json"] == before["prune/masks.json"]
    assert after["slice/model.safetensors"] != before["slice/model.safetensors"]
    # ... and a flag of an earlier stage reruns everything after it except what does not read it
    r = invoke(runner, [*args, "--set", "slice.reconstruct-damp=0.05", "--ratio", "0.5", "--dry-run"])
    assert r.exit_code == 0 and r.stdout == ""
    assert "prune: would run (changed: ratio 0.3 -> 0.5)" in r.output
    assert "slice: would run (prune will change)" in r.output and "eval-dense: would skip" in r.output


def test_report_names_every_stage_and_embeds_its_pictures(tmp_path, runner, tiny_llama_dir, monkeypatch):
    pytest.importorskip("matplotlib")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir, steps=4)
    out = tmp_path / "run"
    r = invoke(runner, ["--json", "run", recipe, "-o", out])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["output"] == str(out) and list(summary["stages"]) == STAGES
    assert {s["action"] for s in summary["stages"].values()} == {"ran"}
    assert set(summary["dense"]["perplexity"]) == set(summary["pruned"]["perplexity"]) == {"builtin:pydoc:test"}
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for name in STAGES:
        assert f"| {name} |" in md and f"<td>{name}</td>" in html
    for text in ("## Dense vs pruned", "ppl builtin:pydoc:test @64", "| safetensors, float32 |", "report/masks.png",
                 "report/training.png", f"lpt run {recipe} -o {out}"[:8]):
        assert text in md, text
    assert html.count("src='data:image/png;base64,") == 2 and "report/masks.png" not in html  # self-contained
    for png in ("masks.png", "training.png"):
        assert (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # without matplotlib the report keeps its tables and says how to get the pictures
    from lpt import report

    state = json.loads((out / artifacts.RUN_STATE).read_text())
    monkeypatch.setattr(report, "_pyplot", lambda: None)
    text = report.markdown(report.blocks(out, state))
    assert "pip install 'lpt[report]'" in text and "## Dense vs pruned" in text and "![" not in text
    # the dense vs pruned table is lpt eval --compare's
    from lpt.evaluation import results as R

    docs = [R.load(out / "eval" / f) for f in ("dense.json", "pruned.json")]
    for name, cells in R.table_rows(docs):
        assert f"| {name} | {' | '.join(cells)} |" in md


def test_plan_checks_stages_and_settings(tmp_path, tiny_llama_dir):
    from lpt.errors import LptError

    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir)
    base = dict(recipe=str(recipe), output=str(tmp_path / "run"), model=str(tiny_llama_dir), reconstruct=True)
    steps = pipeline.plan(RunConfig(**base))
    assert [s.name for s in steps] == STAGES
    assert steps[2].config.reconstruct == str(tmp_path / "run" / "calibrate") and steps[2].config.merge
    cfg = RunConfig(**base, overrides=["prune.lr=2e-3", "*.device=cpu", "eval.max-segments=3", "prune.skip-layers=0"])
    steps = {s.name: s.config for s in pipeline.plan(cfg)}
    assert steps["prune"].lr == 2e-3 and steps["eval-dense"].max_segments == 3 and steps["prune"].skip_layers == "0"
    assert all(c.device == "cpu" for c in steps.values())
    # prune builds its own blocks when the calibrate section makes other ones
    steps = {s.name: s for s in pipeline.plan(RunConfig(**base, overrides=["calibrate.nsamples=16"]))}
    assert steps["prune"].config.calib is None and steps["prune"].needs == ()
    for bad, msg in ((dict(stages=["prune", "slice", "eval", "fly"]), "unknown stage 'fly'"),
                     (dict(stages=["slice"]), "stage slice needs stage prune"),
                     (dict(stages=["prune", "slice"]), "--reconstruct refits on RUN_DIR/calibrate"),
                     (dict(overrides=["prune.ratio"]), "expected STAGE.KEY=VALUE"),
                     (dict(overrides=["prune.max_steps=many"]), "prune.max_steps=many: expected a whole number"),
                     (dict(overrides=["slice.merge=false"]), "set by lpt run"),
                     (dict(overrides=["eval.ppl="]), "nothing to evaluate")):
        with pytest.raises(LptError, match=msg):
            pipeline.plan(RunConfig(**{**base, **bad}))


def test_run_refuses_a_directory_it_did_not_make(tmp_path, runner, tiny_llama_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    r = invoke(runner, ["run", recipe, "-o", tmp_path / "busy"])
    assert r.exit_code == 2 and "is not an lpt run directory" in r.output


# ------------------------------------------------------------------------------------------ output contract
def test_stdout_is_the_output_path_and_json_a_summary(tmp_path, runner, tiny_llama_dir):
    calib = tmp_path / "calib"
    r = invoke(runner, ["calibrate", tiny_llama_dir, "-n", "4", "--seq-len", "32", "-o", calib])
    assert r.exit_code == 0 and r.stdout == f"{calib}\n" and "wrote 4 blocks" in r.stderr
    prune_out = tmp_path / "p"
    r = invoke(runner, ["prune", tiny_llama_dir, "--calib", calib, "--ratio", "0.3", "--max-steps", "2",
                        "--batch-size", "2", "--micro-batch-size", "2", "--prune-freq", "1", "-o", prune_out, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["command"] == "prune" and doc["output"] == str(prune_out) and doc["steps"] == 2
    assert doc["ratio"]["requested"] == 0.3 and doc["params"]["model_after"] < doc["params"]["model_before"]
    sliced = tmp_path / "s"
    r = invoke(runner, ["--quiet", "slice", tiny_llama_dir, "--masks", prune_out / "masks.json", "--adapter",
                        prune_out, "--merge", "-o", sliced])
    assert r.exit_code == 0 and r.stdout == f"{sliced}\n" and r.stderr == ""  # --quiet: nothing but the path
    res = tmp_path / "e.json"
    r = invoke(runner, ["eval", sliced, "--ppl", "builtin:pydoc:test", "--seq-len", "32", "--max-segments", "2",
                        "-o", res, "--json", "-q"])
    assert r.exit_code == 0 and r.stderr == ""
    doc = json.loads(r.stdout)
    assert doc["command"] == "eval" and doc["perplexity"]["builtin:pydoc:test"] > 1
    merged = tmp_path / "m"
    r = invoke(runner, ["merge", tiny_llama_dir, "--adapter", prune_out, "-o", merged, "-q"])
    assert r.exit_code == 0 and r.stdout == f"{merged}\n" and r.stderr == ""
    bench = tmp_path / "b.json"
    r = invoke(runner, ["bench", "runtime", tiny_llama_dir, sliced, "--seq-len", "16", "--trials", "1", "--warmup", "0",
                        "--no-isolate", "-o", bench, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["command"] == "bench runtime" and len(doc["results"]) == 2
    assert all(row["latency_s"] > 0 for row in doc["results"])
    r = invoke(runner, ["eval", "--compare", res, res, "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["rows"][0]["metric"] == "params (effective)"
    # errors still print under --quiet, and stdout stays empty
    r = invoke(runner, ["--quiet", "slice", tiny_llama_dir, "--masks", tmp_path / "nope.json", "-o", tmp_path / "x"])
    assert r.exit_code == 2 and r.stdout == "" and "masks file not found" in r.stderr


SHELL = """set -e
OUT=$("$PY" -m lpt calibrate "$MODEL" -n 4 --seq-len 32 -o "$DIR/calib")
OUT=$("$PY" -m lpt --quiet prune "$MODEL" --calib "$OUT" --ratio 0.3 --max-steps 2 --batch-size 2 \\
      --micro-batch-size 2 --prune-freq 1 -o "$DIR/prune")
OUT=$("$PY" -m lpt slice "$MODEL" --masks "$OUT/masks.json" --adapter "$OUT" --merge -o "$DIR/sliced" -q)
echo "final=$OUT"
"""


def test_stages_chain_in_a_shell_by_their_outputs_and_stay_quiet(tmp_path, tiny_llama_dir):
    """OUT=$(lpt ...) captures the path; without --8bit nothing imports bitsandbytes and no library prints."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(
        "import atexit, os, sys\n"
        "atexit.register(lambda: open(os.environ['PROBE_LOG'], 'a').write("
        "'bitsandbytes ' + str('bitsandbytes' in sys.modules) + '\\n'))\n")
    log = tmp_path / "probe.log"
    env = {**_env(), "PY": sys.executable, "MODEL": str(tiny_llama_dir), "DIR": str(tmp_path), "PROBE_LOG": str(log)}
    env["PYTHONPATH"] = os.pathsep.join([str(probe), env["PYTHONPATH"]])
    p = subprocess.run(["bash", "-c", SHELL], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout == f"final={tmp_path / 'sliced'}\n"
    assert log.read_text().split("\n")[:3] == ["bitsandbytes False"] * 3
    for noise in ("Loading weights", "Writing model shards", "UserWarning", "FutureWarning", "kernels"):
        assert noise not in p.stderr, (noise, p.stderr[-2000:])
    assert "wrote 4 blocks" in p.stderr  # lpt's own messages stay (the first command was not --quiet)


# emulates what bitsandbytes does when it is imported on a CPU with AVX512-BF16 and no `kernels` package
NOISY_IMPORT = """import importlib.abc, logging, sys
class Noisy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "bitsandbytes.backends.cpu.ops":
            logging.getLogger(name).warning("Failed to load CPU gemm_4bit_forward from kernels-community: "
                                            "No module named 'kernels'")
        return None
sys.meta_path.insert(0, Noisy())
"""


def test_bitsandbytes_import_warning_shows_only_with_debug(tmp_path, tiny_llama_dir, tiny_calib_dir):
    pytest.importorskip("bitsandbytes")
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(NOISY_IMPORT)
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(probe), _env()["PYTHONPATH"]])}
    args = ["prune", str(tiny_llama_dir), "--calib", str(tiny_calib_dir), "--ratio", "0.3", "--max-steps", "1",
            "--batch-size", "2", "--micro-batch-size", "2", "--8bit", "--int8-backend", "bitsandbytes"]
    quiet = subprocess.run([sys.executable, "-m", "lpt", *args, "-o", str(tmp_path / "a")], capture_output=True,
                           text=True, env=env, timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "gemm_4bit_forward" not in quiet.stderr
    loud = subprocess.run([sys.executable, "-m", "lpt", "--debug", *args, "-o", str(tmp_path / "b")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "gemm_4bit_forward" in loud.stderr  # the emulation works: the warning is there to hide


def _export_recipe(path: Path, model: Path, outtype: str = "q4_1", fallback: str | None = "q8_0") -> Path:
    path.write_text(f"""# lpt run {path.name} -o RUN
run:
  model: {model}
  stages: [prune, slice, export]
prune:
  data: builtin:pydoc:train
  nsamples: 4
  seq_len: 32
  ratio: 0.3
  batch_size: 2
  micro_batch_size: 2
  max_steps: 2
  prune_freq: 1
export:
  outtype: {outtype}
""" + (f"  fallback_outtype: {fallback}\n" if fallback else ""))
    return path


def test_run_refuses_what_export_lacks_before_any_stage_runs(tmp_path, runner, tiny_llama_dir, monkeypatch):
    """No converter, or a quantization without a quantizer and no fallback: one line before the prune runs."""
    from lpt import llamacpp

    monkeypatch.setattr(llamacpp, "find_quantizer", lambda spec=None: None)
    r = invoke(runner, ["run", _export_recipe(tmp_path / "q.yaml", tiny_llama_dir, "q4_k_m", None), "-o",
                        tmp_path / "q"])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "stage export: --outtype q4_k_m" in lines[0], r.output
    assert "--fallback-outtype q8_0" in lines[0] and not (tmp_path / "q" / "prune").exists()
    monkeypatch.setattr(llamacpp, "find_converter", lambda spec=None: None)
    r = invoke(runner, ["run", _export_recipe(tmp_path / "c.yaml", tiny_llama_dir), "-o", tmp_path / "c"])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and "stage export: GGUF export needs llama.cpp's converter" in lines[-1], r.output
    assert lines[-1].endswith("(nothing was run)")
    assert not (tmp_path / "c" / "prune").exists()


def test_report_compares_files_of_the_same_format_and_type(tmp_path):
    """The report's size rows: the source and the exported GGUF side by side only at the same type, safetensors at
    the pruned dtype (the dense size computed from its parameters when the source is a GGUF file)."""
    from gguf import LlamaFileType
    from test_models_arch import _gguf_with_type

    from lpt import report

    src = _gguf_with_type(tmp_path / "src.gguf", LlamaFileType.MOSTLY_Q4_1)
    same = _gguf_with_type(tmp_path / "pruned-q4_1.gguf", LlamaFileType.MOSTLY_Q4_1)
    other = _gguf_with_type(tmp_path / "pruned-q8_0.gguf", LlamaFileType.MOSTLY_Q8_0)
    sliced = tmp_path / "slice"
    sliced.mkdir()
    (sliced / "model.safetensors").write_bytes(b"\0" * 3000)
    prov = {"dtype": "bfloat16", "dtype_reason": "auto: the GGUF source is quantized (Q4_1)",
            "params": {"before": 2000, "after": 1500}}
    rows, notes = report.file_sizes(src, sliced, prov, same)
    assert [r[0] for r in rows] == ["GGUF file, Q4_1", "safetensors, bfloat16"]
    assert rows[0][1][0] == report.fmt_bytes(src.stat().st_size) and rows[0][1][1] != "-"
    assert rows[1][1] == [f"{report.fmt_bytes(4000)} (computed)", report.fmt_bytes(3000)]
    assert any("2,000 parameters x 2 bytes" in n for n in notes) and any("quantized (Q4_1)" in n for n in notes)
    assert "both Q4_1" in report.final_artifact(src, same)
    rows, notes = report.file_sizes(src, sliced, prov, other, "no quantizer: q8_0")
    assert [r[0] for r in rows][:2] == ["GGUF file, Q4_1", "GGUF file, Q8_0"]
    assert rows[0][1][1] == "-" and rows[1][1][0] == "-"
    assert any("not the same type" in n and "no quantizer: q8_0" in n for n in notes)
    assert "not the same type" in report.final_artifact(src, other)
