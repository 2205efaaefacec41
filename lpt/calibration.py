"""Calibration blocks: built from a data source (``make_blocks``) and read back from a calibrate output directory
(``load``). ``lpt calibrate`` writes what ``make_blocks`` returns; ``prune`` (inline calibration with ``--data``,
or ``--calib DIR``), ``slice --reconstruct`` and the benchmarks read it.

A calibrate output directory:
  tokens.safetensors      input_ids, attention_mask, labels (int64, [nsamples, seq_len]) + string metadata
  val_tokens.safetensors  the held-out blocks (only with --val-fraction > 0)
  calib.json              source, format, template, tokenizer name + vocabulary fingerprint, counts, seed, version
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lpt import artifacts
from lpt.config import CalibrateConfig, check
from lpt.errors import LptError, MismatchError


@dataclass
class CalibData:
    tensors: dict[str, Any]  # input_ids / attention_mask / labels
    val: dict[str, Any] | None
    meta: dict[str, Any]

    @property
    def nsamples(self) -> int:
        return int(self.tensors["input_ids"].shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tensors["input_ids"].shape[1])


def make_blocks(cfg: CalibrateConfig, tokenizer, *, progress=None):
    """Build train and validation blocks (as tensors) and the metadata record, without writing anything."""
    import torch

    from lpt import data

    check(cfg)
    n_val = math.ceil(cfg.nsamples * cfg.val_fraction) if cfg.val_fraction > 0 else 0
    records = data.open_records(cfg.data, seed=cfg.seed, subset=cfg.subset, split=cfg.split, data_files=cfg.data_files)
    blocks, fmt = data.build_blocks(
        records, tokenizer, fmt=cfg.format, seq_len=cfg.seq_len, n_blocks=cfg.nsamples + n_val, seed=cfg.seed,
        template=cfg.template, train_on_inputs=cfg.train_on_inputs, text_field=cfg.text_field, source=cfg.data,
        progress=progress,
    )
    n_train = cfg.nsamples
    if len(blocks) < cfg.nsamples + n_val:
        # Too little data for the request: keep every training block we can and say so in calib.json.
        n_val = min(n_val, max(0, len(blocks) - 1))
        n_train = len(blocks) - n_val

    def _t(rows):
        return torch.tensor(rows, dtype=torch.long) if rows else torch.zeros((0, cfg.seq_len), dtype=torch.long)

    def _split(lo, hi):
        return {
            "input_ids": _t(blocks.input_ids[lo:hi]),
            "attention_mask": _t(blocks.attention_mask[lo:hi]),
            "labels": _t(blocks.labels[lo:hi]),
        }

    train = _split(0, n_train)
    val = _split(n_train, n_train + n_val) if n_val else None
    import lpt

    meta = {
        "schema_version": artifacts.CALIB_SCHEMA,
        "lpt_version": lpt.__version__,
        "source": cfg.data,
        "subset": cfg.subset,
        "split": cfg.split,
        "data_files": cfg.data_files,
        "format": fmt,
        "template": cfg.template if fmt == "instruction" else None,
        "train_on_inputs": cfg.train_on_inputs if fmt == "instruction" else None,
        "tokenizer": cfg.model,
        "tokenizer_fingerprint": artifacts.tokenizer_fingerprint(tokenizer),
        "seq_len": cfg.seq_len,
        "seed": cfg.seed,
        "nsamples_requested": cfg.nsamples,
        "nsamples": n_train,
        "val_samples": n_val,
        "records_available": records.available,
        "records_skipped": blocks.skipped,
        "loss_tokens": loss_tokens(train),
    }
    if meta["loss_tokens"] == 0:
        raise LptError(f"the {n_train} blocks from '{cfg.data}' have no token to predict (every label is masked); "
                       f"raise --seq-len or pass --train-on-inputs")
    return train, val, meta


def loss_tokens(tensors: dict[str, Any]) -> int:
    """Tokens the LM loss is computed on: labels after the first position (the model predicts token t + 1 from
    tokens up to t) that are not masked."""
    from lpt.data import IGNORE_INDEX

    return int((tensors["labels"][:, 1:] != IGNORE_INDEX).sum())


def make_blocks_rank0(cfg: CalibrateConfig, tokenizer, *, progress=None):
    """:func:`make_blocks` on rank 0 only, its result shared with every rank (data parallel runs read and tokenise
    the source once, not once per process). Same return value as :func:`make_blocks`; an error on rank 0 is raised
    on every rank. Without a process group it is :func:`make_blocks`."""
    from lpt import distributed

    if not (distributed.is_initialized() and distributed.world_size() > 1):
        return make_blocks(cfg, tokenizer, progress=progress)
    result = error = None
    if distributed.rank() == 0:
        try:
            result = make_blocks(cfg, tokenizer, progress=progress)
        except LptError as e:
            error = str(e)
    error, result = distributed.broadcast_object((error, result))
    if error is not None:
        raise LptError(error)
    return result


def load(path: str | Path, tokenizer=None) -> CalibData:
    """Read a calibrate output directory; with ``tokenizer``, refuse one that does not match the blocks. Blocks
    without a token to predict (or none at all) are refused (:func:`check_blocks`)."""
    path = Path(path)
    if not (path / artifacts.TOKENS).is_file() or not (path / artifacts.CALIB_META).is_file():
        raise LptError(f"{path} is not a calibrate output (missing {artifacts.TOKENS} or {artifacts.CALIB_META})")
    meta = artifacts.read_json(path / artifacts.CALIB_META)
    if tokenizer is not None:
        fp = artifacts.tokenizer_fingerprint(tokenizer)
        if fp != meta.get("tokenizer_fingerprint"):
            raise MismatchError(
                f"calibration blocks in {path} were tokenised with '{meta.get('tokenizer')}' "
                f"(vocabulary {meta.get('tokenizer_fingerprint')}), which does not match this model's tokenizer "
                f"(vocabulary {fp}); re-run lpt calibrate with this model"
            )
    tensors = artifacts.load_tensors(path / artifacts.TOKENS)
    val = artifacts.load_tensors(path / artifacts.VAL_TOKENS) if (path / artifacts.VAL_TOKENS).is_file() else None
    check_blocks(tensors, path / artifacts.TOKENS)
    return CalibData(tensors, val, meta)


def check_blocks(tensors: dict[str, Any], where: str | Path) -> None:
    """Refuse calibration blocks a stage cannot learn from: missing tensors, none at all, or no token to predict."""
    need = ("input_ids", "attention_mask", "labels")
    missing = [k for k in need if k not in tensors]
    if missing:
        raise LptError(f"{where} holds no {', '.join(missing)} tensor (not written by lpt calibrate?)")
    shapes = {tuple(tensors[k].shape) for k in need}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise LptError(f"{where}: input_ids, attention_mask and labels must be [blocks, seq_len] tensors of one shape "
                       f"(got {', '.join(str(tuple(tensors[k].shape)) for k in need)})")
    if tensors["input_ids"].shape[0] == 0:
        raise LptError(f"{where} holds no calibration blocks; run lpt calibrate again with more data or a lower "
                       f"--seq-len")
    if loss_tokens(tensors) == 0:
        raise LptError(f"{where}: the calibration blocks have no token to predict (every label is masked, or "
                       f"--seq-len 1); run lpt calibrate again with a larger --seq-len")


def batches(data: CalibData, size: int):
    """The blocks of ``data`` in order, ``size`` at a time (the last batch may be smaller)."""
    return ({k: v[i:i + size] for k, v in data.tensors.items()} for i in range(0, data.nsamples, size))
