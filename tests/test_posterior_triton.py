"""Triton kernels against the float64 oracle and the op's contract: on the GPU when there is one, else run by the
interpreter on the CPU (`op` moves the inputs there and the results back)."""

import pytest
import torch

from pafm_kernels import launch, per_row_pool, posterior_velocity, shared_pool
from pafm_kernels.naive import posterior_velocity_naive as oracle
from pafm_kernels.testing import kernel_device, logits_and_bound, make_case, on_kernel_device, rel_err, t_grid_case

INTERPRETED = kernel_device().type == "cpu"


def op(*args, **kw):
    return on_kernel_device(posterior_velocity, *args, **kw)

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
    out = op(*args, **kw)
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


@pytest.mark.parametrize("split", [False, True], ids=["one_program_per_row", "split_over_k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", PER_ROW)
def test_per_row_kernel_matches_oracle(monkeypatch, case, dtype, split):
    if split:  # a pretend GPU whose wave the rows do not fill: each row's candidates spread over several programs
        monkeypatch.setattr(launch, "SMS_WITHOUT_GPU", 132)
        monkeypatch.setattr(per_row_pool, "SPLIT_MIN_K", 4)
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
        out = op(z, x[:, None], a, s, da, ds)
    else:
        ids = torch.arange(B)
        out = op(z, x, a, s, da, ds, row_labels=ids, pool_labels=ids, endpoint=x, noise=eps)
    u = da[:, None] * x + ds[:, None] * eps
    assert rel_err(out.velocity, u) <= 1e-5
    torch.testing.assert_close(out.ess, torch.ones(B), rtol=0, atol=1e-5)


@pytest.mark.parametrize("per_row", [False, True])
def test_row_without_admissible_candidate(monkeypatch, per_row):
    monkeypatch.setattr(per_row_pool, "SPLIT_MIN_K", 2)  # with the pretend GPU below, per-row rows split over K
    monkeypatch.setattr(launch, "SMS_WITHOUT_GPU", 132 if per_row else 1)
    B, K = 4, 6
    args, _ = make_case(B, K, (20,), per_row=per_row)
    row_labels = torch.tensor([0, 7, -1, 0])
    pool_labels = torch.zeros(B, K, dtype=torch.long)
    out = op(*args, row_labels=row_labels, pool_labels=pool_labels)
    assert out.lse[1] == float("-inf") and out.ess[1] == 0 and torch.isnan(out.velocity[1]).all()
    keep = torch.tensor([0, 2, 3])
    v64, lse64, _ = oracle(*args, row_labels=row_labels, pool_labels=pool_labels)
    assert rel_err(out.velocity[keep], v64[keep]) <= 2e-4 and rel_err(out.lse[keep], lse64[keep]) <= 2e-4


@pytest.mark.parametrize("per_row", [False, True])
def test_data_end_stays_finite_with_residual_form(per_row):
    # sigma = 1e-4 on the linear path with near-duplicate candidates (per row) or distinct ones (shared).
    args, kw = make_case(6, 8, (64,), per_row=per_row, residual=True, t_range=(1 - 1e-4, 1 - 1e-4), seed=2)
    out = op(*args, **kw)
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
    out = op(*args, **kw)
    v64, lse64, ess64 = oracle(*args, **kw)
    assert (ess64[sigma < 0.01] > 1.2).all()  # the near-duplicates share the weight
    errs = rel_err(out.velocity, v64), rel_err(out.lse, lse64), rel_err(out.ess, ess64)
    assert max(errs) <= 1e-5, errs


T_GRID = [1e-3, 0.05, 0.2, 0.4, 0.6, 0.8, 0.95, 0.99, 0.999, 0.9999, 1 - 1e-5]  # sigma down to 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_t_grid_at_d4096_with_near_duplicates(per_row, dtype):
    # Each row's endpoint, three near-duplicates at 0.1 sigma per coordinate and eight unrelated candidates, D = 4096:
    # at the data end the fp32 expansion is off by ~1e6 nats and every shared-pool row is refined on the device.
    args, kw = t_grid_case(T_GRID, 4096, dtype=dtype, per_row=per_row)
    out = op(*args, **kw)
    v64, lse64, ess64 = oracle(*args, **kw)
    assert (ess64[:4] > 1.5).all()  # the weights are spread up to t = 0.4
    # Measured worst cases (interpreter): shared 1.2e-7 (velocity) and 2e-7 (ESS); per-row 3.2e-5 and 2e-5 (its fp32
    # distances sum 4096 terms into logits of ~2000 nats).
    tol = 1e-6 if not per_row else 1e-4
    errs = rel_err(out.velocity, v64), rel_err(out.lse, lse64), rel_err(out.ess, ess64)
    assert errs[0] <= tol and errs[1] <= 1e-6 and errs[2] <= tol, errs
    if not per_row and dtype == torch.float32:
        # Without refinement the data-end rows are wrong: the refinement is what keeps them exact.
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(shared_pool, "REFINE_NATS", float("inf"))
            raw = op(*args, **kw)
        assert rel_err(raw.velocity[-1], v64[-1]) > 100 * rel_err(out.velocity[-1], v64[-1])
        assert (raw.lse.double() - lse64).abs().max() > 1e3


def test_endpoint_index_keeps_the_own_endpoint():
    # Twenty near-copies of each endpoint, 1e-4 away per coordinate: far below what the fp32 expansion resolves at
    # sigma = 1e-5 (they tie with the endpoint and win on index), far above sigma in exact terms, so the own
    # endpoint carries all the weight. Only endpoint_index guarantees that refinement looks at it.
    g = torch.Generator().manual_seed(0)
    B, D, n = 4, 1024, 20
    sigma = torch.tensor([1e-5, 1e-5, 1e-4, 0.5])
    a = 1 - sigma
    x, eps = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    z = a[:, None] * x + sigma[:, None] * eps
    pool = torch.cat([(x[:, None] + 1e-4 * torch.randn(B, n, D, generator=g)).reshape(B * n, D), x])
    args = (z, pool, a, sigma, torch.ones(B), -torch.ones(B))
    v64, lse64, _ = oracle(*args, endpoint=x, noise=eps)
    kept = op(*args, endpoint=x, noise=eps, endpoint_index=B * n + torch.arange(B))
    assert rel_err(kept.velocity, v64) <= 1e-6 and (kept.lse.double() - lse64).abs().max() <= 1e-3
    lost = op(*args, endpoint=x, noise=eps)
    assert rel_err(lost.velocity, v64) > 1e-2  # what the index prevents


@pytest.mark.skipif(not INTERPRETED, reason="emulates the GPU host path in the interpreter; a GPU runs it for real")
def test_gpu_launch_path_buckets_k_and_splits_small_grids(monkeypatch):
    # The GPU host path (autotuned kernels, GPU tile sizes, splits under one wave of 132 SMs) run by the
    # interpreter with fp32 inputs (its bf16 dots are wrong) and a stand-in benchmark for the autotuner.
    benchmarks = []

    def bench(fn, *args, **kwargs):
        benchmarks.append(fn)
        fn()
        return 1.0

    monkeypatch.setattr(shared_pool, "INTERPRET", False)
    monkeypatch.setattr(per_row_pool, "INTERPRET", False)
    monkeypatch.setattr(launch, "SMS_WITHOUT_GPU", 132)
    for tuned in (shared_pool._logits_tuned, shared_pool._mix_tuned, per_row_pool._per_row_tuned):
        monkeypatch.setitem(tuned.__dict__, "do_bench", bench)  # a cached property that would ask for a driver
        monkeypatch.setattr(tuned, "cache", {})
    tuned_after = []
    for K in (300, 400, 700):  # 300 and 400 share the bucket 512: a filling bank does not re-tune every step
        args, kw = make_case(6, K, (300,), labels="1d", prior=True, residual=True, own_index=True,
                             t_range=(0.3, 0.9999))
        out = op(*args, **kw)
        tuned_after.append((len(shared_pool._logits_tuned.cache), len(shared_pool._mix_tuned.cache)))
        v64, lse64, ess64 = oracle(*args, **kw)
        assert max(rel_err(out.velocity, v64), rel_err(out.lse, lse64), rel_err(out.ess, ess64)) <= 2e-4
    assert tuned_after == [(1, 1), (1, 1), (2, 2)] and len(benchmarks) == 8  # two configurations each
    args, kw = make_case(6, 9, (300,), per_row=True, residual=True)
    out = op(*args, **kw)
    assert rel_err(out.velocity, oracle(*args, **kw)[0]) <= TOL_PER_ROW
    assert len(per_row_pool._per_row_tuned.cache) == 1 and len(benchmarks) == 8 + len(per_row_pool.PER_ROW_CONFIGS)


def test_weight_spread_over_more_candidates_than_refined():
    # 60 near-ties per row at small sigma, more than the 16 candidates a row refines exactly: the rest keep their
    # approximate logits (fp32 S of ~1e6 nats here, so ~0.1 nat each), a known, bounded loss of accuracy. Measured
    # (interpreter): velocity 6e-6 / 7e-5 / 7e-4 and ESS 9e-5 / 4e-3 / 8e-2 at sigma = 0.1 / 0.03 / 0.01.
    g = torch.Generator().manual_seed(1)
    B, D, n = 4, 256, 60
    sigma = torch.tensor([0.1, 0.03, 0.01, 0.3])
    a = 1 - sigma
    x, eps = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    z = a[:, None] * x + sigma[:, None] * eps
    pool = torch.cat([x, (x[:, None] + 0.05 * sigma[:, None, None] * torch.randn(B, n, D, generator=g)).flatten(0, 1)])
    args = (z, pool, a, sigma, torch.ones(B), -torch.ones(B))
    v64, lse64, ess64 = oracle(*args, endpoint=x, noise=eps)
    assert (ess64 > 30).all()
    out = op(*args, endpoint=x, noise=eps, endpoint_index=torch.arange(B))
    assert rel_err(out.velocity, v64) <= 2e-3 and rel_err(out.ess, ess64) <= 0.2
    assert rel_err(out.velocity[[0, 3]], v64[[0, 3]]) <= 1e-4


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_pool_index_reads_per_row_pools_in_place(backend):
    """A class bank's slice (N, K, *S), non-contiguous, read through pool_index equals the gathered per-row pools."""
    B, K, S, N = 7, 5, (2, 9), 4
    device = kernel_device() if backend == "triton" else torch.device("cpu")
    args, kw = make_case(B, K, S, per_row=True, labels="2d", residual=True, tau="rows", seed=5)
    z, pool = args[0], args[1]
    g = torch.Generator().manual_seed(1)
    index = torch.randint(0, N, (B,), generator=g)
    padded = torch.randn(N, K + 1, *S, generator=g)  # a scratch slot past each class, as the bank keeps
    padded[index, :K] = pool  # rows sharing a class get the same pool (the last write wins)
    bank = padded.to(device)[:, :K]
    assert not bank.is_contiguous()
    on = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    rest = [on(v) for v in args[2:]]
    kw_on = {k: on(v) for k, v in kw.items()}
    out = posterior_velocity(on(z), bank, *rest, **kw_on, pool_index=on(index), backend=backend)
    v64, lse64, ess64 = oracle(z, padded[index, :K], *args[2:], **kw)
    assert max(rel_err(out.velocity.cpu(), v64), rel_err(out.lse.cpu(), lse64), rel_err(out.ess.cpu(), ess64)) \
        <= TOL_PER_ROW
    with pytest.raises(ValueError, match="pool_index selects per-row pools"):
        posterior_velocity(on(z), on(pool[0]), *rest, pool_index=on(index), backend=backend)


@pytest.mark.skipif(INTERPRETED, reason="4.3 GB of candidates: the interpreter would take hours; GPU only "
                                        "(bench/gpu_check.py runs the same case)")
def test_per_row_pools_over_2_31_elements_use_64_bit_offsets():
    from pafm_kernels.reference import posterior_velocity_reference

    B, K, D = 64, 8200, 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    pool = torch.randn(B, K, D, device="cuda", dtype=torch.bfloat16, generator=g)
    t = torch.rand(B, device="cuda", generator=g) * 0.9 + 0.05
    z = (t[:, None] * pool[:, -1].float() + (1 - t)[:, None] * torch.randn(B, D, device="cuda", generator=g))
    coefs = (t, 1 - t, torch.ones_like(t), -torch.ones_like(t))
    out = posterior_velocity(z.bfloat16(), pool, *coefs, backend="triton")
    v64, lse64, ess64 = posterior_velocity_reference(z.bfloat16().double(), pool, *coefs, 1.0)
    assert max(rel_err(out.velocity, v64), rel_err(out.lse, lse64), rel_err(out.ess, ess64)) <= TOL_PER_ROW


# ---- refinement only where it is needed ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_refinement_bound_is_ten_times_the_worst_measured_logit_error(dtype):
    # D = 4096, t over (0.01, 0.99), each row's own endpoint in the pool (its dot products are the largest and all
    # of one sign near t = 1). Measured in the interpreter (fp32 round-to-nearest dots): worst 1/53 of the bound
    # for fp32, 1/34 (fp16) and 1/24 (bf16); the bound models a truncating tensor-core accumulator, which the GPU
    # check measures (bench/gpu_check.py, logit_error_vs_bound).
    g = torch.Generator().manual_seed(7)
    B, K, D = 64, 128, 4096
    t = torch.rand(B, generator=g) * 0.98 + 0.01
    x = torch.randn(K, D, generator=g)
    z = t[:, None] * x[:B] + (1 - t)[:, None] * torch.randn(B, D, generator=g)
    logits, exact, bound = logits_and_bound(z.to(dtype), x.to(dtype), t, 1 - t)
    ratio = ((logits - exact).abs().amax(1) / bound).max().item()
    print(f"{dtype}: worst logit error / bound = {ratio:.4f}")
    assert ratio <= 0.1


def _gate_case(B, D, dtype, t, seed=0):
    """A minibatch pool (every row's own endpoint, as the trainer passes it) in the residual form."""
    g = torch.Generator().manual_seed(seed)
    x, eps = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    z = t[:, None] * x + (1 - t)[:, None] * eps
    return z.to(dtype), x.to(dtype), eps.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_at_most_five_percent_of_rows_are_refined_at_d4096_inside_the_gate(dtype):
    # The row kernel's decision evaluated on the host from exact logits (no kernel run): t uniform in [0, 0.5], a
    # pool of the 512 rows' endpoints at D = 4096. With random latents the posterior is one-hot wherever the bound
    # exceeds REFINE_NATS, so no row is refined (the bound alone would refine 62% (fp32) and 57% (bf16) of them).
    B, D = 512, 4096
    t = torch.rand(B, generator=torch.Generator().manual_seed(1)) * 0.5
    z, x, _ = _gate_case(B, D, dtype, t)
    a, s = t.double(), 1 - t.double()
    z64, x64 = z.double(), x.double()
    logits = (2 * a[:, None] * (z64 @ x64.T) - a[:, None] ** 2 * (x64 * x64).sum(1)) / (2 * s * s)[:, None]
    refined = shared_pool.refined_rows(logits, z, x, t, 1 - t, torch.ones(B), -torch.ones(B), torch.arange(B))
    share = refined.double().mean().item()
    print(f"{dtype}: {share:.1%} of rows refined")
    assert share <= 0.05


def test_kernel_refines_the_rows_the_host_decision_names():
    # Rows 0-7 have three near-duplicates of their endpoint at 0.1 sigma (the weight stays spread: refined wherever
    # the bound is large), rows 8-15 none (one-hot: never refined); t from 0.01 to 0.9999.
    B, D = 16, 256
    t = torch.tensor([0.01, 0.3, 0.7, 0.9, 0.99, 0.999, 0.9999, 0.5] * 2)
    z, x, eps = _gate_case(B, D, torch.float32, t, seed=3)
    sigma = 1 - t
    g = torch.Generator().manual_seed(4)
    near = x[:8].repeat(3, 1) + 0.1 * sigma[:8].repeat(3)[:, None] * torch.randn(24, D, generator=g)
    pool = torch.cat([x, near, torch.randn(16, D, generator=g)])
    coefs = (t, sigma, torch.ones(B), -torch.ones(B))
    from pafm_kernels.launch import prepare

    d = kernel_device()
    inp = prepare(z.to(d), pool.to(d), *(c.to(d) for c in coefs), 1.0, endpoint=x.to(d), noise=eps.to(d),
                  endpoint_index=torch.arange(B).to(d))
    lg = shared_pool.launch_logits(inp)
    logits = lg.logits.clone()
    stats = shared_pool.launch_rows(inp, lg)[0]
    in_kernel = stats[3].cpu() != 0
    on_host = shared_pool.refined_rows(logits.cpu(), z, pool, *coefs, torch.arange(B))
    _, _, bound = logits_and_bound(z, pool, t, sigma)
    assert torch.equal(in_kernel, on_host)
    assert in_kernel[:8].any() and not in_kernel[8:].any()
    assert (bound[8:] > shared_pool.REFINE_NATS).any()  # one-hot rows the bound alone would have refined
    out = op(z, pool, *coefs, endpoint=x, noise=eps, endpoint_index=torch.arange(B))
    v64, lse64, ess64 = oracle(z, pool, *coefs, endpoint=x, noise=eps)
    assert max(rel_err(out.velocity, v64), rel_err(out.lse, lse64), rel_err(out.ess, ess64)) <= 1e-5


# ---- the gate: rows outside t_range are not computed ---------------------------------------------------------------
@pytest.mark.parametrize("layout", ["shared", "shared_split", "per_row", "per_row_split", "bank"])
def test_gated_rows_are_neither_read_nor_computed(monkeypatch, layout):
    # The gated-out rows' inputs are NaN: any read of them would reach a result. The active rows match the oracle
    # on the active rows alone; the others come back 0. "shared_split" also splits the logits over D and the mix
    # over K (a pretend GPU), with the first row block entirely gated out (its ||x||^2 still counts).
    if layout.endswith("split"):
        monkeypatch.setattr(launch, "SMS_WITHOUT_GPU", 132)
        monkeypatch.setattr(per_row_pool, "SPLIT_MIN_K", 16)
        layout = layout[:-len("_split")] if layout == "per_row_split" else layout
    B, K, D = 40, 70, 140
    per_row = layout in ("per_row", "bank")
    args, kw = make_case(B, K, (D,), per_row=per_row, residual=True, own_index=True, t_range=(0.3, 0.9999))
    if layout == "bank":
        kw["pool_index"] = torch.arange(B).flip(0)
        args = (args[0], args[1].flip(0), *args[2:])
    active = torch.rand(B, generator=torch.Generator().manual_seed(5)) < 0.5
    if layout == "shared_split":
        active[:32] = False
    z = args[0].clone()
    z[~active] = float("nan")
    noise, endpoint = kw["noise"].clone(), kw["endpoint"].clone()
    noise[~active], endpoint[~active] = float("nan"), float("nan")
    out = op(z, *args[1:], **dict(kw, noise=noise, endpoint=endpoint), active=active)
    rows = active.nonzero().squeeze(1)
    sub = lambda t: t[rows] if isinstance(t, torch.Tensor) and t.shape[0] == B and t.dim() >= 1 else t  # noqa: E731
    sub_args = [args[0][rows], args[1] if not per_row or layout == "bank" else args[1][rows], *map(sub, args[2:])]
    sub_kw = {k: sub(v) for k, v in kw.items() if k != "endpoint_index"}
    v64, lse64, ess64 = oracle(*sub_args, **sub_kw)
    tol = TOL_PER_ROW if per_row else TOL[torch.float32]
    errs = rel_err(out.velocity[rows], v64), rel_err(out.lse[rows], lse64), rel_err(out.ess[rows], ess64)
    assert max(errs) <= tol, errs
    assert (out.velocity[~active] == 0).all() and (out.lse[~active] == 0).all() and (out.ess[~active] == 0).all()
