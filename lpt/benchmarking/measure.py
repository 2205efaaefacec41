"""The measurements of ``lpt bench``, one ``protocol.Task`` at a time (in this process, or in the child process
``lpt.benchmarking.worker`` starts): load a model (``load_entry``), time its forward pass and decoding
(``measure_runtime``, ``measure_interleaved``) or ``lpt prune``'s optimiser step (``measure_prune_step``), and the
ratios to the reference row (``relative_runtime``, ``relative_prune_step``). Rows follow ``schema``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from lpt import artifacts, lora, models, pruner
from lpt.arch import describe
from lpt.benchmarking import flops, shapes, timing
from lpt.benchmarking.memory import MemoryMeter
from lpt.benchmarking.protocol import Entry, PruneStepProtocol, RuntimeProtocol, StepRun, Task
from lpt.config import PruneConfig, check
from lpt.errors import LptError
from lpt.masks import Masks, apply_masks
from lpt.progress import progress_bar


def run(task: Task) -> Any:
    """Measure ``task``; returns what the stage collects (JSON values)."""
    if task.task == "runtime":
        return measure_runtime(task.entries[0], task.runtime)
    if task.task == "runtime-interleaved":
        return measure_interleaved(list(task.entries), task.runtime)
    if task.task == "prune-step":
        return measure_prune_step(task.entries[0], task.prune_step, task.run)
    raise LptError(f"unknown bench task {task.task!r}")


# ------------------------------------------------------------------------------------------------ loading
def _set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def _provenance(model: str | None) -> dict[str, Any] | None:
    if not model:
        return None
    f = Path(model) / artifacts.PROVENANCE
    if not f.is_file():
        return None
    try:
        doc = artifacts.read_json(f)
    except LptError:
        return None
    return doc if isinstance(doc, dict) else {"value": doc}


def _architecture(config) -> dict[str, Any]:
    try:
        a = describe(config)
    except LptError:
        return {"model_type": str(getattr(config, "model_type", "unknown"))}
    d = a.to_dict()
    if a.per_layer:
        d["layer_num_attention_heads"] = [a.heads(i) for i in range(a.num_layers)]
        d["layer_num_key_value_heads"] = [a.kv_heads(i) for i in range(a.num_layers)]
        d["layer_intermediate_size"] = [a.intermediate(i) for i in range(a.num_layers)]
    return d


def load_entry(entry: Entry, proto: RuntimeProtocol | PruneStepProtocol, device: str, with_adapter: bool = True,
               int8_backend: str | None = None):
    """Load (through ``models.load``) or build with random weights one model and its adapter; returns
    ``(model, ModelInfo)``. With ``int8_backend`` (prune-step's 8-bit rows) a checkpoint's projections are frozen in
    int8 as ``lpt prune --8bit`` loads them; random weights are quantized as they are made with ``torch``
    (``shapes.build_random_model``), so shapes whose 16-bit weights would not fit in memory can be timed in int8
    (with ``bitsandbytes`` the pruner quantizes them)."""
    dtype = models.resolve_dtype(proto.dtype, device)
    adapter = entry.adapter if with_adapter else None
    masks = entry.masks if with_adapter else None
    random_rank = shapes.random_adapter_rank(adapter) if adapter else 0
    layers = None
    if entry.random_init:
        cfg = shapes.make_config(shapes.parse_shape(entry.random_init))
        model = shapes.build_random_model(cfg, dtype, device, seed=proto.seed, int8=int8_backend == "torch")
        if (adapter and not random_rank) or masks:  # the one loader's policy: masks only when given with --masks
            layers, _, _ = models.attach(model, describe(model.config), adapter=adapter, masks=masks)
    else:
        real = None if random_rank else adapter
        loaded = models.load(entry.model, models.LoadOptions(
            dtype=proto.dtype, device=device, revision=proto.revision, trust_remote_code=proto.trust_remote_code,
            tokenizer=False, check_arch=True, adapter=real, masks=None if random_rank else masks,
            load_8bit=int8_backend is not None, int8_backend=int8_backend or "auto"))
        model, layers = loaded.model, loaded.layers
    if random_rank:
        arch = describe(model.config)
        layers = shapes.add_random_adapter(model, arch, random_rank, seed=proto.seed)
        if masks:
            apply_masks(model, Masks.load(masks, arch))
    rank = 0
    if adapter or masks:
        # LoRA runs in the model's dtype, as a deployed unmerged adapter would
        for layer in layers.values():
            if layer.r:
                layer.lora_A.to(dtype)
                layer.lora_B.to(dtype)
        rank = max((layer.r for layer in layers.values()), default=0)
        model.requires_grad_(False)
        model.eval()
    info = {
        "label": entry.label,
        "model": entry.model,
        "random_init": entry.random_init,
        "random_weights": bool(entry.random_init),
        "adapter": adapter,
        "unmerged": bool(adapter),
        "lora_rank": int(rank),
        "masks": str(masks) if masks else "none",
        "architecture": _architecture(model.config),
        "dtype": str(dtype).replace("torch.", ""),
        "params": int(sum(p.numel() for p in model.parameters())),
        "lora_params": int(lora.lora_param_count(model)),
        "provenance": _provenance(entry.model),
    }
    return model, info


# ------------------------------------------------------------------------------------------------ runtime
def _vocab(model) -> int:
    return int(model.get_input_embeddings().num_embeddings)


def _forward_logits_last(model, ids):
    try:
        return model(input_ids=ids, use_cache=True, logits_to_keep=1)
    except TypeError:  # a modeling file without logits_to_keep
        return model(input_ids=ids, use_cache=True)


def decode_seconds(model, ids, new_tokens: int, sync) -> float:
    """Seconds for ``new_tokens`` greedy decoding steps after prefilling ``ids`` (prefill not timed)."""
    out = _forward_logits_last(model, ids)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync()
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync()
    return time.perf_counter() - t0


def measure_runtime(entry: Entry, proto: RuntimeProtocol) -> dict[str, Any]:
    """Time one model at every batch size; returns ``{"model": ModelInfo, "rows": [RuntimeRow without relative]}``."""
    _set_threads(proto.threads)
    device = models.resolve_device(proto.device)
    meter = MemoryMeter(device)
    model, info = load_entry(entry, proto, device)
    seq_len = proto.seq_len
    fl = flops.model_flops(model, seq_len)
    sync = timing.synchronizer(device)
    gen = torch.Generator().manual_seed(proto.seed)
    vocab = _vocab(model)
    rows = []
    with progress_bar(transient=True) as bar, torch.inference_mode():
        for bs in proto.batch_sizes:
            ids = torch.randint(0, vocab, (bs, seq_len), generator=gen).to(device)
            task = bar.add_task(f"{entry.label} batch {bs}", total=proto.warmup + proto.trials)
            meter.reset()
            times = timing.time_calls(lambda: model(input_ids=ids, use_cache=False), warmup=proto.warmup,
                                      trials=proto.trials, sync=sync, on_call=lambda: bar.advance(task))
            peak = meter.peak()
            stats = timing.summarize(times)
            decode = None
            if proto.new_tokens > 0:
                dtask = bar.add_task(f"{entry.label} decode batch {bs}", total=1 + proto.decode_trials)
                meter.reset()
                dtimes = []
                for k in range(1 + proto.decode_trials):  # the first run is the warm-up
                    t = decode_seconds(model, ids, proto.new_tokens, sync)
                    if k:
                        dtimes.append(t)
                    bar.advance(dtask)
                dpeak = meter.peak()
                dstats = timing.summarize(dtimes)
                decode = {"prompt_tokens": seq_len, "new_tokens": proto.new_tokens, "seconds": dstats,
                          "tokens_per_s": bs * proto.new_tokens / dstats["median"], "peak_memory_bytes": dpeak}
            rows.append({
                "label": entry.label, "batch_size": bs, "seq_len": seq_len, "latency_s": stats,
                "tokens_per_s": bs * seq_len / stats["median"], "peak_memory_bytes": peak, "params": info["params"],
                "flops_per_token": fl, "decode": decode,
            })
    return {"model": info, "rows": rows}


def measure_interleaved(entries: list[Entry], proto: RuntimeProtocol) -> dict[str, dict[str, list[float]]]:
    """Forward latency of every model with all of them loaded, trials taken in turns; ``{label: {bs: [s, ...]}}``."""
    _set_threads(proto.threads)
    device = models.resolve_device(proto.device)
    loaded = [(e.label, load_entry(e, proto, device)[0]) for e in entries]
    sync = timing.synchronizer(device)
    out: dict[str, dict[str, list[float]]] = {label: {} for label, _ in loaded}
    with progress_bar(transient=True) as bar, torch.inference_mode():
        for bs in proto.batch_sizes:
            inputs = []
            for _, m in loaded:  # the same ids for every model (per vocabulary size)
                gen = torch.Generator().manual_seed(proto.seed)
                inputs.append(torch.randint(0, _vocab(m), (bs, proto.seq_len), generator=gen).to(device))
            turns = (proto.warmup + proto.trials) * len(loaded)
            task = bar.add_task(f"interleaved batch {bs}", total=turns)
            for _ in range(proto.warmup):
                for (_, m), ids in zip(loaded, inputs):
                    m(input_ids=ids, use_cache=False)
                    sync()
                    bar.advance(task)
            for label, _ in loaded:
                out[label][str(bs)] = []
            for _ in range(proto.trials):
                for (label, m), ids in zip(loaded, inputs):
                    sync()
                    t0 = time.perf_counter()
                    m(input_ids=ids, use_cache=False)
                    sync()
                    out[label][str(bs)].append(time.perf_counter() - t0)
                    bar.advance(task)
    return out


# ------------------------------------------------------------------------------------------------ prune step
def measure_prune_step(entry: Entry, proto: PruneStepProtocol, run: StepRun) -> dict[str, Any]:
    """Time ``lpt prune``'s optimiser step for one configuration; returns a PruneStepRow without ``relative``."""
    _set_threads(proto.threads)
    device = models.resolve_device(proto.device)
    torch.manual_seed(proto.seed)
    meter = MemoryMeter(device)
    backend = run.int8_backend if run.load_8bit else None
    model, info = load_entry(entry, proto, device, with_adapter=False, int8_backend=backend)
    arch = describe(model.config)
    crit = run.criterion
    total = proto.warmup + proto.trials + 1  # +1: the schedule's final step (masks to target) is never timed
    pc = PruneConfig(model=info["label"], dtype=proto.dtype, device=proto.device,
                     criterion="lora" if crit == "none" else crit, ratio=0.0 if crit == "none" else proto.ratio,
                     lora_r=proto.lora_r, lora_alpha=proto.lora_alpha, lora_dropout=0.0,
                     batch_size=proto.batch_size, micro_batch_size=proto.micro_batch_size,
                     gradient_checkpointing=proto.gradient_checkpointing, loss_head=proto.loss_head,
                     distill=proto.distill,
                     load_8bit=run.load_8bit, int8_backend=backend or "auto", warmup=0.0, cooldown=0.0,
                     max_steps=total, seed=proto.seed,
                     balance="proportional")  # the per-step cost: --balance search's one-time forwards are not timed
    check(pc)
    loop = pruner.Pruner(model, arch, pc, total_steps=total, model_name=info["label"])
    gen = torch.Generator().manual_seed(proto.seed)
    ids = torch.randint(0, _vocab(model), (proto.batch_size, proto.seq_len), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    sync = timing.synchronizer(device)
    with progress_bar(transient=True) as bar:
        task = bar.add_task(f"{run.label} steps", total=proto.warmup + proto.trials)
        meter.reset()
        times = timing.time_calls(lambda: loop.train_step(batch), warmup=proto.warmup, trials=proto.trials,
                                  sync=sync, on_call=lambda: bar.advance(task))
        peak = meter.peak()
    return {
        "label": run.label,
        "criterion": loop.criterion,
        "load_8bit": bool(run.load_8bit),
        "int8_backend": backend,
        "seconds_per_step": timing.summarize(times),
        "peak_memory_bytes": peak,
        "trainable_params": int(sum(p.numel() for p in loop.params)),
        "gradient_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "params": int(sum(p.numel() for p in model.parameters())),
        "_model": info,
    }


# ------------------------------------------------------------------------------------------------ ratios
def relative_runtime(rows: list[dict[str, Any]]) -> None:
    """Fill ``relative`` of every row: ratios to the first row with the same batch size."""
    ref: dict[int, dict[str, Any]] = {}
    for r in rows:
        f = ref.setdefault(r["batch_size"], r)
        r["relative"] = {
            "latency": timing.ratio(r["latency_s"]["median"], f["latency_s"]["median"]),
            "tokens_per_s": timing.ratio(r["tokens_per_s"], f["tokens_per_s"]),
            "peak_memory": timing.ratio(r["peak_memory_bytes"], f["peak_memory_bytes"]),
            "params": timing.ratio(r["params"], f["params"]),
            "flops_per_token": timing.ratio(r["flops_per_token"]["total"], f["flops_per_token"]["total"]),
        }


def relative_prune_step(rows: list[dict[str, Any]]) -> None:
    """Fill ``relative`` of every row: ratios to the first row."""
    if not rows:
        return
    f = rows[0]
    for r in rows:
        r["relative"] = {"seconds_per_step": timing.ratio(r["seconds_per_step"]["median"],
                                                          f["seconds_per_step"]["median"]),
                         "peak_memory": timing.ratio(r["peak_memory_bytes"], f["peak_memory_bytes"])}
