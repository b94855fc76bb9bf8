"""Ahead-of-time compilation of every Triton kernel configuration for NVIDIA targets, without a GPU.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` lowers a kernel to PTX and a cubin on any
machine; cuobjdump's resource usage of the cubin gives registers and the stack frame (spills), the compiler's
metadata the shared memory.
Run as `python -m pafm_kernels.compile_check [--arch 90 80] [--dtype bf16]` to print the table.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from . import per_row_pool, shared_pool

# Usable shared memory per block (bytes): sm_80 (A100) 163 KiB, sm_90 (H100) 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_TL_DTYPE = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


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
        return (f"{self.kernel:<16} sm_{self.arch} {self.dtype:<4} {meta:<36} warps={self.num_warps} "
                f"stages={self.num_stages} regs={self.registers:<3} spill_stack={self.spill_stack}B "
                f"smem={self.shared}B{'' if self.fits else '  (does not fit)'}")


def _jit(kernel) -> JITFunction:
    # Under TRITON_INTERPRET=1 `triton.jit` returns an interpreter wrapper; compile from the same Python source.
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def kernel_variants(dtype: str):
    """(name, kernel, signature, constexprs, config) for every kernel and tuned configuration at one input dtype.

    Every optional feature is switched on (labels, prior, residual), the variant with the most live state.
    """
    t = _TL_DTYPE[dtype]
    precision = shared_pool.DOT_PRECISION
    logits_sig = {"Z": f"*{t}", "X": f"*{t}", "ALPHA": "*fp32", "SIGMA": "*fp32", "TAU": "*fp32", "ROW_LAB": "*i64",
                  "POOL_LAB": "*i64", "LOG_PRIOR": "*fp32", "S": "*fp32", "ZSQ": "*fp32", "XSQ": "*fp32",
                  "PART": "*fp32",
                  "B": "i32", "K": "i32", "D": "i32", "NT": "i32", "stride_z": "i32", "stride_x": "i32"}
    for cfg in shared_pool.LOGITS_CONFIGS:
        const = dict(HAS_LABELS=True, LABELS_2D=True, HAS_PRIOR=True, UPCAST=False, PRECISION=precision,
                     BLOCK_N=shared_pool.LOGITS_BLOCK_N, **cfg.kwargs)
        yield "shared_logits", shared_pool._logits_kernel, logits_sig, const, cfg
    mix_sig = {"S": "*fp32", "X": f"*{t}", "PART": "*fp32", "ZSQ": "*fp32", "ALPHA": "*fp32", "SIGMA": "*fp32",
               "TAU": "*fp32", "D_ALPHA": "*fp32", "D_SIGMA": "*fp32", "Z": f"*{t}", "ENDPOINT": f"*{t}",
               "NOISE": f"*{t}", "V": "*fp32", "LSE": "*fp32", "ESS": "*fp32", "B": "i32", "K": "i32", "D": "i32",
               "NT": "i32", "stride_z": "i32", "stride_x": "i32"}
    for cfg in shared_pool.MIX_CONFIGS:
        const = dict(RESIDUAL=True, UPCAST=False, SPLIT_P=dtype != "fp32", PRECISION=precision,
                     BLOCK_T=shared_pool.BLOCK_T, **cfg.kwargs)
        yield "shared_mix", shared_pool._mix_kernel, mix_sig, const, cfg
    row_sig = {"Z": f"*{t}", "X": f"*{t}", "ALPHA": "*fp32", "SIGMA": "*fp32", "TAU": "*fp32", "D_ALPHA": "*fp32",
               "D_SIGMA": "*fp32", "ROW_LAB": "*i64", "POOL_LAB": "*i64", "LOG_PRIOR": "*fp32",
               "ENDPOINT": f"*{t}", "NOISE": f"*{t}", "LOGITS": "*fp32", "V": "*fp32", "LSE": "*fp32",
               "ESS": "*fp32", "K": "i32", "D": "i32", "stride_z": "i32", "stride_xb": "i32", "stride_xk": "i32",
               "stride_pl": "i32", "stride_lp": "i32"}
    for cfg in per_row_pool.PER_ROW_CONFIGS:
        const = dict(HAS_LABELS=True, HAS_PRIOR=True, RESIDUAL=True, EMULATE_FMA=False, **cfg.kwargs)
        yield "per_row", per_row_pool._per_row_kernel, row_sig, const, cfg


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


def compile_all(archs=(90, 80), dtypes=("bf16", "fp16", "fp32"), first_only=False):
    """Compile every kernel configuration (or the first per kernel) for each arch and input dtype.

    Needs a process without TRITON_INTERPRET=1 (the interpreter replaces triton's own jit functions at import);
    the tests therefore run `python -m pafm_kernels.compile_check --json` in a subprocess.
    """
    if knobs.runtime.interpret:
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset; run `python -m pafm_kernels.compile_check`")
    builds = []
    for dtype in dtypes:
        seen = set()
        for name, kernel, sig, const, cfg in kernel_variants(dtype):
            if first_only and name in seen:
                continue
            seen.add(name)
            fn = _jit(kernel)
            signature = dict(sig, **{k: "constexpr" for k in const})
            for arch in archs:
                src = ASTSource(fn, signature, constexprs=const)
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
                regs, stack = _resource_usage(compiled.asm["cubin"])
                meta = {k: v for k, v in const.items() if k.startswith("BLOCK") and k != "BLOCK_T"}
                builds.append(KernelBuild(name, arch, dtype, meta, cfg.num_warps, cfg.num_stages, regs, stack,
                                          compiled.metadata.shared))
    return builds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"])
    parser.add_argument("--first-only", action="store_true", help="only the first configuration of each kernel")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of the table")
    args = parser.parse_args()
    for build in compile_all(args.arch, args.dtype, args.first_only):
        print(json.dumps(dict(asdict(build), fits=build.fits)) if args.json else build.row(), flush=True)


if __name__ == "__main__":
    main()
