"""Data sources -> records -> fixed-length token blocks.

Sources: ``builtin:pydoc[:train|:test]`` (the standard library's pydoc topics, offline everywhere), local
``.txt``/``.json``/``.jsonl``/``.parquet`` files, and hub datasets by name. Formats: ``raw`` text packed into
blocks, and ``instruction`` records (Alpaca / LaMini fields) rendered with a prompt template, one per block.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

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
            return [{"text": read_text_file(path, source)}]
        return _load_dataset(kind, data_files=str(path), split="train", what=source)
    if source.startswith((".", "/", "~")):
        raise LptError(f"data file not found: {source}")
    return _load_dataset(source, name=subset, data_files=data_files, split=split, what=source)


TEXT_CONTROL_SHARE = 0.05  # a text source with more control / replacement characters than this is refused
_NOT_TEXT = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ufffd]")  # control characters but tab and line breaks; U+FFFD


def read_text_file(path: Path, source: str | None = None) -> str:
    """A local text file as a string: UTF-8 (a byte-order mark is dropped) and text, not binary. A file that does not
    decode, or whose characters are more than ``TEXT_CONTROL_SHARE`` control or replacement characters (binary data,
    UTF-16), is refused in one line naming it."""
    what = source or str(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LptError(f"{what} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start} does not decode); "
                       f"convert it to UTF-8 or pass a text file") from None
    bad = sum(1 for _ in _NOT_TEXT.finditer(text))
    if text and bad > TEXT_CONTROL_SHARE * len(text):
        raise LptError(f"{what} does not look like text: {bad / len(text):.0%} of its characters are control or "
                       f"replacement characters (binary data, or UTF-16?)")
    return text


def _open_dataset(path: str, *, what: str, **kwargs):
    """``datasets.load_dataset`` with None-valued options dropped and its many failure types as one line."""
    import datasets

    datasets.disable_progress_bars()
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return datasets.load_dataset(path, **kwargs)
    except Exception as e:  # datasets raises many types for offline / missing / malformed input
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LptError(f"could not load dataset '{what}': {first}") from None


def _load_dataset(path: str, *, what: str, **kwargs) -> list[dict[str, Any]]:
    return [dict(r) for r in _open_dataset(path, what=what, **kwargs)]


# ----------------------------------------------------------------------------------------------- lazy reading
EXACT_SHUFFLE_MAX = 200_000  # sources up to this many records are shuffled exactly as a list would be
STREAM_BUFFER = 10_000  # hub datasets: records in the seeded shuffle buffer of a streamed dataset
FETCH_CHUNK = 1024  # records read per request from a local file


@dataclass
class RecordStream:
    """The records of a source in a seeded random order, read on demand.

    ``first`` is one record (the fields decide the format), ``available`` the number of records (None when a
    streamed hub dataset does not say), ``records()`` yields them in the order :func:`build_blocks` uses.
    """

    first: dict[str, Any] | None
    available: int | None
    records: Any  # () -> Iterator[dict]


def random_order(n: int, seed: int) -> Iterator[int]:
    """``range(n)`` in a seeded random order, produced lazily.

    Up to ``EXACT_SHUFFLE_MAX`` items it is ``random.Random(seed).shuffle`` of the whole list (the order
    :func:`shuffled` gives, so small files select the same records as they always did); above it, indices are drawn
    one by one without replacement (memory grows with the items taken, not with ``n``), and the remainder is
    shuffled as a list only once more than half of them were taken.
    """
    rng = random.Random(seed)
    if n <= EXACT_SHUFFLE_MAX:
        order = list(range(n))
        rng.shuffle(order)
        yield from order
        return
    seen: set[int] = set()
    while len(seen) < n // 2:
        i = rng.randrange(n)
        if i not in seen:
            seen.add(i)
            yield i
    rest = [i for i in range(n) if i not in seen]
    rng.shuffle(rest)
    yield from rest


def _chunks(it: Iterator[int], size: int) -> Iterator[list[int]]:
    chunk: list[int] = []
    for i in it:
        chunk.append(i)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _indexed(n: int, seed: int, fetch, first_size: int = 64) -> Iterator[dict[str, Any]]:
    """Records ``fetch(indices)`` in :func:`random_order`; the first request is small (most runs need a few
    hundred records), later ones ``FETCH_CHUNK``."""
    order = random_order(n, seed)
    head = [i for _, i in zip(range(first_size), order)]
    yield from fetch(head)
    for chunk in _chunks(order, FETCH_CHUNK):
        yield from fetch(chunk)


def _parquet_stream(path: Path, seed: int, what: str) -> RecordStream:
    """A local parquet file read in place with pyarrow: only the row groups holding wanted records are decoded,
    one at a time, and only the wanted rows become Python objects."""
    import bisect

    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for malformed files
        raise LptError(f"could not read parquet file '{what}': {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                       ) from None
    meta = pf.metadata
    starts, acc = [], 0
    for g in range(meta.num_row_groups):
        starts.append(acc)
        acc += meta.row_group(g).num_rows
    n = acc

    def fetch(indices: list[int]) -> list[dict[str, Any]]:
        by_group: dict[int, list[tuple[int, int]]] = {}
        for pos, i in enumerate(indices):
            g = bisect.bisect_right(starts, i) - 1
            by_group.setdefault(g, []).append((pos, i - starts[g]))
        out: list[Any] = [None] * len(indices)
        for g, items in sorted(by_group.items()):
            table = pf.read_row_group(g)
            rows = table.take([local for _, local in items]).to_pylist()
            del table
            for (pos, _), row in zip(items, rows):
                out[pos] = row
        return out

    first = fetch([0])[0] if n else None
    return RecordStream(first, n, lambda: _indexed(n, seed, fetch))


def _arrow_stream(path: str, seed: int, what: str, **kwargs) -> RecordStream:
    """A dataset through ``datasets.load_dataset`` (memory-mapped Arrow, e.g. local json/jsonl files): records are
    read by index, never all turned into Python objects."""
    ds = _open_dataset(path, what=what, **kwargs)
    n = len(ds)

    def fetch(indices: list[int]) -> list[dict[str, Any]]:
        cols = ds[indices]
        return [dict(zip(cols, vals)) for vals in zip(*cols.values())] if cols else [{} for _ in indices]

    return RecordStream(dict(ds[0]) if n else None, n, lambda: _indexed(n, seed, fetch))


def _hub_stream(path: str, seed: int, what: str, **kwargs) -> RecordStream:
    """A hub dataset streamed (``streaming=True``): shards in a seeded order through a seeded shuffle buffer of
    ``STREAM_BUFFER`` records; only the records taken (plus the buffer) are downloaded."""
    import datasets

    datasets.disable_progress_bars()
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        ds = datasets.load_dataset(path, streaming=True, **kwargs)
        # the fields decide the format: from the declared features when there are any, else from one record
        first = {k: None for k in ds.features} if ds.features else next(iter(ds), None)
    except Exception as e:  # datasets raises many types for offline / missing / malformed input
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LptError(f"could not load dataset '{what}': {first_line}") from None
    split = getattr(ds, "split", None) or kwargs.get("split")
    splits = getattr(getattr(ds, "info", None), "splits", None) or {}
    available = getattr(splits.get(str(split)) if hasattr(splits, "get") else None, "num_examples", None) or None
    shuffled_ds = ds.shuffle(seed=seed, buffer_size=STREAM_BUFFER)
    return RecordStream(dict(first) if first is not None else None, available,
                        lambda: (dict(r) for r in shuffled_ds))


def open_records(source: str, *, seed: int, subset: str | None = None, split: str = "train",
                 data_files: str | None = None) -> RecordStream:
    """A source's records in a seeded random order, read lazily (what calibration uses; see :class:`RecordStream`).

    builtin and .txt sources are read whole (they are small); local .parquet files are read in place by row group,
    local .json/.jsonl through datasets' memory-mapped Arrow cache, by index; hub datasets are streamed (a sliced
    split such as ``train[:10%]`` is loaded memory-mapped and read by index instead). Sources of
    up to ``EXACT_SHUFFLE_MAX`` records (all builtin and .txt ones) give the same order as
    ``shuffled(load_records(...), seed)``.
    """
    path = Path(source).expanduser()
    kind = LOCAL_SUFFIXES.get(path.suffix.lower())
    is_local = not source.startswith("builtin:") and (kind is not None or path.exists())
    if is_local and path.is_file() and kind == "parquet":
        return _parquet_stream(path, seed, source)
    if is_local and path.is_file() and kind == "json":
        return _arrow_stream("json", seed, source, data_files=str(path), split="train")
    if source.startswith("builtin:") or is_local or source.startswith((".", "/", "~")):
        records = load_records(source, subset=subset, split=split, data_files=data_files)  # errors as before
        return RecordStream(records[0] if records else None, len(records),
                            lambda: (records[i] for i in random_order(len(records), seed)))
    if "[" in (split or ""):  # split slicing (train[:10%]) needs the non-streaming loader
        return _arrow_stream(source, seed, source, name=subset, data_files=data_files, split=split)
    return _hub_stream(source, seed, source, name=subset, data_files=data_files, split=split)


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


def pack_instructions(records: Iterable[dict], tokenizer, seq_len: int, n_blocks: int, template: str,
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


def build_blocks(records: list[dict] | RecordStream, tokenizer, *, fmt: str, seq_len: int, n_blocks: int, seed: int,
                 template: str = "alpaca", train_on_inputs: bool = False, text_field: str | None = None,
                 source: str = "data", progress=None) -> tuple[Blocks, str]:
    """Records (a list, shuffled here with ``seed``, or a :class:`RecordStream`, already in its seeded order and
    read only as far as needed) -> blocks. Returns the blocks and the resolved format."""
    if n_blocks <= 0:
        raise LptError(f"--nsamples must be positive (got {n_blocks})")
    if isinstance(records, RecordStream):
        head = [records.first] if records.first is not None else []
        fmt = detect_format(head, fmt, source)
        records = records.records()
    else:
        head = records
        fmt = detect_format(records, fmt, source)
        records = shuffled(records, seed)
    if fmt == "raw":
        field = detect_text_field(head, text_field, source)
        blocks = pack_raw((str(r[field]) for r in records if r.get(field)), tokenizer, seq_len, n_blocks,
                          progress=progress)
        if len(blocks) == 0:
            raise LptError(f"'{source}' has fewer than --seq-len {seq_len} tokens; lower --seq-len")
    else:
        blocks = pack_instructions(records, tokenizer, seq_len, n_blocks, template, train_on_inputs, progress)
        if len(blocks) == 0:
            raise LptError(f"no instruction record of '{source}' fits in --seq-len {seq_len}; raise --seq-len")
    return blocks, fmt
