#!/usr/bin/env python
"""Slice check on a real model: parameter counts, file sizes, and masked-vs-sliced logits.

    # prune outputs (adapter + masks.json), e.g. from `lpt prune smollm2-135m --ratio 0.2 --layout uniform -o p20`
    python benchmarks/slice_check.py p20 p50 -o runs/slice-check

    # without prune outputs: masks from the lowest weight magnitude (groups.uniform_counts per layer) and a random,
    # non-zero LoRA adapter, so that the check exercises the full adapter path
    python benchmarks/slice_check.py --self-made 0.2,0.5 -o runs/slice-check

For every prune directory it runs the real CLI (one subprocess per stage):
  lpt slice MODEL --masks P/masks.json --adapter P -o OUT/<name>/sliced         (sliced base + sliced adapter)
  lpt merge OUT/<name>/sliced --adapter OUT/<name>/sliced/adapter -o OUT/<name>/sliced-merged
then compares, on held-out text (builtin:pydoc:test), the logits of the masked model (base + adapter + masks,
unmerged, in this process) with the logits of OUT/<name>/sliced-merged loaded by plain transformers in a fresh
Python that never imports lpt (trust_remote_code only for per-layer widths). Writes OUT/results.json and
OUT/results.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path


def lpt(*args) -> list[str]:
    return [sys.executable, "-m", "lpt", *[str(a) for a in args]]


def sh(args: list[str], log: Path) -> float:
    t0 = time.time()
    with log.open("a") as f:
        f.write(f"$ {' '.join(args)}\n")
        f.flush()
        r = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(args)}\n" + "\n".join(log.read_text().splitlines()[-15:]))
    return time.time() - t0


def size_of(d: Path, suffix: str = ".safetensors") -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.name.endswith(suffix))


def eval_blocks(tokenizer, n: int, seq_len: int):
    import torch

    from lpt import data

    blocks = data.pack_raw([data.load_text("builtin:pydoc:test")], tokenizer, seq_len, n)
    return torch.tensor(blocks.input_ids, dtype=torch.long)


def ppl(logits, ids) -> float:
    import torch

    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return float(torch.exp(loss))


def magnitude_masks(model, arch, ratio: float, gqa: str, layout: str, name: str):
    """Masks from the lowest squared weight magnitude per group (a stand-in for prune's output)."""
    import torch

    from lpt import groups, selection
    from lpt.masks import Masks, apply_masks
    from lpt.arch import PROJECTIONS, get_module

    scores = []
    for i in range(arch.num_layers):
        proj = {}
        for p in PROJECTIONS:
            w = get_module(model, arch.module_path(i, p)).weight.detach().float() ** 2
            proj[p] = w.sum(0) if p in ("o_proj", "down_proj") else w.sum(1)
        scores.append(groups.group_scores(arch, proj, gqa))
    n_heads, n_chan = groups.uniform_counts(arch, ratio, gqa)
    L = arch.num_layers
    if layout == "uniform":
        head_counts, chan_counts = [n_heads] * L, [n_chan] * L
    else:  # the same totals, split over layers by a global ranking of L2-normalised scores
        kv = arch.num_kv_heads if gqa == "query-heads" else None
        head_counts = selection.global_counts([selection.sorted_unit_scores(groups.normalize(h), torch.zeros_like(
            h, dtype=torch.bool), kv) for h, _ in scores], n_heads * L)
        chan_counts = selection.global_counts([selection.sorted_unit_scores(groups.normalize(c), torch.zeros_like(
            c, dtype=torch.bool), None) for _, c in scores], n_chan * L)
    hp, cp = [], []
    for (h, c), nh, nc in zip(scores, head_counts, chan_counts):
        none_h, none_c = torch.zeros_like(h, dtype=torch.bool), torch.zeros_like(c, dtype=torch.bool)
        hp.append(selection.prune_lowest(h, none_h, nh) if gqa == "kv-groups"
                  else selection.prune_query_heads(h, none_h, nh, arch.num_kv_heads))
        cp.append(selection.prune_lowest(c, none_c, nc))
    masks = Masks.from_pruned(arch, hp, cp, gqa, model=name)
    before, after = masks.block_params()
    total = sum(p.numel() for p in model.parameters())
    masks.info = {"criterion": "magnitude (slice_check stand-in)", "ratio": {"requested": ratio,
                  "model": (before - after) / total}, "params": {"model_before": total,
                                                                "model_after": total - (before - after)}}
    return masks


def make_prune_dir(base, arch, out: Path, ratio: float, gqa: str, layout: str, name: str, seed: int) -> Path:
    import torch

    from lpt import artifacts, lora

    model = copy.deepcopy(base)
    masks = magnitude_masks(model, arch, ratio, gqa, layout, name)
    lora.inject(model, arch, r=8, alpha=16.0)
    g = torch.Generator().manual_seed(seed)
    for layer in lora.lora_layers(model).values():
        layer.lora_B.weight.data = torch.randn(layer.lora_B.weight.shape, generator=g) * 0.02
    out.mkdir(parents=True, exist_ok=True)
    lora.save_adapter(model, out, base_model=name, metadata={"note": "random adapter made by slice_check"})
    masks.save(out / artifacts.MASKS)
    return out


FRESH = """
import json, sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=sys.argv[2] == "1", dtype=torch.float32)
ids = torch.load(sys.argv[3])
with torch.no_grad():
    logits = m(ids).logits
assert not any(k == "lpt" or k.startswith("lpt.") for k in sys.modules)
torch.save(logits, sys.argv[4])
print(json.dumps({"class": type(m).__name__, "params": sum(p.numel() for p in m.parameters())}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prune_dirs", nargs="*", help="lpt prune output directories (adapter + masks.json)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--self-made", default="", help="comma-separated ratios: make masks + a random adapter")
    ap.add_argument("--layout", default="uniform", choices=["uniform", "per-layer"], help="for --self-made")
    ap.add_argument("--gqa", default="kv-groups", choices=["kv-groups", "query-heads"], help="for --self-made")
    ap.add_argument("--blocks", type=int, default=4, help="held-out blocks for the logits check")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("-o", "--output", default="runs/slice-check")
    args = ap.parse_args()

    import torch

    from lpt import artifacts, groups, lora, models
    from lpt.masks import Masks, apply_masks

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    loaded = models.load(args.model, models.LoadOptions(dtype="float32", device="cpu"))
    base, tok, arch = loaded.model, loaded.tokenizer, loaded.arch
    ids = eval_blocks(tok, args.blocks, args.seq_len)
    torch.save(ids, out / "ids.pt")
    base_dir = out / "base"
    if not (base_dir / "config.json").exists():
        base.save_pretrained(base_dir)
    with torch.no_grad():
        dense_logits = base(ids).logits
    runs = [(Path(p).name, Path(p), "prune output") for p in args.prune_dirs]
    for r in [float(x) for x in args.self_made.split(",") if x]:
        name = f"self-made-{int(round(r * 100))}-{args.layout}"
        d = out / name / "prune"
        if not (d / artifacts.MASKS).exists():
            make_prune_dir(base, arch, d, r, args.gqa, args.layout, args.model, seed=0)
        runs.append((name, d, f"self-made: lowest weight magnitude, --gqa {args.gqa}, random LoRA r=8 (B~N(0,0.02))"))
    if not runs:
        raise SystemExit("give prune output directories or --self-made RATIOS")

    results = {"model": args.model, "eval": f"builtin:pydoc:test, {args.blocks} x {args.seq_len} tokens",
               "base": {"params": sum(p.numel() for p in base.parameters()), "bytes": size_of(base_dir),
                        "ppl": ppl(dense_logits, ids)}, "runs": []}
    for name, pdir, origin in runs:
        masks = Masks.load(pdir / artifacts.MASKS, arch)
        sliced, merged = out / name / "sliced", out / name / "sliced-merged"
        t_slice = sh(lpt("slice", args.model, "--masks", pdir / artifacts.MASKS, "--adapter", pdir, "-o", sliced,
                         "--device", "cpu", "--dtype", "float32", "--overwrite"), log)
        t_merge = sh(lpt("merge", sliced, "--adapter", sliced / "adapter", "-o", merged, "--device", "cpu",
                         "--dtype", "float32", "--overwrite"), log)
        model = copy.deepcopy(base)
        lora.load_adapter(model, pdir, arch)
        apply_masks(model, masks)
        with torch.no_grad():
            masked = model(ids).logits
        del model
        per_layer = not masks.is_uniform()
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(FRESH), str(merged), "1" if per_layer else "0",
                            str(out / "ids.pt"), str(out / name / "logits.pt")], capture_output=True, text=True,
                           cwd=out, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        fresh = json.loads(r.stdout.strip().splitlines()[-1])
        sl = torch.load(out / name / "logits.pt")
        before, after = masks.block_params()
        diff = (sl - masked).abs()
        row = {
            "name": name, "origin": origin, "layout": "per-layer" if per_layer else "uniform", "gqa": masks.gqa,
            "widths": {"heads": sorted({len(m.heads) for m in masks.layers}),
                       "kv_heads": sorted({len(m.kv_heads) for m in masks.layers}),
                       "channels": sorted({len(m.channels) for m in masks.layers})},
            "params": {"blocks_before": before, "blocks_after": after,
                       "promised": masks.info.get("params", {}).get("model_after"), "sliced": fresh["params"]},
            "ratio": {"blocks": 1 - after / before, "model": 1 - fresh["params"] / results["base"]["params"]},
            "bytes": {"sliced_merged": size_of(merged), "sliced": size_of(sliced),
                      "sliced_adapter": size_of(sliced / "adapter"), "adapter": size_of(pdir)},
            "logits": {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                       "max_abs_logit": float(masked.abs().max()),
                       "argmax_agreement": float((sl.argmax(-1) == masked.argmax(-1)).float().mean())},
            "ppl": {"masked": ppl(masked, ids), "sliced": ppl(sl, ids)},
            "fresh_class": fresh["class"], "seconds": {"slice": round(t_slice, 1), "merge": round(t_merge, 1)},
        }
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    b = results["base"]
    lines = [f"# slice check: {args.model}", "", f"Eval: {results['eval']}. Base: {b['params']:,} parameters, "
             f"{b['bytes'] / 1e6:.1f} MB float32, ppl {b['ppl']:.2f}.", "",
             "| run | layout | heads/kv/channels | params (sliced = promised) | removed (blocks / model) | "
             "model.safetensors | max abs logit diff (of max logit) | argmax agree | ppl masked / sliced |",
             "|---|---|---|---|---|---|---|---|---|"]
    def span(v: list[int]) -> str:
        return str(v[0]) if len(v) == 1 else f"{v[0]}..{v[-1]}"

    for r in results["runs"]:
        w, p = r["widths"], r["params"]
        lines.append(
            f"| {r['name']} | {r['layout']} | {span(w['heads'])}/{span(w['kv_heads'])}/{span(w['channels'])} | "
            f"{p['sliced']:,} "
            f"({'=' if p['promised'] in (None, p['sliced']) else '!='} {p['promised'] or '-'}) | "
            f"{r['ratio']['blocks']:.1%} / {r['ratio']['model']:.1%} | {r['bytes']['sliced_merged'] / 1e6:.1f} MB | "
            f"{r['logits']['max_abs_diff']:.2e} (of {r['logits']['max_abs_logit']:.1f}) | "
            f"{r['logits']['argmax_agreement']:.4f} | {r['ppl']['masked']:.3f} / {r['ppl']['sliced']:.3f} |")
    lines += ["", *(f"- {r['name']}: {r['origin']}" for r in results["runs"])]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
