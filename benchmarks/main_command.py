#!/usr/bin/env python
"""Run the README's main command (the block after ``<!-- main-command -->``) and time it, stage by stage.

    python benchmarks/main_command.py -o benchmarks/results/main_command_time.json

The command is read from README.md, so what is timed is what a user runs. The ``pip install`` parts are skipped
(install once before; they time the network, not lpt); every ``lpt`` command runs as written, from the repository
root, after the outputs it names under ``runs/`` are removed, with an empty GGUF cache (``LPT_CACHE_DIR`` set to a
new temporary directory) unless ``--keep-cache``. Writes the wall time of every command (for ``lpt run``, also of
each of its stages, from ``RUN_DIR/run.json``), the total, the perplexities of the evaluation files and the machine
(cores, load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main_command(readme: Path) -> list[list[str]]:
    """The ``&&``-separated stages of the README's main command, as argument lists."""
    m = re.search(r"<!-- main-command -->\s*```bash\n(.*?)\n```", readme.read_text(), re.S)
    if not m:
        raise SystemExit("README.md has no <!-- main-command --> block")
    return [shlex.split(part) for part in m.group(1).split("&&")]


def outputs(stage: list[str]) -> list[str]:
    return [stage[i + 1] for i, a in enumerate(stage[:-1]) if a in ("-o", "--output")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default="runs/main_command_time.json")
    ap.add_argument("--keep-cache", action="store_true",
                    help="use lpt's GGUF cache as it is (default: a fresh, empty one, as on a new machine)")
    a = ap.parse_args()
    env = dict(os.environ)
    fresh = None
    if not a.keep_cache:
        fresh = tempfile.mkdtemp(prefix="lpt-cache-")
        env["LPT_CACHE_DIR"] = fresh
    stages = [s for s in main_command(ROOT / "README.md") if s[:2] != ["pip", "install"]]
    for s in stages:
        for o in outputs(s):
            p = ROOT / o
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    lpt = [sys.executable, "-m", "lpt"]
    load_before = os.getloadavg()
    rows, t_all = [], time.time()
    for s in stages:
        if s[0] != "lpt":
            raise SystemExit(f"unexpected stage: {shlex.join(s)}")
        t0 = time.time()
        subprocess.run(lpt + s[1:], cwd=ROOT, check=True, env=env)
        rows.append({"command": shlex.join(s), "seconds": round(time.time() - t0, 1)})
        print(f"{rows[-1]['seconds']:8.1f} s  {rows[-1]['command']}", flush=True)
        if s[:2] == ["lpt", "run"]:
            state = json.loads((ROOT / outputs(s)[0] / "run.json").read_text())
            rows[-1]["stages"] = {n: state["steps"][n]["seconds"] for n in state["stages"]}
    total = round(time.time() - t_all, 1)
    if fresh:
        shutil.rmtree(fresh, ignore_errors=True)
    ppl = {}
    for s in stages:
        files = {s[2]: ROOT / outputs(s)[0]} if s[:2] == ["lpt", "eval"] and outputs(s) else {}
        if s[:2] == ["lpt", "run"]:
            files = {f"{outputs(s)[0]}/eval/{f.stem}": f for f in sorted((ROOT / outputs(s)[0] / "eval").glob("*.json"))}
        for name, f in files.items():
            doc = json.loads(f.read_text())
            ppl[name] = {k: round(v["ppl"], 4) for k, v in doc.get("perplexity", {}).items()}
    res = {"stages": rows, "total_seconds": total, "perplexity": ppl, "cpus": os.cpu_count(),
           "load_average_before": [round(x, 2) for x in load_before],
           "load_average_after": [round(x, 2) for x in os.getloadavg()],
           "cache": "user's" if a.keep_cache else "fresh (the first stage de-quantizes the GGUF file)",
           "note": "pip install stages skipped (installed beforehand)"}
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"total {total / 60:.1f} min -> {out}")


if __name__ == "__main__":
    main()
