"""Latent shards: safetensors files plus one `index.json` per dataset folder.

Layout of a dataset folder:

    index.json                 format, version, kind, shapes, dtypes, normalisation, encoder, shard list
    shard-00000.safetensors    per-item tensors, leading dim = items in the shard
    neighbors.safetensors      optional: `ids` (N, k) int32, same-class nearest neighbours, nearest first

Per-item tensors (V = 2 views when a horizontally flipped copy is stored, view 1 being the flipped one, else V = 1):

    mean, std  (n, V, C, H, W)   the VAE posterior, when `has_moments`;  or
    latent     (n, V, C, H, W)   plain latents
    label      (n,) int64        class datasets (optional on text datasets)
    tokens     (n, L, D) fp16/bf16,  mask (n, L) bool,  pooled (n, D_pool)          text datasets
    caption_bytes (total,) uint8 + caption_offsets (n + 1,) int64                    captions, UTF-8

Reads are memory-mapped (the safetensors header is parsed here and each tensor mapped with numpy), so a batch costs
one fancy-indexing gather per shard and no file is held in memory.  The full check of a folder's contents
(checksums, NaN/Inf, ranges) is `pafm.data.validate`.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pafm.files import atomic_write, atomic_write_text

FORMAT = "pafm-latents"
VERSION = 1
INDEX = "index.json"
NEIGHBORS = "neighbors.safetensors"
CAPTION_TENSORS = ("caption_bytes", "caption_offsets")

# safetensors dtype names -> numpy storage dtype (bf16 has no numpy type: mapped as raw 16-bit words).
_NP_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
              "I32": np.int32, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


class DataError(ValueError):
    """A dataset that is missing, malformed or corrupt; the message names the file and, where known, the item."""


def prepare_hint(folder) -> str:
    return (f"prepare it with `python -m pafm.prep imagenet IMAGE_FOLDER {folder} --vae VAE_PATH` (class folders) "
            f"or `python -m pafm.prep captions SOURCE {folder} --vae VAE_PATH --text-encoder PATH` (image/caption "
            f"pairs), or use `builtin:digits` / `builtin:digits-captions`")


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------- writing


def encode_captions(captions: list[str]) -> dict[str, torch.Tensor]:
    """UTF-8 bytes of all captions back to back, and n + 1 offsets into them."""
    blobs = [c.encode("utf-8") for c in captions]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8).copy()
    return {"caption_bytes": torch.from_numpy(data), "caption_offsets": torch.from_numpy(offsets)}


def write_shard(path, tensors: dict[str, torch.Tensor], captions: list[str] | None = None) -> dict:
    """Write one shard atomically (temporary name, then rename); return its index record."""
    path = Path(path)
    lengths = {name: t.shape[0] for name, t in tensors.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{path.name}: tensors disagree on the number of items: {lengths}")
    n = next(iter(lengths.values()))
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if captions is not None:
        if len(captions) != n:
            raise ValueError(f"{path.name}: {len(captions)} captions for {n} items")
        tensors.update(encode_captions(captions))
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    return {"file": path.name, "num_items": int(n), "sha256": sha256_file(path)}


def tensor_specs(tensors: dict[str, torch.Tensor]) -> dict:
    """Per-item shape and dtype of each tensor (captions are variable-length and not listed)."""
    return {k: {"dtype": _ST_NAMES[v.dtype], "shape": list(v.shape[1:])}
            for k, v in tensors.items() if k not in CAPTION_TENSORS}


def write_index(folder, info: dict, shards: list[dict], tensors: dict) -> dict:
    """Write `index.json` for `shards` (records from `write_shard`); `info` holds the dataset description."""
    index = {"format": FORMAT, "version": VERSION, **info, "num_items": int(sum(s["num_items"] for s in shards)),
             "tensors": tensors, "shards": shards}
    atomic_write_text(Path(folder) / INDEX, json.dumps(index, indent=1))
    return index


class ShardWriter:
    """Accumulate items and write shards of `shard_size` items; `close(info)` writes the index.

    `add(captions=None, **tensors)` takes a batch of items (leading dim n). Used by the built-in datasets and tests;
    the multi-process prep tools call `write_shard` / `write_index` directly.
    """

    def __init__(self, folder, shard_size: int = 4096):
        if shard_size < 1:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.shards: list[dict] = []
        self.specs: dict | None = None
        self._pending: list[dict] = []
        self._captions: list[str] | None = None  # a list once the first batch brought captions
        self._count = 0
        self._batches = 0

    def add(self, captions: list[str] | None = None, **tensors: torch.Tensor) -> None:
        if self._batches and (captions is None) != (self._captions is None):
            raise ValueError("either every batch or no batch has captions")
        if not self._batches and captions is not None:
            self._captions = []
        self._batches += 1
        self._pending.append(tensors)
        self._count += next(iter(tensors.values())).shape[0]
        if captions is not None:
            self._captions.extend(captions)
        while self._count >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        names = self._pending[0].keys()
        merged = {k: torch.cat([p[k] for p in self._pending]) for k in names}
        take = {k: v[:n] for k, v in merged.items()}
        rest = {k: v[n:] for k, v in merged.items()}
        captions = None
        if self._captions is not None:
            captions, self._captions = self._captions[:n], self._captions[n:]
        specs = tensor_specs(take)
        if self.specs is None:
            self.specs = specs
        elif specs != self.specs:
            raise ValueError(f"shard {len(self.shards)}: tensors {specs} differ from the first shard's {self.specs}")
        path = self.folder / f"shard-{len(self.shards):05d}.safetensors"
        self.shards.append(write_shard(path, take, captions))
        self._count -= n
        self._pending = [rest] if self._count else []

    def close(self, info: dict) -> dict:
        if self._count:
            self._flush(self._count)
        if not self.shards:
            raise ValueError("no items were added")
        return write_index(self.folder, info, self.shards, self.specs)


# ---------------------------------------------------------------------------------------------------------- reading


def read_header(path) -> tuple[dict, int]:
    """(tensor table, byte offset of the data section) of a safetensors file; DataError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard file {path} is missing")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header length exceeds file size")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise DataError(f"shard file {path} is truncated or not a safetensors file ({err})") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise DataError(f"shard file {path} is truncated: {size} bytes, its header needs {8 + n + end}")
    return header, 8 + n


class Shard:
    """One shard file, its tensors memory-mapped on first use (never pickled: workers map their own)."""

    def __init__(self, path, num_items: int):
        self.path = Path(path)
        self.num_items = num_items
        self._maps: dict[str, np.ndarray] | None = None
        self.header, self.data_start = read_header(self.path)

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}

    def array(self, name: str) -> np.ndarray:
        if self._maps is None:
            self._maps = {}
        if name not in self._maps:
            t = self.header[name]
            begin, end = t["data_offsets"]
            shape = tuple(t["shape"])
            if math.prod(shape) == 0:
                self._maps[name] = np.zeros(shape, dtype=_NP_DTYPES[t["dtype"]])
            else:
                self._maps[name] = np.memmap(self.path, dtype=_NP_DTYPES[t["dtype"]], mode="r",
                                             offset=self.data_start + begin, shape=shape)
        return self._maps[name]

    def unmap(self) -> None:
        """Map afresh at the next read: the file may have been replaced since it was mapped."""
        self._maps = None


def to_torch(array: np.ndarray, st_dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.view(torch.bfloat16) if st_dtype == "BF16" else t


class LatentDataset:
    """A prepared dataset folder: `info`, `len()`, memory-mapped `gather`, `captions`, `neighbor_ids`; its contents
    are checked by `pafm.data.validate.validate_dataset`."""

    def __init__(self, folder):
        self.folder = Path(folder)
        path = self.folder / INDEX
        if not path.is_file():
            what = "does not exist" if not self.folder.exists() else f"has no {INDEX}"
            raise DataError(f"dataset folder {self.folder} {what}: {prepare_hint(self.folder)}")
        try:
            index = json.loads(path.read_text())
        except ValueError as err:
            raise DataError(f"{path} is not valid JSON ({err})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise DataError(f"{path} is not a {FORMAT} index (format {index.get('format')!r})")
        if index.get("version") != VERSION:
            raise DataError(f"{path} has format version {index.get('version')}, this code reads version {VERSION}")
        for key in ("kind", "latent_shape", "normalization", "encoder", "tensors", "shards", "num_items"):
            if key not in index:
                raise DataError(f"{path} lacks the key {key!r}")
        self.index = index
        self.shards = [Shard(self.folder / s["file"], int(s["num_items"])) for s in index["shards"]]
        counts = [s.num_items for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if int(self.starts[-1]) != index["num_items"]:
            raise DataError(f"{path}: shards hold {int(self.starts[-1])} items, the index says {index['num_items']}")
        self._neighbors: np.ndarray | None = None
        self.check_headers()
        self.info = self._info()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __repr__(self) -> str:
        return f"LatentDataset({str(self.folder)!r}, kind={self.info['kind']}, items={len(self)})"

    def _info(self) -> dict:
        index, tensors = self.index, self.index["tensors"]
        image = "mean" if "mean" in tensors else "latent"
        if image not in tensors:
            raise DataError(f"{self.folder / INDEX}: lists neither 'mean'/'std' nor 'latent' tensors")
        info = {k: v for k, v in index.items() if k not in ("format", "version", "tensors", "shards")}
        info["has_moments"] = image == "mean"
        info["has_flip"] = tensors[image]["shape"][0] == 2
        info["has_labels"] = "label" in tensors
        info["neighbors_k"] = int(index["neighbors"]["k"]) if index.get("neighbors") else 0
        info.setdefault("class_names", None)
        if info["has_labels"]:
            info.setdefault("num_classes", len(info["class_names"] or []))
        if list(tensors[image]["shape"][1:]) != list(index["latent_shape"]):
            raise DataError(f"{self.folder / INDEX}: latent_shape {index['latent_shape']} disagrees with the "
                            f"{image!r} tensor's item shape {tensors[image]['shape']}")
        if index["kind"] == "text":
            for name in ("tokens", "mask", "pooled"):
                if name not in tensors:
                    raise DataError(f"{self.folder / INDEX}: text dataset without a {name!r} tensor")
            info["max_text_len"], info["text_dim"] = tensors["tokens"]["shape"]
            info["pooled_dim"] = tensors["pooled"]["shape"][0]
        elif index["kind"] == "class":
            if not info["has_labels"]:
                raise DataError(f"{self.folder / INDEX}: class dataset without a 'label' tensor")
        else:
            raise DataError(f"{self.folder / INDEX}: kind must be 'class' or 'text', got {index['kind']!r}")
        return info

    def check_headers(self) -> None:
        """Every shard's header read again and compared with the index: shapes, dtypes, the tensors listed."""
        specs = self.index["tensors"]
        captions = self.index.get("captions", False)
        for shard in self.shards:
            shard.header, shard.data_start = read_header(shard.path)
            names = set(specs) | (set(CAPTION_TENSORS) if captions else set())
            missing = names - set(shard.header)
            if missing:
                raise DataError(f"{shard.path}: lacks the tensors {sorted(missing)} listed in the index")
            for name, spec in specs.items():
                got = shard.header[name]
                want = [shard.num_items, *spec["shape"]]
                if got["shape"] != want or got["dtype"] != spec["dtype"]:
                    raise DataError(f"{shard.path}: tensor {name!r} is {got['dtype']}{got['shape']}, the index "
                                    f"says {spec['dtype']}{want}")
            if captions and shard.header["caption_offsets"]["shape"] != [shard.num_items + 1]:
                raise DataError(f"{shard.path}: caption_offsets has shape {shard.header['caption_offsets']['shape']},"
                                f" expected [{shard.num_items + 1}]")

    def locate(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """(shard number, row within the shard) of each item id."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"item ids must lie in [0, {len(self)}), got {ids.min()}..{ids.max()}")
        shard = np.searchsorted(self.starts, ids, side="right") - 1
        return shard, ids - self.starts[shard]

    def gather(self, name: str, ids, views=None) -> torch.Tensor:
        """Rows `ids` of the per-item tensor `name`, in the stored dtype; `views` picks view v[i] of row i."""
        spec = self.index["tensors"][name]
        shard, row = self.locate(ids)
        shape = spec["shape"][1:] if views is not None else spec["shape"]
        out = np.empty((len(row), *shape), dtype=_NP_DTYPES[spec["dtype"]])
        if views is not None:
            views = np.asarray(views, dtype=np.int64)
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            array = self.shards[s].array(name)
            out[sel] = array[row[sel]] if views is None else array[row[sel], views[sel]]
        return to_torch(out, spec["dtype"])

    def captions(self, ids) -> list[str]:
        if not self.index.get("captions"):
            raise DataError(f"{self.folder} stores no captions")
        shard, row = self.locate(ids)
        out = []
        for s, r in zip(shard.tolist(), row.tolist()):
            offsets = self.shards[s].array("caption_offsets")
            data = self.shards[s].array("caption_bytes")
            out.append(bytes(data[offsets[r]:offsets[r + 1]]).decode("utf-8"))
        return out

    @property
    def neighbor_ids(self) -> np.ndarray:
        """(N, k) int32 ids of each item's nearest same-class neighbours, nearest first."""
        if not self.index.get("neighbors"):
            raise DataError(f"{self.folder} has no precomputed neighbours: run `python -m pafm.prep neighbors "
                            f"{self.folder}`")
        if self._neighbors is None:
            shard = Shard(self.folder / self.index["neighbors"]["file"], len(self))
            self._neighbors = shard.array("ids")
        return self._neighbors

    def unmap_neighbors(self) -> None:
        """Map the neighbour file afresh at the next read (it may have been replaced)."""
        self._neighbors = None

    def __getstate__(self):
        return {**self.__dict__, "_neighbors": None}
