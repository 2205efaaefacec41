#!/usr/bin/env python
"""Kernel choices of ``--int8-backend torch`` (``lpt.int8``) at LLaMA-7B projection shapes, timed interleaved.

    python benchmarks/int8_kernels.py --threads 2 -o benchmarks/results/int8_kernels.json

Forward ``y = x Wᵀ`` (``x`` ``[T, in]``): a dense bf16 GEMM against the bf16 weight (what a bf16 base runs), the
int8 kernel ``aten._weight_int8pack_mm`` with bf16 activations (what lpt runs), and, for float32 activations, the
same kernel against lpt's fallback (float32 GEMMs over de-quantized row chunks).
Input gradient ``dx = dy W`` (what LoRA training needs through the frozen base): the dense bf16 GEMM (what a bf16
base's backward runs), lpt's float32 accumulation over de-quantized row chunks (``lpt.int8.input_grad``: extra
memory one chunk, 4 MiB, plus float32 copies of ``dy`` and ``dx``), and the int8 kernel on a transposed packed copy
``(dy · scale) @ Wqᵀᵀ`` (fast, but a second int8 copy of every weight: 1 byte per parameter more, which would put an
int8 base at the size of a bf16 one). Minimum of ``--trials`` per cell, in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="32,512")
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="OUTxIN list")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args()

    import torch

    from lpt import int8

    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    for shape in a.shapes.split(","):
        o, i = (int(v) for v in shape.split("x"))
        w = torch.randn(o, i, generator=torch.Generator().manual_seed(0)) * 0.02
        wb = w.bfloat16()
        q, s = int8.quantize_rows(wb)
        qt, ones = q.t().contiguous(), torch.ones(i, dtype=torch.bfloat16)
        for t in (int(v) for v in a.tokens.split(",")):
            x, dy = torch.randn(t, i).bfloat16(), torch.randn(t, o).bfloat16()
            xf = x.float()
            cells = {
                "forward dense bf16": lambda: x @ wb.t(),
                "forward int8 kernel bf16": lambda: int8.matmul(x, q, s),
                "forward int8 float32 (row chunks)": lambda: int8.matmul(xf, q, s),
                "forward int8 kernel float32": lambda: torch.ops.aten._weight_int8pack_mm(xf, q, s),
                "input grad dense bf16": lambda: dy @ wb,
                "input grad int8 float32 row chunks (lpt)": lambda: int8.input_grad(dy, q, s),
                "input grad int8 kernel, transposed copy": lambda: torch.ops.aten._weight_int8pack_mm(
                    (dy.float() * s).bfloat16(), qt, ones),
            }
            times = {k: [] for k in cells}
            for f in cells.values():
                f()
            for _ in range(a.trials):
                for k, f in cells.items():
                    t0 = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
            row = {"out": o, "in": i, "tokens": t, "ms": {k: round(min(v) * 1e3, 2) for k, v in times.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    doc = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(), "results": rows}
    if a.output:
        with open(a.output, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
