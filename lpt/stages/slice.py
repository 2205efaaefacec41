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

from pathlib import Path

from lpt import artifacts
from lpt.config import SliceConfig  # noqa: F401  (configs live in lpt.config)
from lpt.errors import LptError

ADAPTER_SUBDIR = "adapter"
RECONSTRUCT_MODES = ("sequential", "independent")


def validate(cfg: SliceConfig) -> None:
    from lpt.config import check_finite

    check_finite(cfg)  # --reconstruct-damp nan / inf
    if not cfg.masks:
        raise LptError("--masks is required (the masks.json written by lpt prune)")
    if not Path(cfg.masks).is_file():
        raise LptError(f"masks file not found: {cfg.masks}")
    if cfg.merge and not cfg.adapter:
        raise LptError("--merge needs --adapter")
    if cfg.reconstruct and cfg.adapter and not cfg.merge:
        raise LptError("--reconstruct changes the base weights, which an unmerged adapter was not trained on; add "
                       "--merge")
    if cfg.reconstruct and not Path(cfg.reconstruct).is_dir():
        raise LptError(f"--reconstruct: calibrate output not found: {cfg.reconstruct}")
    if cfg.reconstruct_damp < 0:
        raise LptError(f"--reconstruct-damp must be >= 0 (got {cfg.reconstruct_damp})")
    if cfg.reconstruct_mode not in RECONSTRUCT_MODES:
        raise LptError(f"unknown --reconstruct-mode '{cfg.reconstruct_mode}' (use {', '.join(RECONSTRUCT_MODES)})")


def expected_params(masks, params_before: int) -> int:
    """The parameter count ``masks.json`` promises for the sliced model."""
    promised = masks.info.get("params", {}).get("model_after")
    before, after = masks.block_params()
    return int(promised) if promised is not None else params_before - (before - after)


@artifacts.claims_output  # a second run on the same output is refused while this one lives
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

    bar, step = m.steps_bar("loading model", 4 if cfg.reconstruct else 3)
    with bar:
        loaded = m.load_source(cfg, dtype, adapter=cfg.adapter if cfg.merge else None,
                               masks=masks if cfg.merge or cfg.reconstruct else None)
        model, tok = loaded.model, loaded.tokenizer
        before = models.count_params(model) - lora.lora_param_count(model)
        refit = None
        if cfg.reconstruct:
            step("reconstructing")
            layers = bar.add_task(f"  {cfg.reconstruct_mode} refit, layer", total=loaded.arch.num_layers)
            refit = reconstruct_weights(loaded, masks, cfg.reconstruct, cfg.reconstruct_damp,
                                        mode=cfg.reconstruct_mode,
                                        on_layer=lambda i: bar.update(layers, completed=i + 1))
        step("slicing")
        if loaded.layers:  # the adapter (--merge) and / or the masks' rank-0 carriers (--reconstruct)
            lora.merge_lora(model, dtype=dtype)
        if refit is not None:
            set_weights(model, loaded.arch, refit)
        slicing.slice_model(model, masks, loaded.arch)
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


def reconstruct_weights(loaded, masks, calib_dir: str, damp: float, mode: str = "sequential", on_layer=None) -> dict:
    """Refitted full-width o_proj / down_proj weights (pruned columns zero) on the blocks in ``calib_dir``
    (``lpt.reconstruct``); ``loaded`` carries the masks (and the adapter with --merge).

    ``sequential``: layer by layer on the pruned model's own inputs (``reconstruct.sequential_refit``).
    ``independent``: every layer from the unpruned model's inputs in one pass; with LoRA layers the target is the
    base weight with LoRA's change on the kept columns (``W0 + s·B·A`` there; the pruned columns as the base had
    them, since LoRA never saw them). ``on_layer(i)`` is called as each layer is done (sequential)."""
    from lpt import lora, reconstruct
    from lpt.arch import get_module
    from lpt.stages import calibrate

    data = calibrate.load(calib_dir, loaded.tokenizer)
    batches = ({k: v[i:i + 4] for k, v in data.tensors.items()} for i in range(0, data.nsamples, 4))
    arch, model = loaded.arch, loaded.model
    if mode == "sequential":
        return reconstruct.sequential_refit(model, arch, batches, masks, damp, on_layer=on_layer)
    layers = range(arch.num_layers)
    with lora.disabled(model):  # dense inputs: no LoRA, no masks
        grams = reconstruct.collect_grams(model, arch, batches, layers)
    weights = {}
    for i in layers:
        for proj in reconstruct.FAN_IN:
            mod = get_module(model, arch.module_path(i, proj))
            if isinstance(mod, lora.LoraLinear):  # LoRA's change on the kept columns; the pruned ones as trained on
                keep = reconstruct.kept_columns(masks, arch, i, proj).to(mod.base_layer.weight.device)
                w = lora.dense_weight(mod.base_layer).clone()  # never the base weight itself
                w[:, keep] += mod.delta().to(w.device)[:, keep]
            else:
                w = mod.weight.detach().float()
            weights[(i, proj)] = w
    return reconstruct.refit_weights(weights, grams, masks, arch, damp)


def set_weights(model, arch, weights: dict) -> None:
    import torch

    from lpt.arch import get_module

    with torch.no_grad():
        for (i, proj), w in weights.items():
            mod = get_module(model, arch.module_path(i, proj))
            mod.weight.copy_(w.to(mod.weight.dtype))


def write_adapter(directory: Path, adapter_cfg: dict, state_dict: dict, base_model: str) -> None:
    """A PEFT adapter directory for the sliced model (same LoRA settings, sliced factors)."""
    import lpt

    directory.mkdir(parents=True, exist_ok=True)
    doc = dict(adapter_cfg)
    doc["base_model_name_or_path"] = base_model
    artifacts.write_json(directory / artifacts.ADAPTER_CONFIG, doc)
    artifacts.save_tensors(state_dict, directory / artifacts.ADAPTER_WEIGHTS,
                           {"format": "pt", "lpt_version": lpt.__version__, "sliced": "true"})
