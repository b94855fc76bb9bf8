"""Latent datasets: shard format, the loader, the built-in digits datasets, text embedders.

    dataset = open_dataset("builtin:mnist")             # or a prepared folder (see `python -m pafm.prep`)
    validate_dataset(dataset)                            # checksums, NaN/Inf, ranges
    loader = LatentLoader(dataset, batch_size=64, rank=0, world_size=1, seed=0)
    batch = next(loader)                                 # dict of CPU tensors; loader.state_dict() to resume
"""
from __future__ import annotations

import json
from pathlib import Path

from . import digits, mnist
from .digits import load_digits_split
from .loader import LatentLoader
from .mnist import load_mnist_split
from .normalization import LatentNormalization
from .shards import INDEX, DataError, LatentDataset, ShardWriter, prepare_hint
from .text import BuiltinTextEmbedder, TransformersTextEmbedder, text_embedder_from_info
from .validate import validate_dataset

__all__ = ["open_dataset", "has_split", "LatentDataset", "LatentLoader", "LatentNormalization", "DataError",
           "ShardWriter", "load_digits_split", "load_mnist_split", "BuiltinTextEmbedder", "TransformersTextEmbedder",
           "text_embedder_from_info", "validate_dataset"]


def _split_folder(spec: str, split: str = "train") -> Path:
    """The folder holding `split` of the dataset `spec` (built first for `builtin:` datasets); DataError saying how
    to prepare it where there is none.

    A folder either holds `index.json` itself (one split, recorded in the index) or one subfolder per split
    (`FOLDER/<split>/index.json`).
    """
    spec = str(spec)
    if spec.startswith("builtin:"):
        name = spec[len("builtin:"):]
        module = mnist if name == "mnist" else digits
        if split not in module.SPLITS:
            raise DataError(f"{spec} has splits {list(module.SPLITS)}, not {split!r}")
        return (mnist.builtin_folder() if name == "mnist" else digits.builtin_folder(name)) / split
    folder = Path(spec).expanduser()
    if (folder / split / INDEX).is_file():
        return folder / split
    if (folder / INDEX).is_file():
        try:
            stored = json.loads((folder / INDEX).read_text()).get("split", "train")
        except (ValueError, AttributeError) as err:
            raise DataError(f"{folder / INDEX} is not a valid index ({err})") from None
        if stored != split:
            raise DataError(f"{folder} holds the split {stored!r}; there is no {folder / split / INDEX} for split "
                            f"{split!r}")
        return folder
    if not folder.exists():
        raise DataError(f"dataset folder {folder} does not exist: {prepare_hint(folder)}")
    raise DataError(f"{folder} has neither {INDEX} nor {split}/{INDEX}: {prepare_hint(folder)}")


def open_dataset(spec: str, split: str = "train") -> LatentDataset:
    """Open a dataset: a prepared folder, or `builtin:digits` / `builtin:digits-captions` / `builtin:mnist` (built on
    first use)."""
    return LatentDataset(_split_folder(spec, split))


def has_split(spec: str, split: str) -> bool:
    try:
        _split_folder(spec, split)
    except (DataError, OSError):
        return False
    return True
