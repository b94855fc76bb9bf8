"""The training loader at the ImageNet and CC12M shapes: images/s and peak memory for 0, 2 and 4 workers.

    python bench/bench_loader.py [--folder /tmp/pafm-bench-loader] [--batch 256] [--batches 40] [--out FILE.jsonl]

Writes (with the project's ShardWriter, shards of 1,024 items; reused while they exist, deleted with --cleanup) two
synthetic datasets:
- `imagenet`: 40,960 items of 4x32x32 fp16 posterior mean and std with a flipped view and a label (1.25 GiB);
- `cc12m`: 8,192 items of the same moments plus CLIP-L-like text: tokens 77x768 bf16, mask 77, pooled 768 bf16
  (1.2 GiB; MMDiT's inputs; captions are not read in training).
For each, `LatentLoader` (batch `--batch` per rank, flips, posterior sampling, as the trainer builds it) hands out
`--batches` batches after 5 warm-up batches; the row gives images/s, the main process's peak RSS and the largest
worker's (ru_maxrss of the finished worker processes), device, versions, date and load average.  The page cache is
warm (the datasets were just written or read): a first epoch from a cold disk is bounded by the disk instead.
Pinned memory is used when a CUDA device is present (as in the trainer).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from pafm.data import LatentLoader, ShardWriter, open_dataset

SHAPES = {"imagenet": {"items": 40960, "text": False}, "cc12m": {"items": 8192, "text": True}}


def write_dataset(folder: Path, items: int, text: bool, chunk: int = 1024) -> None:
    g = torch.Generator().manual_seed(0)
    writer = ShardWriter(folder, shard_size=chunk)
    for lo in range(0, items, chunk):
        n = min(chunk, items - lo)
        batch = {"mean": torch.randn(n, 2, 4, 32, 32, generator=g).half(),
                 "std": (0.05 + torch.rand(n, 2, 4, 32, 32, generator=g)).half()}
        if text:
            batch.update(tokens=torch.randn(n, 77, 768, generator=g).bfloat16(),
                         mask=torch.rand(n, 77, generator=g) < 0.5, pooled=torch.randn(n, 768, generator=g).bfloat16())
        else:
            batch["label"] = torch.randint(0, 1000, (n,), generator=g)
        writer.add(**batch)
    info = {"kind": "text" if text else "class", "latent_shape": [4, 32, 32], "class_names": None,
            "normalization": {"shift": [0.0] * 4, "scale": [0.18215] * 4}, "encoder": {"kind": "test"}}
    if not text:
        info["num_classes"] = 1000
    writer.close(info)


def measure(folder: str, workers: int, batch: int, batches: int) -> dict:
    """In a fresh process, so that peak memory belongs to this configuration alone."""
    loader = LatentLoader(open_dataset(folder), batch, seed=0, num_workers=workers,
                          pin_memory=torch.cuda.is_available())
    for _ in range(5):
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - start
    loader.close()
    import gc

    gc.collect()
    time.sleep(0.5)  # let the workers exit, so that their peak is counted
    kib = 2 ** 20
    return {"images_per_s": round(batch * batches / seconds, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib, 2),
            "worker_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib, 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", default="/tmp/pafm-bench-loader")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--out", default=None)
    p.add_argument("--cleanup", action="store_true")
    p.add_argument("--measure", nargs=2, default=None, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], int(args.measure[1]), args.batch, args.batches)))
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    for shape in args.shapes:
        folder = Path(args.folder) / shape
        if not (folder / "index.json").is_file():
            write_dataset(folder, SHAPES[shape]["items"], SHAPES[shape]["text"])
        for workers in args.workers:
            child = subprocess.run([sys.executable, __file__, "--measure", str(folder), str(workers),
                                    "--batch", str(args.batch), "--batches", str(args.batches)],
                                   capture_output=True, text=True)
            if child.returncode:
                sys.exit(child.stderr)
            row = {"device": device, "torch": torch.__version__,
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "load_avg": os.getloadavg()[0], "shape": shape, "batch": args.batch, "workers": workers,
                   "pinned": torch.cuda.is_available(), **json.loads(child.stdout.strip().splitlines()[-1])}
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    if args.cleanup:
        shutil.rmtree(args.folder)


if __name__ == "__main__":
    main()
