"""Ahead-of-time compilation of every Triton kernel configuration for NVIDIA targets, without a GPU.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` lowers a kernel to PTX and a cubin on any
machine; cuobjdump's resource usage of the cubin gives registers and the stack frame (spills), the compiler's
metadata the shared memory. Builds run in parallel worker processes and land in triton's on-disk cache, so a second
run takes seconds.
Run as `python -m pafm_kernels.compile_check [--arch 90 80] [--dtype bf16 fp16 fp32] [--jobs N]` for the table.
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

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import per_row_pool, shared_pool

# Usable shared memory per block (bytes): sm_80 (A100) 163 KiB, sm_90 (H100) 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = ("bf16", "fp16", "fp32")


@dataclass
class KernelBuild:
    kernel: str
    arch: int
    dtype: str
    meta: dict
    num_warps: int
    num_stages: int
    registers: int
    spill_stack: int  # stack-frame bytes per thread; these kernels have no local arrays, so nonzero means spills
    shared: int

    @property
    def fits(self) -> bool:
        return self.shared <= SMEM_LIMIT[self.arch] and self.registers <= 255

    def row(self) -> str:
        meta = ",".join(f"{k}={v}" for k, v in self.meta.items())
        return (f"{self.kernel:<16} sm_{self.arch} {self.dtype:<4} {meta:<30} warps={self.num_warps} "
                f"stages={self.num_stages} regs={self.registers:<3} spill_stack={self.spill_stack}B "
                f"smem={self.shared}B{'' if self.fits else '  (does not fit)'}")


def _arg_type(name: str, dtype: str) -> str:
    """Triton signature type of a kernel argument, from the naming convention of these kernels."""
    if name in ("Z", "X", "ENDPOINT", "NOISE"):
        return f"*{dtype}"  # the op's inputs
    if name in ("ROW_LAB", "POOL_LAB", "OWN", "POOL_INDEX"):
        return "*i64"
    if name in ("tau_value", "refine_nats", "g_dot", "g_sum"):
        return "fp32"
    if name == "ZSQ":
        return "*fp64"
    if name.islower() or name in ("B", "K", "D", "NT"):
        return "i32"
    return "*fp32"  # coefficients, buffers, outputs


def kernel_variants(dtype: str):
    """(name, kernel, constexprs, num_warps, num_stages) for every kernel and tuned configuration at one dtype.

    Every optional feature is switched on (per-row temperature, labels, prior, own endpoint, residual form), the
    variant with the most live state; the split paths are runtime branches of the same kernels.
    """
    sp, pr = shared_pool, per_row_pool
    features = dict(ROW_TAU=True, HAS_LABELS=True, HAS_PRIOR=True)
    sixteen = dtype != "fp32"
    for cfg in sp.LOGITS_CONFIGS:
        const = dict(features, LABELS_2D=True, UPCAST=False, PRECISION=sp.DOT_PRECISION, BLOCK_M=sp.LOGITS_BLOCK_M,
                     BLOCK_N=sp.LOGITS_BLOCK_N, **cfg.kwargs)
        yield "shared_logits", sp._logits_kernel, const, cfg.num_warps, cfg.num_stages
    const = dict(features, LABELS_2D=True, HAS_OWN=True, RESIDUAL=True, BLOCK_N=sp.LOGITS_BLOCK_N, TOP=sp.ROW_TOP,
                 BLOCK_T=sp.ROW_BLOCK_T, BLOCK_D=sp.ROW_BLOCK_D)
    yield "shared_row", sp._row_kernel, const, sp.ROW_WARPS, 3
    for cfg in sp.MIX_CONFIGS:
        const = dict(RESIDUAL=True, UPCAST=False, SPLIT_P=sixteen, P_SCALE=2.0 ** 15 if dtype == "fp16" else 1.0,
                     PRECISION=sp.DOT_PRECISION, BLOCK_M=sp.MIX_BLOCK_M, BLOCK_D=sp.MIX_BLOCK_D, **cfg.kwargs)
        yield "shared_mix", sp._mix_kernel, const, cfg.num_warps, cfg.num_stages
    const = dict(RESIDUAL=True, BLOCK_M=sp.REDUCE_BLOCK_M, BLOCK_D=sp.REDUCE_BLOCK_D)
    yield "shared_mix_sum", sp._mix_reduce_kernel, const, sp.REDUCE_WARPS, 3
    for cfg in pr.PER_ROW_CONFIGS:
        const = dict(features, HAS_POOL_INDEX=True, RESIDUAL=True, EMULATE_FMA=False, **cfg.kwargs)
        yield "per_row", pr._per_row_kernel, const, cfg.num_warps, cfg.num_stages


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
    dtype, index, arch = job
    name, kernel, const, warps, stages = list(kernel_variants(dtype))[index]
    signature = {a: "constexpr" if a in const else _arg_type(a, dtype) for a in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=const), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    regs, stack = _resource_usage(compiled.asm["cubin"])
    meta = {k: v for k, v in const.items() if k.startswith("BLOCK")}
    return KernelBuild(name, arch, dtype, meta, warps, stages, regs, stack, compiled.metadata.shared)


def compile_all(archs=(90, 80), dtypes=DTYPES, jobs=None):
    """Compile every kernel configuration for each arch and input dtype, `jobs` builds at a time.

    Needs a process without TRITON_INTERPRET=1 (the interpreter replaces triton's own jit functions at import);
    the tests therefore run `python -m pafm_kernels.compile_check --json` in a subprocess.
    """
    if knobs.runtime.interpret:
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset; run `python -m pafm_kernels.compile_check`")
    work = [(dtype, i, arch) for dtype in dtypes for i in range(len(list(kernel_variants(dtype)))) for arch in archs]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [_build(job) for job in work]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_build, work))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--jobs", type=int, default=None, help="parallel builds (default: one per CPU)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of the table")
    args = parser.parse_args()
    for build in compile_all(args.arch, args.dtype, args.jobs):
        print(json.dumps(dict(asdict(build), fits=build.fits)) if args.json else build.row(), flush=True)


if __name__ == "__main__":
    main()
