"""Two "nodes" on this machine: two torchrun launchers of one process each, meeting through the c10d rendezvous on
127.0.0.1, as `srun torchrun --nnodes=N --rdzv-backend=c10d` starts them on a cluster (README, Multi-node)."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, TINY, assert_same_weights, losses, metrics, train

ARGS = ["objective.source=bank", "objective.bank_per_class=8", "checkpoint.every=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(env, run_dir, *overrides):
    """Two launchers, node 0 hosting the rendezvous store; each in its own session, so that a process left behind
    by either is found by its process group."""
    port, procs = free_port(), []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=pafm-{port}",
               f"--rdzv-conf=is_host={node == 0}", "--local-addr=127.0.0.1", "-m", "pafm.train",
               "configs/digits_sit.yaml", f"run.dir={run_dir}", *TINY, *ARGS, *overrides]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    return procs


def group_members(pgid: int) -> set[int]:
    """The processes of a process group (from /proc)."""
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) == pgid:
            members.add(int(stat.parent.name))
    return members


def finish(procs, timeout=300):
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p in procs:  # nothing of either node is left running
        with pytest.raises(ProcessLookupError):
            os.killpg(p.pid, 0)
    return outs


@pytest.fixture
def node_env(env):
    return {**env, "GLOO_SOCKET_IFNAME": "lo"}  # the ranks' own connections stay on the loopback device too


@pytest.mark.slow
def test_two_nodes_train_resume_and_stop_like_one(node_env, tmp_path):
    train(node_env, tmp_path / "one", *ARGS, "train.steps=4", nproc=2)
    # Two nodes write the step-2 checkpoint, two nodes resume from it: the same run as one node's, step by step.
    for steps in (2, 4):
        procs = launch_nodes(node_env, tmp_path / "nodes", f"train.steps={steps}")
        outs = finish(procs)
        assert [p.returncode for p in procs] == [0, 0], outs
    assert "resumed from" in "".join(out for out, _ in outs)  # printed by rank 0, on whichever node it is
    assert losses(tmp_path / "nodes") == pytest.approx(losses(tmp_path / "one"), rel=1e-6)
    assert [m["step"] for m in metrics(tmp_path / "nodes")] == [1, 2, 3, 4]
    assert_same_weights(tmp_path / "nodes" / "ema.safetensors", tmp_path / "one" / "ema.safetensors")

    # SIGTERM to node 1's launcher: it passes the signal to its rank, the ranks agree to stop, checkpoint together
    # and exit.  Node 0's launcher, its rank gone, then waits in torchrun's exit barrier for node 1's launcher (300 s,
    # not settable from the command line, deaf to SIGTERM while it waits); a scheduler's kill ends it.
    run = tmp_path / "stopped"
    procs = launch_nodes(node_env, run, "train.steps=100000", "checkpoint.every=100000")
    deadline = time.time() + 180
    while time.time() < deadline and not ((run / "metrics.jsonl").exists()
                                           and len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    procs[1].wait(timeout=120)
    deadline = time.time() + 120
    while time.time() < deadline and group_members(procs[0].pid) != {procs[0].pid}:
        time.sleep(0.2)
    assert group_members(procs[0].pid) == {procs[0].pid}  # node 0's rank has exited
    procs[0].kill()
    out = "".join(out for out, _ in finish(procs, timeout=60))
    stopped_at = int(out.split("stopped by ")[1].split("at step ")[1].split(";")[0])
    assert f"done: step {stopped_at}" in out  # rank 0 finished its run normally, wherever it was
    assert stopped_at >= 3 and (run / "checkpoints" / f"step_{stopped_at:07d}" / ".metadata").is_file()
    assert not list((run / "checkpoints").glob("*.tmp"))
    proc = train(node_env, run, *ARGS, "checkpoint.every=100000", f"train.steps={stopped_at + 1}", nproc=2)
    assert f"at step {stopped_at}" in proc.stdout and metrics(run)[-1]["step"] == stopped_at + 1
