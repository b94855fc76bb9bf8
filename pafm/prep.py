"""Dataset preparation: images -> latent shards that `pafm.data.open_dataset` reads.

    python -m pafm.prep imagenet  IMAGE_FOLDER OUT --vae VAE_PATH [--resolution 256]
    python -m pafm.prep captions  SOURCE OUT --vae VAE_PATH --text-encoder PATH [--pooled-encoder CLIP_PATH]
    python -m pafm.prep neighbors DATASET [--k 8]
    python -m pafm.prep inspect   DATASET [--split train]

`imagenet` reads class subfolders (ImageFolder layout); `captions` reads a folder of image + .txt pairs, or a folder
of webdataset tar shards (one output shard per tar). Both store the VAE posterior mean and std of each image and of
its horizontal flip. Under `torchrun` the shards are split across ranks (shard u goes to rank u % world_size);
a shard whose `.json` sidecar exists is skipped, so an interrupted run resumes where it stopped; rank 0 writes
`index.json` once every shard is done.

Inputs, encoders and settings are checked on every rank before anything is encoded; a user error (a missing folder,
a --max-text-len beyond the text encoder's positions, an output folder started with other settings) stops every rank
with exit code 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch

from pafm.data.shards import INDEX, DataError, atomic_write_text, read_header, write_index, write_shard
from pafm.sample import USER_ERRORS, OneLineParser, all_ranks_agree, parse_args, positive_int, report_error

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".jpe", ".tif", ".tiff")


# ------------------------------------------------------------------------------------------------------ images


def center_crop(image, resolution: int) -> np.ndarray:
    """ADM's centre crop: halve with a box filter while the short side is >= 2x the target, resize the short side
    to `resolution` with bicubic, cut the centre square. Returns uint8 (resolution, resolution, 3)."""
    from PIL import Image

    image = image.convert("RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - resolution) // 2
    left = (array.shape[1] - resolution) // 2
    return array[top:top + resolution, left:left + resolution].copy()


def _open_image(source):
    from PIL import Image

    image = Image.open(source)
    image.load()
    return image


def load_images(sources: list, resolution: int, threads: int, where: str = "") -> tuple[list[np.ndarray], list[int]]:
    """Decode and centre-crop images on a thread pool (PIL releases the GIL); (crops, indices of the sources that
    could be read). Unreadable images are skipped with a warning."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def one(source):
        try:
            return center_crop(_open_image(source), resolution)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            warnings.warn(f"skipping unreadable image {source}{where}: {err}")
            return None

    with ThreadPoolExecutor(max(1, threads)) as pool:
        crops = list(pool.map(one, sources))
    kept = [i for i, c in enumerate(crops) if c is not None]
    return [crops[i] for i in kept], kept


def _to_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC images -> float32 (N, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------------ encoders


def load_vae(path, device):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path).to(device).eval()
    return vae


def vae_normalization(vae) -> dict:
    """normalised = (latent - shift) * scale, from the VAE config (SD: shift 0, scale 0.18215)."""
    channels = vae.config.latent_channels
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    return {"shift": [shift] * channels, "scale": [scale] * channels}


@torch.no_grad()
def encode_moments(vae, x: torch.Tensor, batch_size: int, flip: bool):
    """Posterior (mean, std) as (N, V, C, h, w) float32 on the CPU; view 1 encodes the flipped image."""
    device = next(vae.parameters()).device
    means, stds = [], []
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size].to(device)
        if flip:
            chunk = torch.cat([chunk, chunk.flip(-1)])
        dist = vae.encode(chunk).latent_dist
        mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
        views = 2 if flip else 1
        means.append(mean.view(views, -1, *mean.shape[1:]).transpose(0, 1))
        stds.append(std.view(views, -1, *std.shape[1:]).transpose(0, 1))
    return torch.cat(means), torch.cat(stds)


def text_position_limit(path) -> tuple[int | None, str]:
    """(longest token sequence the encoder at `path` can embed, its model type): CLIP's max_position_embeddings (77),
    None for relative positions (T5).  Reads only its config.json."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    text = getattr(config, "text_config", None) or config  # a full CLIP checkpoint: its text tower decides
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    return (int(limit) if limit else None), str(config.model_type)


def check_text_len(path, max_len: int) -> None:
    """Refuse a token length beyond the text encoder's position table (CLIP: 77), which would fail mid-encoding."""
    limit, kind = text_position_limit(path)
    if limit is not None and max_len > limit:
        raise DataError(f"--max-text-len {max_len} exceeds the {limit} positions (max_position_embeddings) of the "
                        f"text encoder {path} ({kind}): use --max-text-len {limit} or less")


class TransformersTextEmbedder:
    """Token embeddings, mask and pooled vector from a local transformers text encoder (CLIP or T5, or any model
    with `last_hidden_state`). The pooled vector is CLIP's pooled output (from `pooled_path` if given, as SD3 pairs
    T5 tokens with a CLIP pooled vector), else the masked mean of the token embeddings. `max_len` beyond the
    encoder's positions is refused; the pooled encoder reads at most its own positions (its vector sits at the end
    token, so truncation is what SD3 does)."""

    def __init__(self, path, max_len: int = 77, pooled_path=None, device="cpu"):
        self.path, self.max_len, self.pooled_path, self.device = str(path), max_len, pooled_path, device
        check_text_len(path, max_len)
        self.tokenizer, self.model = self._load(path)
        self.pooled, self.pooled_len = None, max_len
        if pooled_path:
            self.pooled = self._load(pooled_path)
            pooled_limit = text_position_limit(pooled_path)[0] or max_len
            self.pooled_len = min(max_len, self.pooled[0].model_max_length, pooled_limit)

    def _load(self, path):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

        config = AutoConfig.from_pretrained(path)
        cls = {"t5": T5EncoderModel, "clip": CLIPTextModel, "clip_text_model": CLIPTextModel}.get(
            config.model_type, AutoModel)
        return AutoTokenizer.from_pretrained(path), cls.from_pretrained(path).to(self.device).eval()

    @property
    def config(self) -> dict:
        return {"kind": "transformers", "path": self.path, "pooled_path": self.pooled_path and str(self.pooled_path),
                "max_len": self.max_len}

    @staticmethod
    def _run(tokenizer, model, captions, max_len, device):
        enc = tokenizer(captions, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        mask = enc["attention_mask"].to(device)
        out = model(input_ids=enc["input_ids"].to(device), attention_mask=mask)
        return out, mask.bool()

    @torch.no_grad()
    def embed(self, captions: list[str]):
        out, mask = self._run(self.tokenizer, self.model, captions, self.max_len, self.device)
        tokens = out.last_hidden_state.float()
        if self.pooled is not None:
            tok, model = self.pooled
            pooled_out, _ = self._run(tok, model, captions, self.pooled_len, self.device)
            pooled = pooled_out.pooler_output.float()
        elif getattr(out, "pooler_output", None) is not None:
            pooled = out.pooler_output.float()
        else:
            m = mask.unsqueeze(-1).float()
            pooled = (tokens * m).sum(1) / m.sum(1).clamp_min(1)
        return tokens.cpu(), mask.cpu(), pooled.cpu()

    __call__ = embed


# ------------------------------------------------------------------------------------------------------ sources


def imagenet_units(source: Path, shard_size: int):
    """(class names, list of units); a unit is a list of (image path, label) of one shard."""
    classes = sorted(d.name for d in source.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{source} has no class subfolders (expected the ImageFolder layout SOURCE/<class>/<image>)")
    items = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (source / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        items.extend((p, label) for p in files)
    if not items:
        raise DataError(f"{source}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class subfolders")
    return classes, [items[i:i + shard_size] for i in range(0, len(items), shard_size)]


def caption_units(source: Path, shard_size: int):
    """Units of work: one per tar file (webdataset), or chunks of (image path, .txt path) pairs of a folder."""
    tars = sorted(source.glob("*.tar"))
    if tars:
        return [("tar", t) for t in tars]
    pairs = []
    for image in sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        text = image.with_suffix(".txt")
        if text.is_file():
            pairs.append((image, text))
    if not pairs:
        raise DataError(f"{source}: found neither *.tar shards nor image files with a matching .txt caption")
    return [("pairs", pairs[i:i + shard_size]) for i in range(0, len(pairs), shard_size)]


def read_tar(path: Path):
    """(image bytes, caption) of each sample of a webdataset tar: members grouped by key (name up to the first dot
    of the file name), in order of appearance."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, _, ext = base.partition(".")
            key = f"{folder}/{stem}"
            data = tar.extractfile(member).read()
            samples.setdefault(key, {})[ext.lower()] = data
    out = []
    for fields in samples.values():
        image = next((fields[e] for e in ("jpg", "jpeg", "png", "webp") if e in fields), None)
        if image is not None and "txt" in fields:
            out.append((io.BytesIO(image), fields["txt"].decode("utf-8").strip()))
    return out


# ------------------------------------------------------------------------------------------------------ running


def _dist(args):
    """(rank, world size, device). Under torchrun, joins a gloo process group so rank 0 can wait for the others;
    explicit --rank/--world-size run independent jobs (e.g. a job array) with no group."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.rank is not None or args.world_size is not None:
        rank, world = args.rank or 0, args.world_size or 1
        if not 0 <= rank < world:
            raise ValueError(f"--rank {rank} must lie in [0, --world-size {world})")
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if world > 1 and not torch.distributed.is_initialized():
            # Ranks may finish their shards hours apart; rank 0 waits at one barrier before writing the index.
            torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=2))
    device = args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    return rank, world, device


def _sidecar(out: Path, unit: int) -> Path:
    return out / f"shard-{unit:05d}.json"


def _done(out: Path, unit: int) -> bool:
    side = _sidecar(out, unit)
    if not side.is_file():
        return False
    meta = json.loads(side.read_text())
    if meta["num_items"] == 0:
        return True
    try:  # a sidecar is written only after its shard; still, a shard truncated since then is redone
        read_header(out / meta["file"])
    except DataError:
        return False
    return True


def _latent_sums(mean: torch.Tensor) -> dict:
    """Per-channel sum and sum of squares (float64) of the unflipped posterior means, for `latent_stats`."""
    m = mean[:, 0].double()
    return {"sum": m.sum((0, 2, 3)).tolist(), "sumsq": (m * m).sum((0, 2, 3)).tolist(),
            "count": int(m.shape[0] * m.shape[2] * m.shape[3])}


def _encode_unit(args, vae, images: list, flip: bool):
    mean, std = encode_moments(vae, _to_tensor(images), args.batch_size, flip)
    mean, std = mean.to(getattr(torch, args.dtype)), std.to(getattr(torch, args.dtype))
    return {"mean": mean, "std": std}, _latent_sums(mean)  # stats of the values as stored


RUN_KEYS = ("command", "source", "vae", "resolution", "shard_size", "dtype", "no_flip", "split", "text_encoder",
            "pooled_encoder", "max_text_len", "text_dtype")


def check_run(args, out: Path, write: bool = True) -> None:
    """Record the settings that decide the shards' content in OUT/prep.json; a resumed run must use the same ones,
    else finished shards from the old settings would be mixed with new ones.  write=False only compares."""
    settings = {k: str(getattr(args, k, None)) for k in RUN_KEYS}
    for k in ("source", "vae", "text_encoder", "pooled_encoder"):
        if getattr(args, k, None):
            settings[k] = str(Path(getattr(args, k)).resolve())
    path = out / "prep.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise DataError(f"{out} was started with other settings (then, now): "
                            + ", ".join(f"{k}={a}/{b}" for k, (a, b) in diff.items())
                            + ": use the same settings to resume, or a new output folder")
    elif write:  # every rank writes the same content, so concurrent writes are harmless
        atomic_write_text(path, json.dumps(settings, indent=1))


def _run_units(args, out: Path, units: list, process) -> None:
    """Run `process(unit_index, unit) -> (tensors, captions, sums, skipped)` for this rank's unfinished units."""
    from tqdm import tqdm

    rank, world = args.rank, args.world_size
    mine = [u for u in range(len(units)) if u % world == rank and not _done(out, u)]
    for u in tqdm(mine, desc=f"{args.command} shards", disable=rank != 0, unit="shard"):
        tensors, captions, sums, skipped = process(u, units[u])
        meta = {"num_items": 0, "skipped": skipped}
        if tensors is not None:
            record = write_shard(out / f"shard-{u:05d}.safetensors", tensors, captions)
            meta = {**record, "skipped": skipped, "sums": sums}
        atomic_write_text(_sidecar(out, u), json.dumps(meta))


def _finalize(args, out: Path, num_units: int, info: dict, normalization: dict) -> dict | None:
    """Rank 0, once every shard is done: gather the sidecars into index.json. Returns the index, or None on other
    ranks and when shards are still missing in a run without a process group (independent jobs per rank)."""
    grouped = torch.distributed.is_initialized()
    if grouped:
        torch.distributed.barrier()
    if args.rank != 0:
        return None
    missing = [u for u in range(num_units) if not _done(out, u)]
    if missing:
        what = f"{out}: shards {missing[:10]}{' ...' if len(missing) > 10 else ''} are not done"
        if grouped:
            raise DataError(f"{what} (a rank failed): run the same command again to finish them")
        print(f"{what}; index.json is written by the run that completes the last shard (rerun with --rank 0)")
        return None
    metas = [json.loads(_sidecar(out, u).read_text()) for u in range(num_units)]
    filled = [m for m in metas if m["num_items"]]
    if not filled:
        raise DataError(f"{out}: no item could be read from {args.source}")
    # Per-item specs from a written header, so they are exactly what the reader will see.
    header = read_header(out / filled[0]["file"])[0]
    specs = {k: {"dtype": v["dtype"], "shape": v["shape"][1:]} for k, v in header.items()
             if k not in ("caption_bytes", "caption_offsets")}
    count = sum(m["sums"]["count"] for m in filled)
    mean = np.sum([m["sums"]["sum"] for m in filled], 0) / count
    sumsq = np.sum([m["sums"]["sumsq"] for m in filled], 0) / count
    std = np.sqrt(np.maximum(sumsq - mean ** 2, 0.0))
    if args.normalization == "stats":
        normalization = {"shift": mean.tolist(), "scale": (1.0 / np.maximum(std, 1e-12)).tolist()}
    info = {**info, "latent_shape": specs["mean"]["shape"][1:], "normalization": normalization,
            "latent_stats": {"mean": mean.tolist(), "std": std.tolist()},
            "skipped": int(sum(m["skipped"] for m in metas))}
    shards = [{"file": m["file"], "num_items": m["num_items"], "sha256": m["sha256"]} for m in filled]
    return write_index(out, info, shards, specs)


def _common_info(args, vae) -> dict:
    return {
        "split": args.split,
        "encoder": {"kind": "vae", "path": str(Path(args.vae).resolve()), "class": type(vae).__name__,
                    "resolution": args.resolution, "crop": "adm-center"},
        "source": str(Path(args.source).resolve()),
    }


def _check_folder(flag: str, path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"{flag} {path} {'does not exist' if not path.exists() else 'is not a folder'} ({what})")
    return path


def _check_inputs(args) -> None:
    """The cheap checks of a converter's inputs, before its output folder or any model is touched."""
    _check_folder("input folder", args.source, "the images to encode")
    _check_folder("--vae", args.vae, "a local diffusers AutoencoderKL folder")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"output folder {out} exists and is not a folder")
    if args.command == "captions":
        _check_folder("--text-encoder", args.text_encoder, "a local transformers CLIP or T5 folder")
        if args.pooled_encoder:
            _check_folder("--pooled-encoder", args.pooled_encoder, "a local transformers CLIP folder")
        check_text_len(args.text_encoder, args.max_text_len)
    if (out / "prep.json").is_file():
        check_run(args, out, write=False)


def _setup_imagenet(args):
    _check_inputs(args)
    classes, units = imagenet_units(Path(args.source), args.shard_size)
    vae = load_vae(args.vae, args.device)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    check_run(args, Path(args.out))  # written once the models load, so a failed start leaves no settings behind
    return classes, units, vae


def _setup_captions(args):
    _check_inputs(args)
    units = caption_units(Path(args.source), args.shard_size)
    vae = load_vae(args.vae, args.device)
    text = TransformersTextEmbedder(args.text_encoder, args.max_text_len, args.pooled_encoder, args.device)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    check_run(args, Path(args.out))
    return units, vae, text


def prep_imagenet(args) -> dict | None:
    out = Path(args.out)
    classes, units, vae = all_ranks_agree(_setup_imagenet, args)

    def process(u, unit):
        images, kept = load_images([path for path, _ in unit], args.resolution, args.threads)
        labels, skipped = [unit[i][1] for i in kept], len(unit) - len(kept)
        if not images:
            return None, None, None, skipped
        tensors, sums = _encode_unit(args, vae, images, not args.no_flip)
        tensors["label"] = torch.tensor(labels, dtype=torch.int64)
        return tensors, None, sums, skipped

    _run_units(args, out, units, process)
    info = {"kind": "class", **_common_info(args, vae), "num_classes": len(classes), "class_names": classes}
    return _finalize(args, out, len(units), info, vae_normalization(vae))


def prep_captions(args) -> dict | None:
    out = Path(args.out)
    units, vae, text = all_ranks_agree(_setup_captions, args)

    def process(u, unit):
        kind, payload = unit
        pairs = read_tar(payload) if kind == "tar" else [(img, txt.read_text().strip()) for img, txt in payload]
        images, kept = load_images([image for image, _ in pairs], args.resolution, args.threads, f" (shard {u})")
        captions, skipped = [pairs[i][1] for i in kept], len(pairs) - len(kept)
        if not images:
            return None, None, None, skipped
        tensors, sums = _encode_unit(args, vae, images, not args.no_flip)
        text_dtype = getattr(torch, args.text_dtype)
        parts = [text.embed(captions[i:i + args.batch_size]) for i in range(0, len(captions), args.batch_size)]
        tensors["tokens"] = torch.cat([p[0] for p in parts]).to(text_dtype)
        tensors["mask"] = torch.cat([p[1] for p in parts])
        tensors["pooled"] = torch.cat([p[2] for p in parts]).to(text_dtype)
        return tensors, captions, sums, skipped

    _run_units(args, out, units, process)
    info = {"kind": "text", **_common_info(args, vae), "class_names": None, "captions": True,
            "text_encoder": text.config}
    return _finalize(args, out, len(units), info, vae_normalization(vae))


def run_neighbors(args) -> dict:
    from pafm.data import open_dataset
    from pafm.data.neighbors import add_neighbors

    dataset = open_dataset(args.dataset, args.split)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    entry = add_neighbors(dataset.folder, k=args.k, chunk=args.chunk, device=device)
    print(f"wrote {args.k} neighbours per item of {dataset.folder} ({len(dataset)} items)")
    return entry


def run_inspect(args) -> int:
    from pafm.data import open_dataset

    try:
        dataset = open_dataset(args.dataset, args.split)
        info = dataset.info
        size = sum(s.path.stat().st_size for s in dataset.shards)
        print(f"dataset  {dataset.folder}")
        print(f"kind     {info['kind']}   items {len(dataset)}   shards {len(dataset.shards)}   "
              f"{size / 2 ** 20:.1f} MiB")
        print(f"latent   {info['latent_shape']}   moments {info['has_moments']}   flip {info['has_flip']}   "
              f"neighbours k={info['neighbors_k']}")
        print(f"normalization {json.dumps(info['normalization'])}")
        if info.get("latent_stats"):
            print(f"latent stats  {json.dumps(info['latent_stats'])}")
        print(f"encoder  {json.dumps(info['encoder'])}")
        if info.get("class_names"):
            names = info["class_names"]
            print(f"classes  {len(names)}: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")
        if info["kind"] == "text":
            print(f"text     tokens [{info['max_text_len']}, {info['text_dim']}]  pooled [{info['pooled_dim']}]  "
                  f"encoder {json.dumps(info.get('text_encoder'))}")
            for caption in dataset.captions(list(range(min(3, len(dataset))))):
                print(f"  caption: {caption!r}")
        for name, spec in dataset.index["tensors"].items():
            print(f"tensor   {name:8s} {spec['dtype']:5s} per item {spec['shape']}")
        dataset.validate(checksums=not args.no_checksums)
    except DataError as err:
        print(f"INVALID: {err}", file=sys.stderr)
        return 1
    print("valid")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m pafm.prep", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def encode_args(p):
        p.add_argument("source", help="input folder")
        p.add_argument("out", help="output dataset folder")
        p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema)")
        p.add_argument("--resolution", type=positive_int, default=256)
        p.add_argument("--shard-size", type=positive_int, default=1024, help="items per shard (folder inputs)")
        p.add_argument("--batch-size", type=positive_int, default=32, help="images per encoder forward")
        p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                       help="storage dtype of the posterior mean and std")
        p.add_argument("--no-flip", action="store_true", help="do not store a flipped copy of each item")
        p.add_argument("--normalization", default="vae", choices=["vae", "stats"],
                       help="vae: the VAE config's shift/scale (SD: 0, 0.18215); stats: per-channel mean/std")
        p.add_argument("--split", default="train", help="split name recorded in the index")
        p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
        p.add_argument("--threads", type=positive_int, default=8, help="image decoding threads per rank")
        p.add_argument("--rank", type=int, default=None, help="this job's part, without torchrun")
        p.add_argument("--world-size", type=int, default=None, help="number of parts, without torchrun")

    p = sub.add_parser("imagenet", help="class folders (ImageFolder layout) -> class-conditional latent shards")
    encode_args(p)
    p = sub.add_parser("captions", help="image/caption pairs (folder of image + .txt, or webdataset tars)")
    encode_args(p)
    p.add_argument("--text-encoder", required=True, help="local transformers text encoder (CLIP or T5)")
    p.add_argument("--pooled-encoder", default=None, help="local CLIP text encoder for the pooled vector")
    p.add_argument("--max-text-len", type=positive_int, default=77)
    p.add_argument("--text-dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    p = sub.add_parser("neighbors", help="exact same-class k-nearest neighbours, written into the dataset")
    p.add_argument("dataset")
    p.add_argument("--split", default="train")
    p.add_argument("--k", type=positive_int, default=8)
    p.add_argument("--chunk", type=positive_int, default=4096, help="rows per distance block")
    p.add_argument("--device", default=None)
    p = sub.add_parser("inspect", help="print what a dataset holds and validate it")
    p.add_argument("dataset", help="dataset folder or builtin:digits / builtin:digits-captions")
    p.add_argument("--split", default="train")
    p.add_argument("--no-checksums", action="store_true")
    return parser


def run(args) -> int:
    if args.command == "inspect":
        return run_inspect(args)
    if args.command == "neighbors":
        run_neighbors(args)
        return 0
    args.rank, args.world_size, args.device = _dist(args)
    index = prep_imagenet(args) if args.command == "imagenet" else prep_captions(args)
    if index is not None:
        print(f"wrote {index['num_items']} items in {len(index['shards'])} shards to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0 done, 1 `inspect` found the dataset invalid, 2 a user error (one line on stderr)."""
    args, code = parse_args(build_parser(), argv)
    if args is None:
        return code
    try:
        return run(args)
    except USER_ERRORS as err:
        return report_error(err)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    from pafm.distributed import exit_process

    exit_process(main())
