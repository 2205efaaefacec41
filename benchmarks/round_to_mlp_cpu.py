#!/usr/bin/env python
"""The MLP of one TinyLlama-width block (hidden 2048, 512 tokens, float32) at several kept widths, on this CPU.

    python benchmarks/round_to_mlp_cpu.py --widths 2816,2815,2817,2814,2812,2808,2800,2880 \
        -o benchmarks/results/round_to_cpu_mlp.json

gate/up/down matmuls + SiLU, one torch thread, the widths timed in turns (interleaved, --reps rounds) so that
background load hits them alike; ratios are paired per round against the first width. Isolates what --round-to
changes (the MLP GEMM shapes) from the rest of the model, where the end-to-end `lpt bench runtime` comparison
(benchmarks/round_to_cpu.sh) is too noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics as st
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="2816,2815,2817,2814,2812,2808,2800,2880")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    widths = [int(w) for w in a.widths.split(",")]
    x = torch.randn(a.tokens, a.hidden)
    mats = {w: (torch.randn(w, a.hidden) * 0.02, torch.randn(w, a.hidden) * 0.02, torch.randn(a.hidden, w) * 0.02)
            for w in widths}

    def mlp(w: int) -> None:
        g, u, d = mats[w]
        with torch.inference_mode():
            (F.silu(x @ g.T) * (x @ u.T)) @ d.T

    for w in widths:  # warm-up
        mlp(w)
    times: dict[int, list[float]] = {w: [] for w in widths}
    for _ in range(a.reps):
        for w in widths:
            t0 = time.perf_counter()
            mlp(w)
            times[w].append(time.perf_counter() - t0)
    ref = widths[0]
    rows = []
    for w in widths:
        paired = [t / r for t, r in zip(times[w], times[ref])]
        rows.append({"intermediate": w, "multiple_of": max(n for n in (1, 2, 4, 8, 16, 32, 64, 128) if w % n == 0),
                     "median_s": st.median(times[w]), "min_s": min(times[w]), "max_s": max(times[w]),
                     "paired_ratio_median": st.median(paired), "flop_ratio": w / ref})
        r = rows[-1]
        print(f"{w:6d} (x{r['multiple_of']:<3d}) median {r['median_s']:.4f} s  min {r['min_s']:.4f} s  "
              f"paired ratio {r['paired_ratio_median']:.3f}  FLOP ratio {r['flop_ratio']:.4f}")
    if a.output:
        doc = {"command": "python " + " ".join(sys.argv), "hidden": a.hidden, "tokens": a.tokens, "reps": a.reps,
               "threads": a.threads, "dtype": "float32", "torch": torch.__version__,
               "cpu": platform.processor() or platform.machine(), "results": rows}
        with open(a.output, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
