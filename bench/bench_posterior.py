"""Microbenchmarks of the posterior-velocity op: the Triton kernels (with and without refinement), the eager
reference and `torch.compile` of the reference, with ratios measured in the same run.

    python bench/bench_posterior.py [--out FILE.jsonl] [--deadline-s 600] [--dtypes bf16 fp32] [--providers ...]

On a GPU it runs the GPU shapes, on a CPU small shapes (the Triton providers then run in the interpreter and say
nothing about GPU speed). Rows are printed; they are appended to --out only when it is given. Each row: device,
versions, date, layout, (B, K, D), dtype, provider, median time, GB/s, TFLOP/s, the roofline floor and time / floor,
time / the Triton time of the same shape, peak extra memory, and on CUDA kernel launches and host syncs per call
counted by torch.profiler. A measurement that would start after the deadline is skipped with a row saying so.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton providers can only run interpreted without a GPU

import triton  # noqa: E402

from pafm_kernels import posterior_velocity  # noqa: E402
from pafm_kernels.reference import posterior_velocity_reference  # noqa: E402

# (layout, B, K, D).  "bank": each row's own class's K entries of a class bank of BANK_CLASSES classes, read in
# place through pool_index (the minibatch part of the bank source is the "shared" (B, B, D) shape).
GPU_SHAPES = [("shared", 256, 256, 4096), ("shared", 256, 4096, 4096), ("bank", 256, 64, 4096),
              ("shared", 32, 32, 4096), ("shared", 256, 4096, 16384), ("per_row", 256, 16, 4096)]
CPU_SHAPES = [("shared", 32, 32, 256), ("shared", 64, 256, 1024), ("per_row", 32, 16, 1024), ("bank", 32, 16, 1024)]
BANK_CLASSES = {"cuda": 1000, "cpu": 10}
PROVIDERS = ["triton", "triton_unrefined", "eager", "compile"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HBM_BYTES_PER_S = 3.0e12  # H100 SXM; the floor is a reference point, gpu_check.py measures the machine's own
PEAK_FLOPS = {torch.bfloat16: 800e12, torch.float16: 800e12, torch.float32: 400e12}  # bf16 dense; tf32x3 ~ 1/2


def make_inputs(layout, B, K, D, device, dtype=torch.bfloat16, seed=0):
    """Trainer-like inputs in the residual form: t uniform, the shared pool holds the rows' endpoints first (with
    their indices) and random latents after; per-row pools hold the endpoint in slot 0."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = torch.rand(B, generator=g) * 0.98 + 0.01
    x, eps = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    z = t[:, None] * x + (1 - t)[:, None] * eps
    extra = {}
    if layout == "shared":
        pool = torch.randn(K, D, generator=g)
        n = min(B, K)
        pool[:n] = x[:n]
        extra["endpoint_index"] = torch.where(torch.arange(B) < K, torch.arange(B), -1).to(device)
    elif layout == "bank":
        classes = BANK_CLASSES["cuda" if torch.device(device).type == "cuda" else "cpu"]
        pool = torch.randn(classes, K, D, generator=g)
        extra["pool_index"] = torch.randint(0, classes, (B,), generator=g).to(device)
    else:
        pool = torch.randn(B, K, D, generator=g)
        pool[:, 0] = x
    to = lambda v: v.to(device=device, dtype=dtype)  # noqa: E731
    return dict(z=to(z), pool=to(pool), alpha=t.to(device), sigma=(1 - t).to(device),
                d_alpha=torch.ones(B, device=device), d_sigma=-torch.ones(B, device=device), endpoint=to(x),
                noise=to(eps), **extra)


def make_fn(provider, inputs):
    if provider == "triton":
        return lambda: posterior_velocity(**inputs, backend="triton")
    if provider == "triton_unrefined":
        from pafm_kernels import shared_pool

        def unrefined():
            saved, shared_pool.REFINE_NATS = shared_pool.REFINE_NATS, float("inf")
            try:
                return posterior_velocity(**inputs, backend="triton")
            finally:
                shared_pool.REFINE_NATS = saved
        return unrefined
    if provider == "eager":
        return lambda: posterior_velocity(**inputs, backend="torch")
    ref = torch.compile(posterior_velocity_reference, dynamic=False)
    args = [inputs[k] for k in ("z", "pool", "alpha", "sigma", "d_alpha", "d_sigma")]
    return lambda: ref(*args, 1.0, endpoint=inputs["endpoint"], noise=inputs["noise"],
                       pool_index=inputs.get("pool_index"))


def time_fn(fn, device, cpu_seconds=2.0, cpu_calls=3):
    """Median seconds per call (CUDA: triton's do_bench, which flushes L2 between calls; CPU: wall clock, at least
    `cpu_calls` calls and more while `cpu_seconds` last)."""
    fn()  # compile / autotune / warm up
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    times = []
    stop = time.perf_counter() + cpu_seconds
    while len(times) < cpu_calls or (time.perf_counter() < stop and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def launches_and_syncs(fn, device, calls=5):
    """(kernels run, host syncs) per call after warm-up, from torch.profiler; (None, None) off CUDA."""
    if device.type != "cuda":
        return None, None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()  # one, outside the calls: subtracted below
    kernels = syncs = 0
    for e in prof.events():
        name = e.name
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels += not name.startswith(("Memcpy", "Memset"))
            syncs += name.startswith("Memcpy DtoH")  # a device-to-host copy: the host waits for it
        elif "Synchronize" in name or name in ("cudaMemcpy", "cuMemcpyDtoH_v2"):
            syncs += 1
    return kernels / calls, max(0, syncs - 1) / calls


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


def roofline(layout, B, K, D, dtype):
    pool = K * D if layout == "shared" else B * K * D  # a bank's rows read their class's entries: B K D at most
    itemsize = torch.finfo(dtype).bits // 8
    bytes_moved = (3 * B * D + pool) * itemsize + B * D * 4  # read z, x_own, eps and the pool once, write fp32 v
    flops = 4 * B * K * D
    return bytes_moved, flops, max(bytes_moved / HBM_BYTES_PER_S, flops / PEAK_FLOPS[dtype])


def header(device):
    on_gpu = device.type == "cuda"
    return {"device": torch.cuda.get_device_name(device) if on_gpu else f"cpu ({torch.get_num_threads()} threads)",
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def measure(layout, B, K, D, provider, device, dtype, cpu_seconds=2.0, cpu_calls=3):
    inputs = make_inputs(layout, B, K, D, device, dtype)
    fn = make_fn(provider, inputs)
    seconds = time_fn(fn, device, cpu_seconds, cpu_calls)
    kernels, syncs = launches_and_syncs(fn, device)
    bytes_moved, flops, floor = roofline(layout, B, K, D, dtype)
    on_gpu = device.type == "cuda"
    return {"time_us": seconds * 1e6, "gbps": bytes_moved / seconds / 1e9, "tflops": flops / seconds / 1e12,
            "floor_us": floor * 1e6 if on_gpu else None, "time_over_floor": seconds / floor if on_gpu else None,
            "kernels_per_call": kernels, "syncs_per_call": syncs, "extra_mem_bytes": peak_extra_bytes(fn, device),
            "note": None if on_gpu or not provider.startswith("triton") else "Triton interpreter: not a GPU speed"}


def run(shapes, dtypes, providers, device, emit, deadline=float("inf"), **cpu_timing):
    """Measure every (shape, dtype, provider) while time.time() < deadline; emit(row) for each. Rows of one shape
    carry `ratio_to_triton` (time / the Triton time of that shape and dtype, measured in the same run).
    `cpu_timing`: cpu_seconds and cpu_calls of time_fn."""
    for layout, B, K, D in shapes:
        for dtype in dtypes:
            triton_us = None
            for provider in providers:
                if provider == "triton_unrefined" and layout != "shared":
                    continue  # per-row pools have no refinement
                row = {**header(device), "layout": layout, "B": B, "K": K, "D": D,
                       "dtype": str(dtype).replace("torch.", ""), "provider": provider}
                if time.time() > deadline:
                    emit({**row, "skipped": "deadline"})
                    continue
                try:
                    row.update(measure(layout, B, K, D, provider, device, dtype, **cpu_timing))
                    triton_us = row["time_us"] if provider == "triton" else triton_us
                    row["ratio_to_triton"] = row["time_us"] / triton_us if triton_us else None
                except Exception as e:  # record the failure (e.g. out of memory) and go on
                    row["error"] = repr(e)[:400]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                emit(row)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--out", default=None, help="append rows to this jsonl file (default: print only)")
    parser.add_argument("--deadline-s", type=float, default=float("inf"), help="start no measurement after this")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: a shared CPU makes multi-threaded timings noisy)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    deadline = time.time() + args.deadline_s

    def emit(row):
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    run(GPU_SHAPES if device.type == "cuda" else CPU_SHAPES, [DTYPES[d] for d in args.dtypes], args.providers,
        device, emit, deadline)


if __name__ == "__main__":
    sys.exit(main())
