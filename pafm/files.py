"""Files the tools write and read: atomic writes, and which files count as images."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

# Every folder of images the tools read (prep's inputs, FID reference folders) is read with this one list.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".jpe", ".tif", ".tiff")


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def image_files(folder: Path) -> list[Path]:
    """The image files below `folder`, at any depth, sorted."""
    return sorted(p for p in Path(folder).rglob("*") if is_image(p))


def atomic_write(path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` writes a temporary file beside `path`, which is then renamed onto it: a reader, or a run killed
    half-way, sees the old file or the new one, never a part.  The file gets the permissions of a plain write
    (umask), whatever the writer chose (safetensors makes its files private to the owner; datasets, exports and
    reports are usually shared)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.touch(exist_ok=False)
        mode = tmp.stat().st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_savez(path, **arrays) -> Path:
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: given a name, numpy would append ".npz" to it
            np.savez(f, **arrays)

    return atomic_write(path, write)
