"""The vla task end to end: CoOp-format data written here, a tiny open_clip architecture, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

pytest.importorskip("open_clip")

import numpy as np
import open_clip
import torch
from PIL import Image

from visionpeft.cli import main
from visionpeft.errors import ConfigError
from visionpeft.optim import build_scheduler
from visionpeft.runconfig import load_run_config
from visionpeft.vla.task import coop_epochs

from tiny_models import TINY_CLIP_CFG

CLASSES = ["AnnualCrop", "Forest", "Highway", "River"]
# As in CoOp's split_zhou_EuroSAT.json, which spells the classes with its NEW_CNAMES.
NAMES = ["Annual Crop Land", "Forest", "Highway or Road", "River"]
MODEL = "visionpeft-test-tiny-clip"


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory):
    """Register the tiny CLIP as an open_clip architecture, so the task builds it by name."""
    path = tmp_path_factory.mktemp("cfg") / f"{MODEL}.json"
    path.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(path)
    return MODEL


@pytest.fixture(scope="module")
def eurosat_root(tmp_path_factory):
    """A small EuroSAT in CoOp's layout: eurosat/2750/<class>/*.jpg and split_zhou_EuroSAT.json."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "eurosat"
    rng = np.random.default_rng(0)
    split = {"train": [], "val": [], "test": []}
    for label, name in enumerate(CLASSES):
        (folder / "2750" / name).mkdir(parents=True)
        for i in range(9):
            color = np.array([60 * label, 255 - 50 * label, 120], dtype=np.float64)
            pixels = np.clip(color + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
            rel = f"{name}/{name}_{i}.jpg"
            Image.fromarray(pixels).save(folder / "2750" / rel)
            part = "train" if i < 5 else "val" if i < 7 else "test"
            split[part].append([rel, label, NAMES[label]])
    (folder / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    return root


def _config(tmp_path, root, arch, method, setting="fewshot", **train):
    train = {"recipe": "coop", "epochs": 2, "batch_size": 4, "seed": 1, "progress": False, **train}
    config = {
        "task": "vla",
        "model": {"name": arch},
        "method": method,
        "data": {"format": "coop", "dataset": "EuroSAT", "root": str(root), "setting": setting, "shots": 2},
        "train": {k: v for k, v in train.items() if v is not None},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "run.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path


def test_coop_recipe_follows_the_shots_and_dassl_schedule(tmp_path, eurosat_root, tiny_arch):
    path = _config(tmp_path, eurosat_root, tiny_arch, {"name": "coop"}, epochs=None)
    run = load_run_config(path, ["data.shots=1"])
    assert run.train.epochs == 50 and run.train.optimizer == "sgd" and run.train.lr == 0.002
    assert [coop_epochs(k, "EuroSAT") for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert coop_epochs(16, "ImageNet") == 50
    # Dassl's per-epoch schedule for 10 epochs: constant 1e-5 warmup epoch, then a cosine over 10 epochs.
    run = load_run_config(path, ["train.epochs=10", "data.shots=16"])
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=run.train.lr)
    scheduler = build_scheduler(optimizer, run.train, total_steps=30, steps_per_epoch=3)
    rates = []
    for _ in range(30):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    per_epoch = rates[::3]
    assert rates[:3] == [per_epoch[0]] * 3
    expected = [1e-5, 0.002, 0.0019511, 0.001809, 0.0015878, 0.001309, 0.001, 0.000691, 0.0004122, 0.000191]
    assert per_epoch == pytest.approx(expected, abs=1e-7)
    assert not any(math.isclose(r, 0) for r in rates)


def test_train_then_eval_coop_base_to_novel(tmp_path, eurosat_root, tiny_arch, monkeypatch):
    from visionpeft.vla.prompts import PromptedCLIP

    calls = []
    original = PromptedCLIP.set_classnames

    def spy(self, names):
        calls.append(list(names))
        original(self, names)

    monkeypatch.setattr(PromptedCLIP, "set_classnames", spy)
    path = _config(tmp_path, eurosat_root, tiny_arch, {"name": "coop", "n_ctx": 4}, setting="base2novel")
    assert main(["train", str(path)]) == 0
    # The novel test images are classified among the novel names only, then the base names return.
    assert calls == [NAMES[2:], NAMES[:2]]
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert {"base", "novel", "hm"} <= set(results) and results["setting"] == "base2novel"
    assert results["hm"] == pytest.approx(2 * results["base"] * results["novel"] / (results["base"] + results["novel"]))
    words = json.loads((run / "nearest_words.json").read_text())
    assert len(words) == 4 and all(len(w["words"]) == 3 for w in words)
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["config"]["classnames"] == NAMES[:2]  # the 2 base classes
    # The saved adapter evaluated again gives the numbers of the end of training.
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [m["eval"] for m in metrics if "eval" in m][-1]
    (run / "results.json").unlink()
    assert main(["eval", str(path), "--adapter", str(run / "adapter")]) == 0
    again = json.loads((run / "results.json").read_text())
    assert again["base"] == final["base"] and again["novel"] == final["novel"]
    from visionpeft.vla.summary import read_results, summarize

    group = summarize(read_results([run / "results.json"]))["groups"][0]
    assert group["datasets"]["EuroSAT"]["hm"] == pytest.approx(again["hm"])


def test_local_checkpoint_loads_strictly(tmp_path, eurosat_root, tiny_arch):
    from safetensors.torch import save_file

    from visionpeft.task import get_task

    from tiny_models import tiny_clip

    reference = tiny_clip(3)
    checkpoint = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, checkpoint)
    path = _config(tmp_path, eurosat_root, tiny_arch, {"name": "coop"})
    model = get_task("vla")(load_run_config(path, [f"model.checkpoint={checkpoint}"])).build_model()
    assert all(torch.equal(model.clip.state_dict()[k], v) for k, v in reference.state_dict().items())
    with pytest.raises(ConfigError, match="model.checkpoint"):
        get_task("vla")(load_run_config(path, [f"model.checkpoint={tmp_path / 'missing.pt'}"])).build_model()


def test_zero_shot_baseline_evaluates_without_an_adapter(tmp_path, eurosat_root, tiny_arch, capsys):
    path = _config(tmp_path, eurosat_root, tiny_arch, {"name": "zeroshot", "template_set": "custom"})
    assert main(["eval", str(path)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["accuracy"] == printed["accuracy"] and printed["samples"] == 8


def test_loss_goes_down_with_maple_and_cocoop(tmp_path, eurosat_root, tiny_arch):
    from visionpeft.task import get_task
    from visionpeft.train import Trainer

    for method in ({"name": "maple", "prompt_depth": 2}, {"name": "cocoop"}):
        path = _config(tmp_path, eurosat_root, tiny_arch, method, max_steps=12, eval_every=0, lr=0.05,
                       recipe=None, optimizer="adamw", batch_size=8, shuffle=False)
        run = load_run_config(path, [f"output_dir={tmp_path / method['name']}"])
        task = get_task("vla")(run)
        model = task.build_model()
        batch = next(iter(torch.utils.data.DataLoader(task.train_dataset(), batch_size=8)))
        with torch.no_grad():
            before = task.loss(model.eval(), batch).item()
        Trainer(task, run.train, run.output_dir, model=model).fit()
        with torch.no_grad():
            after = task.loss(model.eval(), batch).item()
        assert after < before, method


def test_bad_run_configs_name_the_key(tmp_path, eurosat_root, tiny_arch):
    path = _config(tmp_path, eurosat_root, tiny_arch, {"name": "coop"})
    with pytest.raises(ConfigError, match="EuroSATT"):
        load_run_config(path, ["data.dataset=EuroSATT"])
    with pytest.raises(ConfigError, match="data.setting"):
        load_run_config(path, ["data.setting=zero"])
    with pytest.raises(ConfigError, match="method.classnames"):
        load_run_config(path, ["method.classnames=[a]"])
    with pytest.raises(ConfigError, match="method.csc"):
        load_run_config(path, ["method.csc=true", "data.setting=base2novel"])
    with pytest.raises(ConfigError, match="data: unknown key"):
        load_run_config(path, ["data.shot=3"])
    from visionpeft.errors import DataError

    assert main(["train", str(path), "--set", "data.shots=8"]) == 2  # 5 training images per class
    with pytest.raises(DataError, match="shots"):
        from visionpeft.task import get_task

        get_task("vla")(load_run_config(path, ["data.shots=8"])).splits()


EXAMPLES = sorted((__import__("pathlib").Path(__file__).resolve().parents[1] / "examples").glob("vla_*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_run_on_the_tiny_model(example, tmp_path, eurosat_root, tiny_arch):
    run = load_run_config(example)
    assert run.task == "vla" and run.model.name.startswith("ViT-B-16") and run.model.pretrained == "openai"
    overrides = [f"model.name={tiny_arch}", "model.pretrained=false", "model.kwargs={}", f"data.root={eurosat_root}",
                 "data.dataset=EuroSAT", "data.shots=2", "train.epochs=1", "train.precision=fp32",
                 f"output_dir={tmp_path / 'run'}"]
    if run.method.method == "maple":
        overrides.append("method.prompt_depth=2")
    args = ["eval" if run.method.method == "zeroshot" else "train", str(example)]
    assert main([*args, *[x for o in overrides for x in ("--set", o)]]) == 0
    assert (tmp_path / "run" / "results.json").is_file()


@pytest.mark.parametrize("method", ["cocoop", "maple"])
def test_dassl_recipe_decays_every_trained_tensor_as_the_original(tmp_path, eurosat_root, tiny_arch, method):
    """Dassl's build_optimizer gives SGD one group, weight decay 5e-4 on every trained tensor: the
    context, CoCoOp's meta-net and MaPLe's projections (biases included)."""
    from visionpeft.optim import build_optimizer

    spec = {"name": method, **({"prompt_depth": 2} if method == "maple" else {})}
    path = _config(tmp_path, eurosat_root, tiny_arch, spec, recipe=method, epochs=None)
    run = load_run_config(path)
    task = run.make_task()
    model = task.build_model()
    optimizer = build_optimizer(model, run.train)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [(g["group"], g["weight_decay"], sorted(names[id(p)] for p in g["params"]))
              for g in optimizer.param_groups]
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert groups == [("decay", 5e-4, trained)]
    part = "prompt_learner.meta_net." if method == "cocoop" else "prompt_learner.compound_prompt_projections."
    assert any(n.startswith(part) and n.endswith(".weight") for n in trained)
    assert any(n.startswith(part) and n.endswith(".bias") for n in trained)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    # Without the recipe's decay_all, timm's convention: matrices (the meta-net's, the projections',
    # the context) decay, biases do not; no tensor is exempt for its name.
    plain = build_optimizer(model, dataclasses.replace(run.train, decay_all=False))
    by_group = {g["group"]: {names[id(p)] for p in g["params"]} for g in plain.param_groups}
    assert "prompt_learner.ctx" in by_group["decay"]
    assert {n for n in trained if model.get_parameter(n).ndim <= 1} == by_group["no_decay"]


def test_too_few_images_for_the_shots_says_what_to_set_in_yaml(tmp_path, eurosat_root, tiny_arch, capsys):
    path = _config(tmp_path, eurosat_root, tiny_arch, {"name": "coop"})
    assert main(["train", str(path), "--set", "data.shots=8"]) == 2
    err = capsys.readouterr().err
    assert "fewer than the 8 shots asked for; lower data.shots, or set data.allow_fewer: true" in err
    assert "=True" not in err


def test_the_task_offers_the_tokenizer_but_keeps_an_explicit_null(tmp_path, eurosat_root, tiny_arch):
    from visionpeft.method import get_state

    path = _config(tmp_path, eurosat_root, tiny_arch, {"name": "coop"})
    for overrides, expected in (([], tiny_arch), (["method.tokenizer=null"], None)):
        model = load_run_config(path, overrides).make_task().build_model()
        assert get_state(model).adapters["default"].method.config.tokenizer == expected


def test_imagefolder_needs_only_the_split_the_run_evaluates_on(tmp_path, tiny_arch):
    from visionpeft.errors import DataError
    from visionpeft.task import get_task

    for split in ("train", "val"):
        for k, name in enumerate(["dog", "cat"]):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8), (80 * k, 0, 0)).save(tmp_path / "data" / split / name / "0.png")
    path = _config(tmp_path, tmp_path / "data", tiny_arch, {"name": "coop"})
    overrides = ["data.format=imagefolder", "data.dataset=null", "data.shots=1"]
    splits = get_task("vla")(load_run_config(path, [*overrides, "data.eval_split=val"])).splits()["train"]
    assert splits.classnames == ["cat", "dog"] and len(splits.val) == 2 and splits.test == []
    with pytest.raises(DataError, match=r"no test folder .*data/test, the split the run evaluates on"):
        get_task("vla")(load_run_config(path, overrides)).splits()
    (tmp_path / "data" / "train" / "Dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "train" / "Dog" / "0.png")
    with pytest.raises(DataError, match=r"label 0 'Dog' \(e\.g\. .*train/Dog/0\.png\) and label 2 'dog'"):
        get_task("vla")(load_run_config(path, [*overrides, "data.eval_split=val"])).splits()
