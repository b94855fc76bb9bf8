"""Shard format, validation, the built-in digits datasets, exact kNN, the built-in text embedder."""
import threading

import numpy as np
import pytest
import torch

from pafm.data import (BuiltinTextEmbedder, DataError, LatentDataset, ShardWriter, has_split, load_digits_split,
                       open_dataset, text_embedder_from_info)
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
    ds.validate()


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
        LatentDataset(folder).validate()
    msg = str(err.value)
    assert "shard-00001.safetensors" in msg
    if fault == "nan":
        assert "item 6" in msg and "NaN" in msg
    if fault == "checksum":
        assert "checksum" in msg
    if fault in ("shape", "dtype"):
        assert "the index says" in msg


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
    train.validate()
    held.validate()
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
    ds.validate()
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
    LatentDataset(out[0] / "train").validate()


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
