"""The trainer: `torchrun --nproc_per_node=N -m pafm.train CONFIG [a.b=value ...]` (or `python -m pafm.train ...`).

Reads top to bottom: config -> process group -> data -> model (FSDP2 per block) -> optimizer, EMA, objective ->
resume -> the step loop (micro-batches, clipping, skip of non-finite steps, EMA) -> logs, samples, checkpoints.
"""
from __future__ import annotations

import math
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from pafm.checkpoint import CheckpointConfig, Checkpointer, TrainState, sharded_states
from pafm.cli import SharedError, report_error
from pafm.config import (Allowed, ConfigError, at_least, load_config, refusal, save_config, section, setting, to_dict,
                         within, words)
from pafm.data.config import DataConfig
from pafm.data.validate import validate_dataset
from pafm.distributed import World, agree, all_reduce, cleanup, init_distributed, one_line, shard_model
from pafm.ema import EMA
from pafm.eval_during_training import TrainingEval, TrainingEvalConfig
from pafm.export import EXPORT_NAME, RunExport, export_staleness
from pafm.logger import LogConfig, MetricsLogger, SideWork
from pafm.models.flops import device_peak_flops, train_flops_per_image
from pafm.objectives import T_BINS, ObjectiveConfig, Objective, source_class, step_generator, t_bin_stats
from pafm.optim import OptimConfig, build_optimizer, learning_rate
from pafm.run_lock import RunDirInUse, RunLock

USAGE = "usage: [torchrun --nproc_per_node=N] python -m pafm.train CONFIG.yaml [key.sub=value ...]"


# --- config -------------------------------------------------------------------------------------------------------
def _cuda_if_available(device) -> bool:
    return device != "cuda" or torch.cuda.is_available()


@section("run")
class RunConfig:
    # everything the run writes goes here: config.yaml, metrics.jsonl, checkpoints/, samples/, ema export
    dir: str = setting(allowed=words("the run's folder"))


@section("model")
class ModelConfig:
    name: str = setting("SiT-B/2", words("a model of pafm.models such as SiT-B/2"))
    # extra arguments; input size, channels and classes come from the data
    kwargs: dict = setting(factory=dict, allowed=Allowed(
        lambda kw: all(isinstance(k, str) for k in kw) and all(
            math.isfinite(v) for v in kw.values() if isinstance(v, float)),
        "a mapping of the model's arguments (names to finite values; checked when the model is built)"))


@section("train")
class TrainConfig:
    steps: int = setting(allowed=at_least(1))
    seed: int = setting(allowed=within(0, 2**63 - 1))
    # "auto" (newest complete checkpoint in run.dir, else start fresh), "none", or a checkpoint folder
    resume: str = setting(allowed=words("auto, none or a checkpoint folder"))
    precision: Literal["fp32", "bf16"] = "bf16"
    device: Literal["auto", "cpu", "cuda"] = setting("auto", Allowed(
        _cuda_if_available, "auto or cpu here: no CUDA device is visible"))
    compile: bool = False  # torch.compile per block
    activation_checkpointing: bool = False
    ema_decay: float = setting(0.9999, within(0, 1, "1 would keep the initial weights", open_hi=True))
    # this many non-finite steps in a row stop the run (after a checkpoint)
    max_bad_steps: int = setting(20, at_least(1))


@section("")
class Config:
    run: RunConfig
    train: TrainConfig
    objective: ObjectiveConfig
    checkpoint: CheckpointConfig
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: TrainingEvalConfig = field(default_factory=TrainingEvalConfig)


class SetupError(RuntimeError):
    """A problem with the run's inputs that the user must fix (reported in one line, exit code 2)."""

    exit_code = 2


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many non-finite steps); a checkpoint was written first (exit code 3)."""

    exit_code = 3


# --- helpers ------------------------------------------------------------------------------------------------------
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


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, checkpoints and exits cleanly.  A repeated signal
    changes nothing: Ctrl-C or a scheduler reaches the ranks both directly and through torchrun.

    SIGTERM is caught from before setup: torchrun sends it to every rank as soon as one exits, and a rank that died
    of it during setup would never print its own error.  Ctrl-C is caught from `catch_interrupt` on (the loop), so
    that it still interrupts a long setup."""

    def __init__(self):
        self.requested = None
        self._before = {signal.SIGTERM: signal.signal(signal.SIGTERM, self._handle)}

    def catch_interrupt(self):
        self._before.setdefault(signal.SIGINT, signal.signal(signal.SIGINT, self._handle))

    def restore(self):
        """The handlers from before, so that `main` called in-process leaves its caller's signals as they were."""
        for sig, handler in self._before.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.requested = self.requested or signal.Signals(signum).name


def validate_split(world: World, dataset):
    """Every rank checks its share of the shards (shard s on rank s % world size; rank 0 also the neighbours), skipping
    those whose check passed before and that are unchanged since; a problem found by any rank stops every rank."""
    try:
        agree(lambda: validate_dataset(dataset, remember=True, neighbors=world.is_main,
                                       shards=range(world.rank, len(dataset.shards), world.size)))
    except (ValueError, OSError) as err:  # a SharedError is a ValueError
        raise SetupError(str(err)) from None


def check_settings(cfg: Config, info: dict):
    """Settings that are valid one by one but not together with this dataset."""
    try:
        source_class(cfg.objective).check(cfg.objective, info)
    except ValueError as err:  # the message names the settings
        raise SetupError(str(err)) from None
    if cfg.log.sample_prompts and info["kind"] != "text":
        raise SetupError(f"log.sample_prompts is for text models; {cfg.data.spec} has class labels")
    if cfg.eval.every:  # before anything is built or resumed (ConfigError)
        cfg.eval.as_eval_config({"data": {"spec": cfg.data.spec, "info": info}})


def trajectory(cfg: Config) -> dict:
    """The settings that shape a run's trajectory, recorded in each checkpoint (a resume that changes one says so)."""
    data = cfg.data
    return {"optim": to_dict(cfg.optim), "train": {"seed": cfg.train.seed}, "objective": to_dict(cfg.objective),
            "data": {"spec": data.spec, "batch_size": data.batch_size, "micro_batch_size": data.micro_batch_size,
                     "flip": data.flip}}


# --- building the run ---------------------------------------------------------------------------------------------
def build_data(cfg: Config, world: World):
    """The training split (validated before anything expensive) and this rank's loader."""
    from pafm.data import LatentLoader, open_dataset

    dataset = open_dataset(cfg.data.spec, split="train")
    if cfg.data.batch_size > len(dataset):
        raise SetupError(refusal("data.batch_size", cfg.data.batch_size,
                                 f"<= {len(dataset)}, the training items of {cfg.data.spec}"))
    if cfg.data.validate:
        validate_split(world, dataset)
    if cfg.data.batch_size % world.size:
        raise SetupError(f"data.batch_size={cfg.data.batch_size} is not divisible by the world size {world.size}")
    micro = cfg.data.micro_batch_size or cfg.data.batch_size // world.size
    accum, rest = divmod(cfg.data.batch_size, micro * world.size)
    if rest or accum == 0:
        raise SetupError(f"data.batch_size={cfg.data.batch_size} must be a multiple of data.micro_batch_size={micro} "
                         f"x world size {world.size}")
    loader = LatentLoader(dataset, micro, rank=world.rank, world_size=world.size, seed=cfg.train.seed,
                          flip=cfg.data.flip, num_workers=cfg.data.num_workers,
                          neighbors=source_class(cfg.objective).loader_neighbors(cfg.objective),
                          pin_memory=world.device.type == "cuda")
    return dataset.info, loader, accum


def build_model_and_optimizer(cfg: Config, world: World, info: dict):
    """Identical initialisation on every rank, FSDP2 per block, AdamW on the shards, and the sharded EMA."""
    from pafm.models import build_model

    torch.manual_seed(cfg.train.seed)
    try:
        model = build_model(cfg.model.name, **model_kwargs(cfg.model, info))
    except ValueError as err:
        raise SetupError(f"model: {err}") from None
    if (model.cond_kind == "text") != (info["kind"] == "text"):
        raise SetupError(f"model {cfg.model.name} is {model.cond_kind}-conditional but dataset {cfg.data.spec} "
                         f"has {info['kind']} conditions")
    model.to(world.device)
    shard_model(model, world, bf16=cfg.train.precision == "bf16",
                activation_checkpointing=cfg.train.activation_checkpointing, compile=cfg.train.compile)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    return model, optimizer, EMA(model, cfg.train.ema_decay)


def build_objective(cfg: Config, info: dict, world: World, loader=None) -> Objective:
    try:
        return Objective(cfg.objective, info, world.device, world.rank, world.size, loader=loader)
    except ValueError as err:
        raise SetupError(f"objective: {err}") from None


# --- one optimizer step -------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    loss: torch.Tensor  # () the step's loss, averaged over micro-batches and ranks (on the device)
    fm_loss: torch.Tensor  # () the FM loss of the same predictions
    grad_norm: torch.Tensor  # () before clipping
    bins: torch.Tensor  # (3, T_BINS) this rank's t-bin sums
    kept: bool  # every loss and the gradient norm finite: the update was applied (the same on every rank)
    stop: bool  # some rank was asked to stop (a signal)


def train_step(cfg: Config, world: World, model, optimizer, ema, objective: Objective, data_iter, state: TrainState,
               accum: int, autocast, stop_requested=lambda: False) -> StepResult:
    """Micro-batches with gradient accumulation, clipping, the skip of a non-finite step, AdamW and EMA.

    A skipped step changes nothing but the counters: no weight, EMA or bank update (the loader still moves on).
    The step waits for the device once: the losses and this rank's stop request go through one all-reduce, and one
    read brings back whether the step is kept and whether any rank must stop; everything else stays on the device
    (the logger reads its sums every `log.every` steps). `stop_requested()` is asked after the backward pass, so a
    signal that lands during the step still stops the run after it."""
    device = world.device
    step_loss = torch.zeros(2, dtype=torch.float64, device=device)
    bins = torch.zeros(3, T_BINS, dtype=torch.float64, device=device)
    updates = []
    for m in range(accum):
        batch = next(data_iter)
        model.set_requires_gradient_sync(m == accum - 1)
        x = batch["x"].to(device, non_blocking=True)
        gen = step_generator(cfg.train.seed, state.step, m, device)
        out = objective.loss(model, x, condition(batch, device), batch, gen, autocast)
        (out.loss / accum).backward()
        step_loss += torch.stack([out.loss.detach(), out.fm_loss.detach()]).double() / accum
        bins += t_bin_stats(out.t, out.diagnostics)
        updates.append(out.update)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    stop_flag = torch.full((1,), float(stop_requested()), dtype=torch.float64, device=device)
    totals = torch.cat([step_loss, stop_flag])
    all_reduce(totals)
    step_loss = totals[:2] / world.size
    finite = torch.isfinite(step_loss).all() & torch.isfinite(grad_norm)
    kept, stop = torch.stack([finite, totals[2] > 0]).tolist()  # the step's one host read
    if kept:
        optimizer.step()
        ema.update(model)
        for update in filter(None, updates):
            update()
        state.bad_in_row = 0
    else:
        state.skipped += 1
        state.bad_in_row += 1
        if world.is_main:
            print(f"step {state.step}: non-finite loss {step_loss[0].item()} or gradient norm {grad_norm.item()}; "
                  f"step skipped ({state.bad_in_row} in a row)", flush=True)
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return StepResult(step_loss[0], step_loss[1], grad_norm, bins, kept, stop)


class PreviewGrids:
    """The EMA model's preview grids (side work: a failure is reported and counted, never fatal).  Rank 0 builds
    the grid's model and decoder at the first grid and reuses them for every later one."""

    def __init__(self, cfg: Config, world: World, ema, export_meta: dict, side: SideWork, run_dir: Path,
                 logger: MetricsLogger):
        self.cfg, self.world, self.ema, self.export_meta, self.side, self.run_dir = cfg, world, ema, export_meta, \
            side, run_dir
        self.logger, self.grid = logger, None

    def _draw(self, weights: dict, step: int):
        from pafm.generate import PreviewGrid

        if self.grid is None:
            log = self.cfg.log
            self.grid = PreviewGrid(self.export_meta, steps=log.sample_steps, cfg_scale=log.sample_cfg,
                                    seed=self.cfg.train.seed, prompts=log.sample_prompts)
        path = self.grid.save(weights, self.run_dir / "samples" / f"step_{step:07d}.png")
        self.logger.image("samples", path, step)

    def __call__(self, step: int):
        weights = self.ema.full_state_dict(dst=0)  # a collective: outside the side-work guard so no rank
        if self.world.is_main:  # waits alone; the full weights exist on rank 0 only
            self.side.run(f"the preview grid of step {step}", self._draw, weights, step)


# --- the run ------------------------------------------------------------------------------------------------------
def train(cfg: Config, world: World, stop: StopSignal) -> dict:
    run_dir = Path(cfg.run.dir)
    lock = RunLock(run_dir)
    try:  # on rank 0 alone, and every rank hears of a refusal (so no rank waits forever)
        agree(lock.acquire, rank0_only=True, errors=(ValueError, OSError, RunDirInUse))
    except (ValueError, OSError, RunDirInUse) as err:  # a SharedError is a ValueError
        raise SetupError(one_line(err)) from None
    try:
        return _train(cfg, world, run_dir, stop)
    finally:
        lock.release()


def _train(cfg: Config, world: World, run_dir: Path, stop: StopSignal) -> dict:
    info, loader, accum = build_data(cfg, world)
    check_settings(cfg, info)
    model, optimizer, ema = build_model_and_optimizer(cfg, world, info)
    objective = build_objective(cfg, info, world, loader)
    side = SideWork(world)
    pafm = cfg.objective.kind == "pafm"
    run_meta = {"model": model.config,
                "objective": {"kind": cfg.objective.kind, "source": cfg.objective.source if pafm else None},
                "state_keys": sorted(objective.state_dict()), "world_size": world.size,
                "trajectory": trajectory(cfg)}
    export_meta = {"model": model.config, "data": {"spec": cfg.data.spec, "info": info}, "path": cfg.objective.path,
                   "objective": cfg.objective.kind, "config": to_dict(cfg)}
    run_meta["export"] = export_meta  # so that `pafm.export` can make the export from any checkpoint
    checkpointer = Checkpointer(run_dir, world, cfg.checkpoint, run_meta, sharded=sharded_states(model, optimizer, ema),
                                per_rank={"loader": loader, "objective": objective})
    export = RunExport(run_dir, export_meta, side, world.is_main)
    checkpointer.after_save.append(export.write)
    state = checkpointer.resume(cfg.train.resume)
    if checkpointer.resumed_from is not None:
        export.refresh(checkpointer.resumed_from, state.step)
    if world.is_main:  # only now: a refused launch must not overwrite the run's config
        save_config(cfg, run_dir / "config.yaml")
    logger = MetricsLogger(run_dir, world, every=cfg.log.every, total_steps=cfg.train.steps, start_step=state.step,
                           batch_size=cfg.data.batch_size, pafm=cfg.objective.kind == "pafm",
                           tensorboard=cfg.log.tensorboard, progress=cfg.log.progress, side=side,
                           train_flops_per_image=train_flops_per_image(model.config),
                           peak_flops=device_peak_flops(world.device) if cfg.train.precision == "bf16" else None,
                           wandb=cfg.log.wandb, config=to_dict(cfg))  # MFU against the bf16 peak: bf16 runs only
    # FSDP2 already computes in bf16; autocast also covers tensors the model creates itself (time embeddings).
    autocast = torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    grids = PreviewGrids(cfg, world, ema, export_meta, side, run_dir, logger)
    evaluation = TrainingEval(cfg.eval, world, ema, export_meta, side, run_dir, logger) if cfg.eval.every else None
    stop.catch_interrupt()
    data_iter = iter(loader)
    try:
        while state.step < cfg.train.steps:
            lr = learning_rate(cfg.optim, state.step, cfg.train.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step = train_step(cfg, world, model, optimizer, ema, objective, data_iter, state, accum, autocast,
                              stop_requested=lambda: stop.requested is not None)
            logger.step(state.step, lr, step.loss, step.fm_loss, step.grad_norm, step.kept, step.bins, state.skipped)
            checkpointer.poll()
            stop_now = step.stop
            last = state.step == cfg.train.steps
            too_bad = state.bad_in_row >= cfg.train.max_bad_steps
            if state.step % cfg.checkpoint.every == 0 or last or stop_now or too_bad:
                checkpoint = checkpointer.save(state, final=last or stop_now or too_bad)
            if cfg.log.sample_every > 0 and state.step % cfg.log.sample_every == 0 and not last:
                grids(state.step)
            if evaluation and state.step % cfg.eval.every == 0 and not (stop_now or too_bad):
                evaluation(state.step)
            if too_bad:
                raise TrainingStopped(f"stopped at step {state.step}: {state.bad_in_row} non-finite losses or "
                                      f"gradients in a row (train.max_bad_steps={cfg.train.max_bad_steps}); "
                                      f"checkpoint {checkpoint}")
            if stop_now:
                if world.is_main:
                    print(f"\nstopped by {stop.requested or 'a signal on another rank'} at step {state.step}; "
                          f"checkpoint {checkpoint}", flush=True)
                break
    finally:
        checkpointer.close()  # a background save in flight finishes before anything reads it or the group goes
    loader.close()
    if state.step == cfg.train.steps and cfg.log.sample_every >= 0:
        grids(state.step)
    logger.close()
    return {"step": state.step, "run_dir": run_dir, "checkpoint": checkpointer.newest or checkpointer.latest(),
            "skipped": state.skipped, "stopped": stop.requested, "side_work_failures": side.failures,
            "failed_saves": checkpointer.failed_saves}


def _report(result: dict):
    run_dir = result["run_dir"]
    print(f"\ndone: step {result['step']} ({result['skipped']} skipped"
          + (f", {result['side_work_failures']} side-work failures" if result["side_work_failures"] else "")
          + (f", {result['failed_saves']} checkpoints failed" if result["failed_saves"] else "") + ")")
    print(f"  run folder     {run_dir}")
    print(f"  config         {run_dir / 'config.yaml'}")
    print(f"  metrics        {run_dir / 'metrics.jsonl'}")
    print(f"  checkpoint     {result['checkpoint']}")
    if (run_dir / EXPORT_NAME).is_file():
        print(f"  EMA weights    {run_dir / EXPORT_NAME}")
    stale = export_staleness(run_dir)
    if stale:
        print(stale)
    samples = sorted((run_dir / "samples").glob("*.png"))
    if samples:
        print(f"  sample grid    {samples[-1]}")


def main(argv: list[str] | None = None) -> int:
    """The trainer called in-process (tests, scripts): the caller's signal handlers are restored on return."""
    stop = StopSignal()
    try:
        return _main(sys.argv[1:] if argv is None else argv, stop)
    finally:
        stop.restore()


def _main(argv: list[str], stop: StopSignal) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)  # asked for, or a usage error
        return 0 if argv else 2
    try:
        cfg = load_config(Config, argv[0], argv[1:])
    except ConfigError as err:  # every rank reads the same config: rank 0 speaks for all
        return report_error(SharedError(one_line(err)), label="config error")
    # Writing past the file-size limit must raise an OSError (reported below), not kill the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    world = init_distributed(cfg.train.device)
    try:
        result = train(cfg, world, stop)
    except Exception as err:  # noqa: BLE001 - report_error raises what is no user error again
        # An OSError (a read-only folder, a full disk, a file-size limit) leaves the last checkpoint as it was.
        return report_error(err, rank=None if world.size == 1 else world.rank,
                            after_os_error="; the newest complete checkpoint is intact")
    finally:
        cleanup()
    if world.is_main:
        _report(result)
    return 0


if __name__ == "__main__":
    from pafm.distributed import exit_process

    # SIGTERM is caught from before the config is read: rank 0 must live to print a config error rank 1 also found.
    exit_process(_main(sys.argv[1:], StopSignal()))
