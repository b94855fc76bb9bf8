"""The trainer: `torchrun --nproc_per_node=N -m pafm.train CONFIG [a.b=value ...]` (or `python -m pafm.train ...`).

Reads top to bottom: config -> process group -> data -> model (FSDP2 per block) -> optimizer, EMA, objective ->
resume -> the step loop (micro-batches, clipping, skip of non-finite steps, EMA) -> logs, samples, checkpoints.
"""
from __future__ import annotations

import json
import math
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.distributed as dist

from pafm.checkpoint import complete_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from pafm.config import ConfigError, load_config, save_config, to_dict
from pafm.distributed import World, all_reduce, cleanup, init_distributed, shard_model
from pafm.ema import EMA
from pafm.objectives import T_BINS, ObjectiveConfig, Objective, flow_loss, step_generator, t_bin_stats

USAGE = "usage: [torchrun --nproc_per_node=N] python -m pafm.train CONFIG.yaml [key.sub=value ...]"


# --- config -------------------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    dir: str  # everything the run writes goes here: config.yaml, metrics.jsonl, checkpoints/, samples/, ema export


@dataclass
class DataConfig:
    spec: str = "builtin:digits"  # a dataset folder written by `pafm.prep`, or builtin:digits / builtin:digits-captions
    batch_size: int = 256  # global batch per optimizer step (all ranks, all accumulation steps)
    micro_batch_size: Optional[int] = None  # rows per rank per forward; default batch_size / world size
    flip: bool = True  # pick the stored horizontally flipped copy with probability 1/2
    num_workers: int = 2
    validate: bool = True  # full check of the shards (checksums, NaN/Inf) before the first step


@dataclass
class ModelConfig:
    name: str = "SiT-B/2"
    kwargs: dict = field(default_factory=dict)  # extra arguments; input size, channels and classes come from the data


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still computed and logged)


@dataclass
class TrainConfig:
    steps: int
    seed: int
    resume: str  # "auto" (newest complete checkpoint in run.dir, else start fresh), "none", or a checkpoint folder
    precision: Literal["fp32", "bf16"] = "bf16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False  # torch.compile per block
    activation_checkpointing: bool = False
    ema_decay: float = 0.9999
    max_bad_steps: int = 20  # this many non-finite steps in a row stop the run (after a checkpoint)


@dataclass
class CheckpointConfig:
    every: int
    keep: int = 2


@dataclass
class LogConfig:
    every: int = 50
    sample_every: int = 0  # a grid every N steps and at the end; 0: only at the end; -1: never
    sample_steps: int = 32  # Heun steps of the sample grid
    sample_cfg: float = 1.0
    tensorboard: bool = True
    progress: bool = True


@dataclass
class Config:
    run: RunConfig
    train: TrainConfig
    objective: ObjectiveConfig
    checkpoint: CheckpointConfig
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)


class SetupError(RuntimeError):
    """A problem with the run's inputs that the user must fix (reported without a traceback)."""


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many non-finite steps); a checkpoint was written first."""


# --- helpers ------------------------------------------------------------------------------------------------------
def learning_rate(cfg: OptimConfig, step: int, total: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def model_kwargs(cfg: ModelConfig, info: dict) -> dict:
    """The data decides input size, channels, classes and text dims unless the config sets them."""
    c, h, _ = info["latent_shape"]
    derived = {"input_size": h, "in_channels": c}
    if info["kind"] == "class":
        derived["num_classes"] = int(info["num_classes"])
    else:
        derived.update(text_dim=info["text_dim"], pooled_dim=info["pooled_dim"], max_text_len=info["max_text_len"])
    return {**derived, **cfg.kwargs}


def condition(batch: dict, device):
    if "tokens" in batch:
        return {k: batch[k].to(device, non_blocking=True) for k in ("tokens", "mask", "pooled")}
    return batch["label"].to(device, non_blocking=True)


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, checkpoints and exits cleanly."""

    def __init__(self):
        self.requested = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name


def rank0_error_check(world: World, fn):
    """Run fn on rank 0 only and re-raise its user-facing error on every rank (so no rank waits forever)."""
    message = [None]
    if world.is_main:
        try:
            fn()
        except (ValueError, FileNotFoundError) as err:
            message[0] = f"{type(err).__name__}: {err}"
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise SetupError(message[0])


# --- the run ------------------------------------------------------------------------------------------------------
def train(cfg: Config, world: World) -> dict:
    from pafm.data import LatentLoader, open_dataset
    from pafm.export import save_export
    from pafm.models import build_model

    run_dir = Path(cfg.run.dir)
    ckpt_dir = run_dir / "checkpoints"
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    device = world.device

    # Data: validated on rank 0 before anything expensive.
    dataset = open_dataset(cfg.data.spec, split="train")
    if cfg.data.validate:
        rank0_error_check(world, dataset.validate)
    info = dataset.info
    if cfg.data.batch_size % world.size:
        raise SetupError(f"data.batch_size={cfg.data.batch_size} is not divisible by the world size {world.size}")
    micro = cfg.data.micro_batch_size or cfg.data.batch_size // world.size
    accum, rest = divmod(cfg.data.batch_size, micro * world.size)
    if rest or accum == 0:
        raise SetupError(f"data.batch_size={cfg.data.batch_size} must be a multiple of data.micro_batch_size={micro} "
                         f"x world size {world.size}")
    use_neighbors = cfg.objective.kind == "pafm" and cfg.objective.source == "neighbors"
    loader = LatentLoader(dataset, micro, rank=world.rank, world_size=world.size, seed=cfg.train.seed,
                          flip=cfg.data.flip, num_workers=cfg.data.num_workers,
                          neighbors=cfg.objective.candidates if use_neighbors else 0)

    # Model: identical initialisation on every rank, then FSDP2.
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.name, **model_kwargs(cfg.model, info))
    if (model.cond_kind == "text") != (info["kind"] == "text"):
        raise SetupError(f"model {cfg.model.name} is {model.cond_kind}-conditional but dataset {cfg.data.spec} "
                         f"has {info['kind']} conditions")
    model_config = model.config
    model.to(device)
    shard_model(model, world, bf16=cfg.train.precision == "bf16",
                activation_checkpointing=cfg.train.activation_checkpointing, compile=cfg.train.compile)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps)
    ema = EMA(model, cfg.train.ema_decay)
    objective = Objective(cfg.objective, info, device)
    bank = objective.source if cfg.objective.kind == "pafm" and cfg.objective.source == "bank" else None

    # Resume.
    step, skipped, bad_in_row = 0, 0, 0
    ckpt = None
    if cfg.train.resume == "auto":
        ckpt = latest_checkpoint(ckpt_dir)
    elif cfg.train.resume != "none":
        ckpt = Path(cfg.train.resume)
        if not ckpt.is_dir():
            raise SetupError(f"train.resume={cfg.train.resume}: no such checkpoint folder")
    existing = complete_checkpoints(ckpt_dir)
    if ckpt is None and existing:
        raise SetupError(f"{ckpt_dir} already holds checkpoints (up to step {existing[-1][0]}) and train.resume=none: "
                         "use train.resume=auto to continue, or a new run.dir")
    if ckpt is not None:
        meta, tensors = load_checkpoint(ckpt, model, optimizer, ema)
        step, skipped, bad_in_row = meta["step"], meta["skipped"], meta["bad_in_row"]
        later = [s for s, _ in existing if s > step]
        if later:  # continuing would interleave two runs' checkpoints and let resume=auto pick the abandoned one
            raise SetupError(f"resuming from step {step}, but {ckpt_dir} holds a later checkpoint (step {later[-1]}): "
                             "resume from an older step in a new run.dir")
        loader.load_state_dict(meta["loader"])
        if bank is not None:
            bank.load_state_dict({"entries": tensors["bank.entries"], "count": tensors["bank.count"]})
        if world.is_main:
            print(f"resumed from {ckpt} at step {step}", flush=True)

    export_meta = {"model": model_config, "data": {"spec": cfg.data.spec, "info": info},
                   "path": cfg.objective.path, "objective": cfg.objective.kind, "config": to_dict(cfg)}
    metrics_path = run_dir / "metrics.jsonl"
    if world.is_main:
        _truncate_metrics(metrics_path, step)
    writer = _tensorboard(run_dir) if world.is_main and cfg.log.tensorboard else None
    bar = None
    if world.is_main and cfg.log.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=step, desc="train", dynamic_ncols=True)

    def checkpoint():
        rank_meta = {"step": step, "skipped": skipped, "bad_in_row": bad_in_row, "loader": loader.state_dict()}
        rank_tensors = {"bank." + k: v for k, v in bank.state_dict().items()} if bank is not None else {}
        folder = save_checkpoint(ckpt_dir, step, model, optimizer, ema, rank_meta, rank_tensors, cfg.checkpoint.keep)
        export = ema.full_state_dict()
        if world.is_main:
            save_export(run_dir / "ema.safetensors", export, {**export_meta, "step": step})
        return folder

    def sample_grid():
        export = ema.full_state_dict()
        if world.is_main:
            from pafm.sample import save_training_grid

            save_training_grid(export, {**export_meta, "step": step}, run_dir / "samples" / f"step_{step:07d}.png",
                               steps=cfg.log.sample_steps, cfg_scale=cfg.log.sample_cfg, seed=cfg.train.seed)

    # FSDP2 already computes in bf16; autocast also covers tensors the model creates itself (time embeddings).
    bf16 = cfg.train.precision == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    stop = StopSignal()
    data_iter = iter(loader)
    window = torch.zeros(4, dtype=torch.float64, device=device)  # loss, fm loss, grad norm, steps
    bins = torch.zeros(3, T_BINS, dtype=torch.float64, device=device)
    window_start, window_images = time.perf_counter(), 0
    last_checkpoint = None

    while step < cfg.train.steps:
        lr = learning_rate(cfg.optim, step, cfg.train.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros(2, dtype=torch.float64, device=device)
        for m in range(accum):
            batch = next(data_iter)
            model.set_requires_gradient_sync(m == accum - 1)
            gen = step_generator(cfg.train.seed, step, m, device)
            x = batch["x"].to(device, non_blocking=True)
            draws = objective.draw(gen, micro, world.rank, world.size, device)
            z = objective.path.interpolate(x, draws.noise, draws.t)
            objective.start_candidates(x, batch, draws)
            with autocast:
                pred = model(z, draws.t, condition(batch, device), drop=draws.drop)
            target, u, diagnostics = objective.target(x, batch, draws)
            fm_loss = flow_loss(pred, u)
            if cfg.objective.kind == "fm":
                loss = fm_loss
            else:
                loss = (1 - cfg.objective.fm_weight) * flow_loss(pred, target) + cfg.objective.fm_weight * fm_loss
            (loss / accum).backward()
            objective.finish_candidates(x, batch)
            step_loss += torch.stack([loss.detach(), fm_loss.detach()]).double() / accum
            bins += t_bin_stats(draws.t, diagnostics)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        all_reduce(step_loss)
        step_loss /= world.size
        finite = bool(torch.isfinite(step_loss).all() and torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
            ema.update(model)
            bad_in_row = 0
            window += torch.stack([step_loss[0], step_loss[1], grad_norm.double(), torch.ones((), device=device,
                                                                                                dtype=torch.float64)])
        else:
            skipped += 1
            bad_in_row += 1
            if world.is_main:
                print(f"step {step}: non-finite loss {step_loss[0].item()} or gradient norm {grad_norm.item()}; "
                      f"step skipped ({bad_in_row} in a row)", flush=True)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_images += cfg.data.batch_size
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss[0].item():.4f}")

        if step % cfg.log.every == 0 or step == cfg.train.steps:
            all_reduce(bins)
            elapsed = time.perf_counter() - window_start
            n = max(window[3].item(), 1.0)
            record = {
                "step": step, "loss": window[0].item() / n, "fm_loss": window[1].item() / n,
                "grad_norm": window[2].item() / n, "lr": lr, "images_per_s": window_images / elapsed,
                "sec_per_step": elapsed / max(1, window_images // cfg.data.batch_size),
                "peak_memory_gb": peak_memory_gb(device), "skipped_steps": skipped,
            }
            if cfg.objective.kind == "pafm":
                count = bins[0].clamp_min(1)
                record["ess_by_t"] = (bins[1] / count).tolist()
                record["own_weight_by_t"] = (bins[2] / count).tolist()
                record["rows_by_t"] = bins[0].long().tolist()
            if world.is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if writer is not None:
                    for key, value in record.items():
                        if isinstance(value, list):
                            for i, v in enumerate(value):
                                writer.add_scalar(f"{key}/bin{i}", v, step)
                        elif key != "step":
                            writer.add_scalar(key, value, step)
            window.zero_()
            bins.zero_()
            window_start, window_images = time.perf_counter(), 0

        if cfg.log.sample_every > 0 and step % cfg.log.sample_every == 0 and step < cfg.train.steps:
            sample_grid()
        stop_flag = torch.tensor([1.0 if stop.requested else 0.0], device=device)
        stop_now = all_reduce(stop_flag, op=dist.ReduceOp.MAX).item() > 0
        if step % cfg.checkpoint.every == 0 or step == cfg.train.steps or stop_now:
            last_checkpoint = checkpoint()
        if bad_in_row >= cfg.train.max_bad_steps:
            last_checkpoint = checkpoint()
            raise TrainingStopped(f"stopped at step {step}: {bad_in_row} non-finite losses or gradients in a row "
                                  f"(train.max_bad_steps={cfg.train.max_bad_steps}); checkpoint {last_checkpoint}")
        if stop_now:
            if world.is_main:
                print(f"\nstopped by {stop.requested or 'a signal on another rank'} at step {step}; "
                      f"checkpoint {last_checkpoint}", flush=True)
            break

    if bar is not None:
        bar.close()
    if step == cfg.train.steps and cfg.log.sample_every >= 0:
        sample_grid()
    if writer is not None:
        writer.close()
    return {"step": step, "run_dir": run_dir, "checkpoint": last_checkpoint or latest_checkpoint(ckpt_dir), "skipped": skipped,
            "stopped": stop.requested}


def _truncate_metrics(path: Path, step: int):
    """On resume, drop log lines past the resumed step so that the file reads as one uninterrupted run."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def main(argv: list[str] | None = None) -> int:
    from pafm.data import DataError

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    try:
        cfg = load_config(Config, argv[0], argv[1:])
    except (ConfigError, ValueError) as err:  # dataclass __post_init__ checks raise ValueError
        print(f"config error: {err}", file=sys.stderr)
        return 2
    world = init_distributed(cfg.train.device)
    try:
        result = train(cfg, world)
    except (SetupError, DataError, ConfigError) as err:
        if world.is_main:
            print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        if world.is_main:
            print(f"error: {err}", file=sys.stderr)
        return 3
    finally:
        cleanup()
    if world.is_main:
        run_dir = result["run_dir"]
        print(f"\ndone: step {result['step']} ({result['skipped']} skipped)")
        print(f"  run folder     {run_dir}")
        print(f"  config         {run_dir / 'config.yaml'}")
        print(f"  metrics        {run_dir / 'metrics.jsonl'}")
        print(f"  checkpoint     {result['checkpoint']}")
        print(f"  EMA weights    {run_dir / 'ema.safetensors'}")
        samples = sorted((run_dir / 'samples').glob('*.png'))
        if samples:
            print(f"  sample grid    {samples[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
