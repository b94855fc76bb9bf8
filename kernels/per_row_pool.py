"""Fused Triton kernel for per-row candidate pools (B, K, D): neighbours and VAE re-samples.

There is no reuse across rows, so this is a memory-bound batched GEMV: one program per row.
Pass 1 walks the row's candidates once, forms the direct fp32 distance ||z - a x_j||^2 over D chunks (as cheap as
the expansion here and the most accurate), writes the B x K logits and keeps per-lane online-softmax statistics
(max, sum exp, sum exp^2). Pass 2 forms mu = sum_j exp(l_j - lse) x_j one D chunk at a time and writes the velocity.
Pass 2 re-reads the row's K x D candidates, which pass 1 just brought into L2 (128 KiB for K = 16, D = 4096 bf16),
so HBM sees them about once while the rows in flight fit in L2. Extra memory: the B x K logits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import INTERPRET, KernelInputs, load_row_coefficients, size_bucket


@triton.jit
def _per_row_kernel(Z, X, POOL_INDEX, ALPHA, SIGMA, TAU, tau_value, D_ALPHA, D_SIGMA, ROW_LAB, POOL_LAB, LOG_PRIOR,
                    ENDPOINT, NOISE, ACTIVE, LOGITS, V, LSE, ESS,
                    K, D, stride_z, stride_xb, stride_xk, stride_pl, stride_lp, k_bucket,
                    ROW_TAU: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_PRIOR: tl.constexpr,
                    HAS_POOL_INDEX: tl.constexpr, RESIDUAL: tl.constexpr, HAS_ACTIVE: tl.constexpr,
                    EMULATE_FMA: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if HAS_ACTIVE:
        live = tl.load(ACTIVE + row) != 0  # a row the gate leaves out costs one load
    else:
        live = True
    if live:
        _per_row(Z, X, POOL_INDEX, ALPHA, SIGMA, TAU, tau_value, D_ALPHA, D_SIGMA, ROW_LAB, POOL_LAB, LOG_PRIOR,
                 ENDPOINT, NOISE, LOGITS, V, LSE, ESS, row, K, D, stride_z, stride_xb, stride_xk, stride_pl,
                 stride_lp, ROW_TAU, HAS_LABELS, HAS_PRIOR, HAS_POOL_INDEX, RESIDUAL, EMULATE_FMA, BLOCK_K, BLOCK_D)


@triton.jit
def _per_row(Z, X, POOL_INDEX, ALPHA, SIGMA, TAU, tau_value, D_ALPHA, D_SIGMA, ROW_LAB, POOL_LAB, LOG_PRIOR,
             ENDPOINT, NOISE, LOGITS, V, LSE, ESS, row, K, D, stride_z, stride_xb, stride_xk, stride_pl, stride_lp,
             ROW_TAU: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_PRIOR: tl.constexpr,
             HAS_POOL_INDEX: tl.constexpr, RESIDUAL: tl.constexpr, EMULATE_FMA: tl.constexpr,
             BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """One row's two passes (the module docstring)."""
    rk = tl.arange(0, BLOCK_K)
    rd = tl.arange(0, BLOCK_D)
    a, sg, tau, inv = load_row_coefficients(ALPHA, SIGMA, TAU, tau_value, row, row >= 0, ROW_TAU)
    if HAS_LABELS:
        row_lab = tl.load(ROW_LAB + row)
    if HAS_POOL_INDEX:  # a class bank: the row's own class's entries, read in place
        x_row = X + tl.load(POOL_INDEX + row).to(tl.int64) * stride_xb
    else:
        x_row = X + row * stride_xb
    z_row = Z + row * stride_z

    # Pass 1: logits and per-lane online softmax statistics (lanes are merged after the loop).
    m_lane = tl.full((BLOCK_K,), float("-inf"), dtype=tl.float32)
    l_lane = tl.zeros((BLOCK_K,), dtype=tl.float32)
    q_lane = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = k0 + rk < K
        dist = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            mask_d = d0 + rd < D
            z = tl.load(z_row + d0 + rd, mask=mask_d, other=0.0).to(tl.float32)
            x = tl.load(x_row + (k0 + rk)[:, None] * stride_xk + (d0 + rd)[None, :],
                        mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            # On a GPU, z - a x contracts to one fused multiply-add (triton's default fp fusion): the product is
            # exact, which matters when z - a x_j is O(sigma) and sigma -> 0. numpy (the interpreter) has no fma,
            # so emulate it there with an exact float64 product.
            if EMULATE_FMA:
                diff = (z.to(tl.float64)[None, :] - a.to(tl.float64) * x.to(tl.float64)).to(tl.float32)
            else:
                diff = z[None, :] - a * x
            dist += tl.sum(diff * diff, axis=1)
        logit = -dist * inv
        valid = mask_k
        if HAS_PRIOR:
            logit += tl.load(LOG_PRIOR + row * stride_lp + k0 + rk, mask=mask_k, other=0.0).to(tl.float32)
        if HAS_LABELS:
            pool_lab = tl.load(POOL_LAB + row * stride_pl + k0 + rk, mask=mask_k, other=0)
            valid &= (row_lab < 0) | (pool_lab == row_lab)
        logit = tl.where(valid, logit, float("-inf"))
        tl.store(LOGITS + row * K + k0 + rk, logit, mask=mask_k)
        m_new = tl.maximum(m_lane, logit)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m_lane - m_safe)  # exp(-inf) = 0 while the lane is empty
        p = tl.exp(logit - m_safe)
        l_lane = l_lane * rescale + p
        q_lane = q_lane * rescale * rescale + p * p
        m_lane = m_new
    m = tl.max(m_lane, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    f = tl.exp(m_lane - m_safe)
    l = tl.sum(l_lane * f, axis=0)
    q = tl.sum(q_lane * f * f, axis=0)
    lse = m_safe + tl.log(l)  # -inf without an admissible candidate; pass 2 then yields NaN as documented
    tl.store(LSE + row, lse)
    tl.store(ESS + row, tl.where(m == float("-inf"), 0.0, l * l / q))
    # Pass 2 reads logits that other threads of this program stored in pass 1.
    tl.debug_barrier()

    da = tl.load(D_ALPHA + row).to(tl.float32)
    ds = tl.load(D_SIGMA + row).to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        mask_d = d0 + rd < D
        # Residual form: accumulate mu - x_own = sum_j w_j (x_j - x_own) directly; candidates near the row's own
        # endpoint would otherwise lose digits in mu - x_own, which is then multiplied by ~1/sigma.
        if RESIDUAL:
            x_own = tl.load(ENDPOINT + row * stride_z + d0 + rd, mask=mask_d, other=0.0).to(tl.float32)
        else:
            x_own = tl.zeros((BLOCK_D,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask_k = k0 + rk < K
            w = tl.exp(tl.load(LOGITS + row * K + k0 + rk, mask=mask_k, other=float("-inf")) - lse)
            x = tl.load(x_row + (k0 + rk)[:, None] * stride_xk + (d0 + rd)[None, :],
                        mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w[:, None] * (x - x_own[None, :]), axis=0)
        if RESIDUAL:
            eps = tl.load(NOISE + row * stride_z + d0 + rd, mask=mask_d, other=0.0).to(tl.float32)
            v = da * x_own + ds * eps + (da - ds * a / sg) * acc
        else:
            z = tl.load(z_row + d0 + rd, mask=mask_d, other=0.0).to(tl.float32)
            v = da * acc + ds * (z - a * acc) / sg
        tl.store(V + row * D + d0 + rd, v, mask=mask_d)


# (BLOCK_K, BLOCK_D, num_warps, num_stages); a (16, 256) fp32 tile is 32 registers per thread at 4 warps.
PER_ROW_CONFIGS = [
    triton.Config({"BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=st)
    for bk, bd, w, st in [(16, 256, 4, 2), (8, 512, 4, 2)]
]
_per_row_tuned = triton.autotune(PER_ROW_CONFIGS, key=["k_bucket", "D", "HAS_LABELS", "HAS_PRIOR", "HAS_POOL_INDEX",
                                                      "RESIDUAL", "HAS_ACTIVE"])(
    _per_row_kernel)


def per_row_posterior(inp: KernelInputs):
    """Triton posterior velocity for z (B, D) against per-row pools (B, K, D), or (N, K, D) read through
    pool_index; returns fp32 (velocity, lse, ess)."""
    z, pool = inp.z, inp.pool
    B, D = z.shape
    K = pool.shape[1]
    f32 = dict(device=z.device, dtype=torch.float32)
    logits = torch.empty(B, K, **f32)
    outputs = torch.zeros if inp.has_active else torch.empty  # gated-out rows get 0
    velocity = outputs(B, D, **f32)
    lse_ess = outputs(2, B, **f32)
    args = (z, pool, inp.pool_index, inp.alpha, inp.sigma, inp.tau, inp.tau_value, inp.d_alpha, inp.d_sigma, inp.row_labels,
            inp.pool_labels, inp.log_prior, inp.endpoint, inp.noise, inp.active, logits, velocity, lse_ess[0], lse_ess[1],
            K, D, z.stride(0), pool.stride(0), pool.stride(1), K if inp.labels_2d else 0, K if inp.has_prior else 0,
            size_bucket(K))
    flags = dict(ROW_TAU=inp.row_tau, HAS_LABELS=inp.has_labels, HAS_PRIOR=inp.has_prior,
                 HAS_POOL_INDEX=inp.has_pool_index, RESIDUAL=inp.residual, HAS_ACTIVE=inp.has_active,
                 EMULATE_FMA=INTERPRET)
    if INTERPRET:
        _per_row_kernel[(B,)](*args, **flags, BLOCK_K=max(2, min(16, triton.next_power_of_2(K))),
                              BLOCK_D=max(16, min(128, triton.next_power_of_2(D))))
    else:
        _per_row_tuned[(B,)](*args, **flags)
    return velocity, lse_ess[0], lse_ess[1]
