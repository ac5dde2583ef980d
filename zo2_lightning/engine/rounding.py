"""Rounding a working-precision block to its 16-bit storage without losing MeZO-size updates.

``stochastic_round(x32, torch.bfloat16, generator)``

An update of ~1e-6 is far below half an ulp of a bf16 weight of magnitude ~1e-2 (ulp ~6e-5), so
round-to-nearest gives back the old weight and training stalls. Stochastic rounding picks the upper or
lower neighbour with probability proportional to proximity, so the stored value is exact in expectation
(E[SR(x)] = x) and small updates accumulate. The generator is seeded from (run seed, step, block), so a
resumed run rounds identically (docs/architecture.md, "16-bit storage with stochastic rounding").
"""

from __future__ import annotations

import torch


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Round ``x`` (fp32/fp64) to ``dtype`` stochastically; values already representable stay exact.

    Args:
        x: the values in working precision.
        dtype: a floating dtype narrower than ``x.dtype`` (``torch.bfloat16`` or ``torch.float16``).
        generator: seeded generator on ``x.device``.

    Returns:
        A new tensor of ``dtype``.
    """
    nearest = x.to(dtype)
    back = nearest.to(x.dtype)
    err = x - back  # what round-to-nearest lost; exactly 0 where x is representable
    toward = torch.where(err > 0, torch.full_like(nearest, float("inf")), torch.full_like(nearest, float("-inf")))
    other = torch.nextafter(nearest, toward)  # the neighbour on the other side of x
    gap = (other.to(x.dtype) - back).abs()
    p = err.abs() / gap  # probability of taking the other neighbour; < 0.5 by construction of nearest
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    take_other = (u < p) & torch.isfinite(other)
    return torch.where(take_other, other, nearest)


def round_to_nearest(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """Plain cast, for comparison only: it drops updates below half an ulp."""
    return x.to(dtype)
