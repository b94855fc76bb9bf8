"""Named model configurations: `build_model("SiT-XL/2", input_size=32, ...)`.

Sizes (depth, hidden size, heads) follow DiT / SiT: S 12/384/6, B 12/768/12, L 24/1024/16, XL 28/1152/16 (head
size 64 except XL's 72). MMDiT uses the S/B/L sizes with head size 64 (each block holds two streams, so about
twice a SiT block's parameters). The tiny T sizes (4/128/4, head size 32) are for CPU tests and the built-in
digits recipes (SiT-T/2 on 8x8x1 digits has 1.2M parameters). SiT-T/4 takes 28x28 MNIST as 49 tokens of 4x4 pixels,
a quarter of SiT-T/2's cost per image (the MNIST studies train it).

SiT's time embedding: `time_scale` 1 (SiT's, the default) or 1000 (DiT's). `model.config` always records it, and
`model_from_config` rebuilds a saved config; a saved SiT config without time_scale (whose model embedded 1000 t) is
rebuilt with time_scale 1000.
"""
import difflib

from .layers import DIT_TIME_SCALE
from .mmdit import MMDiT
from .sit import SiT

_SIT_SIZES = {"T": (4, 128, 4), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
_MMDIT_SIZES = {"T": (4, 128, 4), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16)}

# Arguments a config may give, with their defaults; depth / hidden_size / num_heads default to the named size.
_COMMON = {"input_size": 32, "in_channels": 4, "mlp_ratio": 4.0, "qk_norm": False}
_ARGS = {
    SiT: {**_COMMON, "num_classes": 1000, "time_scale": 1.0, "reverse_time": False},
    MMDiT: {**_COMMON, "text_dim": 768, "pooled_dim": 768, "max_text_len": 77},
}
_SIZE_ARGS = ("depth", "hidden_size", "num_heads")
# The arguments of a saved SiT config that has no time_scale (its model embedded 1000 t).
_SIT_ARGS_WITHOUT_TIME_SCALE = frozenset({*_COMMON, "num_classes", *_SIZE_ARGS})


def _registry():
    models = {}
    for size, dims in _SIT_SIZES.items():
        patches = (2, 4) if size == "T" else (2, 4, 8)  # T/4: 28x28 MNIST as 49 tokens
        for p in patches:
            models[f"SiT-{size}/{p}"] = (SiT, p, dims)
    for size, dims in _MMDIT_SIZES.items():
        models[f"MMDiT-{size}/2"] = (MMDiT, 2, dims)
    return models


MODELS = _registry()


def list_models():
    """Names accepted by build_model."""
    return list(MODELS)


def _check_value(name, key, value):
    if key in ("qk_norm", "reverse_time"):
        ok, kind = isinstance(value, bool), "a bool"
    elif key in ("mlp_ratio", "time_scale"):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, "a positive number"
    else:
        ok, kind = isinstance(value, int) and not isinstance(value, bool) and value > 0, "a positive int"
    if not ok:
        raise ValueError(f"build_model({name!r}): {key} must be {kind}, got {value!r}")


def build_model(name, **kwargs):
    """Build a named model with its arguments; returns an nn.Module with `.blocks`, `.config` and `.cond_kind`.

    `model.config` = {"name": name, "kwargs": every resolved argument}, JSON-serialisable, so that
    `build_model(config["name"], **config["kwargs"])` rebuilds the same architecture. Unknown names or arguments
    raise ValueError listing the valid ones. To build without memory: `with torch.device("meta"): build_model(...)`,
    then `model.to_empty(device=...)` and `model.init_weights()`.
    """
    if name not in MODELS:
        close = difflib.get_close_matches(str(name), list(MODELS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown model {name!r}; {hint}valid names: {', '.join(MODELS)}")
    cls, patch_size, dims = MODELS[name]
    defaults = {**_ARGS[cls], **dict(zip(_SIZE_ARGS, dims))}
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ValueError(f"build_model({name!r}): unknown arguments {unknown}; valid ones: {sorted(defaults)}")
    resolved = {**defaults, **kwargs}
    for key, value in resolved.items():
        _check_value(name, key, value)
    if resolved["hidden_size"] % resolved["num_heads"]:
        raise ValueError(f"build_model({name!r}): hidden_size {resolved['hidden_size']} is not divisible by "
                         f"num_heads {resolved['num_heads']}")
    if resolved["hidden_size"] % 4:
        raise ValueError(f"build_model({name!r}): hidden_size must be divisible by 4 (2D sin-cos position "
                         f"embedding), got {resolved['hidden_size']}")
    if resolved["input_size"] % patch_size:
        raise ValueError(f"build_model({name!r}): input_size {resolved['input_size']} is not divisible by the "
                         f"patch size {patch_size}")
    for key in ("mlp_ratio", "time_scale"):
        if key in resolved:
            resolved[key] = float(resolved[key])
    model = cls(patch_size=patch_size, **resolved)
    model.config = {"name": name, "kwargs": resolved}
    return model


def model_from_config(config: dict):
    """The model a saved `model.config` ({"name", "kwargs"}) describes, with fresh weights.

    A SiT config that records every argument but time_scale was saved by a model that embedded 1000 t; it is rebuilt
    that way. Only saved configs get this reading: `build_model` itself never changes an argument it was given."""
    name, kwargs = config["name"], dict(config.get("kwargs", {}))
    if MODELS.get(name, (None,))[0] is SiT and set(kwargs) == _SIT_ARGS_WITHOUT_TIME_SCALE:
        kwargs["time_scale"] = DIT_TIME_SCALE
    return build_model(name, **kwargs)
