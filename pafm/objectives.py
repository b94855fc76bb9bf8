"""The training objectives: plain flow matching (FM) and posterior-augmented flow matching (PAFM).

FM regresses the model onto the conditional target u = alpha' x + sigma' eps.  PAFM replaces u by its expectation
under a self-normalised importance-sampling posterior over candidate endpoints,

    p(x_j | z_t, c) ~ N(z_t; alpha_t x_j, sigma_t^2 I) p(c | x_j),

computed by `pafm_kernels.posterior_velocity`; the candidates come from `pafm.candidates`.  With only the row's own
endpoint in the pool the PAFM target is u exactly, so FM is the K = 1 case.

One call per micro-batch, `objective.loss(model, x, cond, batch, gen)`, draws t, noise and dropout, builds z_t, starts
the candidate pool (the `global` source's gathers overlap the forward), runs the model and returns the loss with its
diagnostics.  `objective.targets(x, batch, draws)` gives the same targets without a model.
"""
from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F

from pafm.candidates import SOURCES, Candidates, Part, Prior, Source
from pafm.config import at_least, ordered_within, section, setting, within
from pafm.paths import TimeSampler, build_path, expand_rows
from pafm_kernels import combine_posteriors, posterior_velocity

T_BINS = 5  # diagnostics are reported per fifth of [0, 1]


MAX_TEMPERATURE = 10**6  # flat enough for any pool (the target-ESS search stops there too)


@section("objective")
class ObjectiveConfig:
    kind: Literal["fm", "pafm"]
    path: Literal["linear", "cosine"] = "linear"
    time_sampler: Literal["uniform", "logit_normal"] = "uniform"
    # logit-normal location and scale; beyond 10 nearly every t lies within 5e-5 of 0 or 1
    time_mean: float = setting(0.0, within(-10, 10))
    time_std: float = setting(1.0, within(0, 10, open_lo=True))
    # share of rows trained with the null condition (classifier-free guidance)
    cond_dropout: float = setting(0.1, within(0, 1, open_hi=True))
    # one literal per Source class of pafm.candidates (SOURCES), which says what it needs and refuses
    source: Literal["batch", "global", "bank", "exact", "neighbors", "resample"] = "batch"
    # per-row sources: neighbours or re-samples per row (0: the row's own endpoint alone)
    candidates: int = setting(8, within(0, 1024))
    bank_per_class: int = setting(64, within(1, 65536, "the bank source's FIFO length per class"))
    text_prior: Literal["self", "similarity"] = "self"  # captions: each its own class, or pooled-embedding cosine
    # similarity prior: log p(c_i | x_j) = cos(pooled_i, pooled_j) / text_temperature
    text_temperature: float = setting(0.1, within(0, MAX_TEMPERATURE, open_lo=True))
    # the likelihood temperature tau (1: the exact posterior); the kernels divide float32 log-likelihoods by it
    temperature: float = setting(1.0, within(0, MAX_TEMPERATURE, open_lo=True))
    # if set, each row's tau is found by bisection so that ESS hits this value
    target_ess: Optional[float] = setting(None, at_least(1, "null: a fixed temperature"))
    # PAFM target for rows with t in this range, FM elsewhere
    t_range: tuple[float, float] = setting((0.0, 1.0), ordered_within(0, 1))
    fm_weight: float = setting(0.0, within(0, 1, "loss = (1 - w) * L_PAFM + w * L_FM"))
    backend: Literal["auto", "torch", "triton"] = "auto"
    # The op's input dtype.  float32 under every train.precision: bfloat16 inputs put ~2^-9 |z| of rounding into
    # z - alpha x_j, which near t = 1 outweighs candidates within sigma of the row (measured in bench/README.md:
    # 0.46 relative error at t = 0.999), while the op is well under 1% of a SiT-B/2 step either way.
    op_dtype: Literal["float32", "bfloat16"] = "float32"


def step_generator(seed: int, step: int, micro: int, device) -> torch.Generator:
    """The generator for one micro-batch's randomness, a pure function of (seed, step, micro).

    Drawing t, noise and dropout for the whole global batch from it (and slicing out the rank's rows) makes a run
    independent of the number of ranks and makes resuming exact without replaying any RNG stream.
    """
    digest = hashlib.sha256(f"pafm/{seed}/{step}/{micro}".encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return gen


@dataclass
class Draws:
    t: torch.Tensor  # (B,)
    noise: torch.Tensor  # (B, *S)
    drop: torch.Tensor  # (B,) bool: rows trained with the null condition
    resample: torch.Tensor | None  # (B, R, *S) standard normal draws for a source that asks for R per row


def ess_temperature(log_lik: torch.Tensor, log_prior: torch.Tensor, target: float, iters: int = 40):
    """Per-row tau such that ESS(softmax(log_lik / tau + log_prior)) = target, by bisection on log tau.

    ESS grows monotonically with tau (a flatter softmax).  tau is searched in [1e-3, 1e6]; rows that cannot reach
    the target (fewer admissible candidates than `target`) end at the top of the range.
    """
    lo = torch.full(log_lik.shape[:1], -3.0, dtype=torch.float64, device=log_lik.device)
    hi = torch.full_like(lo, 6.0)
    log_lik, log_prior = log_lik.double(), log_prior.double()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        w = torch.softmax(log_lik / 10.0 ** mid[:, None] + log_prior, dim=1)
        too_sharp = 1.0 / (w * w).sum(1) < target
        lo = torch.where(too_sharp, mid, lo)
        hi = torch.where(too_sharp, hi, mid)
    return (10.0 ** (0.5 * (lo + hi))).float()


@dataclass
class Loss:
    """One micro-batch's loss and what the trainer logs of it."""

    loss: torch.Tensor  # what is backpropagated: the PAFM loss (mixed with FM by fm_weight), or FM's
    fm_loss: torch.Tensor  # the FM loss of the same prediction, for comparison across objectives
    t: torch.Tensor  # (B,) the rows' times
    diagnostics: dict | None  # PAFM: per-row "ess" and "own_weight"
    update: Callable[[], None] | None  # the source's state update (the bank's push), for the caller to apply
    #                                    only if the optimizer step is kept


def source_class(cfg: ObjectiveConfig) -> type[Source]:
    """The class of the configured candidate source, which the trainer asks what it needs and refuses; FM (no pool)
    gets the base class, which needs and refuses nothing."""
    return SOURCES[cfg.source] if cfg.kind == "pafm" else Source


class Objective:
    """FM or PAFM for one rank of `world` ranks: draws, z_t, the candidate pool, the target and the loss."""

    def __init__(self, cfg: ObjectiveConfig, data_info: dict, device, rank: int = 0, world: int = 1, loader=None):
        """`loader` (the training LatentLoader) is read only by the `exact` source, which holds the whole data set."""
        self.cfg, self.rank, self.world = cfg, rank, world
        self.path = build_path(cfg.path)
        self.time_sampler = TimeSampler(cfg.time_sampler, cfg.time_mean, cfg.time_std)
        self.text = data_info["kind"] == "text"
        self.shape = tuple(data_info["latent_shape"])
        self.op_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.op_dtype]
        self.source = None
        if cfg.kind == "pafm":
            kind = source_class(cfg)
            kind.check_data(data_info)
            self.source = kind.build(cfg, data_info, device, loader, self.op_dtype)

    # --- the one call per micro-batch --------------------------------------------------------------------------
    def loss(self, model, x: torch.Tensor, cond, batch: dict, gen: torch.Generator, autocast=nullcontext()) -> Loss:
        draws = self.draw(gen, len(x), self.rank, self.world, x.device)
        z = self.path.interpolate(x, draws.noise, draws.t)
        prior, pending = self._start_pool(x, batch, draws)
        with autocast:
            pred = model(z, draws.t, cond, drop=draws.drop)
        u = self.path.velocity(x, draws.noise, draws.t)
        fm_loss = flow_loss(pred, u)
        if pending is None:
            return Loss(fm_loss, fm_loss, draws.t, None, None)
        target, diagnostics = self._target(x, z, u, draws, prior, pending.wait())
        w = self.cfg.fm_weight
        loss = (1 - w) * flow_loss(pred, target) + w * fm_loss
        return Loss(loss, fm_loss, draws.t, diagnostics, partial(self.source.update, x, prior.ids))

    def targets(self, x: torch.Tensor, batch: dict, draws: Draws):
        """(target, u, diagnostics) of a micro-batch without a model: for tests and studies of the target."""
        z = self.path.interpolate(x, draws.noise, draws.t)
        u = self.path.velocity(x, draws.noise, draws.t)
        prior, pending = self._start_pool(x, batch, draws)
        if pending is None:
            return u, u, None
        target, diagnostics = self._target(x, z, u, draws, prior, pending.wait())
        return target, u, diagnostics

    # --- randomness -------------------------------------------------------------------------------------------
    def draw(self, gen: torch.Generator, rows: int, rank: int, world: int, device) -> Draws:
        """Draw for the global micro-batch (rows * world) and keep this rank's contiguous slice."""
        total, mine = rows * world, slice(rank * rows, (rank + 1) * rows)
        t = self.time_sampler.sample(total, gen, device)[mine]
        noise = torch.randn((total,) + self.shape, generator=gen, device=device)[mine]
        drop = (torch.rand(total, generator=gen, device=device) < self.cfg.cond_dropout)[mine]
        normals = 0 if self.source is None else self.source.normals
        resample = None
        if normals:
            resample = torch.randn((total, normals) + self.shape, generator=gen, device=device)[mine]
        return Draws(t, noise, drop, resample)

    # --- candidates and the condition prior --------------------------------------------------------------------
    def _prior(self, batch: dict, device) -> Prior:
        """The rows' ids or pooled embeddings, copied from the loader's pinned memory without waiting."""
        if not self.text:
            return Prior(batch["label"].to(device, non_blocking=True), None)
        if self.cfg.text_prior == "self":
            return Prior(batch["index"].to(device, non_blocking=True), None)
        return Prior(None, F.normalize(batch["pooled"].to(device, non_blocking=True).float(), dim=-1))

    def _start_pool(self, x, batch: dict, draws: Draws):
        """(prior, candidates or a handle on them); (None, None) for FM."""
        if self.source is None:
            return None, None
        prior = self._prior(batch, x.device)
        return prior, self.source.pool(x, prior.ids, prior.pooled, batch, draws.resample)

    # --- state (the bank's contents, for an exact resume) -------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.source is None else {f"source.{k}": v for k, v in self.source.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]):
        if self.source is not None:
            self.source.load_state_dict({k[len("source."):]: v for k, v in state.items() if k.startswith("source.")})

    # --- the posterior target ----------------------------------------------------------------------------------
    def _target(self, x, z, u, draws: Draws, prior: Prior, cand: Candidates):
        """(target, diagnostics): the posterior velocity inside t_range, u outside."""
        coefs = self.path.coefficients(draws.t)
        lo, hi = self.cfg.t_range
        inside = (draws.t >= lo) & (draws.t <= hi)
        active = None if (lo, hi) == (0.0, 1.0) else inside  # the op skips the other rows (no host sync)
        parts = cand.parts(prior, draws.drop, self.cfg.text_temperature)
        if cand.spread:
            velocity, out, own_logit = self._mixture_target(z, draws, cand, parts, coefs, active)
        else:
            velocity, out, own_logit = self._point_target(x, z, u, draws, parts, coefs, active)
        for part in parts:
            if part.own_log_prior is not None:
                own_logit = own_logit + part.own_log_prior
        own_weight = torch.exp(own_logit - out.lse)
        target = torch.where(expand_rows(inside, u), velocity.to(u.dtype), u)
        ess = torch.where(inside, out.ess, torch.ones_like(out.ess))
        own_weight = torch.where(inside, own_weight, torch.ones_like(own_weight))
        return target, {"ess": ess, "own_weight": own_weight}

    def _point_target(self, x, z, u, draws: Draws, parts, coefs, active):
        """(velocity, op result, own logit) for candidates that are points, in the residual form."""
        alpha, sigma = coefs[:2]
        temperature = self._temperature(z, parts, alpha, sigma)
        dt = self.op_dtype  # no copies in float32, the trainer's dtype
        x_op, noise_op = x.to(dt), draws.noise.to(dt)
        out = self._posterior(z.to(dt), parts, coefs, temperature, active, endpoint=x_op, noise=noise_op)
        velocity = out.velocity
        if dt != x.dtype:
            # The residual form is u' + c (mu - x'), u' from the rounded endpoint and noise: keep only the
            # correction, so a row whose weight sits on its own endpoint gets u itself, without rounding.
            velocity = u.float() + (velocity - self.path.velocity(x_op.float(), noise_op.float(), draws.t))
        # The own endpoint's logit in closed form: z - alpha x = sigma eps, so l_own = -|eps|^2 / (2 tau).
        own_logit = -draws.noise.float().flatten(1).square().sum(1) / (2.0 * torch.as_tensor(temperature))
        return velocity, out, own_logit

    def _mixture_target(self, z, draws: Draws, cand: Candidates, parts, coefs, active):
        """(velocity, op result, own logit) for candidates with a spread s: each x_j stands for N(x_j, s^2 I), so
        z | j ~ N(alpha x_j, width^2 I) with width^2 = alpha^2 s^2 + sigma^2.  The op gets width for sigma and
        returns mu, the weighted mean of the x_j (velocity = d_alpha mu with d_alpha = 1, d_sigma = 0)."""
        alpha, sigma, d_alpha, d_sigma = coefs
        width = torch.sqrt(alpha.double() ** 2 * cand.spread ** 2 + sigma.double() ** 2).to(sigma.dtype)
        temperature = self._temperature(z, parts, alpha, width)
        out = self._posterior(z.to(self.op_dtype), parts, (alpha, width, torch.ones_like(alpha),
                                                            torch.zeros_like(alpha)), temperature, active)
        velocity = mixture_velocity(z, out.velocity, alpha, sigma, d_alpha, d_sigma, cand.spread)
        own = cand.pool[cand.own_index].double().flatten(1)
        own_sq = (z.double().flatten(1) - alpha.double()[:, None] * own).square().sum(1)
        own_logit = (-own_sq / (2.0 * width.double() ** 2 * torch.as_tensor(temperature).double())).float()
        return velocity, out, own_logit

    def _posterior(self, z, parts, coefs, temperature, active, endpoint=None, noise=None):
        """The op on every part of the pool (its layout picks the kernel), merged into one posterior."""
        outs = [posterior_velocity(z, part.pool.to(self.op_dtype), *coefs, **part.weighting(),
                                   temperature=temperature, endpoint=endpoint, noise=noise, active=active,
                                   backend=self.cfg.backend) for part in parts]
        return outs[0] if len(outs) == 1 else combine_posteriors(*outs)

    def _temperature(self, z, parts, alpha, sigma):
        """The fixed tau, or with target_ess the per-row tau found by bisection on every part's logits."""
        if self.cfg.target_ess is None:
            return self.cfg.temperature
        logits = [part_logits(part, z, alpha, sigma) for part in parts]
        return ess_temperature(torch.cat([lik for lik, _ in logits], 1), torch.cat([pri for _, pri in logits], 1),
                               self.cfg.target_ess)


def part_logits(part: Part, z, alpha, sigma):
    """(log-likelihood -|z - alpha x_j|^2 / (2 sigma^2), log-prior with -inf where inadmissible), each (B, K), of
    one part of a pool: the matrices the target-ESS search bisects on (the bank's entries are copied per row: this
    knob is rare)."""
    zf = z.float().flatten(1)
    pool = part.pool if part.pool_index is None else part.pool[part.pool_index]
    if pool.dim() == z.dim():  # shared: the expansion, one matrix product
        xf = pool.float().flatten(1)
        sq = ((zf * zf).sum(1, keepdim=True) - 2 * alpha[:, None] * (zf @ xf.T)
              + alpha[:, None] ** 2 * (xf * xf).sum(1)[None]).clamp_min(0)
    else:  # per row: direct differences
        xf = pool.float().flatten(2)
        sq = (zf[:, None] - alpha[:, None, None] * xf).square().sum(-1)
    log_lik = -sq / (2 * sigma[:, None] ** 2)
    prior = torch.zeros_like(log_lik) if part.log_prior is None else part.log_prior.float()
    if part.row_labels is not None:
        admissible = (part.row_labels[:, None] < 0) | (part.row_labels[:, None] == part.pool_labels)
        prior = prior.masked_fill(~admissible, float("-inf"))
    return log_lik, prior


def mixture_velocity(z, mu, alpha, sigma, d_alpha, d_sigma, spread: float):
    """The posterior velocity when each candidate x_j stands for N(x_j, spread^2 I), given mu = sum_j w_j x_j.

    Within component j, E[x | z] = x_j + c (z - alpha x_j) with c = alpha s^2 / (alpha^2 s^2 + sigma^2), and
    E[eps | z] = (z - alpha E[x | z]) / sigma = sigma (z - alpha x_j) / (alpha^2 s^2 + sigma^2); both are affine
    in x_j, so the mixture's means follow from mu.  Written without 1 / sigma, it stays finite as sigma -> 0."""
    f64 = torch.float64
    a, sg, da, ds = (c.to(f64).reshape(-1, *([1] * (z.dim() - 1))) for c in (alpha, sigma, d_alpha, d_sigma))
    var = a * a * spread**2 + sg * sg
    r = z.to(f64) - a * mu.to(f64)
    x_mean = mu.to(f64) + a * spread**2 / var * r
    eps_mean = sg / var * r
    return (da * x_mean + ds * eps_mean).float()


def flow_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the per-row mean squared error (fp32)."""
    return (pred.float() - target.float()).square().flatten(1).mean(1).mean()


def t_bin_stats(t: torch.Tensor, diagnostics: dict | None) -> torch.Tensor:
    """(3, T_BINS) sums for the log: rows per bin, sum of ESS, sum of the own endpoint's weight."""
    stats = torch.zeros(3, T_BINS, dtype=torch.float64, device=t.device)
    if diagnostics is None:
        return stats
    bins = (t * T_BINS).long().clamp(0, T_BINS - 1)
    stats[0].index_add_(0, bins, torch.ones_like(t, dtype=torch.float64))
    stats[1].index_add_(0, bins, diagnostics["ess"].double())
    stats[2].index_add_(0, bins, diagnostics["own_weight"].double())
    return stats
