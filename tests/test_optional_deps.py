"""The CLI and the paths a bare GPU machine runs (benchmarks/gpu_check.sh) work without the optional packages:
bitsandbytes, datasets, lm-eval and gguf are imported only where they are used."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

OPTIONAL = ("bitsandbytes", "datasets", "lm_eval", "gguf")

# Makes the optional packages look not installed: every finder is asked through a filter that answers None for them,
# so `import x` raises ModuleNotFoundError and importlib.util.find_spec('x') is None, as on a machine without them.
HIDE = textwrap.dedent(f"""
    import sys
    HIDDEN = {OPTIONAL!r}

    class _Hide:
        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                return None
            find = getattr(self.finder, "find_spec", None)
            return find(name, path, target) if find else None

        def __getattr__(self, attr):
            return getattr(self.finder, attr)

    sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
    for _m in [m for m in sys.modules if m.split(".")[0] in HIDDEN]:
        del sys.modules[_m]
""")


def _run(tmp_path, body: str, timeout: int = 600):
    script = tmp_path / "hidden_run.py"
    script.write_text(HIDE + textwrap.dedent(body))
    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    import os

    env = {**os.environ, **env}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_modules_import_without_optional_packages(tmp_path):
    out = _run(tmp_path, """
        import importlib, importlib.util, json
        assert importlib.util.find_spec("bitsandbytes") is None
        for m in ("lpt.cli", "lpt.stages.bench", "lpt.stages.prune", "lpt.stages.calibrate", "lpt.stages.merge",
                  "lpt.stages.slice", "lpt.stages.eval", "lpt.models", "lpt.lora", "lpt.data", "lpt.distributed",
                  "lpt.criteria", "lpt.groups", "lpt.benchmarking.worker"):
            importlib.import_module(m)
        from typer.testing import CliRunner
        from lpt.cli import app
        for args in (["--help"], ["bench", "--help"], ["bench", "runtime", "--help"], ["prune", "--help"]):
            r = CliRunner().invoke(app, args)
            assert r.exit_code == 0, (args, r.output)
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN)))
    """)
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_gpu_check_paths_run_without_optional_packages(tmp_path, tiny_llama_dir):
    """What benchmarks/gpu_check.sh runs, on CPU at a tiny shape: prune-step (lora, vanilla), runtime (dense,
    50% merged, 50% unmerged) and an inline-calibrated prune, none of which may need an optional package."""
    shape = tmp_path / "tiny.json"
    shape.write_text(json.dumps(dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
                                     max_position_embeddings=256, tie_word_embeddings=False)))
    out = _run(tmp_path, f"""
        import json
        from typer.testing import CliRunner
        from lpt.cli import app

        def ok(args):
            r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
            assert r.exit_code == 0, (args, r.output)

        ok(["bench", "prune-step", "--random-init", "{shape}", "--criterion", "lora", "--criterion", "vanilla",
            "--seq-len", 16, "--batch-size", 2, "--trials", 1, "--warmup", 0, "--device", "cpu", "--no-isolate",
            "-o", "step.json"])
        ok(["bench", "runtime", "--random-init", "{shape}", "--random-init", "{shape}@0.5", "--random-init",
            "{shape}@0.5", "--adapter", "-", "--adapter", "-", "--adapter", "random:4", "--seq-len", 16, "--trials", 1,
            "--warmup", 0, "--device", "cpu", "--no-isolate", "-o", "rt.json"])
        ok(["prune", "{tiny_llama_dir}", "--data", "builtin:pydoc:train", "-n", 8, "--seq-len", 32, "--max-steps", 2,
            "--batch-size", 4, "--micro-batch-size", 2, "--ratio", 0.2, "--device", "cpu", "-o", "p"])
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN)))
    """)
    assert json.loads(out.strip().splitlines()[-1]) == []
    assert (tmp_path / "p" / "masks.json").is_file()
    assert len(json.loads((tmp_path / "rt.json").read_text())["results"]) == 3
