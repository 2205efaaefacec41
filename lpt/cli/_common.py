"""Shared CLI plumbing: options generated from config dataclasses, recipe merging, one-line errors."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import click
import typer

from lpt.config import build, default_of, help_of, load_recipe
from lpt.errors import LptError


@dataclass
class _State:
    debug: bool = bool(os.environ.get("LPT_DEBUG"))
    quiet: bool = False  # --quiet: no progress or messages (errors still print)
    json: bool = False  # --json: stdout carries a JSON summary instead of the output path
    command: str = ""  # the command being run, without the program name: "prune", "bench runtime"


STATE = _State()


# --help panels: every command that repeats an option shows it under the same heading
MODEL, DATA, PRUNE, SCHEDULE, LORA, TRAIN, OUTPUT = (
    "Model", "Data", "What to prune", "Schedule", "LoRA", "Training", "Output")
PANELS = {
    **dict.fromkeys(("dtype", "device", "device_map", "revision", "trust_remote_code", "load_8bit", "int8_threshold",
                     "int8_backend"),
                    MODEL),
    **dict.fromkeys(("calib", "data", "subset", "split", "data_files", "text_field", "format", "template",
                     "train_on_inputs", "nsamples", "seq_len", "seed", "val_fraction"), DATA),
    **dict.fromkeys(("ratio", "criterion", "score", "normalize", "normalize_by", "gqa", "balance", "layout",
                     "skip_layers", "round_to", "targets", "prune_layers", "hidden_ratio", "model_ratio",
                     "target_params", "axes", "search_grid", "block_criterion", "hidden_criterion", "tp"), PRUNE),
    **dict.fromkeys(("ema", "prune_freq", "warmup", "cooldown", "one_shot"), SCHEDULE),
    **dict.fromkeys(("lora_r", "lora_alpha", "lora_dropout"), LORA),
    **dict.fromkeys(("lr", "lr_warmup", "weight_decay", "batch_size", "micro_batch_size", "epochs", "max_steps",
                     "max_grad_norm", "distill", "distill_temperature", "distill_weight", "gradient_checkpointing",
                     "loss_head"),
                    TRAIN),
    **dict.fromkeys(("output", "overwrite", "save_every", "resume", "log_every"), OUTPUT),
}


def opt(cls: type, name: str, *flags: str, **kw: Any):
    """A typer.Option whose default and help come from the config dataclass field ``name``, under its help panel."""
    if not flags:
        flags = ("--" + name.replace("_", "-"),)
    kw.setdefault("rich_help_panel", PANELS.get(name))
    return typer.Option(kw.pop("default", default_of(cls, name)), *flags, help=kw.pop("help", help_of(cls, name)), **kw)


def arg(cls: type, name: str, **kw: Any):
    return typer.Argument(kw.pop("default", default_of(cls, name)), help=help_of(cls, name), **kw)


RECIPE_HELP = "YAML recipe whose section for this stage sets any flag; flags typed on the command line win."


def make_config(ctx: typer.Context, cls: type, stage: str, sub: str | None = None) -> Any:
    """Config from the command's parameters: defaults < recipe section < flags typed on the command line.

    ``sub`` names a subsection of the stage's section (``bench: runtime:``) for commands with subcommands.
    """
    values = dict(ctx.params)
    recipe_path = values.pop("recipe", None)
    explicit = {
        k for k in values
        if getattr(ctx.get_parameter_source(k), "name", None) in ("COMMANDLINE", "ENVIRONMENT")
    }
    recipe = load_recipe(recipe_path, stage) if recipe_path else {}
    label = f"recipe {recipe_path}, section {stage}{'.' + sub if sub else ''}"
    if sub is not None and recipe_path:
        recipe = recipe.get(sub.replace("-", "_"), {}) or {}
        if not isinstance(recipe, dict):
            raise LptError(f"recipe {recipe_path}: section {stage}.{sub} must be a mapping")
        recipe = {str(k).replace("-", "_"): v for k, v in recipe.items()}
    cfg = build(cls, values, explicit, recipe, recipe_label=label)
    if recipe:
        overridden = sorted(k for k in recipe if k in explicit)
        if overridden:
            from lpt.progress import console

            console.print(f"recipe {recipe_path}: command-line flags override {', '.join(overridden)}")
    return cfg


def fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    from lpt.progress import console

    # the message is plain text: brackets in it (pip extras, paths) must not be read as markup
    quiet, console.quiet = console.quiet, False  # errors print under --quiet too
    console.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)
    console.quiet = quiet
    raise typer.Exit(code)


QUIET_HELP = "No progress bars or messages on stderr (errors still print); stdout still carries the output."
JSON_HELP = "Print a JSON summary of the output on stdout instead of its path."


def configure_output(debug: bool | None = None, quiet: bool | None = None, json_: bool | None = None) -> None:
    """Apply --debug / --quiet / --json (given at the root or on the command): lpt.quiet hides other libraries'
    noise unless --debug."""
    from lpt import quiet as q

    for name, value in (("debug", debug), ("quiet", quiet), ("json", json_)):
        if value:
            setattr(STATE, name, True)
    q.configure(debug=STATE.debug, quiet=STATE.quiet)


def with_output_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a command) with --quiet/-q and --json added (also accepted before the command: lpt --quiet prune)."""
    @functools.wraps(fn)
    def command(*args: Any, lpt_quiet: bool = False, lpt_json: bool = False, **kwargs: Any) -> Any:
        names, c = [], kwargs.get("ctx")
        while c is not None and c.parent is not None:
            names.insert(0, c.info_name or "")
            c = c.parent
        STATE.command = " ".join(names) or fn.__name__.strip("_")
        configure_output(quiet=lpt_quiet, json_=lpt_json)
        return fn(*args, **kwargs)

    sig = inspect.signature(fn)
    extra = [inspect.Parameter("lpt_quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                               default=typer.Option(False, "--quiet", "-q", help=QUIET_HELP, rich_help_panel=OUTPUT)),
             inspect.Parameter("lpt_json", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                               default=typer.Option(False, "--json", help=JSON_HELP, rich_help_panel=OUTPUT))]
    command.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])  # type: ignore[attr-defined]
    command.__annotations__ = {**fn.__annotations__, "lpt_quiet": bool, "lpt_json": bool}
    return command


def emit(result: Any) -> None:
    """stdout: the path a stage wrote (scripts chain stages by it: OUT=$(lpt prune ...)), or its JSON summary."""
    if result is None:
        return
    if STATE.json:
        from lpt.summary import summarize

        typer.echo(json.dumps(summarize(STATE.command, result), default=str))
    else:
        typer.echo(str(result))


_STDOUT: Any = None


def stdout() -> Any:
    """The command's real stdout, also while a stage runs (for commands whose product is text: eval --compare)."""
    return _STDOUT if _STDOUT is not None else sys.stdout


def run_stage(fn: Callable[[], Any]) -> Any:
    """Run a stage; user errors become one line and exit code 2, unexpected ones one line and exit code 1.

    While it runs, anything written to stdout (by lpt or a library) goes to stderr; stdout then gets the output's
    path (or, with --json, its summary) and nothing else."""
    global _STDOUT
    _STDOUT = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            result = fn()
    except (typer.Exit, click.exceptions.Exit, click.ClickException, typer.Abort):
        raise
    except LptError as e:
        if STATE.debug:
            traceback.print_exc()
        fail(str(e), 2)
    except KeyboardInterrupt:
        fail("interrupted; no output was written", 130)
    except Exception as e:  # noqa: BLE001 - the CLI promises one line unless --debug
        if STATE.debug:
            traceback.print_exc(file=sys.stderr)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        fail(f"{type(e).__name__}: {msg} (run `lpt --debug ...` for the traceback)", 1)
    else:
        emit(result)
        return result
