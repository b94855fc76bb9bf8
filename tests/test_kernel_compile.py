"""Every Triton kernel configuration of every input dtype compiles ahead of time for sm_90 (H100) and sm_80 (A100)
without a GPU.

Prints registers, spill (stack-frame) bytes and shared memory per configuration (`pytest -s` shows the table).
The compiler runs in a subprocess (the test session sets TRITON_INTERPRET=1, under which triton cannot generate
code) with one build per CPU in parallel; triton's on-disk cache makes later runs take seconds.
"""
import json
import os
import subprocess
import sys

from pafm_kernels import compile_check


def test_every_configuration_of_every_dtype_compiles():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pafm_kernels.compile_check", "--json", "--arch", "90", "80"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    builds = [compile_check.KernelBuild(**{k: v for k, v in json.loads(line).items() if k != "fits"})
              for line in out.stdout.splitlines()]
    per_dtype = {d: len(list(compile_check.kernel_variants(d))) for d in compile_check.DTYPES}
    assert len(builds) == 2 * sum(per_dtype.values())
    assert {(b.arch, b.dtype) for b in builds} == {(a, d) for a in (90, 80) for d in compile_check.DTYPES}
    assert {b.kernel for b in builds} == {"shared_logits", "shared_row", "shared_mix", "shared_mix_sum", "per_row"}
    for b in builds:
        print(b.row())
    for b in builds:
        assert b.fits, b.row()
        assert 0 < b.registers <= 255
        if b.dtype != "fp32":  # 16-bit configurations are chosen not to spill; fp32 is a checking path
            assert b.spill_stack <= 64, b.row()
