"""``--json``: one machine-readable line on stdout per command, read back from the files the stage wrote.

Every summary has ``command``, ``output`` (the path the command prints without ``--json``) and ``lpt_version``;
the rest is the headline of that output (blocks made, ratio reached, parameters, perplexities, latencies, stages
run). No torch here: the summary reads JSON only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lpt import artifacts
from lpt.errors import LptError


def _read(path: Path) -> Any:
    try:
        return artifacts.read_json(path) if path.is_file() else None
    except LptError:
        return None


def _model_dir(out: Path) -> dict[str, Any]:
    prov = _read(out / artifacts.PROVENANCE) or {}
    return {k: prov.get(k) for k in ("params", "layout", "dtype", "merged", "source_model") if k in prov}


def _eval(doc: dict[str, Any]) -> dict[str, Any]:
    return {"label": doc.get("label"),
            "params": (doc.get("model") or {}).get("effective_params"),
            "perplexity": {s: r.get("ppl") for s, r in doc.get("perplexity", {}).items()},
            "tasks": {t: r.get("score") for t, r in doc.get("tasks", {}).items()},
            "averages": doc.get("averages")}


def summarize(command: str, output: str | Path) -> dict[str, Any]:
    import lpt

    out = Path(output)
    doc: dict[str, Any] = {"command": command, "output": str(out), "lpt_version": lpt.__version__}
    stage = command.split()[0] if command else ""
    if stage == "calibrate":
        meta = _read(out / artifacts.CALIB_META) or {}
        doc.update({k: meta.get(k) for k in ("source", "format", "nsamples", "seq_len", "val_samples", "seed")})
    elif stage == "prune":
        masks = _read(out / artifacts.MASKS) or {}
        hidden = masks.get("hidden_channels")
        doc.update(ratio=masks.get("ratio"), params=masks.get("params"), layout=masks.get("layout"),
                   criterion=(masks.get("info") or {}).get("criterion"),
                   removed_layers=masks.get("removed_layers") or [],
                   hidden_size=len(hidden) if hidden is not None else masks.get("hidden_size"))
        log = out / artifacts.TRAIN_LOG
        lines = log.read_text().splitlines() if log.is_file() else []
        if lines:
            last = json.loads(lines[-1])
            doc.update(steps=last.get("step"), final_loss=last.get("loss"))
    elif stage in ("merge", "slice"):
        doc.update(_model_dir(out))
    elif stage == "eval":
        res = _read(out)
        if res:
            doc.update(_eval(res))
    elif stage == "export":
        doc["size_bytes"] = out.stat().st_size if out.is_file() else None
    elif stage == "bench":
        res = _read(out) or {}
        doc["results"] = [{"label": r.get("label"), "batch_size": r.get("batch_size"),
                           "latency_s": (r.get("latency_s") or {}).get("median"),
                           "tokens_per_s": r.get("tokens_per_s"), "peak_memory_bytes": r.get("peak_memory_bytes")}
                          for r in res.get("results", [])]
    elif stage == "run":
        state = _read(out / artifacts.RUN_STATE) or {}
        steps = state.get("steps", {})
        doc["report"] = str(out / artifacts.REPORT_MD)
        doc["report_html"] = str(out / artifacts.REPORT_HTML)
        doc["stages"] = {n: {"action": (state.get("last_actions") or {}).get(n), "status": steps[n].get("status"),
                             "seconds": steps[n].get("seconds"), "output": steps[n].get("output")}
                         for n in state.get("stages", []) if n in steps}  # in pipeline order
        for name in ("eval-dense", "eval-pruned"):
            res = _read(Path(steps[name]["output"])) if name in steps else None
            if res:
                doc[name.split("-")[1]] = _eval(res)
    return doc
