"""The built-in datasets: scikit-learn's 8x8 handwritten digits as 1-channel "latents" (no download, no VAE).

`builtin:digits` (class-conditional) and `builtin:digits-captions` (template captions + the built-in text embedder)
are written on first use into `$PAFM_CACHE` (default `~/.cache/pafm`) as ordinary shard folders with splits `train`
(80%) and `heldout` (20%, stratified by class, fixed seed; for evaluation only). Building happens in a temporary
folder that is renamed into place, so concurrent ranks can race safely: one rename wins, the others discard theirs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .cache import build_in_cache, cache_dir
from .neighbors import add_neighbors
from .shards import DataError, ShardWriter
from .text import DIGIT_WORDS, BuiltinTextEmbedder, digit_caption

SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0
NEIGHBORS_K = 8
BUILD_VERSION = 3  # bump whenever the built content changes: caches are keyed by it
DEQUANT_STD = (2.0 / 16.0) / 12**0.5  # std of a uniform distribution over one pixel level
TEXT_EMBEDDER = {"dim": 32, "max_len": 16, "vocab_size": 4096, "seed": 0}


def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float64), bunch.target.astype(np.int64)


def split_ids(labels: np.ndarray, split: str) -> np.ndarray:
    """Sorted ids of `split`. ceil(20%) of all items are held out (360 of 1797, as scikit-learn's
    train_test_split counts), spread over classes by largest remainder; within a class a fixed-seed permutation
    picks them."""
    if split not in SPLITS:
        raise ValueError(f"digits split must be one of {SPLITS}, got {split!r}")
    counts = np.bincount(labels, minlength=10)
    exact = HELDOUT_FRACTION * counts
    take = np.floor(exact).astype(np.int64)
    extra = int(np.ceil(HELDOUT_FRACTION * len(labels))) - int(take.sum())
    take[np.argsort(-(exact - take), kind="stable")[:extra]] += 1
    rng = np.random.default_rng(SPLIT_SEED)
    heldout = np.sort(np.concatenate([rng.permutation(np.nonzero(labels == c)[0])[: take[c]] for c in range(10)]))
    if split == "heldout":
        return heldout
    return np.setdiff1d(np.arange(len(labels)), heldout)


def load_digits_split(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 (N, 1, 8, 8) in [-1, 1], labels int64 (N,)) of a split, in the dataset's item order."""
    images, labels = _all_digits()
    ids = split_ids(labels, split)
    x = torch.from_numpy(images[ids] / 8.0 - 1.0).float().unsqueeze(1)  # 0..16 -> [-1, 1]
    return x, torch.from_numpy(labels[ids])


def digit_captions(split: str) -> list[str]:
    """Template captions of a split's items: class word or digit, and a style from the item's ink amount."""
    images, labels = _all_digits()
    ink = images.reshape(len(images), -1).mean(1)
    style = np.empty(len(images), dtype=object)
    for c in range(10):  # terciles of ink within each class, over the full set so the splits agree
        members = labels == c
        lo, hi = np.quantile(ink[members], [1 / 3, 2 / 3])
        style[members] = np.where(ink[members] < lo, "thin", np.where(ink[members] > hi, "thick", "neat"))
    ids = split_ids(labels, split)
    return [digit_caption(int(labels[i]), style[i], int(i)) for i in ids]


def _write_split(folder: Path, split: str, captions: bool) -> None:
    x, labels = load_digits_split(split)
    # The "posterior" of a 17-level pixel is its dequantisation interval: uniform over one level (width 2/16 in
    # [-1, 1] units), stored as a Gaussian with the same mean and std. It makes the digits a moments dataset like
    # VAE latents, so fresh latents are drawn every epoch and the `resample` candidate source runs on them.
    views = torch.stack([x, x.flip(-1)], 1)
    tensors = {"mean": views, "std": torch.full_like(views, DEQUANT_STD), "label": labels}
    info = {
        "kind": "text" if captions else "class",
        "split": split,
        "latent_shape": [1, 8, 8],
        "num_classes": 10,
        "class_names": list(DIGIT_WORDS),
        "normalization": {"shift": [0.0], "scale": [1.0]},
        "latent_stats": {"mean": [float(x.mean())], "std": [float(x.std())]},
        "encoder": {"kind": "identity"},
        "source": "sklearn.datasets.load_digits, pixels 0..16 mapped to [-1, 1], dequantisation std per pixel",
    }
    texts = None
    if captions:
        texts = digit_captions(split)
        embedder = BuiltinTextEmbedder(**TEXT_EMBEDDER)
        tokens, mask, pooled = embedder.embed(texts)
        tensors.update(tokens=tokens.half(), mask=mask, pooled=pooled.half())
        info.update(text_encoder=embedder.config, captions=True)
    writer = ShardWriter(folder / split, shard_size=1024)
    writer.add(captions=texts, **tensors)
    writer.close(info)
    add_neighbors(folder / split, k=NEIGHBORS_K)


def builtin_folder(name: str, root: Path | None = None) -> Path:
    """The cache folder of `digits` or `digits-captions`, building it first if needed."""
    if name not in ("digits", "digits-captions"):
        raise DataError(f"unknown built-in dataset {name!r}: choose builtin:digits, builtin:digits-captions or "
                        f"builtin:mnist")
    root = Path(root) if root is not None else cache_dir()
    captions = name == "digits-captions"
    return build_in_cache(root / f"{name}-v{BUILD_VERSION}", SPLITS,
                          lambda tmp: [_write_split(tmp, split, captions=captions) for split in SPLITS])
