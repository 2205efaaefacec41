#!/usr/bin/env python
"""Quality study: lpt's criteria against baselines and an external peer on a real model (SmolLM2-135M).

    python benchmarks/quality.py -o runs/quality            # the full study (about an hour on 2 CPU cores)
    python benchmarks/quality.py --quick -o runs/quality-q  # a smoke run in minutes

Everything runs through the real CLI (one subprocess per stage), with the same calibration blocks, steps, seed and
LoRA budget for every row:
- lpt `--criterion lora` (iterative, joint fine-tuning), `vanilla`, `magnitude`, `random`;
- lpt `--criterion lora --one-shot` then LoRA fine-tuning with the same steps (the paper's "separate", Table 7);
- Torch-Pruning (benchmarks/tp_peer.py, its LLM example's L2 group importance), then plain LoRA recovery
  (`lpt prune PRUNED --ratio 0`) with the same steps;
evaluated by `lpt eval` (perplexity on held-out text the calibration never saw, non-overlapping segments).
Also: mask agreement of lora vs vanilla (Fig. 4 of the paper) and a small sweep of the defaults.
Writes OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYDOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")  # Debian's python3.11-doc package
MODEL = "smollm2-135m"


def sh(args: list[str], log: Path) -> None:
    """Run one CLI stage; its output goes to ``log``; failure stops the study with the log's tail."""
    t0 = time.time()
    with log.open("a") as f:
        f.write(f"$ {' '.join(args)}\n")
        f.flush()
        r = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if r.returncode:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"failed ({r.returncode}): {' '.join(args)}\n" + "\n".join(tail))
    print(f"  {time.time() - t0:6.1f}s  {' '.join(str(a) for a in args[2:6])} ...", flush=True)


def lpt(*args) -> list[str]:
    return [sys.executable, "-m", "lpt", *[str(a) for a in args]]


def corpus(out: Path, prefer: str) -> tuple[str, str, str]:
    """(train source, test source, description). Python's reST docs when installed, else builtin:pydoc."""
    if prefer != "pydoc" and PYDOC_SOURCES.is_dir():
        files = sorted(p for p in PYDOC_SOURCES.rglob("*.txt"))
        # pydoc topics are generated from the reference docs: keep them out of both parts so nothing leaks
        files = [p for p in files if "reference" not in p.parts and p.name != "stdtypes.rst.txt"]
        train, test = [], []
        for p in files:
            rel = str(p.relative_to(PYDOC_SOURCES))
            (test if int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 20 == 0 else train).append(p)
        d = out / "corpus"
        d.mkdir(parents=True, exist_ok=True)
        for name, part in (("train", train), ("test", test)):
            (d / f"{name}.txt").write_text("\n\n".join(p.read_text(errors="replace") for p in part))
        return (str(d / "train.txt"), str(d / "test.txt"),
                f"Python 3.11 documentation reST sources (Debian python3.11-doc): {len(train)} files for calibration, "
                f"{len(test)} held-out files for evaluation (file-level split; language reference excluded)")
    return ("builtin:pydoc:train", "builtin:pydoc:test",
            "builtin:pydoc (pydoc_data.topics): train part for calibration, disjoint test part for evaluation")


def ppl_of(path: Path, source: str) -> float:
    return float(json.loads(path.read_text())["perplexity"][source]["ppl"])


def agreement(calib: Path, ratios: list[float], batches: int, warm_steps: int) -> dict:
    """Overlap of the groups pruned by lora and vanilla scores from the same calibration batches (Fig. 4)."""
    import torch

    from lpt import groups, models
    from lpt.arch import describe
    from lpt.config import PruneConfig
    from lpt.stages import calibrate
    from lpt.stages.prune import Pruner

    torch.manual_seed(0)
    model, tok = models.load_model(MODEL)
    arch = describe(model.config)
    data = calibrate.load(calib, tok)
    cfg = PruneConfig(criterion="vanilla", ratio=0.5, lora_r=8, lora_alpha=16, lora_dropout=0.0, lr=5e-4,
                      batch_size=4, micro_batch_size=4, normalize=False)
    p = Pruner(model, arch, cfg, total_steps=warm_steps + 1)
    # a few plain LoRA steps first, so that B != 0 and every term of Eq. 10 is exercised
    for s in range(warm_steps):
        b = {k: v[s * 4:(s + 1) * 4] for k, v in data.tensors.items()}
        p.forward_backward(b)
        for layer in p.layers.values():
            layer.base_layer.weight.grad = None
        p.optimizer.step()
        p.scheduler.step()  # the cosine schedule sets the learning rate
        p.optimizer.zero_grad(set_to_none=True)
    for s in range(batches):
        b = {k: v[s * 4:(s + 1) * 4] for k, v in data.tensors.items()}
        p.forward_backward(b)  # LoRA and base-weight gradients accumulate over the same batches
    lora_scores = p.group_importance("lora")
    vanilla_scores = p.group_importance("vanilla")
    out = {}
    for ratio in ratios:
        nh, nc = groups.uniform_counts(arch, ratio, cfg.gqa)
        res = {}
        for kind, idx, n in (("attention heads (kv groups)", 0, nh), ("mlp channels", 1, nc)):
            if n == 0:
                res[kind] = None
                continue
            per_layer = []
            for ls, vs in zip(lora_scores, vanilla_scores):
                a = set(torch.argsort(ls[idx])[:n].tolist())
                b = set(torch.argsort(vs[idx])[:n].tolist())
                per_layer.append(len(a & b) / n)
            res[kind] = round(sum(per_layer) / len(per_layer), 4)
        out[str(ratio)] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default="runs/quality")
    ap.add_argument("--quick", action="store_true", help="a smoke run: one ratio, two criteria, a few steps")
    ap.add_argument("--ratios", default=None, help="comma list (default 0.5,0.2; quick: 0.5)")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default 16; quick: 6)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 4")
    ap.add_argument("--seq-len", type=int, default=None, help="calibration block length (default 128)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--corpus", choices=["auto", "pydoc"], default="auto")
    ap.add_argument("--eval-seq-len", type=int, default=2048)
    ap.add_argument("--eval-segments", type=int, default=4, help="segments of held-out text evaluated (0: all)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep", default=None, help="comma list of sweep rows to run (default: all)")
    ap.add_argument("--no-peer", action="store_true", help="skip the Torch-Pruning peer")
    ap.add_argument("--peer-importance", default="l2,taylor", help="Torch-Pruning importances to run (l2, taylor)")
    a = ap.parse_args()

    quick = a.quick
    ratios = [float(r) for r in (a.ratios or ("0.5" if quick else "0.5,0.2")).split(",")]
    steps = a.steps or (6 if quick else 16)
    bs = a.batch_size or 4
    seq = a.seq_len or 128
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "study.log"
    t_start = time.time()

    train_src, test_src, corpus_desc = corpus(out, a.corpus)
    print(f"corpus: {corpus_desc}")
    calib = out / "calib"
    nsamples = max(steps * bs // 2, 16)  # two epochs over the blocks at the default budget
    if not calib.exists():
        sh(lpt("calibrate", MODEL, "--data", train_src, "-n", nsamples, "--seq-len", seq, "-o", calib), log)

    common = ["--calib", calib, "--max-steps", steps, "--batch-size", bs, "--micro-batch-size", min(bs, 4),
              "--lr", a.lr, "--prune-freq", max(1, steps // 8), "--seed", "0"]
    ev = ["--ppl", test_src, "--seq-len", a.eval_seq_len] + (["--max-segments", a.eval_segments] if a.eval_segments
                                                              else [])

    def evaluate(name: str, model, extra: list) -> float:
        res = out / f"{name}.eval.json"
        if not res.exists():
            sh(lpt("eval", model, *extra, *ev, "-o", res), log)
        return ppl_of(res, test_src)

    def lpt_run(name: str, extra: list, model=MODEL) -> dict:
        d = out / name
        if not d.exists():
            sh(lpt("prune", model, *common, *extra, "-o", d), log)
        masks = json.loads((d / "masks.json").read_text())
        ppl = evaluate(name, model, ["--adapter", d] + (["--masks", d / "masks.json"] if masks["ratio"]["blocks"] > 0
                                                         else []))
        return {"ppl": ppl, "ratio_blocks": masks["ratio"]["blocks"], "ratio_model": masks["ratio"].get("model")}

    results: dict = {"protocol": {
        "model": MODEL, "corpus": corpus_desc, "calibration_blocks": nsamples, "seq_len": seq, "steps": steps,
        "batch_size": bs, "lr": a.lr, "prune_freq": max(1, steps // 8), "eval": f"perplexity on {test_src}, "
        f"the first {a.eval_segments or 'all'} non-overlapping {a.eval_seq_len}-token segments (lpt eval)", "quick": quick}, "rows": {}, "sweep": {}}
    def save() -> None:  # after every row, so an interrupted study keeps what it measured
        results["wall_time_s"] = round(time.time() - t_start, 1)
        (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        (out / "results.md").write_text(markdown(results))

    results["dense_ppl"] = evaluate("dense", MODEL, [])
    print(f"dense ppl {results['dense_ppl']:.3f}")

    criteria_list = ["lora", "magnitude"] if quick else ["lora", "vanilla", "magnitude", "random"]
    for r in ratios:
        rows = {}
        for c in criteria_list:
            rows[c] = lpt_run(f"r{r}-{c}", ["--ratio", r, "--criterion", c])
            print(f"ratio {r} {c}: ppl {rows[c]['ppl']:.3f}")
            results["rows"][str(r)] = rows
            save()
        if not quick:
            rows["lora separate (one-shot + FT)"] = lpt_run(f"r{r}-separate", ["--ratio", r, "--one-shot"])
        if not a.no_peer and not quick:
            for imp in a.peer_importance.split(","):
                tag = "" if imp == "l2" else f"-{imp}"
                pruned = out / f"r{r}-tp{tag}-pruned"
                if not pruned.exists():
                    sh([sys.executable, str(ROOT / "benchmarks" / "tp_peer.py"), MODEL, "--ratio", str(r), "--calib",
                        str(calib), "--importance", imp, "-o", str(pruned)], log)
                peer = json.loads((pruned / "tp_peer.json").read_text())
                rec = lpt_run(f"r{r}-tp{tag}", ["--ratio", "0"], model=pruned)
                rec["ratio_blocks"] = peer["ratio_blocks"]
                rows[f"Torch-Pruning {imp} + LoRA"] = rec
                print(f"ratio {r} torch-pruning {imp}: ppl {rec['ppl']:.3f}")
                results["rows"][str(r)] = rows
                save()
        results["rows"][str(r)] = rows
        save()

    if not quick:
        results["mask_agreement"] = agreement(calib, [0.1, 0.2, 0.5], batches=4, warm_steps=4)
        save()
    if not quick and not a.no_sweep:
        base = ["--ratio", "0.5", "--criterion", "lora"]
        for name, extra in {
            "score abs": ["--score", "abs"],
            "warmup 0.5 (LoRA trains before pruning starts)": ["--warmup", "0.5", "--cooldown", "0.2"],
            "gqa query-heads": ["--gqa", "query-heads"],
        }.items():
            if a.sweep and name.split(" (")[0] not in a.sweep.split(","):
                continue
            results["sweep"][name] = lpt_run("sweep-" + name.split(" (")[0].replace(" ", "_"), base + extra)
            print(f"sweep {name}: ppl {results['sweep'][name]['ppl']:.3f}")
            save()
        if "0.5" in results["rows"]:
            results["sweep"]["defaults (lora, square, ema 0.9, kv-groups, uniform)"] = results["rows"]["0.5"]["lora"]

    save()
    print(markdown(results))


def markdown(res: dict) -> str:
    p = res["protocol"]
    lines = [f"Model {p['model']}; {p['corpus']}; {p['calibration_blocks']} blocks x {p['seq_len']} tokens; "
             f"{p['steps']} steps of batch {p['batch_size']}, lr {p['lr']}; {p['eval']}. "
             f"Dense perplexity {res['dense_ppl']:.2f}.", ""]
    ratios = list(res["rows"])
    names = list(dict.fromkeys(n for r in ratios for n in res["rows"][r]))
    lines.append("| method | " + " | ".join(f"ppl @ {float(r):.0%} (achieved)" for r in ratios) + " |")
    lines.append("|---|" + "---|" * len(ratios))
    for n in names:
        cells = []
        for r in ratios:
            row = res["rows"][r].get(n)
            cells.append(f"{row['ppl']:.2f} ({row['ratio_blocks']:.1%})" if row else "–")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if res.get("mask_agreement"):
        lines += ["", "Mask agreement lora vs vanilla (share of the groups pruned by vanilla that lora prunes too):", "",
                  "| ratio | attention (kv groups) | MLP channels |", "|---|---|---|"]
        for r, v in res["mask_agreement"].items():
            lines.append(f"| {float(r):.0%} | {v['attention heads (kv groups)']} | {v['mlp channels']} |")
    if res.get("sweep"):
        lines += ["", "Sweep at 50% (lora; the defaults' row repeats the main table):", "", "| setting | ppl | achieved |", "|---|---|---|"]
        for n, row in res["sweep"].items():
            lines.append(f"| {n} | {row['ppl']:.2f} | {row['ratio_blocks']:.1%} |")
    lines += ["", f"Wall time {res.get('wall_time_s', 0) / 60:.1f} min."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
