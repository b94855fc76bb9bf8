"""Inputs and an error measure for checking the posterior-velocity op, shared by the tests and bench/gpu_check.py."""
import os

import torch


def kernel_device() -> torch.device:
    """Where the Triton kernels are checked: CPU tensors under the interpreter (TRITON_INTERPRET=1), else the GPU."""
    return torch.device("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda")


def on_kernel_device(posterior_velocity, *args, **kw):
    """Run the op's Triton path on `kernel_device()` with CPU inputs, and bring its results back to the CPU."""
    device = kernel_device()
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    out = posterior_velocity(*map(move, args), **{k: move(v) for k, v in kw.items()}, backend="triton")
    return type(out)(*(t.cpu() for t in out))


def rel_err(x, ref):
    """max |x - ref| / max |ref| (a scale-free error for vectors and batches)."""
    x, ref = x.double(), ref.double()
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def make_case(B, K, S, *, per_row=False, dtype=torch.float32, labels=None, prior=False, tau=None, residual=False,
              own_index=False, t_range=(0.2, 0.8), seed=0):
    """Random inputs on the linear path (alpha = t, sigma = 1 - t) with candidates close enough to z that the
    weights are spread (a non-trivial ESS), plus optional labels ("1d" or "2d"), log prior, temperature ("rows" or a
    float) and, for a shared pool, the pool index of each row's own endpoint (-1 where it is not in the pool).

    Returns ((z, pool, alpha, sigma, d_alpha, d_sigma), keyword arguments) on the CPU.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *S, generator=g)
    eps = torch.randn(B, *S, generator=g)
    t = torch.empty(B).uniform_(*t_range, generator=g)
    alpha, sigma = t, 1 - t
    ones = [1] * len(S)
    z = alpha.view(-1, *ones) * x + sigma.view(-1, *ones) * eps
    if per_row:
        # Near-duplicates of the row's own endpoint, spread on the scale sigma / alpha (so they compete).
        spread = (sigma / alpha).view(B, 1, *ones)
        pool = x[:, None] + 0.3 * spread * torch.randn(B, K, *S, generator=g)
        pool[:, 0] = x
    else:
        pool = torch.randn(K, *S, generator=g)
        pool[: min(K, B)] = x[: min(K, B)]
        if K > B:  # near-duplicates of the first endpoints
            pool[B:] = x[torch.arange(K - B) % B] + 0.2 * torch.randn(K - B, *S, generator=g)
    kw = {}
    if labels is not None:
        # Labels in {0, 1, 2} (row label -1 admits all); every row keeps at least one admissible candidate.
        n_lab = min(3, K)
        row_labels = torch.randint(-1, n_lab, (B,), generator=g)
        if labels == "1d":
            pool_labels = torch.randint(0, n_lab, (K,), generator=g)
            pool_labels[:n_lab] = torch.arange(n_lab)
        else:
            pool_labels = torch.randint(0, n_lab, (B, K), generator=g)
            pool_labels[:, 0] = row_labels.clamp_min(0)
        kw["row_labels"], kw["pool_labels"] = row_labels, pool_labels
    if prior:
        kw["log_prior"] = torch.randn(B, K, generator=g)
    if tau is not None:
        kw["temperature"] = tau if isinstance(tau, float) else torch.empty(B).uniform_(0.5, 2.0, generator=g)
    if residual:
        kw["endpoint"], kw["noise"] = x.to(dtype), eps.to(dtype)
    if own_index and not per_row:
        kw["endpoint_index"] = torch.where(torch.arange(B) < K, torch.arange(B), -1)
    return (z.to(dtype), pool.to(dtype), alpha, sigma, *d_alpha_sigma(B)), kw


def d_alpha_sigma(B):
    """The linear path's (d_alpha, d_sigma) = (1, -1) for B rows."""
    return torch.ones(B), -torch.ones(B)


def t_grid_case(ts, D, *, dtype=torch.float32, per_row=False, duplicates=3, spread=0.1, unrelated=8, seed=0,
                device="cpu"):
    """One row per t in `ts` on the linear path, in the residual form, with the hardest candidates for the kernels:
    each row's own endpoint plus `duplicates` near-duplicates of it at `spread * sigma` per coordinate (they share
    the weight at every t, down to sigma = 1e-5) and `unrelated` random candidates.

    Shared pool: every row's candidates in one pool of B (1 + duplicates) + unrelated, with `endpoint_index`.
    Per-row pools: (B, 1 + duplicates + unrelated), the own endpoint in slot 0.
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.as_tensor(ts, dtype=torch.float32)
    B = t.numel()
    alpha, sigma = t, 1 - t
    x, eps = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    z = alpha[:, None] * x + sigma[:, None] * eps
    near = x[:, None] + spread * sigma[:, None, None] * torch.randn(B, duplicates, D, generator=g)
    other = torch.randn(unrelated, D, generator=g)
    kw = dict(endpoint=x, noise=eps)
    if per_row:
        pool = torch.cat([x[:, None], near, other[None].expand(B, -1, -1)], 1)
    else:
        pool = torch.cat([x, near.reshape(B * duplicates, D), other])
        kw["endpoint_index"] = torch.arange(B)
    to = lambda v: v.to(device=device, dtype=dtype)  # noqa: E731
    args = (to(z), to(pool), alpha.to(device), sigma.to(device), *(c.to(device) for c in d_alpha_sigma(B)))
    kw = {k: (to(v) if v.is_floating_point() else v.to(device)) for k, v in kw.items()}
    return args, kw


def logits_and_bound(z, pool, alpha, sigma):
    """A shared pool's logits as the kernels compute them (refinement off), the exact float64 logits, and the
    refinement bound per row: the kernels' error against the bound, for the tests and the GPU check."""
    from .launch import prepare
    from . import shared_pool

    d = kernel_device()
    inp = prepare(z.to(d), pool.to(d), alpha.to(d), sigma.to(d), torch.ones_like(alpha).to(d),
                  -torch.ones_like(alpha).to(d), 1.0)
    lg = shared_pool.launch_logits(inp)
    shared_pool.launch_rows(inp, lg, float("inf"))  # finishes split logits, refines nothing
    z64, x64, a64, s64 = z.double().cpu(), pool.double().cpu(), alpha.double().cpu(), sigma.double().cpu()
    inv = 1 / (2 * s64 ** 2)
    exact = (2 * a64[:, None] * (z64 @ x64.T) - a64[:, None] ** 2 * (x64 * x64).sum(1)) * inv[:, None]
    zsq, xmax = (z64 * z64).sum(1), (x64 * x64).sum(1).max()
    g_dot, g_sum = shared_pool.logit_error_coefficients(z.shape[1], z.dtype)
    bound = (g_dot * 2 * a64.abs() * (zsq * xmax).sqrt() + g_sum * a64 ** 2 * xmax) * inv
    return lg.logits.cpu().double(), exact, bound
