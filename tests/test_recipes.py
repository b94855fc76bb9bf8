"""Every recipe in configs/ runs the way a user runs it, shrunk: on data made by `pafm.prep` from a tiny fixture
(random-weight VAE and text encoder), with the recipe's own settings (precision, workers, source, prior) and its
preview grids, checkpoints and exports switched on every two steps.  Only the model's size, the batch and the
number of steps are made small.
"""

import numpy as np
import pytest
from safetensors import safe_open

from pafm.prep import main as prep

from helpers import ROOT, caption_source, metrics, train

RECIPES = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
SHRINK = ["model.kwargs={depth: 1, hidden_size: 32, num_heads: 2}", "data.batch_size=4", "train.steps=4",
          "checkpoint.every=2", "log.sample_every=2", "log.sample_steps=2", "log.every=1", "log.progress=false",
          "optim.warmup_steps=0", "train.compile=false", "checkpoint.keep=3"]  # compile: minutes of CPU codegen, tested elsewhere


def test_every_recipe_is_covered():
    assert RECIPES == ["cc12m_mmdit.yaml", "digits_mmdit.yaml", "digits_sit.yaml", "imagenet_sit_b2.yaml",
                       "imagenet_sit_xl2.yaml", "mnist_sit.yaml"]


@pytest.fixture(scope="module")
def imagenet_data(tmp_path_factory, image_folder, vae_path):
    out = tmp_path_factory.mktemp("prep") / "imagenet16"
    assert prep(["imagenet", str(image_folder), str(out), "--vae", vae_path, "--resolution", "16"]) == 0
    return out


@pytest.fixture(scope="module")
def caption_data(tmp_path_factory, vae_path, clip_path):
    root = tmp_path_factory.mktemp("cc12m")
    caption_source(root / "tars", np.random.default_rng(3), 5, tar=True)  # CC12M comes as webdataset tars
    out = root / "cc12m16"
    assert prep(["captions", str(root / "tars"), str(out), "--vae", vae_path, "--text-encoder", clip_path,
                 "--resolution", "16", "--max-text-len", "10"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_shrunk_with_grids_checkpoints_and_exports(env, tmp_path, recipe, request):
    data = []
    if recipe.startswith("imagenet"):
        data = [f"data.spec={request.getfixturevalue('imagenet_data')}"]
    elif recipe.startswith("cc12m"):
        data = [f"data.spec={request.getfixturevalue('caption_data')}"]
    elif recipe.startswith("mnist"):
        request.getfixturevalue("mnist_cache")  # builtin:mnist from the stand-in wheel
        data = ["eval.every=2", "eval.during_training_samples=20", "eval.batch_size=8", "eval.sampler.steps=2"]
    run = tmp_path / "run"
    proc = train(env, run, *SHRINK, *data, config=f"configs/{recipe}", timeout=600)
    assert "failed and was skipped" not in proc.stderr, proc.stderr  # no side work failed
    rows = [m for m in metrics(run) if "eval" not in m]
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    assert rows[-1]["side_work_failures"] == 0
    evaluations = [m for m in metrics(run) if "eval" in m]  # the MNIST recipe's evaluation during training
    assert [m["step"] for m in evaluations] == ([2, 4] if recipe.startswith("mnist") else [])
    assert all({"accuracy", "frechet_cnn", "memorization"} <= set(m["eval"]) for m in evaluations)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    with safe_open(str(run / "ema.safetensors"), framework="pt") as f:
        assert '"step": 4' in f.metadata()["pafm"]
