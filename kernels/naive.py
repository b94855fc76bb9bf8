"""PyTorch reference for the posterior-velocity op: the oracle for the Triton kernels and the CPU backend.

It evaluates the formula literally, with the direct squared distance ||z_i - alpha_i x_j||^2 rather than the GEMM
expansion (the expansion cancels catastrophically as sigma -> 0). Memory stays bounded: distances are formed for a
tile of rows x candidates whose element count is capped by `chunk_elems`, and the weighted sum walks the pool in
chunks of candidates, so the peak extra memory is O(B*K + chunk_elems) and no B x K x D tensor ever exists.
Accumulation is float32 (float64 when the inputs are float64, which the tests use as an oracle).
"""
from __future__ import annotations

import torch


def default_chunk_elems(device: torch.device) -> int:
    # 16 MiB of fp32 temporaries on the CPU, 256 MiB on a GPU (fewer, larger launches).
    return 1 << 26 if device.type == "cuda" else 1 << 22


def posterior_velocity_reference(z, pool, alpha, sigma, d_alpha, d_sigma, temperature, *, row_labels=None,
                                 pool_labels=None, log_prior=None, endpoint=None, noise=None, chunk_elems=None):
    """Reference posterior velocity on already-validated inputs.

    z (B, D); pool (K, D) shared or (B, K, D) per row; alpha, sigma, d_alpha, d_sigma, temperature (B,);
    row_labels (B,) with pool_labels (K,) or (B, K); log_prior (B, K); endpoint, noise (B, D).
    Returns (velocity (B, D), lse (B,), ess (B,)) in float32, or float64 for float64 inputs.
    """
    ct = torch.float64 if z.dtype == torch.float64 else torch.float32
    B, D = z.shape
    shared = pool.dim() == 2
    K = pool.shape[-2]
    chunk_elems = chunk_elems or default_chunk_elems(z.device)
    k_chunk = max(1, min(K, chunk_elems // D))
    r_chunk = max(1, min(B, chunk_elems // (k_chunk * D)))

    zc = z.to(ct)
    a = alpha.to(ct)
    scale = 1.0 / (2.0 * sigma.to(ct) ** 2 * temperature.to(ct))

    # Logits: the full -||z - a x||^2 / (2 sigma^2 tau), so the logsumexp is the contract's lse as is.
    logits = torch.empty(B, K, dtype=ct, device=z.device)
    for k0 in range(0, K, k_chunk):
        k1 = min(K, k0 + k_chunk)
        xk = pool[k0:k1].to(ct) if shared else None
        for r0 in range(0, B, r_chunk):
            r1 = min(B, r0 + r_chunk)
            x = xk[None] if shared else pool[r0:r1, k0:k1].to(ct)
            diff = zc[r0:r1, None, :] - a[r0:r1, None, None] * x
            logits[r0:r1, k0:k1] = diff.square_().sum(-1) * -scale[r0:r1, None]
    if log_prior is not None:
        logits += log_prior.to(ct)
    if row_labels is not None:
        pl = pool_labels if pool_labels.dim() == 2 else pool_labels[None, :]
        admissible = (row_labels[:, None] < 0) | (pl == row_labels[:, None])
        logits.masked_fill_(~admissible, float("-inf"))

    lse = torch.logsumexp(logits, dim=1)  # -inf for a row with no admissible candidate
    w = torch.exp(logits - lse[:, None])  # NaN on such a row, which makes its velocity NaN as documented
    ess = torch.where(torch.isneginf(lse), torch.zeros_like(lse), 1.0 / (w * w).sum(1))

    mu = torch.zeros(B, D, dtype=ct, device=z.device)
    for k0 in range(0, K, k_chunk):
        k1 = min(K, k0 + k_chunk)
        if shared:
            mu += w[:, k0:k1] @ pool[k0:k1].to(ct)
        else:
            for r0 in range(0, B, r_chunk):
                r1 = min(B, r0 + r_chunk)
                mu[r0:r1] += torch.bmm(w[r0:r1, None, k0:k1], pool[r0:r1, k0:k1].to(ct))[:, 0]

    da, ds, s = d_alpha.to(ct)[:, None], d_sigma.to(ct)[:, None], sigma.to(ct)[:, None]
    if endpoint is not None:
        # Residual form: u + (d_alpha - d_sigma alpha / sigma)(mu - x_own); stays accurate as sigma -> 0.
        x_own = endpoint.to(ct)
        u = da * x_own + ds * noise.to(ct)
        velocity = u + (da - ds * a[:, None] / s) * (mu - x_own)
    else:
        velocity = da * mu + ds * (zc - a[:, None] * mu) / s
    return velocity, lse, ess
