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

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from lpt import artifacts, llamacpp
from lpt.config import (RUN_STAGES, BenchRuntimeConfig, CalibrateConfig, DataOptions, EvalConfig, ExportConfig,
                        PruneConfig, RunConfig, SliceConfig, build, field_names, load_recipe, parse_setting)
from lpt.errors import LptError

RUN_STATE = "run.json"
RUN_SCHEMA = 1
RUN_KIND = "lpt-run"
SAVE_EVERY = 10  # prune checkpoints every N steps under lpt run unless the recipe or --set says otherwise
SECTIONS: dict[str, type] = {"calibrate": CalibrateConfig, "prune": PruneConfig, "slice": SliceConfig,
                             "eval": EvalConfig, "export": ExportConfig, "bench": BenchRuntimeConfig}
NOT_HASHED = ("output", "overwrite", "resume", "save_every")  # change where or how often, not what is written
RUN_DIR_MARK = "$RUN_DIR"
REPORT_MD, REPORT_HTML = "report.md", "report.html"


@dataclass
class Step:
    name: str  # calibrate, prune, slice, eval-dense, eval-pruned, export, bench
    stage: str  # the stage function that runs it (a key of the runners)
    config: Any  # the stage's config dataclass
    needs: tuple[str, ...] = ()  # steps whose outputs it reads
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


def plan(cfg: RunConfig) -> list[Step]:
    """The steps of a run, their configs resolved; nothing is read but the recipe."""
    if not cfg.recipe:
        raise LptError("RECIPE is required (e.g. lpt run recipes/smollm2-135m-20.yaml -o runs/smollm2-20)")
    names = cfg.stages.split(",") if isinstance(cfg.stages, str) else list(cfg.stages or [])
    stages = list(dict.fromkeys(str(s).strip() for s in names if str(s).strip()))
    bad = [s for s in stages if s not in RUN_STAGES]
    if bad:
        raise LptError(f"unknown stage '{bad[0]}' in the run's stages (use {', '.join(RUN_STAGES)})")
    if not stages:
        raise LptError("the run names no stages (recipe run: stages:, or --stages)")
    need = {"slice": "prune", "export": "slice", "bench": "prune", "eval": "prune"}
    for s in stages:
        if s in need and need[s] not in stages:
            raise LptError(f"stage {s} needs stage {need[s]} in the same run")
    if cfg.reconstruct and "calibrate" not in stages:
        raise LptError("--reconstruct refits on RUN_DIR/calibrate: add the calibrate stage")
    if cfg.reconstruct and "slice" not in stages:
        raise LptError("--reconstruct happens while slicing: add the slice stage")
    over = parse_overrides(cfg.overrides)
    run_dir = Path(cfg.output)
    model = cfg.model
    steps: list[Step] = []

    def add(name, stage, cls, fixed, needs=()):
        steps.append(Step(name, stage, _config(cls, stage, cfg, over, fixed), tuple(needs)))

    calib_dir = str(run_dir / "calibrate")
    if "calibrate" in stages:
        add("calibrate", "calibrate", CalibrateConfig, {"model": model, "output": calib_dir, "overwrite": True})
    if "prune" in stages:
        fixed = {"model": model, "output": str(run_dir / "prune"), "overwrite": True}
        prune_cfg = _config(PruneConfig, "prune", cfg, over, fixed)
        if not prune_cfg.save_every:
            prune_cfg.save_every = SAVE_EVERY
        needs: tuple[str, ...] = ()
        if steps and steps[0].name == "calibrate" and same_blocks(steps[0].config, prune_cfg):
            prune_cfg.calib, needs = calib_dir, ("calibrate",)
        steps.append(Step("prune", "prune", prune_cfg, needs))
    prune_dir = run_dir / "prune"
    pruned, pruned_needs = None, ("prune",)
    if "slice" in stages:
        fixed = {"model": model, "masks": str(prune_dir / artifacts.MASKS), "adapter": str(prune_dir),
                 "merge": True, "output": str(run_dir / "slice"), "overwrite": True}
        if cfg.reconstruct:
            fixed["reconstruct"] = calib_dir
        add("slice", "slice", SliceConfig, fixed, ("prune", "calibrate") if cfg.reconstruct else ("prune",))
        pruned, pruned_needs = str(run_dir / "slice"), ("slice",)
    if "eval" in stages:
        add("eval-dense", "eval", EvalConfig, {"model": model, "label": "dense", "adapter": None, "masks": None,
                                                "output": str(run_dir / "eval" / "dense.json"), "overwrite": True})
        unmerged = {} if pruned else {"adapter": str(prune_dir), "masks": str(prune_dir / artifacts.MASKS)}
        add("eval-pruned", "eval", EvalConfig,
            {"model": pruned or model, "label": "pruned", "adapter": None, "masks": None, **unmerged,
             "output": str(run_dir / "eval" / "pruned.json"), "overwrite": True}, pruned_needs)
        for s in steps[-2:]:
            if not s.config.ppl and not s.config.tasks:
                raise LptError(f"stage eval has nothing to evaluate: give the recipe an eval: section with ppl: "
                               f"and/or tasks: (or --ppl SOURCE)")
    if "export" in stages:
        asked = _config(ExportConfig, "export", cfg, over, {})
        # --fallback-outtype is decided here, before any stage runs: the file is named by what it will hold, and a
        # quantization without a quantizer (and no fallback) is refused now rather than after the prune
        try:
            outtype, note = llamacpp.resolve_outtype(asked.outtype, asked.fallback_outtype, asked.quantizer)
        except LptError as e:
            raise LptError(f"stage export: {e}") from None
        add("export", "export", ExportConfig, {"model": pruned, "gguf": True, "overwrite": True,
                                               "output": str(run_dir / "export" / f"pruned-{outtype}.gguf")},
            ("slice",))
        steps[-1].config.outtype, steps[-1].note = outtype, note
    if "bench" in stages:
        models = [model, pruned or model]
        adapters = ["-", "-"] if pruned else ["-", str(prune_dir)]
        masks = ["-", "-"] if pruned else ["-", str(prune_dir / artifacts.MASKS)]
        add("bench", "bench", BenchRuntimeConfig,
            {"models": models, "adapter": adapters, "masks": masks, "label": ["dense", "pruned"], "random_init": [],
             "output": str(run_dir / "bench" / "bench.json"), "overwrite": True}, pruned_needs)
    return steps


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


def load_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_STATE
    if not path.exists():
        return {"schema_version": RUN_SCHEMA, "kind": RUN_KIND, "steps": {}}
    doc = artifacts.read_json(path)
    if not isinstance(doc, dict) or doc.get("kind") != RUN_KIND:
        raise LptError(f"{path} is not an lpt run record; choose another -o")
    if doc.get("schema_version") != RUN_SCHEMA:
        raise LptError(f"{path}: unsupported run record schema_version {doc.get('schema_version')}")
    return doc


def save_state(run_dir: Path, state: dict[str, Any]) -> None:
    with artifacts.atomic_file(run_dir / RUN_STATE, overwrite=True) as tmp:
        artifacts.write_json(tmp, state)


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """One ``lpt run`` per run directory at a time (the lock goes with the process, also when it is killed)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise LptError(f"another lpt run is using {run_dir}") from None
        yield


# ------------------------------------------------------------------------------------------------ decisions
@dataclass
class Decision:
    run: bool
    reason: str
    resume: bool = False
    key: str = ""
    config: dict[str, Any] = field(default_factory=dict)


def _changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(k for k in set(old) | set(new) if k not in NOT_HASHED and old.get(k) != new.get(k))
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys]


def decide(step: Step, run_dir: Path, state: Mapping[str, Any], changed: set[str]) -> Decision:
    """Skip, run or resume ``step``, and why. ``changed``: steps that will run before it (dry runs)."""
    config = resolved(step, run_dir)
    records = state.get("steps", {})
    inputs = {n: (records.get(n) or {}).get("fingerprint") for n in step.needs}
    key = step_key(step, config, inputs)
    rec = records.get(step.name)
    upstream = [n for n in step.needs if n in changed]
    if upstream:
        return Decision(True, f"{' and '.join(upstream)} will change", key=key, config=config)
    if rec is None:
        return Decision(True, "not run yet", key=key, config=config)
    if rec.get("status") != "done":
        ckpt = artifacts.partial_dir(step.output) / artifacts.CHECKPOINT_DIR
        if step.stage == "prune" and rec.get("key") == key and (ckpt / artifacts.CHECKPOINT_META).is_file():
            meta = artifacts.read_json(ckpt / artifacts.CHECKPOINT_META)
            return Decision(True, f"interrupted; resuming from its checkpoint at step {meta.get('step')}", True,
                            key, config)
        return Decision(True, "interrupted" if rec.get("status") == "running" else f"{rec.get('status')} last time",
                        key=key, config=config)
    if rec.get("key") != key:
        diff = _changes(rec.get("config", {}), config)
        if diff:
            return Decision(True, "changed: " + ", ".join(diff), key=key, config=config)
        moved = [n for n in step.needs if (rec.get("inputs") or {}).get(n) != inputs[n]]
        return Decision(True, f"{' and '.join(moved) or 'its input'} changed", key=key, config=config)
    now = fingerprint(step.output)
    if now is None:
        return Decision(True, "its output is missing", key=key, config=config)
    if now != rec.get("fingerprint"):
        return Decision(True, "its output changed since lpt run wrote it", key=key, config=config)
    return Decision(False, "up to date", key=key, config=config)


# ------------------------------------------------------------------------------------------------ running
def _clean_partials(output: Path) -> None:
    """Temporary siblings a killed stage left (atomic writes: ``.NAME.partial-*``)."""
    if output.parent.is_dir():
        for p in output.parent.glob(f".{output.name}.partial-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


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
            write_report: Callable[[Path, dict[str, Any]], Path] | None = None) -> Outcome:
    """Run (or, with ``cfg.dry_run``, only decide) every step of :func:`plan`; ``runners`` maps a stage name to
    its ``run(config) -> Path``. ``write_report(run_dir, state)`` is called when anything ran (or no report exists)."""
    import lpt

    steps = plan(cfg)
    missing = sorted({s.stage for s in steps} - set(runners))
    if missing:
        raise LptError(f"no runner for stage(s) {', '.join(missing)}")
    run_dir = Path(cfg.output)
    if run_dir.exists() and not run_dir.is_dir():
        raise LptError(f"output {run_dir} exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / RUN_STATE).exists() \
            and set(p.name for p in run_dir.iterdir()) != {".lock"}:
        raise LptError(f"output {run_dir} exists and is not an lpt run directory (no {RUN_STATE}); choose another -o")
    actions: dict[str, str] = {}
    for step in steps:
        if step.note:
            say(f"{step.name}: {step.note}")
    if cfg.dry_run:
        state = load_state(run_dir) if run_dir.is_dir() else {"steps": {}}
        changed: set[str] = set()
        for i, step in enumerate(steps, 1):
            d = decide(step, run_dir, state, changed)
            if d.run:
                changed.add(step.name)
            actions[step.name] = "would resume" if d.resume else ("would run" if d.run else "would skip")
            say(f"{i}/{len(steps)} {step.name}: {actions[step.name]} ({d.reason}) -> {step.output}")
        return Outcome(run_dir, state, actions, None)
    with locked(run_dir):
        state = load_state(run_dir)
        preflight(steps, run_dir, state)
        state.update(recipe=cfg.recipe, recipe_sha256=_file_hash(cfg.recipe), model=cfg.model,
                     stages=[s.name for s in steps], reconstruct=cfg.reconstruct, command=cfg.command,
                     lpt_version=lpt.__version__, started=_now(), finished=None)
        state.setdefault("created", state["started"])
        records = state.setdefault("steps", {})
        for name in [n for n in records if n not in {s.name for s in steps}]:
            records[name]["in_plan"] = False  # kept (its output too), not part of this run's report
        save_state(run_dir, state)
        t_all = time.perf_counter()
        for i, step in enumerate(steps, 1):
            d = decide(step, run_dir, state, set())
            if not d.run:
                actions[step.name] = "skipped"
                records[step.name]["in_plan"] = True
                say(f"{i}/{len(steps)} {step.name}: up to date, skipped ({step.output})")
                continue
            say(f"{i}/{len(steps)} {step.name}: {'resuming' if d.resume else 'running'} ({d.reason}) -> "
                f"{step.output}")
            _clean_partials(step.output)
            if step.stage == "prune":
                step.config.resume = d.resume
            rec = {"stage": step.stage, "output": str(step.output), "config": d.config, "key": d.key,
                   "inputs": {n: records[n].get("fingerprint") for n in step.needs}, "status": "running",
                   "started": _now(), "resumed": d.resume, "reason": d.reason, "in_plan": True}
            if step.note:
                rec["note"] = step.note
            records[step.name] = rec
            save_state(run_dir, state)
            t0 = time.perf_counter()
            try:
                runners[step.stage](step.config)
            except BaseException as e:
                rec["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
                rec["seconds"] = round(time.perf_counter() - t0, 1)
                save_state(run_dir, state)
                raise
            rec.update(status="done", seconds=round(time.perf_counter() - t0, 1), finished=_now(),
                       fingerprint=fingerprint(step.output))
            actions[step.name] = "resumed" if d.resume else "ran"
            save_state(run_dir, state)
        state["finished"] = _now()
        state["last_actions"] = actions
        ran = any(a != "skipped" for a in actions.values())
        if ran:
            state["wall_seconds"] = round(time.perf_counter() - t_all, 1)
        report = None
        if write_report is not None and (ran or not (run_dir / REPORT_MD).is_file()):
            report = write_report(run_dir, state)
        save_state(run_dir, state)
    return Outcome(run_dir, state, actions, report)


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
