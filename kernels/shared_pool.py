"""Fused Triton kernels for a pool of K candidates shared by all B rows.

The op is attention with one head of size D = 1k..16k, too wide for a single-pass FlashAttention kernel, and the B x K
fp32 logits are small (2B/D of the input bytes), so it runs as two GEMM launches (the Cut-Cross-Entropy pattern):

  K1 `_logits_kernel`: S = (2 a z.x - a^2 ||x||^2) / (2 sigma^2 tau) + log_prior with the label mask from integer ids,
     fp32 accumulation, and per-(row, column tile) partials: max m, sum exp(S - m), sum exp(2(S - m)).
     The row-constant -||z||^2 / (2 sigma^2 tau) is dropped here (it cancels in the softmax and would cost
     precision) and added back to the reported lse.
  K2 `_mix_kernel`: combines the partials into lse and ESS, then mu = exp(S - lse) @ X with the velocity epilogue.

Only B x K logits and B x (K / BLOCK_N) partials are written: extra memory O(B K); no B x K x D tensor exists.

The fp32 expansion cannot resolve near-duplicate candidates as sigma -> 0 (its terms grow like 1/sigma^2). Between
K1 and K2 the wrapper bounds each row's logit error; rows above REFINE_NATS get exact float64 direct distances for
the few candidates within reach of their best one and a float64 velocity (`_refine_uncertain_rows`). This costs a
host sync and O(refined rows x D) work, and keeps the kernel path exact down to sigma = 1e-4.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Set by tests/conftest.py before this module is imported. The interpreter mishandles bf16 dots and bf16 arithmetic
# (triton 3.8), so operands are upcast to fp32 there; on a GPU the native 16-bit tensor-core dots run.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _logits_kernel(Z, X, ALPHA, SIGMA, TAU, ROW_LAB, POOL_LAB, LOG_PRIOR, S, ZSQ, XSQ, PART,
                   B, K, D, NT, stride_z, stride_x,
                   HAS_LABELS: tl.constexpr, LABELS_2D: tl.constexpr, HAS_PRIOR: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    mask_m = rm < B
    mask_n = rn < K
    rm64 = rm.to(tl.int64)

    row0 = (pid_m * BLOCK_M).to(tl.int64)
    # Tile offsets stay int32 around an int64 base; int64 pointer tiles would cost two registers per element.
    z_ptrs = Z + row0 * stride_z + (tl.arange(0, BLOCK_M)[:, None] * stride_z + rd[None, :])
    x_ptrs = X + (pid_n * BLOCK_N).to(tl.int64) * stride_x + (tl.arange(0, BLOCK_N)[:, None] * stride_x + rd[None, :])

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        mask_d = d0 + rd < D
        z = tl.load(z_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        # ||x||^2 in fp32 from the tile already on chip: a bf16 GEMM column would round 4096 to +-16.
        xf = x.to(tl.float32)
        xsq += tl.sum(xf * xf, axis=1)
        if UPCAST:
            acc = tl.dot(z.to(tl.float32), tl.trans(xf), acc, input_precision="ieee")
        else:
            acc = tl.dot(z, tl.trans(x), acc, input_precision=PRECISION)
        z_ptrs += BLOCK_D
        x_ptrs += BLOCK_D

    a = tl.load(ALPHA + rm, mask=mask_m, other=0.0)
    sg = tl.load(SIGMA + rm, mask=mask_m, other=1.0)
    tau = tl.load(TAU + rm, mask=mask_m, other=1.0)
    inv = 1.0 / (2.0 * sg * sg * tau)
    logit = (2.0 * a * inv)[:, None] * acc - (a * a * inv)[:, None] * xsq[None, :]
    valid = mask_m[:, None] & mask_n[None, :]
    tile = tl.arange(0, BLOCK_M)[:, None] * K + rn[None, :]
    if HAS_PRIOR:
        logit += tl.load(LOG_PRIOR + row0 * K + tile, mask=valid, other=0.0).to(tl.float32)
    if HAS_LABELS:
        row_lab = tl.load(ROW_LAB + rm, mask=mask_m, other=-1)
        if LABELS_2D:
            pool_lab = tl.load(POOL_LAB + row0 * K + tile, mask=valid, other=0)
        else:
            pool_lab = tl.load(POOL_LAB + rn, mask=mask_n, other=0)[None, :]
        valid &= (row_lab[:, None] < 0) | (pool_lab == row_lab[:, None])
    logit = tl.where(valid, logit, float("-inf"))
    tl.store(S + row0 * K + tile, logit, mask=mask_m[:, None] & mask_n[None, :])

    # Softmax partials of this column tile; a fully masked tile contributes m = -inf, l = q = 0.
    m = tl.max(logit, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp(logit - m_safe[:, None])
    part = PART + rm64 * NT + pid_n
    tl.store(part, m, mask=mask_m)
    tl.store(part + B * NT, tl.sum(p, axis=1), mask=mask_m)
    tl.store(part + 2 * B * NT, tl.sum(p * p, axis=1), mask=mask_m)
    if pid_m == 0:
        tl.store(XSQ + rn, xsq, mask=mask_n)
    if pid_n == 0:
        # ||z||^2 (only for the reported lse): one column of programs re-reads its z rows.
        zsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            mask_d = d0 + rd < D
            zf = tl.load(Z + rm64[:, None] * stride_z + (d0 + rd)[None, :], mask=mask_m[:, None] & mask_d[None, :],
                         other=0.0).to(tl.float32)
            zsq += tl.sum(zf * zf, axis=1)
        tl.store(ZSQ + rm, zsq, mask=mask_m)


@triton.jit
def _mix_kernel(S, X, PART, ZSQ, ALPHA, SIGMA, TAU, D_ALPHA, D_SIGMA, Z, ENDPOINT, NOISE, V, LSE, ESS,
                B, K, D, NT, stride_z, stride_x,
                RESIDUAL: tl.constexpr, UPCAST: tl.constexpr, SPLIT_P: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    rt = tl.arange(0, BLOCK_T)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_m = rm < B
    mask_d = rd < D
    rm64 = rm.to(tl.int64)

    # Prologue: merge the column-tile partials into the row max, sum-exp and sum of squared weights.
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    for t0 in range(0, NT, BLOCK_T):
        tmask = mask_m[:, None] & (t0 + rt < NT)[None, :]
        mt = tl.load(PART + rm64[:, None] * NT + (t0 + rt)[None, :], mask=tmask, other=float("-inf"))
        m = tl.maximum(m, tl.max(mt, axis=1))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    q = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t0 in range(0, NT, BLOCK_T):
        tmask = mask_m[:, None] & (t0 + rt < NT)[None, :]
        offs = rm64[:, None] * NT + (t0 + rt)[None, :]
        mt = tl.load(PART + offs, mask=tmask, other=float("-inf"))
        lt = tl.load(PART + B * NT + offs, mask=tmask, other=0.0)
        qt = tl.load(PART + 2 * B * NT + offs, mask=tmask, other=0.0)
        f = tl.where(mt == float("-inf"), 0.0, tl.exp(mt - m_safe[:, None]))
        l += tl.sum(lt * f, axis=1)
        q += tl.sum(qt * f * f, axis=1)
    lse_s = m_safe + tl.log(l)  # -inf for a row without admissible candidates: its P and velocity become NaN

    row0 = (pid_m * BLOCK_M).to(tl.int64)
    lm = tl.arange(0, BLOCK_M)
    s_ptrs = S + row0 * K + (lm[:, None] * K + rk[None, :])
    x_ptrs = X + (rk[:, None] * stride_x + rd[None, :])
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = k0 + rk < K
        s = tl.load(s_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=float("-inf"))
        p = tl.exp(s - lse_s[:, None])
        x = tl.load(x_ptrs, mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(p, x.to(tl.float32), acc, input_precision="ieee")
        elif SPLIT_P:
            # 16-bit candidates: P = hi + lo in the candidates' dtype keeps ~16 mantissa bits of each weight
            # (a single bf16 P would carry 8) for a second tensor-core dot in a memory-bound loop.
            p_hi = p.to(x.dtype)
            p_lo = (p - p_hi.to(tl.float32)).to(x.dtype)
            acc = tl.dot(p_hi, x, acc)
            acc = tl.dot(p_lo, x, acc)
        else:
            acc = tl.dot(p, x, acc, input_precision=PRECISION)
        s_ptrs += BLOCK_K
        x_ptrs += BLOCK_K * stride_x

    a = tl.load(ALPHA + rm, mask=mask_m, other=0.0)
    sg = tl.load(SIGMA + rm, mask=mask_m, other=1.0)
    da = tl.load(D_ALPHA + rm, mask=mask_m, other=0.0)
    ds = tl.load(D_SIGMA + rm, mask=mask_m, other=0.0)
    tile = lm[:, None] * stride_z + rd[None, :]
    mask_md = mask_m[:, None] & mask_d[None, :]
    if RESIDUAL:
        x_own = tl.load(ENDPOINT + row0 * stride_z + tile, mask=mask_md, other=0.0).to(tl.float32)
        v = (da - ds * a / sg)[:, None] * (acc - x_own) + da[:, None] * x_own
        eps = tl.load(NOISE + row0 * stride_z + tile, mask=mask_md, other=0.0).to(tl.float32)
        v += ds[:, None] * eps
    else:
        zt = tl.load(Z + row0 * stride_z + tile, mask=mask_md, other=0.0).to(tl.float32)
        v = (da - ds * a / sg)[:, None] * acc + (ds / sg)[:, None] * zt
    tl.store(V + row0 * D + (lm[:, None] * D + rd[None, :]), v, mask=mask_md)

    if pid_d == 0:
        tau = tl.load(TAU + rm, mask=mask_m, other=1.0)
        zsq = tl.load(ZSQ + rm, mask=mask_m, other=0.0)
        tl.store(LSE + rm, lse_s - zsq / (2.0 * sg * sg * tau), mask=mask_m)
        tl.store(ESS + rm, tl.where(m == float("-inf"), 0.0, l * l / q), mask=mask_m)


# GPU configurations, chosen so that ptxas reports no spills (kernels/compile_check.py); not yet tuned on a GPU.
# K1's BLOCK_N is fixed (it sizes the partials buffer); the rest is tuned per (B, K, D).
LOGITS_BLOCK_N = 64
LOGITS_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_D": bd}, num_warps=w, num_stages=st)
    for bm, bd, w, st in [(64, 64, 8, 3), (128, 64, 8, 3), (128, 32, 8, 4)]
]
MIX_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=st)
    for bm, bk, bd, w, st in [(64, 64, 128, 8, 3), (32, 64, 128, 4, 3), (64, 32, 64, 4, 3)]
]
_logits_tuned = triton.autotune(LOGITS_CONFIGS, key=["B", "K", "D", "HAS_LABELS", "HAS_PRIOR"])(_logits_kernel)
_mix_tuned = triton.autotune(MIX_CONFIGS, key=["B", "K", "D", "RESIDUAL"])(_mix_kernel)
BLOCK_T = 32


# fp32 inputs: "tf32x3" keeps ~fp32 accuracy on the tensor cores (plain TF32 would put 1e-3 relative error into
# logits that are divided by 2 sigma^2). 16-bit dots ignore it.
DOT_PRECISION = "tf32x3"


def _interpret_block(n: int, cap: int) -> int:
    # Few, large programs keep the interpreter fast; tl.dot needs every dimension >= 16.
    return max(16, min(cap, triton.next_power_of_2(n)))


# A row is refined when its logits may be off by more than this many nats (see _refine_uncertain_rows).
REFINE_NATS = 0.05
# Candidates more than this many nats (plus twice the error bound) below a row's best get weight < e^-30.
REFINE_MARGIN = 30.0


def _refine_uncertain_rows(logits, part, zsq, xsq, z, pool, alpha, sigma, tau, log_prior, pair_chunk=1 << 22):
    """Replace the fp32-expansion logits by exact ones where the expansion cannot resolve the softmax.

    K1's logits (2 a z.x - a^2 ||x||^2) / (2 sigma^2 tau) cancel as sigma -> 0: the terms grow like 1/sigma^2 while
    the differences that matter stay O(D), so near-duplicate candidates at small sigma would get weights off by
    whole nats. With u = 2^-24, |error| <= u (sqrt(D) + 8)(2|a| ||z|| max||x|| + a^2 max||x||^2) / (2 sigma^2 tau)
    per row (fp32 accumulation with random rounding; ||z||^2 added for the lse). Rows whose bound exceeds REFINE_NATS
    keep only the candidates within 2 * bound + REFINE_MARGIN of their best approximate logit (usually one or a
    few), with exact float64 direct distances ||z - a x_j||^2 (full logits, so that row's ZSQ becomes 0); their
    softmax partials are rebuilt and their velocity recomputed in float64 (`_refined_velocity`).
    O(pairs * D) extra work and one host sync per call; REFINE_NATS = inf switches it off.
    """
    B, K = logits.shape
    D = z.shape[1]
    inv = 1.0 / (2.0 * sigma * sigma * tau)
    xmax2 = xsq.max()
    # ||z||^2 enters through the reported lse = lse' - ||z||^2 / (2 sigma^2 tau).
    magnitude = zsq + 2.0 * alpha.abs() * zsq.sqrt() * xmax2.sqrt() + alpha * alpha * xmax2
    bound = 2.0 ** -24 * (D ** 0.5 + 8.0) * magnitude * inv
    best = part[0].max(dim=1).values
    reach = best - 2.0 * bound - REFINE_MARGIN
    # Rows with one candidate in reach are refined too: their weights are right, but their lse (which the trainer
    # compares with the own endpoint's closed-form logit) and their mu - x_own / sigma are not. Usually one pair.
    rows = ((bound > REFINE_NATS) & torch.isfinite(best)).nonzero()[:, 0]
    if rows.numel() == 0:
        return None
    sub = logits[rows]
    keep = sub >= reach[rows, None]  # -inf (masked) entries drop out
    pair_row, pair_col = keep.nonzero(as_tuple=True)
    exact = torch.empty(pair_row.numel(), device=logits.device, dtype=torch.float64)
    step = max(1, pair_chunk // D)
    for p0 in range(0, pair_row.numel(), step):
        r, c = rows[pair_row[p0:p0 + step]], pair_col[p0:p0 + step]
        diff = z[r].double() - alpha[r, None].double() * pool[c].double()
        exact[p0:p0 + step] = -(diff * diff).sum(1) * inv[r].double()
        if log_prior is not None:
            exact[p0:p0 + step] += log_prior[r, c].double()
    refined = torch.full_like(sub, float("-inf"))
    refined[pair_row, pair_col] = exact.float()
    logits[rows] = refined
    m = exact.new_full((rows.numel(),), float("-inf")).scatter_reduce(0, pair_row, exact, "amax")
    p = torch.exp(exact - m[pair_row])
    part[:, rows] = torch.tensor([float("-inf"), 0.0, 0.0], device=part.device)[:, None, None]
    part[0, rows, 0] = m.float()
    part[1, rows, 0] = torch.zeros_like(m).index_add_(0, pair_row, p).float()
    part[2, rows, 0] = torch.zeros_like(m).index_add_(0, pair_row, p * p).float()
    zsq[rows] = 0.0
    lse = m + torch.log(torch.zeros_like(m).index_add_(0, pair_row, p))
    return rows, pair_row, pair_col, torch.exp(exact - lse[pair_row])


def _refined_velocity(refined, velocity, z, pool, alpha, sigma, d_alpha, d_sigma, endpoint, noise,
                      pair_chunk=1 << 22):
    """Velocity of the refined rows in float64 from their few candidates: mu - x_own = sum_j w_j (x_j - x_own) is
    multiplied by ~1/sigma there, which an fp32 GEMM accumulation of mu (error ~2^-24 |x|) cannot afford."""
    rows, pair_row, pair_col, w = refined
    D = z.shape[1]
    f64 = torch.float64
    centre = endpoint[rows].to(f64) if endpoint is not None else torch.zeros(rows.numel(), D, dtype=f64,
                                                                              device=z.device)
    delta = torch.zeros(rows.numel(), D, dtype=f64, device=z.device)
    step = max(1, pair_chunk // D)
    for p0 in range(0, pair_row.numel(), step):
        r, c = pair_row[p0:p0 + step], pair_col[p0:p0 + step]
        delta.index_add_(0, r, w[p0:p0 + step, None] * (pool[c].to(f64) - centre[r]))
    a, s = alpha[rows].to(f64)[:, None], sigma[rows].to(f64)[:, None]
    da, ds = d_alpha[rows].to(f64)[:, None], d_sigma[rows].to(f64)[:, None]
    if endpoint is not None:  # residual form; delta = mu - x_own
        v = da * centre + ds * noise[rows].to(f64) + (da - ds * a / s) * delta
    else:  # delta = mu
        v = da * delta + ds * (z[rows].to(f64) - a * delta) / s
    velocity[rows] = v.float()


def shared_pool_posterior(z, pool, alpha, sigma, d_alpha, d_sigma, tau, *, row_labels=None, pool_labels=None,
                          log_prior=None, endpoint=None, noise=None):
    """Triton posterior velocity for z (B, D) against a shared pool (K, D); returns fp32 (velocity, lse, ess)."""
    B, D = z.shape
    K = pool.shape[0]
    z, pool = z.contiguous(), pool.contiguous()
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
    alpha, sigma, d_alpha, d_sigma, tau = map(f32, (alpha, sigma, d_alpha, d_sigma, tau))
    dev = z.device
    upcast = INTERPRET
    precision = DOT_PRECISION

    block_n = _interpret_block(K, 64) if INTERPRET else LOGITS_BLOCK_N
    nt = triton.cdiv(K, block_n)
    logits = torch.empty(B, K, device=dev, dtype=torch.float32)
    part = torch.empty(3, B, nt, device=dev, dtype=torch.float32)
    zsq = torch.empty(B, device=dev, dtype=torch.float32)
    xsq = torch.empty(K, device=dev, dtype=torch.float32)
    has_labels = row_labels is not None
    has_prior = log_prior is not None
    row_lab = row_labels.contiguous() if has_labels else zsq
    pool_lab = pool_labels.contiguous() if has_labels else zsq
    prior = log_prior.contiguous() if has_prior else zsq

    args = (z, pool, alpha, sigma, tau, row_lab, pool_lab, prior, logits, zsq, xsq, part, B, K, D, nt, z.stride(0),
            pool.stride(0))
    flags = dict(HAS_LABELS=has_labels, LABELS_2D=has_labels and pool_lab.dim() == 2, HAS_PRIOR=has_prior,
                 UPCAST=upcast, PRECISION=precision, BLOCK_N=block_n)
    if INTERPRET:
        bm, bd = _interpret_block(B, 32), _interpret_block(D, 128)
        _logits_kernel[(triton.cdiv(B, bm), nt)](*args, **flags, BLOCK_M=bm, BLOCK_D=bd)
    else:
        _logits_tuned[lambda meta: (triton.cdiv(B, meta["BLOCK_M"]), nt)](*args, **flags)

    refined = _refine_uncertain_rows(logits, part, zsq, xsq, z, pool, alpha, sigma, tau,
                                     log_prior if has_prior else None)

    velocity = torch.empty(B, D, device=dev, dtype=torch.float32)
    lse = torch.empty(B, device=dev, dtype=torch.float32)
    ess = torch.empty(B, device=dev, dtype=torch.float32)
    residual = endpoint is not None
    end = endpoint.contiguous() if residual else z
    eps = noise.contiguous() if residual else z
    args = (logits, pool, part, zsq, alpha, sigma, tau, d_alpha, d_sigma, z, end, eps, velocity, lse, ess,
            B, K, D, nt, z.stride(0), pool.stride(0))
    flags = dict(RESIDUAL=residual, UPCAST=upcast, SPLIT_P=z.dtype != torch.float32, PRECISION=precision,
                 BLOCK_T=BLOCK_T)
    if INTERPRET:
        bm, bk, bd = _interpret_block(B, 32), _interpret_block(K, 64), _interpret_block(D, 128)
        _mix_kernel[(triton.cdiv(B, bm), triton.cdiv(D, bd))](*args, **flags, BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd)
    else:
        _mix_tuned[lambda meta: (triton.cdiv(B, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_D"]))](*args, **flags)
    if refined is not None:
        _refined_velocity(refined, velocity, z, pool, alpha, sigma, d_alpha, d_sigma, endpoint, noise)
    return velocity, lse, ess
