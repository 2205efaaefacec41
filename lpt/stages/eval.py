"""``lpt eval``: perplexity and lm-evaluation-harness tasks -> one results JSON (schema: lpt.evaluation.results).

Works on any model ``lpt`` can load (hub id, local directory, sliced model, .gguf, alias) and on a base model with
a LoRA adapter and group masks applied without merging (``--adapter DIR --masks FILE``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lpt import artifacts, lora, models, quiet
from lpt.arch import describe
from lpt.config import EvalConfig, check
from lpt.errors import LptError
from lpt.evaluation import local_tasks
from lpt.evaluation import perplexity as P
from lpt.evaluation import results as R
from lpt.evaluation import tasks as T
from lpt.masks import Masks
from lpt.progress import console, progress_bar


def validate(cfg: EvalConfig) -> None:
    """The config's rules (``lpt.config.check``), then what it asks for and the files it names."""
    check(cfg)
    if not parse_ppl(cfg.ppl) and not T.parse_tasks(cfg.tasks):
        raise LptError("nothing to evaluate: pass --ppl SOURCE[,SOURCE] and/or --tasks TASK[,TASK]")
    if cfg.adapter is not None and not Path(cfg.adapter).is_dir():
        raise LptError(f"adapter directory not found: {cfg.adapter}")
    if cfg.masks is not None and not Path(cfg.masks).is_file():
        raise LptError(f"masks file not found: {cfg.masks}")
    if cfg.include_path is not None and not Path(cfg.include_path).is_dir():
        raise LptError(f"--include-path {cfg.include_path} is not a directory")
    if cfg.task_data not in local_tasks.TASK_DATA and not Path(cfg.task_data).expanduser().is_dir():
        raise LptError(f"--task-data must be {', '.join(local_tasks.TASK_DATA)} or a directory "
                       f"(got {cfg.task_data})")
    T.parse_batch_size(cfg.task_batch_size)


def parse_ppl(spec: str | None) -> list[str]:
    out: list[str] = []
    for s in (spec or "").split(","):
        if s.strip() and s.strip() not in out:
            out.append(s.strip())
    return out


# ----------------------------------------------------------------------------------------------- loading
def load_for_eval(model: str, *, adapter: str | None = None, masks: str | None = None, dtype: str = "auto",
                  device: str = "auto", revision: str | None = None, trust_remote_code: bool = False,
                  tokenizer=None):
    """Load MODEL, optionally with a LoRA adapter and masks applied without merging.

    Returns ``(model, tokenizer, info)``; ``info`` has the ``model`` / ``adapter`` / ``masks`` records of the
    results file. With masks but no adapter, rank-0 LoRA layers carry the masks. Pass ``tokenizer`` when it is
    already loaded (it is not loaded again).
    """
    loaded = models.load(model, models.LoadOptions(dtype=dtype, device=device, revision=revision,
                                                   trust_remote_code=trust_remote_code, tokenizer=tokenizer is None,
                                                   adapter=adapter, masks=masks))
    m, mk, acfg = loaded.model, loaded.masks, loaded.adapter_config
    tok = loaded.tokenizer if tokenizer is None else tokenizer
    base_params = effective = models.count_params(m) - lora.lora_param_count(m)
    adapter_info = masks_info = None
    if acfg is not None:
        adapter_info = {"path": str(adapter), "r": acfg.get("r"), "lora_alpha": acfg.get("lora_alpha"),
                        "target_modules": acfg.get("target_modules"), "base_model": acfg.get("base_model_name_or_path")}
    if mk is not None:
        before, after = mk.block_params()
        effective = base_params - (before - after)
        masks_info = {"path": str(masks), "layout": mk.width_layout(), "gqa": mk.gqa,
                      "blocks_before": before, "blocks_after": after, "ratio_blocks": 1.0 - after / before}
    ref = getattr(m, "lpt_ref", None)
    dev = next(m.parameters()).device
    model_info = {
        "name": model,
        "path": getattr(ref, "path", model),
        "gguf_file": getattr(ref, "gguf_file", None),
        "model_type": getattr(m.config, "model_type", None),
        "dtype": str(next(p for p in m.parameters() if p.is_floating_point()).dtype).replace("torch.", ""),
        "device": str(dev),
        "params": base_params,
        "effective_params": effective,
        "tokenizer_fingerprint": artifacts.tokenizer_fingerprint(tok),
    }
    return m, tok, {"model": model_info, "adapter": adapter_info, "masks": masks_info}


# ----------------------------------------------------------------------------------------------- stages
@dataclass
class PplPlan:
    """Perplexity inputs checked before the model loads: tokenised segments per source, and the protocol."""

    sources: list[tuple[str, Any, Any, dict[str, Any]]]  # (source, all ids, segments [n, seq_len], description)
    protocol: dict[str, Any]


def plan_perplexity(cfg: EvalConfig, tok, config) -> PplPlan:
    """Read, tokenise and segment every ``--ppl`` source (a source shorter than one segment is an error here)."""
    seq_len, mx = P.effective_seq_len(cfg.seq_len, config)
    if seq_len < cfg.seq_len:
        console.print(f"[yellow]note:[/] --seq-len {cfg.seq_len} exceeds the model's maximum of {mx} positions; "
                      f"using {seq_len}")
    sources = []
    for src in parse_ppl(cfg.ppl):
        text, desc = P.load_source(src)
        ids = P.tokenize(tok, text)
        caps = [x for x in (cfg.max_segments, P.source_max_segments(src)) if x]
        sources.append((src, ids, P.segment(ids, seq_len, min(caps) if caps else 0, src), desc))
    protocol = {**P.PROTOCOL, "seq_len": seq_len, "seq_len_requested": cfg.seq_len, "model_max_length": mx,
                "batch_size": cfg.batch_size, "max_segments": cfg.max_segments or None}
    return PplPlan(sources, protocol)


def eval_perplexity(model, plan: PplPlan, batch_size: int) -> dict[str, Any]:
    """Perplexity of every planned source, with a progress bar per source."""
    out: dict[str, Any] = {}
    with progress_bar() as bar:
        for src, ids, segs, desc in plan.sources:
            t0 = time.perf_counter()
            task = bar.add_task(f"ppl {src}", total=segs.shape[0])
            r = P.evaluate_segments(model, segs, batch_size, progress=lambda n, t=task: bar.update(t, completed=n))
            if not math.isfinite(r["nll"]):
                raise LptError(f"ppl {src}: the loss is {r['nll']}: the model (with its adapter / masks) gives "
                               f"non-finite log-probabilities, so its weights are broken; no results were written")
            r.update(text_tokens=int(ids.numel()), dropped_tokens=int(ids.numel()) - segs.numel(), source=desc,
                     wall_time_s=round(time.perf_counter() - t0, 3))
            out[src] = r
    return out


def eval_tasks(model, tok, cfg: EvalConfig, prepared) -> tuple[dict[str, Any], dict[str, Any]]:
    names = T.parse_tasks(cfg.tasks)
    samples = T.subsample(prepared, cfg.samples, cfg.samples_seed) if cfg.samples else None
    raw = T.run_tasks(model, tok, prepared, batch_size=cfg.task_batch_size, limit=cfg.limit, samples=samples,
                      log_samples=cfg.per_doc, debug=quiet.debug())
    scores = T.extract_scores(raw, names)
    docs = T.per_doc(raw, prepared) if cfg.per_doc else {}
    for name, info in T.task_splits(prepared).items():
        scores[name].update(info)
        if name in docs:
            scores[name]["per_doc"] = docs[name]
    rc = raw.get("config", {})
    protocol = {
        "harness": "lm-evaluation-harness",
        "lm_eval_version": raw.get("lm_eval_version"),
        "num_fewshot": cfg.num_fewshot,
        "limit": cfg.limit,
        "samples": {"per_task": cfg.samples, "seed": cfg.samples_seed} if cfg.samples else None,
        "batch_size": cfg.task_batch_size,
        "include_path": cfg.include_path,
        "task_data": prepared.task_data(),
        "paper_metrics": dict(T.PAPER_METRICS),
        "seeds": {k: rc.get(k) for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")},
        "max_length": raw.get("max_length"),
    }
    return scores, protocol


def precheck_artifacts(cfg: EvalConfig, config) -> None:
    """Refuse an adapter or masks file that does not fit MODEL before the weights are loaded."""
    a = describe(config)
    if cfg.adapter is not None:
        lora.read_adapter(cfg.adapter)
    if cfg.masks is not None:
        if a.per_layer:
            raise LptError(f"{cfg.model} is already sliced (per-layer widths); --masks applies to the unsliced model")
        Masks.load(cfg.masks, a)


def warn_tp(sizes, config, masks: str | None = None) -> None:
    """``--tp``: say when the model (with ``masks``, its pruned shape) does not shard at a size asked for."""
    if not sizes:
        return
    from lpt.budget import tp_warnings

    a = describe(config)
    for line in tp_warnings(a, sizes, Masks.load(masks, a) if masks else None):
        console.print(f"[yellow]warning:[/] {line}")


def default_label(cfg: EvalConfig) -> str:
    if cfg.label:
        return cfg.label
    name = Path(cfg.model.rstrip("/")).name or cfg.model
    if cfg.adapter:
        name += f"+{Path(cfg.adapter.rstrip('/')).name}"
    elif cfg.masks:
        name += f"+{Path(cfg.masks).parent.name or 'masks'}"
    return name


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Everything ``run`` does except writing the file: check inputs, load, measure, return the results document.

    Sources, segments, task names and task data are all checked before the model is loaded, so bad input fails
    in seconds.
    """
    validate(cfg)
    t0 = time.perf_counter()
    if cfg.adapter and cfg.masks is None and (Path(cfg.adapter) / artifacts.MASKS).is_file():
        console.print(f"[yellow]note:[/] {cfg.adapter} holds {artifacts.MASKS} but --masks was not given: "
                      f"evaluating the adapter on the unpruned model")
    ppl_plan = tasks_plan = tok = None
    ref = models.resolve(cfg.model)
    if parse_ppl(cfg.ppl) or cfg.masks or cfg.adapter or cfg.tp:
        config = models.load_config(ref, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
        precheck_artifacts(cfg, config)
        warn_tp(cfg.tp, config, cfg.masks)
    if parse_ppl(cfg.ppl):
        tok = models.load_tokenizer(ref, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        ppl_plan = plan_perplexity(cfg, tok, config)
    if T.parse_tasks(cfg.tasks):
        tasks_plan = T.prepare(T.parse_task_specs(cfg.tasks), cfg.include_path, debug=quiet.debug(),
                               task_data=cfg.task_data, num_fewshot=cfg.num_fewshot)
    try:
        model, tok, info = load_for_eval(cfg.model, adapter=cfg.adapter, masks=cfg.masks, dtype=cfg.dtype,
                                         device=cfg.device, revision=cfg.revision,
                                         trust_remote_code=cfg.trust_remote_code, tokenizer=tok)
        protocol: dict[str, Any] = {}
        ppl: dict[str, Any] = {}
        scores: dict[str, Any] = {}
        if ppl_plan is not None:
            ppl, protocol["perplexity"] = eval_perplexity(model, ppl_plan, cfg.batch_size), ppl_plan.protocol
        if tasks_plan is not None:
            scores, protocol["tasks"] = eval_tasks(model, tok, cfg, tasks_plan)
    finally:
        if tasks_plan is not None:
            tasks_plan.cleanup()
    quoted = [s["score"] for s in scores.values() if s.get("score") is not None]
    return {
        "schema_version": artifacts.RESULTS_SCHEMA,
        "kind": "lpt-eval",
        "label": default_label(cfg),
        **info,
        "protocol": protocol,
        "perplexity": ppl,
        "tasks": scores,
        "averages": {"paper_7task": T.paper_average(scores),
                     "mean_score": sum(quoted) / len(quoted) if quoted else None},
        "versions": artifacts.versions(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_time_s": round(time.perf_counter() - t0, 3),
    }


@artifacts.claims_output  # a second run on the same output is refused while this one lives
def run(cfg: EvalConfig) -> Path:
    out = Path(cfg.output)
    if out.exists() and not cfg.overwrite:
        raise LptError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and out.is_dir():
        raise LptError(f"output {out} is a directory; -o names the results JSON file")
    doc = evaluate(cfg)
    with artifacts.atomic_file(out, overwrite=cfg.overwrite) as tmp:
        artifacts.write_json(tmp, doc)
    console.print(R.rich_table([doc], title=f"lpt eval: {doc['label']}"))
    for src, r in doc["perplexity"].items():
        plural = "s" if r["segments"] != 1 else ""
        console.print(f"ppl {src} = {R.fmt_ppl(r['ppl'])} ({r['segments']} segment{plural} x {r['seq_len']} tokens, "
                      f"{r['tokens']} predicted tokens; {r['dropped_tokens']} of {r['text_tokens']} text tokens not "
                      f"evaluated)")
    console.print(f"wrote {out} ({doc['wall_time_s']:.1f} s)")
    return out
