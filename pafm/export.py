"""The EMA export: one safetensors file with the weights and, in its metadata, everything needed to rebuild and use
the model (architecture, dataset spec and info, path, step).  Sampling, evaluation and sharing read only this file.

    save_export("RUN/ema.safetensors", model.state_dict(), {"model": model.config, "data": {...}, "path": "linear",
                "step": 1000})
    model, meta = load_export("RUN")            # a run folder means RUN/ema.safetensors
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

EXPORT_NAME = "ema.safetensors"
META_KEY = "pafm"  # the safetensors metadata key holding the JSON meta


class ExportError(ValueError):
    """A missing, incomplete or inconsistent export file."""


def save_export(path, state_dict: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write `state_dict` (CPU copies, contiguous) and `meta` (JSON) to `path` atomically (temporary file, rename).

    `meta` must hold "model" = model.config ({"name", "kwargs"}); "data" ({"spec", "info"}), "path" and "step" are
    expected by the sampling and evaluation tools.
    """
    path = Path(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) or "name" not in meta["model"]:
        raise ExportError(f"save_export({path}): meta['model'] must be model.config = {{'name': ..., 'kwargs': ...}}")
    try:
        meta_json = json.dumps(meta)
    except TypeError as err:
        raise ExportError(f"save_export({path}): meta is not JSON-serialisable: {err}") from None
    tensors = {}
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"save_export({path}): state_dict[{name!r}] is a {type(value).__name__}, not a tensor")
        # clone: safetensors refuses tensors that share storage (tied weights, views)
        tensors[name] = value.detach().to("cpu").contiguous().clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={META_KEY: meta_json})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def resolve_export(path_or_run_dir) -> Path:
    """A run folder -> RUN/ema.safetensors; a file is returned as is.  Raises ExportError with a hint otherwise."""
    path = Path(path_or_run_dir).expanduser()
    if path.is_dir():
        if (path / ".metadata").is_file():
            raise ExportError(f"{path} is a torch.distributed.checkpoint folder; sampling and evaluation read the EMA "
                              f"export: pass the run folder or RUN/{EXPORT_NAME}")
        path = path / EXPORT_NAME
    if not path.is_file():
        raise ExportError(f"no EMA export at {path}: pass a run folder holding {EXPORT_NAME} (written by the trainer) "
                          f"or the path of a .safetensors export")
    return path


def read_export_meta(path_or_run_dir) -> dict:
    """The JSON meta of an export, without loading the weights."""
    path = resolve_export(path_or_run_dir)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise ExportError(f"{path} is not a readable safetensors file: {err}") from None
    if raw is None:
        raise ExportError(f"{path} has no '{META_KEY}' metadata: it was not written by pafm.export.save_export")
    return json.loads(raw)


def load_export(path_or_run_dir, device="cpu"):
    """Rebuild the model from an export: returns (model in eval mode on `device`, meta).  Weights load strictly."""
    from pafm.models import build_model

    path = resolve_export(path_or_run_dir)
    meta = read_export_meta(path)
    config = meta.get("model") or {}
    if "name" not in config:
        raise ExportError(f"{path}: meta has no model config ({{'name', 'kwargs'}})")
    model = build_model(config["name"], **config.get("kwargs", {}))
    state = load_file(str(path), device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ExportError(f"{path}: weights do not match {config['name']}: {err}") from None
    return model.to(device).eval().requires_grad_(False), meta
