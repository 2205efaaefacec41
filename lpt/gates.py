"""The residual mask of hidden-size pruning, and the block helpers of depth pruning.

A hidden (residual-stream) channel ``c`` is written by the token embedding and by every block's ``o_proj`` and
``down_proj``. Zeroing it in all three -- the embedding's output here (``ResidualMask``), the output rows of
``o_proj`` / ``down_proj`` through their LoRA layers' output masks (``masks.apply_masks``) -- keeps channel ``c`` zero
everywhere, so every projection that reads the residual sees zeros in its column ``c``, and the model computes what
the model with channel ``c`` sliced out computes (up to the RMS norms, which average over fewer channels there:
``lpt.slicing`` folds that constant into their weights).

A block ``b`` computes ``h -> h + f_b(h)``; depth pruning gates its residual contribution, ``h + m_b · f_b(h)``. The
contribution reaches the residual only through ``o_proj`` and ``down_proj`` (directly, or through Gemma 2 / 3's and
OLMo 2's post-norms, which map zero to zero), so ``m_b = 0`` is zeroing their outputs: ``masks.apply_masks`` sets their
output masks to zero, and the block returns its input unchanged -- what the model computes once ``lpt slice`` has
deleted it. The estimators read the block's contribution at its output (``block_input`` / ``block_output``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from lpt.arch import Arch, get_module

ATTR = "_lpt_residual_mask"


def decoder_layers(model, arch: Arch):
    """The model's decoder blocks (a ``ModuleList``)."""
    return get_module(model, arch.family.layers)


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder block was called with (transformers passes them first, or by name)."""
    return args[0] if args else kwargs["hidden_states"]


def block_output(output) -> torch.Tensor:
    """The hidden states a decoder block returned (a tensor, or the first element of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


class ResidualMask:
    """The embedding's share of the residual mask: a forward hook multiplying its output by a 0/1 vector."""

    def __init__(self, model, arch: Arch):
        self.arch = arch
        self.embedding = model.get_input_embeddings()
        self.mask = torch.ones(arch.hidden_size, device=self.embedding.weight.device)
        self.active = False
        self._handle = self.embedding.register_forward_hook(self._hook)

    @classmethod
    def of(cls, model, arch: Arch) -> "ResidualMask":
        """The model's residual mask, installed on first use (it is not a submodule: nothing of it is saved)."""
        found = getattr(model, ATTR, None)
        if found is None:
            found = cls(model, arch)
            setattr(model, ATTR, found)
        return found

    def set(self, kept: Sequence[int] | None) -> None:
        """Keep hidden channels ``kept`` (None: all)."""
        mask = torch.ones_like(self.mask)
        if kept is not None:
            mask.zero_()
            mask[torch.as_tensor(list(kept), dtype=torch.long, device=mask.device)] = 1.0
        self.mask, self.active = mask, bool((mask == 0).any())

    def _hook(self, module, args, output):
        if not self.active:
            return output
        return output * self.mask.to(device=output.device, dtype=output.dtype)

    @torch.no_grad()
    def bake(self) -> None:
        """Zero the masked channels in the embedding's weight (an output layer tied to it reads zeros there anyway)
        and remove the hook: a plain model that computes what the masked one did (``lpt merge``)."""
        if self.active:
            w = self.embedding.weight
            w.mul_(self.mask.to(device=w.device, dtype=w.dtype))
        self._handle.remove()


def uninstall(model, bake: bool = False) -> None:
    """Remove the residual mask's hook from ``model`` (with ``bake``, zeroing the masked embedding columns first)."""
    found = getattr(model, ATTR, None)
    if found is not None:
        if bake:
            found.bake()
        else:
            found._handle.remove()
        delattr(model, ATTR)
