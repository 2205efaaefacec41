"""The CLI shell: stages listed, examples in every --help, instant --help, version, recipes."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import invoke

STAGES = ("calibrate", "prune", "merge", "slice", "export", "eval", "bench", "run")
ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_all_stages(runner):
    r = invoke(runner, ["--help"])
    assert r.exit_code == 0
    for s in STAGES:
        assert s in r.output


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_help_has_an_example(runner, stage):
    r = invoke(runner, [stage, "--help"])
    assert r.exit_code == 0
    assert "Example" in r.output and f"lpt {stage}" in r.output


def test_help_does_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; from lpt.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_version_and_module_entry():
    import lpt

    out = subprocess.run([sys.executable, "-m", "lpt", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"lpt {lpt.__version__}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    marker = "<!-- test-command -->"
    assert marker in readme
    block = readme.split(marker, 1)[1].split("```", 2)[1]
    command = [line for line in block.splitlines() if line.strip() and not line.startswith("bash")][0].strip()
    assert command in ci, command


def test_main_command_benchmark_reads_the_readme(runner):
    """benchmarks/main_command.py times the README's main command: every stage parses, every lpt stage's options
    exist, and the recipe it names is there."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("main_command", ROOT / "benchmarks" / "main_command.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    stages = mod.main_command(ROOT / "README.md")
    assert [s[0] for s in stages if s[0] != "pip"] and all(s[0] in ("pip", "lpt") for s in stages)
    lpt_stages = [s for s in stages if s[0] == "lpt"]
    assert [s[1] for s in lpt_stages] == ["run"]  # one command: lpt run RECIPE -o RUN_DIR
    for s in lpt_stages:
        opts = [a.split("=")[0] for a in s[2:] if a.startswith("-")]
        help_text = invoke(runner, [s[1], "--help"]).output
        assert all(o in help_text for o in opts), (s, opts)
    recipe = ROOT / lpt_stages[0][2]
    assert recipe.is_file() and recipe.read_text().startswith(f"# {shlex.join(lpt_stages[0])}\n")
    assert mod.outputs(lpt_stages[0]) == ["runs/smollm2-20"]
    # the report's pictures need matplotlib, the run's final export llama.cpp's converter
    assert ".[report,export]" in " ".join(" ".join(s) for s in stages)


def test_errors_are_one_line_unless_debug(runner, tmp_path):
    r = invoke(runner, ["calibrate", tmp_path / "nope", "-o", tmp_path / "o"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert len([line for line in r.output.splitlines() if line.strip()]) == 1
    r = invoke(runner, ["--debug", "calibrate", tmp_path / "nope", "-o", tmp_path / "o"])
    assert r.exit_code == 2 and "Traceback" in r.output
