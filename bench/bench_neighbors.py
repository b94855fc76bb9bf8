"""`pafm.prep neighbors` at scale: build time, peak memory and recall@k of the FAISS path against exact search.

    python bench/bench_neighbors.py [--items 200000] [--folder /tmp/pafm-bench-neighbors] [--out FILE.jsonl]

Writes (with the project's ShardWriter, fp16, 4x32x32 = 4096 dims, no flip, shards of 4096 items) a synthetic
dataset of one class, so the whole set is one group searched by FAISS: structured, not white noise, since the
neighbours of white noise in 4096 dims are all at nearly the same distance.  Each item is h W + 0.3 e, h = c_j + u
in a 64-dim latent space (1,000 cluster centres c_j ~ N(0, 4 I), u ~ N(0, I)), W a fixed random 64 x 4096 map
(entries N(0, 1/64)), e ~ N(0, I) in 4096 dims.  The build (`add_neighbors`, k = 8) runs in a child process, whose
peak resident memory (ru_maxrss) is reported with its wall and CPU time (on a shared machine the CPU time is
the steadier figure) and the recall@8 it measured on 1,000 queries.
The dataset is deleted at the end unless --keep.
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

from pafm.data import ShardWriter


def write_dataset(folder: Path, items: int, seed: int = 0, chunk: int = 4096) -> None:
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(1000, 64, generator=g)
    w = torch.randn(64, 4096, generator=g) / 8.0
    writer = ShardWriter(folder, shard_size=chunk)
    for lo in range(0, items, chunk):
        n = min(chunk, items - lo)
        h = centres[torch.randint(0, 1000, (n,), generator=g)] + torch.randn(n, 64, generator=g)
        x = h @ w + 0.3 * torch.randn(n, 4096, generator=g)
        writer.add(latent=x.view(n, 1, 4, 32, 32).half(), label=torch.zeros(n, dtype=torch.int64))
    writer.close({"kind": "class", "latent_shape": [4, 32, 32], "num_classes": 1, "class_names": None,
                  "normalization": {"shift": [0.0] * 4, "scale": [1.0] * 4}, "encoder": {"kind": "test"}})


def build(folder: str, k: int) -> None:
    from pafm.data.neighbors import add_neighbors

    start = time.perf_counter()
    entry = add_neighbors(folder, k=k)
    print(json.dumps({"seconds": time.perf_counter() - start, "entry": entry}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--folder", default="/tmp/pafm-bench-neighbors")
    p.add_argument("--out", default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--build", default=None, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.build:
        return build(args.build, args.k)
    folder = Path(args.folder)
    start = time.perf_counter()
    if not (folder / "index.json").is_file():
        write_dataset(folder, args.items)
    write_s = time.perf_counter() - start
    child = subprocess.run([sys.executable, __file__, "--build", str(folder), "--k", str(args.k)],
                           capture_output=True, text=True, env=os.environ)
    if child.returncode:
        sys.exit(child.stderr)
    result = json.loads(child.stdout.strip().splitlines()[-1])
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = usage.ru_maxrss / 2 ** 20  # KiB -> GiB
    search = result["entry"]["search"]
    import faiss

    row = {"device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)", "torch": torch.__version__,
           "faiss": faiss.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "load_avg": os.getloadavg()[0], "items": args.items, "dim": 4096, "k": args.k,
           "data": "64-dim clustered latent x random 4096 map + 0.3 noise", "write_s": round(write_s, 1),
           "build_s": round(result["seconds"], 1),
           "build_cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_gib": round(peak, 2), **search}
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    if not args.keep:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
