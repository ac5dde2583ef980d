"""How the ranks of a distributed ZO run agree on a step: after one weight sync at setup, only losses cross ranks.

```python
broadcast_module_(module, device)                       # once, at setup: rank 0's weights everywhere
reduction = reduction_for(world_size, "shared", rank, device, group_size=2)   # or "independent"; 1 process: Reduction()
seeds = reduction.seeds(run_seed, q)                    # the directions this rank's group measures
runs = reduction.share(step_perturbations(q))           # the runs of the step this rank makes
per_direction = reduction.losses(measured, run_seed)    # shared z: one all-reduce; per-group z: one all-gather
```

The ranks form groups of ``group_size`` consecutive ranks (the layouts of docs/distributed.md: data parallel with
groups of 1, perturbation parallel with one group of all ranks, 2-D in between). The members of a group see the
same batch and split the perturbed runs of every step between them (:func:`share_of`); the groups are data-parallel
with each other. ``measured`` is ``{direction seed: [(L+, L-) per micro-batch]}`` as one rank saw it, ``None``
where another member of its group made the run; the result is what every rank commits. A group's members fill
disjoint entries, so one sum over ranks of the entries (``None`` as 0, which adds exactly) holds each group's
losses complete; a mean over groups or a gather then gives every rank the same bits (an all-reduce hands every
rank the same sum; an all-gather the same copies), so the parameters stay identical without moving a weight
(docs/architecture.md, "Distributed by scalars").

Plain ``torch.distributed`` on the default process group: Lightning sets the group up, nothing here imports it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from zo2_lightning.engine import Perturbation, direction_seed

Losses = dict[int, list[tuple[float | None, ...]]]  # per direction seed, per micro-batch: (L+, L-[, L0])

#: the two ways ranks share the work of a step
DIRECTION_MODES = ("shared", "independent")


class Reduction:
    """One process: the run's q directions, every run of a step, and every loss as measured."""

    def seeds(self, run_seed: int, q: int) -> list[int]:
        """The run seeds of the directions this process measures at each step (q-SPSA: q of them)."""
        return [direction_seed(run_seed, k) for k in range(q)]

    def share(self, runs: list[Perturbation]) -> list[Perturbation]:
        """Which of a step's (or a conservative trial's) perturbed runs this process makes: all of them."""
        return list(runs)

    def losses(self, measured: Losses, run_seed: int) -> Losses:
        """``{direction seed: [(L+, L-) per micro-batch]}`` as every rank must see it."""
        return measured

    def values(self, values: list[float]) -> list[float]:
        """Scalars every rank must agree on (a conservative step's trial losses)."""
        return values


class SharedDirections(Reduction):
    """Every rank perturbs along the same z; each group of ``group_size`` ranks splits the runs of a step; the step
    uses the mean over groups of L+ and L- (MeZO on the global batch), by one all-reduce on ``device``.

    Args:
        device: where the collective runs (the working device for NCCL, the CPU for gloo).
        group_size: ranks per group (1: every rank makes every run, plain data parallelism).
        rank: this process's global rank (its group is ``rank // group_size``, its place in it ``rank % group_size``).
    """

    def __init__(self, device: torch.device, group_size: int = 1, rank: int = 0) -> None:
        self.device, self.group_size = device, int(group_size)
        self.group, self.member = divmod(int(rank), self.group_size)

    def share(self, runs: list[Perturbation]) -> list[Perturbation]:
        return share_of(runs, self.group_size, self.member)

    def losses(self, measured: Losses, run_seed: int) -> Losses:
        return mean_over_groups(measured, self.device, self.group_size)

    def values(self, values: list[float | None]) -> list[float]:
        return mean_values_over_groups(values, self.device, self.group_size)


class IndependentDirections(SharedDirections):
    """Group g measures its own q directions (seeds g*q .. g*q+q-1) on its own shard; the (L+, L-) are all-gathered
    and every rank commits all G*q directions of the G groups (groups of one rank: rank r's seeds r*q ..)."""

    def __init__(self, device: torch.device, rank: int, group_size: int = 1) -> None:
        super().__init__(device, group_size, rank)

    def seeds(self, run_seed: int, q: int) -> list[int]:
        return rank_direction_seeds(run_seed, self.group, q)

    def losses(self, measured: Losses, run_seed: int) -> Losses:
        return gather_over_groups(measured, run_seed, self.device, self.group_size)


def reduction_for(world_size: int, directions: str, rank: int, device: torch.device,
                  group_size: int = 1) -> Reduction:
    """The reduction of a run: :class:`Reduction` for one process, else the ``directions`` mode's over groups of
    ``group_size`` ranks (which must divide ``world_size``; the strategy refuses other layouts first)."""
    if world_size <= 1:
        return Reduction()
    if directions == "independent":
        return IndependentDirections(device, rank, group_size)
    return SharedDirections(device, group_size, rank)


def share_of(runs: list[Perturbation], group_size: int, member: int) -> list[Perturbation]:
    """Member ``member``'s part of ``runs`` when ``group_size`` ranks split them: consecutive runs, as even as the
    count allows (2 runs over 2 ranks: the +eps run, then the -eps run; 2q over 2q: one each)."""
    n = len(runs)
    return list(runs[member * n // group_size : (member + 1) * n // group_size])


def rank_direction_seeds(run_seed: int, rank: int, q: int) -> list[int]:
    """The run seeds of rank ``rank``'s ``q`` directions in independent mode: directions ``rank*q .. rank*q+q-1``.

    Rank-major numbering makes N ranks with q directions each the single-process ``ZOSGD(q=N*q)`` run: rank 0
    direction 0 is the run seed itself, so one rank with one direction is plain MeZO.
    """
    return [direction_seed(run_seed, rank * q + k) for k in range(q)]


def mean_over_groups(measured: Losses, device: torch.device, group_size: int = 1) -> Losses:
    """Shared directions: the mean over groups of every (L+, L-), by one all-reduce of ``(q, k, 2)`` float64.

    Every group measured the same seeds (same z) on its own shard of the batch, each of its members some of the
    runs; the sum over ranks completes each group's entries and adds the groups. The mean loss of a group-sharded
    batch is the loss of the whole batch, so the step is MeZO on the global batch.
    """
    packed = _pack(measured, device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)  # gloo has no AVG; the sum is the same bits on every rank
    packed /= dist.get_world_size() // group_size
    return _unpack(packed, list(measured))


def mean_values_over_groups(values: list[float | None], device: torch.device, group_size: int = 1) -> list[float]:
    """The mean over groups of a few scalars (a conservative step's trial losses, ``None`` where another member of
    the group made the run), by one all-reduce of float64."""
    packed = torch.tensor(_zero_filled(values), dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    packed /= dist.get_world_size() // group_size
    return [float(v) for v in packed.cpu().tolist()]


def gather_over_groups(measured: Losses, run_seed: int, device: torch.device, group_size: int = 1) -> Losses:
    """Independent directions: every group's (L+, L-) under its own seeds, by one all-gather of ``(q, k, 2)``
    float64 from every rank; each group's entries are the sum of its members' parts.

    The seeds themselves are not sent: group g's are :func:`rank_direction_seeds` of g. The result lists the
    G*q directions group-major, the order in which every rank commits them.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    group, q = rank // group_size, len(measured)
    if list(measured) != rank_direction_seeds(run_seed, group, q):
        raise RuntimeError(
            f"rank {rank} measured directions {list(measured)}, not its group's seeds: independent directions need"
            " IndependentDirections.seeds and .losses to use the same run seed and q on every rank"
        )
    packed = _pack(measured, device)
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed)
    gathered: Losses = {}
    for g in range(world // group_size):
        members = parts[g * group_size : (g + 1) * group_size]
        complete = members[0] if group_size == 1 else torch.stack(members).sum(0)  # + 0 where another ran it
        gathered.update(_unpack(complete, rank_direction_seeds(run_seed, g, q)))
    return gathered


@torch.no_grad()
def broadcast_module_(module: nn.Module, device: torch.device, src: int = 0) -> int:
    """Overwrite every parameter and buffer with rank ``src``'s, one tensor at a time; returns the bytes sent.

    Tensors that the backend cannot send where they live (NCCL needs CUDA tensors; the offloaded blocks are on
    the host) travel through a staging copy on ``device``, so peak extra memory is one tensor. Tensors on the meta
    device (blocks materialized later from files) are skipped: every rank must materialize the same values.
    """
    sent, seen = 0, set()
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) in seen or tensor.is_meta:
            continue
        seen.add(id(tensor))
        data = tensor.data
        staged = data if data.device == device and data.is_contiguous() else data.to(device).contiguous()
        dist.broadcast(staged, src=src)
        if staged is not data:
            data.copy_(staged)
        sent += staged.numel() * staged.element_size()
    return sent


def _pack(measured: Losses, device: torch.device) -> torch.Tensor:
    rows = list(measured.values())
    if len({len(r) for r in rows}) != 1:
        raise RuntimeError(f"every direction needs the same number of micro-batches, got {[len(r) for r in rows]}")
    values = [_zero_filled(pair) for row in rows for pair in row]  # (L+, L-), or (L+, L-, L0) with a center run
    width = len(rows[0][0])
    return torch.tensor(values, dtype=torch.float64, device=device).reshape(len(rows), len(rows[0]), width)


def _zero_filled(values: Sequence[float | None]) -> list[float]:
    """A run another member of the group made counts 0 here: its member contributes the value, and x + 0 is x."""
    return [0.0 if v is None else float(v) for v in values]


def _unpack(packed: torch.Tensor, seeds: list[int]) -> Losses:
    values = packed.cpu().tolist()  # sync point: the commit needs g on the host
    return {seed: [tuple(float(v) for v in pair) for pair in pairs] for seed, pairs in zip(seeds, values)}
