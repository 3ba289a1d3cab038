"""The dataclass configs (TrainConfig, ZipformerConfig) reject unknown keys with one shared
check that names each key and the closest field; the schema checks decode method names."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from helpers import ROOT

from zipasr.config import check_fields, load_config, validate_config
from zipasr.errors import ZipasrError
from zipasr.model import ZipformerConfig
from zipasr.train.config import TrainConfig


def test_training_option_typo_suggests_the_field() -> None:
    with pytest.raises(ZipasrError, match=r"^unknown training option\(s\): num_epoch \(did you "
                                          r"mean 'num_epochs'\?\)$"):
        TrainConfig.from_dict({"num_epoch": 3, "base_lr": 0.01})


def test_model_key_typo_suggests_the_field() -> None:
    # KeyError, as before: the trainer, decoder and model-info catch it
    with pytest.raises(KeyError, match=r"unknown model config keys: encoder_dims \(did you mean "
                                       r"'encoder_dim'\?\)"):
        ZipformerConfig.from_dict({"preset": "xs", "encoder_dims": [32] * 6})


def test_every_unknown_key_is_named_and_far_ones_get_no_guess() -> None:
    @dataclass
    class C:
        alpha: int = 0
        beta: int = 0

    check_fields(C, {"alpha": 1, "beta": 2}, "bad")  # known keys pass
    with pytest.raises(ValueError, match=r"^bad: alpah \(did you mean 'alpha'\?\), zzz$"):
        check_fields(C, {"zzz": 1, "alpah": 2, "beta": 3}, "bad", ValueError)


def test_decode_method_typo_fails_validation() -> None:
    # a typo here would otherwise surface only in the decode jobs, after all of training
    cfg = load_config(ROOT / "config" / "config.yaml")
    cfg["decode"]["methods"] = ["greedy_search", "greedy"]
    with pytest.raises(ZipasrError, match=r"decode\.methods\.1: 'greedy' is not one of"):
        validate_config(cfg)
