#!/usr/bin/env python
"""Perplexity of SmolLM2-135M dense vs ``--8bit`` (bitsandbytes LLM.int8) at outlier thresholds 0 and 6.

    python benchmarks/int8_threshold.py -o benchmarks/results/int8_threshold.json

The model (the ``smollm2-135m`` alias: the Q4_1 GGUF de-quantised to float32) is evaluated with lpt's perplexity
protocol (``lpt.evaluation.perplexity``: non-overlapping segments, mean NLL over every predicted token) on
``builtin:pydoc:test``. For the int8 rows the seven block projections are frozen in int8 exactly as ``lpt prune
--8bit`` does it (``lora.inject(..., load_8bit=True, int8_threshold=T)``, LoRA rank 0 so only the quantisation
changes anything) and the model runs in eval mode, i.e. through bitsandbytes' inference kernel, which quantises the
activations too (row-wise int8) except, with T > 0, the input features with a value of magnitude >= T, which it
multiplies in 16 bits. (In training mode on CPU bitsandbytes de-quantises the weight and multiplies in floating
point, so the threshold only matters for the forward passes of evaluation there; on CUDA it matters for training
as well.)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ppl", default="builtin:pydoc:test")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--thresholds", default="0,6", help="comma list of LLM.int8 outlier thresholds")
    ap.add_argument("--max-segments", type=int, default=0, help="0: all segments")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args()

    import torch

    from lpt import lora, models
    from lpt.arch import describe
    from lpt.evaluation import perplexity as P

    if a.threads:
        torch.set_num_threads(a.threads)
    text, _ = P.load_source(a.ppl)
    rows = []

    def evaluate(label: str, threshold: float | None) -> None:
        model, tok = models.load_model(a.model, dtype="float32", device="cpu")
        seq_len, _ = P.effective_seq_len(a.seq_len, model.config)
        segs = P.segment(P.tokenize(tok, text), seq_len, a.max_segments, a.ppl)
        if threshold is not None:
            lora.inject(model, describe(model.config), r=0, alpha=1.0, targets=(), load_8bit=True,
                        int8_threshold=threshold)
        model.eval()
        t0 = time.perf_counter()
        res = P.evaluate_segments(model, segs)
        res.update(label=label, int8_threshold=threshold, seconds=round(time.perf_counter() - t0, 1))
        rows.append(res)
        print(f"{label:>24}: ppl {res['ppl']:.4f} over {res['segments']} segments ({res['tokens']} tokens, "
              f"{res['seconds']} s)", flush=True)

    evaluate("dense float32", None)
    for t in (float(x) for x in a.thresholds.split(",")):
        evaluate(f"int8 threshold {t:g}", t)

    import bitsandbytes
    import transformers

    doc = {
        "command": "python " + " ".join(sys.argv),
        "model": a.model, "ppl_source": a.ppl, "seq_len": a.seq_len,
        "protocol": P.PROTOCOL,
        "note": "int8 rows: the seven block projections in bitsandbytes Linear8bitLt (has_fp16_weights=False), "
                "model in eval mode, float32 everywhere else",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version()},
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()},
        "results": rows,
    }
    if a.output:
        with open(a.output, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
