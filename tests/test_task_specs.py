"""Task specs (`TASK:N`), nested seeded subsets (`--samples`) and per-document records, without lm-eval's data."""

from types import SimpleNamespace

import pytest

from lpt.errors import LptError
from lpt.evaluation import tasks as T


def test_task_specs_with_shots():
    assert T.parse_task_specs("paper,mmlu:5") == [(t, None) for t in T.PAPER_TASKS] + [("mmlu", 5)]
    assert T.parse_task_specs("boolq:0,boolq:3") == [("boolq", 0)]  # the first one wins
    assert T.parse_tasks("paper:0,mmlu:5") == [*T.PAPER_TASKS, "mmlu"]
    with pytest.raises(LptError, match="whole number"):
        T.parse_task_specs("mmlu:five")


def _prepared(sizes):
    leaves = {name: [SimpleNamespace(task_name=name, eval_docs=list(range(n)))] for name, n in sizes.items()}
    return T.Prepared(list(sizes), None, [], leaves)


def test_subsets_are_seeded_nested_and_capped():
    p = _prepared({"a": 50, "b": 7})
    small, large = T.subsample(p, 5, seed=1), T.subsample(p, 20, seed=1)
    assert len(small["a"]) == 5 and len(large["a"]) == 20 and set(small["a"]) <= set(large["a"])
    assert small["a"] == sorted(small["a"]) and large["b"] == list(range(7))  # all of a task with fewer documents
    assert T.subsample(p, 5, seed=1) == small and T.subsample(p, 5, seed=2)["a"] != small["a"]


def test_per_doc_scores_by_document():
    p = _prepared({"a": 10})
    raw = {"samples": {"a": [{"doc_id": 7, "acc": 1.0, "acc_norm": 0.0}, {"doc_id": 2, "acc": 0.0, "acc_norm": 1.0}]}}
    assert T.per_doc(raw, p)["a"] == {"ids": ["2", "7"], "acc": [0.0, 1.0], "acc_norm": [1.0, 0.0]}
