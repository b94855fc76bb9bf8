"""The op's CPU backend (the float64 reference) at the shapes CPU training gives it, per chunk size and pool order.

    python bench/bench_reference.py [--out FILE.jsonl] [--repeats 3] [--threads 1]

Cases (B rows of which `active` solve, K candidates, D features), each with `chunk_elems` 2^22 and 2^19 float64
elements (32 and 4 MiB temporaries):
- `exact_mnist_gN`: the exact source on MNIST (one shared pool of 60,000 784-D items with 10 labels, 64 rows, a
  tenth of them unconditional), gates [0, N] (active rows 16, 32, 64); pool in label order (as the source holds it,
  each labelled row then solved on its class's slice) and shuffled (masked whole-pool solve);
- `neighbors_mnist`: per-row pools of 9 (the row and 8 neighbours), 64 x 784;
- `per_row_latents`: per-row pools of 65 ImageNet-latent-sized candidates, 256 x 4096;
- `bank_mnist`: the class bank read through pool_index, 10 classes x 64 entries, 64 x 784.
Each row: device, threads, versions, commit, date, load average, the minimum over repeats of the process CPU
seconds of one call (steadier than wall time on a shared machine) and its wall seconds.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

from bench_train import emit
from bench_validate import commit
from pafm_kernels.reference import posterior_velocity_reference

CHUNKS = (1 << 22, 1 << 19)


def cases(g: torch.Generator):
    """(name, order, call(chunk_elems)) for each case."""
    B, K, D = 64, 60000, 784
    pool = torch.rand(K, D, generator=g)
    labels = torch.randint(0, 10, (K,), generator=g).sort().values
    row_labels = torch.randint(0, 10, (B,), generator=g)
    row_labels[torch.rand(B, generator=g) < 0.1] = -1  # cond_dropout 0.1: the unconditional rows see every class
    shuffle = torch.randperm(K, generator=g)
    z, t = torch.randn(B, D, generator=g), torch.rand(B, generator=g)
    ones = torch.ones(B)
    for gate, active in (("g0.25", 16), ("g0.5", 32), ("g1", 64)):
        rows = slice(0, active)  # the reference solves the active rows alone (the op hands it only those)
        for order, (p, pl) in (("sorted", (pool, labels)), ("shuffled", (pool[shuffle], labels[shuffle]))):
            yield (f"exact_mnist_{gate}", order, lambda c, p=p, pl=pl, r=rows: posterior_velocity_reference(
                z[r], p, t[r], 1 - t[r], ones[r], -ones[r], 1.0, row_labels=row_labels[r], pool_labels=pl,
                chunk_elems=c))
    for name, (B, K, D) in (("neighbors_mnist", (64, 9, 784)), ("per_row_latents", (256, 65, 4096))):
        pool, z, t = torch.randn(B, K, D, generator=g), torch.randn(B, D, generator=g), torch.rand(B, generator=g)
        x, eps = pool[:, 0].clone(), torch.randn(B, D, generator=g)
        yield (name, "-", lambda c, pool=pool, z=z, t=t, x=x, eps=eps: posterior_velocity_reference(
            z, pool, t, 1 - t, torch.ones_like(t), -torch.ones_like(t), 1.0, endpoint=x, noise=eps, chunk_elems=c))
    bank, z, t = torch.randn(10, 64, 784, generator=g), torch.randn(64, 784, generator=g), torch.rand(64, generator=g)
    index = torch.randint(0, 10, (64,), generator=g)
    yield ("bank_mnist", "-", lambda c: posterior_velocity_reference(
        z, bank, t, 1 - t, torch.ones(64), -torch.ones(64), 1.0, pool_index=index, chunk_elems=c))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="append rows to this jsonl file (default: print only)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = {"device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)", "threads": args.threads,
            "torch": torch.__version__, "commit": commit()}
    for name, order, call in cases(torch.Generator().manual_seed(0)):
        for chunk in CHUNKS:
            call(chunk)  # warm-up
            cpu, wall = [], []
            for _ in range(args.repeats):
                c0, w0 = time.process_time(), time.perf_counter()
                call(chunk)
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - w0)
            row = {**base, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "load_avg": os.getloadavg()[0], "case": name, "pool_order": order, "chunk_elems": chunk,
                   "cpu_s": round(min(cpu), 4), "wall_s": round(min(wall), 4)}
            emit(row, args.out)


if __name__ == "__main__":
    main()
