"""``lpt prune``."""

from __future__ import annotations

import typer

from lpt.cli._common import OUTPUT, RECIPE_HELP, arg, make_config, opt, run_stage
from lpt.config import PruneConfig as C

EPILOG = """[b]Examples[/b]

  lpt prune meta-llama/Llama-2-7b-hf --ratio 0.5 --8bit -o llama7b-50/

  lpt prune smollm2-135m --recipe recipes/smollm2-135m.yaml -o smol-50/

  lpt calibrate smollm2-135m -n 256 -o calib/ && lpt prune smollm2-135m --calib calib/ --ratio 0.2 --max-steps 40 -o smol-20/

  lpt prune smollm2-135m --criterion vanilla --one-shot --ratio 0.5 -o smol-vanilla-oneshot/

  lpt prune smollm2-135m --recipe recipes/smollm2-135m-20.yaml --round-to llamacpp -o smol-20-gguf/   (MLP widths a
  multiple of 32, for lpt export --gguf --outtype q8_0 / q4_0; kquants: 256, for q4_k_m)

  lpt prune smollm2-135m --criterion fisher --distill --ratio 0.2 -o smol-fisher-20/

  lpt prune smollm2-135m --model-ratio 0.2 --axes width,depth,hidden -o smol-108m/   (a fifth of ALL parameters,
  embedding included; how much comes from heads / MLP channels, whole blocks and hidden channels is searched)

  lpt prune smollm2-135m --target-params 100M -o smol-100m/

  lpt prune smollm2-135m --prune-layers 6 -o smol-24-layers/   (whole blocks only; --hidden-ratio 0.25: hidden channels)

  lpt prune meta-llama/Meta-Llama-3-8B --ratio 0.3 --tp 2,4 --round-to gpu -o l3-30-tp/   (shards in vLLM / SGLang at
  tensor-parallel 2 and 4, MLP widths per GPU a multiple of 128)

  lpt prune smollm2-135m --balance proportional --ratio 0.5 -o smol-50-proportional/

  torchrun --nproc_per_node 8 -m lpt prune meta-llama/Llama-2-13b-hf --recipe recipes/llama-7b-50.yaml -o l13b-50/

  lpt prune meta-llama/Llama-2-70b-hf --device-map auto --8bit --ratio 0.2 -o l70b-20/

[b]Writes[/b] OUTPUT/adapter_config.json + adapter_model.safetensors (PEFT LoRA adapter for the unpruned base),
OUTPUT/masks.json (kept heads / channels per layer), OUTPUT/importance.safetensors, OUTPUT/log.jsonl,
OUTPUT/lpt_config.json. Next: lpt slice MODEL --masks OUTPUT/masks.json --adapter OUTPUT -o SLICED/
"""


def prune(
    ctx: typer.Context,
    model: str = arg(C, "model"),
    ratio: float = opt(C, "ratio", "--ratio", "-r"),
    round_to: str = opt(C, "round_to"),
    criterion: str = opt(C, "criterion"),
    calib: str = opt(C, "calib"),
    data: str = opt(C, "data"),
    subset: str = opt(C, "subset"),
    split: str = opt(C, "split"),
    data_files: str = opt(C, "data_files"),
    text_field: str = opt(C, "text_field"),
    format: str = opt(C, "format"),
    template: str = opt(C, "template"),
    train_on_inputs: bool = opt(C, "train_on_inputs"),
    nsamples: int = opt(C, "nsamples", "--nsamples", "-n"),
    seq_len: int = opt(C, "seq_len"),
    seed: int = opt(C, "seed"),
    score: str = opt(C, "score"),
    normalize: bool = opt(C, "normalize", "--normalize/--no-normalize"),
    normalize_by: str = opt(C, "normalize_by"),
    gqa: str = opt(C, "gqa"),
    balance: str = opt(C, "balance"),
    layout: str = opt(C, "layout"),
    skip_layers: str = opt(C, "skip_layers"),
    prune_layers: float = opt(C, "prune_layers"),
    hidden_ratio: float = opt(C, "hidden_ratio"),
    model_ratio: float = opt(C, "model_ratio"),
    target_params: str = opt(C, "target_params"),
    axes: str = opt(C, "axes"),
    search_grid: int = opt(C, "search_grid"),
    block_criterion: str = opt(C, "block_criterion"),
    hidden_criterion: str = opt(C, "hidden_criterion"),
    tp: list[str] = opt(C, "tp"),
    ema: float = opt(C, "ema"),
    prune_freq: int = opt(C, "prune_freq"),
    warmup: float = opt(C, "warmup"),
    cooldown: float = opt(C, "cooldown"),
    one_shot: bool = opt(C, "one_shot"),
    lora_r: int = opt(C, "lora_r"),
    lora_alpha: float = opt(C, "lora_alpha"),
    lora_dropout: float = opt(C, "lora_dropout"),
    targets: str = opt(C, "targets"),
    lr: float = opt(C, "lr"),
    lr_warmup: float = opt(C, "lr_warmup"),
    weight_decay: float = opt(C, "weight_decay"),
    batch_size: int = opt(C, "batch_size"),
    micro_batch_size: int = opt(C, "micro_batch_size"),
    epochs: float = opt(C, "epochs"),
    max_steps: int = opt(C, "max_steps"),
    max_grad_norm: float = opt(C, "max_grad_norm"),
    distill: bool = opt(C, "distill"),
    distill_temperature: float = opt(C, "distill_temperature"),
    distill_weight: float = opt(C, "distill_weight"),
    gradient_checkpointing: bool = opt(C, "gradient_checkpointing"),
    loss_head: bool = opt(C, "loss_head", "--loss-head/--no-loss-head"),
    load_8bit: bool = opt(C, "load_8bit", "--8bit"),
    int8_threshold: float = opt(C, "int8_threshold"),
    int8_backend: str = opt(C, "int8_backend"),
    dtype: str = opt(C, "dtype"),
    device: str = opt(C, "device"),
    device_map: str = opt(C, "device_map"),
    revision: str = opt(C, "revision"),
    trust_remote_code: bool = opt(C, "trust_remote_code"),
    output: str = opt(C, "output", "--output", "-o"),
    overwrite: bool = opt(C, "overwrite"),
    save_every: int = opt(C, "save_every"),
    resume: bool = opt(C, "resume"),
    log_every: int = opt(C, "log_every"),
    recipe: str = typer.Option(None, "--recipe", help=RECIPE_HELP, rich_help_panel=OUTPUT),
) -> None:
    """Iterative LoRA-guided structured pruning with joint LoRA fine-tuning (Algorithm 1 of LoRAPrune).

    Only LoRA's A and B train; head and channel importance comes from LoRA's gradients (Eq. 10; --criterion lora,
    the paper's) or from the mask Fisher information (--criterion fisher, beyond the paper), is summed over
    dependency groups, smoothed by a moving average, and the weakest groups are masked along a cubic schedule.
    """

    def go():
        from lpt.stages import prune as stage

        return stage.run(make_config(ctx, C, "prune"))

    run_stage(go)


def register(app: typer.Typer) -> None:
    app.command("prune", epilog=EPILOG)(prune)
