"""Samplers against a Gaussian mixture whose marginal velocity field is known in closed form (float64)."""
import math

import pytest
import torch
from torch import nn

from pafm.paths import build_path
from pafm.sampling import (SamplerConfig, diffusion_coefficient, dopri5, euler, euler_maruyama, guided_velocity,
                           heun, sample, time_grid)



@pytest.fixture(autouse=True)
def one_thread():
    # The tensors here are tiny: with several threads every op pays OpenMP synchronisation, which on a busy shared
    # machine made one test 10x slower.  Restored afterwards for the other test files.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Data: x ~ sum_k pi_k N(m_k, s_k^2 I) in 2-D.
WEIGHTS = torch.tensor([0.3, 0.7], dtype=torch.float64)
MEANS = torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
STDS = torch.tensor([0.3, 0.5], dtype=torch.float64)


def mixture_posterior(path, z, t):
    """Per-component responsibilities r (B, K), E[x | z, k] and E[eps | z, k] (B, K, 2) for z_t = a x + s eps."""
    a, s, _, _ = (c[:, None] for c in path.coefficients(t))  # (B, 1)
    var = a**2 * STDS[None] ** 2 + s**2  # (B, K): variance of z_t given component k
    diff = z[:, None, :] - a[:, :, None] * MEANS[None]  # (B, K, 2)
    logp = torch.log(WEIGHTS)[None] - diff.pow(2).sum(-1) / (2 * var) - torch.log(2 * math.pi * var)
    r = torch.softmax(logp, dim=1)
    ex = MEANS[None] + (a * STDS[None] ** 2 / var)[..., None] * diff
    eeps = (s / var)[..., None] * diff
    return r, ex, eeps


def mixture_velocity(path):
    def fn(z, t):
        z64, t64 = z.double(), t.double()
        r, ex, eeps = mixture_posterior(path, z64, t64)
        _, _, da, ds = (c[:, None, None] for c in path.coefficients(t64))
        v = (r[..., None] * (da * ex + ds * eeps)).sum(1)
        return v.to(z.dtype)

    return fn


def mixture_logdensity(path, z, t):
    a, s, _, _ = (c[:, None] for c in path.coefficients(t))
    var = a**2 * STDS[None] ** 2 + s**2
    diff = z[:, None, :] - a[:, :, None] * MEANS[None]
    logp = torch.log(WEIGHTS)[None] - diff.pow(2).sum(-1) / (2 * var) - torch.log(2 * math.pi * var)
    return torch.logsumexp(logp, dim=1)


def check_mixture(x, tol_mean=0.08, tol_frac=0.03, tol_std=0.05):
    x = x.double()
    true_mean = (WEIGHTS[:, None] * MEANS).sum(0)
    assert torch.allclose(x.mean(0), true_mean, atol=tol_mean), (x.mean(0), true_mean)
    right = x[:, 0] > 0
    assert abs(right.double().mean().item() - WEIGHTS[1].item()) < tol_frac
    for k, mask in enumerate([~right, right]):
        part = x[mask]
        assert torch.allclose(part.mean(0), MEANS[k], atol=tol_std), (k, part.mean(0))
        assert torch.allclose(part.std(0), STDS[k].expand(2), atol=tol_std), (k, part.std(0))


def noise(n=4000, seed=0, dtype=torch.float64):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_closed_form_velocity_matches_autograd_score(name):
    # The oracle itself: the score implied by the closed-form velocity equals grad log p_t from autograd.
    path = build_path(name)
    z = noise(64, seed=1).requires_grad_(True)
    t = torch.linspace(0.02, 0.98, 64, dtype=torch.float64)
    (grad,) = torch.autograd.grad(mixture_logdensity(path, z, t).sum(), z)
    v = mixture_velocity(path)(z.detach(), t)
    assert torch.allclose(path.velocity_to_score(v, z.detach(), t), grad, atol=1e-9, rtol=1e-9)
    # Tweedie (the SDE's last step) equals the closed-form posterior mean.
    r, ex, _ = mixture_posterior(path, z.detach(), t)
    assert torch.allclose(path.velocity_to_data(v, z.detach(), t), (r[..., None] * ex).sum(1), atol=1e-9)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ode_samplers_land_on_the_mixture(name):
    path = build_path(name)
    fn = mixture_velocity(path)
    x0 = noise()
    reference, _ = dopri5(fn, x0, atol=1e-9, rtol=1e-6)
    fine = heun(fn, x0, time_grid(150, dtype=torch.float64))
    assert (reference - fine).abs().mean() < 1e-4  # two independent solvers agree: the reference is accurate
    check_mixture(reference)
    x_euler = euler(fn, x0, time_grid(200, dtype=torch.float64))
    x_heun = heun(fn, x0, time_grid(25, dtype=torch.float64))
    x_dopri, nfe = dopri5(fn, x0, atol=1e-6, rtol=1e-3)
    for x in (x_euler, x_heun, x_dopri):
        check_mixture(x)
    # Same noise, same deterministic flow: each solver follows the reference trajectories.  A few samples start near
    # the boundary between the modes, where small errors switch the mode, so the bounds are on the mean and 99%.
    for x, mean_tol, q99_tol in [(x_dopri, 2e-3, 1e-2), (x_heun, 4e-3, 2e-2), (x_euler, 1e-2, 5e-2)]:
        err = (x - reference).abs()
        assert err.mean() < mean_tol and err.quantile(0.99) < q99_tol, (err.mean(), err.quantile(0.99))
    assert 20 < nfe < 2000


def test_dopri5_accuracy_and_heun_order_on_known_odes():
    # dx/dt = -2 t x + cos(t): exact solution x(t) = exp(-t^2) (x0 + int_0^t exp(s^2) cos(s) ds); use a quadrature
    # independent of the solvers for the integral.
    def fn(x, t):
        return -2 * t[:, None] * x + torch.cos(t)[:, None]

    x0 = torch.tensor([[1.0], [-0.5], [3.0]], dtype=torch.float64)
    s = torch.linspace(0, 1, 200001, dtype=torch.float64)
    integral = torch.trapezoid(torch.exp(s**2) * torch.cos(s), s)
    exact = math.exp(-1.0) * (x0 + integral)
    x, nfe = dopri5(fn, x0, atol=1e-10, rtol=1e-10)
    assert (x - exact).abs().max() < 1e-8 and nfe < 2000
    x_loose, nfe_loose = dopri5(fn, x0, atol=1e-4, rtol=1e-4)
    assert (x_loose - exact).abs().max() < 1e-3 and nfe_loose < nfe
    errors = [(heun(fn, x0, time_grid(n, dtype=torch.float64)) - exact).abs().max().item() for n in (16, 32)]
    assert 3.5 < errors[0] / errors[1] < 4.5  # second order
    errors = [(euler(fn, x0, time_grid(n, dtype=torch.float64)) - exact).abs().max().item() for n in (64, 128)]
    assert 1.8 < errors[0] / errors[1] < 2.2  # first order


def test_sde_with_zero_diffusion_equals_the_ode():
    path = build_path("linear")
    fn = mixture_velocity(path)
    x0 = noise(256)
    grid = time_grid(40, dtype=torch.float64)
    ode = euler(fn, x0, grid)
    sde = euler_maruyama(fn, x0, path, grid, diffusion="constant", diffusion_norm=0.0, last_step=None,
                         generator=torch.Generator().manual_seed(3))
    assert torch.equal(ode, sde)
    # With a last step, 'euler' and 'mean' coincide at zero diffusion and equal the ODE on the full grid.
    cfg = SamplerConfig(method="sde", steps=40, diffusion="constant", diffusion_norm=0.0, last_step="mean",
                        last_step_size=0.025)
    x, nfe = sample(fn, x0, path, cfg)
    full = torch.cat([time_grid(40, 0.0, 0.975, dtype=torch.float64), torch.ones(1, dtype=torch.float64)])
    assert torch.allclose(x, euler(fn, x0, full), atol=1e-12) and nfe == 41


@pytest.mark.parametrize("diffusion,last_step,t_start", [("sigma", "mean", 0.0), ("SBDM", "tweedie", 1e-3)])
def test_sde_lands_on_the_mixture(diffusion, last_step, t_start):
    path = build_path("linear")
    cfg = SamplerConfig(method="sde", steps=250, diffusion=diffusion, last_step=last_step, t_start=t_start)
    x, _ = sample(mixture_velocity(path), noise(), path, cfg, generator=torch.Generator().manual_seed(1))
    check_mixture(x)


def test_sde_is_deterministic_for_a_seed():
    path = build_path("cosine")
    cfg = SamplerConfig(method="sde", steps=20)
    fn = mixture_velocity(path)
    runs = [sample(fn, noise(64), path, cfg, generator=torch.Generator().manual_seed(s))[0] for s in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])


def test_diffusion_forms_against_formulas():
    t = torch.linspace(0.05, 0.95, 9, dtype=torch.float64)
    lin, cos = build_path("linear"), build_path("cosine")
    assert torch.allclose(diffusion_coefficient(lin, t, "SBDM", 2.0), 2.0 * (1 - t) / t)
    # cosine path: alpha'/alpha sigma^2 - sigma sigma' = (pi/2) (cos^2/tan + cos sin) = (pi/2) cos / sin
    half = 0.5 * math.pi * t
    assert torch.allclose(diffusion_coefficient(cos, t, "SBDM"), 0.5 * math.pi * torch.cos(half) / torch.sin(half))
    assert torch.allclose(diffusion_coefficient(cos, t, "sigma", 0.5), 0.5 * torch.cos(half))
    assert torch.allclose(diffusion_coefficient(lin, t, "increasing-decreasing"), torch.sin(math.pi * t) ** 2)
    assert torch.allclose(diffusion_coefficient(lin, t, "decreasing"), 0.25 * (torch.cos(math.pi * t) + 1) ** 2)
    with pytest.raises(ValueError, match="unknown diffusion form"):
        diffusion_coefficient(lin, t, "vp")


def test_time_grid_and_config_errors():
    g = time_grid(10, dtype=torch.float64)
    assert torch.allclose(g, torch.linspace(0, 1, 11, dtype=torch.float64))
    g = time_grid(10, 0.0, 1.0, shift=3.0, dtype=torch.float64)
    n = 1 - torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.allclose(g, 1 - 3 * n / (1 + 2 * n)) and g[0] == 0 and g[-1] == 1
    assert (g.diff() > 0).all() and g.diff()[0] < g.diff()[-1]  # shift > 1: finer steps near the noise end
    with pytest.raises(ValueError, match="SBDM"):
        SamplerConfig(method="sde", diffusion="SBDM")
    with pytest.raises(ValueError, match="cfg_interval"):
        SamplerConfig(cfg_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="steps"):
        SamplerConfig(steps=0)
    with pytest.raises(ValueError, match="t_start"):
        SamplerConfig(method="sde", t_start=0.97)


class TinyClassModel(nn.Module):
    """A small conditional velocity model with SiT's calling convention (null label = num_classes)."""

    cond_kind = "class"

    def __init__(self, num_classes=3, dim=4):
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes + 1, dim)
        self.net = nn.Sequential(nn.Linear(2 * dim + 1, 32), nn.GELU(), nn.Linear(32, dim))

    def forward(self, x, t, cond, drop=None):
        if drop is not None:
            cond = torch.where(drop, torch.full_like(cond, self.num_classes), cond)
        return self.net(torch.cat([x, self.embed(cond), t[:, None].to(x.dtype)], dim=1))

    def forward_with_cfg(self, x, t, cond, scale, drop=None):
        both = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, torch.full_like(cond, 3)]))
        c, u = both.chunk(2)
        scale = torch.as_tensor(scale, dtype=c.dtype, device=c.device).reshape(-1, 1)
        return u + scale * (c - u)


def test_guidance_scale_one_and_interval():
    torch.manual_seed(0)
    model = TinyClassModel().eval()
    x, cond = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    t = torch.tensor([0.1, 0.2, 0.5, 0.6, 0.9, 1.0])
    with torch.no_grad():
        c = model(x, t, cond)
        u = model(x, t, torch.full_like(cond, 3))
        assert torch.equal(guided_velocity(model, cond, 1.0)(x, t), c)
        v = guided_velocity(model, cond, 4.0, (0.3, 0.9))(x, t)
        inside = ((t >= 0.3) & (t <= 0.9))[:, None]
        expected = torch.where(inside, u + 4.0 * (c - u), c)
        assert torch.allclose(v, expected, atol=1e-6)
        assert not torch.allclose(v, c)  # guidance changed the rows inside the interval
        # Whole sampler with scale 1 equals sampling the conditional model.
        cfg = SamplerConfig(method="heun", steps=8)
        path = build_path("linear")
        a, _ = sample(guided_velocity(model, cond, 1.0), x, path, cfg)
        b, _ = sample(lambda y, s: model(y, s, cond), x, path, cfg)
        assert torch.equal(a, b)


def test_bf16_autocast_returns_float32_close_to_fp32():
    torch.manual_seed(0)
    model = TinyClassModel().eval()
    x, cond = torch.randn(16, 4), torch.arange(16) % 3
    cfg = SamplerConfig(method="euler", steps=10, cfg_scale=2.0)
    path = build_path("linear")
    out = {}
    for precision in ("fp32", "bf16"):
        fn = guided_velocity(model, cond, cfg.cfg_scale, cfg.cfg_interval, precision)
        assert fn(x, torch.full((16,), 0.5)).dtype == torch.float32
        out[precision], _ = sample(fn, x, path, cfg)
    assert out["bf16"].dtype == torch.float32
    assert (out["bf16"] - out["fp32"]).abs().max() < 5e-2 and not torch.equal(out["bf16"], out["fp32"])


def test_guidance_interval_with_the_real_sit():
    from pafm.models import build_model

    torch.manual_seed(0)
    model = build_model("SiT-T/2", input_size=8, in_channels=1, num_classes=10, depth=1, hidden_size=32,
                        num_heads=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # adaLN-Zero starts at zero output
        x, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4])
        t = torch.tensor([0.1, 0.4, 0.6, 0.95])
        c, u = model(x, t, y), model(x, t, torch.full_like(y, 10))
        inside = ((t >= 0.3) & (t <= 0.9))[:, None, None, None]
        v = guided_velocity(model, y, 3.0, (0.3, 0.9))(x, t)
        assert torch.allclose(v, torch.where(inside, u + 3.0 * (c - u), c), atol=1e-6)
        assert torch.equal(guided_velocity(model, y, 1.0)(x, t), c)
