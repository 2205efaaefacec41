"""``lpt prune``: iterative structured pruning with joint LoRA fine-tuning (Algorithm 1 of LoRAPrune).

This module is the stage: validation, loading, calibration, the training loop's driver and the outputs. The loop
itself is ``lpt.pruner.Pruner``; how a group is scored lives in ``lpt.importance`` and ``lpt.criteria``, which
groups are cut in ``lpt.groups``.

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

import dataclasses
import json
import math
import os
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from lpt import artifacts, checkpoint, criteria, distributed, groups, importance, int8, llamacpp, lora, schedule
from lpt.arch import PROJECTIONS
from lpt.config import PROJECTION_LIST, CalibrateConfig, PruneConfig, round_to_channels
from lpt.errors import LptError
from lpt.pruner import Pruner, targets
from lpt.schedule import batch_indices

PAPER_DATA = "MBZUAI/LaMini-instruction"


def validate(cfg: PruneConfig) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise LptError(msg)

    choices = (("criterion", importance.CRITERIA), ("score", criteria.SCORES), ("gqa", ("auto", *groups.GQA_MODES)),
               ("layout", groups.LAYOUTS), ("normalize_by", importance.NORMALIZE))
    for name, allowed in choices:
        need(getattr(cfg, name) in allowed,
             f"unknown --{name.replace('_', '-')} '{getattr(cfg, name)}' (use {', '.join(allowed)})")
    need(0.0 <= cfg.ratio < 1.0, f"--ratio must be in [0, 1) (got {cfg.ratio})")
    need(not (cfg.criterion == "vanilla" and cfg.load_8bit),
         "--criterion vanilla needs the gradients of the base weights, which int8 weights do not have; drop --8bit "
         "or use --criterion lora or fisher")
    need(cfg.int8_backend in int8.BACKENDS,
         f"unknown --int8-backend '{cfg.int8_backend}' (use {', '.join(int8.BACKENDS)})")
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
    groups.parse_balance(cfg.balance)  # a one-line error for anything but search, proportional or a count
    cfg.round_to = round_to_channels(cfg.round_to)  # a preset name becomes its channel count (as masks.json records)
    bad = [t for t in targets(cfg) if t not in PROJECTIONS]
    need(not bad, f"unknown --targets {', '.join(bad)} (choose from {PROJECTION_LIST})")


def default_data(cfg: PruneConfig) -> str:
    from lpt.models import resolve

    return cfg.data or ("builtin:pydoc:train" if resolve(cfg.model).local else PAPER_DATA)


# ------------------------------------------------------------------------------------------------ the stage
RESUME_IGNORED = {"resume", "overwrite", "save_every", "log_every", "output"}


def _calibration(cfg: PruneConfig, tokenizer):
    from lpt.stages import calibrate

    if cfg.calib:
        return calibrate.load(cfg.calib, tokenizer)
    # PruneConfig carries every model and data option of CalibrateConfig: copy them all, so none can drift apart
    shared = {f.name: getattr(cfg, f.name) for f in fields(CalibrateConfig) if f.name not in ("output", "overwrite")}
    ccfg = CalibrateConfig(**{**shared, "data": default_data(cfg), "val_fraction": 0.0})
    train, _, meta = calibrate.make_blocks_rank0(ccfg, tokenizer)  # read and tokenised once, shared with every rank
    return calibrate.CalibData(train, None, meta)


partial_dir = artifacts.partial_dir


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
        checkpoint.require(ckpt)  # before the model is loaded
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
    backend = int8.resolve_backend(cfg.int8_backend, models.resolve_device(world.device))
    model, tok = ((cfg.load_8bit and models.load_int8(cfg.model, **load, int8_threshold=cfg.int8_threshold,
                                                      int8_backend=backend))
                  or models.load_model(cfg.model, **load))
    if device_map is not None:
        distributed.check_placement(model)
        console.print(f"model spread over {', '.join(distributed.devices_of(model))} (--device-map)")
    arch = describe(model.config)
    params_before = models.count_params(model)
    data = _calibration(cfg, tok)
    total = schedule.num_steps(data.nsamples, cfg.batch_size, cfg.epochs, cfg.max_steps)
    pruner = Pruner(model, arch, dataclasses.replace(cfg, int8_backend=backend), total, model_name=cfg.model)
    if pruner.note and world.main:
        console.print(f"note: {pruner.note}")
    hidden_note = llamacpp.round_to_note(arch.hidden_size, cfg.round_to)
    if hidden_note and world.main:
        console.print(f"note: {hidden_note}")
    resolved = {**asdict(cfg), "data": cfg.data if cfg.calib else default_data(cfg),
                "int8_backend": backend if cfg.load_8bit else cfg.int8_backend}  # the backend that ran
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
        **({"round_to": cfg.round_to} if cfg.round_to > 1 else {}),
        **({"balance": pruner.balance_info()} if pruner.estimator is not None else {}),
        "ratio": {"requested": cfg.ratio, "model": (before - after) / params_before},
        "params": {"model_before": params_before, "model_after": params_before - (before - after)},
    }
    if cfg.load_8bit:
        masks.info["int8"] = {"backend": backend,
                              **({"threshold": cfg.int8_threshold} if backend == "bitsandbytes" else {})}
    if cfg.distill:
        masks.info["distill"] = {"temperature": cfg.distill_temperature, "weight": cfg.distill_weight}
    # final artifacts: written into the work dir, which then becomes the output in one rename
    import lpt

    lora.save_adapter(model, work, base_model=cfg.model, metadata={"lpt_version": lpt.__version__})
    masks.save(work / artifacts.MASKS)
    artifacts.save_tensors(pruner.importance_tensors() or {"empty": torch.zeros(0)}, work / artifacts.IMPORTANCE,
                           {"criterion": pruner.criterion, "ema": str(cfg.ema), "gqa": pruner.cfg.gqa})
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
