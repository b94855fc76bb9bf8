"""Reading a checkpoint without executing code from it.

DCP's `.metadata` is a pickle: it is read by an unpickler that admits only DCP's own metadata classes, and the
storage paths it names must stay inside the folder.  DCP decodes non-tensor values with torch.load
(weights_only=False); here they are decoded with weights_only=True and re-encoded, so DCP keeps its own code path
(nesting, flattening) while what it unpickles can only be plain data.
"""
from __future__ import annotations

import io
import json
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from pafm.checkpoint.errors import CheckpointError, first_failure
from pafm.checkpoint.identity import check_run
from pafm.checkpoint.integrity import is_plain_name, verify_checkpoint
from pafm.checkpoint.layout import DCP_METADATA, rank_files
from pafm.checkpoint.states import RNG_PREFIX, set_rng_state

# full_ema reads on one rank while the process group exists, on purpose: DCP's notice about it is noise.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

# Everything a `.metadata` written by dcp.save references (found by unpickling real ones), plus torch's dtypes.
METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
                                              "TensorProperties", "ChunkStorageMetadata", "BytesStorageMetadata",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # how a torch.layout is pickled
    "torch": {"Size"},
    "pathlib": {"PosixPath"},  # StorageMeta.checkpoint_id
    "pathlib._local": {"PosixPath"},  # the same class under python >= 3.13
}


class MetadataUnpickler(pickle.Unpickler):
    """pickle's unpickler admitting only METADATA_GLOBALS and torch's dtypes."""

    def find_class(self, module, name):
        allowed = name in METADATA_GLOBALS.get(module, ())
        is_dtype = module == "torch" and isinstance(torch.__dict__.get(name), torch.dtype)
        if not (allowed or is_dtype):
            raise pickle.UnpicklingError(f"it references {module}.{name}, which is not checkpoint metadata")
        return super().find_class(module, name)


def read_metadata(folder: Path) -> Metadata:
    try:
        with open(folder / DCP_METADATA, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except Exception as e:  # whatever fails, the file is not metadata this module can trust
        raise CheckpointError(f"checkpoint {folder}: refusing to load .metadata: {e}") from e
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"checkpoint {folder}: .metadata holds a {type(metadata).__name__}, not DCP metadata")
    paths = [getattr(info, "relative_path", None) for info in (metadata.storage_data or {}).values()]
    if not all(is_plain_name(p) for p in paths):  # DCP opens these files: keep it inside the folder
        raise CheckpointError(f"checkpoint {folder}: .metadata points at files outside the checkpoint")
    return metadata


class _SafeReader(FileSystemReader):
    """DCP's file reader, with `.metadata` read by the restricted unpickler instead of pickle.load."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """DCP's planner, with non-tensor values decoded by torch.load(weights_only=True)."""

    def load_bytes(self, read_item, value):
        safe = io.BytesIO()
        torch.save(torch.load(value, weights_only=True), safe)
        safe.seek(0)
        super().load_bytes(read_item, safe)


def safe_dcp_load(states: dict, folder: Path):
    """dcp.load of `states` (state dicts or objects with state_dict / load_state_dict) from folder, executing
    nothing from it (a collective); a failure is one CheckpointError naming the lowest failing rank."""
    try:
        dcp.load(states, storage_reader=_SafeReader(folder), planner=_SafePlanner())
    except CheckpointException as e:  # a BaseException with a traceback per rank: make it one line, catchable
        failed_rank, (error, _) = min(e.failures.items(), key=lambda item: item[0])
        reason = (str(error).splitlines() or [""])[0]
        raise CheckpointError(f"checkpoint {folder} could not be loaded (rank {failed_rank}): "
                              f"{type(error).__name__}: {reason}") from e


def full_ema(folder: str | Path) -> dict[str, torch.Tensor]:
    """The EMA weights of a written checkpoint as full CPU tensors, read by this rank alone (no collective): the
    export is made from the checkpoint's own files, so it needs neither a gather nor the live state."""
    folder = Path(folder)
    metadata = read_metadata(folder)
    ema = {key[len("ema."):]: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
           for key, meta in metadata.state_dict_metadata.items()
           if key.startswith("ema.") and isinstance(meta, TensorStorageMetadata)}
    try:
        dcp.load({"ema": ema}, storage_reader=_SafeReader(folder), planner=_SafePlanner(), no_dist=True)
    except CheckpointException as e:
        raise CheckpointError(f"checkpoint {folder}: the EMA weights could not be read ({first_failure(e)})") from e
    return ema


def load_checkpoint(folder, states: dict, expected_run_meta: dict | None = None,
                    verified: bool = False) -> tuple[dict, dict]:
    """Verify a checkpoint (unless `verified`: latest_checkpoint just did), check it belongs to this run, load its
    sharded parts into `states` (by name: "model", "optim", "ema") and this rank's RNG; return this rank's (meta,
    tensors) with the RNG left out.  Raises CheckpointError, on every rank alike, for anything it refuses."""
    folder = Path(folder)
    if not verified:
        verify_checkpoint(folder)
    check_run(folder, expected_run_meta)
    read_metadata(folder)  # a refused .metadata raises here with its reason, not wrapped by DCP's error handling
    safe_dcp_load(states, folder)
    meta_file, tensors_file = rank_files(folder, dist.get_rank())
    meta = json.loads(meta_file.read_text())
    tensors = load_file(str(tensors_file))
    set_rng_state({k[len(RNG_PREFIX):]: v for k, v in tensors.items() if k.startswith(RNG_PREFIX)})
    return meta, {k: v for k, v in tensors.items() if not k.startswith(RNG_PREFIX)}
