"""Calibration reads only the records it needs, and data-parallel runs calibrate once (rank 0) and share the blocks."""

import json
import time
import tracemalloc

import pytest
import torch

from lpt import calibration, data
from lpt.config import CalibrateConfig


def _instruction_parquet(path, n, row_group=100_000):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = range(n)
    table = pa.table({"instruction": pa.array([f"Say the number {i}." for i in ids]),
                      "response": pa.array([f"The number is {i}." for i in ids])})
    pq.write_table(table, path, row_group_size=row_group)


def test_random_order_is_a_permutation_and_lazy():
    for n in (0, 1, 7, 1000):
        order = list(data.random_order(n, 3))
        assert sorted(order) == list(range(n))
        assert order == list(data.random_order(n, 3))  # seeded
    # small sources: the same order as shuffling the whole list (selections of small files did not change)
    recs = list(range(500))
    assert [recs[i] for i in data.random_order(500, 5)] == data.shuffled(recs, 5)
    # large ones: drawn lazily, still a permutation, and different per seed
    n = data.EXACT_SHUFFLE_MAX * 3
    head = [i for _, i in zip(range(100), data.random_order(n, 0))]
    assert len(set(head)) == 100 and all(0 <= i < n for i in head)
    assert head != [i for _, i in zip(range(100), data.random_order(n, 1))]
    small = 9
    data_max, data.EXACT_SHUFFLE_MAX = data.EXACT_SHUFFLE_MAX, 4
    try:
        assert sorted(data.random_order(small, 2)) == list(range(small))  # the lazy path runs to the end too
    finally:
        data.EXACT_SHUFFLE_MAX = data_max


def test_calibration_cost_does_not_grow_with_the_file(tmp_path, tiny_llama_dir):
    """A 1M-row parquet file calibrates like a 10k-row one: the records are read by row group and only the
    wanted rows become Python objects, so the Python memory does not grow with the file."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    small, large = tmp_path / "small.parquet", tmp_path / "large.parquet"
    _instruction_parquet(small, 10_000)
    _instruction_parquet(large, 1_000_000)
    peaks, seconds, used = {}, {}, {}
    for name, path in (("small", small), ("large", large)):
        cfg = CalibrateConfig(model=str(tiny_llama_dir), data=str(path), nsamples=32, seq_len=128)
        tracemalloc.start()
        t0 = time.perf_counter()
        train, _, meta = calibration.make_blocks(cfg, tok)
        seconds[name] = time.perf_counter() - t0
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert meta["format"] == "instruction" and train["input_ids"].shape == (32, 128)
        used[name] = meta["records_available"]
        again, _, _ = calibration.make_blocks(cfg, tok)
        assert torch.equal(again["input_ids"], train["input_ids"])  # same seed, same blocks
    assert used == {"small": 10_000, "large": 1_000_000}
    print(f"peak Python memory {peaks}, seconds {seconds}")
    assert peaks["large"] <= 5 * peaks["small"], peaks


def test_local_json_read_by_index(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    recs = [{"instruction": f"Say {i}.", "response": f"{i}."} for i in range(300)]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    stream = data.open_records(str(tmp_path / "r.jsonl"), seed=4)
    assert stream.available == 300 and set(stream.first) == {"instruction", "response"}
    got = list(stream.records())
    assert got == data.shuffled(recs, 4)


def _rank0_worker(rank, path, tok_dir, src, out_dir):
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from lpt.errors import LptError

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        if rank == 1:  # only rank 0 may read the source
            def refuse(*a, **k):
                raise AssertionError("rank 1 read the data source")

            data.open_records = refuse
        tok = AutoTokenizer.from_pretrained(tok_dir)
        cfg = CalibrateConfig(model=tok_dir, data=src, nsamples=6, seq_len=32)
        train, val, meta = calibration.make_blocks_rank0(cfg, tok)
        torch.save({"train": train, "meta": meta}, f"{out_dir}/rank{rank}.pt")
        bad = CalibrateConfig(model=tok_dir, data=src, nsamples=6, seq_len=10**8)
        try:
            calibration.make_blocks_rank0(bad, tok)
        except LptError as e:  # rank 0's error reaches every rank (no rank waits forever)
            assert "fewer than --seq-len" in str(e)
        else:
            raise AssertionError("no error")
        dist.barrier()  # nobody leaves while a peer still reads the last broadcast
    finally:
        dist.destroy_process_group()


def test_rank0_calibration_is_shared(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    src = "builtin:pydoc:train"
    torch.multiprocessing.spawn(_rank0_worker, args=(str(tmp_path / "rdzv"), str(tiny_llama_dir), src, str(tmp_path)),
                                nprocs=2, join=True)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    want, _, meta = calibration.make_blocks(
        CalibrateConfig(model=str(tiny_llama_dir), data=src, nsamples=6, seq_len=32), tok)
    for r in (0, 1):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["meta"] == meta
        for k in want:
            assert torch.equal(got["train"][k], want[k])
    # without a process group it is make_blocks
    one, _, _ = calibration.make_blocks_rank0(
        CalibrateConfig(model=str(tiny_llama_dir), data=src, nsamples=6, seq_len=32), tok)
    assert torch.equal(one["input_ids"], want["input_ids"])


@pytest.mark.parametrize("missing", ["nope.parquet", "nope.jsonl"])
def test_missing_local_files_still_one_line(tmp_path, missing):
    from lpt.errors import LptError

    with pytest.raises(LptError, match="not found"):
        data.open_records(str(tmp_path / missing), seed=0)


def test_streamed_datasets_shuffle_with_the_seed(tmp_path, monkeypatch):
    """Hub datasets are streamed through a seeded shuffle buffer (exercised offline with datasets' parquet builder)."""
    path = tmp_path / "s.parquet"
    _instruction_parquet(path, 600, row_group=100)
    monkeypatch.setattr(data, "STREAM_BUFFER", 200)
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)  # datasets waits 5 s per early stop

    def head(seed, n=20):
        stream = data._hub_stream("parquet", seed, "s", data_files=str(path), split="train")
        assert set(stream.first) == {"instruction", "response"}
        return [r["instruction"] for _, r in zip(range(n), stream.records())]

    a = head(0)
    assert a == head(0) and a != head(1)
    assert len(set(a)) == 20 and a != [f"Say the number {i}." for i in range(20)]
    # a sliced split is not streamed: loaded memory-mapped and read by index
    sliced = data.open_records("parquet", seed=0, data_files=str(path), split="train[:10%]")
    assert sliced.available == 60 and len(list(sliced.records())) == 60
