"""``lpt prune`` (placeholder until its issue lands)."""

from __future__ import annotations

import typer

from lpt.cli._common import not_implemented


def register(app: typer.Typer) -> None:
    @app.command("prune", epilog="[b]Example[/b]\n\n  lpt prune meta-llama/Llama-2-7b-hf --ratio 0.5 --8bit -o out/")
    def prune(model: str = typer.Argument(..., help="Model to prune.")) -> None:
        """Iterative LoRA-guided structured pruning + LoRA fine-tuning -> PEFT adapter + masks.json."""
        not_implemented("prune", "LoRA-guided pruning")
