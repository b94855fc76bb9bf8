"""Public entry point: argument validation and backend dispatch for the posterior-velocity op."""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from .reference import posterior_velocity_reference

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BACKENDS = ("auto", "torch", "triton")


class PosteriorTarget(NamedTuple):
    velocity: torch.Tensor  # (B, *S) float32: the posterior-mean velocity target
    lse: torch.Tensor  # (B,) float32: logsumexp_j of the full logits; -inf when no candidate is admissible
    ess: torch.Tensor  # (B,) float32: 1 / sum_j w_ij^2, in [1, admissible count]; 0 when none is admissible


def combine_posteriors(*parts: PosteriorTarget) -> PosteriorTarget:
    """The op over the union of disjoint candidate sets, from its results on each set (same z, coefficients,
    temperature and form): the velocity is affine in the weighted mean, so the parts mix with weights
    exp(lse_p - lse), and 1 / ESS = sum_p exp(2 (lse_p - lse)) / ESS_p. A part without an admissible candidate
    adds nothing; a row with none in any part gets lse = -inf, ess = 0 and a NaN velocity, as the op gives."""
    lse = torch.logsumexp(torch.stack([p.lse for p in parts]), 0)
    none = torch.isneginf(lse)
    per_row = (-1,) + (1,) * (parts[0].velocity.dim() - 1)  # broadcasts a (B,) factor over a row's features
    velocity = torch.zeros_like(parts[0].velocity)
    inv_ess = torch.zeros_like(lse)
    for p in parts:
        share = torch.where(torch.isneginf(p.lse) | none, 0.0, torch.exp(p.lse - lse))
        used = share > 0
        velocity += torch.where(used.view(per_row), share.view(per_row) * p.velocity, 0.0)
        inv_ess += torch.where(used, share * share / p.ess, 0.0)
    velocity = torch.where(none.view(per_row), float("nan"), velocity)
    return PosteriorTarget(velocity, lse, torch.where(none, 0.0, 1.0 / inv_ess))


def _check_tensor(name, t, shape, device, *, floating=None, integer=False):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {tuple(shape)}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but z is on {device}")
    if floating is not None and t.dtype not in floating:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in floating]}, got {t.dtype}")
    if integer and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")


def posterior_velocity(z, pool, alpha, sigma, d_alpha, d_sigma, *, row_labels=None, pool_labels=None,
                       log_prior=None, temperature=1.0, endpoint=None, noise=None, endpoint_index=None,
                       pool_index=None, active=None, pool_sq_norms=None, backend="auto"):
    """Self-normalised importance-sampling estimate of the posterior-mean flow-matching velocity.

    Logits l_ij = -||z_i - alpha_i x_j||^2 / (2 sigma_i^2 tau_i) + log_prior_ij over the candidates x_j admitted by
    the labels; w = softmax_j(l), mu_i = sum_j w_ij x_j. The velocity is
    d_alpha mu + d_sigma (z - alpha mu) / sigma, or, when `endpoint` and `noise` (the row's own x and eps) are given,
    the equal but sigma -> 0 stable u + (d_alpha - d_sigma alpha / sigma)(mu - endpoint), u = d_alpha x + d_sigma eps.

    Args:
        z: (B, *S) noisy points, float32/float16/bfloat16 (float64 with the torch backend).
        pool: (K, *S) candidates shared by every row, or (B, K, *S) one set per row; same dtype as z. With
            `pool_index`, per-row pools are (N, K, *S) for any N and row i reads pool[pool_index[i]] in place (a
            class bank: no (B, K, *S) copy); only the last dims need be contiguous.
        alpha, sigma, d_alpha, d_sigma: (B,) path coefficients at each row's t (sigma > 0).
        row_labels: (B,) integer labels; a negative label admits every candidate. Needs `pool_labels`,
            (K,) or (B, K) integers: candidate j is admissible for row i only if the labels are equal.
        log_prior: (B, K) added to the logits.
        temperature: positive float or (B,) tensor dividing the likelihood term.
        endpoint, noise: (B, *S), both or neither: selects the residual form.
        endpoint_index: (B,) integers, the pool index of each row's own endpoint in a shared pool (negative: not in
            the pool). Optional; the shared-pool kernels then always compute that candidate's logit exactly (near
            sigma -> 0 it carries the weight). Per-row pools and the reference compute every logit exactly.
        pool_index: (B,) integers in [0, N), the per-row pool each row reads (not checked: no host sync).
        active: (B,) bool, the rows to compute (a gate on t): the others are not computed, their velocity, lse and ess
            are 0. The Triton kernels skip them without a host sync: a shared pool's rows are ordered on the device
            with the active ones first, so its GEMMs walk only the row blocks that hold them; the reference solves
            only the active rows.
        pool_sq_norms: (K,) float32 ||x_j||^2 of a shared pool, each a float64 sum rounded once to fp32 (what
            `pool_squared_norms(pool)` returns): pass it for a pool that serves several calls; without it the
            Triton path computes it (one more launch). The refinement bound assumes that accuracy. The reference
            ignores it.
        backend: "torch" (memory-bounded float64-grade reference), "triton" (fused kernels; CUDA, or CPU tensors
            when TRITON_INTERPRET=1), or "auto" (Triton on CUDA tensors except float64, the reference elsewhere).
            The op has no autograd: it builds a stop-gradient target. The Triton path never waits for the device
            (no host sync), so it does not check tensor values: a temperature <= 0 there gives NaN or inf.

    Returns:
        PosteriorTarget(velocity (B, *S), lse (B,), ess (B,)), float32 (float64 for float64 inputs). A row without
        an admissible candidate gets lse = -inf, ess = 0 and a NaN velocity.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if not isinstance(z, torch.Tensor) or z.dim() < 2:
        raise ValueError(f"z must be a tensor of shape (B, *S) with at least 2 dims, got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    floats = _KERNEL_DTYPES + (torch.float64,)
    if z.dtype not in floats:
        raise ValueError(f"z must be float32, float16, bfloat16 or float64, got {z.dtype}")
    B, S, device = z.shape[0], tuple(z.shape[1:]), z.device
    if B == 0 or math.prod(S) == 0:
        raise ValueError(f"z must have at least one row and one feature, got shape {tuple(z.shape)}")
    D = math.prod(S)

    if not isinstance(pool, torch.Tensor):
        raise ValueError(f"pool must be a torch.Tensor, got {type(pool).__name__}")
    if pool.dim() == z.dim() and tuple(pool.shape[1:]) == S:
        shared, K = True, pool.shape[0]
    elif (pool.dim() == z.dim() + 1 and tuple(pool.shape[2:]) == S
          and (pool.shape[0] == B or (pool_index is not None and pool.shape[0] > 0))):
        shared, K = False, pool.shape[1]
    else:
        raise ValueError(f"pool must have shape (K, *S) = (K, {', '.join(map(str, S))}) or (B, K, *S) with B = {B} "
                         f"(any first size with pool_index), got {tuple(pool.shape)}")
    if pool_index is not None:
        if shared:
            raise ValueError("pool_index selects per-row pools: pool must have shape (N, K, *S)")
        _check_tensor("pool_index", pool_index, (B,), device, integer=True)
    if K == 0:
        raise ValueError("pool must hold at least one candidate (K >= 1)")
    if pool.device != device:
        raise ValueError(f"pool is on {pool.device} but z is on {device}")
    if pool.dtype != z.dtype:
        raise ValueError(f"pool has dtype {pool.dtype} but z has {z.dtype}; cast them to one dtype")

    coef_dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    for name, t in (("alpha", alpha), ("sigma", sigma), ("d_alpha", d_alpha), ("d_sigma", d_sigma)):
        _check_tensor(name, t, (B,), device, floating=coef_dtypes)

    if (row_labels is None) != (pool_labels is None):
        missing = "pool_labels" if pool_labels is None else "row_labels"
        raise ValueError(f"row_labels and pool_labels must be given together; {missing} is missing")
    if row_labels is not None:
        _check_tensor("row_labels", row_labels, (B,), device, integer=True)
        if not isinstance(pool_labels, torch.Tensor) or tuple(pool_labels.shape) not in ((K,), (B, K)):
            raise ValueError(f"pool_labels must have shape (K,) = ({K},) or (B, K) = ({B}, {K}), got "
                             f"{tuple(pool_labels.shape) if isinstance(pool_labels, torch.Tensor) else pool_labels}")
        _check_tensor("pool_labels", pool_labels, pool_labels.shape, device, integer=True)
    if log_prior is not None:
        _check_tensor("log_prior", log_prior, (B, K), device, floating=coef_dtypes)

    if isinstance(temperature, torch.Tensor):
        _check_tensor("temperature", temperature, (B,), device, floating=coef_dtypes)
    elif isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        if not temperature > 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a positive finite number, got {temperature}")
        temperature = float(temperature)
    else:
        raise ValueError(f"temperature must be a positive float or a (B,) tensor, got {type(temperature).__name__}")

    if (endpoint is None) != (noise is None):
        missing = "noise" if noise is None else "endpoint"
        raise ValueError(f"endpoint and noise must be given together (residual form); {missing} is missing")
    if endpoint is not None:
        for name, t in (("endpoint", endpoint), ("noise", noise)):
            _check_tensor(name, t, z.shape, device, floating=(z.dtype,))
    if endpoint_index is not None:
        _check_tensor("endpoint_index", endpoint_index, (B,), device, integer=True)
    if pool_sq_norms is not None:
        if not shared:
            raise ValueError("pool_sq_norms belongs to a shared pool (K, *S); per-row pools compute distances directly")
        _check_tensor("pool_sq_norms", pool_sq_norms, (K,), device, floating=(torch.float32,))
    if active is not None:
        _check_tensor("active", active, (B,), device)
        if active.dtype != torch.bool:
            raise ValueError(f"active must be a bool tensor, got {active.dtype}")

    use_triton = backend == "triton" or (backend == "auto" and device.type == "cuda" and z.dtype != torch.float64)
    if use_triton:
        if z.dtype == torch.float64:
            raise ValueError("backend='triton' takes float32, float16 or bfloat16 z and pool; float64 needs 'torch'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' needs CUDA tensors (z is on {device}) or TRITON_INTERPRET=1")

    z2 = z.reshape(B, D)
    pool2 = pool.reshape(K, D) if shared else pool.reshape(pool.shape[0], K, D)  # a view for a bank's slice
    end2 = endpoint.reshape(B, D) if endpoint is not None else None
    noise2 = noise.reshape(B, D) if noise is not None else None
    optional = dict(row_labels=row_labels, pool_labels=pool_labels, log_prior=log_prior, endpoint=end2, noise=noise2)
    with torch.no_grad():  # a stop-gradient target on either backend
        if use_triton:
            from .launch import prepare

            inputs = prepare(z2, pool2, alpha, sigma, d_alpha, d_sigma, temperature, **optional,
                             endpoint_index=endpoint_index if shared else None, pool_index=pool_index,
                             active=active, pool_sq_norms=pool_sq_norms)
            if shared:
                from .shared_pool import shared_pool_posterior

                velocity, lse, ess = shared_pool_posterior(inputs)
            else:
                from .per_row_pool import per_row_posterior

                velocity, lse, ess = per_row_posterior(inputs)
        else:
            if isinstance(temperature, torch.Tensor) and not bool((temperature > 0).all()):  # also rejects NaN
                raise ValueError("temperature must be positive in every row")
            args = (z2, pool2, alpha, sigma, d_alpha, d_sigma, temperature)
            if active is None:
                velocity, lse, ess = posterior_velocity_reference(*args, **optional, pool_index=pool_index)
            else:
                velocity, lse, ess = _active_rows_only(active, args, dict(optional, pool_index=pool_index))
    return PosteriorTarget(velocity.reshape(z.shape), lse, ess)


def pool_squared_norms(pool: torch.Tensor) -> torch.Tensor:
    """(K,) float32 ||x_j||^2 of a shared pool (K, *S), each a float64 sum rounded once to fp32: the op's
    `pool_sq_norms`, computed once for a pool that serves several calls (the Triton kernel on CUDA or under
    TRITON_INTERPRET=1, else torch in float64)."""
    if not isinstance(pool, torch.Tensor) or pool.dim() < 2 or pool.dtype not in _KERNEL_DTYPES + (torch.float64,):
        raise ValueError(f"pool must be a floating tensor of shape (K, *S), got "
                         f"{tuple(pool.shape) if isinstance(pool, torch.Tensor) else type(pool).__name__}")
    flat = pool.reshape(pool.shape[0], -1)
    if pool.dtype != torch.float64 and (pool.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        from .shared_pool import squared_norms

        return squared_norms(flat.contiguous())
    return flat.double().square().sum(1).float()


def _active_rows_only(active, args, optional):
    """The reference on the active rows alone (one host read of the mask), scattered into zeros. `args` are
    (z, pool, alpha, sigma, d_alpha, d_sigma, temperature), `optional` the per-row keyword inputs."""
    rows = active.nonzero().squeeze(1)
    z, pool, *coefficients, temperature = args
    per_row_pools = pool.dim() == 3 and optional["pool_index"] is None  # (B, K, D): row i's pool is pool[i]
    shared_labels = optional["pool_labels"] is not None and optional["pool_labels"].dim() == 1  # (K,)
    sub_optional = {k: v if v is None or (k == "pool_labels" and shared_labels) else v[rows]
                    for k, v in optional.items()}
    v, lse, ess = posterior_velocity_reference(
        z[rows], pool[rows] if per_row_pools else pool, *(c[rows] for c in coefficients),
        temperature[rows] if isinstance(temperature, torch.Tensor) else temperature, **sub_optional)
    B = z.shape[0]
    out_v, out_lse, out_ess = v.new_zeros(B, v.shape[1]), lse.new_zeros(B), ess.new_zeros(B)
    out_v[rows], out_lse[rows], out_ess[rows] = v, lse, ess
    return out_v, out_lse, out_ess
