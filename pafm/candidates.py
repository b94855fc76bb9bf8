"""Candidate sources: where the PAFM posterior draws its candidate endpoints x_1..x_K from.

Every source returns a pool that holds each row's own endpoint, so the self-normalised estimate never loses the
sample that actually produced z_t.  A source is one `Source` subclass named by its `objective.source` literal; it
says what it needs (neighbours from the loader, standard normals per row, class labels) and what it refuses, and it
returns one of three pool kinds, each of which knows how the posterior op is called on it (`parts`):

- `SharedPool` (K, *S), one set for every row, compared with the rows' ids (a label mask) or pooled text
  embeddings (a similarity prior), optionally with a spread: `batch`, `global`, `exact`;
- `BankPool`: a shared pool plus the bank's per-class entries, each row reading only its own class's: `bank`;
- `PerRowPool` (B, K, *S), the row's own endpoint in slot 0 and no mask: `neighbors`, `resample`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist

SOURCES: dict[str, type["Source"]] = {}  # objective.source -> its class, filled as each class is defined


@dataclass
class Prior:
    """What the condition prior compares of the micro-batch's rows: class labels or item ids (`ids`), or pooled
    text embeddings (L2-normalised)."""

    ids: torch.Tensor | None
    pooled: torch.Tensor | None


@dataclass
class Part:
    """One call of the posterior op: a pool and how the rows weigh it (the op's keyword arguments of that name)."""

    pool: torch.Tensor  # (K, *S) shared, (B, K, *S) per row, or (N, K, *S) read through pool_index
    row_labels: torch.Tensor | None = None  # (B,); < 0 admits every candidate
    pool_labels: torch.Tensor | None = None  # (K,) or (B, K)
    log_prior: torch.Tensor | None = None  # (B, K)
    endpoint_index: torch.Tensor | None = None  # (B,) each row's own endpoint in a shared pool
    pool_index: torch.Tensor | None = None  # (B,) the pool each row reads
    own_log_prior: torch.Tensor | None = None  # (B,) the prior term of the own endpoint's logit, where there is one

    def weighting(self) -> dict:
        return dict(row_labels=self.row_labels, pool_labels=self.pool_labels, log_prior=self.log_prior,
                    endpoint_index=self.endpoint_index, pool_index=self.pool_index)


class Candidates:
    """A micro-batch's pool.  `parts(prior, drop, text_temperature)` gives the op's calls (their results are merged
    with `combine_posteriors`); `spread` > 0: each candidate stands for N(x_j, spread^2 I), not a point."""

    spread = 0.0

    def parts(self, prior: Prior, drop: torch.Tensor, text_temperature: float) -> list[Part]:
        raise NotImplementedError

    def wait(self) -> "Candidates":
        return self  # already local; see GatheredCandidates


@dataclass
class SharedPool(Candidates):
    pool: torch.Tensor  # (K, *S)
    ids: torch.Tensor | None  # (K,) int64, compared with the rows' ids; None: no label mask
    pooled: torch.Tensor | None = None  # (K, P) pooled text embeddings (similarity prior)
    own_index: torch.Tensor | None = None  # (B,) each row's own endpoint (kept by the refinement)
    spread: float = 0.0

    def parts(self, prior, drop, text_temperature):
        row_labels = log_prior = own_log_prior = None
        if self.ids is not None:
            row_labels = torch.where(drop, torch.full_like(prior.ids, -1), prior.ids)  # dropped: unconditional
        if self.pooled is not None:
            log_prior = (prior.pooled @ self.pooled.T) / text_temperature
            log_prior = torch.where(drop[:, None], torch.zeros_like(log_prior), log_prior)
            own_log_prior = (prior.pooled * prior.pooled).sum(1) / text_temperature * (~drop)
        return [Part(self.pool, row_labels, self.ids, log_prior, self.own_index, own_log_prior=own_log_prior)]


@dataclass
class BankPool(SharedPool):
    class_entries: torch.Tensor | None = None  # (C, P, *S): each conditioned row also sees its own class's entries
    class_count: torch.Tensor | None = None  # (C,) items ever pushed per class (slots >= count are empty)

    def parts(self, prior, drop, text_temperature):
        """The shared pool, then the row's own class's entries read in place (pool_index = the row's class): only
        the filled slots, and none for rows with the null condition (every class's entries would bring back a
        cost that grows with the number of classes)."""
        per_class = self.class_entries.shape[1]
        filled = torch.arange(per_class, device=prior.ids.device)[None, :] < self.class_count[prior.ids][:, None]
        admissible = filled & ~drop[:, None]
        own_class = Part(self.class_entries, row_labels=torch.zeros_like(prior.ids),
                         pool_labels=(~admissible).long(), pool_index=prior.ids)
        return super().parts(prior, drop, text_temperature) + [own_class]


@dataclass
class PerRowPool(Candidates):
    pool: torch.Tensor  # (B, K, *S), the row's own endpoint in slot 0; no mask

    def parts(self, prior, drop, text_temperature):
        return [Part(self.pool)]


class Source:
    """`pool(x, ids, pooled, batch, normals)` returns the candidates of a micro-batch (or a handle whose `wait()`
    returns them once its communication is done); `update(x, ids)` runs after a kept step (only the bank keeps
    state).  A subclass is registered under its config literal: `class MySource(Source, name="mine")`.

    What the trainer and the objective ask of a source, rather than naming it: `check_data` (datasets it cannot
    serve), `check` (settings it refuses with a dataset), `loader_neighbors` (precomputed neighbours per row the
    loader must add to each batch), `normals` (standard normal draws per row it wants from the step's generator),
    `build` (an instance from the config).  The base class stands for FM, which has no pool: it needs and refuses
    nothing.
    """

    name: ClassVar[str] = ""
    shared: ClassVar[bool] = False  # one pool for every row, compared with the rows' ids or pooled embeddings
    needs_class_labels: ClassVar[bool] = False
    normals: int = 0

    def __init_subclass__(cls, name: str = "", **kwargs):
        super().__init_subclass__(**kwargs)
        if name:
            cls.name = name
            SOURCES[name] = cls

    @classmethod
    def check_data(cls, info: dict):
        """Raise ValueError if this source cannot be built for the dataset."""
        if cls.needs_class_labels and (info["kind"] == "text" or not info.get("num_classes")):
            usable = ", ".join(n for n, s in SOURCES.items() if not s.needs_class_labels)
            raise ValueError(f"objective.source={cls.name} needs class labels; use {usable} for captions")

    @classmethod
    def check(cls, cfg, info: dict):
        """Raise ValueError for settings that are valid one by one but not with this source and dataset, including
        those that would quietly train FM."""
        cls.check_data(info)
        if cls.shared and info["kind"] == "text" and cfg.text_prior == "self":
            raise ValueError(f"objective.text_prior=self with source={cls.name}: each caption is its own class, so "
                             "a shared pool admits only the row's own endpoint and the target is FM's (except for "
                             "rows whose caption was dropped); use source=resample or text_prior=similarity")

    @classmethod
    def loader_neighbors(cls, cfg) -> int:
        return 0

    @classmethod
    def build(cls, cfg, info: dict, device, loader, dtype) -> "Source":
        return cls()

    def update(self, x, ids):
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]):
        pass


class BatchSource(Source, name="batch"):
    """The rank's own minibatch as a shared pool."""

    shared = True

    def pool(self, x, ids, pooled, batch, normals) -> SharedPool:
        return SharedPool(x, ids, pooled, torch.arange(len(x), device=x.device))


class GatheredCandidates:
    """All-gathers in flight: `wait()` returns the shared pool once it has arrived."""

    def __init__(self, pending):
        self.pending = pending

    def wait(self) -> SharedPool:
        outs = []
        for item in self.pending:
            if item is not None:
                out, work = item
                work.wait()
                item = out
            outs.append(item)
        rows = outs[0].shape[0] // dist.get_world_size()
        own = dist.get_rank() * rows + torch.arange(rows, device=outs[0].device)
        return SharedPool(*outs, own_index=own)


class GlobalSource(Source, name="global"):
    """Every data-parallel rank's minibatch, all-gathered asynchronously (no gradient flows through the pool), so the
    gathers overlap the model's forward when the caller waits only after it."""

    shared = True

    def pool(self, x, ids, pooled, batch, normals) -> GatheredCandidates:
        return GatheredCandidates([self._gather(t) for t in (x, ids, pooled)])

    @staticmethod
    def _gather(tensor):
        if tensor is None:
            return None
        world = dist.get_world_size()
        tensor = tensor.contiguous()
        out = tensor.new_empty((world * tensor.shape[0],) + tuple(tensor.shape[1:]))
        return out, dist.all_gather_into_tensor(out, tensor, async_op=True)


class ClassBank(Source, name="bank"):
    """A per-class FIFO of past latents kept on the device (StableVM), plus the current minibatch.

    A conditioned row's candidates are its own class's entries, read in place by the per-row kernel (pool_index),
    and the minibatch's rows of its class: the cost does not grow with the number of classes, nothing is copied
    per step, and the pool has its full size from the first step (empty slots are never admissible), so the
    kernels' tuning key never changes.  Rows trained with the null condition see the minibatch only.

    Endpoints are fixed data, so old entries never go stale (unlike MoCo's features).  Each rank keeps its own bank,
    filled from its own minibatches; its contents are part of the checkpoint so that a resumed run is exact.
    """

    shared = True
    needs_class_labels = True

    def __init__(self, num_classes: int, per_class: int, shape, device, dtype=torch.float32):
        if num_classes <= 0:
            raise ValueError("objective.source=bank needs a class-conditional dataset (num_classes > 0)")
        if per_class <= 0:
            raise ValueError(f"objective.bank_per_class must be positive, got {per_class}")
        # One scratch slot per class past the FIFO absorbs the rows a batch overwrites within itself.
        self._padded = torch.zeros((num_classes, per_class + 1) + tuple(shape), device=device, dtype=dtype)
        self.entries = self._padded[:, :per_class]
        self.count = torch.zeros(num_classes, dtype=torch.int64, device=device)  # items ever pushed per class

    @classmethod
    def build(cls, cfg, info, device, loader, dtype):
        return cls(int(info["num_classes"]), cfg.bank_per_class, info["latent_shape"], device, dtype)

    def pool(self, x, ids, pooled, batch, normals) -> BankPool:
        own = torch.arange(len(x), device=x.device)
        return BankPool(x, ids, own_index=own, class_entries=self.entries, class_count=self.count)

    @torch.no_grad()
    def update(self, x, ids):
        """Push the minibatch: each item overwrites the oldest entry of its class (later rows win).

        Vectorised without host syncs: rows are grouped by class with a stable sort, each gets its rank within its
        class in this batch, and rows that the same batch would overwrite again (more than per_class rows of one
        class) are sent to a scratch slot, so every kept write hits a distinct entry.  The per-class counts are a
        fixed-size index_add_ (bincount's output size depends on the values, which a GPU must read back).
        """
        num_classes, per_class = self.entries.shape[:2]
        counts = torch.zeros(num_classes, dtype=torch.int64, device=ids.device).index_add_(0, ids,
                                                                                          torch.ones_like(ids))
        order = torch.argsort(ids, stable=True)
        sorted_ids = ids[order]
        first = counts.cumsum(0) - counts
        rank = torch.arange(len(ids), device=ids.device) - first[sorted_ids]
        keep = rank >= counts[sorted_ids] - per_class
        slots = torch.where(keep, (self.count[sorted_ids] + rank) % per_class, per_class)
        self._padded[sorted_ids, slots] = x[order].to(self.entries.dtype)
        self.count += counts

    def state_dict(self):
        return {"entries": self.entries, "count": self.count}

    def load_state_dict(self, state):
        self.entries.copy_(state["entries"])
        self.count.copy_(state["count"])


class ExactSource(Source, name="exact"):
    """Every item of the training set as a shared pool, with its labels: the target is then the exact empirical
    posterior mean (the closed-form optimum of flow matching on this data).  Memory and cost grow with the data set,
    so it is meant for small data sets and for studies.

    A dataset with VAE moments is a mixture of Gaussians N(mean_j, s^2 I); with one s for every item and dimension
    (the dequantisation noise of the built-in pixel sets) its posterior is still exact in closed form, so the pool
    holds the means and `spread` carries s.  The first call checks that the rows are the stored items (no flips):
    one host read, on that call only."""

    shared = True
    needs_class_labels = True

    def __init__(self, loader, device):
        dataset = loader.dataset
        ids = np.arange(len(dataset))
        labels = dataset.gather("label", ids).long() if dataset.info["has_labels"] else None
        if labels is not None:  # in class order: the CPU op can solve each row on its class's slice alone
            ids = labels.argsort(stable=True).numpy()
            labels = labels[ids]
        self.position = torch.from_numpy(np.argsort(ids)).to(device)  # dataset index -> row of the pool
        items = loader.maker.latents(ids, np.zeros(len(ids), dtype=np.int64), 0)
        self.spread = 0.0
        if dataset.info["has_moments"]:
            std = items["std"]
            if float(std.max() - std.min()) > 1e-6 * float(std.abs().max()):
                raise ValueError("objective.source=exact needs fixed endpoints or one VAE std shared by every item "
                                 "and dimension; this dataset's std varies, so its posterior has no closed form here")
            self.spread = float(std.flatten()[0])
        self.moments = dataset.info["has_moments"]
        self.items = (items["mean"] if self.moments else items["x"]).to(device)
        self.labels = None if labels is None else labels.to(device)
        self.checked = False

    @classmethod
    def build(cls, cfg, info, device, loader, dtype):
        if loader is None:
            raise ValueError("objective.source=exact needs the training data (pass the loader to the Objective)")
        return cls(loader, device)

    def pool(self, x, ids, pooled, batch, normals) -> SharedPool:
        own = self.position[batch["index"].to(x.device, non_blocking=True)]
        if not self.checked:
            stored = batch["mean"] if self.moments else x
            if not torch.equal(self.items[own], stored.to(self.items)):
                raise ValueError("objective.source=exact: the batch's endpoints are not the stored items (flipped "
                                 "views?); set data.flip=false")
            self.checked = True
        return SharedPool(self.items, self.labels, own_index=own, spread=self.spread)


class NeighborSource(Source, name="neighbors"):
    """Per-row pools: the row's own endpoint and its k precomputed same-class nearest neighbours (the loader reads
    them with each batch)."""

    def __init__(self, k: int):
        self.k = k

    @classmethod
    def loader_neighbors(cls, cfg) -> int:
        return cfg.candidates

    @classmethod
    def build(cls, cfg, info, device, loader, dtype):
        return cls(cfg.candidates)

    def pool(self, x, ids, pooled, batch, normals) -> PerRowPool:
        if self.k == 0:
            return PerRowPool(x[:, None])
        if "neighbors" not in batch:
            raise ValueError("objective.source=neighbors: the loader gives no neighbours (prepare them with "
                             "`python -m pafm.prep neighbors DATASET`)")
        neighbors = batch["neighbors"][:, : self.k].to(device=x.device, dtype=x.dtype, non_blocking=True)
        return PerRowPool(torch.cat([x[:, None], neighbors], dim=1))


class ResampleSource(Source, name="resample"):
    """Per-row pools: the row's own endpoint and fresh draws mean + std * n from the item's own VAE posterior."""

    def __init__(self, count: int):
        self.normals = count

    @classmethod
    def build(cls, cfg, info, device, loader, dtype):
        return cls(cfg.candidates)

    def pool(self, x, ids, pooled, batch, normals) -> PerRowPool:
        """normals: (B, R, *S) standard normal draws (R = the number of re-samples)."""
        if self.normals == 0:
            return PerRowPool(x[:, None])
        if "mean" not in batch:
            raise ValueError("objective.source=resample needs a dataset with VAE moments (mean and std)")
        mean = batch["mean"].to(device=x.device, dtype=x.dtype, non_blocking=True)[:, None]
        std = batch["std"].to(device=x.device, dtype=x.dtype, non_blocking=True)[:, None]
        return PerRowPool(torch.cat([x[:, None], mean + std * normals], dim=1))
