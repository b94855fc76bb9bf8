"""Latent datasets: shard format, the loader, the built-in digits datasets.

    dataset = open_dataset("builtin:digits")            # or a prepared folder (see `python -m pafm.prep`)
    dataset.validate()
    loader = LatentLoader(dataset, batch_size=64, rank=0, world_size=1, seed=0)
    batch = next(loader)                                 # dict of CPU tensors; loader.state_dict() to resume
"""
from __future__ import annotations

from pathlib import Path

from .digits import load_digits_split
from .loader import LatentLoader
from .shards import INDEX, DataError, LatentDataset, ShardWriter, prepare_hint
from .text import BuiltinTextEmbedder, text_embedder_from_info

__all__ = ["open_dataset", "LatentDataset", "LatentLoader", "DataError", "ShardWriter", "load_digits_split",
           "BuiltinTextEmbedder", "text_embedder_from_info"]


def open_dataset(spec: str, split: str = "train") -> LatentDataset:
    """Open a dataset: a prepared folder, or `builtin:digits` / `builtin:digits-captions` (built on first use).

    A folder either holds `index.json` itself (one split) or one subfolder per split (`FOLDER/<split>/index.json`).
    """
    spec = str(spec)
    if spec.startswith("builtin:"):
        from .digits import SPLITS, builtin_folder

        if split not in SPLITS:
            raise DataError(f"{spec} has splits {list(SPLITS)}, not {split!r}")
        return LatentDataset(builtin_folder(spec[len("builtin:"):]) / split)
    folder = Path(spec).expanduser()
    if (folder / split / INDEX).is_file():
        return LatentDataset(folder / split)
    if (folder / INDEX).is_file():
        dataset = LatentDataset(folder)
        stored = dataset.info.get("split", "train")
        if stored != split:
            raise DataError(f"{folder} holds the split {stored!r}; there is no {folder / split / INDEX} for split "
                            f"{split!r}")
        return dataset
    if not folder.exists():
        raise DataError(f"dataset folder {folder} does not exist: {prepare_hint(folder)}")
    raise DataError(f"{folder} has neither {INDEX} nor {split}/{INDEX}: {prepare_hint(folder)}")
