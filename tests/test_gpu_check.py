"""bench/gpu_check.py: its plan fits the deadline on a GPU, and it runs end to end without one (--dry-run: CPU
tensors, tiny shapes, the Triton interpreter)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPT = BENCH / "gpu_check.py"
sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402

DRY_DEADLINE_S = 400.0


@pytest.mark.parametrize("quick", [False, True])
def test_plan_leaves_every_item_its_estimate_within_the_deadline(quick):
    items, deadline = gpu_check.ITEMS, gpu_check.DEFAULT_DEADLINE_S
    schedule = gpu_check.plan(items, deadline, quick=quick)
    estimates = gpu_check.estimates(quick, dry_run=False)
    assert [p["item"] for p in schedule] == items
    assert sum(estimates.values()) <= deadline
    assert schedule[-1]["end_s"] == pytest.approx(deadline, abs=0.1)
    # Each item is killed where the later items' shares begin: whatever an item does, each later one keeps at least
    # its whole estimate, and its own deadline (a grace period before its kill) leaves it its minimum.
    for n, entry in enumerate(schedule):
        start = schedule[n - 1]["end_s"] if n else 0.0
        assert entry["end_s"] - start >= estimates[entry["item"]] - 0.1
        assert entry["end_s"] - entry["grace_s"] - start >= gpu_check.MIN_SECONDS[entry["item"]]
        assert 0 < entry["grace_s"] <= gpu_check.GRACE_S
    # The large-index case keeps more than 2^31 elements and fits its own estimate inside the correctness item.
    assert gpu_check.LARGE_ROWS * gpu_check.LARGE_K * gpu_check.LARGE_D > 2 ** 31
    assert gpu_check.LARGE_CASE_S < estimates["correctness"]


def test_dry_run_plan_fits_the_tests_deadline():
    assert sum(gpu_check.ESTIMATE_DRY.values()) <= DRY_DEADLINE_S


def test_a_case_that_would_overrun_is_skipped_with_a_row(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rows = gpu_check.Rows(tmp_path, "correctness", time.time() + 5, quick=False, dry_run=True)
    ran = []
    assert rows.guarded("big", ran.append, 1, needs_s=30) is None
    rows.guarded("small", ran.append, 2, needs_s=1)
    (row,) = [json.loads(line) for line in (tmp_path / gpu_check.ROWS_FILE).read_text().splitlines()]
    assert ran == [2] and row["case"] == "big" and row["skipped"].startswith("deadline: needs about 30 s")


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_item(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it for its items
    start = time.time()
    out = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--dry-run", "--deadline-s",
                          str(DRY_DEADLINE_S)], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    print(f"{len(rows)} rows in {time.time() - start:.0f} s")
    plan, done = rows[0], rows[-1]
    assert plan["item"] == "plan" and plan["estimated_s"] <= plan["deadline_s"] and "warning" not in plan
    assert done["item"] == "done" and done["seconds"] <= DRY_DEADLINE_S
    rows = rows[1:-1]
    order = gpu_check.ITEMS
    assert [r["item"] for r in rows] == sorted((r["item"] for r in rows), key=order.index)
    assert {r["item"] for r in rows} == set(order)
    for r in rows:
        assert {"device", "torch", "triton", "cuda", "date"} <= set(r), r
        assert "error" not in r, r
        assert "skipped" not in r or "CUDA" in r["skipped"], r
    env_row = next(r for r in rows if r["item"] == "environment")
    assert env_row["python_headers"] and env_row["gcc"] and env_row["pafm_imports"] is True
    checks = [r for r in rows if r["item"] == "correctness" and r.get("ok") is not None]
    assert len(checks) >= 10 and all(r["ok"] for r in checks), [r for r in checks if not r["ok"]]
    timed = [r for r in rows if r["item"] == "op_time" and "provider" in r]
    assert {r["provider"] for r in timed} == {"triton", "triton_unrefined", "compiled_native", "peer_chunked",
                                              "float64"}
    assert all(r["host_us"] > 0 and r["err_small_sigma"] >= 0 for r in timed)
    # The float64 reference is exact near sigma -> 0 where fp32 logits are not.
    assert all(r["err_small_sigma"] < 1e-6 for r in timed if r["provider"] == "float64")
    train = [r for r in rows if r["item"] == "train_step"]
    assert {r["objective"] for r in train} == {"fm", "pafm"} and all(r["images_per_s"] > 0 for r in train)


def test_the_large_case_pins_the_per_row_autotuner_and_restores_it():
    """The over-2^31 case runs at one configuration on the GPU (autotuning 4 GB of pools would outlast the check; with
    a single configuration triton's autotuner benchmarks nothing): the block leaves the autotuner one configuration
    and restores the full list after it, also when the block raises."""
    from pafm_kernels import per_row_pool

    before = list(per_row_pool._per_row_tuned.configs)
    assert len(before) > 1
    with per_row_pool.fixed_config() as pinned:
        assert pinned is before[0] and per_row_pool._per_row_tuned.configs == [before[0]]
    assert per_row_pool._per_row_tuned.configs == before
    with pytest.raises(RuntimeError), per_row_pool.fixed_config(1):
        raise RuntimeError("a failure inside the block")
    assert per_row_pool._per_row_tuned.configs == before
