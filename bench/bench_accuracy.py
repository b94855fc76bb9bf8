"""Accuracy of the posterior target by op input dtype, against float64, at D = 4096 over a grid of t.

    python bench/bench_accuracy.py --out bench/results/accuracy_cpu.jsonl

The op runs the way the objective calls it (residual form, own endpoint named; for bfloat16 the objective keeps
u in float32 and takes only the correction c (mu - x) from the op).  The truth is the float64 oracle on the
unrounded float32 inputs.  On the CPU the op is the float64-grade reference, so these rows measure what rounding
the inputs costs; on a GPU (Triton) they add the kernels' arithmetic.  Two pools per t: every row's own endpoint
plus unrelated latents (the posterior is one-hot from small t on at this D, as for real latents), and the same
with three near-duplicates of each endpoint at 0.1 sigma per coordinate (weights shared down to sigma -> 0).
"""
from __future__ import annotations

import argparse
import datetime
import json

import torch

from bench_train import device_name
from pafm_kernels import posterior_velocity
from pafm_kernels.naive import posterior_velocity_naive
from pafm_kernels.testing import t_grid_case

T_GRID = [0.05, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def target_errors(ts, D, duplicates, dtype, device):
    """(float64 ESS, per-row relative error of the target as the objective forms it) for one row per t."""
    args, kw = t_grid_case(ts, D, duplicates=duplicates, unrelated=16, spread=0.1)
    z, pool, a, s, da, ds = args
    x, eps = kw["endpoint"], kw["noise"]
    v64, _, ess = posterior_velocity_naive(*args, **kw)
    on = lambda t: t.to(device)  # noqa: E731
    rounded = {k: on(v.to(dtype) if v.is_floating_point() else v) for k, v in kw.items()}
    out = posterior_velocity(on(z.to(dtype)), on(pool.to(dtype)), on(a), on(s), on(da), on(ds), **rounded)
    velocity = out.velocity.cpu().double()
    if dtype != torch.float32:
        u = da[:, None] * x + ds[:, None] * eps
        u_rounded = da[:, None] * x.to(dtype).float() + ds[:, None] * eps.to(dtype).float()
        velocity = (u + (velocity.float() - u_rounded)).double()
    return ess, ((velocity - v64).norm(dim=1) / v64.norm(dim=1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--out", default=None, help="append rows to this jsonl file (default: print only)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for duplicates in (0, 3):
        for name, dtype in DTYPES.items():
            ess, err = target_errors(T_GRID, args.dim, duplicates, dtype, device)
            for t, e, r in zip(T_GRID, ess.tolist(), err.tolist()):
                row = {"device": device_name(device), "torch": torch.__version__, "date": date, "D": args.dim,
                       "backend": "triton" if device.type == "cuda" else "torch", "op_dtype": name,
                       "near_duplicates": duplicates, "t": t, "ess": round(e, 3), "rel_err": r}
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
