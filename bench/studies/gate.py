"""The gate study: FM against PAFM (class bank; exact whole-class posterior) with `objective.t_range = [0, g]` for
g in {0.25, 0.5, 1.0}, paired by seed, at the recipe's length.

Every arm of one seed starts from the same weights and sees the same batches, times, noise and label dropout: the
trainer draws them from (seed, step) alone, so the arms differ only in the target.  The study checks that: each
arm's logged FM loss at step 1 (the same prediction of the same model on the same draws) must be bit-identical to
FM's, and the draws and batch ids at a few steps are compared in-process.

Per seed it records each arm's metrics (unguided and at the recipe's guidance), its loss curve and its cost per
step (seconds per step from metrics.jsonl); across seeds, each PAFM arm's mean paired difference to FM with a 95%
t interval and a two-sided sign test, and its FM loss at FM's wall-clock (the costlier of the two read at the step
it reaches in the other's time, by the measured cost per step).  Runs go seeds outermost, `--jobs` at a time;
results.json is rewritten after every finished run, and a rerun of the same command reuses finished runs (the trainer
returns at once, scores are read back) and continues a cut run from its last checkpoint (the engine's exact resume).

    python bench/studies/gate.py --work /work/studies-runs/gate --jobs 2                 # digits, 10 seeds
    python bench/studies/gate.py --datasets mnist --work /work/studies-runs/gate-mnist  # MNIST, 3 seeds (hours)
    python bench/studies/gate.py --quick                                                # seconds, for the tests

`--arms` and `--seeds` narrow a study (FM always runs); `--finished-only` summarises the runs that have trained and
been scored while others still train (in another process on the same --work).  Either replaces the dataset's entry in
OUT/results.json with what it ran or read back.
"""
from __future__ import annotations

import json
import math
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np

from common import environment, evaluate, logged_curve, out_dir, parser, plt, train, write_json

GATES = (0.25, 0.5, 1.0)


def arms(gates=GATES, sources=("bank", "exact")) -> dict[str, list[str]]:
    """Arm name -> config overrides. FM first: every other arm is compared with it."""
    out = {"fm": ["objective.kind=fm"]}
    for source in sources:
        for g in gates:
            out[f"{source}-g{g:g}"] = ["objective.kind=pafm", f"objective.source={source}",
                                       f"objective.t_range=[0.0,{g}]"]
    return out


ARMS = arms()


def only_arms(arm_table: dict, names) -> dict[str, list[str]]:
    """FM and the arms of `names`, in the table's order."""
    return {a: o for a, o in arm_table.items() if a == "fm" or a in names}
# metric -> +1 when larger is better, -1 when smaller is better
BETTER = {"accuracy": 1, "frechet_pixels": -1, "frechet_cnn": -1, "memorization": -1, "diversity": 0}
HEUN = ["sampler.method=heun", "sampler.steps=16"]
SIZES = {
    # The recipe as shipped (SiT-T/2, batch 128, 1,000 steps, its EMA and schedule); scored unguided and at the
    # recipe's preview guidance 1.5, 1,000 samples each (the digits default of pafm.eval).
    "digits": {"config": "configs/digits_sit.yaml", "steps": 1000, "seeds": list(range(10)), "samples": 1000,
               "extra": [], "checkpoint_every": 250,
               "samplers": {"cfg1.0": [*HEUN, "sampler.cfg_scale=1.0"], "cfg1.5": [*HEUN, "sampler.cfg_scale=1.5"]},
               "metrics": ("accuracy", "frechet_pixels", "memorization")},
    # MNIST: the recipe's model with 4x4-pixel patches (SiT-T/4, hidden 96: a quarter of SiT-T/2's cost per image)
    # and DiT's time scale (1000 t, which trains faster from scratch), batch 64 at a constant learning rate, for the
    # steps that take FM past 0.9 CNN accuracy unguided (estimated by mnist_steps.py, README "MNIST to a trained
    # model"); hours per run on one core, so it continues across sittings through the trainer's exact resume.
    "mnist": {"config": "configs/mnist_sit.yaml", "steps": 6000, "seeds": [0, 1, 2], "samples": 1000,
              "extra": ["model.name=SiT-T/4", "model.kwargs.time_scale=1000.0", "data.batch_size=64",
                        "optim.schedule=constant"],
              "checkpoint_every": 500,
              "samplers": {"cfg1.0": [*HEUN, "sampler.cfg_scale=1.0"], "cfg2.0": [*HEUN, "sampler.cfg_scale=2.0"]},
              "metrics": ("accuracy", "frechet_cnn", "memorization", "diversity")},
}
QUICK_ARMS = arms(gates=(0.5,), sources=("bank",))
QUICK = {"digits": {**SIZES["digits"], "steps": 3, "seeds": [0, 1], "samples": 20, "checkpoint_every": 3,
                    "extra": ["model.kwargs={hidden_size: 32, num_heads: 2, depth: 1}"],
                    "samplers": {"cfg1.0": ["sampler.method=euler", "sampler.steps=2", "sampler.cfg_scale=1.0"]}}}
CURVE_WINDOW = 20  # steps averaged per point of the stored loss curves (the runs log every step)


# --- statistics -----------------------------------------------------------------------------------------------------
def paired(differences, better: int) -> dict:
    """Mean paired difference (arm - FM) with its 95% t interval, and the two-sided sign test of `better`'s
    direction (ties dropped).  Fewer than two pairs: the mean alone."""
    from scipy.stats import t as student

    d = np.asarray(differences, dtype=np.float64)
    n = len(d)
    row = {"n": n, "mean_diff": float(d.mean()) if n else None, "ci95": None}
    if n >= 2:
        half = float(student.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n))
        row["ci95"] = [row["mean_diff"] - half, row["mean_diff"] + half]
    if better:
        wins, losses = int((better * d > 0).sum()), int((better * d < 0).sum())
        row.update(wins=wins, losses=losses, sign_p=sign_test(wins, losses))
    return row


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of `wins` against `losses` under p = 1/2."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n)


# --- pairing --------------------------------------------------------------------------------------------------------
def check_draws(spec: str, batch_size: int, seed: int, arm_names, steps=(0, 1, 500)) -> dict:
    """In-process: each arm's loader batch ids and (t, noise, dropout) at `steps`, built as the trainer builds them,
    compared with FM's.  Returns the largest difference found (0 when paired)."""
    from common import loader_and_objective
    from pafm.objectives import step_generator

    worst = 0.0
    reference = None
    for name in arm_names:
        settings = {"kind": "fm"} if name == "fm" else {"source": name.split("-")[0]}
        _, loader, objective = loader_and_objective(spec, settings, batch_size, seed=seed)
        seen = []
        for step in steps:
            ids = loader.maker.batch_ids(step)[1]
            draws = objective.draw(step_generator(seed, step, 0, "cpu"), batch_size, 0, 1, "cpu")
            seen.append((ids, draws.t, draws.noise, draws.drop))
        loader.close()
        if reference is None:
            reference = seen
            continue
        for (ids, t, noise, drop), (ids0, t0, noise0, drop0) in zip(seen, reference):
            if not np.array_equal(ids, ids0):
                worst = math.inf
            worst = max(worst, float((t - t0).abs().max()), float((noise - noise0).abs().max()),
                        float((drop != drop0).sum()))
    return {"steps": list(steps), "max_difference": worst}


def first_step_losses(runs: dict) -> dict:
    """Per seed, the largest difference of any arm's step-1 FM loss from FM's (0.0: bit-identical)."""
    out = {}
    for seed, by_arm in runs.items():
        if "fm" in by_arm:
            first = by_arm["fm"]["first_fm_loss"]
            out[seed] = max(abs(r["first_fm_loss"] - first) for r in by_arm.values())
    return out


# --- runs -----------------------------------------------------------------------------------------------------------
def downsample(curve: dict, window: int) -> dict:
    """Window means of a per-step curve (steps: the window's last step)."""
    steps = np.asarray(curve["steps"])
    out = {"steps": [], "loss": [], "fm_loss": []}
    for start in range(0, len(steps), window):
        part = slice(start, start + window)
        out["steps"].append(int(steps[part][-1]))
        for key in ("loss", "fm_loss"):
            out[key].append(float(np.mean(curve[key][part])))
    return out


def run_folder(work, name: str, arm: str, seed: int):
    return work / f"{name}-{arm}-s{seed}"


def score_file(run_dir, sampler: str):
    return run_dir / f"eval-{sampler}" / "eval.json"


def finished_and_scored(run_dir, size: dict) -> bool:
    """Trained all its steps and scored under every sampler: its trainer and evaluations have exited."""
    return (logged_curve(run_dir)["steps"][-1:] == [size["steps"]]
            and all(score_file(run_dir, sampler).is_file() for sampler in size["samplers"]))


def run_one(name: str, size: dict, arm: str, overrides: list[str], seed: int, work) -> dict:
    """Train (or resume, or find finished) one arm at one seed and score it under every sampler."""
    run_dir = run_folder(work, name, arm, seed)
    train_overrides = [f"train.steps={size['steps']}", f"train.seed={seed}",
                       f"checkpoint.every={size['checkpoint_every']}", "log.sample_every=-1", "log.every=1",
                       *overrides, *size["extra"]]
    seconds = train(size["config"], run_dir, train_overrides)["seconds"]
    curve = logged_curve(run_dir)
    if not curve["steps"] or curve["steps"][-1] != size["steps"]:
        raise RuntimeError(f"{run_dir}: metrics.jsonl ends at step {curve['steps'][-1:]} instead of {size['steps']}")
    metrics, reference = {}, {}
    for sampler, sampler_overrides in size["samplers"].items():
        scored = score_file(run_dir, sampler)
        report = json.loads(scored.read_text()) if scored.is_file() else evaluate(
            run_dir, [f"eval.num_samples={size['samples']}", f"eval.seed={seed}", "eval.batch_size=250",
                      *sampler_overrides], out=scored.parent)
        metrics[sampler], reference = report["metrics"], report["reference_metrics"]
    return {"seed": seed, "arm": arm, "train_seconds_this_call": seconds,
            "sec_per_step_median": float(np.median(curve["sec_per_step"])),
            "first_fm_loss": curve["fm_loss"][0], "final_fm_loss": float(np.mean(curve["fm_loss"][-CURVE_WINDOW:])),
            "curve": downsample(curve, CURVE_WINDOW), "metrics": metrics, "reference": reference}


def summarise(size: dict, runs: dict, arm_names) -> dict:
    """Per-seed tables and paired statistics over the seeds where both FM and the arm finished."""
    seeds = sorted(runs, key=int)
    tables, statistics = {}, {}
    for sampler in size["samplers"]:
        tables[sampler], statistics[sampler] = {}, {}
        for metric in size["metrics"]:
            tables[sampler][metric] = {arm: {s: runs[s][arm]["metrics"][sampler].get(metric)
                                             for s in seeds if arm in runs[s]} for arm in arm_names}
        for arm in arm_names[1:]:
            both = [s for s in seeds if arm in runs[s] and "fm" in runs[s]]
            statistics[sampler][arm] = {
                metric: paired([runs[s][arm]["metrics"][sampler][metric] - runs[s]["fm"]["metrics"][sampler][metric]
                                for s in both], BETTER[metric])
                for metric in size["metrics"] if all(metric in runs[s][arm]["metrics"][sampler] for s in both)}
            statistics[sampler][arm]["seeds"] = [int(s) for s in both]
    cost = {}
    for arm in arm_names:
        values = [runs[s][arm]["sec_per_step_median"] for s in seeds if arm in runs[s]]
        if values:
            cost[arm] = {"sec_per_step_median_over_seeds": float(np.median(values)), "per_seed": values}
    fm_cost = cost.get("fm", {}).get("sec_per_step_median_over_seeds")
    for row in cost.values():
        row["ratio_to_fm"] = row["sec_per_step_median_over_seeds"] / fm_cost if fm_cost else None
    equal_time = {arm: fm_loss_at_equal_time(runs, arm, cost[arm]["ratio_to_fm"])
                  for arm in arm_names[1:] if arm in cost and cost[arm]["ratio_to_fm"]}
    complete = [int(s) for s in seeds if set(arm_names) <= set(runs[s])]
    return {"complete_seeds": complete, "tables": tables, "paired": statistics, "cost": cost,
            "fm_loss_at_equal_time": equal_time, "first_step_fm_loss_difference": first_step_losses(runs)}


def fm_loss_at_equal_time(runs: dict, arm: str, ratio: float) -> dict:
    """The arm's FM loss against FM's after the same wall-clock on this machine, paired by seed: `ratio` is the arm's
    cost per step over FM's, so the slower of the two is read at its last stored curve point at or before steps / ratio
    (or steps x ratio) and the other at its last.  Negative differences: the arm is ahead at equal time."""
    seeds = [s for s in sorted(runs, key=int) if arm in runs[s] and "fm" in runs[s]]
    if not seeds:
        return {"ratio": ratio, "n": 0}
    end = runs[seeds[0]]["fm"]["curve"]["steps"][-1]
    arm_step, fm_step = (end / ratio, end) if ratio >= 1 else (end, end * ratio)

    def loss_at(curve, step):  # the last stored window ending at or before `step`
        ends = np.asarray(curve["steps"])
        i = int(np.searchsorted(ends, step, side="right")) - 1
        return (int(ends[i]), curve["fm_loss"][i]) if i >= 0 else (None, math.nan)

    rows = [(loss_at(runs[s][arm]["curve"], arm_step), loss_at(runs[s]["fm"]["curve"], fm_step)) for s in seeds]
    return {"ratio": ratio, "arm_step": rows[0][0][0], "fm_step": rows[0][1][0],
            **paired([a[1] - f[1] for a, f in rows], -1), "seeds": [int(s) for s in seeds]}


def plot(results: dict, path) -> None:
    pyplot = plt()
    names = [n for n, d in results["datasets"].items() if d.get("runs")]
    if not names:
        return
    fig, axes = pyplot.subplots(len(names), 4, figsize=(24, 4.5 * len(names)), squeeze=False)
    for (ax_curve, *ax_diffs, ax_cost), name in zip(axes, names):
        d = results["datasets"][name]
        arm_names = d["arms"]
        runs = d["runs"]
        for i, arm in enumerate(arm_names):
            curves = [r[arm]["curve"] for r in runs.values() if arm in r]
            if curves:
                mean = np.mean([c["fm_loss"] for c in curves], axis=0)
                ax_curve.plot(curves[0]["steps"], mean, color=f"C{i}", label=f"{arm} ({len(curves)} seeds)")
        ax_curve.set(title=f"{name}: FM loss of the prediction, mean over seeds", xlabel="step", ylabel="FM loss",
                     yscale="log")
        ax_curve.legend(fontsize=7)
        sampler = list(d["size"]["samplers"])[0]  # unguided, the headline of the README's tables
        stats = d["paired"][sampler]
        for ax_diff, metric in zip(ax_diffs, d["size"]["metrics"][:2]):  # accuracy, then the Frechet distance
            for i, arm in enumerate(arm_names[1:], 1):
                row = stats.get(arm, {}).get(metric)
                if row and row["ci95"]:
                    lo, hi = row["ci95"]
                    ax_diff.errorbar([i], [row["mean_diff"]], yerr=[[row["mean_diff"] - lo], [hi - row["mean_diff"]]],
                                     fmt="o", color=f"C{i}", capsize=4)
                if row:
                    values = [runs[str(s)][arm]["metrics"][sampler][metric]
                              - runs[str(s)]["fm"]["metrics"][sampler][metric] for s in stats[arm]["seeds"]]
                    ax_diff.plot([i + 0.15] * len(values), values, ".", color=f"C{i}", alpha=0.5)
            ax_diff.axhline(0.0, color="k", lw=1)
            ax_diff.set_xticks(range(1, len(arm_names)), arm_names[1:], rotation=30, fontsize=8)
            side = "above" if BETTER[metric] > 0 else "below"
            ax_diff.set(title=f"{name}: {metric} ({sampler}), arm - FM\nper seed, mean and 95% interval",
                        ylabel=f"difference in {metric} ({side} 0: better)")
        cost = d["cost"]
        ax_cost.bar(range(len(cost)), [c["sec_per_step_median_over_seeds"] for c in cost.values()],
                    color=[f"C{arm_names.index(a)}" for a in cost])
        ax_cost.set_xticks(range(len(cost)), list(cost), rotation=30, fontsize=8)
        ax_cost.set(title=f"{name}: seconds per step (median), {results['environment']['device']}",
                    ylabel="s / step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot.close(fig)


def run_dataset(name: str, size: dict, arm_table: dict, work, jobs: int, save, finished_only=False) -> dict:
    """Every (seed, arm), seeds outermost, `jobs` at a time; `save(runs)` after each finished run.  With
    `finished_only`, only the runs that have trained and been scored (their trainer returns at once, their scores
    are read back), so a study still training in another process is left alone."""
    runs: dict[str, dict] = {}
    lock = threading.Lock()
    failures = []

    def one(seed, arm):
        return run_one(name, size, arm, arm_table[arm], seed, work)

    with ThreadPoolExecutor(jobs) as pool:
        pairs = [(seed, arm) for seed in size["seeds"] for arm in arm_table
                 if not finished_only or finished_and_scored(run_folder(work, name, arm, seed), size)]
        futures = {pool.submit(one, seed, arm): (seed, arm) for seed, arm in pairs}
        for future in as_completed(futures):
            seed, arm = futures[future]
            try:
                row = future.result()
            except Exception as err:  # noqa: BLE001 - one failed run must not lose the others' results
                failures.append(f"{name} {arm} seed {seed}: {err}")
                print(failures[-1], file=sys.stderr, flush=True)
                continue
            print(f"{name} {arm} seed {seed}: {row['metrics']} ({row['sec_per_step_median']:.3f} s/step)", flush=True)
            with lock:
                runs.setdefault(str(seed), {})[arm] = row
                save(runs)
    return {"runs": runs, "failures": failures}


def run_study(study: str, out, work, sizes: dict, arm_table: dict, jobs: int, quick: bool,
              finished_only=False) -> int:
    """Every dataset of `sizes` through every arm; results.json (and the plot) in `out` after every run.  Exit
    status 1 when a run failed or the arms turned out not to be paired."""
    arm_names = list(arm_table)
    seeds = sorted({s for size in sizes.values() for s in size["seeds"]})
    results = {"study": study, "quick": quick, "environment": environment(seeds),
               "datasets": {}}
    previous = out / "results.json"
    if previous.is_file():  # datasets not rerun keep their rows
        old = json.loads(previous.read_text())
        results["datasets"] = {n: d for n, d in old["datasets"].items() if n not in sizes}
    failed = []
    for name, size in sizes.items():
        spec = {"digits": "builtin:digits", "mnist": "builtin:mnist"}[name]
        batch = next((int(o.split("=")[1]) for o in size["extra"] if o.startswith("data.batch_size=")), 128)
        pairing = {"draws": {str(s): check_draws(spec, batch, s, arm_names) for s in size["seeds"][:2]}}

        def save(runs, name=name, size=size, pairing=pairing):
            summary = summarise(size, runs, arm_names)
            first = summary.pop("first_step_fm_loss_difference")
            results["datasets"][name] = {"environment": results["environment"], "size": size, "arms": arm_names,
                                         "pairing": {**pairing, "first_step_fm_loss_difference": first},
                                         "runs": runs, **summary}
            write_json(out / "results.json", results)
            plot(results, out / f"{results['study']}.png")

        done = run_dataset(name, size, arm_table, work, jobs, save, finished_only)
        failed += done["failures"]
        first = results["datasets"].get(name, {}).get("pairing", {}).get("first_step_fm_loss_difference", {})
        unpaired = {s: v for s, v in first.items() if v != 0.0}
        if unpaired or any(r["max_difference"] for r in pairing["draws"].values()):
            failed.append(f"{name}: the arms are not paired (step-1 FM loss differences {unpaired}, draws "
                          f"{pairing['draws']})")
    if failed:
        print("\n".join(failed), file=sys.stderr)
        return 1
    for name in sizes:
        if name not in results["datasets"]:
            print(f"{name}: no finished run to summarise")
            continue
        d = results["datasets"][name]
        print(json.dumps({name: {s: {a: {m: (r["mean_diff"], r.get("ci95"), r.get("sign_p"))
                                         for m, r in row.items() if m != "seeds"}
                                     for a, row in stats.items()} for s, stats in d["paired"].items()}}, indent=1))
    return 0


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--datasets", nargs="+", choices=list(SIZES), default=["digits"])
    p.add_argument("--jobs", type=int, default=2, help="training processes at a time")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="only these seeds (default: the size's)")
    p.add_argument("--arms", nargs="+", choices=list(ARMS)[1:], default=None,
                   help="only these arms beside FM, which every arm is compared with (default: all)")
    p.add_argument("--finished-only", action="store_true",
                   help="summarise the runs that have trained and been scored; start no training or scoring")
    args = p.parse_args(argv)
    out = out_dir(args, "gate")
    sizes, arm_table = (QUICK, QUICK_ARMS) if args.quick else ({n: SIZES[n] for n in args.datasets}, ARMS)
    if args.seeds is not None:
        sizes = {n: {**s, "seeds": args.seeds} for n, s in sizes.items()}
    if args.arms is not None:
        if set(args.arms) - set(arm_table):
            p.error(f"--arms {' '.join(sorted(set(args.arms) - set(arm_table)))}: not an arm of this study "
                    f"({', '.join(list(arm_table)[1:])})")
        arm_table = only_arms(arm_table, args.arms)
    return run_study("gate", out, args.work or out / "runs", sizes, arm_table, args.jobs, args.quick,
                     args.finished_only)


if __name__ == "__main__":
    raise SystemExit(main())
