"""``lpt bench runtime`` and ``lpt bench prune-step``."""

from __future__ import annotations

from typing import List

import typer

from lpt.cli._common import make_config, opt, run_stage
from lpt.config import BenchPruneStepConfig as P
from lpt.config import BenchRuntimeConfig as R

RUNTIME_EPILOG = """[b]Examples[/b]

  lpt bench runtime smollm2-135m --seq-len 2048 --trials 5 -o bench.json

  lpt bench runtime smollm2-135m merged-50/ sliced-50/ --adapter - --adapter - --adapter sliced-50/adapter --label dense --label "50% merged" --label "50% unmerged" --seq-len 2048 --trials 5 --plot -o bench.json

  lpt bench runtime smollm2-135m --adapter prune-50/ --masks prune-50/masks.json --batch-size 1,4 --new-tokens 64 -o unmerged.json

  lpt bench runtime --random-init llama-7b --random-init llama-7b@0.2 --random-init llama-7b@0.5 --random-init llama-7b@0.5 --adapter - --adapter - --adapter - --adapter random:8 --dtype bfloat16 --device cuda --plot -o llama7b.json

[b]Models[/b]: MODEL arguments first, then each --random-init (SHAPE or SHAPE@RATIO: random weights at a real
shape; the output marks them). --adapter pairs with the model in the same position ('-' for none); random:R is a random
rank-R LoRA. Times are the median of --trials runs after --warmup runs, with CUDA synchronisation; peak memory is
the CUDA allocator's peak or the measuring process's peak RSS. Every model runs in its own process (--no-isolate
to keep one).

[b]Writes[/b] OUTPUT (JSON: hardware, versions, protocol, one row per model and batch size, ratios to the first
model) and, with --plot, OUTPUT with .png. Schema: docs/bench.md.
"""

PRUNE_STEP_EPILOG = """[b]Examples[/b]

  lpt bench prune-step smollm2-135m --criterion lora --criterion vanilla --plain-lora --8bit --seq-len 256 -o cost.json

  lpt bench prune-step --random-init llama-7b --criterion lora --criterion vanilla --8bit --batch-size 4 --seq-len 256 --device cuda --plot -o cost-7b.json

[b]Times[/b] lpt prune's own optimiser step (forward/backward, importance, moving average, AdamW, masks) on a fixed
batch: one row per --criterion, plus plain LoRA fine-tuning with --plain-lora, each again with int8 base weights
with --8bit (vanilla needs full-precision gradients and is skipped there). Every configuration runs in its own
process so peak memory is its own.

[b]Writes[/b] OUTPUT (JSON: hardware, versions, protocol, one row per configuration, ratios to the first) and, with
--plot, OUTPUT with .png. Schema: docs/bench.md.
"""

RECIPE_HELP = ("YAML recipe whose bench section sets any flag, under bench: runtime: or bench: prune-step:; flags "
               "typed on the command line win.")


GROUP_EPILOG = """[b]Examples[/b]

  lpt bench runtime smollm2-135m merged-50/ --seq-len 2048 --trials 5 --plot -o bench.json

  lpt bench prune-step smollm2-135m --criterion lora --criterion vanilla --plain-lora --8bit --seq-len 256 -o cost.json

Each command's --help has more examples; the JSON layout is in docs/bench.md.
"""

app = typer.Typer(
    name="bench",
    help="Runtime of dense / unmerged / merged models, and the cost of a pruning step.",
    epilog=GROUP_EPILOG,
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command("runtime", epilog=RUNTIME_EPILOG)
def runtime(
    ctx: typer.Context,
    models: List[str] = typer.Argument(None, help=R.__dataclass_fields__["models"].metadata["help"],
                                       show_default=False),
    adapter: List[str] = opt(R, "adapter", show_default=False),
    masks: List[str] = opt(R, "masks", show_default=False),
    label: List[str] = opt(R, "label", show_default=False),
    tp: List[str] = opt(R, "tp", show_default=False),
    random_init: List[str] = opt(R, "random_init", show_default=False),
    seq_len: int = opt(R, "seq_len"),
    batch_size: List[str] = opt(R, "batch_size", default=["1"]),
    trials: int = opt(R, "trials"),
    warmup: int = opt(R, "warmup"),
    new_tokens: int = opt(R, "new_tokens"),
    decode_trials: int = opt(R, "decode_trials"),
    dtype: str = opt(R, "dtype"),
    device: str = opt(R, "device"),
    threads: int = opt(R, "threads"),
    isolate: bool = opt(R, "isolate", "--isolate/--no-isolate"),
    interleave: bool = opt(R, "interleave"),
    seed: int = opt(R, "seed"),
    plot: bool = opt(R, "plot"),
    output: str = opt(R, "output", "--output", "-o"),
    overwrite: bool = opt(R, "overwrite"),
    revision: str = opt(R, "revision"),
    trust_remote_code: bool = opt(R, "trust_remote_code"),
    recipe: str = typer.Option(None, "--recipe", help=RECIPE_HELP),
) -> None:
    """Forward latency over --seq-len tokens, tokens/s, peak memory, parameters and FLOPs per token of each model,
    relative to the first (the paper's Table 3 layout); decode throughput with --new-tokens."""

    def go():
        from lpt.stages import bench as stage

        ctx.params["models"] = list(ctx.params.get("models") or [])
        return stage.run(make_config(ctx, R, "bench", "runtime"))

    run_stage(go)


@app.command("prune-step", epilog=PRUNE_STEP_EPILOG)
def prune_step(
    ctx: typer.Context,
    model: str = typer.Argument(None, help=P.__dataclass_fields__["model"].metadata["help"], show_default=False),
    criterion: List[str] = opt(P, "criterion"),
    plain_lora: bool = opt(P, "plain_lora"),
    load_8bit: bool = opt(P, "load_8bit", "--8bit"),
    int8_backend: List[str] = opt(P, "int8_backend"),
    random_init: str = opt(P, "random_init"),
    seq_len: int = opt(P, "seq_len"),
    batch_size: int = opt(P, "batch_size"),
    micro_batch_size: int = opt(P, "micro_batch_size"),
    ratio: float = opt(P, "ratio"),
    gradient_checkpointing: bool = opt(P, "gradient_checkpointing"),
    loss_head: bool = opt(P, "loss_head", "--loss-head/--no-loss-head"),
    distill: bool = opt(P, "distill"),
    lora_r: int = opt(P, "lora_r"),
    lora_alpha: float = opt(P, "lora_alpha"),
    trials: int = opt(P, "trials"),
    warmup: int = opt(P, "warmup"),
    dtype: str = opt(P, "dtype"),
    device: str = opt(P, "device"),
    threads: int = opt(P, "threads"),
    isolate: bool = opt(P, "isolate", "--isolate/--no-isolate"),
    seed: int = opt(P, "seed"),
    plot: bool = opt(P, "plot"),
    output: str = opt(P, "output", "--output", "-o"),
    overwrite: bool = opt(P, "overwrite"),
    revision: str = opt(P, "revision"),
    trust_remote_code: bool = opt(P, "trust_remote_code"),
    recipe: str = typer.Option(None, "--recipe", help=RECIPE_HELP),
) -> None:
    """Seconds per optimiser step and peak memory of lpt prune with each --criterion, plain LoRA (--plain-lora), and
    int8 base weights (--8bit): the paper's Table 4 on your model."""

    def go():
        from lpt.stages import bench as stage

        return stage.run(make_config(ctx, P, "bench", "prune-step"))

    run_stage(go)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="bench")
