"""Method configs: validation on construction and the JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

import visionpeft as vp
from visionpeft.config import MethodConfig, field
from visionpeft.errors import ConfigError
from visionpeft.generic.lora import LoRAConfig


def test_defaults_are_peft_lora_defaults():
    cfg = vp.config("lora")
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.targets) == (8, 8.0, 0.0, None)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, r"lora\.r: 0 is out of range; it must be >= 1"),
        ({"r": -4}, r"lora\.r"),
        ({"r": 2.5}, r"lora\.r: expected an integer"),
        ({"r": True}, r"lora\.r: expected an integer"),
        ({"alpha": "big"}, r"lora\.alpha: expected a number"),
        ({"dropout": 1.0}, r"lora\.dropout: 1.0 is out of range; it must be >= 0 and < 1"),
        ({"dropout": -0.1}, r"lora\.dropout"),
        ({"init": "xavier"}, r"lora\.init: 'xavier' is not allowed; choose one of \['kaiming', 'gaussian'\]"),
        ({"targets": "blocks"}, r"lora\.targets: expected list of str \| null"),
        ({"targets": ["ok", 3]}, r"lora\.targets"),
        ({"train_head": "yes"}, r"lora\.train_head: expected true or false"),
        ({"rank": 4}, r"lora: unknown key\(s\) \['rank'\]; allowed keys are"),
    ],
)
def test_bad_values_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        vp.config("lora", **kwargs)


def test_config_errors_are_value_errors():
    with pytest.raises(ValueError):
        LoRAConfig(r=0)


def test_ints_become_floats_and_lists_stay_lists():
    cfg = vp.config("lora", alpha=16, targets=["a", "b"])
    assert isinstance(cfg.alpha, float) and cfg.alpha == 16.0
    assert cfg.targets == ["a", "b"]


def test_json_round_trip_with_format_version():
    cfg = vp.config("lora", r=4, alpha=2.0, targets=[r"blocks\.\d+\.fc1"])
    payload = json.loads(cfg.to_json())
    assert payload["format_version"] == 1 and payload["method"] == "lora"
    assert LoRAConfig.from_json(cfg.to_json()) == cfg


def test_saved_config_with_unknown_keys_is_an_error():
    payload = json.loads(vp.config("lora").to_json())
    payload["config"]["use_dora"] = True
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['use_dora'\]"):
        LoRAConfig.from_json(json.dumps(payload))


def test_saved_config_of_another_version_or_method_is_an_error():
    payload = json.loads(vp.config("lora").to_json())
    with pytest.raises(ConfigError, match="format_version 99"):
        LoRAConfig.from_json(json.dumps({**payload, "format_version": 99}))
    with pytest.raises(ConfigError, match="for method 'bitfit'"):
        LoRAConfig.from_json(json.dumps({**payload, "method": "bitfit"}))


def test_bitfit_rejects_a_bad_pattern():
    with pytest.raises(ConfigError, match="bias_pattern"):
        vp.config("bitfit", bias_pattern="(")


def test_config_object_and_kwargs_are_exclusive():
    from toy import toy_net

    with pytest.raises(ConfigError, match="not both"):
        vp.attach(toy_net(), vp.config("lora"), r=4)


def test_offer_fills_only_declared_fields_the_user_left_unset():
    from visionpeft.config import declares, offer

    @dataclasses.dataclass
    class Wants(MethodConfig):
        classnames: list[str] = field([])
        tokenizer: str | None = field(None)

    cfg = Wants()
    filled = offer(cfg, classnames=["cat"], tokenizer="ViT-B-16", dataset="EuroSAT")  # dataset: not declared
    assert (filled.classnames, filled.tokenizer) == (["cat"], "ViT-B-16") and cfg.classnames == []
    assert offer(Wants(tokenizer="RN50"), tokenizer="ViT-B-16").tokenizer == "RN50"  # a value set is kept
    assert offer(cfg, given={"tokenizer"}, tokenizer="ViT-B-16").tokenizer is None  # so is an explicit null
    assert declares(Wants, "classnames") and not declares(Wants, "dataset")
