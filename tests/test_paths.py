"""Paths in the project's convention (data at t = 1): coefficients, derivatives and the score identity."""
import math

import pytest
import torch

from pafm.paths import TimeSampler, build_path


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_endpoints_and_derivatives(name):
    path = build_path(name)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    a, s, _, _ = path.coefficients(t)
    assert torch.allclose(a, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-12)  # noise at 0, data at 1
    assert torch.allclose(s, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12)
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    h = 1e-6
    for f, df in [(path.alpha, path.d_alpha), (path.sigma, path.d_sigma)]:
        numeric = (f(t + h) - f(t - h)) / (2 * h)
        assert torch.allclose(df(t), numeric, atol=1e-8)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_score_and_data_from_velocity_for_a_point_mass(name):
    # Data is a single point x0: the marginal velocity is exact, so score and E[x|z] are known in closed form.
    path = build_path(name)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 5, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 0.8], dtype=torch.float64)
    eps = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    z = path.interpolate(x0.expand(3, 5), eps, t)
    v = path.velocity(x0.expand(3, 5), eps, t)  # with one data point the conditional target is the marginal one
    a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]
    assert torch.allclose(path.velocity_to_score(v, z, t), -(z - a * x0) / s**2, atol=1e-9)
    assert torch.allclose(path.velocity_to_data(v, z, t), x0.expand(3, 5), atol=1e-9)


def test_time_sampler_ranges_and_errors():
    gen = torch.Generator().manual_seed(0)
    for kind in ["uniform", "logit_normal"]:
        t = TimeSampler(kind).sample(10000, gen)
        assert t.min() > 0 and t.max() < 1
        assert abs(t.mean().item() - 0.5) < 0.02
    with pytest.raises(ValueError, match="unknown time sampler"):
        TimeSampler("beta")
    with pytest.raises(ValueError, match="unknown path"):
        build_path("vp")
    assert math.isclose(build_path("linear").d_sigma(torch.tensor(0.3)).item(), -1.0)
