"""Every user error of pafm.sample, pafm.eval and pafm.prep: exit code 2, one line on stderr naming the problem, no
traceback, and no work done first.  The CLIs run in-process through main(argv); one case runs under torchrun."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pafm.eval import main as eval_main
from pafm.export import save_export
from pafm.models import build_model
from pafm.prep import build_parser, record_settings
from pafm.prep import main as prep_main
from pafm.sample import main as sample_main

DIGITS_INFO = {"kind": "class", "latent_shape": [1, 8, 8], "num_classes": 10, "class_names": None,
               "normalization": {"shift": [0.0], "scale": [1.0]}, "encoder": {"kind": "identity"}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A run with a tiny SiT export, a checkpoint, a corrupt export, a tiny CLIP config, image folders."""
    root = tmp_path_factory.mktemp("cli")
    model = build_model("SiT-T/2", input_size=8, in_channels=1, num_classes=10, depth=1, hidden_size=32, num_heads=2)
    meta = {"model": model.config, "data": {"spec": "builtin:digits", "info": DIGITS_INFO}, "path": "linear",
            "step": 10}
    save_export(root / "run" / "ema.safetensors", model.state_dict(), meta)
    (root / "run" / "checkpoints" / "step_0000010").mkdir(parents=True)
    (root / "run" / "checkpoints" / "step_0000010" / "manifest.json").write_text("{}")
    (root / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    from transformers import CLIPTextConfig

    CLIPTextConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                   max_position_embeddings=12).save_pretrained(root / "clip")  # config.json only: no weights needed
    (root / "vae").mkdir()  # refused before any VAE loads, so an empty folder stands in
    from PIL import Image

    (root / "images" / "n01").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(root / "images" / "n01" / "a.png")
    (root / "captions").mkdir()
    Image.new("RGB", (16, 16)).save(root / "captions" / "a.png")
    (root / "captions" / "a.txt").write_text("a black square")
    old = ["imagenet", str(root / "images"), str(root / "started"), "--vae", str(root / "vae"), "--shard-size", "5"]
    (root / "started").mkdir()
    record_settings(build_parser().parse_args(old), root / "started")  # an output folder begun with --shard-size 5
    return root



CASES = {
    # name: (main, argv builder, words the single stderr line must hold)
    "sample: missing run folder": (sample_main, lambda r: [str(r / "nothing-here")],
                                   ["nothing-here", "does not exist"]),
    "sample: checkpoint instead of export": (
        sample_main, lambda r: [str(r / "run" / "checkpoints" / "step_0000010")],
        ["training checkpoint", "ema.safetensors", str(Path("run"))]),
    "sample: corrupt export": (sample_main, lambda r: [str(r / "corrupt.safetensors")],
                               ["corrupt.safetensors", "not a readable safetensors file"]),
    "sample: unknown --labels class": (sample_main, lambda r: [str(r / "run"), "--labels", "3,12"],
                                       ["--labels", "12", "[0, 10)"]),
    "sample: unknown --labels name": (sample_main, lambda r: [str(r / "run"), "--labels", "seven"],
                                      ["--labels", "'seven'"]),
    "sample: prompts for a class model": (sample_main, lambda r: [str(r / "run"), "--prompt", "a cat"],
                                          ["prompts", "class-conditional", "--labels"]),
    "sample: bad --num": (sample_main, lambda r: [str(r / "run"), "--num", "0"], ["--num", "positive"]),
    "sample: unwritable --out format": (sample_main, lambda r: [str(r / "run"), "--out", str(r / "g.xyz")],
                                        ["--out", ".xyz"]),
    "sample: NaN --cfg": (sample_main, lambda r: [str(r / "run"), "--cfg", "nan"],
                          ["--cfg", "must be in [0, 100]", "got nan"]),
    "sample: negative --cfg": (sample_main, lambda r: [str(r / "run"), "--cfg", "-2"], ["--cfg", "got -2"]),
    "sample: no --steps": (sample_main, lambda r: [str(r / "run"), "--steps", "0"], ["--steps", "got 0"]),
    "sample: more guided channels than the latents": (
        sample_main, lambda r: [str(r / "run"), "--cfg-channels", "3"], ["--cfg-channels=3: must be <= 1"]),
    "sample: --out below a file": (
        sample_main, lambda r: [str(r / "run"), "--out", str(r / "corrupt.safetensors" / "g.png")],
        ["--out", "corrupt.safetensors is a file, not a folder"]),
    "eval: missing export": (eval_main, lambda r: [str(r / "nothing-here")], ["nothing-here", "does not exist"]),
    "eval: config typo": (eval_main, lambda r: [str(r / "run"), "eval.num_sample=10"],
                          ["eval.num_sample", "did you mean eval.num_samples"]),
    "eval: bad sampler value": (eval_main, lambda r: [str(r / "run"), "sampler.steps=0"],
                                ["sampler.steps=0: must be in [1, 100000]"]),
    "eval: NaN guidance": (eval_main, lambda r: [str(r / "run"), "sampler.cfg_scale=nan"],
                           ["sampler.cfg_scale=nan: must be a finite number in [0, 100]"]),
    "eval: no samples": (eval_main, lambda r: [str(r / "run"), "eval.num_samples=0"],
                         ["eval.num_samples=0: must be in [1, 10000000]"]),
    "eval: more guided channels than the latents": (
        eval_main, lambda r: [str(r / "run"), "sampler.cfg_channels=2"], ["sampler.cfg_channels=2: must be <= 1"]),
    "eval: missing inception weights": (
        eval_main, lambda r: [str(r / "run"), "eval.metrics=[isc]", f"eval.inception_weights={r / 'inc.pth'}"],
        ["eval.inception_weights", str(Path("inc.pth")), "does not exist"]),
    "eval: missing reference": (
        eval_main, lambda r: [str(r / "run"), "eval.metrics=[fid]", f"eval.reference={r / 'ref.npz'}"],
        ["eval.reference", "ref.npz", "does not exist"]),
    "prep: missing input folder": (
        prep_main, lambda r: ["imagenet", str(r / "nothing-here"), str(r / "out"), "--vae", str(r / "vae")],
        ["input folder", "nothing-here", "does not exist"]),
    "prep: missing --vae": (
        prep_main, lambda r: ["imagenet", str(r / "images"), str(r / "out"), "--vae", str(r / "no-vae")],
        ["--vae", "no-vae", "does not exist"]),
    "prep: --max-text-len beyond the encoder": (
        prep_main, lambda r: ["captions", str(r / "captions"), str(r / "out"), "--vae", str(r / "vae"),
                              "--text-encoder", str(r / "clip"), "--max-text-len", "20"],
        ["--max-text-len 20", "12 positions", "max_position_embeddings", str(Path("clip"))]),
    "prep: output started with other settings": (
        prep_main, lambda r: ["imagenet", str(r / "images"), str(r / "started"), "--vae", str(r / "vae"),
                              "--shard-size", "4"],
        ["started", "other settings", "shard_size=5/4"]),
    "prep: bad --shard-size": (
        prep_main, lambda r: ["imagenet", str(r / "images"), str(r / "out"), "--vae", str(r / "vae"),
                              "--shard-size", "0"], ["--shard-size", "positive"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_is_one_line_and_exit_code_2(name, files, tmp_path, capsys):
    main, argv, words = CASES[name]
    argv = argv(files)
    if main is eval_main:
        argv.append(f"eval.out_dir={tmp_path / 'eval'}")
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert all(w in lines[0] for w in words), (lines[0], words)
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "eval").exists()  # checked before sampling: no chunk written, no folder made
    assert not (files / "out").exists()  # prep: nothing written before the inputs were checked
    assert not (files / "g.png").exists()


def _agree_rank(rank, port, results):
    import torch.distributed as dist

    from pafm.cli import SharedError, all_ranks_agree, report_error

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)

    def check():
        if rank == 1:
            raise FileNotFoundError("only rank 1 lacks /data/x")
        return "fine"

    try:
        all_ranks_agree(check)
        results.put((rank, "no error"))
    except SharedError as err:
        results.put((rank, str(err), report_error(err)))
    finally:
        dist.destroy_process_group()


def test_an_error_seen_by_one_rank_stops_every_rank(capfd):
    """Rank 1 alone fails a check: both ranks raise its message (rank 0 then reports it) instead of rank 0 waiting
    in the next collective for a rank that left."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_agree_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    got = sorted(results.get(timeout=5) for _ in range(2))
    assert got == [(0, "only rank 1 lacks /data/x", 2), (1, "only rank 1 lacks /data/x", 2)]
    err = capfd.readouterr().err
    assert err.count("only rank 1 lacks") == 1  # printed by rank 0 only


@pytest.mark.slow
def test_eval_error_under_torchrun_is_reported_once_before_anything_else(files, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pafm.eval",
           str(files / "run"), "eval.metrics=[isc]", f"eval.inception_weights={tmp_path / 'inc.pth'}",
           f"eval.out_dir={tmp_path / 'eval'}", "eval.device=cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if "eval.inception_weights" in line]
    assert len(ours) == 1 and ours[0].startswith("error: ")  # rank 0 only; torchrun's own summary follows it
    first = next(line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("W"))
    assert first == ours[0], proc.stderr[-3000:]
    assert not (tmp_path / "eval").exists()


def test_one_error_path_maps_each_exception_to_a_code_and_a_line(capsys, monkeypatch):
    """`cli.report_error`, the path of every command line and of the trainer's `_main`: the exit code by exception
    type, who prints, and a bug raised again with its traceback."""
    from pafm.cli import SharedError, exit_code, report_error
    from pafm.run_lock import RunDirInUse
    from pafm.train import SetupError, TrainingStopped

    peer = RuntimeError("[../third_party/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5\nmore")
    assert [exit_code(e) for e in (TrainingStopped("x"), SetupError("x"), RunDirInUse("x"), ValueError("x"),
                                   FileNotFoundError("x"), peer, KeyError("x"), RuntimeError("x"))] == \
        [3, 2, 2, 2, 2, 1, None, None]
    with pytest.raises(KeyError, match="a bug"):
        report_error(KeyError("a bug"))
    assert capsys.readouterr().err == ""
    assert report_error(OSError(28, "No space left on device"), rank=1, after_os_error="; kept") == 2
    assert capsys.readouterr().err == "error (rank 1): [Errno 28] No space left on device; kept\n"
    assert report_error(peer, rank=0) == 1
    assert capsys.readouterr().err == ("error (rank 0): a collective failed, most likely because another rank "
                                       "stopped: [../third_party/gloo/transport/tcp/pair.cc:534] Connection closed "
                                       "by peer [127.0.0.1]:5\n")
    assert report_error(TrainingStopped("3 non-finite steps in a row")) == 3
    assert capsys.readouterr().err == "error: 3 non-finite steps in a row\n"
    monkeypatch.setenv("RANK", "0")
    assert report_error(SharedError("data.spec: no such folder"), label="config error") == 2
    assert capsys.readouterr().err == "config error: data.spec: no such folder\n"
    monkeypatch.setenv("RANK", "1")  # every rank raised it: rank 0 alone prints
    assert report_error(SharedError("data.spec: no such folder")) == 2
    assert capsys.readouterr().err == ""
