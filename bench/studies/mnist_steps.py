"""How many steps MNIST needs before FM's samples are those of a trained model (CNN accuracy without guidance at
least 0.9), measured on a short curve: one FM run of the gate study's MNIST size (`gate.SIZES["mnist"]`), stopped
at each milestone (the trainer's exact resume continues it; the learning rate is constant, so a run stopped at a
milestone is the same run as one that goes on), its EMA weights scored without guidance at each.  The steps to 0.9
are extrapolated from the last two milestones (accuracy linear in log steps, at most four doublings ahead) and said
to be an estimate.

    python bench/studies/mnist_steps.py [--milestones 250 500 1000 2000] [--work DIR]
    python bench/studies/mnist_steps.py --quick
"""
from __future__ import annotations

import json
import math

import numpy as np

from common import environment, evaluate, logged_curve, out_dir, parser, plt, train, write_json
from gate import SIZES

TARGET_ACCURACY = 0.9
MAX_EXTRAPOLATION = 16  # the farthest the line is trusted: four doublings past the last milestone
SIZE = {"milestones": [250, 500, 1000, 2000], "samples": 300, "seed": 0,
        "sampler": ["sampler.method=heun", "sampler.steps=16", "sampler.cfg_scale=1.0"]}
QUICK = {"milestones": [1, 2], "samples": 20, "seed": 0,
         "sampler": ["sampler.method=euler", "sampler.steps=2", "sampler.cfg_scale=1.0"]}
QUICK_MODEL = ["model.kwargs={hidden_size: 32, num_heads: 2, depth: 1}", "data.batch_size=16"]


def steps_to(target: float, steps, accuracy) -> float | None:
    """Steps at which a line through the last two (log steps, accuracy) points reaches `target`; None when the
    curve does not rise there or the line reaches the target only beyond four more doublings (too far to say)."""
    if len(steps) < 2:
        return None
    (s0, a0), (s1, a1) = (steps[-2], accuracy[-2]), (steps[-1], accuracy[-1])
    if a1 >= target:
        return float(s1)
    if a1 <= a0:
        return None
    estimate = math.exp(math.log(s0) + (target - a0) / (a1 - a0) * (math.log(s1) - math.log(s0)))
    return float(estimate) if estimate <= MAX_EXTRAPOLATION * s1 else None


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--milestones", type=int, nargs="+", default=None)
    args = p.parse_args(argv)
    out = out_dir(args, "mnist_steps")
    work = args.work or out / "runs"
    size = QUICK if args.quick else {**SIZE, **({"milestones": sorted(args.milestones)} if args.milestones else {})}
    mnist = SIZES["mnist"]
    extra = [*mnist["extra"], *(QUICK_MODEL if args.quick else [])]
    results = {"study": "mnist_steps", "quick": args.quick, "environment": environment([size["seed"]]),
               "size": {**size, "config": mnist["config"], "extra": extra}, "milestones": {}}
    run_dir = work / "mnist-fm"
    for steps in size["milestones"]:
        overrides = [f"train.steps={steps}", f"train.seed={size['seed']}", f"checkpoint.every={steps}",
                     "log.sample_every=-1", "log.every=10", "objective.kind=fm", *extra]
        scored = run_dir / f"eval-{steps}" / "eval.json"
        seconds = None
        if not scored.is_file():  # a rerun reuses the milestones scored before
            seconds = train(mnist["config"], run_dir, overrides)["seconds"]
            evaluate(run_dir, [f"eval.num_samples={size['samples']}", f"eval.seed={size['seed']}",
                               "eval.batch_size=100", *size["sampler"]], out=scored.parent)
        report = json.loads(scored.read_text())
        curve = logged_curve(run_dir, upto=steps)
        results["milestones"][str(steps)] = {"metrics": report["metrics"], "reference": report["reference_metrics"],
                                             "train_seconds_this_call": seconds,
                                             "sec_per_step_median": float(np.median(curve["sec_per_step"])),
                                             "fm_loss_last": curve["fm_loss"][-1]}
        done = sorted(int(s) for s in results["milestones"])
        accuracy = [results["milestones"][str(s)]["metrics"]["accuracy"] for s in done]
        results["estimated_steps_to_target"] = steps_to(TARGET_ACCURACY, done, accuracy)
        results["target_accuracy"] = TARGET_ACCURACY
        print(f"step {steps}: {report['metrics']}; estimated steps to {TARGET_ACCURACY}: "
              f"{results['estimated_steps_to_target']}", flush=True)
        write_json(out / "results.json", results)
        pyplot = plt()
        fig, ax = pyplot.subplots(figsize=(6, 4))
        ax.plot(done, accuracy, "o-", label="FM, CNN accuracy without guidance")
        ax.axhline(TARGET_ACCURACY, color="k", ls="--", lw=1, label=f"{TARGET_ACCURACY}")
        ax.set(xscale="log", xlabel="training steps", ylabel="CNN accuracy", ylim=(0, 1))
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "mnist_steps.png", dpi=100)
        pyplot.close(fig)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
