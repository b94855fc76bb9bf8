"""Every Triton kernel configuration compiles ahead of time for sm_90 (H100) and sm_80 (A100) without a GPU.

Prints registers, spill (stack-frame) bytes and shared memory per configuration (`pytest -s` shows the table).
The compiler runs in a subprocess: the test session sets TRITON_INTERPRET=1, under which triton cannot generate code.
"""
import json
import os
import subprocess
import sys

import pytest

from pafm_kernels import compile_check, per_row_pool, shared_pool


def _compile(arch, dtypes, first_only=False):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pafm_kernels.compile_check", "--json", "--arch", str(arch), "--dtype", *dtypes]
    out = subprocess.run(cmd + (["--first-only"] if first_only else []), capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return [compile_check.KernelBuild(**{k: v for k, v in json.loads(line).items() if k != "fits"})
            for line in out.stdout.splitlines()]


@pytest.mark.parametrize("arch", [90, 80])
def test_every_configuration_compiles(arch):
    # Every tuned configuration at bf16 (the training dtype); on sm_90 also fp16 and fp32 for the first
    # configuration of each kernel (the CI time budget does not allow every dtype x configuration x arch).
    builds = _compile(arch, ["bf16"])
    if arch == 90:
        builds += _compile(arch, ["fp16", "fp32"], first_only=True)
    n_configs = len(shared_pool.LOGITS_CONFIGS) + len(shared_pool.MIX_CONFIGS) + len(per_row_pool.PER_ROW_CONFIGS)
    assert len(builds) == n_configs + (2 * 3 if arch == 90 else 0)
    assert {b.kernel for b in builds} == {"shared_logits", "shared_mix", "per_row"}
    for b in builds:
        print(b.row())
    for b in builds:
        assert b.fits, b.row()
        assert 0 < b.registers <= 255
        if b.dtype != "fp32":  # 16-bit configurations are chosen to (nearly) not spill; fp32 is a checking path
            assert b.spill_stack <= 64, b.row()
