"""Export round trip, the evaluation pipeline (digits metrics, resume, two ranks, Inception metrics with a
random-weight Inception file written here) and the sample CLI, on tiny random models."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pafm.evaluation as pafm_evaluation
from pafm.config import ConfigError
from pafm.data.digits import load_digits_split
from pafm.evaluation import evaluate
from pafm.export import ExportError, load_export, read_export_meta, save_export
from pafm.metrics import inception_metrics, write_random_inception
from pafm.models import build_model
from pafm.sample import main as sample_main


DIGITS_INFO = {"kind": "class", "latent_shape": [1, 8, 8], "num_classes": 10,
               "class_names": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
               "normalization": {"shift": [0.0], "scale": [1.0]}, "encoder": {"kind": "identity"}}
TINY = dict(input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=64, num_heads=2)


def write_run(folder: Path, step=7) -> Path:
    """A run folder with the EMA export of a tiny random SiT (random final layer: adaLN-Zero starts at zero)."""
    torch.manual_seed(0)
    model = build_model("SiT-T/2", **TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    meta = {"model": model.config, "data": {"spec": "builtin:digits", "info": DIGITS_INFO}, "path": "linear",
            "step": step}
    save_export(folder / "ema.safetensors", model.state_dict(), meta)
    return folder


def test_export_round_trip_and_errors(tmp_path):
    run = write_run(tmp_path / "run")
    model, meta = load_export(run)
    assert meta["step"] == 7 and meta["data"]["info"] == DIGITS_INFO and not model.training
    reference = build_model("SiT-T/2", **TINY)
    reference.load_state_dict(model.state_dict())
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([1, 2, 10])
    assert torch.equal(model(x, t, y), reference.eval()(x, t, y))
    assert read_export_meta(run / "ema.safetensors") == meta
    assert not list(run.glob(".*tmp"))  # the atomic write left no temporary file
    with pytest.raises(ExportError, match="no EMA export"):
        load_export(tmp_path)
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(b"")
    with pytest.raises(ExportError, match="distributed.checkpoint"):
        load_export(tmp_path / "dcp")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(ExportError, match="no 'pafm' metadata"):
        load_export(tmp_path / "foreign.safetensors")
    bad = dict(model.state_dict())
    bad.pop(next(iter(bad)))
    save_export(tmp_path / "bad.safetensors", bad, meta)
    with pytest.raises(ExportError, match="do not match"):
        load_export(tmp_path / "bad.safetensors")
    with pytest.raises(ExportError, match="model.config"):
        save_export(tmp_path / "x.safetensors", bad, {"step": 1})


SAMPLER = ["sampler.method=euler", "sampler.steps=3", "sampler.cfg_scale=2.0", "sampler.cfg_interval=[0.2,1.0]"]


def without_run_specific(report):
    report = dict(report)
    for key in ("timings", "out_dir", "samples_npz"):
        report.pop(key)
    return report


@pytest.mark.slow
def test_digits_eval_resumes_after_a_stop_and_matches_two_ranks(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run")
    args = ["eval.num_samples=30", "eval.batch_size=10"] + SAMPLER
    full = evaluate(run, args + [f"eval.out_dir={tmp_path / 'full'}"])
    m = full["metrics"]
    assert set(m) == {"accuracy", "frechet_pixels", "memorization"} and 0 <= m["accuracy"] <= 1
    assert full["reference_metrics"]["accuracy"] > 0.95  # held-out real digits: the reference row
    assert m["frechet_pixels"] > full["reference_metrics"]["frechet_pixels"]  # a random model is far from digits
    assert full["labels"] == "random" and not full["classes_balanced"] and full["model_evaluations_per_sample"] == 3
    assert full["export_step"] == 7 and full["export_warning"] is None and "sha256" in full["seed_rule"]
    assert "acc" in full["readme_row"] and "euler-3" in full["readme_row"] and "2 [0.2, 1]" in full["readme_row"]
    assert "balanced" not in full["readme_row"]
    with np.load(tmp_path / "full" / "samples.npz") as data:
        assert data["arr_0"].shape == (30, 8, 8, 1) and data["arr_0"].dtype == np.uint8
        full_labels = data["arr_1"]
    # Random labels (SiT's protocol): drawn per chunk, not the balanced i % 10.
    assert full_labels.tolist() != [i % 10 for i in range(30)] and len(set(full_labels.tolist())) >= 5
    assert json.loads((tmp_path / "full" / "eval.json").read_text()) == full

    # Stop during the second chunk, then resume: the first chunk is kept, the report is the uninterrupted one.
    real_generate, calls = pafm_evaluation.generate, []

    def stopping_generate(*a, **k):
        calls.append(a[3][0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_generate(*a, **k)

    monkeypatch.setattr(pafm_evaluation, "generate", stopping_generate)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        evaluate(run, args + [f"eval.out_dir={out}"])
    assert sorted(p.name for p in (out / "chunks").glob("chunk_*.npz")) == ["chunk_000000.npz"]
    first_chunk_mtime = (out / "chunks" / "chunk_000000.npz").stat().st_mtime_ns
    monkeypatch.setattr(pafm_evaluation, "generate", real_generate)
    resumed = evaluate(run, args + [f"eval.out_dir={out}"])
    assert (out / "chunks" / "chunk_000000.npz").stat().st_mtime_ns == first_chunk_mtime  # skipped, not redrawn
    assert without_run_specific(resumed) == without_run_specific(full)
    with np.load(out / "samples.npz") as a, np.load(tmp_path / "full" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
    # Changing a sampling setting while reusing the folder is refused.
    with pytest.raises(ConfigError, match="different evaluation"):
        evaluate(run, args[:-1] + [f"eval.out_dir={out}"])

    # Two ranks under torchrun (gloo): chunks 0 and 2 on rank 0, chunk 1 on rank 1; the same samples and report.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    two = tmp_path / "two_ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pafm.eval",
           str(run), *args, f"eval.out_dir={two}", "eval.device=cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((two / "eval.json").read_text())
    assert without_run_specific(report) == without_run_specific(full)
    with np.load(two / "samples.npz") as data:
        assert np.array_equal(data["arr_1"], full_labels)  # the random labels do not depend on the world size


@pytest.mark.slow
def test_inception_eval_path_with_a_local_random_weight_file(tmp_path):
    run = write_run(tmp_path / "run")
    weights = write_random_inception(tmp_path / "inception.pth")
    held, _ = load_digits_split("heldout")
    reference = tmp_path / "reference.npz"
    np.savez(reference, arr_0=((held[:8] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    out = tmp_path / "out"
    args = ["eval.num_samples=8", "eval.batch_size=8", "eval.metrics=[fid,isc,prc,kid]", f"eval.reference={reference}",
            f"eval.inception_weights={weights}", "eval.isc_splits=2", "eval.kid_subset_size=4",
            f"eval.out_dir={out}"] + SAMPLER
    report = evaluate(run, args)
    m = report["metrics"]
    assert {"fid", "isc", "isc_std", "precision", "recall", "kid", "kid_std"} <= set(m)
    assert all(np.isfinite(v) for v in m.values()) and m["fid"] > 0 and m["isc"] >= 1.0
    assert "FID" in report["readme_row"] and report["inception_weights"] == str(weights)
    # The samples' features were cached beside the chunks: scored against themselves, FID is 0 to rounding, and
    # they are the features of the ADM-format samples.npz (one image per sample, uint8 NHWC).
    (cache,) = out.glob("sample_features_*.npz")
    with np.load(cache) as data, np.load(out / "samples.npz") as samples:
        feats = {k: torch.from_numpy(data[k]) for k in data.files}
        assert samples["arr_0"].shape == (8, 8, 8, 1) and len(feats["2048"]) == 8
    trace = np.trace(np.cov(feats["2048"].double().numpy(), rowvar=False))
    # 8 samples in 2048 dimensions: the covariance has rank 7, and the square roots of the ~2040 zero eigenvalues'
    # float64 round-off (each ~ sqrt(1e-16 * lambda_max)) add up to about 1e-6 of the trace: that is "zero" here.
    assert abs(inception_metrics(feats, ["fid"], reference_features=feats)["fid"]) < 1e-5 * trace
    with pytest.raises(ConfigError, match="eval.reference is required"):
        evaluate(run, ["eval.num_samples=8", "eval.metrics=[fid]", f"eval.out_dir={out}"])


def test_sample_cli_writes_a_labelled_grid(tmp_path):
    from PIL import Image

    run = write_run(tmp_path / "run")
    assert sample_main([str(run), "--num", "12", "--cfg", "3.0", "--steps", "2", "--labels", "3,seven",
                        "--out", str(tmp_path / "grid.png"), "--cols", "4"]) == 0
    img = np.asarray(Image.open(tmp_path / "grid.png"))
    assert img.shape[0] > 3 * 96 and img.shape[1] == 4 * (96 + 4)  # 3 rows of 96 px tiles with labels, 4 columns
    assert (img < 50).any() and (img > 200).any()  # dark label text and light background


def test_training_grid_from_a_state_dict(tmp_path):
    from PIL import Image

    from pafm.export import load_export
    from pafm.generate import PreviewGrid

    model, meta = load_export(write_run(tmp_path / "run"))
    grid = PreviewGrid(meta, steps=2, cfg_scale=1.5, seed=0)
    out = grid.save(model.state_dict(), tmp_path / "samples" / "step_0000007.png")
    img = np.asarray(Image.open(out))
    assert img.shape[1] == 10 * (96 + 4) and img.shape[0] > 96  # one row: one sample per digit class


def test_random_labels_per_chunk_and_the_balanced_option(tmp_path):
    from pafm.export import model_skeleton
    from pafm.generate import Conditions

    meta = read_export_meta(write_run(tmp_path / "run"))
    skeleton = model_skeleton(meta, "test")
    random = Conditions(skeleton, meta, order="random", seed=3)
    chunks = [random.class_ids(range(c * 125, (c + 1) * 125), key=c) for c in range(200)]
    # A chunk's labels depend only on (seed, chunk): drawn again, alone and in another order, they are the same.
    again = Conditions(skeleton, meta, order="random", seed=3)
    assert all(np.array_equal(again.class_ids(range(c * 125, (c + 1) * 125), key=c), chunks[c]) for c in (199, 0, 57))
    assert not np.array_equal(chunks[0], chunks[1])
    other_seed = Conditions(skeleton, meta, order="random", seed=4).class_ids(range(125), key=0)
    assert not np.array_equal(other_seed, chunks[0])
    # i.i.d. uniform over the 10 classes: 25,000 labels pass a chi-square test (9 dof; 1e-6 tail: 42.3) and are not
    # balanced within a chunk.
    counts = np.bincount(np.concatenate(chunks), minlength=10)
    expected = 25000 / 10
    assert ((counts - expected) ** 2 / expected).sum() < 42.3 and len(counts) == 10
    assert any(len(set(np.bincount(c, minlength=10))) > 1 for c in chunks)
    balanced = Conditions(skeleton, meta, order="balanced")
    assert balanced.class_ids(range(250, 275), key=2).tolist() == [i % 10 for i in range(250, 275)]


def test_eval_json_records_balanced_labels_and_a_stale_export(tmp_path, capsys):
    run = write_run(tmp_path / "run", step=5)
    (run / "checkpoints" / "step_0000010").mkdir(parents=True)
    (run / "checkpoints" / "step_0000010" / "manifest.json").write_text("{}")
    report = evaluate(run, ["eval.num_samples=20", "eval.batch_size=10", "eval.labels=balanced",
                            "sampler.method=euler", "sampler.steps=1", f"eval.out_dir={tmp_path / 'out'}"])
    assert report["labels"] == "balanced" and report["classes_balanced"] and "balanced" in report["readme_row"]
    with np.load(tmp_path / "out" / "samples.npz") as data:
        assert data["arr_1"].tolist() == [i % 10 for i in range(20)]
    assert report["export_step"] == 5 and "stale" in report["export_warning"] and "step 10" in report["export_warning"]
    assert report["export_warning"] in capsys.readouterr().err


def test_export_staleness(tmp_path):
    from pafm.export import export_staleness

    run = write_run(tmp_path / "run", step=5)
    assert export_staleness(run) is None  # no checkpoints
    ckpts = run / "checkpoints"
    (ckpts / "step_0000005").mkdir(parents=True)
    (ckpts / "step_0000005" / "manifest.json").write_text("{}")
    (ckpts / "step_0000010.tmp").mkdir()  # incomplete writes never count
    (ckpts / "step_0000020").mkdir()  # no manifest.json: incomplete
    assert export_staleness(run) is None and export_staleness(run / "ema.safetensors") is None
    (ckpts / "step_0000010").mkdir()
    (ckpts / "step_0000010" / "manifest.json").write_text("{}")
    warning = export_staleness(run)
    assert warning == (f"warning: {run / 'ema.safetensors'} is from step 5 but {ckpts} holds step 10: the export is "
                       f"stale (a failed export write?); `python -m pafm.export {run}` (or a relaunch of the "
                       "trainer) refreshes it")
    assert export_staleness(run / "ema.safetensors") == warning
    (run / "run.json").write_text('{"run_id": "mine"}')
    (ckpts / "step_0000010" / "run.json").write_text('{"run_id": "theirs"}')
    assert export_staleness(run) is None  # another run's checkpoint does not make the export stale
    (run / "ema.safetensors").unlink()
    assert "missing" in export_staleness(run)


def test_an_export_whose_meta_claims_another_model_is_refused_before_allocating_it(tmp_path):
    from safetensors.torch import load_file, save_file

    path = write_run(tmp_path / "run") / "ema.safetensors"
    meta = read_export_meta(path)
    meta["model"]["kwargs"].update(depth=12, hidden_size=1024, num_heads=16)  # 150 M parameters: 600 MB
    save_file(load_file(path), str(path), metadata={"pafm": json.dumps(meta)})
    probe = ("import resource, sys\n"
             "from pafm.export import ExportError, load_export\n"
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             "try:\n    load_export(sys.argv[1])\n"
             "except ExportError as err:\n    print(err)\n"
             "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)")
    proc = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    message, grown_mb = proc.stdout.splitlines()
    assert message.startswith(f"{path}: weights do not match SiT-T/2: ") and "with another shape" in message
    assert int(grown_mb) < 100, proc.stdout  # the claimed model was never allocated


def write_train_only_captions(folder: Path) -> list[str]:
    """A text dataset laid out as `pafm.prep captions` writes it: one index.json, split 'train', no held-out split."""
    from pafm.data import BuiltinTextEmbedder, ShardWriter

    captions = [f"caption number {i}" for i in range(24)]
    embedder = BuiltinTextEmbedder(dim=32, max_len=8)
    tokens, mask, pooled = embedder.embed(captions)
    x = torch.randn(24, 1, 1, 8, 8)
    writer = ShardWriter(folder, shard_size=10)
    writer.add(captions=captions, latent=x, tokens=tokens.half(), mask=mask, pooled=pooled.half())
    writer.close({"kind": "text", "split": "train", "latent_shape": [1, 8, 8], "captions": True,
                  "normalization": {"shift": [0.0], "scale": [1.0]}, "encoder": {"kind": "identity"},
                  "text_encoder": embedder.config})
    return captions


def test_text_grid_and_sampling_without_a_heldout_split(tmp_path):
    from PIL import Image

    from pafm.data import open_dataset
    from pafm.generate import Conditions, PreviewGrid

    data = tmp_path / "captions"
    captions = write_train_only_captions(data)
    torch.manual_seed(0)
    model = build_model("MMDiT-T/2", input_size=8, in_channels=1, text_dim=32, pooled_dim=32, max_text_len=8, depth=1,
                        hidden_size=32, num_heads=2)
    meta = {"model": model.config, "data": {"spec": str(data), "info": open_dataset(str(data)).info},
            "path": "linear", "step": 3}
    state = model.state_dict()
    out = PreviewGrid(meta, steps=1).save(state, tmp_path / "grid.png")  # the trainer's call: no prompts
    assert np.asarray(Image.open(out)).shape[1] == 10 * (96 + 4)  # 16 train captions, 10 columns
    out = PreviewGrid(meta, 1, 1.0, 0, prompts=["a", "b", "c"]).save(state, tmp_path / "prompts.png")
    assert np.asarray(Image.open(out)).shape[1] == 3 * (96 + 4)  # the caller's prompts win: one tile each
    conditions = Conditions(model, meta)
    assert conditions.caption_split == "train" and conditions(range(3), "cpu")[1] == captions[:3]
    random = Conditions(model, meta, order="random", seed=0)
    drawn = random(range(40), "cpu", key=0)[1]
    assert set(drawn) <= set(captions) and len(set(drawn)) > 10 and "no heldout split" in random.describe()["items"]
    save_export(tmp_path / "run" / "ema.safetensors", state, meta)
    assert sample_main([str(tmp_path / "run"), "--num", "2", "--steps", "1", "--out", str(tmp_path / "s.png")]) == 0


class EmpiricalOracle(torch.nn.Module):
    """The exact marginal velocity of the linear path for the empirical distribution of the digits training split
    (class-conditional: only same-class images): sampling it reproduces training digits of the asked class."""

    cond_kind = "class"
    num_classes = 10

    def __init__(self):
        super().__init__()
        x, y = load_digits_split("train")
        self.register_buffer("data", x.reshape(len(x), -1).double())
        self.register_buffer("labels", y)
        self.config = {"name": "oracle", "kwargs": {"num_classes": 10}}

    def forward(self, z, t, cond, drop=None):
        flat, t64 = z.reshape(len(z), -1).double(), t.double()[:, None]
        d2 = ((flat[:, None, :] - t64[:, :, None] * self.data[None]) ** 2).sum(-1)
        logits = -d2 / (2 * (1 - t64) ** 2)
        same = (cond[:, None] == self.labels[None]) | (cond[:, None] == self.num_classes)
        mu = torch.softmax(logits.masked_fill(~same, -torch.inf), dim=1) @ self.data
        return ((mu - flat) / (1 - t64)).reshape(z.shape).to(z.dtype)  # linear path: v = (E[x|z] - z) / (1 - t)

    def forward_with_cfg(self, z, t, cond, scale, drop=None):
        c, u = self(z, t, cond), self(z, t, torch.full_like(cond, self.num_classes))
        return u + torch.as_tensor(scale, dtype=z.dtype).reshape(-1, 1, 1, 1) * (c - u)


def test_eval_of_an_exact_model_finds_memorised_correct_digits(tmp_path, monkeypatch):
    # End to end with a perfect velocity field for the training set: the samples are training digits of the intended
    # class, so the judge must report high accuracy, memorisation near 1 and a Frechet distance near the real floor.
    run = write_run(tmp_path / "run")
    meta = read_export_meta(run)
    monkeypatch.setattr(pafm_evaluation, "load_export", lambda path, device="cpu": (EmpiricalOracle(), meta))
    report = evaluate(run, ["eval.num_samples=100", "eval.batch_size=50", "sampler.method=euler", "sampler.steps=30",
                            f"eval.out_dir={tmp_path / 'oracle'}"])
    m, ref = report["metrics"], report["reference_metrics"]
    assert m["accuracy"] > 0.95 and m["memorization"] > 0.9
    assert m["frechet_pixels"] < 3 * ref["frechet_pixels"] + 5
