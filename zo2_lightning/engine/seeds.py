"""Seeds, not RNG states: the perturbation direction z as a pure function of where it is used.

``z = draw_direction(out, derive_seed(run_seed, step, unit, tensor), generator)``

Every consumer of z (the two perturbed forwards, the deferred update, the final flush, a resumed run, another
rank) regenerates it from the same four integers, so no RNG state is ever saved or communicated
(docs/architecture.md, "Seeds, not RNG states").
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1

#: Unit index used for the parameters that stay resident (embeddings, final norm, head).
RESIDENT_UNIT = (1 << 32) - 1


def _splitmix64(x: int) -> int:
    # the finaliser of SplitMix64: a bijection on 64-bit integers with good avalanche
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(run_seed: int, step: int, unit: int, tensor: int) -> int:
    """The generator seed of one tensor's direction.

    Args:
        run_seed: the seed of the whole run (shared by all ranks).
        step: the optimizer step (Lightning's ``global_step``) the direction belongs to.
        unit: the block index, or :data:`RESIDENT_UNIT` for parameters that stay resident.
        tensor: the index of the tensor among the unit's trainable parameters.

    Returns:
        A non-negative 63-bit integer, suitable for ``torch.Generator.manual_seed``.
    """
    h = _splitmix64(run_seed & _MASK64)
    for part in (step, unit, tensor):
        h = _splitmix64(h ^ (part & _MASK64))
    return h & ((1 << 63) - 1)


def direction_seed(run_seed: int, direction: int) -> int:
    """The run seed of the ``direction``-th independent direction of a step (q-SPSA, one per rank).

    Direction 0 is the run seed itself, so a single direction is plain MeZO.
    """
    if direction == 0:
        return run_seed
    return derive_seed(run_seed, -1, direction, -1)


DISTRIBUTIONS = ("gaussian", "rademacher")


def draw_direction(
    out: torch.Tensor, seed: int, generator: torch.Generator, distribution: str = "gaussian"
) -> torch.Tensor:
    """Fill ``out`` with a direction drawn from ``seed``.

    ``"gaussian"``: standard normal, the same values as ``torch.randn(out.shape, generator=
    torch.Generator(out.device).manual_seed(seed), dtype=out.dtype)``. ``"rademacher"``: +1 / -1 with equal
    probability, ``2 * torch.randint(0, 2, out.shape, generator=...) - 1`` cast to ``out.dtype``.
    """
    generator.manual_seed(seed)
    if distribution == "gaussian":
        return out.normal_(generator=generator)
    if distribution == "rademacher":
        return out.random_(0, 2, generator=generator).mul_(2).sub_(1)
    raise ValueError(f"distribution={distribution!r}: use one of {DISTRIBUTIONS}")
