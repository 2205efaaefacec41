"""The pruning loop of ``lpt prune`` (Algorithm 1): LoRA training, when to score, when to grow the masks, state.

How a group is scored lives in ``lpt.importance`` (estimators) and ``lpt.criteria`` (math); what is cut where in
``lpt.budget`` (a ``Budget`` built once from the config and the model's ``Arch``), the width counts in
``lpt.groups``, which units are cut in ``lpt.selection``, the masks in ``lpt.masks`` and the residual mask of
hidden-size pruning in ``lpt.gates``; the sparsity schedule and moving average in ``lpt.schedule``; the losses in
``lpt.losses``. A ``PruneConfig``'s rules are declared with its fields (``lpt.config.check``); ``check_model``
checks it against the model's widths (its ``Budget``). The stage around the loop (loading, calibration, outputs) is
``lpt prune``'s.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Iterable

import torch

from lpt import budget as budgets
from lpt import checkpoint, distributed, importance, int8, lora, losses, modeling, schedule, selection
from lpt.arch import Arch
from lpt.budget import Budget, Candidate
from lpt.config import PruneConfig, resolved
from lpt.errors import DivergedError, LptError
from lpt.gates import ResidualMask
from lpt.masks import Masks, apply_masks
from lpt.memory import peak_bytes


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


def check_model(cfg: PruneConfig, arch: Arch) -> Budget:
    """What a config's own rules (``lpt.config.check``) cannot know without the model's config -- the flags against
    the model's widths (--round-to against the MLP width, --balance N against the attention units, --skip-layers,
    --ratio, --prune-layers, --hidden-ratio, --model-ratio / --target-params, --tp against the layers and sizes;
    per-layer widths and query-head / hidden-size pruning where the family's config would not load them) -- checked
    before anything is written, instead of at the first mask update. Returns the run's ``Budget``."""
    budget = budgets.plan(resolved(cfg), arch)
    if budget.layout == "per-layer":
        modeling.class_name(arch.model_type)  # a family lpt.modeling cannot build with per-layer widths: one line
    if arch.heads_locked and any(c.heads or c.hidden for c in budget.candidates):
        raise LptError(f"{arch.heads_locked}, so a model with fewer query heads or a smaller hidden size would not "
                       f"load: prune MLP channels (--balance 0) or whole blocks (--prune-layers) only")
    return budget


def _state_field(name: str) -> property:
    """A per-layer list of the pruner's ``selection.State``, read and assigned as an attribute of the pruner."""
    return property(lambda self: getattr(self.state, name), lambda self, value: setattr(self.state, name, list(value)))


class Pruner:
    """Algorithm 1 around a loaded model: LoRA training, scoring, moving average, schedule and masks.

    ``train_step(batch)`` runs one optimiser step (accumulating micro-batches) and grows the masks when the
    schedule says so. A config that prunes nothing (``--ratio 0`` and no other axis) is plain LoRA fine-tuning
    (criterion ``none``), for cost comparisons. ``budget`` is the run's ``lpt.budget.Budget`` (built from ``cfg`` and
    ``arch`` when not given).
    """

    def __init__(self, model, arch: Arch, cfg: PruneConfig, total_steps: int, model_name: str | None = None,
                 budget: Budget | None = None):
        cfg = resolved(cfg)
        self.budget = budget or budgets.plan(cfg, arch)
        self.note = self.budget.note
        cfg = dataclasses.replace(cfg, gqa=self.budget.gqa)
        self.model, self.arch, self.cfg, self.total_steps = model, arch, cfg, total_steps
        self.model_name = model_name or cfg.model
        cands = self.budget.candidates
        self.prunes_width = any(c.heads or c.channels for c in cands) or (cfg.ratio > 0 and not self.budget.model_level)
        self.prunes_blocks = any(c.blocks for c in cands)
        self.prunes_hidden = any(c.hidden for c in cands)
        self.criterion = cfg.criterion if self.prunes_width or self.budget.model_level else "none"
        quantize = cfg.load_8bit and not any(int8.is_int8(m) for m in model.modules())  # not quantized on load
        self.layers = lora.inject(model, arch, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                  targets=targets(cfg), load_8bit=quantize, int8_threshold=cfg.int8_threshold,
                                  int8_backend=cfg.int8_backend)
        if self.prunes_hidden:  # the residual mask on the embedding, before any estimator hooks it
            ResidualMask.of(model, arch)
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
        self.prunable = list(self.budget.prunable)
        self.skip = [i for i in range(arch.num_layers) if i not in set(self.prunable)]
        self.layout = self.budget.layout
        self.estimator = None
        if self.prunes_width:
            self.estimator = importance.make(self.criterion, score=cfg.score, seed=cfg.seed,
                                             normalize=cfg.normalize_by if cfg.normalize else None)
            self.estimator.attach(model, arch, gqa=cfg.gqa, layers=self.prunable)
        self.axes = None
        if self.prunes_blocks or self.prunes_hidden:
            self.axes = importance.AxesImportance(cfg.block_criterion if self.prunes_blocks else None,
                                                  cfg.hidden_criterion if self.prunes_hidden else None,
                                                  normalize=cfg.normalize, seed=cfg.seed)
            self.axes.attach(model, arch, layers=self.prunable)
        self.policy = selection.Policy.of(arch, layout=self.layout, prunable=self.prunable, gqa=cfg.gqa,
                                          round_to=budgets.channel_unit(self.budget.round_to, self.budget.tp))
        self.state = selection.State.empty(arch, cfg.gqa)  # moving-average scores and pruned sets per layer
        self.step, self.target_sparsity, self.sparsity = 0, 0.0, 0.0
        self.ramp = schedule.ramp_bounds(total_steps, cfg.warmup, cfg.cooldown)
        self.layer_ratio = self.budget.layer_ratio
        # the target (blocks, hidden channels, attention units and MLP channels per layer); a budget with several
        # candidates (--balance search, a whole-model target) decides it at the first mask update (search)
        self.target: Candidate | None = None if self.pruning and self.budget.search else self.budget.candidates[0]
        self.search_losses: list[dict[str, Any]] | None = None
        self.device = self.params[0].device
        self.distributed = distributed.is_initialized() and distributed.world_size() > 1
        if self.distributed:  # every rank starts from rank 0's LoRA factors (as DDP does)
            distributed.broadcast_([p.detach() for p in self.params])

    # ---------------------------------------------------------------- selection state, per layer (self.state)
    heads_pruned = _state_field("heads_pruned")
    channels_pruned = _state_field("channels_pruned")

    @property
    def pruning(self) -> bool:
        """Whether anything is pruned (else the run is plain LoRA fine-tuning)."""
        return self.estimator is not None or self.axes is not None

    @property
    def target_counts(self) -> tuple[int, int] | None:
        """The (attention units, MLP channels) removed per layer at the target; None until the search decided."""
        return None if self.target is None else self.target.width

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

    def axes_importance(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The block and hidden-channel scores, identical on every rank."""
        blocks, hidden = self.axes.scores(self.step)
        if self.distributed:
            for t in (blocks, hidden):
                if t is not None:
                    dev = t.to(self.device)
                    distributed.broadcast_([dev])
                    t.copy_(dev.cpu())
        return blocks, hidden

    def update_ema(self, scores) -> None:
        for i in self.prunable:
            self.state.head_scores[i] = schedule.ema(self.state.head_scores[i], scores[i][0], self.cfg.ema)
            self.state.channel_scores[i] = schedule.ema(self.state.channel_scores[i], scores[i][1], self.cfg.ema)

    def update_axes_ema(self, kinds: tuple[str, ...]) -> None:
        """Fold the block / hidden scores into their moving averages, for the axes whose criterion is one of
        ``kinds`` (those observed every step, or those computed at a mask update)."""
        blocks, hidden = self.axes_importance()
        st = self.state
        if blocks is not None and self.axes.block_kind in kinds:  # +inf (blocks that never go) stays +inf
            st.block_scores = schedule.ema(st.block_scores, blocks, self.cfg.ema)
        if hidden is not None and self.axes.hidden_kind in kinds:
            st.hidden_scores = schedule.ema(st.hidden_scores, hidden, self.cfg.ema)

    def prune_to(self, sparsity: float) -> None:
        """Grow the pruned sets (never shrink them) to ``sparsity`` of the goal (the block parameters for a
        width-only run, the whole model's otherwise): a fraction ``sparsity / goal`` of the way to the target."""
        if self.target is None:
            raise RuntimeError("the target is decided by search(batch) before the first prune_to")
        goal = self.goal()
        self.grow_to(min(1.0, sparsity / goal) if goal > 0 else 0.0)

    def goal(self) -> float:
        """What the schedule's sparsity rises to: ``--ratio`` (block parameters) for a width-only run, else the
        fraction of the whole model's parameters the target removes."""
        if not self.budget.model_level:
            return self.cfg.ratio
        before, after = self._masks_at(1.0, self.target).model_params()
        return 1.0 - after / before

    def grow_to(self, frac: float) -> None:
        self.state = self._grown_state(frac, self.target)
        self._apply_masks()

    def _grown_state(self, frac: float, target: Candidate) -> selection.State:
        """The selection state with the pruned sets grown ``frac`` of the way to ``target``, by the moving-average
        scores (the scores are shared with the current state)."""
        st = self.state
        blocks = st.blocks_pruned
        if target.blocks:
            blocks = selection.prune_lowest(_need(st.block_scores), st.blocks_pruned,
                                            int(math.floor(frac * target.blocks + 0.5)))
        hidden = st.hidden_pruned
        if target.hidden:
            hidden = selection.prune_lowest(_need(st.hidden_scores), st.hidden_pruned,
                                            target.hidden if frac >= 1.0 else int(math.floor(frac * target.hidden + 0.5)))
        policy = self.policy
        if bool(blocks.any()) and self.layout == "per-layer":  # removed blocks take no part in the global ranking
            policy = dataclasses.replace(policy, prunable=tuple(i for i in policy.prunable if not bool(blocks[i])))
        hp, cp = st.heads_pruned, st.channels_pruned
        if target.heads or target.channels:
            counts = selection.step_counts(frac, target.width, policy, st)
            hp, cp = selection.grow(counts, policy, st)
        return dataclasses.replace(st, heads_pruned=list(hp), channels_pruned=list(cp), blocks_pruned=blocks,
                                   hidden_pruned=hidden)

    def _masks_at(self, frac: float, target: Candidate) -> Masks:
        st = self._grown_state(frac, target) if frac > 0 else self.state
        return self._masks(st)

    @torch.no_grad()
    def search(self, batch: dict[str, torch.Tensor]) -> None:
        """Decide the target among the budget's candidates (beyond the paper): each is pruned all the way by the
        current scores and the model's loss on ``batch`` measured (no gradient, no dropout); the one with the lowest
        loss becomes the target. The masks are then restored, and the schedule grows them towards that target as
        usual. Costs one forward pass of ``batch`` per candidate, once.

        For a width-only run the candidates are ``--balance search``'s (0, 1, ... attention units per layer, the MLP
        channels making up the rest); for a whole-model target (``--model-ratio`` / ``--target-params``) every
        division of it between ``--axes``, each with the divisions of its width between attention and MLP.
        """
        cands = list(self.budget.candidates)
        found = []
        if len(cands) > 1:
            for target in cands:
                apply_masks(self.model, self._masks_at(1.0, target))
                found.append(self.mean_loss(batch))
            self._apply_masks()
        best = min(range(len(cands)), key=found.__getitem__) if found else 0
        self.target = cands[best]
        if self.budget.model_level:
            self.search_losses = [{**c.to_dict(), "params": self._masks_at(1.0, c).model_params()[1],
                                   "loss": round(v, 6)} for c, v in zip(cands, found)]
        else:
            self.search_losses = [{"attention_units": c.heads, "mlp_channels": c.channels, "loss": round(v, 6)}
                                  for c, v in zip(cands, found)]


    @torch.no_grad()
    def measure_drop_losses(self, batch: dict[str, torch.Tensor]) -> None:
        """``--block-criterion loss``: the loss increase on ``batch`` when each remaining prunable block alone is
        dropped (one forward pass per block), handed to the block scores."""
        current = self.masks()
        base = self.mean_loss(batch)
        out = torch.zeros(self.arch.num_layers)
        try:
            for i in self.prunable:
                if i in current.removed:
                    continue
                apply_masks(self.model, dataclasses.replace(current, removed=sorted({*current.removed, i})))
                out[i] = self.mean_loss(batch) - base
        finally:
            apply_masks(self.model, current)
        self.axes.set_losses(out)

    def _apply_masks(self) -> None:
        current = self.masks()
        apply_masks(self.model, current)
        before, after = current.model_params() if self.budget.model_level else current.block_params()
        self.sparsity = 1.0 - after / before

    def masks(self) -> Masks:
        return self._masks(self.state)

    def _masks(self, st: selection.State) -> Masks:
        model_level = self.budget.model_level
        return Masks.from_pruned(self.arch, st.heads_pruned, st.channels_pruned, self.cfg.gqa,
                                 blocks_pruned=st.blocks_pruned if model_level else None,
                                 hidden_pruned=st.hidden_pruned if model_level else None, model=self.model_name)

    def balance_info(self) -> dict[str, Any]:
        """What ``masks.json`` records of the attention/MLP balance."""
        h, c = self.target_counts or (0, 0)
        out: dict[str, Any] = {"mode": self.cfg.balance, "attention_units": h, "mlp_channels": c}
        if self.search_losses and not self.budget.model_level:
            out["candidates"] = self.search_losses
        return out

    def search_info(self) -> dict[str, Any] | None:
        """What ``masks.json`` records of the model-level axes and the whole-model search (None for a width-only
        run)."""
        if not self.budget.model_level:
            return None
        b, cfg = self.budget, self.cfg
        out: dict[str, Any] = {"target": (self.target or self.budget.candidates[0]).to_dict(),
                               "block_criterion": cfg.block_criterion if self.prunes_blocks else None,
                               "hidden_criterion": cfg.hidden_criterion if self.prunes_hidden else None}
        if b.goal_params is not None:
            out.update(goal_params=b.goal_params, axes=budgets.parse_axes(cfg.axes), grid=cfg.search_grid)
        if self.search_losses:
            out["candidates"] = self.search_losses
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
        """Sum LoRA gradients and what the estimators observed over all ranks (a no-op for one process)."""
        if not self.distributed:
            return
        for p in self.params:  # a rank that got no micro-batch contributes zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        distributed.all_reduce_sum_([p.grad for p in self.params] +
                                    (self.estimator.reducible() if self.estimator else []))
        if self.axes is not None:  # float64 accumulators on the CPU: summed on the device, copied back
            acc = self.axes.reducible()
            moved = [t.to(self.device) for t in acc]
            distributed.all_reduce_sum_(moved)
            for t, m in zip(acc, moved):
                t.copy_(m.cpu())

    # kinds of block / hidden criteria observed in every step's passes, and those computed when the masks grow
    OBSERVED = ("fisher", "influence", "activation")
    AT_UPDATE = ("random", "loss")

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.step += 1
        loss = self.forward_backward(batch)
        self.reduce_gradients()
        start, end = self.ramp
        pruning = not self.cfg.one_shot and self.pruning
        if pruning and self.estimator is not None and self.estimator.needs_backward and self.step <= end:
            self.update_ema(self.group_importance())
        if pruning and self.axes is not None and self.step <= end:
            self.update_axes_ema(self.OBSERVED)
        if self.estimator is not None:
            self.estimator.clear()
        if self.axes is not None:
            self.axes.clear()
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.check_weights()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if pruning and schedule.is_prune_step(self.step, self.cfg.prune_freq, start, end):
            self.score_at_update(batch)
            if self.target is None:
                self.search(batch)
            self.target_sparsity = schedule.cubic_sparsity(self.step, self.goal(), start, end)
            self.prune_to(self.target_sparsity)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # honest per-step seconds on a GPU
        return {"step": self.step, "loss": round(loss, 6), "sparsity": round(self.sparsity, 6),
                "target_sparsity": round(self.target_sparsity, 6), "lr": self.scheduler.get_last_lr()[0],
                "seconds": round(time.perf_counter() - t0, 4), "peak_memory_bytes": peak_bytes(self.device)}

    def score_at_update(self, batch: dict[str, torch.Tensor]) -> None:
        """The scores read when the masks grow: weights-only width criteria, random and drop-loss block scores."""
        if self.estimator is not None and not self.estimator.needs_backward:
            self.update_ema(self.group_importance())
        if self.axes is not None:
            if self.axes.needs_losses:
                self.measure_drop_losses(batch)
            self.update_axes_ema(self.AT_UPDATE)

    def check_weights(self) -> None:
        """Stop with :class:`DivergedError` when an optimiser step left a LoRA factor non-finite (identical on every
        rank: the gradients were all-reduced first)."""
        flags = [torch.isfinite(p).all().to(self.device) for p in self.params]  # one sync (--device-map: several)
        if flags and not bool(torch.stack(flags).all()):
            raise DivergedError(f"step {self.step}: the optimiser step made LoRA weights non-finite (training "
                                f"diverged); {divergence_hint(self.cfg)}")

    def one_shot(self, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """Score once over ``batches`` (LM loss, gradients summed, no update) and prune to the target at once; the
        search (``--balance search``, a whole-model target) measures its candidates on the first batch."""
        batches = list(batches)
        observes = (self.estimator is not None and self.estimator.needs_backward) or \
            (self.axes is not None and (self.axes.needs_backward or self.axes.block_kind == "influence"
                                        or self.axes.hidden_kind == "activation"))
        if observes:
            for batch in batches:
                self.forward_backward(batch, distill=False)
            self.reduce_gradients()
        if self.estimator is not None:
            scores = self.group_importance()
            self.estimator.clear()
            for i in self.prunable:
                self.state.head_scores[i], self.state.channel_scores[i] = scores[i]
        if self.axes is not None:
            if self.axes.needs_losses:
                self.measure_drop_losses(batches[0])
            blocks, hidden = self.axes_importance()
            self.axes.clear()
            self.state.block_scores, self.state.hidden_scores = blocks, hidden
        self.optimizer.zero_grad(set_to_none=True)
        if self.target is None:
            self.search(batches[0])
        self.target_sparsity = self.goal()
        self.grow_to(1.0)

    # ---------------------------------------------------------------- state
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to resume, as (tensors, JSON-able values): no pickle."""
        opt_t, opt_plain = checkpoint.flatten_optimizer(self.optimizer.state_dict())
        t = {**lora.adapter_state_dict(self.model), **opt_t, "rng.cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            t.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        st = self.state
        for name, seq in (("heads_pruned", st.heads_pruned), ("channels_pruned", st.channels_pruned),
                          ("ema_heads", st.head_scores), ("ema_channels", st.channel_scores)):
            t.update({f"{name}.{i}": v for i, v in enumerate(seq) if v is not None})
        for name, v in (("blocks_pruned", st.blocks_pruned), ("hidden_pruned", st.hidden_pruned),
                        ("ema_blocks", st.block_scores), ("ema_hidden", st.hidden_scores)):
            if v is not None:
                t[name] = v
        return t, {"step": self.step, "target_sparsity": self.target_sparsity, "optimizer": opt_plain,
                   "scheduler": self.scheduler.state_dict(),
                   "target": None if self.target is None else self.target.to_dict(),
                   "search_losses": self.search_losses}

    def load_state(self, t: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
        with torch.no_grad():
            for path, layer in self.layers.items():
                if layer.r:
                    layer.lora_A.weight.copy_(t[f"{lora.PEFT_PREFIX}{path}.lora_A.weight"])
                    layer.lora_B.weight.copy_(t[f"{lora.PEFT_PREFIX}{path}.lora_B.weight"])
        self.optimizer.load_state_dict(checkpoint.unflatten_optimizer(t, plain["optimizer"]))
        self.scheduler.load_state_dict(plain["scheduler"])
        self.step, self.target_sparsity = int(plain["step"]), float(plain["target_sparsity"])
        if plain.get("target") is not None:  # the target chosen before the checkpoint
            d = plain["target"]
            self.target = Candidate(int(d["blocks"]), int(d["hidden_channels"]), int(d["attention_units"]),
                                    int(d["mlp_channels"]))
            self.search_losses = plain.get("search_losses")
        elif plain.get("final") is not None:  # a checkpoint of lpt 0.3 and earlier: (attention units, MLP channels)
            h, c = (int(x) for x in plain["final"])
            self.target = Candidate(0, 0, h, c)
            self.search_losses = plain.get("balance_losses")
        n = self.arch.num_layers
        st = self.state
        st.heads_pruned = [t[f"heads_pruned.{i}"] for i in range(n)]
        st.channels_pruned = [t[f"channels_pruned.{i}"] for i in range(n)]
        st.head_scores = [t.get(f"ema_heads.{i}") for i in range(n)]
        st.channel_scores = [t.get(f"ema_channels.{i}") for i in range(n)]
        st.blocks_pruned = t.get("blocks_pruned", st.blocks_pruned)
        st.hidden_pruned = t.get("hidden_pruned", st.hidden_pruned)
        st.block_scores, st.hidden_scores = t.get("ema_blocks"), t.get("ema_hidden")
        torch.set_rng_state(t["rng.cpu"])
        if torch.cuda.is_available() and "rng.cuda.0" in t:
            torch.cuda.set_rng_state_all([t[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())])
        self._apply_masks()

    def importance_tensors(self) -> dict[str, torch.Tensor]:
        st = self.state
        out = {f"layers.{i}.{k}": v.float().contiguous() for i in self.prunable if st.head_scores[i] is not None
               for k, v in (("heads", st.head_scores[i]), ("channels", st.channel_scores[i]))}
        for k, v in (("blocks", st.block_scores), ("hidden", st.hidden_scores)):
            if v is not None:
                out[k] = v.float().contiguous()
        return out


def _need(t: torch.Tensor | None) -> torch.Tensor:
    if t is None:
        raise LptError("no block / hidden-channel importance gathered before the first mask update; lower --warmup")
    return t
