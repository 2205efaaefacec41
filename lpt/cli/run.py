"""``lpt run``."""

from __future__ import annotations

import shlex
import sys
from typing import List

import typer

from lpt.cli._common import OUTPUT, PRUNE, TRAIN, make_config, opt, run_stage
from lpt.config import RunConfig as C

EPILOG = """[b]Examples[/b]
  lpt run recipes/smollm2-135m-20.yaml -o runs/smollm2-20
  lpt run recipes/smollm2-135m-20.yaml -o runs/smollm2-20 --ratio 0.3            (reruns prune and what follows)
  lpt run recipes/smollm2-135m-20.yaml -o runs/smollm2-20 --set slice.reconstruct-damp=0.05 --dry-run
  lpt run recipes/smollm2-135m.yaml -o runs/smollm2-50 --stages calibrate,prune,slice,eval,bench
  lpt run recipes/llama-7b-20.yaml -o runs/llama7b-20 --model huggyllama/llama-7b --set '*.device=cuda'
  OUT=$(lpt run recipes/smollm2-135m-20.yaml -o runs/smollm2-20 --quiet) && cat "$OUT/report.md"
[b]Stages[/b] (the recipe's run: section, or --stages), each into OUTPUT/<stage>/ exactly as its own command writes
it: calibrate, prune (on OUTPUT/calibrate when that section makes the blocks prune would; checkpoints every 10
steps unless prune.save_every is set), slice (--merge, and --reconstruct OUTPUT/calibrate with --reconstruct), eval
(OUTPUT/eval/dense.json and pruned.json, from the eval: section), export (OUTPUT/export/pruned-TYPE.gguf: the
export: section's outtype, or its fallback_outtype when that needs llama.cpp's quantizer and none is installed,
decided with a note before any stage runs; the converter is checked then too), bench (OUTPUT/bench/bench.json, from
bench: runtime:). Each stage's config: its defaults < the recipe's section < --set.
[b]Reruns[/b] OUTPUT/run.json records every stage's resolved config and a hash of it and of its inputs. Running the
same command again skips what is up to date, resumes an interrupted prune from its checkpoint, and reruns a stage
whose settings changed and every stage that reads its output, saying why.
[b]Writes[/b] OUTPUT/report.md and the self-contained OUTPUT/report.html (what was run, dense vs pruned side by side,
masks per layer and the training curve as PNGs under OUTPUT/report/). stdout: OUTPUT (or --json: a summary).
"""


def run(
    ctx: typer.Context,
    recipe: str = typer.Argument(..., help="The recipe YAML: a run: section (model, stages, reconstruct) and one "
                                           "section per stage, as the stage commands' --recipe reads it."),
    output: str = opt(C, "output", "--output", "-o", rich_help_panel=OUTPUT),
    model: str = opt(C, "model", rich_help_panel="Model"),
    stages: str = typer.Option(None, "--stages", help="Comma list of stages to run (default: the recipe's run: "
                                                      "stages, else calibrate,prune,slice,eval); order is always "
                                                      "calibrate, prune, slice, eval, export, bench.",
                               show_default=False),
    reconstruct: bool = opt(C, "reconstruct", "--reconstruct/--no-reconstruct", rich_help_panel=PRUNE),
    set_: List[str] = typer.Option(None, "--set", metavar="STAGE.KEY=VALUE",
                                   help="Set a key of a stage's config over the recipe (repeatable): "
                                        "--set prune.ratio=0.3, --set eval.seq-len=1024, --set '*.device=cuda'. "
                                        "Keys are the stage command's flags.", show_default=False),
    ratio: float = typer.Option(None, "--ratio", "-r", help="Shortcut: --set prune.ratio=R.", rich_help_panel=PRUNE,
                                show_default=False),
    max_steps: int = typer.Option(None, "--max-steps", help="Shortcut: --set prune.max_steps=N.",
                                  rich_help_panel=TRAIN, show_default=False),
    save_every: int = typer.Option(None, "--save-every", help="Shortcut: --set prune.save_every=N (lpt run: 10 "
                                                              "unless set).", rich_help_panel=OUTPUT,
                                   show_default=False),
    ppl: str = typer.Option(None, "--ppl", help="Shortcut: --set eval.ppl=SOURCES.", show_default=False),
    tasks: str = typer.Option(None, "--tasks", help="Shortcut: --set eval.tasks=TASKS.", show_default=False),
    dtype: str = typer.Option(None, "--dtype", help="Shortcut: --set '*.dtype=DTYPE' (every stage).",
                              rich_help_panel="Model", show_default=False),
    device: str = typer.Option(None, "--device", help="Shortcut: --set '*.device=DEVICE' (every stage).",
                               rich_help_panel="Model", show_default=False),
    dry_run: bool = opt(C, "dry_run", rich_help_panel=OUTPUT),
) -> None:
    """Run the stages a recipe names (calibrate -> prune -> slice -> eval -> export / bench), each into
    OUTPUT/<stage>/, skipping what is up to date, and write a report (OUTPUT/report.md and report.html)."""
    shortcuts = {"prune.ratio": ratio, "prune.max_steps": max_steps, "prune.save_every": save_every,
                 "eval.ppl": ppl, "eval.tasks": tasks, "*.dtype": dtype, "*.device": device}
    overrides = list(set_ or []) + [f"{k}={v}" for k, v in shortcuts.items() if v is not None]
    params = ctx.params
    for k in ("set_", "ratio", "max_steps", "save_every", "ppl", "tasks", "dtype", "device"):
        params.pop(k, None)
    if stages is None:
        params.pop("stages")
    else:
        params["stages"] = [s.strip() for s in stages.split(",") if s.strip()]

    def go():
        import importlib

        from lpt import artifacts, pipeline, report
        from lpt.config import RUN_STAGES
        from lpt.progress import console

        cfg = make_config(ctx, C, "run")
        cfg.recipe, cfg.overrides = recipe, overrides
        argv = sys.argv[1:]
        cfg.command = shlex.join(["lpt", *argv]) if "run" in argv else shlex.join(
            ["lpt", "run", recipe, "-o", cfg.output, *(a for o in overrides for a in ("--set", o))])
        stage_modules = {s: importlib.import_module(f"lpt.stages.{s}") for s in RUN_STAGES}
        runners = {s: m.run for s, m in stage_modules.items()}
        validators = {s: m.validate for s, m in stage_modules.items()}
        from rich.markup import escape

        done = pipeline.execute(cfg, runners, say=lambda s: console.print(f"[bold]lpt run[/] {escape(s)}", soft_wrap=True),
                                write_report=report.write, validators=validators)
        if cfg.dry_run:
            return None
        ran = [n for n, a in done.actions.items() if a != "skipped"]
        if not ran:
            console.print(f"lpt run: nothing to do, every stage is up to date ({done.run_dir / artifacts.REPORT_MD})")
        else:
            console.print(f"lpt run: ran {', '.join(ran)}; report {done.run_dir / artifacts.REPORT_MD} and "
                          f"{artifacts.REPORT_HTML}")
        return done.run_dir

    run_stage(go)


def register(app: typer.Typer) -> None:
    app.command("run", epilog=EPILOG)(run)
