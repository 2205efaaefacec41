"""Validation has one home per config: the rules of a flag are declared with its field and checked generically
(``config.check``) when a config is built and as every stage's first step; rules over several fields are declared
once (``config.rule``); nothing that checks a config changes it."""

import dataclasses

import pytest

from lpt import config
from lpt.config import (BenchPruneStepConfig, BenchRuntimeConfig, CalibrateConfig, EvalConfig, ExportConfig,
                        MergeConfig, PruneConfig, SliceConfig, build, check, field_rules, resolved)
from lpt.errors import LptError

CONFIGS = (CalibrateConfig, PruneConfig, MergeConfig, SliceConfig, EvalConfig, BenchRuntimeConfig, BenchPruneStepConfig,
           ExportConfig, config.RunConfig)


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_config_passes_its_own_rules_at_its_defaults(cls):
    check(cls())


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_declared_rule_can_be_read(cls):
    """Lazy references (names registered in modules that import torch) resolve; every rule key is known."""
    for name, rules in field_rules(cls).items():
        assert set(rules) <= config.RULE_KEYS
        for key in ("choices", "parse", "resolve"):
            if key in rules:
                got = config._get(rules[key])
                assert callable(got) if key != "choices" else len(tuple(got)) > 0, (cls.__name__, name, key)


@pytest.mark.parametrize("cls, values, message", [
    (PruneConfig, {"lora_r": 0}, "--lora-r must be positive (got 0)"),
    (PruneConfig, {"lora_alpha": -1.0}, "--lora-alpha must be positive (got -1.0)"),
    (PruneConfig, {"ratio": 1.0}, "--ratio must be in [0, 1) (got 1.0)"),
    (BenchPruneStepConfig, {"ratio": 0.0}, "--ratio must be in (0, 1) (got 0.0)"),
    (PruneConfig, {"lr_warmup": 1.5}, "--lr-warmup must be in [0, 1] (got 1.5)"),
    (PruneConfig, {"weight_decay": -0.1}, "--weight-decay must be >= 0 (got -0.1)"),
    (PruneConfig, {"max_grad_norm": -1.0}, "--max-grad-norm must be >= 0 (0 disables clipping) (got -1.0)"),
    (PruneConfig, {"save_every": -1}, "--save-every must be >= 0 (0: never) (got -1)"),
    (PruneConfig, {"ema": float("inf")}, "--ema must be a finite number (got inf)"),
    (SliceConfig, {"reconstruct_damp": float("nan")}, "--reconstruct-damp must be a finite number (got nan)"),
    (PruneConfig, {"lora_r": "8"}, "--lora-r must be a whole number (got '8')"),
    (PruneConfig, {"distill": 1}, "--distill must be true or false (got 1)"),
    (PruneConfig, {"criterion": "taylor"}, "unknown --criterion 'taylor' (use lora, vanilla, fisher, magnitude, random)"),
    (PruneConfig, {"gqa": "mqa"}, "unknown --gqa 'mqa' (use auto, kv-groups, query-heads)"),
    (PruneConfig, {"int8_backend": "gptq"}, "unknown --int8-backend 'gptq' (use auto, bitsandbytes, torch)"),
    (MergeConfig, {"int8_backend": "gptq"}, "unknown --int8-backend 'gptq' (use auto, bitsandbytes, torch)"),
    (SliceConfig, {"reconstruct_mode": "greedy"}, "unknown --reconstruct-mode 'greedy' (use sequential, independent)"),
    (ExportConfig, {"quantize_from": "q8_0"}, "unknown --quantize-from 'q8_0' (use f16, bf16, f32)"),
    (ExportConfig, {"threads": -2}, "--threads must be 0 (all cores) or a positive number (got -2)"),
    (PruneConfig, {"round_to": "tpu"}, "--round-to must be a positive number of channels or one of cpu (8)"),
    (PruneConfig, {"balance": "half"}, "unknown --balance 'half'"),
    (PruneConfig, {"targets": "q_proj,lm_head"}, "unknown --targets lm_head"),
    (CalibrateConfig, {"seq_len": 1}, "--seq-len must be at least 2 (got 1): a block of one token has no next token"),
    (CalibrateConfig, {"val_fraction": 1.0}, "--val-fraction must be in [0, 1) (got 1.0)"),
    (EvalConfig, {"seq_len": 1}, "--seq-len must be at least 2 (got 1)"),
    (EvalConfig, {"num_fewshot": -1}, "--num-fewshot must be >= 0 (got -1)"),
    (BenchRuntimeConfig, {"warmup": -1}, "--warmup must be >= 0 (got -1)"),
    # rules over several fields
    (PruneConfig, {"batch_size": 6}, "--batch-size 6 must be a multiple of --micro-batch-size 4"),
    (PruneConfig, {"warmup": 0.6, "cooldown": 0.4}, "with warmup + cooldown < 1"),
    (PruneConfig, {"epochs": 0.0}, "give --epochs > 0 or --max-steps > 0"),
    (PruneConfig, {"load_8bit": True, "criterion": "vanilla"}, "--criterion vanilla needs the gradients of the base"),
    (PruneConfig, {"distill": True, "distill_weight": 1.0}, "--distill-weight 1 leaves --criterion fisher no gradient"),
    (SliceConfig, {"merge": True}, "--merge needs --adapter"),
    (EvalConfig, {"samples": 5, "limit": 3.0}, "give --limit or --samples, not both"),
    (BenchPruneStepConfig, {"model": "m", "random_init": "llama-7b"}, "give MODEL or --random-init, not both"),
])
def test_one_line_errors_naming_the_flag(cls, values, message):
    with pytest.raises(LptError) as e:
        check(cls(**values))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_redeclared_field_keeps_the_rule_of_the_field_it_redeclares():
    """prune redeclares --seq-len / --nsamples (other defaults and help) and inherits their one bound."""
    assert field_rules(PruneConfig)["seq_len"] == field_rules(CalibrateConfig)["seq_len"]
    assert field_rules(PruneConfig)["nsamples"] == field_rules(CalibrateConfig)["nsamples"] == {"gt": 0}
    errors = []
    for cls in (CalibrateConfig, PruneConfig):
        with pytest.raises(LptError) as e:
            check(cls(seq_len=1))
        errors.append(str(e.value))
    assert errors[0] == errors[1]


def test_checking_changes_nothing_and_resolved_is_a_copy():
    cfg = PruneConfig(round_to="llamacpp")
    before = dataclasses.asdict(cfg)
    check(cfg)
    assert dataclasses.asdict(cfg) == before
    run = resolved(cfg)
    assert run.round_to == 32 and cfg.round_to == "llamacpp" and run is not cfg
    assert resolved(CalibrateConfig()) == CalibrateConfig()  # nothing to resolve
    from lpt.stages import prune

    cfg = PruneConfig(round_to="kquants")
    assert prune.validate(cfg).round_to == 256 and cfg.round_to == "kquants"  # the run's copy, as masks.json records


def test_build_checks_the_config(tmp_path):
    with pytest.raises(LptError, match=r"--lora-r must be positive \(got 0\)"):
        build(PruneConfig, {}, set(), {"lora_r": 0})
    with pytest.raises(LptError, match="unknown --criterion 'x'"):
        build(PruneConfig, {"criterion": "x"})


def test_a_rule_must_be_one_of_the_known_ones():
    with pytest.raises(TypeError, match="unknown field rule"):
        config._f(1, "help", minimum=0)


def test_the_stages_start_with_the_config_rules(tmp_path):
    """The Python API gets the same one-line errors as the command line (each stage's validate checks first)."""
    from lpt.stages import bench, calibrate, eval as eval_stage, export, merge, prune, slice as slice_stage

    cases = [(calibrate.validate, CalibrateConfig(nsamples=0)), (prune.validate, PruneConfig(lora_r=0)),
             (merge.validate, MergeConfig(int8_backend="x")), (slice_stage.validate, SliceConfig(reconstruct_damp=-1.0)),
             (eval_stage.validate, EvalConfig(batch_size=0)), (export.validate, ExportConfig(outtype="q9")),
             (bench.validate, BenchRuntimeConfig(seq_len=0)), (bench.validate, BenchPruneStepConfig(trials=0))]
    for validate, cfg in cases:
        with pytest.raises(LptError, match=r"^(unknown )?--"):
            validate(cfg)
