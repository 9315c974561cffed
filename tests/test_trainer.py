"""The shared trainer on a tiny registered host: exact resume, guards, checkpoints and logs."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import visionpeft as vp
from visionpeft import files
from visionpeft.errors import NonFiniteLossError, TrainingError
from visionpeft.hosts import Host, register_host, unregister_host
from visionpeft.method import get_state
from visionpeft.runconfig import TrainConfig
from visionpeft.task import Task
from visionpeft.train import (
    EpochBatchSampler,
    Trainer,
    find_checkpoint,
    list_checkpoints,
    lr_factor,
    param_groups,
)

NUM_SAMPLES = 42  # 11 batches of 4, the last one short


class Net(nn.Module):
    """Linear -> Dropout -> ReLU -> Linear, a LayerNorm and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1), nn.ReLU(), nn.Linear(16, 8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(x)))


@pytest.fixture(autouse=True)
def net_host():
    host = register_host(
        Host("tests.Net", lambda m: isinstance(m, Net), lora_targets=[r"blocks\.(0|3)"], head="head")
    )
    yield host
    unregister_host(host.family)


class NetTask(Task):
    """Classify random vectors; accuracy as the metric."""

    name = "tests-net"

    def __init__(self, eval_set: bool = True) -> None:
        super().__init__(None)
        self.eval_set = eval_set
        self.loss_calls = 0

    def build_model(self, adapter=None) -> nn.Module:
        torch.manual_seed(0)
        return vp.attach(Net(), "lora", r=4, dropout=0.1)

    def _data(self, seed: int, n: int) -> TensorDataset:
        g = torch.Generator().manual_seed(seed)
        return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))

    def train_dataset(self) -> TensorDataset:
        return self._data(1, NUM_SAMPLES)

    def eval_dataset(self) -> TensorDataset | None:
        return self._data(2, 12) if self.eval_set else None

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        self.loss_calls += 1
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        correct = total = 0
        for x, y in batches:
            correct += (model(x).argmax(-1) == y).sum().item()
            total += len(y)
        return {"accuracy": correct / total}


def config(**kwargs) -> TrainConfig:
    base = {"max_steps": 6, "batch_size": 4, "lr": 0.05, "progress": False, "log_every": 2, "warmup_steps": 2}
    return TrainConfig(**{**base, **kwargs})


def trained(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run(tmp_path: Path, name: str, train: TrainConfig, task: Task | None = None, **fit) -> Trainer:
    trainer = Trainer(task or NetTask(), train, tmp_path / name)
    trainer.fit(**fit)
    return trainer


def read_adapter(folder: Path) -> dict[str, torch.Tensor]:
    return files.read_adapter_tensors(folder, files.read_adapter_config(folder))


def trained_keys(trainer: Trainer) -> set[str]:
    return set(get_state(trainer.model).adapters["default"].method.trained_tensors(trainer.model))


def records(trainer: Trainer) -> list[dict]:
    return [json.loads(line) for line in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]


# -- exact resume ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, stop",
    [
        # AdamW, cosine with warmup, resume mid-epoch (epoch 0 has 11 steps), crossing an epoch after.
        ({"optimizer": "adamw", "max_steps": 14, "eval_every": 3, "max_grad_norm": 1.0}, 7),
        # SGD, grad_accum 2: 6 steps per epoch (the last of one micro-batch), resume mid-epoch 1.
        ({"optimizer": "sgd", "max_steps": 16, "grad_accum": 2, "weight_decay": 0.01}, 9),
        # No shuffle, drop_last, epochs instead of max_steps; resume at an epoch boundary.
        ({"epochs": 2, "max_steps": None, "shuffle": False, "drop_last": True, "scheduler": "constant"}, 10),
    ],
)
def test_resume_is_bit_identical(tmp_path, settings, stop):
    train = config(**settings)
    whole = run(tmp_path, "whole", train)
    part = Trainer(NetTask(), train, tmp_path / "parts")
    stopped = part.fit(stop_after=stop)
    assert stopped["stopped"] and stopped["step"] == stop and part.global_step == stop
    assert find_checkpoint(tmp_path / "parts").name == f"step-{stop:07d}"
    resumed = Trainer(NetTask(), train, tmp_path / "parts")
    result = resumed.fit(resume=True)
    assert result["step"] == whole.global_step
    a, b = trained(whole.model), trained(resumed.model)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert records(whole) == records(resumed)


class TwoAdapterTask(NetTask):
    """Two LoRA adapters, and the norm's scale trained outside any adapter."""

    def build_model(self, adapter=None) -> nn.Module:
        model = super().build_model()
        model = vp.attach(model, "lora", name="second", r=2, train_head=False)
        model.norm.weight.requires_grad_(True)
        return model


def test_resume_with_several_adapters_and_extra_trainables(tmp_path):
    train = config(max_steps=5, progress=True)
    whole = run(tmp_path, "whole", train, task=TwoAdapterTask())
    run(tmp_path, "parts", train, task=TwoAdapterTask(), stop_after=3)
    checkpoint = tmp_path / "parts" / "checkpoints" / "step-0000003"
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert list(state["extra_tensors"]) == ["norm.weight"]
    resumed = run(tmp_path, "parts", train, task=TwoAdapterTask(), resume=True)
    a, b = trained(whole.model), trained(resumed.model)
    assert "norm.weight" in a and all(torch.equal(a[n], b[n]) for n in a)
    assert {p.name for p in (tmp_path / "parts" / "adapter").iterdir()} == {"default", "second"}
    assert read_adapter(tmp_path / "parts" / "checkpoints" / "step-0000005" / "adapter" / "second")


def test_resume_without_checkpoint_starts_fresh(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="visionpeft"):
        trainer = run(tmp_path, "run", config(max_steps=2), resume=True)
    assert trainer.global_step == 2
    assert "no checkpoint" in caplog.text


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    run(tmp_path, "run", config(max_steps=2))
    with pytest.raises(TrainingError, match="resume"):
        run(tmp_path, "run", config(max_steps=2))


# -- guards ----------------------------------------------------------------------------------------


class NaNTask(NetTask):
    """The loss turns NaN at the third micro-batch."""

    def loss(self, model, batch):
        loss = super().loss(model, batch)
        return loss * float("nan") if self.loss_calls == 3 else loss


def test_nan_loss_names_the_step_and_last_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError) as err:
        run(tmp_path, "run", config(save_every=2), task=NaNTask())
    message = str(err.value)
    assert "optimizer step 3 " in message and "nan" in message
    assert "step-0000002" in message and "train.lr" in message and "max_grad_norm" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused on CPU only")
def test_fp16_on_cpu_is_refused(tmp_path):
    with pytest.raises(TrainingError, match=r"fp16 needs a GPU.*bf16"):
        Trainer(NetTask(), config(precision="fp16"), tmp_path / "run")


def test_bf16_runs_on_cpu_and_keeps_trained_tensors_fp32(tmp_path):
    trainer = run(tmp_path, "run", config(precision="bf16", max_steps=3))
    assert trainer.accelerator.mixed_precision == "bf16"
    assert all(r["loss"] == r["loss"] for r in records(trainer) if "loss" in r)
    assert all(p.dtype == torch.float32 for p in trained(trainer.model).values())
    # A later fp32 trainer in the same process still works.
    assert run(tmp_path, "again", config(max_steps=1)).accelerator.mixed_precision == "no"


def test_half_precision_trainables_are_cast_to_fp32(tmp_path):
    model = NetTask().build_model().to(torch.bfloat16)
    trainer = Trainer(NetTask(), config(precision="bf16"), tmp_path / "run", model=model)
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in trainer.model.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_gradient_checkpointing_needs_support(tmp_path):
    with pytest.raises(TrainingError, match="offers none"):
        run(tmp_path, "run", config(gradient_checkpointing=True, max_steps=1))
    calls = []
    model = NetTask().build_model()
    model.set_grad_checkpointing = lambda enable=True: calls.append(enable)
    Trainer(NetTask(), config(gradient_checkpointing=True, max_steps=1), tmp_path / "ok", model=model).fit()
    assert calls == [True]


# -- optimizer, schedule, accumulation -------------------------------------------------------------


def test_no_weight_decay_on_biases_norms_and_prompts():
    model = NetTask().build_model()
    model.prompt_tokens = nn.Parameter(torch.zeros(4, 8))
    model.norm.weight.requires_grad_(True)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {
        g["group"]: (g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in param_groups(model, 0.1)
    }
    decay_wd, decayed = groups["decay"]
    no_decay_wd, not_decayed = groups["no_decay"]
    assert decay_wd == 0.1 and no_decay_wd == 0.0
    assert decayed and all(("lora_A" in n or "lora_B" in n or n.endswith("weight")) for n in decayed)
    assert {"prompt_tokens", "norm.weight"} <= not_decayed
    assert all(n.endswith("bias") or n in {"prompt_tokens", "norm.weight"} for n in not_decayed)
    assert not any(n.endswith("bias") for n in decayed)
    assert not any(not model.get_parameter(n).requires_grad for n in decayed | not_decayed)
    every = param_groups(model, 0.1, decay_all=True)
    assert [g["group"] for g in every] == ["decay"]


def test_trainer_optimizer_groups_and_frozen_base(tmp_path):
    model = NetTask().build_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = trained(model)
    trainer = Trainer(NetTask(), config(weight_decay=0.05), tmp_path / "run", model=model)
    trainer.fit()
    wd = {g["group"]: g["weight_decay"] for g in trainer.optimizer.param_groups}
    assert wd == {"decay": 0.05, "no_decay": 0.0}
    for g in trainer.optimizer.param_groups:
        if g["group"] == "decay":
            assert all(p.ndim >= 2 for p in g["params"])
    for n, p in trainer.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    after = trained(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_grad_accumulation_steps_the_optimizer_per_group(tmp_path):
    task = NetTask(eval_set=False)
    # 11 micro-batches per epoch in groups of 3: 4 optimizer steps per epoch (3, 3, 3, 2).
    trainer = run(tmp_path, "run", config(epochs=2, max_steps=None, grad_accum=3), task=task)
    assert trainer.global_step == 8 and trainer.epoch == 2
    assert task.loss_calls == 22
    steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {8}
    assert trainer.scheduler.last_epoch == 8


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 10, 2) == 0.0 and lr_factor(1, 10, 2) == 0.5 and lr_factor(2, 10, 2) == 1.0
    assert lr_factor(10, 10, 2) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(6, 10, 2, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(7, 10, 2, schedule="constant") == 1.0


def test_batch_sampler_shards_and_restarts():
    whole = EpochBatchSampler(10, 3, epoch=1, seed=5)
    assert sorted(i for b in whole for i in b) == list(range(10)) and len(whole) == 4
    assert list(EpochBatchSampler(10, 3, epoch=1, seed=5, start=2)) == list(whole)[2:]
    assert list(EpochBatchSampler(10, 3, epoch=2, seed=5)) != list(whole)
    assert list(EpochBatchSampler(10, 3, epoch=0, seed=5, shuffle=False, drop_last=True)) == [
        [0, 1, 2], [3, 4, 5], [6, 7, 8]
    ]
    shards = [list(EpochBatchSampler(10, 3, epoch=1, seed=5, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [2, 2, 2]
    assert {tuple(b) for s in shards for b in s} == {tuple(b) for b in whole}


# -- checkpoints -----------------------------------------------------------------------------------


def test_keep_last_prunes_old_checkpoints(tmp_path):
    trainer = run(tmp_path, "run", config(save_every=1, keep_last=2))
    assert [p.name for p in list_checkpoints(trainer.output_dir)] == ["step-0000005", "step-0000006"]
    checkpoint = trainer.output_dir / "checkpoints" / "step-0000006"
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert state["step"] == 6 and {"optimizer", "scheduler", "rng", "epoch", "batch"} <= state.keys()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 6
    assert read_adapter(checkpoint / "adapter").keys() == trained_keys(trainer)
    assert not list((trainer.output_dir / "checkpoints").glob(".tmp-*"))


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    train = config(save_every=2, max_steps=6)
    whole = run(tmp_path, "whole", train)
    real_rename = os.rename

    def failing_rename(src, dst):
        if "step-0000004" in str(dst):
            raise OSError("disk full")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, "run", train)
    monkeypatch.setattr(os, "rename", real_rename)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000002"]
    state = torch.load(root / "step-0000002" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2
    assert read_adapter(root / "step-0000002" / "adapter")
    # A crash mid-write leaves a temporary folder; resume must ignore it.
    (root / ".tmp-step-0000005").mkdir()
    (root / ".tmp-step-0000005" / "trainer_state.pt").write_bytes(b"partial")
    resumed = Trainer(NetTask(), train, tmp_path / "run")
    resumed.fit(resume=True)
    a, b = trained(whole.model), trained(resumed.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not list(root.glob(".tmp-*"))


# -- outputs ---------------------------------------------------------------------------------------


def test_metrics_adapter_config_and_curves(tmp_path):
    trainer = Trainer(NetTask(), config(eval_every=3), tmp_path / "run", run_config={"task": "tests-net"})
    result = trainer.fit()
    lines = records(trainer)
    losses = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "eval" in r]
    assert [r["step"] for r in losses] == [2, 4, 6]
    assert all(set(r) == {"step", "epoch", "loss", "lr"} and math.isfinite(r["loss"]) for r in losses)
    assert losses[0]["lr"] == pytest.approx(0.05 * lr_factor(1, 6, 2))
    assert [r["step"] for r in evals] == [3, 6]
    assert all(set(r) == {"step", "epoch", "eval"} and 0 <= r["eval"]["accuracy"] <= 1 for r in evals)
    assert result["step"] == 6 and result["eval"] == evals[-1]["eval"]
    out = trainer.output_dir
    assert (out / "config.yaml").read_text().startswith("task: tests-net")
    assert (out / "curves.png").stat().st_size > 0
    torch.manual_seed(0)  # the base weights the task built
    loaded = vp.load(Net(), out / "adapter")
    assert {t.dtype for t in read_adapter(out / "adapter").values()} == {torch.float32}
    assert trainer.evaluate(loaded.eval()) == pytest.approx(trainer.evaluate())


def test_evaluate_alone_and_no_eval_set(tmp_path):
    trainer = Trainer(NetTask(), config(), tmp_path / "run")
    assert set(trainer.evaluate()) == {"accuracy"} and not trainer.model.training
    plain = Trainer(NetTask(eval_set=False), config(max_steps=2), tmp_path / "none")
    result = plain.fit()
    assert "eval" not in result and plain.evaluate() == {}
    assert not any("eval" in r for r in records(plain))


def test_curves_are_skipped_without_matplotlib(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with caplog.at_level(logging.INFO, logger="visionpeft"):
        trainer = run(tmp_path, "run", config(max_steps=2))
    assert not (trainer.output_dir / "curves.png").exists()
    assert "visionpeft[plots]" in caplog.text and (trainer.output_dir / "adapter").is_dir()
