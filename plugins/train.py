"""The shared trainer: one training loop, on accelerate, for every domain's :class:`~visionpeft.task.Task`.

The task supplies the model, the data, the loss and the evaluation; the trainer owns the rest:
device placement and mixed precision (accelerate), gradient accumulation and clipping, the
optimizer and its learning-rate schedule, the NaN guard, checkpoints with exact resume,
``metrics.jsonl``, ``curves.png`` and the final adapter.

Data order is the trainer's own (:class:`EpochBatchSampler`) instead of accelerate's prepared
dataloader, so that a run can restart at any batch of an epoch and, on CPU, a resumed run ends
bit-identical to an uninterrupted one. Under ``accelerate launch`` each process trains on its
shard of every epoch's batches; nothing in the code changes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, Sampler

from visionpeft import files
from visionpeft.api import save as save_adapter
from visionpeft.errors import NonFiniteLossError, TrainingError
from visionpeft.hosts import find_host
from visionpeft.method import get_state, set_train_mode
from visionpeft.runconfig import TrainConfig
from visionpeft.task import Task

logger = logging.getLogger("visionpeft")

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
STATE_SUMMARY_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
CURVES_FILE = "curves.png"
CONFIG_FILE = "config.yaml"
NO_DECAY_NAME_PARTS = ("prompt", "ctx", "token", "pos_embed", "embedding")
_MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
_CHECKPOINT_RE = re.compile(r"step-(\d+)")
_DATA_ORDER_KEYS = ("seed", "batch_size", "shuffle", "drop_last", "grad_accum")


# --- optimizer and schedule ---------------------------------------------------------------------


def uses_weight_decay(name: str, param: torch.Tensor, decay_all: bool = False) -> bool:
    """Whether weight decay applies to the parameter ``name``.

    Decay shrinks weight matrices towards zero, which regularises them. Biases and norm scales
    (every tensor with ``ndim <= 1``) and learned prompt tokens, context vectors and embeddings
    (names containing one of :data:`NO_DECAY_NAME_PARTS`) are not weights of that kind: shrinking
    them only biases the model, so they get none unless ``decay_all`` is set.
    """
    if decay_all:
        return True
    if param.ndim <= 1:
        return False
    lowered = name.lower()
    return not any(part in lowered for part in NO_DECAY_NAME_PARTS)


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: the trainable parameters with and without weight decay.

    Only parameters with ``requires_grad`` are included; empty groups are left out. The order is
    the model's, so the groups of a rebuilt model match a saved optimizer state.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if uses_weight_decay(name, param, decay_all) else no_decay).append(param)
    groups = []
    for label, params, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
        if params:
            groups.append({"params": params, "weight_decay": wd, "group": label})
    return groups


def peak_lr(train: TrainConfig, world_size: int = 1) -> float:
    """The peak learning rate: ``lr``, or with ``scale_lr`` ``lr x total batch / 256`` (VPT's rule)."""
    if not train.scale_lr:
        return train.lr
    return train.lr * train.batch_size * train.grad_accum * world_size / 256


def build_optimizer(model: nn.Module, train: TrainConfig, world_size: int = 1) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the trainable parameters of ``model`` (see :func:`param_groups`)."""
    groups = param_groups(model, train.weight_decay, train.decay_all)
    if not groups:
        raise TrainingError(
            "the model has no trainable parameters (none has requires_grad); attach an adapter first "
            "(vp.attach) or unfreeze the parameters to train"
        )
    lr = peak_lr(train, world_size)
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=train.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=(train.betas[0], train.betas[1]))


def warmup_length(train: TrainConfig, steps_per_epoch: int) -> int:
    """The warmup in optimizer steps: ``warmup_steps``, or ``warmup_epochs`` x steps per epoch, rounded."""
    if train.warmup_steps is not None:
        return train.warmup_steps
    if train.warmup_epochs is not None:
        return round(train.warmup_epochs * steps_per_epoch)
    return 0


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int,
    schedule: str = "cosine",
    min_ratio: float = 0.0,
    *,
    warmup_type: str = "linear",
    warmup_ratio: float = 0.0,
    cosine_length: str = "remaining",
) -> float:
    """The learning rate of step ``step`` (0-based) as a fraction of the peak.

    A warmup over ``warmup_steps`` steps, linear from 0 or constant at ``warmup_ratio``; then a
    cosine decay towards ``min_ratio`` (or the peak kept, for ``"constant"``). The cosine spans the
    steps after warmup (``"remaining"``: it ends at ``min_ratio``), or ``total_steps`` counted from
    the end of warmup (``"total"``, Dassl's scheduler behind CoOp: it stops short of the minimum).
    """
    if step < warmup_steps:
        return warmup_ratio if warmup_type == "constant" else step / warmup_steps
    if schedule == "constant":
        return 1.0
    span = total_steps if cosine_length == "total" else total_steps - warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int, steps_per_epoch: int, world_size: int = 1
) -> LambdaLR:
    """The schedule of ``train`` as a ``LambdaLR`` stepped once per optimizer step (its state checkpoints).

    With ``schedule_unit: epoch`` the rate is a function of the epoch (``step // steps_per_epoch``),
    the warmup and the length counted in epochs, as Dassl's per-epoch schedulers do.
    """
    peak = peak_lr(train, world_size)
    min_ratio = min(1.0, train.min_lr / peak)
    kwargs = {"warmup_type": train.warmup_type, "warmup_ratio": train.warmup_lr / peak,
              "cosine_length": train.cosine_length}
    if train.schedule_unit == "epoch":
        epochs = math.ceil(total_steps / steps_per_epoch)
        warmup_epochs = round(warmup_length(train, steps_per_epoch) / steps_per_epoch)

        def factor(step: int) -> float:
            return lr_factor(step // steps_per_epoch, epochs, warmup_epochs, train.scheduler, min_ratio, **kwargs)
    else:
        warmup = warmup_length(train, steps_per_epoch)

        def factor(step: int) -> float:
            return lr_factor(step, total_steps, warmup, train.scheduler, min_ratio, **kwargs)

    return LambdaLR(optimizer, factor)


# --- data order ---------------------------------------------------------------------------------


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The sample indices of ``epoch``: a permutation fixed by ``seed`` and ``epoch``, or ``arange``.

    The generator is private, so the order neither depends on nor changes the global RNG.
    """
    if not shuffle:
        return torch.arange(num_samples)
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))


class EpochBatchSampler(Sampler[list[int]]):
    """The micro-batches one process trains on in one epoch, from local batch ``start`` on.

    The epoch's order (:func:`epoch_order`) is cut into batches of ``batch_size`` (the last one
    short unless ``drop_last`` and a full batch exists). With several processes the list is padded
    by repeating its first batches until every process gets as many, then process ``rank`` takes
    ``batches[rank::world]``.
    ``start`` skips the batches a resumed run already trained on.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        epoch: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ) -> None:
        order = epoch_order(num_samples, seed, epoch, shuffle).tolist()
        # As Dassl: the incomplete last batch is dropped only when a full one is left.
        stop = num_samples - num_samples % batch_size if drop_last and num_samples >= batch_size else num_samples
        batches = [order[i : i + batch_size] for i in range(0, stop, batch_size)]
        if world_size > 1 and batches and len(batches) % world_size:
            pad = world_size - len(batches) % world_size
            batches += [batches[i % len(batches)] for i in range(pad)]
        self.local = batches[rank::world_size]
        self.start = start

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.local[self.start :])

    def __len__(self) -> int:
        return max(0, len(self.local) - self.start)


# --- model helpers ------------------------------------------------------------------------------


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation checkpointing through the model's host, timm, diffusers or transformers."""
    host = find_host(model)
    if host is not None and host.enable_gradient_checkpointing is not None:
        host.enable_gradient_checkpointing(model)
        return
    for attr in ("set_grad_checkpointing", "enable_gradient_checkpointing", "gradient_checkpointing_enable"):
        hook = getattr(model, attr, None)
        if callable(hook):
            hook()
            return
    raise TrainingError(
        f"train.gradient_checkpointing: the backbone {type(model).__qualname__} offers none (its host has "
        "no enable_gradient_checkpointing and the model no set_grad_checkpointing / "
        "enable_gradient_checkpointing); set train.gradient_checkpointing: false"
    )


def _trainables_to_fp32(model: nn.Module) -> None:
    # Optimizer updates in half precision lose small steps entirely; the trained tensors stay fp32
    # and autocast decides the compute precision.
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()


def _adapter_names(model: nn.Module) -> list[str]:
    state = get_state(model)
    return list(state.adapters) if state is not None else []


def save_adapters(model: nn.Module, directory: str | os.PathLike) -> bool:
    """``vp.save`` every attached adapter into ``directory`` (one subfolder per name if several).

    Returns ``False`` when the model carries no visionpeft adapter.
    """
    names = _adapter_names(model)
    directory = Path(directory)
    for name in names:
        save_adapter(model, directory if len(names) == 1 else directory / name, name)
    return bool(names)


def _load_adapters(model: nn.Module, directory: Path) -> None:
    state = get_state(model)
    names = _adapter_names(model)
    for name in names:
        folder = directory if len(names) == 1 else directory / name
        payload = files.read_adapter_config(folder)
        method = state.adapters[name].method
        if payload["method"] != method.name:
            raise TrainingError(
                f"the checkpoint's adapter in {folder} is a {payload['method']!r}, but the model's adapter "
                f"{name!r} is a {method.name!r}; resume with the run config that wrote the checkpoint"
            )
        method.load_trained_tensors(model, files.read_adapter_tensors(folder, payload))


def _extra_trainables(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters that no adapter saves, so a checkpoint must keep them itself."""
    state = get_state(model)
    covered = set()
    if state is not None:
        for attachment in state.adapters.values():
            covered |= {t.data_ptr() for t in attachment.method.trained_tensors(model).values()}
    return {n: p for n, p in model.named_parameters() if p.requires_grad and p.data_ptr() not in covered}


# --- RNG states and checkpoint folders ----------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        # Plain lists, so the state loads with torch.load(weights_only=True).
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of a run, oldest first (temporary ``.tmp-*`` folders are ignored)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _CHECKPOINT_RE.fullmatch(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or ``None``."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def _fsync_dir(path: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_checkpoint(path: Path, model: nn.Module, state: dict[str, Any], summary: dict[str, Any]) -> None:
    """Write a checkpoint beside ``path`` and rename it into place, so it appears whole or not at all."""
    root = path.parent
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{path.name}"
    try:
        save_adapters(model, tmp / ADAPTER_DIR)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        files.atomic_write_bytes(tmp / STATE_FILE, buffer.getvalue())
        files.atomic_write_text(tmp / STATE_SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        if path.exists():
            # The same step written again (after a resume): swap, so one whole copy always exists.
            old = root / f".tmp-old-{path.name}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)


def _prune_checkpoints(output_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _make_accelerator(precision: str) -> Any:
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import GradientAccumulationPlugin

    mixed = _MIXED_PRECISION[precision]
    processes = PartialState._shared_state.get("num_processes", 1)
    if processes == 1 and AcceleratorState._shared_state.get("_mixed_precision", mixed) != mixed:
        # accelerate keeps its state per process and refuses a second precision; in a single
        # process (notebooks, sweeps, tests) start it afresh instead.
        AcceleratorState._reset_state()
    # An explicit plugin, so an ACCELERATE_GRADIENT_ACCUMULATION_STEPS in the environment cannot
    # divide the loss a second time: the trainer accumulates itself (train.grad_accum).
    accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1),
        step_scheduler_with_optimizer=False,
    )
    if mixed == "fp16" and accelerator.device.type == "cpu":
        # accelerate 1.x accepts fp16 on CPU but silently trains in fp32, without loss scaling.
        raise TrainingError(
            "train.precision: fp16 needs a GPU (on CPU accelerate would silently train in fp32); "
            "use train.precision: bf16 (or fp32) on CPU"
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

    After :meth:`fit`, ``global_step``, ``epoch``, ``optimizer``, ``scheduler`` and
    ``last_checkpoint`` describe where training stands.
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
        self.model = model if model is not None else task.build_model()
        _trainables_to_fp32(self.model)
        self.model.to(self.accelerator.device)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: LambdaLR | None = None
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

    # -- public --

    def fit(self, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
        """Train to the end of the schedule and return the final metrics.

        With ``resume``, continue from the newest checkpoint in ``output_dir`` (adapter tensors,
        optimizer, schedule, loss scaler, RNG states and data position), so the result equals an
        uninterrupted run. ``stop_after`` ends the run after that many optimizer steps in all,
        writing a checkpoint there; the schedule still spans the whole run.

        Returns ``{"step", "epoch", "loss"}`` plus ``"eval"`` (the task's metrics) at the end, or
        ``"stopped": True`` when ``stop_after`` ended the run early.
        """
        train, acc = self.train, self.accelerator
        if stop_after is not None and stop_after < 1:
            raise TrainingError(f"stop_after must be a positive number of optimizer steps, got {stop_after}")
        dataset = self.task.train_dataset()
        self._eval_dataset()
        micro_per_epoch = len(self._sampler(len(dataset), epoch=0))
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
        wrapped, optimizer = acc.prepare(self.model, optimizer)
        self.optimizer, self.scheduler = optimizer, scheduler
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
                loss = self._last_loss if loss is None else loss
                return {"step": self.global_step, "epoch": self.epoch, "loss": loss, "stopped": True}
            return self._finish(total)
        finally:
            acc.unwrap_model(wrapped, keep_fp32_wrapper=False)
            acc.free_memory()

    def evaluate(self, model: nn.Module | None = None) -> dict[str, Any]:
        """The task's metrics on its evaluation set (``{}`` if it has none), in eval mode, no gradients."""
        data = self._eval_dataset()
        if data is None:
            return {}
        model = self.model if model is None else model
        param = next(model.parameters(), None)
        device = param.device if param is not None else self.accelerator.device
        loader = DataLoader(
            data,
            batch_size=self.train.eval_batch_size or self.train.batch_size,
            shuffle=False,
            collate_fn=self.task.collate,
            num_workers=self.train.num_workers,
            generator=torch.Generator().manual_seed(self.train.seed),
        )
        from accelerate.utils import send_to_device

        set_train_mode(model, False)
        # Tasks that write files per evaluation (sample grids) name them by the step.
        self.task.step = self.global_step
        batches = (send_to_device(batch, device) for batch in loader)
        with torch.no_grad(), self.accelerator.autocast():
            metrics = self.task.evaluate(model, batches)
        return {key: _plain(value) for key, value in dict(metrics).items()}

    # -- the loop --

    def _train_loop(
        self, wrapped: nn.Module, dataset: Dataset, micro_per_epoch: int, limit: int, total: int
    ) -> None:
        from accelerate.utils import send_to_device
        from tqdm.auto import tqdm

        train, acc = self.train, self.accelerator
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
                            with acc.autocast():
                                loss = self.task.loss(wrapped, batch)
                            value = float(loss.detach().float())
                            if not math.isfinite(value):
                                raise self._non_finite(value, epoch, self.batch_in_epoch + micro)
                            # The mean over the step's micro-batches (fewer in an epoch's last step).
                            acc.backward(loss / count)
                        self._loss_sum += value
                        self._loss_count += 1
                    if train.max_grad_norm is not None:
                        acc.clip_grad_norm_(trainable, train.max_grad_norm)
                    lr = self.optimizer.param_groups[0]["lr"]
                    self.optimizer.step()
                    with warnings.catch_warnings():
                        # fp16 loss scaling skips the first steps on purpose; the schedule still advances.
                        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler")
                        self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
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
        return last is not None and last.name == f"step-{self.global_step:07d}"

    def _finish(self, total: int) -> dict[str, Any]:
        acc = self.accelerator
        epoch = self.epoch - 1 if self.batch_in_epoch == 0 and self.epoch > 0 else self.epoch
        if self._loss_count:
            self._log_loss(epoch, self._step_lr)
        metrics: dict[str, Any] = {}
        if self._eval_dataset() is not None:
            if self._last_eval is not None and self._last_eval[0] == self.global_step:
                metrics = self._last_eval[1]
            else:
                metrics = self._evaluate_and_log(epoch)
        if not self._saved_now():
            self._save_checkpoint(total)
        if acc.is_main_process:
            if not save_adapters(self.model, self.output_dir / ADAPTER_DIR):
                logger.info("no visionpeft adapter is attached; %s/ was not written", ADAPTER_DIR)
            self.task.export(self.model, self.output_dir)
            from visionpeft.plots import plot_curves

            plot_curves(self.output_dir / METRICS_FILE, self.output_dir / CURVES_FILE)
        acc.wait_for_everyone()
        result: dict[str, Any] = {"step": self.global_step, "epoch": self.epoch, "loss": self._last_loss}
        if metrics:
            result["eval"] = metrics
        return result

    def _non_finite(self, value: float, epoch: int, batch: int) -> NonFiniteLossError:
        last = (
            f"the last checkpoint is {self.last_checkpoint}"
            if self.last_checkpoint is not None
            else "no checkpoint was written yet"
        )
        return NonFiniteLossError(
            f"the loss is {value} at optimizer step {self.global_step + 1} (epoch {epoch}, batch {batch} of "
            f"the epoch); {last}. Try a lower train.lr, train.precision bf16 or fp32 instead of fp16, or "
            "train.max_grad_norm (e.g. 1.0) to clip the gradients"
        )

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
        acc = self.accelerator
        if acc.is_main_process:
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
        acc.wait_for_everyone()

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with open(self.output_dir / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=str) + "\n")

    # -- checkpoints --

    def _find_resume_point(self, resume: bool) -> Path | None:
        checkpoint = find_checkpoint(self.output_dir)
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

        acc = self.accelerator
        rng = gather_object([_rng_state()])
        path = self.output_dir / CHECKPOINTS_DIR / f"step-{self.global_step:07d}"
        if acc.is_main_process:
            lr = self.optimizer.param_groups[0]["lr"]
            state = {
                "step": self.global_step,
                "epoch": self.epoch,
                "batch": self.batch_in_epoch,
                "total_steps": total,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                "rng": rng,
                "loss_sum": self._loss_sum,
                "loss_count": self._loss_count,
                "last_loss": self._last_loss,
                "data_order": self._data_order(),
                "extra_tensors": {n: p.detach().cpu() for n, p in _extra_trainables(self.model).items()},
            }
            summary = {"step": self.global_step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                       "total_steps": total, "lr": lr}
            _write_checkpoint(path, self.model, state, summary)
            _prune_checkpoints(self.output_dir, self.train.keep_last)
        acc.wait_for_everyone()
        self.last_checkpoint = path
        return path

    def _restore(self, checkpoint: Path, total: int) -> None:
        acc = self.accelerator
        state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
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
        _load_adapters(self.model, checkpoint / ADAPTER_DIR)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in state["extra_tensors"].items():
                if name not in params:
                    raise TrainingError(f"resume: the checkpoint trains {name!r}, which this model lacks")
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if acc.scaler is not None and state["scaler"] is not None:
            acc.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        _set_rng_state(rng[acc.process_index] if len(rng) == acc.num_processes else rng[0])
        self.global_step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch"]
        self._loss_sum, self._loss_count = state["loss_sum"], state["loss_count"]
        self._last_loss = state["last_loss"]
        self.last_checkpoint = checkpoint
        logger.info(
            "resuming from %s (step %d, epoch %d, batch %d of the epoch)",
            checkpoint, self.global_step, self.epoch, self.batch_in_epoch,
        )
