"""The report of an ``lpt run``: ``RUN_DIR/report.md`` and the same as one self-contained ``RUN_DIR/report.html``.

What was run (command, lpt version, model, recipe, wall time per stage), the dense and the pruned model side by
side (the table of ``lpt eval --compare``, ``lpt.evaluation.results``, plus file sizes compared in the same format
and type -- :func:`file_sizes` -- and the bench latency), the
masks per layer and the training curve as PNGs (``RUN_DIR/report/``, embedded in the HTML as base64), and each
stage's settings that differ from its defaults. Everything is read from the files the stages wrote: a report can be
written again from a run directory alone (:func:`write`). The pictures need matplotlib (``pip install
'lpt[report]'``); without it the report says so and keeps its tables. No torch here.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any, Sequence

from lpt import artifacts
from lpt.artifacts import MASKS_PNG, REPORT_HTML, REPORT_MD, TRAINING_PNG
from lpt.artifacts import REPORT_PICTURES as PICTURES
from lpt.config import STAGE_CONFIGS
from lpt.errors import LptError
from lpt.evaluation import results as R
from lpt.pipeline import RUN_DIR_MARK

KEPT, PRUNED = "#3B6FB6", "#E6E6E6"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")

Block = tuple  # ("h1" | "h2" | "p" | "note", text), ("table", head, rows), ("img", relpath, alt), ("code", text)


# ------------------------------------------------------------------------------------------------ reading
def _out(run_dir: Path, state: dict[str, Any], step: str) -> Path | None:
    rec = state.get("steps", {}).get(step)
    if not rec or rec.get("status") != "done" or rec.get("in_plan") is False:
        return None
    p = Path(rec["output"])
    return p if p.exists() else None


def _json(path: Path | None) -> Any:
    if path is None or not path.is_file():
        return None
    try:
        return artifacts.read_json(path)
    except LptError:
        return None


def disk_size(path: str | Path | None) -> int | None:
    """Bytes of a model on disk: a file, or the weight files of a directory (None when not a local path)."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES) or None
    return None


def _dense_file(model: str, dense_doc: dict | None) -> Path | None:
    info = (dense_doc or {}).get("model") or {}
    if info.get("path"):
        p = Path(info["path"]) / info["gguf_file"] if info.get("gguf_file") else Path(info["path"])
        if p.exists():
            return p
    try:
        from lpt.models import resolve

        ref = resolve(model)
    except LptError:
        return None
    p = Path(ref.path) / ref.gguf_file if ref.gguf_file else Path(ref.path)
    return p if p.exists() else None


def fmt_bytes(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ pictures
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_masks(masks: dict[str, Any], path: Path) -> Path | None:
    """Kept (blue) and pruned (grey) query heads and MLP channels, one row per layer; a removed block is a grey row
    marked on the layer axis, and removed hidden (residual) channels a strip under the two panels."""
    plt = _pyplot()
    if plt is None:
        return None
    import numpy as np
    from matplotlib.colors import ListedColormap

    n_layers, heads = int(masks["num_hidden_layers"]), int(masks["num_attention_heads"])
    kv, width = int(masks["num_key_value_heads"]), int(masks["intermediate_size"])
    removed = {int(i) for i in masks.get("removed_layers") or []}
    hidden_kept = masks.get("hidden_channels")
    hidden = int(masks.get("hidden_size") or 0)
    by_layer = {int(lay["layer"]): lay for lay in masks["layers"]}
    H = np.zeros((n_layers, heads))
    C = np.zeros((n_layers, width))
    for i in range(n_layers):
        lay = by_layer.get(i)
        if i in removed:  # the whole block goes: nothing of it is kept
            continue
        if lay is None:  # not recorded: not pruned
            H[i], C[i] = 1, 1
            continue
        H[i, lay["attention_heads"]] = 1
        C[i, lay["mlp_channels"]] = 1
    live = [i for i in range(n_layers) if i not in removed] or [0]
    kept_h, kept_c = H[live].sum(1).astype(int), C[live].sum(1).astype(int)
    cmap = ListedColormap([PRUNED, KEPT])
    height = min(12.0, 1.6 + 0.17 * n_layers) + (0.8 if hidden_kept is not None else 0.0)
    fig = plt.figure(figsize=(11, height))
    rows = (2, [max(1.0, 0.17 * n_layers), 0.35]) if hidden_kept is not None else (1, [1.0])
    grid = fig.add_gridspec(rows[0], 2, width_ratios=[1, 4], height_ratios=rows[1])
    ax1, ax2 = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    for ax, M in ((ax1, H), (ax2, C)):
        ax.imshow(M, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_ylabel("layer")
        step = max(1, math.ceil(n_layers / 16))
        ticks = sorted(set(range(0, n_layers, step)) | removed)
        ax.set_yticks(ticks)
        ax.set_yticklabels([f"{i} removed" if i in removed else str(i) for i in ticks])
        for t, i in zip(ax.get_yticklabels(), ticks):
            if i in removed:
                t.set_color("#b22222")
        ax.tick_params(labelsize=8)
    group = heads // max(kv, 1)
    for g in range(1, kv):  # key/value groups: the query heads that share a key/value head
        ax1.axvline(g * group - 0.5, color="white", linewidth=2)
    ax1.set_xticks(range(heads))
    ax1.set_xticklabels([str(h) if heads <= 16 or h % 4 == 0 else "" for h in range(heads)])
    ax1.set_xlabel(f"query head ({kv} key/value groups)" if kv < heads else "head")

    def span(v):
        return f"{v.min()}" if v.min() == v.max() else f"{v.min()}–{v.max()}"

    ax1.set_title(f"attention: {span(kept_h)} of {heads} heads kept", fontsize=10)
    ax2.set_xlabel("MLP channel")
    ax2.set_title(f"MLP: {span(kept_c)} of {width} channels kept per layer", fontsize=10)
    if kept_c.min() != kept_c.max() or kept_h.min() != kept_h.max():  # per-layer widths: the counts on the right
        for i in live:
            ax2.annotate(f"{int(H[i].sum())}h {int(C[i].sum())}c", (1.005, 1 - (i + 0.5) / n_layers),
                         xycoords="axes fraction", fontsize=6, va="center")
    if hidden_kept is not None and hidden:
        ax3 = fig.add_subplot(grid[1, :])
        strip = np.zeros((1, hidden))
        strip[0, [int(c) for c in hidden_kept]] = 1
        ax3.imshow(strip, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax3.set_yticks([])
        ax3.set_xlabel("hidden (residual) channel", fontsize=9)
        ax3.set_title(f"hidden size: {len(hidden_kept)} of {hidden} channels kept (every block, the embedding and "
                      "the norms)", fontsize=10)
        ax3.tick_params(labelsize=8)
    title = "masks per layer (blue: kept, grey: pruned)"
    if removed:
        title += f"; {len(removed)} of {n_layers} blocks removed"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training(log: list[dict[str, Any]], path: Path) -> Path | None:
    """Loss, and sparsity against its schedule's target, per optimiser step."""
    plt = _pyplot()
    if plt is None or not log:
        return None
    from matplotlib.ticker import MaxNLocator

    steps = [r["step"] for r in log]
    loss = [r["loss"] for r in log]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ax1.plot(steps, loss, color=KEPT, marker="o" if len(log) <= 60 else None, markersize=3, linewidth=1,
             label="loss (each step's batch)")
    if len(log) >= 10:  # one batch per step: the trend is easier to read averaged
        w = max(3, len(log) // 10)
        mean = [sum(loss[max(0, i - w + 1):i + 1]) / len(loss[max(0, i - w + 1):i + 1]) for i in range(len(loss))]
        ax1.plot(steps, mean, color="#1B2F55", linewidth=2, label=f"mean of the last {w} steps")
        ax1.legend(fontsize=8, loc="upper right")
    ax1.set_ylabel("training loss")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_title("lpt prune: loss and sparsity per step", fontsize=11)
    ax1.grid(alpha=0.3)
    if all("target_sparsity" in r for r in log):
        ax2.plot(steps, [100 * r["target_sparsity"] for r in log], color="#888888", linestyle="--", linewidth=1.2,
                 label="schedule target", zorder=3)
    ax2.plot(steps, [100 * r["sparsity"] for r in log], color="#C44E52", linewidth=2.2, label="sparsity (masked)",
             zorder=2)
    ax2.set_ylabel("% of block params")
    ax2.set_xlabel("optimiser step")
    ax2.set_ylim(bottom=0)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ content
def _non_defaults(stage: str, config: dict[str, Any]) -> str:
    cls = STAGE_CONFIGS.get(stage)
    if cls is None:
        return ""
    defaults = {}
    for f in dataclasses.fields(cls):
        defaults[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
    keep = [f"{k}={v}" for k, v in config.items()
            if k not in ("overwrite", "resume") and k in defaults and v != defaults[k]]
    return ", ".join(keep)


def _bench_rows(bench: dict | None) -> list[tuple[str, list[str]]]:
    if not bench:
        return []
    rows = bench.get("results", [])
    if not rows:
        return []
    b = rows[0]["batch_size"]
    by = {r["label"]: r for r in rows if r["batch_size"] == b}
    p = bench.get("protocol", {})
    cells = [by.get(lab) for lab in ("dense", "pruned")]
    return [
        (f"latency, forward {b} x {p.get('seq_len')} tokens (median)",
         [f"{1000 * r['latency_s']['median']:.1f} ms" if r else "-" for r in cells]),
        ("tokens/s", [f"{r['tokens_per_s']:.0f}" if r else "-" for r in cells]),
        ("peak memory", [fmt_bytes(r["peak_memory_bytes"]) if r else "-" for r in cells]),
    ]


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _gguf_type(path: Path | None) -> str | None:
    if path is None or path.suffix != ".gguf" or not path.is_file():
        return None
    from lpt import gguf_file

    try:
        return gguf_file.file_type(path)
    except LptError:
        return None


def _declared_dtype(model_dir: Path) -> str | None:
    doc = _json(model_dir / "config.json") if model_dir.is_dir() else None
    return str((doc or {}).get("dtype") or (doc or {}).get("torch_dtype") or "") or None


def file_sizes(dense_file: Path | None, slice_dir: Path | None, prov: dict | None, export: Path | None,
               export_note: str | None = None) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """Rows of the dense-vs-pruned table comparing files of the same format and type, and notes: one row per GGUF
    type (the source's and the export's: side by side when they are the same type, on separate rows when not), one
    for safetensors at the pruned model's dtype (a dense size computed from its parameter count when the source is
    not a safetensors directory of that dtype, and labelled so)."""
    rows: list[tuple[str, list[str]]] = []
    notes: list[str] = []
    src_type, exp_type = _gguf_type(dense_file), _gguf_type(export)
    src_size, exp_size = disk_size(dense_file) if src_type else None, disk_size(export) if exp_type else None
    if src_type and exp_type == src_type:
        rows.append((f"GGUF file, {src_type}", [fmt_bytes(src_size), fmt_bytes(exp_size)]))
    else:
        if src_type:
            rows.append((f"GGUF file, {src_type}", [fmt_bytes(src_size), "-"]))
        if exp_type:
            rows.append((f"GGUF file, {exp_type}", ["-", fmt_bytes(exp_size)]))
        if src_type and exp_type:
            notes.append(f"the exported GGUF is {exp_type}, the source {src_type}: not the same type, so their sizes "
                         f"do not compare" + (f" ({export_note})" if export_note else ""))
    if slice_dir is not None:
        dtype = (prov or {}).get("dtype")
        pruned = fmt_bytes(disk_size(slice_dir))
        dense_dir = dense_file if dense_file is not None and dense_file.is_dir() else None
        if dense_dir is not None and dtype and _declared_dtype(dense_dir) == dtype:
            rows.append((f"safetensors, {dtype}", [fmt_bytes(disk_size(dense_dir)), pruned]))
        else:
            before = ((prov or {}).get("params") or {}).get("before")
            known = before and dtype in DTYPE_BYTES
            computed = f"{fmt_bytes(before * DTYPE_BYTES[dtype])} (computed)" if known else "-"
            rows.append((f"safetensors, {dtype or '?'}", [computed, pruned]))
            if computed != "-":
                notes.append(f"the dense safetensors size is computed ({before:,} parameters x {DTYPE_BYTES[dtype]} "
                             f"bytes of {dtype}): the source is not a {dtype} safetensors directory")
        if (prov or {}).get("dtype_reason"):
            notes.append(f"the pruned model's dtype: {prov['dtype_reason']}")
    return rows, notes


def final_artifact(dense_file: Path | None, export: Path | None) -> str | None:
    """One line for the headline: the exported GGUF against the source GGUF, with their types."""
    src_type, exp_type = _gguf_type(dense_file), _gguf_type(export)
    if not exp_type:
        return None
    size = disk_size(export)
    if not src_type:
        return f"final GGUF {export.name} {fmt_bytes(size)} ({exp_type})"
    src = disk_size(dense_file)
    same = (f"both {src_type}, {size / src - 1:+.1%}" if exp_type == src_type
            else f"{exp_type} against the source's {src_type}: not the same type")
    return f"final GGUF {export.name} {fmt_bytes(size)}, source {fmt_bytes(src)} ({same})"


def _headline(docs: list[dict], params: tuple[int, int] | None) -> str:
    parts = []
    if len(docs) == 2:
        for src, r in docs[1].get("perplexity", {}).items():
            d = docs[0].get("perplexity", {}).get(src)
            if d:
                parts.append(f"perplexity on {R.short_source(src)} {R.fmt_ppl(d['ppl'])} -> {R.fmt_ppl(r['ppl'])} "
                             f"({r['ppl'] / d['ppl']:.2f}x dense)")
    if params:
        a, b = params
        parts.append(f"parameters {R.fmt_params(a)} -> {R.fmt_params(b)} ({(b - a) / a:+.1%})")
    return "; ".join(parts)


@dataclass
class RunFiles:
    """What the report reads from a run directory: the steps of the plan and the files they wrote."""

    run_dir: Path
    state: dict[str, Any]
    steps: dict[str, dict[str, Any]]  # step name -> its run.json record (the steps of the last plan)
    order: list[str]  # the steps in the plan's order
    dense: dict | None  # eval-dense's results
    pruned: dict | None  # eval-pruned's results
    prune_dir: Path | None
    slice_dir: Path | None
    masks: dict | None  # prune's masks.json
    provenance: dict | None  # slice's lpt_provenance.json

    @classmethod
    def read(cls, run_dir: Path, state: dict[str, Any]) -> "RunFiles":
        steps = {n: r for n, r in state.get("steps", {}).items() if r.get("in_plan") is not False}
        prune_dir, slice_dir = _out(run_dir, state, "prune"), _out(run_dir, state, "slice")
        return cls(run_dir, state, steps, [n for n in state.get("stages", []) if n in steps],
                   _json(_out(run_dir, state, "eval-dense")), _json(_out(run_dir, state, "eval-pruned")),
                   prune_dir, slice_dir, _json(prune_dir / artifacts.MASKS) if prune_dir else None,
                   _json(slice_dir / artifacts.PROVENANCE) if slice_dir else None)

    @property
    def docs(self) -> list[dict]:
        """The results files of the run (dense first), those that exist."""
        return [d for d in (self.dense, self.pruned) if d]

    @property
    def params(self) -> tuple[int, int] | None:
        """(parameters before, after pruning): from slice's provenance, else from the masks."""
        if self.provenance and self.provenance.get("params"):
            return self.provenance["params"]["before"], self.provenance["params"]["after"]
        if self.masks and self.masks.get("params"):
            return self.masks["params"]["model_before"], self.masks["params"]["model_after"]
        return None


def blocks(run_dir: Path, state: dict[str, Any], pictures: bool = True) -> list[Block]:
    """The report's content, in order (rendered by :func:`markdown` and :func:`html`): a title and headline, what
    was run, dense vs pruned, the masks and the training curve, the settings."""
    run = RunFiles.read(Path(run_dir), state)
    model = state.get("model", "?")
    out: list[Block] = [("h1", f"lpt run: {model}, {Path(str(state.get('recipe') or '')).name}")]
    head = "; ".join(filter(None, [_headline(run.docs, run.params),
                                   final_artifact(_dense_file(model, run.dense), _out(run.run_dir, state, "export"))]))
    if head:
        out.append(("p", head[0].upper() + head[1:] + "."))
    return [*out, *_what_was_run(run), *_dense_vs_pruned(run), *_masks_section(run, pictures),
            *_training_section(run, pictures), *_settings(run)]


def _what_was_run(run: RunFiles) -> list[Block]:
    state, steps = run.state, run.steps
    total = sum(r.get("seconds") or 0 for r in steps.values() if r.get("status") == "done")
    rec = state.get("recipe_sha256")
    out: list[Block] = [("h2", "What was run"), ("table", ["", ""], [
        ("command", [state.get("command") or "-"]),
        ("lpt version", [state.get("lpt_version", "-")]),
        ("model", [state.get("model", "?")]),
        ("recipe", [f"{state.get('recipe')}" + (f" (sha256 {rec})" if rec else "")]),
        ("run directory", [str(run.run_dir)]),
        ("last run", [f"{state.get('started', '-')} to {state.get('finished') or '(running)'}"]),
        ("stage time, all stages", [fmt_seconds(total)]),
    ], False)]
    actions = state.get("last_actions", {})
    rows = []
    for n in run.order:
        r = steps[n]
        action = actions.get(n, r.get("status", ""))
        why = "up to date" if action == "skipped" else r.get("reason", "")
        if r.get("resumed"):
            why += " (wall time: the resumed part)"
        rows.append((n, [action, r.get("status", ""), fmt_seconds(r.get("seconds")),
                         r.get("output", "").replace(str(run.run_dir), RUN_DIR_MARK, 1), why]))
    out.append(("table", ["stage", "this time", "status", "wall time", "output", "why"], rows, False))
    return out


def _dense_vs_pruned(run: RunFiles) -> list[Block]:
    docs, params = run.docs, run.params
    dense_file = _dense_file(run.state.get("model", "?"), run.dense)
    export = _out(run.run_dir, run.state, "export")
    size_rows, size_notes = file_sizes(dense_file, run.slice_dir, run.provenance, export,
                                       (run.steps.get("export") or {}).get("note"))
    extra = [*size_rows, *_bench_rows(_json(_out(run.run_dir, run.state, "bench")))]
    if docs:
        table = [*R.table_rows(docs), *extra]
        cols = R.labels(docs)
    else:
        table = [("params", [R.fmt_params(p) for p in params] if params else ["-", "-"]), *extra]
        cols = ["dense", "pruned"]
    out: list[Block] = [("h2", "Dense vs pruned"), ("table", ["", *cols], table)]
    out += [("note", note) for note in R.protocol_notes(docs)]
    if not docs:
        out.append(("note", "no evaluation in this run (add eval to the run's stages)"))
    out += [("note", note) for note in size_notes]
    return out


NO_PICTURES = ("note", "pictures need matplotlib: pip install 'lpt[report]'")


def _masks_section(run: RunFiles, pictures: bool) -> list[Block]:
    masks = run.masks
    if not masks:
        return []
    info = masks.get("info", {})
    bal = info.get("balance") or {}
    text = (f"{masks.get('layout', '?')} layout, --gqa {masks.get('gqa')}, criterion {info.get('criterion')}; "
            f"{(masks.get('ratio') or {}).get('blocks', 0):.1%} of the block parameters removed "
            f"({(masks.get('ratio') or {}).get('model', 0):.1%} of the model).")
    if bal:
        text += (f" Balance {bal.get('mode')}: {bal.get('attention_units')} attention unit(s) and "
                 f"{bal.get('mlp_channels')} MLP channels pruned per layer.")
    removed, hidden = masks.get("removed_layers") or [], masks.get("hidden_channels")
    if removed:
        text += (f" Depth: {len(removed)} of {masks.get('num_hidden_layers')} blocks removed "
                 f"({', '.join(str(i) for i in removed)}).")
    if hidden is not None:
        text += f" Hidden size: {len(hidden)} of {masks.get('hidden_size')} residual channels kept."
    search = info.get("search") or {}
    if search.get("target") and len(search.get("candidates") or []) > 1:
        t = search["target"]
        text += (f" Search over {', '.join(search.get('axes') or [])} ({len(search['candidates'])} candidates, "
                 f"the lowest loss kept): {t.get('blocks', 0)} block(s), {t.get('hidden_channels', 0)} hidden "
                 f"channel(s), {t.get('attention_units', 0)} attention unit(s) and {t.get('mlp_channels', 0)} MLP "
                 "channels per layer removed.")
    png = plot_masks(masks, run.run_dir / PICTURES / MASKS_PNG) if pictures else None
    return [("h2", "Masks per layer"), ("p", text),
            ("img", f"{PICTURES}/{MASKS_PNG}", "masks per layer") if png else NO_PICTURES]


def _training_section(run: RunFiles, pictures: bool) -> list[Block]:
    log = _log(run.prune_dir / artifacts.TRAIN_LOG) if run.prune_dir else []
    if not log:
        return []
    secs = sum(r.get("seconds", 0) for r in log)
    text = (f"{log[-1]['step']} optimiser steps; loss {log[0]['loss']:.3f} at step {log[0]['step']}, "
            f"{log[-1]['loss']:.3f} at the end; sparsity {log[-1]['sparsity']:.1%}; "
            f"{fmt_seconds(secs)} of steps (from log.jsonl).")
    png = plot_training(log, run.run_dir / PICTURES / TRAINING_PNG) if pictures else None
    return [("h2", "Training"), ("p", text),
            ("img", f"{PICTURES}/{TRAINING_PNG}", "training curve") if png else NO_PICTURES]


def _settings(run: RunFiles) -> list[Block]:
    rows = [(n, [_non_defaults(run.steps[n].get("stage", ""), run.steps[n].get("config", {})) or "(defaults)"])
            for n in run.order]
    return [("h2", "Settings"),
            ("p", "Each stage's settings that differ from its command's defaults (the whole resolved config and "
                  "its hash are in run.json; RUN_DIR is this directory)."),
            ("table", ["stage", "settings"], rows, False)]


# ------------------------------------------------------------------------------------------------ rendering
TEXT = {"h1": ("# {}", "<h1>{}</h1>"), "h2": ("## {}", "<h2>{}</h2>"), "p": ("{}", "<p>{}</p>"),
        "note": ("> {}", "<blockquote>{}</blockquote>")}  # block kind -> (Markdown, HTML)


def markdown(content: Sequence[Block]) -> str:
    def one(b: Block) -> str:
        if b[0] == "table":
            return R.markdown_rows(b[1], b[2], *b[3:])
        if b[0] == "img":
            return f"![{b[2]}]({b[1]})\n"
        return TEXT[b[0]][0].format(b[1]) + "\n"

    return "\n".join(map(one, content))


STYLE = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}table{border-collapse:collapse;margin:.6em 0 1.2em}th,td{border-bottom:1px solid #ddd;
padding:.3em .7em;text-align:left;vertical-align:top}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f4f6f9}blockquote{color:#666;margin:.4em 0;border-left:3px solid #ccc;padding-left:.8em}
img{max-width:100%}h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}"""


def html(content: Sequence[Block], run_dir: Path) -> str:
    """One self-contained HTML page: the pictures inline as base64, no external files."""
    def one(b: Block) -> str:
        if b[0] == "table":
            return R.html_rows(b[1], b[2], *b[3:])
        if b[0] == "img":
            data = base64.b64encode((Path(run_dir) / b[1]).read_bytes()).decode()
            return f"<p><img alt='{escape(b[2])}' src='data:image/png;base64,{data}'></p>"
        return TEXT[b[0]][1].format(escape(b[1]))

    title = next((b[1] for b in content if b[0] == "h1"), "lpt run")
    head = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>")
    return "\n".join([head, *map(one, content), "</body></html>"]) + "\n"


def write(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write RUN_DIR/report.md, RUN_DIR/report.html and the PNGs under RUN_DIR/report/; returns report.md."""
    run_dir = Path(run_dir)
    content = blocks(run_dir, state)
    md = run_dir / REPORT_MD
    with artifacts.atomic_file(md, overwrite=True) as tmp:
        tmp.write_text(markdown(content), encoding="utf-8")
    with artifacts.atomic_file(run_dir / REPORT_HTML, overwrite=True) as tmp:
        tmp.write_text(html(content, run_dir), encoding="utf-8")
    return md
