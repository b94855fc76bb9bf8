"""One unattended check of the posterior-velocity kernels and the training step on a GPU machine.

    python bench/gpu_check.py --out DIR [--deadline-s 240] [--quick] [--dry-run]

For a bare machine: torch and triton preinstalled, no network, this package installed with
`pip install --no-deps --no-build-isolation -e .`. The items run in order, each in its own subprocess (a CUDA fault
poisons every later measurement of a process). The plan, the first row, gives each item its estimated seconds on an
H100 (ESTIMATE; their sum fits the default deadline) and the time at which it is killed: where the later items'
estimates begin, so an item that overruns loses its own cases, never a later item's. Inside an item, a case that
would overrun its item's deadline is skipped with a row saying so. Every row is printed as it comes and appended to
DIR/gpu_check.jsonl with the device, torch/triton/CUDA versions and the date:

  environment  device, versions, gcc and the Python headers (Triton's launcher and torch.compile build C code)
  roofline     measured copy GB/s and bf16 / tf32 GEMM TFLOP/s
  correctness  every kernel against float64 on the device: shared and per-row pools, fp32/fp16/bf16, a t grid
               down to sigma = 1e-5 with near-duplicates, labels/prior/temperature, grids under and over a wave;
               the fp32 expansion's measured logit error as a fraction of the bound that decides refinement; per-row
               pools of more than 2^31 elements (1024 rows: 8 waves of programs, one fixed configuration)
  op_time      bench/bench_posterior.py's providers (the op, the op unrefined, torch.compile of the dtype-native
               mm -> softmax -> mm, a StableVM-style chunked broadcast, the float64 reference) at its GPU shapes
               ((256, 4096, 4096), the class bank as training reads it: 32 rows x 64 entries of 1000 classes x 4096,
               then (256, 256, 4096)), bf16 and fp32: GPU time (the profiler's kernel durations) beside host-inclusive
               time (do_bench), the floor from the measured roofline, each provider's error against float64 near
               sigma -> 0, kernels and host syncs per call; inputs drawn once per shape
  train_step   SiT-B/2 and SiT-XL/2 at the 8-GPU recipes' per-rank batch (32) with FM and PAFM (a filled class
               bank) in bf16: ms/step, images/s, MFU, PAFM / FM

The trainer's own CUDA path (torchrun, FSDP2, compile, checkpoints, resume, grid, evaluation) is checked by
bench/gpu_train_check.py, which writes its rows to the same file.

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
# Seconds each item is planned to take on one H100, its process's start-up and imports included (full run, --quick,
# the CPU dry run); bench/README.md gives the arithmetic. The deadline's margin over their sum is spread over the
# items in proportion, and each item is killed where the later items' shares begin: an item that overruns loses its
# own last cases, never a later item's time.
ESTIMATE = {"environment": 10, "roofline": 15, "correctness": 45, "op_time": 95, "train_step": 50}
ESTIMATE_QUICK = {"environment": 10, "roofline": 12, "correctness": 30, "op_time": 65, "train_step": 25}
# On a shared 2-core CPU, where importing torch and triton alone can take 15 s.
ESTIMATE_DRY = {"environment": 30, "roofline": 30, "correctness": 110, "op_time": 80, "train_step": 40}
# Seconds an item needs at the least to be worth starting (start-up, imports and its first useful row).
MIN_SECONDS = {"environment": 5, "roofline": 8, "correctness": 20, "op_time": 25, "train_step": 20}
# A measurement started before its item's deadline may end this much after it (at most a quarter of the item's
# share) before the item is killed.
GRACE_S = 10.0
DEFAULT_DEADLINE_S = 240.0
ROWS_FILE = "gpu_check.jsonl"


def estimates(quick: bool, dry_run: bool) -> dict:
    return ESTIMATE_DRY if dry_run else ESTIMATE_QUICK if quick else ESTIMATE


def plan(items, deadline_s: float, quick: bool = False, dry_run: bool = False) -> list[dict]:
    """Per item: its estimate, its share of the deadline (the estimate scaled by deadline / their sum), the seconds
    from the start at which it is killed (the end of its share) and its own deadline, a grace period earlier."""
    est = estimates(quick, dry_run)
    scale = deadline_s / sum(est[item] for item in items)
    schedule, end = [], 0.0
    for item in items:
        share = est[item] * scale
        end += share
        schedule.append({"item": item, "estimate_s": est[item], "share_s": round(share, 1), "end_s": round(end, 1),
                         "grace_s": min(GRACE_S, share / 4)})
    return schedule


# --- the parent: runs each item in a subprocess under the deadline -------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.jsonl and each item's stderr log")
    parser.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S)
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

    started = time.time()
    schedule = plan(args.items, args.deadline_s, args.quick, args.dry_run)
    total = sum(p["estimate_s"] for p in schedule)
    _emit(out, {"item": "plan", "date": _now(), "deadline_s": args.deadline_s, "estimated_s": total,
                "items": schedule, **({"warning": "the items' estimates exceed the deadline: the last ones may be "
                                                  "skipped"} if total > args.deadline_s else {})})
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.dry_run:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    else:
        env.pop("TRITON_INTERPRET", None)
    item_seconds = {}  # what each item took: the measurement that replaces its estimate
    for entry in schedule:
        item = entry["item"]
        end = started + entry["end_s"]
        item_deadline = end - entry["grace_s"]
        left = end - time.time()
        base = {"item": item, "date": _now()}
        if left < MIN_SECONDS[item] * (0.2 if args.dry_run else 1.0):
            _emit(out, {**base, "skipped": f"deadline: {left:.0f} s left for this item"})
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--item", item, "--out", str(out),
               "--deadline-at", str(item_deadline)] + ["--quick"] * args.quick + ["--dry-run"] * args.dry_run
        log = out / f"{item}.stderr.log"
        start = time.time()
        with open(log, "w") as err:
            proc = subprocess.Popen(cmd, env=env, stderr=err, start_new_session=True)
            try:
                code = proc.wait(timeout=max(1.0, end - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = "timeout"
        item_seconds[item] = round(time.time() - start, 1)
        if code != 0:
            tail = log.read_text(errors="replace")[-1500:]
            _emit(out, {**base, "error": f"exit {code} after {time.time() - start:.0f} s", "stderr_tail": tail})
    _emit(out, {"item": "done", "date": _now(), "seconds": round(time.time() - started, 1),
                "item_seconds": item_seconds})
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

    def guarded(self, label, fn, *args, needs_s: float = 0.0):
        """Runs fn(*args) unless it would overrun the deadline (`needs_s`: its estimate); an exception becomes a
        row, and the item goes on."""
        left = self.time_left()
        if left <= needs_s:
            self.emit(case=label, skipped=f"deadline: needs about {needs_s:.0f} s, {max(left, 0):.0f} s left")
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
        rows.guarded("over_2_31_elements", large_case, rows, needs_s=LARGE_CASE_S)


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


# Per-row pools of more than 2^31 elements: 1024 rows (about 8 waves of programs on 132 SMs) of 520 candidates x 4096,
# 4.4 GB in bf16, one read at about 3 TB/s. Its estimate: drawing the pool, one call at one fixed configuration and
# the float64 reference, well under LARGE_CASE_S.
LARGE_ROWS, LARGE_K, LARGE_D = 1024, 520, 4096
LARGE_CASE_S = 15.0


def large_case(rows: Rows):
    """Per-row pools of more than 2^31 elements (64-bit offsets), bf16, against the float64-grade reference; the
    own endpoint in each row's last slot, where the offsets are largest."""
    import torch

    from pafm_kernels import per_row_pool, posterior_velocity
    from pafm_kernels.reference import posterior_velocity_reference
    from pafm_kernels.testing import rel_err

    B, K, D = LARGE_ROWS, LARGE_K, LARGE_D
    assert B * K * D > 2 ** 31
    g = torch.Generator(device=rows.device).manual_seed(0)
    pool = torch.randn(B, K, D, device=rows.device, dtype=torch.bfloat16, generator=g)
    t = torch.rand(B, device=rows.device, generator=g) * 0.9 + 0.05
    x = pool[:, -1].float()
    z = (t[:, None] * x + (1 - t)[:, None] * torch.randn(B, D, device=rows.device, generator=g)).bfloat16()
    coefs = (t, 1 - t, torch.ones_like(t), -torch.ones_like(t))
    # One configuration: benchmarking every one on 4 GB of pools would take longer than the check.
    with per_row_pool.fixed_config() as config:
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = posterior_velocity(z, pool, *coefs, backend="triton")  # includes the kernel's compilation
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        start = time.perf_counter()
        posterior_velocity(z, pool, *coefs, backend="triton")
        torch.cuda.synchronize()
        second = time.perf_counter() - start
    v64, lse64, ess64 = posterior_velocity_reference(z.double(), pool, *coefs, 1.0)
    err = max(rel_err(out.velocity, v64), rel_err(out.lse, lse64), rel_err(out.ess, ess64))
    rows.emit(case="over_2_31_elements", B=B, K=K, D=D, elements=B * K * D, config=str(config),
              first_call_s=first, call_s=second, gbps=pool.numel() * 2 / second / 1e9, max_rel_err=err,
              ok=err <= 2e-4)


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


# Seconds one op_time case may take: a torch.compile (the first of the run also starts inductor's workers), and any
# other provider (autotuning at a new shape, do_bench's 125 ms, five profiled calls, the small-sigma error).
COMPILE_CASE_S, CASE_S = 20.0, 4.0
LOW_PRECISION_INPUTS = ("z", "pool", "endpoint", "noise")


def roofline_from_rows(rows: Rows):
    """The roofline item's measurements of this run in bench_posterior's form, or None."""
    found = {}
    path = rows.out / ROWS_FILE
    for line in (path.read_text().splitlines() if path.exists() else []):
        r = json.loads(line)
        if r.get("item") == "roofline":
            found[r.get("case")] = r
    if not {"copy", "gemm_bf16", "gemm_tf32"} <= set(found) or not all("tflops" in found[c] or "gbps" in found[c]
                                                                        for c in found):
        return None
    tf32 = found["gemm_tf32"]["tflops"] * 1e12
    return {"gemm_bf16_flops": found["gemm_bf16"]["tflops"] * 1e12, "gemm_tf32_flops": tf32,
            "gemm_tf32x3_flops": tf32 / 3, "copy_bytes_per_s": found["copy"]["gbps"] * 1e9}


def small_sigma_error(bench_posterior, provider, layout, D, device, dtype):
    """max over rows at sigma in [1e-5, 1e-2] of |v - v64| / |v64|. The compiled baseline's error is that of the
    same function run eagerly: compiling it again for these shapes would cost more than the rest of its case, and
    its error comes from the fp32 logits, which inductor computes alike."""
    inputs, oracle = bench_posterior.small_sigma_inputs(layout, D, device, dtype)
    if provider == "compiled_native":
        velocity = bench_posterior.native_velocity(inputs)
    else:
        velocity = bench_posterior.make_fn(provider, inputs)()
    velocity = velocity.double().cpu()
    return ((velocity - oracle).norm(dim=1) / oracle.norm(dim=1)).max().item()


def op_time(rows: Rows):
    """Every provider of bench/bench_posterior.py at its GPU shapes: GPU time (the profiler's kernel durations) beside
    host-inclusive time, the floor, and the error near sigma -> 0. Inputs are drawn once per shape (the bank's 1 GB
    of normals too) and cast per dtype; each case is skipped with a row when it would overrun the deadline."""
    import torch

    import bench_posterior

    dev = rows.device
    providers = bench_posterior.PROVIDERS
    if rows.dry_run:  # torch.compile builds C++ on a CPU: once, for the first shape
        shapes, dtypes = bench_posterior.QUICK_SHAPES, [torch.float32]
    else:
        # The small shared pool last: the large pool (the floor target) and the bank (training's shape) come first
        # should the deadline cut the item.
        shapes = sorted(bench_posterior.GPU_SHAPES, key=lambda shape: shape[0] == "shared" and shape[2] <= 256)
        dtypes = [torch.bfloat16] if rows.quick else [torch.bfloat16, torch.float32]
    roof = roofline_from_rows(rows)
    rows.emit(case="roofline_used", source="the roofline item" if roof else "measured here", **(
        roof or (roof := bench_posterior.measure_roofline(dev, quick=rows.dry_run))))
    errors = {}  # (layout, dtype, provider): the small-sigma error does not depend on B or K

    def one(layout, B, K, D, dtype, provider, inputs, triton_times):
        fn = bench_posterior.make_fn(provider, inputs)
        host = bench_posterior.time_fn(fn, dev, cpu_seconds=0.0, cpu_calls=1 if rows.dry_run else 3)
        gpu, kernels, syncs = bench_posterior.profile_calls(fn, dev)
        key = (layout, dtype, provider)
        if key not in errors:
            errors[key] = small_sigma_error(bench_posterior, provider, layout, D, dev, dtype)
        floor = bench_posterior.floor_seconds(layout, B, K, D, dtype, roof)
        if provider == "triton":
            triton_times.update(host=host, gpu=gpu)
        rows.emit(case=f"{layout}_{B}x{K}x{D}", layout=layout, B=B, K=K, D=D, dtype=str(dtype).replace("torch.", ""),
                  provider=provider, gpu_us=gpu and gpu * 1e6, host_us=host * 1e6, floor_us=floor * 1e6,
                  gpu_over_floor=gpu and gpu / floor, host_over_floor=host / floor,
                  gpu_ratio_to_triton=gpu / triton_times["gpu"] if gpu and triton_times.get("gpu") else None,
                  host_ratio_to_triton=host / triton_times["host"] if triton_times.get("host") else None,
                  err_small_sigma=errors[key], err_note="eager form of the same function" if
                  provider == "compiled_native" else None, kernels_per_call=kernels, syncs_per_call=syncs,
                  extra_mem_bytes=bench_posterior.peak_extra_bytes(fn, dev))
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    saved_tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, True
    try:
        for n, (layout, B, K, D) in enumerate(shapes):
            base = rows.guarded(f"inputs_{layout}_{B}x{K}x{D}", bench_posterior.make_inputs, layout, B, K, D, dev,
                                torch.float32, needs_s=CASE_S)
            if base is None:
                continue
            for dtype in dtypes:
                inputs = {k: v.to(dtype) if k in LOW_PRECISION_INPUTS else v for k, v in base.items()}
                triton_times = {}
                for provider in providers:
                    if provider == "triton_unrefined" and layout != "shared":
                        continue  # per-row pools have no refinement
                    if rows.dry_run and provider == "compiled_native" and n > 0:
                        continue
                    rows.guarded(f"{layout}_{B}x{K}x{D} {str(dtype)[6:]} {provider}", one, layout, B, K, D, dtype,
                                 provider, inputs, triton_times,
                                 needs_s=COMPILE_CASE_S if provider == "compiled_native" else CASE_S)
                del inputs
            del base
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    if rows.dry_run:
        rows.emit(case="launches_and_syncs", skipped="needs CUDA (torch.profiler's kernel and sync events)")


# The 8-GPU recipes' per-rank batch (data.batch_size 256 over 8 ranks): SiT-XL/2 at 256 rows on one GPU needs about
# 105 GB of activations without activation checkpointing, at 32 about 13 GB.
PER_RANK_BATCH = 32
TRAIN_CASE_S = {"SiT-B/2": 6.0, "SiT-XL/2": 12.0, "SiT-T/2": 3.0}


def train_step(rows: Rows):
    """FM and PAFM (a filled class bank) steps of SiT-B/2 and SiT-XL/2 at the recipe's per-rank batch, bf16, eager
    (no compile, no FSDP: bench_train's one-process step), each model built once for both objectives."""
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
        models = [("SiT-B/2", PER_RANK_BATCH, 32, 4, 1000, "bf16")] + (
            [] if rows.quick else [("SiT-XL/2", PER_RANK_BATCH, 32, 4, 1000, "bf16")])
        steps, warmup = (5, 3) if rows.quick else (10, 5)
    peak_measured = None
    rows_file = rows.out / ROWS_FILE
    if rows_file.exists():  # the roofline item's GEMM, measured in the same run
        for line in rows_file.read_text().splitlines():
            r = json.loads(line)
            if r.get("item") == "roofline" and r.get("case") == "gemm_bf16" and "tflops" in r:
                peak_measured = r["tflops"] * 1e12
    peak_nominal = dense_bf16_peak(rows.header["device"])
    batch_note = None if rows.dry_run else (f"{PER_RANK_BATCH} rows: the 8-GPU recipes' per-rank batch (256 / 8); no "
                                            "activation checkpointing, no compile")

    def one(label, model_name, batch, size, channels, classes, precision, kind, source, fm_seconds, net):
        seconds, net = bench_train.time_step(model_name, size=size, channels=channels, classes=classes, batch=batch,
                                             precision=precision, kind=kind, source=source, device=dev, steps=steps,
                                             warmup=warmup, fill_bank=True, model=net)
        flops = train_flops_per_image(net.config) * batch / seconds
        rows.emit(case=label, model=model_name, batch=batch, batch_note=batch_note, latent=[channels, size, size],
                  precision=precision, objective=kind, source=source if kind == "pafm" else None,
                  ms_per_step=seconds * 1e3, images_per_s=batch / seconds, model_tflops=flops / 1e12,
                  mfu_nominal=flops / peak_nominal if peak_nominal else None,
                  mfu_of_measured_gemm=flops / peak_measured if peak_measured else None,
                  ratio_to_fm=seconds / fm_seconds if fm_seconds else None,
                  peak_memory_gb=torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else None)
        return seconds, net

    for model_name, batch, size, channels, classes, precision in models:
        fm_seconds, net = None, None
        for kind, source in (("fm", "batch"), ("pafm", "bank")):
            label = f"{model_name} {kind}{'/' + source if kind == 'pafm' else ''}"
            result = rows.guarded(label, one, label, model_name, batch, size, channels, classes, precision, kind,
                                  source, fm_seconds, net, needs_s=TRAIN_CASE_S[model_name] * (2 if net is None else 1))
            if result is None:
                break
            seconds, net = result
            fm_seconds = fm_seconds or seconds
        del net
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    sys.exit(main())
