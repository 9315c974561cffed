"""Registering a method is enough, in every domain.

A throwaway package declares one method per domain (``tests/throwaway_methods.py``) in its
``entry_points.txt``, exactly as a third-party package would, and each trains one step through
its domain's task: the task names no method, yet the vit method's no-decay tensor lands in the
optimizer's no-decay group, the vla method receives the data set's class names through its config,
the diffusion method gets condition images from the data and feeds the UNet through the
container's hook, and every method's ``export`` writes its file at the end of the run.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

# The domains' module-scoped fixtures, reused (pytest finds fixtures among a module's names).
from test_diffusion_task import tiny_run_inputs  # noqa: F401
from test_vla_task import eurosat_root, tiny_arch  # noqa: F401

import visionpeft as vp
from visionpeft import registry
from visionpeft.cli import main
from visionpeft.runconfig import load_run_config
from visionpeft.train import Trainer

NAMES = ("throwaway_logit_shift", "throwaway_clip_probe", "throwaway_pooled_control", "throwaway_audio_gain")


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """Install tests/throwaway_methods.py as a package with entry points, on sys.path for this test."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(Path(__file__).with_name("throwaway_methods.py"), site / "throwaway_pkg.py")
    info = site / "throwaway_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: throwaway-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[visionpeft.methods]\n"
        "throwaway_logit_shift = throwaway_pkg:LogitShift\n"
        "throwaway_clip_probe = throwaway_pkg:CLIPProbe\n"
        "throwaway_pooled_control = throwaway_pkg:PooledControl\n"
        "throwaway_audio_gain = throwaway_pkg:AudioGain\n"
    )
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    yield site
    for name in NAMES:
        registry.unregister_method(name)
    sys.modules.pop("throwaway_pkg", None)


def _write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_entry_points_register_the_methods_and_their_domains(third_party, capsys):
    listed = {m.name: m.domain for m in vp.methods()}
    assert {n: listed[n] for n in NAMES} == {
        "throwaway_logit_shift": "vit", "throwaway_clip_probe": "vla", "throwaway_pooled_control": "diffusion",
        "throwaway_audio_gain": "audio",
    }
    assert "audio" in registry.list_domains()
    assert [m.name for m in vp.methods("audio") if m.domain == "audio"] == ["throwaway_audio_gain"]
    assert main(["methods", "--domain", "audio"]) == 0
    assert "throwaway_audio_gain" in capsys.readouterr().out


def test_a_third_party_vit_method_trains_through_the_task(third_party, tmp_path):
    from test_vit_task import make_vtab, run_config

    root = make_vtab(tmp_path / "vtab", {"train800val200": 8, "test": 4})
    tree = run_config(root, tmp_path / "out", {"name": "throwaway_logit_shift"}, epochs=None, max_steps=1,
                      weight_decay=0.1, warmup_steps=0)
    run = load_run_config(_write(tmp_path, tree))
    task = run.make_task()
    trainer = Trainer(task, run.train, run.output_dir, model=task.build_model())
    before = trainer.model.throwaway_shift.detach().clone()
    trainer.fit()
    groups = {g["group"]: g for g in trainer.optimizer.param_groups}
    assert list(groups) == ["no_decay"] and groups["no_decay"]["weight_decay"] == 0.0
    assert groups["no_decay"]["params"] == [trainer.model.throwaway_shift]
    assert not torch.equal(trainer.model.throwaway_shift, before)
    assert json.loads((tmp_path / "out" / "throwaway_logit_shift.json").read_text()) == {
        "method": "throwaway_logit_shift", "step": 1, "task": "vit"}
    assert (tmp_path / "out" / "adapter" / "adapter.safetensors").is_file()


def test_a_third_party_vla_method_gets_the_class_names_and_trains(third_party, tmp_path, request):
    from test_vla_task import NAMES, _config

    root, arch = request.getfixturevalue("eurosat_root"), request.getfixturevalue("tiny_arch")
    path = _config(tmp_path, root, arch, {"name": "throwaway_clip_probe"}, epochs=1)
    run = load_run_config(path)
    assert run.method.classnames == []  # the run config does not give them: the task offers them
    task = run.make_task()
    model = task.build_model()
    assert model.classnames == NAMES
    Trainer(task, run.train, run.output_dir, model=model).fit()
    assert model.weight.abs().sum() > 0
    record = json.loads((tmp_path / "run" / "throwaway_clip_probe.json").read_text())
    assert record["task"] == "vla" and record["step"] >= 1
    with pytest.raises(vp.errors.ConfigError, match=r"method.name: 'throwaway_audio_gain' does not classify .*"
                       r"'throwaway_clip_probe'"):
        load_run_config(path, ["method.name=throwaway_audio_gain"])


def test_a_third_party_diffusion_method_takes_conditions_and_feeds_the_unet(third_party, tmp_path, request):
    root, pipeline = request.getfixturevalue("tiny_run_inputs")
    tree = {
        "task": "diffusion", "model": {"name": str(pipeline)},
        "method": {"name": "throwaway_pooled_control", "in_channels": 1},
        "data": {"root": str(root / "images"), "resolution": 32, "condition": "canny", "eval_images": 1,
                 "sampling": {"steps": 2}},
        "train": {"max_steps": 1, "batch_size": 2, "lr": 1e-2, "progress": False}, "output_dir": str(tmp_path / "o"),
    }
    run = load_run_config(_write(tmp_path, tree))
    task = run.make_task()
    model = task.build_model()
    batch = task.collate([task.train_dataset()[i] for i in range(2)])
    assert batch["condition"].shape[1] == 1  # the method's condition_channels reached the data (default: 3)
    seen = []
    handle = model.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(len(kwargs.get("down_intrablock_additional_residuals") or [])),
        with_kwargs=True)
    Trainer(task, run.train, run.output_dir, model=model).fit()
    handle.remove()
    assert seen and seen[0] == len(model.unet.down_blocks)
    assert any(p.abs().sum() > 0 for p in model.throwaway_control.parameters())
    assert json.loads((tmp_path / "o" / "throwaway_pooled_control.json").read_text())["task"] == "diffusion"
    # The task asks the method, not its name, whether conditions belong in the data.
    del tree["data"]["condition"]
    with pytest.raises(vp.errors.ConfigError, match="throwaway_pooled_control trains on condition images"):
        load_run_config(_write(tmp_path, tree))
    tree["data"]["condition"] = "canny"
    tree["method"] = {"name": "lora"}
    with pytest.raises(vp.errors.ConfigError, match="only the .*throwaway_pooled_control.* uses condition images"):
        load_run_config(_write(tmp_path, tree))



def test_a_third_party_task_missing_its_libraries_names_its_own_extra(tmp_path, monkeypatch):
    """The core names no domain: the install hint comes from the declaring package's own extras."""
    site = tmp_path / "site"
    (site / "audio_pkg-0.1.dist-info").mkdir(parents=True)
    (site / "audio_pkg.py").write_text("import a_library_that_is_not_installed\n")
    (site / "audio_pkg-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: audio-pkg\nVersion: 0.1\nProvides-Extra: audio\n")
    (site / "audio_pkg-0.1.dist-info" / "entry_points.txt").write_text("[visionpeft.tasks]\naudio = audio_pkg:Task\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    from visionpeft.task import available_tasks, get_task

    assert "audio" in available_tasks()
    with pytest.raises(vp.errors.ConfigError, match=r"task: 'audio' needs libraries that are not installed "
                       r"\(No module named 'a_library_that_is_not_installed'\); pip install 'audio-pkg\[audio\]'"):
        get_task("audio")
