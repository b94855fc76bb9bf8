"""The folder layout of a run's checkpoints, and the one rule for what counts as a checkpoint.

    RUN/run.json                             {"run_id": ...}: the run's identity
    RUN/checkpoints/step_NNNNNNN/            a checkpoint; *complete* when it holds manifest.json (written last):
        .metadata  __R_0.distcp              DCP: the sharded parts (model, optimizer, EMA)
        rank{R}.json  rank{R}.safetensors    rank R's own state
        run.json  manifest.json              what it belongs to; every other file's size and sha256
    RUN/checkpoints/step_NNNNNNN.tmp/        a save in progress, or the leftover of a killed one
    RUN/checkpoints/step_NNNNNNN.SUFFIX[N]/  a folder set aside, never loaded: corrupt, foreign, incomplete

A complete checkpoint is *foreign* when its run.json names a run other than the run's own; one that names no run
counts as the run's own.  A step folder without the manifest is *incomplete* (a damaged checkpoint, or one written
before checkpoints had manifests): nothing loads, counts or overwrites it.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

CHECKPOINTS = "checkpoints"  # the checkpoints' folder inside a run folder
MANIFEST = "manifest.json"
RUN = "run.json"  # in a run folder: its identity; in a checkpoint: what it belongs to
DCP_METADATA = ".metadata"  # DCP's index of the sharded state
IN_PROGRESS = ".tmp"
_STEP = re.compile(r"^step_(\d+)$")


def step_folder(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def in_progress_folder(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}{IN_PROGRESS}"


def rank_files(folder: Path, rank: int) -> tuple[Path, Path]:
    """(rank{R}.json, rank{R}.safetensors): rank R's counters and loader position; its RNG and per-rank tensors."""
    return Path(folder) / f"rank{rank}.json", Path(folder) / f"rank{rank}.safetensors"


def ranks_written(folder: Path) -> int:
    """How many ranks wrote the checkpoint."""
    return len(list(Path(folder).glob("rank*.json")))


def in_progress_folders(root: Path) -> list[Path]:
    return sorted(Path(root).glob(f"step_*{IN_PROGRESS}"))


def step_folders(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every folder named step_N under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((int(match.group(1)), child) for child in root.iterdir()
                  if (match := _STEP.match(child.name)) and child.is_dir())


def is_complete(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def checkpoint_run_id(folder: Path) -> str | None:
    """The id of the run that wrote a checkpoint; None when it names none or its run.json is unreadable
    (verification then refuses it)."""
    try:
        saved = json.loads((Path(folder) / RUN).read_text())
    except (OSError, ValueError):
        return None
    run_id = saved.get("run_id") if isinstance(saved, dict) else None
    return run_id if isinstance(run_id, str) else None


def recorded_run_id(run_dir) -> str | None:
    """The id in RUN/run.json, without making one (None when there is none or it is unreadable)."""
    try:
        run_id = json.loads((Path(run_dir) / RUN).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return run_id if isinstance(run_id, str) else None


def is_foreign(folder: Path, run_id: str | None) -> bool:
    """Whether folder names a run other than `run_id` (never, when run_id is None: no run to compare with)."""
    saved = checkpoint_run_id(folder) if run_id is not None else None
    return saved is not None and saved != run_id


def complete_checkpoints(root, run_id: str | None = None) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under root, oldest first; with `run_id`, only that run's own (and
    those that name no run)."""
    return [(step, folder) for step, folder in step_folders(root)
            if is_complete(folder) and not is_foreign(folder, run_id)]


def incomplete_checkpoints(root) -> list[Path]:
    """Step folders without a manifest, oldest first."""
    return [folder for _, folder in step_folders(root) if not is_complete(folder)]


def newest_step(run_dir) -> int | None:
    """Step of the newest complete checkpoint of the run in RUN/checkpoints (verification not included)."""
    run_dir = Path(run_dir)
    found = complete_checkpoints(run_dir / CHECKPOINTS, recorded_run_id(run_dir))
    return found[-1][0] if found else None


def report_skipped(root: Path, run_id: str | None):
    """One warning line per step folder that resume=auto passes over for a reason other than its integrity: another
    run's checkpoint, or a folder without a manifest."""
    for _, folder in step_folders(root):
        if not is_complete(folder):
            print(f"warning: {folder} has no {MANIFEST} (an incomplete or damaged checkpoint): skipped",
                  file=sys.stderr, flush=True)
        elif is_foreign(folder, run_id):
            print(f"warning: {folder} belongs to another run (run id {checkpoint_run_id(folder)}, this run's is "
                  f"{run_id}): skipped and left in place; move it out of {root}", file=sys.stderr, flush=True)


def aside_name(folder: Path, suffix: str) -> Path:
    """folder.SUFFIX, or folder.SUFFIX1, 2, ... when that exists: where a folder that must not be loaded is kept."""
    target, n = folder.with_name(f"{folder.name}.{suffix}"), 1
    while target.exists():
        target, n = folder.with_name(f"{folder.name}.{suffix}{n}"), n + 1
    return target


def run_dir_of_checkpoint(path: Path) -> Path | None:
    """The run folder when `path` is a checkpoint (a step folder, one in progress, any folder holding a manifest or
    DCP's metadata) or a run's checkpoints folder; None otherwise."""
    path = Path(path)
    named_like_one = re.match(rf"^step_\d+({re.escape(IN_PROGRESS)})?$", path.name)
    if named_like_one or is_complete(path) or (path / DCP_METADATA).is_file():
        return path.parent.parent if path.parent.name == CHECKPOINTS else path.parent
    if path.name == CHECKPOINTS and step_folders(path):
        return path.parent
    return None
