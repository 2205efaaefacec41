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

import lpt
from lpt import artifacts, calibration, lora, modeling, models, reconstruct, slicing
from lpt import budget as budgets
from lpt.arch import describe
from lpt.config import SliceConfig, check
from lpt.errors import LptError
from lpt.masks import Masks, round_to_violations
from lpt.model_dir import choose_output_dtype, write_model_dir
from lpt.progress import console, steps_bar



def validate(cfg: SliceConfig) -> None:
    """The config's rules (``lpt.config.check``), then the files it names."""
    check(cfg)
    if not cfg.masks:
        raise LptError("--masks is required (the masks.json written by lpt prune)")
    if not Path(cfg.masks).is_file():
        raise LptError(f"masks file not found: {cfg.masks}")
    if cfg.reconstruct and not Path(cfg.reconstruct).is_dir():
        raise LptError(f"--reconstruct: calibrate output not found: {cfg.reconstruct}")


def expected_params(masks, params_before: int) -> int:
    """The parameter count ``masks.json`` promises for the sliced model."""
    promised = masks.info.get("params", {}).get("model_after")
    before, after = masks.model_params()
    return int(promised) if promised is not None else params_before - (before - after)


@artifacts.claims_output  # a second run on the same output is refused while this one lives
def run(cfg: SliceConfig) -> Path:
    validate(cfg)
    out = artifacts.check_output_dir(cfg.output, cfg.overwrite)
    # the contract first: masks (and adapter) against the model's config, before any weight is read
    ref = models.resolve(cfg.model)
    config = models.load_config(ref, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    arch = describe(config)
    slicing.check_sliceable(arch)
    masks = Masks.load(cfg.masks, arch)
    if not masks.is_uniform():
        modeling.class_name(arch.model_type)  # a family without per-layer widths: refused before any weight
    arch.check_heads(min(len(masks.layers[i].heads) for i in masks.kept_layers()),
                     "prune with --balance 0 (MLP channels only), or evaluate these masks unsliced (lpt eval "
                     "--adapter --masks)", masks.hidden_size())
    uneven = round_to_violations(masks)
    if uneven:  # slice takes the masks as given; say when they break the --round-to they record
        console.print(f"[yellow]warning:[/] {cfg.masks} records --round-to {masks.info['round_to']} but layer(s) "
                      f"{', '.join(map(str, uneven[:8]))} keep an MLP width that is not a multiple of it; slicing as given")
    sliced_adapter = adapter_cfg = None
    if cfg.adapter:
        adapter_cfg, sd = lora.read_adapter(cfg.adapter)
        sliced_adapter = slicing.slice_adapter(sd, masks)
    dtype, dtype_why = choose_output_dtype(cfg.dtype, config, ref)

    bar, step = steps_bar("loading model", 4 if cfg.reconstruct else 3)
    with bar:
        loaded = models.load_from(cfg, dtype=dtype, adapter=cfg.adapter if cfg.merge else None,
                                  masks=masks if cfg.merge or cfg.reconstruct else None)
        model, tok = loaded.model, loaded.tokenizer
        before = models.count_params(model) - lora.lora_param_count(model)
        refit = None
        if cfg.reconstruct:
            step("reconstructing")
            layers = bar.add_task(f"  {cfg.reconstruct_mode} refit, layer", total=loaded.arch.num_layers)
            data = calibration.load(cfg.reconstruct, loaded.tokenizer)
            refit = reconstruct.refit(model, loaded.arch, calibration.batches(data, 4), masks, cfg.reconstruct_damp,
                                      mode=cfg.reconstruct_mode, on_layer=lambda i: bar.update(layers, completed=i + 1))
        step("slicing")
        if loaded.layers:  # the adapter (--merge) and / or the masks' rank-0 carriers (--reconstruct)
            lora.merge_lora(model, dtype=dtype)
        if refit is not None:
            reconstruct.set_weights(model, loaded.arch, refit)
        slicing.slice_model(model, masks, loaded.arch)
        after = models.count_params(model)
        want = expected_params(masks, before)
        if after != want:
            raise LptError(f"the sliced model has {after:,} parameters but {cfg.masks} promises {want:,} (were the "
                           f"masks made for another checkpoint of this architecture?)")
        step("writing")
        layout = masks.width_layout()
        tp = budgets.supported_tp(budgets.model_widths(loaded.arch, masks))
        prov = artifacts.provenance("slice", cfg, masks=artifacts.masks_record(cfg.masks, masks),
                                    adapter=artifacts.adapter_record(cfg.adapter) if cfg.adapter else None,
                                    merged=cfg.merge, layout=layout, dtype=str(dtype).replace("torch.", ""),
                                    dtype_reason=dtype_why,
                                    params={"before": before, "after": after}, tensor_parallel=tp)
        with artifacts.atomic_dir(out, overwrite=cfg.overwrite) as tmp:
            write_model_dir(model, tok, tmp, dtype=dtype, max_shard_size=cfg.max_shard_size, provenance=prov)
            if sliced_adapter is not None and not cfg.merge:
                lora.write_adapter(tmp / artifacts.ADAPTER_SUBDIR, adapter_cfg, sliced_adapter, base_model=cfg.output,
                                   metadata={"lpt_version": lpt.__version__, "sliced": "true"})
        step("done")
    what = " + adapter/" if cfg.adapter and not cfg.merge else (" (adapter merged)" if cfg.merge else "")
    console.print(f"sliced {cfg.model}: {before:,} -> {after:,} parameters ({1 - after / before:.1%} fewer), "
                  f"{layout} widths{what}, {str(dtype).replace('torch.', '')} ({dtype_why}) -> {out}")
    if layout == "per-layer":
        console.print("per-layer widths: load with AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)")
    else:
        console.print(f"shards at tensor-parallel {', '.join(map(str, tp))} (vLLM / SGLang: heads, key/value heads "
                      f"and MLP width divisible)")
    return out
