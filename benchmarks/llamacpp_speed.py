"""llama.cpp speed of dense vs pruned SmolLM2-135M GGUF files: prompt processing and generation, tokens/s.

    python benchmarks/llamacpp_speed.py [--outtype q8_0,f16] [--threads 2] [--trials 5] [--work DIR]

What it does (steps whose output already exists in --work are skipped, so a rerun only repeats the timing):

1. the models, with lpt's own commands:
   dense:  an all-ones masks.json -> ``lpt slice smollm2-135m`` (the same model, as a Hugging Face directory);
   20/50%: ``lpt prune smollm2-135m --ratio R --criterion magnitude --max-steps 2`` -> ``lpt slice --merge``.
   Two steps of training leave the weights barely trained; speed depends on the shapes only, not on quality.
2. ``lpt export DIR --gguf --outtype T`` for each model and each --outtype (the same type for all models).
3. llama-cpp-python (installed with pip when missing: it builds llama.cpp from source, minutes on a small machine)
   loads each GGUF with the same threads and context; per trial and model: evaluate a --prompt-tokens prompt
   (prompt processing, tokens/s) and then generate --gen-tokens tokens greedily (generation, tokens/s). Trials are
   interleaved (model A, B, C, A, B, C, ...) so background load on a shared machine hits every model alike; the
   first --warmup rounds are not counted. The median over trials is reported, with min and max.
4. results: benchmarks/results/llamacpp_speed.json and .md (a markdown table, with the command that made it).

Not part of the test suite or CI (it builds llama.cpp and times things).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "smollm2-135m"
RATIOS = (0.2, 0.5)


def sh(*args: str) -> None:
    print("+", " ".join(shlex.quote(a) for a in args), flush=True)
    subprocess.run(args, check=True)


def lpt(*args: str) -> None:
    sh(sys.executable, "-m", "lpt", *args)


def ensure_llama_cpp() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python is not installed: building it (this compiles llama.cpp; it takes a while)", flush=True)
        sh(sys.executable, "-m", "pip", "install", "llama-cpp-python")


def prepare(work: Path, outtypes: list[str]) -> dict[str, dict[str, Path]]:
    """Hugging Face directories, then GGUF files: {label: {outtype: path}}."""
    work.mkdir(parents=True, exist_ok=True)
    dirs: dict[str, Path] = {}
    dense = work / "dense"
    if not dense.exists():
        from lpt import groups, models
        from lpt.arch import describe

        full = work / "dense-masks.json"
        groups.Masks.full(describe(models.load_config(MODEL)), model=MODEL).save(full)
        lpt("slice", MODEL, "--masks", str(full), "-o", str(dense), "--device", "cpu")
    dirs["dense"] = dense
    for r in RATIOS:
        tag = f"{round(r * 100)}%"
        p, s = work / f"prune-{round(r * 100)}", work / f"sliced-{round(r * 100)}"
        if not p.exists():
            lpt("prune", MODEL, "--ratio", str(r), "--criterion", "magnitude", "--max-steps", "2", "--nsamples", "8",
                "--seq-len", "64", "--batch-size", "2", "--micro-batch-size", "2", "--prune-freq", "1",
                "--warmup", "0", "--cooldown", "0", "--layout", "uniform", "--device", "cpu", "-o", str(p))
        if not s.exists():
            lpt("slice", MODEL, "--masks", str(p / "masks.json"), "--adapter", str(p), "--merge", "-o", str(s),
                "--device", "cpu")
        dirs[tag] = s
    files: dict[str, dict[str, Path]] = {}
    for label, d in dirs.items():
        for t in outtypes:
            f = work / f"{d.name}-{t}.gguf"
            if not f.exists():
                lpt("export", str(d), "--gguf", "--outtype", t, "-o", str(f))
            files.setdefault(label, {})[t] = f
    return files


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGUF type the file holds (quantised types need row lengths divisible by 32)."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def shape(d: Path) -> dict[str, int]:
    c = json.loads((d / "config.json").read_text())
    return {k: c[k] for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size",
                              "num_hidden_layers")}


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


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/llamacpp", help="directory for the models and GGUF files")
    ap.add_argument("--outtype", default="q8_0,f16", help="comma list of GGUF types (each timed separately)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="rounds over all models before the counted trials")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--output", default=str(RESULTS / "llamacpp_speed.json"))
    args = ap.parse_args()
    outtypes = [t for t in args.outtype.split(",") if t]

    ensure_llama_cpp()
    import llama_cpp
    from llama_cpp import Llama

    files = prepare(Path(args.work), outtypes)
    dirs = {"dense": Path(args.work) / "dense", **{f"{round(r * 100)}%": Path(args.work) / f"sliced-{round(r * 100)}"
                                                   for r in RATIOS}}
    # a fixed prompt: the same token ids for every model (they share the tokenizer); ids from the dense tokenizer
    from lpt.data import pydoc_topics

    first = Llama(model_path=str(files["dense"][outtypes[0]]), n_ctx=2048, n_threads=args.threads,
                  n_threads_batch=args.threads, n_batch=512, verbose=False)
    text = " ".join(t for _, t in pydoc_topics())
    prompt = first.tokenize(text.encode("utf-8"), add_bos=True)[: args.prompt_tokens]
    # the tokenizer survived the export: llama.cpp's ids for a sample equal the Hugging Face directory's
    from transformers import AutoTokenizer

    sample = text[:4000]
    hf_ids = AutoTokenizer.from_pretrained(dirs["dense"])(sample, add_special_tokens=False).input_ids
    tokenizer_matches = first.tokenize(sample.encode("utf-8"), add_bos=False, special=False) == hf_ids
    print(f"llama.cpp tokenizer matches the Hugging Face one on a {len(hf_ids)}-token sample: {tokenizer_matches}")
    del first

    results = []
    for t in outtypes:
        llms = {label: Llama(model_path=str(files[label][t]), n_ctx=2048, n_threads=args.threads,
                             n_threads_batch=args.threads, n_batch=512, verbose=False) for label in files}
        pp: dict[str, list[float]] = {k: [] for k in llms}
        tg: dict[str, list[float]] = {k: [] for k in llms}
        for trial in range(args.warmup + args.trials):
            for label, llm in llms.items():  # interleaved
                a, b = time_one(llm, prompt, args.gen_tokens)
                if trial >= args.warmup:
                    pp[label].append(a)
                    tg[label].append(b)
            print(f"{t} trial {trial + 1}/{args.warmup + args.trials}: " + ", ".join(
                f"{k} pp {pp[k][-1]:.0f} tg {tg[k][-1]:.1f}" for k in llms if pp[k]), flush=True)
        for label in llms:
            f = files[label][t]
            results.append({"model": label, "outtype": t, "file": f.name, "file_mib": f.stat().st_size / 2**20,
                            "tensor_types": tensor_types(f), "shape": shape(dirs[label]),
                            "prompt_tokens_per_s": summary(pp[label]), "gen_tokens_per_s": summary(tg[label])})
        del llms

    doc = {
        "what": "llama.cpp (llama-cpp-python) speed, dense vs lpt-pruned SmolLM2-135M-Instruct GGUF",
        "command": "python benchmarks/llamacpp_speed.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "settings": {"threads": args.threads, "trials": args.trials, "warmup": args.warmup,
                     "prompt_tokens": len(prompt), "gen_tokens": args.gen_tokens, "n_batch": 512,
                     "greedy": True, "interleaved": True},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "load_average_1min_at_end": os.getloadavg()[0]},
        "versions": {"llama_cpp_python": llama_cpp.__version__},
        "tokenizer_matches_hf": tokenizer_matches,
        "note": "pruned models: lpt prune --criterion magnitude --max-steps 2 (barely trained; speed depends on the "
                "shapes only), lpt slice --merge, lpt export --gguf",
        "results": results,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))


def markdown(doc: dict) -> str:
    s = doc["settings"]
    lines = [f"`{doc['command']}` (llama-cpp-python {doc['versions']['llama_cpp_python']}, {s['threads']} threads, "
             f"prompt {s['prompt_tokens']} tokens, {s['gen_tokens']} generated greedily, median of {s['trials']} "
             f"interleaved trials)", "",
             "| model | GGUF | MiB | heads / kv / MLP | prompt tok/s | ratio | generation tok/s | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    dense = {r["outtype"]: r for r in doc["results"] if r["model"] == "dense"}
    for r in doc["results"]:
        d = dense[r["outtype"]]
        pp, tg = r["prompt_tokens_per_s"]["median"], r["gen_tokens_per_s"]["median"]
        sh_ = r["shape"]
        types = ", ".join(f"{k} {v}" for k, v in sorted(r["tensor_types"].items()))
        lines.append(f"| {r['model']} | {r['outtype']} ({types}) | {r['file_mib']:.0f} | "
                     f"{sh_['num_attention_heads']} / {sh_['num_key_value_heads']} / {sh_['intermediate_size']} | "
                     f"{pp:.0f} | {pp / d['prompt_tokens_per_s']['median']:.2f} | {tg:.1f} | "
                     f"{tg / d['gen_tokens_per_s']['median']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
