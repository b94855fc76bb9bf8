"""Study 3, sample quality: FM against PAFM (class bank; the exact whole-class posterior) at equal steps, three
seeds each, on the digits and on MNIST; mean and spread of every metric, and the loss curves.

    python bench/studies/sample_quality.py            # default size (see SIZES); results in bench/results/studies/
    python bench/studies/sample_quality.py --quick    # seconds, for the tests
    python bench/studies/sample_quality.py --datasets digits --objectives fm pafm-exact \
        --overrides "model.kwargs={time_scale: 1000.0}" --out bench/results/studies/sample_quality-1000t

Each run is `python -m pafm.train CONFIG key=value ...` then `python -m pafm.eval RUN ...` with the digits or MNIST
metric set; runs that finished are reused when the study is rerun (the trainer resumes, a finished run returns).
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from common import environment, evaluate, mean_spread, out_dir, parser, plt, train, write_json

OBJECTIVES = {"fm": ["objective.kind=fm"],
              "pafm-bank": ["objective.kind=pafm", "objective.source=bank", "objective.t_range=[0.0,1.0]"],
              "pafm-exact": ["objective.kind=pafm", "objective.source=exact", "objective.t_range=[0.0,1.0]"]}
# (ungated, as the results here ran: the MNIST recipe gates PAFM to t in [0, 0.5])
# Steps, evaluation samples and sampler per dataset, sized for a shared 2-core CPU (the 9 MNIST runs take about an
# hour on one core). MNIST uses the recipe's model with 4x4-pixel patches (49 tokens, a quarter of the recipe's cost
# per image) and half its batch, for the recipe's 1,200 steps.
MNIST_MODEL = "model.name=SiT-T/4"
# The recipes' EMA (0.995) would still weigh the zero-output initial model by a third after 200 steps.
SHORT_RUN = ["train.ema_decay=0.98", "optim.warmup_steps=20"]
SIZES = {
    "digits": {"config": "configs/digits_sit.yaml", "steps": 500, "samples": 300, "seeds": [0, 1, 2],
               "extra": SHORT_RUN,
               "sampler": ["sampler.method=heun", "sampler.steps=16", "sampler.cfg_scale=1.5"]},
    "mnist": {"config": "configs/mnist_sit.yaml", "steps": 1200, "samples": 300, "seeds": [0, 1, 2],
              "extra": [MNIST_MODEL, "data.batch_size=32", *SHORT_RUN],
              "sampler": ["sampler.method=heun", "sampler.steps=16", "sampler.cfg_scale=2.0"]},
}
QUICK = {"digits": {**SIZES["digits"], "steps": 3, "samples": 20, "seeds": [0],
                    "sampler": ["sampler.method=euler", "sampler.steps=2", "sampler.cfg_scale=1.5"]}}
QUICK_OBJECTIVES = ("fm", "pafm-exact")
METRICS = {"digits": ("accuracy", "frechet_pixels", "memorization"),
           "mnist": ("accuracy", "frechet_cnn", "memorization", "diversity")}


def run_dataset(name: str, size: dict, objectives, work, save, jobs: int) -> dict:
    """Seeds outermost, so that a study cut short still holds every objective at the seeds it reached; `save(rows)`
    after every seed."""
    runs = {objective: [] for objective in objectives}
    rows = {}

    def one(seed, objective):
        run_dir = work / f"{name}-{objective}-s{seed}"
        overrides = [f"train.steps={size['steps']}", f"train.seed={seed}", f"checkpoint.every={size['steps']}",
                     "log.sample_every=-1", f"log.every={max(1, size['steps'] // 30)}", *OBJECTIVES[objective],
                     *size["extra"]]
        curve = train(size["config"], run_dir, overrides)
        report = evaluate(run_dir, [f"eval.num_samples={size['samples']}", f"eval.seed={seed}",
                                    "eval.batch_size=100", *size["sampler"]])
        print(f"{name} {objective} seed {seed}: {report['metrics']} ({curve['seconds']:.0f} s training)", flush=True)
        return {"seed": seed, "curve": curve, "metrics": report["metrics"], "reference": report["reference_metrics"]}

    for seed in size["seeds"]:
        # the objectives of one seed run side by side (one process each, `jobs` at a time)
        with ThreadPoolExecutor(jobs) as pool:
            results = dict(zip(objectives, pool.map(lambda o: one(seed, o), objectives)))
        for objective, run in results.items():
            runs[objective].append(run)
            done = runs[objective]
            rows[objective] = {"runs": done, **{m: mean_spread([r["metrics"][m] for r in done])
                                                for m in METRICS[name] if m in done[0]["metrics"]}}
        save(rows)
    return rows


def plot(results: dict, path) -> None:
    pyplot = plt()
    names = list(results["datasets"])
    fig, axes = pyplot.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for objective, row in results["datasets"][name]["rows"].items():
            for i, run in enumerate(row["runs"]):
                c = run["curve"]
                ax.plot(c["steps"], c["fm_loss"], color=f"C{list(OBJECTIVES).index(objective)}", alpha=0.7,
                        label=objective if i == 0 else None)
        ax.set(title=f"{name}: FM loss of the prediction (all seeds)", xlabel="step", ylabel="FM loss", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--datasets", nargs="+", choices=list(SIZES), default=list(SIZES))
    p.add_argument("--jobs", type=int, default=len(OBJECTIVES), help="training processes at a time")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="only these seeds (to run seeds in parallel processes; a final run without it, which reuses "
                        "the finished runs, gathers them all)")
    p.add_argument("--objectives", nargs="+", choices=list(OBJECTIVES), default=list(OBJECTIVES))
    p.add_argument("--overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides for every run (a variant of the study: give it its own --out)")
    args = p.parse_args(argv)
    out = out_dir(args, "sample_quality")
    work = args.work or out / "runs"
    sizes, objectives = (QUICK, QUICK_OBJECTIVES) if args.quick else (SIZES, tuple(args.objectives))
    sizes = sizes if args.quick else {name: SIZES[name] for name in args.datasets}
    sizes = {name: {**size, "extra": [*size["extra"], *args.overrides]} for name, size in sizes.items()}
    if args.seeds is not None:
        sizes = {name: {**size, "seeds": args.seeds} for name, size in sizes.items()}
    seeds = sorted({s for size in sizes.values() for s in size["seeds"]})
    results = {"study": "sample_quality", "quick": args.quick, "environment": environment(seeds), "datasets": {}}
    previous = out / "results.json"
    if previous.is_file():  # datasets not rerun keep their rows, each with the environment it was measured in
        old = json.loads(previous.read_text())
        results["datasets"] = {name: {**d, "environment": d.get("environment", old["environment"])}
                               for name, d in old["datasets"].items() if name not in sizes}
    for name, size in sizes.items():
        def save(rows, name=name, size=size):  # after every run, so a study cut short keeps what it measured
            results["datasets"][name] = {"environment": results["environment"], "size": size,
                                         "reference": rows[objectives[0]]["runs"][0]["reference"], "rows": rows}
            write_json(out / "results.json", results)
            plot(results, out / "loss_curves.png")

        run_dataset(name, size, objectives, work, save, args.jobs)
    summary = {name: {obj: {m: (row[m]["mean"], row[m]["std"]) for m in METRICS[name] if m in row}
                      for obj, row in d["rows"].items()} for name, d in results["datasets"].items()}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
