"""``lpt merge``: fold a LoRA adapter into the base weights -> a Hugging Face model directory.

Output directory (loads with ``AutoModelForCausalLM.from_pretrained``):
  config.json, generation_config.json   the model config (``use_cache`` restored), generation defaults
  model.safetensors                      weights in --dtype (``model-0000k-of-0000n.safetensors`` + index when large)
  tokenizer files                        the base model's tokenizer
  lpt_provenance.json                    source model, adapter, masks (with SHA-256), settings, library versions

Merging computes ``W0 + s·B·A`` in float32 per layer (int8 bases de-quantized first) and casts to --dtype; the
result is checked for non-finite values before anything is written. The model keeps its shape; ``--masks`` zeroes
the pruned rows / columns (``lpt slice`` removes them).

Loading a base of any layout, the output dtype and writing the model directory are ``lpt.models``'; the provenance
records ``lpt.artifacts``' (both shared with ``lpt slice``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lpt import artifacts, lora, models
from lpt.model_dir import choose_output_dtype, write_model_dir
from lpt.arch import describe
from lpt.config import MergeConfig, check
from lpt.errors import LptError
from lpt.int8 import resolve_backend
from lpt.masks import Masks
from lpt.progress import console, steps_bar


# ------------------------------------------------------------------------------------------------ stage
def validate(cfg: MergeConfig) -> None:
    """The config's rules (``lpt.config.check``), then the files it names."""
    check(cfg)
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


@artifacts.claims_output  # a second run on the same output is refused while this one lives
def run(cfg: MergeConfig) -> Path:
    validate(cfg)
    out = artifacts.check_output_dir(cfg.output, cfg.overwrite)
    lora.read_adapter(cfg.adapter)  # refuse a non-adapter before loading the model
    ref = models.resolve(cfg.model)
    config = models.load_config(ref, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    dtype, dtype_why = choose_output_dtype(cfg.dtype, config, ref)
    load_8bit = recorded_8bit(cfg.adapter) if cfg.load_8bit is None else cfg.load_8bit
    backend = resolve_backend(cfg.int8_backend or recorded_int8_backend(cfg.adapter) or "auto",
                              models.resolve_device(cfg.device))
    if load_8bit and cfg.load_8bit is None:
        console.print(f"{cfg.adapter} was trained on an int8 base ({backend}): merging onto the int8 weights "
                      f"(--no-load-8bit merges onto the full-precision ones)")

    masks = None
    if cfg.masks:  # the contract first, before any weight is read
        arch = describe(config)
        if arch.per_layer:
            raise LptError("--masks cannot be applied to a model with per-layer widths (it is already sliced)")
        masks = Masks.load(cfg.masks, arch)

    bar, step = steps_bar("loading model", 3)
    with bar:
        loaded = models.load_from(cfg, dtype=torch.float32 if load_8bit else dtype, adapter=cfg.adapter, masks=masks,
                                  load_8bit=load_8bit, int8_backend=backend,
                                  int8_on_load=False)  # the merged model is cast and saved
        model, tok = loaded.model, loaded.tokenizer
        step("merging")
        lora.merge_lora(model, dtype=dtype, apply_masks=masks is not None)
        params = models.count_params(model)
        step("writing")
        prov = artifacts.provenance("merge", cfg, adapter=artifacts.adapter_record(cfg.adapter),
                                    masks=artifacts.masks_record(cfg.masks, masks) if masks is not None else None,
                                    load_8bit=load_8bit, int8_backend=backend if load_8bit else None,
                                    dtype=str(dtype).replace("torch.", ""), dtype_reason=dtype_why,
                                    params=params)
        with artifacts.atomic_dir(out, overwrite=cfg.overwrite) as tmp:
            write_model_dir(model, tok, tmp, dtype=dtype, max_shard_size=cfg.max_shard_size, provenance=prov)
        step("done")
    console.print(f"merged {cfg.adapter} into {cfg.model}{' (int8 base)' if load_8bit else ''}"
                  f"{', pruned rows zeroed' if masks is not None else ''}: {params:,} parameters, "
                  f"{str(dtype).replace('torch.', '')} -> {out}")
    return out
