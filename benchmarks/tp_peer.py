#!/usr/bin/env python
"""External peer for the quality study: structured pruning with Torch-Pruning (the ``torch-pruning`` package).

    python benchmarks/tp_peer.py smollm2-135m --ratio 0.5 --calib runs/quality/calib -o runs/quality/r0.5-tp-pruned
    python benchmarks/tp_peer.py smollm2-135m --ratio 0.2 --calib CALIB -o OUT --importance taylor --nsamples 8
    lpt prune OUT --ratio 0 --calib CALIB ... -o OUT-lora      # then the same LoRA recovery budget as lpt's runs

Follows Torch-Pruning's LLM example (examples/LLMs/prune_llm.py): ``tp.pruner.MetaPruner`` with
``GroupMagnitudeImportance(p=2, group_reduction='mean')`` (``--importance l2``, the example's default) or
``GroupTaylorImportance`` (``--importance taylor``, gradients of the LM loss on ``--nsamples`` calibration blocks),
local pruning (``global_pruning=False``), ``num_heads`` for q/k/v, ``prune_num_heads=True``,
``prune_head_dims=False``, ``ignored_layers=[lm_head]``. Differences from the example, all so that the result is
comparable with lpt's:
- the embeddings are ignored too, so the hidden size is never pruned (lpt prunes heads and MLP channels only);
- the ratio means what it means in lpt: the fraction of the transformer blocks' linear-layer parameters
  (q, k, v, o, gate, up, down) removed. The head and channel counts are lpt's (``groups.uniform_counts``; ``--heads``
  fixes the attention units per layer as ``lpt prune --balance N`` does) and the
  ratios handed to Torch-Pruning are chosen so that its rounding lands exactly on them (no ``round_to``);
- grouped-query attention: ``--gqa query-heads`` is the example's own handling (the same number of query heads
  cut in every key/value group, key/value heads kept); ``--gqa kv-groups`` (default, lpt's default) declares the
  query projection with one "head" per key/value group, so whole groups go (query heads, k/v head, o columns).

Torch-Pruning 1.6 needs three small fixes to trace a transformers 5 Llama under torch 2.x; they are applied only
while this script prunes (see ``tp_fixes``): a negative ``torch.cat`` dim (RoPE's rotate_half) that torch reports as
an unsigned integer made the index mapping loop forever; the model is traced with an attention function that
repeats k/v heads explicitly (the form Torch-Pruning's GQA index mapping was written for; the numerics are those
of the model's own attention); duplicated k/v indices from that mapping are merged, and k/v are never cut in
query-heads mode even when the last extra query head of each group goes.

OUT is a plain Hugging Face model directory (config rewritten: num_attention_heads, num_key_value_heads,
intermediate_size, explicit head_dim) plus:
  tp_peer.json     achieved ratio (block linear params before/after), whole-model params, importance, counts,
                   Torch-Pruning's settings and version, self-checks (reloaded == in memory; TP's cut == lpt masks)
  tp_masks.json    the heads and channels Torch-Pruning kept, in lpt's masks.json format (for the dense model)
  lpt_provenance.json
Before anything is written, the saved model is reloaded with AutoModelForCausalLM and its logits compared with the
in-memory pruned model, and the pruned model is compared with the dense model whose pruned heads and channels are
masked by lpt (``lpt.masks.apply_masks``); a mismatch writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

IMPORTANCES = ("l2", "taylor")
TRACE_ATTENTION = "lpt_tp_trace"
RESULT = "tp_peer.json"
TP_MASKS = "tp_masks.json"
CHECK_ATOL = 1e-4  # saved and reloaded vs in memory (float32, same kernels)
MASK_RTOL = 1e-4  # pruned vs masked dense, float64: a wrong cut moves logits by O(1); the norms' float32
# internals (transformers' RMSNorm) leave ~1e-7 relative over 30 layers at 50% (7.6e-6 absolute observed)


@dataclass
class TpPeerConfig:
    model: str
    ratio: float
    calib: str
    output: str
    importance: str = "l2"
    gqa: str = "kv-groups"
    nsamples: int = 8
    heads: int | None = None
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False


# ------------------------------------------------------------------------------------------------ counts
def target_counts(arch, ratio: float, gqa: str, heads: int | None = None) -> tuple[int, int]:
    """(attention units, MLP channels) pruned per layer: exactly what lpt's uniform layout prunes with ``heads``
    attention units per layer (``lpt prune --balance N``; None: the proportional balance)."""
    from lpt import groups

    return groups.uniform_counts(arch, ratio, gqa, heads=heads)


def tp_ratios(arch, n_units: int, n_channels: int, gqa: str) -> tuple[float, float]:
    """``(head_pruning_ratio, pruning_ratio)`` for which Torch-Pruning's local rounding prunes exactly the counts.

    Heads: Torch-Pruning removes ``ceil(r * n)`` of the ``n`` heads it sees (``n`` = key/value groups in kv-groups
    mode; in query-heads mode ``n`` = query heads, then ``ceil(./kv)`` per group). Channels: it keeps
    ``int(width * (1 - r))``. Half a unit below the target makes both roundings land on it.
    """
    if gqa == "kv-groups":
        head = (n_units - 0.5) / arch.num_kv_heads if n_units else 0.0
    else:
        head = (n_units * arch.num_kv_heads - 0.5) / arch.num_heads if n_units else 0.0
    channel = (n_channels - 0.5) / arch.intermediate_size if n_channels else 0.0
    return head, channel


def lpt_block_params(arch, n_units: int, n_channels: int, gqa: str) -> tuple[int, int]:
    """(before, after) block linear parameters of lpt's uniform pruning with these counts."""
    from lpt import groups

    p_head, p_chan = groups.unit_params(arch, gqa)
    before = sum(arch.block_linear_params(i) for i in range(arch.num_layers))
    return before, before - arch.num_layers * (n_units * p_head + n_channels * p_chan)


def num_heads_map(model, arch, gqa: str) -> dict:
    """Torch-Pruning's ``num_heads``: kv-groups declares q with one head per key/value group (of g * head_dim rows)."""
    from lpt.arch import get_module

    out = {}
    for i in range(arch.num_layers):
        q, k, v = (get_module(model, arch.module_path(i, p)) for p in ("q_proj", "k_proj", "v_proj"))
        out[q] = arch.num_kv_heads if gqa == "kv-groups" else arch.num_heads
        out[k] = arch.num_kv_heads
        out[v] = arch.num_kv_heads
    return out


# ------------------------------------------------------------------------------------------------ Torch-Pruning
def _trace_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention with k/v heads repeated explicitly (``repeat_kv``), used only while tracing the graph."""
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv

    n_rep = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    out = F.scaled_dot_product_attention(query, key, value, is_causal=query.shape[2] > 1, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def tp_fixes(model, kv_layers: set | None) -> Iterator[None]:
    """Patches Torch-Pruning 1.6 needs for a transformers 5 Llama under torch 2.x; everything is restored on exit.

    ``kv_layers`` (query-heads mode): k/v projections that must never lose rows.
    """
    from torch_pruning.dependency import graph as tp_graph
    from torch_pruning.dependency import index_mapping as im
    from transformers import AttentionInterface

    orig_concat = im.update_concat_index_mapping
    orig_gqa = im._GQAIndexMapping.__call__
    orig_check = tp_graph.DependencyGraph.check_pruning_group

    def concat(graph, node):
        # torch reports cat(dim=-1) as 2**64 - 1; Torch-Pruning then maps RoPE's rotate_half as a channel concat
        dim = getattr(node.grad_fn, "_saved_dim", None)
        if dim is not None and dim >= 2 ** 63:
            return None
        return orig_concat(graph, node)

    def gqa_mapping(self, idxs):
        out, seen = [], set()
        for i in orig_gqa(self, idxs):  # g query rows map to one k/v row: keep it once
            if i.idx not in seen:
                seen.add(i.idx)
                out.append(i)
        return out

    def check(self, group):
        if kv_layers:
            for j in range(len(group)):
                dep, _ = group[j]
                if dep.target.module in kv_layers and self.is_out_channel_pruning_fn(dep.handler):
                    group[j] = (dep, [])
        return orig_check(self, group)

    AttentionInterface.register(TRACE_ATTENTION, _trace_attention)
    attn = model.config._attn_implementation
    im.update_concat_index_mapping = concat
    im._GQAIndexMapping.__call__ = gqa_mapping
    tp_graph.DependencyGraph.check_pruning_group = check
    model.set_attn_implementation(TRACE_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(attn)
        im.update_concat_index_mapping = orig_concat
        im._GQAIndexMapping.__call__ = orig_gqa
        tp_graph.DependencyGraph.check_pruning_group = orig_check


def make_importance(name: str):
    import torch_pruning as tp

    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    return tp.importance.GroupTaylorImportance(group_reduction="mean")


def taylor_gradients(model, arch, blocks: dict, nsamples: int, progress=None) -> float:
    """Accumulate d(LM loss)/dW of every block projection over ``nsamples`` blocks; returns the mean loss."""
    import torch

    from lpt.arch import PROJECTIONS, get_module
    from lpt.models import model_device

    weights = [get_module(model, arch.module_path(i, p)).weight for i in range(arch.num_layers) for p in PROJECTIONS]
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    dev = model_device(model)
    n = min(nsamples, int(blocks["input_ids"].shape[0]))
    total = 0.0
    for s in range(n):
        batch = {k: v[s:s + 1].to(dev) for k, v in blocks.items()}
        with torch.enable_grad():
            loss = model(**batch, use_cache=False).loss
            (loss / n).backward()
        total += float(loss.detach())
        if progress:
            progress(s + 1)
    return total / max(n, 1)


def prune(model, arch, cfg: TpPeerConfig, example, n_units: int, n_channels: int) -> list:
    """Run Torch-Pruning on ``model`` in place; returns its pruning history ``[(module name, is_out, idxs), ...]``."""
    import torch_pruning as tp

    from lpt.arch import get_module

    head_ratio, channel_ratio = tp_ratios(arch, n_units, n_channels, cfg.gqa)
    num_heads = num_heads_map(model, arch, cfg.gqa)
    kv_layers = None
    if cfg.gqa == "query-heads":
        kv_layers = {get_module(model, arch.module_path(i, p)) for i in range(arch.num_layers)
                     for p in ("k_proj", "v_proj")}
    attn = [get_module(model, arch.module_path(i, "q_proj").rsplit(".", 1)[0]) for i in range(arch.num_layers)]
    norms = [(m.weight, 0) for name, m in model.named_modules() if name.endswith("norm") and hasattr(m, "weight")]
    model.requires_grad_(True)  # tracing follows grad_fn
    try:
        with tp_fixes(model, kv_layers):
            pruner = tp.pruner.MetaPruner(
                model,
                example_inputs=example,
                forward_fn=lambda m, x: m(input_ids=x, use_cache=False).logits,
                importance=make_importance(cfg.importance),
                global_pruning=False,
                pruning_ratio=channel_ratio,  # MLP channels (the hidden size is ignored, head dims are never cut)
                # Torch-Pruning cuts heads only inside a scope whose width ratio is > 0; with prune_head_dims=False
                # this value opens that gate for the attention groups and cuts nothing by itself
                pruning_ratio_dict={a: 0.5 for a in attn} if n_units else None,
                ignored_layers=[model.lm_head, model.get_input_embeddings()],
                num_heads=num_heads,
                prune_num_heads=True,
                prune_head_dims=False,
                head_pruning_ratio=head_ratio,
                unwrapped_parameters=norms,
            )
            for group in pruner.step(interactive=True):
                group.prune()
            history = pruner.pruning_history()
            del pruner
    finally:
        model.requires_grad_(False)  # Torch-Pruning replaces the parameters it cuts; load_model froze them all
        for p in model.parameters():
            p.grad = None
    return history


# ------------------------------------------------------------------------------------------------ after pruning
def layer_shapes(model, arch) -> list[tuple[int, int, int]]:
    """(q rows, k rows, gate rows) of every block after pruning."""
    from lpt.arch import get_module

    return [tuple(get_module(model, arch.module_path(i, p)).out_features for p in ("q_proj", "k_proj", "gate_proj"))
            for i in range(arch.num_layers)]


def rewrite_config(model, arch) -> dict[str, int]:
    """Config (and attention modules) for the pruned widths; every layer must have the same widths."""
    from lpt.arch import get_module
    from lpt.errors import LptError

    shapes = set(layer_shapes(model, arch))
    if len(shapes) != 1:
        raise LptError(f"Torch-Pruning left layers of different widths {sorted(shapes)}; expected uniform pruning")
    (q, k, inter), = shapes
    hd = arch.head_dim
    values = {"num_attention_heads": q // hd, "num_key_value_heads": k // hd, "intermediate_size": inter,
              "head_dim": hd}
    for key, v in values.items():
        setattr(model.config, key, v)
    for i in range(arch.num_layers):
        a = get_module(model, arch.module_path(i, "q_proj").rsplit(".", 1)[0])
        a.num_key_value_groups = values["num_attention_heads"] // values["num_key_value_heads"]
    if model.get_input_embeddings().weight.shape[1] != arch.hidden_size:
        raise LptError("Torch-Pruning pruned the hidden size; it must stay unchanged")
    return values


def kept_masks(arch, history: list, gqa: str, model_name: str):
    """lpt ``Masks`` of what Torch-Pruning kept, read from its pruning history (root: o_proj columns, up_proj rows)."""
    from lpt.masks import LayerMask, Masks

    removed_q: dict[int, set[int]] = {i: set() for i in range(arch.num_layers)}
    removed_ch: dict[int, set[int]] = {i: set() for i in range(arch.num_layers)}
    paths = {arch.module_path(i, p): (i, p) for i in range(arch.num_layers) for p in ("o_proj", "up_proj")}
    for name, _is_out, idxs in history:
        if name not in paths:
            raise ValueError(f"unexpected Torch-Pruning root {name}")
        i, p = paths[name]
        if p == "o_proj":
            removed_q[i].update(int(x) // arch.head_dim for x in idxs)
        else:
            removed_ch[i].update(int(x) for x in idxs)
    g = arch.group_size
    layers = []
    for i in range(arch.num_layers):
        heads = [h for h in range(arch.num_heads) if h not in removed_q[i]]
        kv = sorted({h // g for h in heads}) if gqa == "kv-groups" else list(range(arch.num_kv_heads))
        layers.append(LayerMask(heads, kv, [c for c in range(arch.intermediate_size) if c not in removed_ch[i]]))
    masks = Masks(arch, layers, gqa=gqa, model=model_name, info={"made_by": "torch-pruning (benchmarks/tp_peer.py)"})
    masks.validate()
    return masks


def mean_loss(model, blocks: dict, n: int) -> float:
    import torch

    from lpt.models import model_device

    dev = model_device(model)
    n = min(n, int(blocks["input_ids"].shape[0]))
    with torch.no_grad():
        losses = [float(model(**{k: v[s:s + 1].to(dev) for k, v in blocks.items()}, use_cache=False).loss)
                  for s in range(n)]
    return sum(losses) / max(len(losses), 1)


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def masked_logits(dense, arch, masks, input_ids):
    """Logits of the dense model with the pruned heads and channels masked the way lpt masks them."""
    import torch

    from lpt import groups, lora
    from lpt.masks import apply_masks

    lora.inject(dense, arch, r=0, alpha=1.0)
    apply_masks(dense, masks)
    with torch.no_grad():
        return dense(input_ids=input_ids, use_cache=False).logits


# ------------------------------------------------------------------------------------------------ run
def validate(cfg: TpPeerConfig) -> None:
    from lpt.errors import LptError

    if cfg.importance not in IMPORTANCES:
        raise LptError(f"unknown --importance '{cfg.importance}' (use {', '.join(IMPORTANCES)})")
    if cfg.gqa not in ("kv-groups", "query-heads"):
        raise LptError(f"unknown --gqa mode '{cfg.gqa}' (use kv-groups, query-heads)")
    if not 0.0 <= cfg.ratio < 1.0:
        raise LptError(f"--ratio must be in [0, 1) (got {cfg.ratio})")
    if cfg.nsamples <= 0:
        raise LptError(f"--nsamples must be positive (got {cfg.nsamples})")


def run(cfg: TpPeerConfig) -> dict[str, Any]:
    import copy
    import importlib.metadata as md

    import torch
    from transformers import AutoModelForCausalLM

    import lpt
    from lpt import artifacts, calibration, models
    from lpt.arch import describe
    from lpt.errors import LptError
    from lpt.model_dir import write_model_dir
    from lpt.progress import console, progress_bar
    from lpt.slicing import linear_block_params

    validate(cfg)
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        raise LptError("torch-pruning is not installed (pip install torch-pruning)") from None
    out = artifacts.check_output_dir(cfg.output, cfg.overwrite)
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    ref = models.resolve(cfg.model)
    arch = describe(models.load_config(ref))
    if arch.per_layer:
        raise LptError(f"{cfg.model} has per-layer widths; prune the original model")
    tok = models.load_tokenizer(ref)
    data = calibration.load(cfg.calib, tok)
    if data.nsamples == 0:
        raise LptError(f"{cfg.calib} holds no calibration blocks")
    model, _ = models.load_model(ref, dtype="float32", device=cfg.device, tokenizer=False)
    blocks = data.tensors
    dev = models.model_device(model)
    example = blocks["input_ids"][:1, :min(64, data.seq_len)].to(dev)
    check_ids = blocks["input_ids"][:1].to(dev)
    n_units, n_channels = target_counts(arch, cfg.ratio, cfg.gqa, cfg.heads)
    head_ratio, channel_ratio = tp_ratios(arch, n_units, n_channels, cfg.gqa)

    params_before = models.count_params(model)
    blocks_before = linear_block_params(model, arch)
    loss_dense = mean_loss(model, blocks, 4)
    dense = copy.deepcopy(model)
    with progress_bar() as bar:
        taylor_loss = None
        if cfg.importance == "taylor":
            n = min(cfg.nsamples, data.nsamples)
            task = bar.add_task("taylor gradients", total=n)
            taylor_loss = taylor_gradients(model, arch, blocks, n, lambda k: bar.update(task, completed=k))
        task = bar.add_task("torch-pruning", total=None)
        history = prune(model, arch, cfg, example, n_units, n_channels)
        bar.update(task, total=1, completed=1)
    model.eval()
    values = rewrite_config(model, arch)
    masks = kept_masks(arch, history, cfg.gqa, cfg.model)
    blocks_after = linear_block_params(model, arch)
    params_after = models.count_params(model)
    if (blocks_before, blocks_after) != masks.block_params():
        raise LptError(f"parameter count {blocks_after} does not match Torch-Pruning's history "
                       f"{masks.block_params()[1]}")
    lpt_before, lpt_after = lpt_block_params(arch, n_units, n_channels, cfg.gqa)
    if blocks_after != lpt_after:
        raise LptError(f"Torch-Pruning kept {blocks_after} block parameters, lpt's counts give {lpt_after} "
                       f"(heads {values['num_attention_heads']}/{values['num_key_value_heads']}, "
                       f"channels {values['intermediate_size']})")

    # float64, so that the comparison sees the cut and not float32 rounding (which reorders over 30 layers)
    model.double()
    with torch.no_grad():
        logits64 = model(input_ids=check_ids, use_cache=False).logits
    diff_masked = max_diff(masked_logits(dense.double(), arch, masks, check_ids), logits64)
    del dense
    model.float()
    if not diff_masked <= MASK_RTOL * max(1.0, float(logits64.abs().max())):
        raise LptError(f"Torch-Pruning's model differs from the dense model with its heads/channels masked "
                       f"(max |diff| {diff_masked:.3g} in float64); nothing was written")
    with torch.no_grad():
        logits = model(input_ids=check_ids, use_cache=False).logits
    loss_pruned = mean_loss(model, blocks, 4)
    ratio_blocks = 1.0 - blocks_after / blocks_before
    record: dict[str, Any] = {
        "model": cfg.model,
        "ratio_requested": cfg.ratio,
        "ratio_blocks": ratio_blocks,
        "ratio_model": 1.0 - params_after / params_before,
        "lpt_ratio_blocks": 1.0 - lpt_after / lpt_before,
        "block_params": {"before": blocks_before, "after": blocks_after},
        "model_params": {"before": params_before, "after": params_after},
        "importance": cfg.importance,
        "importance_class": type(make_importance(cfg.importance)).__name__,
        "gqa": cfg.gqa,
        "pruned_per_layer": {"attention_units": n_units, "mlp_channels": n_channels,
                             "unit": "key/value group" if cfg.gqa == "kv-groups" else "query head per key/value group"},
        "widths": {"before": {"num_attention_heads": arch.num_heads, "num_key_value_heads": arch.num_kv_heads,
                              "intermediate_size": arch.intermediate_size, "head_dim": arch.head_dim},
                   "after": values},
        "torch_pruning": {"version": md.version("torch-pruning"), "pruner": "MetaPruner", "global_pruning": False,
                          "head_pruning_ratio": head_ratio, "pruning_ratio": channel_ratio,
                          "prune_num_heads": True, "prune_head_dims": False, "round_to": None,
                          "ignored_layers": ["lm_head", "embed_tokens"],
                          "num_heads": {"q_proj": arch.num_kv_heads if cfg.gqa == "kv-groups" else arch.num_heads,
                                        "k_proj": arch.num_kv_heads, "v_proj": arch.num_kv_heads}},
        "calibration": {"path": str(cfg.calib), "blocks": data.nsamples, "seq_len": data.seq_len,
                        "taylor_blocks": min(cfg.nsamples, data.nsamples) if cfg.importance == "taylor" else 0,
                        "taylor_loss": taylor_loss},
        "calib_loss": {"dense": loss_dense, "pruned": loss_pruned, "blocks": min(4, data.nsamples)},
        "checks": {"masked_dense_vs_pruned_max_abs_diff_float64": diff_masked},
        "lpt_version": lpt.__version__,
        "versions": {**artifacts.versions(), "torch_pruning": md.version("torch-pruning")},
    }
    provenance = {"stage": "tp_peer", "lpt_version": lpt.__version__, "source_model": cfg.model,
                  "config": asdict(cfg), "versions": record["versions"]}
    with artifacts.atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        write_model_dir(model, tok, tmp, dtype=torch.float32, max_shard_size="5GB", provenance=provenance)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(dev).eval()
        with torch.no_grad():
            diff_reload = max_diff(reloaded(input_ids=check_ids, use_cache=False).logits, logits)
        del reloaded
        if not diff_reload <= CHECK_ATOL:
            raise LptError(f"the saved model's logits differ from the pruned model's (max |diff| {diff_reload:.3g}); "
                           f"nothing was written")
        record["checks"]["reloaded_vs_in_memory_max_abs_diff"] = diff_reload
        record["wall_time_s"] = round(time.time() - t0, 1)
        masks.save(tmp / TP_MASKS)
        artifacts.write_json(tmp / RESULT, record)
    console.print(
        f"torch-pruning ({cfg.importance}, {cfg.gqa}): heads {arch.num_heads}/{arch.num_kv_heads} -> "
        f"{values['num_attention_heads']}/{values['num_key_value_heads']}, MLP {arch.intermediate_size} -> "
        f"{values['intermediate_size']}; block linear params {blocks_before:,} -> {blocks_after:,} "
        f"(ratio {ratio_blocks:.4f}, lpt {record['lpt_ratio_blocks']:.4f}); model params {params_before:,} -> "
        f"{params_after:,}; calib loss {loss_dense:.3f} -> {loss_pruned:.3f}; wrote {out}")
    return record


def parse_args(argv: list[str] | None = None) -> TpPeerConfig:
    ap = argparse.ArgumentParser(prog="tp_peer.py", description=__doc__.split("\n\n")[0],
                                 epilog="examples:\n" + "\n".join(__doc__.split("\n\n")[1].splitlines()),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="hub id, local HF directory, .gguf file, or the alias smollm2-135m")
    ap.add_argument("--ratio", type=float, required=True,
                    help="fraction of the transformer blocks' linear-layer parameters to remove, in [0, 1)")
    ap.add_argument("--calib", required=True, help="an `lpt calibrate` output directory (tracing input, taylor "
                                                   "gradients, loss check)")
    ap.add_argument("-o", "--output", required=True, help="output directory (a plain Hugging Face model)")
    ap.add_argument("--importance", choices=IMPORTANCES, default="l2",
                    help="l2: GroupMagnitudeImportance(p=2) (the example's default); taylor: GroupTaylorImportance "
                         "on --nsamples calibration blocks (default: l2)")
    ap.add_argument("--gqa", choices=("kv-groups", "query-heads"), default="kv-groups",
                    help="kv-groups: prune whole key/value groups (lpt's default); query-heads: the same number of "
                         "query heads in every group, k/v kept (Torch-Pruning's own GQA handling)")
    ap.add_argument("--nsamples", type=int, default=8, help="calibration blocks for --importance taylor (default 8)")
    ap.add_argument("--heads", type=int, default=None,
                    help="attention units pruned per layer, the rest from the MLP (as lpt prune --balance N; default: "
                         "the proportional balance); e.g. the count lpt's --balance search chose, for equal widths")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    a = ap.parse_args(argv)
    return TpPeerConfig(model=a.model, ratio=a.ratio, calib=a.calib, output=a.output, importance=a.importance,
                        gqa=a.gqa, nsamples=a.nsamples, heads=a.heads, device=a.device, seed=a.seed,
                        overwrite=a.overwrite)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    from lpt.errors import LptError

    try:
        run(cfg)
    except LptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
