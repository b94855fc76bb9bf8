"""The trainer end to end on the digits, on the CPU: one process, two FSDP2 ranks over gloo, resume, failures.

Every run is a real subprocess (`python -m pafm.train` or torchrun), like a user's.  The model is a 2-block SiT so
that each run costs a few seconds.
"""
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from pafm.train import main

from helpers import ROOT, TINY, assert_same_weights, losses, metrics, train


def test_config_typo_is_a_clear_error(capsys):
    assert main(["configs/digits_sit.yaml", "train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key train.stepz; did you mean train.steps?" in err and "Traceback" not in err
    assert main(["configs/digits_sit.yaml", "objective.kind=flow"]) == 2
    assert "objective.kind: 'flow' is not one of ['fm', 'pafm']" in capsys.readouterr().err


@pytest.mark.parametrize("config,overrides,words", [
    ("configs/digits_mmdit.yaml", ["objective.source=batch", "objective.text_prior=self"], ["text_prior=self", "FM's"]),
    ("configs/digits_mmdit.yaml", ["objective.source=global", "objective.text_prior=self"], ["source=global"]),
    ("configs/digits_mmdit.yaml", ["objective.source=bank"], ["source=bank needs class labels", "resample"]),
    ("configs/digits_mmdit.yaml", ["objective.source=exact"], ["source=exact needs class labels"]),
    ("configs/digits_sit.yaml", ["objective.source=neighbors", "objective.candidates=300"], ["300 neighbours"]),
])
def test_what_a_source_refuses_is_a_one_line_error(in_process, tmp_path, capsys, config, overrides, words):
    """The trainer asks the configured source what it refuses with the data and what it needs from the loader."""
    assert in_process([config, f"run.dir={tmp_path / 'run'}", "train.steps=1", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and all(word in err for word in words), err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_missing_data_says_how_to_prepare_it(env, tmp_path):
    proc = train(env, tmp_path / "run", f"data.spec={tmp_path / 'nowhere'}", "train.steps=1", check=False)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "pafm.prep" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_nan_in_the_data_is_found_before_training(env, tmp_path):
    from pafm.data import ShardWriter

    x = torch.randn(40, 2, 1, 8, 8)  # (N, views: image and flipped copy, C, H, W)
    x[13, 0, 0, 2, 3] = float("nan")
    writer = ShardWriter(tmp_path / "bad", shard_size=16)
    writer.add(latent=x, label=torch.arange(40) % 4)
    writer.close({"kind": "class", "split": "train", "latent_shape": [1, 8, 8], "num_classes": 4,
                  "class_names": list("abcd"), "normalization": {"shift": [0.0], "scale": [1.0]},
                  "encoder": {"kind": "identity"}})
    proc = train(env, tmp_path / "run", f"data.spec={tmp_path / 'bad'}", "train.steps=1", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "item 13" in proc.stderr and "NaN" in proc.stderr and "Traceback" not in proc.stderr
    # The shards that passed are remembered for the next start; the bad one is not, so it is checked again.
    assert sorted(p.name for p in (tmp_path / "bad" / ".validated").iterdir()) == [
        "shard-00001.safetensors.json", "shard-00002.safetensors.json"]
    proc = train(env, tmp_path / "run", f"data.spec={tmp_path / 'bad'}", "train.steps=1", check=False)
    assert proc.returncode == 2 and "item 13" in proc.stderr


@pytest.mark.slow
def test_two_fsdp_ranks_match_one_process(env, tmp_path):
    args = ["objective.source=global", "train.steps=5", "checkpoint.every=100"]
    train(env, tmp_path / "one", *args)
    train(env, tmp_path / "two", *args, nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 5
    assert one[0] != one[-1]  # it trains
    assert one == pytest.approx(two, rel=1e-5, abs=1e-7)
    # bf16 (FSDP2 mixed precision + autocast) with activation checkpointing follows the fp32 trajectory closely.
    train(env, tmp_path / "bf16", *args, "train.precision=bf16", "train.activation_checkpointing=true", nproc=2)
    assert losses(tmp_path / "bf16") == pytest.approx(one, rel=3e-2)


@pytest.mark.slow
@pytest.mark.parametrize("nproc,background", [(1, False), (1, True), (2, True)])
def test_resume_equals_never_stopping(env, tmp_path, nproc, background):
    # The bank source carries state across steps; batch 256 on 1437 items crosses an epoch boundary at step 5.
    # With background saves, the step-4 checkpoint is written while steps 5 and 6 run.
    args = ["objective.source=bank", "objective.bank_per_class=8", "data.batch_size=256", "checkpoint.every=4",
            f"checkpoint.async_save={str(background).lower()}"]
    train(env, tmp_path / "whole", *args, "train.steps=8", nproc=nproc)
    train(env, tmp_path / "parts", *args, "train.steps=6", nproc=nproc)
    # What a run killed while publishing its step-6 checkpoint leaves behind (its files, not yet renamed), and a
    # partial write: resume=auto must take step 4 and ignore both.
    checkpoints = tmp_path / "parts" / "checkpoints"
    os.replace(checkpoints / "step_0000006", checkpoints / "step_0000006.tmp")
    partial = checkpoints / "step_0000007.tmp"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"truncated")
    proc = train(env, tmp_path / "parts", *args, "train.steps=8", nproc=nproc)
    assert "resumed from" in proc.stdout and "step_0000004 at step 4" in proc.stdout
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")
    assert [m["step"] for m in metrics(tmp_path / "parts")] == list(range(1, 9))
    assert_same_weights(tmp_path / "parts" / "ema.safetensors", tmp_path / "whole" / "ema.safetensors")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000004", "step_0000008"]  # keep=2; no partials


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(env, tmp_path):
    run = tmp_path / "run"
    # Background saves every 2 steps: the signal finds one in flight or just collected, and the stop save waits.
    cmd = [sys.executable, "-m", "pafm.train", "configs/digits_sit.yaml", f"run.dir={run}", *TINY,
           "train.steps=100000", "checkpoint.every=2", "checkpoint.async_save=true"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stopped_at = int(out.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert stopped_at >= 3
    assert (run / "checkpoints" / f"step_{stopped_at:07d}" / ".metadata").is_file()
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert load_file(str(run / "ema.safetensors")).keys() and "warning" not in err
    proc = train(env, run, f"train.steps={stopped_at + 2}", "checkpoint.every=100000")
    assert f"at step {stopped_at}" in proc.stdout and metrics(run)[-1]["step"] == stopped_at + 2
    # Starting afresh in a folder that holds checkpoints would interleave two runs: refused.
    proc = train(env, run, "train.resume=none", "train.steps=1", check=False)
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_failed_background_save_is_a_warning_and_a_failed_final_save_an_error(env, tmp_path):
    run = tmp_path / "run"
    args = ["checkpoint.every=2", "checkpoint.async_save=true"]
    train(env, run, "train.steps=2", *args)  # also builds the digits cache before the limit

    def limit():  # the checkpoint's files are larger than this; the logs are not
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    cmd = [sys.executable, "-m", "pafm.train", "configs/digits_sit.yaml", f"run.dir={run}", *TINY, "train.steps=6",
           *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith(("warning", "error"))]
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("warning: writing checkpoint") and "step_0000004.tmp failed" in lines[0]
    assert lines[0].endswith("the newest complete checkpoint is intact; training goes on")
    assert lines[1].startswith("error: writing checkpoint") and "step_0000006.tmp failed" in lines[1]
    assert metrics(run)[-1]["step"] == 6  # the run went on past the failed background save
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002"]


@pytest.mark.slow
def test_every_candidate_source_reports_ess(env, tmp_path):
    for source in ["batch", "global", "bank", "neighbors", "resample"]:
        run = tmp_path / source
        train(env, run, f"objective.source={source}", "objective.candidates=4", "train.steps=2",
              "checkpoint.every=100", "objective.temperature=20.0")
        last = metrics(run)[-1]
        assert len(last["ess_by_t"]) == 5 and len(last["own_weight_by_t"]) == 5
        for ess, rows, own in zip(last["ess_by_t"], last["rows_by_t"], last["own_weight_by_t"]):
            if rows:
                assert 1.0 <= ess <= 10 * 64 + 32 and 0.0 < own <= 1.0 + 1e-4
        assert max(last["ess_by_t"]) > 1.01, source  # tau = 20 spreads the weight over several candidates


@pytest.mark.slow
@pytest.mark.parametrize("prior,source", [("self", "resample"), ("similarity", "batch")])
def test_text_path_with_mmdit(env, tmp_path, prior, source):
    run = tmp_path / prior
    train(env, run, f"objective.text_prior={prior}", f"objective.source={source}", "objective.candidates=4",
          "train.steps=2", "checkpoint.every=100", "model.kwargs={depth: 2, hidden_size: 64, num_heads: 2}",
          config="configs/digits_mmdit.yaml")
    last = metrics(run)[-1]
    assert len(last["ess_by_t"]) == 5 and all(e >= 1.0 for e, n in zip(last["ess_by_t"], last["rows_by_t"]) if n)


@pytest.mark.slow
def test_own_endpoint_pool_reproduces_fm_exactly(env, tmp_path):
    train(env, tmp_path / "fm", "objective.kind=fm", "train.steps=4", "checkpoint.every=100")
    train(env, tmp_path / "own", "objective.kind=pafm", "objective.source=neighbors", "objective.candidates=0",
          "train.steps=4", "checkpoint.every=100")
    assert losses(tmp_path / "fm") == losses(tmp_path / "own")
    assert [m["fm_loss"] for m in metrics(tmp_path / "own")] == losses(tmp_path / "own")


@pytest.mark.slow
def test_non_finite_steps_are_skipped_then_the_run_stops(env, tmp_path):
    from pafm.data import ShardWriter

    writer = ShardWriter(tmp_path / "nan", shard_size=16)  # every item NaN, unvalidated: every step is non-finite
    writer.add(latent=torch.full((40, 1, 1, 8, 8), float("nan")), label=torch.arange(40) % 4)
    writer.close({"kind": "class", "split": "train", "latent_shape": [1, 8, 8], "num_classes": 4,
                  "class_names": list("abcd"), "normalization": {"shift": [0.0], "scale": [1.0]},
                  "encoder": {"kind": "identity"}})
    run = tmp_path / "run"
    proc = train(env, run, f"data.spec={tmp_path / 'nan'}", "data.validate=false", "data.batch_size=8",
                 "data.flip=false", "train.max_bad_steps=2", "train.steps=50", "checkpoint.every=1",
                 "checkpoint.async_save=true", check=False)
    assert proc.returncode == 3, proc.stderr
    assert "non-finite losses or gradients in a row" in proc.stderr and "Traceback" not in proc.stderr
    stopped = int(proc.stderr.split("stopped at step ")[1].split(":")[0])
    assert (run / "checkpoints" / f"step_{stopped:07d}" / "manifest.json").is_file()
    assert not list((run / "checkpoints").glob("*.tmp"))  # the background save in flight was finished first
    assert metrics(run)[-1]["skipped_steps"] >= 2


def test_preview_grids_reuse_one_model_and_decoder(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    import pafm.generate as generate
    from pafm.data import open_dataset
    from pafm.models import build_model

    monkeypatch.setenv("PAFM_CACHE", str(tmp_path / "cache"))
    built = {"model": 0, "decoder": 0}
    model_from_meta, decoder = generate.model_from_meta, generate.Decoder

    def counted_model(*args):
        built["model"] += 1
        return model_from_meta(*args)

    class CountedDecoder(decoder):
        def __init__(self, *args, **kwargs):
            built["decoder"] += 1
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(generate, "model_from_meta", counted_model)
    monkeypatch.setattr(generate, "Decoder", CountedDecoder)
    torch.manual_seed(0)
    model = build_model("SiT-T/2", input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=64, num_heads=2)
    meta = {"model": model.config, "data": {"spec": "builtin:digits", "info": open_dataset("builtin:digits").info},
            "path": "linear"}
    first = {k: v.clone() for k, v in model.state_dict().items()}
    other = {k: v + 0.05 * torch.randn_like(v) for k, v in first.items()}
    grid = generate.PreviewGrid(meta, steps=2, device="cpu")
    images = [np.asarray(Image.open(grid.save(state, tmp_path / f"{i}.png")))
              for i, state in enumerate([first, other, first])]
    assert built == {"model": 1, "decoder": 1}
    assert not np.array_equal(images[0], images[1]) and np.array_equal(images[0], images[2])
    one_off = generate.PreviewGrid(meta, steps=2, device="cpu").save(first, tmp_path / "one_off.png")
    assert np.array_equal(np.asarray(Image.open(one_off)), images[0])
