"""The FM and PAFM objectives and candidate sources, against independent float64 computations."""
import numpy as np
import pytest
import torch

import typing

from pafm.candidates import SOURCES, BatchSource, ClassBank, PerRowPool, Source
from pafm.objectives import (Objective, ObjectiveConfig, ess_temperature, flow_loss, source_class, step_generator,
                             t_bin_stats)

from helpers import CLASS_INFO, SHAPE, TEXT_INFO, make_batch


def posterior_target_float64(z, pool, alpha, sigma, d_alpha, d_sigma, admissible, log_prior, tau):
    """The PAFM target straight from its definition (direct distances, exact softmax), in float64."""
    z, pool = z.double().flatten(1), pool.double().flatten(1)
    a, s, da, ds = (c.double()[:, None] for c in (alpha, sigma, d_alpha, d_sigma))
    sq = (z[:, None, :] - a[:, :, None] * pool[None]).square().sum(-1)
    logits = -sq / (2 * s**2 * tau) + log_prior.double()
    logits = logits.masked_fill(~admissible, float("-inf"))
    w = torch.softmax(logits, dim=1)
    mu = w @ pool
    velocity = da * mu + ds * (z - a * mu) / s
    return velocity, 1.0 / (w * w).sum(1), w


@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_batch_source_with_labels_and_dropout_matches_float64(path, tau):
    cfg = ObjectiveConfig(kind="pafm", path=path, source="batch", temperature=tau, cond_dropout=0.4, backend="torch")
    objective = Objective(cfg, CLASS_INFO, "cpu")
    batch = make_batch()
    x = batch["x"]
    draws = objective.draw(step_generator(0, 3, 0, "cpu"), len(x), 0, 1, "cpu")
    assert draws.drop.any() and not draws.drop.all()  # the test must exercise both kinds of rows
    target, u, diag = objective.targets(x, batch, draws)
    z = objective.path.interpolate(x, draws.noise, draws.t)
    coefs = objective.path.coefficients(draws.t)
    labels = batch["label"]
    admissible = (labels[:, None] == labels[None, :]) | draws.drop[:, None]
    want, want_ess, w = posterior_target_float64(z, x, *coefs, admissible, torch.zeros(len(x), len(x)), tau)
    assert torch.allclose(target.double().flatten(1), want, rtol=1e-4, atol=1e-4)
    assert torch.allclose(diag["ess"].double(), want_ess, rtol=1e-4)
    assert torch.allclose(diag["own_weight"].double(), w.diagonal(), rtol=1e-4, atol=1e-6)
    assert torch.allclose(u, objective.path.velocity(x, draws.noise, draws.t))


def test_similarity_prior_and_self_prior_for_captions():
    batch = make_batch(text=True)
    x = batch["x"]
    cfg = ObjectiveConfig(kind="pafm", source="batch", text_prior="similarity", text_temperature=0.2,
                          cond_dropout=0.4, backend="torch")
    objective = Objective(cfg, TEXT_INFO, "cpu")
    draws = objective.draw(step_generator(1, 0, 0, "cpu"), len(x), 0, 1, "cpu")
    target, _, diag = objective.targets(x, batch, draws)
    p = torch.nn.functional.normalize(batch["pooled"].double(), dim=-1)
    log_prior = torch.where(draws.drop[:, None], torch.zeros(7, 7, dtype=torch.float64), p @ p.T / 0.2)
    z = objective.path.interpolate(x, draws.noise, draws.t)
    want, _, w = posterior_target_float64(z, x, *objective.path.coefficients(draws.t),
                                          torch.ones(7, 7, dtype=torch.bool), log_prior, 1.0)
    assert torch.allclose(target.double().flatten(1), want, rtol=1e-4, atol=1e-4)
    assert torch.allclose(diag["own_weight"].double(), w.diagonal(), rtol=1e-4, atol=1e-6)

    # self prior: each caption its own class, so a non-dropped row only sees its own endpoint: target = u.
    objective = Objective(ObjectiveConfig(kind="pafm", source="batch", text_prior="self", cond_dropout=0.0,
                                          backend="torch"), TEXT_INFO, "cpu")
    draws = objective.draw(step_generator(1, 0, 0, "cpu"), len(x), 0, 1, "cpu")
    target, u, diag = objective.targets(x, batch, draws)
    assert torch.allclose(target, u, atol=1e-5) and torch.allclose(diag["ess"], torch.ones(7))


def test_own_endpoint_only_pool_is_exactly_fm():
    batch = make_batch()
    x = batch["x"]
    fm = Objective(ObjectiveConfig(kind="fm"), CLASS_INFO, "cpu")
    pafm = Objective(ObjectiveConfig(kind="pafm", source="neighbors", candidates=0, backend="torch"), CLASS_INFO, "cpu")
    d_fm = fm.draw(step_generator(5, 2, 1, "cpu"), 7, 0, 1, "cpu")
    d_pafm = pafm.draw(step_generator(5, 2, 1, "cpu"), 7, 0, 1, "cpu")
    assert torch.equal(d_fm.t, d_pafm.t) and torch.equal(d_fm.noise, d_pafm.noise)
    target, u, diag = pafm.targets(x, batch, d_pafm)
    assert torch.equal(target, fm.targets(x, batch, d_fm)[0])
    assert torch.allclose(diag["ess"], torch.ones(7)) and torch.allclose(diag["own_weight"], torch.ones(7))


def test_t_range_uses_fm_outside():
    batch = make_batch(b=16)
    x = batch["x"]
    cfg = ObjectiveConfig(kind="pafm", source="batch", t_range=(0.0, 0.5), cond_dropout=0.0, temperature=50.0,
                          backend="torch")
    objective = Objective(cfg, CLASS_INFO, "cpu")
    draws = objective.draw(step_generator(0, 0, 0, "cpu"), 16, 0, 1, "cpu")
    target, u, _ = objective.targets(x, batch, draws)
    outside = draws.t > 0.5
    assert outside.any() and (~outside).any()
    assert torch.equal(target[outside], u[outside])
    assert not torch.allclose(target[~outside], u[~outside])  # tau = 50 mixes same-class candidates


def test_draws_are_independent_of_the_number_of_ranks():
    objective = Objective(ObjectiveConfig(kind="fm"), CLASS_INFO, "cpu")
    whole = objective.draw(step_generator(3, 7, 0, "cpu"), 8, 0, 1, "cpu")
    halves = [objective.draw(step_generator(3, 7, 0, "cpu"), 4, r, 2, "cpu") for r in range(2)]
    assert torch.equal(whole.t, torch.cat([h.t for h in halves]))
    assert torch.equal(whole.noise, torch.cat([h.noise for h in halves]))
    assert torch.equal(whole.drop, torch.cat([h.drop for h in halves]))
    other = objective.draw(step_generator(3, 8, 0, "cpu"), 8, 0, 1, "cpu")
    assert not torch.equal(whole.noise, other.noise)


def test_ess_temperature_hits_the_target():
    gen = torch.Generator().manual_seed(0)
    log_lik = -50 * torch.rand(6, 40, generator=gen, dtype=torch.float64)
    prior = torch.zeros(6, 40, dtype=torch.float64)
    prior[0, 10:] = float("-inf")  # row 0 has only 10 admissible candidates
    tau = ess_temperature(log_lik, prior, target=4.0)
    w = torch.softmax(log_lik / tau[:, None].double() + prior, dim=1)
    ess = 1 / (w * w).sum(1)
    assert torch.allclose(ess, torch.full_like(ess, 4.0), rtol=1e-3)
    # unreachable target: every admissible candidate gets (almost) equal weight
    tau = ess_temperature(log_lik, prior, target=20.0)
    w = torch.softmax(log_lik / tau[:, None].double() + prior, dim=1)
    assert abs(1 / (w[0] ** 2).sum().item() - 10.0) < 0.01


def test_target_ess_knob_reaches_the_requested_ess():
    batch = make_batch(b=32)
    x = batch["x"]
    cfg = ObjectiveConfig(kind="pafm", source="batch", target_ess=3.0, cond_dropout=0.0, backend="torch")
    objective = Objective(cfg, {**CLASS_INFO, "num_classes": 1}, "cpu")
    batch["label"] = torch.zeros(32, dtype=torch.long)
    draws = objective.draw(step_generator(0, 0, 0, "cpu"), 32, 0, 1, "cpu")
    _, _, diag = objective.targets(x, batch, draws)
    assert torch.allclose(diag["ess"], torch.full((32,), 3.0), rtol=1e-2)


def test_class_bank_is_a_per_class_fifo():
    bank = ClassBank(num_classes=3, per_class=2, shape=(1,), device="cpu")
    x = torch.arange(5.0)[:, None]
    labels = torch.tensor([0, 0, 0, 1, 2])
    bank.update(x, labels)  # class 0 receives 0, 1, 2: the FIFO of 2 keeps 1 and 2
    assert sorted(bank.entries[0, :, 0].tolist()) == [1.0, 2.0]
    assert bank.count.tolist() == [3, 1, 1]
    new = torch.tensor([[10.0], [11.0]])
    cand = bank.pool(new, torch.tensor([1, 2]), None, {}, None)
    # the batch as the shared pool, the whole bank in place (no copy) with its fill counts
    assert torch.equal(cand.pool, new) and cand.class_entries.data_ptr() == bank.entries.data_ptr()
    assert cand.class_count is bank.count
    bank.update(torch.tensor([[7.0]]), torch.tensor([0]))  # overwrites the oldest of class 0 (1.0)
    assert sorted(bank.entries[0, :, 0].tolist()) == [2.0, 7.0]
    # A batch with more rows of one class than the FIFO holds: the last per_class rows land, in order.
    bank.update(torch.tensor([[20.0], [21.0], [22.0], [23.0], [24.0]]), torch.tensor([1, 1, 1, 2, 1]))
    assert sorted(bank.entries[1, :, 0].tolist()) == [22.0, 24.0] and bank.count.tolist() == [4, 5, 2]
    assert sorted(bank.entries[2, :, 0].tolist()) == [4.0, 23.0]
    with pytest.raises(ValueError, match="class-conditional"):
        ClassBank(num_classes=0, per_class=2, shape=(1,), device="cpu")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bank_target_is_the_posterior_over_own_class_entries_and_the_batch(backend):
    """Conditioned rows: their class's filled bank entries plus the batch's rows of their class; null-condition
    rows: the whole batch; written out per row in float64.  Triton runs on the GPU when there is one."""
    from pafm_kernels.naive import posterior_velocity_naive
    from pafm_kernels.testing import kernel_device

    device = kernel_device() if backend == "triton" else torch.device("cpu")
    info = dict(CLASS_INFO, num_classes=4)
    cfg = ObjectiveConfig(kind="pafm", source="bank", bank_per_class=3, cond_dropout=0.4, backend=backend)
    objective = Objective(cfg, info, device)
    g = torch.Generator().manual_seed(0)
    # class 0 overfull (4 pushes into 3 slots), class 1 one entry, class 2 none, class 3 full
    pushed = torch.randn(8, *SHAPE, generator=g)
    objective.source.update(pushed.to(device), torch.tensor([0, 0, 1, 0, 3, 0, 3, 3], device=device))
    x, labels = torch.randn(9, *SHAPE, generator=g), torch.tensor([0, 1, 2, 3, 0, 2, 1, 3, 0])
    draws = objective.draw(step_generator(0, 2, 0, "cpu"), len(x), 0, 1, "cpu")
    draws.t[:2] = torch.tensor([0.999, 1e-3])
    assert draws.drop.any() and not draws.drop.all()
    on_device = type(draws)(*(None if v is None else v.to(device) for v in vars(draws).values()))
    target, _, diag = objective.targets(x.to(device), {"x": x.to(device), "label": labels.to(device)}, on_device)
    target, ess_got = target.cpu(), diag["ess"].cpu()
    z = objective.path.interpolate(x, draws.noise, draws.t)
    coefs = objective.path.coefficients(draws.t)
    entries, count = objective.source.entries.cpu(), objective.source.count.cpu()
    for i in range(len(x)):
        pool, pool_labels = [x], [labels]
        if not draws.drop[i]:
            filled = int(min(count[labels[i]], 3))
            pool.append(entries[labels[i], :filled])
            pool_labels.append(torch.full((filled,), int(labels[i])))
        row = torch.tensor([-1 if draws.drop[i] else int(labels[i])])
        v, _, ess = posterior_velocity_naive(z[i:i + 1], torch.cat(pool), *(c[i:i + 1] for c in coefs),
                                             row_labels=row, pool_labels=torch.cat(pool_labels),
                                             endpoint=x[i:i + 1], noise=draws.noise[i:i + 1])
        assert torch.allclose(target[i:i + 1].double(), v, rtol=1e-4, atol=1e-5), i
        assert ess_got[i].item() == pytest.approx(ess.item(), rel=1e-4)


def test_bfloat16_op_inputs_keep_u_where_the_weight_is_on_the_own_endpoint():
    """op_dtype=bfloat16: near the rows' own endpoints the target is u to fp32 rounding (only the correction goes
    through the rounded inputs); elsewhere within bf16's resolution of the float32 target."""
    def target(op_dtype):
        cfg = ObjectiveConfig(kind="pafm", source="batch", cond_dropout=0.0, backend="torch", op_dtype=op_dtype)
        objective = Objective(cfg, CLASS_INFO, "cpu")
        batch = make_batch(b=12, seed=4)
        draws = objective.draw(step_generator(0, 5, 0, "cpu"), 12, 0, 1, "cpu")
        return objective.targets(batch["x"], batch, draws)

    t32, u, diag = target("float32")
    t16, _, _ = target("bfloat16")
    sharp = diag["own_weight"] >= 1 - 1e-7
    assert sharp.any() and not sharp.all()
    assert torch.allclose(t16[sharp], u[sharp], rtol=1e-6, atol=1e-6)
    assert ((t16 - t32).norm() / t32.norm()).item() < 2e-2


def test_loss_and_bins():
    pred, target = torch.ones(2, 3), torch.zeros(2, 3)
    target[1] = 3.0
    assert flow_loss(pred, target).item() == pytest.approx((1 + 4) / 2)
    t = torch.tensor([0.05, 0.1, 0.55, 0.99])
    stats = t_bin_stats(t, {"ess": torch.tensor([1.0, 3.0, 2.0, 5.0]), "own_weight": torch.ones(4)})
    assert stats[0].tolist() == [2, 0, 1, 0, 1] and stats[1].tolist() == [4, 0, 2, 0, 5]


@pytest.mark.parametrize("bad", [dict(t_range=(0.6, 0.2)), dict(cond_dropout=1.0), dict(temperature=0.0),
                                 dict(target_ess=0.5), dict(fm_weight=2.0), dict(candidates=-1)])
def test_config_checks(bad):
    with pytest.raises(ValueError, match="objective"):
        ObjectiveConfig(kind="pafm", **bad)


def test_shared_pools_name_each_rows_own_endpoint():
    """own_index lets the GPU refinement always keep the row's own endpoint: it must point at x itself."""
    x = torch.randn(5, 3)
    ids = torch.tensor([0, 1, 2, 0, 1])
    bank = ClassBank(num_classes=3, per_class=2, shape=(3,), device="cpu")
    bank.update(torch.randn(4, 3), torch.tensor([0, 1, 1, 2]))
    for source in (BatchSource(), bank):
        cand = source.pool(x, ids, None, {}, None)
        assert torch.equal(cand.pool[cand.own_index], x), type(source).__name__


@pytest.mark.parametrize("class_slices", [False, True])
def test_exact_source_is_the_whole_class_posterior_on_the_digits(env, monkeypatch, class_slices):
    """source=exact on the digits (a mixture of Gaussians: each item's mean with the dequantisation std), against
    the posterior of that mixture written out directly in float64: masked to the row's class, all classes for
    dropped rows.  The source holds its items in class order; with chunks smaller than the pool (as MNIST's pool is
    on the CPU) the op solves each labelled row on its class's slice, with the same result."""
    import pafm_kernels.reference as reference
    from pafm.data import LatentLoader, open_dataset

    monkeypatch.setenv("PAFM_CACHE", env["PAFM_CACHE"])
    slices, by_class_slice = [], reference._by_class_slice
    monkeypatch.setattr(reference, "_by_class_slice", lambda *a, **k: slices.append(1) or by_class_slice(*a, **k))
    if class_slices:
        monkeypatch.setattr(reference, "default_chunk_elems", lambda device: 4096)
    dataset = open_dataset("builtin:digits")
    loader = LatentLoader(dataset, 16, seed=3, flip=False)
    cfg = ObjectiveConfig(kind="pafm", source="exact", cond_dropout=0.3, backend="torch")
    objective = Objective(cfg, dataset.info, "cpu", loader=loader)
    batch = next(loader)
    x = batch["x"]
    draws = objective.draw(step_generator(0, 1, 0, "cpu"), len(x), 0, 1, "cpu")
    draws.t[:3] = torch.tensor([1e-4, 0.5, 0.999])
    assert draws.drop.any() and not draws.drop.all()
    target, u, diag = objective.targets(x, batch, draws)
    assert bool(slices) == class_slices

    ids = np.arange(len(dataset))
    items = loader.maker.latents(ids, np.zeros(len(ids), dtype=np.int64), 0)
    means, s = items["mean"].double().flatten(1), float(items["std"].flatten()[0])
    labels = dataset.gather("label", ids).long()
    z = objective.path.interpolate(x, draws.noise, draws.t).double().flatten(1)
    a, sg, da, ds = (c.double()[:, None] for c in objective.path.coefficients(draws.t))
    var = a**2 * s**2 + sg**2
    logits = -(z[:, None] - a[:, :, None] * means[None]).square().sum(-1) / (2 * var)
    admissible = draws.drop[:, None] | (labels[None] == batch["label"][:, None])
    w = torch.softmax(logits.masked_fill(~admissible, float("-inf")), 1)
    x_mean = w @ means + (a * s**2 / var) * (z - a * (w @ means))
    want = da * x_mean + ds * (z - a * x_mean) / sg
    assert torch.allclose(target.double().flatten(1), want, rtol=1e-4, atol=1e-4)
    assert torch.allclose(diag["ess"].double(), 1 / (w * w).sum(1), rtol=1e-4)
    own = w[torch.arange(len(x)), batch["index"]]
    assert torch.allclose(diag["own_weight"].double(), own, rtol=1e-4, atol=1e-7)
    # A flipped or shifted endpoint is not in the pool: refused on the first call.
    fresh = Objective(cfg, dataset.info, "cpu", loader=loader)
    with pytest.raises(ValueError, match="not the stored items"):
        fresh.targets(x, dict(batch, mean=batch["mean"] + 1.0), draws)


def test_every_source_literal_has_its_class_which_says_what_it_needs():
    assert list(SOURCES) == list(typing.get_args(typing.get_type_hints(ObjectiveConfig)["source"]))
    for name, kind in SOURCES.items():
        cfg = ObjectiveConfig(kind="pafm", source=name, candidates=5)
        assert source_class(cfg) is kind and kind.name == name
        assert kind.loader_neighbors(cfg) == (5 if name == "neighbors" else 0)
    assert source_class(ObjectiveConfig(kind="fm", source="neighbors")) is Source  # FM: no pool, needs nothing
    assert Source.loader_neighbors(ObjectiveConfig(kind="fm")) == 0
    resample = Objective(ObjectiveConfig(kind="pafm", source="resample", candidates=3), CLASS_INFO, "cpu")
    assert resample.draw(step_generator(0, 0, 0, "cpu"), 4, 0, 1, "cpu").resample.shape == (4, 3) + SHAPE
    assert Objective(ObjectiveConfig(kind="pafm"), CLASS_INFO, "cpu").draw(
        step_generator(0, 0, 0, "cpu"), 4, 0, 1, "cpu").resample is None


def test_sources_refuse_what_they_cannot_serve():
    self_prior, similarity = ObjectiveConfig(kind="pafm", text_prior="self"), ObjectiveConfig(
        kind="pafm", text_prior="similarity")
    for name in ("bank", "exact"):
        with pytest.raises(ValueError, match=f"source={name} needs class labels; use batch, global, neighbors, "
                                             "resample for captions"):
            SOURCES[name].check(similarity, TEXT_INFO)
        SOURCES[name].check_data(CLASS_INFO)
    with pytest.raises(ValueError, match="needs class labels"):  # the objective cannot build them either
        Objective(ObjectiveConfig(kind="pafm", source="bank"), TEXT_INFO, "cpu")
    for name in ("batch", "global"):  # a shared pool with each caption its own class would train FM
        with pytest.raises(ValueError, match=f"text_prior=self with source={name}.*FM's"):
            SOURCES[name].check(self_prior, TEXT_INFO)
        SOURCES[name].check(similarity, TEXT_INFO)
        SOURCES[name].check(self_prior, CLASS_INFO)
    for name in ("neighbors", "resample"):
        SOURCES[name].check(self_prior, TEXT_INFO)


def test_a_new_source_is_one_class(monkeypatch):
    """A source defined outside pafm.candidates registers under its literal and the objective uses it through the
    interface alone: here per-row pools of the row's endpoint and its circular shift, against float64."""
    import pafm.candidates as candidates

    monkeypatch.setattr(candidates, "SOURCES", dict(SOURCES))

    class ShiftSource(Source, name="shifts"):
        def pool(self, x, ids, pooled, batch, normals):
            return PerRowPool(torch.stack([x, x.roll(1, dims=-1)], dim=1))

    assert candidates.SOURCES["shifts"] is ShiftSource and "shifts" not in SOURCES  # the test's copy only
    objective = Objective(ObjectiveConfig(kind="pafm", cond_dropout=0.0, temperature=30.0, backend="torch"),
                          CLASS_INFO, "cpu")
    objective.source = ShiftSource.build(objective.cfg, CLASS_INFO, "cpu", None, torch.float32)
    batch = make_batch()
    x = batch["x"]
    draws = objective.draw(step_generator(0, 4, 0, "cpu"), len(x), 0, 1, "cpu")
    target, u, diag = objective.targets(x, batch, draws)
    z = objective.path.interpolate(x, draws.noise, draws.t)
    coefs = objective.path.coefficients(draws.t)
    for i in range(len(x)):
        pool = torch.stack([x[i], x[i].roll(1, dims=-1)])
        want, ess, w = posterior_target_float64(z[i:i + 1], pool, *(c[i:i + 1] for c in coefs),
                                                torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 2), 30.0)
        assert torch.allclose(target[i].double().flatten(), want[0], rtol=1e-4, atol=1e-4), i
        assert diag["ess"][i].item() == pytest.approx(ess.item(), rel=1e-4)
        assert diag["own_weight"][i].item() == pytest.approx(w[0, 0].item(), rel=1e-4, abs=1e-7)
    assert not torch.allclose(target, u)
