"""``lpt bench``: inference runtime of dense, unmerged and merged models, and the cost of a pruning step.

``runtime``: forward latency over ``seq_len`` tokens per model and batch size (optionally decode throughput), peak
memory, parameters and FLOPs per token, relative to the first model (the layout of the paper's Table 3).
``prune-step``: seconds per optimiser step and peak memory of ``lpt prune``'s training step for each criterion,
with and without int8 base weights (the paper's Table 4).

Each configuration is measured in its own child process (``python -m lpt.benchmarking.worker``) unless
``isolate`` is off, so the peak resident set size of one model never leaks into the next. Results are one JSON
file (schema: ``lpt.benchmarking.schema``), a rich table, and a PNG with ``plot``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from lpt import artifacts
from lpt.config import BenchRuntimeConfig, BenchPruneStepConfig  # noqa: F401  (configs live in lpt.config)
from lpt.errors import LptError

NO_ADAPTER = ("-", "none", "")
PAPER_TABLE3 = ("LoRAPrune Table 3 (LLaMA-7B, 2048 tokens): dense merged 0.105 s, dense unmerged 0.184 s, 20% pruned "
                "merged 0.079 s, 50% pruned merged 0.053 s, 50% pruned unmerged 0.089 s")
PAPER_TABLE4 = ("LoRAPrune Table 4 (LLaMA-7B at 50%, batch 128 by accumulation, A100): vanilla 38.87 s / 38.6 GB; "
                "LoRA-guided 14.13 s / 18.3 GB; LoRA-guided 8-bit 15.63 s / 13.8 GB per iteration")


# ------------------------------------------------------------------------------------------------ configs
# ------------------------------------------------------------------------------------------------ pure helpers
def int_list(values: Iterable[Any], flag: str) -> list[int]:
    """[1, '4,16'] -> [1, 4, 16]; every value positive."""
    out: list[int] = []
    for v in values if not isinstance(values, (int, str)) else [values]:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                n = int(part)
            except ValueError:
                raise LptError(f"{flag}: '{part}' is not an integer") from None
            if n <= 0:
                raise LptError(f"{flag} must be positive (got {n})")
            out.append(n)
    if not out:
        raise LptError(f"{flag}: give at least one value")
    return out


def auto_label(model: str | None, random_init: str | None, adapter: str | None) -> str:
    if random_init:
        base = random_init
        if random_init.lstrip().startswith("{"):  # inline JSON: keep only the ratio suffix
            tail = random_init.rsplit("}", 1)[-1].strip()
            base = "random-init" + (tail if tail.startswith("@") else "")
    else:
        p = Path(str(model).rstrip("/"))
        base = p.stem if p.suffix == ".gguf" else (p.name or str(model))
    if adapter:
        if adapter.startswith("random:"):
            return f"{base} + LoRA r{adapter.split(':', 1)[1]}"
        return f"{base} + {Path(adapter.rstrip('/')).name or adapter}"
    return base


def build_entries(cfg: BenchRuntimeConfig) -> list[dict[str, Any]]:
    """One dict per model to time: label, model, random_init, adapter (validated pairing of the lists)."""
    pairs: list[tuple[str | None, str | None]] = [(m, None) for m in cfg.models]
    pairs += [(None, r) for r in cfg.random_init]
    if not pairs:
        pairs = [(cfg.model, None)]
    n = len(pairs)
    adapters = list(cfg.adapter)
    if adapters and len(adapters) != n:
        raise LptError(f"give one --adapter per model ({n} model(s), {len(adapters)} --adapter); use - for none")
    adapters = [None if a is None or str(a).strip().lower() in NO_ADAPTER else str(a) for a in adapters] or [None] * n
    if cfg.label and len(cfg.label) != n:
        raise LptError(f"give one --label per model ({n} model(s), {len(cfg.label)} --label)")
    masks = list(cfg.masks)
    if masks and len(masks) != n:
        raise LptError(f"give one --masks per model ({n} model(s), {len(masks)} --masks); use - for none")
    masks = [None if m is None or str(m).strip().lower() in NO_ADAPTER else str(m) for m in masks] or [None] * n
    for m in masks:
        if m is not None and not Path(m).is_file():
            raise LptError(f"masks file not found: {m}")
    labels = list(cfg.label) or [auto_label(m, r, a) for (m, r), a in zip(pairs, adapters)]
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):
        if lab in seen:
            seen[lab] += 1
            labels[i] = f"{lab} ({seen[lab]})"
        else:
            seen[lab] = 1
    return [{"label": lab, "model": m, "random_init": r, "adapter": a, "masks": k}
            for lab, (m, r), a, k in zip(labels, pairs, adapters, masks)]


def prune_step_configs(criteria: Iterable[str], plain_lora: bool, load_8bit: bool, backends: Iterable[str] = ("auto",)
                       ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """(configurations to time, skipped ones with the reason) in table order; one 8-bit row per int8 backend
    (labelled ``... 8-bit (BACKEND)`` when there are several)."""
    backends = list(dict.fromkeys(backends)) or ["auto"]
    from lpt import criteria as crit

    names = []
    for c in criteria:
        for part in str(c).split(","):
            part = part.strip()
            if part and part not in names:
                names.append(part)
    bad = [c for c in names if c not in crit.CRITERIA]
    if bad:
        raise LptError(f"unknown --criterion '{bad[0]}' (use {', '.join(crit.CRITERIA)})")
    if not names and not plain_lora:
        raise LptError("nothing to time: give --criterion and/or --plain-lora")
    runs, skipped = [], []
    for c in names + (["none"] if plain_lora else []):
        base = "plain LoRA" if c == "none" else c
        runs.append({"label": base, "criterion": c, "load_8bit": False, "int8_backend": None})
        for b in backends if load_8bit else ():
            label = f"{base} 8-bit" + (f" ({b})" if len(backends) > 1 else "")
            if c == "vanilla":
                skipped.append({"label": label, "reason": "vanilla needs the gradients of the base weights, which "
                                                          "int8 weights do not have"})
            else:
                runs.append({"label": label, "criterion": c, "load_8bit": True, "int8_backend": b})
    return runs, skipped


def relative_runtime(rows: list[dict[str, Any]]) -> None:
    """Fill ``relative`` of every row: ratios to the first row with the same batch size."""
    from lpt.benchmarking.timing import ratio

    ref: dict[int, dict[str, Any]] = {}
    for r in rows:
        f = ref.setdefault(r["batch_size"], r)
        r["relative"] = {
            "latency": ratio(r["latency_s"]["median"], f["latency_s"]["median"]),
            "tokens_per_s": ratio(r["tokens_per_s"], f["tokens_per_s"]),
            "peak_memory": ratio(r["peak_memory_bytes"], f["peak_memory_bytes"]),
            "params": ratio(r["params"], f["params"]),
            "flops_per_token": ratio(r["flops_per_token"]["total"], f["flops_per_token"]["total"]),
        }


def relative_prune_step(rows: list[dict[str, Any]]) -> None:
    from lpt.benchmarking.timing import ratio

    if not rows:
        return
    f = rows[0]
    for r in rows:
        r["relative"] = {"seconds_per_step": ratio(r["seconds_per_step"]["median"], f["seconds_per_step"]["median"]),
                         "peak_memory": ratio(r["peak_memory_bytes"], f["peak_memory_bytes"])}


# ------------------------------------------------------------------------------------------------ measuring
def _set_threads(n: int) -> None:
    import torch

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
    from lpt.arch import describe

    try:
        a = describe(config)
    except LptError:
        return {"model_type": str(getattr(config, "model_type", "unknown"))}
    d = a.to_dict()
    d["vocab_size"] = a.vocab_size
    d["tie_word_embeddings"] = a.tie_word_embeddings
    if a.layer_heads or a.layer_kv_heads or a.layer_intermediate:
        d["layer_num_attention_heads"] = [a.heads(i) for i in range(a.num_layers)]
        d["layer_num_key_value_heads"] = [a.kv_heads(i) for i in range(a.num_layers)]
        d["layer_intermediate_size"] = [a.intermediate(i) for i in range(a.num_layers)]
    return d


def load_entry(entry: dict[str, Any], proto: dict[str, Any], device: str, with_adapter: bool = True,
               int8_backend: str | None = None):
    """Load (or build with random weights) one model and its adapter; returns ``(model, ModelInfo)``. With
    ``int8_backend`` ``torch`` random weights are quantized as they are made (``shapes.build_random_model``), so
    shapes whose 16-bit weights would not fit in memory can be timed in int8."""
    from lpt import groups, lora, models
    from lpt.arch import describe
    from lpt.benchmarking import shapes

    dtype = models.resolve_dtype(proto["dtype"], device)
    if entry.get("random_init"):
        cfg = shapes.make_config(shapes.parse_shape(entry["random_init"]))
        model = shapes.build_random_model(cfg, dtype, device, seed=proto["seed"],
                                          int8=int8_backend == "torch")
    else:
        model, _ = models.load_model(entry["model"], dtype=proto["dtype"], device=device,
                                     revision=proto.get("revision"), trust_remote_code=proto["trust_remote_code"],
                                     tokenizer=False)
    adapter = entry.get("adapter") if with_adapter else None
    masks = entry.get("masks") if with_adapter else None
    rank = 0
    if adapter or masks:
        arch = describe(model.config)
        r = shapes.random_adapter_rank(adapter) if adapter else 0
        if r:
            layers = shapes.add_random_adapter(model, arch, r, seed=proto["seed"])
            if masks:
                groups.apply_masks(model, groups.Masks.load(masks, arch))
        else:  # the one loader's policy: masks only when given with --masks
            layers, _, _ = models.attach(model, arch, adapter=adapter, masks=masks)
        # LoRA runs in the model's dtype, as a deployed unmerged adapter would
        for layer in layers.values():
            if layer.r:
                layer.lora_A.to(dtype)
                layer.lora_B.to(dtype)
        rank = max((layer.r for layer in layers.values()), default=0)
        model.requires_grad_(False)
        model.eval()
    lora_params = lora.lora_param_count(model)
    info = {
        "label": entry["label"],
        "model": entry.get("model"),
        "random_init": entry.get("random_init"),
        "random_weights": bool(entry.get("random_init")),
        "adapter": adapter,
        "unmerged": bool(adapter),
        "lora_rank": int(rank),
        "masks": str(masks) if masks else "none",
        "architecture": _architecture(model.config),
        "dtype": str(dtype).replace("torch.", ""),
        "params": int(sum(p.numel() for p in model.parameters())),
        "lora_params": int(lora_params),
        "provenance": _provenance(entry.get("model")),
    }
    return model, info


def _vocab(model) -> int:
    return int(model.get_input_embeddings().num_embeddings)


def _forward_logits_last(model, ids):
    try:
        return model(input_ids=ids, use_cache=True, logits_to_keep=1)
    except TypeError:  # a modeling file without logits_to_keep
        return model(input_ids=ids, use_cache=True)


def decode_seconds(model, ids, new_tokens: int, sync) -> float:
    """Seconds for ``new_tokens`` greedy decoding steps after prefilling ``ids`` (prefill not timed)."""
    import time

    out = _forward_logits_last(model, ids)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync()
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync()
    return time.perf_counter() - t0


def measure_runtime(entry: dict[str, Any], proto: dict[str, Any]) -> dict[str, Any]:
    """Time one model at every batch size; returns ``{"model": ModelInfo, "rows": [RuntimeRow without relative]}``."""
    import torch

    from lpt import models
    from lpt.benchmarking import flops, timing
    from lpt.benchmarking.memory import MemoryMeter
    from lpt.progress import progress_bar

    _set_threads(proto["threads"])
    device = models.resolve_device(proto["device"])
    meter = MemoryMeter(device)
    model, info = load_entry(entry, proto, device)
    seq_len = proto["seq_len"]
    fl = flops.model_flops(model, seq_len)
    sync = timing.synchronizer(device)
    gen = torch.Generator().manual_seed(proto["seed"])
    vocab = _vocab(model)
    rows = []
    with progress_bar(transient=True) as bar, torch.inference_mode():
        for bs in proto["batch_sizes"]:
            ids = torch.randint(0, vocab, (bs, seq_len), generator=gen).to(device)
            task = bar.add_task(f"{entry['label']} batch {bs}", total=proto["warmup"] + proto["trials"])
            meter.reset()
            times = timing.time_calls(lambda: model(input_ids=ids, use_cache=False), warmup=proto["warmup"],
                                      trials=proto["trials"], sync=sync, on_call=lambda: bar.advance(task))
            peak = meter.peak()
            stats = timing.summarize(times)
            decode = None
            if proto["new_tokens"] > 0:
                dtask = bar.add_task(f"{entry['label']} decode batch {bs}", total=1 + proto["decode_trials"])
                meter.reset()
                dtimes = []
                for k in range(1 + proto["decode_trials"]):  # the first run is the warm-up
                    t = decode_seconds(model, ids, proto["new_tokens"], sync)
                    if k:
                        dtimes.append(t)
                    bar.advance(dtask)
                dpeak = meter.peak()
                dstats = timing.summarize(dtimes)
                decode = {"prompt_tokens": seq_len, "new_tokens": proto["new_tokens"], "seconds": dstats,
                          "tokens_per_s": bs * proto["new_tokens"] / dstats["median"], "peak_memory_bytes": dpeak}
            rows.append({
                "label": entry["label"], "batch_size": bs, "seq_len": seq_len, "latency_s": stats,
                "tokens_per_s": bs * seq_len / stats["median"], "peak_memory_bytes": peak, "params": info["params"],
                "flops_per_token": fl, "decode": decode,
            })
    return {"model": info, "rows": rows}


def measure_interleaved(entries: list[dict[str, Any]], proto: dict[str, Any]
                        ) -> dict[str, dict[str, list[float]]]:
    """Forward latency of every model with all of them loaded, trials taken in turns; ``{label: {bs: [s, ...]}}``."""
    import time

    import torch

    from lpt import models
    from lpt.benchmarking import timing
    from lpt.progress import progress_bar

    _set_threads(proto["threads"])
    device = models.resolve_device(proto["device"])
    loaded = [(e["label"], load_entry(e, proto, device)[0]) for e in entries]
    sync = timing.synchronizer(device)
    out: dict[str, dict[str, list[float]]] = {label: {} for label, _ in loaded}
    with progress_bar(transient=True) as bar, torch.inference_mode():
        for bs in proto["batch_sizes"]:
            inputs = []
            for _, m in loaded:  # the same ids for every model (per vocabulary size)
                gen = torch.Generator().manual_seed(proto["seed"])
                inputs.append(torch.randint(0, _vocab(m), (bs, proto["seq_len"]), generator=gen).to(device))
            turns = (proto["warmup"] + proto["trials"]) * len(loaded)
            task = bar.add_task(f"interleaved batch {bs}", total=turns)
            for _ in range(proto["warmup"]):
                for (_, m), ids in zip(loaded, inputs):
                    m(input_ids=ids, use_cache=False)
                    sync()
                    bar.advance(task)
            for label, _ in loaded:
                out[label][str(bs)] = []
            for _ in range(proto["trials"]):
                for (label, m), ids in zip(loaded, inputs):
                    sync()
                    t0 = time.perf_counter()
                    m(input_ids=ids, use_cache=False)
                    sync()
                    out[label][str(bs)].append(time.perf_counter() - t0)
                    bar.advance(task)
    return out


def measure_prune_step(entry: dict[str, Any], proto: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """Time ``lpt prune``'s optimiser step for one configuration; returns a PruneStepRow without ``relative``."""
    import torch

    from lpt import models
    from lpt.arch import describe
    from lpt.benchmarking import timing
    from lpt.benchmarking.memory import MemoryMeter
    from lpt.config import PruneConfig
    from lpt.progress import progress_bar
    from lpt.pruner import Pruner
    from lpt.stages import prune

    _set_threads(proto["threads"])
    device = models.resolve_device(proto["device"])
    torch.manual_seed(proto["seed"])
    meter = MemoryMeter(device)
    backend = run.get("int8_backend") if run["load_8bit"] else None
    model, info = load_entry(entry, proto, device, with_adapter=False, int8_backend=backend)
    arch = describe(model.config)
    crit = run["criterion"]
    total = proto["warmup"] + proto["trials"] + 1  # +1: the schedule's final step (masks to target) is never timed
    pc = PruneConfig(model=info["label"], dtype=proto["dtype"], device=proto["device"],
                     criterion="lora" if crit == "none" else crit, ratio=0.0 if crit == "none" else proto["ratio"],
                     lora_r=proto["lora_r"], lora_alpha=proto["lora_alpha"], lora_dropout=0.0,
                     batch_size=proto["batch_size"], micro_batch_size=proto["micro_batch_size"],
                     gradient_checkpointing=proto.get("gradient_checkpointing", False),
                     loss_head=proto.get("loss_head", True),
                     distill=proto.get("distill", False),
                     load_8bit=run["load_8bit"], int8_backend=backend or "auto", warmup=0.0, cooldown=0.0, max_steps=total, seed=proto["seed"],
                     balance="proportional")  # the per-step cost: --balance search's one-time forwards are not timed
    prune.validate(pc)
    pruner = Pruner(model, arch, pc, total_steps=total, model_name=info["label"])
    gen = torch.Generator().manual_seed(proto["seed"])
    ids = torch.randint(0, _vocab(model), (proto["batch_size"], proto["seq_len"]), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    sync = timing.synchronizer(device)
    with progress_bar(transient=True) as bar:
        task = bar.add_task(f"{run['label']} steps", total=proto["warmup"] + proto["trials"])
        meter.reset()
        times = timing.time_calls(lambda: pruner.train_step(batch), warmup=proto["warmup"], trials=proto["trials"],
                                  sync=sync, on_call=lambda: bar.advance(task))
        peak = meter.peak()
    return {
        "label": run["label"],
        "criterion": pruner.criterion,
        "load_8bit": bool(run["load_8bit"]),
        "int8_backend": backend,
        "seconds_per_step": timing.summarize(times),
        "peak_memory_bytes": peak,
        "trainable_params": int(sum(p.numel() for p in pruner.params)),
        "gradient_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "params": int(sum(p.numel() for p in model.parameters())),
        "_model": info,
    }


# ------------------------------------------------------------------------------------------------ isolation
def in_child(task: str, payload: dict[str, Any], label: str) -> dict[str, Any]:
    """Run one measurement in a fresh Python process (``python -m lpt.benchmarking.worker``); returns its result.

    Its progress bars go to this terminal; a failure becomes one ``LptError`` line naming the configuration.
    """
    with tempfile.TemporaryDirectory(prefix="lpt-bench-") as d:
        spec, result = Path(d) / "spec.json", Path(d) / "result.json"
        artifacts.write_json(spec, {"task": task, **payload})
        proc = subprocess.run([sys.executable, "-m", "lpt.benchmarking.worker", str(spec), str(result)],
                              env=dict(os.environ), check=False)
        doc = artifacts.read_json(result) if result.is_file() else None
    if proc.returncode in (130, -signal.SIGINT):
        raise KeyboardInterrupt
    if doc is None:
        how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else
               f"exited with code {proc.returncode}")
        raise LptError(f"{label}: the measuring process {how} without a result (out of memory?)")
    if "error" in doc:
        raise LptError(f"{label}: {doc['error']}")
    return doc["result"]


def worker_main(spec: dict[str, Any]) -> dict[str, Any]:
    """What the child process runs (also callable in-process)."""
    if spec["task"] == "runtime":
        return measure_runtime(spec["entry"], spec["proto"])
    if spec["task"] == "runtime-interleaved":
        return measure_interleaved(spec["entries"], spec["proto"])
    if spec["task"] == "prune-step":
        return measure_prune_step(spec["entry"], spec["proto"], spec["run"])
    raise LptError(f"unknown bench task {spec['task']!r}")


def _measure(isolate: bool, task: str, payload: dict[str, Any], label: str) -> dict[str, Any]:
    if isolate:
        return in_child(task, payload, label)
    return worker_main({"task": task, **payload})


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
        from lpt.benchmarking.plot import _pyplot

        _pyplot()  # fail now, not after the measurements, when matplotlib is missing
    return out, png


def _write(doc: dict[str, Any], out: Path, png: Path | None, overwrite: bool, plot_fn) -> None:
    with artifacts.atomic_file(out, overwrite=overwrite) as tmp:
        artifacts.write_json(tmp, doc)
        if png is not None:
            with artifacts.atomic_file(png, overwrite=overwrite) as tmp_png:
                plot_fn(doc, tmp_png)


def _header(kind: str, device: str, threads: int, cfg: Any) -> dict[str, Any]:
    import lpt
    from lpt.benchmarking import schema
    from lpt.benchmarking.env import hardware

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
    from lpt import models
    from lpt.benchmarking import flops, plot, report, schema, timing
    from lpt.benchmarking.memory import MemoryMeter
    from rich.markup import escape

    from lpt.progress import console

    if cfg.seq_len <= 0:
        raise LptError(f"--seq-len must be positive (got {cfg.seq_len})")
    if cfg.trials < 0 or cfg.warmup < 0 or cfg.new_tokens < 0 or cfg.decode_trials < 0 or cfg.threads < 0:
        raise LptError("--trials, --warmup, --new-tokens, --decode-trials and --threads must not be negative")
    batch_sizes = int_list(cfg.batch_size, "--batch-size")
    entries = build_entries(cfg)
    for e in entries:  # parse shapes and adapter specs before any model is loaded
        if e["random_init"]:
            from lpt.benchmarking.shapes import parse_shape

            parse_shape(e["random_init"])
        if e["adapter"] and not e["adapter"].startswith("random:") and not Path(e["adapter"]).is_dir():
            raise LptError(f"--adapter {e['adapter']}: not a directory")
        if e["adapter"]:
            from lpt.benchmarking.shapes import random_adapter_rank

            random_adapter_rank(e["adapter"])
        if e["model"]:
            models.resolve(e["model"])
    out, png = _outputs(cfg.output, cfg.plot, cfg.overwrite)
    device = models.resolve_device(cfg.device)
    models.resolve_dtype(cfg.dtype, device)
    cuda = device.startswith("cuda")
    trials = cfg.trials or (100 if cuda else 10)
    decode_trials = cfg.decode_trials or min(trials, 10)
    proto = {"dtype": cfg.dtype, "device": device, "revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code,
             "seq_len": cfg.seq_len, "batch_sizes": batch_sizes, "trials": trials, "warmup": cfg.warmup,
             "new_tokens": cfg.new_tokens, "decode_trials": decode_trials, "threads": cfg.threads, "seed": cfg.seed}
    # with --interleave, the per-model pass measures memory (one forward) and decode; latency comes after
    per_model = {**proto, "trials": 1, "warmup": 0} if cfg.interleave else proto
    infos, rows = [], []
    for i, e in enumerate(entries, 1):
        what = "measuring memory of" if cfg.interleave else "timing"
        console.print(f"[{i}/{len(entries)}] {what} {escape(e['label'])}", markup=True)
        res = _measure(cfg.isolate, "runtime", {"entry": e, "proto": per_model}, e["label"])
        infos.append(res["model"])
        rows.extend(res["rows"])
    if cfg.interleave:
        console.print(f"timing {len(entries)} models in turns")
        times = _measure(cfg.isolate, "runtime-interleaved", {"entries": entries, "proto": proto}, "interleaved timing")
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
    _write(doc, out, png, cfg.overwrite, plot.plot_runtime)
    report.show(console, report.runtime_table(doc))
    console.print(f"wrote {out}" + (f" and {png}" if png else ""))
    return out


def run_prune_step(cfg: BenchPruneStepConfig) -> Path:
    from lpt import models
    from lpt.benchmarking import plot, report, schema, timing
    from lpt.benchmarking.memory import MemoryMeter
    from rich.markup import escape

    from lpt.progress import console

    if cfg.model and cfg.random_init:
        raise LptError("give MODEL or --random-init, not both")
    for name in ("seq_len", "batch_size", "trials", "lora_r"):
        if getattr(cfg, name) <= 0:
            raise LptError(f"--{name.replace('_', '-')} must be positive (got {getattr(cfg, name)})")
    if cfg.warmup < 0 or cfg.micro_batch_size < 0 or cfg.threads < 0:
        raise LptError("--warmup, --micro-batch-size and --threads must not be negative")
    if not 0.0 < cfg.ratio < 1.0:
        raise LptError(f"--ratio must be in (0, 1) (got {cfg.ratio})")
    micro = cfg.micro_batch_size or cfg.batch_size
    if cfg.batch_size % micro:
        raise LptError(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size {micro}")
    from lpt.int8 import resolve_backend

    device = models.resolve_device(cfg.device)
    backends = [resolve_backend(b, device) for part in cfg.int8_backend for b in str(part).split(",") if b.strip()]
    runs, skipped = prune_step_configs(cfg.criterion, cfg.plain_lora, cfg.load_8bit, backends)
    if cfg.random_init:
        from lpt.benchmarking.shapes import parse_shape

        parse_shape(cfg.random_init)
        model_arg = None
    else:
        model_arg = cfg.model or models.SMOLLM2_ALIAS
        models.resolve(model_arg)
    out, png = _outputs(cfg.output, cfg.plot, cfg.overwrite)
    device = models.resolve_device(cfg.device)
    models.resolve_dtype(cfg.dtype, device)
    entry = {"label": auto_label(model_arg, cfg.random_init, None), "model": model_arg,
             "random_init": cfg.random_init, "adapter": None}
    proto = {"dtype": cfg.dtype, "device": device, "revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code,
             "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "micro_batch_size": micro, "ratio": cfg.ratio,
             "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "trials": cfg.trials, "warmup": cfg.warmup,
             "threads": cfg.threads, "seed": cfg.seed, "gradient_checkpointing": cfg.gradient_checkpointing,
             "loss_head": cfg.loss_head,
             "distill": cfg.distill}
    rows = []
    for i, run in enumerate(runs, 1):
        console.print(f"[{i}/{len(runs)}] timing {escape(run['label'])}", markup=True)
        rows.append(_measure(cfg.isolate, "prune-step", {"entry": entry, "proto": proto, "run": run}, run["label"]))
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
    _write(doc, out, png, cfg.overwrite, plot.plot_prune_step)
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
