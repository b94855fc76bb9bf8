"""bench/gpu_train_check.py dry-runs on the CPU (a tiny model, fp32, 8x8 latents): every stage of the trainer's
CUDA-path check writes its row, the killed run resumes to exactly the uninterrupted run's losses, and the evaluation
scores FID with a random-weight Inception file."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPT = BENCH / "gpu_train_check.py"
sys.path.insert(0, str(BENCH))
import gpu_train_check  # noqa: E402

STAGES = ["train_shards", "train_run", "train_compile", "train_throughput", "train_grid", "train_resume",
          "train_eval"]


def test_kill_reaches_a_process_that_left_the_process_group(tmp_path):
    """torchrun's worker may run in its own session: the kill must reach it (a crash, not a graceful stop)."""
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
            "start_new_session=True); time.sleep(60)")
    proc = gpu_train_check.start([sys.executable, "-c", code], tmp_path / "log")
    deadline = time.time() + 20
    while not gpu_train_check.descendants(proc.pid) and time.time() < deadline:
        time.sleep(0.05)
    (child,) = gpu_train_check.descendants(proc.pid)
    gpu_train_check.kill(proc)
    assert proc.returncode == -9 and not Path(f"/proc/{child}").exists()


def test_compile_events_are_counted_from_dynamos_own_logs(tmp_path):
    """A function recompiled past dynamo's limit and one graph break, logged by this torch under TORCH_LOGS."""
    code = ("import torch\n"
            "@torch.compile(backend='eager', dynamic=False)\n"
            "def scaled(x, n):\n    return x * n\n"
            "@torch.compile(backend='eager')\n"
            "def broken(x):\n    return x * 2 if x.sum().item() > 0 else x\n"
            "for n in range(1, 12):\n    scaled(torch.ones(2), n)\n"
            "broken(torch.ones(2))\n")
    env = dict(os.environ, TORCH_LOGS="recompiles,graph_breaks", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = gpu_train_check.count_compile_events((proc.stdout + proc.stderr).splitlines())
    limit = torch_recompile_limit()
    assert counts["recompiles"] == limit and counts["recompile_limit_hit"] == 1 and counts["graph_breaks"] == 1
    assert "scaled" in counts["examples"][0]


def torch_recompile_limit() -> int:
    import torch._dynamo

    config = torch._dynamo.config
    return getattr(config, "recompile_limit", None) or config.cache_size_limit


@pytest.mark.slow
def test_gpu_train_check_dry_run_writes_every_stage(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    start = time.time()
    out = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--dry-run", "--deadline-s", "500"],
                         capture_output=True, text=True, env=env, timeout=700, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    print(f"{len(rows)} rows in {time.time() - start:.0f} s")
    assert [r["item"] for r in rows] == STAGES
    by = {r["item"]: r for r in rows}
    for r in rows:
        assert {"device", "torch", "cuda", "date", "seconds"} <= set(r), r
        assert r["ok"] is True, r
    assert "pafm.train configs/imagenet_sit_b2.yaml" in by["train_run"]["command"]
    assert by["train_run"]["run_b_exit"] == "killed" and by["train_run"]["run_a_done"].startswith("done: step 6")
    assert by["train_compile"]["recompile_limit_hit"] == 0
    assert by["train_throughput"]["steps"] == 6 and all(s["images_per_s"] > 0
                                                       for s in by["train_throughput"]["per_step"].values())
    resume = by["train_resume"]
    # The resumed steps are the uninterrupted run's, bit for bit, from the checkpoint the kill left.
    assert resume["steps_compared"] >= 1 and resume["losses_resumed"] == resume["losses_a"]
    assert resume["newest_complete_after_kill"] in resume["trainer_says"]
    assert by["train_eval"]["fid"] > 0 and by["train_grid"]["width"] > 0
