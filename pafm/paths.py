"""Probability paths and time samplers.

Convention (SiT's): data at t = 1, noise at t = 0.  z_t = alpha_t * x + sigma_t * eps, and the conditional velocity
target is u = d_alpha_t * x + d_sigma_t * eps.  Everything downstream (objectives, samplers, the posterior op) is
written in terms of (alpha, sigma, d_alpha, d_sigma), so this file is the only place that knows the direction.
"""
from __future__ import annotations

import math

import torch


def expand_rows(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) so that it broadcasts against a (B, *S) tensor."""
    return coef.reshape(coef.shape + (1,) * (like.dim() - coef.dim()))


class Path:
    """A Gaussian probability path between noise (t = 0) and data (t = 1)."""

    name = "path"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def coefficients(self, t: torch.Tensor):
        """(alpha, sigma, d_alpha, d_sigma), each shaped like t."""
        return self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t)

    def interpolate(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t for a batch: x, noise (B, *S), t (B,)."""
        return expand_rows(self.alpha(t), x) * x + expand_rows(self.sigma(t), x) * noise

    def velocity(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The conditional (FM) target u = alpha' x + sigma' eps."""
        return expand_rows(self.d_alpha(t), x) * x + expand_rows(self.d_sigma(t), x) * noise

    def velocity_to_score(self, v: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Score of p_t(z) from the marginal velocity: (alpha v - alpha' z) / (sigma (alpha' sigma - alpha sigma')).

        Written so that it stays finite at the noise end (alpha = 0); it diverges only where sigma = 0 (pure data).
        """
        a, s, da, ds = (expand_rows(c, z) for c in self.coefficients(t))
        return (a * v - da * z) / (s * (da * s - a * ds))

    def velocity_to_data(self, v: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The implied E[x | z_t]: (sigma v - sigma' z) / (alpha' sigma - alpha sigma')."""
        a, s, da, ds = (expand_rows(c, z) for c in self.coefficients(t))
        return (s * v - ds * z) / (da * s - a * ds)


class LinearPath(Path):
    """alpha_t = t, sigma_t = 1 - t (rectified flow / SiT "Linear"): u = x - eps."""

    name = "linear"

    def alpha(self, t):
        return t

    def sigma(self, t):
        return 1.0 - t

    def d_alpha(self, t):
        return torch.ones_like(t)

    def d_sigma(self, t):
        return -torch.ones_like(t)


class CosinePath(Path):
    """alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2) (SiT "GVP": alpha^2 + sigma^2 = 1)."""

    name = "cosine"

    def alpha(self, t):
        return torch.sin(0.5 * math.pi * t)

    def sigma(self, t):
        return torch.cos(0.5 * math.pi * t)

    def d_alpha(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def d_sigma(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


PATHS = {"linear": LinearPath, "cosine": CosinePath}


def build_path(name: str) -> Path:
    if name not in PATHS:
        raise ValueError(f"unknown path {name!r}; valid: {sorted(PATHS)}")
    return PATHS[name]()


class TimeSampler:
    """Training-time distribution of t in [0, 1].

    uniform: t ~ U(eps, 1 - eps).  logit_normal: t = sigmoid(mean + std * n) (SD3), a density that favours the
    middle of the path.  `eps` keeps t away from the exact endpoints, where sigma = 0 makes some quantities singular.
    """

    def __init__(self, kind: str = "uniform", mean: float = 0.0, std: float = 1.0, eps: float = 1e-5):
        if kind not in ("uniform", "logit_normal"):
            raise ValueError(f"unknown time sampler {kind!r}; valid: ['logit_normal', 'uniform']")
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"time sampler eps must be in [0, 0.5), got {eps}")
        self.kind, self.mean, self.std, self.eps = kind, mean, std, eps

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        if self.kind == "uniform":
            t = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
        else:
            t = torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, device=device))
        return t.clamp(self.eps, 1.0 - self.eps)
