"""Draw samples from an EMA export and save a labelled PNG grid.

    python -m pafm.sample RUN_OR_EXPORT --num 64 --cfg 4.0 --out grid.png
    python -m pafm.sample RUN --num 16 --labels 3,seven --method sde --steps 250 --out sevens.png
    python -m pafm.sample RUN --prompt "a handwritten seven" --prompt "the digit 2, written thin" --out text.png

The helpers here (conditions, decoding, `generate`, and the error plumbing of the command-line tools) are shared with
`pafm.eval` and `pafm.prep`.  Every user error of these tools is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pafm.export import ExportError, export_staleness, load_export, read_export_meta, resolve_export
from pafm.metrics import to_uint8
from pafm.paths import build_path
from pafm.sampling import SamplerConfig, guided_velocity, sample

# ------------------------------------------------------------------------------------------------ command-line errors

# ConfigError, DataError, ExportError and MetricError are ValueErrors; OSError covers missing or unwritable files.
USER_ERRORS = (ValueError, OSError)


class SharedError(ValueError):
    """A user error that every rank raises together: rank 0 alone reports it, so torchrun shows it once."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit code 2, like every other error of the tools."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def one_line(err) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 1000 else text[:997] + "..."


def report_error(err) -> int:
    """Print `err` as one line on stderr (a SharedError on rank 0 only); returns the exit code 2."""
    if not isinstance(err, SharedError) or int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
    return 2


def all_ranks_agree(fn, *args):
    """`fn(*args)` on every rank; when a user error occurs on any rank, every rank raises it (the lowest rank's
    message, as a SharedError), so rank 0 reports it even where it alone did not see it.  Without a process group
    the error is re-raised as is."""
    result, error = None, None
    try:
        result = fn(*args)
    except USER_ERRORS as err:
        error = err
    if dist.is_initialized() and dist.get_world_size() > 1:
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, None if error is None else one_line(error))
        first = next((m for m in messages if m is not None), None)
        if first is not None:
            raise SharedError(first) from None
    elif error is not None:
        raise error
    return result


def parse_args(parser: argparse.ArgumentParser, argv):
    """(namespace, None), or (None, exit code) where argparse stopped (an error: 2, --help: 0)."""
    try:
        return parser.parse_args(argv), None
    except SystemExit as stop:
        return None, stop.code if isinstance(stop.code, int) else 2


# ------------------------------------------------------------------------------------------------ conditions


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but no CUDA device is visible")
    return device


def latent_shape(model, meta: dict) -> tuple[int, int, int]:
    """(C, H, W) of the model's input: the dataset's latent_shape, else the model's input_size / in_channels."""
    info = (meta.get("data") or {}).get("info") or {}
    if "latent_shape" in info:
        return tuple(int(s) for s in info["latent_shape"])
    kwargs = model.config.get("kwargs", {})
    size = kwargs.get("input_size", 32)
    return int(kwargs.get("in_channels", 4)), int(size), int(size)


def num_classes(model) -> int:
    n = getattr(model, "num_classes", None) or model.config.get("kwargs", {}).get("num_classes")
    if n is None:
        raise ValueError(f"{model.config.get('name')}: class-conditional model without num_classes")
    return int(n)


def stream_seed(seed: int, key: int, stream: int) -> int:
    """A 63-bit seed for random stream `stream` of chunk `key` under `seed` (0: initial noise, 1: SDE noise,
    2: conditions); hashed, so neighbouring seeds and keys give unrelated streams."""
    digest = hashlib.sha256(f"pafm:{int(seed)}:{int(key)}:{int(stream)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


CONDITION_STREAM = 2


def has_split(spec: str, split: str) -> bool:
    """Whether the dataset `spec` has `split` (a SPLIT/ subfolder, or a root index.json recording that split)."""
    from pafm.data.shards import INDEX

    if spec.startswith("builtin:"):
        from pafm.data.digits import SPLITS

        return split in SPLITS
    folder = Path(spec).expanduser()
    if (folder / split / INDEX).is_file():
        return True
    try:
        return json.loads((folder / INDEX).read_text()).get("split", "train") == split
    except (OSError, ValueError, AttributeError):
        return False


def caption_dataset(spec: str):
    """(dataset, split) whose captions condition a text model without prompts: the held-out split, else the train
    split (data made by `pafm.prep captions` has only a train split)."""
    from pafm.data import DataError, open_dataset

    split = "heldout" if has_split(spec, "heldout") else "train"
    try:
        dataset = open_dataset(spec, split)
    except DataError as err:
        raise DataError(f"text model without prompts: its captions come from its dataset {spec}, which cannot be "
                        f"opened here ({err}); or pass prompts (--prompt)") from None
    if not dataset.index.get("captions") or len(dataset) == 0:
        raise DataError(f"{dataset.folder} stores no captions to condition a text model on; pass prompts (--prompt)")
    return dataset, split


def _text_embedder(info: dict):
    from pafm.data import text_embedder_from_info

    spec = info.get("text_encoder") or {}
    for key in ("path", "pooled_path"):  # transformers would take a missing folder for a hub name and download
        if spec.get("kind") == "transformers" and spec.get(key) and not Path(spec[key]).is_dir():
            raise ValueError(f"the dataset's text encoder folder {spec[key]} (info['text_encoder'][{key!r}]) does not "
                             f"exist on this machine; copy the transformers folder there")
    return text_embedder_from_info(info)


class Conditions:
    """The condition of each sample: a class id, or a caption (the prompts given, else the dataset's captions: its
    held-out split, or its train split where it has none).

    order "balanced": sample i gets item i % number of items (every class in turn; captions in dataset order).
    order "random": the items of a chunk are drawn i.i.d. uniformly (with replacement) by a generator seeded by
    (seed, chunk key), as DiT's and SiT's sample_ddp.py draw labels with torch.randint.
    """

    def __init__(self, model, meta: dict, labels: list[int] | None = None, prompts: list[str] | None = None,
                 order: str = "balanced", seed: int = 0):
        if order not in ("balanced", "random"):
            raise ValueError(f"condition order must be 'balanced' or 'random', got {order!r}")
        self.kind, self.order, self.seed = model.cond_kind, order, int(seed)
        self.caption_labels = False  # whether the text dataset has a class per caption (digits-captions)
        self.prompts, self.dataset, self.caption_split = None, None, None
        data = meta.get("data") or {}
        self.info, self.spec = data.get("info") or {}, data.get("spec")
        name = (getattr(model, "config", None) or {}).get("name", type(model).__name__)
        if self.kind == "class":
            if prompts:
                raise ValueError(f"prompts were given, but {name} is a class-conditional model: pass class ids "
                                 f"(--labels) instead")
            n = num_classes(model)
            self.labels = list(labels) if labels else list(range(n))
            bad = [c for c in self.labels if not 0 <= c < n]
            if bad:
                raise ValueError(f"class labels of {name} must be in [0, {n}), got {bad}")
            self.names = self.info.get("class_names") or [str(c) for c in range(n)]
            self.count = len(self.labels)
        elif self.kind == "text":
            if labels:
                raise ValueError(f"class labels were given, but {name} is a text model: pass prompts (--prompt)")
            self.embedder = _text_embedder(self.info)
            if prompts:
                self.prompts = [str(p) for p in prompts]
                self.count = len(self.prompts)
            else:
                if "spec" not in data:
                    raise ValueError("text model: give prompts, or an export whose meta names its dataset spec")
                self.dataset, self.caption_split = caption_dataset(str(data["spec"]))
                self.count = len(self.dataset)
                self.caption_labels = "label" in self.dataset.index.get("tensors", {})
        else:
            raise ValueError(f"unknown model.cond_kind {self.kind!r}")

    def picks(self, indices, key=None) -> np.ndarray:
        """Positions into the items (classes or captions) for global sample `indices`; `key` names the chunk whose
        generator draws random picks (default: the first index)."""
        indices = np.asarray([int(i) for i in indices], dtype=np.int64)
        if self.order == "balanced":
            return indices % self.count
        key = int(indices[0]) if key is None else int(key)
        gen = torch.Generator().manual_seed(stream_seed(self.seed, key, CONDITION_STREAM))
        return torch.randint(0, self.count, (len(indices),), generator=gen).numpy()

    def captions(self, picks) -> list[str]:
        if self.prompts is not None:
            return [self.prompts[int(p)] for p in picks]
        return self.dataset.captions(np.asarray(picks, dtype=np.int64))

    def __call__(self, indices, device, key=None):
        """(cond for the model, list of human-readable labels) for global sample indices."""
        picks = self.picks(indices, key)
        if self.kind == "class":
            labels = [self.labels[int(p)] for p in picks]
            return torch.tensor(labels, device=device), [self.names[c] for c in labels]
        captions = self.captions(picks)
        tokens, mask, pooled = self.embedder.embed(captions)
        cond = {"tokens": tokens.to(device), "mask": mask.to(device), "pooled": pooled.to(device)}
        return cond, captions

    def class_ids(self, indices, key=None) -> np.ndarray:
        """Intended class of each sample (text models: the caption's class where known, else -1)."""
        picks = self.picks(indices, key)
        if self.kind == "class":
            return np.array([self.labels[int(p)] for p in picks], dtype=np.int64)
        if not self.caption_labels:
            return np.full(len(picks), -1, dtype=np.int64)
        return self.dataset.gather("label", picks).numpy().astype(np.int64)

    def describe(self) -> dict:
        """What conditions the samples, for reports."""
        if self.kind == "class":
            what = f"{self.count} classes"
        elif self.prompts is not None:
            what = f"{self.count} prompts"
        else:
            what = f"{self.count} captions of the {self.caption_split} split of {self.spec}"
            if self.caption_split != "heldout":
                what += " (the dataset has no heldout split)"
        return {"kind": self.kind, "order": self.order, "items": what}


class Decoder:
    """Normalised latents -> images in [-1, 1]: undo (latent - shift) * scale, then the dataset's encoder (identity,
    or a local diffusers AutoencoderKL folder)."""

    def __init__(self, info: dict, device, batch_size: int = 32):
        norm = info.get("normalization") or {}
        self.shift = torch.tensor(norm.get("shift", [0.0]), dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
        self.scale = torch.tensor(norm.get("scale", [1.0]), dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
        encoder = info.get("encoder") or {"kind": "identity"}
        self.vae = None
        if encoder.get("kind") == "vae":
            from diffusers import AutoencoderKL

            path = encoder.get("path")
            if not path or not Path(path).is_dir():
                raise ValueError(f"the dataset's VAE folder {path!r} does not exist on this machine; copy the "
                                 f"diffusers AutoencoderKL folder there (info['encoder']['path'])")
            self.vae = AutoencoderKL.from_pretrained(path, local_files_only=True).to(device).eval()
        elif encoder.get("kind") != "identity":
            raise ValueError(f"unknown encoder kind {encoder.get('kind')!r} in dataset info (identity or vae)")
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        latent = x.float() / self.scale + self.shift
        if self.vae is None:
            return latent
        dtype = next(self.vae.parameters()).dtype
        parts = [self.vae.decode(chunk.to(dtype)).sample.float() for chunk in latent.split(self.batch_size)]
        return torch.cat(parts)


def generate(model, path, conditions: Conditions, indices, shape, cfg: SamplerConfig, seed: int, device, key=None):
    """Samples for global sample `indices`: (normalised latents float32, labels, number of model evaluations).

    The initial noise, the SDE noise and random conditions come from CPU generators seeded by (seed, key), key being
    the chunk's number (default: the first index), so a chunk of samples is the same whatever the device, the number
    of ranks and the order chunks are drawn in.
    """
    key = int(indices[0]) if key is None else int(key)
    noise = torch.randn(len(indices), *shape, generator=torch.Generator().manual_seed(stream_seed(seed, key, 0)))
    cond, names = conditions(indices, device, key=key)
    fn = guided_velocity(model, cond, cfg.cfg_scale, tuple(cfg.cfg_interval), cfg.precision)
    sde_gen = torch.Generator().manual_seed(stream_seed(seed, key, 1))  # CPU: the same noise on every device
    x, nfe = sample(fn, noise.to(device), path, cfg, generator=sde_gen)
    return x, names, nfe


def save_grid(images: torch.Tensor, labels: list[str], out, cols: int | None = None, tile: int = 96) -> Path:
    """A PNG grid of images (B, C, H, W) in [-1, 1], each with its label written below it."""
    from PIL import Image, ImageDraw

    images = to_uint8(images.cpu())
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    b, _, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    factor = max(1, tile // max(h, w))  # tiny images (digits) are enlarged with nearest-neighbour pixels
    th, tw = h * factor, w * factor
    chars = max(8, tw // 6)
    lines = max(len(textwrap.wrap(label, chars)[:3]) for label in labels) if labels else 0
    label_h = 12 * lines + 4
    canvas = Image.new("RGB", (cols * (tw + 4), rows * (th + label_h + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(b):
        r, c = divmod(i, cols)
        x0, y0 = c * (tw + 4) + 2, r * (th + label_h + 4) + 2
        tile_img = Image.fromarray(images[i].permute(1, 2, 0).numpy()).resize((tw, th), Image.NEAREST)
        canvas.paste(tile_img, (x0, y0))
        for j, line in enumerate(textwrap.wrap(labels[i], chars)[:3]):
            draw.text((x0, y0 + th + 2 + 12 * j), line, fill="black")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def save_training_grid(state_dict: dict, meta: dict, out, steps: int = 32, cfg_scale: float = 1.0, seed: int = 0,
                       prompts: list[str] | None = None, num: int | None = None, device=None) -> Path:
    """The trainer's preview: rebuild the model from an export's `meta`, load `state_dict`, save a labelled grid.

    Class models: one sample per class up to 64 classes, else 32 classes spread over the label range.  Text models:
    one sample per prompt of `prompts` when given, else 16 captions of the dataset's held-out split, or of its train
    split where it has none.  Heun with `steps` steps, CFG scale `cfg_scale`, fixed `seed`.
    """
    from pafm.models import build_model

    device = pick_device("auto") if device is None else torch.device(device)
    model = build_model(meta["model"]["name"], **meta["model"].get("kwargs", {}))
    model.load_state_dict(state_dict, strict=True)
    model = model.to(device).eval().requires_grad_(False)
    labels = None
    if model.cond_kind == "class":
        n_cls = num_classes(model)
        num = num or (n_cls if n_cls <= 64 else 32)
        labels = [i * n_cls // num for i in range(num)] if num < n_cls else None
    num = num or (len(prompts) if prompts else 16)
    conditions = Conditions(model, meta, labels=labels, prompts=prompts)
    cfg = SamplerConfig(method="heun", steps=steps, cfg_scale=cfg_scale)
    path = build_path(meta.get("path", "linear"))
    x, names, _ = generate(model, path, conditions, list(range(num)), latent_shape(model, meta), cfg, seed, device)
    images = Decoder((meta.get("data") or {}).get("info") or {}, device)(x)
    return save_grid(images, names, out, cols=min(num, 10 if num <= 20 else 8))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m pafm.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="run folder (uses RUN/ema.safetensors) or an export .safetensors file")
    p.add_argument("--num", type=positive_int, default=64, help="number of samples")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                   help="guidance interval in t (noise at 0, data at 1)")
    p.add_argument("--method", choices=["euler", "heun", "dopri5", "sde"], default="heun")
    p.add_argument("--steps", type=positive_int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", default=None, help="comma-separated class ids or names to cycle through (default: all)")
    p.add_argument("--prompt", action="append", default=None, help="caption for a text model (repeatable)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--cols", type=positive_int, default=None)
    p.add_argument("--out", default="grid.png")
    return p


def parse_labels(text: str | None, meta: dict, model) -> list[int] | None:
    """--labels "3,seven" -> [3, 7]: class ids, or class names of the export's dataset, checked against `model`."""
    if not text:
        return None
    if model.cond_kind != "class":
        raise ValueError(f"--labels: {model.config['name']} is a text model: pass prompts (--prompt) instead")
    names = ((meta.get("data") or {}).get("info") or {}).get("class_names") or []
    labels = []
    for item in (s.strip() for s in text.split(",")):
        if item.lstrip("-").isdigit():
            labels.append(int(item))
        elif item in names:
            labels.append(names.index(item))
        else:
            known = f"; names: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}" if names else ""
            raise ValueError(f"--labels: {item!r} is neither a class id nor a class name{known}")
    n = num_classes(model)
    bad = [c for c in labels if not 0 <= c < n]
    if bad:
        raise ValueError(f"--labels: class {bad[0]} is outside [0, {n}) ({model.config['name']} has {n} classes)")
    return labels


def model_skeleton(meta: dict, where):
    """The export's model on the meta device (no memory, no weights): enough to check conditions before loading."""
    from pafm.models import build_model

    config = meta.get("model") or {}
    if not isinstance(config, dict) or "name" not in config:
        raise ExportError(f"{where}: meta has no model config ({{'name', 'kwargs'}})")
    try:
        with torch.device("meta"):
            return build_model(config["name"], **config.get("kwargs", {}))
    except (ValueError, TypeError) as err:
        raise ExportError(f"{where}: cannot rebuild its model: {err}") from None


def check_out_path(out) -> Path:
    """The grid's output file, refused up front when PIL cannot write its format."""
    from PIL import Image

    out = Path(out)
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"--out {out}: PIL cannot write {out.suffix or 'files without an extension'}; use .png")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / 'grid.png'}")
    return out


def run_sample(args) -> Path:
    """Every check first (export, conditions, decoder, output path), then the weights, then sampling."""
    lo, hi = args.interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"--interval must satisfy 0 <= LO <= HI <= 1, got {lo:g} {hi:g}")
    out = check_out_path(args.out)
    export = resolve_export(args.checkpoint)
    meta = read_export_meta(export)
    cfg = SamplerConfig(method=args.method, steps=args.steps, cfg_scale=args.cfg, cfg_interval=(lo, hi),
                        precision=args.precision)
    device = pick_device(args.device)
    skeleton = model_skeleton(meta, export)
    conditions = Conditions(skeleton, meta, labels=parse_labels(args.labels, meta, skeleton), prompts=args.prompt)
    decoder = Decoder((meta.get("data") or {}).get("info") or {}, device)
    warning = export_staleness(export)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    model, meta = load_export(export, device=device)
    path = build_path(meta.get("path", "linear"))
    x, names, nfe = generate(model, path, conditions, list(range(args.num)), latent_shape(model, meta), cfg,
                             args.seed, device)
    out = save_grid(decoder(x), names, out, cols=args.cols)
    print(f"wrote {out}: {args.num} samples, {cfg.describe()}, cfg {args.cfg:g} in {(lo, hi)}, "
          f"{nfe} model evaluations, step {meta.get('step')}")
    return out


def main(argv=None) -> int:
    """Exit code: 0 when the grid was written, 2 for a user error (one line on stderr)."""
    args, code = parse_args(build_parser(), argv)
    if args is None:
        return code
    try:
        run_sample(args)
    except USER_ERRORS as err:
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
