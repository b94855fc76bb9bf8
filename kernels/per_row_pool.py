"""Fused Triton kernels for per-row candidate pools (B, K, D): neighbours, VAE re-samples and a class bank's entries.

There is no reuse across rows, so this is a memory-bound batched GEMV: one program per row, or, when the rows do not
fill half a wave of SMs (training's 32 rows per rank), one program per row and part of its candidates.
Pass 1 walks the program's candidates once, forms the direct fp32 distance ||z - a x_j||^2 over D chunks (as cheap
as the expansion here and the most accurate), writes the B x K logits and keeps per-lane online-softmax statistics
(max, sum exp, sum exp^2). Pass 2 forms mu = sum_j exp(l_j - lse) x_j one D chunk at a time and writes the velocity;
a part instead writes its statistics and sum_j exp(l_j - m) (x_j - x_own), and `_per_row_merge_kernel` combines the
parts in a fixed order (the flash-decoding merge). Pass 2 re-reads the candidates, which pass 1 just brought into L2
(128 KiB for K = 16, D = 4096 bf16), so HBM sees them about once while the rows in flight fit in L2. Extra memory:
the B x K logits, and when split the parts' statistics and B x D partial sums per part.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .launch import INTERPRET, KernelInputs, load_row_coefficients, size_bucket, sm_count, split_factor


@triton.jit
def _per_row_kernel(Z, X, POOL_INDEX, ALPHA, SIGMA, TAU, tau_value, D_ALPHA, D_SIGMA, ROW_LAB, POOL_LAB, LOG_PRIOR,
                    ENDPOINT, NOISE, ACTIVE, LOGITS, V, LSE, ESS, PART, PARTIAL,
                    B, K, D, stride_z, stride_xb, stride_xk, stride_pl, stride_lp, split_k, k_bucket,
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
                 ENDPOINT, NOISE, LOGITS, V, LSE, ESS, PART, PARTIAL, row, tl.program_id(1), B, K, D, stride_z,
                 stride_xb, stride_xk, stride_pl, stride_lp, split_k, ROW_TAU, HAS_LABELS, HAS_PRIOR,
                 HAS_POOL_INDEX, RESIDUAL, EMULATE_FMA, BLOCK_K, BLOCK_D)


@triton.jit
def _row_velocity(acc, row, d0, rd, mask_d, x_own, Z, NOISE, ALPHA, SIGMA, D_ALPHA, D_SIGMA, V, D, stride_z,
                  RESIDUAL: tl.constexpr):
    """Stores the velocity of one D chunk of a row from acc = mu - x_own (residual form) or mu."""
    a = tl.load(ALPHA + row).to(tl.float32)
    sg = tl.load(SIGMA + row).to(tl.float32)
    da = tl.load(D_ALPHA + row).to(tl.float32)
    ds = tl.load(D_SIGMA + row).to(tl.float32)
    if RESIDUAL:
        eps = tl.load(NOISE + row * stride_z + d0 + rd, mask=mask_d, other=0.0).to(tl.float32)
        v = da * x_own + ds * eps + (da - ds * a / sg) * acc
    else:
        z = tl.load(Z + row * stride_z + d0 + rd, mask=mask_d, other=0.0).to(tl.float32)
        v = da * acc + ds * (z - a * acc) / sg
    tl.store(V + row * D + d0 + rd, v, mask=mask_d)


@triton.jit
def _per_row(Z, X, POOL_INDEX, ALPHA, SIGMA, TAU, tau_value, D_ALPHA, D_SIGMA, ROW_LAB, POOL_LAB, LOG_PRIOR,
             ENDPOINT, NOISE, LOGITS, V, LSE, ESS, PART, PARTIAL, row, part, B, K, D, stride_z, stride_xb, stride_xk,
             stride_pl, stride_lp, split_k,
             ROW_TAU: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_PRIOR: tl.constexpr,
             HAS_POOL_INDEX: tl.constexpr, RESIDUAL: tl.constexpr, EMULATE_FMA: tl.constexpr,
             BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """One row's two passes over its share of the candidates (the module docstring)."""
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
    k_share = tl.cdiv(tl.cdiv(K, BLOCK_K), split_k) * BLOCK_K
    k_lo = part * k_share
    k_hi = tl.minimum(K, k_lo + k_share)

    # Pass 1: logits and per-lane online softmax statistics (lanes are merged after the loop).
    m_lane = tl.full((BLOCK_K,), float("-inf"), dtype=tl.float32)
    l_lane = tl.zeros((BLOCK_K,), dtype=tl.float32)
    q_lane = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        mask_k = k0 + rk < k_hi
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
    if split_k == 1:
        shift = m_safe + tl.log(l)  # lse: -inf without an admissible candidate; pass 2 then yields NaN as documented
        tl.store(LSE + row, shift)
        tl.store(ESS + row, tl.where(m == float("-inf"), 0.0, l * l / q))
    else:
        # This part's statistics for the merge; pass 2 then sums exp(l_j - m) (x_j - x_own) over the part.
        shift = m_safe
        tl.store(PART + part * B + row, m)
        tl.store(PART + (split_k + part) * B + row, l)
        tl.store(PART + (2 * split_k + part) * B + row, q)
    # Pass 2 reads logits that other threads of this program stored in pass 1.
    tl.debug_barrier()

    for d0 in range(0, D, BLOCK_D):
        mask_d = d0 + rd < D
        # Residual form: accumulate mu - x_own = sum_j w_j (x_j - x_own) directly; candidates near the row's own
        # endpoint would otherwise lose digits in mu - x_own, which is then multiplied by ~1/sigma.
        if RESIDUAL:
            x_own = tl.load(ENDPOINT + row * stride_z + d0 + rd, mask=mask_d, other=0.0).to(tl.float32)
        else:
            x_own = tl.zeros((BLOCK_D,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            mask_k = k0 + rk < k_hi
            w = tl.exp(tl.load(LOGITS + row * K + k0 + rk, mask=mask_k, other=float("-inf")) - shift)
            x = tl.load(x_row + (k0 + rk)[:, None] * stride_xk + (d0 + rd)[None, :],
                        mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w[:, None] * (x - x_own[None, :]), axis=0)
        if split_k == 1:
            _row_velocity(acc, row, d0, rd, mask_d, x_own, Z, NOISE, ALPHA, SIGMA, D_ALPHA, D_SIGMA, V, D, stride_z,
                          RESIDUAL)
        else:
            tl.store(PARTIAL + (part * B + row) * D + d0 + rd, acc, mask=mask_d)


@triton.jit
def _per_row_merge_kernel(PART, PARTIAL, Z, ENDPOINT, NOISE, ALPHA, SIGMA, D_ALPHA, D_SIGMA, ACTIVE, V, LSE, ESS,
                          B, D, stride_z, split_k, RESIDUAL: tl.constexpr, HAS_ACTIVE: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """Merges the parts of a row split over K, in a fixed order: the row's lse and ESS, and one D chunk of mu."""
    row = tl.program_id(0).to(tl.int64)
    d0 = tl.program_id(1) * BLOCK_D
    if HAS_ACTIVE:
        live = tl.load(ACTIVE + row) != 0
    else:
        live = True
    if live:
        m = tl.full((), float("-inf"), dtype=tl.float32)
        for s in range(0, split_k):
            m = tl.maximum(m, tl.load(PART + s * B + row))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        l = tl.zeros((), dtype=tl.float32)
        q = tl.zeros((), dtype=tl.float32)
        rd = tl.arange(0, BLOCK_D)
        mask_d = d0 + rd < D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for s in range(0, split_k):
            m_s = tl.load(PART + s * B + row)
            f = tl.where(m_s == float("-inf"), 0.0, tl.exp(m_s - m_safe))
            l += tl.load(PART + (split_k + s) * B + row) * f
            q += tl.load(PART + (2 * split_k + s) * B + row) * f * f
            acc += tl.load(PARTIAL + (s * B + row) * D + d0 + rd, mask=mask_d, other=0.0) * f
        if d0 == 0:
            tl.store(LSE + row, m_safe + tl.log(l))
            tl.store(ESS + row, tl.where(m == float("-inf"), 0.0, l * l / q))
        if RESIDUAL:
            x_own = tl.load(ENDPOINT + row * stride_z + d0 + rd, mask=mask_d, other=0.0).to(tl.float32)
        else:
            x_own = tl.zeros((BLOCK_D,), dtype=tl.float32)
        # l = 0 (no admissible candidate) makes the velocity NaN, as documented.
        _row_velocity(acc / l, row, d0, rd, mask_d, x_own, Z, NOISE, ALPHA, SIGMA, D_ALPHA, D_SIGMA, V, D, stride_z,
                      RESIDUAL)


# (BLOCK_K, BLOCK_D, num_warps, num_stages); a (16, 256) fp32 tile is 32 registers per thread at 4 warps.
PER_ROW_CONFIGS = [
    triton.Config({"BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=st)
    for bk, bd, w, st in [(16, 256, 4, 2), (8, 512, 4, 2)]
]
_per_row_tuned = triton.autotune(PER_ROW_CONFIGS, key=["k_bucket", "D", "split_k", "HAS_LABELS", "HAS_PRIOR",
                                                      "HAS_POOL_INDEX", "RESIDUAL", "HAS_ACTIVE"])(_per_row_kernel)


@contextlib.contextmanager
def fixed_config(index: int = 0):
    """Inside the block the per-row kernel runs at PER_ROW_CONFIGS[index] without autotuning (for pools so large
    that benchmarking every configuration would take longer than the work); yields that configuration."""
    saved = _per_row_tuned.configs
    _per_row_tuned.configs = [PER_ROW_CONFIGS[index]]
    try:
        yield PER_ROW_CONFIGS[index]
    finally:
        _per_row_tuned.configs = saved


# Under half a wave of programs a row's candidates are split into parts of at least this many; the merge's D chunk.
SPLIT_MIN_K = 16
MERGE_BLOCK_D, MERGE_WARPS = 512, 4


def per_row_posterior(inp: KernelInputs):
    """Triton posterior velocity for z (B, D) against per-row pools (B, K, D), or (N, K, D) read through
    pool_index; returns fp32 (velocity, lse, ess). Under half a wave of programs (training's 32 rows per rank) each
    row's candidates are split over several programs and merged in a fixed order by a second launch."""
    z, pool = inp.z, inp.pool
    B, D = z.shape
    K = pool.shape[1]
    f32 = dict(device=z.device, dtype=torch.float32)
    split_k = split_factor(B, triton.cdiv(K, SPLIT_MIN_K), sm_count(z.device))
    logits = torch.empty(B, K, **f32)
    outputs = torch.zeros if inp.has_active else torch.empty  # gated-out rows get 0
    velocity = outputs(B, D, **f32)
    lse_ess = outputs(2, B, **f32)
    part = torch.empty(3, split_k, B, **f32) if split_k > 1 else lse_ess
    partial = torch.empty(split_k, B, D, **f32) if split_k > 1 else velocity
    args = (z, pool, inp.pool_index, inp.alpha, inp.sigma, inp.tau, inp.tau_value, inp.d_alpha, inp.d_sigma,
            inp.row_labels, inp.pool_labels, inp.log_prior, inp.endpoint, inp.noise, inp.active, logits, velocity,
            lse_ess[0], lse_ess[1], part, partial, B, K, D, z.stride(0), pool.stride(0), pool.stride(1),
            K if inp.labels_2d else 0, K if inp.has_prior else 0, split_k, size_bucket(K))
    flags = dict(ROW_TAU=inp.row_tau, HAS_LABELS=inp.has_labels, HAS_PRIOR=inp.has_prior,
                 HAS_POOL_INDEX=inp.has_pool_index, RESIDUAL=inp.residual, HAS_ACTIVE=inp.has_active,
                 EMULATE_FMA=INTERPRET)
    if INTERPRET:
        _per_row_kernel[(B, split_k)](*args, **flags, BLOCK_K=max(2, min(16, triton.next_power_of_2(K))),
                                      BLOCK_D=max(16, min(128, triton.next_power_of_2(D))))
    else:
        _per_row_tuned[(B, split_k)](*args, **flags)
    if split_k > 1:
        block_d = max(16, min(128, triton.next_power_of_2(D))) if INTERPRET else MERGE_BLOCK_D
        _per_row_merge_kernel[(B, triton.cdiv(D, block_d))](
            part, partial, z, inp.endpoint, inp.noise, inp.alpha, inp.sigma, inp.d_alpha, inp.d_sigma, inp.active,
            velocity, lse_ess[0], lse_ess[1], B, D, z.stride(0), split_k, RESIDUAL=inp.residual,
            HAS_ACTIVE=inp.has_active, BLOCK_D=block_d, num_warps=MERGE_WARPS)
    return velocity, lse_ess[0], lse_ess[1]
