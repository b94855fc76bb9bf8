"""bench/gpu_check.py runs end to end without a GPU (--dry-run: CPU tensors, tiny shapes, the Triton interpreter)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the GPU check's dry run

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def test_gpu_check_dry_run_writes_every_item(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it for its items
    start = time.time()
    out = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--dry-run", "--deadline-s", "150"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    print(f"{len(rows)} rows in {time.time() - start:.0f} s")
    assert [r["item"] for r in rows] == sorted((r["item"] for r in rows), key=["environment", "roofline",
                                                "correctness", "op_time", "train_step"].index)
    assert {r["item"] for r in rows} == {"environment", "roofline", "correctness", "op_time", "train_step"}
    for r in rows:
        assert {"device", "torch", "triton", "cuda", "date"} <= set(r), r
        assert "error" not in r, r
        assert "skipped" not in r or "CUDA" in r["skipped"], r
    env_row = next(r for r in rows if r["item"] == "environment")
    assert env_row["python_headers"] and env_row["gcc"] and env_row["pafm_imports"] is True
    checks = [r for r in rows if r["item"] == "correctness" and r.get("ok") is not None]
    assert len(checks) >= 10 and all(r["ok"] for r in checks), [r for r in checks if not r["ok"]]
    providers = {r["provider"] for r in rows if r["item"] == "op_time" and "provider" in r}
    assert providers == {"triton", "triton_unrefined", "eager", "compile"}
    assert all(r.get("time_us", 0) > 0 for r in rows if "provider" in r)
    train = [r for r in rows if r["item"] == "train_step"]
    assert {r["objective"] for r in train} == {"fm", "pafm"} and all(r["images_per_s"] > 0 for r in train)
