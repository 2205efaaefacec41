"""PNG plots of bench results (matplotlib, installed with ``pip install 'lpt[bench]'``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lpt.errors import LptError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise LptError("--plot needs matplotlib: pip install 'lpt[bench]' (or pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, labels, values, errors=None, ylabel="", title=""):
    xs = range(len(labels))
    ax.bar(xs, values, yerr=errors, capsize=4, color="#4C72B0")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ups = errors[1] if errors is not None else [0.0] * len(values)
    top = max((v + u for v, u in zip(values, ups)), default=1.0)
    for x, v, u in zip(xs, values, ups):
        ax.annotate(f"{v:.3g}", (x, v + u), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=7)
    ax.set_ylim(0, top * 1.18 if top > 0 else 1.0)


def plot_runtime(doc: dict[str, Any], path: str | Path) -> Path:
    """Latency (median, min-max whiskers) and peak memory per model, one row of panels per batch size."""
    plt = _pyplot()
    batches = doc["protocol"]["batch_sizes"]
    random = {m["label"] for m in doc["models"] if m["random_weights"]}
    fig, axes = plt.subplots(len(batches), 2, figsize=(11, 3.8 * len(batches)), squeeze=False)
    for row, b in zip(axes, batches):
        rows = [r for r in doc["results"] if r["batch_size"] == b]
        labels = [r["label"] + (" *" if r["label"] in random else "") for r in rows]
        med = [r["latency_s"]["median"] for r in rows]
        err = [[m - r["latency_s"]["min"] for m, r in zip(med, rows)],
               [r["latency_s"]["max"] - m for m, r in zip(med, rows)]]
        _bars(row[0], labels, med, err, "seconds", f"forward latency, batch {b} x {doc['protocol']['seq_len']} tokens")
        _bars(row[1], labels, [r["peak_memory_bytes"] / 2**30 for r in rows], None, "GiB", f"peak memory, batch {b}")
    hw = doc["hardware"]
    note = " (* random weights)" if random else ""
    fig.suptitle(f"lpt bench runtime on {hw['device_name']}, {doc['protocol']['dtype']}{note}", fontsize=11)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_prune_step(doc: dict[str, Any], path: str | Path) -> Path:
    """Seconds per optimiser step and peak memory per configuration."""
    plt = _pyplot()
    rows = doc["results"]
    labels = [r["label"] for r in rows]
    med = [r["seconds_per_step"]["median"] for r in rows]
    err = [[m - r["seconds_per_step"]["min"] for m, r in zip(med, rows)],
           [r["seconds_per_step"]["max"] - m for m, r in zip(med, rows)]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    p = doc["protocol"]
    _bars(axes[0], labels, med, err, "seconds",
          f"seconds per optimiser step (batch {p['batch_size']} x {p['seq_len']})")
    _bars(axes[1], labels, [r["peak_memory_bytes"] / 2**30 for r in rows], None, "GiB", "peak memory")
    m = doc["model"]
    fig.suptitle(f"lpt bench prune-step: {m['label']}{' (random weights)' if m['random_weights'] else ''} on "
                 f"{doc['hardware']['device_name']}", fontsize=11)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path
