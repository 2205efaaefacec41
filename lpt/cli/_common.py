"""Shared CLI plumbing: options generated from config dataclasses, recipe merging, one-line errors."""

from __future__ import annotations

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


STATE = _State()


def opt(cls: type, name: str, *flags: str, **kw: Any):
    """A typer.Option whose default and help come from the config dataclass field ``name``."""
    if not flags:
        flags = ("--" + name.replace("_", "-"),)
    return typer.Option(kw.pop("default", default_of(cls, name)), *flags, help=kw.pop("help", help_of(cls, name)), **kw)


def arg(cls: type, name: str, **kw: Any):
    return typer.Argument(kw.pop("default", default_of(cls, name)), help=help_of(cls, name), **kw)


RECIPE_HELP = "YAML recipe whose section for this stage sets any flag; flags typed on the command line win."


def make_config(ctx: typer.Context, cls: type, stage: str) -> Any:
    """Config from the command's parameters: defaults < recipe section < flags typed on the command line."""
    values = dict(ctx.params)
    recipe_path = values.pop("recipe", None)
    explicit = {
        k for k in values
        if getattr(ctx.get_parameter_source(k), "name", None) in ("COMMANDLINE", "ENVIRONMENT")
    }
    recipe = load_recipe(recipe_path, stage) if recipe_path else {}
    cfg = build(cls, values, explicit, recipe)
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
    console.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)
    raise typer.Exit(code)


def run_stage(fn: Callable[[], Any]) -> Any:
    """Run a stage; user errors become one line and exit code 2, unexpected ones one line and exit code 1."""
    try:
        return fn()
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


def not_implemented(stage: str, issue_hint: str) -> None:
    fail(f"`lpt {stage}` is not implemented yet ({issue_hint}); its --help describes the planned inputs and outputs",
         3)
