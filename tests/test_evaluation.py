"""The evaluation contract and the end of a run: totals that add up, shards, and what is written first."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from visionpeft import files
from visionpeft.errors import TrainingError
from visionpeft.method import attached_methods
from visionpeft.train import Trainer

from test_trainer import NetTask, config, net_host, records  # noqa: F401  (net_host: the autouse host fixture)


class BrokenEvalTask(NetTask):
    """Trains normally; the evaluation raises (as an evaluation set with a bad file would)."""

    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls

    def evaluate(self, model, batches):
        self.calls.append("evaluate")
        raise RuntimeError("evaluation broke")

    def export(self, model, output_dir):
        self.calls.append("task export")


def test_a_failing_final_evaluation_keeps_the_adapter_and_the_checkpoint(tmp_path, monkeypatch):
    calls: list[str] = []
    trainer = Trainer(BrokenEvalTask(calls), config(max_steps=4), tmp_path / "run")
    (method,) = attached_methods(trainer.model)
    monkeypatch.setattr(type(method), "export", lambda self, model, output_dir, run: calls.append("method export"))
    with pytest.raises(RuntimeError, match="evaluation broke"):
        trainer.fit()
    # The files of the trained tensors first; the task's results need the evaluation, so they never came.
    assert calls == ["method export", "evaluate"]
    out = tmp_path / "run"
    _, tensors = files.read_adapter(out / "adapter")
    assert tensors.keys() == method.trained_tensors(trainer.model).keys()
    assert (out / "checkpoints" / "step-0000004" / "trainer_state.pt").is_file()
    assert [r["step"] for r in records(trainer) if "loss" in r] == [2, 4]  # the losses were logged first
    assert not (out / "curves.png").exists()  # plots come after the evaluation


class RatioTask(NetTask):
    """Breaks the contract: returns a value that does not add up over processes."""

    def evaluate(self, model, batches):
        return {"accuracy": 0.5, "note": "best so far"}


def test_evaluate_must_return_numbers_that_add_up(tmp_path):
    trainer = Trainer(RatioTask(), config(), tmp_path / "run")
    with pytest.raises(TrainingError, match=r"note='best so far'.*Task\.summarize"):
        trainer.evaluate()


def test_summarize_turns_the_totals_into_metrics_and_the_main_process_writes(tmp_path):
    class Recording(NetTask):
        def __init__(self):
            super().__init__()
            self.seen = []

        def summarize(self, totals):
            self.seen.append(("summarize", dict(totals)))
            return super().summarize(totals)

        def write_evaluation(self, model, metrics):
            self.seen.append(("write", self.step, dict(metrics)))

    task = Recording()
    trainer = Trainer(task, config(max_steps=2, eval_every=1), tmp_path / "run")
    result = trainer.fit()
    assert [entry[0] for entry in task.seen] == ["summarize", "write"] * 2
    assert task.seen[0][1] == {"correct": task.seen[0][1]["correct"], "samples": 12}
    assert task.seen[1][1] == 1 and task.seen[3][1] == 2  # the step is set before the files are written
    assert result["eval"] == task.seen[3][2] == {"accuracy": task.seen[2][1]["correct"] / 12}


@pytest.mark.parametrize(("samples", "batch", "world"), [(12, 5, 2), (12, 4, 3), (3, 2, 4), (10, 3, 1)])
def test_each_process_gets_whole_batches_and_together_every_sample_once(tmp_path, samples, batch, world):
    trainer = Trainer(NetTask(), config(eval_batch_size=batch), tmp_path / "run")
    dataset = TensorDataset(torch.arange(samples))
    shards = []
    for rank in range(world):
        trainer.accelerator = SimpleNamespace(process_index=rank, num_processes=world, device=torch.device("cpu"))
        shards.append([batch_[0].tolist() for batch_ in trainer.eval_batches(dataset)])
    seen = [i for shard in shards for b in shard for i in b]
    assert sorted(seen) == list(range(samples))  # nothing padded or repeated
    assert all(len(b) == batch for shard in shards for b in shard[:-1])
    assert [len(shard) for shard in shards] == [len(range(r, math.ceil(samples / batch), world)) for r in range(world)]


def test_the_task_gets_eval_batches_for_a_second_set(tmp_path):
    class TwoSets(NetTask):
        def evaluate(self, model, batches):
            totals = super().evaluate(model, batches)
            extra = super().evaluate(model, self.eval_batches(self._data(3, 7)))
            return {**totals, "extra_correct": extra["correct"], "extra_samples": extra["samples"]}

        def summarize(self, totals):
            return {"samples": totals["samples"], "extra_samples": totals["extra_samples"]}

    assert Trainer(TwoSets(), config(eval_batch_size=3), tmp_path / "run").evaluate() == {"samples": 12,
                                                                                         "extra_samples": 7}
    with pytest.raises(TrainingError, match="provided by the trainer"):
        NetTask().eval_batches(None)


@pytest.mark.parametrize(("settings", "epoch", "epochs"), [
    ({"epochs": 2, "max_steps": None}, 1, 2.0),  # ends on an epoch boundary: the last step was in epoch 1
    ({"max_steps": 14}, 1, 14 / 11),  # 11 batches per epoch: ends in epoch 1
])
def test_the_result_counts_epochs_as_metrics_jsonl_does(tmp_path, settings, epoch, epochs):
    trainer = Trainer(NetTask(), config(log_every=1, **settings), tmp_path / "run")
    result = trainer.fit()
    assert result["epoch"] == records(trainer)[-1]["epoch"] == epoch
    assert result["epochs"] == pytest.approx(epochs, abs=1e-4)
    assert result["params"]["trainable"] > 0 and result["seconds"] >= 0
    stopped = Trainer(NetTask(), config(log_every=1, **settings), tmp_path / "stopped").fit(stop_after=11)
    assert stopped["stopped"] and stopped["epoch"] == 0 and stopped["epochs"] == 1.0
