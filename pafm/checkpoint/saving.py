"""The write protocol: a checkpoint is complete, verified and tied to its run, or invisible.

Every rank writes into step_N.tmp/; after all ranks finished, the manifest is written (the hashing split over the
ranks) and rank 0 renames the folder to step_N/, so a run killed mid-write leaves the previous checkpoint as the
newest complete one.  With a `BackgroundSaver` the same steps run in a thread of each rank, on a copy of the state
taken when the save began.  Every function here is a collective.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter

from pafm.checkpoint.errors import CheckpointError, describe_failure, first_failure, from_rank0, write_limit_hit
from pafm.checkpoint.integrity import write_manifest
from pafm.checkpoint.layout import (MANIFEST, RUN, aside_name, complete_checkpoints, in_progress_folder,
                                    in_progress_folders, is_complete, is_foreign, rank_files, step_folder)
from pafm.checkpoint.states import RNG_PREFIX, rng_state
from pafm.files import atomic_write


@dataclass
class _RankFiles:
    """What a rank writes beside DCP's files, captured when the save starts (the run moves on while it is written)."""
    rank_json: str
    tensors: dict[str, torch.Tensor]
    run_json: str


def _capture(rank_meta: dict, rank_tensors: dict, run_meta: dict) -> _RankFiles:
    tensors = {f"{RNG_PREFIX}{k}": v for k, v in rng_state().items()}
    tensors.update({k: v.detach().to("cpu", copy=True).contiguous() for k, v in rank_tensors.items()})
    # run.json is made on every rank, so that unserialisable meta fails everywhere at once
    return _RankFiles(json.dumps(rank_meta), tensors, json.dumps(run_meta, indent=1))


def _write_rank_files(tmp: Path, rank: int, files: _RankFiles):
    meta_file, tensors_file = rank_files(tmp, rank)
    meta_file.write_text(files.rank_json)
    atomic_write(tensors_file, lambda path: save_file(files.tensors, str(path)))  # the umask's mode
    if rank == 0:
        (tmp / RUN).write_text(files.run_json)


def _start_folder(root: Path, step: int) -> Path:
    """An empty step_N.tmp/ on every rank's view."""
    tmp = in_progress_folder(root, step)
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed while writing
        tmp.mkdir()
    dist.barrier()
    return tmp


def _publish(root: Path, step: int, keep: int, run_id: str | None):
    """Rank 0: step_N.tmp/ becomes step_N/; this run's older checkpoints past `keep` and partial writes go.  A
    step_N/ already there is replaced only when it is this run's own complete checkpoint (the same step saved twice:
    a stop signal right after a periodic save); another run's, or one without a manifest, is moved aside."""
    tmp, final = in_progress_folder(root, step), step_folder(root, step)
    if final.exists():
        complete = is_complete(final)
        if complete and not is_foreign(final, run_id):
            shutil.rmtree(final)
        else:
            why, suffix = ("another run's checkpoint", "foreign") if complete else \
                (f"a folder without {MANIFEST}", "incomplete")
            target = aside_name(final, suffix)
            os.replace(final, target)
            print(f"warning: {final} was {why}: moved to {target.name} instead of being overwritten",
                  file=sys.stderr, flush=True)
    os.replace(tmp, final)
    for _, old in complete_checkpoints(root, run_id)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in in_progress_folders(root):  # partial writes of killed runs
        shutil.rmtree(leftover, ignore_errors=True)


def _complete(root: Path, step: int, dcp_error: str | None, files: _RankFiles, keep: int, run_id: str | None,
              group=None) -> Path:
    """After DCP wrote its files: the rank files, the ranks' agreement, the manifest and the publish (a collective on
    `group`).  Raises CheckpointError on every rank alike if any rank failed; the partial folder is removed."""
    rank = dist.get_rank()
    tmp = in_progress_folder(root, step)
    error = dcp_error
    try:
        if error is None:
            _write_rank_files(tmp, rank, files)
    except OSError as e:  # a full disk or a file-size limit on this rank only: every rank must hear of it
        error = f"rank {rank}: {write_limit_hit(e, tmp) or e}"
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error, group=group)  # also the barrier before the manifest lists every rank's files
    first = next((e for e in errors if e is not None), None)
    try:
        if first is not None:
            raise CheckpointError(f"writing checkpoint {tmp} failed ({first}); the newest complete checkpoint is "
                                  "intact")
        write_manifest(tmp, group)
        from_rank0(lambda: _publish(root, step, keep, run_id), group,
                   what=f"publish checkpoint {step_folder(root, step)}")
    except CheckpointError:
        if rank == 0:  # the space it took (a full disk is a likely cause); the previous checkpoints stay
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return step_folder(root, step)


def save_checkpoint(root, step: int, states: dict, rank_meta: dict, rank_tensors: dict, keep: int,
                    run_meta: dict) -> Path:
    """Write a complete checkpoint of `step`: the sharded `states` (by name: "model", "optim", "ema") with DCP,
    this rank's `rank_meta` (JSON) and `rank_tensors`, and `run_meta`; keep the run's newest `keep` (0: all).
    Returns its folder."""
    root = Path(root)
    files = _capture(rank_meta, rank_tensors, run_meta)
    tmp = _start_folder(root, step)
    error = None
    try:
        dcp.save(states, checkpoint_id=str(tmp))
    except CheckpointException as e:  # raised on every rank alike
        error = first_failure(e, tmp)
    return _complete(root, step, error, files, keep, run_meta.get("run_id"))


def _writer(cuda: bool) -> FileSystemWriter:
    """DCP's file writer, which is also its stager: a CPU copy of the state, kept (and pinned) across saves on CUDA
    where allocating pinned memory each time would cost more than the copy; made afresh each time on the CPU, so
    that the copy exists only while a save is written."""
    return FileSystemWriter(".", cache_staged_state_dict=cuda)


class BackgroundSaver:
    """Checkpoints written while training goes on: `start` stages a CPU copy of the state (the only time the loop
    waits), and a background thread writes it with DCP, then does the rank files, the ranks' agreement, the manifest
    and the publish, on a process group of its own (gloo, so that its collectives never interleave with the
    training's).  One save at a time: `result` waits for the one in flight."""

    def __init__(self, cuda: bool, timeout, writer=None):
        self.group = dist.new_group(backend="gloo", timeout=timeout)  # a collective: every rank builds it
        self.writer = writer if writer is not None else _writer(cuda)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.pending = None  # the future of the save in flight

    def start(self, root, step: int, states: dict, rank_meta: dict, rank_tensors: dict, keep: int, run_meta: dict,
              then=None):
        """Begin writing a checkpoint of `step` (arguments as `save_checkpoint`); `then(folder)` runs in the
        background once it is complete.  The previous save must have been collected with `result`."""
        assert self.pending is None, "the previous background save was not collected"
        root = Path(root)
        files = _capture(rank_meta, rank_tensors, run_meta)
        tmp = _start_folder(root, step)
        written = dcp.async_save(states, checkpoint_id=str(tmp), storage_writer=self.writer, process_group=self.group)
        self.pending = self.executor.submit(self._finish, written, root, step, files, keep, run_meta.get("run_id"),
                                            then)

    def _finish(self, written, root: Path, step: int, files: _RankFiles, keep: int, run_id: str | None,
                then) -> Path:
        error = None
        tmp = in_progress_folder(root, step)
        try:
            written.result()
        except CheckpointException as e:
            error = first_failure(e, tmp)
        except Exception as e:  # noqa: BLE001 - whatever failed, the other ranks must hear of it
            error = describe_failure(dist.get_rank(), e, tmp)
        folder = _complete(root, step, error, files, keep, run_id, self.group)
        if then is not None:
            then(folder)
        return folder

    def done(self) -> bool:
        """Whether the save in flight (if any) has finished; never blocks."""
        return self.pending is not None and self.pending.done()

    def result(self) -> Path | None:
        """Wait for the save in flight and return its folder (None if there is none); raises its CheckpointError."""
        future, self.pending = self.pending, None
        return None if future is None else future.result()

    def close(self):
        self.executor.shutdown(wait=True)
