"""``lpt prune``: iterative LoRA-guided structured pruning with joint LoRA fine-tuning (Algorithm 1).

Output directory:
  adapter_config.json, adapter_model.safetensors   the LoRA adapter in PEFT's format (for the unpruned base)
  masks.json                                       kept heads / channels per layer (the contract with slice)
  importance.safetensors                           moving-average group scores (layers.N.heads / .channels)
  log.jsonl                                        one line per logged optimiser step
  lpt_config.json                                  the resolved configuration and library versions
While running, checkpoints (``--save-every``) live in ``OUTPUT.partial/``; ``--resume`` continues from there.
Under torchrun / accelerate launch the run is data parallel (``lpt.distributed``; equal to one process with the same
global batch) and only rank 0 writes; ``--device-map`` spreads one model over several devices (docs/scaling.md).
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Iterable

import torch

from lpt import artifacts, criteria, distributed, groups, lora, schedule
from lpt.arch import ATTN_IN, MLP_IN, PROJECTIONS, Arch
from lpt.config import PROJECTION_LIST, CalibrateConfig, PruneConfig
from lpt.errors import LptError

PAPER_DATA = "MBZUAI/LaMini-instruction"
FAN_IN = set(ATTN_IN + MLP_IN)


# ------------------------------------------------------------------------------------------------ validation
def parse_layers(spec: str, num_layers: int) -> list[int]:
    """'0-2,31' -> [0, 1, 2, 31]; 'paper' -> first 10% and the last layer; '' -> []."""
    spec = (spec or "").strip()
    if not spec:
        return []
    if spec == "paper":
        return sorted(set(range(max(1, int(round(0.1 * num_layers))))) | {num_layers - 1})
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise LptError(f"--skip-layers: cannot parse '{part}' (use e.g. 0-2,31 or paper)") from None
    bad = sorted(i for i in out if not 0 <= i < num_layers)
    if bad:
        raise LptError(f"--skip-layers: layer {bad[0]} does not exist (the model has {num_layers} layers)")
    if len(out) >= num_layers:
        raise LptError("--skip-layers leaves no layer to prune")
    return sorted(out)


def validate(cfg: PruneConfig) -> None:
    if not 0.0 <= cfg.ratio < 1.0:
        raise LptError(f"--ratio must be in [0, 1) (got {cfg.ratio})")
    if cfg.criterion not in criteria.CRITERIA:
        raise LptError(f"unknown --criterion '{cfg.criterion}' (use {', '.join(criteria.CRITERIA)})")
    if cfg.score not in criteria.SCORES:
        raise LptError(f"unknown --score '{cfg.score}' (use {', '.join(criteria.SCORES)})")
    if cfg.gqa not in groups.GQA_MODES:
        raise LptError(f"unknown --gqa '{cfg.gqa}' (use {', '.join(groups.GQA_MODES)})")
    if cfg.layout not in groups.LAYOUTS:
        raise LptError(f"unknown --layout '{cfg.layout}' (use {', '.join(groups.LAYOUTS)})")
    if cfg.criterion == "vanilla" and cfg.load_8bit:
        raise LptError("--criterion vanilla needs the gradients of the base weights, which int8 weights do not have; "
                       "drop --8bit or use --criterion lora")
    if cfg.criterion == "lora" and cfg.lora_r <= 0:
        raise LptError("--criterion lora needs LoRA (--lora-r > 0)")
    if cfg.lora_r <= 0:
        raise LptError(f"--lora-r must be positive (got {cfg.lora_r})")
    if cfg.batch_size <= 0 or cfg.micro_batch_size <= 0:
        raise LptError("--batch-size and --micro-batch-size must be positive")
    if cfg.batch_size % cfg.micro_batch_size:
        raise LptError(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size {cfg.micro_batch_size}")
    if not 0.0 <= cfg.ema < 1.0:
        raise LptError(f"--ema must be in [0, 1) (got {cfg.ema})")
    if cfg.prune_freq <= 0:
        raise LptError(f"--prune-freq must be positive (got {cfg.prune_freq})")
    if not (0.0 <= cfg.warmup < 1.0 and 0.0 <= cfg.cooldown < 1.0 and cfg.warmup + cfg.cooldown < 1.0):
        raise LptError("--warmup and --cooldown must be fractions in [0, 1) with warmup + cooldown < 1")
    if cfg.epochs <= 0 and cfg.max_steps <= 0:
        raise LptError("give --epochs > 0 or --max-steps > 0")
    if cfg.lr <= 0:
        raise LptError(f"--lr must be positive (got {cfg.lr})")
    bad = [t for t in targets(cfg) if t not in PROJECTIONS]
    if bad:
        raise LptError(f"unknown --targets {', '.join(bad)} (choose from {PROJECTION_LIST})")


def targets(cfg: PruneConfig) -> list[str]:
    return [t.strip() for t in cfg.targets.split(",") if t.strip()]


def default_data(cfg: PruneConfig) -> str:
    from lpt.models import resolve

    return cfg.data or ("builtin:pydoc:train" if resolve(cfg.model).local else PAPER_DATA)


# ------------------------------------------------------------------------------------------------ the pruner
def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak allocated accelerator memory, or the process's peak resident set size on CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Pruner:
    """Algorithm 1 around a loaded model: LoRA training, importance, moving average, schedule and masks.

    ``train_step(batch)`` runs one optimiser step (accumulating micro-batches) and updates the masks when the
    schedule says so. ``criterion='none'`` (or ratio 0) is plain LoRA fine-tuning, for cost comparisons.
    """

    def __init__(self, model, arch: Arch, cfg: PruneConfig, total_steps: int, model_name: str | None = None):
        self.model, self.arch, self.cfg = model, arch, cfg
        self.total_steps = total_steps
        self.model_name = model_name or cfg.model
        self.criterion = cfg.criterion if cfg.ratio > 0 else "none"
        quantize = cfg.load_8bit and not any(lora.is_int8(m) for m in model.modules())  # not quantized on load
        self.layers = lora.inject(model, arch, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                  targets=targets(cfg), load_8bit=quantize)
        if self.criterion == "vanilla":
            for layer in self.layers.values():
                layer.base_layer.weight.requires_grad_(True)
        self.params = [p for layer in self.layers.values() if layer.r for p in
                       (layer.lora_A.weight, layer.lora_B.weight)]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        from transformers import get_cosine_schedule_with_warmup

        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, int(round(cfg.lr_warmup * total_steps)), total_steps)
        self.skip = parse_layers(cfg.skip_layers, arch.num_layers)
        self.layout = "per-layer" if self.skip else cfg.layout
        self.prunable = [i for i in range(arch.num_layers) if i not in self.skip]
        n_units = groups.head_units(arch, cfg.gqa) if cfg.gqa == "kv-groups" else arch.num_heads
        self.heads_pruned = [torch.zeros(n_units, dtype=torch.bool) for _ in range(arch.num_layers)]
        self.channels_pruned = [torch.zeros(arch.intermediate_size, dtype=torch.bool) for _ in range(arch.num_layers)]
        self.ema_heads: list[torch.Tensor | None] = [None] * arch.num_layers
        self.ema_channels: list[torch.Tensor | None] = [None] * arch.num_layers
        self.step = 0
        self.ramp = schedule.ramp_bounds(total_steps, cfg.warmup, cfg.cooldown)
        self.target_sparsity = 0.0
        self.sparsity = 0.0  # achieved share of block parameters masked
        self.device = next(p for p in self.params).device
        self.distributed = distributed.is_initialized() and distributed.world_size() > 1
        if self.distributed:  # every rank starts from rank 0's LoRA factors (as DDP does)
            distributed.broadcast_([p.detach() for p in self.params])

    # ---------------------------------------------------------------- importance
    @torch.no_grad()
    def _projection_scores(self, i: int, criterion: str) -> dict[str, torch.Tensor]:
        """Per-row / per-column scores of the projections of layer ``i`` under ``criterion``."""
        out = {}
        for proj in PROJECTIONS:
            layer = self.layers[self.arch.module_path(i, proj)]
            fan_in = proj in FAN_IN
            if criterion == "lora":
                if not layer.r or layer.lora_A.weight.grad is None:
                    continue
                w0, scale = lora.weight_parts(layer.base_layer)
                out[proj] = criteria.lora_group_sums(
                    w0, layer.lora_A.weight, layer.lora_B.weight, layer.lora_A.weight.grad, layer.lora_B.weight.grad,
                    layer.scaling, self.cfg.score, fan_in=fan_in, row_scale=scale).to(self.device)
                continue
            if criterion == "vanilla":
                g = layer.base_layer.weight.grad
                if g is None:
                    continue
                w = lora.dense_weight(layer.base_layer) + layer.delta().to(g.device)
                imp = criteria.vanilla_importance(w, g, self.cfg.score)
            elif criterion == "magnitude":
                w = lora.dense_weight(layer.base_layer) + layer.delta().to(layer.base_layer.weight.device)
                imp = criteria.magnitude_importance(w, self.cfg.score)
            else:
                raise LptError(f"no per-weight scores for criterion '{criterion}'")
            out[proj] = criteria.reduce(imp, fan_in).to(self.device)
            del imp
        return out

    def group_importance(self, criterion: str | None = None) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """(heads, channels) scores for every prunable layer (None for skipped layers)."""
        criterion = criterion or self.criterion
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self.arch.num_layers
        for i in self.prunable:
            if criterion == "random":
                g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step * 1009 + i)
                n_units = self.heads_pruned[i].numel()
                out[i] = (criteria.random_scores(n_units, g), criteria.random_scores(self.arch.intermediate_size, g))
                continue
            h, c = groups.group_scores(self.arch, self._projection_scores(i, criterion), self.cfg.gqa)
            if self.cfg.normalize:
                h, c = groups.normalise(h), groups.normalise(c)
            out[i] = (h.cpu(), c.cpu())
        if self.distributed:
            # The scores come from the all-reduced gradients (reduce_gradients), so they are the global batch's on
            # every rank; rank 0's copy is broadcast so float rounding can never split a mask decision.
            flat = [torch.cat(out[i]).to(self.device) for i in self.prunable]
            distributed.broadcast_(flat)
            for i, f in zip(self.prunable, flat):
                n = out[i][0].numel()
                out[i] = (f[:n].cpu(), f[n:].cpu())
        return out

    def update_ema(self, scores) -> None:
        for i in self.prunable:
            h, c = scores[i]
            self.ema_heads[i] = schedule.ema(self.ema_heads[i], h, self.cfg.ema)
            self.ema_channels[i] = schedule.ema(self.ema_channels[i], c, self.cfg.ema)

    # ---------------------------------------------------------------- masks
    def _layer_ratio(self, sparsity: float) -> float:
        """Ratio to apply to each prunable layer so the whole set of blocks loses ``sparsity``."""
        total = sum(self.arch.block_linear_params(i) for i in range(self.arch.num_layers))
        prunable = sum(self.arch.block_linear_params(i) for i in self.prunable)
        r = sparsity * total / prunable
        if r >= 1.0:
            raise LptError(f"--ratio {self.cfg.ratio} cannot be reached with layers {self.skip} left unpruned")
        return r

    def final_counts(self) -> tuple[int, int]:
        """Attention units and MLP channels to prune per prunable layer at the target ratio (to the nearest group)."""
        return groups.uniform_counts(self.arch, self._layer_ratio(self.cfg.ratio), self.cfg.gqa)

    def prune_to(self, sparsity: float) -> None:
        """Raise the pruned sets (never shrink them) towards ``sparsity`` of the block parameters.

        Head and channel counts both grow in proportion to ``sparsity / ratio`` from 0 to their final values, so
        the masks only ever grow and end exactly at the target (to the nearest group).
        """
        a, gqa = self.arch, self.cfg.gqa
        frac = min(1.0, sparsity / self.cfg.ratio) if self.cfg.ratio > 0 else 0.0
        nh_f, nc_f = self.final_counts()
        kv = a.num_kv_heads if gqa == "query-heads" else None
        counts = [(0, 0)] * a.num_layers
        if self.layout == "uniform":
            for i in self.prunable:
                counts[i] = (int(math.floor(frac * nh_f + 0.5)), int(math.floor(frac * nc_f + 0.5)))
        else:
            total_h = int(math.floor(frac * nh_f * len(self.prunable) + 0.5))
            total_c = int(math.floor(frac * nc_f * len(self.prunable) + 0.5))
            hc = groups.global_counts([groups.sorted_unit_scores(self._score(self.ema_heads[i]), self.heads_pruned[i],
                                                                 kv) for i in self.prunable], total_h)
            cc = groups.global_counts([groups.sorted_unit_scores(self._score(self.ema_channels[i]),
                                                                 self.channels_pruned[i], None)
                                       for i in self.prunable], total_c)
            for j, i in enumerate(self.prunable):
                counts[i] = (hc[j], cc[j])
        for i in self.prunable:
            nh, nc = counts[i]
            hs, cs = self._score(self.ema_heads[i]), self._score(self.ema_channels[i])
            if gqa == "kv-groups":
                self.heads_pruned[i] = groups.prune_lowest(hs, self.heads_pruned[i], nh)
            else:
                self.heads_pruned[i] = groups.prune_query_heads(hs, self.heads_pruned[i], nh, a.num_kv_heads)
            self.channels_pruned[i] = groups.prune_lowest(cs, self.channels_pruned[i], nc)
        self._apply_masks()

    def _apply_masks(self) -> None:
        masks = self.masks()
        groups.apply_masks(self.model, masks)
        before, after = masks.block_params()
        self.sparsity = 1.0 - after / before

    def _score(self, t: torch.Tensor | None) -> torch.Tensor:
        if t is None:
            raise LptError("no importance gathered before the first mask update; lower --warmup")
        return t

    def masks(self) -> groups.Masks:
        return groups.Masks.from_pruned(self.arch, self.heads_pruned, self.channels_pruned, self.cfg.gqa,
                                        layout=self.layout, model=self.model_name)

    # ---------------------------------------------------------------- training
    def forward_backward(self, batch: dict[str, torch.Tensor]) -> float:
        """Accumulate gradients over the micro-batches of ``batch``; returns the mean loss.

        Under torch.distributed each rank runs only its contiguous share of the micro-batches
        (``distributed.shard``), each scaled by 1 / (all micro-batches), so the gradients summed over the ranks
        (``reduce_gradients``) are the single-process gradient of the same global batch, whatever the split.
        """
        n = batch["input_ids"].shape[0]
        mbs = self.cfg.micro_batch_size
        chunks = max(1, math.ceil(n / mbs))
        total = 0.0
        self.model.train()
        for k in (distributed.shard(chunks) if self.distributed else range(chunks)):
            sl = slice(k * mbs, (k + 1) * mbs)
            mb = {key: v[sl].to(self.device) for key, v in batch.items()}
            loss = self.model(**mb).loss
            (loss / chunks).backward()
            total += float(loss.detach())
        if self.distributed:
            t = torch.tensor([total], dtype=torch.float64, device=self.device)
            distributed.all_reduce_sum_([t])
            total = float(t)
        return total / chunks

    def reduce_gradients(self) -> None:
        """Sum the gradients the criterion and the optimiser use over all ranks (a no-op for one process)."""
        if not self.distributed:
            return
        params = list(self.params)
        if self.criterion == "vanilla":
            params += [layer.base_layer.weight for layer in self.layers.values()]
        for p in params:  # a rank that got no micro-batch contributes zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        distributed.all_reduce_sum_([p.grad for p in params])

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.step += 1
        loss = self.forward_backward(batch)
        self.reduce_gradients()
        start, end = self.ramp
        pruning = not self.cfg.one_shot and self.criterion != "none"
        if pruning and self.criterion in ("lora", "vanilla") and self.step <= end:
            self.update_ema(self.group_importance())
        if self.criterion == "vanilla":
            for layer in self.layers.values():
                layer.base_layer.weight.grad = None
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if pruning and schedule.is_prune_step(self.step, self.cfg.prune_freq, start, end):
            if self.criterion in ("magnitude", "random"):
                self.update_ema(self.group_importance())
            self.target_sparsity = schedule.cubic_sparsity(self.step, self.cfg.ratio, start, end)
            self.prune_to(self.target_sparsity)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # honest per-step seconds on a GPU
        return {
            "step": self.step,
            "loss": round(loss, 6),
            "sparsity": round(self.sparsity, 6),
            "target_sparsity": round(self.target_sparsity, 6),
            "lr": self.scheduler.get_last_lr()[0],
            "seconds": round(time.perf_counter() - t0, 4),
            "peak_memory_bytes": peak_memory_bytes(self.device),
        }

    def one_shot(self, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """Score once over ``batches`` (gradients summed, no update) and prune to the target at once."""
        if self.criterion in ("lora", "vanilla"):
            for batch in batches:
                self.forward_backward(batch)
            self.reduce_gradients()
            scores = self.group_importance()
            self.optimizer.zero_grad(set_to_none=True)
            for layer in self.layers.values():
                layer.base_layer.weight.grad = None
        else:
            scores = self.group_importance()
        for i in self.prunable:
            self.ema_heads[i], self.ema_channels[i] = scores[i]
        self.target_sparsity = self.cfg.ratio
        self.prune_to(self.cfg.ratio)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "lora": lora.adapter_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "heads_pruned": self.heads_pruned,
            "channels_pruned": self.channels_pruned,
            "ema_heads": self.ema_heads,
            "ema_channels": self.ema_channels,
            "target_sparsity": self.target_sparsity,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sd = state["lora"]
        with torch.no_grad():
            for path, layer in self.layers.items():
                if layer.r:
                    layer.lora_A.weight.copy_(sd[f"{lora.PEFT_PREFIX}{path}.lora_A.weight"])
                    layer.lora_B.weight.copy_(sd[f"{lora.PEFT_PREFIX}{path}.lora_B.weight"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.heads_pruned, self.channels_pruned = state["heads_pruned"], state["channels_pruned"]
        self.ema_heads, self.ema_channels = state["ema_heads"], state["ema_channels"]
        self.target_sparsity = float(state["target_sparsity"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self._apply_masks()

    def importance_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i in self.prunable:
            if self.ema_heads[i] is not None:
                out[f"layers.{i}.heads"] = self.ema_heads[i].float().contiguous()
                out[f"layers.{i}.channels"] = self.ema_channels[i].float().contiguous()
        return out


# ------------------------------------------------------------------------------------------------ data order
def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Sample indices of optimiser step ``step`` (1-based): epochs are seeded permutations, concatenated."""
    lo, hi = (step - 1) * batch_size, step * batch_size
    idx = []
    epoch = lo // n
    while len(idx) < hi - lo:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        start = max(lo - epoch * n, 0)
        idx.extend(perm[start:min(n, hi - epoch * n)].tolist())
        epoch += 1
    return torch.tensor(idx[: hi - lo], dtype=torch.long)


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
    work = partial_dir(out)
    ckpt = work / artifacts.CHECKPOINT_DIR
    if not cfg.resume:
        artifacts.check_output_dir(out, cfg.overwrite)
    elif not (ckpt / artifacts.CHECKPOINT_STATE).is_file():
        raise LptError(f"--resume: no checkpoint in {ckpt} (run with --save-every N to make one)")
    elif out.exists() and not cfg.overwrite:
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

    resolved = {k: v for k, v in asdict(cfg).items()}
    resolved["data"] = cfg.data if cfg.calib else default_data(cfg)
    if cfg.resume:
        meta = artifacts.read_json(ckpt / artifacts.CHECKPOINT_META)
        diff = sorted(k for k, v in resolved.items() if k not in RESUME_IGNORED and meta["config"].get(k) != v)
        if diff:
            raise LptError(f"--resume: the checkpoint was made with different settings ({', '.join(diff)})")
        pruner.load_state_dict(torch.load(ckpt / artifacts.CHECKPOINT_STATE, weights_only=False))
        console.print(f"resuming from step {pruner.step} of {total}")
    elif world.main and work.exists():
        shutil.rmtree(work)
    distributed.seed_rank(cfg.seed, pruner.step)  # own LoRA-dropout stream on ranks > 0
    if world.distributed:
        console.print(f"data parallel over {world.size} processes ({world.backend}): each computes its share of the "
                      f"{math.ceil(cfg.batch_size / cfg.micro_batch_size)} micro-batches of every step")

    main = world.main
    if main:
        work.mkdir(parents=True, exist_ok=True)
    log_path = work / artifacts.TRAIN_LOG
    if main:  # on resume, drop log lines of steps after the checkpoint (they are run again)
        lines = log_path.read_text().splitlines() if cfg.resume and log_path.exists() else []
        log_path.write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= pruner.step))
    try:
        _train(pruner, cfg, data, total, log_path, ckpt, resolved, main)
    except BaseException:
        if main and not ckpt.exists():
            shutil.rmtree(work, ignore_errors=True)  # nothing to resume from: leave nothing behind
        raise
    distributed.barrier()  # every rank is done before rank 0 writes the output
    if not main:
        return out
    masks = pruner.masks()
    before, after = masks.block_params()
    masks.info = {
        "criterion": pruner.criterion, "score": cfg.score, "normalize": cfg.normalize, "one_shot": cfg.one_shot,
        "steps": total, "skip_layers": pruner.skip,
        "ratio": {"requested": cfg.ratio, "model": (before - after) / params_before},
        "params": {"model_before": params_before, "model_after": params_before - (before - after)},
    }
    # final artifacts: written into the work dir, which then becomes the output in one rename
    lora.save_adapter(model, work, base_model=cfg.model, metadata={"lpt_version": _version()})
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

    if cfg.one_shot and pruner.step == 0 and pruner.criterion != "none":
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
                _save_checkpoint(pruner, ckpt, resolved)


def _version() -> str:
    import lpt

    return lpt.__version__


def _save_checkpoint(pruner: Pruner, ckpt: Path, resolved: dict[str, Any]) -> None:
    tmp = ckpt.parent / f".{ckpt.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(pruner.state_dict(), tmp / artifacts.CHECKPOINT_STATE)
    artifacts.write_json(tmp / artifacts.CHECKPOINT_META, {"step": pruner.step, "config": resolved})
    shutil.rmtree(ckpt, ignore_errors=True)
    os.replace(tmp, ckpt)
