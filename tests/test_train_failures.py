"""The trainer under bad input and faults: one-line errors (exit 2), a locked run directory, ranks that die with
their launcher, torn logs, side work that fails, and a skipped step that changes nothing.

Every run is a real subprocess, like a user's (the helpers come from test_train.py).
"""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from helpers import ROOT, TINY, metrics, train


pytestmark = pytest.mark.slow  # every test starts a trainer

CAPTIONS = "configs/digits_mmdit.yaml"


def one_line_error(proc, *words):
    """The run failed with exit code 2 and one error line holding every word, and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("error", "config error"))]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert "Traceback" not in proc.stderr, proc.stderr


def test_unwritable_run_dir_is_a_one_line_error(env, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = train(env, blocker / "run", "train.steps=1", check=False)
    one_line_error(proc, "a-file")


def test_file_size_limit_is_a_one_line_error_and_keeps_the_last_checkpoint(env, tmp_path):
    run = tmp_path / "run"
    train(env, run, "train.steps=2", "checkpoint.every=2")  # also builds the digits cache before the limit

    def limit():  # the checkpoint's files are larger than this; the logs are not
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    cmd = [sys.executable, "-m", "pafm.train", "configs/digits_sit.yaml", f"run.dir={run}", *TINY,
           "train.steps=4", "checkpoint.every=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    one_line_error(proc, "writing checkpoint", "failed", "file-size limit", "intact")
    proc = train(env, run, "train.steps=4", "checkpoint.every=2")  # resumes from the intact step 2
    assert "step_0000002 at step 2" in proc.stdout and metrics(run)[-1]["step"] == 4


def test_resume_with_other_settings_is_refused_and_keeps_the_config(env, tmp_path):
    run = tmp_path / "run"
    train(env, run, "train.steps=2", "checkpoint.every=2")
    saved = (run / "config.yaml").read_text()
    proc = train(env, run, "train.steps=4", "model.kwargs={depth: 2, hidden_size: 64, num_heads: 4}", check=False)
    one_line_error(proc, "model.kwargs.num_heads=2", "this run has 4")
    proc = train(env, run, "train.steps=4", "objective.source=global", check=False)
    one_line_error(proc, "objective.source")
    proc = train(env, run, "train.steps=4", "objective.bank_per_class=32", check=False)
    one_line_error(proc, "objective.bank_per_class=64, this run has 32", "source.entries has shape [10, 64,")
    proc = train(env, run, "train.steps=4", nproc=2, check=False)
    assert proc.returncode != 0 and "written by 1 ranks, this run has 2" in proc.stderr
    first_error = next(line for line in proc.stderr.splitlines() if "rror" in line)
    assert first_error.startswith("error:"), proc.stderr  # the rank's line comes before torchrun's report
    assert (run / "config.yaml").read_text() == saved  # a refused launch does not overwrite the run's config


def test_torn_metrics_line_is_dropped_with_a_warning(env, tmp_path):
    run = tmp_path / "run"
    train(env, run, "train.steps=2", "checkpoint.every=2")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # a write cut short by a kill
    proc = train(env, run, "train.steps=3", "checkpoint.every=2")
    assert "metrics.jsonl:3 is not a complete metrics record" in proc.stderr and "Traceback" not in proc.stderr
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]


def _wait_for_steps(run: Path, steps: int, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= steps:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"{run} did not reach {steps} steps")


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_second_launch_into_a_live_run_is_refused(env, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pafm.train", "configs/digits_sit.yaml", f"run.dir={run}", *TINY,
           "train.steps=100000", "checkpoint.every=100000"]
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(run, 2, first)
        proc = train(env, run, "train.steps=3", check=False)
        one_line_error(proc, "is in use by another launch", f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 0
    stopped = metrics(run)[-1]["step"]
    proc = train(env, run, f"train.steps={stopped + 1}")  # the lock died with its holder
    assert [m["step"] for m in metrics(run)] == list(range(1, stopped + 2))


def test_ranks_die_with_a_killed_launcher(env, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pafm.train",
           "configs/digits_sit.yaml", f"run.dir={run}", *TINY, "train.steps=100000", "checkpoint.every=100000"]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_steps(run, 2, launcher)
    ranks = _children(launcher.pid)
    assert len(ranks) == 2
    launcher.kill()
    launcher.wait()
    deadline = time.time() + 120
    while any(_alive(pid) for pid in ranks) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in ranks), "ranks outlived their launcher"
    stopped = metrics(run)[-1]["step"]
    train(env, run, f"train.steps={stopped + 1}", nproc=2)
    steps = [m["step"] for m in metrics(run)]
    assert steps == sorted(set(steps)) and steps[-1] == stopped + 1  # one run's log, no step twice


def _dataset_with_one_nan_item(folder: Path):
    from pafm.data import ShardWriter

    x = torch.randn(40, 1, 1, 8, 8)
    x[13, 0, 0, 2, 3] = float("nan")
    writer = ShardWriter(folder, shard_size=16)
    writer.add(latent=x, label=torch.arange(40) % 4)
    writer.close({"kind": "class", "split": "train", "latent_shape": [1, 8, 8], "num_classes": 4,
                  "class_names": list("abcd"), "normalization": {"shift": [0.0], "scale": [1.0]},
                  "encoder": {"kind": "identity"}})


def test_a_skipped_step_leaves_the_bank_unpoisoned(env, tmp_path):
    _dataset_with_one_nan_item(tmp_path / "data")
    common = [f"data.spec={tmp_path / 'data'}", "data.validate=false", "data.batch_size=8", "data.flip=false",
              "train.steps=15", "checkpoint.every=100", "log.every=15"]
    skipped = {}
    for name, objective in {"fm": ["objective.kind=fm"], "bank": ["objective.source=bank"]}.items():
        proc = train(env, tmp_path / name, *common, *objective)
        skipped[name] = metrics(tmp_path / name)[-1]["skipped_steps"]
        assert "non-finite" in proc.stdout
    # 5 steps per epoch: the NaN item is drawn once per epoch, so 3 steps are skipped, and the bank is not poisoned.
    assert skipped == {"fm": 3, "bank": 3}


def test_failing_side_work_never_ends_the_run(env, tmp_path):
    run = tmp_path / "run"
    (run / "samples" / "step_0000002.png").mkdir(parents=True)  # the grid cannot be written there
    (run / "ema.safetensors").mkdir()  # nor the export
    proc = train(env, run, "train.steps=4", "checkpoint.every=2", "log.sample_every=2", "log.sample_steps=2")
    assert "preview grid of step 2 failed" in proc.stderr and "writing the EMA export failed" in proc.stderr
    assert (run / "checkpoints" / "step_0000002").is_dir() and (run / "checkpoints" / "step_0000004").is_dir()
    assert (run / "samples" / "step_0000004.png").is_file()
    assert metrics(run)[-1]["side_work_failures"] == 2  # logged at step 4 before its checkpoint: export, grid
    assert "done: step 4 (0 skipped, 3 side-work failures)" in proc.stdout
    assert "warning:" in proc.stdout and "ema.safetensors is missing" in proc.stdout  # "done" says so


def test_a_corrupt_newest_checkpoint_is_set_aside_and_resume_falls_back(env, tmp_path):
    run = tmp_path / "run"
    train(env, run, "train.steps=4", "checkpoint.every=2")
    whole = [m["loss"] for m in metrics(run)]
    shard = run / "checkpoints" / "step_0000004" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    shard.write_bytes(bytes(data))
    proc = train(env, run, "train.steps=4", "checkpoint.every=2")
    assert "checksum mismatch" in proc.stderr and "step_0000002 at step 2" in proc.stdout
    assert (run / "checkpoints" / "step_0000004.corrupt").is_dir()
    assert [m["loss"] for m in metrics(run)] == whole  # steps 3 and 4 again, exactly
    # An explicit resume of a corrupt checkpoint is refused in one line.
    proc = train(env, tmp_path / "other", f"train.resume={run / 'checkpoints' / 'step_0000004.corrupt'}",
                 "train.steps=4", check=False)
    one_line_error(proc, "checksum mismatch")


def test_another_runs_checkpoint_is_named_and_neither_adopted_nor_counted(env, tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    train(env, run, "train.steps=4", "checkpoint.every=2", "checkpoint.keep=2")
    train(env, other, "train.steps=6", "checkpoint.every=6", "optim.lr=0.002")  # the same seed, another lr
    ckpts = run / "checkpoints"
    foreign = ckpts / "step_0000006"
    shutil.copytree(other / "checkpoints" / "step_0000006", foreign)
    proc = train(env, run, "train.steps=5", "checkpoint.every=2", "checkpoint.keep=2")
    assert f"warning: {foreign} belongs to another run" in proc.stderr
    assert "step_0000004 at step 4" in proc.stdout and "stale" not in proc.stdout
    assert (ckpts / "step_0000004").is_dir() and (ckpts / "step_0000005").is_dir() and foreign.is_dir()
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5]
    proc = train(env, run, "train.steps=6", "checkpoint.every=2", "checkpoint.keep=2")  # reaches the same step
    assert f"{foreign} was another run's checkpoint: moved to step_0000006.foreign" in proc.stderr
    mine = json.loads((run / "run.json").read_text())["run_id"]
    assert json.loads((ckpts / "step_0000006" / "run.json").read_text())["run_id"] == mine
    assert json.loads((ckpts / "step_0000006.foreign" / "run.json").read_text())["run_id"] != mine
    export = subprocess.run([sys.executable, "-m", "pafm.export", str(run), "--checkpoint",
                             str(ckpts / "step_0000006.foreign")], cwd=ROOT, env=env, capture_output=True, text=True)
    one_line_error(export, "belongs to another run", "would not be this run's")
    lone = tmp_path / "lone"  # another run's checkpoint as the only candidate: refused, named
    shutil.copytree(foreign.with_name("step_0000006.foreign"), lone / "checkpoints" / "step_0000006")
    proc = train(env, lone, "train.steps=8", check=False)
    one_line_error(proc, f"{lone / 'checkpoints' / 'step_0000006'} belongs to another run", "move it out")


def test_a_stale_export_is_refreshed_by_the_export_command_and_by_a_relaunch(env, tmp_path):
    run = tmp_path / "run"
    train(env, run, "train.steps=4", "checkpoint.every=2", "checkpoint.keep=2")
    export = run / "ema.safetensors"
    fresh = export.read_bytes()
    export.unlink()  # as a kill between a checkpoint's publish and its export leaves it
    proc = train(env, run, "train.steps=4", "checkpoint.every=2")  # a finished run: the loop does not run
    assert "resumed from" in proc.stdout and export.read_bytes() == fresh and "warning" not in proc.stdout
    cmd = [sys.executable, "-m", "pafm.export", str(run), "--checkpoint", str(run / "checkpoints" / "step_0000002")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "(step 2)" in proc.stdout, proc.stderr
    from pafm.export import export_staleness, read_export_meta

    warning = export_staleness(run)
    assert read_export_meta(export)["step"] == 2 and f"python -m pafm.export {run}" in warning
    proc = subprocess.run(cmd[:4], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "step_0000004 (step 4)" in proc.stdout, proc.stderr
    assert export.read_bytes() == fresh and export_staleness(run) is None
    proc = subprocess.run([*cmd[:4], "--checkpoint", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    one_line_error(proc, "is not a complete checkpoint")


# The trainer with one rank held back before it checks the settings against the data, so that the ranks reach the
# same setup error at different times: `python delayed_rank.py SLOW_RANK CONFIG [overrides]` under torchrun.
DELAYED_RANK = """
import os, sys, time
import pafm.train as trainer
from pafm.distributed import exit_process

slow_rank, check = int(sys.argv.pop(1)), trainer.check_settings


def check_settings(*args, **kwargs):  # where the error below is found, one rank late
    if int(os.environ["RANK"]) == slow_rank:
        time.sleep(1.5)
    return check(*args, **kwargs)


trainer.check_settings = check_settings
exit_process(trainer._main(sys.argv[1:], trainer.StopSignal()))  # as `python -m pafm.train` runs it
"""


LAUNCHES = 6  # the late rank's delay fixes which rank fails first; repeats catch what the delay leaves to chance


def test_under_torchrun_the_first_error_line_is_the_ranks_own(env, tmp_path):
    """One rank fails first and exits, and torchrun then stops the other, which may never reach its own error line:
    the line printed is still the first rank's.  Each rank is the late one in turn, and launches run two at a time
    (which also varies how far apart the ranks reach the error)."""
    script = tmp_path / "delayed_rank.py"
    script.write_text(DELAYED_RANK)

    def launch(attempt):
        slow_rank = str(attempt % 2)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               slow_rank, CAPTIONS, f"run.dir={tmp_path / f'run{attempt}'}", *TINY, "objective.source=bank",
               "train.steps=2"]
        proc = subprocess.run(cmd, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                              timeout=180)
        lines = proc.stderr.splitlines()
        errors = [line for line in lines if "rror" in line]
        refusal = "error: objective.source=bank needs class labels"
        ok = (proc.returncode != 0 and errors and errors[0].startswith(refusal)
              and sum(line.startswith("error") for line in lines) == 1)
        return None if ok else f"launch {attempt}: exit {proc.returncode}\n{proc.stderr}"

    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [f for f in pool.map(launch, range(LAUNCHES)) if f]
    assert not failures, f"{len(failures)} of {LAUNCHES} launches:\n" + "\n".join(failures)


def _rank_of(pid: int) -> int:
    environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK="))[len(b"RANK="):])


def test_a_peers_death_is_one_line_on_the_survivor(env, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pafm.train",
           "configs/digits_sit.yaml", f"run.dir={run}", *TINY, "train.steps=100000", "checkpoint.every=100000"]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(run, 2, launcher)
    rank1 = next(pid for pid in _children(launcher.pid) if _rank_of(pid) == 1)
    os.kill(rank1, signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=120)
    lines = stderr.splitlines()
    survivor = [line for line in lines if line.startswith("error (rank 0)")]
    assert len(survivor) == 1 and "another rank stopped" in survivor[0], stderr
    assert not any(line.lstrip().startswith("File") and "/pafm/" in line for line in lines), stderr
