"""``lpt bench`` (placeholder until its issue lands)."""

from __future__ import annotations

import typer

from lpt.cli._common import not_implemented


def register(app: typer.Typer) -> None:
    @app.command("bench", epilog="[b]Example[/b]\n\n  lpt bench runtime smollm2-135m sliced/ --seq-len 2048 -o bench.json")
    def bench(model: str = typer.Argument(..., help="Model(s) to time.")) -> None:
        """Runtime of dense / unmerged / merged models, and the cost of a pruning step."""
        not_implemented("bench", "benchmarks")
