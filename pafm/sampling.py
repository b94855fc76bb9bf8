"""Samplers for a learned velocity field: Euler, Heun, adaptive Dormand-Prince (dopri5) and an Euler-Maruyama SDE.

Convention (see pafm/paths.py): noise at t = 0, data at t = 1; every sampler integrates dx/dt = v(x, t) from
x ~ N(0, I) at t = 0 towards t = 1.  A velocity function is `fn(x, t) -> v` with x (B, *S) and t (B,); the sampler
state is float32 (or float64 if the noise is), whatever precision the model runs in.

The SDE follows SiT's reverse-time family: dx = [v + w(t) s(x, t)] dt + sqrt(2 w(t)) dW, with s the score implied by
the velocity (path.velocity_to_score) and w(t) one of SiT's diffusion forms.  w = 0 gives back the ODE.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Literal, Optional

import torch

from pafm.config import Relation, at_least, check_section, ordered_within, section, setting, within
from pafm.paths import Path, expand_rows

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

DIFFUSIONS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = ("mean", "tweedie", "euler")
# Classifier-free guidance scales: 1 is none, 0 the unconditional model; beyond 100 a grid only saturates.
GUIDANCE_SCALE = within(0, 100, "1: no guidance")
MAX_STEPS = 100_000  # SiT's FID protocol takes 250


@section("sampler")
class SamplerConfig:
    """How to draw samples; the `sampler:` section of the eval config.

    steps: ODE steps (Euler: `steps` evaluations, Heun: 2 * steps) or Euler-Maruyama steps (plus one last step).
    shift: time-grid shift (SD3's, applied to the noise level 1 - t): > 1 puts more steps near the noise end.
    cfg_scale / cfg_interval: classifier-free guidance with scale s inside [lo, hi] in THIS project's t (noise at 0);
    outside it the plain conditional model is used.  REPA's interval [0, 0.7] (noise at t = 1) is [0.3, 1.0] here.
    cfg_channels: null guides every channel; 3 guides only the first 3 latent channels (the others stay
    conditional), the compatibility switch for SiT's and DiT's code, which do that.
    SiT's and REPA's SDE with num_steps = N (250 for their FID-50K) is method sde, steps N - 1 here: N - 1
    Euler-Maruyama steps over [0, 1 - last_step_size] plus the last step, N model evaluations.
    diffusion, diffusion_norm, last_step, last_step_size, t_start: the SDE (SiT's names; 'SBDM' is infinite at t = 0,
    so it needs t_start > 0).  atol, rtol: dopri5 tolerances (SiT's defaults).  precision: bf16 runs the model under
    autocast; the sampler state stays float32.
    """

    method: Literal["euler", "heun", "dopri5", "sde"] = "heun"
    steps: int = setting(50, within(1, MAX_STEPS))
    shift: float = setting(1.0, within(0, 100, open_lo=True))
    t_start: float = setting(0.0, within(0, 1, open_hi=True))
    cfg_scale: float = setting(1.0, GUIDANCE_SCALE)
    cfg_interval: tuple[float, float] = setting((0.0, 1.0), ordered_within(0, 1))
    cfg_channels: Optional[int] = setting(None, at_least(1, "null: every channel"))
    atol: float = setting(1e-6, within(0, 1, open_lo=True))
    rtol: float = setting(1e-3, within(0, 1, open_lo=True))
    diffusion: Literal["constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing"] = "sigma"
    diffusion_norm: float = setting(1.0, within(0, 100, "0 gives back the ODE"))
    last_step: Optional[Literal["mean", "tweedie", "euler"]] = "mean"
    last_step_size: float = setting(0.04, within(0, 1, open_hi=True))
    precision: Literal["fp32", "bf16"] = "fp32"

    RELATIONS = (
        Relation("last_step_size", lambda s: s.last_step is None or s.last_step_size > 0,
                 "> 0 with a last step (sampler.last_step={last_step})"),
        Relation("t_start", lambda s: s.t_start < 1.0 - s.last_step_size or s.method != "sde" or s.last_step is None,
                 "< 1 - sampler.last_step_size={last_step_size}, where the SDE's last step starts"),
        Relation("t_start", lambda s: s.t_start > 0 or s.method != "sde" or s.diffusion != "SBDM",
                 "> 0 with diffusion 'SBDM', which is infinite at t = 0 (noise end); for example 0.001"),
    )

    def describe(self) -> str:
        """A short human-readable label, e.g. 'heun-50' or 'sde-250 (sigma, mean)'."""
        if self.method == "dopri5":
            name = f"dopri5 (atol {self.atol:g}, rtol {self.rtol:g})"
        elif self.method == "sde":
            name = f"sde-{self.steps} ({self.diffusion}, last step {self.last_step})"
        else:
            name = f"{self.method}-{self.steps}"
        name += f", shift {self.shift:g}" if self.shift != 1.0 else ""
        return name + (f", cfg on {self.cfg_channels} channels" if self.cfg_channels is not None else "")


def time_grid(steps: int, t_start: float = 0.0, t_end: float = 1.0, shift: float = 1.0,
              device=None, dtype=torch.float32) -> torch.Tensor:
    """steps + 1 increasing times from t_start to t_end (float64 math, then `dtype`).

    shift s maps the noise level n = 1 - t to s n / (1 + (s - 1) n) (SD3's shift, written for data at t = 1); s = 1 is a
    uniform grid.  The endpoints are kept exactly.
    """
    if steps < 1:
        raise ValueError(f"time_grid: steps must be >= 1, got {steps}")
    if not 0.0 <= t_start < t_end <= 1.0:
        raise ValueError(f"time_grid: need 0 <= t_start < t_end <= 1, got {t_start}, {t_end}")
    if not shift > 0:
        raise ValueError(f"time_grid: shift must be > 0, got {shift}")
    t = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    if shift != 1.0:
        n = 1.0 - t
        t = 1.0 - shift * n / (1.0 + (shift - 1.0) * n)
        t[0], t[-1] = t_start, t_end
    return t.to(device=device, dtype=dtype)


def _times(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)


@torch.no_grad()
def euler(fn: VelocityFn, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Explicit Euler along `grid` (len(grid) - 1 evaluations)."""
    for i in range(len(grid) - 1):
        t, h = grid[i].item(), (grid[i + 1] - grid[i]).item()
        x = x + h * fn(x, _times(t, x))
    return x


@torch.no_grad()
def heun(fn: VelocityFn, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Heun's second-order method (explicit trapezoid) along `grid`: 2 evaluations per step."""
    for i in range(len(grid) - 1):
        t0, t1 = grid[i].item(), grid[i + 1].item()
        h = t1 - t0
        v0 = fn(x, _times(t0, x))
        v1 = fn(x + h * v0, _times(t1, x))
        x = x + 0.5 * h * (v0 + v1)
    return x


# Dormand-Prince 5(4) tableau (Dormand & Prince 1980).  The 7th stage is evaluated at the new point, so its velocity
# is reused as the first stage of the next step (first same as last).
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_DP_E = tuple(b5 - b4 for b5, b4 in zip(_DP_B5, _DP_B4))


def _rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


@torch.no_grad()
def dopri5(fn: VelocityFn, x: torch.Tensor, t_start: float = 0.0, t_end: float = 1.0, atol: float = 1e-6,
           rtol: float = 1e-3, max_steps: int = 10000) -> tuple[torch.Tensor, int]:
    """Adaptive Dormand-Prince 5(4) from t_start to t_end; returns (x, number of velocity evaluations).

    One step size for the whole batch, chosen from the RMS over the batch of the local error scaled by
    atol + rtol * |x| (as torchdiffeq does).  Raises RuntimeError after `max_steps` steps.
    """
    nfe = 0

    def f(y, t):
        nonlocal nfe
        nfe += 1
        return fn(y, _times(t, y))

    span = t_end - t_start
    k1 = f(x, t_start)
    # Initial step (Hairer, Norsett & Wanner, "Solving ODEs I", II.4): make the first Euler step's change small
    # relative to the tolerance, then bound it by a second-derivative estimate.
    scale = atol + rtol * x.abs()
    d0, d1 = _rms(x / scale), _rms(k1 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, span)
    k_probe = f(x + h0 * k1, t_start + h0)
    d2 = _rms((k_probe - k1) / scale) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    h = min(100 * h0, h1, span)

    t = t_start
    for _ in range(max_steps):
        if t >= t_end - 1e-12 * abs(span):
            return x, nfe
        h = min(h, t_end - t)
        ks = [k1]
        for stage in range(1, 7):
            y = x + h * sum(a * k for a, k in zip(_DP_A[stage], ks) if a != 0.0)
            ks.append(f(y, t + _DP_C[stage] * h))
        x_new = y  # the 7th stage point is the 5th-order solution
        err = h * sum(e * k for e, k in zip(_DP_E, ks) if e != 0.0)
        err_norm = _rms(err / (atol + rtol * torch.maximum(x.abs(), x_new.abs())))
        if not math.isfinite(err_norm):
            raise RuntimeError(f"dopri5: non-finite error estimate at t = {t:.6g} (the velocity returned NaN/Inf?)")
        if err_norm <= 1.0:
            t, x, k1 = t + h, x_new, ks[6]
        factor = 10.0 if err_norm == 0 else min(10.0, max(0.2, 0.9 * err_norm ** (-1 / 5)))
        h = h * factor
    raise RuntimeError(f"dopri5: did not reach t = {t_end} within {max_steps} steps (stopped at t = {t:.6g})")


def diffusion_coefficient(path: Path, t: torch.Tensor, form: str, norm: float = 1.0) -> torch.Tensor:
    """w(t) of the SDE dx = [v + w s] dt + sqrt(2 w) dW, for SiT's diffusion forms.

    'SBDM' is the diffusion of the score-based (VP-like) SDE of the path: w = alpha'/alpha sigma^2 - sigma sigma'.
    """
    a, s, da, ds = path.coefficients(t)
    if form == "constant":
        return torch.full_like(t, norm)
    if form == "SBDM":
        return norm * (da / a * s**2 - s * ds)
    if form == "sigma":
        return norm * s
    if form == "linear":
        return norm * (1.0 - t)
    if form == "decreasing":
        return 0.25 * (norm * torch.cos(math.pi * t) + 1.0) ** 2
    if form == "increasing-decreasing":
        return norm * torch.sin(math.pi * t) ** 2
    raise ValueError(f"unknown diffusion form {form!r}; valid: {list(DIFFUSIONS)}")


@torch.no_grad()
def euler_maruyama(fn: VelocityFn, x: torch.Tensor, path: Path, grid: torch.Tensor, *, diffusion: str = "sigma",
                   diffusion_norm: float = 1.0, last_step: str | None = "mean",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Euler-Maruyama along `grid`, then (if `last_step`) one noiseless step from grid[-1] to t = 1.

    last_step: 'mean' (drift of the SDE, no noise), 'euler' (the ODE velocity), 'tweedie' (jump to E[x | z_t]).
    """
    for i in range(len(grid) - 1):
        t, h = grid[i].item(), (grid[i + 1] - grid[i]).item()
        tt = _times(t, x)
        v = fn(x, tt)
        w = diffusion_coefficient(path, tt, diffusion, diffusion_norm)
        if not torch.isfinite(w).all():
            raise ValueError(f"diffusion {diffusion!r} is not finite at t = {t:g}; start the SDE later (t_start > 0)")
        if not bool(w.any()):
            x = x + h * v  # w = 0 is the ODE: skip the score (not needed, and 0/0 where sigma = 0)
            continue
        w = expand_rows(w, x)
        drift = v + w * path.velocity_to_score(v, x, tt)
        noise = torch.randn(x.shape, generator=generator, device=_gen_device(generator, x), dtype=x.dtype)
        x = x + h * drift + torch.sqrt(2.0 * w * h) * noise.to(x.device)
    if last_step is not None:
        t, h = grid[-1].item(), 1.0 - grid[-1].item()
        tt = _times(t, x)
        v = fn(x, tt)
        if last_step == "euler":
            x = x + h * v
        elif last_step == "mean":
            w = diffusion_coefficient(path, tt, diffusion, diffusion_norm)
            drift = v + expand_rows(w, x) * path.velocity_to_score(v, x, tt) if bool(w.any()) else v
            x = x + h * drift
        elif last_step == "tweedie":
            x = path.velocity_to_data(v, x, tt)
        else:
            raise ValueError(f"unknown last_step {last_step!r}; valid: {list(LAST_STEPS)} or None")
    return x


def _gen_device(generator, x):
    return generator.device if generator is not None else x.device


def guided_velocity(model, cond, cfg_scale: float = 1.0, cfg_interval=(0.0, 1.0),
                    precision: str = "fp32", cfg_channels: int | None = None) -> VelocityFn:
    """The velocity function of a model for fixed conditions, with classifier-free guidance inside `cfg_interval`.

    Rows whose t lies outside the interval get scale 1, i.e. the plain conditional model; when no row is inside, or
    the scale is 1, the conditional forward alone is run (half the cost).  cfg_channels n guides only the first n
    channels.  precision 'bf16' wraps the model call in autocast; the returned velocity is always float32 (the
    sampler's dtype).
    """
    lo, hi = cfg_interval
    channels = {} if cfg_channels is None else {"channels": cfg_channels}

    def fn(x, t):
        ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with ctx:
            inside = (t >= lo) & (t <= hi)
            if cfg_scale == 1.0 or not bool(inside.any()):
                v = model(x, t, cond)
            else:
                scale = torch.where(inside, torch.full_like(t, cfg_scale), torch.ones_like(t))
                v = model.forward_with_cfg(x, t, cond, scale, **channels)
        return v.to(x.dtype)

    return fn


def sample(fn: VelocityFn, noise: torch.Tensor, path: Path, cfg: SamplerConfig,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """Integrate from `noise` (t = 0) to t = 1 with the sampler in `cfg`; returns (samples, velocity evaluations).

    `generator` drives the SDE's noise (the ODE samplers are deterministic given `noise`).
    """
    check_section(cfg)  # the fields may have changed since it was built
    x = noise if noise.dtype in (torch.float32, torch.float64) else noise.float()
    calls = 0

    def counted(y, t):
        nonlocal calls
        calls += 1
        return fn(y, t)

    if cfg.method == "dopri5":
        return dopri5(counted, x, cfg.t_start, 1.0, atol=cfg.atol, rtol=cfg.rtol)
    if cfg.method == "sde":
        t_end = 1.0 - cfg.last_step_size if cfg.last_step is not None else 1.0
        grid = time_grid(cfg.steps, cfg.t_start, t_end, cfg.shift, device=x.device, dtype=torch.float64)
        x = euler_maruyama(counted, x, path, grid, diffusion=cfg.diffusion, diffusion_norm=cfg.diffusion_norm,
                           last_step=cfg.last_step, generator=generator)
        return x, calls
    grid = time_grid(cfg.steps, cfg.t_start, 1.0, cfg.shift, device=x.device, dtype=torch.float64)
    x = (euler if cfg.method == "euler" else heun)(counted, x, grid)
    return x, calls
