"""LatentLoader: rank split, determinism, resume (with workers), posterior sampling, flips, neighbours, text."""
import numpy as np
import pytest
import torch

from pafm.data import BuiltinTextEmbedder, DataError, LatentLoader, ShardWriter, load_digits_split, open_dataset
from pafm.data.digits import TEXT_EMBEDDER
from pafm.data.loader import flip_views, posterior_noise
from pafm.data.neighbors import add_neighbors

SHIFT, SCALE = [0.25, -0.5], [0.5, 2.0]


@pytest.fixture(scope="module")
def moments_ds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("moments")
    g = torch.Generator().manual_seed(0)
    n = 37
    mean = torch.randn(n, 2, 2, 4, 4, generator=g).half()
    std = (0.05 + 0.2 * torch.rand(n, 2, 2, 4, 4, generator=g)).half()
    writer = ShardWriter(folder, shard_size=10)
    writer.add(mean=mean, std=std, label=torch.arange(n) % 3)
    writer.close({"kind": "class", "latent_shape": [2, 4, 4], "num_classes": 3, "class_names": ["a", "b", "c"],
                  "normalization": {"shift": SHIFT, "scale": SCALE}, "encoder": {"kind": "test"}})
    add_neighbors(folder, k=3, chunk=5)
    return open_dataset(str(folder))


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_ranks_disjoint_equal_and_deterministic(moments_ds):
    world, bs = 3, 4
    per_epoch = len(moments_ds) // (world * bs)
    assert per_epoch == 3
    loaders = [LatentLoader(moments_ds, bs, rank=r, world_size=world, seed=5) for r in range(world)]
    assert all(len(L) == per_epoch for L in loaders)
    epochs = []
    for epoch in range(2):
        ids = [torch.cat([b["index"] for b in take(L, per_epoch)]) for L in loaders]
        flat = torch.cat(ids)
        assert len(set(flat.tolist())) == per_epoch * world * bs  # disjoint across ranks, no repeats
        epochs.append(flat)
    assert all(L.epoch == 2 for L in loaders)
    assert not torch.equal(epochs[0], epochs[1])  # a new permutation each epoch
    again = LatentLoader(moments_ds, bs, rank=1, world_size=world, seed=5)
    assert torch.equal(next(again)["x"], LatentLoader(moments_ds, bs, rank=1, world_size=world, seed=5).__next__()["x"])
    other = LatentLoader(moments_ds, bs, rank=1, world_size=world, seed=6)
    assert not torch.equal(next(other)["index"], next(LatentLoader(moments_ds, bs, 1, world, seed=5))["index"])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_next_batch(moments_ds, workers):
    ref = take(LatentLoader(moments_ds, 5, seed=1, neighbors=2), 12)  # crosses two epoch boundaries
    loader = LatentLoader(moments_ds, 5, seed=1, num_workers=workers, neighbors=2)
    first = take(loader, 8)
    state = loader.state_dict()
    assert state["step"] == 8 and state["epoch"] == 1
    resumed = LatentLoader(moments_ds, 5, seed=1, num_workers=workers, neighbors=2)
    resumed.load_state_dict(state)
    rest = take(resumed, 4)
    for a, b in zip(first + rest, ref):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    with pytest.raises(DataError, match="batch_size"):
        LatentLoader(moments_ds, 4, seed=1, neighbors=2).load_state_dict(state)


def test_posterior_sample_and_normalisation(moments_ds):
    loader = LatentLoader(moments_ds, 6, seed=3, flip=True)
    batch = next(loader)
    ids = batch["index"].numpy()
    raw_mean = moments_ds.gather("mean", ids).double()  # (B, 2 views, C, H, W)
    raw_std = moments_ds.gather("std", ids).double()
    shift = torch.tensor(SHIFT, dtype=torch.float64).view(2, 1, 1)
    scale = torch.tensor(SCALE, dtype=torch.float64).view(2, 1, 1)
    # Identify each row's view from the data, then check the normalised moments in float64.
    views = []
    for i in range(len(ids)):
        m = (raw_mean[i] - shift) * scale
        v = [torch.allclose(batch["mean"][i].double(), m[j], atol=1e-6) for j in range(2)]
        assert sum(v) == 1
        views.append(v.index(True))
        assert torch.allclose(batch["std"][i].double(), raw_std[i, views[-1]] * scale, atol=1e-6)
    noise = posterior_noise(3, 0, ids, (2, 4, 4)).double()
    expected = batch["mean"].double() + batch["std"].double() * noise
    assert torch.allclose(batch["x"].double(), expected, atol=1e-5)
    # Noise depends on (seed, epoch, item) only: the same item in another rank's/size's batch gets the same draw.
    assert torch.equal(posterior_noise(3, 0, ids[2:3], (2, 4, 4))[0], noise[2].float())
    assert not torch.equal(posterior_noise(3, 1, ids, (2, 4, 4)), noise.float())
    big = posterior_noise(0, 0, np.arange(2000), (2, 4, 4))
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01


def test_flip_rate_and_off(moments_ds):
    on = torch.cat([b["x"] for b in take(LatentLoader(moments_ds, 9, seed=0, flip=True), 8)])
    off_loader = LatentLoader(moments_ds, 9, seed=0, flip=False)
    off = take(off_loader, 8)
    ids = torch.cat([b["index"] for b in off])
    view0 = (moments_ds.gather("mean", ids.numpy(), np.zeros(len(ids), int)).float()
             - torch.tensor(SHIFT).view(2, 1, 1)) * torch.tensor(SCALE).view(2, 1, 1)
    assert torch.allclose(torch.cat([b["mean"] for b in off]), view0, atol=1e-6)
    flipped = torch.cat([b["mean"] for b in take(LatentLoader(moments_ds, 9, seed=0, flip=True), 8)])
    frac = (~torch.isclose(flipped, view0).flatten(1).all(1)).float().mean()
    assert 0.3 < frac < 0.7
    assert on.shape == (72, 2, 4, 4)


def test_neighbors_same_class_same_flip(moments_ds):
    loader = LatentLoader(moments_ds, 6, seed=2, neighbors=3)
    batch = next(loader)
    ids = batch["index"].numpy()
    nbr = batch["neighbor_index"]
    assert nbr.shape == (6, 3) and nbr.dtype == torch.int64
    assert torch.equal(nbr, torch.from_numpy(np.array(moments_ds.neighbor_ids)[ids]).long())
    labels = moments_ds.gather("label", nbr.flatten().numpy()).view(6, 3)
    assert torch.equal(labels, batch["label"][:, None].expand(6, 3))
    views = flip_views(2, 0, ids)
    shift, scale = torch.tensor(SHIFT).view(2, 1, 1), torch.tensor(SCALE).view(2, 1, 1)
    for i in range(6):
        for j in range(3):
            n = nbr[i, j].item()
            m = (moments_ds.gather("mean", [n], [views[i]]).float()[0] - shift) * scale
            s = moments_ds.gather("std", [n], [views[i]]).float()[0] * scale
            want = m + s * posterior_noise(2, 0, [n], (2, 4, 4))[0]
            assert torch.allclose(batch["neighbors"][i, j], want, atol=1e-5)


def test_text_batch_fields(tmp_path, monkeypatch):
    monkeypatch.setenv("PAFM_CACHE", str(tmp_path))
    ds = open_dataset("builtin:digits-captions")
    batch = next(LatentLoader(ds, 16, seed=0, flip=False, num_workers=0, neighbors=2))
    assert batch["x"].shape == (16, 1, 8, 8) and batch["x"].dtype == torch.float32
    assert batch["tokens"].shape == (16, 16, 32) and batch["tokens"].dtype == torch.float32
    assert batch["mask"].dtype == torch.bool and batch["pooled"].shape == (16, 32)
    # The tokens are the embedding of each row's own caption.
    tokens, mask, pooled = BuiltinTextEmbedder(**TEXT_EMBEDDER).embed(ds.captions(batch["index"].numpy()))
    assert torch.equal(batch["tokens"], tokens.half().float()) and torch.equal(batch["mask"], mask)
    assert torch.equal(batch["pooled"], pooled.half().float())
    assert batch["neighbors"].shape == (16, 2, 1, 8, 8)
    x, _ = load_digits_split("train")
    # digits carry a dequantisation posterior: the mean is the image, x a draw within one pixel level of it
    assert torch.equal(batch["mean"], x[batch["index"]])
    assert 0 < (batch["x"] - batch["mean"]).abs().max() < 0.2


def test_bad_setups(moments_ds, tmp_path):
    with pytest.raises(DataError, match="cannot fill"):
        LatentLoader(moments_ds, 20, world_size=2)
    with pytest.raises(DataError, match="neighbours"):
        LatentLoader(moments_ds, 4, neighbors=4)
    with pytest.raises(ValueError):
        LatentLoader(moments_ds, 4, rank=2, world_size=2)
    writer = ShardWriter(tmp_path / "noflip")
    writer.add(latent=torch.zeros(4, 1, 1, 2, 2), label=torch.zeros(4, dtype=torch.int64))
    writer.close({"kind": "class", "latent_shape": [1, 2, 2], "num_classes": 1, "class_names": ["a"],
                  "normalization": {"shift": [0.0], "scale": [1.0]}, "encoder": {"kind": "identity"}})
    ds = open_dataset(str(tmp_path / "noflip"))
    with pytest.raises(DataError, match="flip"):
        LatentLoader(ds, 2)
    assert next(LatentLoader(ds, 2, flip=False))["x"].shape == (2, 1, 2, 2)
