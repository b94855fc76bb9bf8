"""Each study's --quick size end to end (train and evaluate through the CLIs, results file with its environment,
PNG plot). Quick sizes are tiny: the tests check that the studies run and record what they must, not the science."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each runs a study

ROOT = Path(__file__).resolve().parents[1]


def run_study(name, out, env):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "studies" / f"{name}.py"), "--quick", "--out",
                           str(out)], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    environment = results["environment"]
    for key in ("date", "device", "torch", "numpy", "seeds", "commit"):
        assert key in environment
    assert results["quick"] is True
    return results


def check_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_target_quality_quick(tmp_path, env):
    r = run_study("target_quality", tmp_path, env)
    rows = r["datasets"]["digits"]["sources"]
    assert set(rows) == {"batch-32", "bank-64", "neighbors-8", "resample-8"}
    for row in rows.values():
        assert len(row["by_t"]["err"]) == 5 and all(e >= 0 for e in row["by_t"]["err"])
        assert all(1.0 - 1e-4 <= e for e in row["by_t"]["ess"])
    check_png(tmp_path / "target_quality.png")


def test_gradient_variance_quick(tmp_path, env):
    r = run_study("gradient_variance", tmp_path, env)
    for rows in r["states"].values():
        assert rows["fm"]["fm_over_this"] == 1.0
        assert all(v > 0 for row in rows.values() for v in row["variance_by_t"])
    check_png(tmp_path / "gradient_variance.png")


def test_sample_quality_quick(tmp_path, env):
    r = run_study("sample_quality", tmp_path, env)
    rows = r["datasets"]["digits"]["rows"]
    assert set(rows) == {"fm", "pafm-exact"}
    for row in rows.values():
        assert 0.0 <= row["accuracy"]["mean"] <= 1.0 and row["frechet_pixels"]["mean"] > 0
        assert row["runs"][0]["curve"]["steps"]
    check_png(tmp_path / "loss_curves.png")


def test_overhead_quick(tmp_path, env):
    r = run_study("overhead", tmp_path, env)
    rows = r["datasets"]["digits"]["variants"]
    assert rows["fm"]["ratio_to_fm"] == 1.0 and {"bank-64", "exact", "resample-8"} <= set(rows)
    assert all(row["ms_per_step"] > 0 for row in rows.values())
    check_png(tmp_path / "overhead.png")


def test_memorisation_quick_on_a_stand_in_mnist(tmp_path, env, mnist_cache):
    """builtin:mnist from the stand-in wheel (the session's mnist_cache fixture), no download."""
    r = run_study("memorisation", tmp_path / "out", env)
    rows = r["subsets"]["20"]
    assert rows["closed-form optimum"]["memorization"] == 1.0  # the empirical optimum reproduces training images
    assert 0.0 <= rows["fm"]["memorization"] <= 1.0 and rows["fm"]["diversity"] > 0
    assert list(rows["fm"]["by_step"]) == ["1", "2"] and rows["fm"]["step"] == 2  # scored at every milestone
    assert "real test digits" in rows
    check_png(tmp_path / "out" / "memorisation.png")
