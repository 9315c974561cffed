"""The shared trainer on a tiny registered host: exact resume, guards, checkpoints and logs."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import visionpeft as vp
from visionpeft import files
from visionpeft.batches import EpochBatchSampler
from visionpeft.checkpoints import find_checkpoint, list_checkpoints
from visionpeft.errors import NonFiniteLossError, TrainingError
from visionpeft.hosts import Host, register_host, unregister_host
from visionpeft.method import attached_methods, get_state
from visionpeft.optim import lr_factor, param_groups
from visionpeft.runconfig import TrainConfig
from visionpeft.task import Task
from visionpeft.train import Trainer

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


NET_HOST = Host("tests.Net", lambda m: isinstance(m, Net), lora_targets=[r"blocks\.(0|3)"], head="head")


@pytest.fixture(autouse=True)
def net_host():
    host = register_host(NET_HOST)
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
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
        return {"correct": correct, "samples": total}

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        return {"accuracy": totals["correct"] / max(totals["samples"], 1)}


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
    return files.read_adapter(folder)[1]


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


def test_resume_with_other_weight_decay_groups_stops_with_the_reason(tmp_path):
    """Moments must never land on other tensors: a resume whose decay groups changed is refused, unchanged."""
    part = Trainer(NetTask(), config(weight_decay=0.1, max_steps=6), tmp_path / "run")
    part.fit(stop_after=2)
    other = Trainer(NetTask(), config(weight_decay=0.1, max_steps=6, decay_all=True), tmp_path / "run")
    before = trained(other.model)
    with pytest.raises(TrainingError, match=r"resume: the optimizer's groups differ from the checkpoint's \(group "
                                            r"'decay': .* new .*train.decay_all"):
        other.fit(resume=True)
    after = trained(other.model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # checked before anything was loaded
    same = Trainer(NetTask(), config(weight_decay=0.1, max_steps=6), tmp_path / "run")
    assert same.fit(resume=True)["step"] == 6


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
    assert trainer.precision == "bf16"
    assert all(r["loss"] == r["loss"] for r in records(trainer) if "loss" in r)
    assert all(p.dtype == torch.float32 for p in trained(trainer.model).values())
    # A later fp32 trainer in the same process still works.
    assert run(tmp_path, "again", config(max_steps=1)).precision == "fp32"


def autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


class PrecisionTask(NetTask):
    """Records the autocast dtype (``None``: no autocast) the loss and the evaluation run under."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, set] = {"loss": set(), "eval": set()}

    def loss(self, model, batch):
        self.seen["loss"].add(autocast_dtype(batch[0].device.type))
        return super().loss(model, batch)

    def evaluate(self, model, batches):
        batches = list(batches)
        self.seen["eval"].add(autocast_dtype(batches[0][0].device.type))
        return super().evaluate(model, batches)


@pytest.mark.parametrize("first, second", [("fp32", "bf16"), ("bf16", "fp32")])
def test_each_trainer_in_a_process_uses_its_own_precision(tmp_path, first, second):
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    for name, precision in (("first", first), ("second", second)):
        task = PrecisionTask()
        trainer = run(tmp_path, name, config(precision=precision, max_steps=2), task=task)
        assert trainer.precision == precision and trainer.scaler is None
        assert task.seen == {"loss": {dtypes[precision]}, "eval": {dtypes[precision]}}
        assert all(p.dtype == torch.float32 for p in trained(trainer.model).values())
        # Outside the trainer's steps no autocast is left on.
        assert autocast_dtype(trainer.accelerator.device.type) is None


def test_accelerate_precision_in_the_environment_does_not_change_a_run(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    task = PrecisionTask()
    trainer = run(tmp_path, "run", config(max_steps=2), task=task)
    assert task.seen == {"loss": {None}, "eval": {None}} and trainer.scaler is None
    # accelerate reads the variable only when its per-process state is first made: check a fresh process.
    script = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_trainer import NET_HOST, PrecisionTask, Trainer, config
from visionpeft.hosts import register_host
register_host(NET_HOST)
task = PrecisionTask()
trainer = Trainer(task, config(max_steps=2), {str(tmp_path / "fresh")!r})
trainer.fit()
print(json.dumps({{k: sorted(map(str, v)) for k, v in task.seen.items()}}), trainer.accelerator.mixed_precision)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == '{"loss": ["None"], "eval": ["None"]} no'


def test_fp16_loss_scaler_steps_checkpoints_and_resumes_exactly(tmp_path):
    def fp16_trainer(name: str) -> Trainer:
        trainer = Trainer(NetTask(), train, tmp_path / name)
        # fp16 is refused on CPU; setting the precision after construction runs its code path here.
        trainer.precision = "fp16"
        return trainer

    train = config(optimizer="adamw", max_steps=8, max_grad_norm=1.0)
    whole = fp16_trainer("whole")
    whole.fit()
    assert isinstance(whole.scaler, torch.amp.GradScaler) and whole.scaler.get_scale() > 1
    # Every one of the 8 optimizer steps went through the scaler (its count of finite steps in a row).
    assert whole.scaler.state_dict()["_growth_tracker"] == 8
    part = fp16_trainer("parts")
    part.fit(stop_after=3)
    state = torch.load(tmp_path / "parts" / "checkpoints" / "step-0000003" / "trainer_state.pt", weights_only=True)
    assert state["scaler"]["scale"] == part.scaler.get_scale() and state["scaler"]["_growth_tracker"] == 3
    resumed = fp16_trainer("parts")
    resumed.fit(resume=True)
    a, b = trained(whole.model), trained(resumed.model)
    assert all(torch.equal(a[n], b[n]) for n in a) and records(whole) == records(resumed)
    assert resumed.scaler.state_dict() == whole.scaler.state_dict()


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
    # timm's convention: the model names the tensors that get no decay.
    model.no_weight_decay = lambda: {"prompt_tokens"}
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


def group_names(model: nn.Module, groups: list[dict]) -> dict[str, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["group"]: {names[id(p)] for p in g["params"]} for g in groups}


def test_undeclared_matrices_decay_whatever_their_name():
    model = NetTask().build_model()
    model.prompt_tokens = nn.Parameter(torch.zeros(4, 8))
    model.ctx_embedding = nn.Parameter(torch.zeros(2, 8))
    groups = group_names(model, param_groups(model, 0.1))
    assert {"prompt_tokens", "ctx_embedding"} <= groups["decay"]
    assert not {"prompt_tokens", "ctx_embedding"} & groups["no_decay"]


def test_attached_methods_name_their_no_decay_tensors(monkeypatch):
    model = NetTask().build_model()
    lora_a = next(n for n, p in model.named_parameters() if "lora_A" in n and p.requires_grad)
    calls = []

    def no_weight_decay(self, m):
        calls.append(m)
        return {lora_a}

    (method,) = attached_methods(model)
    monkeypatch.setattr(type(method), "no_weight_decay", no_weight_decay)
    groups = group_names(model, param_groups(model, 0.1))
    assert calls == [model]
    assert lora_a in groups["no_decay"] and lora_a not in groups["decay"]
    assert any("lora_B" in n for n in groups["decay"])
    # The model's own declaration adds to the method's.
    lora_b = next(n for n in groups["decay"] if "lora_B" in n)
    model.no_weight_decay = lambda: {lora_b}
    groups = group_names(model, param_groups(model, 0.1))
    assert {lora_a, lora_b} <= groups["no_decay"]
    assert [g["group"] for g in param_groups(model, 0.1, decay_all=True)] == ["decay"]


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


def test_replace_folder_keeps_one_whole_copy(tmp_path):
    target = tmp_path / "out"

    def failing(folder: Path) -> None:
        (folder / "file.txt").write_text("two")
        raise RuntimeError("write failed")

    assert files.replace_folder(target, lambda folder: (folder / "file.txt").write_text("one")) == target
    with pytest.raises(RuntimeError, match="write failed"):
        files.replace_folder(target, failing)
    assert (target / "file.txt").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # A crash between the two renames leaves only the previous copy: the next call puts it back first.
    os.rename(target, tmp_path / ".tmp-old-out")
    (tmp_path / ".tmp-new-out").mkdir()
    seen = []
    files.replace_folder(target, lambda folder: seen.append((target / "file.txt").read_text()))
    assert seen == ["one"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


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
