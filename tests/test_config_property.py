"""Any run config, valid or broken, gets through the config check or stops with the library's own error.

Hypothesis mutates a valid run config of each task (a wrong type, an unknown key, an out-of-range
number, a missing section or key, null) and runs ``visionpeft train`` on it up to the point where
the task would be built. The CLI must then either have passed the check, or exited with status 2
and one ``error:`` line that names the section it refused; never another exception, never a
traceback.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from visionpeft.cli import main
from visionpeft.runconfig import RunConfig

VALID = {
    "vit": {
        "task": "vit",
        "model": {"name": "vit_tiny_patch16_224", "pretrained": False, "kwargs": {"img_size": 32}},
        "method": {"name": "vpt", "num_tokens": 4, "deep": True},
        "data": {"format": "vtab", "root": "data/vtab", "train_split": "train800val200", "image_size": 32},
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.01, "optimizer": "sgd", "warmup_epochs": 1},
        "output_dir": "runs/x",
    },
    "vla": {
        "task": "vla",
        "model": {"name": "ViT-B-16"},
        "method": {"name": "coop", "n_ctx": 4, "ctx_init": None},
        "data": {"format": "coop", "dataset": "EuroSAT", "root": "data", "setting": "base2novel", "shots": 4},
        "train": {"recipe": "coop", "batch_size": 4},
        "output_dir": "runs/x",
    },
    "diffusion": {
        "task": "diffusion",
        "model": {"name": "stable-diffusion-v1-5/stable-diffusion-v1-5"},
        "method": {"name": "lora", "r": 4, "alpha": 4, "targets": ["@unet_attn"]},
        "data": {"root": "data/dog", "instance_prompt": "a photo of sks dog", "resolution": 64,
                 "loss": {"snr_gamma": 5.0}, "sampling": {"prompts": ["a dog"], "steps": 2}},
        "train": {"max_steps": 3, "lr": 1e-4, "batch_size": 1},
        "output_dir": "runs/x",
    },
}

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(min_size=1, max_size=4), st.integers(0, 3), max_size=2),
)


class ReachedTheTask(Exception):
    """Raised instead of building the task: the config check passed."""


def _paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in tree.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out += _paths(value, (*prefix, key))
    return out


@st.composite
def mutated(draw, task: str) -> tuple[dict, tuple]:
    """A run config of ``task`` with one to three mutations; returns it and the first mutated path."""
    tree = copy.deepcopy(VALID[task])
    first = None
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(tree)
        kind = draw(st.sampled_from(["replace", "add", "delete", "number"]))
        path = draw(st.sampled_from(paths)) if paths else ("task",)
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        if kind == "replace":
            parent[path[-1]] = draw(JUNK)
        elif kind == "delete":
            parent.pop(path[-1], None)
        elif kind == "add":
            target = parent[path[-1]] if isinstance(parent.get(path[-1]), dict) else parent
            name = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8))
            target[name] = draw(JUNK)
            path = (*path[:-1], path[-1], name) if target is not parent else (*path[:-1], name)
        else:
            parent[path[-1]] = draw(st.sampled_from([0, -1, 10**9, 1e-30, -0.5, 1.5]))
        first = first or path
    return tree, first


@pytest.fixture(autouse=True)
def stop_before_the_task(monkeypatch):
    def reached(self):
        raise ReachedTheTask

    monkeypatch.setattr(RunConfig, "make_task", reached)


def _check(tree: dict, path: tuple, capsys) -> None:
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "run.yaml"
        config.write_text(yaml.safe_dump(tree))
        try:
            status = main(["train", str(config)])
        except ReachedTheTask:
            capsys.readouterr()
            return
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, (tree, err)
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), (tree, err)
    message = lines[0][len("error: "):]
    sections = ("task", "model", "method", "data", "train", "output_dir", "unknown section")
    assert message.startswith(sections) or "run config" in message, (tree, path, message)


@pytest.mark.parametrize("task", sorted(VALID))
def test_the_valid_configs_pass_the_check(task, capsys):
    with pytest.raises(ReachedTheTask), tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "run.yaml"
        config.write_text(yaml.safe_dump(VALID[task]))
        main(["train", str(config)])


@pytest.mark.parametrize("task", sorted(VALID))
@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mutated_config_passes_or_names_what_it_refuses(task, data, capsys):
    tree, path = data.draw(mutated(task))
    _check(tree, path, capsys)
