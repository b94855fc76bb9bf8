"""Study 4, memorisation and flow collapse against the training-set size.

Class-balanced MNIST training subsets of 100, 300 and 1,000 images; on each, FM, PAFM (class bank) and PAFM with the
exact whole-class posterior (`objective.source=exact`) trained for the same steps, and the closed-form sampler of the
empirical optimum (the exact posterior velocity over the subset, no network: it memorises by construction). For each:
the memorised share (nearest training image of the subset closer than 1/3 of the second nearest, Gu et al. 2023),
the diversity figure (mean pairwise distance of same-class samples over that of real test digits), CNN accuracy
and the CNN-feature Frechet distance against the test split.

    python bench/studies/memorisation.py [--quick] [--trained 100 300 1000]
"""
from __future__ import annotations

import json

import numpy as np
import torch

from common import environment, evaluate, out_dir, parser, plt, train, write_json

from pafm.data import ShardWriter, load_mnist_split, open_dataset
from pafm.data.mnist import builtin_folder
from pafm.metrics import MnistJudge, default_mnist_cnn
from pafm.paths import build_path
from pafm.sampling import euler, time_grid
from pafm_kernels import posterior_velocity

OBJECTIVES = {"fm": ["objective.kind=fm"],
              "pafm-bank": ["objective.kind=pafm", "objective.source=bank"],
              "pafm-exact": ["objective.kind=pafm", "objective.source=exact"]}
SMALL_MNIST_MODEL = "model.kwargs={hidden_size: 64, num_heads: 2, depth: 2}"
# The recipe's EMA (0.995) would still weigh the zero-output initial model by a third after 200 steps.
SHORT_RUN = ["train.ema_decay=0.98", "optim.warmup_steps=20"]
# Networks are trained on every subset (or those given by --trained), the sample-quality study's MNIST model (the
# recipe's with 4x4-pixel patches) for 1,200 steps of batch 32: what one core of a shared 2-core CPU runs in about an
# hour for the 9 runs, which is 384 passes over 100 images but 38 over 1,000; the closed-form optimum runs on every
# subset.
SIZE = {"subsets": [100, 300, 1000], "trained": [100, 300, 1000], "steps": 1200, "batch": 32, "samples": 200,
        "seed": 0, "model": ["model.name=SiT-T/4"],
        "sampler": ["sampler.method=heun", "sampler.steps=16", "sampler.cfg_scale=1.0"], "closed_form_steps": 50}
QUICK = {**SIZE, "subsets": [20], "trained": [20], "model": [SMALL_MNIST_MODEL], "steps": 2, "batch": 10,
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
    fig, axes = pyplot.subplots(1, 2, figsize=(11, 4))
    sizes = results["size"]["subsets"]
    for i, name in enumerate(list(OBJECTIVES) + ["closed-form optimum"]):
        points = [(n, results["subsets"][str(n)][name]) for n in sizes if name in results["subsets"][str(n)]]
        if not points:
            continue
        axes[0].plot([n for n, _ in points], [r["memorization"] for _, r in points], "o-", color=f"C{i}", label=name)
        axes[1].plot([n for n, _ in points], [r["diversity"] for _, r in points], "o-", color=f"C{i}", label=name)
    axes[1].axhline(1.0, color="k", ls="--", lw=1, label="real test digits")
    axes[0].set(xscale="log", xlabel="training images", ylabel="memorised share (1/3 rule)", ylim=(-0.02, 1.02))
    axes[1].set(xscale="log", xlabel="training images", ylabel="diversity (1 = real digits)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"MNIST subsets: networks {results['size']['steps']} steps of batch {results['size']['batch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--trained", type=int, nargs="*", default=None, help="subsets to train networks on")
    args = p.parse_args(argv)
    out = out_dir(args, "memorisation")
    work = args.work or out / "runs"
    size, objectives = (QUICK, QUICK_OBJECTIVES) if args.quick else (SIZE, tuple(OBJECTIVES))
    if args.trained is not None:
        size = {**size, "trained": args.trained}
    results = {"study": "memorisation", "quick": args.quick, "environment": environment([size["seed"]]),
               "size": size, "subsets": {}}
    net = default_mnist_cnn()
    heldout = load_mnist_split("heldout")
    for n in size["subsets"]:
        folder = subset_folder(work, n)
        pool_x, pool_y = load_mnist_split_of(folder)
        judge = MnistJudge(net, *heldout, pool_x)
        rows = {}
        for objective in objectives if n in size["trained"] else ():
            run_dir = work / f"sub{n}-{objective}"
            overrides = [f"data.spec={folder}", f"data.batch_size={size['batch']}", *size["model"],
                         f"train.steps={size['steps']}", f"train.seed={size['seed']}",
                         f"checkpoint.every={size['steps']}", "log.sample_every=-1",
                         f"log.every={max(1, size['steps'] // 30)}", *SHORT_RUN, *OBJECTIVES[objective]]
            curve = train("configs/mnist_sit.yaml", run_dir, overrides)
            report = evaluate(run_dir, [f"eval.num_samples={size['samples']}", "eval.labels=balanced",
                                        "eval.metrics=[]", "eval.batch_size=100", *size["sampler"]])
            with np.load(report["samples_npz"]) as data:
                images = data["arr_0"].astype(np.float64).transpose(0, 3, 1, 2) / 127.5 - 1.0
                labels = data["arr_1"]
            rows[objective] = {**judge.score(images, labels), "train_seconds": curve["seconds"],
                               "final_fm_loss": curve["fm_loss"][-1]}
            print(f"subset {n} {objective}: {rows[objective]}", flush=True)
        labels = torch.arange(size["samples"]) % 10
        closed = closed_form_samples(pool_x, pool_y, labels, size["closed_form_steps"], size["seed"])
        rows["closed-form optimum"] = judge.score(closed.clamp(-1, 1).numpy(), labels.numpy())
        print(f"subset {n} closed form: {rows['closed-form optimum']}", flush=True)
        rows["real test digits"] = judge.reference(pool_x, size=size["samples"])
        results["subsets"][str(n)] = rows
        write_json(out / "results.json", results)
    plot(results, out / "memorisation.png")
    print(json.dumps(results["subsets"], indent=1))
    return 0


def load_mnist_split_of(folder) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 (N, 1, 28, 28), labels) of a subset folder."""
    dataset = open_dataset(str(folder))
    ids = np.arange(len(dataset))
    x = dataset.gather("latent", ids, views=np.zeros(len(ids), dtype=np.int64)).float()
    return x, dataset.gather("label", ids)


if __name__ == "__main__":
    raise SystemExit(main())
