"""The optimiser settings (`optim:`), AdamW built from them, and the learning-rate schedule."""
from __future__ import annotations

import math
from typing import Literal

import torch

from pafm.config import Relation, at_least, each, section, setting, within


@section("optim")
class OptimConfig:
    lr: float = setting(1e-4, within(0, 1, "AdamW moves each weight by about lr per step", open_lo=True))
    betas: tuple[float, float] = setting((0.9, 0.999), each(within(0, 1, "AdamW's moment decays", open_hi=True)))
    weight_decay: float = setting(0.0, at_least(0))
    eps: float = setting(1e-8, within(0, 1, open_lo=True))
    warmup_steps: int = setting(0, at_least(0))
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr: float = setting(0.0, at_least(0, "the cosine schedule's floor"))
    grad_clip: float = setting(1.0, at_least(0, "0 disables clipping"))  # the norm is still computed and logged

    RELATIONS = (
        Relation("min_lr", lambda o: o.min_lr <= o.lr, "<= optim.lr={lr}"),
        Relation("weight_decay", lambda o: o.lr * o.weight_decay < 1,
                 "< 1 / optim.lr={lr} (AdamW multiplies each weight by 1 - lr * weight_decay per step)"),
    )


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps)


def learning_rate(cfg: OptimConfig, step: int, total: int) -> float:
    """Linear warm-up over `warmup_steps` (step s gets lr (s + 1) / warmup_steps), then constant, or cosine from lr
    down to min_lr at step `total`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
