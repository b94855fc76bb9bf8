"""The run directory's lock: one live launch per run.dir.

Global rank 0 holds an exclusive `flock` on RUN/.lock for the life of the run and writes its holder (host, pid,
start time) into it.  A second launch into the same folder, or a relaunch while orphaned ranks of a killed launcher
still train, is refused in one line naming the holder, so two runs never delete each other's checkpoints or
interleave their logs.  The kernel drops the lock when the holder dies, however it dies: an flock belongs to the open
file, which a forked child (a data-loader worker) would share and keep alive after its parent's death, so the
descriptor is closed in every forked child (and, like every descriptor Python opens, on exec).
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path


class RunDirInUse(RuntimeError):
    """Another live process holds the run directory."""

    exit_code = 2  # a user error (pafm.cli.exit_code)


_HELD: set[int] = set()  # the descriptors of the locks this process holds


def _drop_inherited_locks():
    for fd in _HELD:
        os.close(fd)  # the child's reference only: the parent still holds the lock
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._fd = None

    def acquire(self):
        """Take the lock or raise RunDirInUse naming the holder; OSError if the folder cannot be written."""
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise NotADirectoryError(f"run.dir {self.path.parent} is a file, not a folder: choose another run.dir")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            raise RunDirInUse(f"{self.path.parent} is in use by another launch ({_describe(holder)}); wait for it to "
                              "finish, stop it, or choose another run.dir") from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        _HELD.add(fd)
        return self

    def release(self):
        if self._fd in _HELD:  # not in a forked child, where it is closed already
            _HELD.discard(self._fd)
            os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
