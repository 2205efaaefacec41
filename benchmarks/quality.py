#!/usr/bin/env python
"""Quality study (issue #14): lpt's criteria against baselines and an external peer on SmolLM2-135M.

    python benchmarks/quality.py -o runs/quality            # the full protocol (hours on 2 CPU cores; resumable)
    python benchmarks/quality.py --quick -o runs/quality-q  # a smoke run in minutes

Every training run goes through the real CLI (one subprocess per stage) with the same calibration blocks, steps,
batch, learning rate, seed and LoRA budget. Sections, in priority order (an interrupted study keeps the first ones;
finished runs are reused when the study is started again):

1. criterion only: score the unpruned model once (``lpt.importance.score`` over the first scoring blocks, LoRA
   injected with B = 0, so nothing is trained), keep the weakest groups of every layer (uniform layout), and
   evaluate the masked dense model (``lpt eval --masks``, no adapter): fisher, lora, vanilla, magnitude, each with
   both balances between attention and MLP (``--balance search`` and ``proportional``). Isolates the criterion.
   Also every candidate of fisher's balance search (its calibration loss and held-out perplexity), and the overlap
   of the groups each criterion prunes with those vanilla prunes (Fig. 4).
2. main command (only with ``--sections ...,main-command``; ``benchmarks/main_command.py`` times the README's
   command itself): a candidate for it (``lpt prune smollm2-135m --ratio 0.2 --criterion fisher`` on
   builtin:pydoc:train, a budget that fits in minutes), evaluated on builtin:pydoc:test, wall time.
3. main table at 20% and 50%: ``--criterion fisher``, ``lora``, ``vanilla`` (iterative pruning with joint LoRA
   fine-tuning), and Torch-Pruning's Taylor importance (``benchmarks/tp_peer.py``) followed by the same LoRA budget
   (``lpt prune PRUNED --ratio 0``), at the per-layer widths lpt's fisher row chose (``tp_peer.py --heads``).
4. ablations at 50% of the best lpt row of the main table: ``--distill``, ``--one-shot`` (score once, prune, then
   fine-tune), ``--layout per-layer``, ``--balance proportional``, ``--lr 5e-4`` (the previous protocol's); the
   normalisation scope (``--normalize-by projection`` against the main table's ``group``) on ``lora``: for fisher
   both scopes are the same thing (one score vector per group kind); 1.5x the steps without ``--distill`` (about
   the wall time ``--distill`` takes: is distillation better than training longer?); ``--distill`` at 20% too.
5. reconstruction (beyond the paper): ``lpt slice --reconstruct`` (``--reconstruct-mode sequential`` and
   ``independent``) of fisher's criterion-only masks and of fisher's main-table row (``--adapter --merge``), and the
   pipeline *prune once, reconstruct, then recover*: fisher's criterion-only masks -> ``lpt slice --reconstruct`` ->
   ``lpt prune SLICED --ratio 0`` with the main table's LoRA budget.

Perplexity: ``lpt eval`` on held-out text the calibration never saw, non-overlapping 2048-token segments.
Writes OUT/results.json, OUT/results.md and OUT/results.png (perplexity against parameters removed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYDOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")  # Debian's python3.11-doc package
MODEL = "smollm2-135m"
CRITERION_ONLY = ("fisher", "lora", "vanilla", "magnitude")
MAIN_CRITERIA = ("fisher", "lora", "vanilla")


def lpt(*args) -> list[str]:
    return [sys.executable, "-m", "lpt", *[str(a) for a in args]]


def shown(args: list[str]) -> str:
    """The command as a user types it (``lpt ...`` / ``python benchmarks/...``)."""
    args = [str(a) for a in args]
    if args[:3] == [sys.executable, "-m", "lpt"]:
        args = ["lpt", *args[3:]]
    elif args[0] == sys.executable:
        args = ["python", os.path.relpath(args[1], ROOT), *args[2:]]
    return shlex.join(args)


class Unfinished(Exception):
    """A run that has not finished, met with ``--report-only``."""


class Study:
    def __init__(self, out: Path, report_only: bool = False):
        self.out, self.report_only = out, report_only
        self.log = out / "study.log"
        self.times_path = out / "timings.json"
        self.times = self.read_times()

    def read_times(self) -> dict:
        return json.loads(self.times_path.read_text()) if self.times_path.exists() else {}

    def record(self, key: str, seconds: float, command: str) -> None:
        self.times = {**self.read_times(), key: {"seconds": seconds, "command": command}}  # another study may write
        self.times_path.write_text(json.dumps(self.times, indent=2, sort_keys=True) + "\n")

    def sh(self, key: str, args: list[str]) -> None:
        """Run one CLI stage (output to the study log), record its wall time under ``key``; failure stops the study."""
        if self.report_only:
            raise Unfinished(key)
        t0 = time.time()
        with self.log.open("a") as f:
            f.write(f"$ {shown(args)}\n")
            f.flush()
            r = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if r.returncode:
            tail = self.log.read_text().splitlines()[-15:]
            raise SystemExit(f"failed ({r.returncode}): {shown(args)}\n" + "\n".join(tail))
        dt = round(time.time() - t0, 1)
        self.record(key, dt, shown(args))
        print(f"  {dt:7.1f}s  {shown(args)[:150]}", flush=True)

    def seconds(self, key: str) -> float | None:
        return self.times.get(key, {}).get("seconds")

    def command(self, key: str) -> str | None:
        return self.times.get(key, {}).get("command")


def corpus(out: Path, prefer: str) -> tuple[str, str, str]:
    """(train source, test source, description). Python's reST docs when installed, else builtin:pydoc."""
    if prefer != "pydoc" and PYDOC_SOURCES.is_dir():
        files = sorted(p for p in PYDOC_SOURCES.rglob("*.txt"))
        # pydoc topics are generated from the reference docs: keep them out of both parts so nothing leaks
        files = [p for p in files if "reference" not in p.parts and p.name != "stdtypes.rst.txt"]
        train, test = [], []
        for p in files:
            rel = str(p.relative_to(PYDOC_SOURCES))
            (test if int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 20 == 0 else train).append(p)
        d = out / "corpus"
        d.mkdir(parents=True, exist_ok=True)
        for name, part in (("train", train), ("test", test)):
            (d / f"{name}.txt").write_text("\n\n".join(p.read_text(errors="replace") for p in part))
        return (str(d / "train.txt"), str(d / "test.txt"),
                f"Python 3.11 documentation reST sources (Debian python3.11-doc): {len(train)} files for calibration, "
                f"{len(test)} held-out files for evaluation (file-level split; language reference excluded)")
    return ("builtin:pydoc:train", "builtin:pydoc:test",
            "builtin:pydoc (pydoc_data.topics): train part for calibration, disjoint test part for evaluation")


def ppl_of(path: Path, source: str) -> float:
    return float(json.loads(path.read_text())["perplexity"][source]["ppl"])


# ------------------------------------------------------------------------------------------------ criterion only
def criterion_masks(calib: Path, ratios: list[float], criteria: tuple[str, ...], out: Path, batch_size: int,
                    blocks: int, gqa: str = "kv-groups", round_to: int = 8) -> tuple[dict, dict]:
    """Score the unpruned model once per criterion (no training) and write the masks of every (criterion, ratio).

    Public API only: ``lpt.lora.inject`` (rank 8, B = 0: the state ``lpt prune`` starts from), ``lpt.importance
    .score`` over the first ``blocks`` calibration blocks, ``lpt.groups`` for the candidates, the selection (the
    weakest groups of every layer, as ``lpt prune --one-shot`` with the uniform layout) and ``masks.json``. Two
    balances between attention and MLP, as ``lpt prune --balance``: ``crit-C-rR`` is ``search`` (every candidate of
    ``groups.balance_candidates`` pruned, the one with the lowest loss on the scoring blocks kept; every fisher
    candidate is also written, as ``crit-fisher-rR-hH``), ``crit-C-rR-prop`` is ``proportional``.
    Returns (the overlap of each criterion's pruned groups with vanilla's, Fig. 4 of the paper; the calibration
    loss of every candidate per criterion and ratio).
    """
    import torch

    from lpt import calibration, groups, importance, lora, models, selection
    from lpt.masks import Masks, apply_masks
    from lpt.arch import describe

    torch.manual_seed(0)
    model, tok = models.load_model(MODEL)
    model.eval()  # no dropout while scoring
    arch = describe(model.config)
    lora.inject(model, arch, r=8, alpha=16)
    data = calibration.load(calib, tok)
    n = min(blocks, data.nsamples)

    def batches():
        for i in range(0, n, batch_size):
            yield {k: v[i:i + batch_size] for k, v in data.tensors.items()}

    @torch.no_grad()
    def loss_of(masks) -> float:
        apply_masks(model, masks)
        try:
            losses = [float(model(**b).loss) for b in batches()]
        finally:
            apply_masks(model, Masks.full(arch))
        return sum(losses) / len(losses)

    def save(masks, c: str, r: float, name: str, balance: dict) -> None:
        before, after = masks.block_params()
        masks.info = {"criterion": c, "one_shot": True, "steps": 0, "scoring": f"{n} calibration blocks, no "
                      "training", "round_to": round_to, "balance": balance,
                      "ratio": {"requested": r, "blocks": (before - after) / before}}
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        masks.save(d / "masks.json")

    pruned: dict[tuple[str, float], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    cand_losses: dict = {}
    units = groups.head_units(arch, gqa)
    for c in criteria:
        t0 = time.time()
        cache = out / f"crit-{c}-scores.pt"  # an interrupted study scores only what is missing
        if cache.exists():
            scores = torch.load(cache)
        else:
            scores = importance.score(model, batches(), c, arch=arch, gqa=gqa, normalize="group")
            torch.save(scores, cache)

        def masks_for(nh: int, nc: int):
            hp = [selection.prune_lowest(s[0], torch.zeros(units, dtype=torch.bool), nh) for s in scores]
            cp = [selection.prune_lowest(s[1], torch.zeros(arch.intermediate_size, dtype=torch.bool), nc) for s in scores]
            return hp, cp, Masks.from_pruned(arch, hp, cp, gqa, model=MODEL)

        for r in ratios:
            cands = groups.balance_candidates(arch, r, gqa, round_to)
            table = []
            for nh, nc in cands:
                hp, cp, masks = masks_for(nh, nc)
                table.append({"attention_units": nh, "mlp_channels": nc, "loss": round(loss_of(masks), 6)})
                if c == "fisher":
                    save(masks, c, r, f"crit-{c}-r{r}-h{nh}", {"mode": str(nh), "attention_units": nh,
                                                              "mlp_channels": nc})
            best = min(table, key=lambda row: row["loss"])
            save(masks_for(best["attention_units"], best["mlp_channels"])[2], c, r, f"crit-{c}-r{r}",
                 {"mode": "search", "attention_units": best["attention_units"], "mlp_channels": best["mlp_channels"],
                  "candidates": table})
            nh, nc = groups.uniform_counts(arch, r, gqa, round_to)
            hp, cp, masks = masks_for(nh, nc)
            pruned[(c, r)] = list(zip(hp, cp))  # the overlap is read at equal counts: the proportional balance
            save(masks, c, r, f"crit-{c}-r{r}-prop", {"mode": "proportional", "attention_units": nh,
                                                       "mlp_channels": nc})
            cand_losses.setdefault(c, {})[str(r)] = table
        print(f"  {time.time() - t0:7.1f}s  scored {c} over {n} blocks", flush=True)
    agreement = {}
    if "vanilla" in criteria:
        for c in criteria:
            if c == "vanilla":
                continue
            for r in ratios:
                res = {}
                for kind, k in (("attention (kv groups)", 0), ("mlp channels", 1)):
                    shares = []
                    for a, b in zip(pruned[(c, r)], pruned[("vanilla", r)]):
                        if int(b[k].sum()):
                            shares.append(float((a[k] & b[k]).sum()) / float(b[k].sum()))
                    res[kind] = round(sum(shares) / len(shares), 4) if shares else None
                agreement.setdefault(c, {})[str(r)] = res
    return agreement, cand_losses


# ------------------------------------------------------------------------------------------------ study
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default="runs/quality")
    ap.add_argument("--quick", action="store_true", help="a smoke run: one ratio, one row per section, a few steps")
    ap.add_argument("--ratios", default=None, help="comma list (default 0.2,0.5; quick: 0.5)")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default 16; quick: 2)")
    ap.add_argument("--batch-size", type=int, default=None, help="blocks per step (default 8; quick: 4)")
    ap.add_argument("--seq-len", type=int, default=None, help="calibration block length (default 256; quick: 128)")
    ap.add_argument("--nsamples", type=int, default=None, help="calibration blocks (default: two epochs' worth)")
    ap.add_argument("--score-blocks", type=int, default=None,
                    help="calibration blocks the criterion-only scores are summed over (default 8; quick: 4)")
    ap.add_argument("--lr", type=float, default=2e-3,
                    help="peak learning rate of every training row (default 2e-3; the ablations include 5e-4, the "
                         "previous protocol's)")
    ap.add_argument("--corpus", choices=["auto", "pydoc"], default="auto")
    ap.add_argument("--eval-seq-len", type=int, default=None, help="default 2048; quick: 512")
    ap.add_argument("--eval-segments", type=int, default=None,
                    help="segments of held-out text evaluated (0: all; default 4; quick: 1)")
    ap.add_argument("--sections", default="criterion,main,ablations,reconstruct",
                    help="comma list of sections to run (criterion, main-command, main, ablations, reconstruct; "
                         "main-command is off by default: benchmarks/main_command.py times the README's command)")
    ap.add_argument("--reconstruct-modes", default="sequential",
                    help="comma list of lpt slice --reconstruct-mode values in section 5 (sequential, independent)")
    ap.add_argument("--no-peer", action="store_true", help="skip the Torch-Pruning peer")
    ap.add_argument("--criteria", default=",".join(MAIN_CRITERIA),
                    help="comma list of lpt criteria in the main table (default fisher,lora,vanilla)")
    ap.add_argument("--main-command", default="--nsamples 64 --seq-len 256 --max-steps 20 --batch-size 4 "
                    "--micro-batch-size 4 --lr 5e-4 --prune-freq 2",
                    help="budget flags of the main-command candidate (besides --ratio 0.2 --criterion fisher)")
    ap.add_argument("--main-command-variants", default="plain,distill",
                    help="comma list: plain, distill (adds --distill)")
    ap.add_argument("--pydoc-dense-ppl", type=float, default=None,
                    help="dense perplexity on builtin:pydoc:test at the eval seq-len, all segments, if already "
                         "measured (the README's number); default: measure it")
    ap.add_argument("--report-only", action="store_true",
                    help="start nothing: rebuild results.json/.md/.png from the runs that finished")
    return ap.parse_args(argv)


RESULT_SECTIONS = ("criterion_only", "criterion_only_proportional", "balance", "main_command", "rows", "ablations",
                   "mask_agreement", "ablation_base", "reconstruct")


class Run:
    """One invocation of the study: the protocol from the arguments, the results so far, and the helpers every
    section uses (``evaluate``, ``lpt_run``, ``attempt``, ``save``)."""

    def __init__(self, a: argparse.Namespace):
        self.a = a
        quick = self.quick = a.quick
        self.ratios = [float(r) for r in (a.ratios or ("0.5" if quick else "0.2,0.5")).split(",")]
        steps = self.steps = a.steps or (2 if quick else 16)
        bs = self.bs = a.batch_size or (4 if quick else 8)
        seq = self.seq = a.seq_len or (128 if quick else 256)
        nsamples = self.nsamples = a.nsamples or (8 if quick else steps * bs // 2)  # every block seen twice
        self.score_blocks = min(nsamples, a.score_blocks or (4 if quick else 8))
        a.eval_seq_len = a.eval_seq_len or (512 if quick else 2048)
        a.eval_segments = a.eval_segments if a.eval_segments is not None else (1 if quick else 4)
        self.sections = set(a.sections.split(","))
        out = self.out = Path(a.output)
        out.mkdir(parents=True, exist_ok=True)
        self.st = Study(out, a.report_only)
        self.t_start = time.time()

        self.train_src, self.test_src, corpus_desc = corpus(out, a.corpus)
        print(f"corpus: {corpus_desc}")
        calib = self.calib = out / "calib"
        if not calib.exists():
            self.st.sh("calibrate", lpt("calibrate", MODEL, "--data", self.train_src, "-n", nsamples, "--seq-len", seq,
                                        "-o", calib))

        prune_freq = max(1, steps // 8)
        self.common = ["--calib", calib, "--max-steps", steps, "--batch-size", bs, "--micro-batch-size", min(bs, 4),
                       "--lr", a.lr, "--prune-freq", prune_freq, "--seed", "0"]
        self.ev = ["--ppl", self.test_src, "--seq-len", a.eval_seq_len] + (
            ["--max-segments", a.eval_segments] if a.eval_segments else [])

        self.results: dict = {"protocol": {
            "model": MODEL, "corpus": corpus_desc, "calibration_blocks": nsamples, "seq_len": seq, "steps": steps,
            "batch_size": bs, "training_tokens": steps * bs * seq, "criterion_only_scoring_blocks": self.score_blocks,
            "lr": a.lr, "prune_freq": prune_freq,
            "eval": f"perplexity on {self.test_src}, the first {a.eval_segments or 'all'} non-overlapping "
                    f"{a.eval_seq_len}-token segments (lpt eval)", "quick": quick},
            "criterion_only": {}, "criterion_only_proportional": {}, "balance": {}, "main_command": {}, "rows": {},
            "ablations": {}, "reconstruct": {}}
        old = out / "results.json"
        if old.exists():  # keep sections measured by an earlier invocation (e.g. with other --sections)
            prev = json.loads(old.read_text())
            for k in RESULT_SECTIONS:
                if prev.get(k) and prev.get("protocol", {}).get("quick") == quick:
                    self.results[k] = prev[k]

    def save(self) -> None:  # after every row, so an interrupted study keeps what it measured
        out, results = self.out, self.results
        results["wall_time_s"] = round(time.time() - self.t_start, 1)
        results["stages_wall_time_s"] = round(sum(v["seconds"] for v in self.st.read_times().values()), 1)
        (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        (out / "results.md").write_text(markdown(results))
        try:
            plot(results, out / "results.png")
        except Exception as e:  # a missing plotting library must not lose measurements
            print(f"  (no plot: {e})")

    def evaluate(self, name: str, model, extra: list, source: str | None = None, evflags: list | None = None) -> dict:
        source = self.test_src if source is None else source
        res = self.out / f"{name}.eval.json"
        if not res.exists():
            self.st.sh(f"{name}.eval", lpt("eval", model, *extra, *(self.ev if evflags is None else evflags),
                                           "-o", res))
        return {"ppl": round(ppl_of(res, source), 4), "eval_seconds": self.st.seconds(f"{name}.eval"),
                "eval_command": self.st.command(f"{name}.eval")}

    def lpt_run(self, name: str, extra: list, model=MODEL, flags: list | None = None, source: str | None = None,
                evflags: list | None = None) -> dict:
        d = self.out / name
        if not d.exists():
            self.st.sh(name, lpt("prune", model, *(self.common if flags is None else flags), *extra, "-o", d))
        masks = json.loads((d / "masks.json").read_text())
        pruned = masks["ratio"]["blocks"] > 0
        row = self.evaluate(name, model, ["--adapter", d] + (["--masks", d / "masks.json"] if pruned else []), source,
                            evflags)
        row.update({"ratio_blocks": masks["ratio"]["blocks"], "ratio_model": masks["ratio"].get("model"),
                    "balance": masks.get("info", {}).get("balance"), "seconds": self.st.seconds(name),
                    "command": self.st.command(name)})
        return row

    def attempt(self, label: str, fn):
        """``fn()``, or None when a run it needs has not finished and ``--report-only`` forbids starting it."""
        try:
            return fn()
        except Unfinished:
            self.results.setdefault("unfinished", []).append(label)
            print(f"not finished: {label}")
            return None


# 1. criterion only ----------------------------------------------------------------------------------------------
def criterion_section(run: Run) -> None:
    a, out, st, results, ratios = run.a, run.out, run.st, run.results, run.ratios
    crits = ("fisher", "vanilla") if run.quick else CRITERION_ONLY
    names = [f"crit-{c}-r{r}{sfx}" for c in crits for r in ratios for sfx in ("", "-prop")]
    need = [nm for nm in names if not (out / f"{nm}.eval.json").exists()]
    agreement, cands = out / "crit-agreement.json", out / "crit-balance.json"
    if (need or not agreement.exists() or not cands.exists()) and not a.report_only:
        t0 = time.time()
        agr, table = criterion_masks(run.calib, ratios, crits, out, min(run.bs, 4), run.score_blocks)
        agreement.write_text(json.dumps(agr, indent=2, sort_keys=True) + "\n")
        cands.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
        if st.seconds("criterion-scoring") is None:  # not when only reloaded from the scores' cache
            st.record("criterion-scoring", round(time.time() - t0, 1), "lpt.importance.score (in process)")
    if agreement.exists():
        results["mask_agreement"] = json.loads(agreement.read_text())
    for r in ratios:
        for c in crits:
            for sfx, key in (("", "criterion_only"), ("-prop", "criterion_only_proportional")):
                name = f"crit-{c}-r{r}{sfx}"
                if not (out / name / "masks.json").exists():
                    results.setdefault("unfinished", []).append(f"criterion only {c} {r}{sfx}")
                    continue
                masks = json.loads((out / name / "masks.json").read_text())
                row = run.attempt(f"criterion only {c} {r}{sfx}",
                                  lambda: run.evaluate(name, MODEL, ["--masks", out / name / "masks.json"]))
                if row is None:
                    continue
                row["ratio_blocks"] = masks["ratio"]["blocks"]
                row["balance"] = {k: v for k, v in masks["info"]["balance"].items() if k != "candidates"}
                results[key].setdefault(str(r), {})[c] = row
                print(f"criterion only {r} {c}{sfx}: ppl {row['ppl']:.3f}")
                run.save()
        # the balance search, seen from the held-out text: every fisher candidate's loss and perplexity
        if cands.exists() and "fisher" in crits:
            rows = []
            for cand in json.loads(cands.read_text())["fisher"][str(r)]:
                name = f"crit-fisher-r{r}-h{cand['attention_units']}"
                row = run.attempt(f"balance fisher {r} {cand['attention_units']}",
                                  lambda: run.evaluate(name, MODEL, ["--masks", out / name / "masks.json"]))
                if row is not None:
                    rows.append({**cand, "ppl": row["ppl"]})
            results["balance"][str(r)] = rows
            run.save()
    results["criterion_only_scoring_seconds"] = st.seconds("criterion-scoring")


# 2. main command ------------------------------------------------------------------------------------------------
def main_command_budget(run: Run) -> tuple[list, list]:
    """(the main-command candidate's budget flags, its evaluation flags)."""
    a = run.a
    budget = a.main_command.split()
    if run.quick:
        budget = ["--nsamples", "8", "--seq-len", "128", "--max-steps", "2", "--batch-size", "4", "--lr", "5e-4",
                  "--prune-freq", "1"]
    mc_ev = ["--ppl", "builtin:pydoc:test", "--seq-len", a.eval_seq_len] + (["--max-segments", "1"] if run.quick else [])
    return budget, mc_ev


def main_command_section(run: Run, v: str) -> None:
    a, results = run.a, run.results
    budget, mc_ev = main_command_budget(run)
    if a.pydoc_dense_ppl and not run.quick:
        dense = {"ppl": a.pydoc_dense_ppl, "source": "given (--pydoc-dense-ppl)"}
    else:
        dense = run.attempt("dense on builtin:pydoc:test",
                            lambda: run.evaluate("dense-pydoc", MODEL, [], "builtin:pydoc:test", mc_ev))
        if dense is None:
            return
    results["main_command"]["dense"] = dense
    extra = ["--ratio", "0.2", "--criterion", "fisher", "--data", "builtin:pydoc:train"] + \
            (["--distill"] if v == "distill" else [])
    row = run.attempt(f"main command {v}", lambda: run.lpt_run(f"main-cmd-{v}", extra, flags=budget,
                                                               source="builtin:pydoc:test", evflags=mc_ev))
    if row is None:
        return
    row["x_dense"] = round(row["ppl"] / dense["ppl"], 3)
    results["main_command"][v] = row
    print(f"main command {v}: ppl {row['ppl']:.3f} ({row['x_dense']}x dense), {row['seconds']}s")
    run.save()


# 3. main table --------------------------------------------------------------------------------------------------
def main_table_section(run: Run) -> None:
    a, out, st, results, ratios = run.a, run.out, run.st, run.results, run.ratios
    crits = ("fisher",) if run.quick else [c for c in a.criteria.split(",") if c]
    for c in crits:
        for r in ratios:
            row = run.attempt(f"{c} {r}", lambda: run.lpt_run(f"r{r}-{c}", ["--ratio", r, "--criterion", c]))
            if row is None:
                continue
            results["rows"].setdefault(str(r), {})[c] = row
            print(f"ratio {r} {c}: ppl {row['ppl']:.3f}")
            run.save()
    if not a.no_peer and not run.quick:
        for r in ratios:
            pruned = out / f"r{r}-tp-taylor-pruned"

            def peer_run(r=r, pruned=pruned) -> dict:
                if not pruned.exists():
                    # the same per-layer widths as lpt's fisher row: the attention units its balance search chose
                    fisher = out / f"r{r}-fisher" / "masks.json"
                    chosen = json.loads(fisher.read_text())["info"]["balance"] if fisher.exists() else None
                    heads = ["--heads", str(chosen["attention_units"])] if chosen else []
                    st.sh(pruned.name, [sys.executable, str(ROOT / "benchmarks" / "tp_peer.py"), MODEL,
                                        "--ratio", str(r), "--calib", str(run.calib), "--importance", "taylor",
                                        "--nsamples", str(run.nsamples), *heads, "-o", str(pruned)])
                return run.lpt_run(f"r{r}-tp-taylor", ["--ratio", "0"], model=pruned)

            row = run.attempt(f"Torch-Pruning taylor {r}", peer_run)
            if row is None:
                continue
            peer = json.loads((pruned / "tp_peer.json").read_text())
            row.update({"ratio_blocks": peer["ratio_blocks"], "peer_seconds": st.seconds(pruned.name),
                        "peer_command": st.command(pruned.name)})
            results["rows"].setdefault(str(r), {})["Torch-Pruning taylor + LoRA"] = row
            print(f"ratio {r} torch-pruning taylor: ppl {row['ppl']:.3f}")
            run.save()


# 4. ablations ---------------------------------------------------------------------------------------------------
def ablations_section(run: Run) -> None:
    results, ratios, steps = run.results, run.ratios, run.steps
    r = 0.5 if 0.5 in ratios else ratios[-1]
    main_rows = results["rows"].get(str(r), {})
    cands = {c: main_rows[c]["ppl"] for c in MAIN_CRITERIA if c in main_rows}
    best = min(cands, key=cands.get) if cands else "fisher"
    results["ablation_base"] = {"criterion": best, "ratio": r}
    base = ["--ratio", r, "--criterion", best]
    abl = {
        f"{best} --distill": base + ["--distill"],
        f"{best} --one-shot": base + ["--one-shot"],
        f"{best} --layout per-layer": base + ["--layout", "per-layer"],
        f"{best} --balance proportional": base + ["--balance", "proportional"],
        f"{best} --lr 5e-4": base + ["--lr", "5e-4"],
        "lora --normalize-by projection": ["--ratio", r, "--criterion", "lora", "--normalize-by", "projection"],
        # --distill costs about 1.5x the wall time of a step: the same time spent on more plain steps instead
        f"{best} --max-steps {round(steps * 1.5)}": base + ["--max-steps", round(steps * 1.5)],
    }
    for other in (x for x in ratios if x != r):  # does distillation help at the other ratio too?
        abl[f"{best} --distill @ {other:.0%}"] = ["--ratio", other, "--criterion", best, "--distill"]
    if run.quick:
        abl = dict(list(abl.items())[:1])
    for label, extra in abl.items():
        name = re.sub(r"[^\w.-]+", "_", f"abl-r{r}-" + label.replace(" --", "-").replace(" ", "_"))
        row = run.attempt(label, lambda: run.lpt_run(name, extra))
        if row is None:
            continue
        row["ratio"] = float(extra[extra.index("--ratio") + 1])
        results["ablations"][label] = row
        print(f"ablation {label}: ppl {results['ablations'][label]['ppl']:.3f}")
        run.save()


# 5. reconstruction ----------------------------------------------------------------------------------------------
def reconstruct_section(run: Run) -> None:
    a, out, st, results, calib = run.a, run.out, run.st, run.results, run.calib
    c = "fisher"

    def sliced_eval(name: str, extra: list, keep: bool = False) -> dict:
        d = out / name
        if not (out / f"{name}.eval.json").exists() and not (d / "config.json").exists():
            st.sh(name, lpt("slice", MODEL, *extra, "--reconstruct", calib, "--dtype", "float32", "-o", d,
                            "--overwrite"))
        row = run.evaluate(name, d, [])
        row.update({"seconds": st.seconds(name), "command": st.command(name)})
        if not keep and d.exists():
            shutil.rmtree(d)  # a full-precision copy of the model per row
        return row

    for r in run.ratios:
        rec = results["reconstruct"].setdefault(str(r), {})
        crit_masks = out / f"crit-{c}-r{r}" / "masks.json"
        joint = out / f"r{r}-{c}"
        for mode in a.reconstruct_modes.split(","):
            if crit_masks.exists():
                row = run.attempt(f"reconstruct criterion only {r} {mode}", lambda: sliced_eval(
                    f"rec-crit-{c}-r{r}-{mode}", ["--masks", crit_masks, "--reconstruct-mode", mode]))
                if row is not None:
                    rec[f"{c} criterion only + reconstruct {mode}"] = row
                    print(f"reconstruct {r} criterion only {mode}: ppl {row['ppl']:.3f}")
            if (joint / "masks.json").exists():
                row = run.attempt(f"reconstruct joint {r} {mode}", lambda: sliced_eval(
                    f"rec-{c}-r{r}-{mode}", ["--masks", joint / "masks.json", "--adapter", joint, "--merge",
                                             "--reconstruct-mode", mode]))
                if row is not None:
                    rec[f"{c} joint + reconstruct {mode}"] = row
                    print(f"reconstruct {r} joint {mode}: ppl {row['ppl']:.3f}")
            run.save()
        if crit_masks.exists():
            def pipeline(r=r, crit_masks=crit_masks) -> dict:
                sliced = out / f"rec-crit-{c}-r{r}-sequential-model"
                if not (sliced / "config.json").exists():
                    st.sh(sliced.name, lpt("slice", MODEL, "--masks", crit_masks, "--reconstruct", calib,
                                           "--dtype", "float32", "-o", sliced, "--overwrite"))
                row = run.lpt_run(f"rec-pipeline-{c}-r{r}", ["--ratio", "0"], model=sliced)
                row["slice_seconds"] = st.seconds(sliced.name)
                row["ratio_blocks"] = json.loads(crit_masks.read_text())["ratio"]["blocks"]  # of the dense model
                return row

            row = run.attempt(f"reconstruct pipeline {r}", pipeline)
            if row is not None:
                rec[f"{c} once -> reconstruct sequential -> LoRA"] = row
                print(f"reconstruct {r} pipeline: ppl {row['ppl']:.3f}")
            run.save()


def main(argv: list[str] | None = None) -> None:
    run = Run(parse_args(argv))
    sections, results = run.sections, run.results
    results["dense_ppl"] = run.evaluate("dense", MODEL, [])["ppl"]
    print(f"dense ppl {results['dense_ppl']:.3f}")
    run.save()
    if "criterion" in sections:
        criterion_section(run)
    variants = [v for v in run.a.main_command_variants.split(",") if v]
    if "main-command" in sections and variants:
        main_command_section(run, variants[0])
    if "main" in sections:
        main_table_section(run)
    if "main-command" in sections and not run.quick:
        for v in variants[1:]:
            main_command_section(run, v)
    if "ablations" in sections:
        ablations_section(run)
    if "reconstruct" in sections:
        reconstruct_section(run)
    run.save()
    print(markdown(results))


# ------------------------------------------------------------------------------------------------ reports
def _mins(s) -> str:
    return f"{s / 60:.1f}" if s is not None else "?"


def markdown(res: dict) -> str:
    p = res["protocol"]
    lines = [f"Model {p['model']}; {p['corpus']}; {p['calibration_blocks']} calibration blocks x {p['seq_len']} "
             f"tokens; every training run: {p['steps']} steps of batch {p['batch_size']} ({p['training_tokens']:,} "
             f"tokens), lr {p['lr']}, prune-freq {p['prune_freq']}, seed 0; {p['eval']}. "
             f"Dense perplexity {res['dense_ppl']:.2f}.", ""]
    co, cp = res.get("criterion_only") or {}, res.get("criterion_only_proportional") or {}
    if co:
        ratios = list(co)

        def cell(table: dict, r: str, c: str) -> str:
            row = table.get(r, {}).get(c)
            if not row:
                return "–"
            b = row.get("balance") or {}
            return f"{row['ppl']:.2f}" + (f" ({b['attention_units']})" if "attention_units" in b else "")

        lines += [f"Criterion only (no fine-tuning: the unpruned model scored once over the first "
                  f"{p.get('criterion_only_scoring_blocks')} calibration blocks with `lpt.importance.score`, LoRA "
                  f"injected with B = 0; the weakest groups of every layer masked; `lpt eval --masks`, no adapter; "
                  f"scoring took {_mins(res.get('criterion_only_scoring_seconds'))} min for all criteria). Two "
                  "balances between attention and MLP, as `lpt prune --balance`: search (the candidate with the "
                  "lowest loss on the scoring blocks) and proportional (lpt 0.2's); in brackets the key/value groups "
                  "pruned per layer:", "",
                  "| criterion | " + " | ".join(f"ppl @ {float(r):.0%} search | ppl @ {float(r):.0%} proportional"
                                               for r in ratios) + " |",
                  "|---|" + "---|---|" * len(ratios)]
        for c in dict.fromkeys(c for r in ratios for c in co[r]):
            lines.append(f"| {c} | " + " | ".join(f"{cell(co, r, c)} | {cell(cp, r, c)}" for r in ratios) + " |")
        lines.append("")
    bal = res.get("balance") or {}
    if any(bal.values()):
        lines += ["The balance search seen from the held-out text (fisher, criterion only): every candidate's loss "
                  "on the scoring blocks, which the search minimises, and its held-out perplexity:", "",
                  "| ratio | key/value groups pruned per layer | MLP channels pruned per layer | calibration loss | "
                  "held-out ppl |", "|---|---|---|---|---|"]
        for r, rows in bal.items():
            low = min((row["loss"] for row in rows), default=None)
            for row in rows:
                mark = " (chosen)" if row["loss"] == low else ""
                lines.append(f"| {float(r):.0%} | {row['attention_units']}{mark} | {row['mlp_channels']} | "
                             f"{row['loss']:.4f} | {row['ppl']:.2f} |")
        lines.append("")
    if res.get("mask_agreement"):
        lines += ["Overlap with vanilla's pruned groups (criterion only, proportional balance so that the counts are "
                  "equal; share of the groups vanilla prunes that the criterion prunes too):", "", "| criterion | ratio | attention (kv groups) | MLP channels |",
                  "|---|---|---|---|"]
        for c, per in res["mask_agreement"].items():
            for r, v in per.items():
                lines.append(f"| {c} | {float(r):.0%} | {v['attention (kv groups)']} | {v['mlp channels']} |")
        lines.append("")
    rows = res.get("rows") or {}
    if rows:
        ratios = list(rows)
        lines += ["Main table (pruning with joint LoRA fine-tuning, the same budget for every row; Torch-Pruning "
                  "prunes once, then `lpt prune PRUNED --ratio 0` fine-tunes LoRA with the same budget):", "",
                  "| method | " + " | ".join(f"ppl @ {float(r):.0%} (achieved; kv groups pruned; prune min)"
                                            for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        for n in dict.fromkeys(n for r in ratios for n in rows[r]):
            cells = []
            for r in ratios:
                row = rows[r].get(n)
                t = (row.get("seconds") or 0) + (row.get("peer_seconds") or 0) if row else 0
                b = (row or {}).get("balance") or {}
                kv = f"{b['attention_units']}; " if "attention_units" in b else ""
                cells.append(f"{row['ppl']:.2f} ({row['ratio_blocks']:.1%}; {kv}{_mins(t)})" if row else "–")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    if res.get("ablations"):
        b = res.get("ablation_base", {})
        lines += [f"Ablations at {b.get('ratio', 0.5):.0%} (base: the main table's best lpt row, "
                  f"`--criterion {b.get('criterion')}`; the normalisation scope on lora, because for fisher "
                  "`--normalize-by group` and `projection` are the same thing):", "",
                  "| setting | ppl | reference row | achieved | min |", "|---|---|---|---|---|"]
        for n, row in res["ablations"].items():
            ref = rows.get(str(row.get("ratio", b.get("ratio"))), {})
            refname = "lora" if n.startswith("lora") else b.get("criterion")
            refppl = f"{ref[refname]['ppl']:.2f} ({refname})" if refname in ref else "–"
            lines.append(f"| {n} | {row['ppl']:.2f} | {refppl} | {row['ratio_blocks']:.1%} | {_mins(row.get('seconds'))} |")
        lines.append("")
    rec = res.get("reconstruct") or {}
    if any(rec.values()):
        ratios = [r for r in rec if rec[r]]
        lines += ["Reconstruction (beyond the paper; `lpt slice --reconstruct CALIB` on the calibration blocks, "
                  "damping 0.01; the last row prunes once with fisher's criterion-only masks, reconstructs, then "
                  "fine-tunes LoRA with the main table's budget on the sliced model, `lpt prune SLICED --ratio 0`):",
                  "", "| rows | " + " | ".join(f"ppl @ {float(r):.0%}" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        for n in dict.fromkeys(n for r in ratios for n in rec[r]):
            lines.append(f"| {n} | " + " | ".join(f"{rec[r][n]['ppl']:.2f}" if n in rec[r] else "–"
                                                  for r in ratios) + " |")
        lines.append("")
    mc = res.get("main_command") or {}
    if any(v != "dense" for v in mc):
        d = mc.get("dense", {})
        lines += [f"Main-command candidate (20%, fisher, builtin:pydoc:train; perplexity on builtin:pydoc:test at "
                  f"seq-len 2048, all segments; dense {d.get('ppl', float('nan')):.2f}; wall time on a shared "
                  "2-core machine):", "", "| variant | ppl | x dense | prune min | eval min | command |",
                  "|---|---|---|---|---|---|"]
        for v, row in mc.items():
            if v == "dense":
                continue
            lines.append(f"| {v} | {row['ppl']:.2f} | {row['x_dense']} | {_mins(row.get('seconds'))} | "
                         f"{_mins(row.get('eval_seconds'))} | `{row.get('command')}` |")
        lines.append("")
    if res.get("unfinished"):
        lines += ["Not finished (stopped at the time limit; the study is resumable): " + ", ".join(res["unfinished"])
                  + ".", ""]
    lines += [f"Wall time of all recorded stages together {res.get('stages_wall_time_s', 0) / 60:.1f} min on a shared "
              "2-core CPU machine (several stages ran side by side); per-run commands and times in results.json."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[float, float]]] = {}
    for r, rows in (res.get("rows") or {}).items():
        for n, row in rows.items():
            series.setdefault(n, []).append((row["ratio_blocks"], row["ppl"]))
    for r, rows in (res.get("criterion_only") or {}).items():
        for n, row in rows.items():
            series.setdefault(f"{n} (criterion only)", []).append((row["ratio_blocks"], row["ppl"]))
    for n, pts in series.items():
        pts.sort()
        ax.plot([x * 100 for x, _ in pts], [y for _, y in pts], marker="o",
                linestyle="--" if "criterion only" in n else "-", label=n)
    for r, rows in (res.get("reconstruct") or {}).items():
        for n, row in rows.items():
            if "sequential" in n:
                series.setdefault(n, []).append((float(r), row["ppl"]))
    for n, pts in list(series.items()):
        if "reconstruct" in n:
            pts.sort()
            ax.plot([x * 100 for x, _ in pts], [y for _, y in pts], marker="s", linestyle=":", label=n)
    for n, row in (res.get("ablations") or {}).items():
        ax.plot([row["ratio_blocks"] * 100], [row["ppl"]], marker="x", linestyle="none", label=n)
    ax.axhline(res["dense_ppl"], color="black", linewidth=1, label=f"dense ({res['dense_ppl']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("transformer-block linear parameters removed (%)")
    ax.set_ylabel("perplexity (held-out, log scale)")
    ax.set_title(f"{res['protocol']['model']}: {res['protocol']['training_tokens']:,} training tokens per run")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
