"""The training log: a window of step statistics, written every `log.every` steps to metrics.jsonl, TensorBoard
and the progress bar.

Logging is side work: a failed write (full disk, a removed folder) is reported as a warning, counted in the next
record, and never stops training.  Only rank 0 writes; the window's sums live on the device so that a step costs no
host sync beyond the loss shown on the progress bar.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from pafm.distributed import World, all_reduce
from pafm.objectives import T_BINS


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


class MetricsLogger:
    def __init__(self, run_dir: Path, world: World, *, every: int, total_steps: int, start_step: int,
                 batch_size: int, pafm: bool, tensorboard: bool, progress: bool, side: SideWork):
        self.path = run_dir / "metrics.jsonl"
        self.world, self.every, self.total, self.batch_size, self.pafm = world, every, total_steps, batch_size, pafm
        self.side = side
        device = world.device
        self.window = torch.zeros(4, dtype=torch.float64, device=device)  # loss, fm loss, grad norm, good steps
        self.bins = torch.zeros(3, T_BINS, dtype=torch.float64, device=device)  # rows, ESS, own weight per t-bin
        self.start, self.images = time.perf_counter(), 0
        self.writer = self.bar = None
        if not world.is_main:
            return
        # On resume, drop records past the resumed step so that the file reads as one uninterrupted run.
        keep = read_metrics(self.path, up_to_step=start_step)
        side.run("rewriting metrics.jsonl", self.path.write_text, "".join(json.dumps(r) + "\n" for r in keep))
        if tensorboard:
            self.writer = side.run("starting TensorBoard", _tensorboard, run_dir)
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
            self.bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % self.every == 0 or step == self.total:
            self._flush(step, lr, skipped)

    def _flush(self, step: int, lr: float, skipped: int):
        all_reduce(self.bins)
        elapsed = time.perf_counter() - self.start
        n = max(self.window[3].item(), 1.0)
        record = {
            "step": step, "loss": self.window[0].item() / n, "fm_loss": self.window[1].item() / n,
            "grad_norm": self.window[2].item() / n, "lr": lr, "images_per_s": self.images / elapsed,
            "sec_per_step": elapsed / max(1, self.images // self.batch_size),
            "peak_memory_gb": peak_memory_gb(self.window.device), "skipped_steps": skipped,
            "side_work_failures": self.side.failures,
        }
        if self.pafm:
            count = self.bins[0].clamp_min(1)
            record["ess_by_t"] = (self.bins[1] / count).tolist()
            record["own_weight_by_t"] = (self.bins[2] / count).tolist()
            record["rows_by_t"] = self.bins[0].long().tolist()
        if self.world.is_main:
            self.side.run("writing metrics.jsonl", self._append, record)
            if self.writer is not None:
                self.side.run("writing TensorBoard", self._tensorboard_scalars, record)
        self.window.zero_()
        self.bins.zero_()
        self.start, self.images = time.perf_counter(), 0

    def _append(self, record: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _tensorboard_scalars(self, record: dict):
        step = record["step"]
        for key, value in record.items():
            if isinstance(value, list):
                for i, v in enumerate(value):
                    self.writer.add_scalar(f"{key}/bin{i}", v, step)
            elif key != "step":
                self.writer.add_scalar(key, value, step)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.side.run("closing TensorBoard", self.writer.close)


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
