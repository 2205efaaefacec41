"""``lpt prune``: iterative structured pruning with joint LoRA fine-tuning (Algorithm 1 of LoRAPrune).

This module is the loop only: LoRA training, when to score, when to grow the masks, checkpoints. How a group is
scored lives in ``lpt.importance`` (estimators) and ``lpt.criteria`` (math); which groups are cut in
``lpt.groups``; the sparsity schedule and moving average in ``lpt.schedule``; the losses in ``lpt.losses``.

Output directory:
  adapter_config.json, adapter_model.safetensors   the LoRA adapter in PEFT's format (for the unpruned base)
  masks.json                                       kept heads / channels per layer (the contract with slice)
  importance.safetensors                           moving-average group scores (layers.N.heads / .channels)
  log.jsonl                                        one line per logged optimiser step
  lpt_config.json                                  the resolved configuration and library versions
While running, checkpoints (``--save-every``) live in ``OUTPUT.partial/checkpoint`` (safetensors + JSON);
``--resume`` continues from there. Under torchrun / accelerate launch the run is data parallel (equal to one process
with the same global batch) and only rank 0 writes; ``--device-map`` spreads one model over several devices.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Iterable

import torch

from lpt import artifacts, checkpoint, distributed, groups, importance, lora, losses, schedule
from lpt.arch import PROJECTIONS, Arch
from lpt.benchmarking.memory import peak_memory_bytes
from lpt.config import PROJECTION_LIST, CalibrateConfig, PruneConfig
from lpt.errors import LptError
from lpt.groups import parse_layers  # noqa: F401  (public here since 0.1)
from lpt.schedule import batch_indices  # noqa: F401  (public here since 0.1)

PAPER_DATA = "MBZUAI/LaMini-instruction"


def validate(cfg: PruneConfig) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise LptError(msg)

    choices = (("criterion", importance.CRITERIA), ("score", ("square", "abs")), ("gqa", groups.GQA_MODES),
               ("layout", groups.LAYOUTS), ("normalize_by", importance.NORMALIZE))
    for name, allowed in choices:
        need(getattr(cfg, name) in allowed,
             f"unknown --{name.replace('_', '-')} '{getattr(cfg, name)}' (use {', '.join(allowed)})")
    need(0.0 <= cfg.ratio < 1.0, f"--ratio must be in [0, 1) (got {cfg.ratio})")
    need(not (cfg.criterion == "vanilla" and cfg.load_8bit),
         "--criterion vanilla needs the gradients of the base weights, which int8 weights do not have; drop --8bit "
         "or use --criterion lora or fisher")
    need(cfg.lora_r > 0, f"--lora-r must be positive (got {cfg.lora_r})")
    need(cfg.batch_size > 0 and cfg.micro_batch_size > 0, "--batch-size and --micro-batch-size must be positive")
    need(cfg.batch_size % cfg.micro_batch_size == 0,
         f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size {cfg.micro_batch_size}")
    need(0.0 <= cfg.ema < 1.0, f"--ema must be in [0, 1) (got {cfg.ema})")
    need(cfg.prune_freq > 0, f"--prune-freq must be positive (got {cfg.prune_freq})")
    need(0.0 <= cfg.warmup < 1.0 and 0.0 <= cfg.cooldown < 1.0 and cfg.warmup + cfg.cooldown < 1.0,
         "--warmup and --cooldown must be fractions in [0, 1) with warmup + cooldown < 1")
    need(cfg.epochs > 0 or cfg.max_steps > 0, "give --epochs > 0 or --max-steps > 0")
    need(cfg.lr > 0, f"--lr must be positive (got {cfg.lr})")
    need(cfg.distill_temperature > 0, f"--distill-temperature must be positive (got {cfg.distill_temperature})")
    need(0.0 <= cfg.distill_weight <= 1.0, f"--distill-weight must be in [0, 1] (got {cfg.distill_weight})")
    need(not (cfg.distill and cfg.distill_weight == 1.0 and cfg.ratio > 0 and not cfg.one_shot
              and importance.ESTIMATORS[cfg.criterion].needs_backward),
         f"--distill-weight 1 leaves --criterion {cfg.criterion} no gradient to score with (the KL's gradient is "
         f"zero while the student equals the teacher); use a weight below 1 or --one-shot")
    bad = [t for t in targets(cfg) if t not in PROJECTIONS]
    need(not bad, f"unknown --targets {', '.join(bad)} (choose from {PROJECTION_LIST})")


def targets(cfg: PruneConfig) -> list[str]:
    return [t.strip() for t in cfg.targets.split(",") if t.strip()]


def default_data(cfg: PruneConfig) -> str:
    from lpt.models import resolve

    return cfg.data or ("builtin:pydoc:train" if resolve(cfg.model).local else PAPER_DATA)


class Pruner:
    """Algorithm 1 around a loaded model: LoRA training, scoring, moving average, schedule and masks.

    ``train_step(batch)`` runs one optimiser step (accumulating micro-batches) and grows the masks when the
    schedule says so. ``ratio=0`` is plain LoRA fine-tuning (criterion ``none``), for cost comparisons.
    """

    def __init__(self, model, arch: Arch, cfg: PruneConfig, total_steps: int, model_name: str | None = None):
        self.model, self.arch, self.cfg, self.total_steps = model, arch, cfg, total_steps
        self.model_name = model_name or cfg.model
        self.criterion = cfg.criterion if cfg.ratio > 0 else "none"
        quantize = cfg.load_8bit and not any(lora.is_int8(m) for m in model.modules())  # not quantized on load
        self.layers = lora.inject(model, arch, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                  targets=targets(cfg), load_8bit=quantize)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.params = [p for layer in self.layers.values() if layer.r for p in (layer.lora_A.weight, layer.lora_B.weight)]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        from transformers import get_cosine_schedule_with_warmup

        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, int(round(cfg.lr_warmup * total_steps)), total_steps)
        self.skip = groups.parse_layers(cfg.skip_layers, arch.num_layers)
        self.layout = "per-layer" if self.skip else cfg.layout
        self.prunable = [i for i in range(arch.num_layers) if i not in self.skip]
        self.estimator = None
        if self.criterion != "none":
            self.estimator = importance.make(self.criterion, score=cfg.score, seed=cfg.seed,
                                             normalize=cfg.normalize_by if cfg.normalize else None)
            self.estimator.attach(model, arch, gqa=cfg.gqa, layers=self.prunable)
        n_units = groups.head_units(arch, cfg.gqa) if cfg.gqa == "kv-groups" else arch.num_heads
        self.heads_pruned = [torch.zeros(n_units, dtype=torch.bool) for _ in range(arch.num_layers)]
        self.channels_pruned = [torch.zeros(arch.intermediate_size, dtype=torch.bool) for _ in range(arch.num_layers)]
        self.ema_heads: list[torch.Tensor | None] = [None] * arch.num_layers
        self.ema_channels: list[torch.Tensor | None] = [None] * arch.num_layers
        self.step, self.target_sparsity, self.sparsity = 0, 0.0, 0.0
        self.ramp = schedule.ramp_bounds(total_steps, cfg.warmup, cfg.cooldown)
        self.final = groups.uniform_counts(arch, groups.layer_ratio(arch, cfg.ratio, self.prunable), cfg.gqa)
        self.device = self.params[0].device
        self.distributed = distributed.is_initialized() and distributed.world_size() > 1
        if self.distributed:  # every rank starts from rank 0's LoRA factors (as DDP does)
            distributed.broadcast_([p.detach() for p in self.params])

    # ---------------------------------------------------------------- scores and masks
    def group_importance(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """The estimator's (heads, channels) scores of every prunable layer, identical on every rank."""
        out = self.estimator.scores(self.step)
        if self.distributed:  # rank 0's copy, so float rounding can never split a mask decision
            flat = [torch.cat(out[i]).to(self.device) for i in self.prunable]
            distributed.broadcast_(flat)
            for i, f in zip(self.prunable, flat):
                out[i] = (f[:out[i][0].numel()].cpu(), f[out[i][0].numel():].cpu())
        return out

    def update_ema(self, scores) -> None:
        for i in self.prunable:
            self.ema_heads[i] = schedule.ema(self.ema_heads[i], scores[i][0], self.cfg.ema)
            self.ema_channels[i] = schedule.ema(self.ema_channels[i], scores[i][1], self.cfg.ema)

    def prune_to(self, sparsity: float) -> None:
        """Grow the pruned sets (never shrink them) towards ``sparsity`` of the block parameters."""
        frac = min(1.0, sparsity / self.cfg.ratio) if self.cfg.ratio > 0 else 0.0
        kv = self.arch.num_kv_heads
        counts = groups.step_counts(frac, self.final, self.layout, self.prunable, self.arch.num_layers,
                                    self.ema_heads, self.ema_channels, self.heads_pruned, self.channels_pruned,
                                    kv if self.cfg.gqa == "query-heads" else None)
        self.heads_pruned, self.channels_pruned = groups.grow_masks(
            counts, self.prunable, self.ema_heads, self.ema_channels, self.heads_pruned, self.channels_pruned,
            self.cfg.gqa, kv)
        self._apply_masks()

    def _apply_masks(self) -> None:
        masks = self.masks()
        groups.apply_masks(self.model, masks)
        before, after = masks.block_params()
        self.sparsity = 1.0 - after / before

    def masks(self) -> groups.Masks:
        return groups.Masks.from_pruned(self.arch, self.heads_pruned, self.channels_pruned, self.cfg.gqa,
                                        layout=self.layout, model=self.model_name)

    # ---------------------------------------------------------------- training
    def loss(self, mb: dict[str, torch.Tensor], distill: bool) -> torch.Tensor:
        """LM loss of a micro-batch, mixed with the KL to the unpruned base with ``distill``."""
        if not distill:
            return self.model(**mb).loss
        with torch.no_grad(), lora.disabled(self.model):
            teacher = self.model(**{k: v for k, v in mb.items() if k != "labels"}).logits
        out = self.model(**mb)
        kl = losses.kl_distill(out.logits, teacher, mb["labels"], self.cfg.distill_temperature)
        return losses.mixed(out.loss, kl, self.cfg.distill_weight)

    def forward_backward(self, batch: dict[str, torch.Tensor], distill: bool | None = None) -> float:
        """Accumulate gradients over the micro-batches of ``batch``; returns the mean loss.

        Under torch.distributed each rank runs only its contiguous share of the micro-batches, each scaled by
        1 / (all micro-batches), so the gradients summed over the ranks are those of the same global batch.
        """
        distill = self.cfg.distill if distill is None else distill
        mbs = self.cfg.micro_batch_size
        chunks = max(1, math.ceil(batch["input_ids"].shape[0] / mbs))
        total = 0.0
        self.model.train()
        for k in (distributed.shard(chunks) if self.distributed else range(chunks)):
            mb = {key: v[k * mbs:(k + 1) * mbs].to(self.device) for key, v in batch.items()}
            loss = self.loss(mb, distill)
            (loss / chunks).backward()
            total += float(loss.detach())
        if self.distributed:
            t = torch.tensor([total], dtype=torch.float64, device=self.device)
            distributed.all_reduce_sum_([t])
            total = float(t)
        return total / chunks

    def reduce_gradients(self) -> None:
        """Sum LoRA gradients and what the estimator observed over all ranks (a no-op for one process)."""
        if not self.distributed:
            return
        for p in self.params:  # a rank that got no micro-batch contributes zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        distributed.all_reduce_sum_([p.grad for p in self.params] +
                                    (self.estimator.reducible() if self.estimator else []))

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.step += 1
        loss = self.forward_backward(batch)
        self.reduce_gradients()
        start, end = self.ramp
        pruning = not self.cfg.one_shot and self.estimator is not None
        if pruning and self.estimator.needs_backward and self.step <= end:
            self.update_ema(self.group_importance())
        if self.estimator is not None:
            self.estimator.clear()
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if pruning and schedule.is_prune_step(self.step, self.cfg.prune_freq, start, end):
            if not self.estimator.needs_backward:  # weights-only scores: read them when the masks grow
                self.update_ema(self.group_importance())
            self.target_sparsity = schedule.cubic_sparsity(self.step, self.cfg.ratio, start, end)
            self.prune_to(self.target_sparsity)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # honest per-step seconds on a GPU
        return {"step": self.step, "loss": round(loss, 6), "sparsity": round(self.sparsity, 6),
                "target_sparsity": round(self.target_sparsity, 6), "lr": self.scheduler.get_last_lr()[0],
                "seconds": round(time.perf_counter() - t0, 4), "peak_memory_bytes": peak_memory_bytes(self.device)}

    def one_shot(self, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """Score once over ``batches`` (LM loss, gradients summed, no update) and prune to the target at once."""
        if self.estimator.needs_backward:
            for batch in batches:
                self.forward_backward(batch, distill=False)
            self.reduce_gradients()
        scores = self.group_importance()
        self.estimator.clear()
        self.optimizer.zero_grad(set_to_none=True)
        for i in self.prunable:
            self.ema_heads[i], self.ema_channels[i] = scores[i]
        self.target_sparsity = self.cfg.ratio
        self.prune_to(self.cfg.ratio)

    # ---------------------------------------------------------------- state
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to resume, as (tensors, JSON-able values): no pickle."""
        opt_t, opt_plain = checkpoint.flatten_optimizer(self.optimizer.state_dict())
        t = {**lora.adapter_state_dict(self.model), **opt_t, "rng.cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            t.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        for name, seq in (("heads_pruned", self.heads_pruned), ("channels_pruned", self.channels_pruned),
                          ("ema_heads", self.ema_heads), ("ema_channels", self.ema_channels)):
            t.update({f"{name}.{i}": v for i, v in enumerate(seq) if v is not None})
        return t, {"step": self.step, "target_sparsity": self.target_sparsity, "optimizer": opt_plain,
                   "scheduler": self.scheduler.state_dict()}

    def load_state(self, t: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
        with torch.no_grad():
            for path, layer in self.layers.items():
                if layer.r:
                    layer.lora_A.weight.copy_(t[f"{lora.PEFT_PREFIX}{path}.lora_A.weight"])
                    layer.lora_B.weight.copy_(t[f"{lora.PEFT_PREFIX}{path}.lora_B.weight"])
        self.optimizer.load_state_dict(checkpoint.unflatten_optimizer(t, plain["optimizer"]))
        self.scheduler.load_state_dict(plain["scheduler"])
        self.step, self.target_sparsity = int(plain["step"]), float(plain["target_sparsity"])
        n = self.arch.num_layers
        self.heads_pruned = [t[f"heads_pruned.{i}"] for i in range(n)]
        self.channels_pruned = [t[f"channels_pruned.{i}"] for i in range(n)]
        self.ema_heads = [t.get(f"ema_heads.{i}") for i in range(n)]
        self.ema_channels = [t.get(f"ema_channels.{i}") for i in range(n)]
        torch.set_rng_state(t["rng.cpu"])
        if torch.cuda.is_available() and "rng.cuda.0" in t:
            torch.cuda.set_rng_state_all([t[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())])
        self._apply_masks()

    def importance_tensors(self) -> dict[str, torch.Tensor]:
        return {f"layers.{i}.{k}": v.float().contiguous() for i in self.prunable if self.ema_heads[i] is not None
                for k, v in (("heads", self.ema_heads[i]), ("channels", self.ema_channels[i]))}


# ------------------------------------------------------------------------------------------------ the stage
RESUME_IGNORED = {"resume", "overwrite", "save_every", "log_every", "output"}


def _calibration(cfg: PruneConfig, tokenizer):
    from lpt.stages import calibrate

    if cfg.calib:
        return calibrate.load(cfg.calib, tokenizer)
    # PruneConfig carries every model and data option of CalibrateConfig: copy them all, so none can drift apart
    shared = {f.name: getattr(cfg, f.name) for f in fields(CalibrateConfig) if f.name not in ("output", "overwrite")}
    ccfg = CalibrateConfig(**{**shared, "data": default_data(cfg), "val_fraction": 0.0})
    train, _, meta = calibrate.make_blocks(ccfg, tokenizer)
    return calibrate.CalibData(train, None, meta)


def partial_dir(output: str | Path) -> Path:
    output = Path(output)
    return output.parent / f"{output.name}.partial"


def run(cfg: PruneConfig) -> Path:
    """Prune; under torchrun / accelerate launch every process runs this and only rank 0 writes the output."""
    validate(cfg)
    distributed.check_launch(cfg.device, cfg.device_map)
    device_map = distributed.parse_device_map(cfg.device_map)
    out = Path(cfg.output)
    ckpt = partial_dir(out) / artifacts.CHECKPOINT_DIR
    if not cfg.resume:
        artifacts.check_output_dir(out, cfg.overwrite)
    else:
        checkpoint.load(ckpt) if not checkpoint.exists(ckpt) else None  # the one-line reason, before loading
        if out.exists() and not cfg.overwrite:
            raise LptError(f"output {out} already exists; pass --overwrite to replace it")
    with distributed.process_group(cfg.device) as world:
        return _run(cfg, world, device_map)


def _run(cfg: PruneConfig, world: distributed.World, device_map: str | dict | None) -> Path:
    from lpt import models
    from lpt.arch import describe
    from lpt.progress import console

    out = Path(cfg.output)
    work = partial_dir(out)
    ckpt = work / artifacts.CHECKPOINT_DIR
    torch.manual_seed(cfg.seed)
    load = dict(dtype=cfg.dtype, device=world.device, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                device_map=device_map)
    # --8bit: quantize while loading where possible, so the 16-bit weights never sit on a device
    model, tok = (cfg.load_8bit and distributed.load_int8(cfg.model, **load)) or models.load_model(cfg.model, **load)
    if device_map is not None:
        distributed.check_placement(model)
        console.print(f"model spread over {', '.join(distributed.devices_of(model))} (--device-map)")
    arch = describe(model.config)
    params_before = models.count_params(model)
    data = _calibration(cfg, tok)
    total = schedule.num_steps(data.nsamples, cfg.batch_size, cfg.epochs, cfg.max_steps)
    pruner = Pruner(model, arch, cfg, total, model_name=cfg.model)
    resolved = {**asdict(cfg), "data": cfg.data if cfg.calib else default_data(cfg)}
    if cfg.resume:
        tensors, meta = checkpoint.load(ckpt)
        diff = sorted(k for k, v in resolved.items() if k not in RESUME_IGNORED and meta["config"].get(k, v) != v)
        if diff:
            raise LptError(f"--resume: the checkpoint was made with different settings ({', '.join(diff)})")
        pruner.load_state(tensors, meta["state"])
        console.print(f"resuming from step {pruner.step} of {total}")
    elif world.main and work.exists():
        shutil.rmtree(work)
    distributed.seed_rank(cfg.seed, pruner.step)  # own LoRA-dropout stream on ranks > 0
    if world.distributed:
        console.print(f"data parallel over {world.size} processes ({world.backend}): each computes its share of the "
                      f"{math.ceil(cfg.batch_size / cfg.micro_batch_size)} micro-batches of every step")
    log_path = work / artifacts.TRAIN_LOG
    if world.main:  # on resume, drop log lines of steps after the checkpoint (they are run again)
        work.mkdir(parents=True, exist_ok=True)
        lines = log_path.read_text().splitlines() if cfg.resume and log_path.exists() else []
        log_path.write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= pruner.step))
    try:
        _train(pruner, cfg, data, total, log_path, ckpt, resolved, world.main)
    except BaseException:
        if world.main and not ckpt.exists():
            shutil.rmtree(work, ignore_errors=True)  # nothing to resume from: leave nothing behind
        raise
    distributed.barrier()  # every rank is done before rank 0 writes the output
    if not world.main:
        return out
    masks = pruner.masks()
    before, after = masks.block_params()
    masks.info = {
        "criterion": pruner.criterion, "score": cfg.score, "normalize": cfg.normalize,
        "one_shot": cfg.one_shot, "steps": total, "skip_layers": pruner.skip,
        "ratio": {"requested": cfg.ratio, "model": (before - after) / params_before},
        "params": {"model_before": params_before, "model_after": params_before - (before - after)},
    }
    if cfg.distill:
        masks.info["distill"] = {"temperature": cfg.distill_temperature, "weight": cfg.distill_weight}
    # final artifacts: written into the work dir, which then becomes the output in one rename
    import lpt

    lora.save_adapter(model, work, base_model=cfg.model, metadata={"lpt_version": lpt.__version__})
    masks.save(work / artifacts.MASKS)
    artifacts.save_tensors(pruner.importance_tensors() or {"empty": torch.zeros(0)}, work / artifacts.IMPORTANCE,
                           {"criterion": pruner.criterion, "ema": str(cfg.ema), "gqa": cfg.gqa})
    artifacts.write_json(work / artifacts.RESOLVED_CONFIG, {
        "stage": "prune", "config": resolved, "versions": artifacts.versions(),
        "launch": {"processes": world.size, "backend": world.backend, "devices": distributed.devices_of(model)}})
    shutil.rmtree(ckpt, ignore_errors=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)
    console.print(f"removed {before - after:,} of {before:,} block parameters ({(before - after) / before:.1%}; "
                  f"{masks.info['ratio']['model']:.1%} of the whole model) -> {out}")
    return out


def _train(pruner: Pruner, cfg: PruneConfig, data, total: int, log_path: Path, ckpt: Path,
           resolved: dict[str, Any], main: bool) -> None:
    from lpt.progress import console, progress_bar

    if cfg.one_shot and pruner.step == 0 and pruner.estimator is not None:
        pruner.one_shot({k: v[i:i + cfg.batch_size] for k, v in data.tensors.items()}
                        for i in range(0, data.nsamples, cfg.batch_size))
    a = pruner.arch
    console.print(f"pruning {cfg.model} ({a.name}, {a.num_layers} layers, {a.num_heads} heads / {a.num_kv_heads} kv "
                  f"heads) to {cfg.ratio:.0%} with --criterion {pruner.criterion}: {total} steps of "
                  f"{cfg.batch_size} x {data.seq_len} tokens")
    with progress_bar() as bar:
        task = bar.add_task("prune", total=total, completed=pruner.step)
        while pruner.step < total:
            idx = batch_indices(pruner.step + 1, cfg.batch_size, data.nsamples, cfg.seed)
            rec = pruner.train_step({k: v[idx] for k, v in data.tensors.items()})
            if main and (rec["step"] % cfg.log_every == 0 or rec["step"] == total):
                with log_path.open("a") as f:
                    f.write(json.dumps(rec, sort_keys=True) + "\n")
            bar.update(task, advance=1, description=f"prune loss {rec['loss']:.3f} sparsity {rec['sparsity']:.2f}")
            if main and cfg.save_every and pruner.step % cfg.save_every == 0 and pruner.step < total:
                tensors, state = pruner.state_tensors()
                checkpoint.save(ckpt, tensors, {"step": pruner.step, "config": resolved, "state": state})
