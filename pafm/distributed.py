"""Process group setup (the trainer, evaluation and dataset preparation) and FSDP2 wrapping.

One code path for every launch: under torchrun the environment names the rank and world; under plain
`python -m pafm.train` a one-rank group is created, so the single-process run goes through the same FSDP2 code
(and gives the same numbers as a multi-rank run with the same global batch).
"""
from __future__ import annotations

import datetime
import hashlib
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


# How long a rank waits in a collective before the run is declared hung.  Ranks do the same work between
# collectives (dataset validation is split over them, and a restart skips shards checked before), so the waits are
# the spread between ranks plus rank 0's side work (a preview grid, the EMA export): seconds to a few minutes.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class World:
    """This process's place in the launch: its rank, the number of ranks and its device."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> tuple[int, int, int]:
    """(rank, world size, local rank) as the launcher's environment names them (torchrun sets RANK, WORLD_SIZE and
    LOCAL_RANK); (0, 1, 0) for a plain process.  Valid before any process group exists."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """auto (CUDA when visible, else the CPU), cpu, cuda (this rank's GPU, cuda:LOCAL_RANK) or cuda:N; ValueError
    for a device that does not exist here."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but no CUDA device is visible")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_launcher():
    """Under torchrun, ask the kernel to send SIGTERM when the launcher dies: a killed torchrun must not leave its
    ranks training as orphans (SIGTERM makes the trainer checkpoint and exit)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the launcher died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def init_distributed(device: str = "auto", backend: str | None = None,
                     timeout: datetime.timedelta = COLLECTIVE_TIMEOUT, group_when_alone: bool = True) -> World:
    """This process's World, with the default process group initialised (`pick_device` names the device).

    backend: nccl on GPUs, gloo on the CPU, unless given (dataset preparation asks for gloo: it only waits at a
    barrier, while its encoders use the GPU). timeout: how long a collective may wait before the group fails; a
    tool whose ranks wait at a barrier for each other's share of long work passes a longer one.  Under torchrun
    every rank uses its own GPU (cuda:LOCAL_RANK).  group_when_alone=False: a process launched alone joins no group
    (the tools that need collectives only to agree with other ranks)."""
    die_with_launcher()
    rank, size, local_rank = launched()
    if size > 1 and device.startswith("cuda"):
        device = "cuda"
    dev = pick_device(device, local_rank)
    if size == 1 and not group_when_alone:
        return World(0, 1, dev)
    if "RANK" not in os.environ:  # plain `python -m`: a one-rank group on this host
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=dev if backend == "nccl" else None, timeout=timeout)
    return World(dist.get_rank(), dist.get_world_size(), dev)


def shard_model(model: torch.nn.Module, world: World, bf16: bool, activation_checkpointing: bool, compile: bool):
    """FSDP2 per block and at the root (torchtitan's order: checkpoint, compile, then shard each block).

    bf16: parameters are all-gathered and computed in bf16, gradients reduced in fp32; the sharded master weights
    the optimizer sees stay fp32.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    mesh = init_device_mesh(world.device.type, (world.size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    # The root keeps its inputs in fp32: t must reach the time embedding unrounded (bf16 has 128 values in [0.5, 1)),
    # and the prediction must come back in fp32. Autocast in the trainer runs the root's own matmuls in bf16.
    root_policy = MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=torch.float32,
                                       cast_forward_inputs=False)
    for i, block in enumerate(model.blocks):
        if activation_checkpointing:
            block = checkpoint_wrapper(block)  # its state-dict hooks keep the parameter names unchanged
        if compile:
            block.compile()
        model.blocks[i] = block
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=root_policy)
    return model


class SharedError(ValueError):
    """An error that every rank raises together: rank 0 alone reports it, so torchrun shows it once."""


def one_line(err) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 1000 else text[:997] + "..."


def agree(fn, *args, rank0_only: bool = False, errors=(ValueError, OSError), group=None):
    """`fn(*args)` with one outcome on every rank, so that no rank waits forever in a collective for one that failed.

    fn runs on every rank, or with `rank0_only` on rank 0 alone, its value then sent to every rank (so that all act on
    one view of the filesystem).  When one of `errors` occurs on any rank, every rank raises SharedError with the
    lowest such rank's message.  In a single process fn runs as it is and its error propagates unchanged."""
    if not (dist.is_initialized() and dist.get_world_size(group) > 1):
        return fn(*args)
    value, error = None, None
    if not rank0_only or dist.get_rank() == 0:
        try:
            value = fn(*args)
        except errors as err:
            error = one_line(err)
    if rank0_only:
        box = [(value, error)]
        dist.broadcast_object_list(box, src=0, group=group)
        value, first = box[0]
    else:
        messages = [None] * dist.get_world_size(group)
        dist.all_gather_object(messages, error, group=group)
        first = next((m for m in messages if m is not None), None)
    if first is not None:
        raise SharedError(first)
    return value


def print_once(line: str):
    """Print `line` on stderr unless another rank of this launch printed the same line already.

    The first rank to reach an error prints it, whichever rank that is: when it then exits, the launcher stops the
    other ranks, which may never reach the line themselves.  The launch's key-value store (it outlives the ranks)
    decides who is first; without one, or when it cannot be reached, the line is printed."""
    first = True
    if dist.is_initialized() and dist.get_world_size() > 1:
        digest = hashlib.sha256(line.encode()).hexdigest()[:16]
        key = f"pafm/error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{digest}"
        try:
            first = dist.distributed_c10d._get_default_store().add(key, 1) == 1
        except Exception:  # noqa: BLE001 - a store that is gone: better twice than never
            first = True
    if first:
        print(line, file=sys.stderr, flush=True)


def peer_failure(err: BaseException) -> bool:
    """Whether an error is a collective's failure because a peer rank went away: torch raises DistError, and gloo
    a plain RuntimeError naming its transport."""
    text = str(err).lower()
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and (
        "gloo" in text or "connection closed by peer" in text or "connection reset by peer" in text))


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    dist.all_reduce(tensor, op=op)
    return tensor


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def _communication_threads_alive() -> bool:
    try:
        names = [(Path("/proc/self/task") / t / "comm").read_text() for t in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: assume the worst
        return True
    return any(n.startswith(("gloo", "pt_gloo", "pt_nccl", "pt_cuda")) for n in names)


def exit_process(code: int):
    """End a CLI process that used torch.distributed, without interpreter finalization.

    destroy_process_group does not free the process group: DTensor's caches keep the device mesh, and with it the
    group and its gloo / NCCL threads, alive.  Interpreter finalization then frees that group while those threads
    run, and a thread that releases a tensor on a finalized interpreter aborts the process ("terminate called
    without an active exception", SIGABRT) after the work is done: a finished run reported as failed.  Every file
    is written and closed by now, so the process flushes its streams and ends at once."""
    cleanup()
    sys.stdout.flush()
    sys.stderr.flush()
    if _communication_threads_alive():
        os._exit(code)
    sys.exit(code)
