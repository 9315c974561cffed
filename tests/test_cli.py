"""The command line: listing, errors with key paths, python -m and the console script."""

from __future__ import annotations

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
