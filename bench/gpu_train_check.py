"""The trainer's CUDA path end to end, unattended, in at most 3 minutes: the recipe's launch, shrunk.

    python bench/gpu_train_check.py --out DIR [--deadline-s 150] [--dry-run] [--set KEY=VALUE ...]

Rows go to DIR/gpu_check.jsonl in bench/gpu_check.py's format (device, versions, date, item), one per stage and each
written as the stage finishes, so a stage that fails leaves the others' rows; every process's output is kept in
DIR/train_check/*.log. Stages:

  train_shards      synthetic ImageNet-shaped data written by the project's shard writer (pafm.data.ShardWriter):
                    VAE-style moments (mean, std; float16 like `pafm.prep`) of 32x32 latents, both views, 1000 classes.
                    3 channels, not SD-VAE's 4: with no VAE on the machine the identity decoder must give RGB images
                    that Inception can score (D = 3072 instead of 4096; every code path is the same)
  train_run         `torchrun --nproc_per_node=1 -m pafm.train configs/imagenet_sit_b2.yaml` with the recipe's
                    settings (SiT-B/2, bf16, compile per block, background checkpoints with pinned staging, the class
                    bank) and fewer steps, a checkpoint every 10 steps, a log row every step (run A); beside it the
                    same run B, killed (SIGKILL, the whole process group) once a checkpoint of it is complete
  train_compile     dynamo's recompile and graph-break log lines of run A (TORCH_LOGS), counted, and whether the
                    recompile limit was hit (a block then runs eager)
  train_throughput  images/s, TFLOP/s and MFU of every step of run A (its metrics.jsonl)
  train_resume      run B resumed from its newest complete checkpoint to A's last step; the losses of the resumed
                    steps against A's, step by step
  train_grid        run A's preview grid of its last step
  train_eval        `python -m pafm.eval` on A's EMA export: FID of a few hundred samples against the shards' images,
                    with a random-weight Inception file written here (needs torch-fidelity: README says how to carry
                    its wheel to a bare machine)

--dry-run: the same stages on the CPU with a tiny model in fp32 and 8x8 latents (tests/test_gpu_train_check.py).
--set: extra trainer overrides for both runs (train.activation_checkpointing=true puts activation checkpointing
under the block compile and FSDP2, as the SiT-XL/2 recipe has it); the train_run row lists the whole command.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]  # this checkout's pafm, and gpu_check beside this file
from gpu_check import ROWS_FILE, _emit, _now  # noqa: E402

RECIPE = ROOT / "configs" / "imagenet_sit_b2.yaml"
# One line per event in what dynamo writes under TORCH_LOGS=recompiles,graph_breaks, and its warning that a function
# hit the recompile limit (dynamo then runs it eager for the rest of the run; cache_size_limit: the older name).
RECOMPILE_MARK, GRAPH_BREAK_MARK = "[__recompiles] Recompiling function", "[__graph_breaks] Graph break"
LIMIT_MARKS = ("hit config.recompile_limit", "hit config.cache_size_limit")


class Setup:
    """The shrunk recipe: sizes on a GPU, and tiny ones for the CPU dry run."""

    def __init__(self, dry_run: bool, extra: list[str] = ()):
        self.dry_run, self.extra = dry_run, list(extra)
        if dry_run:
            self.items, self.classes, self.size, self.channels = 64, 10, 8, 3
            self.batch, self.steps, self.every, self.bank_per_class = 8, 6, 2, 4
            self.model = ["model.name=SiT-T/2", "model.kwargs.depth=2", "model.kwargs.hidden_size=64",
                          "model.kwargs.num_heads=2"]
            self.device, self.precision, self.samples, self.eval_batch, self.sample_steps = "cpu", "fp32", 20, 10, 2
        else:
            self.items, self.classes, self.size, self.channels = 4096, 1000, 32, 3
            self.batch, self.steps, self.every, self.bank_per_class = 256, 60, 10, 64
            self.model = []  # the recipe's SiT-B/2
            self.device, self.precision, self.samples, self.eval_batch, self.sample_steps = "cuda", "bf16", 384, 128, 8

    def overrides(self, data: Path, run_dir: Path, steps: int) -> list[str]:
        return [f"run.dir={run_dir}", f"data.spec={data}", f"data.batch_size={self.batch}", "data.num_workers=2",
                f"objective.bank_per_class={self.bank_per_class}", f"train.steps={steps}", "train.resume=auto",
                f"train.device={self.device}", f"train.precision={self.precision}", "train.compile=true",
                f"checkpoint.every={self.every}", "checkpoint.keep=2", "checkpoint.async_save=true",
                "log.every=1", "log.sample_every=0", f"log.sample_steps={self.sample_steps}", "log.tensorboard=false",
                "log.progress=false", *self.model, *self.extra]


class Check:
    def __init__(self, out: Path, deadline: float, setup: Setup):
        import torch

        self.out, self.deadline, self.setup = out, deadline, setup
        self.logs = out / "train_check"
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        on_gpu = not setup.dry_run and torch.cuda.is_available()
        self.header = {"device": torch.cuda.get_device_name() if on_gpu else "cpu (dry run)",
                       "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda}

    def emit(self, item: str, **fields):
        _emit(self.out, {**self.header, "date": _now(), "item": item, **fields})

    def left(self) -> float:
        return self.deadline - time.time()

    def stage(self, item: str, fn, *args):
        """Runs one stage; its exception becomes its row (the later stages still run)."""
        start = time.time()
        try:
            fields = fn(*args)
        except Exception as e:  # noqa: BLE001 - a failing stage is a result
            fields = {"error": repr(e)[:800], "ok": False}
        if fields is not None:
            self.emit(item, seconds=round(time.time() - start, 1), **fields)
        return fields


# --- processes -----------------------------------------------------------------------------------------------------
def child_env(compile_logs: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("TRITON_INTERPRET", None)  # the trainer runs the op's reference on the CPU, the kernels on CUDA
    if compile_logs:
        env["TORCH_LOGS"] = "recompiles,graph_breaks"
    return env


def start(cmd: list[str], log: Path, compile_logs: bool = False) -> subprocess.Popen:
    """A process in its own process group (a kill reaches torchrun's worker too), output to `log`."""
    handle = open(log, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(compile_logs), stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True)
    handle.close()
    return proc


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc): torchrun's worker may leave torchrun's process group, and its loader
    workers follow it."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def kill(proc: subprocess.Popen):
    """SIGKILL to the process and everything below it, as a crash or an out-of-memory kill would: no handler runs,
    no final checkpoint is written. Returns once they are gone."""
    pids = descendants(proc.pid) if proc.poll() is None else []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    gone_by = time.time() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.time() < gone_by:
        time.sleep(0.05)


def finish(proc: subprocess.Popen, check: Check, reserve: float = 0.0):
    """The exit code, or "timeout" (the process tree killed) once only `reserve` seconds are left."""
    try:
        return proc.wait(timeout=max(1.0, check.left() - reserve))
    except subprocess.TimeoutExpired:
        kill(proc)
        return "timeout"


def train_command(setup: Setup, data: Path, run_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "pafm.train",
            str(RECIPE), *setup.overrides(data, run_dir, steps)]


def tail(log: Path, chars: int = 1200) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def step_records(run_dir: Path) -> dict[int, dict]:
    """Step -> the newest metrics.jsonl record of that step (a resumed run's records replace the killed run's)."""
    records = {}
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "loss" in record:
                records[int(record["step"])] = record
    return records


# --- stages --------------------------------------------------------------------------------------------------------
def write_shards(setup: Setup, folder: Path) -> dict:
    """Class-dependent means and a per-item posterior std, both views (the flipped copy second), as pafm.prep
    stores them; values inside [-1, 1] so that the identity decoder's images are the latents themselves."""
    import torch

    from pafm.data import ShardWriter

    g = torch.Generator().manual_seed(0)
    shape = (setup.channels, setup.size, setup.size)
    centres = 0.5 * torch.rand((setup.classes,) + shape, generator=g) - 0.25
    labels = torch.arange(setup.items) % setup.classes
    mean = (centres[labels] + 0.3 * torch.randn((setup.items,) + shape, generator=g)).clamp(-0.95, 0.95)
    views = torch.stack([mean, mean.flip(-1)], 1).half()
    writer = ShardWriter(folder, shard_size=1024 if not setup.dry_run else 32)
    writer.add(mean=views, std=torch.full_like(views, 0.05), label=labels)
    index = writer.close({"kind": "class", "split": "train", "latent_shape": list(shape),
                          "num_classes": setup.classes, "class_names": [f"class {c}" for c in range(setup.classes)],
                          "normalization": {"shift": [0.0] * setup.channels, "scale": [1.0] * setup.channels},
                          "encoder": {"kind": "identity"}})
    # The reference images for FID: the stored (unflipped) means as uint8 NHWC, ADM's format.
    import numpy as np

    images = ((mean.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(folder.parent / "reference.npz", arr_0=images[:setup.samples])
    return {"items": setup.items, "classes": setup.classes, "latent": list(shape), "dtype": "float16",
            "shards": len(index["shards"]), "views": 2, "ok": True}


def run_pair(check: Check, data: Path) -> dict:
    """Runs A to its end and B until a checkpoint of it is complete; kills B and starts its resume at once (beside
    A: the resume overlaps A's remaining steps). Keeps what the later stages need on `check`."""
    from pafm.checkpoint import complete_checkpoints

    def newest_complete():  # a manifest written last: cheap to poll, and the trainer verifies it when it resumes
        found = complete_checkpoints(check.run_b / "checkpoints")
        return found[-1][1] if found else None

    setup = check.setup
    check.run_a, check.run_b = check.logs / "run_a", check.logs / "run_b"
    log_a, log_b = check.logs / "run_a.log", check.logs / "run_b.log"
    start_time = time.time()
    proc_a = start(train_command(setup, data, check.run_a, setup.steps), log_a, compile_logs=True)
    # B's own last step is far past A's, so that the kill lands in a running trainer.
    proc_b = start(train_command(setup, data, check.run_b, 100 * setup.steps), log_b)
    killed_at = None
    while proc_b.poll() is None and check.left() > 0:
        if newest_complete() is not None:
            kill(proc_b)
            killed_at = round(time.time() - start_time, 1)
            break
        time.sleep(0.05)
    b_code = "killed" if killed_at is not None else proc_b.poll()
    kill(proc_b)
    b_logged = max(step_records(check.run_b), default=None)
    check.resumed_from = newest_complete()
    if check.resumed_from is not None:
        check.resume_start = time.time()
        check.resume_proc = start(train_command(setup, data, check.run_b, setup.steps),
                                  check.logs / "run_b_resume.log")
    # Leave the evaluation its time.
    a_code = check.a_code = finish(proc_a, check, reserve=30.0 if not setup.dry_run else 20.0)
    text = log_a.read_text(errors="replace") if log_a.exists() else ""
    done = [line for line in text.splitlines() if line.startswith("done:")]
    warnings = [line[:300] for line in text.splitlines() if line.startswith("warning")]
    checkpoints = sorted(p.name for p in (check.run_a / "checkpoints").glob("step_*"))
    command = train_command(setup, data, check.run_a, setup.steps)[1:]
    fields = {"command": " ".join(command).replace(str(ROOT) + os.sep, ""), "run_a_exit": a_code,
              "run_a_seconds": round(time.time() - start_time, 1), "run_a_done": done[-1] if done else None,
              "run_a_checkpoints": checkpoints, "run_a_warnings": warnings[:5], "run_b_exit": b_code,
              "run_b_killed_after_s": killed_at, "run_b_last_logged_step": b_logged,
              "run_b_newest_complete": check.resumed_from.name if check.resumed_from else None,
              # no step skipped, no side work (grid, export) and no checkpoint failed
              "ok": a_code == 0 and done[-1:] == [f"done: step {setup.steps} (0 skipped)"] and killed_at is not None}
    if a_code != 0:
        fields["run_a_tail"] = tail(log_a)
    return fields


def count_compile_events(lines: list[str]) -> dict:
    """Recompiles, graph breaks and recompile-limit hits in a process's output, with the first few of them (and the
    lines after each, where dynamo gives the reason)."""
    found = {"recompiles": [], "graph_breaks": [], "recompile_limit_hit": []}
    for n, line in enumerate(lines):
        for key, marks in (("recompiles", (RECOMPILE_MARK,)), ("graph_breaks", (GRAPH_BREAK_MARK,)),
                           ("recompile_limit_hit", LIMIT_MARKS)):
            if any(mark in line for mark in marks):
                found[key].append(" | ".join(part.split("] ")[-1].strip() for part in lines[n:n + 3])[:400])
    examples = found["recompile_limit_hit"][:2] + found["recompiles"][:2] + found["graph_breaks"][:2]
    return {**{key: len(events) for key, events in found.items()}, "examples": examples}


def compile_logs(check: Check) -> dict:
    counts = count_compile_events((check.logs / "run_a.log").read_text(errors="replace").splitlines())
    return {"torch_logs": "recompiles,graph_breaks", **counts, "ok": counts["recompile_limit_hit"] == 0}


def throughput(check: Check) -> dict:
    records = step_records(check.run_a)
    if not records:
        return {"error": "run A logged no step", "ok": False}
    steps = sorted(records)
    # Checkpoint steps wait for the state's CPU copy; the first steps compile.
    steady = [records[s] for s in steps[3:] if s % check.setup.every]
    per_step = {s: {k: round(records[s][k], 4) for k in ("images_per_s", "sec_per_step", "mfu") if k in records[s]}
                for s in steps}
    fields = {"steps": len(steps), "batch": check.setup.batch, "per_step": per_step}
    if steady:
        fields["median_images_per_s"] = statistics.median(r["images_per_s"] for r in steady)
        fields["median_tflops_per_device"] = statistics.median(r["tflops_per_device"] for r in steady)
        fields["median_mfu"] = statistics.median(r["mfu"] for r in steady) if "mfu" in steady[0] else None
        fields["peak_memory_gb"] = max(r.get("peak_memory_gb") or 0 for r in steady)
    fields["ok"] = len(steps) == check.setup.steps and all(math.isfinite(records[s]["loss"]) for s in steps)
    return fields


def resume(check: Check) -> dict:
    """Waits for B's resume (started by `run_pair`) and compares its losses with A's step by step."""
    if check.resumed_from is None:
        return {"error": "run B has no complete checkpoint to resume from", "ok": False}
    log = check.logs / "run_b_resume.log"
    code = finish(check.resume_proc, check)
    a, b = step_records(check.run_a), step_records(check.run_b)
    # The step the trainer says it resumed at (it must be the newest complete checkpoint left by the kill).
    said = [line for line in tail(log, 1 << 20).splitlines() if line.startswith("resumed from")]
    from_step = int(said[0].rsplit(" ", 1)[-1]) if said else int(check.resumed_from.name.split("_")[-1])
    compared = [s for s in range(from_step + 1, check.setup.steps + 1) if s in a and s in b]
    diffs = [abs(b[s]["loss"] - a[s]["loss"]) / max(abs(a[s]["loss"]), 1e-12) for s in compared]
    # Bitwise equality on the CPU; on CUDA, atomics in the backward may reorder sums (bf16 autocast on top).
    tol = 0.0 if check.setup.dry_run else 1e-2
    fields = {"newest_complete_after_kill": check.resumed_from.name, "trainer_says": said[0][:300] if said else None,
              "exit": code,
              "resume_seconds": round(time.time() - check.resume_start, 1), "steps_compared": len(compared),
              "identical_steps": sum(d == 0 for d in diffs), "max_rel_loss_diff": max(diffs) if diffs else None,
              "tol": tol, "losses_a": [a[s]["loss"] for s in compared],
              "losses_resumed": [b[s]["loss"] for s in compared],
              "ok": code == 0 and bool(said) and check.resumed_from.name in said[0] and bool(compared)
              and len(compared) == check.setup.steps - from_step and max(diffs) <= tol}
    if code != 0:
        fields["tail"] = tail(log)
    return fields


def grid(check: Check) -> dict:
    from PIL import Image

    path = check.run_a / "samples" / f"step_{check.setup.steps:07d}.png"
    if not path.exists():
        return {"error": f"no grid at {path.name} (run A exit {check.a_code})", "ok": False}
    with Image.open(path) as image:
        width, height = image.size
        extremes = image.convert("L").getextrema()
    return {"file": path.name, "width": width, "height": height, "ok": width > 0 and extremes[0] != extremes[1]}


def start_evaluation(check: Check) -> dict | None:
    """Starts `pafm.eval` on A's export (beside B's resume); None when started, else the stage's row."""
    from pafm.export import EXPORT_NAME
    from pafm.metrics import write_random_inception

    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return {"skipped": "torch-fidelity is not installed (README: carry its wheel)", "ok": False}
    if not (check.run_a / EXPORT_NAME).is_file():
        return {"error": f"run A wrote no {EXPORT_NAME} (exit {check.a_code})", "ok": False}
    setup = check.setup
    weights = write_random_inception(check.logs / "inception_random.pth")
    check.eval_out = check.logs / "eval"
    cmd = [sys.executable, "-m", "pafm.eval", str(check.run_a), f"eval.num_samples={setup.samples}",
           f"eval.batch_size={setup.eval_batch}", "eval.metrics=[fid]",
           f"eval.reference={check.logs / 'reference.npz'}", f"eval.inception_weights={weights}",
           f"eval.out_dir={check.eval_out}", f"eval.device={setup.device}",
           "sampler.method=euler", f"sampler.steps={setup.sample_steps}"]
    check.eval_start = time.time()
    check.eval_proc = start(cmd, check.logs / "eval.log")
    return None


def evaluation(check: Check) -> dict:
    if check.eval_proc is None:
        return check.eval_problem
    code = finish(check.eval_proc, check)
    path = check.eval_out / "eval.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    fid = (report.get("metrics") or {}).get("fid")
    fields = {"exit": code, "eval_seconds": round(time.time() - check.eval_start, 1), "samples": check.setup.samples,
              "sampler": f"euler-{check.setup.sample_steps}", "inception": "random weights", "fid": fid,
              "timings": report.get("timings"), "ok": code == 0 and fid is not None and math.isfinite(fid)}
    if code != 0:
        fields["tail"] = tail(check.logs / "eval.log")
    return fields


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.jsonl and train_check/")
    parser.add_argument("--deadline-s", type=float, default=150.0)
    parser.add_argument("--dry-run", action="store_true", help="CPU, a tiny model, fp32, 8x8 latents")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra trainer override for both runs, e.g. train.activation_checkpointing=true")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    check = Check(out, time.time() + args.deadline_s, Setup(args.dry_run, args.set))
    check.a_code, check.resumed_from, check.eval_proc = None, None, None
    data = out / "train_check" / "shards"
    if check.stage("train_shards", write_shards, check.setup, data).get("ok"):
        check.stage("train_run", run_pair, check, data)
        check.stage("train_compile", compile_logs, check)
        check.stage("train_throughput", throughput, check)
        check.stage("train_grid", grid, check)
        try:
            check.eval_problem = start_evaluation(check)
        except Exception as e:  # noqa: BLE001 - reported as the evaluation's row
            check.eval_problem = {"error": repr(e)[:800], "ok": False}
        check.stage("train_resume", resume, check)
        check.stage("train_eval", evaluation, check)
    print(f"rows in {out / ROWS_FILE}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
