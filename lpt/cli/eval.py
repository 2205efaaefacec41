"""``lpt eval`` (placeholder until its issue lands)."""

from __future__ import annotations

import typer

from lpt.cli._common import not_implemented


def register(app: typer.Typer) -> None:
    @app.command("eval", epilog="[b]Example[/b]\n\n  lpt eval sliced/ --ppl builtin:pydoc:test --seq-len 2048 -o results.json")
    def eval_(model: str = typer.Argument(..., help="Model to evaluate.")) -> None:
        """Perplexity and zero-shot tasks -> results JSON."""
        not_implemented("eval", "evaluation")
