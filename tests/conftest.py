"""Test-wide settings. TRITON_INTERPRET must be set before any kernel module is imported, so it lives here:
without a GPU the kernel tests run the interpreter on CPU tensors, with one they run the compiled kernels on it."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
    import pickle
    from pathlib import Path

    from test_mnist import fake_splits, install_fake_wheel

    from pafm.data import mnist

    name = f"mnist-v{mnist.BUILD_VERSION}"
    cache = Path(env["PAFM_CACHE"])
    if not (cache / name).is_dir():
        root = tmp_path_factory.mktemp("mnist-wheel")
        with pytest.MonkeyPatch.context() as mp:
            install_fake_wheel(root, mp, pickle.dumps(fake_splits(), protocol=2))
            mnist.builtin_folder(root)
        os.rename(root / name, cache / name)
    return cache / name
