"""Evaluation during training (eval.every): in-process on one gloo rank, and through the trainer on one and two
ranks."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pafm.distributed import World
from pafm.eval_during_training import PLOT_NAME, TrainingEval, TrainingEvalConfig
from pafm.logger import MetricsLogger, SideWork, read_metrics
from pafm.sampling import SamplerConfig
from pafm.train import main

ROOT = Path(__file__).resolve().parents[1]


class FixedEMA:
    def __init__(self, weights):
        self.weights = weights

    def full_state_dict(self):
        return self.weights


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield World(rank=0, size=1, device=torch.device("cpu"))
    dist.destroy_process_group()


def test_scores_are_logged_plotted_repeatable_and_a_failure_is_side_work(tmp_path, one_rank, monkeypatch, capsys):
    from pafm.data import open_dataset
    from pafm.models import build_model

    monkeypatch.setenv("PAFM_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = build_model("SiT-T/2", input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=64, num_heads=2)
    meta = {"model": model.config, "data": {"spec": "builtin:digits", "info": open_dataset("builtin:digits").info},
            "path": "linear"}
    side = SideWork(one_rank)
    logger = MetricsLogger(tmp_path, one_rank, every=1, total_steps=9, start_step=0, batch_size=8, pafm=False,
                           tensorboard=False, progress=False, side=side, train_flops_per_image=1.0)
    cfg = TrainingEvalConfig(every=1, during_training_samples=30, batch_size=8, sampler=SamplerConfig(steps=2))
    ema = FixedEMA(model.state_dict())
    evaluate = TrainingEval(cfg, one_rank, ema, meta, side, tmp_path, logger)
    evaluate(1)
    ema.weights = {}  # weights that do not fit the model: this evaluation fails, the next one works
    evaluate(2)
    ema.weights = model.state_dict()
    evaluate(3)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 3] and all(r["eval_samples"] == 30 for r in rows)
    assert set(rows[0]["eval"]) >= {"accuracy", "frechet_pixels", "memorization"}
    assert rows[0]["eval"] == rows[1]["eval"]  # the same weights, the same fixed noise: the same scores
    assert (tmp_path / PLOT_NAME).stat().st_size > 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "evaluation of step 2" in warnings[0] and side.failures == 1


def test_eval_settings_are_checked_before_training(capsys):
    assert main(["configs/digits_sit.yaml", "eval.every=-1"]) == 2
    assert "eval.every=-1: must be >= 0" in capsys.readouterr().err


def test_a_setting_that_cannot_work_with_the_data_is_named_by_the_trainers_key(tmp_path):
    """pafm.eval's checks name its own keys; the trainer's section says them in its own words."""
    from pafm.config import ConfigError
    from pafm.eval_during_training import TrainingEvalConfig, TrainingSamplerConfig

    meta = {"data": {"spec": "builtin:digits", "info": {"kind": "class", "latent_shape": [1, 8, 8],
                                                         "num_classes": 10}}}
    (tmp_path / "w.pth").write_bytes(b"")
    few = TrainingEvalConfig(every=5, during_training_samples=5, metrics=["isc"],
                             inception_weights=str(tmp_path / "w.pth"))
    with pytest.raises(ConfigError, match=r"eval\.during_training_samples is 5"):
        few.as_eval_config(meta)
    guided = TrainingEvalConfig(every=5, sampler=TrainingSamplerConfig(cfg_channels=4))
    with pytest.raises(ConfigError, match=r"^eval\.sampler\.cfg_channels=4"):
        guided.as_eval_config(meta)


@pytest.mark.slow
def test_two_ranks_score_like_one_and_a_wrong_metric_stops_the_start(env, tmp_path):
    from helpers import TINY

    def run(folder, *extra, nproc=1, check=True):
        launcher = [sys.executable, "-m", "pafm.train"] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
            "pafm.train"]
        proc = subprocess.run(launcher + ["configs/digits_sit.yaml", f"run.dir={tmp_path / folder}", *TINY,
                                          "objective.source=global", "train.steps=4", "checkpoint.every=100",
                                          "eval.every=2", "eval.during_training_samples=40", "eval.batch_size=8",
                                          "eval.sampler.steps=2", *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert (proc.returncode == 0) == check, proc.stderr
        return proc

    run("one")
    run("two", nproc=2)
    evals = {n: [r for r in read_metrics(tmp_path / n / "metrics.jsonl") if "eval" in r] for n in ("one", "two")}
    assert [r["step"] for r in evals["one"]] == [r["step"] for r in evals["two"]] == [2, 4]
    for a, b in zip(evals["one"], evals["two"]):  # 5 chunks over 2 ranks draw what 1 rank draws
        assert b["eval_samples"] == 40 and b["eval"] == pytest.approx(a["eval"], rel=1e-3, abs=1e-3)
    proc = run("wrong", "eval.metrics=[mnist]", check=False)
    assert proc.returncode == 2 and "needs a model of builtin:mnist" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "wrong" / "config.yaml").exists()  # refused before the run folder was written to
