"""The manifest: name, size and sha256 of every file of a checkpoint, written last, checked before any load.

    {"format": 1, "files": {"rank0.json": {"size": 123, "sha256": "..."}, ...}}

The hashing is split over the ranks (largest files first, round-robin) and every rank gets every digest; rank 0's
view of the file list decides for all, so every rank reaches the same verdict.  `latest_checkpoint` is the newest
complete checkpoint that verifies.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path, PurePosixPath

import torch.distributed as dist

from pafm.checkpoint.errors import CheckpointError, distributed, from_rank0, rank
from pafm.checkpoint.layout import MANIFEST, complete_checkpoints, report_skipped

_CHUNK = 1 << 20


def sha256_of(path: Path) -> str | None:
    """The file's sha256, or None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def file_sizes(folder: Path) -> dict[str, int]:
    """{relative name: size} of every file in folder except the manifest."""
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    files.pop(MANIFEST, None)
    return files


def _hash_split(folder: Path, sizes: dict[str, int], group=None) -> dict[str, str | None]:
    """sha256 of the named files, each rank hashing a share (largest first, round-robin) and all ranks getting all."""
    names = sorted(sizes, key=lambda n: (-sizes[n], n))
    me, world = (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
    mine = {name: sha256_of(folder / name) for name in names[me::world]}
    if not distributed():
        return mine
    parts = [None] * world
    dist.all_gather_object(parts, mine, group=group)
    return {name: digest for part in parts for name, digest in part.items()}


def write_manifest(folder: Path, group=None):
    """List every file of folder in its manifest (a collective on `group`)."""
    sizes = from_rank0(lambda: file_sizes(folder), group)
    digests = _hash_split(folder, sizes, group)
    unreadable = sorted(n for n, d in digests.items() if d is None)
    if unreadable:  # every rank holds the same digests, so every rank raises
        raise CheckpointError(f"checkpoint {folder}: {unreadable[0]} could not be read back for its manifest")
    if rank() == 0:
        files = {name: {"size": sizes[name], "sha256": digests[name]} for name in sorted(sizes)}
        (folder / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1))


def is_plain_name(name) -> bool:
    """A relative name inside the folder (no absolute path, no '..')."""
    path = PurePosixPath(name) if isinstance(name, str) else None
    return path is not None and not path.is_absolute() and ".." not in path.parts and path.as_posix() == name


def _read_manifest(folder: Path) -> dict | None:
    """{name: {"size", "sha256"}} of the manifest, or None when it is not a well-formed manifest."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    well_formed = isinstance(files, dict) and all(
        is_plain_name(name) and name != MANIFEST and isinstance(entry, dict) and type(entry.get("size")) is int
        and isinstance(entry.get("sha256"), str) for name, entry in files.items())
    return files if well_formed else None


def _listing_problem(folder: Path) -> tuple[str | None, dict]:
    """(what is wrong with the manifest or the file list, or None; the manifest's files)."""
    if not (folder / MANIFEST).is_file():
        return f"is not a complete checkpoint (no {MANIFEST})", {}
    files = _read_manifest(folder)
    if files is None:
        return f"is corrupt: {MANIFEST} is not a valid manifest", {}
    present = file_sizes(folder)
    for name in sorted(files):
        if name not in present:
            return f"is corrupt: {name} is missing", files
        if present[name] != files[name]["size"]:
            return f"is corrupt: {name} has size {present[name]} bytes, expected {files[name]['size']}", files
    unlisted = sorted(set(present) - set(files))
    return (f"is corrupt: {unlisted[0]} is an unlisted file" if unlisted else None), files


def verify_checkpoint(folder: str | Path):
    """Raise CheckpointError unless folder's files match its manifest exactly (names, sizes, sha256)."""
    folder = Path(folder)
    problem, files = from_rank0(lambda: _listing_problem(folder))
    if problem is None:
        digests = _hash_split(folder, {name: entry["size"] for name, entry in files.items()})
        bad = next((name for name in sorted(files) if digests[name] != files[name]["sha256"]), None)
        if bad is not None:
            problem = f"is corrupt: {bad} " + ("has a checksum mismatch" if digests[bad] else "could not be read")
    if problem is not None:
        raise CheckpointError(f"checkpoint {folder} {problem}")


def latest_checkpoint(root, run_id: str | None = None) -> Path | None:
    """The newest complete checkpoint under root that verifies (with `run_id`: of that run, or naming none); newer
    ones that fail are skipped with a warning, and so are other runs' checkpoints and folders without a manifest."""
    root = Path(root)
    found = from_rank0(lambda: [str(folder) for _, folder in complete_checkpoints(root, run_id)])
    if rank() == 0:
        report_skipped(root, run_id)
    for folder in map(Path, reversed(found)):
        try:
            verify_checkpoint(folder)
            return folder
        except CheckpointError as e:
            if rank() == 0:
                print(f"warning: {e}; falling back to an older checkpoint", file=sys.stderr, flush=True)
    return None
