"""Data sources -> records -> fixed-length token blocks.

Sources: ``builtin:pydoc[:train|:test]`` (the standard library's pydoc topics, offline everywhere), local
``.txt``/``.json``/``.jsonl``/``.parquet`` files, and hub datasets by name. Formats: ``raw`` text packed into
blocks, and ``instruction`` records (Alpaca / LaMini fields) rendered with a prompt template, one per block.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from lpt.errors import LptError

BUILTIN_PYDOC = "builtin:pydoc"
PYDOC_PARTS = ("train", "test")
PYDOC_TEST_SHARE = 0.15  # the held-out part: topics in hash order until they hold 15% of the characters
TEXT_FIELDS = ("text", "content", "document")
INSTRUCTION_FIELDS = ("instruction",)
RESPONSE_FIELDS = ("response", "output")
INPUT_FIELDS = ("input", "context")
LOCAL_SUFFIXES = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
FORMATS = ("auto", "raw", "instruction")
TEMPLATES = ("alpaca", "chat")
IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


# ----------------------------------------------------------------------------------------------- sources
def pydoc_topics(part: str | None = None) -> list[tuple[str, str]]:
    """(topic, text) pairs of ``pydoc_data.topics``; ``part`` selects a deterministic disjoint split."""
    import pydoc_data.topics

    items = sorted(pydoc_data.topics.topics.items())
    if part is None:
        return items
    if part not in PYDOC_PARTS:
        raise LptError(f"unknown part '{part}' of {BUILTIN_PYDOC} (use {BUILTIN_PYDOC}:train or {BUILTIN_PYDOC}:test)")

    # Topics in a fixed pseudo-random order (hash of the name); the first ones, up to 15% of all characters, are the
    # held-out part. Splitting by volume (not by count) leaves the test part long enough for 2048-token segments.
    by_hash = sorted(items, key=lambda kv: hashlib.sha256(kv[0].encode()).hexdigest())
    total, acc, test = sum(len(v) for _, v in items), 0, set()
    for name, text in by_hash:
        if acc >= PYDOC_TEST_SHARE * total:
            break
        test.add(name)
        acc += len(text)
    return [(k, v) for k, v in items if (k in test) == (part == "test")]


def describe_source(source: str) -> str:
    return "local file" if Path(source).suffix in LOCAL_SUFFIXES and Path(source).exists() else (
        "builtin" if source.startswith("builtin:") else "hub dataset")


def load_records(
    source: str,
    *,
    subset: str | None = None,
    split: str = "train",
    data_files: str | None = None,
) -> list[dict[str, Any]]:
    """Read a source into a list of dict records (raw text sources give ``{"text": ...}``)."""
    if source.startswith("builtin:"):
        parts = source.split(":")
        if parts[:2] != ["builtin", "pydoc"] or len(parts) > 3:
            raise LptError(f"unknown builtin source '{source}' (available: {BUILTIN_PYDOC}, {BUILTIN_PYDOC}:train, "
                           f"{BUILTIN_PYDOC}:test)")
        return [{"text": text, "topic": name} for name, text in pydoc_topics(parts[2] if len(parts) == 3 else None)]
    path = Path(source).expanduser()
    kind = LOCAL_SUFFIXES.get(path.suffix.lower())
    if kind is not None or path.exists():
        if not path.is_file():
            raise LptError(f"data file not found: {source}")
        if kind is None:
            raise LptError(f"unsupported data file type '{path.suffix}' (use {', '.join(LOCAL_SUFFIXES)})")
        if kind == "text":
            return [{"text": path.read_text(encoding="utf-8", errors="replace")}]
        return _load_dataset(kind, data_files=str(path), split="train", what=source)
    if source.startswith((".", "/", "~")):
        raise LptError(f"data file not found: {source}")
    return _load_dataset(source, name=subset, data_files=data_files, split=split, what=source)


def _load_dataset(path: str, *, what: str, **kwargs) -> list[dict[str, Any]]:
    import datasets

    datasets.disable_progress_bars()
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        ds = datasets.load_dataset(path, **kwargs)
    except Exception as e:  # datasets raises many types for offline / missing / malformed input
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LptError(f"could not load dataset '{what}': {first}") from None
    return [dict(r) for r in ds]


def load_text(source: str, **kwargs) -> str:
    """The whole text of a raw source, documents joined by blank lines (for perplexity)."""
    records = load_records(source, **kwargs)
    field = detect_text_field(records, None, source)
    return "\n\n".join(str(r[field]) for r in records if r.get(field))


# ----------------------------------------------------------------------------------------------- formats
def detect_text_field(records: Sequence[dict], text_field: str | None, source: str) -> str:
    if not records:
        raise LptError(f"data source '{source}' is empty")
    fields = list(records[0].keys())
    if text_field:
        if text_field not in records[0]:
            raise LptError(f"field '{text_field}' not found in '{source}' (fields: {', '.join(fields)})")
        return text_field
    for f in TEXT_FIELDS:
        if f in records[0]:
            return f
    raise LptError(f"no text field in '{source}' (fields: {', '.join(fields)}); pass --text-field")


def detect_format(records: Sequence[dict], fmt: str, source: str) -> str:
    if fmt not in FORMATS:
        raise LptError(f"unknown format '{fmt}' (use {', '.join(FORMATS)})")
    if not records:
        raise LptError(f"data source '{source}' is empty")
    fields = set(records[0].keys())
    is_instr = bool(fields & set(INSTRUCTION_FIELDS)) and bool(fields & set(RESPONSE_FIELDS))
    if fmt == "auto":
        return "instruction" if is_instr else "raw"
    if fmt == "instruction" and not is_instr:
        raise LptError(
            f"--format instruction needs fields 'instruction' and 'response' or 'output' in '{source}' "
            f"(fields: {', '.join(sorted(fields))})"
        )
    return fmt


def render_prompt(record: dict, template: str, tokenizer=None) -> tuple[str, str]:
    """(prompt, response) text of one instruction record."""
    instruction = str(record.get("instruction") or "").strip()
    response = next((str(record[f]) for f in RESPONSE_FIELDS if record.get(f) is not None), "")
    inp = next((str(record[f]).strip() for f in INPUT_FIELDS if record.get(f)), "")
    if template == "alpaca":
        prompt = ALPACA_PROMPT_INPUT.format(instruction=instruction, input=inp) if inp else \
            ALPACA_PROMPT.format(instruction=instruction)
        return prompt, response
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise LptError("--template chat needs a tokenizer with a chat template")
        user = f"{instruction}\n\n{inp}" if inp else instruction
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                               add_generation_prompt=True)
        return prompt, response
    raise LptError(f"unknown template '{template}' (use {', '.join(TEMPLATES)})")


# ----------------------------------------------------------------------------------------------- blocks
@dataclass
class Blocks:
    input_ids: list[list[int]]
    attention_mask: list[list[int]]
    labels: list[list[int]]
    skipped: int = 0  # records dropped (instruction prompts that leave no room for the response)

    def __len__(self) -> int:
        return len(self.input_ids)


def pack_raw(texts: Iterable[str], tokenizer, seq_len: int, n_blocks: int, separator: str = "\n\n",
             progress=None) -> Blocks:
    """Tokenise texts in order and pack the stream into ``n_blocks`` non-overlapping blocks of ``seq_len``."""
    need = n_blocks * seq_len
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text + separator, add_special_tokens=False)["input_ids"])
        if progress is not None:
            progress(min(len(ids), need))
        if len(ids) >= need:
            break
    n = min(n_blocks, len(ids) // seq_len)
    blocks = [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]
    return Blocks(blocks, [[1] * seq_len for _ in blocks], [list(b) for b in blocks])


def encode_instruction(record: dict, tokenizer, seq_len: int, template: str, train_on_inputs: bool):
    """One padded block for one instruction record, or None if the prompt leaves no room for the response."""
    prompt, response = render_prompt(record, template, tokenizer)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and template == "alpaca":
        p = [tokenizer.bos_token_id] + p
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        r = r + [tokenizer.eos_token_id]
    if len(p) >= seq_len:
        return None
    ids = (p + r)[:seq_len]
    labels = (list(ids) if train_on_inputs else [IGNORE_INDEX] * len(p) + ids[len(p):])
    pad = seq_len - len(ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return ids + [pad_id] * pad, [1] * len(ids) + [0] * pad, labels + [IGNORE_INDEX] * pad


def pack_instructions(records: Sequence[dict], tokenizer, seq_len: int, n_blocks: int, template: str,
                      train_on_inputs: bool, progress=None) -> Blocks:
    out = Blocks([], [], [])
    for rec in records:
        enc = encode_instruction(rec, tokenizer, seq_len, template, train_on_inputs)
        if enc is None:
            out.skipped += 1
            continue
        out.input_ids.append(enc[0])
        out.attention_mask.append(enc[1])
        out.labels.append(enc[2])
        if progress is not None:
            progress(len(out))
        if len(out) >= n_blocks:
            break
    return out


def shuffled(records: list, seed: int) -> list:
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in order]


def build_blocks(records: list[dict], tokenizer, *, fmt: str, seq_len: int, n_blocks: int, seed: int,
                 template: str = "alpaca", train_on_inputs: bool = False, text_field: str | None = None,
                 source: str = "data", progress=None) -> tuple[Blocks, str]:
    """Records -> blocks. Returns the blocks and the resolved format."""
    if seq_len <= 0:
        raise LptError(f"--seq-len must be positive (got {seq_len})")
    if n_blocks <= 0:
        raise LptError(f"--nsamples must be positive (got {n_blocks})")
    fmt = detect_format(records, fmt, source)
    records = shuffled(records, seed)
    if fmt == "raw":
        field = detect_text_field(records, text_field, source)
        blocks = pack_raw((str(r[field]) for r in records if r.get(field)), tokenizer, seq_len, n_blocks,
                          progress=progress)
        if len(blocks) == 0:
            raise LptError(f"'{source}' has fewer than --seq-len {seq_len} tokens; lower --seq-len")
    else:
        blocks = pack_instructions(records, tokenizer, seq_len, n_blocks, template, train_on_inputs, progress)
        if len(blocks) == 0:
            raise LptError(f"no instruction record of '{source}' fits in --seq-len {seq_len}; raise --seq-len")
    return blocks, fmt
