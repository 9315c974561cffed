"""The ``vit`` task end to end: run configs, the CLI, training on real image files, eval, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from visionpeft.cli import main
from visionpeft.errors import ConfigError
from visionpeft.runconfig import load_run_config, parse_run_config

timm = pytest.importorskip("timm")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 2}


def _stripes(label: int, rng: np.random.Generator) -> Image.Image:
    """A separable toy image: class 0 has horizontal stripes, class 1 vertical ones, with noise."""
    image = np.zeros((16, 16, 3), dtype=np.float32)
    phase = rng.integers(0, 4)
    if label == 0:
        image[(np.arange(16) + phase) % 4 < 2, :, :] = 1.0
    else:
        image[:, (np.arange(16) + phase) % 4 < 2, :] = 1.0
    image = np.clip(image * rng.uniform(0.6, 1.0, 3) + rng.normal(0, 0.1, image.shape), 0, 1)
    return Image.fromarray((image * 255).astype(np.uint8))


def make_vtab(root: Path, per_split: dict[str, int]) -> Path:
    """A VTAB-1k task folder of real PNG files with the four split lists."""
    rng = np.random.default_rng(0)
    for split, count in per_split.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(count):
            label = i % 2
            rel = f"images/{split}/{i:06d}.png"
            _stripes(label, rng).save(root / rel)
            lines.append(f"{rel} {label}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def run_config(data_root: Path, output: Path, method: dict, **train) -> dict:
    return {
        "task": "vit",
        "model": {"name": "vit_tiny_patch16_224", "pretrained": False, "kwargs": TINY},
        "method": method,
        "data": {"format": "vtab", "root": str(data_root), "train_split": "train800val200", "eval_split": "test",
                 "image_size": 32},
        "train": {"epochs": 8, "batch_size": 16, "lr": 3e-3, "optimizer": "adamw", "warmup_steps": 2, "seed": 0,
                  "progress": False, "log_every": 5, **train},
        "output_dir": str(output),
    }


@pytest.fixture(scope="module")
def vtab(tmp_path_factory) -> Path:
    return make_vtab(tmp_path_factory.mktemp("vtab") / "toy", {"train800val200": 64, "test": 32,
                                                                 "train800": 8, "val200": 4})


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("vit_*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid_run_configs(path):
    run = load_run_config(path)
    assert run.task == "vit" and run.model.name and run.method.method


def test_recipes_fill_the_train_section_and_explicit_keys_win():
    run = load_run_config(EXAMPLES / "vit_vtab1k_cifar100_vpt_deep.yaml")
    assert run.train.optimizer == "sgd" and run.train.warmup_epochs == 10 and run.train.epochs == 100
    assert run.train.scale_lr and run.train.batch_size == 64 and run.train.lr == 12.5
    noah = load_run_config(EXAMPLES / "vit_fgvc_cub_adaptformer.yaml")
    assert (noah.train.optimizer, noah.train.lr, noah.train.weight_decay, noah.train.min_lr) == ("adamw", 1e-3, 1e-4,
                                                                                                 1e-5)
    with pytest.raises(ConfigError, match=r"train\.recipe: 'adam' is not a recipe of task 'vit'"):
        load_run_config(EXAMPLES / "vit_fgvc_cub_adaptformer.yaml", ["train.recipe=adam"])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"data": {"format": "tfds", "root": "x"}}, r"data\.format: 'tfds' is not supported"),
        ({"data": {"format": "vtab", "root": "x", "vtab_tsk": "cifar"}}, r"data: unknown key\(s\) \['vtab_tsk'\]"),
        ({"data": {"format": "vtab", "root": "x", "image_size": "big"}}, r"data\.image_size: expected int"),
        ({"data": {"format": "vtab", "root": "x", "normalization": "clip"}}, r"data\.normalization: 'clip'"),
        ({"data": {"format": "vtab"}}, r"data\.root: missing"),
        ({"model": {"pretrained": False}}, r"model\.name: missing"),
        ({"method": {"name": "vpt", "num_tokens": 0}}, r"method: vpt\.num_tokens: 0 is out of range"),
    ],
)
def test_bad_vit_configs_fail_before_building(override, match, tmp_path):
    tree = run_config(tmp_path, tmp_path / "out", {"name": "vpt"})
    tree.update(override)
    with pytest.raises(ConfigError, match=match):
        parse_run_config(tree)


def test_train_reaches_high_accuracy_and_eval_reloads(vtab, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(vtab, out, {"name": "adaptformer", "bottleneck": 8}, eval_every=20)))
    assert main(["train", str(config), "--set", "train.lr=0.01", "--set", "train.epochs=15"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["eval"]["top1"] >= 0.9, printed
    for name in ("config.yaml", "metrics.jsonl", "results.json", "adapter/adapter.safetensors",
                 "adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["top1_last"] == printed["eval"]["top1"] and results["top1_best"] >= results["top1_last"]
    assert main(["eval", str(config), "--adapter", str(out / "adapter")]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["top1"] == printed["eval"]["top1"]
    # A run config that describes another adapter: evaluated as saved, and said so.
    assert main(["eval", str(config), "--adapter", str(out / "adapter"), "--set", "method.bottleneck=16"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["top1"] == printed["eval"]["top1"]
    assert "(method.bottleneck: 8 in the adapter, 16 in the run config); evaluating the adapter" in captured.err


def test_resume_from_the_cli_continues_the_run(vtab, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    out = tmp_path / "run"
    tree = run_config(vtab, out, {"name": "vpt", "num_tokens": 2}, epochs=None, max_steps=6, save_every=3)
    config.write_text(yaml.safe_dump(tree))
    assert main(["train", str(config)]) == 0
    straight = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # A second run into the same folder must not silently overwrite it.
    assert main(["train", str(config)]) != 0
    assert "resume" in capsys.readouterr().err
    assert main(["train", str(config), "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == straight["step"] == 6


def test_image_size_and_num_classes_are_checked_before_training(vtab, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    tree = run_config(vtab, tmp_path / "a", {"name": "linear"})
    tree["data"]["image_size"] = 64
    config.write_text(yaml.safe_dump(tree))
    assert main(["train", str(config)]) == 2
    assert "data.image_size: 64 does not match the model's input size 32" in capsys.readouterr().err
    tree["data"]["image_size"] = 32
    tree["data"]["num_classes"] = 1
    config.write_text(yaml.safe_dump(tree))
    assert main(["train", str(config)]) == 2
    assert "data.num_classes: 1 is too small for label 1" in capsys.readouterr().err


def test_image_size_defaults_to_the_models_own(vtab, tmp_path):
    tree = run_config(vtab, tmp_path / "a", {"name": "linear"})
    del tree["data"]["image_size"]
    run = parse_run_config(tree)
    assert run.data.image_size is None  # not 224: the model decides
    task = run.make_task()
    task.build_model()
    images, _ = task.train_dataset()[0]
    assert tuple(images.shape[-2:]) == (TINY["img_size"], TINY["img_size"])


def test_a_format_key_for_another_format_names_the_format_and_its_keys(tmp_path):
    tree = run_config(tmp_path, tmp_path / "a", {"name": "linear"})
    tree["data"]["num_frames"] = 4
    message = r"data: unknown key\(s\) \['num_frames'\] for format 'vtab'; allowed keys are \[.*'vtab_task'\]"
    with pytest.raises(ConfigError, match=message):
        parse_run_config(tree)


def test_the_run_validates_the_method_config_once_and_makes_one_task(vtab, tmp_path, monkeypatch, capsys):
    """The config object the run config validated is the one the adapter carries; the CLI builds one task."""
    from visionpeft import task as task_module
    from visionpeft.method import get_state
    from visionpeft.vit.task import VitTask
    from visionpeft.vit.vpt import VPTConfig

    validations, tasks, lookups = [], [], []
    check = VPTConfig.check
    monkeypatch.setattr(VPTConfig, "check", lambda self: (validations.append(1), check(self))[1])
    init = VitTask.__init__
    monkeypatch.setattr(VitTask, "__init__", lambda self, run: (tasks.append(1), init(self, run))[1])
    get_task = task_module.get_task
    monkeypatch.setattr(task_module, "get_task", lambda name: (lookups.append(name), get_task(name))[1])
    run = parse_run_config(run_config(vtab, tmp_path / "a", {"name": "vpt", "num_tokens": 2}))
    model = run.make_task().build_model()
    assert get_state(model).adapters["default"].method.config is run.method
    assert validations == [1] and tasks == [1] and lookups == ["vit"]
    validations.clear(), tasks.clear(), lookups.clear()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(vtab, tmp_path / "b", {"name": "vpt", "num_tokens": 2},
                                                epochs=None, max_steps=1)))
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    assert validations == [1] and tasks == [1] and lookups == ["vit"]


def test_wrong_model_family_and_unreadable_images(vtab, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    tree = run_config(vtab, tmp_path / "a", {"name": "vpt"})
    tree["model"] = {"name": "convnext_atto", "pretrained": False}
    config.write_text(yaml.safe_dump(tree))
    assert main(["train", str(config)]) == 2
    assert "timm VisionTransformer" in capsys.readouterr().err

    broken = make_vtab(tmp_path / "broken", {"train800val200": 4, "test": 2})
    (broken / "images" / "train800val200" / "000001.png").write_bytes(b"not an image")
    tree = run_config(broken, tmp_path / "b", {"name": "linear"}, epochs=1)
    config.write_text(yaml.safe_dump(tree))
    assert main(["train", str(config)]) != 0
    err = capsys.readouterr().err
    assert "000001.png" in err
    assert "set data.skip_bad: true" in err and "skip_bad=True" not in err  # YAML terms for a YAML user
    tree["data"]["skip_bad"] = True
    config.write_text(yaml.safe_dump(tree))
    assert main(["train", str(config)]) == 0


def test_a_missing_training_image_is_named_in_yaml_terms_and_skipped_with_skip_bad(tmp_path, capsys):
    """The head is sized from the training split before the model exists: that read honours skip_bad too."""
    root = make_vtab(tmp_path / "data", {"train800val200": 6, "test": 2})
    (root / "images" / "train800val200" / "000002.png").unlink()
    config = tmp_path / "run.yaml"
    tree = run_config(root, tmp_path / "a", {"name": "linear"}, epochs=1)
    config.write_text(yaml.safe_dump(tree))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "000002.png: no such file" in err and "set data.skip_bad: true" in err and "skip_bad=True" not in err
    tree["data"]["skip_bad"] = True
    config.write_text(yaml.safe_dump(tree))
    assert main(["train", str(config)]) == 0
    capsys.readouterr()


def test_checkpoint_and_local_weights(tmp_path):
    from safetensors.torch import save_file

    from visionpeft.vit.models import build_vit

    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=7, **TINY)
    save_file(source.state_dict(), tmp_path / "weights.safetensors")
    model = build_vit("vit_tiny_patch16_224", 3, checkpoint=tmp_path / "weights.safetensors", **TINY)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in source.state_dict().items() if not k.startswith("head"))
    assert model.head.out_features == 3
    resized = build_vit("vit_tiny_patch16_224", 3, checkpoint=tmp_path / "weights.safetensors",
                        **{**TINY, "img_size": 48})
    assert resized.pos_embed.shape == (1, 1 + 36, 64)
    with pytest.raises(ConfigError, match="does not exist"):
        build_vit("vit_tiny_patch16_224", 3, checkpoint=tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match="closest names"):
        build_vit("vit_tiny_patch16_22", 3)
    with pytest.raises(ConfigError, match=r"model\.kwargs: .*unexpected keyword argument 'foo'"):
        build_vit("vit_tiny_patch16_224", 3, **TINY, foo=1)


def test_a_checkpoint_that_does_not_fit_is_an_error(tmp_path):
    from safetensors.torch import save_file

    from visionpeft.vit.models import build_vit

    torch.manual_seed(0)
    state = timm.create_model("vit_tiny_patch16_224", num_classes=7, **TINY).state_dict()
    partial = {k: v for k, v in state.items() if k != "blocks.1.attn.qkv.weight"}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(ConfigError, match=r"missing \['blocks\.1\.attn\.qkv\.weight'\]"):
        build_vit("vit_tiny_patch16_224", 3, checkpoint=tmp_path / "partial.safetensors", **TINY)
    deeper = timm.create_model("vit_tiny_patch16_224", num_classes=7, **{**TINY, "depth": 3}).state_dict()
    torch.save(deeper, tmp_path / "deeper.pth")
    with pytest.raises(ConfigError, match=r"unexpected \['blocks\.2\."):
        build_vit("vit_tiny_patch16_224", 3, checkpoint=tmp_path / "deeper.pth", **TINY)
    (tmp_path / "notes.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"notes\.pth is damaged or not a torch file"):
        build_vit("vit_tiny_patch16_224", 3, checkpoint=tmp_path / "notes.pth", **TINY)
    with pytest.raises(ConfigError, match="not both"):
        build_vit("vit_tiny_patch16_224", 3, pretrained=True, checkpoint=tmp_path / "deeper.pth", **TINY)


def make_clips(root: Path, count: int, frames: int = 6) -> Path:
    """Frame folders of moving stripes: class 0 moves down, class 1 moves right; plus list files."""
    rng = np.random.default_rng(1)
    lines = []
    for i in range(count):
        label = i % 2
        folder = root / f"clip{i:03d}"
        folder.mkdir(parents=True)
        for t in range(frames):
            image = np.zeros((16, 16, 3), dtype=np.uint8)
            offset = (t + rng.integers(0, 4)) % 16
            if label == 0:
                image[offset, :, :] = 255
            else:
                image[:, offset, :] = 255
            Image.fromarray(image).save(folder / f"{t:05d}.png")
        lines.append(f"{folder.name} {label}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "val.txt").write_text("\n".join(lines[: count // 2]) + "\n")
    return root


def test_video_run_with_st_adapter(tmp_path, capsys):
    clips = make_clips(tmp_path / "clips", 8)
    tree = run_config(clips, tmp_path / "out", {"name": "st_adapter", "bottleneck": 8}, epochs=1, batch_size=4)
    tree["data"] = {"format": "video", "root": str(clips), "train_split": "train.txt", "eval_split": "val.txt",
                    "num_frames": 4, "sampling": "uniform", "image_size": 32}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tree))
    assert main(["train", str(config)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["eval"]["samples"] == 4 and 0.0 <= result["eval"]["top1"] <= 1.0
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["method"] == "st_adapter" and saved["base_model"]["family"] == "visionpeft.vit.VideoClassifier"


def test_a_wrong_format_is_reported_before_the_keys_it_rules_out(tmp_path):
    tree = run_config(tmp_path, tmp_path / "a", {"name": "linear"})
    tree["data"].update(format="vtabb", vtab_task="cifar")
    with pytest.raises(ConfigError, match=r"data\.format: 'vtabb' is not supported; choose one of"):
        parse_run_config(tree)
    del tree["data"]["format"]
    with pytest.raises(ConfigError, match=r"data\.format: missing; choose one of \['fgvc', 'imagefolder'"):
        parse_run_config(tree)


def test_imagefolder_evaluation_keeps_the_training_labels_and_refuses_new_classes(tmp_path, capsys):
    """The val split is labelled with the training split's classes; a class only val has stops the run first."""
    rng = np.random.default_rng(0)
    for split, classes in (("train", ("ant", "bee", "cat")), ("val", ("ant", "cat"))):
        for label, name in enumerate(classes):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            _stripes(label % 2, rng).save(tmp_path / "data" / split / name / "0.png")
    tree = run_config(tmp_path / "data", tmp_path / "a", {"name": "linear"}, epochs=1)
    tree["data"] = {"format": "imagefolder", "root": str(tmp_path / "data"), "image_size": 32}
    task = parse_run_config(tree).make_task()
    task.build_model()
    assert task.eval_dataset().classes == ["ant", "bee", "cat"]
    assert [label for _, label in task.eval_dataset().samples] == [0, 2]  # cat stays 2, not val's own 1
    (tmp_path / "data" / "val" / "dog").mkdir()
    _stripes(0, rng).save(tmp_path / "data" / "val" / "dog" / "0.png")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tree))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "['dog']" in err and str(tmp_path / "data" / "val") in err and str(tmp_path / "data" / "train") in err
    assert not (tmp_path / "a" / "adapter").exists()
