import torch

from zo2_lightning.engine import derive_seed, draw_direction
from zo2_lightning.engine.perturb import perturb_into, sgd_update_


def test_seed_is_a_pure_function_of_its_four_parts():
    assert derive_seed(1, 2, 3, 4) == derive_seed(1, 2, 3, 4)
    seeds = {derive_seed(r, s, u, t) for r in range(3) for s in range(5) for u in range(4) for t in range(6)}
    assert len(seeds) == 3 * 5 * 4 * 6
    assert all(0 <= s < 2**63 for s in seeds)


def test_draw_into_a_flat_view_equals_randn_of_the_shape():
    flat = torch.empty(100)
    gen = torch.Generator()
    view = flat[17:17 + 60].view(6, 10)
    draw_direction(view, 123, gen)
    assert torch.equal(view, torch.randn(6, 10, generator=torch.Generator().manual_seed(123)))


def test_perturb_and_update_match_their_formulas_bitwise():
    g = torch.Generator().manual_seed(0)
    theta, z = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    out = torch.empty(1000)
    assert torch.equal(perturb_into(out, theta, z, 1e-3), theta + 1e-3 * z)
    assert torch.equal(perturb_into(out, theta, z, -1e-3), theta - 1e-3 * z)
    expected = theta - 0.01 * (2.5 * z + 0.1 * theta)
    w = theta.clone()
    sgd_update_(w, z.clone(), 2.5, 0.01, 0.1)
    assert torch.equal(w, expected)
