"""What ``visionpeft train`` and ``eval`` print and log: a table, one JSON line, visionpeft's own log lines."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from visionpeft.cli import main
from visionpeft.report import run_table

pytest.importorskip("timm")

from test_vit_task import make_vtab, run_config


@pytest.fixture(scope="module")
def vtab(tmp_path_factory):
    return make_vtab(tmp_path_factory.mktemp("vtab") / "toy", {"train800val200": 12, "test": 6})


def test_train_prints_a_table_then_the_json_line_and_counts_epochs_as_metrics_jsonl(vtab, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    # 12 images in batches of 4: the run ends on the boundary of epoch 2 (0-based: its last step is in epoch 1).
    config.write_text(yaml.safe_dump(run_config(vtab, tmp_path / "run", {"name": "linear"}, epochs=2, batch_size=4)))
    assert main(["train", str(config)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    table = dict(line.split(None, 1) for line in lines[:-1] if not line.startswith(("train loss", "run folder")))
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["epoch"] == last["epoch"] == 1 and result["epochs"] == 2.0 and result["step"] == 6
    assert table["steps"] == "6 (2 epochs)" and table["top1"] == f"{result['eval']['top1']:.4g}"
    assert table["trainable"].startswith(f"{result['params']['trainable']:,} of ")
    assert table["files"].split()[:2] == ["adapter/", "results.json"]
    assert any(line.startswith("run folder") and line.endswith(str(tmp_path / "run")) for line in lines)


def test_the_table_of_a_stopped_run_says_how_to_continue(tmp_path):
    text = run_table(tmp_path, {"step": 3, "epochs": 0.5, "loss": 0.25, "stopped": True})
    assert "steps       3 (0.5 epochs)" in text and "continue with --resume" in text


def test_the_cli_shows_visionpeft_info_lines_and_leaves_the_root_logger_alone(capsys, monkeypatch):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    for _ in range(2):
        assert main(["methods"]) == 0
    assert root.handlers == handlers and root.level == level
    ours = logging.getLogger("visionpeft")
    assert len([h for h in ours.handlers if type(h).__name__ == "_Stderr"]) == 1
    capsys.readouterr()
    logging.getLogger("open_clip").info("an open_clip INFO line")
    ours.info("a visionpeft INFO line")
    err = capsys.readouterr().err
    assert "a visionpeft INFO line" in err and "open_clip" not in err
    # Under accelerate launch the processes after the first keep to warnings.
    monkeypatch.setenv("RANK", "1")
    assert main(["methods"]) == 0
    capsys.readouterr()
    ours.info("process 1 INFO")
    ours.warning("process 1 WARNING")
    err = capsys.readouterr().err
    assert "process 1 INFO" not in err and "process 1 WARNING" in err
    monkeypatch.delenv("RANK")
    main(["methods"])


def test_eval_without_an_evaluation_set_says_which_key_of_the_task_turns_it_on(vtab, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(vtab, tmp_path / "run", {"name": "linear"})))
    assert main(["eval", str(config), "--set", "data.eval_split=none"]) == 2
    assert "data.eval_split: 'none' turns evaluation off" in capsys.readouterr().err
