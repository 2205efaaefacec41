"""``lpt prune``: iterative structured pruning with joint LoRA fine-tuning (Algorithm 1 of LoRAPrune).

This module is the stage: validation, loading, calibration, the training loop's driver and the outputs. The loop
itself is ``lpt.pruner.Pruner``; how a group is scored lives in ``lpt.importance`` and ``lpt.criteria``, which
groups are cut in ``lpt.groups`` and ``lpt.selection``, the masks it writes in ``lpt.masks``.

Output directory:
  adapter_config.json, adapter_model.safetensors   the LoRA adapter in PEFT's format (for the unpruned base)
  masks.json                                       kept heads / channels per layer (the contract with slice)
  importance.safetensors                           moving-average group scores (layers.N.heads / .channels)
  log.jsonl                                        one line per logged optimiser step
  lpt_config.json                                  the resolved configuration and library versions
While running, checkpoints (``--save-every``) live in ``.OUTPUT.partial/checkpoint`` (safetensors + JSON);
``--resume`` continues from there. Under torchrun / accelerate launch the run is data parallel (equal to one process
with the same global batch) and only rank 0 writes; ``--device-map`` spreads one model over several devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

import lpt
from lpt import artifacts, calibration, checkpoint, distributed, int8, llamacpp, lora, models, schedule
from lpt import budget as budgets
from lpt.arch import describe
from lpt.config import CalibrateConfig, PruneConfig, check, resolved
from lpt.errors import DivergedError, LptError
from lpt.progress import console, progress_bar
from lpt.pruner import Pruner, check_model
from lpt.schedule import batch_indices

PAPER_DATA = "MBZUAI/LaMini-instruction"


def default_data(cfg: PruneConfig) -> str:
    return cfg.data or ("builtin:pydoc:train" if models.resolve(cfg.model).local else PAPER_DATA)


# ------------------------------------------------------------------------------------------------ the stage
RESUME_IGNORED = {"resume", "overwrite", "save_every", "log_every", "output"}


def _calibration(cfg: PruneConfig, tokenizer) -> calibration.CalibData:
    if cfg.calib:
        return calibration.load(cfg.calib, tokenizer)
    # PruneConfig carries every model and data option of CalibrateConfig: copy them all, so none can drift apart
    shared = {f.name: getattr(cfg, f.name) for f in fields(CalibrateConfig) if f.name not in ("output", "overwrite")}
    ccfg = CalibrateConfig(**{**shared, "data": default_data(cfg), "val_fraction": 0.0})
    train, _, meta = calibration.make_blocks_rank0(ccfg, tokenizer)  # read and tokenised once, shared with every rank
    return calibration.CalibData(train, None, meta)


partial_dir = artifacts.partial_dir


def validate(cfg: PruneConfig) -> PruneConfig:
    """Every rule of a PruneConfig (declared with its fields: ``lpt.config.check``); returns the copy the run uses,
    presets resolved (``--round-to llamacpp`` -> 32, as masks.json records it; ``auto`` stays until
    ``budget.plan`` decides it from the model's MLP width). ``cfg`` is left as it is."""
    check(cfg)
    return resolved(cfg)


def run(cfg: PruneConfig) -> Path:
    """Prune; under torchrun / accelerate launch every process runs this and only rank 0 writes the output.

    Rank 0 holds the output's lock (``artifacts.output_lock``) for the whole run, so a second run on the same output
    (which would share ``.OUTPUT.partial/``) is refused at once."""
    cfg = validate(cfg)  # the copy the run uses: --ratio's default and --round-to's presets made concrete
    distributed.check_launch(cfg.device, cfg.device_map)
    device_map = distributed.parse_device_map(cfg.device_map)
    out = Path(cfg.output)
    with artifacts.output_lock(out) if distributed.rank() == 0 else contextlib.nullcontext():
        ckpt = artifacts.work_dir(out) / artifacts.CHECKPOINT_DIR
        if not cfg.resume:
            artifacts.check_output_dir(out, cfg.overwrite)
        else:
            checkpoint.require(ckpt)  # before the model is loaded
            if out.exists() and not cfg.overwrite:
                raise LptError(f"output {out} already exists; pass --overwrite to replace it")
        early = _config_if_cheap(cfg)
        if early is not None:  # before the weights load (minutes for a large hub model)
            check_model(cfg, early)
        with distributed.process_group(cfg.device) as world:
            return _run(cfg, world, device_map)


def _config_if_cheap(cfg: PruneConfig):
    """The model's ``Arch`` when its config is a small JSON file (a local directory or a hub id), else None (a GGUF
    file's config is read from its whole header: then :func:`check_model` runs once the model is loaded)."""
    ref = models.resolve(cfg.model)
    if ref.gguf_file:
        return None
    # the loader's own first check (an unsupported family is refused with the same line as before)
    return describe(models.check_architecture(ref, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision))


def _run(cfg: PruneConfig, world: distributed.World, device_map: str | dict | None) -> Path:
    out = Path(cfg.output)
    work = artifacts.work_dir(out)
    ckpt = work / artifacts.CHECKPOINT_DIR
    torch.manual_seed(cfg.seed)
    # --8bit: quantized while loading where possible, so the 16-bit weights never sit on a device
    backend = int8.resolve_backend(cfg.int8_backend, models.resolve_device(world.device))
    loaded = models.load_from(cfg, device=world.device, device_map=device_map, load_8bit=cfg.load_8bit,
                              int8_threshold=cfg.int8_threshold, int8_backend=backend, check_arch=True)
    model, tok = loaded.model, loaded.tokenizer
    if device_map is not None:
        distributed.check_placement(model)
        console.print(f"model spread over {', '.join(distributed.devices_of(model))} (--device-map)")
    arch = describe(model.config)
    budget = check_model(cfg, arch)
    params_before = models.count_params(model)
    data = _calibration(cfg, tok)
    total = schedule.num_steps(data.nsamples, cfg.batch_size, cfg.epochs, cfg.max_steps)
    pruner = Pruner(model, arch, dataclasses.replace(cfg, int8_backend=backend), total, model_name=cfg.model,
                    budget=budget)
    if pruner.note and world.main:
        console.print(f"note: {pruner.note}")
    hidden_note = llamacpp.round_to_note(arch.hidden_size, budget.round_to)
    if hidden_note and world.main:
        console.print(f"note: {hidden_note}")
    resolved = {**asdict(cfg), "data": cfg.data if cfg.calib else default_data(cfg),
                "int8_backend": backend if cfg.load_8bit else cfg.int8_backend}  # the backend that ran
    if cfg.resume:
        tensors, meta = checkpoint.load(ckpt)
        diff = sorted(k for k, v in resolved.items() if k not in RESUME_IGNORED and meta["config"].get(k, v) != v)
        if diff:
            raise LptError(f"--resume: the checkpoint was made with different settings ({', '.join(diff)})")
        with checkpoint.restoring(ckpt):  # a key it lacks is one line naming the checkpoint
            pruner.load_state(tensors, meta["state"])
        console.print(f"resuming from step {pruner.step} of {total}")
    elif world.main and work.exists():
        _discard_partial(work)
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
    except BaseException as e:
        # nothing to resume from, or a diverged run (resuming it with the same settings diverges again)
        if world.main and (not ckpt.exists() or isinstance(e, DivergedError)):
            shutil.rmtree(work, ignore_errors=True)  # leave nothing behind
        raise
    distributed.barrier()  # every rank is done before rank 0 writes the output
    if not world.main:
        return out
    masks = pruner.masks()
    formula_before, formula_after = masks.model_params()  # the removed parameters: blocks, embedding, norms
    removed = formula_before - formula_after
    search = pruner.search_info()
    masks.info = {
        "criterion": pruner.criterion, "score": cfg.score, "normalize": cfg.normalize,
        "one_shot": cfg.one_shot, "steps": total, "skip_layers": pruner.skip,
        **({"round_to": budget.round_to} if budget.round_to > 1 else {}),
        **({"balance": pruner.balance_info()} if pruner.estimator is not None else {}),
        **({"search": search} if search is not None else {}),
        "tp": {"requested": list(budget.tp), "supported": budgets.supported_tp(budgets.model_widths(arch, masks))},
        "ratio": {"requested": cfg.ratio, "model": removed / params_before},
        "params": {"model_before": params_before, "model_after": params_before - removed},
    }
    if cfg.load_8bit:
        masks.info["int8"] = {"backend": backend,
                              **({"threshold": cfg.int8_threshold} if backend == "bitsandbytes" else {})}
    if cfg.distill:
        masks.info["distill"] = {"temperature": cfg.distill_temperature, "weight": cfg.distill_weight}
    # final artifacts: written into the work dir, which then becomes the output in one rename
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
    before, after = masks.block_params()
    console.print(f"removed {before - after:,} of {before:,} block parameters ({(before - after) / before:.1%}; "
                  f"{masks.info['ratio']['model']:.1%} of the whole model) -> {out}")
    return out


def _goal_text(cfg: PruneConfig, pruner: Pruner) -> str:
    """What the run removes, for the start line."""
    b = pruner.budget
    if b.goal_params is not None:
        return f"to {b.goal_params:,} parameters over --axes {cfg.axes}"
    parts = [f"{cfg.ratio:.0%} of the block width"] if cfg.ratio > 0 else []
    c = b.candidates[0]
    if c.blocks:
        parts.append(f"{c.blocks} blocks")
    if c.hidden:
        parts.append(f"{c.hidden} hidden channels")
    return "removing " + (", ".join(parts) or "nothing")


def _discard_partial(work: Path) -> None:
    """Remove the work directory of an earlier run that is no longer alive (this run holds the output's lock), and
    say what is lost when it held a checkpoint."""
    ckpt = work / artifacts.CHECKPOINT_DIR
    if checkpoint.exists(ckpt):
        try:
            step = artifacts.read_json(ckpt / checkpoint.META).get("step", "?")
        except (LptError, AttributeError):
            step = "?"
        console.print(f"[yellow]note:[/] removing {work} left by an interrupted run (its checkpoint at step {step} "
                      f"could have been continued with --resume)")
    shutil.rmtree(work)


def _train(pruner: Pruner, cfg: PruneConfig, data: calibration.CalibData, total: int, log_path: Path, ckpt: Path,
           resolved: dict[str, Any], main: bool) -> None:
    if cfg.one_shot and pruner.step == 0 and pruner.pruning:
        pruner.one_shot(calibration.batches(data, cfg.batch_size))
    a = pruner.arch
    console.print(f"pruning {cfg.model} ({a.name}, {a.num_layers} layers, {a.num_heads} heads / {a.num_kv_heads} kv "
                  f"heads) {_goal_text(cfg, pruner)} with --criterion {pruner.criterion}: {total} steps of "
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
