"""How the ranks of a distributed ZO run agree on a step: after one weight sync at setup, only losses cross ranks.

```python
broadcast_module_(module, device)                       # once, at setup: rank 0's weights everywhere
reduction = reduction_for(world_size, "shared", rank, device)   # or "independent"; one process: Reduction()
seeds = reduction.seeds(run_seed, q)                    # the directions this rank measures
per_direction = reduction.losses(measured, run_seed)    # shared z: one all-reduce; per-rank z: one all-gather
```

``measured`` is ``{direction seed: [(L+, L-) per micro-batch]}`` as one rank saw it; the result is what every rank
commits. Both reductions return bit-identical values on every rank (an all-reduce hands every rank the same sum; an
all-gather hands every rank the same copies), so the parameters stay identical without moving a weight
(docs/architecture.md, "Distributed by scalars").

Plain ``torch.distributed`` on the default process group: Lightning sets the group up, nothing here imports it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from zo2_lightning.engine import direction_seed

Losses = dict[int, list[tuple[float, float]]]

#: the two ways ranks share the work of a step
DIRECTION_MODES = ("shared", "independent")


class Reduction:
    """One process: the run's q directions, and every loss as measured."""

    def seeds(self, run_seed: int, q: int) -> list[int]:
        """The run seeds of the directions this process measures at each step (q-SPSA: q of them)."""
        return [direction_seed(run_seed, k) for k in range(q)]

    def losses(self, measured: Losses, run_seed: int) -> Losses:
        """``{direction seed: [(L+, L-) per micro-batch]}`` as every rank must see it."""
        return measured

    def values(self, values: list[float]) -> list[float]:
        """Scalars every rank must agree on (a conservative step's trial losses)."""
        return values


class SharedDirections(Reduction):
    """Every rank perturbs along the same z; the step uses the mean over ranks of L+ and L- (MeZO on the global
    batch), by one all-reduce on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def losses(self, measured: Losses, run_seed: int) -> Losses:
        return mean_over_ranks(measured, self.device)

    def values(self, values: list[float]) -> list[float]:
        return mean_values_over_ranks(values, self.device)


class IndependentDirections(SharedDirections):
    """Rank r measures its own q directions (seeds r*q .. r*q+q-1) on its own shard; the (L+, L-) are all-gathered
    and every rank commits all N*q directions."""

    def __init__(self, device: torch.device, rank: int) -> None:
        super().__init__(device)
        self.rank = rank

    def seeds(self, run_seed: int, q: int) -> list[int]:
        return rank_direction_seeds(run_seed, self.rank, q)

    def losses(self, measured: Losses, run_seed: int) -> Losses:
        return gather_over_ranks(measured, run_seed, self.device)


def reduction_for(world_size: int, directions: str, rank: int, device: torch.device) -> Reduction:
    """The reduction of a run: :class:`Reduction` for one process, else the ``directions`` mode's."""
    if world_size <= 1:
        return Reduction()
    return IndependentDirections(device, rank) if directions == "independent" else SharedDirections(device)


def rank_direction_seeds(run_seed: int, rank: int, q: int) -> list[int]:
    """The run seeds of rank ``rank``'s ``q`` directions in independent mode: directions ``rank*q .. rank*q+q-1``.

    Rank-major numbering makes N ranks with q directions each the single-process ``ZOSGD(q=N*q)`` run: rank 0
    direction 0 is the run seed itself, so one rank with one direction is plain MeZO.
    """
    return [direction_seed(run_seed, rank * q + k) for k in range(q)]


def mean_over_ranks(measured: Losses, device: torch.device) -> Losses:
    """Shared directions: the mean over ranks of every (L+, L-), by one all-reduce of ``(q, k, 2)`` float64.

    Every rank measured the same seeds (same z) on its own shard of the batch; the mean loss of a rank-sharded
    batch is the loss of the whole batch, so the step is MeZO on the global batch.
    """
    packed = _pack(measured, device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)  # gloo has no AVG; the sum is the same bits on every rank
    packed /= dist.get_world_size()
    return _unpack(packed, list(measured))


def mean_values_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """The mean over ranks of a few scalars (a conservative step's trial losses), by one all-reduce of float64."""
    packed = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    packed /= dist.get_world_size()
    return [float(v) for v in packed.cpu().tolist()]


def gather_over_ranks(measured: Losses, run_seed: int, device: torch.device) -> Losses:
    """Independent directions: every rank's (L+, L-) under its own seeds, by one all-gather of ``(q, k, 2)`` float64.

    The seeds themselves are not sent: rank r's are :func:`rank_direction_seeds` of r. The result lists the
    N*q directions rank-major, the order in which every rank commits them.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    q = len(measured)
    if list(measured) != rank_direction_seeds(run_seed, rank, q):
        raise RuntimeError(
            f"rank {rank} measured directions {list(measured)}, not its own seeds: independent directions need"
            " IndependentDirections.seeds and .losses to use the same run seed and q on every rank"
        )
    packed = _pack(measured, device)
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed)
    gathered: Losses = {}
    for r, part in enumerate(parts):
        gathered.update(_unpack(part, rank_direction_seeds(run_seed, r, q)))
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
    return torch.tensor(rows, dtype=torch.float64, device=device).reshape(len(rows), len(rows[0]), 2)


def _unpack(packed: torch.Tensor, seeds: list[int]) -> Losses:
    values = packed.cpu().tolist()  # sync point: the commit needs g on the host
    return {seed: [(float(p), float(m)) for p, m in pairs] for seed, pairs in zip(seeds, values)}
