"""``lpt merge`` (placeholder until its issue lands)."""

from __future__ import annotations

import typer

from lpt.cli._common import not_implemented


def register(app: typer.Typer) -> None:
    @app.command("merge", epilog="[b]Example[/b]\n\n  lpt merge smollm2-135m --adapter out/ -o merged/")
    def merge(model: str = typer.Argument(..., help="Base model the adapter was trained on."),
              adapter: str = typer.Option(..., help="Adapter directory written by lpt prune."),
              output: str = typer.Option(..., "--output", "-o", help="Output model directory.")) -> None:
        """Fold the LoRA adapter into the base weights -> a Hugging Face model directory."""
        not_implemented("merge", "merge/slice")
