"""Dataset preparation: images -> latent shards that `pafm.data.open_dataset` reads.

    python -m pafm.prep imagenet  IMAGE_FOLDER OUT --vae VAE_PATH [--resolution 256]
    python -m pafm.prep captions  SOURCE OUT --vae VAE_PATH --text-encoder PATH [--pooled-encoder CLIP_PATH]
    python -m pafm.prep neighbors DATASET [--k 8] [--exact-max 20000]
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

import io
import json
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from pafm.cli import OneLineParser, all_ranks_agree, parse_args, positive_int, report_error
from pafm.data import DataError, TransformersTextEmbedder, open_dataset, validate_dataset
from pafm.data.neighbors import EXACT_MAX, add_neighbors
from pafm.data.shards import CAPTION_TENSORS, read_header, write_index, write_shard
from pafm.data.text import check_text_len
from pafm.distributed import World, cleanup, init_distributed, launched, pick_device
from pafm.files import IMAGE_EXTENSIONS, atomic_write_text, image_files


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


def read_center_crops(sources: list, resolution: int, threads: int, where: str = "") -> tuple[list, list[int]]:
    """Read and centre-crop images on a thread pool (PIL releases the GIL); (crops, indices of the sources that
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
        posterior = vae.encode(chunk).latent_dist
        mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()
        views = 2 if flip else 1
        means.append(mean.view(views, -1, *mean.shape[1:]).transpose(0, 1))
        stds.append(std.view(views, -1, *std.shape[1:]).transpose(0, 1))
    return torch.cat(means), torch.cat(stds)


# ------------------------------------------------------------------------------------------------------ sources


def imagenet_units(source: Path, shard_size: int):
    """(class names, list of units); a unit is a list of (image path, label) of one shard."""
    classes = sorted(d.name for d in source.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{source} has no class subfolders (expected the ImageFolder layout SOURCE/<class>/<image>)")
    items = []
    for label, name in enumerate(classes):
        files = image_files(source / name)
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
    for image in image_files(source):
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
        image = next((fields[e[1:]] for e in IMAGE_EXTENSIONS if e[1:] in fields), None)
        if image is not None and "txt" in fields:
            out.append((io.BytesIO(image), fields["txt"].decode("utf-8").strip()))
    return out


# ------------------------------------------------------------------------------------------------------ running

SHARD_POLL_SECONDS = 2.0  # how often rank 0 looks for the other ranks' finished shards


def _world(args) -> World:
    """Under torchrun, joins a gloo process group, so that an error seen by one rank stops them all; explicit
    --rank/--world-size run independent jobs (e.g. a job array) with no group."""
    if args.rank is None and args.world_size is None:
        return init_distributed(args.device or "auto", backend="gloo", group_when_alone=False)
    rank, size = args.rank or 0, args.world_size or 1
    if not 0 <= rank < size:
        raise ValueError(f"--rank {rank} must lie in [0, --world-size {size})")
    return World(rank, size, pick_device(args.device or "auto", launched()[2]))


def _sidecar(out: Path, unit: int) -> Path:
    return out / f"shard-{unit:05d}.json"


def _shard_done(out: Path, unit: int) -> bool:
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


def prep_settings(args) -> dict:
    """The settings that decide the shards' content (paths resolved)."""
    settings = {k: str(getattr(args, k, None)) for k in RUN_KEYS}
    for k in ("source", "vae", "text_encoder", "pooled_encoder"):
        if getattr(args, k, None):
            settings[k] = str(Path(getattr(args, k)).resolve())
    return settings


def check_same_settings(args, out: Path) -> None:
    """A resumed run must use the settings recorded in OUT/prep.json, else finished shards from the old settings
    would be mixed with new ones."""
    path = out / "prep.json"
    if not path.is_file():
        return
    old, settings = json.loads(path.read_text()), prep_settings(args)
    diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if diff:
        raise DataError(f"{out} was started with other settings (then, now): "
                        + ", ".join(f"{k}={a}/{b}" for k, (a, b) in diff.items())
                        + ": use the same settings to resume, or a new output folder")


def record_settings(args, out: Path) -> None:
    """Check the settings against OUT/prep.json, or write it for a new output folder."""
    check_same_settings(args, out)
    if not (out / "prep.json").is_file():  # every rank writes the same content, so concurrent writes are harmless
        atomic_write_text(out / "prep.json", json.dumps(prep_settings(args), indent=1))


def _run_units(args, out: Path, units: list, process) -> None:
    """Run `process(unit_index, unit) -> (tensors, captions, sums, skipped)` for this rank's unfinished units."""
    from tqdm import tqdm

    rank, world = args.rank, args.world_size
    mine = [u for u in range(len(units)) if u % world == rank and not _shard_done(out, u)]
    for u in tqdm(mine, desc=f"{args.command} shards", disable=rank != 0, unit="shard"):
        tensors, captions, sums, skipped = process(u, units[u])
        meta = {"num_items": 0, "skipped": skipped}
        if tensors is not None:
            record = write_shard(out / f"shard-{u:05d}.safetensors", tensors, captions)
            meta = {**record, "skipped": skipped, "sums": sums}
        atomic_write_text(_sidecar(out, u), json.dumps(meta))


def _finalize(args, out: Path, num_units: int, info: dict, normalization: dict) -> dict | None:
    """Rank 0, once every shard is done: gather the sidecars into index.json. Returns the index, or None on other
    ranks and when shards are still missing in a run without a process group (independent jobs per rank).

    Under torchrun rank 0 waits for the other ranks' sidecars (each written after its shard) by watching the output
    folder, not in a collective: ranks may finish hours apart, beyond any collective timeout, and a rank that
    fails ends the whole job."""
    if args.rank != 0:
        return None
    grouped = torch.distributed.is_initialized()
    while grouped and not all(_sidecar(out, u).is_file() for u in range(num_units)):
        time.sleep(SHARD_POLL_SECONDS)
    missing = [u for u in range(num_units) if not _shard_done(out, u)]
    if missing:
        what = f"{out}: shards {missing[:10]}{' ...' if len(missing) > 10 else ''} are not done"
        if grouped:
            raise DataError(f"{what} (unreadable since they were written): run the same command again to redo them")
        print(f"{what}; index.json is written by the run that completes the last shard (rerun with --rank 0)")
        return None
    metas = [json.loads(_sidecar(out, u).read_text()) for u in range(num_units)]
    filled = [m for m in metas if m["num_items"]]
    if not filled:
        raise DataError(f"{out}: no item could be read from {args.source}")
    # Per-item specs from a written header, so they are exactly what the reader will see.
    header = read_header(out / filled[0]["file"])[0]
    specs = {k: {"dtype": v["dtype"], "shape": v["shape"][1:]} for k, v in header.items()
             if k not in CAPTION_TENSORS}
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
    check_same_settings(args, out)


def _setup_imagenet(args):
    _check_inputs(args)
    classes, units = imagenet_units(Path(args.source), args.shard_size)
    vae = load_vae(args.vae, args.device)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    record_settings(args, Path(args.out))  # once the models load, so a failed start leaves no settings behind
    return classes, units, vae


def _setup_captions(args):
    _check_inputs(args)
    units = caption_units(Path(args.source), args.shard_size)
    vae = load_vae(args.vae, args.device)
    text = TransformersTextEmbedder(args.text_encoder, args.max_text_len, args.pooled_encoder, args.device)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    record_settings(args, Path(args.out))
    return units, vae, text


def prep_imagenet(args) -> dict | None:
    out = Path(args.out)
    classes, units, vae = all_ranks_agree(_setup_imagenet, args)

    def process(u, unit):
        images, kept = read_center_crops([path for path, _ in unit], args.resolution, args.threads)
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
        images, kept = read_center_crops([image for image, _ in pairs], args.resolution, args.threads, f" (shard {u})")
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
    dataset = open_dataset(args.dataset, args.split)
    entry = add_neighbors(dataset.folder, k=args.k, chunk=args.chunk, device=pick_device(args.device or "auto"),
                          exact_max=args.exact_max, recall_sample=args.recall_sample)
    print(f"wrote {args.k} neighbours per item of {dataset.folder} ({len(dataset)} items; {describe_search(entry)})")
    return entry


def describe_search(entry: dict) -> str:
    """How the neighbours were found, with the measured recall of the approximate part."""
    search = entry.get("search")
    if not search:
        return "exact search"
    text = f"{search['exact_groups']} groups searched exactly"
    if search["faiss_groups"]:
        text += (f", {search['faiss_groups']} with FAISS {search['index']} ({search['faiss_items']} items): "
                 f"recall@{entry['k']} {search['recall_at_k']:.4f} against exact search on {search['recall_queries']}"
                 f" queries")
    return text


def run_inspect(args) -> int:
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
        if dataset.index.get("neighbors"):
            print(f"neighbours {describe_search(dataset.index['neighbors'])}")
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
        validate_dataset(dataset, checksums=not args.no_checksums)
    except DataError as err:
        print(f"INVALID: {err}", file=sys.stderr)
        return 1
    print("valid")
    return 0


def build_parser() -> OneLineParser:
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
    p = sub.add_parser("neighbors", help="same-class k-nearest neighbours (exact, or FAISS for large groups), "
                                          "written into the dataset")
    p.add_argument("dataset")
    p.add_argument("--split", default="train")
    p.add_argument("--k", type=positive_int, default=8)
    p.add_argument("--chunk", type=positive_int, default=4096, help="rows per distance block")
    p.add_argument("--exact-max", type=positive_int, default=EXACT_MAX,
                   help="groups up to this many items are searched exactly, larger ones with FAISS")
    p.add_argument("--recall-sample", type=positive_int, default=1000,
                   help="queries on which FAISS's recall@k is measured against exact search")
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
    world = _world(args)
    args.rank, args.world_size, args.device = world.rank, world.size, world.device
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
    except Exception as err:  # noqa: BLE001 - report_error raises what is no user error again
        return report_error(err)
    finally:
        cleanup()


if __name__ == "__main__":
    from pafm.distributed import exit_process

    exit_process(main())
