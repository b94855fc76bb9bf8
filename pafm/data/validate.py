"""The full check of a dataset folder's contents, and the memo that lets a restart skip shards checked before.

`validate_dataset` reads each shard once (`scan_shard`): sha256 against the index, NaN/Inf on the raw exponent bits of
every float tensor, negative `std`, label range, caption offsets; then the neighbour file.  Reading a dataset
(`pafm.data.shards`) checks only what opening it needs: the index and every shard header.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pafm.files import atomic_write_text

from .cache import cache_dir
from .shards import DataError, LatentDataset, read_header, sha256_file, to_torch

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

# The exponent bits of each float dtype: all set means Inf or NaN.  Checked on the raw bits, a block at a time, so
# the check runs at memory speed and releases the GIL (numpy), letting threads check shards side by side.
_EXPONENT_BITS = {"F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80), "F32": (np.uint32, 0x7F800000),
                  "F64": (np.uint64, 0x7FF0000000000000)}
MEMO_VERSION = 2  # records hold the CRC-32 of the bytes checked; a record of another version is not trusted
MEMO_FOLDER = ".validated"  # per-shard records of passed checks, inside the dataset folder when it is writable
_READ_BLOCK = 1 << 23  # bytes per read: 8 MiB, a multiple of every element size


def _bad_elements(block: np.ndarray, exponent, negative: bool) -> np.ndarray:
    bad = (block & exponent) == exponent
    if negative:  # the sign bit and a non-zero magnitude: below zero (-0.0 is allowed)
        bad |= block > (block.dtype.type(1) << block.dtype.type(8 * block.dtype.itemsize - 1))
    return bad


def _suspect(words: np.ndarray, exponent, negative: bool, scratch: np.ndarray) -> bool:
    """Whether a block may hold a bad value, from one max-reduction: a magnitude with all exponent bits set is Inf
    or NaN; with `negative`, any word with the sign bit set (>= the exponent mask too) is suspect as well (-0.0
    included, so a suspect block is then checked element by element)."""
    if negative:
        return bool(words.max() >= exponent)
    magnitude = ~(words.dtype.type(1) << words.dtype.type(8 * words.itemsize - 1))
    return bool(np.bitwise_and(words, magnitude, out=scratch[:len(words)]).max() >= exponent)


def scan_shard(path, header: dict, data_start: int, floats: dict[str, bool], checksum: bool):
    """One sequential read of a shard: (sha256 of the whole file or None, CRC-32 of the whole file, {name: first bad
    row or None}).

    `floats` maps each float tensor to check to whether a negative value is bad too (std); a bad row holds a NaN or
    Inf (or a negative value).  The file is read with plain reads into one reused buffer (no memory map, so no page
    fault per 4 KiB), each block hashed and its float elements checked on their raw bits; the checks release the GIL,
    so threads scan shards side by side.  Tensors not listed are only hashed.  The CRC-32 (a few times cheaper than
    the sha256) is what a remembered check compares at later launches.
    """
    digest = hashlib.sha256() if checksum else None
    crc = 0
    regions = sorted((header[name]["data_offsets"][0] + data_start, header[name]["data_offsets"][1] + data_start,
                      name) for name in header)
    first_bad: dict[str, int | None] = {name: None for name in floats}
    buffer = bytearray(_READ_BLOCK)
    view = memoryview(buffer)
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        pos = 0

        def read_to(stop: int, name: str | None):
            nonlocal pos, crc
            check = name in floats and first_bad[name] is None
            if check:
                uint, exponent = _EXPONENT_BITS[header[name]["dtype"]]
                exponent = uint(exponent)
                scratch = np.empty(_READ_BLOCK // np.dtype(uint).itemsize, dtype=uint)
                per_row = math.prod(header[name]["shape"][1:]) or 1
                begin = pos
            while pos < stop:
                n = f.readinto(view[:min(_READ_BLOCK, stop - pos)])
                if not n:
                    raise DataError(f"shard file {path} is truncated: it ended at byte {pos}")
                if digest:
                    digest.update(view[:n])
                crc = zlib.crc32(view[:n], crc)
                if check and first_bad[name] is None:
                    words = np.frombuffer(buffer, dtype=uint, count=n // np.dtype(uint).itemsize)
                    if _suspect(words, exponent, floats[name], scratch):
                        bad = _bad_elements(words, exponent, floats[name])
                        if bad.any():
                            first_bad[name] = ((pos - begin) // words.itemsize + int(np.argmax(bad))) // per_row
                pos += n

        read_to(data_start, None)
        for begin, end, name in regions:
            read_to(begin, None)  # safetensors leaves no gap; hashed if a writer did
            read_to(end, name)
        read_to(size, None)
    return (digest.hexdigest() if digest else None), crc, first_bad


def file_crc32(path, block: int = _READ_BLOCK) -> int:
    """CRC-32 of a whole file, read in blocks (zlib releases the GIL: threads hash files side by side)."""
    crc = 0
    buffer = bytearray(block)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
    return crc


def _file_probe(path: Path, size: int, data_start: int, tail: int = 1 << 16) -> str:
    """sha256 of a shard's header and last 64 KiB: a cheap fingerprint that a remembered check also compares."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(data_start))
        f.seek(max(data_start, size - tail))
        h.update(f.read())
    return h.hexdigest()


def validate_dataset(dataset: LatentDataset, checksums: bool = True, remember: bool = False, shards=None,
                     neighbors: bool = True, threads: int | None = None) -> list[int]:
    """Full check: files, shapes and dtypes, checksums, NaN/Inf, std sign, label and neighbour ranges, captions.

    Raises DataError naming the file and item (the lowest-numbered failing shard). `shards`: the shard numbers
    to check (default all; the trainer gives each rank its share), on `threads` threads (default: one per core,
    up to 8). `neighbors`: also check the neighbour file. `remember`: skip shards whose check passed before and
    that look unchanged since (same size, mtime, inode, header and last 64 KiB, and the same index record) and
    whose bytes are: each such shard is read again for its CRC-32, which catches a change anywhere in the file
    that keeps its metadata (bit rot); and remember each shard that passes now; a full check (`pafm.prep
    inspect`) leaves it False. Returns the numbers of the shards checked now.
    """
    dataset.check_headers()
    shards = range(len(dataset.shards)) if shards is None else shards
    memo = ValidationMemo(dataset) if remember else None

    def check(s: int):
        record = memo.record(s, checksums) if memo else None  # taken before the check: a later change shows
        if memo and memo.passed(s, record):
            return None
        try:
            crc = check_shard(dataset, s, checksums)
        except DataError as err:
            return err
        if memo:
            memo.remember(s, {**record, "crc32": crc})
        return s

    shards = list(shards)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, min(len(shards), threads or min(8, cores)))
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(check, shards))
    errors = [r for r in results if isinstance(r, DataError)]
    if errors:
        raise errors[0]
    if neighbors and dataset.index.get("neighbors"):
        check_neighbors(dataset, checksums)
    return [r for r in results if r is not None]


def check_shard(dataset: LatentDataset, s: int, checksums: bool = True) -> int:
    """The full check of shard number `s`; DataError naming the file and item.  Returns the CRC-32 of the bytes
    checked."""
    shard, record = dataset.shards[s], dataset.index["shards"][s]
    specs = dataset.index["tensors"]
    num_classes = dataset.info.get("num_classes")
    first = int(dataset.starts[s])
    floats = {name: name == "std" for name, spec in specs.items() if spec["dtype"] in FLOAT_DTYPES}
    digest, crc, first_bad = scan_shard(shard.path, shard.header, shard.data_start, floats, checksums)
    if checksums and digest != record["sha256"]:
        raise DataError(f"{shard.path}: checksum mismatch (file changed or corrupt after it was written)")
    shard.unmap()
    for name, spec in specs.items():
        array = shard.array(name)
        row = first_bad.get(name)
        if row is not None:
            finite = bool(torch.isfinite(to_torch(np.array(array[row]), spec["dtype"]).float()).all())
            what = f"negative {name!r}" if finite else f"tensor {name!r} holding NaN or Inf"
            raise DataError(f"{shard.path}: {what} at item {first + row} (row {row} of the shard)")
        if name == "label" and len(array) and num_classes is not None:
            bad = np.nonzero((array < 0) | (array >= num_classes))[0]
            if bad.size:
                raise DataError(f"{shard.path}: label {int(array[bad[0]])} of item {first + int(bad[0])} is "
                                f"outside [0, {num_classes})")
    if dataset.index.get("captions"):
        offsets = np.asarray(shard.array("caption_offsets"))
        size = shard.header["caption_bytes"]["shape"][0]
        if offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] != size:
            raise DataError(f"{shard.path}: caption offsets are not a monotone cover of {size} bytes")
    return crc


def check_neighbors(dataset: LatentDataset, checksums: bool = True) -> None:
    """The neighbour file: shape, checksum, ids in range and never the item itself."""
    meta = dataset.index["neighbors"]
    path = dataset.folder / meta["file"]
    header, _ = read_header(path)
    if header.get("ids", {}).get("shape") != [len(dataset), meta["k"]]:
        raise DataError(f"{path}: 'ids' should be int32 [{len(dataset)}, {meta['k']}], got {header.get('ids')}")
    if checksums and sha256_file(path) != meta["sha256"]:
        raise DataError(f"{path}: checksum mismatch")
    dataset.unmap_neighbors()
    ids = np.asarray(dataset.neighbor_ids)
    n = len(dataset)
    bad = np.nonzero(((ids < 0) | (ids >= n)).any(1) | (ids == np.arange(n)[:, None]).any(1))[0]
    if bad.size:
        raise DataError(f"{path}: neighbours of item {int(bad[0])} are out of range or include the item")


class ValidationMemo:
    """Per-shard records of checks that passed: `FOLDER/.validated/<shard>.json`, or under `$PAFM_CACHE` when the
    dataset folder is read-only.  One file per shard, written atomically, so ranks (and concurrent runs) checking
    different or the same shards never see a torn record.  A record names what the check was made against (the
    index's record of the shard and its tensor specs) and what the file looked like before it was read."""

    def __init__(self, dataset: LatentDataset):
        self.dataset = dataset
        folder = dataset.folder.resolve()
        if os.access(folder, os.W_OK):
            self.folder = folder / MEMO_FOLDER
        else:
            self.folder = cache_dir() / "validated" / hashlib.sha256(str(folder).encode()).hexdigest()[:16]
        index = dataset.index
        self.context = {"tensors": index["tensors"], "captions": bool(index.get("captions")),
                        "num_classes": dataset.info.get("num_classes")}

    def path(self, s: int) -> Path:
        return self.folder / f"{self.dataset.shards[s].path.name}.json"

    def record(self, s: int, checksums: bool) -> dict:
        shard = self.dataset.shards[s]
        stat = shard.path.stat()
        verified = json.dumps({**self.context, "shard": self.dataset.index["shards"][s]}, sort_keys=True)
        return {"version": MEMO_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino,
                "probe": _file_probe(shard.path, stat.st_size, shard.data_start),
                "verified": hashlib.sha256(verified.encode()).hexdigest(), "checksums": checksums}

    def passed(self, s: int, record: dict) -> bool:
        try:
            stored = json.loads(self.path(s).read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(stored, dict):
            return False
        same = all(stored.get(k) == v for k, v in record.items() if k != "checksums")
        return (same and (stored.get("checksums") is True or not record["checksums"])
                and stored.get("crc32") == file_crc32(self.dataset.shards[s].path))

    def remember(self, s: int, record: dict) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path(s), json.dumps(record))
        except OSError:  # nowhere to write: the next start checks the shard again
            pass
