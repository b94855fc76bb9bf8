"""Independent float64 oracle for the posterior-velocity op, shared by the op and kernel tests.

It materialises everything (B x K x D) with the direct distance ||z - alpha x||^2: fine at test sizes, and
deliberately unlike the chunked reference and the GEMM-expansion kernels it checks.
"""
import torch


def oracle(z, pool, alpha, sigma, d_alpha, d_sigma, *, row_labels=None, pool_labels=None, log_prior=None,
           temperature=1.0, endpoint=None, noise=None):
    f = lambda t: t.detach().to(torch.float64)  # noqa: E731
    B = z.shape[0]
    zf = f(z).reshape(B, -1)
    shared = pool.dim() == z.dim()
    X = f(pool).reshape(pool.shape[0], -1)[None] if shared else f(pool).reshape(B, pool.shape[1], -1)
    X = X.expand(B, -1, -1)
    a, s, da, ds = f(alpha), f(sigma), f(d_alpha), f(d_sigma)
    tau = f(temperature) if isinstance(temperature, torch.Tensor) else torch.full_like(a, temperature)
    dist = ((zf[:, None, :] - a[:, None, None] * X) ** 2).sum(-1)
    logits = -dist / (2 * s[:, None] ** 2 * tau[:, None])
    if log_prior is not None:
        logits = logits + f(log_prior)
    if row_labels is not None:
        pl = pool_labels if pool_labels.dim() == 2 else pool_labels[None].expand(B, -1)
        ok = (row_labels[:, None] < 0) | (pl == row_labels[:, None])
        logits = logits.masked_fill(~ok, float("-inf"))
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


def rel_err(x, ref):
    """max |x - ref| / max |ref| over finite reference entries (a scale-free error for vectors and batches)."""
    x, ref = x.double(), ref.double()
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def make_case(B, K, S, *, per_row=False, dtype=torch.float32, labels=None, prior=False, tau=None, residual=False,
              t_range=(0.2, 0.8), seed=0):
    """Random inputs on the linear path (alpha = t, sigma = 1 - t) with candidates close enough to z that the
    weights are spread (a non-trivial ESS), plus optional labels ("1d" or "2d"), log prior and temperature."""
    g = torch.Generator().manual_seed(seed)
    D_shape = tuple(S)
    x = torch.randn(B, *D_shape, generator=g)
    eps = torch.randn(B, *D_shape, generator=g)
    t = torch.empty(B).uniform_(*t_range, generator=g)
    alpha, sigma = t, 1 - t
    d_alpha, d_sigma = torch.ones(B), -torch.ones(B)
    z = alpha.view(-1, *[1] * len(S)) * x + sigma.view(-1, *[1] * len(S)) * eps
    if per_row:
        # Near-duplicates of the row's own endpoint, spread on the scale sigma / alpha (so they compete).
        spread = (sigma / alpha).view(B, 1, *[1] * len(S))
        pool = x[:, None] + 0.3 * spread * torch.randn(B, K, *D_shape, generator=g)
        pool[:, 0] = x
    else:
        pool = torch.randn(K, *D_shape, generator=g)
        pool[: min(K, B)] = x[: min(K, B)]
        if K > B:  # near-duplicates of the first endpoints
            pool[B:] = x[torch.arange(K - B) % B] + 0.2 * torch.randn(K - B, *D_shape, generator=g)
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
    return (z.to(dtype), pool.to(dtype), alpha, sigma, d_alpha, d_sigma), kw
