"""bench/bench_posterior.py runs end to end on a CPU (`--quick`: tiny shapes, one call each) and its rows carry the
fields the GPU run reports: the measured roofline first, then per provider the host time, the floor from that
roofline, the error against float64 near sigma -> 0 and the ratio to the op."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_posterior.py"


@pytest.mark.slow
def test_quick_run_on_cpu_reports_every_provider_with_its_error_and_floor(tmp_path):
    out = tmp_path / "rows.jsonl"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--dtypes", "bf16", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    roof = rows[0]
    assert roof["measured"] == "roofline" and roof["device"].startswith("cpu")
    assert roof["gemm_bf16_flops"] > 0 and roof["copy_bytes_per_s"] > 0
    assert roof["gemm_tf32x3_flops"] == pytest.approx(roof["gemm_tf32_flops"] / 3)
    measured = rows[1:]
    assert {(r["layout"], r["provider"]) for r in measured} == {
        ("shared", p) for p in ("triton", "triton_unrefined", "compiled_native", "peer_chunked", "float64")} | {
        ("bank", p) for p in ("triton", "compiled_native", "peer_chunked", "float64")}
    for r in measured:
        assert "error" not in r, r
        assert r["device"].startswith("cpu") and r["dtype"] == "bfloat16"
        assert r["time_us"] > 0 and r["floor_us"] > 0 and r["time_over_floor"] > 0
        assert r["err_small_sigma"] >= 0 and r["ratio_to_triton"] > 0
        assert r["kernel_us"] is None  # torch.profiler's CUDA durations exist only on CUDA
    err = {(r["layout"], r["provider"]): r["err_small_sigma"] for r in measured}
    for layout in ("shared", "bank"):
        # The op and the float64 reference stay exact near sigma -> 0; a bf16 broadcast of z - a x does not.
        assert err[(layout, "triton")] <= 1e-5 and err[(layout, "float64")] <= 1e-5
        assert err[(layout, "peer_chunked")] > 1e-2
