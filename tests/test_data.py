"""Shard format, validation (`pafm.data.validate`), the built-in digits datasets, exact kNN, the text embedder."""
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pafm.data import (BuiltinTextEmbedder, DataError, LatentDataset, ShardWriter, has_split, load_digits_split,
                       open_dataset, text_embedder_from_info, validate_dataset)
from pafm.data.neighbors import knn
from pafm.data.shards import write_shard


def write_moments_dataset(folder, n=10, shard_size=4, shape=(2, 3, 3), seed=0, nan_item=None):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, 2, *shape, generator=g).half()
    std = (0.1 + torch.rand(n, 2, *shape, generator=g)).half()
    if nan_item is not None:
        mean[nan_item, 1, 0, 0, 0] = float("nan")
    labels = torch.arange(n) % 3
    writer = ShardWriter(folder, shard_size=shard_size)
    writer.add(mean=mean[:3], std=std[:3], label=labels[:3])  # uneven batches cross shard boundaries
    writer.add(mean=mean[3:], std=std[3:], label=labels[3:])
    info = {"kind": "class", "latent_shape": list(shape), "num_classes": 3, "class_names": ["a", "b", "c"],
            "normalization": {"shift": [0.0] * shape[0], "scale": [0.5] * shape[0]}, "encoder": {"kind": "test"}}
    writer.close(info)
    return mean, std, labels


def test_roundtrip_and_info(tmp_path):
    mean, std, labels = write_moments_dataset(tmp_path / "d")
    ds = open_dataset(str(tmp_path / "d"))
    assert len(ds) == 10 and len(ds.shards) == 3
    info = ds.info
    assert info["kind"] == "class" and info["latent_shape"] == [2, 3, 3] and info["num_classes"] == 3
    assert info["has_moments"] and info["has_flip"] and info["neighbors_k"] == 0
    assert info["normalization"]["scale"] == [0.5, 0.5] and info["encoder"] == {"kind": "test"}
    ids = np.array([9, 0, 4, 3, 7, 4])
    views = np.array([1, 0, 1, 0, 0, 1])
    assert torch.equal(ds.gather("mean", ids), mean[ids])
    assert torch.equal(ds.gather("std", ids, views), std[ids, views])
    assert torch.equal(ds.gather("label", ids), labels[ids])
    validate_dataset(ds)


def _flip_byte(path, offset_from_end):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fault", ["missing", "truncated", "shape", "dtype", "checksum", "nan"])
def test_validate_names_file_and_item(tmp_path, fault):
    folder = tmp_path / "d"
    write_moments_dataset(folder, nan_item=6 if fault == "nan" else None)
    shard = folder / "shard-00001.safetensors"  # items 4..7
    if fault == "missing":
        shard.unlink()
    elif fault == "truncated":
        shard.write_bytes(shard.read_bytes()[:-7])
    elif fault in ("shape", "dtype"):  # a shard rewritten with other tensors than the index lists
        mean = torch.zeros(4, 2, 2, 3, 4 if fault == "shape" else 3, dtype=torch.float16)
        std = torch.ones(4, 2, 2, 3, 3, dtype=torch.float32 if fault == "dtype" else torch.float16)
        write_shard(shard, {"mean": mean, "std": std, "label": torch.zeros(4, dtype=torch.int64)})
    elif fault == "checksum":
        _flip_byte(shard, 3)
    with pytest.raises(DataError) as err:
        validate_dataset(LatentDataset(folder))
    msg = str(err.value)
    assert "shard-00001.safetensors" in msg
    if fault == "nan":
        assert "item 6" in msg and "NaN" in msg
    if fault == "checksum":
        assert "checksum" in msg
    if fault in ("shape", "dtype"):
        assert "the index says" in msg


def test_bit_level_check_finds_every_non_finite_and_negative_value(tmp_path):
    """The raw-bit check against torch.isfinite / < 0 on every dtype, bad values at random rows and positions."""
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for bad in (float("nan"), float("inf"), -float("inf"), -1e-3):
            x = torch.rand(9, 3, 5, generator=g).to(dtype)
            x[2, 1, 1] = -0.0  # negative zero is no negative std
            row = int(torch.randint(3, 9, (1,), generator=g))
            x[row, int(torch.randint(0, 3, (1,), generator=g)), int(torch.randint(0, 5, (1,), generator=g))] = bad
            folder = tmp_path / f"{str(dtype)[6:]}{bad}"
            writer = ShardWriter(folder, shard_size=4)
            writer.add(latent=x.view(9, 1, 3, 5, 1), std=x.view(9, 1, 3, 5, 1), label=torch.zeros(9, dtype=torch.long))
            writer.close({"kind": "class", "latent_shape": [3, 5, 1], "num_classes": 1, "class_names": None,
                          "normalization": {"shift": [0.0] * 3, "scale": [1.0] * 3}, "encoder": {"kind": "test"}})
            with pytest.raises(DataError) as err:
                validate_dataset(LatentDataset(folder))
            want = "negative 'std'" if bad == -1e-3 else "'latent' holding NaN or Inf"
            assert want in str(err.value) and f"item {row} " in str(err.value), (dtype, bad, str(err.value))


def test_remembered_checks_skip_unchanged_shards_only(tmp_path):
    import os

    folder = tmp_path / "d"
    write_moments_dataset(folder, n=13)  # shards of 4, 4, 4, 1 items
    assert validate_dataset(LatentDataset(folder), remember=True) == [0, 1, 2, 3]
    assert validate_dataset(LatentDataset(folder), remember=True) == []  # a restart reads no shard
    assert validate_dataset(LatentDataset(folder)) == [0, 1, 2, 3]  # the full check ignores what was remembered
    assert validate_dataset(LatentDataset(folder), remember=True, shards=[1, 3]) == []
    # A shard rewritten with the same bytes (new inode and mtime) is checked again, and only it.
    shard = folder / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes())
    assert validate_dataset(LatentDataset(folder), remember=True) == [2]
    # A byte flipped near the end with size and mtime restored: the fingerprint differs, the check runs and fails.
    stat = shard.stat()
    _flip_byte(shard, 3)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DataError, match="shard-00002.safetensors: checksum mismatch"):
        validate_dataset(LatentDataset(folder), remember=True)
    # A remembered check without checksums does not stand in for one with them.
    folder2 = tmp_path / "e"
    write_moments_dataset(folder2, n=8)
    assert validate_dataset(LatentDataset(folder2), checksums=False, remember=True) == [0, 1]
    assert validate_dataset(LatentDataset(folder2), checksums=False, remember=True) == []
    assert validate_dataset(LatentDataset(folder2), checksums=True, remember=True) == [0, 1]
    assert validate_dataset(LatentDataset(folder2), checksums=False, remember=True) == []


def test_a_remembered_check_rereads_the_shard_and_catches_bit_rot_that_keeps_its_metadata(tmp_path):
    import os
    import struct

    from pafm.data.shards import read_header

    folder = tmp_path / "d"
    write_moments_dataset(folder, n=8, shape=(4, 64, 64))  # 512 KiB shards: the middle is far from the probed tail
    assert validate_dataset(LatentDataset(folder), remember=True) == [0, 1]
    shard = folder / "shard-00001.safetensors"
    header, data_start = read_header(shard)
    stat = shard.stat()
    with open(shard, "r+b") as f:  # a NaN in the first item's mean, with the mtime restored below
        f.seek(data_start + header["mean"]["data_offsets"][0] + 2 * 1000)
        f.write(struct.pack("<e", float("nan")))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = shard.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    assert data_start + header["mean"]["data_offsets"][0] + 2000 < stat.st_size - (1 << 16)
    with pytest.raises(DataError, match="shard-00001.safetensors: checksum mismatch"):
        validate_dataset(LatentDataset(folder), remember=True)


def test_remembered_checks_of_a_read_only_folder_go_to_the_cache(tmp_path, monkeypatch):
    import pafm.data.validate as validate

    monkeypatch.setenv("PAFM_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "d"
    write_moments_dataset(folder, n=8)
    # The tests may run as root, who can write into any folder: the folder's writability is what is replaced here.
    monkeypatch.setattr(validate.os, "access", lambda path, mode: Path(path) != folder.resolve())
    assert validate_dataset(LatentDataset(folder), remember=True) == [0, 1]
    assert validate_dataset(LatentDataset(folder), remember=True) == []
    assert len(list((tmp_path / "cache" / "validated").rglob("*.json"))) == 2
    assert not (folder / ".validated").exists()


def test_missing_folder_says_how_to_prepare(tmp_path):
    with pytest.raises(DataError) as err:
        open_dataset(str(tmp_path / "nothing"))
    assert isinstance(err.value, ValueError)
    assert "python -m pafm.prep imagenet" in str(err.value) and "nothing" in str(err.value)


def test_split_folders(tmp_path):
    write_moments_dataset(tmp_path / "multi" / "train")
    write_moments_dataset(tmp_path / "multi" / "val", n=5, seed=1)
    assert len(open_dataset(str(tmp_path / "multi"), "train")) == 10
    assert len(open_dataset(str(tmp_path / "multi"), "val")) == 5
    write_moments_dataset(tmp_path / "single")
    with pytest.raises(DataError, match="heldout"):
        open_dataset(str(tmp_path / "single"), "heldout")
    assert has_split(str(tmp_path / "multi"), "val") and has_split(str(tmp_path / "single"), "train")
    assert not has_split(str(tmp_path / "single"), "heldout") and not has_split(str(tmp_path / "nothing"), "train")


def test_atomic_writes_keep_the_old_file_and_give_plain_permissions(tmp_path):
    from pafm.files import atomic_write, atomic_write_text

    target = atomic_write_text(tmp_path / "a.json", "old")

    def fails_half_way(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fails_half_way)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    # safetensors makes its files private to the owner; a shard gets the permissions of a plain write
    write_shard(tmp_path / "s.safetensors", {"x": torch.zeros(2)})
    assert (tmp_path / "s.safetensors").stat().st_mode & 0o777 == target.stat().st_mode & 0o777


# ------------------------------------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("PAFM_CACHE", str(root))
    yield root
    mp.undo()


def test_digits_splits_values_and_flip(digits_cache):
    from sklearn.datasets import load_digits

    raw = load_digits()
    train, held = open_dataset("builtin:digits"), open_dataset("builtin:digits", "heldout")
    validate_dataset(train)
    validate_dataset(held)
    assert len(train) == 1437 and len(held) == 360  # ceil(20%) held out, as train_test_split counts
    info = train.info
    assert info["kind"] == "class" and info["latent_shape"] == [1, 8, 8] and info["num_classes"] == 10
    assert info["class_names"][7] == "seven" and info["encoder"] == {"kind": "identity"}
    assert info["normalization"] == {"shift": [0.0], "scale": [1.0]} and info["has_flip"] and info["has_moments"]
    assert info["neighbors_k"] >= 8
    # Stratified: every class is held out at 20% (+- rounding).
    counts = np.bincount(raw.target, minlength=10)
    held_labels = held.gather("label", range(len(held))).numpy()
    assert np.all(np.abs(np.bincount(held_labels, minlength=10) - 0.2 * counts) < 1)
    # Each dataset item is one sklearn image mapped linearly to [-1, 1]; the union is all images, disjoint.
    for ds in (train, held):
        x, labels = load_digits_split(ds.info["split"])
        assert x.dtype == torch.float32 and x.shape == (len(ds), 1, 8, 8) and labels.dtype == torch.int64
        assert torch.equal(ds.gather("mean", range(len(ds)), np.zeros(len(ds), int)), x)
        assert torch.equal(ds.gather("mean", range(len(ds)), np.ones(len(ds), int)), x.flip(-1))
        std = ds.gather("std", range(len(ds)), np.zeros(len(ds), int))
        assert ds.info["has_moments"] and torch.allclose(std, torch.full_like(std, 0.125 / 12**0.5))
        assert torch.equal(ds.gather("label", range(len(ds))), labels)
    flat = raw.images.reshape(1797, -1).astype(np.float64) / 8.0 - 1.0
    keys = {tuple(r) + (t,) for r, t in zip(flat, raw.target)}
    seen = [tuple(x.double().flatten().tolist()) + (int(t),) for split in ("train", "heldout")
            for x, t in zip(*load_digits_split(split))]
    assert len(seen) == 1797 and set(seen) == keys
    x_all = torch.cat([load_digits_split(s)[0] for s in ("train", "heldout")])
    assert x_all.min() == -1.0 and x_all.max() == 1.0


def test_digits_neighbors_are_exact_same_class(digits_cache):
    ds = open_dataset("builtin:digits", "heldout")
    ids = np.array(ds.neighbor_ids)
    x, labels = load_digits_split("heldout")
    x = x.double().flatten(1)
    k = ids.shape[1]
    for i in range(0, len(ds), 7):
        same = torch.nonzero(labels == labels[i]).flatten()
        same = same[same != i]
        d = ((x[same] - x[i]) ** 2).sum(1)
        expected = torch.sort(d).values[:k]
        got = ((x[torch.from_numpy(ids[i]).long()] - x[i]) ** 2).sum(1)
        assert torch.all(labels[torch.from_numpy(ids[i]).long()] == labels[i])
        assert torch.allclose(got, expected, rtol=0, atol=1e-9)


def test_digits_captions(digits_cache):
    ds = open_dataset("builtin:digits-captions")
    validate_dataset(ds)
    info = ds.info
    assert info["kind"] == "text" and info["text_dim"] == 32 and info["max_text_len"] == 16 and info["pooled_dim"] == 32
    ids = list(range(0, len(ds), 97))
    captions = ds.captions(ids)
    labels = ds.gather("label", ids)
    words = info["class_names"]
    for c, y in zip(captions, labels.tolist()):
        assert words[y] in c or str(y) in c, c
    embedder = text_embedder_from_info(info)
    tokens, mask, pooled = embedder.embed(captions)
    assert torch.equal(ds.gather("tokens", ids).float(), tokens)
    assert torch.equal(ds.gather("pooled", ids).float(), pooled)
    assert torch.equal(ds.gather("mask", ids), mask)
    assert len(set(ds.captions(range(len(ds))))) > 30  # templates and styles vary


def test_builtin_build_is_race_safe(tmp_path):
    from pafm.data.digits import BUILD_VERSION, builtin_folder

    out, errors = [], []

    def build():
        try:
            out.append(builtin_folder("digits", root=tmp_path))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and out[0] == out[1]
    assert [p.name for p in tmp_path.iterdir()] == [f"digits-v{BUILD_VERSION}"]  # the loser's temporary folder is gone
    validate_dataset(LatentDataset(out[0] / "train"))


def test_unknown_builtin():
    with pytest.raises(DataError, match="builtin:digits"):
        open_dataset("builtin:cifar")


# ------------------------------------------------------------------------------------------------ kNN, text


@pytest.mark.parametrize("chunk", [7, 1000])
def test_knn_matches_float64_brute_force(chunk):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(41, 5, generator=g)
    got = knn(x, 4, chunk=chunk)
    d = torch.cdist(x.double(), x.double())
    d.fill_diagonal_(float("inf"))
    assert torch.equal(got, torch.argsort(d, dim=1)[:, :4])
    with pytest.raises(DataError):
        knn(x[:4], 4)


def test_builtin_text_embedder():
    e = BuiltinTextEmbedder(dim=8, max_len=5, vocab_size=64, seed=1)
    tokens, mask, pooled = e.embed(["the digit 7, written thin", "", "seven"])
    assert tokens.shape == (3, 5, 8) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [5, 0, 1]  # truncated to max_len; empty caption has no tokens
    assert torch.all(tokens[~mask] == 0)
    # Independent float64 recomputation of the pooled vector: mean of the table rows of the hashed words.
    import zlib

    words = ["the", "digit", "7", ",", "written"]
    rows = e.table.double()[[zlib.crc32(w.encode()) % 64 for w in words]]
    assert torch.allclose(pooled[0].double(), rows.mean(0), atol=1e-3)
    again = BuiltinTextEmbedder(dim=8, max_len=5, vocab_size=64, seed=1).embed(["seven"])
    assert torch.equal(again[0][0], tokens[2])
    other = BuiltinTextEmbedder(dim=8, max_len=5, vocab_size=64, seed=2).embed(["seven"])
    assert not torch.equal(other[0][0], tokens[2])
    with pytest.raises(ValueError):
        BuiltinTextEmbedder(dim=7)


def _clustered_dataset(folder, sizes, dim=32, seed=0):
    """One class per entry of `sizes`; items on a few clusters of a 4-dim subspace, plus small noise."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, dim, generator=g)
    parts, labels = [], []
    for c, n in enumerate(sizes):
        centres = 3 * torch.randn(5, 4, generator=g)
        h = centres[torch.randint(0, 5, (n,), generator=g)] + torch.randn(n, 4, generator=g)
        parts.append(h @ w + 0.05 * torch.randn(n, dim, generator=g))
        labels.append(torch.full((n,), c))
    order = torch.randperm(sum(sizes), generator=g)  # classes interleaved across shards
    x, y = torch.cat(parts)[order], torch.cat(labels)[order]
    writer = ShardWriter(folder, shard_size=128)
    writer.add(latent=x.view(len(x), 1, dim // 4, 2, 2), label=y)
    writer.close({"kind": "class", "latent_shape": [dim // 4, 2, 2], "num_classes": len(sizes), "class_names": None,
                  "normalization": {"shift": [0.0] * (dim // 4), "scale": [1.0] * (dim // 4)},
                  "encoder": {"kind": "test"}})
    return x.double(), y


def test_recall_at_k_counts_exact_neighbours_found(tmp_path):
    from pafm.data.neighbors import recall_at_k

    x, _ = _clustered_dataset(tmp_path / "d", [300])
    ds = LatentDataset(tmp_path / "d")
    members = np.arange(300)
    exact = knn(x, 4).numpy()
    assert recall_at_k(ds, members, exact, 4, sample=50) == (1.0, 50)
    half = exact.copy()
    half[:, 2:] = (np.arange(300)[:, None] + 150) % 300  # one wrong id, twice: not among the exact four
    half[:, 3] = (np.arange(300) + 151) % 300
    wrong = [len(set(exact[i]) & set(half[i])) for i in range(300)]
    got, _ = recall_at_k(ds, members, half, 4, sample=300)
    assert got == pytest.approx(np.mean(wrong) / 4)


def test_large_groups_use_faiss_small_ones_exact(tmp_path, capsys, monkeypatch):
    import pafm.data.neighbors as neighbors
    from pafm.prep import main

    monkeypatch.setattr(neighbors, "PCA_DIM", 8)  # 32 dims reduced to 8, as 4096 to 256 at scale

    x, y = _clustered_dataset(tmp_path / "d", [900, 60])
    entry = neighbors.add_neighbors(tmp_path / "d", k=5, exact_max=100, recall_sample=200)
    search = entry["search"]
    assert search["exact_groups"] == 1 and search["faiss_groups"] == 1 and search["faiss_items"] == 900
    assert search["index"].startswith("PCA8,IVF120,SQfp16") and search["recall_queries"] == 200
    ds = LatentDataset(tmp_path / "d")
    validate_dataset(ds)
    ids = torch.from_numpy(np.array(ds.neighbor_ids)).long()
    assert torch.all(y[ids] == y[:, None]) and not torch.any(ids == torch.arange(len(y))[:, None])
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    d[y[:, None] != y[None, :]] = float("inf")
    exact = torch.argsort(d, dim=1)[:, :5]
    small = torch.nonzero(y == 1).flatten()
    assert torch.equal(ids[small], exact[small])  # the small class: exact search
    big = torch.nonzero(y == 0).flatten()
    recall = np.mean([len(set(ids[i].tolist()) & set(exact[i].tolist())) / 5 for i in big.tolist()])
    assert recall > 0.9 and abs(recall - search["recall_at_k"]) < 0.05  # the sampled recall describes the whole
    assert main(["inspect", str(tmp_path / "d")]) == 0
    assert f"recall@5 {search['recall_at_k']:.4f} against exact search on 200 queries" in capsys.readouterr().out
