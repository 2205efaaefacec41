#!/usr/bin/env python
"""Wanda 2:4 semi-structured sparsity (the paper's Fig. 3 comparison): 2 of every 4 consecutive input weights of
every block linear zeroed by |W| · ||X||, no training. The math is llm-compressor's own (``wanda_sparsify``); this
script only feeds it calibration activations and writes the model.

    pip install --no-deps llmcompressor==0.14.0.1     # its declared pins would downgrade transformers
    python benchmarks/wanda.py smollm2-135m --calib CALIB_DIR -o runs/wanda-2of4

The output is a Hugging Face directory of the same shape (half of every projection's weights are zero): it
evaluates like any model (``lpt eval``), but gives no speed-up on a CPU (PyTorch has no 2:4 sparse CPU kernel; on
NVIDIA GPUs 2:4 needs their sparse tensor cores), and a LoRA adapter cannot be merged into it without filling the
zeros again -- which is why the paper compares structured pruning against it. Statistics come from one pass of the
dense model over the calibration blocks (every layer's inputs at once; Wanda's reference code feeds each layer the
already pruned layers' outputs instead).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALL = "pip install --no-deps llmcompressor==0.14.0.1"


def wanda_sparsify():
    """llm-compressor's ``wanda_sparsify`` module, loaded from its file (the package's ``__init__`` imports its
    whole runtime, which this needs none of)."""
    spec = importlib.util.find_spec("llmcompressor")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"llm-compressor is not installed: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "modifiers" / "pruning" / "wanda" / "wanda_sparsify.py"
    mod_spec = importlib.util.spec_from_file_location("lpt_bench_wanda_sparsify", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def prune_2of4(model, arch, batches, n: int = 2, m: int = 4) -> dict[str, float]:
    """Zero ``n`` of every ``m`` consecutive input weights of every block projection of ``model`` in place, by
    Wanda's score over ``batches``; returns the fraction of zeros per projection."""
    import torch

    from lpt.arch import PROJECTIONS, get_module

    ws = wanda_sparsify()
    mods = {arch.module_path(i, p): get_module(model, arch.module_path(i, p)) for i in range(arch.num_layers)
            for p in PROJECTIONS}
    scalars = {mod: ws.make_empty_row_scalars(mod) for mod in mods.values()}
    counts = {mod: 0 for mod in mods.values()}
    handles = []
    for mod in mods.values():
        def hook(module, args):
            scalars[module], counts[module] = ws.accumulate_row_scalars(args[0].detach(), module, scalars[module],
                                                                        counts[module])

        handles.append(mod.register_forward_pre_hook(hook))
    dev = next(model.parameters()).device
    try:
        with torch.no_grad():
            for b in batches:
                model(**{k: v.to(dev) for k, v in b.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
    out = {}
    with torch.no_grad():
        for path, mod in mods.items():
            mod.weight.copy_(ws.sparsify_weight(mod, scalars, 0.5, n, m))
            out[path] = float((mod.weight == 0).float().mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--calib", required=True, help="an lpt calibrate output directory")
    ap.add_argument("--nsamples", type=int, default=64, help="calibration blocks used (default 64)")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from lpt import artifacts, models
    from lpt.arch import describe
    from lpt.stages import calibrate

    model, tok = models.load_model(a.model, dtype="float32", device="cpu")
    arch = describe(model.config)
    calib = calibrate.load(a.calib, tok)
    n = min(a.nsamples, calib.nsamples)
    batches = ({k: v[i:min(i + 4, n)] for k, v in calib.tensors.items()} for i in range(0, n, 4))
    zeros = prune_2of4(model, arch, batches)
    out = Path(a.output)
    with artifacts.atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        artifacts.write_json(tmp / "wanda.json", {"method": "Wanda 2:4 (llm-compressor's wanda_sparsify)",
                                                  "model": a.model, "calibration_blocks": n,
                                                  "zero_fraction": sum(zeros.values()) / len(zeros)})
    print(f"2:4 sparsity: {sum(zeros.values()) / len(zeros):.3f} of the block weights zero -> {out}")


if __name__ == "__main__":
    main()
