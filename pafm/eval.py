"""Generate N samples from an EMA export, spread over ranks, and score them; resumable.

    torchrun --nproc_per_node=8 -m pafm.eval RUN eval.num_samples=50000 eval.reference=VIRTUAL_imagenet256_labeled.npz \
        eval.inception_weights=weights-inception-2015-12-05-6726825d.pth sampler.method=sde sampler.steps=250
    python -m pafm.eval RUN_DIGITS sampler.cfg_scale=2.0          # the digits: accuracy, pixel FD, memorisation

Samples are drawn in chunks of eval.batch_size (classes balanced: sample i has class i % num_classes); chunk c goes to
rank c % world_size and is written to OUT/chunks/chunk_<c>.npz when done, so a stopped evaluation resumes by skipping
finished chunks, and a chunk's samples do not depend on the number of ranks.  Rank 0 then writes OUT/samples.npz
(ADM format: arr_0 uint8 NHWC, arr_1 class ids), computes the metrics and writes OUT/eval.json.
OUT is eval.out_dir, by default RUN/eval/<sampler>-cfg<scale>-n<N>-seed<seed>-<hash of the settings>.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from pafm.config import ConfigError, load_config, to_dict
from pafm.export import load_export, resolve_export
from pafm.metrics import DigitsJudge, InceptionFeatures, inception_metrics, load_images, load_statistics, to_uint8
from pafm.paths import build_path
from pafm.sample import Conditions, Decoder, generate, latent_shape, pick_device
from pafm.sampling import SamplerConfig

INCEPTION_METRICS = ("fid", "isc", "prc", "kid")


@dataclasses.dataclass
class EvalSection:
    """num_samples: total N (null: the ImageNet protocol's 50000, 50 per class; 1000 for the built-in digits).  batch_size: samples per chunk (per rank at a
    time).  metrics: any of fid, isc, prc, kid, digits; null picks 'digits' for builtin:digits* data and
    [fid, isc, prc] otherwise.  reference: a folder of images, an .npz with arr_0 (uint8 NHWC) and/or mu, sigma.
    inception_weights: local torch-fidelity Inception file (else torch-fidelity downloads it)."""

    num_samples: Optional[int] = None
    batch_size: int = 125
    seed: int = 0
    out_dir: Optional[str] = None
    metrics: Optional[list[str]] = None
    reference: Optional[str] = None
    inception_weights: Optional[str] = None
    inception_batch_size: int = 64
    isc_splits: int = 10
    kid_subset_size: int = 1000
    save_npz: bool = True
    device: str = "auto"


@dataclasses.dataclass
class EvalConfig:
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)


def check_eval_config(cfg: EvalConfig, meta: dict) -> list[str]:
    """Validate; returns the metric list (auto-filled)."""
    e = cfg.eval
    spec = str((meta.get("data") or {}).get("spec", ""))
    if e.num_samples is None:
        e.num_samples = 1000 if spec.startswith("builtin:digits") else 50000
    if e.num_samples < 1:
        raise ConfigError(f"eval.num_samples must be >= 1, got {e.num_samples}")
    if e.batch_size < 1:
        raise ConfigError(f"eval.batch_size must be >= 1, got {e.batch_size}")
    metrics = list(e.metrics) if e.metrics is not None else (
        ["digits"] if spec.startswith("builtin:digits") else ["fid", "isc", "prc"])
    unknown = set(metrics) - set(INCEPTION_METRICS) - {"digits"}
    if unknown:
        raise ConfigError(f"eval.metrics: unknown {sorted(unknown)}; valid: {list(INCEPTION_METRICS) + ['digits']}")
    if any(m in metrics for m in ("fid", "prc", "kid")) and e.reference is None:
        raise ConfigError("eval.reference is required for fid/prc/kid: a folder of images, an .npz with arr_0 "
                          "(uint8 NHWC), or an .npz with mu and sigma (e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
    if e.reference is not None and not Path(e.reference).expanduser().exists():
        raise ConfigError(f"eval.reference: {e.reference} does not exist")
    return metrics


def _atomic_savez(path: Path, **arrays) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def settings_of(cfg: EvalConfig, export_path: Path, meta: dict) -> dict:
    """Everything that determines the samples; a resumed evaluation must match it exactly."""
    return {"checkpoint": str(export_path.resolve()), "step": meta.get("step"), "model": meta.get("model"),
            "num_samples": cfg.eval.num_samples, "batch_size": cfg.eval.batch_size, "seed": cfg.eval.seed,
            "sampler": to_dict(cfg.sampler)}


def default_out_dir(cfg: EvalConfig, export_path: Path, settings: dict) -> Path:
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    s = cfg.sampler
    name = f"{s.method}{s.steps if s.method != 'dopri5' else ''}-cfg{s.cfg_scale:g}-n{cfg.eval.num_samples}" \
           f"-seed{cfg.eval.seed}-{digest}"
    return export_path.parent / "eval" / name


def run_chunks(model, meta, cfg: EvalConfig, out: Path, rank: int, world: int, device) -> None:
    """Draw this rank's unfinished chunks and save each one atomically."""
    from tqdm import tqdm

    e, n = cfg.eval, cfg.eval.num_samples
    chunks = list(range(rank, math.ceil(n / e.batch_size), world))
    todo = [c for c in chunks if not (out / "chunks" / f"chunk_{c:06d}.npz").is_file()]
    conditions = Conditions(model, meta)
    decoder = Decoder((meta.get("data") or {}).get("info") or {}, device)
    path, shape = build_path(meta.get("path", "linear")), latent_shape(model, meta)
    bar = tqdm(total=len(chunks), initial=len(chunks) - len(todo), desc="sampling chunks", disable=rank != 0,
               dynamic_ncols=True)
    for c in todo:
        indices = list(range(c * e.batch_size, min(n, (c + 1) * e.batch_size)))
        start = time.perf_counter()
        x, names, nfe = generate(model, path, conditions, indices, shape, cfg.sampler, e.seed, device)
        images = to_uint8(decoder(x)).permute(0, 2, 3, 1).cpu().numpy()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        _atomic_savez(out / "chunks" / f"chunk_{c:06d}.npz", images=images, labels=conditions.class_ids(indices),
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
    stats = load_statistics(ref) if ref.suffix == ".npz" else None
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
    feats = extract(load_images(ref))
    _atomic_savez(cache, **{k: v.numpy() for k, v in feats.items()})
    return feats, stats


def readme_row(report: dict) -> str:
    m, s = report["metrics"], report["sampler"]
    cfg = f"{s['cfg_scale']:g}" + (f" [{s['cfg_interval'][0]:g}, {s['cfg_interval'][1]:g}]"
                                   if tuple(s["cfg_interval"]) != (0.0, 1.0) and s["cfg_scale"] != 1 else "")
    head = f"| {report['model']} | {report['step']} | {report['sampler_label']} | {cfg} | {report['num_samples']} |"
    if "frechet_pixels" in m:
        acc = f"acc {m['accuracy']:.3f}" if "accuracy" in m else "acc n/a"
        return head + f" {acc} | FD(pixels) {m['frechet_pixels']:.2f} | memorised {m['memorization']:.3f} |"
    parts = [f"FID {m['fid']:.2f}" if "fid" in m else "", f"IS {m['isc']:.1f}" if "isc" in m else "",
             f"P {m['precision']:.3f} / R {m['recall']:.3f}" if "precision" in m else "",
             f"KID {m['kid']:.4f}" if "kid" in m else ""]
    return head + " " + " | ".join(p for p in parts if p) + " |"


def score(cfg: EvalConfig, metrics: list[str], samples: dict, out: Path, device) -> tuple[dict, dict]:
    """(metrics of the samples, metrics of the reference row or {})."""
    result, reference = {}, {}
    if "digits" in metrics:
        images = samples["images"]
        if images.shape[1:] != (8, 8, 1):
            raise ConfigError(f"eval.metrics 'digits' needs 8x8 single-channel samples, got {images.shape[1:]}")
        judge = DigitsJudge()
        floats = images.astype(np.float64).transpose(0, 3, 1, 2) / 127.5 - 1.0
        labels = samples["labels"] if (samples["labels"] >= 0).all() else None
        result.update(judge.score(floats, labels))
        reference.update(judge.reference())
    wanted = [m for m in metrics if m in INCEPTION_METRICS]
    if wanted:
        net = InceptionFeatures(cfg.eval.inception_weights, device=device, batch_size=cfg.eval.inception_batch_size)
        weights_key = hashlib.sha1(str(cfg.eval.inception_weights).encode()).hexdigest()[:8]
        # kept, so metrics against another reference skip the extraction
        cache = out / f"sample_features_{weights_key}.npz"
        if cache.is_file():
            with np.load(cache) as data:
                feats = {k: torch.from_numpy(data[k]) for k in data.files}
        else:
            feats = net(samples["images"])
            _atomic_savez(cache, **{k: v.numpy() for k, v in feats.items()})
        ref_feats, ref_stats = (None, None)
        if cfg.eval.reference is not None:
            ref_feats, ref_stats = reference_inputs(cfg, wanted, net, out)
        result.update(inception_metrics(feats, wanted, reference_features=ref_feats, reference_stats=ref_stats,
                                        isc_splits=cfg.eval.isc_splits, kid_subset_size=cfg.eval.kid_subset_size,
                                        seed=cfg.eval.seed))
    return result, reference


def evaluate(checkpoint, overrides: list[str] | None = None, config_file=None) -> dict | None:
    """Run the evaluation (all ranks); returns the report on rank 0, None elsewhere."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cfg = load_config(EvalConfig, config_file, overrides)
    device = pick_device(cfg.eval.device)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        # Ranks wait at the barrier for the slowest rank's whole share of chunks on a resume: allow hours, not NCCL's
        # default 10 minutes.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    try:
        export_path = resolve_export(checkpoint)
        model, meta = load_export(export_path, device=device)
        metrics = check_eval_config(cfg, meta)
        settings = settings_of(cfg, export_path, meta)
        out = Path(cfg.eval.out_dir).expanduser() if cfg.eval.out_dir else default_out_dir(cfg, export_path, settings)
        stored = out / "settings.json"  # every rank checks, so a mismatch stops all of them
        if stored.is_file() and json.loads(stored.read_text()) != json.loads(json.dumps(settings)):
            raise ConfigError(f"{out} holds chunks of a different evaluation (settings.json differs); choose "
                              f"another eval.out_dir or delete {out}")
        if world > 1:
            dist.barrier()
        if rank == 0:
            (out / "chunks").mkdir(parents=True, exist_ok=True)
            if not stored.is_file():
                _atomic_write_text(stored, json.dumps(settings, indent=2))
        if world > 1:
            dist.barrier()
        run_chunks(model, meta, cfg, out, rank, world, device)
        if world > 1:
            dist.barrier()
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return None

    samples = collect(out, cfg)
    if cfg.eval.save_npz:
        _atomic_savez(out / "samples.npz", arr_0=samples["images"], arr_1=samples["labels"])
    start = time.perf_counter()
    result, reference = score(cfg, metrics, samples, out, device)
    n, num_cls = cfg.eval.num_samples, (getattr(model, "num_classes", None) if model.cond_kind == "class" else None)
    report = {
        "checkpoint": str(export_path), "step": meta.get("step"), "model": (meta.get("model") or {}).get("name"),
        "data": (meta.get("data") or {}).get("spec"), "path": meta.get("path", "linear"),
        "num_samples": n, "classes_balanced": bool(num_cls) and n % num_cls == 0,
        "batch_size": cfg.eval.batch_size, "seed": cfg.eval.seed,
        "sampler": to_dict(cfg.sampler), "sampler_label": cfg.sampler.describe(),
        "cfg_scale": cfg.sampler.cfg_scale, "cfg_interval": list(cfg.sampler.cfg_interval),
        "model_evaluations_per_sample": samples["nfe"],
        "metrics": result, "reference_metrics": reference, "reference": cfg.eval.reference,
        "inception_weights": cfg.eval.inception_weights if any(m in INCEPTION_METRICS for m in metrics) else None,
        "out_dir": str(out), "samples_npz": str(out / "samples.npz") if cfg.eval.save_npz else None,
        "timings": {"sampling_s": samples["seconds"], "sampling_s_per_sample": samples["seconds"] / n,
                    "metrics_s": time.perf_counter() - start},
    }
    report["readme_row"] = readme_row(report)
    _atomic_write_text(out / "eval.json", json.dumps(report, indent=2))
    return report


def main(argv=None):
    p = argparse.ArgumentParser(prog="torchrun -m pafm.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="run folder (uses RUN/ema.safetensors) or an export .safetensors file")
    p.add_argument("overrides", nargs="*", help="config overrides a.b=value (eval.*, sampler.*)")
    p.add_argument("--config", default=None, help="YAML file with eval: and sampler: sections")
    args = p.parse_args(argv)
    report = evaluate(args.checkpoint, args.overrides, args.config)
    if report is not None:
        print(json.dumps(report["metrics"], indent=2))
        print(report["readme_row"])
        print(f"report: {Path(report['out_dir']) / 'eval.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
