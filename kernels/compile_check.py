"""Ahead-of-time compilation of every Triton kernel launch for NVIDIA targets, without a GPU.

The launchers run on CPU tensors of each case's shapes with the kernel handles replaced by recorders, so the
arguments are the ones a launch passes; triton's own binder then derives the runtime's specialisation from them
(16-divisible pointers and integers, integers equal to 1), and `triton.compile(ASTSource(fn, signature, constexprs,
attrs), target=GPUTarget("cuda", arch, 32))` lowers exactly that kernel to PTX and a cubin on any machine;
cuobjdump's resource usage of the cubin gives registers and the stack frame (spills), the compiler's metadata the
shared memory. Builds run in parallel worker processes and land in triton's on-disk cache, so a second run takes
seconds.
Run as `python -m pafm_kernels.compile_check [--arch 90 80] [--dtype bf16 fp16 fp32] [--jobs N] [--json | --markdown]`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

from . import per_row_pool, shared_pool

# Usable shared memory per block (bytes): sm_80 (A100) 163 KiB, sm_90 (H100) 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = ("bf16", "fp16", "fp32")


@dataclass
class KernelBuild:
    kernel: str
    arch: int
    dtype: str
    case: str  # the shape whose launch was compiled
    meta: dict
    num_warps: int
    num_stages: int
    registers: int
    spill_stack: int  # stack-frame bytes per thread; these kernels have no local arrays, so nonzero means spills
    shared: int
    aligned_args: int  # arguments the runtime marks divisible by 16
    loop_layout_converts: int  # convert_layout ops in the kernel's first loop (the GEMM loop of the mix)

    @property
    def fits(self) -> bool:
        return self.shared <= SMEM_LIMIT[self.arch] and self.registers <= 255

    def row(self) -> str:
        meta = ",".join(f"{k}={v}" for k, v in self.meta.items())
        return (f"{self.kernel:<16} sm_{self.arch} {self.dtype:<4} {self.case:<22} {meta:<40} warps={self.num_warps} "
                f"stages={self.num_stages} regs={self.registers:<3} spill_stack={self.spill_stack}B "
                f"smem={self.shared}B{'' if self.fits else '  (does not fit)'}")


# The shapes compiled, each with the optional inputs the trainer passes (the class label, the row's own endpoint and
# noise, its pool index) or with every one switched on (a log prior, per-row temperatures, the gate's mask). The
# runtime specialises integers and pointers on their values (divisible by 16, equal to 1), so each shape compiles
# the kernels that run at it: (256, 256, 4096) splits the logits over D (132 SMs), (32, 4096, 4096) splits the mix
# over K, (256, 4096, 4096) splits neither; the bank at 32 rows splits each row's candidates over K (a merge launch
# follows), 256 per-row pools do not.
CASES = [  # (layout, B, K, D, features)
    ("shared", 256, 256, 4096, "trainer"),
    ("shared", 256, 4096, 4096, "trainer"),
    ("shared", 32, 4096, 4096, "all"),
    ("bank", 32, 64, 4096, "trainer"),
    ("per_row", 256, 16, 4096, "all"),
]
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPU_SMS = 132  # an H100 SXM: sets the splits the launchers choose
KERNEL_NAMES = {"_squared_norms_kernel": "shared_norms", "_logits_kernel": "shared_logits", "_row_kernel": "shared_row",
                "_mix_kernel": "shared_mix", "_mix_reduce_kernel": "shared_mix_sum", "_per_row_kernel": "per_row",
                "_per_row_merge_kernel": "per_row_merge"}


class _Recorder:
    """Stands in for a kernel handle (`kernel[grid](*args, **kwargs)`) and records each launch, once per
    autotuning configuration, with the keyword arguments the autotuner would add."""

    def __init__(self, handle, launches):
        tuned = isinstance(handle, Autotuner)
        self.fn = handle.fn if tuned else handle
        self.configs = handle.configs if tuned else [None]
        self.launches = launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            for cfg in self.configs:
                self.launches.append((self.fn, args, {**kwargs, **(cfg.all_kwargs() if cfg else {})}))
        return launch


def _case_inputs(layout, B, K, D, features, dtype):
    """CPU tensors shaped as the op receives them (the launchers read only shapes, strides and addresses)."""
    x = lambda *shape: torch.zeros(*shape, dtype=dtype)  # noqa: E731
    coef = lambda: torch.rand(B) + 0.1  # noqa: E731
    everything = features == "all"
    kw = dict(endpoint=x(B, D), noise=x(B, D))
    if layout == "shared":
        pool = x(K, D)
        kw.update(row_labels=torch.zeros(B, dtype=torch.long), endpoint_index=torch.arange(B))
        kw["pool_labels"] = torch.zeros(B, K, dtype=torch.long) if everything else torch.zeros(K, dtype=torch.long)
    else:
        pool = x(10, K, D) if layout == "bank" else x(B, K, D)
        kw.update(row_labels=torch.zeros(B, dtype=torch.long), pool_labels=torch.zeros(B, K, dtype=torch.long))
        if layout == "bank":
            kw["pool_index"] = torch.zeros(B, dtype=torch.long)
    if everything:
        kw["log_prior"] = torch.zeros(B, K)
        kw["active"] = torch.ones(B, dtype=torch.bool)  # the gate on t
    tau = coef() if everything else 1.0
    return (x(B, D), pool, coef(), coef(), coef(), coef(), tau), kw


def recorded_launches(layout, B, K, D, features, dtype):
    """[(jit function, args, kwargs)] of every kernel launch the op makes at this case, as on an H100."""
    from . import launch

    args, kw = _case_inputs(layout, B, K, D, features, TORCH_DTYPES[dtype])
    launches = []
    handles = [(shared_pool, n) for n in ("_squared_norms_kernel", "_logits_tuned", "_row_kernel", "_mix_tuned",
                                          "_mix_reduce_kernel")]
    handles += [(per_row_pool, "_per_row_tuned"), (per_row_pool, "_per_row_merge_kernel")]
    saved = [getattr(m, n) for m, n in handles] + [launch.SMS_WITHOUT_GPU]
    try:
        for m, n in handles:
            setattr(m, n, _Recorder(getattr(m, n), launches))
        launch.SMS_WITHOUT_GPU = GPU_SMS
        inputs = launch.prepare(*args, **kw)
        if layout == "shared":
            shared_pool.shared_pool_posterior(inputs)
        else:
            per_row_pool.per_row_posterior(inputs)
    finally:
        for (m, n), handle in zip(handles, saved):
            setattr(m, n, handle)
        launch.SMS_WITHOUT_GPU = saved[-1]
    return launches


def runtime_specialisation(fn, args, kwargs, arch):
    """(signature, constexprs, attrs, options) exactly as triton's JIT derives them when it launches `fn` with
    these arguments: pointers and integers divisible by 16 get `tt.divisibility`, integers equal to 1 become
    constants. Uses the JIT's own binder (the same in triton 3.6 and 3.8)."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def build_jobs(archs=(90, 80), dtypes=DTYPES):
    """One job per distinct (kernel, specialisation, options, arch) over every case and dtype."""
    jobs = {}
    for dtype in dtypes:
        for layout, B, K, D, features in CASES:
            for fn, args, kwargs in recorded_launches(layout, B, K, D, features, dtype):
                for arch in archs:
                    signature, constexprs, attrs, options = runtime_specialisation(fn, args, kwargs, arch)
                    opts = {k: v for k, v in options.__dict__.items() if k in ("num_warps", "num_stages")}
                    key = (fn.__name__, arch, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                           repr(sorted(attrs.items())), repr(opts))
                    case = f"{layout} {B}x{K}x{D}"
                    jobs.setdefault(key, (fn.__name__, arch, dtype, case, signature, constexprs, attrs, opts))
    return list(jobs.values())


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack-frame bytes per thread) of a cubin; ptxas puts register spills in the stack frame."""
    from triton.backends.nvidia.compiler import get_ptxas

    cuobjdump = Path(get_ptxas(90).path).with_name("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(cuobjdump), "-res-usage", str(path)], capture_output=True, text=True, check=True)
    usage = re.search(r"REG:(\d+) STACK:(\d+)", out.stdout)
    return int(usage.group(1)), int(usage.group(2))


def _build(job) -> KernelBuild:
    name, arch, dtype, case, signature, constexprs, attrs, opts = job
    module = per_row_pool if name.startswith("_per_row") else shared_pool
    fn = getattr(module, name)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=opts)
    regs, stack = _resource_usage(compiled.asm["cubin"])
    named = {fn.arg_names[path[0]]: value for path, value in constexprs.items()}
    meta = {k: v for k, v in named.items() if k.startswith("BLOCK")}
    # Integer arguments the runtime turned into constants (equal to 1), e.g. split_d: that branch is compiled out.
    meta.update({k: v for k, v in named.items() if k.islower() and k in ("split_d", "split_k")})
    ttgir = compiled.asm["ttgir"]
    loop = ttgir[ttgir.find("scf.for"):ttgir.find("scf.yield")] if "scf.for" in ttgir else ""
    return KernelBuild(KERNEL_NAMES[name], arch, dtype, case, meta, opts["num_warps"], opts["num_stages"], regs,
                       stack, compiled.metadata.shared, len(attrs), loop.count("convert_layout"))


def compile_all(archs=(90, 80), dtypes=DTYPES, jobs=None):
    """Compile every kernel launch of every case for each arch and input dtype, `jobs` builds at a time.

    Needs a process without TRITON_INTERPRET=1 (the interpreter replaces triton's own jit functions at import);
    the tests therefore run `python -m pafm_kernels.compile_check --json` in a subprocess.
    """
    if knobs.runtime.interpret:
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset; run `python -m pafm_kernels.compile_check`")
    work = build_jobs(archs, dtypes)
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [_build(job) for job in work]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_build, work))


def markdown_table(builds) -> str:
    """One row per (kernel, case, configuration), one column per (dtype, arch): registers / spill bytes / shared KB."""
    columns = sorted({(b.dtype, b.arch) for b in builds}, key=lambda c: (DTYPES.index(c[0]), -c[1]))
    cells = {}
    for b in builds:
        config = ",".join(f"{k}={v}" for k, v in b.meta.items()) + f" w{b.num_warps} s{b.num_stages}"
        cell = f"{b.registers} / {b.spill_stack} / {b.shared / 1024:.0f}" + ("" if b.fits else " (no fit)")
        cells.setdefault((b.kernel, b.case, config), {})[(b.dtype, b.arch)] = cell
    lines = ["| kernel | case | configuration | " + " | ".join(f"{d} sm_{a}" for d, a in columns) + " |",
             "|---" * (3 + len(columns)) + "|"]
    for (kernel, case, config), row in cells.items():
        lines.append(f"| {kernel} | {case} | {config} | " + " | ".join(row.get(c, "") for c in columns) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--jobs", type=int, default=None, help="parallel builds (default: one per CPU)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of the table")
    parser.add_argument("--markdown", action="store_true", help="the table of bench/README.md")
    args = parser.parse_args()
    builds = compile_all(args.arch, args.dtype, args.jobs)
    if args.markdown:
        print(markdown_table(builds))
    for build in [] if args.markdown else builds:
        print(json.dumps(dict(asdict(build), fits=build.fits)) if args.json else build.row(), flush=True)


if __name__ == "__main__":
    main()
