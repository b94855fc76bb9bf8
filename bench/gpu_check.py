"""One unattended check of the posterior-velocity kernels and the training step on a GPU machine.

    python bench/gpu_check.py --out DIR [--deadline-s 280] [--quick] [--dry-run]

For a bare machine: torch and triton preinstalled, no network, this package installed with
`pip install --no-deps --no-build-isolation -e .`. The items run in order of value, each in its own subprocess (a
CUDA fault poisons every later measurement of a process) and each only while the deadline leaves time; every row is
printed as it comes and appended to DIR/gpu_check.jsonl with the device, torch/triton/CUDA versions and the date:

  environment  device, versions, gcc and the Python headers (Triton's launcher and torch.compile build C code)
  roofline     measured copy GB/s and bf16 / tf32 GEMM TFLOP/s
  correctness  every kernel against float64 on the device: shared and per-row pools, fp32/fp16/bf16, a t grid
               down to sigma = 1e-5 with near-duplicates, labels/prior/temperature, grids under and over a wave;
               and the fp32 expansion's measured logit error as a fraction of the bound that decides refinement
  op_time      Triton / Triton without refinement / eager reference / torch.compile of it at (256, 256, 4096),
               (256, 4096, 4096) and a bank's per-class part (256 rows x 64 entries x 4096 of 1000 classes), bf16
               and fp32 (the training dtype): times, ratios, kernels and host
               syncs per call (torch.profiler)
  train_step   SiT-B/2 (batch 256) and SiT-XL/2 with FM and PAFM (a filled class bank) in bf16: images/s, MFU

--quick: fewer shapes and steps. --dry-run: CPU tensors, tiny shapes, the Triton interpreter; what needs CUDA is
skipped with a row saying so (tests/test_gpu_check.py runs it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ITEMS = ["environment", "roofline", "correctness", "op_time", "train_step"]
# Seconds an item needs at the least to be worth starting (start-up, imports and its first useful row).
MIN_SECONDS = {"environment": 5, "roofline": 15, "correctness": 30, "op_time": 30, "train_step": 45}
ROWS_FILE = "gpu_check.jsonl"


# --- the parent: runs each item in a subprocess under the deadline -------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.jsonl and each item's stderr log")
    parser.add_argument("--deadline-s", type=float, default=280.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="CPU tensors, tiny shapes, the Triton interpreter")
    parser.add_argument("--items", nargs="+", default=ITEMS, choices=ITEMS)
    parser.add_argument("--item", choices=ITEMS, help=argparse.SUPPRESS)  # a subprocess running one item
    parser.add_argument("--deadline-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.item:
        return run_item(args.item, out, args.deadline_at, args.quick, args.dry_run)

    deadline = time.time() + args.deadline_s
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.dry_run:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    else:
        env.pop("TRITON_INTERPRET", None)
    scale = 0.2 if args.dry_run else 1.0
    for n, item in enumerate(args.items):
        # Each item stops early enough to leave the later ones their minimum: the last items are not starved.
        item_deadline = deadline - scale * sum(MIN_SECONDS[later] for later in args.items[n + 1:])
        left = item_deadline - time.time()
        base = {"item": item, "date": _now()}
        if left < MIN_SECONDS[item] * scale:
            _emit(out, {**base, "skipped": f"deadline: {left:.0f} s left for this item"})
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--item", item, "--out", str(out),
               "--deadline-at", str(item_deadline)] + ["--quick"] * args.quick + ["--dry-run"] * args.dry_run
        log = out / f"{item}.stderr.log"
        start = time.time()
        with open(log, "w") as err:
            proc = subprocess.Popen(cmd, env=env, stderr=err, start_new_session=True)
            try:  # a measurement started before the item's deadline may finish a little after it
                code = proc.wait(timeout=max(1.0, min(left + 15.0, deadline - time.time())))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = "timeout"
        if code != 0:
            tail = log.read_text(errors="replace")[-1500:]
            _emit(out, {**base, "error": f"exit {code} after {time.time() - start:.0f} s", "stderr_tail": tail})
    print(f"rows in {out / ROWS_FILE}", flush=True)
    return 0


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _emit(out: Path, row: dict):
    print(json.dumps(row), flush=True)
    with open(out / ROWS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")


# --- one item in this process ----------------------------------------------------------------------------------------
class Rows:
    """Appends rows with the device, versions and date; knows the deadline and the mode."""

    def __init__(self, out, item, deadline, quick, dry_run):
        import torch
        import triton

        self.out, self.item, self.deadline, self.quick, self.dry_run = out, item, deadline, quick, dry_run
        self.device = torch.device("cpu" if dry_run else "cuda")
        name = "cpu (dry run, Triton interpreter)" if dry_run else torch.cuda.get_device_name()
        self.header = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
                       "cuda": torch.version.cuda}

    def emit(self, **fields):
        _emit(self.out, {**self.header, "date": _now(), "item": self.item, **fields})

    def time_left(self):
        return self.deadline - time.time()

    def guarded(self, label, fn, *args):
        """Runs fn(*args) unless the deadline has passed; an exception becomes a row, and the item goes on."""
        if self.time_left() <= 0:
            self.emit(case=label, skipped="deadline")
            return None
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - a failing case is a result
            self.emit(case=label, error=repr(e)[:600])
            return None


def run_item(item, out, deadline, quick, dry_run):
    if dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_posterior, bench_train
    rows = Rows(out, item, deadline, quick, dry_run)
    {"environment": environment, "roofline": roofline, "correctness": correctness, "op_time": op_time,
     "train_step": train_step}[item](rows)
    return 0


def environment(rows: Rows):
    import torch

    include = sysconfig.get_paths().get("include") or ""
    compiler = shutil.which("gcc") or shutil.which("cc")
    version = None
    if compiler:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    fields = {"python": platform.python_version(), "gcc": compiler, "gcc_version": version,
              "python_headers": os.path.exists(os.path.join(include, "Python.h")),
              "triton_interpret": os.environ.get("TRITON_INTERPRET")}
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        fields["ptxas"] = get_ptxas(90).path
    except Exception as e:  # noqa: BLE001
        fields["ptxas"] = f"unavailable: {e!r}"[:200]
    if torch.cuda.is_available() and not rows.dry_run:
        p = torch.cuda.get_device_properties(0)
        fields.update(capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                      memory_gib=round(p.total_memory / 2 ** 30, 1), devices=torch.cuda.device_count())
    else:
        fields["cuda_available"] = torch.cuda.is_available()
    try:
        import pafm.models  # noqa: F401
        import pafm.objectives  # noqa: F401
        fields["pafm_imports"] = True
    except Exception as e:  # noqa: BLE001
        fields["pafm_imports"] = f"no: {e!r}"[:300]
    fields["ok"] = bool(compiler) and fields["python_headers"]
    if not fields["ok"]:
        fields["warning"] = "Triton's launcher and torch.compile need a C compiler and Python.h"
    rows.emit(**fields)


def _median_seconds(fn, device, reps=10):
    import statistics

    import torch

    fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e-3)
    return statistics.median(times)


def roofline(rows: Rows):
    import torch

    dev = rows.device
    note = "cpu: not a GPU roofline" if rows.dry_run else None
    n = (1 << 20) if rows.dry_run else (1 << 30 if rows.quick else 1 << 31)  # bytes copied
    buffers = [torch.empty(n, dtype=torch.uint8, device=dev) for _ in range(2)]
    seconds = _median_seconds(lambda: buffers[1].copy_(buffers[0]), dev)
    rows.emit(case="copy", bytes=n, gbps=2 * n / seconds / 1e9, note=note)  # read + write
    buffers.clear()
    size = 256 if rows.dry_run else 8192

    def gemm(name, dtype, tf32):
        a = torch.randn(size, size, device=dev, dtype=dtype)
        b = torch.randn(size, size, device=dev, dtype=dtype)
        saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            seconds = _median_seconds(lambda: a @ b, dev)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
        rows.emit(case=name, n=size, tflops=2 * size ** 3 / seconds / 1e12, note=note)

    for name, dtype, tf32 in (("gemm_bf16", torch.bfloat16, False), ("gemm_tf32", torch.float32, True)):
        rows.guarded(name, gemm, name, dtype, tf32)


def correctness(rows: Rows):
    import torch

    from pafm_kernels import posterior_velocity, shared_pool
    from pafm_kernels.naive import posterior_velocity_naive
    from pafm_kernels.reference import posterior_velocity_reference
    from pafm_kernels.testing import make_case, rel_err, t_grid_case

    dev = rows.device
    t_grid = [1e-3, 0.05, 0.2, 0.4, 0.6, 0.8, 0.95, 0.99, 0.999, 0.9999, 1 - 1e-5]
    D = 256 if rows.dry_run else 4096
    dtypes = [torch.float32, torch.bfloat16] + ([] if rows.quick or rows.dry_run else [torch.float16])
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-3}

    def check(case, args, kw, dtype, oracle="naive", refine=True, **extra):
        saved = shared_pool.REFINE_NATS
        shared_pool.REFINE_NATS = saved if refine else float("inf")
        try:
            out = posterior_velocity(*args, **kw, backend="triton")
        finally:
            shared_pool.REFINE_NATS = saved
        if oracle == "naive":
            v64, lse64, ess64 = posterior_velocity_naive(*args, **kw)
        else:  # the float64-grade chunked reference, for shapes whose B x K x D float64 tensor would not fit
            z, pool, a, s, da, ds = (t.double() if t.is_floating_point() else t for t in args)
            kw64 = {k: (v.double() if v.is_floating_point() else v) for k, v in kw.items() if k != "endpoint_index"}
            tau = kw64.pop("temperature", 1.0)
            v64, lse64, ess64 = posterior_velocity_reference(z.flatten(1), pool.flatten(1), a, s, da, ds, tau, **{
                k: (v.flatten(1) if k in ("endpoint", "noise") else v) for k, v in kw64.items()})
            v64 = v64.reshape(z.shape)
        errs = dict(err_velocity=rel_err(out.velocity, v64), err_lse=rel_err(out.lse, lse64),
                    err_ess=rel_err(out.ess, ess64), lse_abs=(out.lse.double() - lse64).abs().max().item())
        t = args[2].float().cpu()
        per_t = {f"{x:.5g}": rel_err(out.velocity[i], v64[i]) for i, x in enumerate(t.tolist())} if len(t) <= 16 \
            else None
        ok = errs["err_velocity"] <= tol[dtype] and errs["err_ess"] <= 10 * tol[dtype] and errs["err_lse"] <= 1e-5
        rows.emit(case=case, dtype=str(dtype).replace("torch.", ""), refine=refine, **errs, err_velocity_per_t=per_t,
                  tol_velocity=tol[dtype], ok=ok if refine else None, **extra)

    def grid_case(per_row, dtype):
        args, kw = t_grid_case(t_grid, D, dtype=dtype, per_row=per_row, device=dev)
        layout = "per_row" if per_row else "shared"
        check(f"t_grid_{layout}_D{D}", args, kw, dtype)
        if not per_row:
            check(f"t_grid_{layout}_D{D}", args, kw, dtype, refine=False)

    for per_row in (False, True):
        for dtype in dtypes:
            rows.guarded(f"t_grid_{'per_row' if per_row else 'shared'}", grid_case, per_row, dtype)

    # Labels, prior, per-row temperature, own index, ragged sizes; small grids (split) and, off the dry run, a grid
    # over a wave (unsplit), checked against the chunked float64 reference.
    if rows.dry_run:
        shapes = [(64, 300, (40,), "naive"), (16, 128, (300,), "reference")]
    else:
        shapes = [(64, 300, (4, 16, 16), "naive"), (320, 2048, (4096,), "reference")]
    def feature_case(B, K, S, oracle, per_row, dtype):
        args, kw = make_case(B, K if not per_row else 16, S, per_row=per_row, dtype=dtype,
                             labels="2d" if per_row else "1d", prior=True, tau="rows", residual=True,
                             own_index=True, t_range=(0.02, 0.98), seed=3)
        args = tuple(a.to(dev) for a in args)
        kw = {k: v.to(dev) for k, v in kw.items()}
        check(f"features_{'per_row' if per_row else 'shared'}_{B}x{K}", args, kw, dtype, oracle=oracle)

    for B, K, S, oracle in shapes:
        for dtype in dtypes:
            for per_row in (False, True):
                if not (per_row and oracle == "reference"):  # the reference check is for a large shared pool
                    rows.guarded(f"features_{B}x{K}", feature_case, B, K, S, oracle, per_row, dtype)

    for dtype in dtypes:
        rows.guarded(f"logit_bound_{dtype}", logit_error_vs_bound, rows, dtype)
    rows.guarded("bank_pool_index", bank_case, rows, check, make_case, D)
    if not rows.dry_run:
        rows.guarded("over_2_31_elements", large_case, rows)


def bank_case(rows: Rows, check, make_case, D):
    """Per-row pools read in place from a class bank's non-contiguous slice (pool_index), as the bank source does."""
    import torch

    from pafm_kernels import posterior_velocity
    from pafm_kernels.naive import posterior_velocity_naive
    from pafm_kernels.testing import rel_err

    B, K, classes = (16, 8, 4) if rows.dry_run else (64, 64, 100)
    for dtype in (torch.float32, torch.bfloat16):
        args, kw = make_case(B, K, (D,), per_row=True, dtype=dtype, labels="2d", residual=True, seed=7)
        index = torch.randint(0, classes, (B,), generator=torch.Generator().manual_seed(0))
        padded = torch.randn(classes, K + 1, D).to(dtype)
        padded[index, :K] = args[1]
        bank = padded.to(rows.device)[:, :K]
        on = [a.to(rows.device) for a in args]
        kw = {k: v.to(rows.device) for k, v in kw.items()}
        out = posterior_velocity(on[0], bank, *on[2:], **kw, pool_index=index.to(rows.device), backend="triton")
        v64, lse64, ess64 = posterior_velocity_naive(on[0], bank[index.to(rows.device)], *on[2:], **kw)
        err = max(rel_err(out.velocity, v64), rel_err(out.lse, lse64), rel_err(out.ess, ess64))
        rows.emit(case="bank_pool_index", dtype=str(dtype).replace("torch.", ""), B=B, K=K, D=D, classes=classes,
                  max_rel_err=err, ok=err <= 2e-4)


def large_case(rows: Rows):
    """Per-row pools of more than 2^31 elements (64-bit offsets), bf16, against the float64-grade reference."""
    import torch

    from pafm_kernels import posterior_velocity
    from pafm_kernels.reference import posterior_velocity_reference
    from pafm_kernels.testing import rel_err

    B, K, D = 64, 8200, 4096  # 2.15e9 elements, 4.3 GB in bf16
    g = torch.Generator(device=rows.device).manual_seed(0)
    pool = torch.randn(B, K, D, device=rows.device, dtype=torch.bfloat16, generator=g)
    t = torch.rand(B, device=rows.device, generator=g) * 0.9 + 0.05
    x = pool[:, -1].float()  # the own endpoint in the last slot: its offsets are the largest
    z = (t[:, None] * x + (1 - t)[:, None] * torch.randn(B, D, device=rows.device, generator=g)).bfloat16()
    coefs = (t, 1 - t, torch.ones_like(t), -torch.ones_like(t))
    out = posterior_velocity(z, pool, *coefs, backend="triton")
    v64, lse64, ess64 = posterior_velocity_reference(z.double(), pool, *coefs, 1.0)
    err = max(rel_err(out.velocity, v64), rel_err(out.lse, lse64), rel_err(out.ess, ess64))
    rows.emit(case="over_2_31_elements", B=B, K=K, D=D, elements=B * K * D, max_rel_err=err, ok=err <= 2e-4)


def logit_error_vs_bound(rows: Rows, dtype):
    """max over (row, candidate) of |S - S_exact| / bound_row for the fp32 expansion (refinement off): the margin
    of the refinement bound on this device. The bound must stay above the error (ratio < 1)."""
    import torch

    from pafm_kernels import shared_pool
    from pafm_kernels.testing import logits_and_bound

    B, K, D = (16, 64, 256) if rows.dry_run else (256, 1024, 4096)
    g = torch.Generator().manual_seed(7)
    t = torch.rand(B, generator=g) * 0.98 + 0.01
    x = torch.randn(K, D, generator=g)
    z = t[:, None] * x[:B] + (1 - t)[:, None] * torch.randn(B, D, generator=g)
    logits, exact, bound = logits_and_bound(z.to(dtype), x.to(dtype), t, 1 - t)
    err = (logits - exact).abs().amax(1)
    ratio = (err / bound).max().item()
    rows.emit(case="logit_error_vs_bound", dtype=str(dtype).replace("torch.", ""), B=B, K=K, D=D,
              max_error_over_bound=ratio, max_error_nats=err.max().item(), rows_over_refine_nats=int(
                  (bound > shared_pool.REFINE_NATS).sum()), ok=ratio < 1.0)


def op_time(rows: Rows):
    import torch

    import bench_posterior

    if rows.dry_run:  # torch.compile builds C++ on a CPU: once, for the first shape
        shapes = [("shared", 8, 16, 64), ("shared", 4, 256, 64), ("per_row", 8, 4, 64), ("bank", 8, 4, 64)]
        dtypes, providers = [torch.float32], ["triton", "triton_unrefined", "eager"]
    else:
        shapes = [("shared", 256, 256, 4096), ("shared", 256, 4096, 4096), ("bank", 256, 64, 4096)]
        dtypes = [torch.bfloat16] if rows.quick else [torch.bfloat16, torch.float32]
        providers = bench_posterior.PROVIDERS

    def emit(row):
        rows.emit(**{k: v for k, v in row.items() if k not in rows.header and k != "date"})

    if rows.dry_run:
        quick_cpu = dict(cpu_seconds=0.0, cpu_calls=1)
        bench_posterior.run(shapes[:1], dtypes, providers + ["compile"], rows.device, emit, rows.deadline, **quick_cpu)
        bench_posterior.run(shapes[1:], dtypes, providers, rows.device, emit, rows.deadline, **quick_cpu)
    else:
        bench_posterior.run(shapes, dtypes, providers, rows.device, emit, rows.deadline)
    if rows.dry_run:
        rows.emit(case="launches_and_syncs", skipped="needs CUDA (torch.profiler's kernel and sync events)")


def train_step(rows: Rows):
    import torch

    try:
        import bench_train
        from pafm.models.flops import dense_bf16_peak, train_flops_per_image
    except Exception as e:  # noqa: BLE001 - the trainer's building blocks may be mid-change
        rows.emit(skipped=f"the trainer's building blocks do not import: {e!r}"[:600])
        return
    dev = rows.device
    if rows.dry_run:
        models = [("SiT-T/2", 8, 8, 1, 10, "fp32")]
        steps, warmup = 2, 1
    else:
        models = [("SiT-B/2", 256, 32, 4, 1000, "bf16")] + ([] if rows.quick else [("SiT-XL/2", 256, 32, 4, 1000,
                                                                                      "bf16")])
        steps, warmup = (3, 2) if rows.quick else (5, 3)
    peak_measured = None
    rows_file = rows.out / ROWS_FILE
    if rows_file.exists():  # the roofline item's GEMM, measured in the same run
        for line in rows_file.read_text().splitlines():
            r = json.loads(line)
            if r.get("item") == "roofline" and r.get("case") == "gemm_bf16" and "tflops" in r:
                peak_measured = r["tflops"] * 1e12
    name = rows.header["device"]
    peak_nominal = dense_bf16_peak(name)
    def one(label, model, batch, size, channels, classes, precision, kind, source, fm_seconds):
        seconds, net = bench_train.time_step(model, size=size, channels=channels, classes=classes, batch=batch,
                                             precision=precision, kind=kind, source=source, device=dev, steps=steps,
                                             warmup=warmup, fill_bank=True)
        flops = train_flops_per_image(net.config) * batch / seconds
        rows.emit(case=label, model=model, batch=batch, latent=[channels, size, size], precision=precision,
                  objective=kind, source=source if kind == "pafm" else None, ms_per_step=seconds * 1e3,
                  images_per_s=batch / seconds, model_tflops=flops / 1e12,
                  mfu_nominal=flops / peak_nominal if peak_nominal else None,
                  mfu_of_measured_gemm=flops / peak_measured if peak_measured else None,
                  ratio_to_fm=seconds / fm_seconds if fm_seconds else None)
        del net
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return seconds

    for model, batch, size, channels, classes, precision in models:
        fm_seconds = None
        for kind, source in (("fm", "batch"), ("pafm", "bank")):
            label = f"{model} {kind}{'/' + source if kind == 'pafm' else ''}"
            if rows.time_left() < (5 if rows.dry_run else 20):
                rows.emit(case=label, skipped="deadline")
                continue
            seconds = rows.guarded(label, one, label, model, batch, size, channels, classes, precision, kind, source,
                                   fm_seconds)
            fm_seconds = fm_seconds or (seconds if kind == "fm" else None)


if __name__ == "__main__":
    sys.exit(main())
