"""Child process of ``lpt bench``: ``python -m lpt.benchmarking.worker SPEC.json RESULT.json``.

Reads one measurement spec, runs it (``lpt.stages.bench.worker_main``), and writes ``{"result": ...}`` or
``{"error": "one line"}``. A fresh process per configuration keeps peak-memory readings independent.
Set ``LPT_DEBUG=1`` to print the traceback of an unexpected error.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m lpt.benchmarking.worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    from lpt import artifacts, quiet
    from lpt.errors import LptError

    quiet.configure(debug=quiet.env_flag("LPT_DEBUG"), quiet=quiet.env_flag("LPT_QUIET"))  # as the parent command
    from lpt.stages.bench import worker_main

    spec_path, result_path = Path(argv[0]), Path(argv[1])
    try:
        result = {"result": worker_main(json.loads(spec_path.read_text(encoding="utf-8")))}
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
