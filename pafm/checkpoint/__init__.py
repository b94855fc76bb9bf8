"""Checkpoints: torch.distributed.checkpoint folders that are complete, verified and tied to their run, or invisible.

A checkpoint `RUN/checkpoints/step_NNNNNNN/` holds
- DCP (`.metadata`, `__R_0.distcp`): the model, optimizer and EMA state (sharded: each rank writes its shards;
  loads reshard as needed);
- `rank{R}.json`: step, counters and the data loader's position of rank R;
- `rank{R}.safetensors`: rank R's RNG states and any per-rank device state (the objective's candidate bank);
- `run.json`: what the checkpoint belongs to (model config, objective, state keys, world size; a load refuses a run
  that differs), the run that wrote it (`run_id`), the settings that shape its trajectory, its export's meta;
- `manifest.json`, written last: name, size and sha256 of every other file.

One concern per module: `layout` (folder names, what counts as complete, listing), `integrity` (the manifest,
verification, the newest checkpoint that verifies), `identity` (the run id, the run meta a load compares),
`reading` (DCP read without executing code, `full_ema`, `load_checkpoint`), `states` (the run's state parts as
stored), `saving` (the write protocol, the background saver), `checkpointer` (the trainer's policy).  Every function
that touches a checkpoint is a collective when torch.distributed is initialised, except `full_ema` (one rank reads)
and the listing in `layout`.
"""
from pafm.checkpoint.checkpointer import CheckpointConfig, Checkpointer, TrainState
from pafm.checkpoint.errors import CheckpointError, describe_failure
from pafm.checkpoint.identity import check_state_shapes, run_identity
from pafm.checkpoint.integrity import file_sizes, latest_checkpoint, sha256_of, verify_checkpoint, write_manifest
from pafm.checkpoint.layout import (CHECKPOINTS, checkpoint_run_id, complete_checkpoints, newest_step,
                                    recorded_run_id, run_dir_of_checkpoint)
from pafm.checkpoint.reading import MetadataUnpickler, full_ema, load_checkpoint, safe_dcp_load
from pafm.checkpoint.saving import BackgroundSaver, save_checkpoint
from pafm.checkpoint.states import sharded_states

__all__ = [
    "CHECKPOINTS", "BackgroundSaver", "CheckpointConfig", "CheckpointError", "Checkpointer", "MetadataUnpickler",
    "TrainState", "check_state_shapes", "checkpoint_run_id", "complete_checkpoints", "describe_failure",
    "file_sizes", "full_ema", "latest_checkpoint", "load_checkpoint", "newest_step", "recorded_run_id",
    "run_dir_of_checkpoint", "run_identity", "safe_dcp_load", "save_checkpoint", "sha256_of", "sharded_states",
    "verify_checkpoint", "write_manifest",
]
