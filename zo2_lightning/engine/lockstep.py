"""Perturbed forwards in lockstep: the +eps and -eps runs (of each direction) take turns at every block.

``results = Lockstep(activate, transition).run(fn, keys=[(0, +1), (0, -1)])`` with ``barrier(block)``
called from each block's forward pre-hook.

Each run is a greenlet; a block's pre-hook calls :meth:`Lockstep.barrier`, which parks the caller until every
other run reaches the same block call. The last arrival calls ``transition(block)`` (upload, deferred
update, perturbed copies) exactly once, and each run is given ``activate(key)`` whenever it regains control
so the parameters it is about to read hold its own perturbation. Two runs (one direction) is MeZO; 2q runs
let q directions share one residency of each block. The user's code is never edited.

Greenlets share one OS thread, so torch's thread-local state (grad mode, autocast) would leak from one run
into the other if the user's ``training_step`` enters a context that spans blocks; the scheduler saves and
restores that state at every switch, so each run behaves as if it had a thread of its own. The global RNG
state is treated the same way: both runs start from the same state and see the same random numbers (the
two-point estimate needs identical randomness), and afterwards the generator continues from the first run.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import greenlet
import torch

_AUTOCAST_DEVICES = ("cpu", "cuda")


class LockstepDivergenceError(RuntimeError):
    """Two runs called different blocks at the same point: their control flow depends on the parameters."""


def _capture_state() -> tuple:
    """What a real thread would own: grad mode, autocast settings; plus the RNG states the run draws from."""
    cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return (
        torch.is_grad_enabled(),
        tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES),
        torch.get_rng_state(),
        cuda_rng,
    )


def _restore_state(state: tuple) -> None:
    grad, autocast, cpu_rng, cuda_rng = state
    torch.set_grad_enabled(grad)
    for device, (enabled, dtype) in zip(_AUTOCAST_DEVICES, autocast):
        torch.set_autocast_enabled(device, enabled)
        torch.set_autocast_dtype(device, dtype)
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng)


@dataclass
class _Run:
    key: Hashable  # (direction, sign) for the engine
    calls: list[int] = field(default_factory=list)  # block index of each barrier this run has reached
    done: bool = False
    result: Any = None
    error: BaseException | None = None
    state: tuple | None = None  # thread-local + RNG state while parked
    glet: greenlet.greenlet | None = None


class Lockstep:
    """Scheduler of the perturbed runs of one ZO step.

    Args:
        activate: ``activate(key)`` is called each time a run (re)gains control, before it reads a parameter.
        transition: ``transition(block)`` is called once per barrier, when every run has reached the block
            (or finished), before any of them executes it.
    """

    def __init__(self, activate: Callable[[Hashable], None], transition: Callable[[int], None]) -> None:
        self._activate = activate
        self._transition = transition
        self._runs: dict[Hashable, _Run] = {}
        self._current: _Run | None = None
        self._transitions = 0
        self._main: greenlet.greenlet | None = None

    @property
    def active(self) -> bool:
        """True while called from inside one of the runs."""
        return self._current is not None

    @property
    def key(self) -> Hashable | None:
        """The key of the run executing now, or None outside the runs."""
        return self._current.key if self._current is not None else None

    def run(self, fn: Callable[[Hashable], Any], keys: Sequence[Hashable]) -> dict[Hashable, Any]:
        """Run ``fn(key)`` for every key in lockstep; return ``{key: result}``."""
        self._main = greenlet.getcurrent()
        self._transitions = 0
        start = _capture_state()
        self._runs = {k: _Run(key=k, state=start) for k in keys}
        for r in self._runs.values():
            r.glet = greenlet.greenlet(self._body(r, fn), parent=self._main)
        try:
            while not all(r.done for r in self._runs.values()):
                for r in self._runs.values():
                    if r.done:
                        continue
                    self._switch_into(r)
                    if r.error is not None:
                        raise r.error
        finally:
            self._current = None
            for r in self._runs.values():
                if r.glet is not None and not r.glet.dead:
                    r.glet.throw(greenlet.GreenletExit)  # unwind the parked run's finally blocks
            first = self._runs[keys[0]]
            # grad/autocast as before the runs; the RNG continues from where the first run left it
            _restore_state((*start[:2], *(first.state or start)[2:]))
        return {k: r.result for k, r in self._runs.items()}

    def barrier(self, block: int) -> None:
        """Called from a block's pre-hook inside a run: wait for the others, then hand over the block."""
        me = self._current
        assert me is not None, "barrier() outside a lockstep run"
        k = len(me.calls)
        me.calls.append(block)
        others = [r for r in self._runs.values() if r is not me]
        while any(not r.done and len(r.calls) <= k for r in others):
            self._yield(me)
        for r in others:
            if len(r.calls) > k and r.calls[k] != block:
                raise LockstepDivergenceError(
                    f"the perturbed runs diverged at block call {k}: block {r.calls[k]} vs {block}. The"
                    " training_step's control flow must not depend on the parameter values."
                )
        if self._transitions <= k:  # last arrival (or the others finished): prepare the block once
            self._transitions = k + 1
            self._transition(block)
        self._activate(me.key)

    def _body(self, r: _Run, fn: Callable[[Hashable], Any]) -> Callable[[], None]:
        def body() -> None:
            try:
                self._activate(r.key)
                r.result = fn(r.key)
            except greenlet.GreenletExit:
                raise
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's greenlet
                r.error = e
            finally:
                r.done = True

        return body

    def _switch_into(self, r: _Run) -> None:
        main_state = _capture_state()
        assert r.state is not None and r.glet is not None
        _restore_state(r.state)
        self._current = r
        try:
            r.glet.switch()  # returns when the run parks at a barrier or finishes
        finally:
            self._current = None
            r.state = _capture_state()
            _restore_state(main_state)

    def _yield(self, me: _Run) -> None:
        assert self._main is not None
        self._main.switch()  # resumed by _switch_into, which restored this run's state
