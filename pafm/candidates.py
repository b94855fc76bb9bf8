"""Candidate sources: where the PAFM posterior draws its candidate endpoints x_1..x_K from.

Every source returns a `Candidates` whose pool always holds each row's own endpoint, so the self-normalised
estimate never loses the sample that actually produced z_t.

- shared pools (K, *S), one set for every row: `batch` (the rank's minibatch), `global` (all data-parallel ranks'
  minibatches, gathered asynchronously so the gather overlaps the model's forward), `exact` (every training item:
  the exact empirical posterior, for small data sets and studies);
- `bank`: a per-class FIFO of past latents (StableVM-style) read per row, only the row's own class, plus the current
  minibatch as a shared pool;
- per-row pools (B, K, *S): `neighbors` (the dataset's precomputed same-class neighbours) and `resample` (fresh
  draws from the item's own VAE posterior), each with the row's own endpoint in slot 0.

`ids` are what the condition prior compares: class labels, or item ids for the text `self` prior (each caption its
own class); `pooled` carries pooled text embeddings for the `similarity` prior.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Candidates:
    pool: torch.Tensor  # (K, *S) shared, or (B, K, *S) per row
    ids: torch.Tensor | None  # (K,) or (B, K) int64, compared with the rows' ids; None: no label mask
    pooled: torch.Tensor | None = None  # (K, P) pooled text embeddings of the shared pool (similarity prior)
    own_index: torch.Tensor | None = None  # (B,) each row's own endpoint in a shared pool (kept by the refinement)
    spread: float = 0.0  # > 0: each candidate stands for N(x_j, spread^2 I), not a point (the exact source)
    class_entries: torch.Tensor | None = None  # (C, P, *S) the bank: each row also sees its own class's entries
    class_count: torch.Tensor | None = None  # (C,) items ever pushed per class (slots >= count are empty)

    def wait(self) -> "Candidates":
        return self  # already local; see GatheredCandidates


class Source:
    """`pool(x, ids, pooled, batch, resample)` returns the candidates of a micro-batch (or a handle whose `wait()`
    returns them once its communication is done); `update(x, ids)` runs after a kept step (only the bank keeps
    state)."""

    def update(self, x, ids):
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]):
        pass


class BatchSource(Source):
    """The rank's own minibatch as a shared pool."""

    def pool(self, x, ids, pooled, batch, resample) -> Candidates:
        return Candidates(x, ids, pooled, torch.arange(len(x), device=x.device))


class GatheredCandidates:
    """All-gathers in flight: `wait()` returns the Candidates once they have arrived."""

    def __init__(self, pending):
        self.pending = pending

    def wait(self) -> Candidates:
        outs = []
        for item in self.pending:
            if item is not None:
                out, work = item
                work.wait()
                item = out
            outs.append(item)
        rows = outs[0].shape[0] // dist.get_world_size()
        own = dist.get_rank() * rows + torch.arange(rows, device=outs[0].device)
        return Candidates(*outs, own_index=own)


class GlobalSource(Source):
    """Every data-parallel rank's minibatch, all-gathered asynchronously (no gradient flows through the pool), so the
    gathers overlap the model's forward when the caller waits only after it."""

    def pool(self, x, ids, pooled, batch, resample) -> GatheredCandidates:
        return GatheredCandidates([self._gather(t) for t in (x, ids, pooled)])

    @staticmethod
    def _gather(tensor):
        if tensor is None:
            return None
        world = dist.get_world_size()
        tensor = tensor.contiguous()
        out = tensor.new_empty((world * tensor.shape[0],) + tuple(tensor.shape[1:]))
        return out, dist.all_gather_into_tensor(out, tensor, async_op=True)


class ClassBank(Source):
    """A per-class FIFO of past latents kept on the device (StableVM), plus the current minibatch.

    A conditioned row's candidates are its own class's entries, read in place by the per-row kernel (pool_index),
    and the minibatch's rows of its class: the cost does not grow with the number of classes, nothing is copied
    per step, and the pool has its full size from the first step (empty slots are never admissible), so the
    kernels' tuning key never changes.  Rows trained with the null condition see the minibatch only: reading
    every class's entries for them would bring back the cost that grows with the number of classes.

    Endpoints are fixed data, so old entries never go stale (unlike MoCo's features).  Each rank keeps its own bank,
    filled from its own minibatches; its contents are part of the checkpoint so that a resumed run is exact.
    """

    def __init__(self, num_classes: int, per_class: int, shape, device, dtype=torch.float32):
        if num_classes <= 0:
            raise ValueError("objective.source=bank needs a class-conditional dataset (num_classes > 0)")
        if per_class <= 0:
            raise ValueError(f"objective.bank_per_class must be positive, got {per_class}")
        # One scratch slot per class past the FIFO absorbs the rows a batch overwrites within itself.
        self._padded = torch.zeros((num_classes, per_class + 1) + tuple(shape), device=device, dtype=dtype)
        self.entries = self._padded[:, :per_class]
        self.count = torch.zeros(num_classes, dtype=torch.int64, device=device)  # items ever pushed per class

    def pool(self, x, ids, pooled, batch, resample) -> Candidates:
        own = torch.arange(len(x), device=x.device)
        return Candidates(x, ids, own_index=own, class_entries=self.entries, class_count=self.count)

    @torch.no_grad()
    def update(self, x, ids):
        """Push the minibatch: each item overwrites the oldest entry of its class (later rows win).

        Vectorised without host syncs: rows are grouped by class with a stable sort, each gets its rank within its
        class in this batch, and rows that the same batch would overwrite again (more than per_class rows of one
        class) are sent to a scratch slot, so every kept write hits a distinct entry.
        """
        num_classes, per_class = self.entries.shape[:2]
        counts = torch.bincount(ids, minlength=num_classes)
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


class ExactSource(Source):
    """Every item of the training set as a shared pool, with its labels: the target is then the exact empirical
    posterior mean (the closed-form optimum of flow matching on this data).  Memory and cost grow with the data set,
    so it is meant for small data sets and for studies.

    A dataset with VAE moments is a mixture of Gaussians N(mean_j, s^2 I); with one s for every item and dimension
    (the dequantisation noise of the built-in pixel sets) its posterior is still exact in closed form, so the pool
    holds the means and `spread` carries s.  The first call checks that the rows are the stored items (no flips)."""

    def __init__(self, loader, device):
        dataset = loader.dataset
        ids = np.arange(len(dataset))
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
        self.labels = dataset.gather("label", ids).long().to(device) if dataset.info["has_labels"] else None
        self.checked = False

    def pool(self, x, ids, pooled, batch, resample) -> Candidates:
        own = batch["index"].to(x.device)
        if not self.checked:  # one comparison, on the first call only
            stored = batch["mean"] if self.moments else x
            if not torch.equal(self.items[own], stored.to(self.items)):
                raise ValueError("objective.source=exact: the batch's endpoints are not the stored items (flipped "
                                 "views?); set data.flip=false")
            self.checked = True
        return Candidates(self.items, self.labels, own_index=own, spread=self.spread)


class NeighborSource(Source):
    """Per-row pools: the row's own endpoint and its k precomputed same-class nearest neighbours."""

    def __init__(self, k: int):
        self.k = k

    def pool(self, x, ids, pooled, batch, resample) -> Candidates:
        if self.k == 0:
            pool = x[:, None]
        else:
            if "neighbors" not in batch:
                raise ValueError("objective.source=neighbors: the loader gives no neighbours (prepare them with "
                                 "`python -m pafm.prep neighbors DATASET`)")
            neighbors = batch["neighbors"][:, : self.k].to(device=x.device, dtype=x.dtype)
            pool = torch.cat([x[:, None], neighbors], dim=1)
        return Candidates(pool, None)



class ResampleSource(Source):
    """Per-row pools: the row's own endpoint and fresh draws mean + std * n from the item's own VAE posterior."""

    def __init__(self, count: int):
        self.count = count

    def pool(self, x, ids, pooled, batch, resample) -> Candidates:
        """resample: (B, R, *S) standard normal draws (R = the number of re-samples)."""
        if self.count == 0:
            pool = x[:, None]
        else:
            if "mean" not in batch:
                raise ValueError("objective.source=resample needs a dataset with VAE moments (mean and std)")
            mean = batch["mean"].to(device=x.device, dtype=x.dtype)[:, None]
            std = batch["std"].to(device=x.device, dtype=x.dtype)[:, None]
            pool = torch.cat([x[:, None], mean + std * resample], dim=1)
        return Candidates(pool, None)



def build_source(kind: str, *, candidates: int, bank_per_class: int, num_classes: int, shape, device, loader=None,
                 dtype=torch.float32):
    if kind == "batch":
        return BatchSource()
    if kind == "global":
        return GlobalSource()
    if kind == "bank":
        return ClassBank(num_classes, bank_per_class, shape, device, dtype)
    if kind == "exact":
        if loader is None:
            raise ValueError("objective.source=exact needs the training data (pass the loader to the Objective)")
        return ExactSource(loader, device)
    if kind == "neighbors":
        return NeighborSource(candidates)
    if kind == "resample":
        return ResampleSource(candidates)
    raise ValueError(f"unknown candidate source {kind!r}; valid: batch, global, bank, exact, neighbors, resample")
