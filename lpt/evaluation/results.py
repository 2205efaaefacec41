"""The results file of ``lpt eval`` (schema below) and the side-by-side comparison of several of them.

No torch here: ``lpt eval --compare`` only reads JSON.

Layout (``schema_version`` 1; fractions in [0, 1] for task scores, as lm-eval reports them)::

    {
      "schema_version": 1, "kind": "lpt-eval", "label": "dense",
      "model":   {"name", "path", "dtype", "device", "params", "effective_params", "tokenizer_fingerprint", ...},
      "adapter": {"path", "r", "lora_alpha", "target_modules"} | null,
      "masks":   {"path", "layout", "gqa", "ratio_blocks", "blocks_before", "blocks_after"} | null,
      "protocol": {"perplexity": {...}, "tasks": {...}},
      "perplexity": {SOURCE: {"ppl", "nll", "tokens", "segments", "seq_len", "text_tokens", "dropped_tokens",
                              "source": {...}, "wall_time_s"}},
      "tasks": {TASK: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "metric", "score", "num_fewshot",
                       "samples", "version"}},
      "averages": {"paper_7task": float | null, "mean_score": float | null},
      "versions": {"lpt", "torch", "transformers", "lm_eval", ...},
      "date": ISO-8601 UTC, "wall_time_s": float
    }
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence, TypedDict

from lpt import artifacts
from lpt.errors import LptError

KIND = "lpt-eval"


class PerplexityResult(TypedDict):
    ppl: float  # exp(nll)
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens = segments * (seq_len - 1)
    segments: int
    seq_len: int
    text_tokens: Optional[int]  # tokens in the whole text (None: a segment cap stopped reading before its end)
    dropped_tokens: Optional[int]  # incomplete tail (and segments beyond a cap) not evaluated (None: as text_tokens)
    source: dict[str, Any]  # where the text came from (hub coordinates, local file, builtin)
    wall_time_s: float


class TaskResult(TypedDict, total=False):
    acc: Optional[float]
    acc_stderr: Optional[float]
    acc_norm: Optional[float]  # lm-eval's length-normalised accuracy (None when the task has none)
    acc_norm_stderr: Optional[float]
    metric: str  # which metric ``score`` is (the paper's choice for its seven tasks)
    score: Optional[float]
    num_fewshot: Optional[int]
    samples: Optional[int]
    version: Any
    subtasks: int  # groups (e.g. mmlu): number of leaf tasks averaged by lm-eval
    other_metrics: dict[str, float]


class Results(TypedDict):
    schema_version: int
    kind: str
    label: str
    model: dict[str, Any]
    adapter: Optional[dict[str, Any]]
    masks: Optional[dict[str, Any]]
    protocol: dict[str, Any]
    perplexity: dict[str, PerplexityResult]
    tasks: dict[str, TaskResult]
    averages: dict[str, Optional[float]]
    versions: dict[str, str]
    date: str
    wall_time_s: float


NUMBER = (float, type(None))
PPL_TYPES = {"ppl": NUMBER, "nll": NUMBER, "tokens": int, "segments": int, "seq_len": int,
             "text_tokens": (int, type(None)), "dropped_tokens": (int, type(None)), "source": dict}
TASK_TYPES = {"acc": NUMBER, "acc_norm": NUMBER, "acc_stderr": NUMBER, "acc_norm_stderr": NUMBER, "score": NUMBER,
              "metric": str, "num_fewshot": (int, type(None)), "samples": (int, type(None))}


def load(path: str | Path) -> Results:
    """A results file, its fields of the types the tables read (what is not is one line naming the file)."""
    doc = artifacts.read_object(path, "lpt eval results file")
    if doc.get("kind") != KIND:
        raise LptError(f"{path} is not an lpt eval results file")
    if doc.get("schema_version") != artifacts.RESULTS_SCHEMA:
        raise LptError(f"{path}: unsupported results schema_version {doc.get('schema_version')} "
                       f"(this lpt reads {artifacts.RESULTS_SCHEMA})")
    artifacts.check_types(doc, path, {"label": (str, type(None)), "model": (dict, type(None)), "perplexity": dict,
                                      "tasks": dict, "averages": (dict, type(None)), "protocol": dict})
    artifacts.check_types(doc.get("model") or {}, path, {"effective_params": (int, type(None)),
                                                         "tokenizer_fingerprint": (str, type(None))}, "model.")
    artifacts.check_types(doc.get("averages") or {}, path, {"paper_7task": NUMBER}, "averages.")
    for part, types in (("perplexity", PPL_TYPES), ("tasks", TASK_TYPES)):
        for name, entry in doc.get(part, {}).items():
            if not isinstance(entry, dict):
                raise LptError(f"{path}: '{part}.{name}' must be an object, not {artifacts.json_type(entry)}")
            artifacts.check_types(entry, path, types, f"{part}.{name}.")
    return doc  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- formatting
def fmt_ppl(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    return "inf" if math.isinf(v) else (f"{v:.2f}" if v < 1e4 else f"{v:.3g}")


def fmt_pct(v: Any) -> str:
    return "-" if v is None else f"{100.0 * float(v):.2f}"


def fmt_params(v: Any) -> str:
    return "-" if not v else f"{float(v) / 1e6:.1f}M"


def short_source(source: str) -> str:
    """A file path as its name (tables stay narrow); dataset names and builtin sources unchanged."""
    return Path(source).name if ("/" in source or "\\" in source) and Path(source).suffix else source


def table_rows(docs: Sequence[Results]) -> list[tuple[str, list[str]]]:
    """(row name, one cell per results file): parameters, perplexities, task scores (percent), averages."""
    rows: list[tuple[str, list[str]]] = [
        ("params (effective)", [fmt_params((d.get("model") or {}).get("effective_params")) for d in docs]),
    ]
    sources: list[str] = []
    tasks: list[str] = []
    for d in docs:
        sources += [s for s in d.get("perplexity", {}) if s not in sources]
        tasks += [t for t in d.get("tasks", {}) if t not in tasks]
    for s in sources:
        lens = {d["perplexity"][s]["seq_len"] for d in docs if s in d.get("perplexity", {})}
        suffix = f" @{lens.pop()}" if len(lens) == 1 else " @mixed seq-len"
        cells = [fmt_ppl(d.get("perplexity", {}).get(s, {}).get("ppl")) for d in docs]
        rows.append((f"ppl {short_source(s)}{suffix}", cells))
    for t in tasks:
        metrics = {d["tasks"][t].get("metric") for d in docs if t in d.get("tasks", {})}
        shots = {d["tasks"][t].get("num_fewshot") for d in docs if t in d.get("tasks", {})}
        label = f"{t} ({'/'.join(sorted(m for m in metrics if m))}"
        label += f", {shots.pop()}-shot)" if len(shots) == 1 and None not in shots and 0 not in shots else ")"
        rows.append((label, [fmt_pct(d.get("tasks", {}).get(t, {}).get("score")) for d in docs]))
    if any((d.get("averages") or {}).get("paper_7task") is not None for d in docs):
        rows.append(("7-task average", [fmt_pct((d.get("averages") or {}).get("paper_7task")) for d in docs]))
    return rows


def labels(docs: Sequence[Results], paths: Sequence[str | Path] | None = None) -> list[str]:
    """Column names: each file's label; file names where labels repeat (and numbers if those repeat too)."""
    out = [d.get("label") or (Path(paths[i]).stem if paths else f"#{i + 1}") for i, d in enumerate(docs)]
    if paths and len(set(out)) < len(out):
        out = [Path(p).stem if out.count(lab) > 1 else lab for p, lab in zip(paths, out)]
    seen: list[str] = []
    for i, lab in enumerate(out):
        seen.append(lab if lab not in seen else f"{lab} ({i + 1})")
    return seen


def rich_table(docs: Sequence[Results], paths: Sequence[str | Path] | None = None, title: str | None = None):
    """The comparison as a rich table: numbers never wrap nor shrink (only the metric names wrap); print it with
    :func:`print_table` so that a table wider than the terminal is not cut either."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("metric", overflow="fold")
    for lab in labels(docs, paths):
        table.add_column(lab, justify="right", no_wrap=True)
    for name, cells in table_rows(docs):
        table.add_row(name, *cells)
    return table


def print_table(console, table) -> None:
    """Print ``table`` on ``console`` at least as wide as its unwrappable cells need (wider than the terminal if
    need be: lines then run on, but no number is cut to ``4.6…``)."""
    from rich.measure import Measurement

    need = Measurement.get(console, console.options.update_width(1 << 16), table).minimum
    width = console.width
    console.width = max(width, need)
    try:
        console.print(table, crop=False)
    finally:
        console.width = width


def markdown_table(docs: Sequence[Results], paths: Sequence[str | Path] | None = None,
                   extra: Sequence[tuple[str, list[str]]] = ()) -> str:
    """The comparison as Markdown; ``extra`` rows (e.g. the run report's file sizes, latency) go after the
    results rows."""
    return markdown_rows(["metric", *labels(docs, paths)], [*table_rows(docs), *extra])


def markdown_rows(head: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]], numeric: bool = True) -> str:
    """A Markdown table: the first column left-aligned (names), the others right-aligned (numbers) unless not
    ``numeric``."""
    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, head)) + " |", "|" + "|".join(["---"] + ["---:" if numeric else "---"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in [name, *cells]) + " |" for name, cells in rows]
    return "\n".join(lines) + "\n"


def html_rows(head: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]], numeric: bool = True) -> str:
    """The same table as HTML (cells escaped; numbers right-aligned unless not ``numeric``)."""
    from html import escape

    num = " class=num" if numeric else ""

    out = ["<table>", "<thead><tr>" + "".join(
        f'<th{"" if i == 0 else num}>{escape(str(h))}</th>' for i, h in enumerate(head)) + "</tr></thead>",
        "<tbody>"]
    for name, cells in rows:
        out.append("<tr><td>" + escape(str(name)) + "</td>"
                   + "".join(f"<td{num}>{escape(str(c))}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out) + "\n"


def protocol_notes(docs: Sequence[Results]) -> list[str]:
    """Warnings when the files were not measured the same way (the numbers would not be comparable)."""
    notes = []
    sources = {s for d in docs for s in d.get("perplexity", {})}
    for s in sorted(sources):
        got = {(r["seq_len"], r["segments"]) for d in docs if (r := d.get("perplexity", {}).get(s))}
        if len(got) > 1:
            notes.append(f"ppl {s}: files differ in seq-len / segments ({', '.join(f'{a}x{b}' for b, a in got)})")
    fps = {(d.get("model") or {}).get("tokenizer_fingerprint") for d in docs} - {None}
    if len(fps) > 1:
        notes.append(f"the files were measured with {len(fps)} different tokenizers (vocabulary fingerprints "
                     f"{', '.join(sorted(fps))}): perplexities are per token of different tokenizations and not "
                     f"directly comparable")
    tasks = {t for d in docs for t in d.get("tasks", {})}
    for t in sorted(tasks):
        got = {(r.get("num_fewshot"), r.get("samples")) for d in docs if (r := d.get("tasks", {}).get(t))}
        if len(got) > 1:
            notes.append(f"{t}: files differ in shots / samples {sorted(got, key=str)}")
    return notes
