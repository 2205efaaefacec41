#!/usr/bin/env python
"""How well does the LoRA-guided criterion track the vanilla (full-gradient) criterion, and when?

    python benchmarks/criterion_fidelity.py --calib runs/quality/calib --steps 0,8,24

For SmolLM2-135M, LoRA is trained for a number of steps (plain LoRA fine-tuning, no pruning); then, on the same
calibration batches, the group scores of the LoRA criterion (Eq. 10) and of the vanilla criterion (Eq. 3) are
computed from the same backward passes, and compared per layer: Spearman rank correlation and the overlap of the 50%
weakest MLP channels. Variants of Eq. 10 show which term carries the signal:
  eq10        G = gB·A + B·gA − gB·gA   (the paper, lr taken as 1)
  first-order G = gB·A + B·gA          (without the second-order term)
  gB·A only   G = gB·A                 (what Eq. 10 reduces to while B = 0)
"""

from __future__ import annotations

import argparse
import json

import torch


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = torch.argsort(torch.argsort(a)).float()
    rb = torch.argsort(torch.argsort(b)).float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--steps", default="0,8,24", help="LoRA training steps before scoring (comma list)")
    ap.add_argument("--batches", type=int, default=4, help="calibration batches of 4 the scores are summed over")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args()

    from lpt import criteria, groups, lora, models
    from lpt.arch import PROJECTIONS, describe
    from lpt.config import PruneConfig
    from lpt.stages import calibrate
    from lpt.stages.prune import FAN_IN, Pruner

    torch.manual_seed(0)
    model, tok = models.load_model(a.model)
    arch = describe(model.config)
    data = calibrate.load(a.calib, tok)
    cfg = PruneConfig(criterion="vanilla", ratio=0.5, lora_dropout=0.0, lr=a.lr, batch_size=4, micro_batch_size=4,
                      normalize=False)
    checkpoints = sorted(int(s) for s in a.steps.split(","))
    p = Pruner(model, arch, cfg, total_steps=max(checkpoints) + 1)
    n = data.nsamples

    def batch(k: int) -> dict:
        idx = torch.arange(k * 4, k * 4 + 4) % n
        return {key: v[idx] for key, v in data.tensors.items()}

    variants = {
        "eq10": lambda A, B, gA, gB: gB @ A + B @ gA - gB @ gA,
        "first-order": lambda A, B, gA, gB: gB @ A + B @ gA,
        "gB·A only": lambda A, B, gA, gB: gB @ A,
    }
    report = {}
    done = 0
    for target in checkpoints:
        while done < target:  # plain LoRA steps (base gradients dropped)
            p.forward_backward(batch(1000 + done))
            for layer in p.layers.values():
                layer.base_layer.weight.grad = None
            p.optimizer.step()
            p.scheduler.step()  # the cosine schedule sets the learning rate
            p.optimizer.zero_grad(set_to_none=True)
            done += 1
        for k in range(a.batches):
            p.forward_backward(batch(k))
        van = p.group_importance("vanilla")
        res = {}
        for name, fn in variants.items():
            rho_h, rho_c, overlap = [], [], []
            for i in range(arch.num_layers):
                proj = {}
                for pr in PROJECTIONS:
                    L = p.layers[arch.module_path(i, pr)]
                    A, B = L.lora_A.weight.detach(), L.lora_B.weight.detach()
                    G = fn(A, B, L.lora_A.weight.grad, L.lora_B.weight.grad)
                    W = lora.dense_weight(L.base_layer) + L.scaling * B @ A
                    proj[pr] = criteria.reduce((G * W) ** 2, pr in FAN_IN)
                h, c = groups.group_scores(arch, proj, cfg.gqa)
                vh, vc = van[i]
                rho_h.append(spearman(h, vh))
                rho_c.append(spearman(c, vc))
                k = arch.intermediate_size // 2
                overlap.append(len(set(torch.argsort(c)[:k].tolist()) & set(torch.argsort(vc)[:k].tolist())) / k)
            res[name] = {"spearman_channels": round(sum(rho_c) / len(rho_c), 3),
                         "spearman_kv_groups": round(sum(rho_h) / len(rho_h), 3),
                         "overlap_weakest_half_channels": round(sum(overlap) / len(overlap), 3)}
        p.optimizer.zero_grad(set_to_none=True)
        for layer in p.layers.values():
            layer.base_layer.weight.grad = None
        report[f"after {target} LoRA steps"] = res
        print(f"after {target} LoRA steps:", json.dumps(res))
    if a.output:
        with open(a.output, "w") as f:
            json.dump({"model": a.model, "calib": a.calib, "lr": a.lr, "batches": a.batches, "results": report}, f,
                      indent=2, sort_keys=True)


if __name__ == "__main__":
    main()
