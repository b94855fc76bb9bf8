"""Every Triton kernel launch of every input dtype compiles ahead of time for sm_90 (H100) and sm_80 (A100) without
a GPU, with the specialisation the runtime gives it (16-divisible pointers and integers, integers equal to 1 as
constants), at each case's shapes.

Prints registers, spill (stack-frame) bytes and shared memory per build (`pytest -s` shows the table).
The compiler runs in a subprocess (the test session sets TRITON_INTERPRET=1, under which triton cannot generate
code) with one build per CPU in parallel; triton's on-disk cache makes later runs take seconds.
"""
import json
import os
import subprocess
import sys

import pytest

from pafm_kernels import compile_check


@pytest.mark.slow
def test_every_launch_of_every_dtype_compiles_with_runtime_specialisation():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pafm_kernels.compile_check", "--json", "--arch", "90", "80"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    builds = [compile_check.KernelBuild(**{k: v for k, v in json.loads(line).items() if k != "fits"})
              for line in out.stdout.splitlines()]
    assert {(b.arch, b.dtype) for b in builds} == {(a, d) for a in (90, 80) for d in compile_check.DTYPES}
    assert {b.kernel for b in builds} == {"shared_norms", "shared_logits", "shared_row", "shared_mix",
                                          "shared_mix_sum", "per_row", "per_row_merge"}
    assert {b.case for b in builds} == {f"{c[0]} {c[1]}x{c[2]}x{c[3]}" for c in compile_check.CASES}
    for b in builds:
        print(b.row())
    for b in builds:
        assert b.fits, b.row()
        assert 0 < b.registers <= 255
        # Every kernel takes 16-byte-aligned buffers: the runtime marks them, and so must this compile (the norms
        # kernel has five arguments: the pool, its output, K, D and the pool's stride).
        assert b.aligned_args >= (4 if b.kernel == "shared_norms" else 8), b.row()
        if b.dtype != "fp32":  # 16-bit configurations are chosen not to spill; fp32 is a checking path
            assert b.spill_stack <= 64, b.row()
    # The mix's two 16-bit dots (weights hi + lo) share one accumulator layout on sm_90: no round trip per k-step.
    mixes = [b for b in builds if b.kernel == "shared_mix" and b.arch == 90 and b.dtype != "fp32"]
    assert mixes and all(b.loop_layout_converts == 0 for b in mixes), [b.row() for b in mixes]
    # Where the grid fills the GPU, split_d = 1 reaches the compiler as a constant and the split path is compiled out.
    unsplit = [b for b in builds if b.kernel == "shared_logits" and b.case == "shared 256x4096x4096"]
    assert unsplit and all(b.meta.get("split_d") == 1 for b in unsplit)
