"""The EMA export: one safetensors file with the weights and, in its metadata, everything needed to rebuild and use
the model (architecture, dataset spec and info, path, step).  Sampling, evaluation and sharing read only this file.

    save_export("RUN/ema.safetensors", model.state_dict(), {"model": model.config, "data": {...}, "path": "linear",
                "step": 1000})
    model, meta = load_export("RUN")            # a run folder means RUN/ema.safetensors
    export_staleness("RUN")                     # a warning line when RUN/checkpoints holds a newer step, else None

    python -m pafm.export RUN [--checkpoint RUN/checkpoints/step_N]   # (re)write RUN/ema.safetensors from a checkpoint
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pafm.checkpoint import (CHECKPOINTS, CheckpointError, checkpoint_run_id, full_ema, latest_checkpoint,
                             newest_step, recorded_run_id, run_dir_of_checkpoint, verify_checkpoint)
from pafm.checkpoint.layout import RUN, rank_files
from pafm.cli import OneLineParser, parse_args, report_error
from pafm.files import atomic_write
from pafm.run_lock import RunLock

EXPORT_NAME = "ema.safetensors"
META_KEY = "pafm"  # the safetensors metadata key holding the JSON meta
REFRESH = "python -m pafm.export"  # the command that rewrites a run's export from its newest checkpoint


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
    tensors, storages = {}, set()
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"save_export({path}): state_dict[{name!r}] is a {type(value).__name__}, not a tensor")
        t = value.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        # safetensors refuses tensors that share storage (tied weights, views): those are cloned; the others (the
        # gathered EMA weights) are written as they are, so the export needs no second copy of the model
        if storage.data_ptr() in storages or storage.nbytes() != t.nbytes:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={META_KEY: meta_json}))


def resolve_export(path_or_run_dir) -> Path:
    """A run folder -> RUN/ema.safetensors; a file is returned as is.  Raises ExportError with a hint otherwise."""
    path = Path(path_or_run_dir).expanduser()
    if not path.exists():
        raise ExportError(f"{path} does not exist: pass a run folder holding {EXPORT_NAME} (written by the trainer) "
                          f"or the path of a .safetensors export")
    if path.is_dir():
        run = None if (path / EXPORT_NAME).is_file() else run_dir_of_checkpoint(path)
        if run is not None:
            raise ExportError(f"{path} is a training checkpoint (torch.distributed.checkpoint), not an EMA export: "
                              f"pass the run folder {run} or {Path(run) / EXPORT_NAME}")
        path = path / EXPORT_NAME
    if not path.is_file():
        raise ExportError(f"no EMA export at {path}: pass a run folder holding {EXPORT_NAME} (the trainer writes it "
                          f"at every checkpoint) or the path of a .safetensors export")
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
    try:
        meta = json.loads(raw)
    except ValueError as err:
        raise ExportError(f"{path}: its '{META_KEY}' metadata is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ExportError(f"{path}: its '{META_KEY}' metadata is not a JSON object")
    return meta


def dataset_info(meta: dict) -> dict:
    """The info of the dataset the exported model was trained on (shapes, normalisation, encoder, class names)."""
    return (meta.get("data") or {}).get("info") or {}


def _check_weights(where, name: str, state: dict, expected: dict) -> None:
    """ExportError summarising missing, unexpected and reshaped weights (torch's own message lists every key)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
             for what, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", reshaped))
             if keys]
    if parts:
        raise ExportError(f"{where}: weights do not match {name}: {'; '.join(parts)}")


def model_from_meta(meta: dict, where) -> torch.nn.Module:
    """The model an export's meta describes, with fresh weights; `where` names the meta's source in errors."""
    from pafm.models import model_from_config

    config = meta.get("model") or {}
    if not isinstance(config, dict) or "name" not in config:
        raise ExportError(f"{where}: meta has no model config ({{'name', 'kwargs'}})")
    try:
        return model_from_config(config)
    except (ValueError, TypeError) as err:
        raise ExportError(f"{where}: cannot rebuild its model: {err}") from None


def model_skeleton(meta: dict, where) -> torch.nn.Module:
    """The model on the meta device (no memory, no weights): enough to check conditions before loading weights."""
    with torch.device("meta"):
        return model_from_meta(meta, where)


def load_weights(model: torch.nn.Module, state_dict: dict, device, where):
    """`model` with `state_dict` loaded strictly, in eval mode on `device`, without gradients."""
    _check_weights(where, model.config["name"], state_dict, model.state_dict())
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval().requires_grad_(False)


def _stored_shapes(path: Path) -> dict[str, tuple]:
    """{name: shape} of the tensors in a safetensors file, from its header alone."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as err:  # safetensors' own error types for truncated or foreign files
        raise ExportError(f"{path} is not a readable safetensors file: {err}") from None


def load_export(path_or_run_dir, device="cpu"):
    """Rebuild the model from an export: returns (model in eval mode on `device`, meta).  Weights load strictly.

    The meta is untrusted until the file's tensors match it: the model it describes is built on the meta device
    first and compared with the file's header, so a meta that claims a model other than the file holds is refused
    before anything is allocated."""
    path = resolve_export(path_or_run_dir)
    meta = read_export_meta(path)
    skeleton = model_skeleton(meta, path)
    stored = {name: torch.empty(shape, device="meta") for name, shape in _stored_shapes(path).items()}
    _check_weights(path, skeleton.config["name"], stored, skeleton.state_dict())
    model = model_from_meta(meta, path)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as err:  # safetensors' own error types for truncated files
        raise ExportError(f"{path} is not a readable safetensors file: {err}") from None
    return load_weights(model, state, device, path), meta


def export_staleness(run_dir_or_export) -> str | None:
    """A one-line warning when the run's EMA export is older than its newest complete checkpoint, else None.

    The trainer rewrites RUN/ema.safetensors at every checkpoint; a failed write leaves the previous export in
    place, and sampling it would silently score an older model.  Also warns when the export is missing or unreadable
    while checkpoints exist.  An export outside a run folder (no checkpoints beside it) gives None.
    """
    path = Path(run_dir_or_export).expanduser()
    export = path / EXPORT_NAME if path.is_dir() else path
    run_dir = export.parent
    newest = newest_step(run_dir)
    if newest is None:
        return None
    holds = f"{run_dir / CHECKPOINTS} holds step {newest}"
    refresh = f"`{REFRESH} {run_dir}` (or a relaunch of the trainer)"
    if not export.is_file():
        return f"warning: {export} is missing but {holds}: {refresh} writes it"
    try:
        step = read_export_meta(export).get("step")
    except ExportError as err:
        return f"warning: {export} is unreadable ({err}) but {holds}: {refresh} rewrites it"
    if isinstance(step, int) and step < newest:
        return (f"warning: {export} is from step {step} but {holds}: the export is stale (a failed export write?); "
                f"{refresh} refreshes it")
    return None


class RunExport:
    """The trainer's EMA export: RUN/ema.safetensors rewritten from a checkpoint's own files, on rank 0, as side work
    (`side.run`: a failure is reported and counted, never fatal).  `write` is the checkpointer's after-save hook."""

    def __init__(self, run_dir: Path, meta: dict, side, is_main: bool):
        self.path, self.meta, self.side, self.is_main = Path(run_dir) / EXPORT_NAME, meta, side, is_main

    def write(self, folder: Path, step: int):
        if self.is_main:
            self.side.run("writing the EMA export",
                          lambda: save_export(self.path, full_ema(folder), {**self.meta, "step": step}))

    def refresh(self, folder: Path, step: int):
        """Write the export from the checkpoint a run resumed when it is missing, unreadable or older (its write
        failed, or the run was killed between a checkpoint and its export): a finished run gets it on relaunch."""
        if not self.is_main:
            return
        try:
            exported = read_export_meta(self.path).get("step")
        except ExportError:
            exported = None
        if not isinstance(exported, int) or exported < step:
            self.write(folder, step)


# --- the export command -------------------------------------------------------------------------------------------
def checkpoint_export_meta(folder: Path, run_dir: Path) -> dict:
    """The export meta of a checkpoint: recorded in its run.json, or, for a checkpoint written before it was, the
    meta of the run's current export (the same run, so the same model and data)."""
    try:
        meta = json.loads((folder / RUN).read_text()).get("export")
    except (OSError, ValueError, AttributeError) as err:
        raise ExportError(f"checkpoint {folder}: its run.json is unreadable ({err})") from None
    if isinstance(meta, dict):
        return meta
    try:
        return read_export_meta(run_dir / EXPORT_NAME)
    except ExportError:
        raise ExportError(f"checkpoint {folder} does not record its export settings (written by an older version) "
                          f"and {run_dir / EXPORT_NAME} is not there to take them from: relaunch the trainer with "
                          "train.resume=auto to export it") from None


def export_checkpoint(run_dir, checkpoint=None) -> tuple[Path, Path, int]:
    """Write RUN/ema.safetensors from the EMA weights of a verified checkpoint: `checkpoint`, or the run's newest
    that verifies.  Runs on the CPU in one process, reading the checkpoint's files; refused while a launch holds
    the run.  Returns (export path, checkpoint folder, step)."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a run folder")
    lock = RunLock(run_dir).acquire()
    try:
        if checkpoint is None:
            folder = latest_checkpoint(run_dir / CHECKPOINTS, recorded_run_id(run_dir))
            if folder is None:
                raise ExportError(f"{run_dir / CHECKPOINTS} holds no checkpoint of this run that verifies")
        else:
            folder = Path(checkpoint).expanduser()
            if not folder.is_dir():
                raise ExportError(f"--checkpoint {folder}: no such checkpoint folder")
            verify_checkpoint(folder)
            own, theirs = recorded_run_id(run_dir), checkpoint_run_id(folder)
            if own and theirs and own != theirs:
                raise ExportError(f"--checkpoint {folder} belongs to another run (run id {theirs}, {run_dir} is "
                                  f"{own}): its weights would not be this run's")
        meta = checkpoint_export_meta(folder, run_dir)
        try:
            step = json.loads(rank_files(folder, 0)[0].read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"checkpoint {folder}: rank0.json has no step ({err})") from None
        path = save_export(run_dir / EXPORT_NAME, full_ema(folder), {**meta, "step": step})
    finally:
        lock.release()
    return path, folder, step


def main(argv=None) -> int:
    """Exit code: 0 when the export was written, 2 for a user error (one line on stderr)."""
    parser = OneLineParser(prog=REFRESH, description="(Re)write RUN/ema.safetensors from a checkpoint's EMA weights.")
    parser.add_argument("run_dir", help="the run folder (holding checkpoints/)")
    parser.add_argument("--checkpoint", help="the checkpoint folder to export (default: the run's newest that "
                                             "verifies)")
    args, code = parse_args(parser, argv)
    if args is None:
        return code
    try:
        path, folder, step = export_checkpoint(args.run_dir, args.checkpoint)
    except Exception as err:  # noqa: BLE001 - report_error raises what is no user error again
        return report_error(err)
    print(f"wrote {path} from {folder} (step {step})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
