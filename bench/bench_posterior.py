"""Microbenchmarks of the posterior-velocity op against what a user would write instead, with each provider's error
against float64 near sigma -> 0 beside its time, and the floor from a roofline measured in the same run.

    python bench/bench_posterior.py [--out FILE.jsonl] [--deadline-s 600] [--dtypes bf16 fp32] [--providers ...]
                                    [--quick]

Providers:
  triton           the op (`backend="triton"`); on a CPU it runs in the Triton interpreter (no GPU speed)
  triton_unrefined the same with refinement switched off (shared pools only): the kernels alone
  compiled_native  `torch.compile` of the dtype-native mm -> softmax -> mm (logits in fp32, TF32 allowed for fp32)
  peer_chunked     what a peer ships (StableVM-style): chunks of rows, ((z - a x)^2).sum(-1) by broadcasting in the
                   input dtype, softmax, weighted sum
  float64          the op's float64 reference (`backend="torch"`)
`eager` and `compile` are accepted as the older names of `float64` and `compiled_native`.

Shapes on a GPU: shared pools (256, 256, 4096) and (256, 4096, 4096), and the class bank as training reads it (32 rows,
64 entries of each row's class, 1000 classes, 4096-D, through pool_index). On a CPU, small shapes (`--quick`: tiny
ones, one call each). Rows name the device. The first row measures the roofline: dense GEMM TFLOP/s in bf16 and TF32
(tf32x3 issues three TF32 MMAs, so its peak is a third of TF32's) and copy bandwidth. Each provider row: host-
inclusive median time (CUDA: triton's do_bench with L2 flush), kernel time (the sum of CUDA kernel durations from
torch.profiler), the floor (larger of bytes / bandwidth and the flops the op's kernels issue / the measured peak),
time / floor, `err_small_sigma` (max over rows at sigma in [1e-5, 1e-2] of |v - v64| / |v64|, v64 the float64
oracle on the same rounded inputs), ratio to the op's time, kernels and host syncs per call, peak extra memory.
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
from pafm_kernels.naive import posterior_velocity_naive  # noqa: E402
from pafm_kernels.testing import t_grid_case  # noqa: E402

# (layout, B, K, D). "bank": each row reads its own class's K entries of a bank of BANK_CLASSES classes in place
# through pool_index (training's per-rank shape: 32 rows, 64 entries per class).
GPU_SHAPES = [("shared", 256, 256, 4096), ("shared", 256, 4096, 4096), ("bank", 32, 64, 4096)]
CPU_SHAPES = [("shared", 32, 32, 256), ("shared", 64, 256, 1024), ("bank", 16, 16, 1024)]
QUICK_SHAPES = [("shared", 8, 16, 64), ("bank", 4, 8, 64)]
BANK_CLASSES = {"cuda": 1000, "cpu": 10}
PROVIDERS = ["triton", "triton_unrefined", "compiled_native", "peer_chunked", "float64"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Rows at sigma = 1 - t in [1e-5, 1e-2], each with its own endpoint and three near-duplicates of it (0.1 sigma per
# coordinate): the weights stay spread as sigma -> 0, where fp32 or bf16 logits lose them.
SMALL_SIGMA_TS = [0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99995, 0.99999]
PEER_CHUNK_ELEMENTS = 1 << 27  # rows x candidates x D per chunk of the peer's broadcast


# ---- inputs ---------------------------------------------------------------------------------------------------------
def make_inputs(layout, B, K, D, device, dtype=torch.bfloat16, seed=0):
    """Trainer-like inputs in the residual form: t uniform, the shared pool holds the rows' endpoints first (with
    their indices) and random latents after; a bank row reads a random class."""
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
    else:
        classes = BANK_CLASSES["cuda" if torch.device(device).type == "cuda" else "cpu"]
        pool = torch.randn(classes, K, D, generator=g)
        extra["pool_index"] = torch.randint(0, classes, (B,), generator=g).to(device)
    to = lambda v: v.to(device=device, dtype=dtype)  # noqa: E731
    return dict(z=to(z), pool=to(pool), alpha=t.to(device), sigma=(1 - t).to(device),
                d_alpha=torch.ones(B, device=device), d_sigma=-torch.ones(B, device=device), endpoint=to(x),
                noise=to(eps), **extra)


def small_sigma_inputs(layout, D, device, dtype):
    """(inputs, float64 oracle velocity) for the rows of SMALL_SIGMA_TS; a bank case reads per-row pools."""
    (z, pool, a, s, da, ds), kw = t_grid_case(SMALL_SIGMA_TS, D, dtype=dtype, per_row=layout != "shared")
    inputs = dict(z=z, pool=pool, alpha=a, sigma=s, d_alpha=da, d_sigma=ds, **kw)
    oracle = posterior_velocity_naive(**inputs)[0]
    return {k: v.to(device) for k, v in inputs.items()}, oracle


# ---- providers ------------------------------------------------------------------------------------------------------
def _own_residual(mu, inputs):
    """u + (d_alpha - d_sigma alpha / sigma)(mu - x_own) in fp32: the velocity from a posterior mean."""
    a, s, da, ds = (inputs[k].float()[:, None] for k in ("alpha", "sigma", "d_alpha", "d_sigma"))
    x, eps = inputs["endpoint"].float(), inputs["noise"].float()
    return da * x + ds * eps + (da - ds * a / s) * (mu.float() - x)


def _candidates(inputs):
    """(K, D) shared or (B, K, D) per row (a bank's rows gathered)."""
    pool = inputs["pool"]
    return pool if "pool_index" not in inputs else pool[inputs["pool_index"]]


def native_velocity(inputs):
    """mm -> softmax -> mm in the input dtype: fp32 logits (the GEMM writes fp32 on CUDA; on a CPU the operands are
    upcast), the row-constant ||z||^2 left out, ||x||^2 in fp32, the mean from a dtype-native GEMM."""
    z, x = inputs["z"], _candidates(inputs)
    a, s = inputs["alpha"].float(), inputs["sigma"].float()
    shared = x.dim() == 2
    if shared:
        dots = (torch.mm(z, x.T, out_dtype=torch.float32) if z.is_cuda and z.dtype != torch.float32
                else z.float() @ x.float().T)
    else:
        dots = torch.bmm(x.float(), z.float()[:, :, None])[..., 0]  # per-row pools: a batched GEMV
    xsq = x.float().square().sum(-1)
    logits = (2 * a[:, None] * dots - (a * a)[:, None] * xsq) / (2 * s * s)[:, None]
    w = torch.softmax(logits, dim=1).to(z.dtype)
    mu = w @ x if shared else torch.bmm(w[:, None], x)[:, 0]
    return _own_residual(mu, inputs)


def peer_velocity(inputs):
    """The chunked broadcast a peer ships: ((z - a x)^2).sum(-1) in the input dtype, softmax, weighted sum."""
    z, x = inputs["z"], _candidates(inputs)
    a, s = inputs["alpha"].to(z.dtype), inputs["sigma"].float()
    B, D = z.shape
    K = x.shape[-2]
    rows = max(1, PEER_CHUNK_ELEMENTS // (K * D))
    mus = []
    for r0 in range(0, B, rows):
        r = slice(r0, min(B, r0 + rows))
        xr = x[None] if x.dim() == 2 else x[r]
        dist = ((z[r, None] - a[r, None, None] * xr) ** 2).sum(-1).float()
        w = torch.softmax(-dist / (2 * s[r] ** 2)[:, None], dim=1).to(z.dtype)
        mus.append((w[:, :, None] * xr).sum(1))
    return _own_residual(torch.cat(mus), inputs)


def make_fn(provider, inputs):
    op_inputs = dict(inputs)
    if provider == "triton":
        return lambda: posterior_velocity(**op_inputs, backend="triton").velocity
    if provider == "triton_unrefined":
        from pafm_kernels import shared_pool

        def unrefined():
            saved, shared_pool.REFINE_NATS = shared_pool.REFINE_NATS, float("inf")
            try:
                return posterior_velocity(**op_inputs, backend="triton").velocity
            finally:
                shared_pool.REFINE_NATS = saved
        return unrefined
    if provider == "float64":
        return lambda: posterior_velocity(**op_inputs, backend="torch").velocity
    if provider == "compiled_native":
        compiled = torch.compile(native_velocity, dynamic=False)
        return lambda: compiled(inputs)
    if provider == "peer_chunked":
        return lambda: peer_velocity(inputs)
    raise ValueError(f"unknown provider {provider!r}")


# ---- measurement ----------------------------------------------------------------------------------------------------
def time_fn(fn, device, cpu_seconds=2.0, cpu_calls=3):
    """Median host-inclusive seconds per call (CUDA: triton's do_bench, which flushes L2 between calls; CPU: wall
    clock, at least `cpu_calls` calls and more while `cpu_seconds` last)."""
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


def profile_calls(fn, device, calls=5):
    """(kernel seconds, kernels run, host syncs) per call after warm-up, from torch.profiler; Nones off CUDA. Kernel
    time is the sum of the device events' durations: what the GPU spends, without launch gaps."""
    if device.type != "cuda":
        return None, None, None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()  # one, outside the calls: subtracted below
    kernels = syncs = 0
    busy_us = 0.0
    for e in prof.events():
        name = e.name
        if e.device_type == torch.autograd.DeviceType.CUDA:
            busy_us += e.time_range.elapsed_us()
            kernels += not name.startswith(("Memcpy", "Memset"))
            syncs += name.startswith("Memcpy DtoH")  # a device-to-host copy: the host waits for it
        elif "Synchronize" in name or name in ("cudaMemcpy", "cuMemcpyDtoH_v2"):
            syncs += 1
    return busy_us * 1e-6 / calls, kernels / calls, max(0, syncs - 1) / calls


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


def _median_seconds(fn, device, calls):
    fn()
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e-3
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_roofline(device, quick=False):
    """Achieved dense GEMM FLOP/s (bf16; TF32, and tf32x3 as a third of it) and copy bandwidth on this device."""
    n = 8192 if device.type == "cuda" else (256 if quick else 1024)
    copy_elems = (1 << 28) if device.type == "cuda" else (1 << 20 if quick else 1 << 24)
    calls = 1 if quick else 3
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("tf32", torch.float32)):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        out[f"gemm_{name}_flops"] = 2 * n ** 3 / _median_seconds(lambda: a @ b, device, calls)
    out["gemm_tf32x3_flops"] = out["gemm_tf32_flops"] / 3
    src = torch.empty(copy_elems, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    out["copy_bytes_per_s"] = 2 * src.numel() * 4 / _median_seconds(lambda: dst.copy_(src), device, calls)
    return out


def op_work(layout, B, K, D, dtype):
    """(bytes, flops) the op's kernels move and issue. Bytes: one read of z, x_own, eps and the candidates, one fp32
    write of the velocity. Flops: shared pools issue the logits GEMM (2BKD) and the mix, which for 16-bit inputs is
    two dots (the weights split into hi + lo parts, shared_pool.py's SPLIT_P): 6BKD for 16-bit, 4BKD for fp32 (as
    tf32x3: three TF32 MMAs each, counted against the tf32x3 rate). Per-row pools are a batched GEMV on CUDA cores
    (4BKD fp32), memory-bound."""
    itemsize = torch.finfo(dtype).bits // 8
    candidates = K * D if layout == "shared" else B * K * D
    bytes_moved = (3 * B * D + candidates) * itemsize + B * D * 4
    flops = (6 if layout == "shared" and dtype != torch.float32 else 4) * B * K * D
    return bytes_moved, flops


def floor_seconds(layout, B, K, D, dtype, roof):
    bytes_moved, flops = op_work(layout, B, K, D, dtype)
    memory = bytes_moved / roof["copy_bytes_per_s"]
    if layout != "shared":
        return memory
    peak = roof["gemm_tf32x3_flops"] if dtype == torch.float32 else roof["gemm_bf16_flops"]
    return max(memory, flops / peak)


def small_sigma_error(provider, layout, D, device, dtype):
    """max over the SMALL_SIGMA_TS rows of |v - v64| / |v64| for this provider."""
    inputs, oracle = small_sigma_inputs(layout, D, device, dtype)
    velocity = make_fn(provider, inputs)().double().cpu()
    return ((velocity - oracle).norm(dim=1) / oracle.norm(dim=1)).max().item()


def header(device):
    on_gpu = device.type == "cuda"
    return {"device": torch.cuda.get_device_name(device) if on_gpu else f"cpu ({torch.get_num_threads()} threads)",
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def measure(layout, B, K, D, provider, device, dtype, roof, cpu_seconds=2.0, cpu_calls=3):
    inputs = make_inputs(layout, B, K, D, device, dtype)
    fn = make_fn(provider, inputs)
    seconds = time_fn(fn, device, cpu_seconds, cpu_calls)
    kernel_seconds, kernels, syncs = profile_calls(fn, device)
    bytes_moved, flops = op_work(layout, B, K, D, dtype)
    floor = floor_seconds(layout, B, K, D, dtype, roof)
    return {"time_us": seconds * 1e6, "kernel_us": None if kernel_seconds is None else kernel_seconds * 1e6,
            "floor_us": floor * 1e6, "time_over_floor": seconds / floor,
            "kernel_over_floor": None if kernel_seconds is None else kernel_seconds / floor,
            "gbps": bytes_moved / seconds / 1e9, "tflops_issued": flops / seconds / 1e12,
            "err_small_sigma": small_sigma_error(provider, layout, D, device, dtype),
            "kernels_per_call": kernels, "syncs_per_call": syncs, "extra_mem_bytes": peak_extra_bytes(fn, device),
            "note": None if device.type == "cuda" else (
                "CPU timings" + ("; the Triton providers run in the interpreter" if provider.startswith("triton")
                                 else ""))}


def run(shapes, dtypes, providers, device, emit, deadline=float("inf"), quick=False, **cpu_timing):
    """Measure the roofline, then every (shape, dtype, provider) while time.time() < deadline; emit(row) for each.
    Rows of one shape carry `ratio_to_triton` (time / the op's time of that shape and dtype, same run).
    `cpu_timing`: cpu_seconds and cpu_calls of time_fn."""
    roof = measure_roofline(device, quick=quick or cpu_timing.get("cpu_calls") == 1)
    emit({**header(device), "measured": "roofline", **roof})
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, True  # the native baseline's
    try:
        _run_shapes(shapes, dtypes, providers, device, emit, deadline, roof, cpu_timing)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _run_shapes(shapes, dtypes, providers, device, emit, deadline, roof, cpu_timing):
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
                    row.update(measure(layout, B, K, D, provider, device, dtype, roof, **cpu_timing))
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
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one call each: a smoke run")
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

    shapes = QUICK_SHAPES if args.quick else GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    timing = dict(cpu_seconds=0.0, cpu_calls=1) if args.quick else {}
    run(shapes, [DTYPES[d] for d in args.dtypes], args.providers, device, emit, deadline, quick=args.quick, **timing)


if __name__ == "__main__":
    sys.exit(main())
