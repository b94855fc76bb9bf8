"""`$PAFM_CACHE` (default `~/.cache/pafm`): the built-in datasets, validation memos of read-only datasets, and the
MNIST judge's weights, each built on first use."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from .shards import INDEX, DataError


def cache_dir() -> Path:
    return Path(os.environ.get("PAFM_CACHE") or Path.home() / ".cache" / "pafm")


def build_in_cache(folder: Path, splits, write) -> Path:
    """`folder` with every split's index, built first if needed by `write(tmp)` into a temporary sibling that is
    renamed into place: concurrent ranks can race safely, one rename wins and the others discard theirs."""
    if all((folder / s / INDEX).is_file() for s in splits):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}-build-{uuid.uuid4().hex}"
    try:
        write(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first: keep its folder
            if not all((folder / s / INDEX).is_file() for s in splits):
                raise DataError(f"{folder} exists but is incomplete: delete it and it will be rebuilt") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
