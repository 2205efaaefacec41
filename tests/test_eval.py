"""lpt eval: perplexity protocol, lm-eval tasks (local task), unmerged adapter + masks, results file, compare."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import invoke
from lpt import lora
from lpt.masks import Masks
from lpt.arch import describe

DATA = Path(__file__).parent / "data"
TASKS = DATA / "tasks"
SEQ = 64


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """A slice of the held-out pydoc text (a few thousand tokens for the tiny tokenizer)."""
    from lpt.data import load_text

    p = tmp_path_factory.mktemp("ppltext") / "heldout.txt"
    p.write_text(load_text("builtin:pydoc:test")[:12000], encoding="utf-8")
    return p


def _load(dir_):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(dir_, dtype=torch.float32).eval()
    return m, AutoTokenizer.from_pretrained(dir_)


def reference_ppl(model, ids: list[int], seq_len: int) -> tuple[float, int, int]:
    """Straight from logits: log-softmax, pick the next token, average over all predicted tokens."""
    n = len(ids) // seq_len
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            seg = torch.tensor(ids[i * seq_len:(i + 1) * seq_len]).unsqueeze(0)
            logp = torch.log_softmax(model(seg).logits[0].double(), dim=-1)
            total -= logp[torch.arange(seq_len - 1), seg[0, 1:]].sum().item()
            count += seq_len - 1
    return math.exp(total / count), n, count


def _eval(runner, tmp_path, name, *args):
    out = tmp_path / f"{name}.json"
    r = invoke(runner, ["eval", *args, "-o", out])
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------ perplexity
def test_perplexity_equals_reference(runner, tmp_path, tiny_llama_dir, text_file):
    doc = _eval(runner, tmp_path, "ppl", tiny_llama_dir, "--ppl", text_file, "--seq-len", SEQ, "--batch-size", 3)
    model, tok = _load(tiny_llama_dir)
    ids = tok(text_file.read_text(encoding="utf-8"))["input_ids"]
    want, n, count = reference_ppl(model, ids, SEQ)
    got = doc["perplexity"][str(text_file)]
    assert got["ppl"] == pytest.approx(want, rel=1e-4)
    assert math.log(got["ppl"]) == pytest.approx(got["nll"], rel=1e-9)
    assert (got["segments"], got["tokens"], got["seq_len"]) == (n, count, SEQ)
    assert got["text_tokens"] == len(ids) and got["dropped_tokens"] == len(ids) - n * SEQ
    assert doc["protocol"]["perplexity"]["seq_len"] == SEQ
    assert doc["model"]["params"] == sum(p.numel() for p in model.parameters())
    assert doc["adapter"] is None and doc["masks"] is None
    assert {"lpt", "transformers", "torch"} <= set(doc["versions"]) and doc["wall_time_s"] > 0


def test_seq_len_capped_at_model_maximum(runner, tmp_path, tiny_llama_dir, text_file):
    """The tiny model has 512 positions: the default 2048 becomes 512, and the results say so."""
    doc = _eval(runner, tmp_path, "cap", tiny_llama_dir, "--ppl", text_file, "--max-segments", 2)
    proto = doc["protocol"]["perplexity"]
    assert (proto["seq_len"], proto["seq_len_requested"], proto["model_max_length"]) == (512, 2048, 512)
    r = doc["perplexity"][str(text_file)]
    assert (r["segments"], r["seq_len"], r["tokens"]) == (2, 512, 2 * 511)
    model, tok = _load(tiny_llama_dir)
    ids = tok(text_file.read_text(encoding="utf-8"))["input_ids"][:2 * 512]
    assert r["ppl"] == pytest.approx(reference_ppl(model, ids, 512)[0], rel=1e-4)


# ------------------------------------------------------------------------------------------------ unmerged == sliced
def _prune_outputs(model_dir: Path, out: Path, with_adapter: bool) -> tuple[Path | None, Path]:
    """What lpt prune writes: a PEFT adapter with non-zero B, and uniform masks (one kv group, a third of the MLP)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    arch = describe(m.config)
    layers = lora.inject(m, arch, r=4, alpha=8)
    torch.manual_seed(3)
    for layer in layers.values():
        if layer.r:
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    heads = [torch.tensor([False, True])] * arch.num_layers  # kv-groups: prune key/value group 1 everywhere
    chans = [torch.arange(arch.intermediate_size) % 3 == 1] * arch.num_layers
    masks = Masks.from_pruned(arch, heads, chans, "kv-groups", model=str(model_dir))
    out.mkdir(parents=True)
    adapter = None
    if with_adapter:
        lora.save_adapter(m, out, str(model_dir))
        adapter = out
    masks.save(out / "masks.json")
    return adapter, out / "masks.json"


def _sliced_dir(model_dir: Path, adapter: Path | None, masks_path: Path, out: Path) -> Path:
    """The merged (if an adapter) and sliced model, saved as a plain Hugging Face directory."""
    from lpt.slicing import slice_model

    m, _ = _load(model_dir)
    arch = describe(m.config)
    masks = Masks.load(masks_path, arch)
    if adapter is not None:
        lora.load_adapter(m, adapter, arch)
        lora.merge_lora(m, apply_masks=True)
    slice_model(m, masks, arch)
    m.save_pretrained(out)
    for f in model_dir.iterdir():
        if "token" in f.name:
            shutil.copy(f, out / f.name)
    return out


@pytest.mark.parametrize("with_adapter", [True, False], ids=["adapter+masks", "masks-only"])
def test_unmerged_equals_sliced_merged(runner, tmp_path, tiny_llama_dir, text_file, with_adapter):
    adapter, masks_path = _prune_outputs(tiny_llama_dir, tmp_path / "prune", with_adapter)
    extra = ["--adapter", adapter] if adapter else []
    ppl_args = ["--ppl", text_file, "--seq-len", SEQ, "--max-segments", 24, "--batch-size", 4]
    unmerged = _eval(runner, tmp_path, "unmerged", tiny_llama_dir, *extra, "--masks", masks_path, *ppl_args)
    sliced_dir = _sliced_dir(tiny_llama_dir, adapter, masks_path, tmp_path / "sliced")
    sliced = _eval(runner, tmp_path, "sliced", sliced_dir, *ppl_args)
    dense = _eval(runner, tmp_path, "dense", tiny_llama_dir, *ppl_args)
    src = str(text_file)
    assert unmerged["perplexity"][src]["ppl"] == pytest.approx(sliced["perplexity"][src]["ppl"], rel=1e-5)
    assert abs(unmerged["perplexity"][src]["ppl"] / dense["perplexity"][src]["ppl"] - 1) > 1e-3  # masks matter
    # the masks' parameter count is the sliced model's real size
    assert unmerged["model"]["effective_params"] == sliced["model"]["params"] < dense["model"]["params"]
    assert unmerged["masks"]["path"] == str(masks_path) and unmerged["masks"]["layout"] == "uniform"
    assert (unmerged["adapter"] is not None) == with_adapter
    if with_adapter:
        assert unmerged["adapter"]["r"] == 4

    # --compare puts them side by side; --markdown prints the same rows as a table
    r = invoke(runner, ["eval", "--compare", tmp_path / "dense.json", tmp_path / "unmerged.json"])
    assert r.exit_code == 0, r.output
    for cell in (dense["label"], unmerged["label"], f"{dense['perplexity'][src]['ppl']:.2f}",
                 f"{unmerged['perplexity'][src]['ppl']:.2f}"):
        assert cell in r.output
    r = invoke(runner, ["eval", "--compare", "--markdown", tmp_path / "dense.json", tmp_path / "sliced.json"])
    assert r.exit_code == 0, r.output
    rows = [ln for ln in r.output.splitlines() if ln.startswith("| ppl ")]
    assert len(rows) == 1 and rows[0].count("|") == 4


# ------------------------------------------------------------------------------------------------ lm-eval
def reference_choice_scores(model, tok, doc) -> tuple[int, int]:
    """(argmax of log-likelihood, argmax of log-likelihood per character), computed without lm-eval."""
    ctx = f"Question: {doc['question']}\nAnswer:"
    lls = []
    for choice in doc["choices"]:
        whole = tok.encode(ctx + " " + choice)
        n_ctx = len(tok.encode(ctx))
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
        lls.append(sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole))))
    norm = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
    return max(range(len(lls)), key=lls.__getitem__), max(range(len(norm)), key=norm.__getitem__)


def test_local_multiple_choice_task_through_lm_eval(runner, tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative data_files resolve against the YAML, not the working directory
    doc = _eval(runner, tmp_path, "mc", tiny_llama_dir, "--tasks", "lpt_tiny_mc", "--include-path", TASKS)
    res = doc["tasks"]["lpt_tiny_mc"]
    rows = [json.loads(ln) for ln in (TASKS / "lpt_tiny_mc.jsonl").read_text().splitlines()]
    model, tok = _load(tiny_llama_dir)
    picks = [reference_choice_scores(model, tok, d) for d in rows]
    acc = sum(p[0] == d["label"] for p, d in zip(picks, rows)) / len(rows)
    acc_norm = sum(p[1] == d["label"] for p, d in zip(picks, rows)) / len(rows)
    assert res["acc"] == pytest.approx(acc) and res["acc_norm"] == pytest.approx(acc_norm)
    assert res["samples"] == len(rows) and res["num_fewshot"] == 0
    assert res["metric"] == "acc" and res["score"] == res["acc"]
    assert res["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (len(rows) - 1)))
    assert doc["averages"]["paper_7task"] is None and doc["protocol"]["tasks"]["lm_eval_version"]
    assert doc["perplexity"] == {}

    few = _eval(runner, tmp_path, "mc2", tiny_llama_dir, "--tasks", "lpt_tiny_mc", "--include-path", TASKS,
                "--num-fewshot", 2, "--limit", 5)
    assert few["tasks"]["lpt_tiny_mc"]["num_fewshot"] == 2 and few["tasks"]["lpt_tiny_mc"]["samples"] == 5


def test_unmerged_adapter_runs_through_lm_eval(runner, tmp_path, tiny_llama_dir, text_file):
    """The in-memory model with LoRA layers and masks goes to lm-eval as is; masks change its answers' scores."""
    adapter, masks_path = _prune_outputs(tiny_llama_dir, tmp_path / "prune", True)
    args = ["--tasks", "lpt_tiny_mc", "--include-path", TASKS, "--ppl", text_file, "--seq-len", SEQ,
            "--max-segments", 8]
    pruned = _eval(runner, tmp_path, "pruned", tiny_llama_dir, "--adapter", adapter, "--masks", masks_path, *args)
    sliced = _eval(runner, tmp_path, "sliced", _sliced_dir(tiny_llama_dir, adapter, masks_path, tmp_path / "s"),
                   *args)
    assert pruned["tasks"]["lpt_tiny_mc"]["acc"] == sliced["tasks"]["lpt_tiny_mc"]["acc"]
    assert pruned["tasks"]["lpt_tiny_mc"]["acc_norm"] == sliced["tasks"]["lpt_tiny_mc"]["acc_norm"]
    (src,) = pruned["perplexity"]
    assert pruned["perplexity"][src]["ppl"] == pytest.approx(sliced["perplexity"][src]["ppl"], rel=1e-5)


def test_paper_average_and_score_extraction():
    from lpt.evaluation import tasks as T

    names = list(T.PAPER_TASKS)
    raw = {"results": {}, "n-shot": {}, "n-samples": {}, "versions": {}}
    for i, t in enumerate(names):
        raw["results"][t] = {"alias": t, "acc,none": 0.5 + i / 100, "acc_stderr,none": 0.01,
                             "acc_norm,none": 0.4 + i / 100, "acc_norm_stderr,none": "N/A"}
        raw["n-shot"][t], raw["n-samples"][t], raw["versions"][t] = 0, {"original": 10, "effective": 10}, 1.0
    scores = T.extract_scores(raw, names)
    want = sum(raw["results"][t][f"{T.PAPER_METRICS[t]},none"] for t in names) / 7
    assert T.paper_average(scores) == pytest.approx(want)
    assert scores["hellaswag"]["score"] == scores["hellaswag"]["acc_norm"] and scores["boolq"]["metric"] == "acc"
    assert scores["boolq"]["acc_norm_stderr"] is None
    assert T.paper_average({t: scores[t] for t in names[:6]}) is None
    assert T.parse_tasks("paper,mmlu,boolq") == names + ["mmlu"]
    # a group (mmlu-like): samples are the sum of its leaves, shots shared by them
    raw = {"results": {"g": {"acc,none": 0.3, "acc_stderr,none": 0.02}, "a": {"acc,none": 0.2}, "b": {"acc,none": 0.4}},
           "group_subtasks": {"g": ["a", "b"]}, "n-shot": {"a": 5, "b": 5},
           "n-samples": {"a": {"effective": 3}, "b": {"effective": 4}}}
    g = T.extract_scores(raw, ["g"])["g"]
    assert (g["score"], g["samples"], g["num_fewshot"], g["subtasks"]) == (0.3, 7, 5, 2)


# ------------------------------------------------------------------------------------------------ errors
def _one_line_error(r, *needles):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, r.output
    for n in needles:
        assert n in errors[0], errors[0]


def test_errors_are_one_line_and_write_nothing(runner, tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "r.json"
    base = ["eval", tiny_llama_dir, "-o", out]
    short = tmp_path / "short.txt"
    short.write_text("def f(x):\n    return x\n", encoding="utf-8")
    _one_line_error(invoke(runner, [*base, "--ppl", short, "--seq-len", 256]), "short.txt", "fewer than --seq-len 256")
    _one_line_error(invoke(runner, [*base, "--ppl", "wikitext2", "--seq-len", SEQ]), "wikitext2", "offline")
    _one_line_error(invoke(runner, [*base, "--ppl", tmp_path / "missing.txt"]), "not found")
    _one_line_error(invoke(runner, [*base]), "nothing to evaluate")
    _one_line_error(invoke(runner, [*base, "--ppl", text_file, "--masks", tmp_path / "none.json"]), "masks")
    _one_line_error(invoke(runner, [*base, "--tasks", "lpt_tiny_mcq", "--include-path", TASKS]),
                    "unknown task 'lpt_tiny_mcq'", "lpt_tiny_mc")
    other = tmp_path / "other.json"
    other.write_text('{"schema_version": 1}')
    _one_line_error(invoke(runner, ["eval", "--compare", other]), "not an lpt eval results file")
    _one_line_error(invoke(runner, ["eval", "--compare", text_file]), "not valid JSON")
    assert not out.exists() and not list(tmp_path.glob(".r.json*"))
    # an existing results file is kept unless --overwrite
    out.write_text("{}")
    _one_line_error(invoke(runner, [*base, "--ppl", text_file, "--seq-len", SEQ]), "--overwrite")
    assert out.read_text() == "{}"
    r = invoke(runner, ["eval", "--help"])
    assert r.exit_code == 0 and "--compare" in r.output and "lpt eval smollm2-135m --ppl builtin:pydoc:test" in r.output


def test_masks_for_another_model_are_refused(runner, tmp_path, tiny_llama_dir, tiny_mha_dir, text_file):
    _, masks_path = _prune_outputs(tiny_llama_dir, tmp_path / "prune", False)
    r = invoke(runner, ["eval", tiny_mha_dir, "--masks", masks_path, "--ppl", text_file, "-o", tmp_path / "x.json"])
    _one_line_error(r, "num_key_value_heads")
    assert not (tmp_path / "x.json").exists()
