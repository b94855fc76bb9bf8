"""What a checkpoint belongs to: the run's id, and the settings it can be loaded with.

A checkpoint's run.json holds the run meta (model config, objective, state keys, world size), compared strictly by a
load, and identity keys that are not compared: `run_id` (which run wrote it), `trajectory` (the settings that shape
the run's course: a change is reported, not refused) and `export` (the meta of its EMA export).
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import torch.distributed as dist

from pafm.checkpoint.errors import CheckpointError, from_rank0
from pafm.checkpoint.layout import RUN, ranks_written
from pafm.distributed import agree, one_line
from pafm.files import atomic_write_text

FIX = "resume in a new run.dir or with the original settings"
IDENTITY_KEYS = ("run_id", "trajectory", "export")
_ABSENT = object()


def run_identity(run_dir: Path) -> str:
    """This run's id, read from RUN/run.json; made and written there at the run's first launch (rank 0 reads or
    writes it, for every rank)."""
    path = Path(run_dir) / RUN

    def read_or_make() -> str:
        if not path.exists():
            run_id = uuid.uuid4().hex
            atomic_write_text(path, json.dumps({"run_id": run_id}) + "\n")
            return run_id
        try:
            run_id = json.loads(path.read_text())["run_id"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is damaged ({one_line(e)}): it holds the run id that this run's checkpoints "
                             f"carry in their {RUN}; write it back as {{\"run_id\": \"...\"}}") from None
        if not isinstance(run_id, str):
            raise ValueError(f"{path}: run_id is not a string")
        return run_id

    try:
        return agree(read_or_make, rank0_only=True, errors=(OSError, ValueError))
    except (OSError, ValueError) as e:  # a SharedError is a ValueError
        raise CheckpointError(one_line(e)) from None


def _first_difference(saved, expected, key=""):
    """(dotted key, saved value, expected value) of the first difference, or None."""
    if isinstance(saved, dict) and isinstance(expected, dict):
        for k in [*saved, *(k for k in expected if k not in saved)]:
            found = _first_difference(saved.get(k, _ABSENT), expected.get(k, _ABSENT), f"{key}.{k}" if key else k)
            if found:
                return found
        return None
    return None if saved == expected else (key, saved, expected)


def _show(value) -> str:
    return "(not set)" if value is _ABSENT else json.dumps(value)


def _without_identity(run_meta: dict) -> dict:
    return {k: v for k, v in run_meta.items() if k not in IDENTITY_KEYS} if isinstance(run_meta, dict) else run_meta


def check_run(folder: Path, expected_run_meta: dict | None):
    """CheckpointError unless the checkpoint was written by as many ranks as this run has and, with
    `expected_run_meta`, with the same run meta (identity keys left out), naming the first difference."""
    saved_world, world = ranks_written(folder), dist.get_world_size()
    if saved_world != world:
        raise CheckpointError(f"checkpoint {folder} was written by {saved_world} ranks, this run has {world}: the "
                              "data position and RNG streams are per rank, so an exact resume needs the same world "
                              f"size; resume with {saved_world} ranks or in a new run.dir")
    if expected_run_meta is None:
        return
    if not (folder / RUN).is_file():
        raise CheckpointError(f"checkpoint {folder} has no {RUN}, so its run cannot be checked: {FIX}")
    try:
        saved = json.loads((folder / RUN).read_text())
    except ValueError as e:
        raise CheckpointError(f"checkpoint {folder}: {RUN} is not valid JSON ({e})") from e
    # Through JSON like the saved side, so that a tuple and the list it was saved as compare equal.
    found = _first_difference(_without_identity(saved), _without_identity(json.loads(json.dumps(expected_run_meta))))
    if found:
        key, was, now = found
        raise CheckpointError(f"checkpoint {folder} was written with {key}={_show(was)}, this run has {_show(now)}: "
                              f"{FIX}")


def trajectory_change(folder: Path, trajectory) -> str | None:
    """'KEY=SAVED, this run has NOW' for the first trajectory setting that differs from the checkpoint's, or None
    (also for a checkpoint that records none); rank 0 reads, for every rank."""
    def compare() -> str | None:
        try:
            saved = json.loads((folder / RUN).read_text()).get("trajectory")
        except (OSError, ValueError, AttributeError):  # the load refuses such a run.json with its reason
            return None
        expected = json.loads(json.dumps(trajectory))
        found = None if saved is None or expected is None else _first_difference(saved, expected)
        return None if found is None else f"{found[0]}={_show(found[1])}, this run has {_show(found[2])}"

    return from_rank0(compare)


def check_state_shapes(folder: Path, saved: dict, live: dict, change: str | None):
    """CheckpointError naming the first per-rank state tensor whose shape differs (and the setting behind it, when
    the checkpoint records its settings), instead of a size-mismatch error from load_state_dict."""
    for key in sorted(set(saved) & set(live)):
        was, now = list(saved[key].shape), list(live[key].shape)
        if was != now and change:
            raise CheckpointError(f"checkpoint {folder} was written with {change} ({key} has shape {was}, this "
                                  f"run's {now}): {FIX}")
        if was != now:
            raise CheckpointError(f"checkpoint {folder} holds {key} of shape {was}, this run's has shape {now} (a "
                                  f"changed objective setting): {FIX}")
