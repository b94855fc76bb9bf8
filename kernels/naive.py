"""PyTorch reference for the posterior-velocity op: the oracle for the Triton kernels and the CPU backend.

It evaluates the formula literally, with the direct squared distance ||z_i - alpha_i x_j||^2 rather than the GEMM
expansion (the expansion cancels catastrophically as sigma -> 0). Memory stays bounded: distances are formed for a
tile of rows x candidates whose element count is capped by `chunk_elems`, and the weighted sum walks the pool in
chunks of candidates, so the peak extra memory is O(B*K + chunk_elems) and no B x K x D tensor ever exists.
Distances and the softmax run in float64 (B x K logits, chunk-sized temporaries); the weighted sum accumulates in
float32 (float64 for float64 inputs, which the tests use as an oracle).
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
    # Distances and softmax in float64: near sigma -> 0, z - a x_j cancels to O(sigma) and an fp32 product a x_j
    # would put eps / sigma relative error into it (the kernels get the same exactness from a fused multiply-add).
    f64 = torch.float64
    z64, a64 = z.to(f64), alpha.to(f64)
    scale = 1.0 / (2.0 * sigma.to(f64) ** 2 * temperature.to(f64))

    # Logits: the full -||z - a x||^2 / (2 sigma^2 tau), so the logsumexp is the contract's lse as is.
    logits = torch.empty(B, K, dtype=f64, device=z.device)
    for k0 in range(0, K, k_chunk):
        k1 = min(K, k0 + k_chunk)
        xk = pool[k0:k1].to(f64) if shared else None
        for r0 in range(0, B, r_chunk):
            r1 = min(B, r0 + r_chunk)
            x = xk[None] if shared else pool[r0:r1, k0:k1].to(f64)
            diff = z64[r0:r1, None, :] - a64[r0:r1, None, None] * x
            logits[r0:r1, k0:k1] = diff.square_().sum(-1) * -scale[r0:r1, None]
    if log_prior is not None:
        logits += log_prior.to(f64)
    if row_labels is not None:
        pl = pool_labels if pool_labels.dim() == 2 else pool_labels[None, :]
        admissible = (row_labels[:, None] < 0) | (pl == row_labels[:, None])
        logits.masked_fill_(~admissible, float("-inf"))

    lse = torch.logsumexp(logits, dim=1)  # -inf for a row with no admissible candidate
    w = torch.exp(logits - lse[:, None])  # NaN on such a row, which makes its velocity NaN as documented
    ess = torch.where(torch.isneginf(lse), torch.zeros_like(lse), 1.0 / (w * w).sum(1))
    lse, w = lse.to(ct), w.to(ct)
    ess = ess.to(ct)

    # mu, or for per-row pools in the residual form directly mu - x_own = sum_j w_j (x_j - x_own), which avoids
    # the cancellation of mu - x_own (multiplied by ~1/sigma) when all candidates sit near the row's endpoint.
    centre = endpoint.to(ct) if (endpoint is not None and not shared) else None
    mu = torch.zeros(B, D, dtype=ct, device=z.device)
    for k0 in range(0, K, k_chunk):
        k1 = min(K, k0 + k_chunk)
        if shared:
            mu += w[:, k0:k1] @ pool[k0:k1].to(ct)
        else:
            for r0 in range(0, B, r_chunk):
                r1 = min(B, r0 + r_chunk)
                x = pool[r0:r1, k0:k1].to(ct)
                if centre is not None:
                    x = x - centre[r0:r1, None]
                mu[r0:r1] += torch.bmm(w[r0:r1, None, k0:k1], x)[:, 0]

    da, ds, s = d_alpha.to(ct)[:, None], d_sigma.to(ct)[:, None], sigma.to(ct)[:, None]
    if endpoint is not None:
        # Residual form: u + (d_alpha - d_sigma alpha / sigma)(mu - x_own); stays accurate as sigma -> 0.
        x_own = endpoint.to(ct)
        u = da * x_own + ds * noise.to(ct)
        delta = mu if centre is not None else mu - x_own
        velocity = u + (da - ds * a[:, None] / s) * delta
    else:
        velocity = da * mu + ds * (zc - a[:, None] * mu) / s
    return velocity, lse, ess
