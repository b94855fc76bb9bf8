"""Study 2, gradient variance: for fixed model states (after 50, 200 and 1,000 steps of an FM training run, the last
the digits recipe's length), the variance of the minibatch gradient over many draws (fresh batch, t, noise), FM
against each PAFM source, per fifth of t and overall, against the paper's claim that it falls by about the ESS.

Variance here is the trace of the gradient's covariance over draws, E||g - E g||^2, of the whole parameter vector.
Per t-bin, every draw has all its rows' t inside the bin; "overall" pools the draws of all bins (a stratified sample
of uniform t). The model states come from FM training with the objective API (`Objective.loss`, AdamW).

    python bench/studies/gradient_variance.py [--quick]
"""
from __future__ import annotations

import json

import numpy as np
import torch

from common import applies, environment, loader_and_objective, out_dir, parser, plt, t_bin_labels, write_json

from pafm.models import build_model
from pafm.objectives import Draws, flow_loss, step_generator

BINS = 5
VARIANTS = {"fm": {"kind": "fm"}, "batch-128": {"source": "batch"}, "bank-64": {"source": "bank"},
            "exact": {"source": "exact"}, "neighbors-8": {"source": "neighbors", "candidates": 8},
            "resample-8": {"source": "resample", "candidates": 8}}
SIZE = {"spec": "builtin:digits", "batch": 128, "states": [50, 200, 1000], "draws": 20, "lr": 1e-3}
QUICK = {**SIZE, "batch": 16, "states": [1, 2], "draws": 2}
QUICK_VARIANTS = ("fm", "bank-64", "exact")


def fm_states(size: dict) -> dict[int, dict]:
    """Model weights after each step count in size["states"] of FM training (AdamW, constant lr, seed 0)."""
    info, loader, objective = loader_and_objective(size["spec"], {"kind": "fm"}, size["batch"])
    c, h, _ = info["latent_shape"]
    torch.manual_seed(0)
    model = build_model("SiT-T/2", input_size=h, in_channels=c, num_classes=info["num_classes"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=size["lr"])
    batches, states = iter(loader), {}
    for step in range(1, max(size["states"]) + 1):
        batch = next(batches)
        out = objective.loss(model, batch["x"], batch["label"], batch, step_generator(0, step, 0, "cpu"))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step in size["states"]:
            states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return states, info


def gradients(model, objective, loader, size: dict, seed: int):
    """(per bin: the (draws, P) gradients, mean ESS of the rows) for one objective at one model state."""
    gen = torch.Generator().manual_seed(seed)
    batches = iter(loader)
    if objective.source is not None and objective.cfg.source == "bank":  # a bank that has filled, as in training
        for _ in range(-(-10 * objective.cfg.bank_per_class // size["batch"])):
            batch = next(batches)
            objective.source.update(batch["x"], batch["label"])
    out = []
    for b in range(BINS):
        grads, ess = [], []
        for _ in range(size["draws"]):
            batch = next(batches)
            x = batch["x"]
            d = objective.draw(gen, len(x), 0, 1, "cpu")
            t = (b + torch.rand(len(x), generator=gen)) / BINS
            draws = Draws(t, d.noise, torch.zeros(len(x), dtype=torch.bool), d.resample)
            target, _, diag = objective.targets(x, batch, draws)
            z = objective.path.interpolate(x, draws.noise, t)
            loss = flow_loss(model(z, t, batch["label"], drop=draws.drop), target)
            model.zero_grad(set_to_none=True)
            loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double())
            ess.append(float(diag["ess"].mean()) if diag is not None else 1.0)
        out.append((torch.stack(grads), float(np.mean(ess))))
    return out


def trace_variance(g: torch.Tensor) -> float:
    """E||g - mean||^2 with the unbiased (n - 1) normalisation."""
    return float((g - g.mean(0)).square().sum(1).sum() / (len(g) - 1))


def plot(results: dict, path) -> None:
    pyplot = plt()
    states = list(results["states"])
    fig, axes = pyplot.subplots(1, len(states), figsize=(6 * len(states), 4), squeeze=False)
    x = (np.arange(BINS) + 0.5) / BINS
    for ax, state in zip(axes[0], states):
        rows = results["states"][state]
        fm = np.asarray(rows["fm"]["variance_by_t"])
        for i, (name, r) in enumerate(rows.items()):
            if name == "fm":
                continue
            ax.plot(x, fm / np.asarray(r["variance_by_t"]), "o-", color=f"C{i}", label=f"{name}: FM var / var")
            ax.plot(x, r["ess_by_t"], ":", color=f"C{i}", label=f"{name}: ESS")
        ax.axhline(1.0, color="k", lw=1)
        ax.set(title=f"digits, FM model after {state} steps", xlabel="t (noise 0, data 1)", yscale="log")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)
    out = out_dir(args, "gradient_variance")
    size, variants = (QUICK, QUICK_VARIANTS) if args.quick else (SIZE, tuple(VARIANTS))
    results = {"study": "gradient_variance", "quick": args.quick, "environment": environment([0]), "size": size,
               "bins": t_bin_labels(BINS), "states": {}}
    states, info = fm_states(size)
    c, h, _ = info["latent_shape"]
    for step, weights in states.items():
        model = build_model("SiT-T/2", input_size=h, in_channels=c, num_classes=info["num_classes"])
        model.load_state_dict(weights)
        rows = {}
        for name in variants:
            settings = {**VARIANTS[name], "cond_dropout": 0.0}
            info, loader, objective = loader_and_objective(size["spec"], settings, size["batch"], seed=1)
            if not applies(info, settings):
                continue
            per_bin = gradients(model, objective, loader, size, seed=1)  # same seeds for every variant
            rows[name] = {"variance_by_t": [trace_variance(g) for g, _ in per_bin],
                          "variance": trace_variance(torch.cat([g for g, _ in per_bin])),
                          "ess_by_t": [e for _, e in per_bin]}
            print(f"state {step} {name}: {rows[name]}", flush=True)
        fm = rows["fm"]
        for r in rows.values():
            r["fm_over_this_by_t"] = [a / b for a, b in zip(fm["variance_by_t"], r["variance_by_t"])]
            r["fm_over_this"] = fm["variance"] / r["variance"]
        results["states"][str(step)] = rows
        write_json(out / "results.json", results)
    plot(results, out / "gradient_variance.png")
    print(json.dumps({s: {n: round(r["fm_over_this"], 3) for n, r in rows.items()}
                      for s, rows in results["states"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
