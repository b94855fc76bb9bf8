"""The gate objective.t_range: rows outside it get u exactly and never enter the posterior op. Counted on the
reference backend (the rows it solves) and, for the Triton path, by the mask the op receives (the kernels skip those
rows without a host sync: tests/test_posterior_triton.py; their GEMM work scales with the active rows:
tests/test_posterior_syncs.py)."""
import sys

import pytest
import torch

from pafm.objectives import Objective, ObjectiveConfig, step_generator
from pafm_kernels.reference import posterior_velocity_reference

from helpers import CLASS_INFO, make_batch


@pytest.mark.parametrize("source", ["batch", "bank"])
def test_rows_outside_t_range_get_u_and_no_work(monkeypatch, source):
    api = sys.modules["pafm_kernels.posterior_velocity"]
    solved = []

    def counting(z, *args, **kw):
        solved.append(z.shape[0])
        return posterior_velocity_reference(z, *args, **kw)

    monkeypatch.setattr(api, "posterior_velocity_reference", counting)
    batch = make_batch(b=16)
    x = batch["x"]

    def targets(t_range):
        cfg = ObjectiveConfig(kind="pafm", source=source, t_range=t_range, cond_dropout=0.0, temperature=50.0,
                              backend="torch")
        objective = Objective(cfg, CLASS_INFO, "cpu")
        if source == "bank":
            objective.source.update(torch.randn(12, *x.shape[1:], generator=torch.Generator().manual_seed(1)),
                                    torch.arange(12) % 3)
        draws = objective.draw(step_generator(0, 0, 0, "cpu"), 16, 0, 1, "cpu")
        return draws, objective.targets(x, batch, draws)

    draws, (target, u, _) = targets((0.0, 0.5))
    inside = draws.t <= 0.5
    assert inside.any() and (~inside).any()
    # The reference solved the inside rows only (once for the batch, once more for the bank's part).
    assert solved == [int(inside.sum())] * (2 if source == "bank" else 1)
    assert torch.equal(target[~inside], u[~inside])
    # Inside, the gate changes nothing: the same rows as without it.
    _, (ungated, _, _) = targets((0.0, 1.0))
    torch.testing.assert_close(target[inside], ungated[inside], rtol=0, atol=1e-6)
    assert not torch.allclose(target[inside], u[inside])  # tau = 50 mixes same-class candidates
