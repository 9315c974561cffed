"""The command line: listing, errors with key paths, python -m and the console script."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from visionpeft.cli import main


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("lora", "bitfit", "vpt", "adaptformer", "st_adapter", "linear", "full"):
        assert name in out
    assert main(["methods", "--domain", "vla"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "vpt" not in out


def test_python_dash_m_and_the_console_script_work():
    result = subprocess.run([sys.executable, "-m", "visionpeft", "--version"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("visionpeft ")
    script = shutil.which("visionpeft") or str(__import__("pathlib").Path(sys.executable).parent / "visionpeft")
    result = subprocess.run([script, "methods"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "lora" in result.stdout


def test_bad_config_exits_2_with_the_key_path(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"task": "vit", "method": {"name": "lora"}, "train": {"max_steps": 1, "lrr": 1}}))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train: unknown key(s) ['lrr']")
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", str(path), "--set", "train.lr"]) == 2
    assert "key.path=value" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as err:
        main(["train"])
    assert err.value.code == 2
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_demo_options_reach_the_demo(capsys):
    with pytest.raises(SystemExit) as err:
        main(["demo", "--help"])
    assert err.value.code == 0
    assert "--output-dir" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["methods", "--output-dir", "x"])


def test_demo_lists_the_registered_demos_and_names_a_missing_one(capsys):
    assert main(["demo", "--list"]) == 0
    assert "visionpeft demo vit (the default)" in capsys.readouterr().out
    assert main(["demo", "nope"]) == 2
    assert "no demo 'nope'; installed: vit" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["demo", "vit", "--help"])  # a named demo gets the options after its name
    assert err.value.code == 0 and "--output-dir" in capsys.readouterr().out


def test_methods_takes_any_registered_domain_and_lists_them_for_an_unknown_one(capsys):
    assert main(["methods", "--domain", "diffusion"]) == 0
    assert "textual_inversion" in capsys.readouterr().out
    assert main(["methods", "--domain", "audio"]) == 2
    assert "the installed methods' domains are ['core', " in capsys.readouterr().err


# --- file-system errors: one line naming the path and the fix ------------------------------------


@pytest.fixture(scope="module")
def vtab(tmp_path_factory):
    from test_vit_task import make_vtab

    return make_vtab(tmp_path_factory.mktemp("vtab") / "toy", {"train800val200": 16, "test": 8})


def _config(tmp_path, vtab, output, **train):
    from test_vit_task import run_config

    train = {"epochs": None, "max_steps": 2, "batch_size": 8, **train}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config(vtab, output, {"name": "linear"}, **train)))
    return str(path)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_an_output_dir_under_a_file_is_one_line_naming_it(tmp_path, vtab, capsys):
    (tmp_path / "a_file").write_text("")
    output = tmp_path / "a_file" / "run"
    assert main(["train", _config(tmp_path, vtab, output)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: cannot use {output}") and "a part of the path is a file, not a folder" in line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_an_output_dir_in_a_read_only_folder_is_one_line_naming_it(tmp_path, vtab, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert main(["train", _config(tmp_path, vtab, locked / "run")]) == 1
    finally:
        locked.chmod(0o700)
    line = _one_error_line(capsys)
    assert line.startswith(f"error: cannot access {locked / 'run'}: Permission denied; check its permissions")


def test_a_full_disk_is_one_line_naming_the_file_or_the_output_dir(tmp_path, vtab, capsys, monkeypatch):
    from visionpeft.train import Trainer

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a failed write reports it: no file name

    output = tmp_path / "run"
    config = _config(tmp_path, vtab, output)
    monkeypatch.setattr(os, "fsync", full)  # the first file written atomically is the run's config.yaml
    assert main(["train", config]) == 1
    assert _one_error_line(capsys) == (f"error: cannot write {output / 'config.yaml'}: No space left on device; free "
                                       "space or choose another output_dir")
    monkeypatch.undo()
    monkeypatch.setattr(Trainer, "_write_metrics", full)  # a plain open().write() of metrics.jsonl
    assert main(["train", config]) == 1
    assert _one_error_line(capsys) == (f"error: cannot write {output}: No space left on device; free space or choose "
                                       "another output_dir")
    monkeypatch.setenv("VISIONPEFT_DEBUG", "1")
    with pytest.raises(OSError):
        main(["train", config])


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _pickle_an_object(path):
    import argparse

    import torch

    torch.save({"args": argparse.Namespace(lr=0.1)}, path)


def _flip_a_tensor_byte(path):
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x01
    path.write_bytes(bytes(blob))


def _flip_a_byte_torch_loads(path):
    """Change one value of the optimizer state in place: the zip stays valid and torch loads it."""
    import torch

    state = torch.load(path, weights_only=True)
    blob = bytearray(path.read_bytes())
    moments = next(v for v in state["optimizer"]["state"].values() if "exp_avg" in v)["exp_avg"]
    raw = moments.numpy().tobytes()
    at = bytes(blob).find(raw)
    assert at > 0
    blob[at] ^= 0x01
    path.write_bytes(bytes(blob))
    torch.load(path, weights_only=True)  # loads without a word: only the checksum can tell


@pytest.mark.parametrize(("name", "damage", "says"), [
    ("trainer_state.pt", _truncate, "is truncated or damaged"),
    ("trainer_state.pt", _flip_a_byte_torch_loads, "does not match the checksum in trainer_state.json"),
    ("trainer_state.pt", _pickle_an_object, "is a pickled checkpoint with Python objects besides tensors"),
    ("adapter/adapter.safetensors", _flip_a_tensor_byte, "is damaged: its tensors match neither the checksum"),
], ids=["truncated-state", "flipped-state", "pickled-state", "flipped-adapter"])
def test_a_damaged_checkpoint_is_one_line_saying_how_to_go_on(tmp_path, vtab, capsys, name, damage, says):
    from visionpeft.checkpoints import find_checkpoint

    output = tmp_path / "run"
    config = _config(tmp_path, vtab, output, save_every=1)
    assert main(["train", config]) == 0
    checkpoint = find_checkpoint(output)
    damage(checkpoint / name)
    capsys.readouterr()
    assert main(["train", config, "--resume"]) == 1
    line = _one_error_line(capsys)
    assert line.startswith("error: resume: ") and f"{checkpoint / name} {says}" in line
    assert f"delete {checkpoint} to resume from the one before it, or start the run in a new output_dir" in line


def test_a_failed_checkpoint_write_leaves_the_previous_one_to_resume_from(tmp_path, vtab, capsys, monkeypatch):
    from visionpeft import checkpoints

    real, calls = checkpoints.save_adapters, []

    def fails_the_second_time(model, directory):
        calls.append(directory)
        if len(calls) == 2:
            real(model, directory)  # part of the checkpoint is written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "adapter.safetensors"))
        return real(model, directory)

    output = tmp_path / "run"
    config = _config(tmp_path, vtab, output, max_steps=4, save_every=2)
    monkeypatch.setattr(checkpoints, "save_adapters", fails_the_second_time)
    assert main(["train", config]) == 1
    assert "No space left on device; free space or choose another output_dir" in _one_error_line(capsys)
    monkeypatch.undo()
    assert checkpoints.find_checkpoint(output).name == "step-0000002"
    assert [p.name for p in (output / "checkpoints").iterdir()] == ["step-0000002"]  # no half-written folder
    assert main(["train", config, "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 4


def test_an_unexpected_error_shows_its_traceback_and_asks_for_a_report():
    code = ("import sys, visionpeft.cli as cli\n"
            "def bug(domain):\n    raise ZeroDivisionError('a bug')\n"
            "cli._methods = bug\nsys.exit(cli.main(['methods']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ZeroDivisionError: a bug" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: this is a bug in visionpeft")
