"""Frechet distance against independent float64 computations and torch-fidelity; Inception metric plumbing on
synthetic features; the digits metrics on real and corrupted digits."""
import numpy as np
import pytest
import scipy.linalg
import torch

from pafm.data.digits import load_digits_split
from pafm.metrics import (DigitsJudge, InceptionFeatures, MetricError, check_reference, feature_statistics,
                          frechet_distance, inception_metrics, read_reference_images, read_reference_statistics,
                          to_uint8)


def random_stats(rng, d, n):
    f = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    return feature_statistics(f)


def test_frechet_distance_matches_scipy_sqrtm_and_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(0)
    for d, n in [(1, 50), (8, 100), (64, 300), (64, 40)]:  # the last: singular covariances (n < d)
        (mu1, s1), (mu2, s2) = random_stats(rng, d, n), random_stats(rng, d, n)
        ours = frechet_distance(mu1, s1, mu2, s2)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        independent = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        fidelity = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
        scale = np.trace(s1) + np.trace(s2)
        assert abs(ours - independent) < 1e-8 * scale, (d, n, ours, independent)
        assert abs(ours - fidelity["frechet_inception_distance"]) < 1e-8 * scale
        assert ours > 0


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2; commuting diagonal covariances: sum of the per-axis 1-D distances.
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, abs=1e-12)
    v1, v2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.2, 0.5])
    expected = ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum() + 4.0
    assert frechet_distance(np.zeros(3), np.diag(v1), [2.0, 0, 0], np.diag(v2)) == pytest.approx(expected, abs=1e-12)
    rng = np.random.default_rng(1)
    f = rng.normal(size=(500, 32)) * rng.uniform(0.1, 10, size=32)
    stats = feature_statistics(f)
    assert abs(frechet_distance(*stats, *stats)) < 1e-9 * np.trace(stats[1])  # a set against itself
    with pytest.raises(MetricError, match="shapes disagree"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(MetricError, match="N >= 2"):
        feature_statistics(np.zeros((1, 3)))


def test_inception_metrics_from_features_match_torch_fidelity(tmp_path):
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    gen = torch.Generator().manual_seed(0)
    feats = {"2048": torch.randn(40, 16, generator=gen), "logits_unbiased": torch.randn(40, 10, generator=gen)}
    ref = {"2048": torch.randn(30, 16, generator=gen) + 0.5, "logits_unbiased": torch.randn(30, 10, generator=gen)}
    out = inception_metrics(feats, ["fid", "isc", "prc", "kid"], reference_features=ref, isc_splits=4,
                            kid_subset_size=20, kid_subsets=10)
    expected_fid = frechet_distance(*feature_statistics(feats["2048"].numpy()),
                                    *feature_statistics(ref["2048"].numpy()))
    assert out["fid"] == pytest.approx(expected_fid, rel=1e-12) and out["fid"] > 1.0
    isc = isc_features_to_metric(feats["logits_unbiased"], splits=4, shuffle=True, rng_seed=2020)
    assert out["isc"] == pytest.approx(isc["inception_score_mean"])
    prc = prc_features_to_metric(feats["2048"], ref["2048"], verbose=False)
    assert (out["precision"], out["recall"]) == (prc["precision"], prc["recall"])
    assert np.isfinite(out["kid"]) and out["kid"] > 0
    # against itself: FID 0, and precomputed statistics saved as .npz give the same FID as features
    same = inception_metrics(feats, ["fid"], reference_features=feats)
    assert abs(same["fid"]) < 1e-9
    np.savez(tmp_path / "ref.npz", mu=ref["2048"].double().mean(0).numpy(), sigma=np.cov(ref["2048"].numpy().T))
    ref_stats = read_reference_statistics(tmp_path / "ref.npz")
    from_stats = inception_metrics(feats, ["fid"], reference_stats=ref_stats)
    assert from_stats["fid"] == pytest.approx(out["fid"], rel=1e-6)
    with pytest.raises(MetricError, match="needs reference images"):
        inception_metrics(feats, ["prc"], reference_stats=ref_stats)
    with pytest.raises(MetricError, match="eval.reference"):
        inception_metrics(feats, ["fid"])
    with pytest.raises(MetricError, match="unknown Inception metrics"):
        inception_metrics(feats, ["lpips"])


def test_images_and_inception_weight_errors(tmp_path):
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 3.0]).reshape(1, 1, 1, 5)
    assert to_uint8(x).flatten().tolist() == [0, 64, 128, 255, 255]  # 63.75 -> 64, 127.5 -> 128 (round half even)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 5, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", arr_0=images)
    assert np.array_equal(read_reference_images(tmp_path / "imgs.npz"), images)
    from PIL import Image

    (tmp_path / "folder" / "empty").mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "folder" / f"{i}.png")
    assert np.array_equal(read_reference_images(tmp_path / "folder"), images)
    with pytest.raises(MetricError, match="arr_0"):
        np.savez(tmp_path / "bad.npz", images=images)
        read_reference_images(tmp_path / "bad.npz")
    with pytest.raises(MetricError, match="does not exist"):
        InceptionFeatures(tmp_path / "missing.pth")
    with pytest.raises(MetricError, match="holds no"):
        read_reference_images(tmp_path / "folder" / "empty")
    torch.save({"weights": object()}, tmp_path / "pickle.pth")  # not a plain state dict: refused before unpickling
    with pytest.raises(MetricError, match="not a plain tensor state dict"):
        InceptionFeatures(tmp_path / "pickle.pth")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "wrong.pth")
    with pytest.raises(MetricError, match="do not fit"):
        InceptionFeatures(tmp_path / "wrong.pth")


def test_reference_folders_of_every_image_type_prep_reads(tmp_path):
    """FID against a folder of .webp (or .bmp, .tiff, ...) images reads them all, as prep reads such folders."""
    from PIL import Image

    images = np.random.default_rng(1).integers(0, 256, size=(4, 6, 6, 3), dtype=np.uint8)
    for i, (im, ext) in enumerate(zip(images, ["webp", "WEBP", "bmp", "tiff"])):
        (tmp_path / "ref" / f"part{i % 2}").mkdir(parents=True, exist_ok=True)
        options = {"lossless": True} if ext.lower() == "webp" else {}
        Image.fromarray(im).save(tmp_path / "ref" / f"part{i % 2}" / f"{i}.{ext}", **options)
    (tmp_path / "ref" / "notes.txt").write_text("not an image")
    check_reference(tmp_path / "ref", ["fid", "prc"])
    got = read_reference_images(tmp_path / "ref")  # sorted by path: part0/0, part0/2, part1/1, part1/3
    assert np.array_equal(got, images[[0, 2, 1, 3]])
    (tmp_path / "webp_only").mkdir()
    Image.fromarray(images[0]).save(tmp_path / "webp_only" / "a.webp", lossless=True)
    check_reference(tmp_path / "webp_only", ["fid"])
    assert np.array_equal(read_reference_images(tmp_path / "webp_only"), images[:1])


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # the held-out pixel covariance is singular (blank corners)
def test_digits_metrics():
    judge = DigitsJudge(*load_digits_split("train"), *load_digits_split("heldout"))
    ref = judge.reference()
    assert ref["accuracy"] > 0.95  # an RBF SVC on digit pixels is about 98-99% accurate
    assert ref["memorization"] < 0.2
    assert 0 < ref["frechet_pixels"] < 20
    train_x, train_y = load_digits_split("train")
    copies = judge.score(train_x[:100], train_y[:100])
    assert copies["memorization"] == 1.0 and copies["accuracy"] > 0.99  # exact copies: nearest distance 0
    held_x, held_y = load_digits_split("heldout")
    wrong = judge.score(held_x, (held_y + 1) % 10)
    assert wrong["accuracy"] < 0.05
    noise = judge.score(torch.rand(200, 1, 8, 8) * 2 - 1, torch.arange(200) % 10)
    assert noise["frechet_pixels"] > 5 * ref["frechet_pixels"] and noise["memorization"] == 0.0
    # the pixel Frechet distance is the float64 formula on the flattened images
    flat = held_x.reshape(len(held_x), -1).double().numpy()
    mu, sigma = flat.mean(0), np.cov(flat.T)
    noise_images = np.random.default_rng(0).uniform(-1, 1, size=(300, 64))
    s_n = np.cov(noise_images, rowvar=False)
    independent = (((noise_images.mean(0) - mu) ** 2).sum() + np.trace(s_n) + np.trace(sigma)
                   - 2 * np.trace(scipy.linalg.sqrtm(s_n @ sigma).real))
    assert judge.score(noise_images)["frechet_pixels"] == pytest.approx(independent, rel=1e-6)
    with pytest.raises(MetricError, match="8x8"):
        judge.score(np.zeros((2, 3, 8, 8)))


def test_inception_download_failure_says_how_to_provide_the_file(monkeypatch):
    import urllib.error

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(fe, "load_state_dict_from_url", offline)
    with pytest.raises(MetricError, match="eval.inception_weights=") as err:
        InceptionFeatures(None)
    assert "weights-inception-2015-12-05" in str(err.value)


# ----------------------------------------------------------------------------------------------------------------------
# MNIST metrics (a stand-in network: the real one is trained on builtin:mnist on first use)


def _bars(n, rng):
    """28x28 images in [-1, 1] of 10 separable classes (a bright bar at row 2 + 2c), with pixel noise."""
    labels = torch.arange(n) % 10
    x = torch.full((n, 1, 28, 28), -1.0)
    for i, c in enumerate(labels.tolist()):
        x[i, 0, 2 + 2 * c: 4 + 2 * c, 4:24] = 1.0
    return (x + 0.1 * torch.from_numpy(rng.normal(size=x.shape)).float()).clamp(-1, 1), labels


def test_mnist_cnn_trains_deterministically_caches_and_learns(tmp_path):
    from pafm.metrics import mnist_cnn, train_mnist_cnn

    rng = np.random.default_rng(0)
    x, y = _bars(300, rng)
    a, b = (train_mnist_cnn(x, y, epochs=3, batch_size=16) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    test_x, test_y = _bars(100, np.random.default_rng(1))
    with torch.no_grad():
        assert (a(test_x).argmax(1) == test_y).float().mean() > 0.9
    cache = tmp_path / "cnn.safetensors"
    first = mnist_cnn(x, y, cache=cache)
    again = mnist_cnn(None, None, cache=cache)  # read back: no training data needed
    assert all(torch.equal(p, q) for p, q in zip(first.state_dict().values(), again.state_dict().values()))


def test_nearest_two_and_pairwise_distance_against_loops():
    from pafm.metrics import mean_pairwise_distance, nearest_two

    rng = np.random.default_rng(0)
    x, pool = rng.normal(size=(7, 5)), rng.normal(size=(30, 5))
    d = np.array([[np.linalg.norm(a - b) for b in pool] for a in x])
    np.testing.assert_allclose(nearest_two(x, pool, chunk=3), np.sort(d, 1)[:, :2], rtol=1e-10)
    labels = np.array([0, 0, 0, 1, 1, 2, 2])
    per_class = []
    for c in (0, 1, 2):
        m = x[labels == c]
        per_class.append(np.mean([np.linalg.norm(m[i] - m[j]) for i in range(len(m)) for j in range(i + 1, len(m))]))
    assert mean_pairwise_distance(x, labels) == pytest.approx(np.mean(per_class), rel=1e-10)


def test_mnist_judge_on_copies_noise_and_collapse():
    from pafm.metrics import MnistCNN, MnistJudge

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    net = MnistCNN()  # random weights: features are still a fixed map, which is all FD needs
    memory, memory_y = _bars(100, rng)
    held, held_y = _bars(200, np.random.default_rng(1))
    judge = MnistJudge(net, held, held_y, memory)
    copies = judge.score(memory[:50], memory_y[:50])
    assert copies["memorization"] == 1.0  # exact training images: nearest at distance 0
    fresh = judge.score(held[:50], held_y[:50])
    assert fresh["memorization"] == 0.0  # other noisy bars are about as far as the nearest
    assert judge.score(held, held_y)["frechet_cnn"] == pytest.approx(0.0, abs=1e-6)  # the reference itself
    collapsed = judge.score(held[:10].repeat(5, 1, 1, 1), held_y[:10].repeat(5))  # 5 copies of one image per class
    assert collapsed["diversity"] == pytest.approx(0.0, abs=1e-6) and fresh["diversity"] > 0.8
    blank = judge.score(-torch.ones(50, 1, 28, 28), held_y[:50])
    assert blank["frechet_cnn"] > 10 * judge.reference(memory, size=50)["frechet_cnn"] > 0
    ref = judge.reference(memory, size=50)
    assert ref["memorization"] == 0.0 and set(ref) == {"accuracy", "diversity", "frechet_cnn", "memorization"}
    with pytest.raises(MetricError, match="28x28"):
        judge.score(torch.zeros(3, 1, 8, 8))
