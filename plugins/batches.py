"""The trainer's data order: which samples each process trains on, batch by batch, in each epoch.

The order is a function of the seed and the epoch only, so a resumed run can restart at any batch
of an epoch and see the same batches an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


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
