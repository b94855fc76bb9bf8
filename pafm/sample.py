"""Draw samples from an EMA export and save a labelled PNG grid.

    python -m pafm.sample RUN_OR_CKPT --num 64 --cfg 4.0 --out grid.png
    python -m pafm.sample RUN --num 16 --labels 3,7 --method sde --steps 250 --out sevens.png
    python -m pafm.sample RUN --prompt "a handwritten seven" --prompt "the digit 2, written thin" --out text.png

The helpers here (conditions, decoding, `generate`) are shared with `pafm.eval`.
"""
from __future__ import annotations

import argparse
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from pafm.export import load_export
from pafm.metrics import to_uint8
from pafm.paths import build_path
from pafm.sampling import SamplerConfig, guided_velocity, sample


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


class Conditions:
    """Conditions for sample indices: class i % num_classes, or the caption of held-out item i % len(held-out)."""

    def __init__(self, model, meta: dict, labels: list[int] | None = None, prompts: list[str] | None = None):
        self.kind = model.cond_kind
        self.caption_labels = None  # class of each held-out caption, where the text dataset has labels
        data = meta.get("data") or {}
        self.info = data.get("info") or {}
        if self.kind == "class":
            n = num_classes(model)
            self.labels = list(labels) if labels else list(range(n))
            bad = [c for c in self.labels if not 0 <= c < n]
            if bad:
                raise ValueError(f"class labels must be in [0, {n}), got {bad}")
            self.names = self.info.get("class_names") or [str(c) for c in range(n)]
        elif self.kind == "text":
            from pafm.data import text_embedder_from_info

            self.embedder = text_embedder_from_info(self.info)
            if not prompts:
                if "spec" not in data:
                    raise ValueError("text model: give prompts, or an export whose meta names its dataset spec")
                from pafm.data import open_dataset

                heldout = open_dataset(data["spec"], "heldout")
                ids = np.arange(len(heldout))
                prompts = heldout.captions(ids)
                if "label" in heldout.index.get("tensors", {}):  # captioned class data (digits-captions)
                    self.caption_labels = heldout.gather("label", ids).numpy().astype(np.int64)
            self.prompts = list(prompts)
        else:
            raise ValueError(f"unknown model.cond_kind {self.kind!r}")

    def __call__(self, indices, device):
        """(cond for the model, list of human-readable labels) for global sample indices."""
        indices = [int(i) for i in indices]
        if self.kind == "class":
            labels = [self.labels[i % len(self.labels)] for i in indices]
            return torch.tensor(labels, device=device), [self.names[c] for c in labels]
        captions = [self.prompts[i % len(self.prompts)] for i in indices]
        tokens, mask, pooled = self.embedder.embed(captions)
        cond = {"tokens": tokens.to(device), "mask": mask.to(device), "pooled": pooled.to(device)}
        return cond, captions

    def class_ids(self, indices) -> np.ndarray:
        """Intended class of each sample (text models: the caption's class where known, else -1)."""
        if self.kind != "class":
            if self.caption_labels is None:
                return np.full(len(indices), -1, dtype=np.int64)
            return np.array([self.caption_labels[int(i) % len(self.prompts)] for i in indices], dtype=np.int64)
        return np.array([self.labels[int(i) % len(self.labels)] for i in indices], dtype=np.int64)


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


def generate(model, path, conditions: Conditions, indices, shape, cfg: SamplerConfig, seed: int, device):
    """Samples for global sample `indices`: (normalised latents float32, labels, number of model evaluations).

    The initial noise and the SDE noise come from a CPU generator seeded by (seed, first index), so a chunk of samples
    is the same whatever the device, the number of ranks and the order chunks are drawn in.
    """
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(indices[0]))
    noise = torch.randn(len(indices), *shape, generator=gen)
    cond, names = conditions(indices, device)
    fn = guided_velocity(model, cond, cfg.cfg_scale, tuple(cfg.cfg_interval), cfg.precision)
    sde_gen = torch.Generator().manual_seed(int(gen.initial_seed()) + 1)  # CPU: the same noise on every device
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
                       num: int | None = None, device=None) -> Path:
    """The trainer's preview: rebuild the model from an export's `meta`, load `state_dict`, save a labelled grid.

    Class models: one sample per class up to 64 classes, else 32 classes spread over the label range.  Text models:
    16 held-out captions.  Heun with `steps` steps, CFG scale `cfg_scale`, fixed `seed`.
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
    num = num or 16
    conditions = Conditions(model, meta, labels=labels)
    cfg = SamplerConfig(method="heun", steps=steps, cfg_scale=cfg_scale)
    path = build_path(meta.get("path", "linear"))
    x, names, _ = generate(model, path, conditions, list(range(num)), latent_shape(model, meta), cfg, seed, device)
    images = Decoder((meta.get("data") or {}).get("info") or {}, device)(x)
    return save_grid(images, names, out, cols=min(num, 10 if num <= 20 else 8))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pafm.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="run folder (uses RUN/ema.safetensors) or an export .safetensors file")
    p.add_argument("--num", type=int, default=64, help="number of samples")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                   help="guidance interval in t (noise at 0, data at 1)")
    p.add_argument("--method", choices=["euler", "heun", "dopri5", "sde"], default="heun")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", default=None, help="comma-separated class ids to cycle through (default: all)")
    p.add_argument("--prompt", action="append", default=None, help="caption for a text model (repeatable)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--cols", type=int, default=None)
    p.add_argument("--out", default="grid.png")
    args = p.parse_args(argv)

    device = pick_device(args.device)
    model, meta = load_export(args.checkpoint, device=device)
    labels = [int(s) for s in args.labels.split(",")] if args.labels else None
    conditions = Conditions(model, meta, labels=labels, prompts=args.prompt)
    cfg = SamplerConfig(method=args.method, steps=args.steps, cfg_scale=args.cfg, cfg_interval=tuple(args.interval),
                        precision=args.precision)
    path = build_path(meta.get("path", "linear"))
    x, names, nfe = generate(model, path, conditions, list(range(args.num)), latent_shape(model, meta), cfg,
                             args.seed, device)
    images = Decoder((meta.get("data") or {}).get("info") or {}, device)(x)
    out = save_grid(images, names, args.out, cols=args.cols)
    print(f"wrote {out}: {args.num} samples, {cfg.describe()}, cfg {args.cfg:g} in {tuple(args.interval)}, "
          f"{nfe} model evaluations, step {meta.get('step')}")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
