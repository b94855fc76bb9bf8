"""What every study shares: the environment record, runs of the public CLIs, summaries and result files.

Studies train and evaluate only through `python -m pafm.train CONFIG key=value ...` and `python -m pafm.eval RUN ...`
(and use `pafm.objectives.Objective(...).targets(...)` for targets), so they keep working as the engine changes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "studies"


def parser(doc: str) -> argparse.ArgumentParser:
    """The options every study has; building it (every study's first step) also passes a SIGTERM on to the runs."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate_runs)
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny size for the tests (seconds, not meaningful)")
    p.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS}/<study>[-quick])")
    p.add_argument("--work", type=Path, default=None, help="where runs go (default OUT/runs, not committed)")
    return p


def environment(seeds) -> dict:
    """Date, device, versions and seeds: what a result file must say about where it came from."""
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    cpu = platform.processor() or platform.machine()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({cpu}, {os.cpu_count()} cores)"
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": device,
            "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "numpy": np.__version__, "commit": commit, "seeds": list(seeds), "threads": torch.get_num_threads()}


def out_dir(args, name: str) -> Path:
    out = args.out or RESULTS / (f"{name}-quick" if args.quick else name)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, obj) -> None:
    from pafm.files import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1))


_running: set[subprocess.Popen] = set()  # the runs `cli` has started and not yet seen end
_running_lock = threading.Lock()
_stopping = False  # set by the first SIGTERM; a plain flag: a handler re-entered inside Event.set() would deadlock
_main_in_lock = False  # the handler runs in the main thread: it must never wait for a lock that thread holds


def _terminate_runs(signum, frame):
    """SIGTERM to a study reaches its runs too: each trainer writes a checkpoint on it, and no run goes on without
    the study that would score it (a rerun of the study resumes them).  The study then ends with 143 and starts no
    further run.  A repeated signal changes nothing; a signal that finds the main thread holding the runs' lock is
    acted on as that thread lets go of it."""
    global _stopping
    if _stopping:
        return
    _stopping = True
    if not _main_in_lock:
        _end_study()


def _end_study():
    with _running_lock:
        runs = list(_running)
    for run in runs:
        run.terminate()
    for run in runs:  # waits as long as the trainers take to checkpoint
        try:  # waitid itself: the interrupted frame may hold the Popen's own lock inside its wait(); WNOWAIT leaves
            # the exit status to the thread that waits on the run (taking it would make its wait() report 0)
            while os.waitid(os.P_PID, run.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                time.sleep(0.05)
        except ChildProcessError:
            pass  # already reaped by the thread that waits on it
    os._exit(128 + signal.SIGTERM)


def _with_runs_locked(action):
    """action() under the runs' lock, telling the handler when the main thread holds it."""
    global _main_in_lock
    main = threading.current_thread() is threading.main_thread()
    if main:
        _main_in_lock = True  # before taking the lock and cleared after, so no signal finds it held unannounced
    try:
        with _running_lock:
            return action()
    finally:
        if main:
            _main_in_lock = False
            if _stopping:
                _end_study()


def cli(module: str, *args, log: Path | None = None) -> float:
    """Run `python -m module args...` with this checkout first on the path; seconds taken. Raises on failure."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    with open(log or os.devnull, "a") as f:
        def launch():
            if _stopping:
                raise RuntimeError(f"python -m {module}: not started, the study is ending (SIGTERM)")
            run = subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env, stdout=f,
                                   stderr=subprocess.STDOUT)
            _running.add(run)
            return run

        run = _with_runs_locked(launch)
        try:
            returncode = run.wait()
        finally:
            _with_runs_locked(lambda: _running.discard(run))
    if returncode != 0:
        raise RuntimeError(f"python -m {module} {' '.join(map(str, args))} failed ({returncode}); see {log}")
    return time.perf_counter() - start


def train(config: str, run_dir: Path, overrides: list[str]) -> dict:
    """Train (or resume) a run; its losses from metrics.jsonl and the wall time of this call.  The recipe's
    evaluation during training is off: a study scores its runs with its own protocol (`evaluate`), and the time per
    step it reports is training's alone."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    seconds = cli("pafm.train", config, f"run.dir={run_dir}", "eval.every=0", *overrides,
                  log=run_dir.parent / f"{run_dir.name}.log")
    return {"seconds": seconds, **logged_curve(run_dir)}


def logged_curve(run_dir: Path, upto: int | None = None) -> dict:
    """Steps, losses and seconds per step from a run's metrics.jsonl, up to step `upto` when given."""
    from pafm.logger import read_metrics  # local, as the other pafm imports here: importing common stays light

    rows = read_metrics(run_dir / "metrics.jsonl", upto)  # the engine's reader: a torn line is dropped, not fatal
    return {"steps": [r["step"] for r in rows if "loss" in r], "loss": [r["loss"] for r in rows if "loss" in r],
            "fm_loss": [r["fm_loss"] for r in rows if "fm_loss" in r],
            "sec_per_step": [r["sec_per_step"] for r in rows if "sec_per_step" in r]}


def evaluate(run_dir: Path, overrides: list[str], out: Path | None = None) -> dict:
    """pafm.eval on a run's EMA export, results in `out` (default RUN/eval); its eval.json."""
    out = out or run_dir / "eval"
    cli("pafm.eval", run_dir, f"eval.out_dir={out}", *overrides, log=run_dir.parent / f"{run_dir.name}.eval.log")
    return json.loads((out / "eval.json").read_text())


def mean_spread(values) -> dict:
    """Mean, sample standard deviation and the values themselves."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": v.tolist()}


def t_bin_labels(bins: int = 5) -> list[str]:
    return [f"[{i / bins:.1f}, {(i + 1) / bins:.1f})" for i in range(bins)]


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def loader_and_objective(spec: str, settings: dict, batch_size: int, seed: int = 0, device="cpu"):
    """(dataset info, loader, Objective) for a PAFM source setting ({"source": ..., ...}) or {"kind": "fm"}, built
    as the trainer builds them (one rank, no flips, neighbours loaded for the neighbours source)."""
    from pafm.data import LatentLoader, open_dataset
    from pafm.objectives import Objective, ObjectiveConfig, source_class

    dataset = open_dataset(spec)
    cfg = ObjectiveConfig(**{"kind": "pafm", **settings})
    loader = LatentLoader(dataset, batch_size, rank=0, world_size=1, seed=seed, flip=False,
                          neighbors=source_class(cfg).loader_neighbors(cfg))
    objective = Objective(cfg, dataset.info, device, loader=loader)
    return dataset.info, loader, objective


def applies(info: dict, settings: dict) -> bool:
    """False for a source the dataset cannot feed (re-samples need stored moments)."""
    return not (settings.get("source") == "resample" and not info["has_moments"])
