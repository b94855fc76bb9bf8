"""The obviously-correct posterior velocity: every B x K x D difference in float64, the formulas as written.

Memory grows like B K D, so it is for checking the kernels and the reference at test sizes, never for training.
"""
import torch


def posterior_velocity_naive(z, pool, alpha, sigma, d_alpha, d_sigma, *, row_labels=None, pool_labels=None,
                             log_prior=None, temperature=1.0, endpoint=None, noise=None, endpoint_index=None,
                             pool_index=None):
    """Same arguments as `pafm_kernels.posterior_velocity` (endpoint_index, a hint for the kernels, is not needed);
    returns float64 (velocity (B, *S), lse (B,), ess (B,))."""
    f = lambda t: t.detach().to(torch.float64)  # noqa: E731
    B = z.shape[0]
    if pool_index is not None:
        pool = pool[pool_index]
    zf = f(z).reshape(B, -1)
    shared = pool.dim() == z.dim()
    X = f(pool).reshape(pool.shape[0], -1)[None] if shared else f(pool).reshape(B, pool.shape[1], -1)
    X = X.expand(B, -1, -1)
    a, s, da, ds = f(alpha), f(sigma), f(d_alpha), f(d_sigma)
    tau = f(temperature) if isinstance(temperature, torch.Tensor) else torch.full_like(a, temperature)
    logits = -((zf[:, None, :] - a[:, None, None] * X) ** 2).sum(-1) / (2 * s[:, None] ** 2 * tau[:, None])
    if log_prior is not None:
        logits = logits + f(log_prior)
    if row_labels is not None:
        pl = pool_labels if pool_labels.dim() == 2 else pool_labels[None].expand(B, -1)
        logits = logits.masked_fill(~((row_labels[:, None] < 0) | (pl == row_labels[:, None])), float("-inf"))
    lse = torch.logsumexp(logits, 1)
    w = torch.softmax(logits, 1)
    mu = torch.einsum("bk,bkd->bd", w, X)
    if endpoint is not None:
        x_own = f(endpoint).reshape(B, -1)
        u = da[:, None] * x_own + ds[:, None] * f(noise).reshape(B, -1)
        v = u + (da - ds * a / s)[:, None] * (mu - x_own)
    else:
        v = da[:, None] * mu + ds[:, None] * (zf - a[:, None] * mu) / s[:, None]
    return v.reshape(z.shape), lse, 1.0 / (w * w).sum(1)
