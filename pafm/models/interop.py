"""SiT's and REPA's checkpoints in this project, and this project's SiT models in SiT's format.

    model, meta = import_checkpoint("SiT-XL-2-256x256.pt", vae="/weights/sd-vae-ft-ema")   # SiT or REPA: auto
    python -m pafm.models.interop import SiT-XL-2-256x256.pt sit_xl2.safetensors --vae /weights/sd-vae-ft-ema
    python -m pafm.models.interop export RUN sit_format.pt      # RUN's EMA as a state dict for SiT's sample.py

What differs between the formats:
- names: SiT's `adaLN_modulation` is `modulation` here, `y_embedder.embedding_table` is `y_embedder`; SiT stores its
  fixed sin-cos `pos_embed`, which this project computes on the fly (an import checks it is that embedding).
- SiT's 256-px release has the learned-sigma head: 2C output channels per pixel, the first C the velocity; the import
  keeps those (SiT's own forward drops the rest too). The export writes C channels (learn_sigma=False, which is what
  SiT's sample.py and sample_ddp.py build for a --ckpt).
- the null class is the last row of the label table in both (SiT's LabelEmbedder with class dropout).
- time: SiT embeds t in [0, 1] with data at t = 1, as this project does (time_scale 1). REPA trains with noise at
  t = 1 and a velocity towards the noise; its import is a model with reverse_time, which evaluates -net(x, 1 - t),
  so the samplers of this project run it unchanged. REPA's projector heads (`projectors.*`) only serve its training
  loss and are dropped.

Checkpoints are read with torch.load(weights_only=True) only. A checkpoint that does not fit is refused in one line
naming the first wrong key and its shape.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch

from pafm.cli import OneLineParser, parse_args, report_error
from pafm.export import load_export, save_export
from pafm.files import atomic_write

from .layers import sincos_pos_embed_2d
from .registry import _SIT_SIZES, build_model
from .sit import SiT

FORMATS = ("auto", "sit", "repa")
SD_VAE_SCALE = 0.18215  # SiT and REPA train on SD-VAE latents times this factor
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_POS_EMBED_ATOL = 1e-4  # SiT computes it in float64 and stores float32; this project computes it in float32
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


class InteropError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is imported into or exported from."""


def is_torch_checkpoint(path) -> bool:
    """Whether `path` names a torch.save file (SiT's and REPA's format) rather than this project's export."""
    return Path(path).suffix.lower() in TORCH_SUFFIXES


# --- names ----------------------------------------------------------------------------------------------------------
def to_sit_name(name: str) -> str:
    return name.replace(".modulation.", ".adaLN_modulation.").replace("y_embedder.weight",
                                                                         "y_embedder.embedding_table.weight")


def from_sit_name(name: str) -> str:
    return name.replace(".adaLN_modulation.", ".modulation.").replace("y_embedder.embedding_table.weight",
                                                                         "y_embedder.weight")


def _shape(t) -> str:
    return "(" + ", ".join(str(s) for s in t) + ")"


def sit_format_shapes(model: SiT, learn_sigma: bool = False) -> dict[str, tuple[int, ...]]:
    """The state dict shapes, in SiT's names and order, of `model` written in SiT's format (works on the meta
    device: no memory)."""
    grid = model.input_size // model.patch_size
    shapes = {"pos_embed": (1, grid * grid, model.hidden_size)}  # SiT's own parameter: first in its state dict
    for name, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        if learn_sigma and name.startswith("final_layer.linear."):
            shape = (2 * shape[0], *shape[1:])
        shapes[to_sit_name(name)] = shape
    return shapes


def _first_mismatch(state: dict, expected: dict) -> str | None:
    for key, tensor in state.items():
        if key not in expected:
            return f"unexpected key {key} {_shape(tensor.shape)}"
        if tuple(tensor.shape) != tuple(expected[key]):
            return f"{key} has shape {_shape(tensor.shape)}, expected {_shape(expected[key])}"
    missing = [k for k in expected if k not in state]
    return f"missing key {missing[0]} {_shape(expected[missing[0]])}" if missing else None


# --- reading --------------------------------------------------------------------------------------------------------
def read_torch_state_dict(path) -> dict[str, torch.Tensor]:
    """A state dict from a torch.save file, read with weights_only=True: a plain state dict (SiT's and REPA's
    releases), or a training checkpoint holding one under "ema" (their train.py; its argparse "args" are allowed)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InteropError(f"{path} does not exist (a SiT or REPA checkpoint .pt file)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError for a truncated zip, ...
        raise InteropError(f"{path} cannot be read with torch.load(weights_only=True): "
                           f"{' '.join(str(err).split())[:300]}") from None
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
        obj = obj["ema"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InteropError(f"{path} holds no state dict of tensors (a plain state dict, or one under 'ema')")
    # torch.compile / DDP prefixes from other training scripts
    prefix = next((p for p in ("module.", "_orig_mod.") if all(k.startswith(p) for k in obj)), "")
    return {k[len(prefix):]: v for k, v in obj.items()}


def detect_format(state: dict) -> str:
    """'repa' when the state dict holds REPA's projector heads (or its older decoder_blocks), else 'sit'."""
    return "repa" if any(k.startswith(("projectors.", "decoder_blocks.")) for k in state) else "sit"


def _undo_repa_legacy(state: dict) -> dict:
    """REPA's older checkpoints name the blocks after the projector depth `decoder_blocks.i`: they are blocks
    i + (number of encoder blocks)."""
    if not any(k.startswith("decoder_blocks.") for k in state):
        return state
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    out = {}
    for key, value in state.items():
        if key.startswith("decoder_blocks."):
            _, index, rest = key.split(".", 2)
            key = f"blocks.{int(index) + depth}.{rest}"
        out[key] = value
    return out


def infer_sit_config(state: dict, where="checkpoint") -> tuple[str, dict, bool]:
    """(registry name, build_model kwargs, learn_sigma) of a SiT-format state dict, from its shapes.

    The number of heads does not show in any shape: it is the named size's (SiT-S 6, B 12, L 16, XL 16)."""
    def need(key):
        if key not in state:
            raise InteropError(f"{where}: missing key {key}: not a SiT or REPA state dict")
        return state[key]

    proj = need("x_embedder.proj.weight")
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    size = next((s for s, (d, h, _) in _SIT_SIZES.items() if (d, h) == (depth, hidden) and s != "T"), None)
    if size is None or patch not in (2, 4, 8):
        raise InteropError(f"{where}: no SiT size has depth {depth}, hidden size {hidden} and patch {patch} "
                           f"(x_embedder.proj.weight {_shape(proj.shape)})")
    tokens = need("pos_embed").shape[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise InteropError(f"{where}: pos_embed {_shape(state['pos_embed'].shape)} is not a square grid of tokens")
    rows = need("y_embedder.embedding_table.weight").shape[0]
    mlp = need("blocks.0.mlp.fc1.weight").shape[0]
    out = need("final_layer.linear.weight").shape[0]
    learn_sigma = out == patch * patch * 2 * in_channels
    kwargs = {"input_size": grid * patch, "in_channels": in_channels, "num_classes": rows - 1,
              "mlp_ratio": mlp / hidden, "time_scale": 1.0}
    return f"SiT-{size}/{patch}", kwargs, learn_sigma


def sit_to_pafm_state_dict(state: dict, model: SiT, learn_sigma: bool, where="checkpoint") -> dict:
    """This project's state dict for `model` from a SiT-format one (after dropping REPA's projectors): names
    mapped, the learned-sigma half of the output dropped, pos_embed checked and dropped."""
    expected = sit_format_shapes(model, learn_sigma)
    problem = _first_mismatch(state, expected)
    if problem:
        raise InteropError(f"{where} does not fit {model.config['name']} "
                           f"({'with' if learn_sigma else 'without'} the learned-sigma head): {problem}")
    grid = model.input_size // model.patch_size
    pos = sincos_pos_embed_2d(grid, model.hidden_size, dtype=torch.float64)
    gap = (state["pos_embed"].double().reshape(pos.shape) - pos).abs().max().item()
    if not gap <= _POS_EMBED_ATOL:
        raise InteropError(f"{where}: pos_embed differs from the fixed 2D sin-cos embedding by {gap:.3g}: a model "
                           f"with another position embedding cannot be imported")
    c, pp = model.in_channels, model.patch_size ** 2
    out = {}
    for key, value in state.items():
        if key == "pos_embed":
            continue
        if learn_sigma and key.startswith("final_layer.linear."):
            # rows are laid out (p, p, 2C): keep the first C channels of each pixel, the velocity
            value = value.reshape(pp, 2 * c, *value.shape[1:])[:, :c].reshape(pp * c, *value.shape[1:])
        out[from_sit_name(key)] = value.float().contiguous()
    return out


def import_state_dict(state: dict, fmt: str = "auto", name: str | None = None, where="checkpoint"):
    """(model in eval mode on the CPU, format) from a SiT or REPA state dict; `name` overrides the inferred size."""
    if fmt not in FORMATS:
        raise InteropError(f"checkpoint format must be one of {list(FORMATS)}, got {fmt!r}")
    fmt = detect_format(state) if fmt == "auto" else fmt
    if fmt == "repa":
        state = {k: v for k, v in _undo_repa_legacy(state).items() if not k.startswith("projectors.")}
    inferred, kwargs, learn_sigma = infer_sit_config(state, where)
    try:
        with torch.device("meta"):
            model = build_model(name or inferred, **kwargs, reverse_time=fmt == "repa")
    except ValueError as err:
        raise InteropError(f"{where}: {err}") from None
    if not isinstance(model, SiT):
        raise InteropError(f"{where}: {name} is not a SiT model; SiT and REPA checkpoints hold SiT models")
    weights = sit_to_pafm_state_dict(state, model, learn_sigma, where)
    model.to_empty(device="cpu")
    model.load_state_dict(weights, strict=True)
    return model.eval().requires_grad_(False), fmt


def imported_meta(model: SiT, fmt: str, path, vae: str | None, latent_scale: float = SD_VAE_SCALE) -> dict:
    """The export meta of an imported checkpoint: SD-VAE latents scaled by `latent_scale` (SiT's and REPA's), the
    linear path, and where it came from."""
    c, size = model.in_channels, model.input_size
    info = {"kind": "class", "latent_shape": [c, size, size], "num_classes": model.num_classes,
            "normalization": {"shift": [0.0] * c, "scale": [float(latent_scale)] * c},
            "encoder": {"kind": "vae", "path": str(Path(vae).expanduser().resolve())} if vae else {"kind": "identity"}}
    return {"model": model.config, "data": {"spec": f"imported:{fmt}", "info": info}, "path": "linear",
            "step": None, "import": {"format": fmt, "file": str(Path(path).expanduser().resolve())}}


def import_checkpoint(path, fmt: str = "auto", name: str | None = None, vae: str | None = None,
                      latent_scale: float = SD_VAE_SCALE, device="cpu"):
    """(model in eval mode on `device`, export meta) from a SiT or REPA checkpoint file. `vae`: the diffusers
    AutoencoderKL folder that decodes its latents (sd-vae-ft-ema for SiT's and REPA's numbers); without it the
    samples stay latents."""
    model, fmt = import_state_dict(read_torch_state_dict(path), fmt, name, where=str(path))
    return model.to(device), imported_meta(model, fmt, path, vae, latent_scale)


# --- exporting ------------------------------------------------------------------------------------------------------
def pafm_to_sit_state_dict(model, learn_sigma: bool = False) -> dict[str, torch.Tensor]:
    """`model`'s weights in SiT's names (and pos_embed), for SiT's models.py with learn_sigma as given (the sigma
    half, never trained here, is zero)."""
    name = (model.config or {}).get("name", type(model).__name__)
    if not isinstance(model, SiT):
        raise InteropError(f"{name} is not a SiT model: only SiT models have SiT's format")
    kwargs = model.config["kwargs"]
    if kwargs.get("qk_norm"):
        raise InteropError(f"{name} uses QK RMSNorm (qk_norm=true), which SiT's models.py does not have")
    if kwargs.get("time_scale", 1.0) != 1.0:
        raise InteropError(f"{name} embeds {kwargs['time_scale']:g} t, SiT's models.py embeds t: its velocity "
                           f"would be wrong there")
    if kwargs.get("reverse_time"):
        raise InteropError(f"{name} holds REPA-direction weights (reverse_time): SiT's samplers would run it "
                           f"backwards")
    grid = model.input_size // model.patch_size
    pos = sincos_pos_embed_2d(grid, model.hidden_size, dtype=torch.float64).float()[None]
    c, pp = model.in_channels, model.patch_size ** 2
    out = {"pos_embed": pos}
    for key, value in model.state_dict().items():
        value = value.detach().float().cpu()
        if learn_sigma and key.startswith("final_layer.linear."):
            v = value.reshape(pp, c, *value.shape[1:])
            value = torch.cat([v, torch.zeros_like(v)], dim=1).reshape(pp * 2 * c, *value.shape[1:])
        out[to_sit_name(key)] = value.contiguous().clone()
    return out


def export_sit_checkpoint(model, out, learn_sigma: bool = False) -> Path:
    """Write `model` as a plain SiT state dict (torch.save), atomically."""
    state = pafm_to_sit_state_dict(model, learn_sigma)
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, lambda tmp: torch.save(state, tmp))


# --- command line ---------------------------------------------------------------------------------------------------
def build_parser():
    p = OneLineParser(prog="python -m pafm.models.interop", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="a SiT or REPA .pt checkpoint -> this project's export (.safetensors)")
    imp.add_argument("checkpoint")
    imp.add_argument("out", help="the export file to write (.safetensors)")
    imp.add_argument("--format", choices=FORMATS, default="auto", help="auto: REPA when it holds projector heads")
    imp.add_argument("--model", default=None, help="registry name, e.g. SiT-XL/2 (default: inferred from shapes)")
    imp.add_argument("--vae", default=None, help="diffusers AutoencoderKL folder decoding its latents (sd-vae-ft-ema)")
    imp.add_argument("--latent-scale", type=float, default=SD_VAE_SCALE)
    exp = sub.add_parser("export", help="a run folder or export -> SiT's state dict format (.pt)")
    exp.add_argument("checkpoint", help="run folder (RUN/ema.safetensors) or an export .safetensors file")
    exp.add_argument("out", help="the .pt file to write")
    exp.add_argument("--learn-sigma", action="store_true",
                     help="add SiT's learned-sigma half (zeros), for SiT's models built with learn_sigma=True")
    for sp in (imp, exp):
        sp.error = p.error  # one-line usage errors for the subcommands too
    return p


def main(argv=None) -> int:
    args, code = parse_args(build_parser(), argv)
    if args is None:
        return code
    try:
        if args.command == "import":
            if Path(args.out).suffix != ".safetensors":
                raise InteropError(f"{args.out}: the export is a .safetensors file")
            model, meta = import_checkpoint(args.checkpoint, args.format, args.model, args.vae, args.latent_scale)
            save_export(args.out, model.state_dict(), meta)
            print(f"wrote {args.out}: {model.config['name']} from the {meta['import']['format']} checkpoint "
                  f"{args.checkpoint}")
        else:
            model, meta = load_export(args.checkpoint)
            out = export_sit_checkpoint(model, args.out, args.learn_sigma)
            size = f" --image-size {model.input_size * 8}" if model.input_size in (32, 64) else ""
            print(f"wrote {out}: {model.config['name']} (step {meta.get('step')}) in SiT's format, for SiT's "
                  f"sample.py --model {model.config['name']}{size} --num-classes {model.num_classes} --ckpt {out}")
    except Exception as err:  # noqa: BLE001 - report_error raises what is no user error again
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
