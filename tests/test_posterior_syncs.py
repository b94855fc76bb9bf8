"""The op's Triton path never makes the host wait for the device and launches at most five kernels per call.

It runs in the interpreter on CPU tensors, where a sync would not show by itself: a dispatch mode raises on every
aten op that synchronises on a GPU (reads a value back to the host, or has a data-dependent output shape) and counts
the ops that would launch a kernel; a wrapper of the interpreter's launch counts the Triton launches.
"""
import contextlib
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction

from pafm_kernels import launch, per_row_pool, pool_squared_norms, posterior_velocity, shared_pool
from pafm_kernels.naive import posterior_velocity_naive as oracle
from pafm_kernels.testing import make_case, rel_err

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="counts the interpreter's launches; on a GPU bench/gpu_check.py profiles them")]

# aten ops that wait for the device: values read by the host, or output shapes that depend on values.
SYNCING = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "masked_scatter", "unique",
           "_unique", "_unique2", "unique_dim", "unique_consecutive", "equal", "bincount", "repeat_interleave",
           "histc", "_assert_async", "allclose"}
# aten ops that allocate or make views without launching anything.
NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view",
             "_reshape_alias", "reshape", "as_strided", "alias", "detach", "lift_fresh", "t", "transpose",
             "permute", "select", "slice", "unsqueeze", "squeeze", "expand", "unbind", "split"}


class DeviceWork(TorchDispatchMode):
    """Raises on syncing ops; records every launch (aten ops that compute or copy, and Triton kernels)."""

    def __init__(self):
        super().__init__()
        self.launches = []
        self.in_kernel = 0  # the interpreter's own tensor traffic inside a launch is not the op's

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if not self.in_kernel:
            bool_index = name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for a in args if isinstance(a, (list, tuple)) for i in a)
            if name in SYNCING or bool_index or (name == "_to_copy" and kwargs.get("device") is not None):
                raise AssertionError(f"aten.{name} waits for the device")
            if name not in NO_LAUNCH:
                self.launches.append(f"aten.{name}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def device_work(monkeypatch):
    mode = DeviceWork()
    run = InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        mode.launches.append(self.fn.__name__)
        mode.in_kernel += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            mode.in_kernel -= 1

    def no_host_copy(name):
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, **kwargs):
            if not mode.in_kernel:
                raise AssertionError(f"Tensor.{name} copies to the host")
            return original(self, *args, **kwargs)
        return guarded

    monkeypatch.setattr(InterpretedFunction, "run", counted_run)
    for name in ("tolist", "numpy", "__array__"):  # not dispatched as aten ops
        monkeypatch.setattr(torch.Tensor, name, no_host_copy(name))
    with mode:
        yield mode


SHARED = [  # (name, case, t_range): refined rows need sigma -> 0 at these small D; D > 128 and K > 64 split
    ("plain", dict(B=6, K=70, S=(140,)), (0.3, 0.6)),
    ("refined", dict(B=6, K=70, S=(140,), residual=True, own_index=True), (1 - 1e-4, 1 - 1e-4)),
    ("features", dict(B=7, K=70, S=(3, 50), labels="2d", prior=True, tau="rows", residual=True, own_index=True),
     (0.2, 0.9999)),
    ("labels_1d", dict(B=5, K=90, S=(200,), labels="1d", tau=0.7), (0.5, 0.9999)),
]


@pytest.mark.parametrize("split", [False, True], ids=["one_wave", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,case,t_range", SHARED, ids=[c[0] for c in SHARED])
def test_shared_pool_launches_without_host_sync(monkeypatch, name, case, t_range, dtype, split):
    if split:  # pretend a GPU whose waves the tiny grids do not fill: K1 splits D, the mix splits K (+1 launch)
        monkeypatch.setattr(launch, "SMS_WITHOUT_GPU", 132)
    args, kw = make_case(**case, dtype=dtype, t_range=t_range)
    with device_work(monkeypatch) as work:
        out = posterior_velocity(*args, **kw, backend="triton")
    expected = ["_squared_norms_kernel", "_logits_kernel", "_row_kernel", "_mix_kernel"]
    assert work.launches == expected + (["_mix_reduce_kernel"] if split else [])
    v64, lse64, ess64 = oracle(*args, **kw)
    assert max(rel_err(out.velocity, v64), rel_err(out.lse, lse64), rel_err(out.ess, ess64)) <= 2e-4


@pytest.mark.parametrize("split", [False, True], ids=["one_wave", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("features", [False, True])
def test_per_row_pool_launches_without_host_sync(monkeypatch, dtype, features, split):
    if split:  # a pretend GPU whose wave 5 rows do not fill: the candidates split, a second launch merges them
        monkeypatch.setattr(launch, "SMS_WITHOUT_GPU", 132)
        monkeypatch.setattr(per_row_pool, "SPLIT_MIN_K", 4)
    extra = dict(labels="2d", prior=True, tau="rows", residual=True) if features else {}
    args, kw = make_case(5, 9, (30,), per_row=True, dtype=dtype, t_range=(0.3, 0.9999), **extra)
    with device_work(monkeypatch) as work:
        posterior_velocity(*args, **kw, backend="triton")
    assert work.launches == ["_per_row_kernel"] + (["_per_row_merge_kernel"] if split else [])


def test_the_guard_catches_syncs_and_launches(monkeypatch):
    x = torch.arange(6.0)
    with pytest.raises(AssertionError, match="nonzero"), device_work(monkeypatch):
        (x > 2).nonzero()
    with pytest.raises(AssertionError, match="_local_scalar_dense"), device_work(monkeypatch):
        bool((x > 2).any())
    with pytest.raises(AssertionError, match="index"), device_work(monkeypatch):
        x[x > 2]
    with pytest.raises(AssertionError, match="tolist"), device_work(monkeypatch):
        x.tolist()
    with device_work(monkeypatch) as work:
        torch.full((3,), 2.0)
        x.float().contiguous()  # no-ops on a float contiguous tensor
    assert work.launches == ["aten.full"]


def test_refinement_switch_changes_nothing_on_launches(monkeypatch):
    # REFINE_NATS = inf (the kernels alone) keeps the same launches; the row kernel just skips refinement.
    monkeypatch.setattr(shared_pool, "REFINE_NATS", float("inf"))
    args, kw = make_case(6, 20, (40,), residual=True, t_range=(1 - 1e-4, 1 - 1e-4))
    with device_work(monkeypatch) as work:
        posterior_velocity(*args, **kw, backend="triton")
    assert work.launches == ["_squared_norms_kernel", "_logits_kernel", "_row_kernel", "_mix_kernel"]


@pytest.mark.parametrize("filled", [0, 2, 5], ids=["empty", "filling", "full"])
def test_bank_target_launches_the_same_kernels_without_host_sync_while_it_fills(monkeypatch, filled):
    """The bank's whole target (minibatch pool, own class's entries in place, combination): no sync, and the same
    five kernels whatever the fill, so nothing re-tunes while the bank fills."""
    from pafm.objectives import Objective, ObjectiveConfig, step_generator

    shape = (2, 6, 6)
    cfg = ObjectiveConfig(kind="pafm", source="bank", bank_per_class=4, cond_dropout=0.3, backend="triton")
    objective = Objective(cfg, {"kind": "class", "latent_shape": list(shape), "num_classes": 3}, "cpu")
    g = torch.Generator().manual_seed(filled)
    if filled:
        objective.source.update(torch.randn(3 * filled, *shape, generator=g), torch.arange(3 * filled) % 3)
    x, labels = torch.randn(6, *shape, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    draws = objective.draw(step_generator(0, 0, 0, "cpu"), len(x), 0, 1, "cpu")
    with device_work(monkeypatch) as work:
        target, _, diag = objective.targets(x, {"x": x, "label": labels}, draws)
    kernels = [name for name in work.launches if not name.startswith("aten.")]
    assert kernels == ["_squared_norms_kernel", "_logits_kernel", "_row_kernel", "_mix_kernel", "_per_row_kernel"]
    assert torch.isfinite(target).all() and (diag["ess"] >= 1 - 1e-5).all()


@contextlib.contextmanager
def gemm_work(monkeypatch):
    """Multiply-adds issued by tl.dot per kernel (the interpreter's dots), {kernel name: count}: the GEMM tiles a
    launch actually walked, masked rows included (a tile costs the same whatever its mask)."""
    from triton.runtime.interpreter import InterpreterBuilder

    work, current = {}, []
    run, dot = InterpretedFunction.run, InterpreterBuilder.create_dot

    def counted_run(self, *args, **kwargs):
        current.append(self.fn.__name__)
        try:
            return run(self, *args, **kwargs)
        finally:
            current.pop()

    def counted_dot(self, a, b, d, *args):
        m, k = a.data.shape[-2:]
        work[current[-1]] = work.get(current[-1], 0) + m * k * b.data.shape[-1]
        return dot(self, a, b, d, *args)

    monkeypatch.setattr(InterpretedFunction, "run", counted_run)
    monkeypatch.setattr(InterpreterBuilder, "create_dot", counted_dot)
    yield work


@pytest.mark.parametrize("split", [False, True], ids=["one_wave", "split"])
def test_gate_work_scales_with_active_rows_without_host_sync(monkeypatch, split):
    # 32 rows in row blocks of 16, the active ones scattered over both blocks. The gate's rows go first, so the
    # logits GEMM and the mix walk ceil(n_active / 16) row blocks: in row order any active row in a block would make
    # that block walk all of D and K. Run under the guard: no host sync.
    if split:  # a pretend GPU: the logits split over D and the mix over K (+ the fixed-order sum)
        monkeypatch.setattr(launch, "SMS_WITHOUT_GPU", 132)
    B, block = 32, 16
    monkeypatch.setattr(shared_pool, "INTERPRET_BLOCK_M", block)
    args, kw = make_case(B, 70, (140,), residual=True, own_index=True, t_range=(0.2, 0.6))
    g = torch.Generator().manual_seed(3)
    work = {}
    for n_active in (0, 1, 10, 17):
        active = torch.zeros(B, dtype=torch.bool)
        active[torch.randperm(B, generator=g)[:n_active]] = True
        with gemm_work(monkeypatch) as dots, device_work(monkeypatch) as launched:
            out = posterior_velocity(*args, **kw, active=active, backend="triton")
        kernels = [name for name in launched.launches if not name.startswith("aten.")]
        expected = ["_squared_norms_kernel", "_logits_kernel", "_row_kernel", "_mix_kernel"]
        assert kernels == expected + (["_mix_reduce_kernel"] if split else [])
        work[n_active] = (dots.get("_logits_kernel", 0), dots.get("_mix_kernel", 0))
        assert (out.velocity[~active] == 0).all() and (out.lse[~active] == 0).all() and (out.ess[~active] == 0).all()
        if n_active == 10:
            assert len({int(i) // block for i in active.nonzero()}) == 2  # spread over both row blocks
            rows = active.nonzero().squeeze(1)
            sub = dict(kw, endpoint=kw["endpoint"][rows], noise=kw["noise"][rows])
            del sub["endpoint_index"]
            v64, lse64, ess64 = oracle(args[0][rows], args[1], *(c[rows] for c in args[2:]), **sub)
            assert max(rel_err(out.velocity[rows], v64), rel_err(out.lse[rows], lse64),
                       rel_err(out.ess[rows], ess64)) <= 2e-4
    # A row block's tiles: the logits 64 columns x 128 of D per step, the mix 64 candidates x 128 of D.
    K_tiles, D_tiles = -(-70 // 64) * 64, -(-140 // 128) * 128
    per_block = (block * K_tiles * D_tiles, block * K_tiles * D_tiles)
    for n_active, (logits, mix) in work.items():
        blocks = -(-n_active // block)
        assert (logits, mix) == (blocks * per_block[0], blocks * per_block[1]), (n_active, work)


def test_precomputed_pool_norms_skip_their_launch(monkeypatch):
    # pool_squared_norms gives each ||x_j||^2 as the fp32 rounding of its float64 value; passed to the op, the norms
    # launch goes and the result is the same to the bit.
    args, kw = make_case(6, 70, (140,), residual=True, own_index=True, t_range=(0.3, 0.9999))
    pool = args[1]
    norms = pool_squared_norms(pool)
    exact = pool.double().square().sum(1)
    assert norms.dtype == torch.float32 and torch.equal(norms, exact.float())
    with device_work(monkeypatch) as work:
        given = posterior_velocity(*args, **kw, pool_sq_norms=norms, backend="triton")
    assert work.launches == ["_logits_kernel", "_row_kernel", "_mix_kernel"]
    computed = posterior_velocity(*args, **kw, backend="triton")
    for a, b in zip(given, computed):
        assert torch.equal(a, b)
