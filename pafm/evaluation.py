"""The evaluation protocol behind `pafm.eval` (and the trainer's evaluations): N samples of an EMA export drawn in
chunks spread over ranks, resumable, then scored with `pafm.metrics` and reported in OUT/eval.json.

Samples are drawn in chunks of eval.batch_size; chunk c goes to rank c % world_size and is written to
OUT/chunks/chunk_<c>.npz when done, so a stopped evaluation resumes by skipping finished chunks.  Rank 0 then writes
OUT/samples.npz (ADM format: arr_0 uint8 NHWC, arr_1 class ids), computes the metrics and writes OUT/eval.json.
OUT is eval.out_dir, by default RUN/eval/<sampler>-cfg<scale>-n<N>-seed<seed>-<hash of the settings>.

Every check (config, export, reference, Inception weights, conditions, output folder) runs on every rank before any
sampling; a user error stops every rank (`all_ranks_agree`).
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist

from pafm.cli import USER_ERRORS, SharedError, all_ranks_agree, one_line
from pafm.config import (INTEGER, Allowed, ConfigError, at_least, each, load_config, section, setting, to_dict,
                         within, words)
from pafm.data import load_digits_split, load_mnist_split
from pafm.distributed import cleanup, init_distributed, launched
from pafm.export import dataset_info, export_staleness, load_export, read_export_meta, resolve_export
from pafm.files import atomic_savez, atomic_write_text
from pafm.generate import Conditions, Decoder, check_guided_channels, generate, latent_shape
from pafm.metrics import (DigitsJudge, InceptionFeatures, MnistJudge, check_reference, default_mnist_cnn,
                          from_uint8_nhwc, inception_metrics, read_reference_images, read_reference_statistics,
                          to_uint8)
from pafm.models.interop import import_checkpoint, is_torch_checkpoint
from pafm.paths import build_path
from pafm.sampling import SamplerConfig

INCEPTION_METRICS = ("fid", "isc", "prc", "kid")
METRICS = INCEPTION_METRICS + ("digits", "mnist")
METRIC_LIST = each(Allowed(lambda m: m in METRICS, f"one of {list(METRICS)}"))  # what `eval.metrics` allows


@section("eval")
class EvalSection:
    """num_samples: total N (null: the ImageNet protocol's 50000; 1000 for the built-in digits and MNIST).
    batch_size: samples per chunk (per rank at a time).  labels: random (i.i.d. uniform, DiT's and SiT's protocol) or
    balanced (sample i gets class i % num_classes).  metrics: any of fid, isc, prc, kid, digits, mnist; null picks
    'digits' for builtin:digits* data, 'mnist' for builtin:mnist and [fid, isc, prc] otherwise.  reference: a folder
    of images, an .npz with arr_0 (uint8 NHWC) and/or mu, sigma.  inception_weights: local torch-fidelity Inception
    file (else torch-fidelity downloads it).
    vae, checkpoint_format: for a SiT or REPA .pt checkpoint only: the diffusers AutoencoderKL folder decoding its
    latents, and auto | sit | repa."""

    num_samples: Optional[int] = setting(None, within(1, 10**7, "null: by dataset"))
    batch_size: int = setting(125, within(1, 65536))
    seed: int = setting(0, INTEGER)
    labels: Literal["random", "balanced"] = "random"
    out_dir: Optional[str] = setting(None, words("a folder"))
    metrics: Optional[list[str]] = setting(None, METRIC_LIST)
    reference: Optional[str] = setting(None, words("a folder of images or an .npz"))
    inception_weights: Optional[str] = setting(None, words("a torch-fidelity Inception file"))
    inception_batch_size: int = setting(64, within(1, 65536))
    isc_splits: int = setting(10, at_least(1))
    kid_subset_size: int = setting(1000, at_least(1))
    save_npz: bool = True
    device: str = setting("auto", words("auto, cpu, cuda or cuda:N"))
    vae: Optional[str] = setting(None, words("a diffusers AutoencoderKL folder"))
    checkpoint_format: Literal["auto", "sit", "repa"] = "auto"


@section("")
class EvalConfig:
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)


SEED_RULE = ("chunk c (eval.batch_size samples) draws its conditions, initial noise and SDE noise from CPU generators "
             "seeded by sha256(eval.seed, c, stream)")


def resolve_eval_defaults(cfg: EvalConfig, meta: dict) -> None:
    """Fill eval.num_samples and eval.metrics where they are null, from the export's dataset."""
    spec = str((meta.get("data") or {}).get("spec", ""))
    digits, mnist = spec.startswith("builtin:digits"), spec == "builtin:mnist"
    if cfg.eval.num_samples is None:
        cfg.eval.num_samples = 1000 if digits or mnist else 50000
    if cfg.eval.metrics is None:
        cfg.eval.metrics = ["digits"] if digits else ["mnist"] if mnist else ["fid", "isc", "prc"]


def check_eval_config(cfg: EvalConfig, meta: dict) -> None:
    """Raise ConfigError for settings that cannot work with the export's dataset, before anything is sampled (after
    `resolve_eval_defaults`)."""
    e, metrics = cfg.eval, cfg.eval.metrics
    spec, info = str((meta.get("data") or {}).get("spec", "")), dataset_info(meta)
    if "mnist" in metrics and spec != "builtin:mnist":
        raise ConfigError(f"eval.metrics 'mnist' needs a model of builtin:mnist, not of {spec or 'this dataset'}")
    if "digits" in metrics and (list(info.get("latent_shape") or []) != [1, 8, 8]
                                or (info.get("encoder") or {"kind": "identity"}).get("kind") != "identity"):
        raise ConfigError(f"eval.metrics 'digits' needs a model of 8x8 single-channel digits (builtin:digits), not "
                          f"of {spec or 'this dataset'}")
    wanted = [m for m in metrics if m in INCEPTION_METRICS]
    if any(m in metrics for m in ("fid", "prc", "kid")) and e.reference is None:
        raise ConfigError("eval.reference is required for fid/prc/kid: a folder of images, an .npz with arr_0 "
                          "(uint8 NHWC), or an .npz with mu and sigma (e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
    if e.reference is not None:
        check_reference(e.reference, wanted)
    if e.inception_weights is not None and wanted and not Path(e.inception_weights).expanduser().is_file():
        raise ConfigError(f"eval.inception_weights: {e.inception_weights} does not exist (needed for "
                          f"{', '.join(wanted)}); download weights-inception-2015-12-05-6726825d.pth from "
                          f"torch-fidelity's releases and point eval.inception_weights at it")
    check_guided_channels(cfg.sampler.cfg_channels, meta, "sampler.cfg_channels")
    if "isc" in metrics and e.num_samples < e.isc_splits:
        raise ConfigError(f"eval.isc_splits={e.isc_splits} needs at least as many samples, eval.num_samples is "
                          f"{e.num_samples}")


def check_import_options(cfg: EvalConfig, imported: bool) -> None:
    """eval.vae and eval.checkpoint_format belong to SiT and REPA checkpoints; their samples are SD-VAE latents."""
    if not imported:
        for key, default in (("vae", None), ("checkpoint_format", "auto")):
            if getattr(cfg.eval, key) != default:
                raise ConfigError(f"eval.{key} applies to SiT and REPA .pt checkpoints only; an export records "
                                  f"its own decoder and format")
        return
    metrics = INCEPTION_METRICS if cfg.eval.metrics is None else cfg.eval.metrics  # null: fid, isc, prc
    if cfg.eval.vae is None and any(m in INCEPTION_METRICS for m in metrics):
        raise ConfigError("eval.vae is required for a SiT or REPA checkpoint: its samples are SD-VAE latents; point "
                          "it at the diffusers AutoencoderKL folder (sd-vae-ft-ema for the published numbers)")
    if cfg.eval.vae is not None and not Path(cfg.eval.vae).expanduser().is_dir():
        raise ConfigError(f"eval.vae: {cfg.eval.vae} is not a folder (a diffusers AutoencoderKL folder)")


def settings_of(cfg: EvalConfig, export_path: Path, meta: dict, conditions: Conditions) -> dict:
    """Everything that determines the samples; a resumed evaluation must match it exactly."""
    settings = {"checkpoint": str(export_path.resolve()), "step": meta.get("step"), "model": meta.get("model"),
                "num_samples": cfg.eval.num_samples, "batch_size": cfg.eval.batch_size, "seed": cfg.eval.seed,
                "labels": cfg.eval.labels, "conditions": conditions.describe(), "sampler": to_dict(cfg.sampler)}
    if "import" in meta:
        settings["import"] = {**meta["import"], "decoder": dataset_info(meta)["encoder"]}
    return settings


def default_out_dir(cfg: EvalConfig, export_path: Path, settings: dict) -> Path:
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    s = cfg.sampler
    name = f"{s.method}{s.steps if s.method != 'dopri5' else ''}-cfg{s.cfg_scale:g}-n{cfg.eval.num_samples}" \
           f"-seed{cfg.eval.seed}-{digest}"
    return export_path.parent / "eval" / name


def run_chunks(job: "Job", cfg: EvalConfig, rank: int, world: int, device) -> None:
    """Draw this rank's unfinished chunks and save each one atomically."""
    from tqdm import tqdm

    e, n, out, conditions = cfg.eval, cfg.eval.num_samples, job.out, job.conditions
    chunks = list(range(rank, math.ceil(n / e.batch_size), world))
    todo = [c for c in chunks if not (out / "chunks" / f"chunk_{c:06d}.npz").is_file()]
    flow_path, shape = build_path(job.meta.get("path", "linear")), latent_shape(job.model, job.meta)
    bar = tqdm(total=len(chunks), initial=len(chunks) - len(todo), desc="sampling chunks", disable=rank != 0,
               dynamic_ncols=True)
    for c in todo:
        indices = list(range(c * e.batch_size, min(n, (c + 1) * e.batch_size)))
        start = time.perf_counter()
        x, names, nfe = generate(job.model, flow_path, conditions, indices, shape, cfg.sampler, e.seed, device, key=c)
        images = to_uint8(job.decoder(x)).permute(0, 2, 3, 1).cpu().numpy()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        atomic_savez(out / "chunks" / f"chunk_{c:06d}.npz", images=images,
                     labels=conditions.class_ids(indices, key=c),
                     captions=np.array(names if conditions.kind == "text" else [], dtype=str),
                     nfe=np.int64(nfe), seconds=np.float64(seconds))
        bar.update(1)
    bar.close()


def collect(out: Path, cfg: EvalConfig) -> dict:
    """All chunks in order: images (N, H, W, C) uint8, labels, total sampling seconds, mean model evaluations."""
    num_chunks = math.ceil(cfg.eval.num_samples / cfg.eval.batch_size)
    images, labels, seconds, nfe = [], [], 0.0, []
    for c in range(num_chunks):
        path = out / "chunks" / f"chunk_{c:06d}.npz"
        if not path.is_file():
            raise RuntimeError(f"eval: chunk {path} is missing after sampling (did a rank fail?)")
        with np.load(path) as data:
            images.append(data["images"])
            labels.append(data["labels"])
            seconds += float(data["seconds"])
            nfe.append(int(data["nfe"]))
    return {"images": np.concatenate(images), "labels": np.concatenate(labels), "seconds": seconds,
            "nfe": float(np.mean(nfe))}


def reference_inputs(cfg: EvalConfig, metrics: list[str], extract, out: Path):
    """(reference features or None, reference statistics or None); image features are cached in OUT."""
    ref = Path(cfg.eval.reference).expanduser()
    stats = read_reference_statistics(ref) if ref.suffix == ".npz" else None
    need_images = any(m in metrics for m in ("prc", "kid")) or ("fid" in metrics and stats is None)
    if not need_images:
        return None, stats
    st = ref.stat()
    key = hashlib.sha1(f"{ref.resolve()}|{st.st_size}|{st.st_mtime_ns}|{cfg.eval.inception_weights}".encode()
                       ).hexdigest()[:10]
    cache = out / f"reference_features_{key}.npz"
    if cache.is_file():
        with np.load(cache) as data:
            return {k: torch.from_numpy(data[k]) for k in data.files}, stats
    feats = extract(read_reference_images(ref))
    atomic_savez(cache, **{k: v.numpy() for k, v in feats.items()})
    return feats, stats


def readme_row(report: dict) -> str:
    m, s = report["metrics"], report["sampler"]
    cfg = f"{s['cfg_scale']:g}" + (f" [{s['cfg_interval'][0]:g}, {s['cfg_interval'][1]:g}]"
                                   if tuple(s["cfg_interval"]) != (0.0, 1.0) and s["cfg_scale"] != 1 else "")
    labels = " (balanced labels)" if report.get("labels") == "balanced" else ""  # FID of balanced labels is lower
    head = (f"| {report['model']} | {report['step']} | {report['sampler_label']} | {cfg} | "
            f"{report['num_samples']}{labels} |")
    if "frechet_pixels" in m:
        acc = f"acc {m['accuracy']:.3f}" if "accuracy" in m else "acc n/a"
        return head + f" {acc} | FD(pixels) {m['frechet_pixels']:.2f} | memorised {m['memorization']:.3f} |"
    parts = [f"FID {m['fid']:.2f}" if "fid" in m else "", f"IS {m['isc']:.1f}" if "isc" in m else "",
             f"P {m['precision']:.3f} / R {m['recall']:.3f}" if "precision" in m else "",
             f"KID {m['kid']:.4f}" if "kid" in m else ""]
    return head + " " + " | ".join(p for p in parts if p) + " |"


def score(cfg: EvalConfig, metrics: list[str], samples: dict, out: Path, device,
          net: InceptionFeatures | None = None) -> tuple[dict, dict]:
    """(metrics of the samples, metrics of the reference row or {}); `net`: the Inception network, if built already."""
    result, reference = {}, {}
    if "digits" in metrics:
        images = samples["images"]
        if images.shape[1:] != (8, 8, 1):
            raise ConfigError(f"eval.metrics 'digits' needs 8x8 single-channel samples, got {images.shape[1:]}")
        judge = DigitsJudge(*load_digits_split("train"), *load_digits_split("heldout"))
        labels = samples["labels"] if (samples["labels"] >= 0).all() else None
        result.update(judge.score(from_uint8_nhwc(images), labels))
        reference.update(judge.reference())
    if "mnist" in metrics:
        images = samples["images"]
        if images.shape[1:] != (28, 28, 1):
            raise ConfigError(f"eval.metrics 'mnist' needs 28x28 single-channel samples, got {images.shape[1:]}")
        train_images = load_mnist_split("train")[0]
        judge = MnistJudge(default_mnist_cnn(), *load_mnist_split("heldout"), train_images)
        labels = samples["labels"] if (samples["labels"] >= 0).all() else None
        result.update(judge.score(from_uint8_nhwc(images), labels))
        reference.update(judge.reference(train_images, size=len(images)))
    wanted = [m for m in metrics if m in INCEPTION_METRICS]
    if wanted:
        if net is None:
            net = InceptionFeatures(cfg.eval.inception_weights, device="cpu", batch_size=cfg.eval.inception_batch_size)
        net = net.to(device)
        weights_key = hashlib.sha1(str(cfg.eval.inception_weights).encode()).hexdigest()[:8]
        # kept, so metrics against another reference skip the extraction
        cache = out / f"sample_features_{weights_key}.npz"
        if cache.is_file():
            with np.load(cache) as data:
                feats = {k: torch.from_numpy(data[k]) for k in data.files}
        else:
            feats = net(samples["images"])
            atomic_savez(cache, **{k: v.numpy() for k, v in feats.items()})
        ref_feats, ref_stats = (None, None)
        if cfg.eval.reference is not None:
            ref_feats, ref_stats = reference_inputs(cfg, wanted, net, out)
        result.update(inception_metrics(feats, wanted, reference_features=ref_feats, reference_stats=ref_stats,
                                        isc_splits=cfg.eval.isc_splits, kid_subset_size=cfg.eval.kid_subset_size,
                                        seed=cfg.eval.seed))
    return result, reference


@dataclasses.dataclass
class Job:
    """What the checks produced: the export, its model, the conditions and decoder, and where samples go."""

    export_path: Path
    meta: dict
    metrics: list[str]
    model: torch.nn.Module
    conditions: Conditions
    decoder: Decoder
    settings: dict
    out: Path
    export_warning: Optional[str]
    inception: Optional[InceptionFeatures]


def prepare(checkpoint, cfg: EvalConfig, rank: int, device) -> Job:
    """Every check before sampling (cheapest first), on every rank; rank 0 also builds the Inception network now, so
    a wrong or undownloadable weight file stops the evaluation before sampling rather than after it."""
    model, imported = None, is_torch_checkpoint(checkpoint)
    check_import_options(cfg, imported)
    if imported:  # SiT's or REPA's own checkpoint: the import reads the weights to learn the architecture
        export_path = Path(checkpoint).expanduser()
        model, meta = import_checkpoint(export_path, cfg.eval.checkpoint_format, vae=cfg.eval.vae, device=device)
    else:
        export_path = resolve_export(checkpoint)
        meta = read_export_meta(export_path)
    resolve_eval_defaults(cfg, meta)
    check_eval_config(cfg, meta)
    metrics = cfg.eval.metrics
    if model is None:
        model, meta = load_export(export_path, device=device)
    conditions = Conditions(model, meta, order=cfg.eval.labels, seed=cfg.eval.seed)
    decoder = Decoder(dataset_info(meta), device)
    settings = settings_of(cfg, export_path, meta, conditions)
    out = Path(cfg.eval.out_dir).expanduser() if cfg.eval.out_dir else default_out_dir(cfg, export_path, settings)
    stored = out / "settings.json"  # every rank checks, so a mismatch stops all of them
    if stored.is_file() and json.loads(stored.read_text()) != json.loads(json.dumps(settings)):
        raise ConfigError(f"{out} holds chunks of a different evaluation (settings.json differs); choose "
                          f"another eval.out_dir or delete {out}")
    inception = None
    if rank == 0 and any(m in INCEPTION_METRICS for m in metrics):
        inception = InceptionFeatures(cfg.eval.inception_weights, device="cpu",
                                      batch_size=cfg.eval.inception_batch_size)
    warning = None if imported else export_staleness(export_path)
    if rank == 0:
        if warning:
            print(warning, file=sys.stderr, flush=True)
        if conditions.kind == "text" and conditions.caption_split not in (None, "heldout"):
            print(f"note: {conditions.describe()['items']}: the samples are conditioned on training captions",
                  file=sys.stderr, flush=True)
        (out / "chunks").mkdir(parents=True, exist_ok=True)  # here, so an unwritable eval.out_dir stops every rank
    return Job(export_path, meta, metrics, model, conditions, decoder, settings, out, warning, inception)


def sample_everywhere(job: Job, cfg: EvalConfig, rank: int, world: int, device) -> None:
    """Every rank draws its chunks into job.out/chunks (rank 0 records the settings first)."""
    if world > 1:
        dist.barrier()
    if rank == 0:
        if not (job.out / "settings.json").is_file():
            atomic_write_text(job.out / "settings.json", json.dumps(job.settings, indent=2))
    if world > 1:
        dist.barrier()
    run_chunks(job, cfg, rank, world, device)
    if world > 1:
        dist.barrier()


def evaluate(checkpoint, overrides: list[str] | None = None, config_file=None) -> dict | None:
    """Run the evaluation (all ranks); returns the report on rank 0, None elsewhere."""
    try:
        cfg = load_config(EvalConfig, config_file, overrides)
        # Ranks meet at barriers after their share of the sampling, which resumed chunks can make uneven, so a
        # collective may wait far longer than a training step's; a dead rank still ends the job through torchrun.
        world = init_distributed(cfg.eval.device, timeout=datetime.timedelta(hours=6), group_when_alone=False)
    except USER_ERRORS as err:  # the same arguments on every rank: every rank stops here, rank 0 reports
        if launched()[1] > 1:
            raise SharedError(one_line(err)) from None
        raise
    try:
        job = all_ranks_agree(prepare, checkpoint, cfg, world.rank, world.device)
        sample_everywhere(job, cfg, world.rank, world.size, world.device)
    finally:
        if world.size > 1:
            cleanup()
    if not world.is_main:
        return None
    return finish(job, cfg, world.device)


def finish(job: Job, cfg: EvalConfig, device) -> dict:
    """Rank 0: gather the chunks, score them, write samples.npz and eval.json; returns the report."""
    out, meta, model = job.out, job.meta, job.model
    samples = collect(out, cfg)
    if cfg.eval.save_npz:
        atomic_savez(out / "samples.npz", arr_0=samples["images"], arr_1=samples["labels"])
    start = time.perf_counter()
    result, reference = score(cfg, job.metrics, samples, out, device, net=job.inception)
    n, num_cls = cfg.eval.num_samples, (getattr(model, "num_classes", None) if model.cond_kind == "class" else None)
    report = {
        "checkpoint": str(job.export_path), "step": meta.get("step"), "export_step": meta.get("step"),
        "export_warning": job.export_warning, "model": (meta.get("model") or {}).get("name"),
        "import": meta.get("import"),
        "data": (meta.get("data") or {}).get("spec"), "path": meta.get("path", "linear"),
        "num_samples": n, "labels": cfg.eval.labels, "seed_rule": SEED_RULE,
        "conditions": job.conditions.describe(),
        "classes_balanced": cfg.eval.labels == "balanced" and bool(num_cls) and n % num_cls == 0,
        "batch_size": cfg.eval.batch_size, "seed": cfg.eval.seed,
        "sampler": to_dict(cfg.sampler), "sampler_label": cfg.sampler.describe(),
        "cfg_scale": cfg.sampler.cfg_scale, "cfg_interval": list(cfg.sampler.cfg_interval),
        "model_evaluations_per_sample": samples["nfe"],
        "metrics": result, "reference_metrics": reference, "reference": cfg.eval.reference,
        "inception_weights": cfg.eval.inception_weights if any(m in INCEPTION_METRICS for m in job.metrics) else None,
        "out_dir": str(out), "samples_npz": str(out / "samples.npz") if cfg.eval.save_npz else None,
        "timings": {"sampling_s": samples["seconds"], "sampling_s_per_sample": samples["seconds"] / n,
                    "metrics_s": time.perf_counter() - start},
    }
    report["readme_row"] = readme_row(report)
    atomic_write_text(out / "eval.json", json.dumps(report, indent=2))
    return report
