"""pafm.prep on generated images with a tiny random-weight VAE and text encoder (built here, nothing downloaded)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pafm.data import LatentLoader, TransformersTextEmbedder, open_dataset, text_embedder_from_info, validate_dataset
from pafm.data.loader import flip_views
from pafm.prep import center_crop, main

from helpers import caption_source, random_image, word_tokenizer


def encode_reference(vae_path, path, flip=False):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_path).eval()
    x = torch.from_numpy(center_crop(Image.open(path), 16)).permute(2, 0, 1).float()[None] / 127.5 - 1
    if flip:
        x = x.flip(-1)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    return dist.mean[0], dist.std[0]


def test_center_crop_matches_adm_recipe():
    rng = np.random.default_rng(1)
    image = random_image(rng, (48, 32))  # short side 32 >= 2 * 16: one 2x box reduction to 24 x 16, then crop
    out = center_crop(image, 16)
    a = np.asarray(image).astype(np.float64)
    box = (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) / 4  # independent 2x2 box mean
    want = box[:, 4:20]
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(np.float64) - want).max() <= 1.0
    small = center_crop(random_image(rng, (10, 20)), 16)  # upscaled: short side to 16, then centre rows
    assert small.shape == (16, 16, 3)


def test_imagenet_prep_resume_and_ranks(image_folder, vae_path, tmp_path, capsys):
    out = tmp_path / "latents"
    base = ["imagenet", str(image_folder), str(out), "--vae", vae_path, "--resolution", "16", "--shard-size", "4",
            "--batch-size", "3"]
    # Two independent jobs (no torchrun): rank 1 first, so rank 0's run is the one that completes the index.
    assert main(base + ["--rank", "1", "--world-size", "2"]) == 0
    assert sorted(p.name for p in out.glob("shard-*.safetensors")) == ["shard-00001.safetensors"]
    assert not (out / "index.json").exists()
    assert main(base + ["--rank", "0", "--world-size", "2"]) == 0
    ds = open_dataset(str(out))
    validate_dataset(ds)
    assert len(ds) == 10 and len(ds.shards) == 3
    info = ds.info
    assert info["kind"] == "class" and info["class_names"] == ["n01", "n02", "n03"] and info["num_classes"] == 3
    assert info["latent_shape"] == [4, 8, 8] and info["has_moments"] and info["has_flip"]
    assert info["normalization"] == {"shift": [0.0] * 4, "scale": [0.18215] * 4}
    assert info["encoder"]["kind"] == "vae" and info["encoder"]["path"].endswith(vae_path.rsplit("/", 1)[-1])
    labels = ds.gather("label", range(10)).tolist()
    assert labels == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    # Item 4 is n02/img1.png: its stored posterior equals a direct encode of the ADM crop (fp16 storage).
    for view, flip in ((0, False), (1, True)):
        mean, std = encode_reference(vae_path, image_folder / "n02" / "img1.png", flip)
        assert torch.allclose(ds.gather("mean", [4], [view])[0].float(), mean, atol=2e-3, rtol=2e-3)
        assert torch.allclose(ds.gather("std", [4], [view])[0].float(), std, atol=2e-3, rtol=2e-3)
    all_means = ds.gather("mean", range(10), np.zeros(10, int)).double()
    assert np.allclose(info["latent_stats"]["mean"], all_means.mean((0, 2, 3)).numpy(), atol=1e-3)
    # Resume: only a shard whose files were removed is redone.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    (out / "shard-00002.safetensors").unlink()
    (out / "shard-00002.json").unlink()
    assert main(base) == 0
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    assert after["shard-00000.safetensors"] == stamps["shard-00000.safetensors"]
    assert after["shard-00001.safetensors"] == stamps["shard-00001.safetensors"]
    assert after["shard-00002.safetensors"] != stamps["shard-00002.safetensors"]
    validate_dataset(open_dataset(str(out)))
    capsys.readouterr()
    # Resuming with other settings would mix shards: refused in one line, exit code 2.
    assert main(base[:-4] + ["--shard-size", "5", "--batch-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "shard_size=4/5" in err and len(err.strip().splitlines()) == 1
    batch = next(LatentLoader(open_dataset(str(out)), 4, seed=0))
    ids = batch["index"].numpy()
    assert batch["x"].shape == (4, 4, 8, 8)
    want = ds.gather("mean", ids, flip_views(0, 0, ids)).double() * 0.18215  # SD convention: shift 0
    assert torch.allclose(batch["mean"].double(), want, atol=1e-6)

    # neighbours, then inspect (valid), then inspect after corruption (invalid, names the file)
    assert main(["neighbors", str(out), "--k", "2", "--chunk", "3"]) == 0
    ds = open_dataset(str(out))
    ids = np.array(ds.neighbor_ids)
    x = (ds.gather("mean", range(10), np.zeros(10, int)).double() * 0.18215).flatten(1)
    lab = torch.tensor(labels)
    for i in range(10):
        same = [j for j in range(10) if lab[j] == lab[i] and j != i]
        d = {j: float(((x[j] - x[i]) ** 2).sum()) for j in same}
        assert list(ids[i]) == sorted(same, key=d.get)[:2]
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "valid" in capsys.readouterr().out
    data = bytearray((out / "shard-00001.safetensors").read_bytes())
    data[-5] ^= 0x55
    (out / "shard-00001.safetensors").write_bytes(bytes(data))
    assert main(["inspect", str(out)]) == 1
    assert "shard-00001.safetensors" in capsys.readouterr().err


def _rank_main(rank, argv, port, results):
    import os

    torch.set_num_threads(1)  # OpenMP's thread pool does not survive fork; one thread never enters it
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    results.put((rank, main(argv)))


def test_imagenet_prep_process_group(image_folder, vae_path, tmp_path):
    """Two ranks in a gloo group, as under torchrun (forked here to reuse the imports): shards are split by rank,
    rank 0 waits at the barrier and writes the index."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "dist"
    argv = ["imagenet", str(image_folder), str(out), "--vae", vae_path, "--resolution", "16", "--shard-size", "2",
            "--device", "cpu"]
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, argv, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(results.get(timeout=5) for _ in range(2)) == [(0, 0), (1, 0)]
    ds = open_dataset(str(out))
    validate_dataset(ds)
    assert len(ds) == 10 and len(ds.shards) == 5


@pytest.mark.parametrize("tar", [False, True])
@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_captions_prep(tmp_path, vae_path, clip_path, tar):
    rng = np.random.default_rng(2)
    captions = caption_source(tmp_path / "src", rng, 5, tar)
    out = tmp_path / "out"
    assert main(["captions", str(tmp_path / "src"), str(out), "--vae", vae_path, "--text-encoder", clip_path,
                 "--resolution", "16", "--shard-size", "3", "--max-text-len", "10", "--text-dtype", "float32"]) == 0
    ds = open_dataset(str(out))
    validate_dataset(ds)
    info = ds.info
    assert info["kind"] == "text" and len(ds) == 5 and len(ds.shards) == 2
    assert info["text_dim"] == 16 and info["max_text_len"] == 10 and info["pooled_dim"] == 16
    assert ds.captions(range(5)) == captions
    assert info["skipped"] == (0 if tar else 1)
    # The stored embeddings are what the CLIP text model gives for the caption, run directly here.
    from transformers import AutoTokenizer, CLIPTextModel

    tok, model = AutoTokenizer.from_pretrained(clip_path), CLIPTextModel.from_pretrained(clip_path).eval()
    enc = tok([captions[3]], padding="max_length", max_length=10, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc)
    n_tok = len(captions[3].split()) + 2
    assert ds.gather("mask", [3])[0].tolist() == [True] * n_tok + [False] * (10 - n_tok)
    assert torch.allclose(ds.gather("tokens", [3])[0], ref.last_hidden_state[0], atol=1e-5)
    assert torch.allclose(ds.gather("pooled", [3])[0], ref.pooler_output[0], atol=1e-5)
    embedder = text_embedder_from_info(info)
    assert isinstance(embedder, TransformersTextEmbedder)
    assert torch.allclose(embedder.embed([captions[3]])[2][0], ref.pooler_output[0], atol=1e-5)
    batch = next(LatentLoader(ds, 2, seed=0))
    assert batch["tokens"].shape == (2, 10, 16)
    assert torch.equal(batch["tokens"], ds.gather("tokens", batch["index"].numpy()).float())
    assert json.loads((out / "index.json").read_text())["text_encoder"]["path"] == clip_path


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_t5_tokens_with_clip_pooled(tmp_path, vae_path, clip_path):
    """SD3's pairing: token embeddings from T5, the pooled vector from CLIP (--pooled-encoder)."""
    from transformers import AutoTokenizer, CLIPTextModel, T5Config, T5EncoderModel

    vocab, tok = word_tokenizer()
    torch.manual_seed(1)
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=12, d_kv=6, d_ff=24, num_layers=1, num_heads=2,
                                 pad_token_id=0, eos_token_id=3, decoder_start_token_id=0))
    t5_path = tmp_path / "t5"
    tok.save_pretrained(t5_path)
    t5.save_pretrained(t5_path)
    captions = caption_source(tmp_path / "src", np.random.default_rng(3), 3, tar=False)
    out = tmp_path / "out"
    assert main(["captions", str(tmp_path / "src"), str(out), "--vae", vae_path, "--text-encoder", str(t5_path),
                 "--pooled-encoder", clip_path, "--resolution", "16", "--max-text-len", "9", "--no-flip",
                 "--normalization", "stats"]) == 0
    ds = open_dataset(str(out))
    validate_dataset(ds)
    assert ds.info["text_dim"] == 12 and ds.info["pooled_dim"] == 16 and not ds.info["has_flip"]
    assert ds.index["tensors"]["tokens"]["dtype"] == "BF16"  # the default text storage dtype
    # --normalization stats: per-channel shift = mean and scale = 1 / std of the stored posterior means (float64).
    means = ds.gather("mean", range(3), np.zeros(3, int)).double()
    mu, sd = means.mean((0, 2, 3)), means.transpose(0, 1).reshape(4, -1).std(1, unbiased=False)
    assert np.allclose(ds.info["normalization"]["shift"], mu.numpy(), atol=1e-6)
    assert np.allclose(ds.info["normalization"]["scale"], (1 / sd).numpy(), rtol=1e-5)
    enc = tok([captions[1]], padding="max_length", max_length=9, truncation=True, return_tensors="pt")
    with torch.no_grad():
        tokens = t5.eval()(**enc).last_hidden_state[0]
        clip_tok = AutoTokenizer.from_pretrained(clip_path)
        pooled = CLIPTextModel.from_pretrained(clip_path).eval()(
            **clip_tok([captions[1]], padding="max_length", max_length=9, truncation=True, return_tensors="pt")
        ).pooler_output[0]
    assert torch.allclose(ds.gather("tokens", [1])[0].float(), tokens, rtol=1e-2, atol=1e-2)
    assert torch.allclose(ds.gather("pooled", [1])[0].float(), pooled, rtol=1e-2, atol=1e-2)
