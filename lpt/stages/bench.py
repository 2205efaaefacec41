"""``lpt bench``: inference runtime of dense, unmerged and merged models, and the cost of a pruning step.

``runtime``: forward latency over ``seq_len`` tokens per model and batch size (optionally decode throughput), peak
memory, parameters and FLOPs per token, relative to the first model (the layout of the paper's Table 3).
``prune-step``: seconds per optimiser step and peak memory of ``lpt prune``'s training step for each criterion,
with and without int8 base weights (the paper's Table 4).

The stage validates, orchestrates and writes: what is measured is ``lpt.benchmarking.protocol``'s typed specs,
how in ``lpt.benchmarking.measure``. Each configuration is measured in its own child process
(``lpt.benchmarking.worker``) unless ``isolate`` is off, so the peak resident set size of one model never leaks
into the next. Results are one JSON file (schema: ``lpt.benchmarking.schema``), a rich table, and a PNG with
``plot``.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.markup import escape

import lpt
from lpt import artifacts, models
from lpt.benchmarking import flops, report, schema, shapes, timing
from lpt.benchmarking import plot as plotting
from lpt.benchmarking.env import hardware
from lpt.benchmarking.measure import relative_prune_step, relative_runtime
from lpt.benchmarking.memory import MemoryMeter
from lpt.benchmarking.protocol import (Entry, PruneStepProtocol, RuntimeProtocol, StepRun, Task, auto_label,
                                       build_entries, int_list, prune_step_runs)
from lpt.benchmarking.worker import measure
from lpt.arch import describe
from lpt.config import BenchPruneStepConfig, BenchRuntimeConfig, check
from lpt.errors import LptError
from lpt.int8 import resolve_backend
from lpt.progress import console

PAPER_TABLE3 = ("LoRAPrune Table 3 (LLaMA-7B, 2048 tokens): dense merged 0.105 s, dense unmerged 0.184 s, 20% pruned "
                "merged 0.079 s, 50% pruned merged 0.053 s, 50% pruned unmerged 0.089 s")
PAPER_TABLE4 = ("LoRAPrune Table 4 (LLaMA-7B at 50%, batch 128 by accumulation, A100): vanilla 38.87 s / 38.6 GB; "
                "LoRA-guided 14.13 s / 18.3 GB; LoRA-guided 8-bit 15.63 s / 13.8 GB per iteration")


# ------------------------------------------------------------------------------------------------ validation
def validate(cfg: BenchRuntimeConfig | BenchPruneStepConfig) -> None:
    """Every option of ``lpt bench runtime`` / ``prune-step`` that can be checked before a model is loaded."""
    if isinstance(cfg, BenchPruneStepConfig):
        validate_prune_step(cfg)
    elif isinstance(cfg, BenchRuntimeConfig):
        validate_runtime(cfg)
    else:
        raise TypeError(f"not a bench config: {type(cfg).__name__}")


def validate_runtime(cfg: BenchRuntimeConfig) -> list[Entry]:
    """Check the options (``lpt.config.check``) and every model / shape / adapter argument (no weight is read);
    returns the entries."""
    check(cfg)
    int_list(cfg.batch_size, "--batch-size")
    entries = build_entries(cfg)
    for e in entries:  # parse shapes and adapter specs before any model is loaded
        if e.random_init:
            shapes.parse_shape(e.random_init)
        if e.adapter and not e.adapter.startswith("random:") and not Path(e.adapter).is_dir():
            raise LptError(f"--adapter {e.adapter}: not a directory")
        if e.adapter:
            shapes.random_adapter_rank(e.adapter)
        if e.model:
            models.resolve(e.model)
    if cfg.tp:
        from lpt.budget import tp_warnings

        for e in entries:
            if e.model:
                try:
                    a = describe(models.load_config(e.model, trust_remote_code=cfg.trust_remote_code,
                                                    revision=cfg.revision))
                except LptError:
                    continue  # a family lpt does not describe: nothing to say
                for line in tp_warnings(a, cfg.tp):
                    console.print(f"[yellow]warning:[/] {escape(e.label)}: {line}", markup=True)
    return entries


def validate_prune_step(cfg: BenchPruneStepConfig) -> tuple[list[StepRun], list[dict[str, str]]]:
    """Check the options (``lpt.config.check``; no weight is read); returns the configurations to time and the
    skipped ones."""
    check(cfg)
    device = models.resolve_device(cfg.device)
    backends = [resolve_backend(b, device) for part in cfg.int8_backend for b in str(part).split(",") if b.strip()]
    runs = prune_step_runs(cfg.criterion, cfg.plain_lora, cfg.load_8bit, backends)
    if cfg.random_init:
        shapes.parse_shape(cfg.random_init)
    else:
        models.resolve(cfg.model or models.SMOLLM2_ALIAS)
    return runs


# ------------------------------------------------------------------------------------------------ outputs
def _outputs(output: str, plot: bool, overwrite: bool) -> tuple[Path, Path | None]:
    out = Path(output)
    if out.suffix.lower() != ".json":
        raise LptError(f"-o {output}: the output is a JSON file (name it *.json)")
    png = out.with_suffix(".png") if plot else None
    for p in (out, png):
        if p is not None and p.exists() and not overwrite:
            raise LptError(f"output {p} already exists; pass --overwrite to replace it")
        if p is not None and p.is_dir():
            raise LptError(f"output {p} is a directory")
    if plot:
        plotting._pyplot()  # fail now, not after the measurements, when matplotlib is missing
    return out, png


def _write(doc: dict[str, Any], out: Path, png: Path | None, overwrite: bool, plot_fn) -> None:
    with artifacts.atomic_file(out, overwrite=overwrite) as tmp:
        artifacts.write_json(tmp, doc)
        if png is not None:
            with artifacts.atomic_file(png, overwrite=overwrite) as tmp_png:
                plot_fn(doc, tmp_png)


def _header(kind: str, device: str, threads: int, cfg: Any) -> dict[str, Any]:
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "kind": kind,
        "lpt_version": lpt.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": artifacts.versions(),
        "hardware": hardware(device, threads),
        "config": dataclasses.asdict(cfg),
    }


def _isolation(isolate: bool) -> str:
    return ("each configuration in its own Python process (python -m lpt.benchmarking.worker)" if isolate else
            "all configurations in one process (peak memory may carry over between them on CPU)")


# ------------------------------------------------------------------------------------------------ stages
def run_runtime(cfg: BenchRuntimeConfig) -> Path:
    entries = validate_runtime(cfg)
    batch_sizes = int_list(cfg.batch_size, "--batch-size")
    out, png = _outputs(cfg.output, cfg.plot, cfg.overwrite)
    device = models.resolve_device(cfg.device)
    models.resolve_dtype(cfg.dtype, device)
    cuda = device.startswith("cuda")
    trials = cfg.trials or (100 if cuda else 10)
    decode_trials = cfg.decode_trials or min(trials, 10)
    proto = RuntimeProtocol(cfg.dtype, device, cfg.revision, cfg.trust_remote_code, cfg.seq_len, tuple(batch_sizes),
                            trials, cfg.warmup, cfg.new_tokens, decode_trials, cfg.threads, cfg.seed)
    # with --interleave, the per-model pass measures memory (one forward) and decode; latency comes after
    per_model = dataclasses.replace(proto, trials=1, warmup=0) if cfg.interleave else proto
    infos, rows = [], []
    for i, e in enumerate(entries, 1):
        what = "measuring memory of" if cfg.interleave else "timing"
        console.print(f"[{i}/{len(entries)}] {what} {escape(e.label)}", markup=True)
        res = measure(Task("runtime", (e,), runtime=per_model), e.label, cfg.isolate)
        infos.append(res["model"])
        rows.extend(res["rows"])
    if cfg.interleave:
        console.print(f"timing {len(entries)} models in turns")
        times = measure(Task("runtime-interleaved", tuple(entries), runtime=proto), "interleaved timing", cfg.isolate)
        for r in rows:
            r["latency_s"] = timing.summarize(times[r["label"]][str(r["batch_size"])])
            r["tokens_per_s"] = r["batch_size"] * r["seq_len"] / r["latency_s"]["median"]
    rows.sort(key=lambda r: batch_sizes.index(r["batch_size"]))  # stable: models keep their order per batch size
    relative_runtime(rows)
    doc = _header("runtime", device, cfg.threads, cfg)
    doc["config"]["batch_size"] = batch_sizes
    doc.update({
        "random_weights": any(m["random_weights"] for m in infos),
        "protocol": {
            "description": ("one forward pass over batch_size x seq_len uniformly random token ids (no KV cache, "
                            "logits for every position) under torch.inference_mode; warm-up runs untimed, then "
                            "timed runs; tokens_per_s = batch_size x seq_len / median. Decode: greedy steps of one "
                            "token after a seq_len prompt with the KV cache, prefill excluded. Unmerged adapters "
                            "run in the model's dtype beside the base weights."),
            "seq_len": cfg.seq_len, "batch_sizes": batch_sizes, "warmup": cfg.warmup, "trials": trials,
            "decode_trials": decode_trials if cfg.new_tokens else 0, "new_tokens": cfg.new_tokens,
            "inputs": f"torch.randint(0, vocab_size) with seed {cfg.seed}",
            "dtype": infos[0]["dtype"] if infos else cfg.dtype, "device": device, "timer": timing.TIMER,
            "memory": MemoryMeter(device).method, "flops": flops.FORMULA, "isolation": _isolation(cfg.isolate),
            "order": ("interleaved: all models loaded in one process, one timed run of each in turn, repeated "
                      "--trials times (after --warmup turns); memory and decode measured per model beforehand"
                      if cfg.interleave else "sequential: each model's warm-up and timed runs in a row"),
            "reference": PAPER_TABLE3,
        },
        "models": infos,
        "results": rows,
    })
    schema.check(doc, schema.RuntimeResults)
    _write(doc, out, png, cfg.overwrite, plotting.plot_runtime)
    report.show(console, report.runtime_table(doc))
    console.print(f"wrote {out}" + (f" and {png}" if png else ""))
    return out


def run_prune_step(cfg: BenchPruneStepConfig) -> Path:
    runs, skipped = validate_prune_step(cfg)
    micro = cfg.micro_batch_size or cfg.batch_size
    model_arg = None if cfg.random_init else (cfg.model or models.SMOLLM2_ALIAS)
    out, png = _outputs(cfg.output, cfg.plot, cfg.overwrite)
    device = models.resolve_device(cfg.device)
    models.resolve_dtype(cfg.dtype, device)
    entry = Entry(auto_label(model_arg, cfg.random_init, None), model_arg, cfg.random_init)
    proto = PruneStepProtocol(cfg.dtype, device, cfg.revision, cfg.trust_remote_code, cfg.seq_len, cfg.batch_size,
                              micro, cfg.ratio, cfg.lora_r, cfg.lora_alpha, cfg.trials, cfg.warmup, cfg.threads,
                              cfg.seed, cfg.gradient_checkpointing, cfg.distill, cfg.loss_head)
    rows = []
    for i, run in enumerate(runs, 1):
        console.print(f"[{i}/{len(runs)}] timing {escape(run.label)}", markup=True)
        rows.append(measure(Task("prune-step", (entry,), prune_step=proto, run=run), run.label, cfg.isolate))
    info = rows[0].pop("_model")
    for r in rows[1:]:
        r.pop("_model", None)
    relative_prune_step(rows)
    doc = _header("prune-step", device, cfg.threads, cfg)
    doc.update({
        "random_weights": info["random_weights"],
        "protocol": {
            "description": ("one lpt prune optimiser step (lpt.pruner.Pruner.train_step: forward/backward over "
                            "micro-batches, the criterion's importance and moving average, AdamW, mask updates every "
                            "10 steps on the cubic schedule) on a fixed batch of uniformly random token ids; warm-up "
                            "steps untimed, then timed steps. Plain LoRA = the same step with ratio 0 (no importance, "
                            "no masks). 8-bit = int8 base weights of the row's int8_backend (bitsandbytes: "
                            "LLM.int8; torch: lpt's weight-only int8, lpt.int8)."),
            "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "micro_batch_size": micro, "warmup": cfg.warmup,
            "trials": cfg.trials, "ratio": cfg.ratio, "lora_r": cfg.lora_r,
            "gradient_checkpointing": cfg.gradient_checkpointing, "distill": cfg.distill, "loss_head": cfg.loss_head,
            "inputs": f"torch.randint(0, vocab_size) with seed {cfg.seed}; labels = inputs",
            "dtype": info["dtype"], "device": device, "timer": timing.TIMER, "memory": MemoryMeter(device).method,
            "isolation": _isolation(cfg.isolate), "reference": PAPER_TABLE4,
        },
        "model": info,
        "results": rows,
        "skipped": skipped,
    })
    schema.check(doc, schema.PruneStepResults)
    _write(doc, out, png, cfg.overwrite, plotting.plot_prune_step)
    report.show(console, report.prune_step_table(doc))
    console.print(f"wrote {out}" + (f" and {png}" if png else ""))
    return out


def run(cfg: BenchRuntimeConfig | BenchPruneStepConfig) -> Path:
    """``lpt bench runtime`` or ``lpt bench prune-step``, by the type of ``cfg``."""
    if isinstance(cfg, BenchPruneStepConfig):
        return run_prune_step(cfg)
    if isinstance(cfg, BenchRuntimeConfig):
        return run_runtime(cfg)
    raise TypeError(f"not a bench config: {type(cfg).__name__}")
