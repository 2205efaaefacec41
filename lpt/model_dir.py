"""Writing a model directory: what ``lpt merge`` and ``lpt slice`` save -- a plain Hugging Face directory (weights in
the output dtype, config, tokenizer, generation config), lpt's modeling file for per-layer widths, and the provenance
record. Nothing is written before the weights are checked (finite in the output dtype).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from lpt import artifacts, fused, gguf_file, modeling
from lpt.errors import LptError
from lpt.models import DTYPES, ModelRef, resolve_dtype


def output_dtype(name: str, config: Any, ref: ModelRef | None = None):
    """--dtype of merge / slice as a torch dtype (:func:`choose_output_dtype`)."""
    return choose_output_dtype(name, config, ref)[0]


def choose_output_dtype(name: str, config: Any, ref: ModelRef | None = None) -> tuple[torch.dtype, str]:
    """--dtype of merge / slice as a torch dtype, and why (``lpt_provenance.json`` records both).

    ``auto`` is the dtype the model was trained in where the source says so: a GGUF file (``ref``) whose weights are
    float keeps that type (F32, F16, BF16); a quantized GGUF file gives bfloat16 (its de-quantized weights fit it,
    at half the bytes of float32); a checkpoint gives the dtype its config declares (bfloat16 for SmolLM2, Llama,
    Qwen, Gemma); bfloat16 when it declares none. float32 is written only when asked for.
    """
    if name != "auto":
        return resolve_dtype(name, "cpu"), f"--dtype {name}"
    if ref is not None and ref.gguf_file:
        kind = gguf_file.file_type(Path(ref.path) / ref.gguf_file)
        if kind in gguf_file.FLOAT_TYPES:
            return getattr(torch, gguf_file.FLOAT_TYPES[kind]), f"auto: the GGUF source's weights are {kind}"
        return torch.bfloat16, f"auto: the GGUF source is quantized ({kind}), its de-quantized weights as bfloat16"
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    declared = str(declared).replace("torch.", "") if declared is not None else None
    if declared in DTYPES:
        return getattr(torch, declared), f"auto: the source checkpoint declares {declared}"
    return torch.bfloat16, "auto: the source checkpoint declares no float dtype, bfloat16"


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


def _copy_sentencepiece(ref: ModelRef | None, directory: Path) -> None:
    """The source's SentencePiece model (``tokenizer.model``), which transformers' fast tokenizers do not write back
    but llama.cpp's converter reads for some families (Phi-3, Llama 2): copied when the source has one (a local
    directory, or a hub model's cached files)."""
    name = "tokenizer.model"
    if ref is None or ref.gguf_file or (directory / name).exists():
        return
    if ref.local:
        f = Path(ref.path) / name
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref.path, name)
        f = Path(cached) if isinstance(cached, str) else None
    if f is not None and f.is_file():
        shutil.copy(f, directory / name)


def write_model_dir(model, tokenizer, directory: Path, *, dtype, max_shard_size: str,
                    provenance: dict[str, Any]) -> None:
    """Save ``model`` (cast to ``dtype``) as a plain Hugging Face directory; per-layer models get the modeling file.

    Everything is checked before the first byte is written; call inside ``artifacts.atomic_dir``. Fused projections
    split while lpt worked on the model (``lpt.fused``) are fused back: the directory has the family's own layout.
    """
    fused.fuse(model)
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
        _copy_sentencepiece(getattr(model, "lpt_ref", None), directory)
    artifacts.write_json(directory / artifacts.PROVENANCE, provenance)
