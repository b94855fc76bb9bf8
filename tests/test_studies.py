"""Each study's --quick size end to end (train and evaluate through the CLIs, results file with its environment,
PNG plot), marked slow; and the studies' statistics and closed forms against independent computations (fast).
Quick sizes are tiny: the tests check that the studies run and record what they must, not the science."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "studies"))


@pytest.fixture(autouse=True)
def sigterm_handler_restored():
    """A study's parser passes SIGTERM on to its runs; tests that call a study's main in this process put the
    handler back."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def run_study(name, out, env, *flags):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "studies" / f"{name}.py"), *(flags or ["--quick"]),
                           "--out", str(out)], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    environment = results["environment"]
    for key in ("date", "device", "torch", "numpy", "seeds", "commit"):
        assert key in environment
    assert results["quick"] is True
    return results


def check_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_target_quality_quick(tmp_path, env):
    r = run_study("target_quality", tmp_path, env)
    rows = r["datasets"]["digits"]["sources"]
    assert set(rows) == {"batch-32", "bank-64", "neighbors-8", "resample-8"}
    for row in rows.values():
        assert len(row["by_t"]["err"]) == 5 and all(e >= 0 for e in row["by_t"]["err"])
        assert all(1.0 - 1e-4 <= e for e in row["by_t"]["ess"])
    check_png(tmp_path / "target_quality.png")
    gate = r["gate"]
    for case in gate["cases"].values():
        assert len(case["deviation"]) == gate["bins"] == 20 and all(d >= 0 for d in case["deviation"])
        assert all(n > 0 for n in case["rows"])
        shares = [case["outside_share"][f"{g:g}"] for g in gate["gates"]]
        assert shares == sorted(shares, reverse=True) and shares[-1] == 0.0  # nothing lies outside [0, 1]
    # independent Gaussian stand-ins: the noisiest twentieth is far from u, the data end is u exactly
    stand_in = gate["cases"]["ImageNet-shaped 4x32x32, Gaussian stand-in"]["deviation"]
    assert stand_in[0] > 0.1 and stand_in[-1] < 1e-12
    assert set(gate["cc12m_resample_closed_form"]["outside_share_by_vae_std"]) == {"0.01", "0.03", "0.1", "0.3"}
    check_png(tmp_path / "gate_target_error.png")


@pytest.mark.slow
def test_gradient_variance_quick(tmp_path, env):
    r = run_study("gradient_variance", tmp_path, env)
    for rows in r["states"].values():
        assert rows["fm"]["fm_over_this"] == 1.0
        assert all(v > 0 for row in rows.values() for v in row["variance_by_t"])
    check_png(tmp_path / "gradient_variance.png")


@pytest.mark.slow
def test_sample_quality_quick(tmp_path, env):
    r = run_study("sample_quality", tmp_path, env)
    rows = r["datasets"]["digits"]["rows"]
    assert set(rows) == {"fm", "pafm-exact"}
    for row in rows.values():
        assert 0.0 <= row["accuracy"]["mean"] <= 1.0 and row["frechet_pixels"]["mean"] > 0
        assert row["runs"][0]["curve"]["steps"]
    check_png(tmp_path / "loss_curves.png")


@pytest.mark.slow
def test_overhead_quick(tmp_path, env):
    r = run_study("overhead", tmp_path, env)
    rows = r["datasets"]["digits"]["variants"]
    assert rows["fm"]["ratio_to_fm"] == 1.0 and {"bank-64", "exact", "resample-8"} <= set(rows)
    assert all(row["ms_per_step"] > 0 for row in rows.values())
    check_png(tmp_path / "overhead.png")


@pytest.mark.slow
def test_memorisation_quick_on_a_stand_in_mnist(tmp_path, env, mnist_cache):
    """builtin:mnist from the stand-in wheel (the session's mnist_cache fixture), no download."""
    r = run_study("memorisation", tmp_path / "out", env)
    rows = r["subsets"]["20"]
    assert rows["closed-form optimum"]["memorization"] == 1.0  # the empirical optimum reproduces training images
    assert 0.0 <= rows["fm"]["memorization"] <= 1.0 and rows["fm"]["diversity"] > 0
    assert list(rows["fm"]["by_step"]) == ["1", "2"] and rows["fm"]["step"] == 2  # scored at every milestone
    assert "real test digits" in rows
    check_png(tmp_path / "out" / "memorisation.png")


def check_gate_results(d, arms, seeds, sampler_names):
    assert d["arms"] == arms and d["complete_seeds"] == seeds
    assert set(d["runs"]) == {str(s) for s in seeds}
    for by_arm in d["runs"].values():
        assert set(by_arm) == set(arms)
        for row in by_arm.values():
            assert set(row["metrics"]) == set(sampler_names) and row["sec_per_step_median"] > 0
            assert row["curve"]["steps"][-1] == d["size"]["steps"]
    # paired: every arm of a seed predicted the same first step on the same draws as FM
    assert d["pairing"]["first_step_fm_loss_difference"] == {str(s): 0.0 for s in seeds}
    assert all(r["max_difference"] == 0.0 for r in d["pairing"]["draws"].values())
    for sampler in sampler_names:
        for arm in arms[1:]:
            row = d["paired"][sampler][arm]
            assert row["seeds"] == seeds
            acc = row["accuracy"]
            diffs = [d["runs"][str(s)][arm]["metrics"][sampler]["accuracy"]
                     - d["runs"][str(s)]["fm"]["metrics"][sampler]["accuracy"] for s in seeds]
            assert acc["n"] == len(seeds) and acc["mean_diff"] == pytest.approx(np.mean(diffs))
            assert acc["wins"] + acc["losses"] <= len(seeds) and 0.0 <= acc["sign_p"] <= 1.0
    assert d["cost"]["fm"]["ratio_to_fm"] == 1.0
    assert {a: r["seeds"] for a, r in d["fm_loss_at_equal_time"].items()} == {a: seeds for a in arms[1:]}


@pytest.mark.slow
def test_gate_quick(tmp_path, env):
    r = run_study("gate", tmp_path, env)
    check_gate_results(r["datasets"]["digits"], ["fm", "bank-g0.5"], [0, 1], ["cfg1.0"])
    check_png(tmp_path / "gate.png")


def test_gate_finished_only_reads_back_runs_trained_and_scored_and_starts_nothing_else(tmp_path, monkeypatch):
    import gate

    size = gate.QUICK["digits"]  # 3 steps, seeds 0 and 1, one sampler
    runs = {("fm", 0): (3, True), ("bank-g0.5", 0): (2, False),  # cut
            ("fm", 1): (3, True), ("bank-g0.5", 1): (3, False)}  # trained, being scored
    for (arm, seed), (last, scored) in runs.items():
        run = gate.run_folder(tmp_path, "digits", arm, seed)
        rows = [{"step": s, "loss": 1.0, "fm_loss": 1.0, "sec_per_step": 0.1} for s in range(1, last + 1)]
        (run / "eval-cfg1.0").mkdir(parents=True)
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')  # torn
        if scored:
            (run / "eval-cfg1.0" / "eval.json").write_text("{}")
    started = []

    def run_one(name, size, arm, overrides, seed, work):
        started.append((seed, arm))
        return {"metrics": {}, "sec_per_step_median": 0.1}

    monkeypatch.setattr(gate, "run_one", run_one)
    gate.run_dataset("digits", size, gate.QUICK_ARMS, tmp_path, 1, lambda runs: None, finished_only=True)
    assert sorted(started) == [(0, "fm"), (1, "fm")]


def test_gate_command_line_narrows_the_arms_and_passes_finished_only(tmp_path, monkeypatch, capsys):
    import gate

    calls = []
    monkeypatch.setattr(gate, "run_study", lambda *args: calls.append(args) or 0)
    assert gate.main(["--datasets", "mnist", "--arms", "exact-g1", "--finished-only", "--out", str(tmp_path)]) == 0
    study, out, work, sizes, arm_table, jobs, quick, finished_only = calls[0]
    assert list(sizes) == ["mnist"] and list(arm_table) == ["fm", "exact-g1"] and finished_only and not quick
    with pytest.raises(SystemExit) as stop:  # the quick study has no exact arm: refused, not silently FM alone
        gate.main(["--quick", "--arms", "exact-g1", "--out", str(tmp_path)])
    assert stop.value.code == 2 and "--arms exact-g1: not an arm of this study" in capsys.readouterr().err


def test_sigterm_to_a_study_reaches_its_runs_and_starts_no_other(tmp_path, env):
    """A study killed with SIGTERM, twice, while two worker threads each wait on a run and two more runs are
    queued: both runs get the signal (one checkpoints at once, the other takes 3 s, so a worker is free to take the
    next task meanwhile), the study waits for them and ends with 143, and neither queued run starts."""
    (tmp_path / "stand_in_run.py").write_text(
        "import pathlib, signal, sys, time\n"
        "folder, tag = pathlib.Path(sys.argv[1]), sys.argv[2]\n"
        "(folder / f'started-{tag}').touch()\n"
        "def checkpoint_and_stop(*_):\n"
        "    time.sleep(3.0 * (tag == '1')); (folder / f'terminated-{tag}').touch(); sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, checkpoint_and_stop)\n"
        "(folder / f'ready-{tag}').touch()\n"
        "time.sleep(60)\n")
    study = ("import sys; sys.path.insert(0, 'bench/studies'); import common\n"
             "from concurrent.futures import ThreadPoolExecutor\n"
             "common.parser('a study')\n"
             "with ThreadPoolExecutor(2) as pool:\n"
             f"    for tag in range(4): pool.submit(common.cli, 'stand_in_run', {str(tmp_path)!r}, tag)\n")
    driver = subprocess.Popen([sys.executable, "-c", study], cwd=ROOT,
                              env={**env, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])})
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready-{tag}").exists() for tag in (0, 1)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all((tmp_path / f"ready-{tag}").exists() for tag in (0, 1))
        driver.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        driver.send_signal(signal.SIGTERM)  # a second signal while a run checkpoints changes nothing
        assert driver.wait(timeout=60) == 143
        assert all((tmp_path / f"terminated-{tag}").exists() for tag in (0, 1))  # signalled and waited for
        time.sleep(2.0)  # a run started at the last moment would have written its first marker by now
        assert sorted(p.name for p in tmp_path.glob("started-*")) == ["started-0", "started-1"]
    finally:
        driver.kill()


@pytest.mark.slow
def test_gpu_gate_dry_run_on_a_stand_in_mnist(tmp_path, env, mnist_cache):
    r = run_study("gpu_gate", tmp_path, env, "--dry-run", "--arms", "bank-g0.5", "exact-g0.5")
    d = r["datasets"]["mnist"]
    check_gate_results(d, ["fm", "bank-g0.5", "exact-g0.5"], [0, 1], ["cfg1.0"])
    assert {"frechet_cnn", "diversity"} <= set(d["runs"]["0"]["fm"]["metrics"]["cfg1.0"])
    check_png(tmp_path / "gpu_gate.png")


@pytest.mark.slow
def test_mnist_steps_quick_on_a_stand_in_mnist(tmp_path, env, mnist_cache):
    r = run_study("mnist_steps", tmp_path, env)
    assert list(r["milestones"]) == ["1", "2"]
    assert all(0.0 <= m["metrics"]["accuracy"] <= 1.0 for m in r["milestones"].values())
    check_png(tmp_path / "mnist_steps.png")


# --- the studies' formulas against independent computations ------------------------------------------------------
def test_paired_interval_and_sign_test_match_scipy():
    from scipy import stats

    from gate import paired, sign_test

    d = [0.03, -0.01, 0.05, 0.02, 0.04, 0.00, 0.06]
    row = paired(d, better=1)
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=np.mean(d), scale=stats.sem(d))
    assert row["ci95"] == pytest.approx([lo, hi], rel=1e-12)
    assert (row["wins"], row["losses"]) == (5, 1)  # the tie is dropped
    assert row["sign_p"] == pytest.approx(stats.binomtest(5, 6, 0.5).pvalue, rel=1e-12)
    assert paired(d, better=-1)["wins"] == 1  # smaller is better: the signs swap
    for wins, losses in [(0, 0), (10, 0), (3, 7), (5, 5), (1, 12)]:
        expected = 1.0 if wins + losses == 0 else stats.binomtest(wins, wins + losses, 0.5).pvalue
        assert sign_test(wins, losses) == pytest.approx(expected, rel=1e-12)
    assert paired([0.2], better=1)["ci95"] is None  # one pair: no interval


def test_fm_loss_at_equal_time_reads_the_costlier_arm_where_the_cheaper_one_ends():
    from gate import fm_loss_at_equal_time

    steps = list(range(20, 1001, 20))  # window ends, as gate.py stores its curves

    def run(slope, offset):
        return {"curve": {"steps": steps, "fm_loss": [offset + slope / k for k in steps]}}

    runs = {str(s): {"fm": run(10.0, 0.1 * s), "exact": run(9.0, 0.1 * s)} for s in range(4)}
    row = fm_loss_at_equal_time(runs, "exact", 1.5)  # 1000 / 1.5 = 666.7: the window ending at 660
    assert (row["arm_step"], row["fm_step"]) == (660, 1000)
    assert row["mean_diff"] == pytest.approx(9.0 / 660 - 10.0 / 1000, rel=1e-12)
    assert (row["wins"], row["losses"], row["n"]) == (0, 4, 4)  # FM ahead in each seed at equal time
    cheap = fm_loss_at_equal_time(runs, "exact", 0.8)  # a cheaper arm: FM is read at 800
    assert (cheap["arm_step"], cheap["fm_step"]) == (1000, 800)
    assert cheap["mean_diff"] == pytest.approx(9.0 / 1000 - 10.0 / 800, rel=1e-12) and cheap["wins"] == 4
    del runs["3"]["exact"]  # a seed where the arm has not finished is left out
    assert fm_loss_at_equal_time(runs, "exact", 1.5)["seeds"] == [0, 1, 2]


def test_gaussian_endpoint_deviation_matches_the_conditional_covariance():
    """E|v* - u|^2 for x ~ N(m, s^2) against Var(w) - Cov(w, z)^2 / Var(z) from the joint covariance of
    (w, z) = (s xi - eps, t s xi + (1 - t) eps), built from the linear map of (xi, eps)."""
    from target_quality import deviation_gaussian_endpoint

    for s in (0.01, 0.1, 0.5, 2.0):
        for t in (0.001, 0.3, 0.5, 0.9, 0.999):
            A = np.array([[s, -1.0], [t * s, 1.0 - t]])  # rows: w, z as functions of (xi, eps)
            cov = A @ A.T
            expected = cov[0, 0] - cov[0, 1] ** 2 / cov[1, 1]
            assert deviation_gaussian_endpoint(np.array(t), s) == pytest.approx(expected, rel=1e-10)


def test_outside_share_weights_by_the_recipes_t_density():
    from scipy import stats

    from target_quality import outside_share, t_density

    t = (np.arange(1000) + 0.5) / 1000
    flat = np.ones_like(t)
    assert outside_share(t, flat, "uniform")["0.25"] == pytest.approx(0.75)
    logit_normal = stats.norm.pdf(np.log(t / (1 - t))) / (t * (1 - t))
    assert t_density("logit_normal", t) == pytest.approx(logit_normal, rel=1e-12)
    assert outside_share(t, flat, "logit_normal")["0.5"] == pytest.approx(0.5, abs=1e-9)  # symmetric about 1/2
    assert outside_share(t, flat, "logit_normal")["0.75"] == pytest.approx(stats.norm.sf(math.log(3)), abs=1e-4)


def test_steps_to_target_interpolates_in_log_steps():
    from mnist_steps import steps_to

    assert steps_to(0.9, [500, 1000], [0.5, 0.7]) == pytest.approx(500 * 2 ** 2.0)  # two more doublings
    assert steps_to(0.9, [500, 1000], [0.8, 0.95]) == 1000.0
    assert steps_to(0.9, [500, 1000], [0.7, 0.6]) is None
    assert steps_to(0.9, [500], [0.7]) is None
    assert steps_to(0.9, [250, 500], [0.117, 0.133]) is None  # the line reaches 0.9 only after 49 doublings
