"""Memory-bounded float64-grade PyTorch reference of the posterior-velocity op: the CPU backend (`backend="torch"`).

Distances are float64: for a shared pool the GEMM expansion ||z||^2 - 2 a z.x + a^2 ||x||^2 over chunks of candidates
(its cancellation as sigma -> 0 costs ~1e-16 D / sigma^2 nats in float64, where fp32 would lose whole nats), for
per-row pools the direct ||z - a x_j||^2 over tiles of rows x candidates. Every temporary is capped by `chunk_elems`
elements, so the peak extra memory is O(B*K + B*D + chunk_elems) and no B x K x D tensor ever exists.
Everything after the input cast runs in float64 (B x K logits, B x D mean, chunk-sized temporaries), so the result
is float64-grade and returned as float32 (float64 for float64 inputs, which the tests use as an oracle).
Per-row pools read through `pool_index` (a class bank) share each distinct pool's GEMMs among the rows that read it,
several pools per batched GEMM. A shared pool larger than a chunk whose labels ascend (the exact source holds its
items in class order) solves each labelled row on its class's slice alone. Grouping the rows reads the index or the
labels on the host: the places this backend waits for the device.
"""
from __future__ import annotations

import torch


def default_chunk_elems(device: torch.device) -> int:
    # float64 elements per temporary. On the CPU 4 MiB, so a chunk stays in the last-level cache across its GEMMs
    # (one core, bench/results/reference_cpu.jsonl: 1.2-3.1x faster than 32 MiB chunks for large pools, the same
    # within noise for small ones); on a GPU 512 MiB (fewer, larger launches).
    return 1 << 26 if device.type == "cuda" else 1 << 19


def posterior_velocity_reference(z, pool, alpha, sigma, d_alpha, d_sigma, temperature, *, row_labels=None,
                                 pool_labels=None, log_prior=None, endpoint=None, noise=None, pool_index=None,
                                 chunk_elems=None):
    """Reference posterior velocity on already-validated inputs.

    z (B, D); pool (K, D) shared, or (B, K, D) per row, or (N, K, D) read through pool_index (B,); alpha, sigma, d_alpha, d_sigma (B,); temperature a float or
    (B,); row_labels (B,) with pool_labels (K,) or (B, K); log_prior (B, K); endpoint, noise (B, D).
    Returns (velocity (B, D), lse (B,), ess (B,)) in float32, or float64 for float64 inputs.
    """
    ct = torch.float64 if z.dtype == torch.float64 else torch.float32
    B, D = z.shape
    shared = pool.dim() == 2
    K = pool.shape[-2]

    if pool_index is not None:
        # A class bank read through pool_index: rows that read the same pool share its GEMMs, several pools per
        # batched GEMM (no B x K x D gather).
        return _grouped_by_pool(z, pool, pool_index, alpha, sigma, d_alpha, d_sigma, temperature, row_labels,
                                pool_labels, log_prior, endpoint, noise, chunk_elems)
    chunk_elems = chunk_elems or default_chunk_elems(z.device)
    if shared and row_labels is not None and pool_labels.dim() == 1 and K * D > chunk_elems and _ascending(pool_labels):
        # A large pool sorted by label (the exact source's): each labelled row is solved on its class's slice.
        return _by_class_slice(z, pool, alpha, sigma, d_alpha, d_sigma, temperature, row_labels, pool_labels,
                               log_prior, endpoint, noise, chunk_elems)
    k_chunk = max(1, min(K, chunk_elems // D))
    r_chunk = max(1, min(B, chunk_elems // (k_chunk * D)))

    # Distances and softmax in float64: near sigma -> 0, z - a x_j cancels to O(sigma) and an fp32 product a x_j
    # would put eps / sigma relative error into it (the kernels get the same exactness from a fused multiply-add).
    f64 = torch.float64
    z64, a64 = z.to(f64), alpha.to(f64)
    tau = temperature.to(f64) if isinstance(temperature, torch.Tensor) else float(temperature)
    scale = 1.0 / (2.0 * sigma.to(f64) ** 2 * tau)

    # Logits: the full -||z - a x||^2 / (2 sigma^2 tau), so the logsumexp is the contract's lse as is.
    logits = torch.empty(B, K, dtype=f64, device=z.device)
    if shared:
        # Shared pool: the float64 expansion ||z||^2 - 2 a z.x + a^2 ||x||^2, one GEMM per chunk of candidates
        # (no rows x candidates x D temporary). Its absolute error ~1e-16 D / sigma^2 nats stays far below fp32's.
        zsq = (z64 * z64).sum(1)
        for k0 in range(0, K, k_chunk):
            k1 = min(K, k0 + k_chunk)
            xk = pool[k0:k1].to(f64)
            xsq = torch.linalg.vector_norm(xk, dim=1).square_()  # one pass, no chunk-sized temporary
            dist = zsq[:, None] - 2.0 * a64[:, None] * (z64 @ xk.T) + (a64 * a64)[:, None] * xsq
            logits[:, k0:k1] = dist.clamp_min_(0.0) * -scale[:, None]
    else:
        # Per-row pools: every candidate is read once anyway, so the direct difference costs nothing extra.
        for k0 in range(0, K, k_chunk):
            k1 = min(K, k0 + k_chunk)
            for r0 in range(0, B, r_chunk):
                r1 = min(B, r0 + r_chunk)
                diff = z64[r0:r1, None, :] - a64[r0:r1, None, None] * pool[r0:r1, k0:k1].to(f64)
                logits[r0:r1, k0:k1] = diff.square_().sum(-1) * -scale[r0:r1, None]
    lse, w, ess = _weights(logits, row_labels, pool_labels, log_prior)

    # mu in float64: the residual form multiplies mu - x_own by ~1/sigma, so an fp32 mu near x_own would lose
    # digits. Per-row pools accumulate mu - x_own = sum_j w_j (x_j - x_own) directly.
    centre = endpoint.to(f64) if (endpoint is not None and not shared) else None
    mu = torch.zeros(B, D, dtype=f64, device=z.device)
    for k0 in range(0, K, k_chunk):
        k1 = min(K, k0 + k_chunk)
        if shared:
            mu += w[:, k0:k1] @ pool[k0:k1].to(f64)
        else:
            for r0 in range(0, B, r_chunk):
                r1 = min(B, r0 + r_chunk)
                x = pool[r0:r1, k0:k1].to(f64)
                if centre is not None:
                    x = x - centre[r0:r1, None]
                mu[r0:r1] += torch.bmm(w[r0:r1, None, k0:k1], x)[:, 0]

    velocity = _velocity(mu, z64, a64, sigma, d_alpha, d_sigma, endpoint, noise, centred=centre is not None)
    return velocity.to(ct), lse.to(ct), ess.to(ct)


def _weights(logits, row_labels, pool_labels, log_prior):
    """(lse, w, ess) of float64 logits (R, K) (changed in place): the prior added, inadmissible candidates masked."""
    if log_prior is not None:
        logits += log_prior.to(logits.dtype)
    if row_labels is not None:
        pl = pool_labels if pool_labels.dim() == 2 else pool_labels[None, :]
        admissible = (row_labels[:, None] < 0) | (pl == row_labels[:, None])
        logits.masked_fill_(~admissible, float("-inf"))
    lse = torch.logsumexp(logits, dim=1)  # -inf for a row with no admissible candidate
    w = torch.exp(logits - lse[:, None])  # NaN on such a row, which makes its velocity NaN as documented
    ess = torch.where(torch.isneginf(lse), torch.zeros_like(lse), 1.0 / (w * w).sum(1))
    return lse, w, ess


def _velocity(mu, z64, a64, sigma, d_alpha, d_sigma, endpoint, noise, *, centred: bool):
    """The float64 velocity from the posterior mean (mu - x_own when `centred`)."""
    f64 = torch.float64
    da, ds, s = d_alpha.to(f64)[:, None], d_sigma.to(f64)[:, None], sigma.to(f64)[:, None]
    if endpoint is not None:
        # Residual form: u + (d_alpha - d_sigma alpha / sigma)(mu - x_own); stays accurate as sigma -> 0.
        x_own = endpoint.to(f64)
        u = da * x_own + ds * noise.to(f64)
        delta = mu if centred else mu - x_own
        return u + (da - ds * a64[:, None] / s) * delta
    return da * mu + ds * (z64 - a64[:, None] * mu) / s


def _grouped_by_pool(z, pool, pool_index, alpha, sigma, d_alpha, d_sigma, temperature, row_labels, pool_labels,
                     log_prior, endpoint, noise, chunk_elems):
    """Per-row pools read through pool_index: rows that read the same pool share its GEMMs (float64 expansion, as
    for a shared pool). Pools are taken in chunks of several, largest group first, each chunk's rows padded to its
    largest group: (pools, rows, D) x (pools, D, K) batched GEMMs, so a batch of a thousand classes costs a few
    launches, not one small problem per class. A pool too large for a chunk is solved on its own, in chunks of K."""
    ct = torch.float64 if z.dtype == torch.float64 else torch.float32
    f64 = torch.float64
    B, D = z.shape
    K = pool.shape[1]
    chunk_elems = chunk_elems or default_chunk_elems(z.device)
    sorted_index, order = pool_index.sort(stable=True)
    pools, counts = torch.unique_consecutive(sorted_index, return_counts=True)
    starts = counts.cumsum(0) - counts
    by_size = counts.argsort(descending=True, stable=True)
    sizes = counts[by_size].tolist()  # a host read

    z64, a64 = z.to(f64), alpha.to(f64)
    tau = temperature.to(f64) if isinstance(temperature, torch.Tensor) else float(temperature)
    scale = 1.0 / (2.0 * sigma.to(f64) ** 2 * tau)
    zsq = (z64 * z64).sum(1)
    mu = torch.zeros(B, D, dtype=f64, device=z.device)  # rows solved alone get theirs below
    lse, ess = torch.zeros(B, dtype=f64, device=z.device), torch.zeros(B, dtype=f64, device=z.device)
    per_row = lambda t, rows: None if t is None else t[rows]  # noqa: E731
    alone = []
    g0 = 0
    while g0 < len(sizes):
        rows_per_pool = sizes[g0]
        if (K + rows_per_pool) * D > chunk_elems:  # one pool alone exceeds a chunk: its own call, chunked over K
            rows = order[starts[by_size[g0]]:][:rows_per_pool]
            alone.append((rows, posterior_velocity_reference(
                z[rows], pool[pools[by_size[g0]]], alpha[rows], sigma[rows], d_alpha[rows], d_sigma[rows],
                temperature[rows] if isinstance(temperature, torch.Tensor) else temperature,
                row_labels=per_row(row_labels, rows), pool_labels=per_row(pool_labels, rows),
                log_prior=per_row(log_prior, rows), endpoint=per_row(endpoint, rows), noise=per_row(noise, rows),
                chunk_elems=chunk_elems)))
            g0 += 1
            continue
        n = max(1, min(len(sizes) - g0, chunk_elems // ((K + rows_per_pool) * D)))
        groups = by_size[g0:g0 + n]
        slot = torch.arange(rows_per_pool, device=z.device)
        valid = slot[None, :] < counts[groups][:, None]  # (n, R): padding slots repeat the group's first row
        rows = order[starts[groups][:, None] + torch.where(valid, slot[None, :], 0)]  # (n, R)
        x = pool.index_select(0, pools[groups]).to(f64)  # (n, K, D)
        dots = torch.bmm(z64[rows], x.transpose(1, 2))  # (n, R, K)
        xsq = torch.linalg.vector_norm(x, dim=-1).square_()  # (n, K); one pass, no (n, K, D) temporary
        a = a64[rows][..., None]
        dist = zsq[rows][..., None] - 2.0 * a * dots + a * a * xsq[:, None, :]
        logits = (dist.clamp_min_(0.0) * -scale[rows][..., None]).reshape(-1, K)
        flat = rows.reshape(-1)
        l, w, e = _weights(logits, per_row(row_labels, flat), per_row(pool_labels, flat), per_row(log_prior, flat))
        m = torch.bmm(w.reshape(n, rows_per_pool, K), x)  # padding rows' means are computed, then dropped
        keep = valid.reshape(-1)
        mu[flat[keep]], lse[flat[keep]], ess[flat[keep]] = m.reshape(-1, D)[keep], l[keep], e[keep]
        g0 += n
    velocity = _velocity(mu, z64, a64, sigma, d_alpha, d_sigma, endpoint, noise, centred=False).to(ct)
    lse, ess = lse.to(ct), ess.to(ct)
    for rows, (v, l, e) in alone:
        velocity[rows], lse[rows], ess[rows] = v, l, e
    return velocity, lse, ess


def _ascending(labels: torch.Tensor) -> bool:
    return bool((labels[1:] >= labels[:-1]).all())


def _by_class_slice(z, pool, alpha, sigma, d_alpha, d_sigma, temperature, row_labels, pool_labels, log_prior,
                    endpoint, noise, chunk_elems):
    """A shared pool whose labels ascend: the candidates a row with label c admits are the slice of label c, so
    its rows are solved on that slice alone (unlabelled rows, label < 0, on the whole pool), one call per label
    present. The masked candidates weigh exp(-inf) = 0 either way: the same result, a labelled row's GEMMs a tenth
    as large on ten classes. A label with no candidate gets what the op documents (lse -inf, ess 0, NaN velocity)."""
    ct = torch.float64 if z.dtype == torch.float64 else torch.float32
    B, D = z.shape
    K = pool.shape[0]
    labels, group = torch.unique(row_labels.clamp_min(-1), return_inverse=True)
    lo = torch.where(labels < 0, 0, torch.searchsorted(pool_labels, labels))
    hi = torch.where(labels < 0, K, torch.searchsorted(pool_labels, labels, right=True))
    velocity = torch.full((B, D), float("nan"), dtype=ct, device=z.device)
    lse = torch.full((B,), float("-inf"), dtype=ct, device=z.device)
    ess = torch.zeros(B, dtype=ct, device=z.device)
    for g, (k0, k1) in enumerate(zip(lo.tolist(), hi.tolist())):  # host reads (with `_ascending`)
        if k1 == k0:
            continue
        rows = (group == g).nonzero().squeeze(1)
        velocity[rows], lse[rows], ess[rows] = posterior_velocity_reference(
            z[rows], pool[k0:k1], alpha[rows], sigma[rows], d_alpha[rows], d_sigma[rows],
            temperature[rows] if isinstance(temperature, torch.Tensor) else temperature,
            log_prior=None if log_prior is None else log_prior[rows, k0:k1],
            endpoint=None if endpoint is None else endpoint[rows], noise=None if noise is None else noise[rows],
            chunk_elems=chunk_elems)
    return velocity, lse, ess
