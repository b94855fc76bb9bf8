"""Exact k-nearest neighbours within each class, in chunks: no N x N distance matrix is ever held in memory."""
from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import save_file

from pafm.files import atomic_write, atomic_write_text

from .normalization import LatentNormalization
from .shards import INDEX, NEIGHBORS, DataError, LatentDataset, sha256_file


def knn(x: torch.Tensor, k: int, chunk: int = 4096, dtype=torch.float64) -> torch.Tensor:
    """(N, k) int64 ids of each row's k nearest other rows of `x` (N, D) in Euclidean distance, nearest first.

    Query and key chunks of `chunk` rows: ||q||^2 - 2 q.k + ||k||^2 from one matrix product per chunk pair, merged
    into a running top-k. float64 by default so near-ties are ordered as the exact distances order them.
    """
    n = x.shape[0]
    if n <= k:
        raise DataError(f"cannot find {k} neighbours among {n} items")
    x = x.reshape(n, -1).to(dtype)
    sq = (x * x).sum(1)
    out = torch.empty(n, k, dtype=torch.int64, device=x.device)
    for q0 in range(0, n, chunk):
        q = x[q0:q0 + chunk]
        rows = torch.arange(q0, q0 + q.shape[0], device=x.device)
        best_d = torch.full((q.shape[0], k), float("inf"), dtype=dtype, device=x.device)
        best_i = torch.full((q.shape[0], k), -1, dtype=torch.int64, device=x.device)
        for k0 in range(0, n, chunk):
            keys = x[k0:k0 + chunk]
            cols = torch.arange(k0, k0 + keys.shape[0], device=x.device)
            d = sq[q0:q0 + q.shape[0], None] - 2 * q @ keys.T + sq[None, k0:k0 + keys.shape[0]]
            d = d.masked_fill(rows[:, None] == cols[None, :], float("inf"))  # an item is not its own neighbour
            cand_d = torch.cat([best_d, d], 1)
            cand_i = torch.cat([best_i, cols.expand(q.shape[0], -1)], 1)
            best_d, pick = torch.topk(cand_d, k, dim=1, largest=False, sorted=True)
            best_i = cand_i.gather(1, pick)
        out[q0:q0 + q.shape[0]] = best_i
    return out


def normalized_view0(dataset, ids) -> torch.Tensor:
    """Normalised unflipped latents (posterior means for datasets with moments) of items `ids`, float32."""
    name = "mean" if dataset.info["has_moments"] else "latent"
    views = np.zeros(len(ids), dtype=np.int64)
    return LatentNormalization(dataset.info).normalize(dataset.gather(name, ids, views=views))


def add_neighbors(folder, k: int = 8, chunk: int = 4096, device: str = "cpu", dtype=torch.float64) -> dict:
    """Compute each item's k nearest same-class neighbours (normalised unflipped latents; all items for text
    datasets) and write them into the dataset folder (`neighbors.safetensors` + index entry). Returns the entry."""
    dataset = LatentDataset(folder)
    ids = torch.empty(len(dataset), k, dtype=torch.int64)
    if dataset.info["has_labels"] and dataset.info["kind"] == "class":
        labels = dataset.gather("label", list(range(len(dataset))))
        groups = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels).tolist()]
    else:
        groups = [torch.arange(len(dataset))]
    for members in groups:
        if len(members) <= k:
            raise DataError(f"{folder}: a group (class, or the whole text dataset) of {len(members)} items, starting "
                            f"at item {int(members[0])}, is too small for {k} neighbours: lower k")
        x = normalized_view0(dataset, members.numpy()).to(device)
        ids[members] = members[knn(x, k, chunk, dtype).cpu()]
    folder = dataset.folder
    tensors = {"ids": ids.to(torch.int32).contiguous()}
    atomic_write(folder / NEIGHBORS, lambda tmp: save_file(tensors, str(tmp)))
    entry = {"k": k, "file": NEIGHBORS, "sha256": sha256_file(folder / NEIGHBORS),
             "space": "normalised unflipped latent (posterior mean); same class; nearest first"}
    index = json.loads((folder / INDEX).read_text())
    index["neighbors"] = entry
    atomic_write_text(folder / INDEX, json.dumps(index, indent=1))
    return entry
