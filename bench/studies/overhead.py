"""Study 5, overhead: seconds per training step of PAFM (each candidate source) over FM, same model, same batch,
real data, in one run.

Each step is what the trainer does per micro-batch: the loader's batch, `objective.loss` (draws, pool, forward,
target), backward, AdamW, the bank's push. Variants are timed in interleaved rounds, so that load from other
processes on a shared machine falls on all of them alike; the ratio to FM is the median over rounds of the per-round
ratio. On the CPU (and on a GPU when this runs on one).

    python bench/studies/overhead.py [--quick]
"""
from __future__ import annotations

import json
import time

import numpy as np
import torch

from common import applies, environment, loader_and_objective, out_dir, parser, plt, write_json

from pafm.models import build_model
from pafm.objectives import step_generator

VARIANTS = {"fm": {"kind": "fm"}, "batch": {"source": "batch"}, "bank-64": {"source": "bank"},
            "exact": {"source": "exact"}, "neighbors-8": {"source": "neighbors", "candidates": 8},
            "resample-8": {"source": "resample", "candidates": 8}}
SIZES = {"digits": {"spec": "builtin:digits", "model": {}, "batch": 128, "rounds": 7, "steps": 3},
         "mnist": {"spec": "builtin:mnist", "model": {"hidden_size": 96, "num_heads": 3}, "batch": 64,
                   "rounds": 5, "steps": 2}}
QUICK = {"digits": {**SIZES["digits"], "batch": 16, "rounds": 2, "steps": 1}}


class Runner:
    """One variant's model, optimizer, objective and loader, stepped on demand."""

    def __init__(self, size: dict, settings: dict, device):
        self.info, loader, self.objective = loader_and_objective(size["spec"], settings, size["batch"],
                                                                 device=device)
        torch.manual_seed(0)
        c, h, _ = self.info["latent_shape"]
        self.model = build_model("SiT-T/2", input_size=h, in_channels=c, num_classes=self.info["num_classes"],
                                 **size["model"]).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.batches, self.step, self.device = iter(loader), 0, device

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` steps."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            batch = next(self.batches)
            x = batch["x"].to(self.device)
            out = self.objective.loss(self.model, x, batch["label"].to(self.device), batch,
                                      step_generator(0, self.step, 0, self.device))
            out.loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if out.update is not None:
                out.update()
            self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps


def measure(size: dict, device) -> dict:
    runners = {}
    for name, settings in VARIANTS.items():
        runner = Runner(size, settings, device)
        if applies(runner.info, settings):
            runner.run(1)  # warm-up (first-call costs, bank filling starts)
            runners[name] = runner
    times = {name: [] for name in runners}
    for _ in range(size["rounds"]):
        for name, runner in runners.items():
            times[name].append(runner.run(size["steps"]))
    fm = np.asarray(times["fm"])
    return {name: {"ms_per_step": 1e3 * float(np.median(t)), "ms_all_rounds": (1e3 * np.asarray(t)).tolist(),
                   "ratio_to_fm": float(np.median(np.asarray(t) / fm)),
                   "ratio_spread": [float(np.min(np.asarray(t) / fm)), float(np.max(np.asarray(t) / fm))]}
            for name, t in times.items()}


def plot(results: dict, path) -> None:
    pyplot = plt()
    names = list(results["datasets"])
    fig, axes = pyplot.subplots(1, len(names), figsize=(5.5 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = results["datasets"][name]["variants"]
        labels = list(rows)
        ratios = [rows[v]["ratio_to_fm"] for v in labels]
        err = np.array([[r - rows[v]["ratio_spread"][0], rows[v]["ratio_spread"][1] - r]
                        for v, r in zip(labels, ratios)]).T
        ax.bar(labels, ratios, yerr=err, color=[f"C{i}" for i in range(len(labels))])
        ax.axhline(1.0, color="k", lw=1)
        ax.set(title=f"{name}: step time / FM ({results['environment']['device'][:30]})", ylabel="ratio")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = out_dir(args, "overhead" if device.type == "cpu" else "overhead-gpu")
    sizes = QUICK if args.quick else SIZES
    results = {"study": "overhead", "quick": args.quick, "environment": environment([0]), "datasets": {}}
    for name, size in sizes.items():
        results["datasets"][name] = {"size": size, "variants": measure(size, device)}
        write_json(out / "results.json", results)
        ratios = {v: round(r["ratio_to_fm"], 3) for v, r in results["datasets"][name]["variants"].items()}
        print(name, json.dumps(ratios), flush=True)
    plot(results, out / "overhead.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
