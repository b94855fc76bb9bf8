"""Exponential moving average of the weights, in fp32, sharded exactly like the FSDP2 parameters.

Each EMA tensor is a clone of its parameter (a DTensor with the same placement), so the update is a local
lerp on every rank's shard with no communication, and torch.distributed.checkpoint saves and loads it like the
model.  Gathering happens only for the export.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def clean_name(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        # The names of the unwrapped model (activation checkpointing inserts a wrapper level), so that the export
        # loads into a plain model.
        self.names = [clean_name(n) for n, _ in model.named_parameters()]
        self.shadow = {clean_name(n): p.detach().clone().float() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        params = [_local(p.detach()) for _, p in model.named_parameters()]
        shadow = [_local(self.shadow[n]) for n in self.names]
        torch._foreach_lerp_(shadow, [p.float() for p in params], 1.0 - self.decay)

    def state_dict(self) -> dict:
        return self.shadow

    def full_state_dict(self) -> dict:
        """Gathered full tensors on the CPU (a collective: every rank must call it)."""
        out = {}
        for name, t in self.shadow.items():
            full = t.full_tensor() if isinstance(t, DTensor) else t
            out[name] = full.detach().cpu().contiguous()
        return out
