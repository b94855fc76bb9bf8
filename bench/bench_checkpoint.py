"""Checkpoint cost at SiT-XL/2 size: save time, the step-time stall it causes, file sizes, peak memory per rank.

    python bench/bench_checkpoint.py [--model SiT-XL/2] [--nproc 2] [--steps 2] [--every 1]
                                     [--mode sync|async|both] [--repeat 1] [--out FILE.jsonl]

Runs the real trainer (`pafm.train`) under torchrun on `--nproc` CPU ranks (gloo, FSDP2, fp32, FM, global batch
= nproc, one image per rank) on a synthetic 4x32x32 dataset of 1,000 classes (64 items, written under --folder),
with a checkpoint every `--every` steps, written in the foreground (`sync`: checkpoint.async_save=false) or in the
background (`async`); `both` alternates the two modes, `--repeat` times each, so that both see the same machine.
Inside each rank, the trainer's step, `Checkpointer.save` (the time the loop is blocked: everything in the
foreground, or the wait for the previous save plus the staging copy in the background), `save_checkpoint` (DCP,
rank files, manifest, publish in the foreground) and the background save (the same plus the EMA export, off the
loop) are timed.  Rank 0 prints one JSON row per run: device, versions, date, step seconds, save seconds, the stall
of the periodic saves (all but the final one, which every mode writes in the foreground) as a fraction of a step,
checkpoint folder and export sizes, and each rank's peak RSS.  The run folder is deleted at the end.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def write_dataset(folder: Path) -> None:
    from pafm.data import ShardWriter

    g = torch.Generator().manual_seed(0)
    writer = ShardWriter(folder, shard_size=64)
    writer.add(mean=torch.randn(64, 2, 4, 32, 32, generator=g).half(),
               std=torch.full((64, 2, 4, 32, 32), 0.1).half(), label=torch.randint(0, 1000, (64,), generator=g))
    writer.close({"kind": "class", "latent_shape": [4, 32, 32], "num_classes": 1000, "class_names": None,
                  "normalization": {"shift": [0.0] * 4, "scale": [0.18215] * 4}, "encoder": {"kind": "test"}})


def timed(record: list, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        record.append(time.perf_counter() - start)
        return out

    return wrapper


def inner(argv: list[str]) -> None:
    """One rank of the trainer, with its step and saves timed."""
    import torch.distributed as dist

    import pafm.checkpoint as checkpoint
    import pafm.checkpoint.checkpointer as checkpointer
    import pafm.train as train

    steps, saves, dcp_saves, background, staging = [], [], [], [], []
    train.train_step = timed(steps, train.train_step)
    checkpointer.save_checkpoint = timed(dcp_saves, checkpoint.save_checkpoint)  # the name the Checkpointer calls
    checkpoint.Checkpointer.save = timed(saves, checkpoint.Checkpointer.save)
    checkpoint.BackgroundSaver._finish = timed(background, checkpoint.BackgroundSaver._finish)
    checkpoint.BackgroundSaver.start = timed(staging, checkpoint.BackgroundSaver.start)
    original_cleanup = train.cleanup

    def report():  # before the process group goes: gather every rank's numbers on rank 0
        mine = {"steps": steps, "saves": saves, "dcp_saves": dcp_saves, "background": background,
                "staging": staging,
                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        if dist.get_rank() == 0:
            print("RESULT " + json.dumps(parts), flush=True)
        original_cleanup()

    train.cleanup = report
    code = train.main(argv)
    if code:
        sys.exit(code)


def run_once(args, mode: str, folder: Path, root: Path) -> dict:
    run = folder / "run"
    shutil.rmtree(run, ignore_errors=True)
    overrides = [f"run.dir={run}", f"data.spec={folder / 'data'}", f"model.name={args.model}", "objective.kind=fm",
                 f"data.batch_size={args.nproc}", "data.num_workers=0", "data.flip=false", f"train.steps={args.steps}",
                 f"checkpoint.every={args.every}", "checkpoint.keep=1",
                 f"checkpoint.async_save={'true' if mode == 'async' else 'false'}", "log.every=1", "log.progress=false",
                 "log.sample_every=-1", "log.tensorboard=false", "train.precision=fp32", "optim.warmup_steps=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           __file__, "--inner", str(root / "configs" / "digits_sit.yaml"), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"the run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    parts = json.loads(lines[-1][len("RESULT "):])
    ckpt = next((run / "checkpoints").glob("step_*"))
    step_s = statistics.median(parts[0]["steps"])
    periodic = [max(p["saves"][i] for p in parts) for i in range(len(parts[0]["saves"]) - 1)]
    checkpoint_gib = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 2 ** 30
    return {"device": f"cpu ({platform.machine()}, {os.cpu_count()} cores), {args.nproc} gloo ranks",
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_avg": os.getloadavg()[0], "model": args.model, "mode": mode, "steps": args.steps,
            "every": args.every, "step_s": [round(s, 2) for s in parts[0]["steps"]], "median_step_s": round(step_s, 2),
            "save_s": [round(s, 2) for s in parts[0]["saves"]],
            "foreground_save_s": [round(s, 2) for s in parts[0]["dcp_saves"]],
            "background_save_s": [round(s, 2) for s in parts[0]["background"]],
            "staging_s": [round(s, 2) for s in parts[0]["staging"]],
            "stall_fraction_of_step": round(max(periodic, default=float("nan")) / step_s, 3),
            "checkpoint_gib": round(checkpoint_gib, 2), "state_gib_per_rank": round(checkpoint_gib / args.nproc, 2),
            "export_gib": round((run / "ema.safetensors").stat().st_size / 2 ** 30, 2),
            "peak_rss_gib_per_rank": [round(p["peak_rss_gib"], 2) for p in parts]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="SiT-XL/2")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--mode", choices=["sync", "async", "both"], default="both")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--folder", default="/tmp/pafm-bench-checkpoint")
    p.add_argument("--out", default=None)
    p.add_argument("--inner", nargs=argparse.REMAINDER, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner is not None:
        return inner(args.inner)
    if args.steps <= args.every:
        p.error("--steps must exceed --every: the final save is always written in the foreground")
    folder = Path(args.folder)
    shutil.rmtree(folder, ignore_errors=True)
    write_dataset(folder / "data")
    root = Path(__file__).resolve().parents[1]
    modes = ["sync", "async"] if args.mode == "both" else [args.mode]
    for _ in range(args.repeat):
        for mode in modes:
            row = run_once(args, mode, folder, root)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    shutil.rmtree(folder)


if __name__ == "__main__":
    main()
