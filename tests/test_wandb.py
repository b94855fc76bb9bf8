"""The training log's throughput columns and its Weights & Biases sink: in-process with a stand-in `wandb` module
(what is sent), with the package missing or the server unreachable (one warning), and a real offline run."""
import glob
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import pafm.logger as logger_module
from pafm.distributed import World
from pafm.logger import MetricsLogger, SideWork, WandbConfig, read_metrics
from pafm.objectives import T_BINS

ROOT = Path(__file__).resolve().parents[1]
WORLD = World(rank=0, size=1, device=torch.device("cpu"))


class FakeWandb(types.ModuleType):
    """What the trainer calls of wandb, recorded."""

    def __init__(self, fail_init=False):
        super().__init__("wandb")
        self.fail_init, self.inits, self.rows, self.finished = fail_init, [], [], 0

    def init(self, **kwargs):
        if self.fail_init:
            raise ConnectionError("api.wandb.ai unreachable")
        self.inits.append(kwargs)
        return types.SimpleNamespace(log=self.rows.append, define_metric=lambda *a, **k: None,
                                     finish=lambda: setattr(self, "finished", self.finished + 1))

    Settings = staticmethod(dict)
    Image = staticmethod(lambda path: ("image", path))


def make_logger(run_dir, *, wandb=None, peak=None, start_step=0, total=2):
    return MetricsLogger(run_dir, WORLD, every=1, total_steps=total, start_step=start_step, batch_size=8, pafm=True,
                         tensorboard=False, progress=False, side=SideWork(WORLD), train_flops_per_image=1e9,
                         peak_flops=peak, wandb=wandb, config={"train": {"steps": total}})


def log_steps(logger, first, last):
    bins = torch.ones(3, T_BINS, dtype=torch.float64)
    for step in range(first, last + 1):
        logger.step(step, 1e-3, torch.tensor(0.5), torch.tensor(0.6), torch.tensor(1.0), True, bins, 0)


@pytest.fixture
def one_rank(monkeypatch):
    monkeypatch.setattr(logger_module, "all_reduce", lambda t, **kwargs: t)  # no process group in-process


def test_throughput_columns_and_mfu_only_with_a_known_peak(tmp_path, one_rank):
    for peak, run in ((None, tmp_path / "cpu"), (1e12, tmp_path / "gpu")):
        run.mkdir()
        logger = make_logger(run, peak=peak)
        log_steps(logger, 1, 2)
        logger.close()
        row = read_metrics(run / "metrics.jsonl")[-1]
        assert row["tflops_per_device"] == pytest.approx(row["images_per_s"] * 1e9 / 1e12)
        assert ("mfu" in row) == (peak is not None)  # omitted, not zero, where the peak is unknown
        if peak:
            assert row["mfu"] == pytest.approx(row["tflops_per_device"] * 1e12 / peak)


def test_wandb_gets_the_rows_grids_and_config_and_a_resume_keeps_the_id(tmp_path, one_rank, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = WandbConfig(project="pafm-tests", mode="offline")
    logger = make_logger(tmp_path, wandb=cfg, total=3)
    log_steps(logger, 1, 2)
    logger.eval_row(2, {"accuracy": 0.5, "frechet_pixels": 3.0}, seconds=1.5, samples=100)
    logger.image("samples", tmp_path / "grid.png", 2)
    logger.close()
    first = fake.inits[0]
    assert first["project"] == "pafm-tests" and first["mode"] == "offline" and first["resume"] == "allow"
    assert first["config"] == {"train": {"steps": 3}} and first["name"] == tmp_path.name
    assert first["id"] == (tmp_path / "wandb_id").read_text().strip()
    assert [r["step"] for r in fake.rows] == [1, 2, 2, 2] and fake.finished == 1
    assert fake.rows[0]["loss"] == 0.5 and "tflops_per_device" in fake.rows[0] and "ess_by_t/bin0" in fake.rows[0]
    assert fake.rows[2]["eval/accuracy"] == 0.5 and fake.rows[2]["eval_seconds"] == 1.5
    assert fake.rows[3]["samples"] == ("image", str(tmp_path / "grid.png"))
    make_logger(tmp_path, wandb=cfg, start_step=2, total=3).close()  # the resumed run
    assert fake.inits[1]["id"] == first["id"]


@pytest.mark.parametrize("module", [None, FakeWandb(fail_init=True)], ids=["not installed", "server unreachable"])
def test_wandb_trouble_is_one_warning_and_the_log_goes_on(tmp_path, one_rank, monkeypatch, capsys, module):
    monkeypatch.setitem(sys.modules, "wandb", module)  # None: `import wandb` raises ImportError
    logger = make_logger(tmp_path, wandb=WandbConfig(project="p"))
    log_steps(logger, 1, 2)
    logger.image("samples", tmp_path / "grid.png", 2)
    logger.close()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("warning") and "Weights & Biases" in warnings[0]
    assert ("pip install" in warnings[0]) == (module is None)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


@pytest.mark.slow
def test_offline_wandb_run_resumes_the_same_run(env, tmp_path):
    from helpers import TINY

    env = {**env, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb-dir"), "WANDB_SILENT": "true"}
    run = tmp_path / "run"
    base = [sys.executable, "-m", "pafm.train", "configs/digits_sit.yaml", f"run.dir={run}", *TINY,
            "checkpoint.every=2", "log.wandb={project: pafm-tests, mode: offline}", "log.sample_every=2",
            "log.sample_steps=2"]
    for steps in (2, 4):
        proc = subprocess.run(base + [f"train.steps={steps}"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    run_id = (run / "wandb_id").read_text().strip()
    runs = sorted(glob.glob(str(run / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs)  # both launches: one W&B run id
    for folder in runs:  # rows and the preview grid were recorded (the history is in the binary run file)
        data = Path(folder, f"run-{run_id}.wandb").read_bytes()
        assert b"tflops_per_device" in data and b"grad_norm" in data
        assert glob.glob(f"{folder}/files/media/images/samples_*.png")
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4
