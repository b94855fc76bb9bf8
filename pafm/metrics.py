"""Sample-quality metrics: Frechet distance, Inception metrics through torch-fidelity, and the digits metrics.

Inception metrics (FID, IS, precision/recall, KID) use torch-fidelity's port of the TF Inception network, the one the
ADM evaluator uses, so FID against ADM's reference statistics is comparable with published numbers.  Features are
extracted once per image set and every metric is computed from them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pafm.files import IMAGE_EXTENSIONS, image_files, is_image

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
