"""Measuring in a child process: ``python -m lpt.benchmarking.worker SPEC.json RESULT.json``.

``measure(task, isolate=...)`` is the parent's side: it writes one ``protocol.Task`` as JSON, starts a fresh
Python process on it (a fresh process per configuration keeps peak-memory readings independent) and reads the
result back; without ``isolate`` it measures in this process. ``main`` is the child's side: it reads the spec,
runs it (``measure.run``) and writes ``{"result": ...}`` or ``{"error": "one line"}``.
Set ``LPT_DEBUG=1`` to print the traceback of an unexpected error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from lpt import artifacts
from lpt.benchmarking import measure as m
from lpt.benchmarking.protocol import Task
from lpt.errors import LptError


def measure(task: Task, label: str, isolate: bool = True) -> Any:
    """The result of ``task``: from a child process with ``isolate``, else measured here. ``label`` names the
    configuration in a failure's one-line error."""
    if not isolate:
        return m.run(task)
    return in_child(task, label)


def in_child(task: Task, label: str) -> Any:
    """Run one measurement in a fresh Python process; returns its result.

    Its progress bars go to this terminal; a failure becomes one ``LptError`` line naming the configuration.
    """
    with tempfile.TemporaryDirectory(prefix="lpt-bench-") as d:
        spec, result = Path(d) / "spec.json", Path(d) / "result.json"
        artifacts.write_json(spec, task.to_json())
        proc = subprocess.run([sys.executable, "-m", "lpt.benchmarking.worker", str(spec), str(result)],
                              env=dict(os.environ), check=False)
        doc = artifacts.read_json(result) if result.is_file() else None
    if proc.returncode in (130, -signal.SIGINT):
        raise KeyboardInterrupt
    if doc is None:
        how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else
               f"exited with code {proc.returncode}")
        raise LptError(f"{label}: the measuring process {how} without a result (out of memory?)")
    if "error" in doc:
        raise LptError(f"{label}: {doc['error']}")
    return doc["result"]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m lpt.benchmarking.worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    from lpt import quiet

    quiet.configure(debug=quiet.env_flag("LPT_DEBUG"), quiet=quiet.env_flag("LPT_QUIET"))  # as the parent command
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    try:
        result = {"result": m.run(Task.from_json(json.loads(spec_path.read_text(encoding="utf-8"))))}
        code = 0
    except LptError as e:
        result, code = {"error": str(e)}, 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        if os.environ.get("LPT_DEBUG"):
            traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        result, code = {"error": f"{type(e).__name__}: {msg} (set LPT_DEBUG=1 for the traceback)"}, 1
    artifacts.write_json(result_path, result)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
