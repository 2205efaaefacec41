"""The pruning loop of ``lpt prune`` (Algorithm 1): LoRA training, when to score, when to grow the masks, state.

How a group is scored lives in ``lpt.importance`` (estimators) and ``lpt.criteria`` (math); the budgets in
``lpt.groups``, which units are cut in ``lpt.selection``, the masks in ``lpt.masks``; the sparsity schedule and
moving average in ``lpt.schedule``; the losses in ``lpt.losses``. ``validate`` checks a ``PruneConfig`` (the stage
and ``lpt bench prune-step`` call it). The stage around the loop (loading, calibration, outputs) is
``lpt prune``'s.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Iterable

import torch

from lpt import (calibration, checkpoint, criteria, distributed, groups, importance, int8, lora, losses, schedule,
                 selection)
from lpt.arch import PROJECTIONS, Arch
from lpt.benchmarking.memory import peak_memory_bytes
from lpt.config import PROJECTION_LIST, CalibrateConfig, PruneConfig, check_finite, round_to_channels
from lpt.errors import DivergedError, LptError
from lpt.masks import Masks, apply_masks


def resolve_gqa(arch: Arch, gqa: str) -> tuple[str, str | None]:
    """``--gqa auto`` made concrete for ``arch`` (``arch.default_gqa``), with a note for the user or None."""
    from lpt.arch import default_gqa

    return default_gqa(arch, None if gqa == "auto" else gqa)


def divergence_hint(cfg: PruneConfig) -> str:
    """The settings most likely to blame when training diverges, for the one-line error; nothing is saved."""
    causes = []
    if cfg.lr > 1e-2:
        causes.append(f"--lr {cfg.lr:g} is high for AdamW on LoRA factors (lpt's default 1e-4; its recipes use up "
                      f"to 2e-3)")
    if cfg.lora_alpha / cfg.lora_r > 16:
        causes.append(f"--lora-alpha {cfg.lora_alpha:g} / --lora-r {cfg.lora_r} scales LoRA's update by "
                      f"{cfg.lora_alpha / cfg.lora_r:g}")
    if cfg.distill and not 0.1 <= cfg.distill_temperature <= 100:
        causes.append(f"--distill-temperature {cfg.distill_temperature:g} is extreme")
    if cfg.dtype == "float16":
        causes.append("--dtype float16 overflows easily (use bfloat16 or float32)")
    if cfg.max_grad_norm <= 0:
        causes.append("gradient clipping is off (--max-grad-norm 0)")
    what = "; ".join(causes) if causes else "lower --lr, or try --dtype float32"
    return f"likely cause: {what}. Nothing was saved"


def targets(cfg: PruneConfig) -> list[str]:
    return [t.strip() for t in cfg.targets.split(",") if t.strip()]


def validate(cfg: PruneConfig) -> None:
    """Every option of a pruning run, as one-line errors naming the flag (before anything is loaded)."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise LptError(msg)

    choices = (("criterion", importance.CRITERIA), ("score", criteria.SCORES), ("gqa", ("auto", *groups.GQA_MODES)),
               ("layout", groups.LAYOUTS), ("normalize_by", importance.NORMALIZE))
    for name, allowed in choices:
        need(getattr(cfg, name) in allowed,
             f"unknown --{name.replace('_', '-')} '{getattr(cfg, name)}' (use {', '.join(allowed)})")
    groups.check_ratio(cfg.ratio)
    importance.check_int8(cfg.criterion, cfg.load_8bit)
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
    check_ranges(cfg)


def check_ranges(cfg: PruneConfig) -> None:
    """The numeric flags :func:`validate` does not check above: finite and in range (typer reads nan and inf as
    floats), and the inline calibration flags when there is no --calib."""
    check_finite(cfg)
    ranges = (("lora_alpha", cfg.lora_alpha > 0, "positive"), ("lora_dropout", 0 <= cfg.lora_dropout < 1, "in [0, 1)"),
              ("lr_warmup", 0 <= cfg.lr_warmup <= 1, "in [0, 1]"), ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
              ("max_grad_norm", cfg.max_grad_norm >= 0, ">= 0 (0 disables clipping)"),
              ("int8_threshold", cfg.int8_threshold >= 0, ">= 0"), ("epochs", cfg.epochs >= 0, ">= 0"),
              ("max_steps", cfg.max_steps >= 0, ">= 0"), ("save_every", cfg.save_every >= 0, ">= 0 (0: never)"),
              ("log_every", cfg.log_every >= 1, "positive"))
    for name, ok, what in ranges:
        if not ok:
            raise LptError(f"--{name.replace('_', '-')} must be {what} (got {getattr(cfg, name)})")
    if not cfg.calib:
        calibration.check(CalibrateConfig(nsamples=cfg.nsamples, seq_len=cfg.seq_len))


def check_model(cfg: PruneConfig, arch: Arch) -> None:
    """What :func:`validate` cannot know without the model's config: the flags against the model's widths (--round-to
    against the MLP width, --balance N against the attention units, --skip-layers and --ratio against the layers),
    checked before anything is written, instead of at the first mask update."""
    if cfg.ratio <= 0:
        return
    gqa, _ = resolve_gqa(arch, cfg.gqa)
    skip = groups.parse_layers(cfg.skip_layers, arch.num_layers)
    if cfg.layout == "per-layer" or skip:
        from lpt import modeling

        modeling.class_name(arch.model_type)  # a family lpt.modeling cannot build with per-layer widths: one line
    if arch.heads_locked and groups.parse_balance(cfg.balance) != 0:
        raise LptError(f"{arch.heads_locked}, so a model with fewer query heads would not load: prune MLP channels "
                       f"only, with --balance 0")
    ratio = groups.layer_ratio(arch, cfg.ratio, [i for i in range(arch.num_layers) if i not in skip])
    widths = arch.layer_intermediate or [arch.intermediate_size]
    if cfg.round_to > min(widths):
        raise LptError(f"--round-to {cfg.round_to} is larger than the MLP width {min(widths)} of {cfg.model}")
    if cfg.balance == "search":
        groups.balance_candidates(arch, ratio, gqa, cfg.round_to)
    else:
        groups.uniform_counts(arch, ratio, gqa, round_to=cfg.round_to, heads=groups.parse_balance(cfg.balance))


def _state_field(name: str) -> property:
    """A per-layer list of the pruner's ``selection.State``, read and assigned as an attribute of the pruner."""
    return property(lambda self: getattr(self.state, name), lambda self, value: setattr(self.state, name, list(value)))


class Pruner:
    """Algorithm 1 around a loaded model: LoRA training, scoring, moving average, schedule and masks.

    ``train_step(batch)`` runs one optimiser step (accumulating micro-batches) and grows the masks when the
    schedule says so. ``ratio=0`` is plain LoRA fine-tuning (criterion ``none``), for cost comparisons.
    """

    def __init__(self, model, arch: Arch, cfg: PruneConfig, total_steps: int, model_name: str | None = None):
        gqa, self.note = resolve_gqa(arch, cfg.gqa)
        cfg = dataclasses.replace(cfg, gqa=gqa)
        self.model, self.arch, self.cfg, self.total_steps = model, arch, cfg, total_steps
        self.model_name = model_name or cfg.model
        self.criterion = cfg.criterion if cfg.ratio > 0 else "none"
        quantize = cfg.load_8bit and not any(lora.is_int8(m) for m in model.modules())  # not quantized on load
        self.layers = lora.inject(model, arch, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                  targets=targets(cfg), load_8bit=quantize, int8_threshold=cfg.int8_threshold,
                                  int8_backend=cfg.int8_backend)
        if cfg.gradient_checkpointing:  # non-reentrant: frozen inputs are fine, hooks see the recomputation
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.params = [p for layer in self.layers.values() if layer.r for p in (layer.lora_A.weight, layer.lora_B.weight)]
        # None: --no-loss-head, or a family whose output layer lpt does not know (the model's own logits)
        self.head = losses.head_of(model) if cfg.loss_head else None
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        from lpt.int8 import import_without_bitsandbytes

        get_cosine_schedule_with_warmup = import_without_bitsandbytes(
            "transformers.optimization").get_cosine_schedule_with_warmup

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
        self.policy = selection.Policy.of(arch, layout=self.layout, prunable=self.prunable, gqa=cfg.gqa,
                                          round_to=cfg.round_to)
        self.state = selection.State.empty(arch, cfg.gqa)  # moving-average scores and pruned sets per layer
        self.step, self.target_sparsity, self.sparsity = 0, 0.0, 0.0
        self.ramp = schedule.ramp_bounds(total_steps, cfg.warmup, cfg.cooldown)
        self.layer_ratio = groups.layer_ratio(arch, cfg.ratio, self.prunable)
        # the per-layer (attention units, MLP channels) at the target; --balance search decides it at the first
        # mask update (choose_balance), when the scores exist
        self.target_counts: tuple[int, int] | None = (0, 0) if self.estimator is None else None
        self.balance_losses: list[dict[str, Any]] | None = None
        if self.estimator is not None and cfg.balance != "search":
            self.target_counts = groups.uniform_counts(arch, self.layer_ratio, cfg.gqa, round_to=cfg.round_to,
                                                       heads=groups.parse_balance(cfg.balance))
        self.device = self.params[0].device
        self.distributed = distributed.is_initialized() and distributed.world_size() > 1
        if self.distributed:  # every rank starts from rank 0's LoRA factors (as DDP does)
            distributed.broadcast_([p.detach() for p in self.params])

    # ---------------------------------------------------------------- selection state, per layer (self.state)
    heads_pruned = _state_field("heads_pruned")
    channels_pruned = _state_field("channels_pruned")
    ema_heads = _state_field("head_scores")  # moving-average scores
    ema_channels = _state_field("channel_scores")

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
        if self.target_counts is None:
            raise RuntimeError("--balance search: choose_balance(batch) decides the target before the first prune_to")
        frac = min(1.0, sparsity / self.cfg.ratio) if self.cfg.ratio > 0 else 0.0
        self.heads_pruned, self.channels_pruned = self._grown(frac, self.target_counts)
        self._apply_masks()

    def _grown(self, frac: float, target: tuple[int, int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The pruned sets at ``frac`` of the way to the ``target`` counts, by the moving-average scores."""
        counts = selection.step_counts(frac, target, self.policy, self.state)
        return selection.grow(counts, self.policy, self.state)

    @torch.no_grad()
    def choose_balance(self, batch: dict[str, torch.Tensor]) -> None:
        """``--balance search`` (beyond the paper): how the target is divided between attention and MLP.

        Every candidate of ``groups.balance_candidates`` (0, 1, ... attention units per layer, the MLP channels
        making up the rest) is pruned all the way to the target by the current scores, and the model's loss on
        ``batch`` measured (no gradient, no dropout); the candidate with the lowest loss becomes the target. The
        masks are then restored, and the schedule grows them towards that target as usual. Costs one forward pass
        of ``batch`` per candidate, once.
        """
        cands = groups.balance_candidates(self.arch, self.layer_ratio, self.cfg.gqa, self.cfg.round_to)
        losses = []
        if len(cands) > 1:
            for target in cands:
                hp, cp = self._grown(1.0, target)
                apply_masks(self.model, self._masks(hp, cp))
                losses.append(self.mean_loss(batch))
            self._apply_masks()
        best = min(range(len(cands)), key=losses.__getitem__) if losses else 0
        self.target_counts = cands[best]
        self.balance_losses = [{"attention_units": h, "mlp_channels": c, "loss": round(v, 6)}
                               for (h, c), v in zip(cands, losses)]

    def _apply_masks(self) -> None:
        current = self.masks()
        apply_masks(self.model, current)
        before, after = current.block_params()
        self.sparsity = 1.0 - after / before

    def masks(self) -> Masks:
        return self._masks(self.heads_pruned, self.channels_pruned)

    def _masks(self, heads_pruned, channels_pruned) -> Masks:
        return Masks.from_pruned(self.arch, heads_pruned, channels_pruned, self.cfg.gqa, layout=self.layout,
                                model=self.model_name)

    def balance_info(self) -> dict[str, Any]:
        """What ``masks.json`` records of the attention/MLP balance."""
        h, c = self.target_counts or (0, 0)
        out: dict[str, Any] = {"mode": self.cfg.balance, "attention_units": h, "mlp_channels": c}
        if self.balance_losses:
            out["candidates"] = self.balance_losses
        return out

    # ---------------------------------------------------------------- training
    def loss(self, mb: dict[str, torch.Tensor], distill: bool) -> torch.Tensor:
        """LM loss of a micro-batch, mixed with the KL to the unpruned base with ``distill``.

        For the families ``losses.head_of`` knows, both come from the last hidden states through the frozen output
        layer a chunk of tokens at a time (``losses.head_loss``): no logits of the whole micro-batch are held, for
        the student or the teacher. Other models use their own logits (``losses.kl_distill``)."""
        if self.head is None:
            return self._loss_from_logits(mb, distill)
        teacher = None
        if distill:
            with torch.no_grad(), lora.disabled(self.model):
                teacher = losses.last_hidden(self.model, mb)
        hidden = losses.last_hidden(self.model, mb)
        return losses.head_loss(hidden, self.head, mb["labels"], teacher, self.cfg.distill_temperature,
                                self.cfg.distill_weight if distill else 0.0)

    def _loss_from_logits(self, mb: dict[str, torch.Tensor], distill: bool) -> torch.Tensor:
        if not distill:
            return self.model(**mb).loss
        with torch.no_grad(), lora.disabled(self.model):
            teacher = self.model(**{k: v for k, v in mb.items() if k != "labels"}).logits
        out = self.model(**mb)
        kl = losses.kl_distill(out.logits, teacher, mb["labels"], self.cfg.distill_temperature)
        return losses.mixed(out.loss, kl, self.cfg.distill_weight)

    def _micro_batches(self, batch: dict[str, torch.Tensor]) -> tuple[list[dict[str, torch.Tensor]], int]:
        """This rank's micro-batches of ``batch`` (on the device) and the number of micro-batches of all ranks.

        Under torch.distributed each rank runs only its contiguous share of the micro-batches, so sums over the
        ranks of per-micro-batch values divided by that number are those of the same global batch.
        """
        mbs = self.cfg.micro_batch_size
        chunks = max(1, math.ceil(batch["input_ids"].shape[0] / mbs))
        mine = distributed.shard(chunks) if self.distributed else range(chunks)
        return [{key: v[k * mbs:(k + 1) * mbs].to(self.device) for key, v in batch.items()} for k in mine], chunks

    def _sum_ranks(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        distributed.all_reduce_sum_([t])
        return float(t)

    def forward_backward(self, batch: dict[str, torch.Tensor], distill: bool | None = None) -> float:
        """Accumulate gradients over the micro-batches of ``batch`` (each scaled by 1 / all micro-batches, so the
        gradients summed over the ranks are those of the global batch); returns the mean loss."""
        distill = self.cfg.distill if distill is None else distill
        mbs, chunks = self._micro_batches(batch)
        total = 0.0
        self.model.train()
        for mb in mbs:
            loss = self.loss(mb, distill)
            (loss / chunks).backward()
            total += float(loss.detach())
        mean = self._sum_ranks(total) / chunks
        if not math.isfinite(mean):  # every rank sees the same sum, so every rank stops here
            what = f"step {self.step}" if self.step else "the one-shot scoring pass"
            raise DivergedError(f"{what}: the loss is {mean} (training diverged); {divergence_hint(self.cfg)}")
        return mean

    @torch.no_grad()
    def mean_loss(self, batch: dict[str, torch.Tensor]) -> float:
        """Mean LM loss of ``batch`` over its micro-batches and the ranks, in eval mode (no dropout, no gradient)."""
        mbs, chunks = self._micro_batches(batch)
        self.model.eval()
        try:
            total = sum(float(self.loss(mb, distill=False)) for mb in mbs)
        finally:
            self.model.train()
        return self._sum_ranks(total) / chunks

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
        self.check_weights()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if pruning and schedule.is_prune_step(self.step, self.cfg.prune_freq, start, end):
            if not self.estimator.needs_backward:  # weights-only scores: read them when the masks grow
                self.update_ema(self.group_importance())
            self.target_sparsity = schedule.cubic_sparsity(self.step, self.cfg.ratio, start, end)
            if self.target_counts is None:
                self.choose_balance(batch)
            self.prune_to(self.target_sparsity)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # honest per-step seconds on a GPU
        return {"step": self.step, "loss": round(loss, 6), "sparsity": round(self.sparsity, 6),
                "target_sparsity": round(self.target_sparsity, 6), "lr": self.scheduler.get_last_lr()[0],
                "seconds": round(time.perf_counter() - t0, 4), "peak_memory_bytes": peak_memory_bytes(self.device)}

    def check_weights(self) -> None:
        """Stop with :class:`DivergedError` when an optimiser step left a LoRA factor non-finite (identical on every
        rank: the gradients were all-reduced first)."""
        flags = [torch.isfinite(p).all().to(self.device) for p in self.params]  # one sync (--device-map: several)
        if flags and not bool(torch.stack(flags).all()):
            raise DivergedError(f"step {self.step}: the optimiser step made LoRA weights non-finite (training "
                                f"diverged); {divergence_hint(self.cfg)}")

    def one_shot(self, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """Score once over ``batches`` (LM loss, gradients summed, no update) and prune to the target at once; the
        balance search (``--balance search``) measures its candidates on the first batch."""
        batches = list(batches)
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
        if self.target_counts is None:
            self.choose_balance(batches[0])
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
                   "scheduler": self.scheduler.state_dict(), "final": self.target_counts,
                   "balance_losses": self.balance_losses}

    def load_state(self, t: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
        with torch.no_grad():
            for path, layer in self.layers.items():
                if layer.r:
                    layer.lora_A.weight.copy_(t[f"{lora.PEFT_PREFIX}{path}.lora_A.weight"])
                    layer.lora_B.weight.copy_(t[f"{lora.PEFT_PREFIX}{path}.lora_B.weight"])
        self.optimizer.load_state_dict(checkpoint.unflatten_optimizer(t, plain["optimizer"]))
        self.scheduler.load_state_dict(plain["scheduler"])
        self.step, self.target_sparsity = int(plain["step"]), float(plain["target_sparsity"])
        if plain.get("final") is not None:  # the balance chosen before the checkpoint
            self.target_counts = tuple(int(x) for x in plain["final"])
            self.balance_losses = plain.get("balance_losses")
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
