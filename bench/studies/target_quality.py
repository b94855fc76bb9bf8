"""Study 1, target quality: how close is each training target to the exact marginal velocity?

Where the exact empirical posterior is computable (the whole class as the pool: `objective.source=exact`), the
target that minimises the flow-matching loss is known for every (z_t, t, c). For rows drawn like the trainer draws
them, this measures per fifth of t the mean squared error (per dimension) to that exact target of the FM target u and
of the PAFM target of every candidate source (batch at several sizes, bank, neighbours, resample) and temperature,
with the ESS and the weight of the row's own endpoint. Conditional rows (no label dropout). On one process the
`global` source is the batch source at the global batch size (W ranks x B rows), so `batch-512` stands for it.

    python bench/studies/target_quality.py [--quick]
"""
from __future__ import annotations

import json

import numpy as np
import torch

from common import environment, out_dir, parser, plt, t_bin_labels, write_json

from pafm.data import LatentLoader, open_dataset
from pafm.objectives import Draws, Objective, ObjectiveConfig

BINS = 5
# name -> (objective settings, rows per batch)
SOURCES = {
    "batch-32": ({"source": "batch"}, 32),
    "batch-128": ({"source": "batch"}, 128),
    "batch-512 (= global, 4 ranks x 128)": ({"source": "batch"}, 512),
    "bank-64": ({"source": "bank", "bank_per_class": 64}, 128),
    "bank-256": ({"source": "bank", "bank_per_class": 256}, 128),
    "bank-64 tau=2": ({"source": "bank", "bank_per_class": 64, "temperature": 2.0}, 128),
    "bank-64 tau=4": ({"source": "bank", "bank_per_class": 64, "temperature": 4.0}, 128),
    "neighbors-8": ({"source": "neighbors", "candidates": 8}, 128),
    "resample-8": ({"source": "resample", "candidates": 8}, 128),
}
SIZES = {"digits": {"spec": "builtin:digits", "rows": 2560}, "mnist": {"spec": "builtin:mnist", "rows": 640}}
QUICK = {"digits": {"spec": "builtin:digits", "rows": 64}}
QUICK_SOURCES = ("batch-32", "bank-64", "neighbors-8", "resample-8")


def measure(spec: str, rows: int, name: str, settings: dict, batch_size: int, seed: int = 0) -> dict | None:
    """Per t-bin sums over `rows` rows: squared error (per dimension) of u and of the source's target to the exact
    target, ESS, own weight, row counts. None when the source does not apply to the dataset."""
    dataset = open_dataset(spec)
    has_moments = dataset.info["has_moments"]
    if settings["source"] == "resample" and not has_moments:
        return None
    neighbors = settings.get("candidates", 0) if settings["source"] == "neighbors" else 0
    loader = LatentLoader(dataset, batch_size, rank=0, world_size=1, seed=seed, flip=False, neighbors=neighbors)
    info = dataset.info
    source = Objective(ObjectiveConfig(kind="pafm", cond_dropout=0.0, backend="torch", **settings), info, "cpu")
    exact = Objective(ObjectiveConfig(kind="pafm", source="exact", cond_dropout=0.0, backend="torch"), info, "cpu",
                      loader=loader)
    sums = {k: np.zeros(BINS) for k in ("rows", "fm_err", "err", "ess", "own_weight", "exact_ess")}
    gen = torch.Generator().manual_seed(seed)
    batches = iter(loader)
    if settings["source"] == "bank":  # fill the bank as training would, from the batches before the measured ones
        for _ in range(-(-10 * settings["bank_per_class"] // batch_size)):
            batch = next(batches)
            source.source.update(batch["x"], batch["label"])
    done = 0
    while done < rows:
        batch = next(batches)
        x = batch["x"]
        d = source.draw(gen, len(x), 0, 1, "cpu")
        # t stratified over the fifths, so every bin gets the same number of rows
        t = ((torch.arange(len(x)) % BINS) + torch.rand(len(x), generator=gen)) / BINS
        draws = Draws(t, d.noise, torch.zeros(len(x), dtype=torch.bool), d.resample)
        target, u, diag = source.targets(x, batch, draws)
        best, _, best_diag = exact.targets(x, batch, draws)
        bins = (t * BINS).long().clamp(max=BINS - 1).numpy()
        per_row = {"fm_err": (u - best).square().flatten(1).mean(1), "err": (target - best).square().flatten(1).mean(1),
                   "ess": diag["ess"], "own_weight": diag["own_weight"], "exact_ess": best_diag["ess"]}
        np.add.at(sums["rows"], bins, 1)
        for k, v in per_row.items():
            np.add.at(sums[k], bins, v.double().numpy())
        if settings["source"] == "bank":
            source.source.update(x, batch["label"])
        done += len(x)
    n = sums.pop("rows")
    out = {k: (v / n).tolist() for k, v in sums.items()}
    tot = {k: float(v.sum() / n.sum()) for k, v in sums.items()}
    return {"rows": n.tolist(), "by_t": out, "overall": tot}


def plot(results: dict, path) -> None:
    pyplot = plt()
    names = list(results["datasets"])
    fig, axes = pyplot.subplots(2, len(names), figsize=(6.5 * len(names), 8), squeeze=False)
    x = np.arange(BINS) + 0.5
    for j, name in enumerate(names):
        rows = results["datasets"][name]["sources"]
        first = next(iter(rows.values()))
        floor = 1e-12  # where a target equals the exact one to float precision (log axis)
        axes[0, j].plot(x / BINS, np.maximum(first["by_t"]["fm_err"], floor), "k--", lw=2, label="FM target u")
        for i, (source, r) in enumerate(rows.items()):
            axes[0, j].plot(x / BINS, np.maximum(r["by_t"]["err"], floor), "o-", color=f"C{i}", label=source)
            axes[1, j].plot(x / BINS, r["by_t"]["ess"], "o-", color=f"C{i}", label=source)
        axes[1, j].plot(x / BINS, first["by_t"]["exact_ess"], "k--", lw=2, label="exact (whole class)")
        axes[0, j].set(title=f"{name}: MSE to the exact target (per dim; floor {floor:g})",
                       xlabel="t (noise 0, data 1)", yscale="log")
        axes[1, j].set(title=f"{name}: ESS", xlabel="t (noise 0, data 1)", yscale="log")
        axes[0, j].legend(fontsize=7)
        axes[1, j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)
    out = out_dir(args, "target_quality")
    sizes, sources = (QUICK, QUICK_SOURCES) if args.quick else (SIZES, tuple(SOURCES))
    results = {"study": "target_quality", "quick": args.quick, "environment": environment([0]), "bins":
               t_bin_labels(BINS), "datasets": {}}
    for name, size in sizes.items():
        rows = {}
        for source in sources:
            settings, batch_size = SOURCES[source]
            r = measure(size["spec"], size["rows"], source, settings, batch_size)
            if r is not None:
                rows[source] = r
                print(f"{name} {source}: MSE {r['overall']['err']:.4g} (FM {r['overall']['fm_err']:.4g}), "
                      f"ESS by t {np.round(r['by_t']['ess'], 2).tolist()}", flush=True)
        results["datasets"][name] = {"spec": size["spec"], "rows": size["rows"], "sources": rows}
        write_json(out / "results.json", results)
    plot(results, out / "target_quality.png")
    print(json.dumps({n: {s: r["overall"] for s, r in d["sources"].items()} for n, d in results["datasets"].items()},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
