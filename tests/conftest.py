"""Test-wide settings and shared fixtures. TRITON_INTERPRET must be set before any kernel module is imported, so it
lives here: without a GPU the kernel tests run the interpreter on CPU tensors, with one they run the compiled kernels
on it. Shared plain helpers are in helpers.py; no test module imports another."""
import os
import pickle
import signal
from pathlib import Path

# One thread per xdist worker (two workers share the 2 cores; a worker inherits the controller's setting, so it is
# set, not defaulted), two in a single process.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import fake_splits, install_fake_wheel, random_image, word_tokenizer  # noqa: E402

from pafm.data import mnist  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """The environment of the subprocess runs (trainer, CLIs): a private data cache, one thread per process."""
    cache = tmp_path_factory.mktemp("pafm-cache")
    out = {**os.environ, "PAFM_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out.pop("TRITON_INTERPRET", None)  # the trainer uses the reference op on the CPU ("auto")
    return out


@pytest.fixture(scope="session")
def mnist_cache(env, tmp_path_factory):
    """builtin:mnist built from a stand-in wheel (100 training images) into the subprocesses' data cache, so no
    test downloads or builds the real 50,000 images (tests/test_mnist.py covers the real build's code path)."""
    name = f"mnist-v{mnist.BUILD_VERSION}"
    cache = Path(env["PAFM_CACHE"])
    if not (cache / name).is_dir():
        root = tmp_path_factory.mktemp("mnist-wheel")
        with pytest.MonkeyPatch.context() as mp:
            install_fake_wheel(root, mp, pickle.dumps(fake_splits(), protocol=2))
            mnist.builtin_folder(root)
        os.rename(root / name, cache / name)
    return cache / name


@pytest.fixture
def in_process(monkeypatch, env):
    """main() as a user runs it, in this process: the tests' data cache, and the signal handlers and the launcher
    variables it sets put back afterwards."""
    from pafm.train import main  # the trainer's modules only for the tests that use it

    monkeypatch.setenv("PAFM_CACHE", env["PAFM_CACHE"])
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGXFSZ)}
    yield main
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="session")
def vae_path(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def clip_path(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, tok = word_tokenizer()
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=12, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3, projection_dim=8)
    path = tmp_path_factory.mktemp("clip")
    tok.save_pretrained(path)
    CLIPTextModel(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    sizes = [(20, 28), (40, 33), (16, 16), (50, 18)]
    for c, name in enumerate(["n02", "n01", "n03"]):  # sorted order decides the label
        (root / name).mkdir()
        for i in range(3 + (c == 0)):
            random_image(rng, sizes[(c + i) % 4]).save(root / name / f"img{i}.png")
    (root / "n01" / "notes.txt").write_text("not an image")
    return root
