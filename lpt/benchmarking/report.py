"""Rich tables of bench results (what the terminal shows; the JSON holds everything)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def show(console: Console, table: Table) -> None:
    """Print ``table``; when the console is not a terminal (a log file, a pipe), do not squeeze it to 80 columns."""
    if console.is_terminal:
        console.print(table)
    else:
        Console(file=console.file, width=200, highlight=False).print(table)


def gib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def pct(r: float | None, first: bool) -> str:
    if first:
        return "ref"
    if r is None:
        return "-"
    return f"{(r - 1.0) * 100:+.1f}%"


def human(n: int | float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def seconds(s: float) -> str:
    return f"{s:.4f}" if s < 10 else f"{s:.2f}"


def runtime_table(doc: dict[str, Any]) -> Table:
    p = doc["protocol"]
    info = {m["label"]: m for m in doc["models"]}
    decode = any(r["decode"] for r in doc["results"])
    t = Table(title=f"lpt bench runtime: forward over {p['seq_len']} tokens on {doc['hardware']['device_name']} "
                    f"({p['dtype']}, median of {p['trials']} after {p['warmup']} warm-up)")
    for col in ("model", "batch", "median s", "min-max s", "tokens/s", "Δ latency", "peak memory", "Δ memory",
                "params", "FLOPs/token", "Δ FLOPs"):
        t.add_column(col, justify="left" if col == "model" else "right")
    if decode:
        t.add_column("decode tok/s", justify="right")
    firsts = set()
    for r in doc["results"]:
        first = r["batch_size"] not in firsts
        firsts.add(r["batch_size"])
        m = info[r["label"]]
        name = escape(r["label"]) + (" *" if m["random_weights"] else "")
        lat, rel = r["latency_s"], r["relative"]
        row = [name, str(r["batch_size"]), seconds(lat["median"]), f"{seconds(lat['min'])}-{seconds(lat['max'])}",
               f"{r['tokens_per_s']:.1f}", pct(rel["latency"], first), gib(r["peak_memory_bytes"]),
               pct(rel["peak_memory"], first), human(r["params"]), human(r["flops_per_token"]["total"]),
               pct(rel["flops_per_token"], first)]
        if decode:
            row.append(f"{r['decode']['tokens_per_s']:.1f}" if r["decode"] else "-")
        t.add_row(*row)
    if doc["random_weights"]:
        t.caption = "* random weights: real shapes, so latency and memory are real; outputs are meaningless"
    return t


def prune_step_table(doc: dict[str, Any]) -> Table:
    p = doc["protocol"]
    m = doc["model"]
    name = escape(m["label"]) + (" (random weights)" if m["random_weights"] else "")
    t = Table(title=f"lpt bench prune-step: {name}, batch {p['batch_size']} (micro-batch {p['micro_batch_size']}) x "
                    f"{p['seq_len']} tokens on {doc['hardware']['device_name']} ({p['dtype']}, median of "
                    f"{p['trials']} steps after {p['warmup']} warm-up)")
    for col in ("configuration", "s / step", "min-max s", "Δ time", "peak memory", "Δ memory", "trainable",
                "with gradient"):
        t.add_column(col, justify="left" if col == "configuration" else "right")
    for i, r in enumerate(doc["results"]):
        s, rel = r["seconds_per_step"], r["relative"]
        t.add_row(escape(r["label"]), seconds(s["median"]), f"{seconds(s['min'])}-{seconds(s['max'])}",
                  pct(rel["seconds_per_step"], i == 0), gib(r["peak_memory_bytes"]), pct(rel["peak_memory"], i == 0),
                  human(r["trainable_params"]), human(r["gradient_params"]))
    if doc["skipped"]:
        t.caption = escape("; ".join(f"skipped {s['label']}: {s['reason']}" for s in doc["skipped"]))
    return t
