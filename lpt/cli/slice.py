"""``lpt slice`` (placeholder until its issue lands)."""

from __future__ import annotations

import typer

from lpt.cli._common import not_implemented


def register(app: typer.Typer) -> None:
    @app.command("slice", epilog="[b]Example[/b]\n\n  lpt slice smollm2-135m --masks out/masks.json --adapter out/ -o sliced/")
    def slice_(model: str = typer.Argument(..., help="Base (or merged) model."),
               masks: str = typer.Option(..., help="masks.json written by lpt prune."),
               output: str = typer.Option(..., "--output", "-o", help="Output model directory.")) -> None:
        """Physically remove the pruned heads and channels -> a smaller dense model."""
        not_implemented("slice", "merge/slice")
