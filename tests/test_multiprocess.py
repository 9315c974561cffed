"""Two processes under ``accelerate launch`` on the CPU (gloo): what a multi-GPU run relies on.

Each test launches ``visionpeft train`` in two processes through a small launcher script written
here, which registers the tiny CLIP architecture (the vla runs build it by name), records what each
process trained and evaluated, and offers test-only hooks (a NaN on process 1, ``stop_after``).
The data are the tiny sets of tests/test_vit_task.py and tests/test_vla_task.py.

``accelerate launch --cpu`` starts one process unless MPI is installed, so the launch is
``--multi_gpu`` with ``ACCELERATE_USE_CPU=1``: torch's elastic launcher starts two processes and
accelerate joins them with the gloo backend on the CPU.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("timm")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("needs torch.distributed with the gloo backend", allow_module_level=True)

from safetensors.torch import load_file
from test_vit_task import make_vtab
from test_vla_task import eurosat_root, tiny_arch  # noqa: F401  (module-scoped fixtures)

from visionpeft.cli import main

from tiny_models import TINY_CLIP_CFG

VIT_TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 2}
CLIP_MODEL = "visionpeft-test-tiny-clip"

LAUNCHER = r'''
"""visionpeft's CLI with the tiny CLIP registered and the test hooks of tests/test_multiprocess.py."""
import atexit
import json
import os
import sys

from visionpeft.train import Trainer

rank = int(os.environ.get("RANK", "0"))
if os.environ.get("VP_TEST_CLIP_CONFIG"):
    import open_clip

    open_clip.add_model_config(os.environ["VP_TEST_CLIP_CONFIG"])

seen = {"micro_batches": 0, "eval_batches": 0, "eval_samples": 0}
checked = Trainer._checked_loss
nan_at = int(os.environ.get("VP_TEST_NAN_AT", "0"))


def checked_loss(self, loss, epoch, batch):
    seen["micro_batches"] += 1
    if rank == 1 and seen["micro_batches"] == nan_at:
        loss = loss * float("nan")
    return checked(self, loss, epoch, batch)


Trainer._checked_loss = checked_loss
eval_batches = Trainer.eval_batches


def counted_eval_batches(self, dataset):
    for batch in eval_batches(self, dataset):
        seen["eval_batches"] += 1
        seen["eval_samples"] += len(batch[1])
        yield batch


Trainer.eval_batches = counted_eval_batches
if os.environ.get("VP_TEST_STOP_AFTER"):
    fit = Trainer.fit
    Trainer.fit = lambda self, resume=False, stop_after=None: fit(self, resume, int(os.environ["VP_TEST_STOP_AFTER"]))
if os.environ.get("VP_TEST_KILL_AT"):
    # SIGKILL process 1 right after optimizer step N: no cleanup, no checkpoint of that step.
    import signal

    after_step = Trainer._after_step
    kill_at = int(os.environ["VP_TEST_KILL_AT"])

    def after_step_then_die(self, *args):
        after_step(self, *args)
        if rank == 1 and self.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer._after_step = after_step_then_die
if os.environ.get("VP_TEST_RECORD"):
    path = os.path.join(os.environ["VP_TEST_RECORD"], f"rank-{rank}.json")
    atexit.register(lambda: open(path, "w").write(json.dumps(seen)))

from visionpeft.cli import main

raise SystemExit(main(sys.argv[1:]))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, args: list[str], record: Path | None = None, **hooks: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` two CPU processes of the launcher with ``args``; hooks are VP_TEST_* variables."""
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    env.pop("VISIONPEFT_DEBUG", None)
    if record is not None:
        record.mkdir(parents=True, exist_ok=True)
        env["VP_TEST_RECORD"] = str(record)
    env.update({f"VP_TEST_{key.upper()}": str(value) for key, value in hooks.items()})
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "--monitor_interval", "0.5", str(launcher), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def seen(record: Path) -> list[dict]:
    return [json.loads((record / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


# -- vit ------------------------------------------------------------------------------------------


def vit_config(tmp_path: Path, data: Path, output: Path) -> Path:
    # 24 training images in batches of 4: 6 per epoch, 3 on each process; 30 test images in batches
    # of 4: 8 batches, 16 samples on process 0 and 14 on process 1.
    tree = {
        "task": "vit",
        "model": {"name": "vit_tiny_patch16_224", "pretrained": False, "kwargs": VIT_TINY},
        "method": {"name": "lora", "r": 2},
        "data": {"format": "vtab", "root": str(data), "image_size": 32},
        "train": {"max_steps": 4, "batch_size": 4, "eval_batch_size": 4, "lr": 0.01, "optimizer": "adamw",
                  "eval_every": 2, "save_every": 2, "log_every": 1, "seed": 0, "progress": False},
        "output_dir": str(output),
    }
    path = tmp_path / f"{output.name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """An uninterrupted two-process vit run: its folder, config, output and what each process did."""
    root = tmp_path_factory.mktemp("mp-vit")
    data = make_vtab(root / "vtab", {"train800val200": 24, "test": 30})
    config = vit_config(root, data, root / "whole")
    out = launch(root, ["train", str(config)], record=root / "seen")
    assert out.returncode == 0, out.stderr[-4000:]
    return {"root": root, "data": data, "config": config, "folder": root / "whole", "out": out,
            "seen": seen(root / "seen")}


def test_two_processes_train_and_split_the_evaluation(vit_run):
    first, second = vit_run["seen"]
    # Both trained 4 steps of one micro-batch; at steps 2 and 4 each evaluated its own share.
    assert first["micro_batches"] == second["micro_batches"] == 4
    assert (first["eval_batches"], second["eval_batches"]) == (2 * 4, 2 * 4)
    assert (first["eval_samples"], second["eval_samples"]) == (2 * 16, 2 * 14)
    evals = [r for r in records(vit_run["folder"]) if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["eval"]["samples"] == 30 for r in evals)


def test_the_gathered_metrics_equal_a_single_process_evaluation(vit_run, capsys):
    folder = vit_run["folder"]
    final = [r for r in records(folder) if "eval" in r][-1]["eval"]
    assert main(["eval", str(vit_run["config"]), "--adapter", str(folder / "adapter")]) == 0
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert alone["samples"] == final["samples"] == 30
    assert alone["top1"] == final["top1"]  # the same count of correct predictions
    assert alone["loss"] == pytest.approx(final["loss"], rel=1e-5)
    assert json.loads((folder / "results.json").read_text())["top1_last"] == final["top1"]


def test_only_the_main_process_writes_and_prints(vit_run):
    folder, out = vit_run["folder"], vit_run["out"]
    assert sorted(p.name for p in (folder / "adapter").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    assert (folder / "results.json").is_file() and not list(folder.glob("**/.tmp-*"))
    steps = [r["step"] for r in records(folder) if "loss" in r]
    assert steps == [1, 2, 3, 4]  # one line per step, not one per process
    lines = out.stdout.strip().splitlines()
    assert sum('"output_dir"' in line for line in lines) == 1
    result = json.loads(lines[-1])
    assert result["step"] == 4 and result["eval"]["samples"] == 30
    assert "training 4 optimizer steps" in out.stderr and out.stderr.count("training 4 optimizer steps") == 1


def test_a_nan_on_one_process_stops_both_with_the_same_message(vit_run, tmp_path):
    config = vit_config(tmp_path, vit_run["data"], tmp_path / "nan")
    out = launch(tmp_path, ["train", str(config)], nan_at=3)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and errors[0] == errors[1], out.stderr[-4000:]
    assert "the loss is nan at optimizer step 3 " in errors[0] and "on process 1 of 2" in errors[0]
    assert "step-0000002" in errors[0]  # the last checkpoint, to resume from


def test_a_stopped_two_process_run_resumes_to_the_uninterrupted_adapter(vit_run, tmp_path):
    config = vit_config(tmp_path, vit_run["data"], tmp_path / "parts")
    stopped = launch(tmp_path, ["train", str(config)], stop_after=3)
    assert stopped.returncode == 0, stopped.stderr[-4000:]
    assert json.loads(stopped.stdout.strip().splitlines()[-1])["stopped"] is True
    resumed = launch(tmp_path, ["train", str(config), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    whole = load_file(vit_run["folder"] / "adapter" / "adapter.safetensors")
    parts = load_file(tmp_path / "parts" / "adapter" / "adapter.safetensors")
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)
    assert records(tmp_path / "parts") == records(vit_run["folder"])


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_adapter(vit_run, tmp_path):
    """kill -9 of one process after step 3 (checkpoints at 2 and 4): the launcher stops the run; --resume
    continues from step 2 and ends bit-identical to the uninterrupted run."""
    config = vit_config(tmp_path, vit_run["data"], tmp_path / "killed")
    killed = launch(tmp_path, ["train", str(config)], kill_at=3)
    assert killed.returncode != 0
    assert [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()] == ["step-0000002"]
    assert not (tmp_path / "killed" / "adapter").exists()
    resumed = launch(tmp_path, ["train", str(config), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    whole = load_file(vit_run["folder"] / "adapter" / "adapter.safetensors")
    parts = load_file(tmp_path / "killed" / "adapter" / "adapter.safetensors")
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)
    assert records(tmp_path / "killed") == records(vit_run["folder"])


# -- vla ------------------------------------------------------------------------------------------


def test_two_process_base_to_novel_gathers_base_and_novel_accuracy(tmp_path, request, capsys):
    root, arch = request.getfixturevalue("eurosat_root"), request.getfixturevalue("tiny_arch")
    clip_config = tmp_path / f"{CLIP_MODEL}.json"
    clip_config.write_text(json.dumps(TINY_CLIP_CFG))
    # 2 base classes x 2 shots in batches of 2: one batch per process and epoch. The base and the
    # novel test sets have 4 images each, in batches of 3: 3 on process 0, 1 on process 1.
    tree = {
        "task": "vla", "model": {"name": arch}, "method": {"name": "coop", "n_ctx": 4},
        "data": {"format": "coop", "dataset": "EuroSAT", "root": str(root), "setting": "base2novel",
                 "shots": 2},
        "train": {"recipe": "coop", "epochs": 2, "batch_size": 2, "eval_batch_size": 3, "seed": 1, "progress": False},
        "output_dir": str(tmp_path / "run"),
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tree))
    out = launch(tmp_path, ["train", str(config)], record=tmp_path / "seen", clip_config=clip_config)
    assert out.returncode == 0, out.stderr[-4000:]
    first, second = seen(tmp_path / "seen")
    assert first["micro_batches"] == second["micro_batches"] == 2
    # The base and the novel set, each split 3 / 1.
    assert (first["eval_samples"], second["eval_samples"]) == (3 + 3, 1 + 1)
    final = [r for r in records(tmp_path / "run") if "eval" in r][-1]["eval"]
    assert final["samples"] == final["novel_samples"] == 4
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert main(["eval", str(config), "--adapter", str(tmp_path / "run" / "adapter")]) == 0
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("base", "novel", "hm", "samples", "novel_samples"):
        assert alone[key] == final[key], key
    assert (results["base"], results["novel"]) == (final["base"], final["novel"])

