"""The ``lpt`` command line: one thin Typer command per stage, each turning flags into a config object and calling
``lpt.stages.<stage>.run(config)``. Nothing here imports torch at module level, so ``lpt --help`` is instant.
"""

from __future__ import annotations

import importlib

import typer

from lpt import __version__
from lpt.cli import _common
from lpt.config import STAGES

_common.legible_help()
app = typer.Typer(
    name="lpt",
    help=(
        "LoRA-guided structured pruning for LLMs (LoRAPrune).\n\n"
        "Pipeline: calibrate -> prune -> merge / slice -> export / eval / bench. Each stage reads and writes files, "
        "so it can be rerun, inspected or swapped on its own; lpt run RECIPE -o DIR runs them all, skips what is up to "
        "date, and writes a report."
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
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors, and the "
                                                      "warnings and logs of the libraries lpt uses."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=_common.QUIET_HELP),
    json_: bool = typer.Option(False, "--json", help=_common.JSON_HELP),
) -> None:
    _common.STATE.debug, _common.STATE.quiet, _common.STATE.json = debug, quiet, json_
    _common.configure_output()


COMMANDS = (*STAGES, "run")
for _stage in COMMANDS:  # each lpt/cli/<stage>.py adds its command (or command group) to the app
    importlib.import_module(f"lpt.cli.{_stage}").register(app)
for _info in [*app.registered_commands,  # every command takes --quiet and --json
              *(c for g in app.registered_groups for c in g.typer_instance.registered_commands)]:
    _info.callback = _common.with_output_options(_info.callback)


def main() -> None:
    app()
