"""Writing a model directory: what ``lpt merge`` and ``lpt slice`` save -- a plain Hugging Face directory (weights in
the output dtype, config, tokenizer, generation config), lpt's modeling file for per-layer widths, and the provenance
record. Nothing is written before the weights are checked (finite in the output dtype).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from lpt import artifacts, modeling
from lpt.errors import LptError
from lpt.models import DTYPES, resolve_dtype


def output_dtype(name: str, config: Any):
    """--dtype of merge / slice as a torch dtype; ``auto`` is the dtype the source checkpoint declares (float32 if
    none)."""
    if name == "auto":
        declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(declared, torch.dtype):
            return declared if declared in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        return getattr(torch, str(declared)) if str(declared) in DTYPES else torch.float32
    return resolve_dtype(name, "cpu")


def check_finite(model) -> None:
    """Refuse weights with NaN / Inf values before anything is written: one line naming the first tensor."""
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise LptError(f"non-finite values (NaN/Inf) in {name}; nothing was written (values that overflow "
                           f"--dtype, or a refit by --reconstruct that failed)")


def _fix_tokenizer_config(path: Path) -> None:
    """Tokenizers converted by transformers 5 (e.g. from GGUF) save a class name older runtimes do not know."""
    f = path / "tokenizer_config.json"
    if not f.is_file():
        return
    doc = artifacts.read_json(f)
    changed = False
    if doc.get("tokenizer_class") == "TokenizersBackend":
        doc["tokenizer_class"] = "PreTrainedTokenizerFast"
        changed = True
    for k in ("is_local", "local_files_only"):
        if k in doc:
            del doc[k]
            changed = True
    if changed:
        artifacts.write_json(f, doc)


def write_model_dir(model, tokenizer, directory: Path, *, dtype, max_shard_size: str,
                    provenance: dict[str, Any]) -> None:
    """Save ``model`` (cast to ``dtype``) as a plain Hugging Face directory; per-layer models get the modeling file.

    Everything is checked before the first byte is written; call inside ``artifacts.atomic_dir``.
    """
    model.to(dtype)
    check_finite(model)
    cfg = model.config
    cfg.use_cache = True
    per_layer = modeling.is_per_layer(cfg)
    if per_layer:
        cfg.auto_map = modeling.auto_map(cfg.model_type)
    elif hasattr(cfg, "auto_map") and modeling.MODELING_FILE.split(".")[0] in str(cfg.auto_map):
        del cfg.auto_map  # a per-layer source sliced to uniform widths: the standard class again
    for attr in ("quantization_config", "lpt_provenance"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    if model.generation_config is not None and not (directory / "generation_config.json").exists():
        model.generation_config.save_pretrained(directory)
    if per_layer:
        shutil.copy(modeling.source_path(), directory / modeling.MODELING_FILE)
        doc = artifacts.read_json(directory / "config.json")
        doc["architectures"] = [modeling.class_name(cfg.model_type)]
        artifacts.write_json(directory / "config.json", doc)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
        _fix_tokenizer_config(directory)
    artifacts.write_json(directory / artifacts.PROVENANCE, provenance)
