"""Microbenchmarks of the posterior-velocity op: eager reference, torch.compile of the reference, Triton kernels.

Two ways to run it:

  python bench/bench_posterior.py                     # GPU if present (the issue's shapes), else CPU small shapes;
                                                      # appends one JSON row per measurement to bench/results/
  python -m pytest bench/bench_posterior.py -q        # the same providers and shapes under pytest-benchmark

Each row: device name, torch/triton versions, date, layout and (B, K, D), dtype, provider, median time, achieved
GB/s and TFLOP/s, the roofline floor and time / floor, and the peak extra memory (CUDA only). The floor counts one
read of z and the pool and one fp32 write of the velocity at 3.0 TB/s, and 4 B K D flops (two GEMMs) at 800 TFLOP/s
(H100 SXM bf16 dense); on a CPU there is no meaningful floor and those fields are null. On a CPU the Triton provider
runs in the interpreter, so its time says nothing about GPU speed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton provider can only run interpreted without a GPU

import triton  # noqa: E402

from pafm_kernels import posterior_velocity  # noqa: E402
from pafm_kernels.naive import posterior_velocity_reference  # noqa: E402

# (layout, B, K, D): the shapes on a GPU, small ones on the CPU.
GPU_SHAPES = [("shared", 256, 256, 4096), ("shared", 256, 4096, 4096), ("shared", 32, 32, 4096),
              ("shared", 256, 4096, 16384), ("per_row", 256, 16, 4096)]
CPU_SHAPES = [("shared", 32, 32, 256), ("shared", 64, 256, 1024), ("per_row", 32, 16, 1024)]
PROVIDERS = ["eager", "compile", "triton"]
HBM_BYTES_PER_S = 3.0e12
BF16_FLOPS = 800e12


def make_inputs(layout, B, K, D, device, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = torch.rand(B, generator=g) * 0.9 + 0.05
    x = torch.randn(B, D, generator=g)
    eps = torch.randn(B, D, generator=g)
    z = t[:, None] * x + (1 - t)[:, None] * eps
    pool = torch.randn(K, D, generator=g) if layout == "shared" else torch.randn(B, K, D, generator=g)
    to = lambda v: v.to(device)  # noqa: E731
    return dict(z=to(z).to(dtype), pool=to(pool).to(dtype), alpha=to(t), sigma=to(1 - t), d_alpha=to(torch.ones(B)),
                d_sigma=to(-torch.ones(B)), endpoint=to(x).to(dtype), noise=to(eps).to(dtype))


def make_fn(provider, inputs):
    if provider == "triton":
        return lambda: posterior_velocity(**inputs, backend="triton")
    if provider == "eager":
        return lambda: posterior_velocity(**inputs, backend="torch")
    ref = torch.compile(posterior_velocity_reference, dynamic=False)
    B = inputs["z"].shape[0]
    tau = torch.ones(B, device=inputs["z"].device)
    args = [inputs[k] for k in ("z", "pool", "alpha", "sigma", "d_alpha", "d_sigma")]
    return lambda: ref(*args, tau, endpoint=inputs["endpoint"], noise=inputs["noise"])


def time_fn(fn, device):
    """Median seconds per call (CUDA: triton's do_bench with L2 flush; CPU: wall clock)."""
    fn()  # compile / autotune / warm up
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3
    times = []
    deadline = time.perf_counter() + 2.0
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_extra_bytes(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    del out
    return extra


def roofline(layout, B, K, D, itemsize):
    pool = K * D if layout == "shared" else B * K * D
    bytes_moved = (B * D + pool) * itemsize + B * D * 4  # read z and the pool once, write fp32 velocity
    flops = 4 * B * K * D
    return bytes_moved, flops, max(bytes_moved / HBM_BYTES_PER_S, flops / BF16_FLOPS)


def measure(layout, B, K, D, provider, device, dtype=torch.bfloat16):
    inputs = make_inputs(layout, B, K, D, device, dtype)
    fn = make_fn(provider, inputs)
    seconds = time_fn(fn, device)
    bytes_moved, flops, floor = roofline(layout, B, K, D, torch.finfo(dtype).bits // 8)
    on_gpu = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if on_gpu else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "layout": layout, "B": B, "K": K, "D": D, "dtype": str(dtype).replace("torch.", ""), "provider": provider,
        "time_us": seconds * 1e6, "gbps": bytes_moved / seconds / 1e9, "tflops": flops / seconds / 1e12,
        "floor_us": floor * 1e6 if on_gpu else None, "time_over_floor": seconds / floor if on_gpu else None,
        "extra_mem_bytes": peak_extra_bytes(fn, device),
        "note": None if on_gpu or provider != "triton" else "Triton interpreter on CPU: not a GPU speed",
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description="Posterior-velocity op microbenchmarks -> bench/results/*.jsonl")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    parser.add_argument("--out", default=None, help="jsonl file (default bench/results/posterior_<device>.jsonl)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: a shared CPU makes multi-threaded timings noisy)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    out = Path(args.out or Path(__file__).parent / "results" / f"posterior_{device.type}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    for layout, B, K, D in shapes:
        for provider in args.providers:
            try:
                row = measure(layout, B, K, D, provider, device)
            except Exception as e:  # record the failure rather than hide it (e.g. out of memory)
                row = {"layout": layout, "B": B, "K": K, "D": D, "provider": provider, "error": repr(e)[:300]}
            print(json.dumps(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


# pytest-benchmark entry points: the same shapes and providers.
def _bench_params():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = GPU_SHAPES if device == "cuda" else CPU_SHAPES
    return [(s, p) for s in shapes for p in PROVIDERS]


try:
    import pytest

    @pytest.mark.parametrize("shape,provider", _bench_params(), ids=lambda v: "-".join(map(str, v))
                             if isinstance(v, tuple) else v)
    def test_posterior_velocity(benchmark, shape, provider):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        fn = make_fn(provider, make_inputs(*shape, device))
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        fn()
        out = benchmark(lambda: (fn(), sync()))
        assert out is not None
except ImportError:  # running as a script without pytest installed
    pass


if __name__ == "__main__":
    sys.exit(main())
