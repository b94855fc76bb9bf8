"""Evaluation during training: every `eval.every` steps the EMA weights are scored with the dataset's own metrics
(digits: SVC accuracy and pixel FD; MNIST: CNN accuracy, CNN-feature FD, memorised share; latent data: FID / IS
through torch-fidelity with `eval.inception_weights` against `eval.reference`), as `pafm.eval` scores an export.

Every rank draws its share of `eval.during_training_samples` samples, in the chunks and with the seed rule of
`pafm.eval` (chunk c of `eval.batch_size` samples on rank c % world size, its noise and conditions from `eval.seed`
and c), so successive evaluations see the same noise and conditions and their scores compare.  Rank 0 gathers the
images, scores them, writes an `eval` row (metrics.jsonl, TensorBoard, W&B) and redraws RUN/eval_scores.png.  An
evaluation is side work: a failure is reported and counted, and training goes on.
"""
from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch.distributed as dist

from pafm.config import ConfigError, at_least, section, setting, within, words
from pafm.evaluation import (INCEPTION_METRICS, METRIC_LIST, EvalConfig, EvalSection, check_eval_config,
                             resolve_eval_defaults, score)
from pafm.export import dataset_info, load_weights, model_from_meta
from pafm.generate import Conditions, Decoder, generate, latent_shape
from pafm.logger import MetricsLogger, SideWork, read_metrics
from pafm.metrics import InceptionFeatures, to_uint8
from pafm.paths import build_path
from pafm.sampling import MAX_STEPS, SamplerConfig

PLOT_NAME = "eval_scores.png"


@section("eval.sampler")
class TrainingSamplerConfig(SamplerConfig):
    """`eval.sampler`: `pafm.eval`'s sampler section, by default a coarse Heun grid of 10 steps."""

    steps: int = setting(10, within(1, MAX_STEPS))


@section("eval")
class TrainingEvalConfig:
    """The trainer's `eval:` section.  every: steps between evaluations (0: none).  metrics: null picks the
    dataset's own set (see `pafm.eval`).  reference, inception_weights, inception_batch_size: as in `pafm.eval`, for
    fid / isc / prc / kid.  sampler: how the samples are drawn (`pafm.eval`'s sampler section); by default a coarse
    Heun grid of 10 steps, cheap enough to run often: its scores compare with each other, not with `pafm.eval`'s."""

    every: int = setting(0, at_least(0, "0: no evaluation during training"))
    during_training_samples: int = setting(1000, within(1, 10**7))
    batch_size: int = setting(125, within(1, 65536))  # samples per chunk
    seed: int = setting(0, within(0, 2**63 - 1))
    metrics: Optional[list[str]] = setting(None, METRIC_LIST)
    reference: Optional[str] = setting(None, words("a folder of images or an .npz"))
    inception_weights: Optional[str] = setting(None, words("a torch-fidelity Inception file"))
    inception_batch_size: int = setting(64, within(1, 65536))
    sampler: TrainingSamplerConfig = setting(factory=TrainingSamplerConfig)

    def as_eval_config(self, meta: dict):
        """These settings as `pafm.eval`'s config, defaults resolved and checked against the data `meta` describes
        ({"data": {"spec", "info"}}); ConfigError for settings that cannot work with it."""
        section = EvalSection(num_samples=self.during_training_samples, batch_size=self.batch_size, seed=self.seed,
                              metrics=None if self.metrics is None else list(self.metrics), reference=self.reference,
                              inception_weights=self.inception_weights,
                              inception_batch_size=self.inception_batch_size, save_npz=False)
        cfg = EvalConfig(eval=section, sampler=self.sampler)
        resolve_eval_defaults(cfg, meta)
        try:
            check_eval_config(cfg, meta)
        except ValueError as err:  # a ConfigError, or the guided channels': pafm.eval's keys in this section's words
            text = re.sub(r"(?<![\w.])sampler\.(?=\w)", "eval.sampler.", str(err))
            raise ConfigError(text.replace("eval.num_samples", "eval.during_training_samples")) from None
        return cfg


class TrainingEval:
    """Scores the EMA weights; call it on every rank at the same steps."""

    def __init__(self, cfg: TrainingEvalConfig, world, ema, export_meta: dict, side: SideWork, run_dir: Path,
                 logger: MetricsLogger):
        self.eval_cfg = cfg.as_eval_config(export_meta)
        self.world, self.ema, self.meta, self.side, self.run_dir, self.logger = world, ema, export_meta, side, \
            run_dir, logger
        self.model = self.inception = None  # built at the first evaluation, reused by the later ones

    def __call__(self, step: int):
        start = time.perf_counter()
        weights = self.ema.full_state_dict()  # a collective, outside the side-work guard so no rank waits alone
        part = self.side.run(f"sampling for the evaluation of step {step}", self._sample, weights)
        parts = [None] * self.world.size if self.world.is_main else None
        dist.gather_object(part, parts, dst=0)
        if self.world.is_main and part is not None:  # a failure of rank 0's own share was reported already
            self.side.run(f"the evaluation of step {step}", self._score, step, parts, start)

    def _sample(self, weights: dict) -> list[tuple[int, dict]]:
        """This rank's chunks: [(chunk, {"images": uint8 NHWC, "labels"})]."""
        e, device = self.eval_cfg.eval, self.world.device
        if self.model is None:  # the model last: a failed build is tried again at the next evaluation
            model = model_from_meta(self.meta, "the evaluation during training").eval().requires_grad_(False)
            self.conditions = Conditions(model, self.meta, order=e.labels, seed=e.seed)
            self.decoder = Decoder(dataset_info(self.meta), device)
            self.flow_path, self.shape = build_path(self.meta.get("path", "linear")), latent_shape(model, self.meta)
            self.model = model
        chunks = range(self.world.rank, math.ceil(e.num_samples / e.batch_size), self.world.size)
        out = []
        try:
            load_weights(self.model, weights, device, "the evaluation during training")
            for c in chunks:
                indices = list(range(c * e.batch_size, min(e.num_samples, (c + 1) * e.batch_size)))
                x, _, _ = generate(self.model, self.flow_path, self.conditions, indices, self.shape,
                                   self.eval_cfg.sampler, e.seed, device, key=c)
                images = to_uint8(self.decoder(x)).permute(0, 2, 3, 1).cpu().numpy()
                out.append((c, {"images": images, "labels": self.conditions.class_ids(indices, key=c)}))
        finally:
            self.model.to("cpu")  # training never holds a second full model on the GPU
        return out

    def _score(self, step: int, parts: list, start: float):
        failed = [rank for rank, part in enumerate(parts) if part is None]
        if failed:
            raise RuntimeError(f"the sampling failed on rank(s) {failed} (see their warnings)")
        chunks = [chunk for _, chunk in sorted((c for part in parts for c in part), key=lambda item: item[0])]
        samples = {key: np.concatenate([chunk[key] for chunk in chunks]) for key in ("images", "labels")}
        e = self.eval_cfg.eval
        if self.inception is None and any(m in INCEPTION_METRICS for m in e.metrics):
            self.inception = InceptionFeatures(e.inception_weights, device="cpu", batch_size=e.inception_batch_size)
        # pafm.eval caches the samples' Inception features in its folder: each evaluation needs a fresh one.
        out = self.run_dir / "eval" / f"during_training_step_{step:07d}"
        result, _ = score(self.eval_cfg, e.metrics, samples, out, self.world.device, net=self.inception)
        if self.inception is not None:
            self.inception.to("cpu")
        self.logger.eval_row(step, result, seconds=time.perf_counter() - start, samples=len(samples["images"]))
        plot_scores(self.logger.path, self.run_dir / PLOT_NAME)


def plot_scores(metrics_path: Path, out: Path):
    """One panel per metric: its value at each evaluation of the run so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if "eval" in r]
    names = sorted({k for r in rows for k, v in r["eval"].items() if isinstance(v, (int, float))})
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        points = [(r["step"], r["eval"][name]) for r in rows if name in r["eval"]]
        ax.plot(*zip(*points), marker="o")
        ax.set_title(name)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)

