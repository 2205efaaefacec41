"""Importance estimators: one small interface for every criterion, and ``score(...)`` to use one without training.

An estimator is attached to a model that carries LoRA layers (``lora.inject``), observes what it needs while the
model runs forward and backward (LoRA gradients, base-weight gradients, or activation gradients through hooks),
and returns group scores per decoder block on request: ``(heads, channels)``, with ``heads`` one score per
attention unit of the ``gqa`` mode (key/value groups or query heads) and ``channels`` one per MLP channel. The
pruning loop (``lpt.pruner``) never knows how a score was made; the pure tensor math lives in
``lpt.criteria`` and the group sums in ``lpt.groups``.

    est = importance.make("fisher").attach(model, arch, gqa="kv-groups")
    loss.backward()                       # as often as you like: what is observed accumulates
    heads, channels = est.scores()[i]     # layer i
    est.clear()                           # start the next observation window

Criteria (``CRITERIA``, the names of the ``ESTIMATORS`` registry):
- ``lora`` — the paper's LoRA-guided estimate (Eq. 10), from LoRA's A, B and their gradients;
- ``vanilla`` — first-order Taylor of the full weight (Eq. 3), needs every base weight's gradient (the paper's
  memory-hungry baseline);
- ``fisher`` — beyond the paper: the empirical Fisher information of each group's mask (Molchanov et al. 2019;
  Kwon et al. 2022), from activation gradients only, squared per sequence;
- ``magnitude`` — squared L2 norm of the group's merged weights; ``random`` — seeded uniform scores.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch

from lpt import criteria, groups, int8, lora
from lpt.arch import FAN_IN, PROJECTIONS, Arch, describe
from lpt.errors import LptError

NORMALIZE = ("group", "projection")

Scores = list  # list[tuple[torch.Tensor, torch.Tensor] | None], one entry per decoder block


class Importance:
    """Base estimator. Subclasses implement ``layer_scores`` (and hooks, where they observe activations).

    ``score``: element score of the weight-based criteria (``square`` as in the paper, or ``abs``).
    ``normalize``: ``None``; ``"group"`` — lpt's: each layer's summed group vector divided by its L2 norm;
    ``"projection"`` — the authors' released code: each projection's row/column vector divided by its L2 norm
    before the projections are summed into groups (for ``fisher``, which has one vector per group kind, the two
    are the same).
    """

    name = "base"
    needs_backward = True  # scores come from gradients of a loss
    needs_base_grad = False  # ... of the frozen base weights (only vanilla)

    def __init__(self, *, score: str = "square", normalize: str | None = None, seed: int = 0):
        if score not in criteria.SCORES:
            raise LptError(f"unknown --score '{score}' (use {', '.join(criteria.SCORES)})")
        if normalize is not None and normalize not in NORMALIZE:
            raise LptError(f"unknown normalisation '{normalize}' (use {', '.join(NORMALIZE)})")
        self.score_kind, self.normalize, self.seed = score, normalize, seed
        self.model = self.arch = None
        self.layers: dict[str, lora.LoraLinear] = {}
        self.gqa = "kv-groups"
        self.prunable: list[int] = []

    # ------------------------------------------------------------------ lifecycle
    def attach(self, model, arch: Arch, gqa: str = "kv-groups", layers: Iterable[int] | None = None
               ) -> "Importance":
        """Observe ``model`` (which must carry LoRA layers on all seven projections) for blocks ``layers``."""
        if gqa not in groups.GQA_MODES:
            raise LptError(f"unknown --gqa '{gqa}' (use {', '.join(groups.GQA_MODES)})")
        self.model, self.arch, self.gqa = model, arch, gqa
        self.layers = lora.lora_layers(model)
        self.prunable = list(range(arch.num_layers)) if layers is None else list(layers)
        missing = [p for i in self.prunable for p in (arch.module_path(i, q) for q in PROJECTIONS)
                   if p not in self.layers]
        if missing:
            raise LptError(f"{missing[0]} carries no LoRA layer; inject LoRA (lpt.lora.inject) before scoring")
        self._attach()
        return self

    def _attach(self) -> None:
        pass

    def detach(self) -> None:
        """Remove hooks and anything the estimator switched on; the model is as before ``attach``."""
        self.clear()

    def reducible(self) -> list[torch.Tensor]:
        """Tensors that data-parallel ranks must sum before ``scores`` (beyond the LoRA gradients the loop reduces)."""
        return []

    def clear(self) -> None:
        """Forget what was observed since the last ``clear`` (called after every optimiser step)."""

    # ------------------------------------------------------------------ scores
    def layer_scores(self, i: int, step: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(heads, channels)`` of block ``i`` before normalisation; None when nothing was observed."""
        proj = self.projection_scores(i)
        if not proj:
            return None
        if self.normalize == "projection":
            proj = {k: groups.normalize(v) for k, v in proj.items()}
        return groups.group_scores(self.arch, proj, self.gqa)

    def projection_scores(self, i: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def scores(self, step: int = 0) -> Scores:
        """Group scores of every observed block (None for blocks not in ``layers``), on the CPU, float32."""
        out: Scores = [None] * self.arch.num_layers
        for i in self.prunable:
            s = self.layer_scores(i, step)
            if s is None:
                continue
            h, c = (t.float().cpu() for t in s)
            if self.normalize == "group":
                h, c = groups.normalize(h), groups.normalize(c)
            out[i] = (h, c)
        return out

    def _layer(self, i: int, proj: str) -> lora.LoraLinear:
        return self.layers[self.arch.module_path(i, proj)]


class LoraImportance(Importance):
    """The paper's criterion (Eq. 10): ``I = [(gB·A + B·gA − gB·gA) ⊙ (W0 + s·B·A)]²`` from LoRA alone.

    Needs the gradients of LoRA's A and B only; ``W0`` is read one chunk at a time (int8 de-quantised per chunk),
    so no full-size gradient or merged weight is ever held.
    """

    name = "lora"

    @torch.no_grad()
    def projection_scores(self, i: int) -> dict[str, torch.Tensor]:
        out = {}
        for proj in PROJECTIONS:
            layer = self._layer(i, proj)
            if not layer.r or layer.lora_A.weight.grad is None:
                continue
            w0, scale = int8.weight_parts(layer.base_layer)
            out[proj] = criteria.lora_group_sums(
                w0, layer.lora_A.weight, layer.lora_B.weight, layer.lora_A.weight.grad, layer.lora_B.weight.grad,
                layer.scaling, self.score_kind, fan_in=proj in FAN_IN, row_scale=scale)
        return out


class VanillaImportance(Importance):
    """First-order Taylor of the merged weight (Eq. 3): ``I = (∂L/∂W ⊙ (W0 + s·B·A))²``; needs every base gradient."""

    name = "vanilla"
    needs_base_grad = True

    def _attach(self) -> None:
        check_int8(self.name, any(int8.is_int8(layer.base_layer) for layer in self.layers.values()))
        for layer in self.layers.values():
            layer.base_layer.weight.requires_grad_(True)

    def detach(self) -> None:
        self.clear()
        for layer in self.layers.values():
            layer.base_layer.weight.requires_grad_(False)

    def reducible(self) -> list[torch.Tensor]:
        out = []
        for layer in self.layers.values():  # a rank that saw no micro-batch contributes zeros
            w = layer.base_layer.weight
            if w.grad is None:
                w.grad = torch.zeros_like(w)
            out.append(w.grad)
        return out

    def clear(self) -> None:
        for layer in self.layers.values():
            layer.base_layer.weight.grad = None

    @torch.no_grad()
    def projection_scores(self, i: int) -> dict[str, torch.Tensor]:
        out = {}
        for proj in PROJECTIONS:
            layer = self._layer(i, proj)
            g = layer.base_layer.weight.grad
            if g is None:
                continue
            w = int8.dense_weight(layer.base_layer) + layer.delta().to(g.device)
            out[proj] = criteria.reduce(criteria.vanilla_importance(w, g, self.score_kind), proj in FAN_IN)
        return out


class MagnitudeImportance(Importance):
    """Norm of the group's merged weights ``W0 + s·B·A`` (squared L2 with ``score='square'``)."""

    name = "magnitude"
    needs_backward = False

    @torch.no_grad()
    def projection_scores(self, i: int) -> dict[str, torch.Tensor]:
        out = {}
        for proj in PROJECTIONS:
            layer = self._layer(i, proj)
            w = int8.dense_weight(layer.base_layer) + layer.delta().to(layer.base_layer.weight.device)
            out[proj] = criteria.reduce(criteria.magnitude_importance(w, self.score_kind), proj in FAN_IN)
        return out


class RandomImportance(Importance):
    """Uniform random scores, seeded by (seed, step, layer): the floor every criterion must beat."""

    name = "random"
    needs_backward = False

    def __init__(self, **kw):
        super().__init__(**{**kw, "normalize": None})  # normalising random numbers changes nothing worth having

    def layer_scores(self, i: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + i)
        units = groups.head_scores_len(self.arch, self.gqa)
        return criteria.random_scores(units, g), criteria.random_scores(self.arch.intermediate_size, g)


class FisherImportance(Importance):
    """Empirical Fisher information of each group's mask (beyond the paper).

    For a mask ``m_g = 1`` on group g's slice of the ``o_proj`` / ``down_proj`` input ``x`` and sequence n,
    ``d(g, n) = ∂L_n/∂m_g = Σ_tokens Σ_{dims of g} x · ∂L/∂x``, and ``I(g) = Σ_n d(g, n)²`` accumulates over every
    backward pass until ``clear``. No weight gradient is needed and the forward pass is unchanged. The products are
    read where the activations are kept for the backward pass anyway, so the estimate costs no activation memory:

    - an MLP channel: ``x = act(gate) ⊙ up``, so ``x · ∂L/∂x = up · ∂L/∂up`` at the ``up_proj`` output;
    - a key/value group (``--gqa kv-groups``): ``x = softmax(q kᵀ) v`` is linear in ``v``, so summed over tokens and
      the group's query heads ``Σ x · ∂L/∂x = Σ v · ∂L/∂v`` at the ``v_proj`` output;
    - a query head (``--gqa query-heads``) has no such identity: the ``o_proj`` input is kept for its backward pass
      (one activation of that size per layer).

    Under gradient checkpointing the activation of the recomputation is used, so nothing is kept across the forward
    pass there either.
    """

    name = "fisher"

    def _attach(self) -> None:
        self._handles = []
        self._acc: dict[tuple[int, str], torch.Tensor] = {}
        self._seen: dict[tuple[int, str], int] = {}  # forward calls per site in this forward pass
        self._latest: dict[tuple[int, str], torch.Tensor] = {}  # recomputed activations (gradient checkpointing)
        head_site = ("v_proj", "output") if self.gqa == "kv-groups" else ("o_proj", "input")
        self.sites = {head_site[0]: head_site[1], "up_proj": "output"}
        for i in self.prunable:
            for proj, where in self.sites.items():
                mod = self._layer(i, proj)
                if where == "output":
                    self._handles.append(mod.register_forward_hook(self._hook(i, proj, output=True)))
                else:
                    self._handles.append(mod.register_forward_pre_hook(self._hook(i, proj, output=False)))
        # a new forward pass: count the calls of each site afresh (a second call is a checkpoint recomputation)
        self._handles.append(self.model.register_forward_pre_hook(lambda *_: self._seen.clear()))
        if hasattr(self.model, "get_input_embeddings"):  # gradients reach every activation, LoRA or not
            self._handles.append(self.model.get_input_embeddings().register_forward_hook(_require_grad))

    def _checkpointing(self) -> bool:
        m = self.model
        flag = m.is_activation_checkpointing if hasattr(m, "is_activation_checkpointing") else \
            getattr(m, "is_gradient_checkpointing", False)
        return bool(flag and m.training)

    def _hook(self, i: int, proj: str, output: bool):
        key = (i, proj)

        def observe(t: torch.Tensor) -> None:
            if not torch.is_grad_enabled() or not t.requires_grad:
                return
            n = self._seen.get(key, 0)
            self._seen[key] = n + 1
            if n:  # the checkpoint recomputation during backward: its activation is the one to pair
                self._latest[key] = t
                return
            # without checkpointing the backward pass keeps t's storage anyway; a detached alias shares it without
            # the reference cycle (t -> hook -> t) that would keep every step's activations alive until a GC pass
            ref = None if self._checkpointing() else t.detach()
            t.register_hook(lambda g: self._accumulate(key, self._latest.pop(key, None) if ref is None else ref, g))

        if output:
            return lambda module, args, out: observe(out)
        return lambda module, args: observe(args[0])

    @torch.no_grad()
    def _accumulate(self, key: tuple[int, str], act: torch.Tensor | None, grad: torch.Tensor) -> None:
        if act is None:
            return
        a = self.arch
        x = (act.float() * grad.float()).reshape(act.shape[0], -1, act.shape[-1]).sum(1)  # [batch, width]
        if key[1] == "up_proj":
            d = x
        else:  # v_proj: [batch, kv heads]; o_proj input: [batch, query heads]
            d = criteria.fisher_group_grads(x, a.head_dim)
        s = criteria.fisher_scores(d)
        self._acc[key] = s if key not in self._acc else self._acc[key] + s

    def _head_key(self, i: int) -> tuple[int, str]:
        return (i, "v_proj" if self.gqa == "kv-groups" else "o_proj")

    def reducible(self) -> list[torch.Tensor]:
        a = self.arch
        units = groups.head_scores_len(a, self.gqa)
        for i in self.prunable:  # a rank that saw no micro-batch contributes zeros
            dev = self._layer(i, "up_proj").out_mask.device
            self._acc.setdefault(self._head_key(i), torch.zeros(units, device=dev))
            self._acc.setdefault((i, "up_proj"), torch.zeros(a.intermediate_size, device=dev))
        return [self._acc[k] for i in self.prunable for k in (self._head_key(i), (i, "up_proj"))]

    def clear(self) -> None:
        self._acc, self._latest = {}, {}

    def detach(self) -> None:
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []
        self.clear()

    def layer_scores(self, i: int, step: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        h, c = self._acc.get(self._head_key(i)), self._acc.get((i, "up_proj"))
        if h is None or c is None:
            return None
        return h, c


# ------------------------------------------------------------------------------------------------ model-level axes
BLOCK_CRITERIA = ("fisher", "influence", "loss", "random")
HIDDEN_CRITERIA = ("fisher", "activation", "random")


class AxesImportance:
    """Scores of the model-level axes (beyond the paper): one per decoder block (depth pruning) and one per hidden
    channel (hidden-size pruning), with the same lifecycle as a width estimator (attach / observe / ``scores`` /
    ``clear``).

    Blocks (``blocks``):
    - ``fisher``: the empirical Fisher of the block's gate ``m_b`` in ``h + m_b·f(h)``: for sequence n,
      ``d(b, n) = Σ_tokens Σ_dims f(h)·∂L/∂out``, ``I(b) = Σ_n d(b, n)²`` (read at the block's output);
    - ``influence``: ShortGPT's block influence ``1 − cos(h, out)``, averaged over the tokens of the forward passes
      (no gradient needed);
    - ``loss``: the increase of the loss when the block alone is dropped; the pruner measures it at every mask update
      (``needs_losses``) and hands it in with ``set_losses``;
    - ``random``: seeded uniform scores.

    Hidden channels (``hidden``):
    - ``fisher``: the empirical Fisher of the channel's mask, which multiplies the channel wherever the residual
      stream is written -- the embedding's output and every block's o_proj and down_proj outputs: for sequence n,
      ``d(c, n) = Σ_sites Σ_tokens x_c·∂L/∂x_c``, summed over the sites before squaring. The sites' products are
      gathered per micro-batch and squared when the embedding's gradient arrives (the last of the backward pass);
    - ``activation``: Minitron's: the mean magnitude of the channel at the output of every norm over the hidden
      size, summed over the norms;
    - ``random``: seeded uniform scores.
    """

    def __init__(self, blocks: str | None = None, hidden: str | None = None, *, normalize: bool = True, seed: int = 0):
        if blocks is not None and blocks not in BLOCK_CRITERIA:
            raise LptError(f"unknown --block-criterion '{blocks}' (use {', '.join(BLOCK_CRITERIA)})")
        if hidden is not None and hidden not in HIDDEN_CRITERIA:
            raise LptError(f"unknown --hidden-criterion '{hidden}' (use {', '.join(HIDDEN_CRITERIA)})")
        self.block_kind, self.hidden_kind, self.normalize, self.seed = blocks, hidden, normalize, seed
        self.model = self.arch = None
        self.layers: list[int] = []
        self._handles: list = []
        self._losses: torch.Tensor | None = None
        self.clear()

    @property
    def needs_backward(self) -> bool:
        return "fisher" in (self.block_kind, self.hidden_kind)

    @property
    def needs_losses(self) -> bool:
        """Whether the pruner must measure drop losses (``set_losses``) at every mask update."""
        return self.block_kind == "loss"

    def attach(self, model, arch: Arch, layers: Iterable[int] | None = None) -> "AxesImportance":
        """Observe ``model`` (with LoRA layers on every projection) for blocks ``layers`` (those that may go)."""
        from lpt.arch import get_module, hidden_norms
        from lpt.gates import decoder_layers

        self.model, self.arch = model, arch
        self.layers = list(range(arch.num_layers)) if layers is None else list(layers)
        self.clear()  # accumulators of this model's sizes
        blocks = decoder_layers(model, arch)
        if self.block_kind in ("fisher", "influence"):
            for i in self.layers:
                self._handles.append(blocks[i].register_forward_hook(self._block_hook(i), with_kwargs=True))
        if self.hidden_kind == "fisher":
            emb = model.get_input_embeddings()
            self._handles.append(emb.register_forward_hook(self._embedding_hook))
            for i in range(arch.num_layers):
                for proj in FAN_IN:
                    mod = get_module(model, arch.module_path(i, proj))
                    self._handles.append(mod.register_forward_hook(self._site_hook))
        elif self.hidden_kind == "activation":
            for path in hidden_norms(model, arch):
                self._handles.append(get_module(model, path).register_forward_hook(self._norm_hook))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        n = self.arch.num_layers if self.arch is not None else 0
        d = self.arch.hidden_size if self.arch is not None else 0
        self._blocks = torch.zeros(n, dtype=torch.float64)
        self._tokens = torch.zeros(n, dtype=torch.float64)  # influence: tokens seen per block
        self._hidden = torch.zeros(d, dtype=torch.float64)
        self._pending: torch.Tensor | None = None  # hidden fisher: this micro-batch's site sums [batch, d]
        self._seen = False

    def reducible(self) -> list[torch.Tensor]:
        """What data-parallel ranks sum before ``scores`` (float64 accumulators; moved by the caller)."""
        return [self._blocks, self._tokens, self._hidden]

    def set_losses(self, losses: torch.Tensor) -> None:
        """``--block-criterion loss``: the loss increase of dropping each block alone (``[layers]``)."""
        self._losses = losses.double().cpu()
        self._seen = True

    # ------------------------------------------------------------------ hooks
    def _block_hook(self, i: int):
        from lpt.gates import block_input, block_output

        def hook(module, args, kwargs, output):
            if not torch.is_grad_enabled():
                return None
            h, out = block_input(args, kwargs), block_output(output)
            if self.block_kind == "influence":
                with torch.no_grad():
                    cos = torch.nn.functional.cosine_similarity(h.float(), out.float(), dim=-1)
                    self._blocks[i] += float((1.0 - cos).sum())
                    self._tokens[i] += cos.numel()
                self._seen = True
            elif out.requires_grad:
                delta = (out - h).detach()
                out.register_hook(lambda g: self._block_grad(i, delta, g))
            return None

        return hook

    @torch.no_grad()
    def _block_grad(self, i: int, delta: torch.Tensor, grad: torch.Tensor) -> None:
        d = (delta.float() * grad.float()).reshape(delta.shape[0], -1).sum(1)  # [batch]
        self._blocks[i] += float(d.double().square().sum())
        self._seen = True

    def _site_hook(self, module, args, output):
        if torch.is_grad_enabled() and output.requires_grad:
            x = output.detach()
            output.register_hook(lambda g: self._site_grad(x, g))

    @torch.no_grad()
    def _site_grad(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        d = (x.float() * grad.float()).reshape(x.shape[0], -1, x.shape[-1]).sum(1).double().cpu()  # [batch, hidden]
        self._pending = d if self._pending is None else self._pending + d

    def _embedding_hook(self, module, args, output):
        if not torch.is_grad_enabled():
            return None
        if not output.requires_grad:  # frozen embedding: its output must carry a gradient to be observed
            output = output.detach().requires_grad_(True)
        x = output.detach()
        output.register_hook(lambda g: self._embedding_grad(x, g))
        return output

    @torch.no_grad()
    def _embedding_grad(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        self._site_grad(x, grad)  # the last site of the backward pass: square this micro-batch's sums
        if self._pending is not None:
            self._hidden += self._pending.square().sum(0)
            self._pending = None
            self._seen = True

    def _norm_hook(self, module, args, output):
        if torch.is_grad_enabled():
            with torch.no_grad():
                y = output.detach().float().abs().reshape(-1, output.shape[-1])
                self._hidden += y.mean(0).double().cpu()
            self._seen = True

    # ------------------------------------------------------------------ scores
    @torch.no_grad()
    def scores(self, step: int = 0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(blocks [layers], hidden [hidden_size])`` as float32 on the CPU; None for an axis not scored. Blocks
        outside ``layers`` score +inf (never chosen)."""
        a = self.arch
        blocks = hidden = None
        if self.block_kind is not None:
            if self.block_kind == "random":
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + 7)
                blocks = criteria.random_scores(a.num_layers, g).double()
            elif self.block_kind == "loss":
                blocks = self._losses if self._losses is not None else None
            elif self.block_kind == "influence":
                blocks = self._blocks / self._tokens.clamp(min=1) if self._tokens.sum() > 0 else None
            else:
                blocks = self._blocks.clone() if self._seen else None
            if blocks is not None:
                blocks = self._finish(blocks)
                keep_out = torch.ones(a.num_layers, dtype=torch.bool)
                keep_out[self.layers] = False
                blocks[keep_out] = math.inf
        if self.hidden_kind is not None:
            if self.hidden_kind == "random":
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + 11)
                hidden = self._finish(criteria.random_scores(a.hidden_size, g).double())
            elif self._hidden.abs().sum() > 0:
                hidden = self._finish(self._hidden.clone())
        return blocks, hidden

    def _finish(self, v: torch.Tensor) -> torch.Tensor:
        v = v.float()
        if self.normalize:
            finite = torch.isfinite(v)
            n = v[finite].norm()
            if n > 0:
                v = torch.where(finite, v / n, v)
        return v


def _require_grad(module, args, output):
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_(True)
    return output


ESTIMATORS: Mapping[str, type[Importance]] = {
    "lora": LoraImportance, "vanilla": VanillaImportance, "fisher": FisherImportance,
    "magnitude": MagnitudeImportance, "random": RandomImportance,
}
CRITERIA = tuple(ESTIMATORS)  # the criterion names, in the order --help lists them


def int8_conflict(criterion: str) -> str | None:
    """Why ``criterion`` cannot score a model whose base weights are int8, or None when it can: an estimator that
    needs the gradients of the base weights (``needs_base_grad``) cannot, since int8 weights have none."""
    est = ESTIMATORS.get(criterion)
    if est is None or not est.needs_base_grad:
        return None
    return f"{criterion} needs the gradients of the base weights, which int8 weights do not have"


def check_int8(criterion: str, load_8bit: bool) -> None:
    """Refuse ``--criterion`` with ``--8bit`` where :func:`int8_conflict` says it cannot run."""
    why = int8_conflict(criterion) if load_8bit else None
    if why:
        raise LptError(f"--criterion {why}; drop --8bit or use --criterion lora or fisher")


def make(criterion: str, *, score: str = "square", normalize: str | None = None, seed: int = 0) -> Importance:
    """The estimator for ``criterion`` (one of ``CRITERIA``)."""
    if criterion not in ESTIMATORS:
        raise LptError(f"unknown --criterion '{criterion}' (use {', '.join(CRITERIA)})")
    return ESTIMATORS[criterion](score=score, normalize=normalize, seed=seed)


def score(model, batches: Iterable[Mapping[str, torch.Tensor]], criterion: str | Importance, *,
          arch: Arch | None = None, gqa: str = "kv-groups", layers: Iterable[int] | None = None,
          **kw) -> Scores:
    """Score ``model`` over ``batches`` without training: forward/backward each batch (gradients accumulate), then
    return the estimator's group scores per block. The model must carry LoRA layers (``lora.inject``; rank 0 is
    enough for every criterion but ``lora``). LoRA gradients are cleared afterwards; nothing else changes.
    """

    arch = arch or describe(model.config)
    est = criterion if isinstance(criterion, Importance) else make(criterion, **kw)
    est.attach(model, arch, gqa=gqa, layers=layers)
    params = [p for layer in est.layers.values() if layer.r for p in (layer.lora_A.weight, layer.lora_B.weight)]
    try:
        if est.needs_backward:
            dev = next(iter(params or model.parameters())).device
            for batch in batches:
                out = model(**{k: v.to(dev) for k, v in batch.items()})
                out.loss.backward()
        return est.scores()
    finally:
        est.detach()
        for p in params:
            p.grad = None
