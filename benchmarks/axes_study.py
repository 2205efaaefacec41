#!/usr/bin/env python
"""Axes study (issue 31): width, depth, hidden size, and the searched mix, at whole-model targets. SmolLM2-135M.

    python benchmarks/axes_study.py -o runs/axes                    # quality, then speed (hours on 2 CPU cores)
    python benchmarks/axes_study.py -o runs/axes --phase quality    # prunes, slices, evaluations, GGUF exports
    python benchmarks/axes_study.py -o runs/axes --phase speed      # CPU latency and llama.cpp decode, interleaved
    python benchmarks/axes_study.py -o runs/axes --report-only      # tables and plot from what finished
    python benchmarks/axes_study.py -o runs/axes-q --quick          # a smoke run in minutes

Every run goes through the real CLI and is reused when its output exists (resumable). Rows, at each whole-model
target (``--targets``, default -20% and -40% of ALL parameters, embedding included: ``lpt prune --model-ratio``):

- ``width``  -- ``--axes width``: heads and MLP channels only (lpt's earlier behaviour, at the whole-model target);
- ``depth``  -- ``--axes depth``: whole blocks only (the width of the kept blocks makes up the rounding);
- ``hidden`` -- ``--axes hidden``: residual channels only;
- ``mix``    -- ``--axes width,depth,hidden``: the division searched at the first mask update.

Equal recovery budget per row: the README main command's training (``recipes/smollm2-135m-20.yaml``: 64 blocks of
256 tokens of ``builtin:pydoc:train``, 20 steps of 4, lr 2e-3, fisher, prune every 2 steps); then the best two rows
at the first target (by out-of-domain perplexity) again at 4x the recovery tokens (256 blocks, 80 steps). References:
the dense model, and dense + LoRA (``--ratio 0``, the same training). Every pruned model is sliced with the adapter
merged and measured as a user gets it: perplexity in domain (``builtin:pydoc:test``) and out of domain (BoolQ's
Wikipedia passages, ``boolq-passages``), 2048-token segments; the paper's seven tasks on a fixed seeded subset of
``--task-docs`` documents per task, the same for every row (differences paired, ± one standard error); prune wall
time; and, in the speed phase (run it on a quiet machine: trials interleaved across models), ``lpt bench runtime``
CPU latency and decode tokens/s, and llama.cpp decode tokens/s of the q8_0 GGUF (llama-cpp-python).

Writes OUT/results.json, OUT/results.md and OUT/axes.png (quality against parameters, one line per axis);
``--publish`` copies them to benchmarks/results/axes_smollm2.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import MODEL, Study, Unfinished, lpt  # noqa: E402
from recovery import OOD, Rows, paired, slim  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IN_DOMAIN = "builtin:pydoc:test"
AXES = {"width": "width", "depth": "depth", "hidden": "hidden", "mix": "width,depth,hidden"}
# the README main command's training (recipes/smollm2-135m-20.yaml), without its --ratio
TRAIN = ["--data", "builtin:pydoc:train", "--seq-len", "256", "--seed", "0", "--criterion", "fisher", "--gqa",
         "kv-groups", "--batch-size", "4", "--micro-batch-size", "4", "--prune-freq", "2", "--warmup", "0.1",
         "--cooldown", "0.3", "--ema", "0.9", "--lr", "2e-3", "--lora-r", "8", "--lora-alpha", "16",
         "--lora-dropout", "0.05"]


def budget_flags(scale: int, quick: bool) -> list:
    if quick:
        return ["--nsamples", 8 * scale, "--max-steps", 2 * scale, "--seq-len", "64"]
    return ["--nsamples", 64 * scale, "--max-steps", 20 * scale]


# ------------------------------------------------------------------------------------------------ quality phase
class AxesRows(Rows):
    def sliced_row(self, name: str, flags: list) -> dict:
        """Prune, slice with the adapter merged, evaluate the sliced model; plus its shape and the GGUF."""
        d = self.prune(name, flags)
        s = self.slice(f"{name}-sliced", d, ["--adapter", d, "--merge"])
        row = self.evaluate(f"{name}-sliced", s, [])
        masks = json.loads((d / "masks.json").read_text())
        log = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
        cfg = json.loads((s / "config.json").read_text())
        row.update({"seconds": self.st.seconds(name), "command": self.st.command(name), "steps": len(log),
                    "params": masks["params"]["model_after"], "ratio_model": masks["ratio"]["model"],
                    "shape": {k: cfg[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                   "num_key_value_heads", "intermediate_size")},
                    "search": {k: v for k, v in (masks["info"].get("search") or {}).items()},
                    "sliced": str(s)})
        return row

    def gguf(self, name: str, sliced: Path, outtype: str = "q8_0") -> Path:
        f = self.out / f"{name}.{outtype}.gguf"
        if not f.exists():
            self.st.sh(f"{name}.gguf", lpt("export", sliced, "--gguf", "--outtype", outtype, "-o", f,
                                          "--report", self.out / f"{name}.{outtype}.report.json"))
        return f


def quality(st: Study, out: Path, a, results: dict, save) -> None:
    rows = AxesRows(st, out, [IN_DOMAIN, OOD], a.segments, 2048, a.task_docs)
    sec = results.setdefault("rows", {})

    def put(key: str, fn) -> None:
        try:
            sec[key] = fn()
        except Unfinished:
            results.setdefault("unfinished", []).append(key)
            return
        print(f"{key}: {json.dumps({k: sec[key].get(k) for k in ('params', 'ppl', 'avg7')})}", flush=True)
        save()

    def dense() -> dict:
        row = rows.evaluate("dense", MODEL, [])
        d = out / "dense-sliced"  # the dense model as a Hugging Face directory (an all-ones slice), for speed
        if not (d / "config.json").exists():
            from lpt import models
            from lpt.arch import describe
            from lpt.masks import Masks

            full = Masks.full(describe(models.load_config(MODEL)), model=MODEL)
            full.save(out / "dense-masks.json")
            st.sh("dense-sliced", lpt("slice", MODEL, "--masks", out / "dense-masks.json", "--dtype", "float32",
                                      "-o", d, "--overwrite"))
        from lpt import models

        cfg = models.load_config(MODEL)
        from lpt.arch import describe

        row.update({"params": describe(cfg).model_params(), "sliced": str(d), "ratio_model": 0.0,
                    "shape": {k: getattr(cfg, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                           "num_key_value_heads", "intermediate_size")}})
        return row

    put("dense", dense)
    put("dense + LoRA", lambda: rows.pruned_row("lora0", [*TRAIN, *budget_flags(1, a.quick), "--ratio", "0"]))
    targets = [float(t) for t in a.targets.split(",")]
    for t in targets:
        for label, axes in AXES.items():
            if label not in a.axes_rows:
                continue
            name = f"t{int(round(t * 100))}-{label}"
            put(f"-{t:.0%} {label}", lambda name=name, axes=axes, t=t: rows.sliced_row(
                name, [*TRAIN, *budget_flags(1, a.quick), "--model-ratio", t, "--axes", axes]))
    first = [(k, r) for k, r in sec.items() if k.startswith(f"-{targets[0]:.0%} ") and r.get("ppl")]
    best = sorted(first, key=lambda kr: kr[1]["ppl"].get(OOD, float("inf")))[:2]
    results["four_x"] = [k for k, _ in best]
    for key, _ in best if a.four_x else []:
        label = key.split(" ", 1)[1]
        name = f"t{int(round(targets[0] * 100))}-{label}-4x"
        put(f"{key} 4x", lambda name=name, label=label: rows.sliced_row(
            name, [*TRAIN, *budget_flags(4, a.quick), "--model-ratio", targets[0], "--axes", AXES[label]]))
    for key, row in sec.items():  # the GGUF of every sliced model, for the speed phase
        if row.get("sliced"):
            try:
                row["gguf"] = str(rows.gguf(Path(row["sliced"]).name, Path(row["sliced"])))
                row["gguf_mib"] = round(Path(row["gguf"]).stat().st_size / 2**20, 2)
            except Unfinished:
                results.setdefault("unfinished", []).append(f"{key} gguf")
    save()


# ------------------------------------------------------------------------------------------------ speed phase
def speed(st: Study, out: Path, a, results: dict, save) -> None:
    """CPU latency (lpt bench runtime, interleaved) and llama.cpp decode tokens/s (interleaved) of every row."""
    sec = results.get("rows", {})
    keyed = [(k, r) for k, r in sec.items() if r.get("sliced")]
    bench = out / "bench.json"
    if not bench.exists():
        args = ["bench", "runtime", *[r["sliced"] for _, r in keyed]]
        for k, _ in keyed:
            args += ["--label", k]
        st.sh("bench", lpt(*args, "--seq-len", a.bench_seq, "--trials", a.trials, "--new-tokens", a.gen_tokens,
                           "--threads", a.threads, "--interleave", "--dtype", "float32", "-o", bench, "--overwrite"))
    doc = json.loads(bench.read_text())
    for r in doc["results"]:
        row = sec.get(r["label"])
        if row is not None:
            row["cpu"] = {"latency_s": r["latency_s"]["median"],
                          "decode_tokens_per_s": (r.get("decode") or {}).get("tokens_per_s")}
    ggufs = {k: Path(r["gguf"]) for k, r in keyed if r.get("gguf")}
    cache = out / "llamacpp_speed.json"
    if ggufs and not cache.exists() and not a.report_only:
        cache.write_text(json.dumps(llamacpp_speed(ggufs, a), indent=2) + "\n")
    if cache.exists():
        for k, v in json.loads(cache.read_text())["results"].items():
            if k in sec:
                sec[k]["llamacpp"] = v
        results["llamacpp_speed"] = {k: v for k, v in json.loads(cache.read_text()).items() if k != "results"}
    save()


def llamacpp_speed(files: dict[str, Path], a) -> dict:
    from llama_cpp import Llama
    from llamacpp_quant import time_one

    from lpt.data import pydoc_topics

    def load(f: Path):
        return Llama(model_path=str(f), n_ctx=1024, n_threads=a.threads, n_threads_batch=a.threads, n_batch=512,
                     verbose=False)

    llms = {k: load(f) for k, f in files.items()}
    text = " ".join(t for _, t in pydoc_topics())
    prompt = next(iter(llms.values())).tokenize(text.encode("utf-8"), add_bos=True)[: a.prompt_tokens]
    pp: dict[str, list[float]] = {k: [] for k in llms}
    tg: dict[str, list[float]] = {k: [] for k in llms}
    loads = [os.getloadavg()[0]]
    for trial in range(a.warmup + a.trials):
        for k, llm in llms.items():  # interleaved: background load hits every model alike
            p, g = time_one(llm, prompt, a.gen_tokens)
            if trial >= a.warmup:
                pp[k].append(p)
                tg[k].append(g)
    loads.append(os.getloadavg()[0])
    return {"results": {k: {"prompt_tokens_per_s": statistics.median(pp[k]),
                            "gen_tokens_per_s": statistics.median(tg[k])} for k in llms},
            "prompt_tokens": len(prompt), "gen_tokens": a.gen_tokens, "threads": a.threads, "trials": a.trials,
            "load_average": loads}


# ------------------------------------------------------------------------------------------------ report
def annotate(results: dict) -> None:
    sec = results.get("rows", {})
    dense, lora0 = sec.get("dense"), sec.get("dense + LoRA")
    for key, row in sec.items():
        if dense and row is not dense and row.get("ppl"):
            row["x_dense"] = {s: round(v / dense["ppl"][s], 3) for s, v in row["ppl"].items() if s in dense["ppl"]}
            row["vs_dense"] = paired(row, dense)
        if lora0 and row is not lora0 and row is not dense and row.get("ppl"):
            row["vs_dense_lora"] = paired(row, lora0)
        for what in ("cpu", "llamacpp"):
            d, r = (dense or {}).get(what), row.get(what)
            if d and r:
                key2 = "gen_tokens_per_s" if what == "llamacpp" else "decode_tokens_per_s"
                if r.get(key2) and d.get(key2):
                    r["decode_x_dense"] = round(r[key2] / d[key2], 3)
                if what == "cpu" and r.get("latency_s") and d.get("latency_s"):
                    r["latency_x_dense"] = round(d["latency_s"] / r["latency_s"], 3)


def _f(v, fmt="{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def _diff(p: dict | None) -> str:
    return "–" if not p else f"{p['avg7']['diff']:+.2f} ± {p['avg7']['se']:.2f}"


def markdown(results: dict) -> str:
    p = results["protocol"]
    sec = results.get("rows", {})
    lines = [f"SmolLM2-135M-Instruct (`{MODEL}`), `python benchmarks/axes_study.py -o {p['out']}`. Perplexity: "
             f"{p['segments']} segments of 2048 tokens of `{IN_DOMAIN}` (in domain: the training text's held-out "
             f"part) and of `{OOD}` (out of domain: BoolQ's Wikipedia passages). Tasks: the paper's seven, "
             f"{p['task_docs']} seeded documents each, the same for every row; differences paired (± one SE). "
             "Recovery: the main command's 20 steps of 4 x 256 tokens (4x: 80 steps, 256 blocks). Speed: "
             f"{p['threads']} thread(s), interleaved trials; CPU = `lpt bench runtime` float32 "
             f"({p['bench_seq']}-token forward, decode of {p['gen_tokens']}); llama.cpp = q8_0 GGUF, "
             f"{p['prompt_tokens']}-token prompt then {p['gen_tokens']} greedy tokens.", "",
             "| row | params | layers / hidden / heads / kv / MLP | ppl in | ppl out | × dense in / out | 7-task avg "
             "| vs dense (points) | vs dense + LoRA | prune min | CPU latency × | CPU decode × | llama.cpp decode × "
             "| q8_0 MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in sec.items():
        if not r.get("ppl"):
            continue
        sh = r.get("shape") or {}
        shape = " / ".join(str(sh.get(k, "–")) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                          "num_key_value_heads", "intermediate_size"))
        x = r.get("x_dense") or {}
        vd, vl = r.get("vs_dense"), r.get("vs_dense_lora")
        lines.append(
            f"| {key} | {_f(r.get('params'), '{:,}')} | {shape} | {_f(r['ppl'].get(IN_DOMAIN))} | "
            f"{_f(r['ppl'].get(OOD))} | {_f(x.get(IN_DOMAIN))} / {_f(x.get(OOD))} | "
            f"{_f(None if r.get('avg7') is None else 100 * r['avg7'])} | "
            f"{_diff(vd)} | {_diff(vl)} | "
            f"{_f(None if r.get('seconds') is None else r['seconds'] / 60, '{:.1f}')} | "
            f"{_f((r.get('cpu') or {}).get('latency_x_dense'))} | {_f((r.get('cpu') or {}).get('decode_x_dense'))} | "
            f"{_f((r.get('llamacpp') or {}).get('decode_x_dense'))} | {_f(r.get('gguf_mib'), '{:.1f}')} |")
    chosen = [(k, r["search"]) for k, r in sec.items() if (r.get("search") or {}).get("candidates")]
    if chosen:
        lines += ["", "What the search chose (blocks / hidden channels / attention units / MLP channels removed; "
                      "candidates within 1% of the target, loss at the first mask update):", ""]
        for k, s in chosen:
            t = s["target"]
            lines.append(f"- {k}: {t['blocks']} / {t['hidden_channels']} / {t['attention_units']} / "
                         f"{t['mlp_channels']} of {len(s['candidates'])} candidates")
    if results.get("unfinished"):
        lines += ["", "Not finished: " + ", ".join(results["unfinished"])]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sec = results.get("rows", {})
    dense = sec.get("dense")
    fig, axs = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (what, title) in zip(axs, ((IN_DOMAIN, "perplexity in domain"), (OOD, "perplexity out of domain"),
                                       ("avg7", "7-task average (%)"))):
        for label in AXES:
            pts = sorted((r["params"] / 1e6, 100 * r["avg7"] if what == "avg7" else r["ppl"][what])
                         for k, r in sec.items() if k.endswith(f" {label}") and r.get("ppl")
                         and (what != "avg7" or r.get("avg7") is not None))
            if dense and dense.get("ppl") and (what != "avg7" or dense.get("avg7") is not None):
                pts.append((dense["params"] / 1e6, 100 * dense["avg7"] if what == "avg7" else dense["ppl"][what]))
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker="o", label=label)
        for k, r in sec.items():
            if k.endswith(" 4x") and r.get("ppl") and (what != "avg7" or r.get("avg7") is not None):
                y = 100 * r["avg7"] if what == "avg7" else r["ppl"][what]
                ax.scatter([r["params"] / 1e6], [y], marker="*", s=120, color="k", zorder=5)
                ax.annotate(k.split(" ", 1)[1], (r["params"] / 1e6, y), fontsize=7)
        ax.set_xlabel("parameters (M)")
        ax.set_title(title)
        if what != "avg7":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axs[0].legend()
    fig.suptitle("SmolLM2-135M pruned to whole-model targets by axis (stars: 4x recovery)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", type=Path, default=Path("runs/axes"))
    ap.add_argument("--phase", choices=("all", "quality", "speed"), default="all")
    ap.add_argument("--targets", default="0.2,0.4", help="whole-model ratios (fraction of all parameters removed)")
    ap.add_argument("--segments", type=int, default=10)
    ap.add_argument("--task-docs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--bench-seq", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--axes-rows", type=lambda v: v.split(","), default=list(AXES),
                    help="which axis rows to run at every target (comma-separated; default: all)")
    ap.add_argument("--no-four-x", dest="four_x", action="store_false",
                    help="skip the 4x-recovery rows of the two best first-target rows")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny budgets, 1 segment, 4 documents")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--publish", action="store_true", help="copy the results to benchmarks/results/")
    a = ap.parse_args(argv)
    if a.quick:
        a.segments, a.task_docs, a.trials, a.bench_seq, a.gen_tokens = 1, 4, 2, 64, 8
    a.out.mkdir(parents=True, exist_ok=True)
    st = Study(a.out, report_only=a.report_only)
    path = a.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.pop("unfinished", None)
    results["protocol"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}

    def save() -> None:
        annotate(results)
        path.write_text(json.dumps({**results, "rows": {k: slim(r) for k, r in results.get("rows", {}).items()}},
                                   indent=2) + "\n")
        (a.out / "results.md").write_text(markdown(results))

    t0 = time.time()
    if a.phase in ("all", "quality"):
        quality(st, a.out, a, results, save)
    if a.phase in ("all", "speed"):
        try:  # --report-only: the timings already on disk, nothing run
            speed(st, a.out, a, results, save)
        except Unfinished:
            results.setdefault("unfinished", []).append("speed")
    save()
    if results.get("rows"):
        plot(results, a.out / "axes.png")
    print(f"done in {(time.time() - t0) / 60:.1f} min -> {a.out}/results.md", flush=True)
    if a.publish:
        for src, dst in (("results.json", "axes_smollm2.json"), ("results.md", "axes_smollm2.md"),
                         ("axes.png", "axes_smollm2.png")):
            if (a.out / src).exists():
                shutil.copy(a.out / src, RESULTS / dst)


if __name__ == "__main__":
    main()
