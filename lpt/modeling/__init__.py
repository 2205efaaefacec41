"""Modeling code shipped inside per-layer sliced model directories (loaded there with ``trust_remote_code``).

lpt itself never runs the copy in a model directory: it imports the same classes from this package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODELING_FILE = "modeling_lpt.py"


def _class_names() -> dict[str, str]:
    from lpt.arch import FAMILIES

    return {t: f"Lpt{f.hf_class}" for f in FAMILIES.values() for t in f.model_types if f.per_layer_widths}


CLASS_NAMES = _class_names()  # model_type -> class in modeling_lpt.py (one per family in lpt.arch.FAMILIES)


def source_path() -> Path:
    """The modeling file to copy into a per-layer model directory."""
    return Path(__file__).with_name(MODELING_FILE)


def class_name(model_type: str) -> str:
    from lpt.errors import LptError

    if model_type not in CLASS_NAMES:
        raise LptError(f"per-layer widths are not supported for model type '{model_type}' "
                       f"(supported: {', '.join(sorted(CLASS_NAMES))}); prune it with --layout uniform")
    return CLASS_NAMES[model_type]


def auto_map(model_type: str) -> dict[str, str]:
    return {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{class_name(model_type)}"}


def is_per_layer(config: Any) -> bool:
    from lpt.arch import has_layer_widths

    return has_layer_widths(config)


def model_class(config: Any):
    """The class that builds ``config`` (per-layer widths honoured), imported from this package, not a directory."""
    from lpt.modeling import modeling_lpt

    return getattr(modeling_lpt, class_name(config.model_type))
