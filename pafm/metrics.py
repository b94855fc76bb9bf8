"""Sample-quality metrics: Frechet distance, Inception metrics through torch-fidelity, and the digits metrics.

Inception metrics (FID, IS, precision/recall, KID) use torch-fidelity's port of the TF Inception network, the one the
ADM evaluator uses, so FID against ADM's reference statistics is comparable with published numbers.  Features are
extracted once per image set and every metric is computed from them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pafm.data import mnist
from pafm.data.cache import cache_dir
from pafm.files import IMAGE_EXTENSIONS, atomic_write, image_files, is_image

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FEATURES = ("2048", "logits_unbiased")  # pool3 for FID/KID/PRC, logits for IS


class MetricError(ValueError):
    """Metric inputs that cannot be used (shapes, missing reference, missing weights)."""


# ----------------------------------------------------------------------------------------------------------------------
# Frechet distance


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of (N, D) features."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise MetricError(f"feature_statistics: need (N >= 2, D) features, got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) in float64.

    tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    S1^(1/2) S2 S1^(1/2) (same spectrum as S1 S2), which avoids sqrtm's complex round-off on singular covariances.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise MetricError(f"frechet_distance: shapes disagree: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, "
                          f"sigma2 {s2.shape}")
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    evals, evecs = np.linalg.eigh(s1)
    root1 = (evecs * np.sqrt(np.clip(evals, 0.0, None))) @ evecs.T
    inner = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (inner + inner.T)), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def read_reference_statistics(path) -> tuple[np.ndarray, np.ndarray] | None:
    """(mu, sigma) from an .npz that holds them (ADM reference batches, torch-fidelity/pytorch-fid stats), else None."""
    with np.load(path) as data:
        if "mu" in data.files and "sigma" in data.files:
            return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Images


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (B, C, H, W) -> uint8 (B, C, H, W), rounded, clamped."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8_nhwc(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) as samples.npz holds them -> float64 (N, C, H, W) in [-1, 1], what the judges score."""
    return images.astype(np.float64).transpose(0, 3, 1, 2) / 127.5 - 1.0


def check_reference(path, metrics) -> None:
    """MetricError naming eval.reference when `path` cannot serve `metrics` (fid, isc, prc, kid); cheap: reads an
    npz's key list and mu/sigma shapes, or finds one image in a folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MetricError(f"eval.reference: {path} does not exist")
    needs_images = any(m in metrics for m in ("prc", "kid"))
    if path.is_dir():
        if not any(is_image(p) for p in path.rglob("*")):
            raise MetricError(f"eval.reference: {path} holds no {'/'.join(IMAGE_EXTENSIONS)} images")
        return
    if path.suffix != ".npz":
        raise MetricError(f"eval.reference: {path} is neither an .npz file nor a folder of images")
    try:
        with np.load(path) as data:
            keys = set(data.files)
            shapes = {k: data[k].shape for k in ("mu", "sigma") if k in keys}
    except (OSError, ValueError) as err:
        raise MetricError(f"eval.reference: {path} is not a readable .npz file ({err})") from None
    has_stats = len(shapes) == 2
    if has_stats and (shapes["mu"] != (2048,) or shapes["sigma"] != (2048, 2048)):
        raise MetricError(f"eval.reference: {path} has mu {shapes['mu']} and sigma {shapes['sigma']}; Inception pool3 "
                          f"statistics are (2048,) and (2048, 2048)")
    if "arr_0" not in keys and (needs_images or ("fid" in metrics and not has_stats)):
        what = "prc/kid need reference images" if needs_images else "fid needs images or mu and sigma"
        raise MetricError(f"eval.reference: {path} holds {sorted(keys)}, no 'arr_0' image array: {what}")


def read_reference_images(path) -> np.ndarray:
    """Reference images as uint8 NHWC: an .npz with `arr_0` (ADM format) or a folder of image files (sorted)."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as data:
            if "arr_0" not in data.files:
                raise MetricError(f"{path} has no 'arr_0' image array (keys: {data.files})")
            images = data["arr_0"]
    elif path.is_dir():
        from PIL import Image

        files = image_files(path)
        if not files:
            raise MetricError(f"{path} holds no {'/'.join(IMAGE_EXTENSIONS)} images")
        images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    else:
        raise MetricError(f"reference {path} is neither an .npz file nor a folder of images")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise MetricError(f"{path}: expected uint8 images (N, H, W, 1 or 3), got {images.dtype} {images.shape}")
    return images


# ----------------------------------------------------------------------------------------------------------------------
# Inception (torch-fidelity)


class InceptionFeatures:
    """torch-fidelity's Inception-v3 (the TF-FID port) returning pool3 (2048) and unbiased logits (1008).

    `weights`: a local copy of torch-fidelity's weight file (INCEPTION_URL).  torch-fidelity loads a local file with
    torch.load(weights_only=False); it is first opened here with weights_only=True, so a file holding anything but
    tensors is refused before it can run code.  Without `weights` torch-fidelity downloads the file (or reuses the
    torch hub cache); where that fails the error says how to provide it.
    """

    def __init__(self, weights: str | None = None, device="cpu", batch_size: int = 64):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as err:
            raise MetricError(f"Inception metrics need torch-fidelity ({err}): pip install torch-fidelity") from None

        if weights is not None:
            weights = str(Path(weights).expanduser())
            if not Path(weights).is_file():
                raise MetricError(f"eval.inception_weights: {weights} does not exist; download {INCEPTION_URL} and "
                                  f"point eval.inception_weights at it")
            try:
                torch.load(weights, map_location="cpu", weights_only=True)
            except Exception as err:
                raise MetricError(f"eval.inception_weights: {weights} is not a plain tensor state dict: {err}") from None
        try:
            net = FeatureExtractorInceptionV3("inception-v3-compat", list(INCEPTION_FEATURES),
                                              feature_extractor_weights_path=weights, verbose=False)
        except RuntimeError as err:
            raise MetricError(f"Inception weights {weights} do not fit torch-fidelity's network: {err}") from None
        except Exception as err:  # URLError, HTTPError, OSError, ...: the download failed
            raise MetricError(f"could not download the Inception weights ({type(err).__name__}: {err}); download "
                              f"{INCEPTION_URL} where the network allows it and set "
                              f"eval.inception_weights=/path/to/weights-inception-2015-12-05-6726825d.pth") from None
        self.net = net.to(device)
        self.device, self.batch_size = torch.device(device), batch_size

    def to(self, device) -> "InceptionFeatures":
        self.net = self.net.to(device)
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict[str, torch.Tensor]:
        """uint8 NHWC (1 or 3 channels) -> {"2048": (N, 2048), "logits_unbiased": (N, 1008)} float32 CPU tensors."""
        if images.dtype != np.uint8 or images.ndim != 4:
            raise MetricError(f"InceptionFeatures: expected uint8 NHWC images, got {images.dtype} {images.shape}")
        out = {name: [] for name in INCEPTION_FEATURES}
        for start in range(0, len(images), self.batch_size):
            x = torch.from_numpy(images[start:start + self.batch_size]).permute(0, 3, 1, 2)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            feats = self.net(x.contiguous().to(self.device))
            for name, f in zip(INCEPTION_FEATURES, feats):
                out[name].append(f.float().cpu())
        return {name: torch.cat(parts) for name, parts in out.items()}


def write_random_inception(path) -> Path:
    """torch-fidelity's Inception network with random weights (Kaiming-normal, so activations keep their scale), saved
    as the plain state dict `eval.inception_weights` takes: the whole FID path runs without the real weights (tests,
    dry runs). Its scores mean nothing."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe  # optional: only the Inception metrics need it

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    with torch.random.fork_rng(devices=[]):  # the caller's random stream stays as it was
        torch.manual_seed(0)
        for module in net.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(module.weight)
    torch.save(net.state_dict(), path)
    return Path(path)


def inception_metrics(features: dict, metrics, reference_features: dict | None = None,
                      reference_stats: tuple | None = None, isc_splits: int = 10, kid_subset_size: int = 1000,
                      kid_subsets: int = 100, prc_neighborhood: int = 3, seed: int = 2020) -> dict:
    """FID ('fid'), Inception Score ('isc'), precision/recall ('prc') and KID ('kid') from extracted features.

    FID uses `reference_stats` (mu, sigma) when given, else the statistics of `reference_features`.  IS, precision,
    recall and KID are torch-fidelity's own implementations.
    """
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    unknown = set(metrics) - {"fid", "isc", "prc", "kid"}
    if unknown:
        raise MetricError(f"unknown Inception metrics {sorted(unknown)}; valid: fid, isc, prc, kid")
    out = {}
    pool = features["2048"]
    if "fid" in metrics:
        if reference_stats is None and reference_features is None:
            raise MetricError("fid needs a reference: set eval.reference to a folder or .npz of images, or an .npz "
                              "with mu and sigma (such as ADM's VIRTUAL_imagenet256_labeled.npz)")
        mu2, sigma2 = reference_stats if reference_stats is not None else feature_statistics(
            reference_features["2048"].numpy())
        out["fid"] = frechet_distance(*feature_statistics(pool.numpy()), mu2, sigma2)
    if "isc" in metrics:
        if len(pool) < isc_splits:
            raise MetricError(f"isc: {len(pool)} samples cannot be split into eval.isc_splits={isc_splits} parts")
        isc = isc_features_to_metric(features["logits_unbiased"], splits=isc_splits, shuffle=True, rng_seed=seed)
        out["isc"], out["isc_std"] = isc["inception_score_mean"], isc["inception_score_std"]
    for name in ("prc", "kid"):
        if name in metrics and reference_features is None:
            raise MetricError(f"{name} needs reference images (eval.reference: a folder or an .npz with arr_0), not "
                              f"only mu/sigma statistics")
    if "prc" in metrics:
        prc = prc_features_to_metric(pool, reference_features["2048"], prc_neighborhood=prc_neighborhood,
                                     verbose=False)
        out["precision"], out["recall"] = prc["precision"], prc["recall"]
    if "kid" in metrics:
        size = min(kid_subset_size, len(pool), len(reference_features["2048"]))
        kid = kid_features_to_metric(pool, reference_features["2048"], kid_subset_size=size,
                                     kid_subsets=kid_subsets, rng_seed=seed, verbose=False)
        out["kid"], out["kid_std"] = kid["kernel_inception_distance_mean"], kid["kernel_inception_distance_std"]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Digits


def _flat64(images) -> np.ndarray:
    """(N, ...) images (arrays or tensors) as float64 rows (N, pixels)."""
    x = images.double().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, dtype=np.float64)
    return x.reshape(len(x), -1)


class DigitsJudge:
    """Metrics for 8x8 digits, where Inception features mean nothing, against the real digits given (images in
    [-1, 1] and labels of the training and the held-out split):

    - accuracy: an RBF SVC trained on the pixels of the training split recognises the intended class;
    - frechet_pixels: Frechet distance on the 64 pixels between the images and the held-out split;
    - memorization: share of images whose nearest training image is much closer than the second nearest
      (distance ratio below `ratio`, 1/3), i.e. near-copies of one training digit.
    """

    def __init__(self, train_images, train_labels, heldout_images, heldout_labels, ratio: float = 1.0 / 3.0):
        from sklearn.svm import SVC

        self.train = _flat64(train_images)
        self.train_labels = np.asarray(train_labels)
        self.heldout = _flat64(heldout_images)
        self.heldout_labels = np.asarray(heldout_labels)
        self.heldout_stats = feature_statistics(self.heldout)
        self.classifier = SVC(gamma="scale").fit(self.train, self.train_labels)
        self.ratio = ratio

    def score(self, images, labels=None) -> dict:
        """images: (N, 1, 8, 8) or (N, 64) floats in [-1, 1]; labels: intended classes (for accuracy)."""
        x = _flat64(images)
        if x.shape[1] != self.train.shape[1]:
            raise MetricError(f"DigitsJudge: expected 8x8 single-channel images, got {np.asarray(images).shape}")
        out = {}
        if labels is not None:
            out["accuracy"] = float((self.classifier.predict(x) == np.asarray(labels)).mean())
        out["frechet_pixels"] = frechet_distance(*feature_statistics(x), *self.heldout_stats)
        d2 = (x**2).sum(1)[:, None] - 2 * x @ self.train.T + (self.train**2).sum(1)[None]
        nearest = np.sqrt(np.clip(np.partition(d2, 1, axis=1)[:, :2], 0.0, None))
        out["memorization"] = float((nearest[:, 0] < self.ratio * nearest[:, 1]).mean())
        return out

    def reference(self) -> dict:
        """The reference row: held-out real images (accuracy, memorisation) and, for the Frechet distance, an equally
        large subset of the training split against the held-out split (the finite-sample floor)."""
        row = self.score(self.heldout, self.heldout_labels)
        subset = np.random.default_rng(0).choice(len(self.train), len(self.heldout), replace=False)
        row["frechet_pixels"] = frechet_distance(*feature_statistics(self.train[subset]), *self.heldout_stats)
        return row


# ----------------------------------------------------------------------------------------------------------------------
# MNIST


class MnistCNN(torch.nn.Module):
    """A small LeNet-style classifier of 28x28 digits in [-1, 1]; `features` is its 128-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
        self.fc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 7 * 7, 128), torch.nn.ReLU())
        self.head = torch.nn.Linear(128, 10)

    def features(self, x):
        return self.fc(self.conv(x))

    def forward(self, x):
        return self.head(self.features(x))


CNN_VERSION = 1  # bump whenever the network or its training changes: cached weights are keyed by it
CNN_EPOCHS = 2


def train_mnist_cnn(images: torch.Tensor, labels: torch.Tensor, epochs: int = CNN_EPOCHS, seed: int = 0,
                    batch_size: int = 128) -> MnistCNN:
    """Train the classifier deterministically (fixed seed, fixed order, one thread so reductions never reorder)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = MnistCNN()
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        x, y = images.float().reshape(-1, 1, 28, 28), labels.long()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), batch_size):
                ids = order[start:start + batch_size]
                loss = torch.nn.functional.cross_entropy(net(x[ids]), y[ids])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval()


def mnist_cnn(images: torch.Tensor, labels: torch.Tensor, cache: Path | None = None) -> MnistCNN:
    """The classifier trained on `images`, read from `cache` (safetensors) when there, else trained and saved."""
    if cache is not None and Path(cache).is_file():
        net = MnistCNN()
        net.load_state_dict(load_file(str(cache)))
        return net.eval()
    net = train_mnist_cnn(images, labels)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        atomic_write(Path(cache), lambda tmp: save_file(state, str(tmp)))
    return net


def default_mnist_cnn() -> MnistCNN:
    """The CNN trained once on builtin:mnist's 50,000 training images, cached beside the dataset."""
    cache = cache_dir() / f"mnist-cnn-v{CNN_VERSION}-{mnist.WHEEL_SHA256[:12]}.safetensors"
    if cache.is_file():
        return mnist_cnn(None, None, cache)
    return mnist_cnn(*mnist.load_mnist_split("train"), cache=cache)


def nearest_two(x: np.ndarray, pool: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """(N, 2) Euclidean distances from each row of `x` to its nearest and second-nearest row of `pool` (float64)."""
    pool_sq = (pool**2).sum(1)
    out = np.empty((len(x), 2))
    for start in range(0, len(x), chunk):
        q = x[start:start + chunk]
        d2 = (q**2).sum(1)[:, None] - 2 * q @ pool.T + pool_sq[None]
        out[start:start + chunk] = np.sqrt(np.clip(np.partition(d2, 1, axis=1)[:, :2], 0.0, None))
    return np.sort(out, axis=1)


def mean_pairwise_distance(x: np.ndarray, labels: np.ndarray, per_class: int = 100) -> float:
    """Mean Euclidean distance between distinct images of one class (the first `per_class` of each), averaged over
    the classes present; a model that maps different noises to the same few images scores low."""
    values = []
    for c in np.unique(labels):
        members = x[labels == c][:per_class]
        if len(members) < 2:
            continue
        sq = (members**2).sum(1)
        d = np.sqrt(np.clip(sq[:, None] - 2 * members @ members.T + sq[None], 0.0, None))
        values.append(d[np.triu_indices(len(members), 1)].mean())
    if not values:
        raise MetricError("mean_pairwise_distance: no class has two images")
    return float(np.mean(values))


class MnistJudge:
    """Metrics for 28x28 MNIST samples (images in [-1, 1]):

    - accuracy: the CNN recognises the intended class;
    - frechet_cnn: Frechet distance in the CNN's 128-d penultimate features against the held-out (test) split;
    - memorization: share of samples whose nearest image of `memory` (the images trained on) is closer than 1/3 of
      the second nearest, in pixels (Gu et al., 2023);
    - diversity: mean pairwise pixel distance between samples of one class, over the same figure for held-out real
      images (1 = as diverse as real digits; flow collapse drives it down).
    """

    def __init__(self, net: MnistCNN, heldout_images, heldout_labels, memory_images, ratio: float = 1.0 / 3.0):
        self.net = net.eval()
        self.heldout = _flat64(heldout_images)
        self.heldout_labels = np.asarray(heldout_labels)
        self.memory = _flat64(memory_images)
        self.ratio = ratio
        self.heldout_features = self.features(self.heldout)
        self.heldout_stats = feature_statistics(self.heldout_features)
        self.real_diversity = mean_pairwise_distance(self.heldout, self.heldout_labels)

    @torch.no_grad()
    def features(self, x: np.ndarray, batch: int = 1000) -> np.ndarray:
        t = torch.from_numpy(np.asarray(x, np.float32)).reshape(-1, 1, 28, 28)
        return torch.cat([self.net.features(t[i:i + batch]) for i in range(0, len(t), batch)]).double().numpy()

    def score(self, images, labels=None) -> dict:
        """images: (N, 1, 28, 28) or (N, 784) floats in [-1, 1]; labels: intended classes (accuracy, diversity)."""
        x = _flat64(images)
        if x.shape[1] != 784:
            raise MetricError(f"MnistJudge: expected 28x28 single-channel images, got {np.asarray(images).shape}")
        feats = self.features(x)
        out = {}
        if labels is not None:
            labels = np.asarray(labels)
            logits = self.net.head(torch.from_numpy(feats).float())
            out["accuracy"] = float((logits.argmax(1).numpy() == labels).mean())
            out["diversity"] = mean_pairwise_distance(x, labels) / self.real_diversity
        out["frechet_cnn"] = frechet_distance(*feature_statistics(feats), *self.heldout_stats)
        nearest = nearest_two(x, self.memory)
        out["memorization"] = float((nearest[:, 0] < self.ratio * nearest[:, 1]).mean())
        return out

    def reference(self, train_images, size: int | None = None) -> dict:
        """The reference row for `size` samples (default: as many as held out): that many held-out real images
        (accuracy, memorisation against `memory`, diversity near 1) and, for the Frechet distance, that many training
        images against the held-out split (the finite-sample floor at that sample size)."""
        rng = np.random.default_rng(0)
        size = min(size or len(self.heldout), len(self.heldout))
        held = rng.choice(len(self.heldout), size, replace=False)
        row = self.score(self.heldout[held], self.heldout_labels[held])
        train = _flat64(train_images)
        subset = rng.choice(len(train), min(size, len(train)), replace=False)
        row["frechet_cnn"] = frechet_distance(*feature_statistics(self.features(train[subset])), *self.heldout_stats)
        return row
