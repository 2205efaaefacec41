"""``lpt calibrate``: a data source -> fixed-length token blocks on disk.

Output directory:
  tokens.safetensors      input_ids, attention_mask, labels (int64, [nsamples, seq_len]) + string metadata
  val_tokens.safetensors  the held-out blocks (only with --val-fraction > 0)
  calib.json              source, format, template, tokenizer name + vocabulary fingerprint, counts, seed, version
Same inputs and seed give byte-identical files. Building and reading the blocks is ``lpt.calibration``.
"""

from __future__ import annotations

from pathlib import Path

from lpt import artifacts, models
from lpt.calibration import make_blocks
from lpt.config import CalibrateConfig, check
from lpt.progress import console, progress_bar


def validate(cfg: CalibrateConfig) -> None:
    """Every rule of a CalibrateConfig (declared with its fields: ``lpt.config.check``)."""
    check(cfg)


@artifacts.claims_output  # a second run on the same output is refused while this one lives
def run(cfg: CalibrateConfig) -> Path:
    validate(cfg)
    out = artifacts.check_output_dir(cfg.output, cfg.overwrite)
    tokenizer = models.load_tokenizer(models.resolve(cfg.model), revision=cfg.revision,
                                      trust_remote_code=cfg.trust_remote_code)
    with progress_bar() as bar:
        task = bar.add_task("tokenising", total=None)
        train, val, meta = make_blocks(cfg, tokenizer, progress=lambda n: bar.update(task, completed=n))
    if meta["nsamples"] < cfg.nsamples:
        console.print(f"[yellow]warning:[/] only {meta['nsamples']} blocks of {cfg.seq_len} tokens available "
                      f"from '{cfg.data}' (asked for {cfg.nsamples})")
    st_meta = {"format": meta["format"], "source": cfg.data, "seq_len": str(cfg.seq_len),
               "tokenizer_fingerprint": meta["tokenizer_fingerprint"], "lpt_version": meta["lpt_version"]}
    with artifacts.atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        artifacts.save_tensors(train, tmp / artifacts.TOKENS, st_meta)
        if val is not None:
            artifacts.save_tensors(val, tmp / artifacts.VAL_TOKENS, st_meta)
        artifacts.write_json(tmp / artifacts.CALIB_META, meta)
    console.print(f"wrote {meta['nsamples']} blocks x {cfg.seq_len} tokens ({meta['format']}) "
                  f"{'+ ' + str(meta['val_samples']) + ' held-out ' if val is not None else ''}to {out}")
    return out
