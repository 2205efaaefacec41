#!/usr/bin/env python
"""One ``lpt prune`` optimiser step (``lpt bench prune-step``'s measurement, each row in its own process) for chosen
rows only: on a CPU where the bf16 row takes hours, time the int8 rows without it.

    python benchmarks/int8_prune_step.py --random-init llama-7b --rows torch --seq-len 32 --batch-size 1 \\
        --threads 2 -o benchmarks/results/prune_step_7b_torch_b1x32.json

Rows: ``bf16`` (no --8bit), ``torch``, ``bitsandbytes`` (``--8bit --int8-backend``); criterion fisher, ratio 0.5,
LoRA rank 8, no warm-up, ``--trials`` timed steps, ``--dtype bfloat16``; peak memory is the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random-init", default="llama-7b")
    ap.add_argument("--rows", default="torch", help="comma list of bf16, torch, bitsandbytes")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()

    from lpt.stages import bench

    entry = {"label": a.random_init, "model": None, "random_init": a.random_init, "adapter": None}
    proto = {"dtype": "bfloat16", "device": "cpu", "revision": None, "trust_remote_code": False, "seq_len": a.seq_len,
             "batch_size": a.batch_size, "micro_batch_size": a.batch_size, "ratio": 0.5, "lora_r": 8,
             "lora_alpha": 16.0, "trials": a.trials, "warmup": 0, "threads": a.threads, "seed": 0,
             "gradient_checkpointing": False, "distill": False}
    rows = []
    for r in a.rows.split(","):
        run = {"label": "fisher" if r == "bf16" else f"fisher 8-bit ({r})", "criterion": "fisher",
               "load_8bit": r != "bf16", "int8_backend": None if r == "bf16" else r}
        res = bench.in_child("prune-step", {"entry": entry, "proto": proto, "run": run}, run["label"])
        res.pop("_model", None)
        rows.append(res)
        print(json.dumps({k: res[k] for k in ("label", "seconds_per_step", "peak_memory_bytes")}), flush=True)
        doc = {"command": "python " + " ".join(sys.argv), "load_average": os.getloadavg(), "proto": proto,
               "results": rows}
        with open(a.output, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
