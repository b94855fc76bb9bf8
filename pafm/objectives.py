"""The training objectives: plain flow matching (FM) and posterior-augmented flow matching (PAFM).

FM regresses the model onto the conditional target u = alpha' x + sigma' eps.  PAFM replaces u by its expectation
under a self-normalised importance-sampling posterior over candidate endpoints (DESIGN.md section 1), computed by
`pafm_kernels.posterior_velocity`; the candidates come from `pafm.candidates`.  With only the row's own endpoint
in the pool the PAFM target is u exactly, so FM is the K = 1 case.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from pafm.candidates import Candidates, build_source
from pafm.paths import TimeSampler, build_path
from pafm_kernels import posterior_velocity

T_BINS = 5  # diagnostics are reported per fifth of [0, 1]


@dataclass
class ObjectiveConfig:
    kind: Literal["fm", "pafm"]
    path: Literal["linear", "cosine"] = "linear"
    time_sampler: Literal["uniform", "logit_normal"] = "uniform"
    time_mean: float = 0.0  # logit-normal location
    time_std: float = 1.0  # logit-normal scale
    cond_dropout: float = 0.1  # share of rows trained with the null condition (classifier-free guidance)
    source: Literal["batch", "global", "bank", "neighbors", "resample"] = "batch"
    candidates: int = 8  # per-row sources: neighbours or re-samples per row (0: the row's own endpoint alone)
    bank_per_class: int = 64  # bank source: FIFO length per class
    text_prior: Literal["self", "similarity"] = "self"  # captions: each its own class, or pooled-embedding cosine
    text_temperature: float = 0.1  # similarity prior: log p(c_i | x_j) = cos(pooled_i, pooled_j) / text_temperature
    temperature: float = 1.0  # likelihood temperature tau (1 = the exact posterior)
    target_ess: Optional[float] = None  # if set, each row's tau is found by bisection so that ESS hits this value
    t_range: tuple[float, float] = (0.0, 1.0)  # PAFM target for rows with t in this range, FM elsewhere
    fm_weight: float = 0.0  # loss = (1 - w) * L_PAFM + w * L_FM
    backend: Literal["auto", "torch", "triton"] = "auto"

    def __post_init__(self):
        lo, hi = self.t_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"objective.t_range must satisfy 0 <= lo <= hi <= 1, got {self.t_range}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"objective.cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if not 0.0 <= self.fm_weight <= 1.0:
            raise ValueError(f"objective.fm_weight must be in [0, 1], got {self.fm_weight}")
        if self.temperature <= 0 or self.text_temperature <= 0:
            raise ValueError("objective.temperature and objective.text_temperature must be positive")
        if self.target_ess is not None and self.target_ess < 1.0:
            raise ValueError(f"objective.target_ess must be >= 1, got {self.target_ess}")
        if self.candidates < 0:
            raise ValueError(f"objective.candidates must be >= 0, got {self.candidates}")


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
    resample: torch.Tensor | None  # (B, R, *S) standard normal draws for the resample source


def _expand(coef, like):
    return coef.reshape(coef.shape + (1,) * (like.dim() - coef.dim()))


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


class Objective:
    """Draws (t, noise, dropout), builds z_t, and returns the regression target with its diagnostics."""

    def __init__(self, cfg: ObjectiveConfig, data_info: dict, device):
        self.cfg = cfg
        self.path = build_path(cfg.path)
        self.time_sampler = TimeSampler(cfg.time_sampler, cfg.time_mean, cfg.time_std)
        self.text = data_info["kind"] == "text"
        self.shape = tuple(data_info["latent_shape"])
        self.source = None
        self._staged = []
        if cfg.kind == "pafm":
            if cfg.source == "bank" and self.text:
                raise ValueError("objective.source=bank needs class labels; use batch/global/resample for captions")
            self.source = build_source(
                cfg.source, candidates=cfg.candidates, bank_per_class=cfg.bank_per_class,
                num_classes=int(data_info.get("num_classes") or 0), shape=self.shape, device=device,
            )

    # --- randomness -------------------------------------------------------------------------------------------
    def draw(self, gen: torch.Generator, rows: int, rank: int, world: int, device) -> Draws:
        """Draw for the global micro-batch (rows * world) and keep this rank's contiguous slice."""
        total, mine = rows * world, slice(rank * rows, (rank + 1) * rows)
        t = self.time_sampler.sample(total, gen, device)[mine]
        noise = torch.randn((total,) + self.shape, generator=gen, device=device)[mine]
        drop = (torch.rand(total, generator=gen, device=device) < self.cfg.cond_dropout)[mine]
        resample = None
        if self.source is not None and self.cfg.source == "resample" and self.cfg.candidates > 0:
            resample = torch.randn((total, self.cfg.candidates) + self.shape, generator=gen, device=device)[mine]
        return Draws(t, noise, drop, resample)

    # --- candidates and the condition prior --------------------------------------------------------------------
    def prior_ids(self, batch: dict, device):
        """What the condition prior compares: class labels, item ids (text `self` prior), or pooled embeddings."""
        if not self.text:
            return batch["label"].to(device), None
        if self.cfg.text_prior == "self":
            return batch["index"].to(device), None
        return None, F.normalize(batch["pooled"].to(device).float(), dim=-1)

    def start_candidates(self, x, batch, draws: Draws):
        """Kick off the candidate pool (the `global` source's gathers overlap the model's forward).

        The prior's ids are moved to the device once here and reused by `target` and `finish_candidates`.
        """
        if self.source is not None:
            self._ids, self._pooled = self.prior_ids(batch, x.device)
            self.source.start(x, self._ids, self._pooled, batch, draws.resample)

    def finish_candidates(self, x, batch):
        """Stage the source's update (the bank's push); `end_step` applies it only if the optimizer step is kept,
        so a skipped non-finite step leaves the bank as it was."""
        if self.source is not None:
            self._staged.append((x, self._ids))

    def end_step(self, kept: bool):
        for x, ids in self._staged if kept else []:
            self.source.update(x, ids)
        self._staged = []

    # --- state (the bank's contents, for an exact resume) -------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.source is None else {f"source.{k}": v for k, v in self.source.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]):
        if self.source is not None:
            self.source.load_state_dict({k[len("source."):]: v for k, v in state.items() if k.startswith("source.")})

    # --- targets -----------------------------------------------------------------------------------------------
    def target(self, x: torch.Tensor, batch: dict, draws: Draws):
        """Returns (target, u, diagnostics). diagnostics: per-row ess and own-endpoint weight (PAFM), else None."""
        u = self.path.velocity(x, draws.noise, draws.t)
        if self.source is None:
            return u, u, None
        cand = self.source.candidates()
        ids, pooled = self._ids, self._pooled
        alpha, sigma, d_alpha, d_sigma = self.path.coefficients(draws.t)
        z = self.path.interpolate(x, draws.noise, draws.t)
        per_row = cand.pool.dim() == x.dim() + 1
        row_labels = pool_labels = log_prior = None
        if not per_row and cand.ids is not None:
            row_labels = torch.where(draws.drop, torch.full_like(ids, -1), ids)  # dropped: unconditional posterior
            pool_labels = cand.ids
        if not per_row and cand.pooled is not None:
            log_prior = (pooled @ cand.pooled.T) / self.cfg.text_temperature
            log_prior = torch.where(draws.drop[:, None], torch.zeros_like(log_prior), log_prior)
        temperature = self.cfg.temperature
        if self.cfg.target_ess is not None:
            temperature = self._temperature_for_ess(z, cand, alpha, sigma, row_labels, pool_labels, log_prior)
        out = posterior_velocity(
            z, cand.pool, alpha, sigma, d_alpha, d_sigma, row_labels=row_labels, pool_labels=pool_labels,
            log_prior=log_prior, temperature=temperature, endpoint=x, noise=draws.noise, backend=self.cfg.backend,
        )
        # The own endpoint's logit is known in closed form: z - alpha x = sigma eps, so l_own = -|eps|^2 / (2 tau).
        own_logit = -draws.noise.float().flatten(1).square().sum(1) / (2.0 * torch.as_tensor(temperature))
        if log_prior is not None:
            own_logit = own_logit + (pooled * pooled).sum(1) / self.cfg.text_temperature * (~draws.drop)
        own_weight = torch.exp(own_logit - out.lse)
        lo, hi = self.cfg.t_range
        inside = (draws.t >= lo) & (draws.t <= hi)
        target = torch.where(_expand(inside, u), out.velocity.to(u.dtype), u)
        ess = torch.where(inside, out.ess, torch.ones_like(out.ess))
        own_weight = torch.where(inside, own_weight, torch.ones_like(own_weight))
        return target, u, {"ess": ess, "own_weight": own_weight}

    def _temperature_for_ess(self, z, cand: Candidates, alpha, sigma, row_labels, pool_labels, log_prior):
        """Likelihood logits -|z - alpha x_j|^2 / (2 sigma^2) as a (B, K) matrix, then bisection on tau per row."""
        zf = z.float().flatten(1)
        if cand.pool.dim() == z.dim() + 1:
            xf = cand.pool.float().flatten(2)
            sq = (zf[:, None] - alpha[:, None, None] * xf).square().sum(-1)
        else:
            xf = cand.pool.float().flatten(1)
            sq = ((zf * zf).sum(1, keepdim=True) - 2 * alpha[:, None] * (zf @ xf.T)
                  + alpha[:, None] ** 2 * (xf * xf).sum(1)[None]).clamp_min(0)
        log_lik = -sq / (2 * sigma[:, None] ** 2)
        prior = torch.zeros_like(log_lik) if log_prior is None else log_prior.float()
        if row_labels is not None:
            admissible = (row_labels[:, None] < 0) | (row_labels[:, None] == pool_labels[None, :])
            prior = prior.masked_fill(~admissible, float("-inf"))
        return ess_temperature(log_lik, prior, self.cfg.target_ess)


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
