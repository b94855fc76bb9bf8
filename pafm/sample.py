"""Draw samples from an EMA export and save a labelled PNG grid.

    python -m pafm.sample RUN_OR_EXPORT --num 64 --cfg 4.0 --out grid.png
    python -m pafm.sample RUN --num 16 --labels 3,seven --method sde --steps 250 --out sevens.png
    python -m pafm.sample RUN --prompt "a handwritten seven" --prompt "the digit 2, written thin" --out text.png

Every user error is one line on stderr and exit code 2.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from pafm.cli import OneLineParser, checked, parse_args, positive_int, report_error
from pafm.config import within
from pafm.distributed import pick_device
from pafm.export import dataset_info, export_staleness, load_export, model_skeleton, read_export_meta, resolve_export
from pafm.generate import Conditions, Decoder, check_guided_channels, generate, latent_shape, num_classes, save_grid
from pafm.models.interop import is_torch_checkpoint
from pafm.paths import build_path
from pafm.sampling import GUIDANCE_SCALE, MAX_STEPS, SamplerConfig


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m pafm.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="run folder (uses RUN/ema.safetensors) or an export .safetensors file")
    p.add_argument("--num", type=positive_int, default=64, help="number of samples")
    p.add_argument("--cfg", type=checked(float, GUIDANCE_SCALE), default=1.0,
                   help="classifier-free guidance scale (1 = none)")
    p.add_argument("--interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                   help="guidance interval in t (noise at 0, data at 1)")
    p.add_argument("--cfg-channels", type=positive_int, default=None,
                   help="guide only the first N latent channels (3: as SiT's code does; default: all)")
    p.add_argument("--method", choices=["euler", "heun", "dopri5", "sde"], default="heun")
    p.add_argument("--steps", type=checked(int, within(1, MAX_STEPS)), default=50)
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
    names = dataset_info(meta).get("class_names") or []
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


def check_out_path(out) -> Path:
    """The grid's output file, refused up front when PIL cannot write its format or the file cannot be made there
    (its folder, made when missing, would sit below a file or in a folder this user cannot write)."""
    from PIL import Image

    out = Path(out)
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"--out {out}: PIL cannot write {out.suffix or 'files without an extension'}; use .png")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / 'grid.png'}")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if existing != out and not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | (0 if existing == out else os.X_OK)):
        raise ValueError(f"--out {out}: {existing} is not writable")
    return out


def run_sample(args) -> Path:
    """Every check first (export, conditions, decoder, output path), then the weights, then sampling."""
    lo, hi = args.interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"--interval must satisfy 0 <= LO <= HI <= 1, got {lo:g} {hi:g}")
    out = check_out_path(args.out)
    if is_torch_checkpoint(args.checkpoint):
        raise ValueError(f"{args.checkpoint} is a torch checkpoint (SiT's or REPA's format): import it first with "
                         f"python -m pafm.models.interop import {args.checkpoint} OUT.safetensors --vae VAE_FOLDER")
    export_path = resolve_export(args.checkpoint)
    meta = read_export_meta(export_path)
    check_guided_channels(args.cfg_channels, meta, "--cfg-channels")
    cfg = SamplerConfig(method=args.method, steps=args.steps, cfg_scale=args.cfg, cfg_interval=(lo, hi),
                        cfg_channels=args.cfg_channels, precision=args.precision)
    device = pick_device(args.device)
    skeleton = model_skeleton(meta, export_path)
    conditions = Conditions(skeleton, meta, labels=parse_labels(args.labels, meta, skeleton), prompts=args.prompt)
    decoder = Decoder(dataset_info(meta), device)
    warning = export_staleness(export_path)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    model, meta = load_export(export_path, device=device)
    flow_path = build_path(meta.get("path", "linear"))
    x, names, nfe = generate(model, flow_path, conditions, list(range(args.num)), latent_shape(model, meta), cfg,
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
    except Exception as err:  # noqa: BLE001 - report_error raises what is no user error again
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
