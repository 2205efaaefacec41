#!/usr/bin/env python
"""How well do the LoRA-guided criterion (and fisher) track the vanilla (full-gradient) criterion, and when?

    python benchmarks/criterion_fidelity.py --calib runs/quality/calib --steps 0,8,24

For SmolLM2-135M, LoRA is trained for a number of steps (plain LoRA fine-tuning, no pruning); then, on the same
calibration batches, group scores are computed with ``lpt.importance.score`` (public API only) and compared per
layer with the vanilla criterion (Eq. 3): Spearman rank correlation and the overlap of the 50% weakest MLP
channels. Variants of Eq. 10 show which term carries the signal:
  lora        G = gB·A + B·gA − gB·gA   (the paper's Eq. 10, lr taken as 1: ``--criterion lora``)
  first-order G = gB·A + B·gA          (without the second-order term)
  gB·A only   G = gB·A                 (what Eq. 10 reduces to while B = 0)
  fisher      the mask Fisher information (``--criterion fisher``; no weights involved)
"""

from __future__ import annotations

import argparse
import json

import torch

from lpt import criteria, importance, int8, lora
from lpt.arch import FAN_IN, PROJECTIONS


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = torch.argsort(torch.argsort(a)).float()
    rb = torch.argsort(torch.argsort(b)).float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


class GradientVariant(importance.Importance):
    """``[G ⊙ (W0 + s·B·A)]²`` with ``G`` an estimate of the weight gradient from LoRA's factors and gradients."""

    def __init__(self, name: str, estimate):
        super().__init__(score="square", normalize=None)
        self.name, self.estimate = name, estimate

    @torch.no_grad()
    def projection_scores(self, i: int) -> dict[str, torch.Tensor]:
        out = {}
        for proj, path in ((p, self.arch.module_path(i, p)) for p in PROJECTIONS):
            layer = self.layers[path]
            if not layer.r or layer.lora_A.weight.grad is None:
                continue
            A, B = layer.lora_A.weight.float(), layer.lora_B.weight.float()
            G = self.estimate(A, B, layer.lora_A.weight.grad.float(), layer.lora_B.weight.grad.float())
            W = int8.dense_weight(layer.base_layer) + layer.delta()
            out[proj] = criteria.reduce((G * W) ** 2, proj in FAN_IN)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--steps", default="0,8,24", help="LoRA training steps before scoring (comma list)")
    ap.add_argument("--batches", type=int, default=4, help="calibration batches of 4 the scores are summed over")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args()

    from lpt import calibration, models
    from lpt.arch import describe

    torch.manual_seed(0)
    model, tok = models.load_model(a.model)
    arch = describe(model.config)
    lora.inject(model, arch, r=8, alpha=16, dropout=0.0)
    params = [p for layer in lora.lora_layers(model).values() if layer.r
              for p in (layer.lora_A.weight, layer.lora_B.weight)]
    optimizer = torch.optim.AdamW(params, lr=a.lr)
    data = calibration.load(a.calib, tok)
    n = data.nsamples
    checkpoints = sorted(int(s) for s in a.steps.split(","))

    def batch(k: int) -> dict:
        idx = torch.arange(k * 4, k * 4 + 4) % n
        return {key: v[idx] for key, v in data.tensors.items()}

    estimators = {
        "lora": lambda: importance.make("lora"),
        "first-order": lambda: GradientVariant("first-order", lambda A, B, gA, gB: gB @ A + B @ gA),
        "gB·A only": lambda: GradientVariant("gB·A only", lambda A, B, gA, gB: gB @ A),
        "fisher": lambda: importance.make("fisher"),
    }
    report = {}
    done = 0
    for target in checkpoints:
        model.train()
        while done < target:  # plain LoRA steps (constant learning rate)
            model(**batch(1000 + done)).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
        model.eval()
        batches = [batch(k) for k in range(a.batches)]
        van = importance.score(model, batches, "vanilla", arch=arch)
        res = {}
        for name, make in estimators.items():
            scores = importance.score(model, batches, make(), arch=arch)
            rho_h, rho_c, overlap = [], [], []
            k = arch.intermediate_size // 2
            for (h, c), (vh, vc) in zip(scores, van):
                rho_h.append(spearman(h, vh))
                rho_c.append(spearman(c, vc))
                overlap.append(len(set(torch.argsort(c)[:k].tolist()) & set(torch.argsort(vc)[:k].tolist())) / k)
            res[name] = {"spearman_channels": round(sum(rho_c) / len(rho_c), 3),
                         "spearman_kv_groups": round(sum(rho_h) / len(rho_h), 3),
                         "overlap_weakest_half_channels": round(sum(overlap) / len(overlap), 3)}
        report[f"after {target} LoRA steps"] = res
        print(f"after {target} LoRA steps:", json.dumps(res, ensure_ascii=False))
    if a.output:
        with open(a.output, "w") as f:
            json.dump({"model": a.model, "calib": a.calib, "lr": a.lr, "batches": a.batches, "results": report}, f,
                      indent=2, sort_keys=True, ensure_ascii=False)


if __name__ == "__main__":
    main()
