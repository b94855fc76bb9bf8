"""The trainer's checkpoints: the resume policy, saves with rotation, and hooks called after each save."""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from pafm.checkpoint.errors import CheckpointError
from pafm.checkpoint.identity import check_state_shapes, run_identity, trajectory_change
from pafm.checkpoint.integrity import latest_checkpoint
from pafm.checkpoint.layout import (CHECKPOINTS, MANIFEST, aside_name, checkpoint_run_id, complete_checkpoints,
                                    incomplete_checkpoints)
from pafm.checkpoint.reading import load_checkpoint
from pafm.checkpoint.saving import BackgroundSaver, save_checkpoint
from pafm.config import at_least, section, setting
from pafm.distributed import COLLECTIVE_TIMEOUT


@section("checkpoint")
class CheckpointConfig:
    every: int = setting(allowed=at_least(1, "steps between checkpoints"))
    keep: int = setting(2, at_least(0, "0 keeps all"))  # the newest N complete checkpoints are kept
    async_save: bool = False  # write periodic checkpoints in the background; the loop waits only while a CPU copy
    #                           of the state is made, which needs host memory for one more copy of each rank's shards


@dataclasses.dataclass
class TrainState:
    step: int = 0
    skipped: int = 0  # non-finite steps skipped so far
    bad_in_row: int = 0


def _holds_tensors(state: dict) -> bool:
    return all(isinstance(v, torch.Tensor) for v in state.values())


class Checkpointer:
    """The run's state, given as named parts, checkpointed and resumed.

    `sharded` parts ("model", "optim", "ema": objects with state_dict / load_state_dict) are written with DCP;
    `per_rank` parts go into each rank's own files: a state dict of tensors under its own names into
    rank{R}.safetensors, any other under the part's name into rank{R}.json, beside the `TrainState` counters.

    `run_meta` (model config, objective, its state keys, world size) is recorded in every checkpoint; resuming with
    other settings is refused.  The run's id and its `run_meta["trajectory"]` (optimiser, schedule, seed, data,
    objective) are recorded too but not compared: resume=auto adopts only the run's own checkpoints, and a resume
    whose trajectory settings changed says so in a warning line.

    With `cfg.async_save`, periodic saves are written in the background (`BackgroundSaver`): `poll` collects a
    finished one without blocking, and a failed one is reported in one line while the run goes on.  Every other
    save, and everything that reads the checkpoints, waits for the one in flight first; a final save (the end, a
    stop signal, too many non-finite steps) is written in the foreground and its failure is an error.

    `after_save` holds hooks `hook(folder, step)`, called on every rank once a checkpoint is complete; for a
    background save they run in the saver's thread, so they must not use the training's process group."""

    def __init__(self, run_dir: Path, world, cfg: CheckpointConfig, run_meta: dict, sharded: dict, per_rank: dict):
        self.run_dir, self.root, self.world, self.keep = Path(run_dir), Path(run_dir) / CHECKPOINTS, world, cfg.keep
        self.run_meta, self.sharded, self.per_rank = run_meta, sharded, per_rank
        self.after_save: list[Callable[[Path, int], None]] = []
        self.saver = BackgroundSaver(world.device.type == "cuda", COLLECTIVE_TIMEOUT) if cfg.async_save else None
        self.newest = None  # the newest checkpoint this run completed
        self.resumed_from = None  # the checkpoint `resume` loaded
        self.failed_saves = 0
        self.run_id = None  # known once `resume` has read or made it

    def latest(self) -> Path | None:
        self.wait()
        return latest_checkpoint(self.root, self.run_id)

    def resume(self, policy: str) -> TrainState:
        """Read or make the run's id, then load the checkpoint `policy` (train.resume) names: "auto", "none" or a
        folder.  Returns the counters to continue from."""
        explicit = policy not in ("auto", "none")
        if explicit and not Path(policy).is_dir():
            raise CheckpointError(f"train.resume={policy}: no such checkpoint folder")
        self.run_id = run_identity(self.run_dir)
        self.run_meta = {**self.run_meta, "run_id": self.run_id}
        ckpt = Path(policy) if explicit else self.latest() if policy == "auto" else None
        if ckpt is None:
            self._check_fresh_start(policy)
            return TrainState()
        change = trajectory_change(ckpt, self.run_meta.get("trajectory"))
        meta, tensors = load_checkpoint(ckpt, self.sharded, expected_run_meta=self.run_meta,
                                        verified=policy == "auto")
        live = {name: part.state_dict() for name, part in self.per_rank.items()}
        check_state_shapes(ckpt, tensors, {k: v for s in live.values() if _holds_tensors(s) for k, v in s.items()},
                           change)
        if change and self.world.is_main:
            print(f"warning: {ckpt} was written with {change}: the run goes on with this run's settings",
                  file=sys.stderr, flush=True)
        state = TrainState(meta["step"], meta["skipped"], meta["bad_in_row"])
        later = [folder for s, folder in complete_checkpoints(self.root, self.run_id) if s > state.step]
        if later and explicit:  # continuing would interleave two runs' checkpoints
            raise CheckpointError(f"resuming from step {state.step}, but {self.root} holds a later checkpoint "
                                  f"({later[-1].name}): resume from an older step in a new run.dir")
        self._set_aside(later)  # resume=auto skipped them: they failed their integrity check
        for name, part in self.per_rank.items():
            part.load_state_dict({k: v for k, v in tensors.items() if k in live[name]}
                                 if _holds_tensors(live[name]) else meta[name])
        if self.world.is_main:
            print(f"resumed from {ckpt} at step {state.step}", flush=True)
        self.resumed_from = ckpt
        return state

    def _check_fresh_start(self, policy: str):
        """Refuse to start afresh beside checkpoints: that would mix two runs, or restart one by mistake."""
        every = complete_checkpoints(self.root)
        if every and policy == "none":
            raise CheckpointError(f"{self.root} already holds checkpoints (up to step {every[-1][0]}) and "
                                  "train.resume=none: use train.resume=auto to continue, or a new run.dir")
        if complete_checkpoints(self.root, self.run_id):
            raise CheckpointError(f"no checkpoint in {self.root} passes its integrity check (see the warnings above); "
                                  "resume from a folder with train.resume=PATH or start a new run.dir")
        if every:  # only other runs' checkpoints
            foreign = every[-1][1]
            raise CheckpointError(f"{foreign} belongs to another run (run id {checkpoint_run_id(foreign)}, this run's "
                                  f"is {self.run_id}) and {self.root} holds no checkpoint of this run: move it out, "
                                  f"or resume it with train.resume={foreign} in a new run.dir")
        incomplete = incomplete_checkpoints(self.root)
        if incomplete:
            raise CheckpointError(f"{self.root} holds {incomplete[-1].name} without {MANIFEST} (an incomplete or "
                                  "damaged checkpoint, or one written before checkpoints had manifests): move it out "
                                  "or start a new run.dir")

    def _set_aside(self, folders: list[Path]):
        """Rename checkpoints that failed verification to step_N.corrupt: kept for inspection, never loaded."""
        if self.world.is_main:
            for folder in folders:
                target = aside_name(folder, "corrupt")  # .corrupt1, 2, ...: the same step failed before
                os.replace(folder, target)
                print(f"warning: set {folder} aside as {target.name}", file=sys.stderr, flush=True)
        dist.barrier()

    def _rank_state(self, state: TrainState) -> tuple[dict, dict]:
        """(what goes into rank{R}.json, what into rank{R}.safetensors) for this rank."""
        meta, tensors = dataclasses.asdict(state), {}
        for name, part in self.per_rank.items():
            part_state = part.state_dict()
            if _holds_tensors(part_state):
                tensors.update(part_state)
            else:
                meta[name] = part_state
        return meta, tensors

    def save(self, state: TrainState, final: bool = False) -> Path | None:
        """Checkpoint `state` (a collective).  Returns the folder, or None while a background save is in flight."""
        self.wait()
        step = state.step  # the loop moves `state` on while a background save is written
        args = (self.root, step, self.sharded, *self._rank_state(state), self.keep, self.run_meta)
        if self.saver is not None and not final:
            self.saver.start(*args, then=lambda folder: self._saved(folder, step))
            return None
        self.newest = save_checkpoint(*args)
        self._saved(self.newest, step)
        return self.newest

    def _saved(self, folder: Path, step: int):
        for hook in self.after_save:
            hook(folder, step)

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
