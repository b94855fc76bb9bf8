"""Study 1, target quality: how close is each training target to the exact marginal velocity?

Where the exact empirical posterior is computable (the whole class as the pool: `objective.source=exact`), the
target that minimises the flow-matching loss is known for every (z_t, t, c). For rows drawn like the trainer draws
them, this measures per fifth of t the mean squared error (per dimension) to that exact target of the FM target u and
of the PAFM target of every candidate source (batch at several sizes, bank, neighbours, resample) and temperature,
with the ESS and the weight of the row's own endpoint. Conditional rows (no label dropout). On one process the
`global` source is the batch source at the global batch size (W ranks x B rows), so `batch-512` stands for it.

The second part, the gate (`objective.t_range = [0, g]`), measures without training where on the path the exact
target differs from FM's u at all: per twentieth of t, the mean squared deviation (per dimension) of the exact
posterior target from u, E|v* - u|^2, and the share of it (weighted by the recipe's density of t) that lies outside
[0, g], the part a gate to [0, g] gives up.  On the digits and MNIST (the real data, the whole class as the pool), on
stand-ins for the GPU recipes' 4x32x32 latents (the ImageNet class size of about 1,300 items per class: independent
Gaussian latents, the most one-hot case, and MNIST lifted to 4,096 dimensions, a data set with real neighbours), and
for the CC12M recipe's per-image pool (its VAE re-samples: one image's Gaussian N(m, s^2 I), in closed form for a
range of VAE standard deviations s).

    python bench/studies/target_quality.py [--quick]
"""
from __future__ import annotations

import json

import numpy as np
import torch

from common import environment, out_dir, parser, plt, t_bin_labels, write_json

from pafm.data import LatentLoader, open_dataset
from pafm.objectives import Draws, Objective, ObjectiveConfig
from pafm.paths import build_path
from pafm_kernels import posterior_velocity

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

GATE_BINS = 20
GATES = (0.25, 0.5, 0.75, 1.0)
# name -> where the exact posterior comes from and the recipe's t density.  "real": a built-in data set through the
# exact source (the trainer's own target code); "gaussian"/"mnist-lifted": stand-in latents of `shape`, `per_class`
# items in each of `classes` classes.
GATE_CASES = {
    "digits (64-D, real)": {"kind": "real", "spec": "builtin:digits", "rows": 2000, "t": "uniform"},
    "digits, dequantisation removed (the stored means as fixed points)": {"kind": "means", "spec": "builtin:digits",
                                                                           "rows": 2000, "t": "uniform"},
    "MNIST (784-D, real)": {"kind": "real", "spec": "builtin:mnist", "rows": 1000, "t": "uniform"},
    "ImageNet-shaped 4x32x32, Gaussian stand-in": {"kind": "gaussian", "shape": (4, 32, 32), "classes": 4,
                                                  "per_class": 1300, "rows": 1000, "t": "uniform"},
    "ImageNet-shaped 4x32x32, MNIST lifted": {"kind": "mnist-lifted", "shape": (4, 32, 32), "classes": 4,
                                             "per_class": 1300, "rows": 1000, "t": "uniform"},
}
QUICK_GATE_CASES = {
    "digits (64-D, real)": {**GATE_CASES["digits (64-D, real)"], "rows": 80},
    "ImageNet-shaped 4x32x32, Gaussian stand-in": {"kind": "gaussian", "shape": (4, 8, 8), "classes": 2,
                                                  "per_class": 50, "rows": 80, "t": "uniform"},
}
# The CC12M recipe's pool is the image's own VAE posterior N(m, s^2 I) (source resample, each caption its own class):
# per dimension the exact target's deviation from u is s^2 / (t^2 s^2 + (1 - t)^2) (derivation in deviation_gaussian_
# endpoint), measured here for a range of s in the normalised latent's units, under its logit-normal t.
CC12M_SPREADS = (0.01, 0.03, 0.1, 0.3)


def t_density(kind: str, t: np.ndarray) -> np.ndarray:
    """The recipe's density of t: uniform, or logit-normal(0, 1) (SD3's, the CC12M recipe's)."""
    if kind == "uniform":
        return np.ones_like(t)
    logit = np.log(t / (1 - t))
    return np.exp(-0.5 * logit**2) / (np.sqrt(2 * np.pi) * t * (1 - t))


def outside_share(t_mid: np.ndarray, deviation: np.ndarray, density: str, gates=GATES) -> dict:
    """For each gate g: the share of E_t[E|v* - u|^2] (t from the recipe's density, on the bins' midpoints) that lies
    at t > g, i.e. the part of the exact posterior's correction that a gate to [0, g] gives up."""
    weight = t_density(density, t_mid) * deviation
    total = weight.sum()
    return {f"{g:g}": float(weight[t_mid > g].sum() / total) if total > 0 else 0.0 for g in gates}


def deviation_gaussian_endpoint(t: np.ndarray, s: float) -> np.ndarray:
    """E|v* - u|^2 per dimension when the endpoint is one Gaussian x ~ N(m, s^2 I) on the linear path (z = t x +
    (1 - t) eps, u = x - eps): the conditional variance of u - m given z, (s^2 + 1) - (t s^2 - (1 - t))^2 /
    (t^2 s^2 + (1 - t)^2), which simplifies to s^2 / (t^2 s^2 + (1 - t)^2)."""
    return s**2 / (t**2 * s**2 + (1 - t) ** 2)


def stand_in(case: dict, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(items (N, *shape) float64, labels) of a stand-in latent data set (unit variance per dimension), or a built-in
    data set's stored means ("means": its endpoints without the dequantisation noise)."""
    if case["kind"] == "means":
        dataset = open_dataset(case["spec"])
        loader = LatentLoader(dataset, 1, rank=0, world_size=1, seed=seed, flip=False)
        ids = np.arange(len(dataset))
        items = loader.maker.latents(ids, np.zeros(len(ids), dtype=np.int64), 0)
        return items["mean" if dataset.info["has_moments"] else "x"].double(), dataset.gather("label", ids).long()
    shape, classes, per_class = case["shape"], case["classes"], case["per_class"]
    labels = torch.arange(classes).repeat_interleave(per_class)
    if case["kind"] == "gaussian":
        gen = torch.Generator().manual_seed(seed)
        return torch.randn((len(labels),) + tuple(shape), generator=gen, dtype=torch.float64), labels
    from pafm.data import load_mnist_split

    x, y = load_mnist_split("train")
    ids = np.concatenate([np.nonzero(y.numpy() == c)[0][:per_class] for c in range(classes)])
    images = x[ids].double()  # (N, 1, 28, 28)
    lifted = torch.nn.functional.interpolate(images, size=shape[1:], mode="bilinear", align_corners=False)
    lifted = lifted.expand(-1, shape[0], -1, -1)
    lifted = (lifted - lifted.mean(0)) / lifted.std(0).clamp_min(1e-6)  # unit variance per dimension
    return lifted.contiguous(), labels


def deviation_by_t(case: dict, seed: int = 0) -> dict:
    """Per twentieth of t: mean E|v* - u|^2 per dimension (v* the exact class-conditional posterior target), the
    exact posterior's ESS, and the rows measured (t stratified: the same number of rows in every bin)."""
    gen = torch.Generator().manual_seed(seed)
    sums = {k: np.zeros(GATE_BINS) for k in ("rows", "deviation", "ess")}

    def add(t, deviation, ess):
        bins = (t * GATE_BINS).long().clamp(max=GATE_BINS - 1).numpy()
        np.add.at(sums["rows"], bins, 1)
        np.add.at(sums["deviation"], bins, deviation.double().numpy())
        np.add.at(sums["ess"], bins, ess.double().numpy())

    if case["kind"] == "real":
        dataset = open_dataset(case["spec"])
        loader = LatentLoader(dataset, 100, rank=0, world_size=1, seed=seed, flip=False)
        exact = Objective(ObjectiveConfig(kind="pafm", source="exact", cond_dropout=0.0, backend="torch"),
                          dataset.info, "cpu", loader=loader)
        done = 0
        for batch in loader:
            if done >= case["rows"]:
                break
            x = batch["x"]
            t = ((torch.arange(len(x)) + done) % GATE_BINS + torch.rand(len(x), generator=gen)) / GATE_BINS
            noise = torch.randn(x.shape, generator=gen)
            draws = Draws(t, noise, torch.zeros(len(x), dtype=torch.bool), None)
            target, u, diagnostics = exact.targets(x, batch, draws)
            add(t, (target.double() - u.double()).square().flatten(1).mean(1), diagnostics["ess"])
            done += len(x)
    else:
        items, labels = stand_in(case, seed)
        path = build_path("linear")
        rows = case["rows"]
        ids = torch.randint(len(items), (rows,), generator=gen)
        t = ((torch.arange(rows) % GATE_BINS) + torch.rand(rows, generator=gen, dtype=torch.float64)) / GATE_BINS
        for part in torch.split(torch.arange(rows), 100):
            x, noise = items[ids[part]], torch.randn((len(part),) + items.shape[1:], generator=gen,
                                                     dtype=torch.float64)
            z = path.interpolate(x, noise, t[part])
            out = posterior_velocity(z, items, *path.coefficients(t[part]), row_labels=labels[ids[part]],
                                     pool_labels=labels, endpoint=x, noise=noise, backend="torch")
            u = path.velocity(x, noise, t[part])
            add(t[part], (out.velocity.double() - u).square().flatten(1).mean(1), out.ess)
    n = sums.pop("rows")
    return {"rows": n.tolist(), **{k: (v / np.maximum(n, 1)).tolist() for k, v in sums.items()}}


def gate_part(cases: dict) -> dict:
    """Every case's deviation by t and the share outside each gate; CC12M's closed form."""
    t_mid = (np.arange(GATE_BINS) + 0.5) / GATE_BINS
    rows = {}
    for name, case in cases.items():
        r = deviation_by_t(case)
        r["outside_share"] = outside_share(t_mid, np.asarray(r["deviation"]), case["t"])
        rows[name] = {"case": {k: v for k, v in case.items()}, **r}
        print(f"gate {name}: deviation by t {np.round(r['deviation'], 4).tolist()}, outside [0, g] "
              f"{r['outside_share']}", flush=True)
    fine = (np.arange(20000) + 0.5) / 20000  # the closed form on a fine grid (its mass sits near t = 1)
    cc12m = {f"{s:g}": outside_share(fine, deviation_gaussian_endpoint(fine, s), "logit_normal")
             for s in CC12M_SPREADS}
    return {"bins": GATE_BINS, "gates": list(GATES), "cases": rows,
            "cc12m_resample_closed_form": {"t": "logit_normal(0, 1)", "outside_share_by_vae_std": cc12m}}


def plot_gate(gate: dict, path) -> None:
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(13, 4.5))
    t_mid = (np.arange(gate["bins"]) + 0.5) / gate["bins"]
    for i, (name, r) in enumerate(gate["cases"].items()):
        axes[0].plot(t_mid, np.maximum(r["deviation"], 1e-12), "o-", color=f"C{i}", label=name)
        axes[1].plot(t_mid, r["ess"], "o-", color=f"C{i}", label=name)
    for g in gate["gates"][:-1]:
        for ax in axes:
            ax.axvline(g, color="k", ls=":", lw=1)
    axes[0].set(title="exact posterior target: E|v* - u|^2 per dimension (floor 1e-12)",
                xlabel="t (noise 0, data 1)", yscale="log")
    axes[1].set(title="ESS of the exact class posterior", xlabel="t (noise 0, data 1)", yscale="log")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


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
    p = parser(__doc__)
    p.add_argument("--gate-only", action="store_true", help="only the gate part (the sources' rows are kept)")
    args = p.parse_args(argv)
    out = out_dir(args, "target_quality")
    sizes, sources = (QUICK, QUICK_SOURCES) if args.quick else (SIZES, tuple(SOURCES))
    results = {"study": "target_quality", "quick": args.quick, "environment": environment([0]), "bins":
               t_bin_labels(BINS), "datasets": {}}
    previous = out / "results.json"
    if args.gate_only and previous.is_file():
        results = {**json.loads(previous.read_text()), "gate_environment": environment([0])}
        sizes = {}
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
    if sizes:
        plot(results, out / "target_quality.png")
    results["gate"] = gate_part(QUICK_GATE_CASES if args.quick else GATE_CASES)
    results.setdefault("gate_environment", results["environment"])
    write_json(out / "results.json", results)
    plot_gate(results["gate"], out / "gate_target_error.png")
    print(json.dumps({n: r["outside_share"] for n, r in results["gate"]["cases"].items()}, indent=1))
    print(json.dumps({n: {s: r["overall"] for s, r in d["sources"].items()} for n, d in results["datasets"].items()},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
