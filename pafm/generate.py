"""Samples from a trained model: the condition of each sample, generation, decoding to images, labelled grids.

    conditions = Conditions(model, meta, order="random", seed=0)      # class ids or captions, per sample index
    x, labels, nfe = generate(model, flow_path, conditions, range(64), latent_shape(model, meta), cfg, seed, device)
    save_grid(Decoder(dataset_info(meta), device)(x), labels, "grid.png")

Used by the sample and eval command-line tools and by the trainer's preview grids.
"""
from __future__ import annotations

import hashlib
import math
import textwrap
from pathlib import Path

import numpy as np
import torch

from pafm.data import DataError, LatentNormalization, has_split, open_dataset, text_embedder_from_info
from pafm.distributed import pick_device
from pafm.export import dataset_info, load_weights, model_from_meta
from pafm.metrics import to_uint8
from pafm.paths import build_path
from pafm.sampling import SamplerConfig, guided_velocity, sample

NOISE_STREAM, SDE_STREAM, CONDITION_STREAM = 0, 1, 2  # the random streams of a chunk of samples


def latent_shape(model, meta: dict) -> tuple[int, int, int]:
    """(C, H, W) of the model's input: the dataset's latent_shape, else the model's input_size / in_channels."""
    info = dataset_info(meta)
    if "latent_shape" in info:
        return tuple(int(s) for s in info["latent_shape"])
    kwargs = model.config.get("kwargs", {})
    size = kwargs.get("input_size", 32)
    return int(kwargs.get("in_channels", 4)), int(size), int(size)


def check_guided_channels(channels: int | None, meta: dict, name: str) -> None:
    """Refuse guiding more channels (`name`: the option that set them) than the export's latents have."""
    shape = dataset_info(meta).get("latent_shape")
    if channels is not None and shape and channels > int(shape[0]):
        raise ValueError(f"{name}={channels}: must be <= {int(shape[0])}, the model's latent channels")


def num_classes(model) -> int:
    n = getattr(model, "num_classes", None) or model.config.get("kwargs", {}).get("num_classes")
    if n is None:
        raise ValueError(f"{model.config.get('name')}: class-conditional model without num_classes")
    return int(n)


def stream_seed(seed: int, key: int, stream: int) -> int:
    """A 63-bit seed for random stream `stream` of chunk `key` under `seed`; hashed, so neighbouring seeds and keys
    give unrelated streams."""
    digest = hashlib.sha256(f"pafm:{int(seed)}:{int(key)}:{int(stream)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def stream_generator(seed: int, key: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, key, stream))


def caption_dataset(spec: str):
    """(dataset, split) whose captions condition a text model without prompts: the held-out split, else the train
    split (data made by `pafm.prep captions` has only a train split)."""
    split = "heldout" if has_split(spec, "heldout") else "train"
    try:
        dataset = open_dataset(spec, split)
    except DataError as err:
        raise DataError(f"text model without prompts: its captions come from its dataset {spec}, which cannot be "
                        f"opened here ({err}); or pass prompts (--prompt)") from None
    if not dataset.index.get("captions") or len(dataset) == 0:
        raise DataError(f"{dataset.folder} stores no captions to condition a text model on; pass prompts (--prompt)")
    return dataset, split


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
        self.info, self.spec = dataset_info(meta), (meta.get("data") or {}).get("spec")
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
            self.embedder = text_embedder_from_info(self.info)
            if prompts:
                self.prompts = [str(p) for p in prompts]
                self.count = len(self.prompts)
            else:
                if self.spec is None:
                    raise ValueError("text model: give prompts, or an export whose meta names its dataset spec")
                self.dataset, self.caption_split = caption_dataset(str(self.spec))
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
        gen = stream_generator(self.seed, key, CONDITION_STREAM)
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
    """Normalised latents -> images in [-1, 1]: undo the dataset's normalisation, then its encoder (identity, or a
    local diffusers AutoencoderKL folder)."""

    def __init__(self, info: dict, device, batch_size: int = 32):
        self.normalization = LatentNormalization(info, device)
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
        latent = self.normalization.denormalize(x)
        if self.vae is None:
            return latent
        dtype = next(self.vae.parameters()).dtype
        parts = [self.vae.decode(chunk.to(dtype)).sample.float() for chunk in latent.split(self.batch_size)]
        return torch.cat(parts)


def generate(model, flow_path, conditions: Conditions, indices, shape, cfg: SamplerConfig, seed: int, device,
             key=None):
    """Samples for global sample `indices`: (normalised latents float32, labels, number of model evaluations).

    The initial noise, the SDE noise and random conditions come from CPU generators seeded by (seed, key), key being
    the chunk's number (default: the first index), so a chunk of samples is the same whatever the device, the number
    of ranks and the order chunks are drawn in.
    """
    key = int(indices[0]) if key is None else int(key)
    noise = torch.randn(len(indices), *shape, generator=stream_generator(seed, key, NOISE_STREAM))
    cond, names = conditions(indices, device, key=key)
    fn = guided_velocity(model, cond, cfg.cfg_scale, tuple(cfg.cfg_interval), cfg.precision, cfg.cfg_channels)
    sde_gen = stream_generator(seed, key, SDE_STREAM)  # CPU: the same noise on every device
    x, nfe = sample(fn, noise.to(device), flow_path, cfg, generator=sde_gen)
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


class PreviewGrid:
    """The trainer's preview: one model (rebuilt from an export's `meta` once, kept on the CPU between grids), its
    decoder (the VAE, loaded once) and its conditions (the text embedder, loaded once), reused by every grid of the
    run; `save(state_dict, out)` loads the weights onto the device and saves a grid.

    Class models: one sample per class up to 64 classes, else 32 classes spread over the label range.  Text models:
    one sample per prompt of `prompts` when given, else 16 captions of the dataset's held-out split, or of its train
    split where it has none.  Heun with `steps` steps, CFG scale `cfg_scale`, fixed `seed`.
    """

    def __init__(self, meta: dict, steps: int = 32, cfg_scale: float = 1.0, seed: int = 0,
                 prompts: list[str] | None = None, num: int | None = None, device=None):
        self.device = pick_device("auto") if device is None else torch.device(device)
        self.meta, self.seed = meta, seed
        self.model = model_from_meta(meta, "the training grid").eval().requires_grad_(False)  # on the CPU between grids
        labels = None
        if self.model.cond_kind == "class":
            n_cls = num_classes(self.model)
            num = num or (n_cls if n_cls <= 64 else 32)
            labels = [i * n_cls // num for i in range(num)] if num < n_cls else None
        self.num = num or (len(prompts) if prompts else 16)
        self.conditions = Conditions(self.model, meta, labels=labels, prompts=prompts)
        self.sampler = SamplerConfig(method="heun", steps=steps, cfg_scale=cfg_scale)
        self.flow_path = build_path(meta.get("path", "linear"))
        self.decoder = Decoder(dataset_info(meta), self.device)

    def save(self, state_dict: dict, out) -> Path:
        try:
            load_weights(self.model, state_dict, self.device, "the training grid")
            x, names, _ = generate(self.model, self.flow_path, self.conditions, list(range(self.num)),
                                   latent_shape(self.model, self.meta), self.sampler, self.seed, self.device)
        finally:
            self.model.to("cpu")  # training never holds a second full model on the GPU
        images = self.decoder(x)
        return save_grid(images, names, out, cols=min(self.num, 10 if self.num <= 20 else 8))
