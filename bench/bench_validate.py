"""Start-up validation of a latent dataset: full check GiB/s and the restart overhead, at the ImageNet shard shape.

    python bench/bench_validate.py [--folder /tmp/pafm-bench-validate] [--items 40960] [--out FILE.jsonl] [--cleanup]

Writes (once; reused while it exists) a synthetic dataset with the project's own ShardWriter: `--items` items of
4x32x32 fp16 posterior mean and std with a flipped view (40,960 items: 1.25 GiB in shards of 1,024 items, the
`pafm.prep` default), then times, each in this process:
- `full`: `validate_dataset` (checksums, NaN/Inf, std sign, labels), page cache warm;
- `full_cold`: the same after evicting the shards from the page cache (posix_fadvise DONTNEED on each file);
- `restart`: open the dataset and validate with the per-shard memo filled by a previous check (what a resumed run
  pays at start-up); `restart_one_changed`: the same after one shard was rewritten (it alone is checked again).
Each row: device, versions, date, load average, GiB, wall seconds and GiB/s, CPU seconds (all threads) and GiB per CPU-second.
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
import time
from pathlib import Path

import numpy as np
import torch

from pafm.data import LatentDataset, ShardWriter, validate_dataset
from pafm.data.shards import write_shard


def write_dataset(folder: Path, items: int, shard_size: int, seed: int = 0) -> float:
    """The synthetic ImageNet-shaped dataset; returns seconds spent writing."""
    start = time.perf_counter()
    writer = ShardWriter(folder, shard_size=shard_size)
    g = torch.Generator().manual_seed(seed)
    for lo in range(0, items, shard_size):
        n = min(shard_size, items - lo)
        mean = torch.randn(n, 2, 4, 32, 32, generator=g).half()
        std = (0.05 + torch.rand(n, 2, 4, 32, 32, generator=g)).half()
        writer.add(mean=mean, std=std, label=torch.randint(0, 1000, (n,), generator=g))
    writer.close({"kind": "class", "latent_shape": [4, 32, 32], "num_classes": 1000, "class_names": None,
                  "normalization": {"shift": [0.0] * 4, "scale": [0.18215] * 4}, "encoder": {"kind": "test"}})
    return time.perf_counter() - start


def evict(folder: Path) -> None:
    for path in folder.glob("shard-*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of fn(); on a shared machine the CPU time is the steadier figure."""
    start, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - start, cpu_seconds() - cpu


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", default="/tmp/pafm-bench-validate")
    p.add_argument("--items", type=int, default=40960)
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--cleanup", action="store_true", help="delete the dataset folder at the end")
    args = p.parse_args()
    folder = Path(args.folder)
    write_s = None
    if not (folder / "index.json").is_file():
        write_s = write_dataset(folder, args.items, args.shard_size)
    gib = sum(f.stat().st_size for f in folder.glob("shard-*.safetensors")) / 2 ** 30
    base = {"device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)", "torch": torch.__version__,
            "numpy": np.__version__, "commit": commit(), "items": args.items, "gib": round(gib, 3),
            "shards": len(list(folder.glob("shard-*.safetensors")))}
    rows = []

    def row(what, times, **extra):
        seconds, cpu = times if isinstance(times, tuple) else (times, None)
        r = {**base, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "load_avg": os.getloadavg()[0], "what": what, "seconds": round(seconds, 3),
             "gib_per_s": round(gib / seconds, 3), **extra}
        if cpu:
            r.update(cpu_s=round(cpu, 3), gib_per_cpu_s=round(gib / cpu, 3))
        print(json.dumps(r), flush=True)
        rows.append(r)

    if write_s is not None:
        row("write", write_s)
    def full():
        return validate_dataset(LatentDataset(folder))

    full()  # warms the page cache
    for _ in range(args.repeats):
        row("full", timed(full))
    evict(folder)
    row("full_cold", timed(full))
    validate_dataset(LatentDataset(folder), remember=True)  # fills the memo
    for _ in range(args.repeats):
        checked = []
        row("restart", timed(lambda: checked.extend(validate_dataset(LatentDataset(folder), remember=True))),
            shards_checked=len(checked))
    ds = LatentDataset(folder)
    shard = ds.shards[3]
    tensors = {name: ds.shards[3].array(name) for name in ds.shards[3].header}
    write_shard(shard.path, {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()})
    checked = []
    row("restart_one_changed", timed(lambda: checked.extend(validate_dataset(LatentDataset(folder), remember=True))),
        shards_checked=len(checked))
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if args.cleanup:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
