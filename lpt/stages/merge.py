"""``lpt merge``: fold a LoRA adapter into the base weights -> a Hugging Face model directory.

Output directory (loads with ``AutoModelForCausalLM.from_pretrained``):
  config.json, generation_config.json   the model config (``use_cache`` restored), generation defaults
  model.safetensors                      weights in --dtype (``model-0000k-of-0000n.safetensors`` + index when large)
  tokenizer files                        the base model's tokenizer
  lpt_provenance.json                    source model, adapter, masks (with SHA-256), settings, library versions

Merging computes ``W0 + s·B·A`` in float32 per layer (int8 bases de-quantized first) and casts to --dtype; the
result is checked for non-finite values before anything is written. The model keeps its shape; ``--masks`` zeroes
the pruned rows / columns (``lpt slice`` removes them).

The helpers here (loading a base of any layout, output dtype, writing a model directory, provenance) are shared with
``lpt slice``.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from lpt import artifacts
from lpt.config import DTYPE_HELP, MergeConfig, ModelOptions  # noqa: F401  (configs live in lpt.config; re-exported)
from lpt.errors import LptError

# ------------------------------------------------------------------------------------------------ shared helpers
def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def output_dtype(name: str, config: Any):
    """--dtype as a torch dtype; ``auto`` is the dtype the source checkpoint declares (float32 if none)."""
    import torch

    from lpt import models

    if name == "auto":
        declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(declared, torch.dtype):
            return declared if declared in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        return getattr(torch, str(declared)) if str(declared) in models.DTYPES else torch.float32
    return models.resolve_dtype(name, "cpu")


def load_source(cfg: ModelOptions, dtype, *, adapter=None, masks=None, load_8bit: bool = False,
                int8_backend: str = "auto"):
    """Load MODEL frozen in ``dtype`` through lpt's one loader (any layout lpt writes; a per-layer sliced directory
    is built with ``lpt.modeling``'s classes, so no --trust-remote-code is needed) -> ``models.Loaded``."""
    from lpt import models

    return models.load(cfg.model, adapter=adapter, masks=masks, dtype=str(dtype).replace("torch.", ""),
                       device=cfg.device, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                       load_8bit=load_8bit, int8_backend=int8_backend)


def check_finite(model) -> None:
    import torch

    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise LptError(f"non-finite values (NaN/Inf) in {name}; nothing was written (a broken adapter, or "
                           f"values that overflow --dtype)")


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
    from lpt import modeling

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


def adapter_record(directory: str | Path) -> dict[str, Any]:
    d = Path(directory)
    cfg = artifacts.read_json(d / artifacts.ADAPTER_CONFIG)
    return {"path": str(directory), "sha256": file_sha256(d / artifacts.ADAPTER_WEIGHTS),
            "base_model": cfg.get("base_model_name_or_path"), "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"),
            "target_modules": cfg.get("target_modules")}


def masks_record(path: str | Path, masks) -> dict[str, Any]:
    doc = masks.to_json()
    return {"path": str(path), "sha256": file_sha256(path), "gqa": masks.gqa,
            "layout": "uniform" if masks.is_uniform() else "per-layer", "params": doc["params"], "ratio": doc["ratio"],
            "made_for": masks.model or None}


def provenance(stage: str, cfg: Any, **records: Any) -> dict[str, Any]:
    import lpt

    return {"stage": stage, "lpt_version": lpt.__version__, "source_model": cfg.model, "config": asdict(cfg),
            **records, "versions": artifacts.versions()}


def steps_bar(description: str, total: int) -> tuple[Any, Callable[[str], None]]:
    """A progress bar over the coarse steps of a stage (load, merge, slice, write)."""
    from lpt.progress import progress_bar

    bar = progress_bar()
    task = bar.add_task(description, total=total)

    def step(what: str) -> None:
        bar.update(task, advance=1, description=what)

    return bar, step


# ------------------------------------------------------------------------------------------------ stage
def validate(cfg: MergeConfig) -> None:
    if not cfg.adapter:
        raise LptError("--adapter is required (a directory with adapter_config.json and adapter_model.safetensors)")
    if cfg.masks and not Path(cfg.masks).is_file():
        raise LptError(f"masks file not found: {cfg.masks}")


def recorded_8bit(adapter: str | Path) -> bool:
    """Whether the adapter directory says it was trained on an int8 base (lpt prune --load-8bit)."""
    f = Path(adapter) / artifacts.RESOLVED_CONFIG
    if not f.is_file():
        return False
    try:
        return bool(artifacts.read_json(f).get("config", {}).get("load_8bit", False))
    except (LptError, AttributeError):
        return False


def recorded_int8_backend(adapter: str | Path) -> str | None:
    """The int8 backend the adapter was trained on, from its lpt_config.json (``bitsandbytes`` for an ``--8bit`` run
    of lpt before the choice was recorded); None when it says nothing."""
    f = Path(adapter) / artifacts.RESOLVED_CONFIG
    if not f.is_file():
        return None
    try:
        config = artifacts.read_json(f).get("config", {})
    except (LptError, AttributeError):
        return None
    return config.get("int8_backend") or ("bitsandbytes" if config.get("load_8bit") else None)


def run(cfg: MergeConfig) -> Path:
    from lpt import groups, lora, models
    from lpt.arch import describe
    from lpt.progress import console

    validate(cfg)
    out = artifacts.check_output_dir(cfg.output, cfg.overwrite)
    lora.read_adapter(cfg.adapter)  # refuse a non-adapter before loading the model
    config = models.load_config(models.resolve(cfg.model), trust_remote_code=cfg.trust_remote_code,
                                revision=cfg.revision)
    dtype = output_dtype(cfg.dtype, config)
    load_8bit = recorded_8bit(cfg.adapter) if cfg.load_8bit is None else cfg.load_8bit
    from lpt.int8 import resolve_backend

    backend = resolve_backend(cfg.int8_backend or recorded_int8_backend(cfg.adapter) or "auto",
                              models.resolve_device(cfg.device))
    if load_8bit and cfg.load_8bit is None:
        console.print(f"{cfg.adapter} was trained on an int8 base ({backend}): merging onto the int8 weights "
                      f"(--no-load-8bit merges onto the full-precision ones)")

    masks = None
    if cfg.masks:  # the contract first, before any weight is read
        arch = describe(config)
        if arch.layer_heads or arch.layer_kv_heads or arch.layer_intermediate:
            raise LptError("--masks cannot be applied to a model with per-layer widths (it is already sliced)")
        masks = groups.Masks.load(cfg.masks, arch)

    bar, step = steps_bar("loading model", 3)
    with bar:
        import torch

        loaded = load_source(cfg, torch.float32 if load_8bit else dtype, adapter=cfg.adapter, masks=masks,
                             load_8bit=load_8bit, int8_backend=backend)
        model, tok = loaded.model, loaded.tokenizer
        step("merging")
        lora.merge_lora(model, dtype=dtype, apply_masks=masks is not None)
        params = models.count_params(model)
        step("writing")
        prov = provenance("merge", cfg, adapter=adapter_record(cfg.adapter),
                          masks=masks_record(cfg.masks, masks) if masks is not None else None,
                          load_8bit=load_8bit, int8_backend=backend if load_8bit else None, dtype=str(dtype).replace("torch.", ""), params=params)
        with artifacts.atomic_dir(out, overwrite=cfg.overwrite) as tmp:
            write_model_dir(model, tok, tmp, dtype=dtype, max_shard_size=cfg.max_shard_size, provenance=prov)
        step("done")
    console.print(f"merged {cfg.adapter} into {cfg.model}{' (int8 base)' if load_8bit else ''}"
                  f"{', pruned rows zeroed' if masks is not None else ''}: {params:,} parameters, "
                  f"{str(dtype).replace('torch.', '')} -> {out}")
    return out
