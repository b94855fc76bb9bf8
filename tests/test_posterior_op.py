"""The posterior-velocity op's contract, checked on the PyTorch reference against an independent float64 oracle."""
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pafm_kernels import PosteriorTarget, posterior_velocity
from pafm_kernels.naive import posterior_velocity_naive as oracle
from pafm_kernels.reference import posterior_velocity_reference
from pafm_kernels.testing import make_case, rel_err

# fp32 reference vs float64 oracle on the same inputs: the direct distance keeps every logit to ~1e-7 relative and the
# weights are spread over a few near-duplicates, so the bound of 1e-5 applies to velocity, lse and ESS.
TOL_FP32 = 1e-5

CASES = [  # (B, K, S, per_row, labels, prior, tau, residual)
    (1, 1, (7,), False, None, False, None, False),
    (1, 13, (3, 5, 7), False, None, False, None, True),
    (7, 13, (105,), False, "1d", True, 0.7, False),
    (9, 33, (2, 50), False, "2d", False, "rows", True),
    (5, 1, (4, 9), True, None, False, None, False),
    (6, 11, (3, 37), True, "2d", True, "rows", True),
    (4, 7, (130,), True, "1d", False, 1.5, False),
]


class LargestTensor(TorchDispatchMode):
    """The element count of the largest tensor any op allocates while the mode is on."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # views (slices) share an input's storage and allocate nothing
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("B,K,S,per_row,labels,prior,tau,residual", CASES)
def test_reference_matches_float64_oracle(B, K, S, per_row, labels, prior, tau, residual):
    args, kw = make_case(B, K, S, per_row=per_row, labels=labels, prior=prior, tau=tau, residual=residual)
    out = posterior_velocity(*args, **kw, backend="torch")
    assert isinstance(out, PosteriorTarget)
    assert out.velocity.shape == args[0].shape and out.velocity.dtype == torch.float32
    assert out.lse.shape == (B,) and out.ess.shape == (B,)
    v64, lse64, ess64 = oracle(*args, **kw)
    assert rel_err(out.velocity, v64) <= TOL_FP32
    assert rel_err(out.lse, lse64) <= TOL_FP32
    assert rel_err(out.ess, ess64) <= TOL_FP32


def test_reference_float64_inputs_give_float64_result():
    args, kw = make_case(6, 9, (3, 11), dtype=torch.float64, labels="1d", prior=True, residual=True)
    args = tuple(a.double() for a in args)
    kw["log_prior"] = kw["log_prior"].double()
    out = posterior_velocity(*args, **kw, backend="auto")
    assert out.velocity.dtype == torch.float64
    v64, lse64, ess64 = oracle(*args, **kw)
    assert rel_err(out.velocity, v64) <= 1e-12 and rel_err(out.lse, lse64) <= 1e-12 and rel_err(out.ess, ess64) <= 1e-12


@pytest.mark.parametrize("per_row", [False, True])
def test_reference_chunking_is_exact_and_memory_bounded(per_row):
    B, K, D, chunk = 12, 40, 64, 512
    args, kw = make_case(B, K, (D,), per_row=per_row, labels="2d", prior=True)
    z, pool, a, s, da, ds = args
    tau = torch.ones(B)

    with LargestTensor() as allocated:
        small = posterior_velocity_reference(z, pool, a, s, da, ds, tau, chunk_elems=chunk, **kw)
    # No B x K x D temporary (24 576 elements here): the largest new tensor is a chunk, the logits or the output.
    assert allocated.largest <= max(chunk, B * K, B * D) < B * K * D
    big = posterior_velocity_reference(z, pool, a, s, da, ds, tau, chunk_elems=1 << 30, **kw)
    for x, y in zip(small, big):
        assert rel_err(x, y) <= 1e-6


@pytest.mark.parametrize("chunk", [450, None])
def test_reference_pool_index_groups_match_float64_oracle(chunk):
    """Rows read a bank's pools through pool_index, grouped unevenly (10 rows on one pool, 5 on another, singles):
    with a small chunk the 10-row group is solved alone, the 5-row one in a chunk of its own and the singles two per
    chunk; with the default chunk all in one batched call. Both equal the float64 oracle on the gathered pools."""
    B, K, S, N = 23, 6, (5, 6), 30
    args, kw = make_case(B, K, S, per_row=True, labels="2d", prior=True, tau="rows", residual=True, seed=3)
    z, pool = args[0], args[1]
    order = torch.randperm(B, generator=torch.Generator().manual_seed(4))
    index = torch.cat([torch.full((10,), 2), torch.full((5,), 0), torch.arange(10, 18)])[order]
    bank = torch.randn(N, K, *S, generator=torch.Generator().manual_seed(5))
    bank[index] = pool  # rows sharing a pool get the same one (the last write wins)
    flat = {k: v.flatten(1) if k in ("endpoint", "noise") else v for k, v in kw.items() if k != "temperature"}
    with LargestTensor() as allocated:
        out = posterior_velocity_reference(z.flatten(1), bank.flatten(2), *args[2:], kw["temperature"], **flat,
                                           pool_index=index, chunk_elems=chunk)
    if chunk is not None:  # no B x K x D gather: the largest new tensor is a chunk, the logits or the output
        D = math.prod(S)
        assert allocated.largest <= max(chunk, B * K, B * D) < B * K * D
    v64, lse64, ess64 = oracle(z, bank[index], *args[2:], **kw)
    assert max(rel_err(out[0].view_as(z), v64), rel_err(out[1], lse64), rel_err(out[2], ess64)) <= TOL_FP32


@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL_FP32), (torch.float64, 1e-12)])
@pytest.mark.parametrize("residual", [False, True])
def test_reference_solves_rows_on_their_class_slice_of_a_sorted_pool(monkeypatch, dtype, tol, residual):
    """A shared pool larger than a chunk whose labels ascend (the exact source's): each labelled row is solved on
    its class's slice, unlabelled rows (any negative label) on the whole pool. The result equals the float64 oracle
    and the masked whole-pool solve of the same pool shuffled; a label with no candidate gets lse -inf, ess 0 and
    a NaN velocity, as the op documents."""
    import pafm_kernels.reference as reference

    B, K, S = 19, 90, (3, 10)
    args, kw = make_case(B, K, S, labels="1d", prior=True, tau="rows", residual=residual, seed=7)
    z, pool, *coefs = args
    row_labels = kw["row_labels"].clone()
    row_labels[[2, 11]] = 5  # no candidate has label 5
    row_labels[4] = -3  # any negative label admits every candidate
    order = kw["pool_labels"].argsort(stable=True)
    sorted_kw = dict(kw, row_labels=row_labels, pool_labels=kw["pool_labels"][order],
                     log_prior=kw["log_prior"][:, order])
    flat = lambda d: {k: v.flatten(1).to(dtype) if k in ("endpoint", "noise") else v  # noqa: E731
                      for k, v in d.items() if k != "temperature"}
    slices, by_class_slice = [], reference._by_class_slice
    monkeypatch.setattr(reference, "_by_class_slice", lambda *a, **k: slices.append(1) or by_class_slice(*a, **k))
    got = posterior_velocity_reference(z.flatten(1).to(dtype), pool[order].flatten(1).to(dtype), *coefs,
                                       kw["temperature"], **flat(sorted_kw), chunk_elems=K * 30 // 4)
    assert slices == [1]  # the class-slice path ran
    shuffled = torch.randperm(K, generator=torch.Generator().manual_seed(8))
    masked = posterior_velocity_reference(
        z.flatten(1).to(dtype), pool[order][shuffled].flatten(1).to(dtype), *coefs, kw["temperature"],
        **flat(dict(sorted_kw, pool_labels=sorted_kw["pool_labels"][shuffled],
                    log_prior=sorted_kw["log_prior"][:, shuffled])), chunk_elems=K * 30 // 4)
    assert len(slices) == 1  # labels out of order: the masked whole-pool solve
    empty = row_labels == 5
    assert torch.isneginf(got[1][empty]).all() and (got[2][empty] == 0).all() and got[0][empty].isnan().all()
    assert torch.isneginf(masked[1][empty]).all() and masked[0][empty].isnan().all()
    rows = {k: v if k == "pool_labels" else v[~empty] for k, v in sorted_kw.items()}
    v64, lse64, ess64 = oracle(z[~empty], pool[order], *(c[~empty] for c in coefs), **rows)
    for out in (got, masked):
        assert out[0].dtype == dtype
        assert rel_err(out[0][~empty].view_as(v64), v64) <= tol
        assert rel_err(out[1][~empty], lse64) <= tol and rel_err(out[2][~empty], ess64) <= tol


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_single_admissible_candidate_gives_flow_matching_target(per_row, residual):
    B, S = 5, (3, 8)
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(B, *S, generator=g), torch.randn(B, *S, generator=g)
    t = torch.rand(B, generator=g) * 0.9 + 0.05
    a, s = torch.sin(math.pi / 2 * t), torch.cos(math.pi / 2 * t)  # cosine path
    da, ds = math.pi / 2 * s, -math.pi / 2 * a
    z = a.view(-1, 1, 1) * x + s.view(-1, 1, 1) * eps
    kw = dict(endpoint=x, noise=eps) if residual else {}
    if per_row:  # K = 1: the row's own endpoint only
        out = posterior_velocity(z, x[:, None], a, s, da, ds, **kw, backend="torch")
    else:  # every other candidate masked by the labels
        ids = torch.arange(B)
        out = posterior_velocity(z, x, a, s, da, ds, row_labels=ids, pool_labels=ids, **kw, backend="torch")
    u = da.view(-1, 1, 1) * x + ds.view(-1, 1, 1) * eps
    assert rel_err(out.velocity, u) <= 1e-6
    torch.testing.assert_close(out.ess, torch.ones(B), rtol=0, atol=1e-6)


def test_ess_bounds_permutation_and_duplication():
    B, K, S = 6, 10, (24,)
    args, kw = make_case(B, K, S, labels="1d", prior=True, tau=0.5)
    z, pool, a, s, da, ds = args
    out = posterior_velocity(*args, **kw, backend="torch")
    admissible = ((kw["row_labels"][:, None] < 0) | (kw["pool_labels"][None] == kw["row_labels"][:, None])).sum(1)
    assert (out.ess >= 1 - 1e-6).all() and (out.ess <= admissible + 1e-4).all()
    assert (out.ess > 1.05).any()  # the case is non-trivial

    perm = torch.randperm(K, generator=torch.Generator().manual_seed(3))
    permuted = posterior_velocity(z, pool[perm], a, s, da, ds, row_labels=kw["row_labels"],
                                  pool_labels=kw["pool_labels"][perm], log_prior=kw["log_prior"][:, perm],
                                  temperature=0.5, backend="torch")
    for x, y in zip(permuted, out):
        assert rel_err(x, y) <= 1e-6

    # Duplicating candidate j equals adding log 2 to its prior (same lse, same velocity). Take the j whose
    # doubling moves the target most, so that the check has teeth.
    def doubled_prior(j):
        lp = kw["log_prior"].clone()
        lp[:, j] += math.log(2.0)
        return lp

    def with_prior(lp):
        return posterior_velocity(*args, row_labels=kw["row_labels"], pool_labels=kw["pool_labels"], log_prior=lp,
                                  temperature=0.5, backend="torch")

    j = max(range(K), key=lambda j: (with_prior(doubled_prior(j)).velocity - out.velocity).abs().max().item())
    dup = posterior_velocity(z, torch.cat([pool, pool[j:j + 1]]), a, s, da, ds, row_labels=kw["row_labels"],
                             pool_labels=torch.cat([kw["pool_labels"], kw["pool_labels"][j:j + 1]]),
                             log_prior=torch.cat([kw["log_prior"], kw["log_prior"][:, j:j + 1]], 1),
                             temperature=0.5, backend="torch")
    ref = with_prior(doubled_prior(j))
    assert rel_err(dup.velocity, ref.velocity) <= 1e-5 and rel_err(dup.lse, ref.lse) <= 1e-6
    assert not torch.allclose(ref.velocity, out.velocity, rtol=1e-3)  # the doubling did change the target


@pytest.mark.parametrize("end", ["data", "noise"])
def test_extreme_t_stays_finite_and_residual_form_stays_accurate(end):
    # Linear path; sigma down to 1e-4 at the data end, alpha down to 1e-4 at the noise end.
    B, K, S = 8, 12, (96,)
    t_range = (1 - 1e-4, 1 - 1e-4) if end == "data" else (1e-4, 1e-4)
    args, kw = make_case(B, K, S, per_row=True, residual=True, t_range=t_range, seed=5)
    out = posterior_velocity(*args, **kw, backend="torch")
    assert torch.isfinite(out.velocity).all() and torch.isfinite(out.lse).all() and torch.isfinite(out.ess).all()
    v64, lse64, ess64 = oracle(*args, **kw)
    # The residual form never divides a cancelling difference by sigma: fp32 error stays at the 1e-5 level, while
    # the plain form's error grows like eps / sigma (measured 1.2e-3 at sigma = 1e-4 on this case).
    assert rel_err(out.velocity, v64) <= 1e-5
    assert rel_err(out.ess, ess64) <= 1e-5 and rel_err(out.lse, lse64) <= 1e-5
    plain = posterior_velocity(*args, backend="torch")
    assert torch.isfinite(plain.velocity).all()
    if end == "data":
        assert (out.ess > 1.5).any()  # near-duplicates at distance ~sigma keep the posterior non-trivial
        assert rel_err(plain.velocity, v64) > 10 * rel_err(out.velocity, v64)


@pytest.mark.parametrize("sigma", [1e-2, 1e-4])
def test_shared_pool_near_duplicates_at_small_sigma(sigma):
    # Shared pool holding every endpoint plus near-duplicates at distance ~0.1 sigma * sqrt(D): the weights spread
    # over them (ESS > 1), the hardest case for cancellation in ||z||^2 - 2a z.x + a^2 ||x||^2 and in mu - x_own.
    g = torch.Generator().manual_seed(0)
    B, D = 6, 96
    x, eps = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    a, s = torch.full((B,), 1 - sigma), torch.full((B,), sigma)
    z = a[:, None] * x + s[:, None] * eps
    pool = torch.cat([x, x.repeat(3, 1) + sigma * 0.1 * torch.randn(3 * B, D, generator=g)])
    args = (z, pool, a, s, torch.ones(B), -torch.ones(B))
    out = posterior_velocity(*args, endpoint=x, noise=eps, backend="torch")
    v64, lse64, ess64 = oracle(*args, endpoint=x, noise=eps)
    assert (ess64 > 1.5).all()
    assert rel_err(out.velocity, v64) <= TOL_FP32 and rel_err(out.lse, lse64) <= TOL_FP32
    assert rel_err(out.ess, ess64) <= TOL_FP32


@pytest.mark.parametrize("per_row", [False, True])
def test_row_without_admissible_candidate(per_row):
    B, K, S = 4, 6, (10,)
    args, kw = make_case(B, K, S, per_row=per_row)
    row_labels = torch.tensor([0, 7, -1, 0])  # label 7 exists nowhere
    pool_labels = torch.zeros(K, dtype=torch.long)
    out = posterior_velocity(*args, row_labels=row_labels, pool_labels=pool_labels, backend="torch")
    assert out.lse[1] == float("-inf") and out.ess[1] == 0 and torch.isnan(out.velocity[1]).all()
    keep = torch.tensor([0, 2, 3])
    assert torch.isfinite(out.velocity[keep]).all() and torch.isfinite(out.lse[keep]).all()
    v64, _, _ = oracle(*args, row_labels=row_labels, pool_labels=pool_labels)
    assert rel_err(out.velocity[keep], v64[keep]) <= TOL_FP32


def _valid(B=3, K=5, S=(2, 4)):
    z = torch.randn(B, *S)
    return dict(z=z, pool=torch.randn(K, *S), alpha=torch.rand(B), sigma=torch.rand(B) + 0.1, d_alpha=torch.ones(B),
                d_sigma=-torch.ones(B))


BAD = [
    (dict(z=torch.randn(8)), "z must"),
    (dict(z=torch.randn(3, 2, 4).int()), "z must"),
    (dict(pool=torch.randn(5, 2, 5)), "pool must have shape"),
    (dict(pool=torch.randn(4, 5, 2, 4)), "pool must have shape"),
    (dict(pool=torch.randn(0, 2, 4)), "at least one candidate"),
    (dict(pool=torch.randn(5, 2, 4).half()), "pool has dtype"),
    (dict(pool=torch.randn(5, 2, 4, device="meta")), "pool is on"),
    (dict(alpha=torch.rand(4)), "alpha must have shape"),
    (dict(sigma=torch.rand(3, 1)), "sigma must have shape"),
    (dict(d_alpha=torch.ones(3, dtype=torch.long)), "d_alpha must have dtype"),
    (dict(d_sigma=torch.ones(3, device="meta")), "d_sigma is on"),
    (dict(row_labels=torch.zeros(3, dtype=torch.long)), "pool_labels is missing"),
    (dict(pool_labels=torch.zeros(5, dtype=torch.long)), "row_labels is missing"),
    (dict(row_labels=torch.zeros(3), pool_labels=torch.zeros(5, dtype=torch.long)), "row_labels must be an integer"),
    (dict(row_labels=torch.zeros(3, dtype=torch.long), pool_labels=torch.zeros(4, dtype=torch.long)), "pool_labels"),
    (dict(log_prior=torch.zeros(3, 4)), "log_prior must have shape"),
    (dict(temperature=-1.0), "temperature must be a positive"),
    (dict(temperature=0.0), "temperature must be a positive"),
    (dict(temperature=torch.tensor([1.0, -2.0, 1.0])), "temperature must be positive"),
    (dict(temperature=torch.ones(2)), "temperature must have shape"),
    (dict(endpoint=torch.randn(3, 2, 4)), "noise is missing"),
    (dict(endpoint=torch.randn(3, 2, 4), noise=torch.randn(3, 8)), "noise must have shape"),
    (dict(endpoint=torch.randn(3, 2, 4).bfloat16(), noise=torch.randn(3, 2, 4)), "endpoint must have dtype"),
    (dict(endpoint_index=torch.zeros(3)), "endpoint_index must be an integer"),
    (dict(endpoint_index=torch.zeros(4, dtype=torch.long)), "endpoint_index must have shape"),
    (dict(pool_sq_norms=torch.ones(4)), "pool_sq_norms must have shape"),
    (dict(pool_sq_norms=torch.ones(5).double()), "pool_sq_norms must have dtype"),
    (dict(pool=torch.randn(3, 5, 2, 4), pool_sq_norms=torch.ones(5)), "pool_sq_norms belongs to a shared pool"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(z=torch.randn(3, 2, 4).double(), pool=torch.randn(5, 2, 4).double(), backend="triton"), "float64"),
]


@pytest.mark.parametrize("override,message", BAD)
def test_bad_arguments_raise_value_error_naming_them(override, message):
    kwargs = _valid()
    kwargs.update(override)
    with pytest.raises(ValueError, match=message):
        posterior_velocity(**kwargs)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        posterior_velocity(**_valid(), backend="triton")


def test_auto_backend_on_cpu_is_the_reference():
    args, kw = make_case(4, 6, (12,), labels="1d")
    auto = posterior_velocity(*args, **kw)
    ref = posterior_velocity(*args, **kw, backend="torch")
    for x, y in zip(auto, ref):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_import_touches_no_gpu_driver():
    # triton.runtime.driver.active raises on a machine without a GPU, so a clean import proves it is never touched.
    code = ("import pafm_kernels, pafm_kernels.shared_pool, pafm_kernels.per_row_pool, pafm_kernels.compile_check;"
            "print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_target_carries_no_gradient():
    args, kw = make_case(3, 5, (8,), residual=True)
    z = args[0].clone().requires_grad_(True)
    out = posterior_velocity(z, *args[1:], **kw, backend="torch")
    assert not out.velocity.requires_grad and not out.lse.requires_grad


def test_combining_disjoint_parts_equals_the_op_over_their_union():
    """combine_posteriors(op(A), op(B)) = op(A u B), including rows with nothing admissible in one part or in both."""
    from pafm_kernels import combine_posteriors

    args, kw = make_case(6, 10, (3, 5), labels="1d", residual=True, seed=3)
    z, pool = args[0], args[1]
    row_labels, pool_labels = kw.pop("row_labels"), kw.pop("pool_labels")
    row_labels[0], row_labels[1] = 7, 1  # row 0: no admissible candidate anywhere
    pool_labels[:5] = torch.tensor([0, 2, 0, 2, 1])  # part A holds no label 1: row 1 finds it only in part B
    whole = posterior_velocity(z, pool, *args[2:], row_labels=row_labels, pool_labels=pool_labels, **kw)
    parts = [posterior_velocity(z, pool[s], *args[2:], row_labels=row_labels, pool_labels=pool_labels[s], **kw)
             for s in (slice(0, 4), slice(4, 10))]
    assert torch.isneginf(parts[0].lse[1]) and torch.isfinite(parts[1].lse[1])
    both = combine_posteriors(*parts)
    assert torch.isneginf(both.lse[0]) and both.ess[0] == 0 and both.velocity[0].isnan().all()
    for got, want in zip(both, whole):
        assert torch.allclose(got[1:], want[1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["shared", "per_row", "bank"])
def test_reference_solves_only_the_active_rows(monkeypatch, layout):
    # A counter in the reference backend: it receives the active rows alone; they match the op over those rows,
    # and the others come back 0.
    api = sys.modules["pafm_kernels.posterior_velocity"]  # the package's attribute of that name is the function
    solved = []

    def counting(z, *args, **kw):
        solved.append(z.shape[0])
        return posterior_velocity_reference(z, *args, **kw)

    monkeypatch.setattr(api, "posterior_velocity_reference", counting)
    B = 9
    per_row = layout != "shared"
    args, kw = make_case(B, 13, (2, 20), per_row=per_row, labels="2d", prior=True, tau="rows", residual=True)
    if layout == "bank":
        kw["pool_index"] = torch.arange(B).flip(0)
    active = torch.tensor([True, False, False, True, True, False, True, False, False])
    out = posterior_velocity(*args, **kw, active=active, backend="torch")
    assert solved == [int(active.sum())]
    full = posterior_velocity(*args, **kw, backend="torch")
    for got, want in zip(out, full):
        torch.testing.assert_close(got[active], want[active], rtol=0, atol=0)
        assert (got[~active] == 0).all()


def test_pool_squared_norms_round_float64_sums_once():
    # Both paths (the Triton kernel here under the interpreter, torch for float64 pools) give each ||x_j||^2 as the
    # fp32 rounding of its float64 value, the accuracy the refinement bound's g_sum assumes.
    from pafm_kernels import pool_squared_norms

    pool = torch.randn(37, 3, 50, generator=torch.Generator().manual_seed(2)) * 10
    exact = pool.double().square().flatten(1).sum(1)
    for p in (pool, pool.double(), pool.bfloat16()):
        norms = pool_squared_norms(p)
        assert norms.dtype == torch.float32 and norms.shape == (37,)
        assert torch.equal(norms, p.double().square().flatten(1).sum(1).float())
    assert (pool_squared_norms(pool).double() - exact).abs().max() <= 2.0 ** -24 * exact.max()
    with pytest.raises(ValueError, match="pool must be a floating tensor"):
        pool_squared_norms(torch.ones(5, dtype=torch.long))
