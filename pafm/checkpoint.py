"""Checkpoints: torch.distributed.checkpoint folders that are complete, verified and tied to their run, or invisible.

A checkpoint is written into `step_NNNNNNN.tmp/` by every rank and renamed to `step_NNNNNNN/` by rank 0 only after
all ranks finished, so a run killed mid-write leaves the previous checkpoint as the newest complete one; with a
`BackgroundSaver` the same steps run in a thread of each rank, on a copy of the state taken when the save began.
Contents:
- DCP (`.metadata`, `__R_0.distcp`): the model, optimizer and EMA state (sharded: each rank writes its shards;
  loads reshard as needed);
- `rank{R}.json`: step, counters and the data loader's position of rank R;
- `rank{R}.safetensors`: rank R's RNG states and any per-rank device state (the class bank);
- `run.json`: what the checkpoint belongs to (model config, objective, state keys, world size); a load refuses a
  run that differs, naming the first differing field.  It also names the run that wrote it (`run_id`, the id in
  RUN/run.json, made at the run's first launch) and the settings that shape its trajectory (`trajectory`): resume=auto
  and the rotation only ever consider the run's own checkpoints, and a checkpoint without a run id (written before
  checkpoints named their run) counts as the run's own.  `export` is the meta of the EMA export made from it;
- `manifest.json`, written last: name, size and sha256 of every other file.  A folder without it is not a complete
  checkpoint; a load verifies it first, so a truncated or bit-flipped file is refused by name, and resume=auto
  falls back to the newest checkpoint that verifies.  The hashing is split over the ranks.
Loading executes no code from the folder: DCP's `.metadata` pickle is read by an unpickler that admits only DCP's
own metadata classes, and its non-tensor values are decoded with `torch.load(weights_only=True)`.
Every function here that touches a checkpoint is a collective when torch.distributed is initialised, except
`full_ema` (one rank reads).
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import re
import resource
import shutil
import sys
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pafm.distributed import COLLECTIVE_TIMEOUT, SharedError, agree, one_line
from pafm.files import atomic_write, atomic_write_text

MANIFEST = "manifest.json"
RUN = "run.json"
_COMPLETE = re.compile(r"^step_(\d+)$")
_CHUNK = 1 << 20
_FIX = "resume in a new run.dir or with the original settings"
# Keys of a checkpoint's run.json that say which run wrote it, how, and how to export it, rather than what it can be
# loaded into: the resume policy, the rotation and `pafm.export` read them; the load's strict comparison leaves them
# out.
_IDENTITY_KEYS = ("run_id", "trajectory", "export")
# full_ema reads on one rank while the process group exists, on purpose: DCP's notice about it is noise.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt, unsafe, or written by a different run."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _from_rank0(fn, group=None, what: str = "read the checkpoint folder"):
    """fn() computed on rank 0 and sent to every rank, so that all ranks act on the same view of the filesystem."""
    try:
        return agree(fn, rank0_only=True, errors=(OSError,), group=group)
    except (OSError, SharedError) as e:  # an OSError in a single process
        raise CheckpointError(f"rank 0 could not {what}: {one_line(e)}") from None


# --- finding checkpoints ------------------------------------------------------------------------------------------
def _step_folders(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every folder named step_N under root, oldest first."""
    if not root.is_dir():
        return []
    return sorted((int(match.group(1)), child) for child in root.iterdir()
                  if (match := _COMPLETE.match(child.name)) and child.is_dir())


def checkpoint_run_id(folder: Path) -> str | None:
    """The id of the run that wrote a checkpoint; None when it names none (written before checkpoints named their
    run) or its run.json is unreadable (verification then refuses it)."""
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


def _foreign(folder: Path, run_id: str | None) -> bool:
    """Whether folder names a run other than `run_id` (never, when run_id is None: no run to compare with)."""
    saved = checkpoint_run_id(folder) if run_id is not None else None
    return saved is not None and saved != run_id


def complete_checkpoints(root: str | Path, run_id: str | None = None) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint (named step_N, with a manifest) under root, oldest first; with
    `run_id`, only that run's own (and those that name no run)."""
    return [(step, folder) for step, folder in _step_folders(Path(root))
            if (folder / MANIFEST).is_file() and not _foreign(folder, run_id)]


def _report_skipped(root: Path, run_id: str | None):
    """Rank 0: one warning line per step folder resume=auto passes over for a reason other than its integrity:
    another run's checkpoint, or a folder without a manifest."""
    for _, folder in _step_folders(root):
        if not (folder / MANIFEST).is_file():
            print(f"warning: {folder} has no {MANIFEST} (an incomplete or damaged checkpoint): skipped",
                  file=sys.stderr, flush=True)
        elif _foreign(folder, run_id):
            print(f"warning: {folder} belongs to another run (run id {checkpoint_run_id(folder)}, this run's is "
                  f"{run_id}): skipped and left in place; move it out of {root}", file=sys.stderr, flush=True)


def latest_checkpoint(root: str | Path, run_id: str | None = None) -> Path | None:
    """The newest complete checkpoint under root that verifies (with `run_id`: of that run, or naming none); newer
    ones that fail are skipped with a warning, and so are other runs' checkpoints and folders without a manifest."""
    root = Path(root)
    found = _from_rank0(lambda: [str(folder) for _, folder in complete_checkpoints(root, run_id)])
    if _rank() == 0:
        _report_skipped(root, run_id)
    for folder in map(Path, reversed(found)):
        try:
            verify_checkpoint(folder)
            return folder
        except CheckpointError as e:
            if _rank() == 0:
                print(f"warning: {e}; falling back to an older checkpoint", file=sys.stderr, flush=True)
    return None


# --- the manifest -------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _listing(folder: Path) -> dict[str, int]:
    """{relative name: size} of every file in folder except the manifest."""
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    files.pop(MANIFEST, None)
    return files


def _hash_split(folder: Path, sizes: dict[str, int], group=None) -> dict[str, str | None]:
    """sha256 of the named files, each rank hashing a share (largest first, round-robin) and all ranks getting all."""
    names = sorted(sizes, key=lambda n: (-sizes[n], n))
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    mine = {name: _sha256(folder / name) for name in names[rank::world]}
    if not _distributed():
        return mine
    parts = [None] * world
    dist.all_gather_object(parts, mine, group=group)
    return {name: digest for part in parts for name, digest in part.items()}


def _write_manifest(folder: Path, group=None):
    sizes = _from_rank0(lambda: _listing(folder), group)
    digests = _hash_split(folder, sizes, group)
    unreadable = sorted(n for n, d in digests.items() if d is None)
    if unreadable:  # every rank holds the same digests, so every rank raises
        raise CheckpointError(f"checkpoint {folder}: {unreadable[0]} could not be read back for its manifest")
    if _rank() == 0:
        files = {name: {"size": sizes[name], "sha256": digests[name]} for name in sorted(sizes)}
        (folder / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1))


def _plain(name) -> bool:
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
        _plain(name) and name != MANIFEST and isinstance(entry, dict) and type(entry.get("size")) is int
        and isinstance(entry.get("sha256"), str) for name, entry in files.items())
    return files if well_formed else None


def _listing_problem(folder: Path) -> tuple[str | None, dict]:
    """(what is wrong with the manifest or the file list, or None; the manifest's files)."""
    if not (folder / MANIFEST).is_file():
        return f"is not a complete checkpoint (no {MANIFEST})", {}
    files = _read_manifest(folder)
    if files is None:
        return f"is corrupt: {MANIFEST} is not a valid manifest", {}
    present = _listing(folder)
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
    # Rank 0's view of the file list decides for everyone and the digests are shared, so all ranks agree.
    problem, files = _from_rank0(lambda: _listing_problem(folder))
    if problem is None:
        digests = _hash_split(folder, {name: entry["size"] for name, entry in files.items()})
        bad = next((name for name in sorted(files) if digests[name] != files[name]["sha256"]), None)
        if bad is not None:
            problem = f"is corrupt: {bad} " + ("has a checksum mismatch" if digests[bad] else "could not be read")
    if problem is not None:
        raise CheckpointError(f"checkpoint {folder} {problem}")


# --- reading DCP without executing code ---------------------------------------------------------------------------
# Everything a `.metadata` written by dcp.save references (found by unpickling real ones), plus torch's dtypes.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
                                              "TensorProperties", "ChunkStorageMetadata", "BytesStorageMetadata",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # how a torch.layout is pickled
    "torch": {"Size"},
    "pathlib": {"PosixPath"},  # StorageMeta.checkpoint_id
    "pathlib._local": {"PosixPath"},  # the same class under python >= 3.13
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        allowed = name in _METADATA_GLOBALS.get(module, ())
        is_dtype = module == "torch" and isinstance(torch.__dict__.get(name), torch.dtype)
        if not (allowed or is_dtype):
            raise pickle.UnpicklingError(f"it references {module}.{name}, which is not checkpoint metadata")
        return super().find_class(module, name)


def _read_metadata(folder: Path) -> Metadata:
    try:
        with open(folder / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except Exception as e:  # whatever fails, the file is not metadata this module can trust
        raise CheckpointError(f"checkpoint {folder}: refusing to load .metadata: {e}") from e
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"checkpoint {folder}: .metadata holds a {type(metadata).__name__}, not DCP metadata")
    paths = [getattr(info, "relative_path", None) for info in (metadata.storage_data or {}).values()]
    if not all(_plain(p) for p in paths):  # DCP opens these files: keep it inside the folder
        raise CheckpointError(f"checkpoint {folder}: .metadata points at files outside the checkpoint")
    return metadata


class _SafeReader(FileSystemReader):
    """DCP's file reader, with `.metadata` read by the restricted unpickler instead of pickle.load."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = _read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """DCP's planner, with non-tensor values decoded by torch.load(weights_only=True).

    DCP itself decodes them with weights_only=False; re-encoding the restricted result keeps its own code path
    (nesting, flattening) while what it unpickles can only be plain data.
    """

    def load_bytes(self, read_item, value):
        safe = io.BytesIO()
        torch.save(torch.load(value, weights_only=True), safe)
        safe.seek(0)
        super().load_bytes(read_item, safe)


def _dcp_load(state: dict, folder: Path):
    try:
        dcp.load(state, storage_reader=_SafeReader(folder), planner=_SafePlanner())
    except CheckpointException as e:  # a BaseException with a traceback per rank: make it one line, catchable
        rank, (error, _) = min(e.failures.items(), key=lambda item: item[0])
        reason = (str(error).splitlines() or [""])[0]
        raise CheckpointError(f"checkpoint {folder} could not be loaded (rank {rank}): "
                              f"{type(error).__name__}: {reason}") from e


def full_ema(folder: str | Path) -> dict[str, torch.Tensor]:
    """The EMA weights of a written checkpoint as full CPU tensors, read by this rank alone (no collective): the
    export is made from the checkpoint's own files, so it needs neither a gather nor the live state."""
    folder = Path(folder)
    metadata = _read_metadata(folder)
    ema = {key[len("ema."):]: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
           for key, meta in metadata.state_dict_metadata.items()
           if key.startswith("ema.") and isinstance(meta, TensorStorageMetadata)}
    try:
        dcp.load({"ema": ema}, storage_reader=_SafeReader(folder), planner=_SafePlanner(), no_dist=True)
    except CheckpointException as e:
        raise CheckpointError(f"checkpoint {folder}: the EMA weights could not be read ({_first_failure(e)})") from e
    return ema


# --- what the checkpoint belongs to -------------------------------------------------------------------------------
_ABSENT = object()


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
    return {k: v for k, v in run_meta.items() if k not in _IDENTITY_KEYS} if isinstance(run_meta, dict) else run_meta


def _check_run(folder: Path, expected_run_meta: dict | None):
    saved_world, world = len(list(folder.glob("rank*.json"))), dist.get_world_size()
    if saved_world != world:
        raise CheckpointError(f"checkpoint {folder} was written by {saved_world} ranks, this run has {world}: the "
                              "data position and RNG streams are per rank, so an exact resume needs the same world "
                              f"size; resume with {saved_world} ranks or in a new run.dir")
    if expected_run_meta is None:
        return
    if not (folder / RUN).is_file():
        raise CheckpointError(f"checkpoint {folder} has no {RUN}, so its run cannot be checked: {_FIX}")
    try:
        saved = json.loads((folder / RUN).read_text())
    except ValueError as e:
        raise CheckpointError(f"checkpoint {folder}: {RUN} is not valid JSON ({e})") from e
    # Through JSON like the saved side, so that a tuple and the list it was saved as compare equal.
    found = _first_difference(_without_identity(saved), _without_identity(json.loads(json.dumps(expected_run_meta))))
    if found:
        key, was, now = found
        raise CheckpointError(f"checkpoint {folder} was written with {key}={_show(was)}, this run has {_show(now)}: "
                              f"{_FIX}")


# --- save and load ------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _distributed_state(model, optimizer, ema) -> dict:
    return {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
        "ema": ema.state_dict(),
    }


@dataclass
class _RankFiles:
    """What a rank writes beside DCP's files, captured when the save starts (the run moves on while it is written)."""
    rank_json: str
    tensors: dict[str, torch.Tensor]
    run_json: str


def _rank_files(rank_meta: dict, rank_tensors: dict, run_meta: dict) -> _RankFiles:
    tensors = {f"rng.{k}": v for k, v in rng_state().items()}
    tensors.update({k: v.detach().to("cpu", copy=True).contiguous() for k, v in rank_tensors.items()})
    # run.json is made on every rank, so that unserialisable meta fails everywhere at once
    return _RankFiles(json.dumps(rank_meta), tensors, json.dumps(run_meta, indent=1))


def _write_rank_files(tmp: Path, rank: int, files: _RankFiles):
    (tmp / f"rank{rank}.json").write_text(files.rank_json)
    atomic_write(tmp / f"rank{rank}.safetensors", lambda path: save_file(files.tensors, str(path)))  # umask's mode
    if rank == 0:
        (tmp / RUN).write_text(files.run_json)


def _folders(root: Path, step: int) -> tuple[Path, Path]:
    return root / f"step_{step:07d}.tmp", root / f"step_{step:07d}"


def _start_folder(root: Path, step: int):
    """An empty step_N.tmp/ on every rank's view (a collective)."""
    tmp, _ = _folders(root, step)
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed while writing
        tmp.mkdir()
    dist.barrier()


def _write_limit_hit(error: BaseException, folder: Path | None) -> str | None:
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
        if shutil.disk_usage(folder).free < 16 * _CHUNK:
            return "the disk is full (no space left on device)"
    except OSError:  # the folder is gone: nothing to tell by
        pass
    return None


def _failure(rank: int, error: BaseException, folder: Path | None = None) -> str:
    limit_hit = _write_limit_hit(error, folder)
    if limit_hit:
        return f"rank {rank}: {limit_hit}"
    return f"rank {rank}: {type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def _first_failure(e: CheckpointException, folder: Path | None = None) -> str:
    rank, (error, _) = min(e.failures.items(), key=lambda item: item[0])
    return _failure(rank, error, folder)


def aside_name(folder: Path, suffix: str) -> Path:
    """folder.SUFFIX, or folder.SUFFIX1, 2, ... when that exists: where a folder that must not be loaded is kept."""
    target, n = folder.with_name(f"{folder.name}.{suffix}"), 1
    while target.exists():
        target, n = folder.with_name(f"{folder.name}.{suffix}{n}"), n + 1
    return target


def _publish(root: Path, step: int, keep: int, run_id: str | None):
    """Rank 0: step_N.tmp/ becomes step_N/; this run's older checkpoints past `keep` and partial writes go.  A
    step_N/ already there is replaced only when it is this run's own complete checkpoint (the same step saved twice:
    a stop signal right after a periodic save); another run's, or one without a manifest, is moved aside."""
    tmp, final = _folders(root, step)
    if final.exists():
        complete = (final / MANIFEST).is_file()
        if complete and not _foreign(final, run_id):
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
    for leftover in root.glob("step_*.tmp"):  # partial writes of killed runs
        shutil.rmtree(leftover, ignore_errors=True)


def _complete(root: Path, step: int, dcp_error: str | None, files: _RankFiles, keep: int, run_id: str | None,
              group=None) -> Path:
    """After DCP wrote its files: the rank files, the ranks' agreement, the manifest and the publish (a collective on
    `group`).  Raises CheckpointError on every rank alike if any rank failed; the partial folder is removed."""
    rank = dist.get_rank()
    tmp, final = _folders(root, step)
    error = dcp_error
    try:
        if error is None:
            _write_rank_files(tmp, rank, files)
    except OSError as e:  # a full disk or a file-size limit on this rank only: every rank must hear of it
        error = f"rank {rank}: {_write_limit_hit(e, tmp) or e}"
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error, group=group)  # also the barrier before the manifest lists every rank's files
    first = next((e for e in errors if e is not None), None)
    try:
        if first is not None:
            raise CheckpointError(f"writing checkpoint {tmp} failed ({first}); the newest complete checkpoint is "
                                  "intact")
        _write_manifest(tmp, group)
        _from_rank0(lambda: _publish(root, step, keep, run_id), group, what=f"publish checkpoint {final}")
    except CheckpointError:
        if rank == 0:  # the space it took (a full disk is a likely cause); the previous checkpoints stay
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_checkpoint(root, step: int, model, optimizer, ema, rank_meta: dict, rank_tensors: dict, keep: int,
                    run_meta: dict) -> Path:
    """Write a complete checkpoint of `step` (a collective: every rank calls it). Returns its folder."""
    root = Path(root)
    files = _rank_files(rank_meta, rank_tensors, run_meta)
    _start_folder(root, step)
    tmp, _ = _folders(root, step)
    error = None
    try:
        dcp.save(_distributed_state(model, optimizer, ema), checkpoint_id=str(tmp))
    except CheckpointException as e:  # raised on every rank alike
        error = _first_failure(e, tmp)
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

    def __init__(self, cuda: bool, timeout):
        self.group = dist.new_group(backend="gloo", timeout=timeout)  # a collective: every rank builds it
        self.writer = _writer(cuda)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.pending = None  # the future of the save in flight

    def start(self, root, step: int, model, optimizer, ema, rank_meta: dict, rank_tensors: dict, keep: int,
              run_meta: dict, then=None):
        """Begin writing a checkpoint of `step` (a collective); `then(folder)` runs in the background once it is
        complete.  The previous save must have been collected with `result`."""
        assert self.pending is None, "the previous background save was not collected"
        root = Path(root)
        files = _rank_files(rank_meta, rank_tensors, run_meta)
        _start_folder(root, step)
        tmp, _ = _folders(root, step)
        written = dcp.async_save(_distributed_state(model, optimizer, ema), checkpoint_id=str(tmp),
                                 storage_writer=self.writer, process_group=self.group)
        self.pending = self.executor.submit(self._finish, written, root, step, files, keep, run_meta.get("run_id"),
                                            then)

    def _finish(self, written, root: Path, step: int, files: _RankFiles, keep: int, run_id: str | None,
                then) -> Path:
        error = None
        tmp, _ = _folders(root, step)
        try:
            written.result()
        except CheckpointException as e:
            error = _first_failure(e, tmp)
        except Exception as e:  # noqa: BLE001 - whatever failed, the other ranks must hear of it
            error = _failure(dist.get_rank(), e, tmp)
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


def load_checkpoint(folder, model, optimizer, ema, expected_run_meta: dict | None = None,
                    verified: bool = False) -> tuple[dict, dict]:
    """Verify a checkpoint (unless `verified`: latest_checkpoint just did), check it belongs to this run, load it
    into model, optimizer and EMA; return this rank's (meta, tensors).  Raises CheckpointError, on every rank
    alike, for anything it refuses."""
    folder = Path(folder)
    rank = dist.get_rank()
    if not verified:
        verify_checkpoint(folder)
    _check_run(folder, expected_run_meta)
    _read_metadata(folder)  # a refused .metadata raises here with its reason, not wrapped by DCP's error handling
    state = _distributed_state(model, optimizer, ema)
    _dcp_load(state, folder)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    meta = json.loads((folder / f"rank{rank}.json").read_text())
    tensors = load_file(str(folder / f"rank{rank}.safetensors"))
    set_rng_state({k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")})
    return meta, {k: v for k, v in tensors.items() if not k.startswith("rng.")}


# --- the trainer's checkpoint manager ----------------------------------------------------------------------------
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


def _check_state_shapes(folder: Path, saved: dict, live: dict, trajectory_change: str | None):
    """CheckpointError naming the first per-rank state tensor whose shape differs (and the setting behind it, when
    the checkpoint records its settings), instead of a size-mismatch error from load_state_dict."""
    for key in sorted(set(saved) & set(live)):
        was, now = list(saved[key].shape), list(live[key].shape)
        if was != now and trajectory_change:
            raise CheckpointError(f"checkpoint {folder} was written with {trajectory_change} ({key} has shape {was}, "
                                  f"this run's {now}): {_FIX}")
        if was != now:
            raise CheckpointError(f"checkpoint {folder} holds {key} of shape {was}, this run's has shape {now} (a "
                                  f"changed objective setting): {_FIX}")


@dataclass
class TrainState:
    step: int = 0
    skipped: int = 0  # non-finite steps skipped so far
    bad_in_row: int = 0


class Checkpointer:
    """The trainer's checkpoints: the resume policy, saves with rotation, and the EMA export written beside them.

    `run_meta` (model config, objective, its state keys, world size) is recorded in every checkpoint; resuming with
    other settings is refused.  The run's id and its `run_meta["trajectory"]` (optimiser, schedule, seed, data,
    objective) are recorded too but not compared: resume=auto adopts only the run's own checkpoints, and a resume
    whose trajectory settings changed says so in a warning line.  The export is side work (`side.run`): a failure is reported and counted,
    never fatal, and the checkpoint is written first; it is read back from the checkpoint's files on rank 0.

    With `async_save`, periodic saves are written in the background (`BackgroundSaver`): `poll` collects a finished
    one without blocking, and a failed one is reported in one line while the run goes on.  Every other save, and
    everything that reads the checkpoints, waits for the one in flight first; a final save (the end, a stop signal,
    too many non-finite steps) is written in the foreground and its failure is an error."""

    def __init__(self, run_dir: Path, world, model, optimizer, ema, objective, loader, run_meta: dict,
                 export_meta: dict, keep: int, side, async_save: bool = False):
        self.run_dir, self.root, self.world, self.keep, self.side = run_dir, run_dir / "checkpoints", world, keep, side
        self.model, self.optimizer, self.ema, self.objective, self.loader = model, optimizer, ema, objective, loader
        self.run_meta, self.export_meta = run_meta, export_meta
        self.saver = BackgroundSaver(world.device.type == "cuda", COLLECTIVE_TIMEOUT) if async_save else None
        self.newest = None  # the newest checkpoint this run completed
        self.failed_saves = 0
        self.run_id = None  # known once `resume` has read or made it

    def latest(self) -> Path | None:
        self.wait()
        return latest_checkpoint(self.root, self.run_id)

    def resume(self, policy: str) -> TrainState:
        explicit = policy not in ("auto", "none")
        if explicit and not Path(policy).is_dir():
            raise CheckpointError(f"train.resume={policy}: no such checkpoint folder")
        self.run_id = run_identity(self.run_dir)
        self.run_meta = {**self.run_meta, "run_id": self.run_id}
        ckpt = Path(policy) if explicit else self.latest() if policy == "auto" else None
        every = complete_checkpoints(self.root)
        existing = complete_checkpoints(self.root, self.run_id)
        if ckpt is None and every and policy == "none":
            raise CheckpointError(f"{self.root} already holds checkpoints (up to step {every[-1][0]}) and "
                             "train.resume=none: use train.resume=auto to continue, or a new run.dir")
        if ckpt is None and existing:
            raise CheckpointError(f"no checkpoint in {self.root} passes its integrity check (see the warnings above); "
                             "resume from a folder with train.resume=PATH or start a new run.dir")
        if ckpt is None and every:  # only other runs' checkpoints: starting afresh beside them would mix two runs
            foreign = every[-1][1]
            raise CheckpointError(f"{foreign} belongs to another run (run id {checkpoint_run_id(foreign)}, this run's "
                                  f"is {self.run_id}) and {self.root} holds no checkpoint of this run: move it out, "
                                  f"or resume it with train.resume={foreign} in a new run.dir")
        unverifiable = [p.parent for p in self.root.glob("step_*/.metadata") if p.parent.name[5:].isdigit()]
        if ckpt is None and unverifiable:
            raise CheckpointError(f"{self.root} holds checkpoints without a manifest (written by an older version of "
                             "this trainer): resume them with that version or start a new run.dir")
        if ckpt is None:
            return TrainState()
        change = self._trajectory_change(ckpt)
        meta, tensors = load_checkpoint(ckpt, self.model, self.optimizer, self.ema, expected_run_meta=self.run_meta,
                                        verified=policy == "auto")
        _check_state_shapes(ckpt, tensors, self.objective.state_dict(), change)
        if change and self.world.is_main:
            print(f"warning: {ckpt} was written with {change}: the run goes on with this run's settings",
                  file=sys.stderr, flush=True)
        state = TrainState(meta["step"], meta["skipped"], meta["bad_in_row"])
        later = [folder for s, folder in existing if s > state.step]
        if later and explicit:  # continuing would interleave two runs' checkpoints
            raise CheckpointError(f"resuming from step {state.step}, but {self.root} holds a later checkpoint "
                             f"({later[-1].name}): resume from an older step in a new run.dir")
        self._set_aside(later)  # resume=auto skipped them: they failed their integrity check
        self.loader.load_state_dict(meta["loader"])
        self.objective.load_state_dict(tensors)
        if self.world.is_main:
            print(f"resumed from {ckpt} at step {state.step}", flush=True)
        self._refresh_export(ckpt, state.step)
        return state

    def _refresh_export(self, ckpt: Path, step: int):
        """Rewrite the EMA export from the checkpoint resumed when it is missing, unreadable or older (its write
        failed, or the run was killed between a checkpoint and its export): a finished run gets it on relaunch."""
        from pafm.export import EXPORT_NAME, ExportError, read_export_meta

        if not self.world.is_main:
            return
        try:
            exported = read_export_meta(self.run_dir / EXPORT_NAME).get("step")
        except ExportError:
            exported = None
        if not isinstance(exported, int) or exported < step:
            self._export(ckpt, step)

    def _trajectory_change(self, ckpt: Path) -> str | None:
        """'KEY=SAVED, this run has NOW' for the first trajectory setting that differs from the checkpoint's, or None
        (also for a checkpoint that records none)."""
        def compare() -> str | None:
            try:
                saved = json.loads((ckpt / RUN).read_text()).get("trajectory")
            except (OSError, ValueError, AttributeError):  # the load refuses such a run.json with its reason
                return None
            expected = json.loads(json.dumps(self.run_meta.get("trajectory")))
            found = None if saved is None or expected is None else _first_difference(saved, expected)
            return None if found is None else f"{found[0]}={_show(found[1])}, this run has {_show(found[2])}"

        return _from_rank0(compare)

    def _set_aside(self, folders: list[Path]):
        """Rename checkpoints that failed verification to step_N.corrupt: kept for inspection, never loaded."""
        if self.world.is_main:
            for folder in folders:
                target = aside_name(folder, "corrupt")  # .corrupt1, 2, ...: the same step failed before
                os.replace(folder, target)
                print(f"warning: set {folder} aside as {target.name}", file=sys.stderr, flush=True)
        dist.barrier()

    def save(self, state: TrainState, final: bool = False) -> Path | None:
        """Checkpoint `state` (a collective).  Returns the folder, or None while a background save is in flight."""
        self.wait()
        rank_meta = {"step": state.step, "skipped": state.skipped, "bad_in_row": state.bad_in_row,
                     "loader": self.loader.state_dict()}
        args = (self.root, state.step, self.model, self.optimizer, self.ema, rank_meta, self.objective.state_dict(),
                self.keep, self.run_meta)
        if self.saver is not None and not final:
            step = state.step  # the loop moves `state` on while the save is written
            self.saver.start(*args, then=lambda folder: self._export(folder, step))
            return None
        self.newest = save_checkpoint(*args)
        self._export(self.newest, state.step)
        return self.newest

    def _export(self, folder: Path, step: int):
        from pafm.export import EXPORT_NAME, save_export

        if self.world.is_main:
            self.side.run("writing the EMA export", lambda: save_export(self.run_dir / EXPORT_NAME, full_ema(folder),
                                                                         {**self.export_meta, "step": step}))

    def poll(self):
        """Collect a background save that has finished; never blocks."""
        if self.saver is not None and self.saver.done():
            self.wait()

    def wait(self):
        """Wait for the background save in flight, if any; a failure is reported in one line and counted."""
        if self.saver is None:
            return
        try:
            self.newest = self.saver.result() or self.newest
        except CheckpointError as e:
            self.failed_saves += 1
            if self.world.is_main:
                print(f"warning: {e}; training goes on", file=sys.stderr, flush=True)

    def close(self):
        """Wait for the save in flight and stop the background thread (before the process group goes)."""
        if self.saver is not None:
            self.wait()
            self.saver.close()
