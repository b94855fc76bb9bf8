"""Triton kernels (run by the interpreter on the CPU) against the float64 oracle and the op's contract."""

import pytest
import torch

from _posterior_oracle import make_case, oracle, rel_err
from pafm_kernels import posterior_velocity

# numpy warns about log(0) and -inf - -inf in padded rows whose results are masked out on store
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# Tolerances vs the float64 oracle evaluated on the same (already rounded) inputs, so input rounding cancels and
# only kernel arithmetic counts. The shared-pool kernel uses the GEMM expansion 2a z.x - a^2||x||^2 in fp32, whose
# absolute logit error is ~eps * a^2 ||x||^2 / (2 sigma^2 tau) ~ 1e-4 nats at these sizes (D ~ 100, sigma >= 0.2,
# tau >= 0.5); the interpreter upcasts 16-bit operands to fp32, so fp16/bf16 see the same arithmetic
# (on a GPU the split hi/lo bf16 weights add ~2^-16 relative). Measured worst case 1.3e-5 (ESS); the bound leaves 15x.
TOL = {torch.float32: 2e-4, torch.float16: 2e-4, torch.bfloat16: 2e-4}
# The per-row kernel uses the direct fp32 distance: measured worst case 4.5e-6 (velocity), bound 4x that.
TOL_PER_ROW = 2e-5

SHARED = [  # (B, K, S, labels, prior, tau, residual)
    (1, 1, (7,), None, False, None, False),
    (9, 37, (3, 35), "2d", True, "rows", True),
    (40, 150, (130,), "1d", False, 0.7, False),  # several row and column tiles, ragged everywhere
]
PER_ROW = [
    (1, 1, (5,), None, False, None, False),
    (6, 11, (3, 37), "2d", True, "rows", True),
    (5, 40, (300,), "1d", False, 1.5, False),  # several candidate blocks and D chunks
]


def _check(args, kw, tol):
    out = posterior_velocity(*args, **kw, backend="triton")
    assert out.velocity.dtype == torch.float32 and out.velocity.shape == args[0].shape
    v64, lse64, ess64 = oracle(*args, **kw)
    errs = rel_err(out.velocity, v64), rel_err(out.lse, lse64), rel_err(out.ess, ess64)
    assert max(errs) <= tol, errs
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", SHARED)
def test_shared_pool_kernel_matches_oracle(case, dtype):
    B, K, S, labels, prior, tau, residual = case
    args, kw = make_case(B, K, S, dtype=dtype, labels=labels, prior=prior, tau=tau, residual=residual)
    _check(args, kw, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", PER_ROW)
def test_per_row_kernel_matches_oracle(case, dtype):
    B, K, S, labels, prior, tau, residual = case
    args, kw = make_case(B, K, S, per_row=True, dtype=dtype, labels=labels, prior=prior, tau=tau, residual=residual)
    _check(args, kw, TOL_PER_ROW)


@pytest.mark.parametrize("per_row", [False, True])
def test_single_admissible_candidate_gives_flow_matching_target(per_row):
    B, S = 5, (40,)
    args, kw = make_case(B, 1 if per_row else B, S, per_row=per_row, residual=True)
    z, pool, a, s, da, ds = args
    x, eps = kw["endpoint"], kw["noise"]
    if per_row:
        out = posterior_velocity(z, x[:, None], a, s, da, ds, backend="triton")
    else:
        ids = torch.arange(B)
        out = posterior_velocity(z, x, a, s, da, ds, row_labels=ids, pool_labels=ids, endpoint=x, noise=eps,
                                 backend="triton")
    u = da[:, None] * x + ds[:, None] * eps
    assert rel_err(out.velocity, u) <= 1e-5
    torch.testing.assert_close(out.ess, torch.ones(B), rtol=0, atol=1e-5)


@pytest.mark.parametrize("per_row", [False, True])
def test_row_without_admissible_candidate(per_row):
    B, K = 4, 6
    args, _ = make_case(B, K, (20,), per_row=per_row)
    row_labels = torch.tensor([0, 7, -1, 0])
    pool_labels = torch.zeros(B, K, dtype=torch.long)
    out = posterior_velocity(*args, row_labels=row_labels, pool_labels=pool_labels, backend="triton")
    assert out.lse[1] == float("-inf") and out.ess[1] == 0 and torch.isnan(out.velocity[1]).all()
    keep = torch.tensor([0, 2, 3])
    v64, lse64, _ = oracle(*args, row_labels=row_labels, pool_labels=pool_labels)
    assert rel_err(out.velocity[keep], v64[keep]) <= 2e-4 and rel_err(out.lse[keep], lse64[keep]) <= 2e-4


@pytest.mark.parametrize("per_row", [False, True])
def test_data_end_stays_finite_with_residual_form(per_row):
    # sigma = 1e-4 on the linear path with near-duplicate candidates (per row) or distinct ones (shared).
    args, kw = make_case(6, 8, (64,), per_row=per_row, residual=True, t_range=(1 - 1e-4, 1 - 1e-4), seed=2)
    out = posterior_velocity(*args, **kw, backend="triton")
    assert torch.isfinite(out.velocity).all() and torch.isfinite(out.lse).all() and torch.isfinite(out.ess).all()
    v64, lse64, _ = oracle(*args, **kw)
    err = rel_err(out.velocity, v64)
    print(f"sigma=1e-4 per_row={per_row}: relative velocity error {err:.2e}")
    assert err <= 1e-3
    # The trainer compares lse with the own endpoint's closed-form logit: it must be right in absolute nats even
    # though -||z||^2 / (2 sigma^2) is ~1e9 here.
    assert (out.lse.double() - lse64).abs().max() <= 1e-3


@pytest.mark.parametrize("residual", [False, True])
def test_shared_pool_near_duplicates_at_small_sigma_are_refined(residual):
    # Rows at sigma = 1e-3 and 1e-4 (where the fp32 expansion cannot resolve near-duplicates and the kernel's rows are
    # refined with exact distances) mixed with rows at sigma = 0.5 (pure kernel path), labels and a log prior.
    g = torch.Generator().manual_seed(4)
    B, D = 8, 96
    x, eps = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    sigma = torch.tensor([1e-3, 0.5, 1e-4, 0.5, 1e-3, 0.5, 1e-4, 0.5])
    a = 1 - sigma
    z = a[:, None] * x + sigma[:, None] * eps
    pool = torch.cat([x, x.repeat(3, 1) + sigma.repeat(3)[:, None] * 0.1 * torch.randn(3 * B, D, generator=g)])
    K = pool.shape[0]
    kw = dict(row_labels=torch.tensor([0, 1, -1, 1, 0, 1, -1, 1]), pool_labels=torch.arange(K) % B % 2,
              log_prior=0.1 * torch.randn(B, K, generator=g))
    if residual:
        kw.update(endpoint=x, noise=eps)
    args = (z, pool, a, sigma, torch.ones(B), -torch.ones(B))
    out = posterior_velocity(*args, **kw, backend="triton")
    v64, lse64, ess64 = oracle(*args, **kw)
    assert (ess64[sigma < 0.01] > 1.2).all()  # the near-duplicates share the weight
    errs = rel_err(out.velocity, v64), rel_err(out.lse, lse64), rel_err(out.ess, ess64)
    assert max(errs) <= 1e-5, errs
