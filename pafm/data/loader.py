"""The training loader: an infinite, rank-split, resumable stream of batches.

Every random choice is a pure function of (seed, epoch, rank) or (seed, epoch, item id): the epoch permutation, the
flip of each item, the VAE-posterior noise of each item. The loader's whole state is therefore one integer, the
number of batches this rank has consumed, and a resumed loader yields exactly the next batch, with or without
background workers (prefetched but unconsumed batches are simply recomputed).
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from .normalization import LatentNormalization
from .shards import DataError, LatentDataset

_FLIP, _NOISE, _PERM = 1, 2, 3  # hash streams


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def item_hash(seed: int, epoch: int, stream: int, ids) -> np.ndarray:
    """A 64-bit hash of (seed, epoch, stream, id) for each id: the source of every per-item random choice."""
    mask = (1 << 64) - 1
    h = _splitmix64(np.asarray([seed & mask], dtype=np.uint64))
    h = _splitmix64(h ^ np.uint64(epoch & mask))
    h = _splitmix64(h ^ np.uint64(stream))
    return _splitmix64(h ^ np.asarray(ids, dtype=np.int64).astype(np.uint64))


def flip_views(seed: int, epoch: int, ids) -> np.ndarray:
    """Per item 0 (stored image) or 1 (stored flipped copy), each with probability 1/2."""
    return (item_hash(seed, epoch, _FLIP, ids) >> np.uint64(63)).astype(np.int64)


def posterior_noise(seed: int, epoch: int, ids, shape) -> torch.Tensor:
    """(len(ids), *shape) standard normal noise, each row a function of (seed, epoch, id) only."""
    seeds = (item_hash(seed, epoch, _NOISE, ids) >> np.uint64(1)).tolist()
    g = torch.Generator()
    out = torch.empty(len(seeds), *shape)
    for row, s in enumerate(seeds):
        g.manual_seed(s)
        out[row] = torch.randn(shape, generator=g)
    return out


class BatchMaker(torch.utils.data.Dataset):
    """Batch number `step` of one rank -> the batch dict. Map-style, so background workers can build any batch."""

    def __init__(self, dataset: LatentDataset, batch_size: int, rank: int, world_size: int, seed: int, flip: bool,
                 neighbors: int):
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.seed, self.flip, self.neighbors = seed, flip, neighbors
        self.batches_per_epoch = len(dataset) // (batch_size * world_size)
        self.latent_shape = tuple(dataset.info["latent_shape"])
        self.normalization = LatentNormalization(dataset.info)
        self._perm_epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(int(item_hash(self.seed, epoch, _PERM, [0])[0] >> np.uint64(1)))
            self._perm, self._perm_epoch = torch.randperm(len(self.dataset), generator=g).numpy(), epoch
        return self._perm

    def batch_ids(self, step: int) -> tuple[int, np.ndarray]:
        """(epoch, item ids) of this rank's batch number `step`. Global batch b of an epoch is a contiguous slice
        of the permutation; rank r takes the r-th part of it. The remainder of an epoch is dropped."""
        epoch, b = divmod(step, self.batches_per_epoch)
        start = (b * self.world_size + self.rank) * self.batch_size
        return epoch, self.permutation(epoch)[start:start + self.batch_size]

    def latents(self, ids: np.ndarray, views: np.ndarray, epoch: int) -> dict:
        """Normalised x (and mean, std for datasets with moments) of items `ids` in views `views`."""
        ds, norm = self.dataset, self.normalization
        if not ds.info["has_moments"]:
            return {"x": norm.normalize(ds.gather("latent", ids, views))}
        mean = norm.normalize(ds.gather("mean", ids, views))
        std = norm.normalize_std(ds.gather("std", ids, views))
        noise = posterior_noise(self.seed, epoch, ids, self.latent_shape)
        return {"x": torch.addcmul(mean, std, noise), "mean": mean, "std": std}

    def __getitem__(self, step: int) -> dict:
        epoch, ids = self.batch_ids(step)
        ds = self.dataset
        views = flip_views(self.seed, epoch, ids) if self.flip else np.zeros(len(ids), dtype=np.int64)
        batch = self.latents(ids, views, epoch)
        batch["index"] = torch.from_numpy(ids.astype(np.int64))
        if ds.info["has_labels"]:
            batch["label"] = ds.gather("label", ids).long()
        if ds.info["kind"] == "text":
            batch["tokens"] = ds.gather("tokens", ids).float()
            batch["mask"] = ds.gather("mask", ids).bool()
            batch["pooled"] = ds.gather("pooled", ids).float()
        if self.neighbors:
            k = self.neighbors
            nbr = np.asarray(ds.neighbor_ids[ids, :k], dtype=np.int64)
            # A neighbour is read in the row's own flip, and (with moments) sampled with the noise it would get as
            # a row this epoch: the candidates are draws of the same epoch's data.
            flat = self.latents(nbr.reshape(-1), np.repeat(views, k), epoch)["x"]
            batch["neighbors"] = flat.view(len(ids), k, *self.latent_shape)
            batch["neighbor_index"] = torch.from_numpy(nbr)
        return batch


def _pinned(batch: dict) -> dict:
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class _CountFrom(torch.utils.data.Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


class LatentLoader:
    """Infinite iterator of batches for one rank; `batch_size` is per rank. See `BatchMaker` for the batch dict.

    `next(loader)` (or `next(iter(loader))`) always returns a batch; `state_dict()` / `load_state_dict()` resume
    exactly at the next batch. `len(loader)` is the number of batches per epoch.
    `pin_memory=True` (a CUDA device) hands out batches in page-locked memory, so that `.to(device,
    non_blocking=True)` is a real asynchronous copy that overlaps the step (from pageable memory it is synchronous).
    """

    def __init__(self, dataset: LatentDataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 flip: bool = True, num_workers: int = 0, neighbors: int = 0, pin_memory: bool = False):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0 or neighbors < 0:
            raise ValueError(f"LatentLoader: need batch_size >= 1, 0 <= rank < world_size, num_workers >= 0, "
                             f"neighbors >= 0; got batch_size={batch_size} rank={rank} world_size={world_size} "
                             f"num_workers={num_workers} neighbors={neighbors}")
        info, where = dataset.info, getattr(dataset, "folder", "dataset")
        if len(dataset) < batch_size * world_size:
            raise DataError(f"{where}: {len(dataset)} items cannot fill one batch of {batch_size} on each of "
                            f"{world_size} ranks")
        if flip and not info["has_flip"]:
            raise DataError(f"{where} stores no flipped copies: set flip off (or prepare it with flips)")
        if neighbors > info["neighbors_k"]:
            raise DataError(f"{where}: {neighbors} neighbours requested, the dataset stores {info['neighbors_k']}"
                            + ("" if info["neighbors_k"] else f" (run `python -m pafm.prep neighbors {where}`)"))
        self.dataset, self.num_workers, self.pin_memory = dataset, num_workers, pin_memory
        self.maker = BatchMaker(dataset, batch_size, rank, world_size, seed, flip, neighbors)
        self.step = 0
        self._it = None

    def __len__(self) -> int:
        return self.maker.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.step // self.maker.batches_per_epoch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._pipeline(self.step)
        batch = next(self._it)
        self.step += 1
        return batch

    def close(self):
        """Stop the background workers (a later `next` starts them again)."""
        self._it = None

    def _pipeline(self, start: int):
        if self.num_workers == 0:
            batches = map(self.maker.__getitem__, itertools.count(start))
            return map(_pinned, batches) if self.pin_memory else batches
        return iter(torch.utils.data.DataLoader(self.maker, batch_size=None, sampler=_CountFrom(start),
                                                num_workers=self.num_workers, prefetch_factor=2,
                                                pin_memory=self.pin_memory))

    def _identity(self) -> dict:
        m = self.maker
        return {"seed": m.seed, "rank": m.rank, "world_size": m.world_size, "batch_size": m.batch_size,
                "num_items": len(self.dataset), "flip": m.flip, "neighbors": m.neighbors}

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last batch the saved loader handed out. The setup must match the saved one."""
        mine = self._identity()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise DataError("loader state does not match this loader (saved, now): "
                            + ", ".join(f"{k}={a!r}/{b!r}" for k, (a, b) in diff.items()))
        self.step = int(state["step"])
        self._it = None  # drops the old pipeline (and its workers)
