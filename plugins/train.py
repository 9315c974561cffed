"""The shared trainer: one training loop, on accelerate, for every domain's :class:`~visionpeft.task.Task`.

The task supplies the model, the data, the loss and the evaluation; the trainer owns the loop:
device placement (accelerate), mixed precision, gradient accumulation and clipping, the NaN
guard, ``metrics.jsonl``, ``curves.png`` and the final adapter. The optimizer and its schedule are
:mod:`visionpeft.optim`, checkpoints and exact resume :mod:`visionpeft.checkpoints`, the data order
:mod:`visionpeft.batches`.

Data order is the trainer's own (:class:`~visionpeft.batches.EpochBatchSampler`) instead of
accelerate's prepared dataloader, so that a run can restart at any batch of an epoch and, on CPU, a
resumed run ends bit-identical to an uninterrupted one. Under ``accelerate launch`` each process
trains on its shard of every epoch's batches and evaluates its share of the evaluation batches; the
task's evaluation totals are summed over the processes (:meth:`Trainer.evaluate`), a non-finite loss
on any process stops all of them with one message, and only the main process writes files.

At the end of a run the final checkpoint and ``adapter/`` (with the methods' exports) are written
before anything else can fail; then the final evaluation, the task's files and the curves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from visionpeft import checkpoints, files
from visionpeft.batches import EpochBatchSampler
from visionpeft.checkpoints import ADAPTER_DIR, CHECKPOINTS_DIR, save_adapters
from visionpeft.errors import NonFiniteLossError, TrainingError
from visionpeft.hosts import enable_gradient_checkpointing
from visionpeft.inject import count_parameters
from visionpeft.method import RunInfo, add_loss_terms, attached_methods, set_train_mode
from visionpeft.optim import build_optimizer, build_scheduler, trainables_to_fp32
from visionpeft.runconfig import TrainConfig
from visionpeft.task import Task

logger = logging.getLogger("visionpeft")

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
CONFIG_FILE = "config.yaml"
_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_DATA_ORDER_KEYS = ("seed", "batch_size", "shuffle", "drop_last", "grad_accum")


def _plain(value: Any) -> Any:
    scalar = isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1)
    return value.item() if scalar else value


def _add_totals(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum of each key over the processes' evaluation totals (ints stay exact)."""
    sums: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            value = _plain(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TrainingError(
                    f"Task.evaluate returned {key}={value!r}: it returns totals that add up over processes (counts "
                    "and sums); compute ratios and other values in Task.summarize"
                )
            sums[key] = sums.get(key, 0) + value
    return sums


def _make_accelerator(precision: str) -> Any:
    """accelerate's ``Accelerator`` for device placement and processes, never for the precision.

    accelerate keeps one state per process that fixes ``mixed_precision`` on first use (reading
    ``ACCELERATE_MIXED_PRECISION``) and refuses another value later, so a second run in the same
    process (notebooks, sweeps, tests) could not change it without resetting accelerate's private
    state. Instead accelerate always runs at ``"no"`` and the trainer does autocast and fp16 loss
    scaling itself: ``train.precision`` is the only source of the precision.
    """
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    try:
        # An explicit plugin, so an ACCELERATE_GRADIENT_ACCUMULATION_STEPS in the environment cannot
        # divide the loss a second time: the trainer accumulates itself (train.grad_accum).
        accelerator = Accelerator(
            mixed_precision="no",
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1),
            step_scheduler_with_optimizer=False,
        )
    except ValueError as err:
        if "already been initialized" not in str(err):
            raise
        raise TrainingError(
            "accelerate was already set up in this process with a mixed precision (an Accelerator created "
            "outside visionpeft); the trainer sets the precision from train.precision and needs accelerate's "
            "at 'no': create that Accelerator with mixed_precision='no', or train in a fresh process"
        ) from err
    if precision == "fp16" and accelerator.device.type == "cpu":
        raise TrainingError(
            "train.precision: fp16 needs a GPU (on CPU float16 kernels are slow or missing and loss scaling "
            "gains nothing); use train.precision: bf16 (or fp32) on CPU"
        )
    if precision == "bf16" and accelerator.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError(
            f"train.precision: bf16 is not supported by this GPU ({torch.cuda.get_device_name()}); use "
            "train.precision: fp16 (with loss scaling) or fp32"
        )
    return accelerator


# --- the trainer --------------------------------------------------------------------------------


class Trainer:
    """Train the adapter of ``task``'s model with the settings ``train``, writing into ``output_dir``.

    Args:
        task: the domain's task (datasets, loss, evaluation, export).
        train: the trainer's settings.
        output_dir: the run folder: ``metrics.jsonl``, ``checkpoints/``, ``adapter/``,
            ``curves.png`` and, with ``run_config``, ``config.yaml``.
        model: the adapted model; by default ``task.build_model()``.
        run_config: the resolved run config, written to ``config.yaml`` so the run can be replayed.

    After :meth:`fit`, ``global_step``, ``epoch``, ``optimizer``, ``scheduler``, ``scaler`` (fp16's
    loss scaler, else ``None``) and ``last_checkpoint`` describe where training stands.
    ``precision`` is ``train.precision``, the only source of the compute precision.
    """

    def __init__(
        self,
        task: Task,
        train: TrainConfig,
        output_dir: str | os.PathLike,
        model: nn.Module | None = None,
        *,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.task = task
        self.train = train
        self.output_dir = Path(output_dir)
        self.run_config = run_config
        self.accelerator = _make_accelerator(train.precision)
        self.precision = train.precision
        self.model = model if model is not None else task.build_model()
        trainables_to_fp32(self.model)
        self.model.to(self.accelerator.device)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: LambdaLR | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.last_checkpoint: Path | None = None
        self._loss_sum = 0.0
        self._loss_count = 0
        self._last_loss: float | None = None
        self._step_lr = 0.0
        self._last_eval: tuple[int, dict[str, Any]] | None = None
        self._eval_data: Dataset | None = None
        self._eval_loaded = False
        self._eval_device: torch.device | None = None
        self._micro_per_epoch = 0
        self._started = 0.0
        # A task that evaluates a second data set (vla's novel classes) takes its batches from here.
        task.eval_batches = self.eval_batches

    # -- public --

    def fit(self, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
        """Train to the end of the schedule and return the final metrics.

        With ``resume``, continue from the newest checkpoint in ``output_dir`` (adapter tensors,
        optimizer, schedule, loss scaler, RNG states and data position), so the result equals an
        uninterrupted run. ``stop_after`` ends the run after that many optimizer steps in all,
        writing a checkpoint there; the schedule still spans the whole run.

        Returns ``step``, ``epoch`` (the epoch of the last step, as ``metrics.jsonl`` counts it),
        ``epochs`` (epochs trained, a fraction when a run ends mid-epoch), ``loss`` (the last logged
        mean), ``seconds`` (this call's wall time), ``params`` (``trainable`` and ``total``), plus
        ``eval`` (the task's metrics) at the end, or ``stopped: True`` when ``stop_after`` ended the
        run early.
        """
        train, acc = self.train, self.accelerator
        self._started = time.monotonic()
        if stop_after is not None and stop_after < 1:
            raise TrainingError(f"stop_after must be a positive number of optimizer steps, got {stop_after}")
        dataset = self.task.train_dataset()
        self._eval_dataset()
        micro_per_epoch = self._micro_per_epoch = len(self._sampler(len(dataset), epoch=0))
        if micro_per_epoch == 0:
            raise TrainingError(
                f"the training set ({len(dataset)} samples) gives no batch of train.batch_size "
                f"{train.batch_size}{' with train.drop_last' if train.drop_last else ''}; lower it"
            )
        steps_per_epoch = math.ceil(micro_per_epoch / train.grad_accum)
        total = train.max_steps if train.max_steps is not None else train.epochs * steps_per_epoch
        limit = total if stop_after is None else min(total, stop_after)

        checkpoint = self._find_resume_point(resume)
        if train.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        optimizer = build_optimizer(self.model, train, acc.num_processes)
        scheduler = build_scheduler(optimizer, train, total, steps_per_epoch, acc.num_processes)
        # Model and optimizer are prepared together, as FSDP, DeepSpeed and XLA need; accelerate runs
        # at mixed_precision "no", so its optimizer wrapper holds no scaler and the trainer's own
        # GradScaler (fp16) steps it like a plain torch optimizer.
        wrapped, optimizer = acc.prepare(self.model, optimizer)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.scaler = torch.amp.GradScaler(acc.device.type) if self.precision == "fp16" else None
        try:
            if checkpoint is not None:
                self._restore(checkpoint, total)
            else:
                from accelerate.utils import set_seed

                set_seed(train.seed, device_specific=True)
                self.global_step = self.epoch = self.batch_in_epoch = 0
                self._loss_sum, self._loss_count, self._last_loss = 0.0, 0, None
                self.last_checkpoint = None
            self._last_eval = None
            self._start_files()
            logger.info(
                "training %d optimizer steps (%d per epoch, %d micro-batch(es) each) from step %d",
                total, steps_per_epoch, train.grad_accum, self.global_step,
            )
            self._train_loop(wrapped, dataset, micro_per_epoch, limit, total)
            if self.global_step < total:
                if not self._saved_now():
                    self._save_checkpoint(total)
                loss = self._window_loss()
                return {**self._result(self._last_loss if loss is None else loss), "stopped": True}
            return self._finish(total)
        finally:
            acc.unwrap_model(wrapped, keep_fp32_wrapper=False)
            acc.free_memory()

    def evaluate(self, model: nn.Module | None = None) -> dict[str, Any]:
        """The task's metrics on its evaluation set (``{}`` if it has none), in eval mode, no gradients.

        A collective call: each process evaluates its share of the batches (:meth:`eval_batches`),
        the totals of ``Task.evaluate`` are summed over the processes and ``Task.summarize`` makes
        the metrics, so they equal a single-process evaluation (counts exactly); the main process
        then writes the evaluation's files (``Task.write_evaluation``).
        """
        data = self._eval_dataset()
        if data is None:
            return {}
        model = self.model if model is None else model
        param = next(model.parameters(), None)
        self._eval_device = param.device if param is not None else self.accelerator.device
        set_train_mode(model, False)
        # Tasks that write files per evaluation (sample grids) name them by the step.
        self.task.step = self.global_step
        with torch.no_grad(), self._autocast():
            totals = self._summed(lambda: self.task.evaluate(model, self.eval_batches(data)))
            metrics = {key: _plain(value) for key, value in self.task.summarize(totals).items()}
            self._on_main(lambda: self.task.write_evaluation(model, metrics))
        return metrics

    def eval_batches(self, dataset: Dataset) -> Iterator[Any]:
        """This process's share of ``dataset``'s evaluation batches, collated and on the evaluated model's device.

        The samples in order, in batches of ``train.eval_batch_size`` (default ``batch_size``);
        process ``rank`` of N takes every N-th batch from its ``rank``-th. Nothing is padded or
        repeated, so the processes together see every sample exactly once (a process may get none).
        """
        from accelerate.utils import send_to_device

        acc, train = self.accelerator, self.train
        size = train.eval_batch_size or train.batch_size
        batches = [list(range(start, min(start + size, len(dataset)))) for start in range(0, len(dataset), size)]
        loader = DataLoader(
            dataset,
            batch_sampler=batches[acc.process_index :: acc.num_processes],
            collate_fn=self.task.collate,
            num_workers=train.num_workers,
            # Creating the iterator must not draw from the global RNG, which checkpoints restore.
            generator=torch.Generator().manual_seed(train.seed),
        )
        device = self._eval_device or acc.device
        return (send_to_device(batch, device) for batch in loader)

    # -- the loop --

    def _autocast(self) -> contextlib.AbstractContextManager:
        """The compute precision of ``train.precision`` for the forward, the loss and evaluation."""
        dtype = _AUTOCAST_DTYPES[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.accelerator.device.type, dtype=dtype)

    def _train_loop(
        self, wrapped: nn.Module, dataset: Dataset, micro_per_epoch: int, limit: int, total: int
    ) -> None:
        from accelerate.utils import send_to_device
        from tqdm.auto import tqdm

        train, acc, scaler = self.train, self.accelerator, self.scaler
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        bar = tqdm(
            total=total, initial=self.global_step, desc="train", dynamic_ncols=True,
            disable=not (train.progress and acc.is_main_process),
        )
        set_train_mode(self.model, True)
        try:
            while self.global_step < limit:
                epoch = self.epoch
                if hasattr(dataset, "set_epoch"):
                    # Per-epoch randomness inside the data set (e.g. which frames a clip samples).
                    dataset.set_epoch(epoch)
                sampler = self._sampler(len(dataset), epoch, start=self.batch_in_epoch)
                batches = iter(self._loader(dataset, sampler, epoch))
                while self.batch_in_epoch < micro_per_epoch and self.global_step < limit:
                    count = min(train.grad_accum, micro_per_epoch - self.batch_in_epoch)
                    for micro in range(count):
                        batch = send_to_device(next(batches), acc.device)
                        sync = micro == count - 1
                        with contextlib.nullcontext() if sync else acc.no_sync(wrapped):
                            with self._autocast():
                                loss = add_loss_terms(self.model, self.task.loss(wrapped, batch))
                            value = self._checked_loss(loss, epoch, self.batch_in_epoch + micro)
                            # The mean over the step's micro-batches (fewer in an epoch's last step).
                            loss = loss / count
                            acc.backward(loss if scaler is None else scaler.scale(loss))
                        self._loss_sum += value
                        self._loss_count += 1
                    lr = self._optimizer_step(trainable)
                    self.global_step += 1
                    self.batch_in_epoch += count
                    if self.batch_in_epoch >= micro_per_epoch:
                        self.epoch, self.batch_in_epoch = epoch + 1, 0
                    bar.update(1)
                    self._after_step(epoch, lr, limit, total, bar)
                    if self.batch_in_epoch == 0:
                        break
        finally:
            bar.close()

    def _checked_loss(self, loss: torch.Tensor, epoch: int, batch: int) -> float:
        """The loss's value; a non-finite loss on any process stops every process with the same error."""
        value = float(loss.detach().float())
        acc = self.accelerator
        if acc.num_processes == 1:
            if not math.isfinite(value):
                raise self._non_finite(value, epoch, batch)
            return value
        # Every process learns every loss (a collective call), so all of them stop at the same batch.
        values = acc.gather(loss.detach().float().reshape(1)).tolist()
        for rank, other in enumerate(values):
            if not math.isfinite(other):
                raise self._non_finite(other, epoch, batch, process=rank)
        return value

    def _optimizer_step(self, trainable: list[nn.Parameter]) -> float:
        """Clip, step the optimizer (through fp16's loss scaler) and the schedule; the step's rate."""
        scaler = self.scaler
        if scaler is not None:
            # Clipping needs the true gradients; scaler.step skips a step whose gradients are not finite.
            scaler.unscale_(self.optimizer)
        if self.train.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(trainable, self.train.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        if scaler is None:
            self.optimizer.step()
        else:
            scaler.step(self.optimizer)
            scaler.update()
        with warnings.catch_warnings():
            # fp16 loss scaling skips the first steps on purpose; the schedule still advances.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def _after_step(self, epoch: int, lr: float, limit: int, total: int, bar: Any) -> None:
        train, step = self.train, self.global_step
        self._step_lr = lr
        if step % train.log_every == 0:
            self._log_loss(epoch, lr)
            if self._last_loss is not None:
                bar.set_postfix(loss=f"{self._last_loss:.4g}", lr=f"{lr:.3g}")
        if train.eval_every and step % train.eval_every == 0 and self._eval_dataset() is not None:
            self._evaluate_and_log(epoch)
            set_train_mode(self.model, True)
        if (train.save_every and step % train.save_every == 0) or (step == limit and step < total):
            self._save_checkpoint(total)

    def _window_loss(self) -> float | None:
        """The mean loss over every process since the last log line (a collective call)."""
        loss_sum, count = self._loss_sum, float(self._loss_count)
        if self.accelerator.num_processes > 1:
            totals = torch.tensor([loss_sum, count], dtype=torch.float64, device=self.accelerator.device)
            loss_sum, count = self.accelerator.reduce(totals, reduction="sum").tolist()
        return loss_sum / count if count else None

    def _log_loss(self, epoch: int, lr: float) -> None:
        loss = self._window_loss()
        self._loss_sum, self._loss_count = 0.0, 0
        if loss is not None:
            self._last_loss = loss
            self._write_metrics({"step": self.global_step, "epoch": epoch, "loss": loss, "lr": lr})

    def _evaluate_and_log(self, epoch: int) -> dict[str, Any]:
        metrics = self.evaluate()
        self._write_metrics({"step": self.global_step, "epoch": epoch, "eval": metrics})
        self._last_eval = (self.global_step, metrics)
        return metrics

    def _saved_now(self) -> bool:
        last = self.last_checkpoint
        return last is not None and last.name == checkpoints.checkpoint_path(self.output_dir, self.global_step).name

    def _last_step_epoch(self) -> int:
        """The epoch the last optimizer step belonged to, as ``metrics.jsonl`` records it."""
        return self.epoch - 1 if self.batch_in_epoch == 0 and self.epoch > 0 else self.epoch

    def _result(self, loss: float | None) -> dict[str, Any]:
        total, trainable = count_parameters(self.model)
        epochs = self.epoch + self.batch_in_epoch / self._micro_per_epoch if self._micro_per_epoch else self.epoch
        return {"step": self.global_step, "epoch": self._last_step_epoch(), "epochs": round(epochs, 4),
                "loss": loss, "seconds": round(time.monotonic() - self._started, 2),
                "params": {"trainable": trainable, "total": total}}

    def _finish(self, total: int) -> dict[str, Any]:
        """End the run: the files that hold the training first, so a failing evaluation cannot lose them.

        Order: the last loss line, the final checkpoint, ``adapter/`` and the methods' exports (files
        of the trained tensors alone), then the final evaluation, the task's files (``results.json``)
        and the curves.
        """
        epoch = self._last_step_epoch()
        if self._loss_count:
            self._log_loss(epoch, self._step_lr)
        if not self._saved_now():
            self._save_checkpoint(total)
        self._on_main(self._write_adapter)
        metrics: dict[str, Any] = {}
        if self._eval_dataset() is not None:
            if self._last_eval is not None and self._last_eval[0] == self.global_step:
                metrics = self._last_eval[1]
            else:
                metrics = self._evaluate_and_log(epoch)
        self._on_main(self._write_reports)
        result = self._result(self._last_loss)
        if metrics:
            result["eval"] = metrics
        return result

    def _write_adapter(self) -> None:
        if not save_adapters(self.model, self.output_dir / ADAPTER_DIR):
            logger.info("no visionpeft adapter is attached; %s/ was not written", ADAPTER_DIR)
        run = RunInfo(config=getattr(self.task, "run", None), step=self.global_step)
        for method in attached_methods(self.model):
            method.export(self.model, self.output_dir, run)

    def _write_reports(self) -> None:
        from visionpeft.plots import plot_curves

        self.task.export(self.model, self.output_dir)
        plot_curves(self.output_dir / METRICS_FILE, self.output_dir / CURVES_FILE)

    def _non_finite(self, value: float, epoch: int, batch: int, process: int | None = None) -> NonFiniteLossError:
        last = self.last_checkpoint
        last = f"the last checkpoint is {last}" if last is not None else "no checkpoint was written yet"
        where = f", on process {process} of {self.accelerator.num_processes}" if process is not None else ""
        return NonFiniteLossError(
            f"the loss is {value} at optimizer step {self.global_step + 1} (epoch {epoch}, batch {batch} of "
            f"the epoch{where}); {last}. Try a lower train.lr, train.precision bf16 or fp32 instead of fp16, or "
            "train.max_grad_norm (e.g. 1.0) to clip the gradients"
        )

    # -- processes --

    def _summed(self, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The totals ``compute()`` returns, summed over every process (a collective call).

        If ``compute`` fails on any process, every process stops: the failing one with its own
        error, the others with a :class:`TrainingError` naming it (none is left waiting).
        """
        acc = self.accelerator
        if acc.num_processes == 1:
            return _add_totals([compute()])
        if type(self.task).summarize is Task.summarize and not getattr(self, "_warned_summarize", False):
            # A task written before evaluations were summed may return ratios, which would add up.
            self._warned_summarize = True
            logger.warning("task %r does not define summarize(): its evaluate() totals are added over %d processes "
                           "and reported as they are; return counts and sums (not ratios) and turn them into "
                           "metrics in summarize()", self.task.name, acc.num_processes)
        try:
            part: dict[str, Any] | str = dict(compute())
        except Exception as err:
            part, error = f"{type(err).__name__}: {err}", err
        else:
            error = None
        from accelerate.utils import gather_object

        parts = gather_object([part])
        if error is not None:
            raise error
        for rank, other in enumerate(parts):
            if isinstance(other, str):
                raise TrainingError(f"the evaluation failed on process {rank} of {acc.num_processes}: {other}")
        return _add_totals(parts)

    def _on_main(self, write: Callable[[], Any]) -> None:
        """Run ``write`` on the main process only (a collective call: the others wait for it).

        If it fails, every process stops: the main one with its error, the others with a
        :class:`TrainingError` that repeats it.
        """
        acc = self.accelerator
        if acc.num_processes == 1:
            write()
            return
        error = None
        if acc.is_main_process:
            try:
                write()
            except Exception as err:
                error = err
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([None if error is None else f"{type(error).__name__}: {error}"])[0]
        if error is not None:
            raise error
        if message is not None:
            raise TrainingError(f"the main process failed: {message}")

    # -- data --

    def _sampler(self, num_samples: int, epoch: int, start: int = 0) -> EpochBatchSampler:
        train, acc = self.train, self.accelerator
        return EpochBatchSampler(
            num_samples, train.batch_size, epoch=epoch, seed=train.seed, shuffle=train.shuffle,
            drop_last=train.drop_last, rank=acc.process_index, world_size=acc.num_processes, start=start,
        )

    def _loader(self, dataset: Dataset, sampler: EpochBatchSampler, epoch: int) -> DataLoader:
        # An explicit generator: creating the iterator must not draw from the global RNG, which
        # dropout uses and checkpoints restore.
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.task.collate,
            num_workers=self.train.num_workers,
            generator=torch.Generator().manual_seed(self.train.seed * 1000003 + epoch),
            pin_memory=self.accelerator.device.type == "cuda",
        )

    def _eval_dataset(self) -> Dataset | None:
        if not self._eval_loaded:
            self._eval_data = self.task.eval_dataset()
            self._eval_loaded = True
        return self._eval_data

    # -- files --

    def _start_files(self) -> None:
        def write() -> None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.output_dir / METRICS_FILE
            if self.global_step == 0:
                path.write_text("", encoding="utf-8")
            else:
                # Drop what the interrupted run logged after its checkpoint; it is trained again.
                from visionpeft.plots import read_metrics

                kept = [r for r in read_metrics(path) if r.get("step", 0) <= self.global_step]
                files.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
            if self.run_config is not None:
                import yaml

                text = yaml.safe_dump(self.run_config, sort_keys=False)
                files.atomic_write_text(self.output_dir / CONFIG_FILE, text)

        self._on_main(write)

    def _write_metrics(self, record: dict[str, Any]) -> None:
        def write() -> None:
            with open(self.output_dir / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=str) + "\n")

        # Every process calls this at the same points (after a collective loss or evaluation).
        self._on_main(write)

    # -- checkpoints --

    def _find_resume_point(self, resume: bool) -> Path | None:
        checkpoint = checkpoints.find_checkpoint(self.output_dir)
        if resume:
            if checkpoint is None:
                where = self.output_dir / CHECKPOINTS_DIR
                logger.info("resume: no checkpoint in %s; starting from step 0", where)
            return checkpoint
        if checkpoint is not None:
            raise TrainingError(
                f"{self.output_dir} already holds checkpoints of an earlier run (newest: {checkpoint.name}); "
                "resume it (fit(resume=True), visionpeft train --resume), or choose another output_dir"
            )
        return None

    def _data_order(self) -> dict[str, Any]:
        order = {key: getattr(self.train, key) for key in _DATA_ORDER_KEYS}
        order["world_size"] = self.accelerator.num_processes
        return order

    def _save_checkpoint(self, total: int) -> Path:
        from accelerate.utils import gather_object

        rng = gather_object([checkpoints.rng_state()])
        path = checkpoints.checkpoint_path(self.output_dir, self.global_step)
        progress = {"step": self.global_step, "epoch": self.epoch, "batch": self.batch_in_epoch,
                    "total_steps": total, "loss_sum": self._loss_sum, "loss_count": self._loss_count,
                    "last_loss": self._last_loss, "data_order": self._data_order()}

        def write() -> None:
            checkpoints.write_checkpoint(path, self.model, progress, optimizer=self.optimizer,
                                         scheduler=self.scheduler, scaler=self.scaler, rng=rng)
            checkpoints.prune_checkpoints(self.output_dir, self.train.keep_last)

        # A failed write (a full disk) stops every process instead of leaving the others waiting.
        self._on_main(write)
        self.last_checkpoint = path
        return path

    def _restore(self, checkpoint: Path, total: int) -> None:
        acc = self.accelerator
        state = checkpoints.read_state(checkpoint)
        if state["total_steps"] != total:
            logger.warning(
                "resume: the checkpoint's run had %d steps, this one has %d; the schedule changes from here",
                state["total_steps"], total,
            )
        if state["data_order"] != self._data_order():
            logger.warning(
                "resume: data settings differ from the interrupted run (%s vs %s); the data order differs",
                state["data_order"], self._data_order(),
            )
        checkpoints.restore_checkpoint(
            checkpoint, state, self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
            rank=acc.process_index, world_size=acc.num_processes,
        )
        self.global_step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch"]
        self._loss_sum, self._loss_count = state["loss_sum"], state["loss_count"]
        self._last_loss = state["last_loss"]
        self.last_checkpoint = checkpoint
        logger.info(
            "resuming from %s (step %d, epoch %d, batch %d of the epoch)",
            checkpoint, self.global_step, self.epoch, self.batch_in_epoch,
        )
