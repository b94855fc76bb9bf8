"""A training step makes the host wait for the device at most once outside logging steps.

On the CPU nothing waits, so a dispatch mode flags every op that would wait on a GPU: values read back by the host
(`.item()`, `bool()`, `.tolist()`), outputs whose size depends on values (nonzero, boolean-mask indexing, unique,
bincount, ...), comparisons answered on the host (equal) and device copies that are not `non_blocking`.  It runs the
trainer's own `train_step` and the logger's per-step accounting, in process on one gloo rank, with the Triton op in
the interpreter (the GPU's path; the CPU reference op reads group sizes back, the kernels do not).  Host tensors that
stay on the host on a GPU too (AdamW's step counters) are not device reads; tensors from the loader are the host side
of the copies to the device.
"""
import contextlib
import traceback

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction

from pafm.config import load_config
from pafm.distributed import World
from pafm.logger import MetricsLogger, SideWork
from pafm.train import Config, build_data, build_model_and_optimizer, build_objective, train_step
from pafm.checkpoint import TrainState

SYNCING = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "masked_scatter", "unique",
           "_unique", "_unique2", "unique_dim", "unique_consecutive", "equal", "allclose", "bincount", "histc"}


class Syncs(TorchDispatchMode):
    """Records, in `found`, each op that would make the host wait for a GPU."""

    def __init__(self, loaded=(), counters=()):
        super().__init__()
        self.found, self.where = [], []
        self.loaded = set(loaded)  # data pointers of the loader's tensors: host memory, copied to the device
        self.counters = set(counters)  # data pointers of tensors that stay in host memory on a GPU too
        self.in_kernel = 0  # the Triton interpreter's own tensor traffic is not the program's

    def note(self, what):
        if not self.in_kernel:
            self.found.append(what)
            self.where.append(next((f"{f.filename}:{f.lineno}" for f in reversed(traceback.extract_stack())
                                    if "/pafm/" in f.filename), "?"))  # for the failure message

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        on_host = any(type(a) is torch.Tensor and a.data_ptr() in self.counters for a in args)
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in args if isinstance(a, (list, tuple)) for i in a)
        if (name in SYNCING and not on_host) or bool_index \
                or (name == "repeat_interleave" and kwargs.get("output_size") is None) \
                or (name == "_to_copy" and kwargs.get("device") is not None and not kwargs.get("non_blocking")):
            self.note(f"aten.{name}")
        return func(*args, **kwargs)


def _moves_device(args, kwargs) -> bool:
    return "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args)


@contextlib.contextmanager
def watching(loaded=(), counters=()):
    """The mode, plus the reads and copies that do not reach the dispatcher as aten ops on the CPU."""
    mode = Syncs(loaded, counters)
    run = InterpretedFunction.run

    def kernel_run(self, *args, **kwargs):
        mode.in_kernel += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            mode.in_kernel -= 1

    def read(name):
        original = getattr(torch.Tensor, name)

        def reading(self, *args, **kwargs):
            mode.note(f"Tensor.{name}")
            return original(self, *args, **kwargs)
        return reading

    to = torch.Tensor.to

    def copying_to(self, *args, **kwargs):  # a host tensor copied to the device waits unless non_blocking
        if self.data_ptr() in mode.loaded and _moves_device(args, kwargs) and not kwargs.get("non_blocking"):
            mode.note("Tensor.to(device) without non_blocking")
        return to(self, *args, **kwargs)

    def creating(name):
        original = getattr(torch, name)

        def create(*args, **kwargs):
            if kwargs.get("device") is not None:
                mode.note(f"torch.{name}(device=...) copies from the host")
            return original(*args, **kwargs)
        return create

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InterpretedFunction, "run", kernel_run)
        for name in ("tolist", "numpy", "__array__", "cpu", "cuda"):
            patch.setattr(torch.Tensor, name, read(name))
        patch.setattr(torch.Tensor, "to", copying_to)
        for name in ("tensor", "as_tensor"):
            patch.setattr(torch, name, creating(name))
        with mode:
            yield mode


def test_the_watch_sees_what_would_wait():
    x = torch.arange(6.0)
    loaded = torch.ones(3)  # stands for a batch from the loader, in host memory
    for would_wait in (lambda: (x > 2).nonzero(), lambda: bool((x > 2).any()), lambda: x[x > 2], lambda: x.tolist(),
                       lambda: loaded.to("cpu"), lambda: torch.tensor([1.0], device="cpu"), lambda: x.sum().item(),
                       lambda: torch.bincount(x.long()), lambda: torch.equal(x, x), lambda: x.cpu()):
        with watching(loaded={loaded.data_ptr()}) as seen:
            would_wait()
        assert len(seen.found) == 1, seen.found
    counter = torch.tensor(3.0)  # stands for AdamW's step count, in host memory
    with watching(loaded={loaded.data_ptr()}, counters={counter.data_ptr()}) as seen:
        loaded.to("cpu", non_blocking=True)
        counter.item()
        x.to("cpu")  # already on the device
        torch.zeros(3, dtype=torch.int64).index_add_(0, x.long() % 3, torch.ones(6, dtype=torch.int64))
        torch._assert_async(x.max() < 10, "fine")
        x[x.long() % 2]  # integer indexing: the output size is known
    assert seen.found == []


@pytest.fixture
def one_rank(tmp_path, env, monkeypatch):
    monkeypatch.setenv("PAFM_CACHE", env["PAFM_CACHE"])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield World(rank=0, size=1, device=torch.device("cpu"))
    dist.destroy_process_group()


LOG_EVERY = 3


@pytest.mark.parametrize("objective", [
    ["objective.kind=fm"],
    ["objective.source=bank", "objective.bank_per_class=4", "objective.t_range=[0.1, 0.9]"],
], ids=["fm", "bank-gated"])
def test_one_host_read_per_step_and_the_log_reads_only_when_it_writes(tmp_path, one_rank, objective):
    cfg = load_config(Config, "configs/digits_sit.yaml", [
        f"run.dir={tmp_path / 'run'}", "model.kwargs={depth: 2, hidden_size: 64, num_heads: 2}",
        "data.batch_size=16", "data.micro_batch_size=8", "data.validate=false", "objective.backend=triton",
        "objective.cond_dropout=0.3", "train.steps=6", "optim.warmup_steps=0", *objective])
    world = one_rank
    info, loader, accum = build_data(cfg, world)
    assert accum == 2  # two micro-batches per step: the read is still one
    model, optimizer, ema = build_model_and_optimizer(cfg, world, info)
    objective = build_objective(cfg, info, world, loader)
    logger = MetricsLogger(tmp_path, world, every=LOG_EVERY, total_steps=cfg.train.steps, start_step=0,
                           batch_size=cfg.data.batch_size, pafm=cfg.objective.kind == "pafm", tensorboard=False,
                           progress=True, side=SideWork(world), train_flops_per_image=1.0)
    autocast = torch.autocast("cpu", enabled=False)
    state = TrainState()
    batches = [next(loader) for _ in range(cfg.train.steps * accum)]  # the loader works on the host
    loaded = {v.data_ptr() for b in batches for v in b.values() if isinstance(v, torch.Tensor)}
    batches = iter(batches)

    def step(stop=False):
        return train_step(cfg, world, model, optimizer, ema, objective, batches, state, accum, autocast,
                          stop_requested=lambda: stop)

    first = step()  # the first step builds AdamW's state (and would tune kernels on a GPU)
    logger.step(state.step, 1e-3, first.loss, first.fm_loss, first.grad_norm, first.kept, first.bins, 0)
    counters = {s["step"].data_ptr() for s in optimizer.state.values()}
    bank_before = {k: v.clone() for k, v in objective.state_dict().items()}
    for _ in range(cfg.train.steps - 2):
        with watching(loaded, counters) as in_step:
            result = step()
        # kept and stop, read once
        assert in_step.found == ["Tensor.tolist"], (state.step, in_step.found, in_step.where)
        assert result.kept and not result.stop
        with watching(loaded, counters) as in_log:
            logger.step(state.step, 1e-3, result.loss, result.fm_loss, result.grad_norm, result.kept, result.bins, 0)
        if state.step % LOG_EVERY:
            assert in_log.found == [], (state.step, in_log.found, in_log.where)
        else:  # the window and the t-bins, one read each
            assert in_log.found == ["Tensor.tolist"] * (2 if cfg.objective.kind == "pafm" else 1), in_log.found
    if cfg.objective.kind == "pafm":  # the bank was updated by every kept step
        assert not torch.equal(bank_before["source.count"], objective.state_dict()["source.count"])
    # The stop request of this rank reaches every rank through the same read.
    with watching(loaded, counters) as in_step:
        assert step(stop=True).stop
    assert in_step.found == ["Tensor.tolist"]
    logger.close()


def test_a_non_finite_step_changes_nothing_but_the_counters(tmp_path, one_rank):
    cfg = load_config(Config, "configs/digits_sit.yaml", [
        f"run.dir={tmp_path / 'run'}", "model.kwargs={depth: 2, hidden_size: 64, num_heads: 2}",
        "data.batch_size=8", "data.validate=false", "objective.bank_per_class=4", "train.steps=2"])
    world = one_rank
    info, loader, accum = build_data(cfg, world)
    model, optimizer, ema = build_model_and_optimizer(cfg, world, info)
    objective = build_objective(cfg, info, world, loader)
    state = TrainState()
    batch = next(loader)
    poisoned = dict(batch, x=batch["x"].clone())
    poisoned["x"][3] = float("nan")
    args = (cfg, world, model, optimizer, ema, objective)
    no_autocast = torch.autocast("cpu", enabled=False)

    def snapshot():  # weights, EMA, bank and AdamW's state, as plain tensors
        parts = [model.state_dict(), ema.state_dict(), objective.state_dict(),
                 {f"adam.{i}.{k}": v for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()}]
        return {f"{n}.{k}": (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
                for n, part in enumerate(parts) for k, v in part.items()}

    train_step(*args, iter([batch]), state, accum, no_autocast)  # AdamW's state exists from here on
    before = snapshot()
    result = train_step(*args, iter([poisoned]), state, accum, no_autocast)
    assert not result.kept and (state.skipped, state.bad_in_row, state.step) == (1, 1, 2)
    after = snapshot()
    assert before.keys() == after.keys() and any(k.startswith("2.source") for k in before)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert train_step(*args, iter([batch]), state, accum, no_autocast).kept and state.bad_in_row == 0
    moved = snapshot()  # a kept step does move the weights and fill the bank: the comparison above can fail
    assert not torch.equal(moved["0.final_layer.linear.weight"], before["0.final_layer.linear.weight"])
    assert not torch.equal(moved["2.source.count"], before["2.source.count"])
