"""Study 4, memorisation and flow collapse against the training-set size.

Class-balanced MNIST training subsets of 100, 300 and 1,000 images; on each, FM, PAFM (class bank) and PAFM with the
exact whole-class posterior (`objective.source=exact`) trained for the same steps, and the closed-form sampler of the
empirical optimum (the exact posterior velocity over the subset, no network: it memorises by construction). For each:
the memorised share (nearest training image of the subset closer than 1/3 of the second nearest, Gu et al. 2023),
the diversity figure (mean pairwise distance of same-class samples over that of real test digits), CNN accuracy
and the CNN-feature Frechet distance against the test split.

Networks train at a constant learning rate and are scored at every milestone of SIZE["milestones"]: each milestone
resumes the run where the previous one stopped (exact resume), so the rows at a milestone are those of a run that
stopped there, and the memorised share is followed along training.

    python bench/studies/memorisation.py [--quick] [--trained 100 300] [--milestones 1000 2000 4000 8000] [--jobs 2]
    python bench/studies/memorisation.py --seed 1 --trained 100 --objectives fm pafm-bank \
        --out bench/results/studies/memorisation-seed1     # another seed, in its own folder
"""
from __future__ import annotations

import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from common import environment, evaluate, logged_curve, out_dir, parser, plt, train, write_json

from pafm.data import ShardWriter, load_mnist_split, open_dataset
from pafm.data.mnist import builtin_folder
from pafm.metrics import MnistJudge, default_mnist_cnn, from_uint8_nhwc
from pafm.paths import build_path
from pafm.sampling import euler, time_grid
from pafm_kernels import posterior_velocity

OBJECTIVES = {"fm": ["objective.kind=fm"],
              "pafm-bank": ["objective.kind=pafm", "objective.source=bank", "objective.t_range=[0.0,1.0]"],
              "pafm-exact": ["objective.kind=pafm", "objective.source=exact", "objective.t_range=[0.0,1.0]"]}
# (ungated, as every seed of this study ran: the MNIST recipe gates PAFM to t in [0, 0.5])
SMALL_MNIST_MODEL = "model.kwargs={hidden_size: 64, num_heads: 2, depth: 2}"
# A constant learning rate, so that a run stopped at a milestone is the same run as one that goes on.
SCHEDULE = ["optim.schedule=constant"]
# Networks: the sample-quality study's MNIST model (the recipe's with 4x4-pixel patches), batch 32, on the 100- and
# 300-image subsets, scored at 1,000 to 8,000 steps (2,560 passes over 100 images at the last). The 6 runs take about
# 85 minutes on the 2 cores of a shared CPU (0.2 s per step on one core); the 1,000-image subset gets the closed-form
# optimum only, as training networks on it too would not fit a session. The closed-form optimum runs on every subset.
SIZE = {"subsets": [100, 300, 1000], "trained": [100, 300], "milestones": [1000, 2000, 4000, 8000], "batch": 32,
        "samples": 200, "seed": 0, "model": ["model.name=SiT-T/4"],
        "sampler": ["sampler.method=heun", "sampler.steps=16", "sampler.cfg_scale=1.0"], "closed_form_steps": 50}
QUICK = {**SIZE, "subsets": [20], "trained": [20], "model": [SMALL_MNIST_MODEL], "milestones": [1, 2], "batch": 10,
         "samples": 20, "closed_form_steps": 4,
         "sampler": ["sampler.method=euler", "sampler.steps=2", "sampler.cfg_scale=1.0"]}
QUICK_OBJECTIVES = ("fm",)


def subset_folder(work, size: int, seed: int = 0):
    """A class-balanced subset of builtin:mnist's training split as its own dataset folder (size / 10 per class,
    picked by a fixed-seed permutation); reused when already written."""
    folder = work / "data" / f"mnist-train-{size}"
    if (folder / "index.json").is_file():
        return folder
    x, y = load_mnist_split("train")
    rng = np.random.default_rng(seed)
    ids = np.sort(np.concatenate([rng.permutation(np.nonzero(y.numpy() == c)[0])[: size // 10] for c in range(10)]))
    info = dict(open_dataset("builtin:mnist").info)
    keep = ("kind", "latent_shape", "num_classes", "class_names", "normalization", "encoder")
    info = {k: info[k] for k in keep}
    info.update(split="train", latent_stats={"mean": [float(x[ids].mean())], "std": [float(x[ids].std())]},
                source=f"class-balanced subset of {builtin_folder()}/train, items {ids.tolist()}")
    writer = ShardWriter(folder, shard_size=4096)
    writer.add(latent=x[ids].unsqueeze(1).half(), label=y[ids])
    writer.close(info)
    return folder


@torch.no_grad()
def closed_form_samples(pool, pool_labels, labels, steps: int, seed: int) -> torch.Tensor:
    """Samples of the empirical optimum: Euler on the exact posterior velocity over `pool` (class-conditional). Euler
    never evaluates t = 1, where the velocity is singular; its last step lands on the posterior mean."""
    path = build_path("linear")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(labels),) + tuple(pool.shape[1:]), generator=gen)

    def velocity(z, t):
        out = posterior_velocity(z, pool, *path.coefficients(t), row_labels=labels, pool_labels=pool_labels,
                                 backend="torch")
        return out.velocity

    return euler(velocity, noise, time_grid(steps, dtype=torch.float64))


def plot(results: dict, path) -> None:
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 3, figsize=(16, 4))
    size = results["size"]
    for i, name in enumerate(OBJECTIVES):
        for n, style in zip(size["trained"], ("o-", "s--", "^:")):
            row = results["subsets"].get(str(n), {}).get(name)
            if row:
                steps = [int(s) for s in row["by_step"]]
                for ax, metric in zip(axes[:2], ("memorization", "diversity")):
                    ax.plot(steps, [r[metric] for r in row["by_step"].values()], style, color=f"C{i}",
                            label=f"{name}, {n} images")
    for i, name in enumerate(list(OBJECTIVES) + ["closed-form optimum"]):
        points = [(n, results["subsets"][str(n)][name]) for n in size["subsets"]
                  if name in results["subsets"].get(str(n), {})]
        if points:
            axes[2].plot([n for n, _ in points], [r["memorization"] for _, r in points], "o-", color=f"C{i}",
                         label=name)
    axes[1].axhline(1.0, color="k", ls="--", lw=1, label="real test digits")
    axes[0].set(xscale="log", xlabel="training steps (batch %d)" % size["batch"],
                ylabel="memorised share (1/3 rule)", ylim=(-0.02, 1.02))
    axes[1].set(xscale="log", xlabel="training steps", ylabel="diversity (1 = real digits)")
    axes[2].set(xscale="log", xlabel="training images", ylabel=f"memorised share at {size['milestones'][-1]} steps",
                ylim=(-0.02, 1.02))
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle("MNIST subsets: memorisation along training and against the subset size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


def train_and_score(work, folder, n: int, objective: str, size: dict, score, record) -> None:
    """One network through the milestones: resume to each, sample from its EMA export, score, `record` the row."""
    run_dir = work / f"sub{n}-{objective}"
    last = size["milestones"][-1]
    for steps in size["milestones"]:
        overrides = [f"data.spec={folder}", f"data.batch_size={size['batch']}", *size["model"],
                     f"train.steps={steps}", f"train.seed={size['seed']}", f"checkpoint.every={steps}",
                     "log.sample_every=-1", f"log.every={max(1, last // 40)}", *SCHEDULE, *OBJECTIVES[objective]]
        scored = run_dir / f"eval-{steps}" / "eval.json"
        if scored.is_file():  # a rerun of the study: this milestone was trained and sampled before
            report, seconds = json.loads(scored.read_text()), None
        else:
            seconds = train("configs/mnist_sit.yaml", run_dir, overrides)["seconds"]
            report = evaluate(run_dir, [f"eval.num_samples={size['samples']}", "eval.labels=balanced",
                                        f"eval.seed={size['seed']}", "eval.metrics=[]", "eval.batch_size=100",
                                        *size["sampler"]], out=scored.parent)
        with np.load(report["samples_npz"]) as data:
            images, labels = from_uint8_nhwc(data["arr_0"]), data["arr_1"]
        row = {**score(n, images, labels), "step": steps, "train_seconds": seconds,
               "final_fm_loss": logged_curve(run_dir, upto=steps)["fm_loss"][-1]}
        print(f"subset {n} {objective} step {steps}: {row}", flush=True)
        record(n, objective, steps, row)


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--trained", type=int, nargs="*", default=None, help="subsets to train networks on")
    p.add_argument("--milestones", type=int, nargs="+", default=None, help="steps at which networks are scored")
    p.add_argument("--jobs", type=int, default=2, help="training processes at a time")
    p.add_argument("--objectives", nargs="+", choices=list(OBJECTIVES), default=list(OBJECTIVES))
    p.add_argument("--seed", type=int, default=None, help="training and sampling seed (default SIZE's)")
    args = p.parse_args(argv)
    out = out_dir(args, "memorisation")
    work = args.work or out / "runs"
    size, objectives = (QUICK, QUICK_OBJECTIVES) if args.quick else (SIZE, tuple(args.objectives))
    size = {**size, **({"trained": args.trained} if args.trained is not None else {}),
            **({"milestones": sorted(args.milestones)} if args.milestones else {}),
            **({"seed": args.seed} if args.seed is not None else {})}
    if not set(size["trained"]) <= set(size["subsets"]):
        p.error(f"--trained {size['trained']}: networks train only on the subsets {size['subsets']}")
    results = {"study": "memorisation", "quick": args.quick, "environment": environment([size["seed"]]),
               "size": size, "subsets": {}}
    net = default_mnist_cnn()
    heldout = load_mnist_split("heldout")
    lock = threading.Lock()
    judges, folders = {}, {}
    for n in size["subsets"]:
        folders[n] = subset_folder(work, n)
        pool_x, pool_y = load_mnist_split_of(folders[n])
        judges[n] = MnistJudge(net, *heldout, pool_x)
        labels = torch.arange(size["samples"]) % 10
        closed = closed_form_samples(pool_x, pool_y, labels, size["closed_form_steps"], size["seed"])
        rows = {"closed-form optimum": judges[n].score(closed.clamp(-1, 1).numpy(), labels.numpy()),
                "real test digits": judges[n].reference(pool_x, size=size["samples"])}
        print(f"subset {n} closed form: {rows['closed-form optimum']}", flush=True)
        results["subsets"][str(n)] = rows
    write_json(out / "results.json", results)

    def score(n, images, labels):
        with lock:  # one CNN judges for every training thread
            return judges[n].score(images, labels)

    def record(n, objective, steps, row):
        """The latest milestone is the objective's row; every milestone stays in by_step. Saved at once."""
        with lock:
            rows = results["subsets"][str(n)]
            by_step = {**rows.get(objective, {}).get("by_step", {}), str(steps): row}
            rows[objective] = {**row, "by_step": by_step}
            write_json(out / "results.json", results)

    runs = [(n, objective) for n in size["trained"] for objective in objectives]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(train_and_score, work, folders[n], n, objective, size, score, record)
                   for n, objective in runs]
    failed = [f"subset {n} {objective}: {f.exception()}" for (n, objective), f in zip(runs, futures) if f.exception()]
    plot(results, out / "memorisation.png")  # of what was measured, also when a run failed
    if failed:
        print("\n".join(failed), file=sys.stderr)
        return 1
    print(json.dumps({n: {k: {m: v for m, v in row.items() if m != "by_step"} for k, row in rows.items()}
                      for n, rows in results["subsets"].items()}, indent=1))
    return 0


def load_mnist_split_of(folder) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 (N, 1, 28, 28), labels) of a subset folder."""
    dataset = open_dataset(str(folder))
    ids = np.arange(len(dataset))
    x = dataset.gather("latent", ids, views=np.zeros(len(ids), dtype=np.int64)).float()
    return x, dataset.gather("label", ids)


if __name__ == "__main__":
    raise SystemExit(main())
