"""``process_docs`` functions of lpt's local task copies (``lpt.evaluation.local_tasks``), referenced from the task
YAMLs lpt writes as ``!function lpt.evaluation.task_docs.NAME``."""

from __future__ import annotations


def boolq_label(dataset):
    """google/boolq's documents (``answer``: bool) with super_glue's ``label`` (0 = no, 1 = yes), which lm-eval's
    ``boolq`` task reads; the other fields are unchanged."""
    return dataset.map(lambda doc: {"label": int(bool(doc["answer"]))})
