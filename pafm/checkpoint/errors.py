"""How the checkpoint code fails: one `CheckpointError` per refusal, raised on every rank alike, and a failed write
named by its cause (a full disk, the file-size limit) rather than by the library call it surfaced in."""
from __future__ import annotations

import errno
import resource
import shutil
from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException

from pafm.distributed import SharedError, agree, one_line

# Under this much free space a failed write is blamed on a full disk.
FULL_DISK_BYTES = 16 << 20


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt, unsafe, or written by a different run."""


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def from_rank0(fn, group=None, what: str = "read the checkpoint folder"):
    """fn() computed on rank 0 and sent to every rank, so that all ranks act on the same view of the filesystem."""
    try:
        return agree(fn, rank0_only=True, errors=(OSError,), group=group)
    except (OSError, SharedError) as e:  # an OSError in a single process
        raise CheckpointError(f"rank 0 could not {what}: {one_line(e)}") from None


def write_limit_hit(error: BaseException, folder: Path | None) -> str | None:
    """The file-size limit or a full disk, named, when that is why a write into folder failed and the error does not
    say so itself (ENOSPC does); else None.  Torch's zip writer (DCP's non-tensor values) reports either as
    "unexpected pos", so then the folder is looked at."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    size_limit = "a file reached the file-size limit" + (
        f" ({limit} bytes, ulimit -f)" if limit != resource.RLIM_INFINITY else "")
    if getattr(error, "errno", None) == errno.EFBIG:
        return size_limit
    if "unexpected pos" not in str(error) or folder is None:
        return None
    try:
        if limit != resource.RLIM_INFINITY and any(p.is_file() and p.stat().st_size >= limit
                                                   for p in folder.rglob("*")):
            return size_limit
        if shutil.disk_usage(folder).free < FULL_DISK_BYTES:
            return "the disk is full (no space left on device)"
    except OSError:  # the folder is gone: nothing to tell by
        pass
    return None


def describe_failure(rank_of_error: int, error: BaseException, folder: Path | None = None) -> str:
    """'rank R: what went wrong', in one line."""
    limit_hit = write_limit_hit(error, folder)
    if limit_hit:
        return f"rank {rank_of_error}: {limit_hit}"
    return f"rank {rank_of_error}: {type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def first_failure(e: CheckpointException, folder: Path | None = None) -> str:
    """The lowest failing rank's failure of a DCP call (which raises one exception holding every rank's)."""
    failed_rank, (error, _) = min(e.failures.items(), key=lambda item: item[0])
    return describe_failure(failed_rank, error, folder)
