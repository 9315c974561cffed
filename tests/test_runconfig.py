"""Run configs: every section validated with key paths, before any model is built."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

import visionpeft as vp
from visionpeft.config import Section, field
from visionpeft.errors import ConfigError
from visionpeft.runconfig import apply_overrides, load_run_config, parse_run_config
from visionpeft.task import DataConfig, Task, register_task, unregister_task

BUILT = []
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@dataclasses.dataclass
class CheckedData(DataConfig):
    image_size: int = field(224, ge=1, only_for={"format": ("toy",)})


class CheckedTask(Task):
    """A task that counts model builds and declares one data key of its own, for format toy only."""

    name = "toycheck"
    Data = CheckedData

    def build_model(self, adapter=None):
        BUILT.append(1)
        raise AssertionError("validation must not build a model")


@pytest.fixture(autouse=True)
def toy_task():
    register_task(CheckedTask)
    yield
    unregister_task("toycheck")


def good() -> dict:
    return {
        "task": "toycheck",
        "model": {"name": "toy", "kwargs": {"width": 16}},
        "method": {"name": "lora", "r": 4},
        "data": {"format": "toy", "root": "/data", "image_size": 32},
        "train": {"max_steps": 10, "lr": 0.01, "optimizer": "sgd", "warmup_steps": 2},
        "output_dir": "runs/x",
    }


def test_a_good_config_parses_with_defaults():
    run = parse_run_config(good())
    assert run.train.batch_size == 32 and run.train.precision == "fp32" and run.train.lr == 0.01
    assert run.data == CheckedData(format="toy", root="/data", image_size=32)
    assert run.method == vp.config("lora", r=4)
    out = run.to_dict()
    assert out["data"]["image_size"] == 32 and "options" not in out["data"]
    assert parse_run_config(out) == run  # the resolved config replays the run


def _with(path: str, value) -> dict:
    return apply_overrides(good(), [f"{path}={yaml.safe_dump(value, default_flow_style=True).strip()}"])


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        ("train.lr", -1, r"train\.lr: -1\.0 is out of range; it must be > 0"),
        ("train.lrr", 0.1, r"train: unknown key\(s\) \['lrr'\]; allowed keys are \[.*'lr'"),
        ("train.optimizer", "adam", r"train\.optimizer: 'adam' is not allowed; choose one of \['sgd', 'adamw'\]"),
        ("train.precision", "fp8", r"train\.precision: 'fp8' is not allowed"),
        ("train.batch_size", 0, r"train\.batch_size: 0 is out of range"),
        ("train.batch_size", "big", r"train\.batch_size: expected an integer"),
        ("train.grad_accum", 1.5, r"train\.grad_accum: expected an integer"),
        ("train.warmup_epochs", 1, r"train: set train\.warmup_steps or train\.warmup_epochs, not both"),
        ("train.betas", [0.9], r"train\.betas: AdamW takes two betas"),
        ("model.pretraind", True, r"model: unknown key\(s\) \['pretraind'\]"),
        ("model.kwargs", [1], r"model\.kwargs: expected a mapping"),
        ("method.r", 0, r"method: lora\.r: 0 is out of range"),
        ("method.rank", 4, r"method: lora: unknown key\(s\) \['rank'\]"),
        ("method.name", "lroa", r"method\.name: unknown method 'lroa'\. Did you mean 'lora'"),
        ("data.imagesize", 32, r"data: unknown key\(s\) \['imagesize'\] for format 'toy'"),
        ("data.root", 3, r"data\.root: expected str \| null, got 3"),
        ("task", "audio", r"task: 'audio' is unknown; choose one of \['diffusion', 'vit', 'vla'\]"),
        ("output_dir", "", r"output_dir: expected a folder path"),
    ],
)
def test_bad_values_fail_with_the_key_path(path, value, match):
    tree = _with(path, value)
    if path == "train.betas":
        tree["train"]["optimizer"] = "adamw"
    with pytest.raises(ConfigError, match=match):
        parse_run_config(tree)
    assert not BUILT


def test_missing_sections_and_unknown_sections():
    tree = good()
    del tree["method"]
    with pytest.raises(ConfigError, match="method: missing"):
        parse_run_config(tree)
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['trian'\]"):
        parse_run_config({**good(), "trian": {}})
    with pytest.raises(ConfigError, match="set train.epochs or train.max_steps"):
        parse_run_config({**good(), "train": {"lr": 0.1}})


def test_unknown_tasks_list_the_domains():
    with pytest.raises(ConfigError, match="task: 'audio' is unknown; choose one of"):
        parse_run_config({**good(), "task": "audio"})


def test_overrides_parse_yaml_values_and_reject_bad_paths():
    tree = apply_overrides(good(), ["train.lr=3e-4", "train.max_grad_norm=1", "model.kwargs.depth=2"])
    run = parse_run_config(tree)
    assert run.train.lr == 3e-4 and run.train.max_grad_norm == 1.0 and run.model.kwargs["depth"] == 2
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides(good(), ["train.lr"])
    with pytest.raises(ConfigError, match="train.lr is not a section"):
        apply_overrides(good(), ["train.lr.x=1"])


def test_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(bad)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(good()))
    assert load_run_config(path, ["train.lr=0.5"]).train.lr == 0.5
    # PyYAML reads 1e-3 as a string (YAML 1.1); run configs read it as the number people mean.
    path.write_text(yaml.safe_dump(good()).replace("lr: 0.01", "lr: 1e-3"))
    assert load_run_config(path).train.lr == 1e-3


@dataclasses.dataclass
class _Loss(Section):
    prefix = "data.loss."
    size: int | None = field(None, ge=1)


@dataclasses.dataclass
class _Data(DataConfig):
    size: int = field(8, ge=1)
    flip: bool = field(False)
    rate: float = field(0.5, ge=0, le=1)
    frames: int = field(4, only_for={"format": ("video",)})
    loss: _Loss = field(_Loss())


def test_a_domains_data_section_names_the_key_and_what_is_allowed():
    from visionpeft.config import build_dataclass

    data = build_dataclass(_Data, {"size": 3, "flip": True, "rate": 1, "loss": {"size": 2}}, "data.")
    assert (data.size, data.flip, data.rate, data.loss.size) == (3, True, 1.0, 2)
    assert build_dataclass(_Data, {}, "data.").loss == _Loss()  # each instance gets its own default section
    with pytest.raises(ConfigError, match=r"data: unknown key\(s\) \['sizes'\] for format null; allowed"):
        build_dataclass(_Data, {"sizes": 3}, "data.")
    with pytest.raises(ConfigError, match=r"data: unknown key\(s\) \['frames'\] for format 'x'; allowed keys are "
                                          r"\['format', 'root', 'train_split', 'eval_split', 'size', 'flip', 'rate', "
                                          r"'loss'\]"):
        build_dataclass(_Data, {"format": "x", "frames": 3}, "data.")
    assert build_dataclass(_Data, {"format": "video", "frames": 3}, "data.").frames == 3
    with pytest.raises(ConfigError, match="data.size: expected an integer, got True"):
        build_dataclass(_Data, {"size": True}, "data.")
    with pytest.raises(ConfigError, match="data.flip: expected true or false, got 1"):
        build_dataclass(_Data, {"flip": 1}, "data.")
    assert build_dataclass(_Data, {"size": None, "loss": None}, "data.") == _Data()  # null: the default
    with pytest.raises(ConfigError, match=r"data.rate: 1.5 is out of range; it must be >= 0 and <= 1"):
        build_dataclass(_Data, {"rate": 1.5}, "data.")
    with pytest.raises(ConfigError, match="data.loss.size: 0 is out of range"):
        build_dataclass(_Data, {"loss": {"size": 0}}, "data.")
    with pytest.raises(ConfigError, match=r"data.loss: unknown key\(s\) \['sise'\]"):
        build_dataclass(_Data, {"loss": {"sise": 1}}, "data.")
    with pytest.raises(ConfigError, match="data.loss: expected a mapping"):
        build_dataclass(_Data, {"loss": [1]}, "data.")
    # The plain form leaves out keys that do not apply, so it parses back to the same section.
    video = build_dataclass(_Data, {"format": "video", "frames": 2}, "data.")
    assert "frames" not in data.to_dict() and video.to_dict()["frames"] == 2
    assert build_dataclass(_Data, data.to_dict(), "data.") == data
    assert build_dataclass(_Data, video.to_dict(), "data.") == video


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_examples_resolved_config_parses_back_to_the_same_run(example, tmp_path):
    """What a run writes as config.yaml (RunConfig.to_dict) replays it, in every domain."""
    tree = yaml.safe_load((EXAMPLES / example).read_text())
    if (tree.get("data") or {}).get("class_root"):
        tree["data"]["class_root"] = str(tmp_path)  # prior preservation checks that its folder exists
    run = parse_run_config(tree)
    resolved = yaml.safe_load(yaml.safe_dump(run.to_dict()))
    again = parse_run_config(resolved)
    assert again == run and again.method_keys == run.method_keys  # what a task may fill in stays open
    assert resolved["method"]["name"] == tree["method"]["name"]
