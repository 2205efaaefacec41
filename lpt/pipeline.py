"""``lpt run``: the stages a recipe names, each into ``RUN_DIR/<stage>/`` exactly as its own command writes it.

The plan (:func:`plan`) turns a :class:`~lpt.config.RunConfig` into steps, each a stage config as ``lpt <stage>``
would build it from the recipe -- defaults < the recipe's section < ``--set`` overrides -- plus what the run fixes:
the model, the output under RUN_DIR and the outputs of earlier steps as inputs::

    calibrate    RUN_DIR/calibrate/          lpt calibrate MODEL --recipe R
    prune        RUN_DIR/prune/              lpt prune MODEL --recipe R [--calib RUN_DIR/calibrate] --save-every N
    slice        RUN_DIR/slice/              lpt slice MODEL --masks RUN_DIR/prune/masks.json --adapter RUN_DIR/prune
                                             --merge [--reconstruct RUN_DIR/calibrate]
    eval-dense   RUN_DIR/eval/dense.json     lpt eval MODEL --recipe R --label dense
    eval-pruned  RUN_DIR/eval/pruned.json    lpt eval RUN_DIR/slice --recipe R --label pruned
    export       RUN_DIR/export/pruned-T.gguf  lpt export RUN_DIR/slice --gguf --recipe R  (T: --outtype, or
                                             --fallback-outtype when it needs llama.cpp's quantizer and none is
                                             installed: decided before any stage runs, with a note)
    bench        RUN_DIR/bench/bench.json    lpt bench runtime MODEL RUN_DIR/slice --label dense --label pruned

prune trains on RUN_DIR/calibrate when the recipe's calibrate section makes exactly the blocks prune would make
from its own data settings (the same blocks, read once); otherwise it calibrates inline, as ``lpt prune`` does.

:func:`execute` runs the steps with stage functions handed in by the caller (the CLI passes
``lpt.stages.<stage>.run``; this module imports no stage). ``RUN_DIR/run.json`` records every step's resolved
config, the fingerprints of the outputs it read and wrote, and a hash of both. A rerun skips a step whose hash and
output are unchanged, resumes an interrupted prune from its checkpoint, and reruns a step whose config changed (and,
through the fingerprints, every step that reads its output), saying why each time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from lpt import artifacts, llamacpp
from lpt.artifacts import RUN_KIND, RUN_SCHEMA, RUN_STATE
from lpt.config import (RUN_STAGES, STAGE_CONFIGS, CalibrateConfig, DataOptions, PruneConfig, RunConfig, build,
                        field_names, load_recipe, parse_setting)
from lpt.errors import LptError

SAVE_EVERY = 10  # prune checkpoints every N steps under lpt run unless the recipe or --set says otherwise
SECTIONS: dict[str, type] = {s: STAGE_CONFIGS[s] for s in RUN_STAGES}  # the stage configs --set can reach
NOT_HASHED = ("output", "overwrite", "resume", "save_every")  # change where or how often, not what is written
RUN_DIR_MARK = "$RUN_DIR"


@dataclass
class Step:
    name: str  # calibrate, prune, slice, eval-dense, eval-pruned, export, bench
    stage: str  # the stage function that runs it (a key of the runners)
    config: Any  # the stage's config dataclass
    needs: tuple[str, ...] = ()  # steps whose outputs it reads
    model: str | None = None  # the run's model, when the step reads it (its fingerprint is then an input)
    note: str | None = None  # what lpt run decided for the user (said before running, kept in run.json)

    @property
    def output(self) -> Path:
        return Path(self.config.output)


# ------------------------------------------------------------------------------------------------ overrides
def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``STAGE.KEY=VALUE`` strings -> {stage: {key: value}}, keys checked against the stage's config fields and
    values converted to the field's type. STAGE ``*`` sets KEY in every stage config that has it."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        where = f"--set {item}"
        name, eq, text = item.partition("=")
        stage, dot, key = name.strip().partition(".")
        key = key.strip().replace("-", "_")
        if not eq or not dot or not key:
            raise LptError(f"{where}: expected STAGE.KEY=VALUE (e.g. --set prune.ratio=0.3)")
        if stage == "*":
            targets = [s for s, cls in SECTIONS.items() if key in field_names(cls)]
            if not targets:
                raise LptError(f"{where}: no stage has a setting '{key}'")
        elif stage in SECTIONS:
            if key not in field_names(SECTIONS[stage]):
                raise LptError(f"{where}: {stage} has no setting '{key}' (valid: "
                               f"{', '.join(sorted(field_names(SECTIONS[stage])))})")
            targets = [stage]
        else:
            raise LptError(f"{where}: unknown stage '{stage}' (use {', '.join(SECTIONS)} or *; the run's own "
                           f"settings are flags: --model, --stages, --reconstruct)")
        for s in targets:
            out.setdefault(s, {})[key] = parse_setting(SECTIONS[s], key, text, where)
    return out


# ------------------------------------------------------------------------------------------------ the plan
def _section(recipe: str | None, stage: str) -> dict[str, Any]:
    if not recipe:
        return {}
    section = load_recipe(recipe, stage)
    if stage == "bench":  # lpt bench runtime reads bench: runtime:
        section = section.get("runtime", {}) or {}
        section = {str(k).replace("-", "_"): v for k, v in section.items()}
    return section


def _config(cls: type, stage: str, cfg: RunConfig, overrides: Mapping[str, Mapping[str, Any]],
            fixed: dict[str, Any]) -> Any:
    """defaults < recipe section < --set < what the run fixes (model, outputs, inputs)."""
    mine = dict(overrides.get(stage, {}))
    clash = sorted(k for k in mine if k in fixed)
    if clash:
        raise LptError(f"--set {stage}.{clash[0]}: set by lpt run ({fixed[clash[0]]}); choose the run directory "
                       f"with -o and the model with --model")
    values = {**mine, **fixed}
    try:
        return build(cls, values, set(values), _section(cfg.recipe, stage),
                     recipe_label=f"recipe {cfg.recipe}, section {stage}")
    except LptError as e:
        if str(e).startswith(f"recipe {cfg.recipe}"):
            raise
        raise LptError(f"recipe {cfg.recipe}, section {stage}: {e}") from None


def same_blocks(calib: CalibrateConfig, prune: PruneConfig) -> bool:
    """Whether ``calib`` writes exactly the blocks ``prune`` would build inline from its own data settings."""
    if prune.calib or prune.data is None or calib.val_fraction:
        return False
    keys = [f.name for f in dataclasses.fields(DataOptions) if f.name != "val_fraction"]
    keys += ["model", "revision", "trust_remote_code"]
    return all(getattr(calib, k) == getattr(prune, k) for k in keys)


NEEDS = {"slice": "prune", "export": "slice", "bench": "prune", "eval": "prune"}  # stage -> the stage it reads


def plan(cfg: RunConfig) -> list[Step]:
    """The steps of a run, their configs resolved; nothing is read but the recipe."""
    stages = _stages(cfg)
    planner = _Planner(cfg, parse_overrides(cfg.overrides))
    for stage in RUN_STAGES:
        if stage in stages:
            getattr(planner, f"plan_{stage}")()
    return planner.steps


def _stages(cfg: RunConfig) -> list[str]:
    """The run's stages (recipe run: stages, or --stages), checked: known, and with the stages they read."""
    if not cfg.recipe:
        raise LptError("RECIPE is required (e.g. lpt run recipes/smollm2-135m-20.yaml -o runs/smollm2-20)")
    names = cfg.stages.split(",") if isinstance(cfg.stages, str) else list(cfg.stages or [])
    stages = list(dict.fromkeys(str(s).strip() for s in names if str(s).strip()))
    bad = [s for s in stages if s not in RUN_STAGES]
    if bad:
        raise LptError(f"unknown stage '{bad[0]}' in the run's stages (use {', '.join(RUN_STAGES)})")
    if not stages:
        raise LptError("the run names no stages (recipe run: stages:, or --stages)")
    for s in stages:
        if s in NEEDS and NEEDS[s] not in stages:
            raise LptError(f"stage {s} needs stage {NEEDS[s]} in the same run")
    if cfg.reconstruct and "calibrate" not in stages:
        raise LptError("--reconstruct refits on RUN_DIR/calibrate: add the calibrate stage")
    if cfg.reconstruct and "slice" not in stages:
        raise LptError("--reconstruct happens while slicing: add the slice stage")
    return stages


class _Planner:
    """Adds the steps of each stage in order (``plan_<stage>``), each config resolved as :func:`_config` does, with
    what the run fixes: the model, the outputs under RUN_DIR and the outputs of earlier steps as inputs."""

    def __init__(self, cfg: RunConfig, overrides: Mapping[str, Mapping[str, Any]]):
        self.cfg, self.overrides, self.steps = cfg, overrides, []
        self.run_dir, self.model = Path(cfg.output), cfg.model
        self.calib_dir, self.prune_dir = str(self.run_dir / "calibrate"), self.run_dir / "prune"
        self.pruned: str | None = None  # the sliced model, once slice is planned (else prune's unmerged output)
        self.pruned_needs: tuple[str, ...] = ("prune",)

    def config(self, stage: str, fixed: dict[str, Any]) -> Any:
        return _config(SECTIONS[stage], stage, self.cfg, self.overrides, fixed)

    def add(self, name: str, stage: str, fixed: dict[str, Any], needs: tuple[str, ...] = (),
            reads_model: bool = True) -> None:
        self.steps.append(Step(name, stage, self.config(stage, fixed), needs, self.model if reads_model else None))

    def plan_calibrate(self) -> None:
        self.add("calibrate", "calibrate", {"model": self.model, "output": self.calib_dir, "overwrite": True})

    def plan_prune(self) -> None:
        prune = self.config("prune", {"model": self.model, "output": str(self.prune_dir), "overwrite": True})
        if not prune.save_every:
            prune.save_every = SAVE_EVERY
        needs: tuple[str, ...] = ()
        if self.steps and self.steps[0].name == "calibrate" and same_blocks(self.steps[0].config, prune):
            prune.calib, needs = self.calib_dir, ("calibrate",)  # the same blocks: read, not built again
        self.steps.append(Step("prune", "prune", prune, needs, self.model))

    def plan_slice(self) -> None:
        fixed = {"model": self.model, "masks": str(self.prune_dir / artifacts.MASKS), "adapter": str(self.prune_dir),
                 "merge": True, "output": str(self.run_dir / "slice"), "overwrite": True}
        if self.cfg.reconstruct:
            fixed["reconstruct"] = self.calib_dir
        self.add("slice", "slice", fixed, ("prune", "calibrate") if self.cfg.reconstruct else ("prune",))
        self.pruned, self.pruned_needs = str(self.run_dir / "slice"), ("slice",)

    def plan_eval(self) -> None:
        none = {"adapter": None, "masks": None, "overwrite": True}
        self.add("eval-dense", "eval", {"model": self.model, "label": "dense", **none,
                                        "output": str(self.run_dir / artifacts.RUN_EVAL_DENSE)})
        unmerged = {} if self.pruned else {"adapter": str(self.prune_dir),
                                           "masks": str(self.prune_dir / artifacts.MASKS)}
        self.add("eval-pruned", "eval", {"model": self.pruned or self.model, "label": "pruned", **none, **unmerged,
                                         "output": str(self.run_dir / artifacts.RUN_EVAL_PRUNED)},
                 self.pruned_needs, reads_model=not self.pruned)
        for s in self.steps[-2:]:
            if not s.config.ppl and not s.config.tasks:
                raise LptError("stage eval has nothing to evaluate: give the recipe an eval: section with ppl: "
                               "and/or tasks: (or --ppl SOURCE)")

    def plan_export(self) -> None:
        asked = self.config("export", {})
        # --fallback-outtype is decided here, before any stage runs: the file is named by what it will hold, and a
        # quantization without a quantizer (and no fallback) is refused now rather than after the prune
        try:
            outtype, note = llamacpp.resolve_outtype(asked.outtype, asked.fallback_outtype, asked.quantizer)
        except LptError as e:
            raise LptError(f"stage export: {e}") from None
        self.add("export", "export", {"model": self.pruned, "gguf": True, "overwrite": True,
                                      "output": str(self.run_dir / artifacts.RUN_EXPORT.format(outtype=outtype))},
                 ("slice",), reads_model=False)
        self.steps[-1].config.outtype, self.steps[-1].note = outtype, note

    def plan_bench(self) -> None:
        unmerged = [str(self.prune_dir), str(self.prune_dir / artifacts.MASKS)]
        adapters, masks = (["-", "-"], ["-", "-"]) if self.pruned else (["-", unmerged[0]], ["-", unmerged[1]])
        self.add("bench", "bench", {"models": [self.model, self.pruned or self.model], "adapter": adapters,
                                    "masks": masks, "label": ["dense", "pruned"], "random_init": [],
                                    "output": str(self.run_dir / artifacts.RUN_BENCH), "overwrite": True},
                 self.pruned_needs)


# ------------------------------------------------------------------------------------------------ state
def fingerprint(path: str | Path) -> str | None:
    """A cheap identity of a file or directory: names, sizes and modification times of its files (None: absent)."""
    p = Path(path)
    if not p.exists():
        return None
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if f != p else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def model_fingerprint(model: str) -> str | None:
    """:func:`fingerprint` of a local model (a directory: its config, weight and tokenizer files; a .gguf file, or
    the alias naming one); None for a hub id (the hub revision names its weights) or a model that does not
    resolve."""
    from lpt import models

    try:
        ref = models.resolve(model)
    except LptError:
        return None
    if not ref.local:
        return None
    return fingerprint(Path(ref.path) / ref.gguf_file if ref.gguf_file else Path(ref.path))


def resolved(step: Step, run_dir: Path) -> dict[str, Any]:
    """The step's config as recorded: paths inside RUN_DIR written relative to it, so the record survives a move."""
    prefix = str(run_dir)

    def rel(v: Any) -> Any:
        if isinstance(v, str) and (v == prefix or v.startswith(prefix + os.sep)):
            return RUN_DIR_MARK + v[len(prefix):]
        if isinstance(v, list):
            return [rel(x) for x in v]
        return v

    return {k: rel(v) for k, v in dataclasses.asdict(step.config).items()}


def step_key(step: Step, config: Mapping[str, Any], inputs: Mapping[str, str | None]) -> str:
    """The hash a finished step is recognised by: its config (minus where and how often it writes) and what it read."""
    doc = {"stage": step.stage, "config": {k: v for k, v in config.items() if k not in NOT_HASHED},
           "inputs": dict(inputs)}
    return artifacts.sha256_text(json.dumps(doc, sort_keys=True, default=str))[:16]


STEP_RECORD = {"stage": str, "output": str, "status": str, "key": str, "config": dict, "inputs": dict,
               "fingerprint": (str, type(None)), "seconds": (float, type(None)), "resumed": bool, "in_plan": bool,
               "reason": str, "started": str, "finished": (str, type(None)),
               "note": str}  # run.json: steps.NAME's fields


def load_state(run_dir: Path) -> dict[str, Any]:
    """``RUN_DIR/run.json`` (a new record when there is none); anything but an lpt run record is one line naming
    it."""
    path = run_dir / RUN_STATE
    if not path.exists():
        return {"schema_version": RUN_SCHEMA, "kind": RUN_KIND, "steps": {}}
    doc = artifacts.read_object(path, "lpt run record")
    if doc.get("kind") != RUN_KIND:
        raise LptError(f"{path} is not an lpt run record; choose another -o")
    if doc.get("schema_version") != RUN_SCHEMA:
        raise LptError(f"{path}: unsupported run record schema_version {doc.get('schema_version')}")
    artifacts.check_types(doc, path, {"steps": dict, "stages": list, "last_actions": dict})
    for name, rec in doc.get("steps", {}).items():
        if not isinstance(rec, dict):
            raise LptError(f"{path}: 'steps.{name}' must be an object, not {artifacts.json_type(rec)}")
        artifacts.check_types(rec, path, STEP_RECORD, where=f"steps.{name}.")
    return doc


def save_state(run_dir: Path, state: dict[str, Any]) -> None:
    with artifacts.atomic_file(run_dir / RUN_STATE, overwrite=True) as tmp:
        artifacts.write_json(tmp, state)


# ------------------------------------------------------------------------------------------------ decisions
@dataclass
class Decision:
    run: bool
    reason: str
    resume: bool = False
    key: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str | None] = field(default_factory=dict)  # what the step reads: fingerprints by name


def _changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(k for k in set(old) | set(new) if k not in NOT_HASHED and old.get(k) != new.get(k))
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys]


def decide(step: Step, run_dir: Path, state: Mapping[str, Any], changed: set[str]) -> Decision:
    """Skip, run or resume ``step``, and why. ``changed``: steps that will run before it (dry runs)."""
    config = resolved(step, run_dir)
    records = state.get("steps", {})
    inputs = {n: (records.get(n) or {}).get("fingerprint") for n in step.needs}
    if step.model is not None:  # a model directory replaced in place reruns every step that reads it
        inputs["model"] = model_fingerprint(step.model)
    key = step_key(step, config, inputs)
    rec = records.get(step.name)

    def decision(run: bool, reason: str, resume: bool = False) -> Decision:
        return Decision(run, reason, resume, key, config, inputs)

    upstream = [n for n in step.needs if n in changed]
    if upstream:
        return decision(True, f"{' and '.join(upstream)} will change")
    if rec is None:
        return decision(True, "not run yet")
    if rec.get("status") != "done":
        ckpt = artifacts.work_dir(step.output) / artifacts.CHECKPOINT_DIR
        if step.stage == "prune" and rec.get("key") == key and (ckpt / artifacts.CHECKPOINT_META).is_file():
            try:
                meta = artifacts.read_object(ckpt / artifacts.CHECKPOINT_META, "checkpoint record")
            except LptError as e:
                return decision(True, f"interrupted; its checkpoint does not read ({e}), so it starts again")
            return decision(True, f"interrupted; resuming from its checkpoint at step {meta.get('step')}", True)
        return decision(True, "interrupted" if rec.get("status") == "running" else f"{rec.get('status')} last time")
    if rec.get("key") != key:
        diff = _changes(rec.get("config", {}), config)
        if diff:
            return decision(True, "changed: " + ", ".join(diff))
        moved = [n for n in inputs if (rec.get("inputs") or {}).get(n) != inputs[n]]
        return decision(True, f"{' and '.join(moved) or 'its input'} changed")
    now = fingerprint(step.output)
    if now is None:
        return decision(True, "its output is missing")
    if now != rec.get("fingerprint"):
        return decision(True, "its output changed since lpt run wrote it")
    return decision(False, "up to date")


# ------------------------------------------------------------------------------------------------ running
def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Outcome:
    run_dir: Path
    state: dict[str, Any]
    actions: dict[str, str]  # step -> ran / resumed / skipped / planned
    report: Path | None


def execute(cfg: RunConfig, runners: Mapping[str, Callable[[Any], Any]],
            say: Callable[[str], None] = lambda s: None,
            write_report: Callable[[Path, dict[str, Any]], Path] | None = None,
            validators: Mapping[str, Callable[[Any], Any]] | None = None) -> Outcome:
    """Run (or, with ``cfg.dry_run``, only decide) every step of :func:`plan`; ``runners`` maps a stage name to
    its ``run(config) -> Path``, ``validators`` to its ``validate(config)``: every step is checked (:func:`check`)
    before the first one runs, in dry runs too. ``write_report(run_dir, state)`` is called when anything ran (or
    no report exists).

    The run holds RUN_DIR's lock (``artifacts.output_lock``) throughout, and each step its output's while it first
    removes what killed runs left next to it (``artifacts.remove_stale_partials``) and then runs."""
    steps = plan(cfg)
    missing = sorted({s.stage for s in steps} - set(runners))
    if missing:
        raise LptError(f"no runner for stage(s) {', '.join(missing)}")
    run_dir = _check_run_dir(Path(cfg.output))
    check(cfg, steps, validators or {}, _will_run(steps, run_dir))
    for step in steps:
        if step.note:
            say(f"{step.name}: {step.note}")
    if cfg.dry_run:
        return _dry_run(steps, run_dir, say)
    with artifacts.output_lock(run_dir):
        state = load_state(run_dir)
        preflight(steps, run_dir, state)
        run_dir.mkdir(parents=True, exist_ok=True)
        state = _start(cfg, steps, run_dir, state)
        t_all = time.perf_counter()
        actions = {step.name: _run_step(step, f"{i}/{len(steps)}", run_dir, state, runners[step.stage], say)
                   for i, step in enumerate(steps, 1)}
        report = _finish(run_dir, state, actions, time.perf_counter() - t_all, write_report)
    return Outcome(run_dir, state, actions, report)


def check(cfg: RunConfig, steps: list[Step], validators: Mapping[str, Callable[[Any], Any]],
          will_run: set[str] | None = None) -> None:
    """Everything about the run that can be refused before its first step runs: the model resolves, the stages fit
    together, and the config of every step that will run (``will_run``; default: all) passes its stage's
    ``validate`` -- the settings of slice, eval, export and bench are checked before a long prune, not when their
    turn comes. Inputs that earlier steps will write (masks, the adapter, the sliced model) do not exist yet: while
    a step is checked they are stood in for by empty placeholders in a temporary directory (a directory with an
    empty ``config.json`` for a model)."""
    import tempfile

    from lpt import models

    models.resolve(cfg.model)
    prune = next((s.config for s in steps if s.stage == "prune"), None)
    if prune is not None and any(s.stage == "export" for s in steps) and (prune.layout != "uniform"
                                                                          or prune.skip_layers):
        raise LptError("stage export needs a model with the same widths in every layer, but prune makes per-layer "
                       "widths (--layout per-layer or --skip-layers); GGUF cannot describe them: drop export from "
                       "the stages or prune with --layout uniform")
    run_dir = Path(cfg.output)
    with tempfile.TemporaryDirectory(prefix="lpt-run-check-") as tmp:
        written: list[Path] = []  # outputs of the steps checked so far
        for step in steps:
            validate = validators.get(step.stage)
            if validate is not None and (will_run is None or step.name in will_run):
                config = _stand_ins(step.config, written, run_dir, Path(tmp))
                try:
                    validate(config)
                except LptError as e:
                    raise LptError(f"stage {step.name}: {e} (nothing was run)") from None
            written.append(step.output)


def _will_run(steps: list[Step], run_dir: Path) -> set[str]:
    """The steps a run would run (what a dry run says), from RUN_DIR's run.json."""
    state = load_state(run_dir) if run_dir.is_dir() else {"steps": {}}
    changed: set[str] = set()
    for step in steps:
        if decide(step, run_dir, state, changed).run:
            changed.add(step.name)
    return changed


def _stand_ins(config: Any, written: list[Path], run_dir: Path, tmp: Path) -> Any:
    """A copy of ``config`` whose paths into ``written`` outputs point at placeholders under ``tmp``."""
    def stand_in(value: Any) -> Any:
        if isinstance(value, list):
            return [stand_in(v) for v in value]
        if not isinstance(value, str) or not value:
            return value
        p = Path(value)
        out = next((w for w in written if p == w or w in p.parents), None)
        if out is None:
            return value
        where = tmp / p.relative_to(run_dir) if run_dir in p.parents else tmp / p.name
        if p == out:  # an output directory: a model directory as far as a check can tell
            where.mkdir(parents=True, exist_ok=True)
            (where / "config.json").write_text("{}")
        else:  # a file inside one (masks.json)
            where.parent.mkdir(parents=True, exist_ok=True)
            where.touch()
        return str(where)

    return dataclasses.replace(config, **{f.name: stand_in(getattr(config, f.name))
                                          for f in dataclasses.fields(config) if f.name != "output"})


def _check_run_dir(run_dir: Path) -> Path:
    """Refuse an -o that is a file, or a directory lpt run did not make."""
    if run_dir.exists() and not run_dir.is_dir():
        raise LptError(f"output {run_dir} exists and is not a directory")
    names = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    if names - {artifacts.LEGACY_RUN_LOCK} and RUN_STATE not in names:
        raise LptError(f"output {run_dir} exists and is not an lpt run directory (no {RUN_STATE}); choose another -o")
    return run_dir


def _dry_run(steps: list[Step], run_dir: Path, say: Callable[[str], None]) -> Outcome:
    """Say what each step would do and why; nothing is written."""
    state = load_state(run_dir) if run_dir.is_dir() else {"steps": {}}
    changed: set[str] = set()
    actions: dict[str, str] = {}
    for i, step in enumerate(steps, 1):
        d = decide(step, run_dir, state, changed)
        if d.run:
            changed.add(step.name)
        actions[step.name] = "would resume" if d.resume else ("would run" if d.run else "would skip")
        say(f"{i}/{len(steps)} {step.name}: {actions[step.name]} ({d.reason}) -> {step.output}")
    return Outcome(run_dir, state, actions, None)


def _start(cfg: RunConfig, steps: list[Step], run_dir: Path, state: dict[str, Any]) -> dict[str, Any]:
    """run.json as this run begins (``state``: as read): the run's settings, earlier steps no longer planned marked
    so."""
    import lpt

    state.update(recipe=cfg.recipe, recipe_sha256=_file_hash(cfg.recipe), model=cfg.model,
                 model_fingerprint=model_fingerprint(cfg.model),
                 stages=[s.name for s in steps], reconstruct=cfg.reconstruct, command=cfg.command,
                 lpt_version=lpt.__version__, started=_now(), finished=None)
    state.setdefault("created", state["started"])
    records = state.setdefault("steps", {})
    for name in [n for n in records if n not in {s.name for s in steps}]:
        records[name]["in_plan"] = False  # kept (its output too), not part of this run's report
    save_state(run_dir, state)
    return state


def _run_step(step: Step, where: str, run_dir: Path, state: dict[str, Any], runner: Callable[[Any], Any],
              say: Callable[[str], None]) -> str:
    """Skip, run or resume one step, recording it in run.json before and after; returns the action."""
    records = state["steps"]
    d = decide(step, run_dir, state, set())
    if not d.run:
        records[step.name]["in_plan"] = True
        say(f"{where} {step.name}: up to date, skipped ({step.output})")
        return "skipped"
    say(f"{where} {step.name}: {'resuming' if d.resume else 'running'} ({d.reason}) -> {step.output}")
    if step.stage == "prune":
        step.config.resume = d.resume
    rec = {"stage": step.stage, "output": str(step.output), "config": d.config, "key": d.key,
           "inputs": d.inputs, "status": "running", "started": _now(), "resumed": d.resume, "reason": d.reason,
           "in_plan": True}
    if step.note:
        rec["note"] = step.note
    records[step.name] = rec
    save_state(run_dir, state)
    t0 = time.perf_counter()
    try:
        with artifacts.output_lock(step.output):
            artifacts.remove_stale_partials(step.output)
            runner(step.config)
    except BaseException as e:
        rec["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        save_state(run_dir, state)
        raise
    rec.update(status="done", seconds=round(time.perf_counter() - t0, 1), finished=_now(),
               fingerprint=fingerprint(step.output))
    save_state(run_dir, state)
    return "resumed" if d.resume else "ran"


def _finish(run_dir: Path, state: dict[str, Any], actions: dict[str, str], seconds: float,
            write_report: Callable[[Path, dict[str, Any]], Path] | None) -> Path | None:
    """run.json closed, and the report written when anything ran (or there is none yet)."""
    state["finished"] = _now()
    state["last_actions"] = actions
    ran = any(a != "skipped" for a in actions.values())
    if ran:
        state["wall_seconds"] = round(seconds, 1)
    report = None
    if write_report is not None and (ran or not (run_dir / artifacts.REPORT_MD).is_file()):
        report = write_report(run_dir, state)
    save_state(run_dir, state)
    return report


def preflight(steps: list[Step], run_dir: Path, state: Mapping[str, Any]) -> None:
    """What a step that will run needs and can be checked before the first one runs: llama.cpp's converter for
    export (else the run would fail after the prune)."""
    changed: set[str] = set()
    for step in steps:
        d = decide(step, run_dir, state, changed)
        if not d.run:
            continue
        changed.add(step.name)
        if step.stage == "export" and llamacpp.find_converter(step.config.converter) is None:
            raise LptError(f"stage export needs llama.cpp's converter, which is not installed: "
                           f"{llamacpp.CONVERTER_INSTALL} (or leave export out of the run's stages: --stages)")


def _file_hash(path: str | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
