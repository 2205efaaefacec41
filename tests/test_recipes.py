"""Every shipped recipe loads, names only real flags, and passes the stage's validation."""

from pathlib import Path

import pytest
import yaml

from lpt.config import CalibrateConfig, PruneConfig, build, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_valid(path):
    from lpt.stages import calibrate, prune

    doc = yaml.safe_load(path.read_text())
    assert path.read_text().startswith("# lpt "), "a recipe opens with the command that uses it"
    if "calibrate" in doc:
        calibrate.validate(build(CalibrateConfig, {}, set(), load_recipe(path, "calibrate")))
    if "prune" in doc:
        cfg = build(PruneConfig, {}, set(), load_recipe(path, "prune"))
        prune.validate(cfg)
        assert cfg.ratio == doc["prune"]["ratio"]
    for stage in doc:
        assert stage in {"run", "calibrate", "prune", "merge", "slice", "eval", "export", "bench"}, stage


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_runs_as_a_whole(path, tmp_path):
    """Every shipped recipe has a run: section whose stages plan (lpt run's configs resolve, eval has sources)."""
    from lpt import pipeline
    from lpt.config import RunConfig

    doc = yaml.safe_load(path.read_text())
    assert "run" in doc and doc["run"]["stages"], "lpt run needs the stages"
    cfg = build(RunConfig, {"recipe": str(path), "output": str(tmp_path / "run")}, {"recipe", "output"},
                load_recipe(path, "run"))
    steps = pipeline.plan(cfg)
    names = [s.name for s in steps]
    assert "eval-dense" in names and "eval-pruned" in names
    if str(doc["run"]["model"]).endswith(".gguf") or doc["run"]["model"] == "smollm2-135m":
        # a GGUF source ends with an export at its type, or the converter's q8_0 with a note without a quantizer
        export = steps[-1]
        assert export.name == "export" and doc["export"]["outtype"] == "q4_1"
        assert export.config.outtype in ("q4_1", "q8_0") and export.output.name == f"pruned-{export.config.outtype}.gguf"
        assert (export.note is None) == (export.config.outtype == "q4_1")
    assert all(str(s.output).startswith(str(tmp_path / "run")) for s in steps)


def test_flags_override_recipe(tmp_path, runner, tiny_llama_dir):
    from conftest import invoke

    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibrate:\n  nsamples: 3\n  seq-len: 16\n  seed: 5\n")
    out = tmp_path / "o"
    r = invoke(runner, ["calibrate", tiny_llama_dir, "--recipe", recipe, "--nsamples", "2", "-o", out])
    assert r.exit_code == 0, r.output
    import json

    meta = json.loads((out / "calib.json").read_text())
    assert (meta["nsamples"], meta["seq_len"], meta["seed"]) == (2, 16, 5)
    recipe.write_text("calibrate:\n  bogus: 1\n")
    r = invoke(runner, ["calibrate", tiny_llama_dir, "--recipe", recipe, "-o", tmp_path / "o2"])
    assert r.exit_code == 2 and "bogus" in r.output


SHAPE_OF = {"meta-llama/Llama-2-7b-hf": "llama-7b", "huggyllama/llama-7b": "llama-7b", "smollm2-135m": "smollm2-135m"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_plans_a_loadable_model(path):
    """The recipe's prune plans against its model's real shape (public config fields, no weights): every candidate
    is a model plain transformers loads (Llama refuses a hidden size that is not a multiple of the kept heads), and
    the widths are multiples of the recipe's --round-to."""
    from lpt import budget
    from lpt.arch import describe
    from lpt.benchmarking.shapes import make_config, parse_shape
    from lpt.config import resolved

    doc = yaml.safe_load(path.read_text())
    arch = describe(make_config(parse_shape(SHAPE_OF[doc["run"]["model"]])))
    cfg = resolved(build(PruneConfig, {}, set(), load_recipe(path, "prune")))
    plan = budget.plan(cfg, arch)  # raises (one line) for a budget transformers would refuse to load
    assert plan.candidates
    for c in plan.candidates:
        assert budget.loadable(arch, cfg.gqa, c)
        assert (arch.intermediate_size - c.channels) % plan.round_to == 0 or c.channels == 0
