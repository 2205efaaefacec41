#!/usr/bin/env python
"""Zero-shot accuracy of the quality study's rows (issue 22): the paper's seven tasks, MMLU, out-of-domain text.

    python benchmarks/quality.py --sections main -o runs/quality       # the main table's prunes (fisher, vanilla,
                                                                        # lora, Torch-Pruning Taylor + LoRA)
    python benchmarks/accuracy.py --study runs/quality -o runs/accuracy

For the dense model and every main-table row of the quality study (``OUT/r{ratio}-{method}``), offline through lpt's
local task copies (``lpt eval --task-data local``; ARC and OBQA are their validation splits, the paper used test):
- the paper's seven zero-shot tasks on a fixed seeded subset per task (``--samples``): ``--headline-docs`` documents
  for the headline rows (dense and lpt's default, fisher, at 20% and 50%), ``--task-docs`` for the comparison rows;
  the subsets are nested (``lpt.evaluation.tasks.subsample``), so every row is compared with dense on the documents
  both evaluated, paired (± one standard error of the paired difference);
- MMLU, 5-shot, ``--mmlu-docs`` questions per subject, for the headline rows;
- perplexity on the quality study's held-out documentation (in domain) and on BoolQ's Wikipedia passages (out of
  domain, ``boolq-passages``);
- a dense + LoRA reference: the rows' training budget (read from the fisher row's ``lpt_config.json``) at
  ``--ratio 0``, which separates what pruning costs from what fine-tuning on documentation does.
Resumable; writes OUT/results.json and OUT/results.md. ``--wanda`` adds the paper's semi-structured comparison (Fig.
3): Wanda 2:4 (50% of every block linear, no training; ``benchmarks/wanda.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import MODEL, Study, Unfinished, corpus, lpt  # noqa: E402
from recovery import OOD, Rows, _diff, _pts, paired, slim  # noqa: E402

METHODS = {"fisher": "fisher (default, beyond the paper)", "vanilla": "vanilla (full-gradient Taylor)",
           "tp-taylor": "Torch-Pruning Taylor + LoRA", "lora": "lora (the paper's criterion)"}
HEADLINE = ("fisher",)
PAPER_DROPS = {"0.2": -2.64, "0.5": -10.53}  # LoRAPrune on LLaMA-7B, 7-task average points (Table 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default="runs/quality", help="a quality study's output directory")
    ap.add_argument("-o", "--output", default="runs/accuracy")
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--task-docs", type=int, default=100, help="documents per task of the comparison rows")
    ap.add_argument("--headline-docs", type=int, default=300, help="documents per task of the headline rows")
    ap.add_argument("--mmlu-docs", type=int, default=5, help="MMLU questions per subject (57 subjects; 0: skip)")
    ap.add_argument("--segments", type=int, default=4, help="perplexity segments of 2048 tokens per source")
    ap.add_argument("--wanda", action="store_true", help="also the Wanda 2:4 row (benchmarks/wanda.py)")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    study, out = Path(a.study), Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    st = Study(out, a.report_only)
    _, test_src, desc = corpus(study, "auto")
    results: dict = {"protocol": {"model": MODEL, "study": desc, "task_docs": a.task_docs,
                                  "headline_docs": a.headline_docs, "mmlu_docs": a.mmlu_docs,
                                  "segments": a.segments}, "rows": {}}

    def rows_for(docs: int) -> Rows:
        return Rows(st, out, [test_src, OOD], a.segments, 2048, docs)

    def save() -> None:
        (out / "results.json").write_text(json.dumps({**results, "rows": {k: slim(v) for k, v in
                                                                          results["rows"].items()}},
                                                     indent=2, sort_keys=True) + "\n")
        (out / "results.md").write_text(markdown(results))

    def put(key: str, fn) -> None:
        try:
            results["rows"][key] = fn()
        except Unfinished:
            results.setdefault("unfinished", []).append(key)
            return
        r = results["rows"][key]
        print(f"{key}: ppl {r.get('ppl')} avg7 {r.get('avg7')}", flush=True)
        save()

    def mmlu(name: str, model, extra: list) -> dict | None:
        if not a.mmlu_docs:
            return None
        res = out / f"{name}.mmlu.json"
        if not res.exists():
            st.sh(f"{name}.mmlu", lpt("eval", model, *extra, "--tasks", "mmlu:5", "--task-data", "local",
                                      "--samples", a.mmlu_docs, "-o", res))
        t = json.loads(res.read_text())["tasks"]["mmlu"]
        return {"acc": t["acc"], "acc_stderr": t["acc_stderr"], "samples": t["samples"],
                "seconds": st.seconds(f"{name}.mmlu")}

    def dense() -> dict:
        row = rows_for(a.headline_docs).evaluate("dense", MODEL, [])
        row["mmlu"] = mmlu("dense", MODEL, [])
        return row

    put("dense", dense)

    def lora0() -> dict:
        """dense + LoRA: the main table's training budget (read from fisher's recorded config) at --ratio 0."""
        ref = next((study / f"r{r}-fisher" / "lpt_config.json" for r in a.ratios.split(",")
                    if (study / f"r{r}-fisher" / "lpt_config.json").exists()), None)
        if ref is None:
            raise Unfinished("dense + LoRA needs a fisher row of the study")
        c = json.loads(ref.read_text())["config"]
        flags = ["--calib", c["calib"], "--max-steps", c["max_steps"], "--batch-size", c["batch_size"],
                 "--micro-batch-size", c["micro_batch_size"], "--lr", c["lr"], "--prune-freq", c["prune_freq"],
                 "--seed", c["seed"], "--ratio", "0"]
        return rows_for(a.task_docs).pruned_row("lora0", flags)

    put("dense + LoRA (--ratio 0, the rows' training budget)", lora0)
    for r in a.ratios.split(","):
        for method, label in METHODS.items():
            d = study / f"r{r}-{method}"
            if not (d / "masks.json").exists():
                results.setdefault("missing", []).append(str(d.name))
                continue
            model = study / f"r{r}-tp-taylor-pruned" if method == "tp-taylor" else MODEL
            masks = json.loads((d / "masks.json").read_text())
            extra = ["--adapter", d] + (["--masks", d / "masks.json"] if masks["ratio"]["blocks"] > 0 else [])
            headline = method in HEADLINE
            name = f"r{r}-{method}"

            def row(name=name, model=model, extra=extra, headline=headline, r=r) -> dict:
                out_row = rows_for(a.headline_docs if headline else a.task_docs).evaluate(name, model, extra)
                out_row["mmlu"] = mmlu(name, model, extra) if headline else None
                out_row["ratio"] = float(r)
                return out_row

            put(f"{label} @ {float(r):.0%}", row)
    if a.wanda:
        wanda_dir = out / "wanda-2of4"

        def wanda() -> dict:
            if not (wanda_dir / "config.json").exists():
                st.sh("wanda-2of4", [sys.executable, str(Path(__file__).parent / "wanda.py"), MODEL, "--calib",
                                     str(study / "calib"), "-o", str(wanda_dir)])
            row = rows_for(a.task_docs).evaluate("wanda-2of4", wanda_dir, [])
            row["ratio"] = 0.5
            return row

        put("Wanda 2:4 (semi-structured, no training)", wanda)
    base = results["rows"].get("dense")
    lora_ref = next((v for k, v in results["rows"].items() if k.startswith("dense + LoRA")), None)
    for k, row in results["rows"].items():
        if base is not None and row is not base:
            row["vs_dense"] = paired(row, base)
            row["x_dense"] = {s: round(v / base["ppl"][s], 3) for s, v in row.get("ppl", {}).items()}
        if lora_ref is not None and row is not lora_ref and row is not base:
            row["vs_dense_lora"] = paired(row, lora_ref)
    save()
    print(markdown(results))


def markdown(res: dict) -> str:
    p = res["protocol"]
    rows = res["rows"]
    dense = rows.get("dense") or {}
    src = list(dense.get("ppl", {}))
    lines = [f"SmolLM2-135M-Instruct; rows of the quality study ({p['study']}). Seven zero-shot tasks offline "
             f"(`lpt eval --tasks paper --task-data local --samples N`, ARC and OBQA validation splits): "
             f"{p['headline_docs']} documents per task for dense and fisher, {p['task_docs']} for the other rows "
             "(nested seeded subsets); 'vs dense' is the paired difference of the 7-task average on the documents "
             "both rows evaluated, ± one standard error. MMLU 5-shot on "
             f"{p['mmlu_docs']} questions per subject (57 subjects). Perplexity at 2048 tokens, {p['segments']} "
             "segments per source.", "",
             "| row | " + " | ".join(t for t in ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy",
                                                 "arc_challenge", "openbookqa")) +
             " | 7-task avg | vs dense (points) | vs dense + LoRA | MMLU | " +
             " | ".join(f"ppl {Path(s).name}" for s in src) + " |",
             "|---|" + "---|" * (12 + len(src))]
    for k, row in rows.items():
        tasks = row.get("tasks") or {}
        mm = row.get("mmlu")
        lines.append(f"| {k} | " + " | ".join(_pts((tasks.get(t) or {}).get("score")) for t in
                                              ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy",
                                               "arc_challenge", "openbookqa")) +
                     f" | {_pts(row.get('avg7'))} | {_diff(row.get('vs_dense'))} | "
                     f"{_diff(row.get('vs_dense_lora'))} | {_pts(mm['acc']) if mm else '–'} | " +
                     " | ".join(f"{row.get('ppl', {}).get(s, float('nan')):.2f}" for s in src) + " |")
    lines += ["", "The paper's LoRAPrune on LLaMA-7B (Table 2): " +
              ", ".join(f"{float(r):.0%}: {v:+.2f} points" for r, v in PAPER_DROPS.items()) + " on the 7-task "
              "average."]
    if res.get("missing"):
        lines += ["", "Rows not in the study directory: " + ", ".join(res["missing"]) + "."]
    if res.get("unfinished"):
        lines += ["", "Not finished: " + ", ".join(res["unfinished"]) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
