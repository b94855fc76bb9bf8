"""Checkpoints: exact round trip, integrity manifest, fallback of resume=auto, run identity, no code execution,
background saves, the Checkpointer's named parts and hooks, one rule for what counts as a checkpoint."""
import ast
import datetime
import errno
import hashlib
import io
import json
import os
import pickle
import resource
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from pafm.checkpoint import (
    BackgroundSaver,
    CheckpointConfig,
    CheckpointError,
    Checkpointer,
    MetadataUnpickler,
    TrainState,
    check_state_shapes,
    checkpoint_run_id,
    complete_checkpoints,
    describe_failure,
    full_ema,
    latest_checkpoint,
    load_checkpoint,
    newest_step,
    run_identity,
    safe_dcp_load,
    save_checkpoint,
    sharded_states,
    verify_checkpoint,
    write_manifest,
)
from pafm.ema import EMA
from pafm.export import ExportError, export_staleness, resolve_export, save_export

RUN_META = {"model": {"name": "tiny", "kwargs": {"hidden": 8, "num_heads": 2}},
            "objective": {"kind": "pafm", "source": "bank", "candidates": 4},
            "state_keys": ["bank.count", "bank.entries"], "world_size": 1}
FIX = "resume in a new run.dir or with the original settings"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    store = tmp_path_factory.mktemp("store") / "rendezvous"  # a file, not a port another worker could take
    dist.init_process_group("gloo", init_method=f"file://{store}", world_size=1, rank=0)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def _setup(mesh, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, 0.9)
    return model, optimizer, ema


def _train(model, optimizer, ema, steps=2):
    for _ in range(steps):
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)


def _local(t):
    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def _snapshot(model, optimizer, ema):
    return {"params": [_local(p) for p in model.parameters()],
            "optim": [_local(v) for state in optimizer.state.values() for v in state.values()],
            "lr": [g["lr"] for g in optimizer.param_groups],
            "ema": [_local(t) for t in ema.shadow.values()]}


def _assert_equal(a, b):
    assert a["lr"] == b["lr"]
    for key in ("params", "optim", "ema"):
        assert len(a[key]) == len(b[key]) > 0
        for x, y in zip(a[key], b[key]):
            assert torch.equal(x, y), key


def _save(root, mesh, step=3, keep=0, run_meta=RUN_META):
    model, optimizer, ema = _setup(mesh)
    _train(model, optimizer, ema)
    meta = {"step": step, "skipped": 0, "bad_in_row": 0, "loader": {"epoch": 0, "index": 7}}
    tensors = {"bank.count": torch.arange(3)}
    return save_checkpoint(root, step, sharded_states(model, optimizer, ema), meta, tensors, keep, run_meta)


def _load(folder, mesh, expected=RUN_META):
    return load_checkpoint(folder, sharded_states(*_setup(mesh, seed=1)), expected_run_meta=expected)


class _Payload:
    """Unpickling this runs `touch marker` (what a crafted checkpoint would do with something worse)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_round_trip_restores_exactly(tmp_path, mesh):
    model, optimizer, ema = _setup(mesh)
    _train(model, optimizer, ema)
    saved, rng = _snapshot(model, optimizer, ema), torch.get_rng_state()
    meta = {"step": 3, "skipped": 1, "bad_in_row": 0, "loader": {"epoch": 2, "index": 5}}
    folder = save_checkpoint(tmp_path, 3, sharded_states(model, optimizer, ema), meta, {"bank.count": torch.arange(4)},
                             2, RUN_META)
    _train(model, optimizer, ema)  # moves weights, moments, EMA and the RNG on
    optimizer.param_groups[0]["lr"] = 0.5
    torch.rand(3)
    # The expected meta as the lead builds it (tuples where the saved JSON has lists) still matches.
    expected = {**RUN_META, "state_keys": tuple(RUN_META["state_keys"])}
    got_meta, got_tensors = load_checkpoint(folder, sharded_states(model, optimizer, ema), expected_run_meta=expected)
    _assert_equal(_snapshot(model, optimizer, ema), saved)
    assert got_meta == meta
    assert torch.equal(got_tensors["bank.count"], torch.arange(4)) and set(got_tensors) == {"bank.count"}
    assert torch.equal(torch.get_rng_state(), rng)


def test_folder_layout_and_manifest(tmp_path, mesh):
    folder = _save(tmp_path, mesh)
    assert folder.name == "step_0000003" and not list(tmp_path.glob("*.tmp"))
    names = {p.name for p in folder.iterdir()}
    assert names == {".metadata", "__0_0.distcp", "rank0.json", "rank0.safetensors", "run.json", "manifest.json"}
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert set(files) == names - {"manifest.json"}
    for name, entry in files.items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert json.loads((folder / "run.json").read_text()) == RUN_META
    assert complete_checkpoints(tmp_path) == [(3, folder)]
    verify_checkpoint(folder)


def test_rotation_keeps_newest(tmp_path, mesh):
    for step in (1, 2, 3):
        _save(tmp_path, mesh, step=step, keep=2)
    (tmp_path / "step_0000009.tmp").mkdir()  # a killed run's partial write
    _save(tmp_path, mesh, step=4, keep=2)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [3, 4]
    assert not list(tmp_path.glob("*.tmp"))


def test_allow_list_is_exact(mesh):
    unpickler = MetadataUnpickler(io.BytesIO())
    assert unpickler.find_class("torch", "bfloat16") is torch.bfloat16
    assert unpickler.find_class("torch", "Size") is torch.Size
    for module, name in [("pathlib", "PosixPath.touch"), ("torch", "load"), ("posix", "system"),
                         ("builtins", "eval"), ("torch.distributed.checkpoint.metadata", "os"),
                         ("collections", "OrderedDict")]:
        with pytest.raises(pickle.UnpicklingError, match="not checkpoint metadata"):
            unpickler.find_class(module, name)


def test_crafted_metadata_is_refused_and_not_executed(tmp_path, mesh):
    folder = _save(tmp_path / "ckpt", mesh)
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    write_manifest(folder)  # a consistent manifest: the restricted unpickler is what must refuse
    verify_checkpoint(folder)
    with pytest.raises(CheckpointError, match=r"refusing to load \.metadata: .*system.* not checkpoint metadata"):
        _load(folder, mesh)
    with pytest.raises(CheckpointError, match="could not be loaded"):  # nor DCP given this module's reader
        safe_dcp_load({"model": {}}, folder)
    assert not marker.exists()
    pickle.loads((folder / ".metadata").read_bytes())  # the payload is real: plain pickle does run it
    assert marker.exists()


def test_crafted_non_tensor_value_is_not_executed(tmp_path, mesh):
    folder, marker = tmp_path / "ckpt", tmp_path / "pwned"
    dcp.save({"x": _Payload(marker)}, checkpoint_id=str(folder))
    with pytest.raises(CheckpointError, match=r"could not be loaded \(rank 0\): UnpicklingError: Weights only load"):
        safe_dcp_load({"x": 0}, folder)
    assert not marker.exists()
    dcp.load({"x": 0}, checkpoint_id=str(folder))  # the payload is real: DCP's own planner runs it
    assert marker.exists()


def test_flipped_byte_is_refused(tmp_path, mesh):
    folder = _save(tmp_path, mesh)
    path = folder / "__0_0.distcp"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"checkpoint {folder} is corrupt: __0_0.distcp has a checksum mismatch"):
        _load(folder, mesh)


def test_truncated_file_gives_its_size(tmp_path, mesh):
    folder = _save(tmp_path, mesh)
    path = folder / ".metadata"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError) as info:
        _load(folder, mesh)
    assert str(info.value) == f"checkpoint {folder} is corrupt: .metadata has size 100 bytes, expected {size}"


def test_missing_and_unlisted_files_are_refused(tmp_path, mesh):
    folder = _save(tmp_path, mesh)
    (folder / "extra.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="extra.bin is an unlisted file"):
        verify_checkpoint(folder)
    (folder / "extra.bin").unlink()
    (folder / "rank0.json").unlink()
    with pytest.raises(CheckpointError, match="rank0.json is missing"):
        _load(folder, mesh)


def test_bad_manifest_is_refused(tmp_path, mesh):
    folder = _save(tmp_path, mesh)
    manifest = folder / "manifest.json"
    for text in ["{not json", '{"files": {"../outside": {"size": 1, "sha256": "0"}}}', "[]"]:
        manifest.write_text(text)
        with pytest.raises(CheckpointError, match="manifest.json is not a valid manifest"):
            verify_checkpoint(folder)


def test_folder_without_manifest_is_not_complete(tmp_path, mesh):
    folder = _save(tmp_path, mesh)
    (folder / "manifest.json").unlink()
    assert complete_checkpoints(tmp_path) == []
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match=f"checkpoint {folder} is not a complete checkpoint"):
        _load(folder, mesh)


def test_latest_skips_a_corrupt_newest(tmp_path, mesh, capsys):
    older, newer = _save(tmp_path, mesh, step=1), _save(tmp_path, mesh, step=2)
    assert latest_checkpoint(tmp_path) == newer
    assert capsys.readouterr().err == ""
    path = newer / "rank0.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    assert latest_checkpoint(tmp_path) == older
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ")
    assert f"checkpoint {newer} is corrupt: rank0.safetensors has a checksum mismatch" in err


MINE, THEIRS = {**RUN_META, "run_id": "mine"}, {**RUN_META, "run_id": "theirs"}


def test_resume_and_rotation_consider_only_the_runs_own_checkpoints(tmp_path, mesh, capsys):
    legacy = _save(tmp_path, mesh, step=1)  # written before checkpoints named their run: the run's own
    _save(tmp_path, mesh, step=2, keep=2, run_meta=MINE)
    foreign = _save(tmp_path, mesh, step=5, run_meta=THEIRS)
    assert latest_checkpoint(tmp_path, "mine") == tmp_path / "step_0000002"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"warning: {foreign} belongs to another run (run id theirs" in err
    assert latest_checkpoint(tmp_path) == foreign  # with no run to compare with, as before
    _save(tmp_path, mesh, step=3, keep=2, run_meta=MINE)
    _save(tmp_path, mesh, step=4, keep=2, run_meta=MINE)
    assert not legacy.exists() and [s for s, _ in complete_checkpoints(tmp_path, "mine")] == [3, 4]
    assert checkpoint_run_id(foreign) == "theirs"  # rotation never counts or deletes it
    _save(tmp_path, mesh, step=5, keep=2, run_meta=MINE)  # the same step: set aside, not overwritten
    assert "step_0000005 was another run's checkpoint: moved to step_0000005.foreign" in capsys.readouterr().err
    assert checkpoint_run_id(tmp_path / "step_0000005.foreign") == "theirs"
    assert [s for s, _ in complete_checkpoints(tmp_path, "mine")] == [4, 5]


def test_a_step_folder_without_manifest_is_reported_and_never_overwritten(tmp_path, mesh, capsys):
    older, newer = _save(tmp_path, mesh, step=1, run_meta=MINE), _save(tmp_path, mesh, step=2, run_meta=MINE)
    (newer / "manifest.json").unlink()
    capsys.readouterr()
    assert latest_checkpoint(tmp_path, "mine") == older
    assert capsys.readouterr().err == \
        f"warning: {newer} has no manifest.json (an incomplete or damaged checkpoint): skipped\n"
    _save(tmp_path, mesh, step=2, run_meta=MINE)
    assert (tmp_path / "step_0000002.incomplete" / "__0_0.distcp").is_file()
    assert "moved to step_0000002.incomplete instead of being overwritten" in capsys.readouterr().err


def test_the_run_identity_is_made_once_and_not_compared_by_the_load(tmp_path, mesh):
    run_id = run_identity(tmp_path)
    assert json.loads((tmp_path / "run.json").read_text()) == {"run_id": run_id}
    assert run_identity(tmp_path) == run_id
    folder = _save(tmp_path / "ckpt", mesh, run_meta={**MINE, "trajectory": {"optim": {"lr": 0.1}}})
    _load(folder, mesh, expected={**RUN_META, "run_id": run_id, "trajectory": {"optim": {"lr": 0.2}}})
    (tmp_path / "run.json").write_text("{")
    with pytest.raises(CheckpointError, match="run.json is damaged"):
        run_identity(tmp_path)


def test_a_changed_state_shape_names_the_setting(tmp_path):
    saved, live = {"bank.entries": torch.zeros(10, 64, 4)}, {"bank.entries": torch.zeros(10, 32, 4)}
    with pytest.raises(CheckpointError) as info:
        check_state_shapes(tmp_path, saved, live, "objective.bank_per_class=64, this run has 32")
    assert str(info.value) == (f"checkpoint {tmp_path} was written with objective.bank_per_class=64, this run has 32 "
                               f"(bank.entries has shape [10, 64, 4], this run's [10, 32, 4]): {FIX}")
    with pytest.raises(CheckpointError, match=r"holds bank.entries of shape \[10, 64, 4\], this run's has shape "):
        check_state_shapes(tmp_path, saved, live, None)  # a checkpoint that records no settings


@pytest.mark.parametrize("change, message", [
    (lambda m: m["model"]["kwargs"].update(num_heads=4), "model.kwargs.num_heads=2, this run has 4"),
    (lambda m: m["objective"].update(source="neighbors"), 'objective.source="bank", this run has "neighbors"'),
    (lambda m: m.update(state_keys=["bank.count"]),
     'state_keys=["bank.count", "bank.entries"], this run has ["bank.count"]'),
    (lambda m: m.update(world_size=2), "world_size=1, this run has 2"),
    (lambda m: m["objective"].update(temperature=0.5), "objective.temperature=(not set), this run has 0.5"),
])
def test_run_meta_mismatch_is_refused(tmp_path, mesh, change, message):
    folder = _save(tmp_path, mesh)
    expected = json.loads(json.dumps(RUN_META))
    change(expected)
    with pytest.raises(CheckpointError) as info:
        _load(folder, mesh, expected)
    assert str(info.value) == f"checkpoint {folder} was written with {message}: {FIX}"


def test_world_size_mismatch_is_refused(tmp_path, mesh):
    folder = _save(tmp_path, mesh)
    (folder / "rank1.json").write_text((folder / "rank0.json").read_text())
    write_manifest(folder)
    with pytest.raises(CheckpointError, match=f"checkpoint {folder} was written by 2 ranks, this run has 1: "):
        _load(folder, mesh, expected=None)


class _Position:
    """A per-rank part whose state is JSON (like the loader's position)."""

    def __init__(self, index):
        self.index = index

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


class _Bank:
    """A per-rank part whose state is tensors (like the objective's bank)."""

    def __init__(self, value):
        self.count = torch.full((2,), value)

    def state_dict(self):
        return {"bank.count": self.count}

    def load_state_dict(self, state):
        self.count.copy_(state["bank.count"])


def _checkpointer(run_dir, mesh, seed=0, index=0, bank=0.0):
    model, optimizer, ema = _setup(mesh, seed)
    world = SimpleNamespace(device=torch.device("cpu"), is_main=True)
    parts = {"loader": _Position(index), "objective": _Bank(bank)}
    checkpointer = Checkpointer(run_dir, world, CheckpointConfig(every=1, keep=2), RUN_META,
                                sharded=sharded_states(model, optimizer, ema), per_rank=parts)
    return checkpointer, (model, optimizer, ema), parts


def test_the_checkpointer_saves_and_resumes_named_parts_and_calls_its_hooks(tmp_path, mesh, capsys):
    checkpointer, (model, optimizer, ema), _ = _checkpointer(tmp_path, mesh, index=7, bank=3.0)
    hooked = []
    checkpointer.after_save.append(lambda folder, step: hooked.append((folder.name, step)))
    assert checkpointer.resume("auto") == TrainState() and checkpointer.resumed_from is None  # a fresh start
    _train(model, optimizer, ema)
    saved = _snapshot(model, optimizer, ema)
    folder = checkpointer.save(TrainState(step=4, skipped=1, bad_in_row=0), final=True)
    assert hooked == [("step_0000004", 4)]
    # The on-disk format: the counters and each JSON part under its name; the tensor parts under their own names.
    assert json.loads((folder / "rank0.json").read_text()) == {"step": 4, "skipped": 1, "bad_in_row": 0,
                                                               "loader": {"index": 7}}
    assert set(load_file(folder / "rank0.safetensors")) == {"rng.cpu", "bank.count"}
    assert json.loads((folder / "run.json").read_text()) == {**RUN_META, "run_id": checkpointer.run_id}
    resumed, (model, optimizer, ema), parts = _checkpointer(tmp_path, mesh, seed=1)
    assert resumed.resume("auto") == TrainState(4, 1, 0) and resumed.resumed_from == folder
    _assert_equal(_snapshot(model, optimizer, ema), saved)
    assert parts["loader"].index == 7 and torch.equal(parts["objective"].count, torch.full((2,), 3.0))
    assert f"resumed from {folder} at step 4" in capsys.readouterr().out


def test_a_fresh_start_beside_a_step_folder_without_manifest_is_refused(tmp_path, mesh):
    (tmp_path / "checkpoints" / "step_0000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_0000002" / ".metadata").write_bytes(b"")
    checkpointer, _, _ = _checkpointer(tmp_path, mesh)
    for policy in ("auto", "none"):
        with pytest.raises(CheckpointError, match="holds step_0000002 without manifest.json"):
            checkpointer.resume(policy)


def test_one_rule_decides_what_counts_as_a_checkpoint(tmp_path):
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    save_export(run / "ema.safetensors", {"w": torch.zeros(2)}, {"model": {"name": "tiny"}, "step": 5})
    for name in ("step_0000003", "step_0000008", "step_0000009.tmp"):
        (root / name).mkdir(parents=True)
    (root / "step_0000003" / "manifest.json").write_text("{}")
    (root / "step_0000008" / ".metadata").write_bytes(b"")  # DCP's files without the manifest: not a checkpoint
    assert complete_checkpoints(root) == [(3, root / "step_0000003")] and newest_step(run) == 3
    assert export_staleness(run) is None  # the export (step 5) is newer than the newest checkpoint
    (root / "step_0000008" / "manifest.json").write_text("{}")
    assert newest_step(run) == 8 and "is from step 5 but" in export_staleness(run)
    for folder in (root / "step_0000008", root / "step_0000009.tmp", root):  # passed where an export is expected
        with pytest.raises(ExportError, match=f"is a training checkpoint .*: pass the run folder {run} "):
            resolve_export(folder)


def test_the_checkpoint_package_imports_nothing_above_it():
    allowed = ("pafm.checkpoint", "pafm.config", "pafm.distributed", "pafm.files")
    for path in sorted((Path(__file__).parents[1] / "pafm" / "checkpoint").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for name in (n for n in names if n.startswith("pafm")):
                assert any(name == a or name.startswith(f"{a}.") for a in allowed), f"{path.name} imports {name}"


class _HeldWriter(torch.distributed.checkpoint.FileSystemWriter):
    """DCP's writer, whose file writes wait for `release` (or raise `error`): a save caught in the middle."""

    def __init__(self, *args, release: threading.Event, error: Exception | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.release, self.error = release, error

    def write_data(self, *args, **kwargs):
        assert self.release.wait(60), "the test never released the writer"
        if self.error is not None:
            raise self.error
        return super().write_data(*args, **kwargs)


def _held_saver(error=None) -> tuple[BackgroundSaver, threading.Event]:
    release = threading.Event()
    writer = _HeldWriter(".", release=release, error=error)
    return BackgroundSaver(cuda=False, timeout=datetime.timedelta(seconds=60), writer=writer), release


def test_background_save_writes_the_state_of_its_start_and_is_invisible_until_complete(tmp_path, mesh):
    older = _save(tmp_path, mesh, step=1)
    saver, release = _held_saver()
    model, optimizer, ema = _setup(mesh)
    _train(model, optimizer, ema)
    saved, rng = _snapshot(model, optimizer, ema), torch.get_rng_state()
    bank = torch.arange(4.0)
    meta = {"step": 2, "skipped": 0, "bad_in_row": 0, "loader": {"epoch": 0, "index": 3}}
    exported = []
    saver.start(tmp_path, 2, sharded_states(model, optimizer, ema), meta, {"bank": bank}, 0, RUN_META,
                then=exported.append)
    # Training goes on while the writer is held: weights, moments, EMA, the bank and the RNG all move.
    _train(model, optimizer, ema)
    bank += 1
    torch.rand(3)
    assert not saver.done() and (tmp_path / "step_0000002.tmp").is_dir()
    assert complete_checkpoints(tmp_path) == [(1, older)]  # what a kill now would leave: the previous one
    assert latest_checkpoint(tmp_path) == older and exported == []
    release.set()
    folder = saver.result()
    assert folder == tmp_path / "step_0000002" and exported == [folder] and not list(tmp_path.glob("*.tmp"))
    assert latest_checkpoint(tmp_path) == folder
    got_meta, got_tensors = load_checkpoint(folder, sharded_states(model, optimizer, ema), expected_run_meta=RUN_META)
    _assert_equal(_snapshot(model, optimizer, ema), saved)
    assert got_meta == meta and torch.equal(got_tensors["bank"], torch.arange(4.0))
    assert torch.equal(torch.get_rng_state(), rng)
    ema_weights = full_ema(folder)
    assert ema_weights.keys() == ema.shadow.keys()
    assert all(torch.equal(ema_weights[k], _local(v)) for k, v in ema.shadow.items())  # one rank: the full tensors
    assert saver.result() is None  # nothing in flight
    saver.close()


def test_failed_background_save_raises_on_result_and_keeps_the_previous(tmp_path, mesh):
    older = _save(tmp_path, mesh, step=1)
    saver, release = _held_saver(error=OSError(errno.ENOSPC, "No space left on device"))
    release.set()
    model, optimizer, ema = _setup(mesh)
    exported = []
    saver.start(tmp_path, 2, sharded_states(model, optimizer, ema), {"step": 2}, {}, 0, RUN_META,
                then=exported.append)
    with pytest.raises(CheckpointError) as info:
        saver.result()
    assert str(info.value) == (f"writing checkpoint {tmp_path / 'step_0000002.tmp'} failed (rank 0: OSError: "
                               "[Errno 28] No space left on device); the newest complete checkpoint is intact")
    assert complete_checkpoints(tmp_path) == [(1, older)] and not list(tmp_path.glob("*.tmp")) and exported == []
    verify_checkpoint(older)
    saver.close()


# Two real ranks, forked after the imports so that torch is imported once (torchrun would import it three times).
_TWO_RANKS = textwrap.dedent("""
    import datetime, multiprocessing, sys
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import pafm.checkpoint as ck
    import pafm.checkpoint.integrity as integrity
    from pafm.checkpoint.errors import from_rank0
    from pafm.ema import EMA

    def main(rank, port, root):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank)
        hashed = []
        sha256 = integrity.sha256_of
        integrity.sha256_of = lambda path: hashed.append(path.name) or sha256(path)
        mesh = init_device_mesh("cpu", (2,))
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters())
        ema = EMA(model, 0.9)
        for t in ema.shadow.values():  # distinct values in every row, so a misplaced shard shows
            t.to_local().copy_(torch.randn(t.to_local().shape))
        gathered = ema.full_state_dict(dst=0)  # the preview grids' gather: onto rank 0 alone
        full = ema.full_state_dict()  # every rank (evaluations during training)
        if rank == 0:
            assert gathered.keys() == full.keys() and all(torch.equal(gathered[k], full[k]) for k in full)
            assert any(v.shape[0] % 2 for v in full.values())  # uneven shards (3 rows over 2 ranks) are covered
        else:
            assert gathered is None
        meta = {"model": {"name": "tiny"}, "world_size": 2}
        states = ck.sharded_states(model, optimizer, ema)
        folder = ck.save_checkpoint(root, 1, states, {"step": rank}, {}, 0, meta)
        saved_hashes = list(hashed)
        assert ck.latest_checkpoint(root) == folder
        got, _ = ck.load_checkpoint(folder, states, expected_run_meta=meta)
        assert got == {"step": rank}
        everyone = [None, None]
        dist.all_gather_object(everyone, saved_hashes)
        assert all(everyone) and not set(everyone[0]) & set(everyone[1]), everyone
        assert sorted(everyone[0] + everyone[1]) == sorted(ck.file_sizes(folder)), everyone
        read = ck.full_ema(folder)  # the export's source: the checkpoint's own files, read by one rank
        assert read.keys() == full.keys() and all(torch.equal(read[k], full[k]) for k in full)
        # A background save: DCP, the hashing and the agreement on the saver's own gloo group.
        saver = ck.BackgroundSaver(cuda=False, timeout=datetime.timedelta(seconds=60))
        saver.start(root, 2, states, {"step": 2 + rank}, {}, 0, meta)
        later = saver.result()
        saver.close()
        assert ck.latest_checkpoint(root) == later and later.name == "step_0000002"
        got, _ = ck.load_checkpoint(later, states, expected_run_meta=meta)
        assert got == {"step": 2 + rank}
        dist.barrier()
        if rank == 0:
            (folder / "__1_0.distcp").write_bytes(b"truncated")
        dist.barrier()
        try:
            ck.verify_checkpoint(folder)
            print(f"rank {rank}: accepted", flush=True)
        except ck.CheckpointError as e:
            print(f"rank {rank}: {e}", flush=True)
        try:  # rank 0 alone reads, and fails: rank 1 must raise too instead of waiting for a value
            from_rank0(lambda: open(f"{root}/no-such-file").read())
        except ck.CheckpointError as e:
            print(f"rank {rank}: {e}", flush=True)
        dist.destroy_process_group()

    if __name__ == "__main__":
        fork = multiprocessing.get_context("fork")
        args = int(sys.argv[1]), sys.argv[2]
        ranks = [fork.Process(target=main, args=(rank, *args), daemon=True) for rank in (0, 1)]
        for p in ranks:
            p.start()
        for p in ranks:
            p.join(60)  # a rank that failed leaves the other waiting in a collective: give up on it
        sys.exit(0 if all(p.exitcode == 0 for p in ranks) else 1)
""")


@pytest.mark.slow
def test_two_ranks_split_the_hashing_gather_the_export_on_rank_0_and_save_in_the_background(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    root = Path(__file__).parent.parent
    # The script runs from tmp_path: the checkout's pafm first on the path, so that this checkout is what it tests.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, str(script), str(_free_port()), str(tmp_path / "ckpt")],
                            capture_output=True, text=True, env=env, timeout=120, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    folder = tmp_path / "ckpt" / "step_0000001"
    for rank in (0, 1):  # both ranks reach the same verdict
        assert f"rank {rank}: checkpoint {folder} is corrupt: __1_0.distcp has size 9 bytes" in result.stdout
        assert (f"rank {rank}: rank 0 could not read the checkpoint folder: [Errno 2] No such file or directory: "
                f"'{tmp_path / 'ckpt' / 'no-such-file'}'") in result.stdout


shutil_usage = namedtuple("usage", "total used free")


def test_a_full_disk_and_the_file_size_limit_are_named(tmp_path, monkeypatch):
    unexpected_pos = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert describe_failure(1, OSError(errno.EFBIG, "File too large"), tmp_path).startswith(
        "rank 1: a file reached the file-size limit")
    assert describe_failure(0, unexpected_pos, tmp_path).startswith("rank 0: RuntimeError: [enforce fail")
    (tmp_path / "__0_0.distcp").write_bytes(b"x" * 4096)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        assert describe_failure(0, unexpected_pos, tmp_path) == \
            "rank 0: a file reached the file-size limit (4096 bytes, ulimit -f)"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil_usage(total=1 << 30, used=1 << 30, free=0))
    assert describe_failure(0, unexpected_pos, tmp_path) == "rank 0: the disk is full (no space left on device)"
