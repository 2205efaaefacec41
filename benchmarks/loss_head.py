#!/usr/bin/env python
"""What the chunked loss head (``lpt.losses.head_loss``) saves: one fisher prune step of SmolLM2-135M, plain and
``--distill``, with the loss head and without it (``--no-loss-head``: the LM loss and the KL from materialised
logits, as lpt 0.2 did). Issue 23's targets: ``--distill`` at <= 1.05x the peak memory and <= 1.3x the time of the
plain step.

    python benchmarks/loss_head.py -o benchmarks/results/loss_head.json
    python benchmarks/loss_head.py --rounds 1 --trials 2 -o /tmp/lh.json      # quicker, noisier

Each configuration is one ``lpt bench prune-step`` (its own process, so peak memory is its own); the four run in
``--rounds`` interleaved rounds (the median of every round's median is reported), so a change in machine load hits
every configuration alike. Quote the load average printed with the table: on a shared machine times are noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {"plain, loss head": [], "--distill, loss head": ["--distill"],
           "plain, --no-loss-head": ["--no-loss-head"], "--distill, --no-loss-head": ["--distill", "--no-loss-head"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default="benchmarks/results/loss_head.json")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    rows: dict[str, list[dict]] = {k: [] for k in CONFIGS}
    loads = []
    with tempfile.TemporaryDirectory() as d:
        for r in range(a.rounds):
            for label, extra in CONFIGS.items():
                out = Path(d) / f"{r}-{len(rows[label])}-{abs(hash(label))}.json"
                cmd = [sys.executable, "-m", "lpt", "bench", "prune-step", a.model, "--criterion", "fisher",
                       "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size), "--trials", str(a.trials),
                       "--warmup", str(a.warmup), "--threads", str(a.threads), "-q", *extra, "-o", str(out)]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                doc = json.loads(out.read_text())
                res = doc["results"][0]
                rows[label].append({"seconds_per_step": res["seconds_per_step"]["median"],
                                    "peak_memory_bytes": res["peak_memory_bytes"]})
                loads.append(os.getloadavg()[0])
                print(f"round {r + 1} {label}: {res['seconds_per_step']['median']:.3f} s/step, "
                      f"{res['peak_memory_bytes'] / 2**30:.3f} GiB", flush=True)
    summary = {k: {"seconds_per_step": statistics.median(x["seconds_per_step"] for x in v),
                   "peak_memory_bytes": max(x["peak_memory_bytes"] for x in v), "rounds": v} for k, v in rows.items()}
    for head in ("loss head", "--no-loss-head"):
        plain, dist = summary[f"plain, {head}"], summary[f"--distill, {head}"]
        dist["vs_plain"] = {"time": round(dist["seconds_per_step"] / plain["seconds_per_step"], 3),
                            "memory": round(dist["peak_memory_bytes"] / plain["peak_memory_bytes"], 3)}
    doc = {"protocol": {k: v for k, v in vars(a).items() if k != "output"}, "load_average_1min": loads,
           "configurations": summary}
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(doc, indent=2) + "\n")
    print("\n| configuration | s / step | peak memory | vs plain (time, memory) |\n|---|---|---|---|")
    for k, v in summary.items():
        rel = v.get("vs_plain")
        ratio = f"{rel['time']:.2f}x, {rel['memory']:.2f}x" if rel else ""
        print(f"| {k} | {v['seconds_per_step']:.3f} | {v['peak_memory_bytes'] / 2**30:.3f} GiB | {ratio} |")
    print(f"load average (1 min) during the runs: {min(loads):.2f}-{max(loads):.2f}")


if __name__ == "__main__":
    main()
