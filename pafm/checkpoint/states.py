"""The parts of the run's state as the checkpoint stores them.

Sharded parts go through torch.distributed.checkpoint, which calls `state_dict()` before a save and before a load,
and `load_state_dict()` after the load; the model and the optimizer reach it through torch's distributed state dict
API (FSDP2's DTensors as they are, optimizer state keyed by parameter name).  The RNG states go into each rank's
own file.
"""
from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


class ModelState:
    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict):
        set_model_state_dict(self.model, state)


class OptimizerState:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict):
        set_optimizer_state_dict(self.model, self.optimizer, state)


def sharded_states(model, optimizer, ema) -> dict:
    """The sharded parts under the names the checkpoint stores them by."""
    return {"model": ModelState(model), "optim": OptimizerState(model, optimizer), "ema": ema}

RNG_PREFIX = "rng."  # the RNG states' names in rank{R}.safetensors


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
