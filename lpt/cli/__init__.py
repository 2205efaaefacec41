"""The ``lpt`` command line: one thin Typer command per stage, each turning flags into a config object and calling
``lpt.stages.<stage>.run(config)``. Nothing here imports torch at module level, so ``lpt --help`` is instant.
"""

from __future__ import annotations

import importlib

import typer

from lpt import __version__
from lpt.cli import _common

app = typer.Typer(
    name="lpt",
    help=(
        "LoRA-guided structured pruning for LLMs (LoRAPrune).\n\n"
        "Pipeline: calibrate -> prune -> merge / slice -> export / eval / bench. Each stage reads and writes files, "
        "so it can be rerun, inspected or swapped on its own."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lpt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
) -> None:
    _common.STATE.debug = debug


STAGES = ("calibrate", "prune", "merge", "slice", "export", "eval", "bench")
for _stage in STAGES:  # each lpt/cli/<stage>.py adds its command (or command group) to the app
    importlib.import_module(f"lpt.cli.{_stage}").register(app)


def main() -> None:
    app()
