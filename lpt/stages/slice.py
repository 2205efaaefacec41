"""``lpt slice``: remove the pruned heads and channels -> a smaller dense Hugging Face model directory.

Output directory:
  config.json, model.safetensors, ...   as ``lpt merge`` writes them, with the sliced widths:
                                        uniform masks -> num_attention_heads / num_key_value_heads /
                                        intermediate_size rewritten, head_dim explicit (a standard config);
                                        per-layer masks -> lpt_layer_* lists + auto_map -> modeling_lpt.py
                                        (copied in; load with trust_remote_code=True)
  adapter/                              with --adapter (and without --merge): the adapter sliced for this model,
                                        in PEFT format (B rows of fan-out, A columns of fan-in layers cut)
  lpt_provenance.json                   source model, masks, adapter (with SHA-256), settings, versions

The masks file is the contract: it is checked against the model (architecture, layer count, head size, group
sizes under grouped-query attention) before any weight is loaded. An all-ones mask gives back the same model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lpt import artifacts
from lpt.config import ModelOptions, _f
from lpt.errors import LptError
from lpt.stages.merge import DTYPE_HELP

ADAPTER_SUBDIR = "adapter"


@dataclass
class SliceConfig(ModelOptions):
    """``lpt slice``: base model + masks.json (+ adapter) -> sliced Hugging Face model directory."""

    dtype: str = _f("auto", DTYPE_HELP)
    masks: str | None = _f(None, "Required: masks.json written by lpt prune (kept heads and channels per layer).")
    adapter: str | None = _f(None, "Adapter directory to slice with the model (written to OUTPUT/adapter/ in PEFT "
                                   "format), e.g. the output of lpt prune.")
    merge: bool = _f(False, "Fold the sliced adapter into the sliced weights instead of writing OUTPUT/adapter/.")
    max_shard_size: str = _f("5GB", "Largest safetensors shard (e.g. 5GB, 500MB); larger models are sharded.")
    output: str = _f("sliced", "Output model directory.")
    overwrite: bool = _f(False, "Replace an existing output directory.")


def validate(cfg: SliceConfig) -> None:
    if not cfg.masks:
        raise LptError("--masks is required (the masks.json written by lpt prune)")
    if not Path(cfg.masks).is_file():
        raise LptError(f"masks file not found: {cfg.masks}")
    if cfg.merge and not cfg.adapter:
        raise LptError("--merge needs --adapter")


def expected_params(masks, params_before: int) -> int:
    """The parameter count ``masks.json`` promises for the sliced model."""
    promised = masks.info.get("params", {}).get("model_after")
    before, after = masks.block_params()
    return int(promised) if promised is not None else params_before - (before - after)


def run(cfg: SliceConfig) -> Path:
    from lpt import groups, lora, models, slicing
    from lpt.arch import describe
    from lpt.progress import console
    from lpt.stages import merge as m

    validate(cfg)
    out = artifacts.check_output_dir(cfg.output, cfg.overwrite)
    # the contract first: masks (and adapter) against the model's config, before any weight is read
    config = models.load_config(models.resolve(cfg.model), trust_remote_code=cfg.trust_remote_code,
                                revision=cfg.revision)
    arch = describe(config)
    slicing.check_sliceable(arch)
    masks = groups.Masks.load(cfg.masks, arch)
    uneven = groups.round_to_violations(masks)
    if uneven:  # slice takes the masks as given; say when they break the --round-to they record
        console.print(f"[yellow]warning:[/] {cfg.masks} records --round-to {masks.info['round_to']} but layer(s) "
                      f"{', '.join(map(str, uneven[:8]))} keep an MLP width that is not a multiple of it; slicing as given")
    sliced_adapter = adapter_cfg = None
    if cfg.adapter:
        adapter_cfg, sd = lora.read_adapter(cfg.adapter)
        sliced_adapter = slicing.slice_adapter(sd, masks)
    dtype = m.output_dtype(cfg.dtype, config)

    bar, step = m.steps_bar("loading model", 4)
    with bar:
        model, tok, arch = m.load_source(cfg, dtype)
        before = models.count_params(model)
        step("slicing")
        if cfg.merge:
            lora.load_adapter(model, cfg.adapter, arch)
            groups.apply_masks(model, masks)
        slicing.slice_model(model, masks, arch)
        if cfg.merge:
            lora.merge_lora(model, dtype=dtype)
        after = models.count_params(model)
        want = expected_params(masks, before)
        if after != want:
            raise LptError(f"the sliced model has {after:,} parameters but {cfg.masks} promises {want:,} (were the "
                           f"masks made for another checkpoint of this architecture?)")
        step("writing")
        layout = "uniform" if masks.is_uniform() else "per-layer"
        prov = m.provenance("slice", cfg, masks=m.masks_record(cfg.masks, masks),
                            adapter=m.adapter_record(cfg.adapter) if cfg.adapter else None,
                            merged=cfg.merge, layout=layout, dtype=str(dtype).replace("torch.", ""),
                            params={"before": before, "after": after})
        with artifacts.atomic_dir(out, overwrite=cfg.overwrite) as tmp:
            m.write_model_dir(model, tok, tmp, dtype=dtype, max_shard_size=cfg.max_shard_size, provenance=prov)
            if sliced_adapter is not None and not cfg.merge:
                write_adapter(tmp / ADAPTER_SUBDIR, adapter_cfg, sliced_adapter, base_model=cfg.output)
        step("done")
    what = " + adapter/" if cfg.adapter and not cfg.merge else (" (adapter merged)" if cfg.merge else "")
    console.print(f"sliced {cfg.model}: {before:,} -> {after:,} parameters ({1 - after / before:.1%} fewer), "
                  f"{layout} widths{what} -> {out}")
    if layout == "per-layer":
        console.print("per-layer widths: load with AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)")
    return out


def write_adapter(directory: Path, adapter_cfg: dict, state_dict: dict, base_model: str) -> None:
    """A PEFT adapter directory for the sliced model (same LoRA settings, sliced factors)."""
    import lpt

    directory.mkdir(parents=True, exist_ok=True)
    doc = dict(adapter_cfg)
    doc["base_model_name_or_path"] = base_model
    artifacts.write_json(directory / artifacts.ADAPTER_CONFIG, doc)
    artifacts.save_tensors(state_dict, directory / artifacts.ADAPTER_WEIGHTS,
                           {"format": "pt", "lpt_version": lpt.__version__, "sliced": "true"})
