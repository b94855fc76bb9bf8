"""Checkpoints: torch.distributed.checkpoint folders that are either complete or invisible.

A checkpoint is written into `step_NNNNNNN.tmp/` by every rank and renamed to `step_NNNNNNN/` by rank 0 only after
all ranks finished, so a run killed mid-write leaves the previous checkpoint as the newest complete one.  Contents:
- DCP: the model, optimizer and EMA state (sharded: each rank writes its shards; loads reshard as needed);
- `rank{R}.json`: step, counters and the data loader's position of rank R;
- `rank{R}.safetensors`: rank R's RNG states and any per-rank device state (the class bank).
No pickles: DCP's own format, JSON and safetensors.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_COMPLETE = re.compile(r"^step_(\d+)$")


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _COMPLETE.match(child.name)
        if match and child.is_dir() and (child / ".metadata").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


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


def save_checkpoint(root, step: int, model, optimizer, ema, rank_meta: dict, rank_tensors: dict, keep: int):
    """Write a complete checkpoint of `step` (a collective: every rank calls it). Returns its folder."""
    rank = dist.get_rank()
    root = Path(root)
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed while writing
        tmp.mkdir()
    dist.barrier()
    dcp.save(_distributed_state(model, optimizer, ema), checkpoint_id=str(tmp))
    (tmp / f"rank{rank}.json").write_text(json.dumps(rank_meta))
    tensors = {f"rng.{k}": v for k, v in rng_state().items()}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in rank_tensors.items()})
    save_file(tensors, str(tmp / f"rank{rank}.safetensors"))
    dist.barrier()
    if rank == 0:
        if final.exists():  # the same step saved twice (a stop signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for leftover in root.glob("step_*.tmp"):  # partial writes of killed runs
            shutil.rmtree(leftover, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(folder, model, optimizer, ema) -> tuple[dict, dict]:
    """Load a checkpoint into model, optimizer and EMA; return this rank's (meta, tensors)."""
    folder = Path(folder)
    rank, world = dist.get_rank(), dist.get_world_size()
    if not (folder / ".metadata").is_file():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint (no .metadata)")
    saved_world = len(list(folder.glob("rank*.json")))
    if saved_world != world:
        raise ValueError(f"checkpoint {folder} was written by {saved_world} ranks and this run has {world}: "
                         "the data position and RNG streams are per rank, so an exact resume needs the same world size")
    state = _distributed_state(model, optimizer, ema)
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    meta = json.loads((folder / f"rank{rank}.json").read_text())
    tensors = load_file(str(folder / f"rank{rank}.safetensors"))
    set_rng_state({k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")})
    return meta, {k: v for k, v in tensors.items() if not k.startswith("rng.")}
