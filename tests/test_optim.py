"""The learning-rate schedule and the optimiser built from `optim:`."""
import math

import pytest
import torch

from pafm.optim import OptimConfig, build_optimizer, learning_rate


def test_warm_up_is_linear_then_constant():
    cfg = OptimConfig(lr=0.01, warmup_steps=4)
    assert [learning_rate(cfg, s, 100) for s in range(6)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01],
                                                                            rel=1e-15)


def test_cosine_runs_from_lr_to_min_lr_through_the_midpoint():
    cfg = OptimConfig(lr=0.01, min_lr=0.001, warmup_steps=10, schedule="cosine")
    total = 110
    rates = [learning_rate(cfg, s, total) for s in range(total + 5)]
    assert rates[9] == pytest.approx(0.01) and rates[10] == pytest.approx(0.01, rel=1e-15)
    assert rates[60] == pytest.approx(0.0055, rel=1e-12)  # halfway: the mean of lr and min_lr
    assert rates[35] == pytest.approx(0.001 + 0.009 * math.cos(math.pi / 8) ** 2, rel=1e-12)  # (1 + cos x) / 2
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[total:] == [pytest.approx(0.001, rel=1e-12)] * 5  # held at the floor past the end


def test_the_optimizer_takes_every_setting():
    cfg = OptimConfig(lr=0.02, betas=(0.8, 0.9), weight_decay=0.1, eps=1e-6)
    group = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))]).param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (0.02, (0.8, 0.9), 0.1, 1e-6)
