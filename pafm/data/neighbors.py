"""k-nearest neighbours within each class: exact in chunks for small groups (no N x N distance matrix is ever held
in memory), FAISS over vectors streamed from the shards for large ones (a text dataset is one group of all items)."""
from __future__ import annotations

import json
import math

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


# A group (a class, or a whole text dataset) up to this size is searched exactly: a class of ImageNet (about 1,300
# items) costs well under a second; a group of this size about 3e12 float64 flops.
EXACT_MAX = 20_000
PCA_DIM = 256  # latents are reduced to this many principal components before the inverted-file search
TRAIN_MAX = 100_000  # vectors sampled to fit the PCA (1.6 GiB at D = 4096 in float32)
IVF_TRAIN_PER_LIST = 40  # reduced vectors per inverted list sampled to fit the coarse quantiser
NPROBE = 32  # inverted lists searched per query
READ_CHUNK = 8192  # items read from the shards at a time while adding to and searching the index


def faiss_factory(n: int, dim: int) -> tuple[str, int, int]:
    """(index description, number of inverted lists, lists probed per query) for a group of n vectors.

    PCA to 256 dims, then an inverted file of fp16 vectors (IVF-SQfp16): n x 512 bytes (5.1 GB for CC12M's 10M
    captions, against 164 GB for the flat float32 vectors), and no product-quantisation error, so the ranking
    within the probed lists is exact in the PCA space.  Lists: 4 sqrt(n) (the usual rule), NPROBE of them searched
    per query, so a query scans about 8 sqrt(n) vectors and the whole search costs O(n^1.5)."""
    lists = max(1, int(4 * math.sqrt(n)))
    return f"PCA{min(PCA_DIM, dim)},IVF{lists},SQfp16", lists, min(lists, NPROBE)


def _use_gpu(index):
    import faiss

    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:  # faiss-gpu installed and a GPU visible
        return faiss.index_cpu_to_all_gpus(index)
    return index


def faiss_knn(dataset, members: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """(len(members), k) int64 positions into `members` of each member's approximate k nearest other members.

    The vectors are streamed from the shards READ_CHUNK items at a time (added, then searched): memory holds the
    index, the training samples and one chunk, never the group."""
    try:
        import faiss
    except ImportError:
        raise DataError(f"a group of {len(members)} items is searched with FAISS, which is not installed: `pip "
                        f"install faiss-cpu` (or faiss-gpu), or search it exactly with a larger --exact-max") from None

    n = len(members)
    dim = int(np.prod(dataset.info["latent_shape"]))
    _, lists, nprobe = faiss_factory(n, dim)
    reduced = min(PCA_DIM, dim)
    rng = np.random.default_rng(seed)
    # The PCA from at most TRAIN_MAX full vectors; the coarse quantiser from IVF_TRAIN_PER_LIST reduced vectors per
    # list (faiss's advice is 39 or more), streamed through the PCA: 0.5 GB at CC12M's 12,649 lists.
    sample = np.sort(rng.choice(n, size=min(n, TRAIN_MAX), replace=False))
    pca = faiss.PCAMatrix(dim, reduced)
    pca.train(normalized_view0(dataset, members[sample]).reshape(len(sample), -1).numpy())
    sample = np.sort(rng.choice(n, size=min(n, IVF_TRAIN_PER_LIST * lists), replace=False))
    train = np.concatenate([pca.apply(normalized_view0(dataset, members[sample[lo:lo + READ_CHUNK]])
                                      .reshape(-1, dim).numpy()) for lo in range(0, len(sample), READ_CHUNK)])
    ivf = faiss.index_factory(reduced, f"IVF{lists},SQfp16")
    ivf.train(train)
    del train
    faiss.extract_index_ivf(ivf).nprobe = nprobe
    index = faiss.IndexPreTransform(pca, ivf)
    index = _use_gpu(index)
    for lo in range(0, n, READ_CHUNK):
        index.add(normalized_view0(dataset, members[lo:lo + READ_CHUNK]).reshape(-1, dim).numpy())
    out = np.empty((n, k), dtype=np.int64)
    for lo in range(0, n, READ_CHUNK):
        rows = np.arange(lo, min(n, lo + READ_CHUNK))
        _, found = index.search(normalized_view0(dataset, members[rows]).reshape(-1, dim).numpy(), k + 1)
        out[rows] = _drop_self(found, rows, k)
    return out


def _drop_self(found: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """The first k results of each row other than the row itself (and other than -1: a list too short)."""
    out = np.empty((len(rows), k), dtype=np.int64)
    for i, (row, hits) in enumerate(zip(rows, found)):
        hits = hits[(hits != row) & (hits >= 0)][:k]
        if len(hits) < k:  # fewer than k found in the probed lists: pad with the nearest found (never the row)
            hits = np.resize(hits, k) if len(hits) else np.full(k, (row + 1) % len(found), dtype=np.int64)
        out[i] = hits
    return out


def recall_at_k(dataset, members: np.ndarray, found: np.ndarray, k: int, sample: int, seed: int = 0,
                chunk: int = 4096) -> tuple[float, int]:
    """(mean recall@k of `found` against exact search, number of queries) on a random sample of the members.

    recall@k of a query: the fraction of its exact k nearest other members that `found` holds.  Exact distances in
    float32 (one matrix product per chunk of the group, streamed from the shards)."""
    n = len(members)
    rng = np.random.default_rng(seed + 1)
    queries = np.sort(rng.choice(n, size=min(n, sample), replace=False))
    q = normalized_view0(dataset, members[queries]).reshape(len(queries), -1)
    q_sq = (q * q).sum(1)
    best_d = torch.full((len(queries), k), float("inf"))
    best_i = torch.full((len(queries), k), -1, dtype=torch.int64)
    for lo in range(0, n, chunk):
        keys = normalized_view0(dataset, members[lo:lo + chunk]).reshape(-1, q.shape[1])
        cols = torch.arange(lo, lo + len(keys))
        d = q_sq[:, None] - 2 * q @ keys.T + (keys * keys).sum(1)[None]
        d[torch.from_numpy(queries)[:, None] == cols[None]] = float("inf")
        best_d, pick = torch.topk(torch.cat([best_d, d], 1), k, dim=1, largest=False)
        best_i = torch.cat([best_i, cols.expand(len(queries), -1)], 1).gather(1, pick)
    exact = best_i.numpy()
    hits = [len(set(exact[i]) & set(found[queries[i]])) for i in range(len(queries))]
    return float(np.mean(hits)) / k, len(queries)


def add_neighbors(folder, k: int = 8, chunk: int = 4096, device: str = "cpu", dtype=torch.float64,
                  exact_max: int = EXACT_MAX, recall_sample: int = 1000) -> dict:
    """Compute each item's k nearest same-class neighbours (normalised unflipped latents; all items for text
    datasets) and write them into the dataset folder (`neighbors.safetensors` + index entry). Returns the entry.

    Groups up to `exact_max` items are searched exactly (`knn`, float64); larger ones with FAISS (`faiss_knn`),
    whose recall@k against exact search is measured on `recall_sample` of their items and recorded in the entry."""
    dataset = LatentDataset(folder)
    ids = torch.empty(len(dataset), k, dtype=torch.int64)
    if dataset.info["has_labels"] and dataset.info["kind"] == "class":
        labels = dataset.gather("label", list(range(len(dataset))))
        groups = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels).tolist()]
    else:
        groups = [torch.arange(len(dataset))]
    approx, recalls = [], []
    for members in groups:
        if len(members) <= k:
            raise DataError(f"{folder}: a group (class, or the whole text dataset) of {len(members)} items, starting "
                            f"at item {int(members[0])}, is too small for {k} neighbours: lower k")
        if len(members) <= exact_max:
            x = normalized_view0(dataset, members.numpy()).to(device)
            ids[members] = members[knn(x, k, chunk, dtype).cpu()]
            continue
        found = faiss_knn(dataset, members.numpy(), k)
        recalls.append(recall_at_k(dataset, members.numpy(), found, k, recall_sample))
        approx.append(len(members))
        ids[members] = members[torch.from_numpy(found)]
    folder = dataset.folder
    tensors = {"ids": ids.to(torch.int32).contiguous()}
    atomic_write(folder / NEIGHBORS, lambda tmp: save_file(tensors, str(tmp)))
    entry = {"k": k, "file": NEIGHBORS, "sha256": sha256_file(folder / NEIGHBORS),
             "space": "normalised unflipped latent (posterior mean); same class; nearest first",
             "search": {"exact_groups": len(groups) - len(approx), "faiss_groups": len(approx)}}
    if approx:
        queries = sum(q for _, q in recalls)
        entry["search"].update(
            index=faiss_factory(max(approx), int(np.prod(dataset.info["latent_shape"])))[0],
            faiss_items=int(sum(approx)), recall_queries=int(queries),
            recall_at_k=round(sum(r * q for r, q in recalls) / queries, 4))
    index = json.loads((folder / INDEX).read_text())
    index["neighbors"] = entry
    atomic_write_text(folder / INDEX, json.dumps(index, indent=1))
    return entry
