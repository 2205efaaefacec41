#!/usr/bin/env python
"""Recovery study (issue 23): does lpt's recovery generalise, and how does it scale with compute? SmolLM2-135M.

    python benchmarks/recovery.py -o runs/recovery                          # every section (hours on 2 CPU cores)
    python benchmarks/recovery.py --sections main-command -o runs/recovery  # one section
    python benchmarks/recovery.py --quick -o runs/recovery-q                # a smoke run in minutes
    python benchmarks/recovery.py --report-only -o runs/recovery            # rebuild the tables from what finished

Every run goes through the real CLI. Resumable: finished runs and evaluations are reused. Every row is measured on
text of three kinds and on tasks, none of which any run trains or calibrates on:
- in domain: perplexity on held-out Python documentation (``builtin:pydoc:test`` for the main command, which trains
  on ``builtin:pydoc:train``; the quality study's held-out documentation files for the curve, whose runs train on
  the other files);
- out of domain: perplexity on encyclopedic prose, the distinct Wikipedia passages of BoolQ's validation split
  (``--ppl boolq-passages``; evaluation data, never calibration);
- the paper's seven zero-shot tasks on a fixed seeded subset of ``--task-docs`` documents per task (``lpt eval
  --tasks paper --samples N --per-doc``; every row the same documents, so rows compare paired), offline from lpt's
  local task copies.
Pruning's cost is quoted against two references: the untouched dense model, and dense + LoRA (``lpt prune
--ratio 0``: the same data, steps and learning rate, no pruning), which separates pruning from domain adaptation.

Sections:
1. ``main-command``: the README's 20% main command (``recipes/smollm2-135m-20.yaml``) stage by stage -- the
   criterion alone (no training), the joint prune (adapter and masks, unmerged), ``slice --merge``, ``slice --merge
   --reconstruct`` -- and the variants that could make it generalise: ``--distill`` (the dense model's
   distribution instead of the narrow text's), ``--lr 5e-4``, fewer steps; dense + LoRA with the same recipe.
2. ``curve``: 50% against recovery tokens (16, 64, 128 steps of 8 x 256 tokens: 32k, 128k, 256k; calibration blocks
   grow with the budget, each seen twice): joint pruning with the LM loss; at ``--variant-steps`` also
   ``--distill``, prune-once-then-recover (``--one-shot``) at equal tokens and (``--variants``) a schedule that
   spends most tokens after the last mask update (``--cooldown 0.7``); each also sliced with ``--reconstruct``;
   dense + LoRA at ``--lora0-steps``; one 20% point.
Writes OUT/results.json, OUT/results.md, OUT/curve.png (quality against tokens and against wall time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import MODEL, Study, Unfinished, corpus, lpt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OOD = "boolq-passages"
RECIPE_20 = "recipes/smollm2-135m-20.yaml"  # run from the repository root
PAPER = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
METRIC = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc", "arc_easy": "acc",
          "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}


# ------------------------------------------------------------------------------------------------ measuring rows
class Rows:
    """Runs and evaluations of one study directory, each done once (cached in OUT), with their wall times."""

    def __init__(self, st: Study, out: Path, ppl_sources: list[str], segments: int, seq_len: int, task_docs: int):
        self.st, self.out = st, out
        self.ppl_sources, self.segments, self.seq_len, self.task_docs = ppl_sources, segments, seq_len, task_docs

    def prune(self, name: str, flags: list, model=MODEL) -> Path:
        d = self.out / name
        if not (d / "masks.json").exists():
            self.st.sh(name, lpt("prune", model, *flags, "-o", d, "--overwrite"))
        return d

    def slice(self, name: str, prune_dir: Path, extra: list) -> Path:
        d = self.out / name
        if not (d / "config.json").exists():
            self.st.sh(name, lpt("slice", MODEL, "--masks", prune_dir / "masks.json", *extra, "--dtype", "float32",
                                 "-o", d, "--overwrite"))
        return d

    def evaluate(self, name: str, model, extra: list, tasks: bool = True) -> dict:
        """Perplexity on every source and (with ``tasks``) the seven tasks of ``model`` (+ adapter / masks)."""
        row: dict = {}
        res = self.out / f"{name}.ppl.json"
        if not res.exists():
            self.st.sh(f"{name}.ppl", lpt("eval", model, *extra, "--ppl", ",".join(self.ppl_sources), "--seq-len",
                                          self.seq_len, "--max-segments", self.segments, "-o", res))
        doc = json.loads(res.read_text())
        row["ppl"] = {s: round(v["ppl"], 4) for s, v in doc["perplexity"].items()}
        row["eval_seconds"] = self.st.seconds(f"{name}.ppl")
        if tasks and self.task_docs:
            res = self.out / f"{name}.tasks.json"
            if not res.exists():
                self.st.sh(f"{name}.tasks", lpt("eval", model, *extra, "--tasks", "paper", "--task-data", "local",
                                                "--samples", self.task_docs, "--per-doc", "-o", res))
            doc = json.loads(res.read_text())
            row["tasks"] = {t: {"score": v["score"], "metric": v["metric"], "samples": v["samples"],
                                "per_doc": v.get("per_doc")} for t, v in doc["tasks"].items()}
            row["avg7"] = doc["averages"]["paper_7task"]
            row["tasks_seconds"] = self.st.seconds(f"{name}.tasks")
        return row

    def pruned_row(self, name: str, flags: list, model=MODEL, tasks: bool = True) -> dict:
        """A prune, evaluated unmerged (base + adapter + masks), with its recorded ratio, balance and time."""
        d = self.prune(name, flags, model)
        masks = json.loads((d / "masks.json").read_text())
        pruned = masks["ratio"]["blocks"] > 0
        row = self.evaluate(name, model, ["--adapter", d] + (["--masks", d / "masks.json"] if pruned else []), tasks)
        log = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
        row.update({"ratio_blocks": masks["ratio"]["blocks"], "seconds": self.st.seconds(name),
                    "command": self.st.command(name), "steps": len(log),
                    "balance": {k: v for k, v in (masks.get("info", {}).get("balance") or {}).items()
                                if k != "candidates"}})
        return row


def paired(a: dict, b: dict) -> dict | None:
    """``a`` minus ``b`` on the documents both evaluated: per task the mean difference of the paper metric and its
    standard error (paired), and the same for the 7-task average (tasks independent). Points, not fractions."""
    ta, tb = a.get("tasks") or {}, b.get("tasks") or {}
    if not all(t in ta and t in tb and ta[t].get("per_doc") and tb[t].get("per_doc") for t in PAPER):
        return None
    out, var = {}, 0.0
    for t in PAPER:
        m = METRIC[t]
        da = dict(zip(ta[t]["per_doc"]["ids"], ta[t]["per_doc"][m]))
        db = dict(zip(tb[t]["per_doc"]["ids"], tb[t]["per_doc"][m]))
        common = [i for i in da if i in db]
        d = [100.0 * (da[i] - db[i]) for i in common]
        n = len(d)
        mean = sum(d) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
        out[t] = {"diff": round(mean, 3), "se": round(sd / math.sqrt(n), 3), "n": n}
        var += (sd / math.sqrt(n)) ** 2
    out["avg7"] = {"diff": round(sum(out[t]["diff"] for t in PAPER) / 7, 3), "se": round(math.sqrt(var) / 7, 3)}
    return out


def slim(row: dict) -> dict:
    """A row for results.json: per-document scores dropped (they stay in the *.tasks.json files)."""
    r = dict(row)
    if "tasks" in r:
        r["tasks"] = {t: {k: v for k, v in x.items() if k != "per_doc"} for t, x in r["tasks"].items()}
    return r


# ------------------------------------------------------------------------------------------------ sections
def main_command(st: Study, out: Path, a, results: dict, save) -> None:
    """The README's 20% main command, stage by stage and with variants, in and out of domain."""
    rows = Rows(st, out, ["builtin:pydoc:test", OOD], a.mc_segments, 2048, a.task_docs)
    sec = results.setdefault("main_command", {})
    recipe = ["--recipe", RECIPE_20]
    if a.quick:
        recipe += ["--max-steps", "2", "--nsamples", "8"]
    calib = out / "mc-calib"
    if not calib.exists():
        st.sh("mc-calib", lpt("calibrate", MODEL, *recipe[:2], *(["--nsamples", "8"] if a.quick else []),
                              "-o", calib))

    def put(key: str, fn) -> None:
        try:
            sec[key] = fn()
        except Unfinished:
            results.setdefault("unfinished", []).append(f"main-command {key}")
            return
        print(f"main-command {key}: {json.dumps({k: sec[key].get(k) for k in ('ppl', 'avg7')})}", flush=True)
        save()

    put("dense", lambda: rows.evaluate("mc-dense", MODEL, []))
    put("dense + LoRA (--ratio 0)", lambda: rows.pruned_row("mc-lora0", [*recipe, "--ratio", "0"]))
    # the unmerged prune is the merged, sliced model up to float rounding (tests/test_merge_slice.py): one row
    put("joint prune (the README's command)", lambda: rows.pruned_row("mc-prune", recipe))

    def sliced(name: str, prune_name: str, extra: list) -> dict:
        d = rows.slice(name, out / prune_name, ["--adapter", out / prune_name, "--merge", *extra])
        row = rows.evaluate(name, d, [])
        row["seconds"] = (st.seconds(prune_name) or 0) + (st.seconds(name) or 0)
        return row

    put("joint prune + slice --merge --reconstruct (the README's earlier command)",
        lambda: sliced("mc-reconstruct", "mc-prune", ["--reconstruct", calib]))
    variants = {
        "--distill": ["--distill"],
        "--lr 5e-4": ["--lr", "5e-4"],
        "--distill --distill-weight 0.9": ["--distill", "--distill-weight", "0.9"],
        "--max-steps 10": ["--max-steps", "10"],
        "criterion only (--one-shot --max-steps 1 --lr 1e-12)": ["--one-shot", "--max-steps", "1", "--lr", "1e-12"],
    }
    if a.wanda:  # the paper's semi-structured comparison (Fig. 3): 50% of every block linear, 2:4, no training
        def wanda() -> dict:
            d = out / "mc-wanda-2of4"
            if not (d / "config.json").exists():
                st.sh(d.name, [sys.executable, str(ROOT / "benchmarks" / "wanda.py"), MODEL, "--calib", calib,
                               "-o", d])
            row = rows.evaluate(d.name, d, [])
            row["seconds"] = st.seconds(d.name) or 0
            return row

        put("Wanda 2:4 (50% of every block linear, no training; llm-compressor)", wanda)
    variants = {k: v for k, v in variants.items() if k.split(" (")[0] in a.mc_variants.split(",")}
    for label, extra in variants.items():
        name = "mc-" + label.split(" (")[0].replace("--", "").replace(" ", "-").replace(".", "")
        put(label, lambda name=name, extra=extra: rows.pruned_row(name, [*recipe, *extra]))
        put(f"{label} + slice --merge --reconstruct",
            lambda name=name: sliced(f"{name}-reconstruct", name, ["--reconstruct", calib]))


def curve(st: Study, out: Path, a, results: dict, save) -> None:
    """50% (and one 20% point) against recovery tokens."""
    train_src, test_src, desc = corpus(out, "auto")
    results["curve_corpus"] = desc
    rows = Rows(st, out, [test_src, OOD], a.segments, 2048, a.task_docs)
    sec = results.setdefault("curve", {})
    bs, seq = (4, 128) if a.quick else (8, 256)
    budgets = [int(s) for s in a.steps.split(",")]

    def calib(steps: int) -> Path:
        d = out / f"calib-{steps}"
        if not d.exists():
            st.sh(d.name, lpt("calibrate", MODEL, "--data", train_src, "-n", steps * bs // 2, "--seq-len", seq,
                              "-o", d))
        return d

    def flags(steps: int) -> list:
        return ["--calib", calib(steps), "--max-steps", steps, "--batch-size", bs, "--micro-batch-size", min(bs, 4),
                "--lr", a.lr, "--prune-freq", max(1, steps // 8), "--seed", 0]

    def put(recipe: str, steps: int, fn) -> None:
        key = f"{recipe} @ {steps * bs * seq}"
        try:
            row = fn()
        except Unfinished:
            results.setdefault("unfinished", []).append(f"curve {key}")
            return
        row.update({"recipe": recipe, "steps": steps, "tokens": steps * bs * seq})
        sec[key] = row
        print(f"curve {key}: {json.dumps({k: row.get(k) for k in ('ppl', 'avg7')})}", flush=True)
        save()

    def reconstructed(name: str, steps: int) -> dict:
        d = rows.slice(f"{name}-rec", out / name, ["--adapter", out / name, "--merge", "--reconstruct",
                                                  calib(steps)])
        row = rows.evaluate(f"{name}-rec", d, [])
        row["seconds"] = (st.seconds(name) or 0) + (st.seconds(f"{name}-rec") or 0)
        return row

    put("dense", 0, lambda: rows.evaluate("dense", MODEL, []))
    recipes = {"LM loss": [], "--distill": ["--distill"], "--one-shot": ["--one-shot"],
               "--cooldown 0.7": ["--cooldown", "0.7"]}
    recipes = {k: v for k, v in recipes.items() if k == "LM loss" or k in a.variants.split(",")}
    for steps in budgets:
        for recipe, extra in recipes.items():
            if recipe != "LM loss" and steps not in [int(s) for s in a.variant_steps.split(",")]:
                continue
            name = f"r0.5-s{steps}-" + recipe.replace("--", "").replace(" ", "-").replace(".", "")
            put(f"50% {recipe}", steps, lambda name=name, extra=extra, steps=steps: rows.pruned_row(
                name, ["--ratio", "0.5", *flags(steps), *extra]))
            put(f"50% {recipe} + reconstruct", steps, lambda name=name, steps=steps: reconstructed(name, steps))
        if steps in [int(x) for x in a.lora0_steps.split(",") if x]:
            put("dense + LoRA (--ratio 0)", steps, lambda steps=steps: rows.pruned_row(
                f"lora0-s{steps}", ["--ratio", "0", *flags(steps)]))
    s20 = budgets[min(1, len(budgets) - 1)]
    put("20% LM loss", s20, lambda: rows.pruned_row(f"r0.2-s{s20}", ["--ratio", "0.2", *flags(s20)]))
    put("20% LM loss + reconstruct", s20, lambda: reconstructed(f"r0.2-s{s20}", s20))


# ------------------------------------------------------------------------------------------------ reports
def _ratios(row: dict, ref: dict) -> dict:
    return {s: round(v / ref["ppl"][s], 3) for s, v in row.get("ppl", {}).items() if s in ref.get("ppl", {})}


def annotate(results: dict, sections: list[str]) -> None:
    """Add ratios to both references and paired accuracy differences to every row of ``sections``."""
    mc = results.get("main_command") or {} if "main-command" in sections else {}
    dense, lora0 = mc.get("dense"), mc.get("dense + LoRA (--ratio 0)")
    for row in mc.values():
        if dense:
            row["x_dense"] = _ratios(row, dense)
            row["vs_dense"] = paired(row, dense)
        if lora0:
            row["x_dense_lora"] = _ratios(row, lora0)
            row["vs_dense_lora"] = paired(row, lora0)
            if row.get("x_dense") and row.get("x_dense_lora"):
                srcs = [s for s in row["x_dense"] if s != "builtin:pydoc:test"]
                row["ood_over_id"] = {s: round(row["x_dense"][s] / row["x_dense"]["builtin:pydoc:test"], 3)
                                      for s in srcs if "builtin:pydoc:test" in row["x_dense"]}
    cv = results.get("curve") or {} if "curve" in sections else {}
    dense = next((r for k, r in cv.items() if k.startswith("dense @")), None)
    for key, row in cv.items():
        if dense and row is not dense:
            row["x_dense"] = _ratios(row, dense)
            row["vs_dense"] = paired(row, dense)
        lora0 = cv.get(f"dense + LoRA (--ratio 0) @ {row.get('tokens')}")
        if lora0 and row is not lora0 and not key.startswith("dense"):
            row["x_dense_lora"] = _ratios(row, lora0)
            row["vs_dense_lora"] = paired(row, lora0)


def _pts(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def _diff(p: dict | None) -> str:
    return "–" if not p else f"{p['avg7']['diff']:+.2f} ± {p['avg7']['se']:.2f}"


def _min(s) -> str:
    return "–" if s is None else f"{s / 60:.1f}"


def markdown(results: dict) -> str:
    p = results["protocol"]
    lines = [f"SmolLM2-135M-Instruct. Tasks: the paper's seven, a fixed seeded subset of {p['task_docs']} documents "
             "per task (`lpt eval --tasks paper --task-data local --samples N`; ARC and OBQA are their validation "
             "splits), the same documents for every row; accuracy differences are paired over those documents "
             "(± one standard error). Out of domain: `boolq-passages` (BoolQ's distinct Wikipedia passages).", ""]
    mc = results.get("main_command") or {}
    if mc:
        src = sorted((mc.get("dense") or {}).get("ppl", {}), key=lambda s: s == OOD)  # in domain, then out
        lines += [f"**Main command** (`recipes/smollm2-135m-20.yaml`, 20%; perplexity at 2048 tokens, "
                  f"{p['mc_segments']} segments per source):", "",
                  "| row | " + " | ".join(f"ppl {s}" for s in src) + " | 7-task avg | vs dense (points) | "
                  "vs dense + LoRA | × dense (in / out) | × dense + LoRA (in / out) | prune min |",
                  "|---|" + "---|" * (len(src) + 6)]
        for k, row in mc.items():
            xd, xl = row.get("x_dense") or {}, row.get("x_dense_lora") or {}
            lines.append(f"| {k} | " + " | ".join(f"{row['ppl'].get(s, float('nan')):.2f}" for s in src) +
                         f" | {_pts(row.get('avg7'))} | {_diff(row.get('vs_dense'))} | "
                         f"{_diff(row.get('vs_dense_lora'))} | "
                         f"{' / '.join(str(xd.get(s, '–')) for s in src)} | "
                         f"{' / '.join(str(xl.get(s, '–')) for s in src)} | {_min(row.get('seconds'))} |")
        lines.append("")
        tasked = {k: r for k, r in mc.items() if r.get("tasks")}
        if tasked:
            names = [t for t in PAPER if t in next(iter(tasked.values()))["tasks"]]
            lines += ["Per task (the paper's metric: acc_norm for HellaSwag, ARC-c and OBQA, acc otherwise; "
                      f"{p['task_docs']} documents each, one standard error of a score is about "
                      f"{100 * math.sqrt(0.25 / max(1, p['task_docs'])):.0f} points):", "",
                      "| row | " + " | ".join(names) + " | average |", "|---|" + "---|" * (len(names) + 1)]
            for k, r in tasked.items():
                lines.append(f"| {k} | " + " | ".join(_pts(r["tasks"][t]["score"]) for t in names) +
                             f" | {_pts(r.get('avg7'))} |")
            lines.append("")
    cv = results.get("curve") or {}
    if cv:
        src = sorted(next(iter(cv.values())).get("ppl", {}), key=lambda s: s == OOD)  # in domain, then out
        lines += [f"**Budget curve** ({results.get('curve_corpus')}; lr {p['lr']}; perplexity at 2048 tokens, "
                  f"{p['segments']} segments per source; minutes on the shared 2-core machine):", "",
                  "| recipe | tokens | " + " | ".join(f"ppl {Path(s).name}" for s in src) +
                  " | 7-task avg | vs dense (points) | × dense (in / out) | × dense + LoRA (in / out) | min |",
                  "|---|---|" + "---|" * (len(src) + 5)]
        for k, row in cv.items():
            xd, xl = row.get("x_dense") or {}, row.get("x_dense_lora") or {}
            lines.append(f"| {row.get('recipe')} | {row.get('tokens'):,} | " +
                         " | ".join(f"{row['ppl'].get(s, float('nan')):.2f}" for s in src) +
                         f" | {_pts(row.get('avg7'))} | {_diff(row.get('vs_dense'))} | "
                         f"{' / '.join(str(xd.get(s, '–')) for s in src)} | "
                         f"{' / '.join(str(xl.get(s, '–')) for s in src)} | {_min(row.get('seconds'))} |")
        lines.append("")
    if results.get("unfinished"):
        lines += ["Not finished: " + ", ".join(results["unfinished"]) + ".", ""]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cv = results.get("curve") or {}
    if not cv:
        return
    srcs = list(next(iter(cv.values())).get("ppl", {}))
    panels = [(s, f"ppl {'out of domain' if s == OOD else 'in domain'} ({Path(s).name})") for s in srcs]
    panels.append(("avg7", "7-task average (%)"))
    fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 8))
    for col, (metric, title) in enumerate(panels):
        for row_i, xkey in enumerate(("tokens", "seconds")):
            ax = axes[row_i][col]
            series: dict[str, list] = {}
            for row in cv.values():
                if row.get("recipe") == "dense" or xkey == "seconds" and not row.get("seconds"):
                    continue
                y = 100 * row["avg7"] if metric == "avg7" and row.get("avg7") is not None else \
                    row.get("ppl", {}).get(metric)
                if y is not None:
                    series.setdefault(row["recipe"], []).append((row[xkey] / (60 if xkey == "seconds" else 1), y))
            for name, pts in series.items():
                pts.sort()
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
            dense = next((r for r in cv.values() if r.get("recipe") == "dense"), None)
            if dense:
                y = 100 * dense["avg7"] if metric == "avg7" and dense.get("avg7") else dense["ppl"].get(metric)
                if y is not None:
                    ax.axhline(y, color="black", linewidth=1, label="dense")
            if metric != "avg7":
                ax.set_yscale("log")
            ax.set_xlabel("training tokens" if xkey == "tokens" else "wall time (min, prune + slice)")
            ax.set_title(title, fontsize=9)
            ax.grid(True, alpha=0.3)
            if col == 0 and row_i == 0:
                ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: recovery against compute")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default="runs/recovery")
    ap.add_argument("--sections", default="main-command,curve", help="comma list: main-command, curve")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny budgets, one variant, few documents")
    ap.add_argument("--steps", default=None, help="curve budgets in optimiser steps of 8 x 256 tokens "
                                                  "(default 16,64,128: 32k, 128k, 256k tokens; quick: 2)")
    ap.add_argument("--variant-steps", default=None,
                    help="budgets at which the variants (--distill, --one-shot, --cooldown 0.7) run (default 64)")
    ap.add_argument("--variants", default="--distill,--one-shot",
                    help="curve recipes besides the LM loss, at --variant-steps (--distill, --one-shot, --cooldown 0.7)")
    ap.add_argument("--lora0-steps", default=None, help="budgets with a dense + LoRA reference (default 16,64)")
    ap.add_argument("--mc-variants", default="--distill,--lr 5e-4",
                    help="main-command variants (--distill, --lr 5e-4, --distill --distill-weight 0.9, "
                         "--max-steps 10, criterion only)")
    ap.add_argument("--wanda", action="store_true", help="main-command section: also a Wanda 2:4 row on the same "
                                                         "calibration blocks (benchmarks/wanda.py, llm-compressor)")
    ap.add_argument("--lr", type=float, default=2e-3, help="learning rate of the curve (the quality study's)")
    ap.add_argument("--task-docs", type=int, default=None, help="documents per task (default 100; quick: 5; 0: no "
                                                                "tasks)")
    ap.add_argument("--segments", type=int, default=None, help="perplexity segments per source in the curve "
                                                               "(default 4, the quality study's; quick: 1)")
    ap.add_argument("--mc-segments", type=int, default=None, help="perplexity segments per source in the main "
                                                                  "command section (default 10; quick: 1)")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    os.chdir(ROOT)  # the recipe and every recorded command relative to the repository root
    a.steps = a.steps or ("2" if a.quick else "16,64,128")
    a.variant_steps = a.variant_steps or ("2" if a.quick else "64")
    a.lora0_steps = a.lora0_steps or ("2" if a.quick else "16,64")
    if a.quick:
        a.mc_variants = "--distill"
    a.task_docs = a.task_docs if a.task_docs is not None else (5 if a.quick else 100)
    a.segments = a.segments or (1 if a.quick else 4)
    a.mc_segments = a.mc_segments or (1 if a.quick else 10)
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    st = Study(out, a.report_only)
    t0 = time.time()
    old = out / "results.json"
    results = json.loads(old.read_text()) if old.exists() else {}
    results.pop("unfinished", None)
    results["protocol"] = {"model": MODEL, "task_docs": a.task_docs, "segments": a.segments,
                           "mc_segments": a.mc_segments, "lr": a.lr, "steps": a.steps,
                           "variant_steps": a.variant_steps, "quick": a.quick}

    sections = a.sections.split(",")
    owned = {"main_command"} if "main-command" in sections else set()
    owned |= {"curve", "curve_corpus"} if "curve" in sections else set()

    def save() -> None:  # another invocation may run the other section into the same directory at the same time
        disk = json.loads(old.read_text()) if old.exists() else {}
        for k in ("main_command", "curve", "curve_corpus"):
            if k not in owned and k in disk:
                results[k] = disk[k]
        annotate(results, sections)
        results["stages_wall_time_s"] = round(sum(v["seconds"] for v in st.read_times().values()), 1)
        (out / "results.json").write_text(json.dumps({k: ({n: slim(r) for n, r in v.items()}
                                                          if k in ("main_command", "curve") else v)
                                                      for k, v in results.items()}, indent=2, sort_keys=True) + "\n")
        (out / "results.md").write_text(markdown(results))
        try:
            plot(results, out / "curve.png")
        except Exception as e:  # noqa: BLE001 - a missing plotting library must not lose measurements
            print(f"  (no plot: {e})")

    if "main-command" in sections:
        main_command(st, out, a, results, save)
    if "curve" in sections:
        curve(st, out, a, results, save)
    save()
    print(markdown(results))
    print(f"{(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
