"""The training order: a function of (seed, epoch, rank, world size), resumed mid-epoch from a checkpoint.

``loader = train_loader(dataset, batch_size=16, seed=0, collate_fn=collate, trainer=self.trainer)`` in a
datamodule's ``train_dataloader`` (the built-in datamodules do this).

Epoch ``e`` visits the examples in ``torch.randperm(n)`` order drawn from a generator seeded ``seed + e``, and
rank ``r`` of ``w`` takes every ``w``-th of them starting at ``r`` — exactly what torch's ``DistributedSampler``
draws, and with one rank exactly what a ``DataLoader(shuffle=True, generator=manual_seed(seed))`` draws in its
first epoch. When ``n`` is not a multiple of ``w`` the first examples of the order are repeated to even the
shards, as ``DistributedSampler`` does, so that every rank takes the same number of steps.

Lightning saves ``state_dict()`` of every training loader that has one into each checkpoint (the fit loop's
``combined_loader`` entry) and hands it back to ``load_state_dict`` on resume, before the first batch. The state
here is the epoch and how many examples of its order the ranks have consumed, counted from the batches the
loader has handed out (not from what worker processes have prefetched), so a run resumed from a mid-epoch
checkpoint continues with the next batch the uninterrupted run would have taken, and a run resumed at an epoch
boundary starts the next epoch's order. Lightning keeps this sampler on several ranks: it injects its own
``DistributedSampler`` only into loaders whose sampler is not one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler


class EpochSampler(DistributedSampler):
    """``DistributedSampler``'s order, which can begin part-way through an epoch's shard.

    Args:
        dataset: anything with a length.
        num_replicas: ranks sharing the epoch.
        rank: this rank.
        seed: the order's seed (epoch ``e`` uses ``seed + e``).
        shuffle: ``False``: the dataset's own order every epoch.
    """

    def __init__(self, dataset: Sized, *, num_replicas: int, rank: int, seed: int, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.resume_point: tuple[int, int] | None = None  # (epoch, position) the next iteration starts from
        self.current: tuple[int, int] | None = None  # (epoch, position) the running iteration started from

    def order(self, epoch: int) -> list[int]:
        """This rank's shard of epoch ``epoch``, in order."""
        saved, self.epoch = self.epoch, epoch
        try:
            return list(super().__iter__())
        finally:
            self.epoch = saved

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self.resume_point is not None and self.resume_point[0] == self.epoch:
            start = self.resume_point[1]
        self.resume_point = None  # consumed, or stale: it named another epoch than the one Lightning runs
        self.current = (self.epoch, start)
        return iter(self.order(self.epoch)[start:])


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochSampler` whose place in the epoch goes into Lightning checkpoints.

    ``state_dict()`` is ``{"epoch", "consumed", "seed", "num_examples"}``: ``consumed`` counts the examples of
    the epoch's order (all ranks together, padding included) that the batches handed out so far cover. A
    checkpoint of ``w`` ranks resumes on ``w'`` ranks at the same place of the order when ``consumed`` is a
    multiple of ``w'`` (2 ranks -> 1 rank always is); the checkpoint's seed is kept, as the strategy keeps its
    perturbation seed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches = 0  # batches the running iteration has handed out

    def __iter__(self) -> Iterator[Any]:
        if isinstance(self.sampler, EpochSampler):
            self.sampler.current = None  # the new iteration's sampler pass may start lazily, at the first batch
        self._batches = 0
        return self._count(super().__iter__())

    def _count(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where the training order stands: the epoch and the examples of it consumed (all ranks).

        Empty when Lightning has swapped the sampler for its own (``overfit_batches``): nothing to resume.
        """
        sampler = self.sampler
        if not isinstance(sampler, EpochSampler):
            return {}
        if sampler.resume_point is not None:  # restored, no batch drawn yet
            epoch, position = sampler.resume_point
        elif sampler.current is None:  # an iteration created, its first batch not drawn yet
            epoch, position = sampler.epoch, 0
        else:
            epoch, start = sampler.current
            position = min(start + self._batches * self._batch_size(), sampler.num_samples)
        return {"epoch": epoch, "consumed": position * sampler.num_replicas, "seed": sampler.seed,
                "num_examples": len(sampler.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the order from a checkpoint's :meth:`state_dict` at the next iteration.

        A checkpoint of a different number of examples restarts its epoch from the beginning, with a warning
        (its position names other examples).
        """
        sampler = self.sampler
        if not state or not isinstance(sampler, EpochSampler):
            return
        sampler.seed = int(state["seed"])
        epoch = int(state["epoch"])
        position = int(state["consumed"]) // sampler.num_replicas
        if int(state["num_examples"]) != len(sampler.dataset):
            rank_zero_warn(
                f"The checkpoint's training order covers {state['num_examples']} examples, this dataset has"
                f" {len(sampler.dataset)}: epoch {epoch} restarts from its beginning instead of the checkpoint's"
                " place in it. Resume with the same task settings to continue the uninterrupted run's order."
            )
            position = 0
        if position >= sampler.num_samples:  # saved after the epoch's last batch: the next epoch starts afresh
            epoch, position = epoch + 1, 0
        sampler.set_epoch(epoch)  # worker processes may draw indices before Lightning sets the epoch
        sampler.resume_point = (epoch, position)

    def _batch_size(self) -> int:
        return self.batch_size if self.batch_size is not None else 1


def replicas(trainer: Any | None) -> tuple[int, int]:
    """``(shards, shard)`` of the running fit: the trainer's data shards (its strategy's
    ``distributed_sampler_kwargs``: one per perturbation-parallel group of ranks with ``zo2_offload``, one per
    rank under plain DDP), else its world size and rank, else torch.distributed's, else ``(1, 0)``."""
    if trainer is not None:
        shards = getattr(trainer, "distributed_sampler_kwargs", None)
        if shards:
            return int(shards["num_replicas"]), int(shards["rank"])
        return int(trainer.world_size), int(trainer.global_rank)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def train_loader(
    dataset: Sized,
    *,
    batch_size: int,
    seed: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    num_workers: int = 0,
    trainer: Any | None = None,
    shuffle: bool = True,
) -> ResumableLoader:
    """A training loader whose order is a function of (seed, epoch, rank, world size) and resumes mid-epoch.

    Args:
        dataset: the training examples (a map-style dataset or a list).
        batch_size: examples per rank and step.
        seed: the order's seed.
        collate_fn: turns a list of examples into a batch.
        num_workers: DataLoader worker processes.
        trainer: the fit's Trainer (a datamodule's ``self.trainer``): its data shards (:func:`replicas`) shard the
            order; ``None`` asks torch.distributed.
        shuffle: ``False`` keeps the dataset's order (still sharded and resumable).
    """
    world, rank = replicas(trainer)
    sampler = EpochSampler(dataset, num_replicas=world, rank=rank, seed=seed, shuffle=shuffle)
    # the generator only seeds worker processes (the order is the sampler's): it keeps the global RNG untouched
    return ResumableLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                           num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
