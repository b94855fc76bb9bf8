"""The run directory's lock: held by one live launch, refused to a second, not kept alive by forked children."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pafm.run_lock import RunDirInUse, RunLock

ROOT = Path(__file__).resolve().parents[1]


def test_a_second_holder_is_refused_by_name(tmp_path):
    lock = RunLock(tmp_path).acquire()
    with pytest.raises(RunDirInUse, match=f"pid {os.getpid()} on "):
        RunLock(tmp_path).acquire()
    lock.release()
    RunLock(tmp_path).acquire().release()


def test_a_killed_holders_forked_workers_do_not_keep_the_lock(tmp_path):
    """The holder forks a worker (as a fork-started DataLoader does) and is killed with SIGKILL: the worker lives
    on, and the lock is free at once."""
    script = textwrap.dedent("""
        import multiprocessing, os, signal, sys, time
        from pafm.run_lock import RunLock
        def work(running):
            running.set()  # the fork hooks have run by now
            time.sleep(60)
        lock = RunLock(sys.argv[1]).acquire()
        fork = multiprocessing.get_context("fork")
        running = fork.Event()
        worker = fork.Process(target=work, args=(running,))
        worker.start()
        running.wait(60)
        print(worker.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    worker = int(holder.stdout.readline())  # the worker keeps the pipe open: wait for the holder, not for EOF
    try:
        assert holder.wait(60) == -signal.SIGKILL
        os.kill(worker, 0)  # still alive
        RunLock(tmp_path).acquire().release()
    finally:
        os.kill(worker, signal.SIGKILL)
        holder.stdout.close()


def test_a_run_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(NotADirectoryError, match=f"run.dir {tmp_path / 'run'} is a file, not a folder"):
        RunLock(tmp_path / "run").acquire()
