"""Fused Triton kernels for a pool of K candidates shared by all B rows: four launches (three when the caller gives
the pool's squared norms), one more when the mix is split.

The op is attention with one head of size D = 1k..16k, too wide for a single-pass FlashAttention kernel, and the B x K
fp32 logits are small (2B/D of the input bytes), so it runs as two GEMMs (the Cut-Cross-Entropy pattern) with a
per-row kernel between them:

  `_squared_norms_kernel`: ||x_j||^2 summed in float64 and rounded once to fp32, one read of the pool (skipped when
     the caller passes `pool_sq_norms`), so the logits GEMM's main loop is the GEMM alone.
  `_logits_kernel`: S = (2 a z.x - a^2 ||x||^2) / (2 sigma^2 tau) + log_prior with the label mask from integer ids,
     fp32 accumulation, and per-(row, column tile) softmax partials. The row-constant -||z||^2 / (2 sigma^2 tau)
     is left out (it cancels in the softmax and would cost precision) and added back to the reported lse. Under one
     wave of programs it splits D and leaves the sums of the parts to the row kernel (a fixed-order reduction).
  `_row_kernel`: one program per row merges the partials into the row's normaliser, lse and ESS. Where the fp32
     expansion cannot be trusted (below) it refines the row on the device, at a fixed size: the ROW_TOP - 1
     largest approximate logits and the row's own endpoint (when its pool index is given; else the ROW_TOP-th)
     get exact float64 direct distances ||z - a x_j||^2, their share of the velocity is computed in float64, and
     the other candidates keep their approximate logits, shifted by the picks' mean error (a row whose weight is
     spread over more candidates than that is only as exact as the bound). No host sync, no data-dependent shapes.
     Last, it writes the row's normalised weights once (for 16-bit candidates as hi + lo parts in their dtype).
  `_mix_kernel`: mu = sum_j w_j x_j as a plain GEMM over those weights (no exp per D tile; both 16-bit parts are
     loaded with one layout) whose epilogue writes the velocity; under half a wave it splits K and
     `_mix_reduce_kernel` sums the parts in a fixed order.

The gate (`active`): `launch.prepare` orders the rows on the device with the active ones first and counts them; the
row-block programs of both GEMMs take consecutive rows of that order (`_gated_rows`), so only the first
ceil(n_active / BLOCK_M) blocks walk D or K, and the row kernel's programs past the count stop after one load.

Refinement bound: with u = 2^-24,
|error of S_ij| <= (g_dot 2|a| ||z|| max||x|| + g_sum a^2 max||x||^2) / (2 sigma^2 tau).
The logits kernel sums each BLOCK_D chunk's products from zero on tensor cores (16 products per MMA step for 16-bit
inputs; 8 for TF32, of which tf32x3 issues three dots) and adds the chunk to the running fp32 sum with one
round-to-nearest add. A truncating tensor-core adder may lose one unit in the last place (2u relative) of the chunk's
partial sum at each MMA step, each chunk add half a unit of the running sum: g_dot = 2u (BLOCK_D / k + 2) +
u (D / BLOCK_D + 1) (largest BLOCK_D for the first term, smallest for the second), plus 3 * 2^-22 per product for
tf32x3's dropped low parts. ||x||^2 is a float64 sum rounded once to fp32 (u / 2, doubled as a margin): g_sum = u.
||z||^2 is summed in float64 and adds nothing. The interpreter (fp32 round-to-nearest dots) shows at most 1/53
(fp32), 1/34 (fp16) and 1/24 (bf16) of this bound at D = 4096 (tests/test_posterior_triton.py); bench/gpu_check.py
measures the ratio on a device.
A row is refined only where that error can move its velocity: the bound exceeds REFINE_NATS and, in the residual
form with the own endpoint's pool index, the candidates other than the own endpoint can hold weight. The own
endpoint's exact logit (a direct float64 distance: one read of z and x_own) bounds the others' weight relative to it
by U = sum_{j != own} exp(S_j + bound - S_own); when U max(1, |d_alpha - d_sigma alpha / sigma|) <= ONE_HOT_MASS the
row needs nothing more (the velocity's error is below that times the candidates' spread: the mix gives w_own = 1
and mu - x_own ~ 0) and its lse is the own logit plus log(1 + the others' computed weight). At D = 4096 that is every
row with random candidates away from t ~ 0 (tests/test_posterior_triton.py counts it). The own logit's closed form
-||eps||^2 / (2 tau) (z - alpha x_own = sigma eps) is exact only for unrounded inputs: a bf16 z at sigma = 1e-4 moves
it by ~1e4 nats, and the op's lse is that of the inputs it receives. `refined_rows` evaluates the same decision on
the host.
Extra memory O(B K + B D); no B x K x D tensor exists.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import INTERPRET, KernelInputs, load_row_coefficients, size_bucket, sm_count, split_factor


@triton.jit
def _finish_logits(logit, base, offs, cols, valid, row_lab, POOL_LAB, LOG_PRIOR, K,
                   HAS_LABELS: tl.constexpr, LABELS_2D: tl.constexpr, HAS_PRIOR: tl.constexpr):
    """Adds the log prior and applies the label mask. (B, K) inputs are read at `base + offs`, (K,) labels at
    `cols`."""
    if HAS_PRIOR:
        logit += tl.load(LOG_PRIOR + base + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_LABELS:
        if LABELS_2D:
            pool_lab = tl.load(POOL_LAB + base + offs, mask=valid, other=0)
        else:
            pool_lab = tl.load(POOL_LAB + cols, mask=(cols >= 0) & (cols < K), other=0)
        valid = valid & ((row_lab < 0) | (pool_lab == row_lab))
    return tl.where(valid, logit, float("-inf"))


@triton.jit
def _gated_rows(ORDER, N_ACTIVE, slots, B, HAS_ACTIVE: tl.constexpr):
    """(rows, mask) of a program's slots: int64 indices of the input rows it computes. Under the gate ORDER lists the
    active rows first and N_ACTIVE counts them, so the slots past the count are masked and a block of them is empty:
    its program walks no chunk of D or K. Every buffer is indexed by input row; only the programs' rows move."""
    if HAS_ACTIVE:
        mask = slots < tl.load(N_ACTIVE)
        rows = tl.load(ORDER + slots, mask=mask, other=0).to(tl.int64)
    else:
        mask = slots < B
        rows = slots.to(tl.int64)
    return rows, mask


@triton.jit
def _order_key(v, idx):
    """int64 keys ordered like (v, -idx): the largest key is the largest value, the smallest index among ties.
    One max-reduction then selects a value and its index together."""
    bits = v.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # fp32 order as int32 order
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - idx).to(tl.int64)


@triton.jit
def _key_index(key):
    return 0x7FFFFFFF - (key & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def _key_is_finite(key):
    return (key >> 32) > -2139095041  # the ordered bits of -inf


@triton.jit
def _logits_kernel(Z, X, ALPHA, SIGMA, TAU, tau_value, ROW_LAB, POOL_LAB, LOG_PRIOR, ORDER, N_ACTIVE,
                   LOGITS, PART, XMAX, ZSQ, DOTS, NORMS,
                   B, K, D, NT, stride_z, stride_x, split_d, b_bucket, k_bucket,
                   ROW_TAU: tl.constexpr, HAS_LABELS: tl.constexpr, LABELS_2D: tl.constexpr,
                   HAS_PRIOR: tl.constexpr, HAS_ACTIVE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    lm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    rm, mask_m = _gated_rows(ORDER, N_ACTIVE, pid_m * BLOCK_M + lm, B, HAS_ACTIVE)
    mask_n = rn < K
    # This program's share of D: whole BLOCK_D chunks, one share unless the grid is under half a wave. A row block the
    # gate leaves empty walks none of it.
    d_share = tl.cdiv(tl.cdiv(D, BLOCK_D), split_d) * BLOCK_D
    d_lo = pid_s * d_share
    live = tl.max(mask_m.to(tl.int32), axis=0) > 0
    d_hi = tl.where(live, tl.minimum(D, d_lo + d_share), d_lo)

    z_ptrs = Z + (rm * stride_z)[:, None] + (d_lo + rd)[None, :]
    x_ptrs = X + (pid_n * BLOCK_N).to(tl.int64) * stride_x + (tl.arange(0, BLOCK_N)[:, None] * stride_x
                                                               + (d_lo + rd)[None, :])
    # The main loop is the GEMM alone: the pool's squared norms come precomputed (NORMS, once per pool).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        mask_d = d0 + rd < d_hi
        z = tl.load(z_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(z.to(tl.float32), tl.trans(x.to(tl.float32)), acc, input_precision="ieee")
        else:
            # Each chunk's products are summed from zero and added with one round-to-nearest add: a truncating
            # tensor-core accumulator then errs per chunk, not along all of D (the bound's g_dot).
            acc += tl.dot(z, tl.trans(x), input_precision=PRECISION)
        z_ptrs += BLOCK_D
        x_ptrs += BLOCK_D
    if pid_n == 0:
        # ||z||^2 in float64 (it shifts the logits back to the reported lse, ~1e11 nats at sigma = 1e-5): one
        # column of programs re-reads its z rows.
        zsq = tl.zeros((BLOCK_M,), dtype=tl.float64)
        for d0 in range(d_lo, d_hi, BLOCK_D):
            mask_d = d0 + rd < d_hi
            zf = tl.load(Z + (rm * stride_z)[:, None] + (d0 + rd)[None, :],
                         mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float64)
            zsq += tl.sum(zf * zf, axis=1)
        tl.store(ZSQ + pid_s * B + rm, zsq, mask=mask_m)

    xsq = tl.load(NORMS + rn, mask=mask_n, other=0.0)
    if (pid_m == 0) & (pid_s == 0):
        tl.store(XMAX + pid_n, tl.max(xsq, axis=0))  # the tile's largest ||x||^2, for the row kernel's bound
    valid = mask_m[:, None] & mask_n[None, :]
    tile = (rm * K)[:, None] + rn[None, :]
    if split_d == 1:
        a, sg, tau, inv = load_row_coefficients(ALPHA, SIGMA, TAU, tau_value, rm, mask_m, ROW_TAU)
        if HAS_LABELS:
            row_lab = tl.load(ROW_LAB + rm, mask=mask_m, other=-1)[:, None]
        else:
            row_lab = 0
        logit = (2.0 * a * inv)[:, None] * acc - (a * a * inv)[:, None] * xsq[None, :]
        logit = _finish_logits(logit, 0, tile, rn[None, :], valid, row_lab, POOL_LAB, LOG_PRIOR, K,
                               HAS_LABELS, LABELS_2D, HAS_PRIOR)
        tl.store(LOGITS + tile, logit, mask=valid)
        # Softmax partials of this column tile; a fully masked tile contributes m = -inf, l = q = 0.
        m = tl.max(logit, axis=1)
        p = tl.exp(logit - tl.where(m == float("-inf"), 0.0, m)[:, None])
        part = PART + rm * NT + pid_n
        tl.store(part, m, mask=mask_m)
        tl.store(part + B * NT, tl.sum(p, axis=1), mask=mask_m)
        tl.store(part + 2 * B * NT, tl.sum(p * p, axis=1), mask=mask_m)
    else:
        # Split D: the row kernel sums the parts in a fixed order and finishes the logits.
        tl.store(DOTS + (pid_s * B).to(tl.int64) * K + tile, acc, mask=valid)


@triton.jit
def _own_endpoint_check(Z, X, LOG_PRIOR, OWN, D_ALPHA, D_SIGMA, part, row, B, K, D, NT, stride_z, stride_x,
                        LOGITS, zsq, a, sg, tau, bound, HAS_PRIOR: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """(U max(1, |d_alpha - d_sigma alpha / sigma|) of the module docstring, the row's lse from its own endpoint's
    exact logit), in float64; U is inf when the own endpoint is not in the pool or not admissible."""
    own = tl.load(OWN + row).to(tl.int64)
    own_ok = (own >= 0) & (own < K)
    a64, sg64, tau64 = a.to(tl.float64), sg.to(tl.float64), tau.to(tl.float64)
    inv64 = 1.0 / (2.0 * sg64 * sg64 * tau64)
    # The own endpoint's exact logit: a direct float64 distance (z - a x_own = sigma eps cancels to O(sigma)).
    rd = tl.arange(0, BLOCK_D)
    dist = tl.zeros((), dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        md = (d0 + rd < D) & own_ok
        zr = tl.load(Z + row * stride_z + d0 + rd, mask=md, other=0.0).to(tl.float64)
        xr = tl.load(X + own * stride_x + d0 + rd, mask=md, other=0.0).to(tl.float64)
        diff = zr - a64 * xr
        dist += tl.sum(diff * diff, axis=0)
    s_own = (zsq - dist) * inv64  # in the kernels' convention (||z||^2 inv added back)
    if HAS_PRIOR:
        s_own += tl.load(LOG_PRIOR + row * K + own, mask=own_ok, other=0.0).to(tl.float64)
    admissible = tl.load(LOGITS + row * K + own, mask=own_ok, other=float("-inf")) > float("-inf")
    # The others' weight relative to the own endpoint's: `mass` from the computed logits, `upper` with each raised
    # by the bound (exp(S + bound) rather than exp(S) e^bound: 0 * inf would be NaN).
    own_tile = (own // BLOCK_N).to(tl.int32)
    rt = tl.arange(0, BLOCK_T)
    mass = tl.zeros((), dtype=tl.float64)
    upper = tl.zeros((), dtype=tl.float64)
    for t0 in range(0, NT, BLOCK_T):
        t = t0 + rt
        other = (t < NT) & (t != own_tile)
        mt = tl.load(part + t, mask=other, other=float("-inf")).to(tl.float64) - s_own
        lt = tl.load(part + B * NT + t, mask=other, other=0.0).to(tl.float64)
        mass += tl.sum(tl.where(mt > float("-inf"), lt * tl.exp(mt), 0.0), axis=0)
        upper += tl.sum(tl.where(mt > float("-inf"), lt * tl.exp(mt + bound), 0.0), axis=0)
    cols = own_tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    v = tl.load(LOGITS + row * K + cols, mask=(cols < K) & (cols != own), other=float("-inf")).to(tl.float64) - s_own
    mass += tl.sum(tl.exp(v), axis=0)
    upper += tl.sum(tl.exp(v + bound), axis=0)
    c = tl.abs(tl.load(D_ALPHA + row).to(tl.float64) - tl.load(D_SIGMA + row).to(tl.float64) * a64 / sg64)
    lse = s_own - zsq * inv64 + tl.log(1.0 + mass)
    return tl.where(own_ok & admissible, upper * tl.maximum(c, 1.0), float("inf")), lse


@triton.jit
def _row_kernel(Z, X, ALPHA, SIGMA, TAU, tau_value, D_ALPHA, D_SIGMA, ROW_LAB, POOL_LAB, LOG_PRIOR, ENDPOINT, NOISE,
                OWN, ORDER, N_ACTIVE, LOGITS, PART, XMAX, ZSQ, DOTS, NORMS, STATS, VT, LSE, ESS, W,
                B, K, D, NT, stride_z, stride_x, split_d, refine_nats, g_dot, g_sum, one_hot_mass,
                ROW_TAU: tl.constexpr, HAS_LABELS: tl.constexpr, LABELS_2D: tl.constexpr,
                HAS_PRIOR: tl.constexpr, HAS_OWN: tl.constexpr, RESIDUAL: tl.constexpr, HAS_ACTIVE: tl.constexpr,
                SPLIT_P: tl.constexpr, P_SCALE: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_S: tl.constexpr,
                BLOCK_N: tl.constexpr, TOP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    row, live = _gated_rows(ORDER, N_ACTIVE, tl.program_id(0), B, HAS_ACTIVE)
    if live:  # programs past the gate's count stop after one load
        _row(Z, X, ALPHA, SIGMA, TAU, tau_value, D_ALPHA, D_SIGMA, ROW_LAB, POOL_LAB, LOG_PRIOR, ENDPOINT, NOISE,
             OWN, LOGITS, PART, XMAX, ZSQ, DOTS, NORMS, STATS, VT, LSE, ESS, row,
             B, K, D, NT, stride_z, stride_x, split_d, refine_nats, g_dot, g_sum, one_hot_mass,
             ROW_TAU, HAS_LABELS, LABELS_2D, HAS_PRIOR, HAS_OWN, RESIDUAL, BLOCK_S, BLOCK_N, TOP, BLOCK_T, BLOCK_D)
        # The row's normalised weights, once: the mix is then a plain GEMM (no exp per D tile).
        tl.debug_barrier()  # the stats and the picks' -inf logits stored above are read back
        _write_weights(LOGITS, STATS, W, row, B, K, SPLIT_P, P_SCALE, BLOCK_W)


@triton.jit
def _write_weights(LOGITS, STATS, W, row, B, K, SPLIT_P: tl.constexpr, P_SCALE: tl.constexpr,
                   BLOCK_W: tl.constexpr):
    """w_j = exp(S_j - row max) * scale for the mix (refined rows: the candidates outside the picks). 16-bit inputs
    store w = hi + lo in the candidates' dtype (two planes of W): ~16 mantissa bits for a tensor-core dot; P_SCALE
    lifts fp16 weights out of its subnormals."""
    row_max = tl.load(STATS + row)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    scale = tl.load(STATS + B + row) * P_SCALE
    rw = tl.arange(0, BLOCK_W)
    for k0 in range(0, K, BLOCK_W):
        cols = k0 + rw
        ok = cols < K
        p = tl.exp(tl.load(LOGITS + row * K + cols, mask=ok, other=float("-inf")) - row_max) * scale
        if SPLIT_P:
            hi = p.to(W.dtype.element_ty)
            tl.store(W + row * K + cols, hi, mask=ok)
            tl.store(W + (B + row) * K + cols, (p - hi.to(tl.float32)).to(W.dtype.element_ty), mask=ok)
        else:
            tl.store(W + row * K + cols, p, mask=ok)


@triton.jit
def _row(Z, X, ALPHA, SIGMA, TAU, tau_value, D_ALPHA, D_SIGMA, ROW_LAB, POOL_LAB, LOG_PRIOR, ENDPOINT, NOISE,
         OWN, LOGITS, PART, XMAX, ZSQ, DOTS, NORMS, STATS, VT, LSE, ESS, row,
         B, K, D, NT, stride_z, stride_x, split_d, refine_nats, g_dot, g_sum, one_hot_mass,
         ROW_TAU: tl.constexpr, HAS_LABELS: tl.constexpr, LABELS_2D: tl.constexpr,
         HAS_PRIOR: tl.constexpr, HAS_OWN: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_S: tl.constexpr,
         BLOCK_N: tl.constexpr, TOP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """The row kernel's work for one row (its docstring is the module's)."""
    rt = tl.arange(0, BLOCK_T)
    rn = tl.arange(0, BLOCK_N)
    a, sg, tau, inv = load_row_coefficients(ALPHA, SIGMA, TAU, tau_value, row, row < B, ROW_TAU)
    if HAS_LABELS:
        row_lab = tl.load(ROW_LAB + row)
    else:
        row_lab = 0
    # The split parts are summed as one (BLOCK_S, ...) block each: loads in parallel, no chain of split_d loads.
    rs = tl.arange(0, BLOCK_S)
    zsq = tl.sum(tl.load(ZSQ + rs * B + row, mask=rs < split_d, other=0.0), axis=0)
    part = PART + row * NT

    if split_d > 1:
        # Finish this row's logits from the split dot products and write its tile partials.
        for t in range(0, NT):
            cols = t * BLOCK_N + rn
            ok = cols < K
            both = (rs < split_d)[:, None] & ok[None, :]
            dot = tl.sum(tl.load(DOTS + (rs[:, None] * B + row) * K + cols[None, :], mask=both, other=0.0), axis=0)
            xsq = tl.load(NORMS + cols, mask=ok, other=0.0)
            logit = _finish_logits((2.0 * a * inv) * dot - (a * a * inv) * xsq, row * K, cols, cols, ok, row_lab,
                                   POOL_LAB, LOG_PRIOR, K, HAS_LABELS, LABELS_2D, HAS_PRIOR)
            tl.store(LOGITS + row * K + cols, logit, mask=ok)
            m_t = tl.max(logit, axis=0)
            p = tl.exp(logit - tl.where(m_t == float("-inf"), 0.0, m_t))
            tl.store(part + t, m_t)
            tl.store(part + B * NT + t, tl.sum(p, axis=0))
            tl.store(part + 2 * B * NT + t, tl.sum(p * p, axis=0))
        tl.debug_barrier()  # the partials are read back below by other threads of this program
    xmax = tl.zeros((), dtype=tl.float32)
    for t0 in range(0, NT, BLOCK_T):
        xmax = tl.maximum(xmax, tl.max(tl.load(XMAX + t0 + rt, mask=t0 + rt < NT, other=0.0), axis=0))

    # The row's max, sum of exp and sum of squared exp over its tiles.
    m = tl.full((), float("-inf"), dtype=tl.float32)
    for t0 in range(0, NT, BLOCK_T):
        m = tl.maximum(m, tl.max(tl.load(part + t0 + rt, mask=t0 + rt < NT, other=float("-inf")), axis=0))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    sum_p = tl.zeros((), dtype=tl.float32)
    sum_p2 = tl.zeros((), dtype=tl.float32)
    for t0 in range(0, NT, BLOCK_T):
        tmask = t0 + rt < NT
        mt = tl.load(part + t0 + rt, mask=tmask, other=float("-inf"))
        f = tl.where(mt == float("-inf"), 0.0, tl.exp(mt - m_safe))
        sum_p += tl.sum(tl.load(part + B * NT + t0 + rt, mask=tmask, other=0.0) * f, axis=0)
        sum_p2 += tl.sum(tl.load(part + 2 * B * NT + t0 + rt, mask=tmask, other=0.0) * f * f, axis=0)

    bound = (g_dot * 2.0 * tl.abs(a) * tl.sqrt(zsq.to(tl.float32) * xmax) + g_sum * a * a * xmax) * inv
    inv64 = 1.0 / (2.0 * sg.to(tl.float64) * sg.to(tl.float64) * tau.to(tl.float64))
    refine = (bound > refine_nats) & (m > float("-inf"))
    lse = (m_safe + tl.log(sum_p)).to(tl.float64) - zsq * inv64
    if RESIDUAL:  # the residual form keeps a one-hot row exact in the mix: mu - x_own = 0 when w_own = 1
        if HAS_OWN:
            if refine:
                others, own_lse = _own_endpoint_check(Z, X, LOG_PRIOR, OWN, D_ALPHA, D_SIGMA, part, row, B, K, D,
                                                      NT, stride_z, stride_x, LOGITS, zsq, a, sg, tau, bound,
                                                      HAS_PRIOR, BLOCK_N, BLOCK_T, BLOCK_D)
                # A one-hot row keeps the mix's result; its lse comes from the exact own logit (the approximate
                # logits' max is off by up to the bound).
                lse = tl.where(others <= one_hot_mass, own_lse, lse)
                refine = others > one_hot_mass
    if refine:
        rr = tl.arange(0, TOP)
        n_top = TOP - HAS_OWN  # the last slot is kept for the own endpoint
        # 1. The n_top tiles with the largest maxima hold the n_top largest approximate logits. Each pass takes the
        #    largest key below the previous one (a key orders by value, then by index: see _order_key).
        if NT <= n_top:
            tiles = tl.where(rr < NT, rr, -1)
        else:
            tiles = tl.full((TOP,), -1, dtype=tl.int32)
            prev = tl.full((), 2 ** 63 - 1, dtype=tl.int64)
            for r in range(0, n_top):
                best = tl.full((), -2 ** 63, dtype=tl.int64)
                for t0 in range(0, NT, BLOCK_T):
                    t = t0 + rt
                    key = _order_key(tl.load(part + t, mask=t < NT, other=float("-inf")), t)
                    best = tl.maximum(best, tl.max(tl.where((key < prev) & (t < NT), key, -2 ** 63), axis=0))
                tiles = tl.where((rr == r) & _key_is_finite(best), _key_index(best), tiles)
                prev = best
        if HAS_OWN:
            own = tl.load(OWN + row).to(tl.int64)
            own_ok = (own >= 0) & (own < K)
            own_tile = (own // BLOCK_N).to(tl.int32)
            have = tl.max(tl.where(tiles == own_tile, 1, 0), axis=0) > 0
            tiles = tl.where((rr == TOP - 1) & own_ok & ~have, own_tile, tiles)

        # 2. Their candidates: the n_top largest approximate logits, then the own endpoint.
        cols = tiles[:, None].to(tl.int64) * BLOCK_N + rn[None, :]
        loaded = (tiles[:, None] >= 0) & (cols < K)
        v = tl.load(LOGITS + row * K + cols, mask=loaded, other=float("-inf"))
        keys = tl.where(loaded, _order_key(v, cols), -2 ** 63)
        picks = tl.full((TOP,), -1, dtype=tl.int64)
        prev = tl.full((), 2 ** 63 - 1, dtype=tl.int64)
        for r in range(0, n_top):
            best = tl.max(tl.where(keys < prev, keys, -2 ** 63))
            picks = tl.where((rr == r) & _key_is_finite(best), _key_index(best).to(tl.int64), picks)
            prev = best
        taken = keys >= prev  # the picks, and masked (-inf) candidates, which weigh nothing either way
        if HAS_OWN:
            add = own_ok & (tl.max(tl.where(picks == own, 1, 0), axis=0) == 0)
            picks = tl.where((rr == TOP - 1) & add, own, picks)
            taken = taken | ((cols == own) & add)

        # 3. Exact logits of the picks: direct float64 distances (as sigma -> 0, z - a x_j cancels to O(sigma)).
        chosen = picks >= 0
        a64 = a.to(tl.float64)
        sg64 = sg.to(tl.float64)
        dist = tl.zeros((TOP,), dtype=tl.float64)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            zr = tl.load(Z + row * stride_z + rd, mask=rd < D, other=0.0).to(tl.float64)
            xr = tl.load(X + picks[:, None] * stride_x + rd[None, :], mask=chosen[:, None] & (rd < D)[None, :],
                         other=0.0).to(tl.float64)
            diff = zr[None, :] - a64 * xr
            dist += tl.sum(diff * diff, axis=1)
        ell = _finish_logits(-dist * inv64, row * K, picks, picks, chosen, row_lab, POOL_LAB, LOG_PRIOR, K,
                             HAS_LABELS, LABELS_2D, HAS_PRIOR)

        # 4. The rest keep approximate logits: the loaded tiles without the picks, and every other tile's partials.
        rest = tl.where(taken, float("-inf"), v)
        m_rest = tl.max(rest)
        # Tiles that were not loaded (none when every tile was): the first pass finds the max, the second sums.
        n_other = tl.where(NT > n_top, NT, 0)
        for t0 in range(0, n_other, BLOCK_T):
            t = t0 + rt
            other = (t < NT) & (tl.max(tl.where(t[:, None] == tiles[None, :], 1, 0), axis=1) == 0)
            m_rest = tl.maximum(m_rest, tl.max(tl.load(part + t, mask=other, other=float("-inf")), axis=0))
        m_rest_safe = tl.where(m_rest == float("-inf"), 0.0, m_rest)
        p = tl.exp(rest - m_rest_safe)
        l_rest = tl.sum(p)
        q_rest = tl.sum(p * p)
        for t0 in range(0, n_other, BLOCK_T):
            t = t0 + rt
            other = (t < NT) & (tl.max(tl.where(t[:, None] == tiles[None, :], 1, 0), axis=1) == 0)
            mt = tl.load(part + t, mask=other, other=float("-inf"))
            f = tl.where(mt == float("-inf"), 0.0, tl.exp(mt - m_rest_safe))
            l_rest += tl.sum(tl.load(part + B * NT + t, mask=other, other=0.0) * f, axis=0)
            q_rest += tl.sum(tl.load(part + 2 * B * NT + t, mask=other, other=0.0) * f * f, axis=0)

        # 5. One normaliser in float64: the rest are shifted back by ||z||^2 / (2 sigma^2 tau) and by the mean error
        #    the n_top exact picks showed. That removes an offset they share; as sigma -> 0 the approximate logits
        #    are noise, and it keeps a swarm of near-ties outside the picks from outweighing the exact ones.
        s_pick = tl.load(LOGITS + row * K + picks, mask=chosen, other=float("-inf")).to(tl.float64) - zsq * inv64
        calibrated = (rr < n_top) & (ell > float("-inf")) & (s_pick > float("-inf"))
        shift = tl.sum(tl.where(calibrated, ell - s_pick, 0.0), axis=0) / tl.maximum(
            tl.sum(calibrated.to(tl.float64), axis=0), 1.0)
        rest_full = m_rest.to(tl.float64) - zsq * inv64 + shift
        top = tl.maximum(tl.max(ell, axis=0), rest_full)
        e_pick = tl.exp(ell - top)
        e_rest = tl.where(m_rest == float("-inf"), 0.0, tl.exp(rest_full - top))
        total = tl.sum(e_pick, axis=0) + l_rest.to(tl.float64) * e_rest
        w = e_pick / total
        rest_scale = e_rest / total  # a rest candidate's weight is exp(S_j - m_rest) * rest_scale
        sum_w2 = tl.sum(w * w, axis=0) + q_rest.to(tl.float64) * rest_scale * rest_scale

        # 6. The picks' share of the velocity in float64: it is multiplied by ~1/sigma.
        da64 = tl.load(D_ALPHA + row).to(tl.float64)
        ds64 = tl.load(D_SIGMA + row).to(tl.float64)
        w_sum = tl.sum(w, axis=0)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            md = rd < D
            xr = tl.load(X + picks[:, None] * stride_x + rd[None, :], mask=chosen[:, None] & md[None, :],
                         other=0.0).to(tl.float64)
            if RESIDUAL:
                xo = tl.load(ENDPOINT + row * stride_z + rd, mask=md, other=0.0).to(tl.float64)
                eps = tl.load(NOISE + row * stride_z + rd, mask=md, other=0.0).to(tl.float64)
                vt = w_sum * (da64 * xo + ds64 * eps) + (da64 - ds64 * a64 / sg64) * tl.sum(
                    w[:, None] * (xr - xo[None, :]), axis=0)
            else:
                zr = tl.load(Z + row * stride_z + rd, mask=md, other=0.0).to(tl.float64)
                vt = da64 * tl.sum(w[:, None] * xr, axis=0) + ds64 / sg64 * tl.sum(
                    w[:, None] * (zr[None, :] - a64 * xr), axis=0)
            tl.store(VT + row * D + rd, vt.to(tl.float32), mask=md)
        tl.store(LOGITS + row * K + picks, float("-inf"), mask=chosen)  # the mix kernel skips them
        tl.store(STATS + row, m_rest)
        tl.store(STATS + B + row, rest_scale.to(tl.float32))
        tl.store(STATS + 2 * B + row, (l_rest.to(tl.float64) * rest_scale).to(tl.float32))
        tl.store(STATS + 3 * B + row, 1.0)
        tl.store(LSE + row, (top + tl.log(total)).to(tl.float32))
        tl.store(ESS + row, (1.0 / sum_w2).to(tl.float32))
    else:
        # A row without admissible candidates gets a NaN scale, hence a NaN velocity, as documented.
        tl.store(STATS + row, m)
        tl.store(STATS + B + row, tl.where(m == float("-inf"), float("nan"), 1.0 / sum_p))
        tl.store(STATS + 2 * B + row, 1.0)
        tl.store(STATS + 3 * B + row, 0.0)
        tl.store(LSE + row, lse.to(tl.float32))
        tl.store(ESS + row, tl.where(m == float("-inf"), 0.0, sum_p * sum_p / sum_p2))


@triton.jit
def _store_velocity(acc, rm, rd, mask_m, mask_d, Z, ENDPOINT, NOISE, ALPHA, SIGMA, D_ALPHA, D_SIGMA, STATS,
                    VT, V, B, D, stride_z, RESIDUAL: tl.constexpr):
    """v = (refined rows: the picks' share) + the share of acc = sum_j w_j x_j over the other candidates, whose
    weights sum to `rest` (1 for rows that were not refined). Rows rm (int64)."""
    a = tl.load(ALPHA + rm, mask=mask_m, other=0.0).to(tl.float32)
    sg = tl.load(SIGMA + rm, mask=mask_m, other=1.0).to(tl.float32)
    da = tl.load(D_ALPHA + rm, mask=mask_m, other=0.0).to(tl.float32)
    ds = tl.load(D_SIGMA + rm, mask=mask_m, other=0.0).to(tl.float32)
    rest = tl.load(STATS + 2 * B + rm, mask=mask_m, other=1.0)[:, None]
    refined = tl.load(STATS + 3 * B + rm, mask=mask_m, other=0.0) != 0.0
    mask = mask_m[:, None] & mask_d[None, :]
    offs = (rm * stride_z)[:, None] + rd[None, :]
    if RESIDUAL:
        # u + (d_alpha - d_sigma alpha / sigma)(mu - x_own): stays accurate as sigma -> 0.
        x_own = tl.load(ENDPOINT + offs, mask=mask, other=0.0).to(tl.float32)
        eps = tl.load(NOISE + offs, mask=mask, other=0.0).to(tl.float32)
        v = rest * (da[:, None] * x_own + ds[:, None] * eps) + (da - ds * a / sg)[:, None] * (acc - rest * x_own)
    else:
        zt = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
        v = da[:, None] * acc + (ds / sg)[:, None] * (rest * zt - a[:, None] * acc)
    out = (rm * D)[:, None] + rd[None, :]
    v += tl.load(VT + out, mask=mask & refined[:, None], other=0.0)
    tl.store(V + out, v, mask=mask)


@triton.jit
def _mix_kernel(W, X, STATS, Z, ENDPOINT, NOISE, ALPHA, SIGMA, D_ALPHA, D_SIGMA, VT, V, PARTIAL, ORDER, N_ACTIVE,
                B, K, D, stride_z, stride_x, split_k, b_bucket, k_bucket,
                RESIDUAL: tl.constexpr, HAS_ACTIVE: tl.constexpr, UPCAST: tl.constexpr, SPLIT_P: tl.constexpr,
                P_SCALE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_k = tl.program_id(2)
    lm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    rm, mask_m = _gated_rows(ORDER, N_ACTIVE, pid_m * BLOCK_M + lm, B, HAS_ACTIVE)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = rd < D
    k_share = tl.cdiv(tl.cdiv(K, BLOCK_K), split_k) * BLOCK_K
    k_lo = pid_k * k_share
    live = tl.max(mask_m.to(tl.int32), axis=0) > 0  # a row block the gate leaves empty walks no candidate
    k_hi = tl.where(live, tl.minimum(K, k_lo + k_share), k_lo)

    # The weights the row kernel wrote (P_SCALE: see _write_weights); two planes hi + lo for 16-bit candidates.
    w_ptrs = W + (rm * K)[:, None] + (k_lo + rk)[None, :]
    x_ptrs = X + k_lo.to(tl.int64) * stride_x + (rk[:, None] * stride_x + rd[None, :])
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        mask_k = k0 + rk < k_hi
        mask_w = mask_m[:, None] & mask_k[None, :]
        p = tl.load(w_ptrs, mask=mask_w, other=0.0)
        x = tl.load(x_ptrs, mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(p.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
        elif SPLIT_P:
            # Both planes come from memory with one layout: one accumulator layout for the two dots.
            acc = tl.dot(p, x, acc)
            acc = tl.dot(tl.load(w_ptrs + B * K, mask=mask_w, other=0.0), x, acc)
        else:
            acc = tl.dot(p, x, acc, input_precision=PRECISION)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K * stride_x
    acc = acc * (1.0 / P_SCALE)
    if split_k == 1:
        _store_velocity(acc, rm, rd, mask_m, mask_d, Z, ENDPOINT, NOISE, ALPHA, SIGMA, D_ALPHA, D_SIGMA,
                        STATS, VT, V, B, D, stride_z, RESIDUAL)
    else:
        tl.store(PARTIAL + (pid_k * B).to(tl.int64) * D + (rm * D)[:, None] + rd[None, :], acc,
                 mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _mix_reduce_kernel(PARTIAL, STATS, Z, ENDPOINT, NOISE, ALPHA, SIGMA, D_ALPHA, D_SIGMA, VT, V, ORDER, N_ACTIVE,
                       B, D, stride_z, split_k,
                       RESIDUAL: tl.constexpr, HAS_ACTIVE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    rm, mask_m = _gated_rows(ORDER, N_ACTIVE, tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), B, HAS_ACTIVE)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = rd < D
    offs = (rm * D)[:, None] + rd[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for s in range(0, split_k):  # a fixed order: the same sum on every run
        acc += tl.load(PARTIAL + (s * B).to(tl.int64) * D + offs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    _store_velocity(acc, rm, rd, mask_m, mask_d, Z, ENDPOINT, NOISE, ALPHA, SIGMA, D_ALPHA, D_SIGMA, STATS,
                    VT, V, B, D, stride_z, RESIDUAL)


@triton.jit
def _squared_norms_kernel(X, OUT, K, D, stride_x, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT_j = ||x_j||^2 summed in float64 and rounded once to fp32 (the bound's g_sum)."""
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rd = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        x = tl.load(X + (rk.to(tl.int64) * stride_x)[:, None] + (d0 + rd)[None, :],
                    mask=(rk < K)[:, None] & (d0 + rd < D)[None, :], other=0.0).to(tl.float64)
        acc += tl.sum(x * x, axis=1)
    tl.store(OUT + rk, acc.to(tl.float32), mask=rk < K)


def squared_norms(pool: torch.Tensor) -> torch.Tensor:
    """(K,) fp32 squared norms of a shared pool (K, D) for the logits kernel: one launch, one read of the pool."""
    K, D = pool.shape
    out = torch.empty(K, device=pool.device, dtype=torch.float32)
    block_k, block_d = (16, _interpret_block(D, 1024)) if INTERPRET else (NORMS_BLOCK_K, NORMS_BLOCK_D)
    _squared_norms_kernel[(triton.cdiv(K, block_k),)](pool, out, K, D, pool.stride(0), BLOCK_K=block_k,
                                                      BLOCK_D=block_d, num_warps=NORMS_WARPS)
    return out


def logits_tiles(B: int, K: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the logits GEMM on a GPU. 16-bit inputs take 128-row tiles when B fills them, which
    halves the pool's re-reads from L2 (once per row block). Columns stay 64 wide: at (256, 4096) 128 x 128 tiles
    would leave 64 programs, under half a wave, and the split over D they would need writes 8 MB of partial dot
    products. fp32 (tf32x3 holds three operand splits in registers) keeps 64 x 64."""
    return (128 if dtype != torch.float32 and B > 64 else 64), 64


# GPU configurations, chosen so that ptxas reports no spills (kernels/compile_check.py); not yet tuned on a GPU.
# The output tiles are chosen by `logits_tiles` (the host sizes buffers and splits from them); the rest is tuned
# per size bucket.
NORMS_BLOCK_K, NORMS_BLOCK_D, NORMS_WARPS = 4, 1024, 4
LOGITS_CONFIGS = [triton.Config({"BLOCK_D": bd}, num_warps=w, num_stages=st) for bd, w, st in [(64, 8, 3), (32, 8, 4)]]
MIX_BLOCK_M, MIX_BLOCK_D = 64, 64
MIX_CONFIGS = [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=st) for bk, w, st in [(64, 4, 3), (32, 4, 4)]]
_logits_tuned = triton.autotune(LOGITS_CONFIGS, key=["b_bucket", "k_bucket", "D", "split_d", "HAS_LABELS",
                                                     "HAS_PRIOR"])(_logits_kernel)
_mix_tuned = triton.autotune(MIX_CONFIGS, key=["b_bucket", "k_bucket", "D", "split_k", "RESIDUAL"])(_mix_kernel)
# Candidates refined per row (the 15 largest approximate logits and the own endpoint); the row kernel's tiles.
ROW_TOP, ROW_BLOCK_T, ROW_BLOCK_D, ROW_WARPS = 16, 128, 256, 4
ROW_BLOCK_W = 1024  # the row kernel's chunk of candidates when it writes the mix's weights
REDUCE_BLOCK_M, REDUCE_BLOCK_D, REDUCE_WARPS = 16, 128, 4
# On a GPU, splitting stops at parts of this many elements of D (logits) or candidates (mix).
SPLIT_MIN_D, SPLIT_MIN_K = 256, 256
# The logits are split over D only for pools of at most this many column tiles (K <= 512 at 64 columns): the row
# kernel's finish walks a row's tiles in turn, which at (32, 4096, 4096) would be 64 dependent steps in each of 32
# programs; 64 unsplit programs walking D are shorter.
SPLIT_D_MAX_TILES = 8

# fp32 inputs: "tf32x3" keeps ~fp32 accuracy on the tensor cores (plain TF32 would put 1e-3 relative error into
# logits that are divided by 2 sigma^2). 16-bit dots ignore it.
DOT_PRECISION = "tf32x3"

# A row is refined when the bound on its logit error exceeds this many nats and its other candidates can hold weight
# (module docstring); float("inf") switches refinement off.
REFINE_NATS = 0.01
ONE_HOT_MASS = 1e-9
def logit_error_coefficients(D: int, dtype: torch.dtype) -> tuple[float, float]:
    """(g_dot, g_sum) of the bound in the module docstring, for inputs of this dtype."""
    u = 2.0 ** -24
    chunks = [cfg.kwargs["BLOCK_D"] for cfg in LOGITS_CONFIGS]
    fp32 = dtype == torch.float32
    steps = max(chunks) / (8 if fp32 else 16)  # MMA steps per chunk
    g_dot = 2 * u * (steps + 2) + u * (math.ceil(D / min(chunks)) + 1) + (3 * 2.0 ** -22 if fp32 else 0.0)
    # ||x||^2: a float64 sum rounded once to fp32 (u / 2, plus D 2^-53 from the float64 adds), doubled as a margin.
    return g_dot, u


def refined_rows(logits, z, pool, alpha, sigma, d_alpha, d_sigma, endpoint_index, temperature=1.0,
                 refine_nats=None):
    """(B,) bool: the rows the row kernel refines in the residual form, decided on the host in float64 from logits
    S (B, K) in the kernels' convention (without the -||z||^2 / (2 sigma^2 tau) term), for a shared pool (K, D) with
    endpoint_index and no prior: the same formula as `_row_kernel` and `_own_endpoint_check`. Exact logits give the
    decision without running the kernels."""
    f64 = torch.float64
    B, K = logits.shape
    z64, x64 = z.to(f64), pool.to(f64)
    a, sg, da, ds = (c.to(f64) for c in (alpha, sigma, d_alpha, d_sigma))
    tau = temperature.to(f64) if isinstance(temperature, torch.Tensor) else torch.full_like(a, temperature)
    inv = 1.0 / (2.0 * sg * sg * tau)
    zsq, xmax = (z64 * z64).sum(1), (x64 * x64).sum(1).max()
    g_dot, g_sum = logit_error_coefficients(z.shape[1], z.dtype)
    bound = (g_dot * 2.0 * a.abs() * (zsq * xmax).sqrt() + g_sum * a * a * xmax) * inv
    own = endpoint_index.long()
    own_ok = (own >= 0) & (own < K)
    s_own = (zsq - (z64 - a[:, None] * x64[own.clamp(0, K - 1)]).square().sum(1)) * inv
    others = torch.arange(K, device=logits.device)[None, :] != own[:, None]
    upper = torch.where(others, torch.exp(logits.to(f64) - s_own[:, None] + bound[:, None]), 0.0).sum(1)
    one_hot = own_ok & (upper * (da - ds * a / sg).abs().clamp_min(1.0) <= ONE_HOT_MASS)
    return (bound > (REFINE_NATS if refine_nats is None else refine_nats)) & ~one_hot


# The interpreter's row block of the two GEMMs (a test lowers it to get several blocks from few rows).
INTERPRET_BLOCK_M = 32


def _interpret_block(n: int, cap: int) -> int:
    # Few, large programs keep the interpreter fast; tl.dot needs every dimension >= 16.
    return max(16, min(cap, triton.next_power_of_2(n)))


class Logits(NamedTuple):
    """What the logits launch leaves for the row kernel."""

    logits: torch.Tensor  # (B, K) S, or the split dot products' destination (finished by the row kernel)
    part: torch.Tensor  # (3, B, NT) per-tile max, sum of exp, sum of squared exp
    xmax: torch.Tensor  # (NT,) per-tile max ||x||^2
    zsq: torch.Tensor  # (split_d, B) float64 parts of ||z||^2
    dots: torch.Tensor  # (split_d, B, K) parts of z.x when split, else a stand-in
    norms: torch.Tensor  # (K,) fp32 ||x_j||^2
    block_n: int  # the column tile of the partials
    split_d: int


def launch_logits(inp: KernelInputs) -> Logits:
    """The logits GEMM, split over D when its grid is under half a wave."""
    z, pool = inp.z, inp.pool
    B, D = z.shape
    K = pool.shape[0]
    f32 = dict(device=z.device, dtype=torch.float32)
    if INTERPRET:
        bm, bn = _interpret_block(B, INTERPRET_BLOCK_M), _interpret_block(K, 64)
    else:
        bm, bn = logits_tiles(B, K, z.dtype)
    bd = _interpret_block(D, 128) if INTERPRET else SPLIT_MIN_D
    nt = triton.cdiv(K, bn)
    # The row kernel finishes split logits one column tile after another: only a few tiles keep that short.
    split_d = 1
    if nt <= SPLIT_D_MAX_TILES:
        split_d = split_factor(triton.cdiv(B, bm) * nt, triton.cdiv(D, bd), sm_count(z.device))
    logits = torch.empty(B, K, **f32)
    out = Logits(logits, torch.empty(3, B, nt, **f32), torch.empty(nt, **f32),
                 torch.empty(split_d, B, device=z.device, dtype=torch.float64),
                 torch.empty(split_d, B, K, **f32) if split_d > 1 else logits,
                 squared_norms(pool) if inp.pool_sq_norms is None else inp.pool_sq_norms, bn, split_d)
    args = (z, pool, inp.alpha, inp.sigma, inp.tau, inp.tau_value, inp.row_labels, inp.pool_labels, inp.log_prior,
            inp.order, inp.n_active, *out[:6], B, K, D, nt, z.stride(0), pool.stride(0), split_d, size_bucket(B),
            size_bucket(K))
    flags = dict(ROW_TAU=inp.row_tau, HAS_LABELS=inp.has_labels, LABELS_2D=inp.labels_2d, HAS_PRIOR=inp.has_prior,
                 HAS_ACTIVE=inp.has_active, BLOCK_M=bm, BLOCK_N=bn)
    grid = (triton.cdiv(B, bm), nt, split_d)
    if INTERPRET:
        _logits_kernel[grid](*args, **flags, UPCAST=True, PRECISION="ieee", BLOCK_D=bd)
    else:
        _logits_tuned[grid](*args, **flags, UPCAST=False, PRECISION=DOT_PRECISION)
    return out


def launch_rows(inp: KernelInputs, lg: Logits, refine_nats: float | None = None):
    """The row kernel: returns (stats (4, B), the refined rows' velocity share (B, D), lse and ess (2, B), the mix's
    weights: (2, B, K) hi and lo parts in the candidates' dtype for 16-bit inputs, else (1, B, K) fp32)."""
    z, pool = inp.z, inp.pool
    B, D = z.shape
    K = pool.shape[0]
    nt = lg.part.shape[2]
    f32 = dict(device=z.device, dtype=torch.float32)
    stats, vt = torch.empty(4, B, **f32), torch.empty(B, D, **f32)
    lse_ess = (torch.zeros if inp.has_active else torch.empty)(2, B, **f32)  # gated-out rows get 0
    split_p = _split_weights(z.dtype)
    weights = torch.empty(2 if split_p else 1, B, K, device=z.device, dtype=z.dtype if split_p else torch.float32)
    g_dot, g_sum = logit_error_coefficients(D, z.dtype)
    _row_kernel[(B,)](z, pool, inp.alpha, inp.sigma, inp.tau, inp.tau_value, inp.d_alpha, inp.d_sigma,
                      inp.row_labels, inp.pool_labels, inp.log_prior, inp.endpoint, inp.noise, inp.endpoint_index,
                      inp.order, inp.n_active, *lg[:6], stats, vt, lse_ess[0], lse_ess[1], weights, B, K, D, nt,
                      z.stride(0), pool.stride(0), lg.split_d, REFINE_NATS if refine_nats is None else refine_nats,
                      g_dot, g_sum, ONE_HOT_MASS, ROW_TAU=inp.row_tau, HAS_LABELS=inp.has_labels,
                      LABELS_2D=inp.labels_2d, HAS_PRIOR=inp.has_prior, HAS_OWN=inp.has_own, RESIDUAL=inp.residual,
                      HAS_ACTIVE=inp.has_active, SPLIT_P=split_p, P_SCALE=_p_scale(z.dtype),
                      BLOCK_W=_interpret_block(K, 1024) if INTERPRET else ROW_BLOCK_W,
                      BLOCK_S=triton.next_power_of_2(lg.split_d), BLOCK_N=lg.block_n,
                      TOP=ROW_TOP, BLOCK_T=_interpret_block(nt, 128) if INTERPRET else ROW_BLOCK_T,
                      BLOCK_D=_interpret_block(D, 1024) if INTERPRET else ROW_BLOCK_D, num_warps=ROW_WARPS)
    return stats, vt, lse_ess, weights


def _split_weights(dtype) -> bool:
    # 16-bit candidates on a GPU: the weights as hi + lo in their dtype (a single bf16 weight would carry 8 bits);
    # the interpreter, which upcasts, keeps them in fp32.
    return dtype != torch.float32 and not INTERPRET


def _p_scale(dtype) -> float:
    return 2.0 ** 15 if dtype == torch.float16 else 1.0


def launch_mix(inp: KernelInputs, weights, stats, vt):
    """The mix (and, under half a wave, its fixed-order sum): returns the velocity (B, D)."""
    z, pool = inp.z, inp.pool
    B, D = z.shape
    K = pool.shape[0]
    if INTERPRET:
        bm, bk, bd = _interpret_block(B, INTERPRET_BLOCK_M), _interpret_block(K, 64), _interpret_block(D, 128)
    else:
        bm, bk, bd = MIX_BLOCK_M, None, MIX_BLOCK_D
    split_k = split_factor(triton.cdiv(B, bm) * triton.cdiv(D, bd), triton.cdiv(K, bk or SPLIT_MIN_K),
                           sm_count(z.device))
    velocity = (torch.zeros if inp.has_active else torch.empty)(B, D, device=z.device, dtype=torch.float32)
    partial = torch.empty(split_k, B, D, device=z.device, dtype=torch.float32) if split_k > 1 else velocity
    tail = (z, inp.endpoint, inp.noise, inp.alpha, inp.sigma, inp.d_alpha, inp.d_sigma, vt, velocity)
    args = (weights, pool, stats, *tail, partial, inp.order, inp.n_active, B, K, D, z.stride(0), pool.stride(0),
            split_k, size_bucket(B), size_bucket(K))
    flags = dict(RESIDUAL=inp.residual, HAS_ACTIVE=inp.has_active, SPLIT_P=_split_weights(z.dtype),
                 P_SCALE=_p_scale(z.dtype), BLOCK_M=bm, BLOCK_D=bd)
    grid = (triton.cdiv(B, bm), triton.cdiv(D, bd), split_k)
    if INTERPRET:
        _mix_kernel[grid](*args, **flags, UPCAST=True, PRECISION="ieee", BLOCK_K=bk)
    else:
        _mix_tuned[grid](*args, **flags, UPCAST=False, PRECISION=DOT_PRECISION)
    if split_k > 1:
        bm, bd = (bm, bd) if INTERPRET else (REDUCE_BLOCK_M, REDUCE_BLOCK_D)
        _mix_reduce_kernel[(triton.cdiv(B, bm), triton.cdiv(D, bd))](
            partial, stats, *tail, inp.order, inp.n_active, B, D, z.stride(0), split_k, RESIDUAL=inp.residual,
            HAS_ACTIVE=inp.has_active, BLOCK_M=bm, BLOCK_D=bd, num_warps=REDUCE_WARPS)
    return velocity


def shared_pool_posterior(inp: KernelInputs, refine_nats: float | None = None):
    """Triton posterior velocity for z (B, D) against a shared pool (K, D); returns fp32 (velocity, lse, ess).

    `refine_nats` overrides REFINE_NATS (float("inf"): the kernels without refinement)."""
    lg = launch_logits(inp)
    stats, vt, lse_ess, weights = launch_rows(inp, lg, refine_nats)
    return launch_mix(inp, weights, stats, vt), lse_ess[0], lse_ess[1]
