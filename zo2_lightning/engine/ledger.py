"""The ledger of deferred updates: every commit of the run, and how far each block's host copy has absorbed them.

``ledger = CommitLedger(n_blocks)``; ``ledger.add(commit)``; ``ledger.since(i)`` (what block i must still apply);
``ledger.absorbed(i, upto)`` once block i's host copy holds the commits before ``upto``; ``ledger.head``.

A :class:`Commit` is one step's update along one direction: everything needed to apply it again later (the
seed regenerates z), so a block that arrives k steps late applies the same k commits, in order, that it would
have applied on time. Positions are absolute (the n-th commit of the run is position n), so a position taken
when a block was acquired stays valid while the ledger forgets the commits every block has absorbed
(:meth:`CommitLedger.forget_absorbed`).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Commit:
    """The update of one step along one direction, applied to each block when it next arrives."""

    step: int
    g: float
    lrs: tuple[float, ...]  # per optimizer param group
    weight_decays: tuple[float, ...]
    seed: int  # the run seed z was drawn with (see seeds.direction_seed)
    hyper: tuple[float, ...] = ()  # the update rule's coefficients at this step (momentum, Adam betas and eps)
    t: int = 0  # 1-based count of the update among the run's commits (Adam's bias correction); set by commit

    def reversed(self) -> Commit:
        """The step taken backwards (``-lr``): the opposite candidate of a conservative step."""
        return dataclasses.replace(self, lrs=tuple(-lr for lr in self.lrs))


class CommitLedger:
    def __init__(self, n_blocks: int, keep: int = 64) -> None:
        self._commits: list[Commit] = []
        self._base = 0  # absolute position of _commits[0]
        self.applied = [0] * n_blocks  # per block: absolute position up to which its host copy has absorbed
        self._keep = keep  # forget in batches of at least this many

    @property
    def head(self) -> int:
        """The absolute position after the last commit."""
        return self._base + len(self._commits)

    def add(self, commit: Commit) -> None:
        self._commits.append(commit)

    def since(self, i: int) -> list[Commit]:
        """The commits block ``i``'s host copy has not absorbed, in order."""
        return self._commits[self.applied[i] - self._base :]

    def absorbed(self, i: int, upto: int) -> None:
        """Block ``i``'s host copy now holds every commit before absolute position ``upto``."""
        self.applied[i] = upto
        self.forget_absorbed()

    def forget_absorbed(self) -> None:
        """Drop the commits every host copy holds (their z and g are never needed again)."""
        done = min(self.applied, default=self.head) - self._base
        if done >= self._keep:
            del self._commits[:done]
            self._base += done

    @property
    def pending(self) -> int:
        """Block updates not yet absorbed by the host copies."""
        return sum(self.head - a for a in self.applied)

    def keys(self) -> set[tuple[int, int]]:
        """(step, seed) of every remembered commit."""
        return {(c.step, c.seed) for c in self._commits}

    def clear(self) -> None:
        """After a flush: everything absorbed everywhere."""
        self._base = self.head
        self._commits.clear()
        self.applied = [self._base] * len(self.applied)
