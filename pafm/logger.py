"""The training log: a window of step statistics, written every `log.every` steps to metrics.jsonl, TensorBoard,
Weights & Biases (when `log.wandb` is set) and the progress bar; evaluation rows and preview grids go the same way.

Throughput: images/s over all ranks, the model TFLOP/s per device (`pafm.models.flops`: 3x the forward's matrix
products) and the MFU against the device's dense bf16 peak (omitted where the peak is unknown, as on the CPU).

Logging is side work: a failed write (full disk, a removed folder) is reported as a warning, counted in the next
record, and never stops training.  Only rank 0 writes; the window's sums live on the device and are read back only
when a record is written (every `log.every` steps and at the last), so the log costs the other steps no host sync.
"""
from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path
from typing import Literal, Optional

import torch

from pafm.config import at_least, each, section, setting, within, words
from pafm.distributed import World, all_reduce
from pafm.files import atomic_write_text
from pafm.objectives import T_BINS
from pafm.sampling import GUIDANCE_SCALE


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict]:
    """The records of a metrics.jsonl, oldest first.  A torn or garbled line (a write cut short by a kill or a full
    disk) is dropped with a warning instead of failing every later launch."""
    records = []
    if not path.exists():
        return records
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            print(f"warning: {path}:{number} is not a complete metrics record (a write cut short?); dropped it",
                  file=sys.stderr, flush=True)
            continue
        if up_to_step is None or step <= up_to_step:
            records.append(record)
    return records


class SideWork:
    """Runs work that must never end a training run (grids, exports, logs): failures are printed and counted."""

    def __init__(self, world: World):
        self.world = world
        self.failures = 0

    def run(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - by design: side work may fail in any way
            self.failures += 1
            print(f"warning (rank {self.world.rank}): {what} failed and was skipped: {type(err).__name__}: {err}",
                  file=sys.stderr, flush=True)
            return None


@section("log.wandb")
class WandbConfig:
    """`log.wandb`: the Weights & Biases run (rank 0 only).  name: default the run folder's name.  mode offline
    writes RUN/wandb/offline-run-* for `wandb sync` later, with no network."""

    project: str = setting(allowed=words("the W&B project"))
    entity: Optional[str] = setting(None, words("the W&B user or team"))
    name: Optional[str] = setting(None, words("the W&B run's name"))
    mode: Literal["online", "offline"] = "online"


@section("log")
class LogConfig:
    every: int = setting(50, at_least(1))
    # a grid every N steps and at the end; 0: only at the end; -1: never
    sample_every: int = setting(0, at_least(-1, "-1: never, 0: at the end"))
    sample_steps: int = setting(32, within(1, 10000, "Heun steps of the sample grid"))
    sample_cfg: float = setting(1.0, GUIDANCE_SCALE)
    # text models: captions of the grid (default: held-out captions, else the first training captions)
    sample_prompts: Optional[list[str]] = setting(None, each(words("a caption")))
    tensorboard: bool = True
    progress: bool = True
    wandb: Optional[WandbConfig] = None  # {project, entity, name, mode}: also log to Weights & Biases (rank 0)


class WandbRun:
    """Rank 0's W&B run.  Its id is kept in RUN/wandb_id, so a resumed training continues the same W&B run.  A
    missing package or an unreachable server is one warning (side work), after which W&B is off for the run."""

    INIT_TIMEOUT_S = 60

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict, side: SideWork):
        self.side = side
        self.run = self._guard("starting Weights & Biases", self._start, cfg, run_dir, config)

    @staticmethod
    def _start(cfg: WandbConfig, run_dir: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise ImportError("log.wandb is set but the wandb package is not installed (pip install "
                              "'pafm[wandb]')") from None
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        atomic_write_text(id_file, run_id + "\n")
        run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name, mode=cfg.mode,
                         id=run_id, resume="allow", config=config, dir=str(run_dir),
                         settings=wandb.Settings(init_timeout=WandbRun.INIT_TIMEOUT_S))
        # Rows carry their own step: a resumed run logs steps again from the checkpoint's, which W&B's own
        # monotonic step counter would drop.
        run.define_metric("*", step_metric="step")
        return run

    def _guard(self, what: str, fn, *args):
        failures = self.side.failures
        result = self.side.run(what, fn, *args)
        if self.side.failures > failures:
            self.run = None  # one warning, not one per row
        return result

    def log(self, step: int, scalars: dict):
        if self.run is not None:
            self._guard("logging to Weights & Biases", self.run.log, {"step": step, **scalars})

    def image(self, key: str, path: Path, step: int):
        if self.run is not None:
            import wandb

            self._guard("sending an image to Weights & Biases", self.run.log,
                        {"step": step, key: wandb.Image(str(path))})

    def finish(self):
        if self.run is not None:
            self._guard("closing Weights & Biases", self.run.finish)


def scalars(record: dict, prefix: str = "") -> dict:
    """A metrics record as flat scalars (lists become key/bin<i>), the rows of TensorBoard and W&B."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, list):
            out.update({f"{prefix}{key}/bin{i}": v for i, v in enumerate(value)})
        elif key != "step" and isinstance(value, (int, float)):
            out[prefix + key] = value
    return out


class MetricsLogger:
    def __init__(self, run_dir: Path, world: World, *, every: int, total_steps: int, start_step: int,
                 batch_size: int, pafm: bool, tensorboard: bool, progress: bool, side: SideWork,
                 train_flops_per_image: float, peak_flops: Optional[float] = None,
                 wandb: Optional[WandbConfig] = None, config: Optional[dict] = None):
        """train_flops_per_image: model FLOPs of one image, forward and backward; peak_flops: one device's peak
        FLOP/s (None: MFU is not reported); config: the resolved config, for W&B."""
        self.path = run_dir / "metrics.jsonl"
        self.world, self.every, self.total, self.batch_size, self.pafm = world, every, total_steps, batch_size, pafm
        self.side, self.flops_per_image, self.peak_flops = side, train_flops_per_image, peak_flops
        device = world.device
        self.window = torch.zeros(4, dtype=torch.float64, device=device)  # loss, fm loss, grad norm, good steps
        self.bins = torch.zeros(3, T_BINS, dtype=torch.float64, device=device)  # rows, ESS, own weight per t-bin
        self.start, self.images = time.perf_counter(), 0
        self.writer = self.bar = self.wandb = None
        if not world.is_main:
            return
        # On resume, drop records past the resumed step so that the file reads as one uninterrupted run.
        keep = read_metrics(self.path, up_to_step=start_step)
        side.run("rewriting metrics.jsonl", atomic_write_text, self.path, "".join(json.dumps(r) + "\n" for r in keep))
        if tensorboard:
            self.writer = side.run("starting TensorBoard", _tensorboard, run_dir)
        if wandb is not None:
            self.wandb = WandbRun(wandb, run_dir, config or {}, side)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def step(self, step: int, lr: float, loss: torch.Tensor, fm_loss: torch.Tensor, grad_norm: torch.Tensor,
             finite: bool, bins: torch.Tensor, skipped: int):
        """Account one optimizer step; every `every` steps (and at the last) reduce over ranks and write."""
        if finite:
            one = torch.ones((), dtype=torch.float64, device=self.window.device)
            self.window += torch.stack([loss.double(), fm_loss.double(), grad_norm.double(), one])
        self.bins += bins
        self.images += self.batch_size
        if self.bar is not None:
            self.bar.update(1)
        if step % self.every == 0 or step == self.total:
            self._flush(step, lr, skipped)

    def _flush(self, step: int, lr: float, skipped: int):
        all_reduce(self.bins)
        elapsed = time.perf_counter() - self.start
        loss, fm_loss, grad_norm, good = self.window.tolist()  # the window's one read
        n = max(good, 1.0)
        images_per_s = self.images / elapsed
        flops_per_device = images_per_s * self.flops_per_image / self.world.size
        record = {
            "step": step, "loss": loss / n, "fm_loss": fm_loss / n,
            "grad_norm": grad_norm / n, "lr": lr, "images_per_s": images_per_s,
            "tflops_per_device": flops_per_device / 1e12,
            **({"mfu": flops_per_device / self.peak_flops} if self.peak_flops else {}),
            "sec_per_step": elapsed / max(1, self.images // self.batch_size),
            "peak_memory_gb": peak_memory_gb(self.window.device), "skipped_steps": skipped,
            "side_work_failures": self.side.failures,
        }
        if self.pafm:
            count = self.bins[0].clamp_min(1)
            rows, ess, own_weight = torch.stack([self.bins[0], self.bins[1] / count, self.bins[2] / count]).tolist()
            record.update(ess_by_t=ess, own_weight_by_t=own_weight, rows_by_t=[int(r) for r in rows])
        if self.world.is_main:
            self._publish(record)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", speed=(
                    f"{images_per_s:.0f} img/s" + (f" MFU {record['mfu']:.1%}" if "mfu" in record
                                                   else f" {record['tflops_per_device']:.3g} TFLOP/s")))
        self.window.zero_()
        self.bins.zero_()
        self.start, self.images = time.perf_counter(), 0

    def eval_row(self, step: int, metrics: dict, seconds: float, samples: int):
        """Rank 0: an evaluation's scores, as an `eval` row of metrics.jsonl and eval/* scalars elsewhere."""
        self.start += seconds  # the window's throughput is the training's, without the evaluation
        self._publish({"step": step, "eval": metrics, "eval_seconds": seconds, "eval_samples": samples})

    def image(self, key: str, path: Path, step: int):
        """Rank 0: an image saved during training (a preview grid), for W&B."""
        if self.wandb is not None:
            self.wandb.image(key, path, step)

    def _publish(self, record: dict):
        self.side.run("writing metrics.jsonl", self._append, record)
        if self.writer is not None:
            self.side.run("writing TensorBoard", self._tensorboard_scalars, record)
        if self.wandb is not None:
            self.wandb.log(record["step"], scalars(record))

    def _append(self, record: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _tensorboard_scalars(self, record: dict):
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.side.run("closing TensorBoard", self.writer.close)
        if self.wandb is not None:
            self.wandb.finish()


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
