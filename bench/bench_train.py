"""Training-step throughput and the extra cost of PAFM over FM, on synthetic latents (no dataset needed).

    python bench/bench_train.py                                   # CPU default: SiT-T/2 on 8x8x1, batch 128
    python bench/bench_train.py --model SiT-B/2 --size 32 --channels 4 --batch 256 --precision bf16   # a GPU

One process, one device, no FSDP: it isolates the cost of the objective (the posterior op and its candidate pools)
from the model's forward/backward, through the trainer's building blocks (`build_model`, `Objective.loss`,
`flow_loss`). Each (objective, source) prints one JSON row (appended to --out when given) with the device name,
versions, date, ms/step, images/s, model FLOPs per image and the ratio to FM measured in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch

from pafm.models import build_model
from pafm.objectives import Objective, ObjectiveConfig, step_generator

VARIANTS = [("fm", "batch"), ("pafm", "batch"), ("pafm", "bank"), ("pafm", "resample")]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def train_flops_per_image(model) -> float:
    """Forward + backward FLOPs of one image (3x the forward's matmuls: linear layers and attention)."""
    kw = model.config["kwargs"]
    h, depth, ratio = kw["hidden_size"], kw["depth"], kw["mlp_ratio"]
    tokens = (kw["input_size"] // int(model.config["name"].rsplit("/", 1)[1])) ** 2  # "SiT-B/2": patch 2
    per_block = 2 * tokens * (4 * h * h + 2 * ratio * h * h) + 4 * tokens * tokens * h + 2 * 6 * h * h
    return 3.0 * depth * per_block


def time_step(model_name, *, size, channels, classes, batch, precision, kind, source, device, steps=20, warmup=5,
              bank_per_class=64, prefill_bank=0):
    """Median seconds per training step (draws, candidates, forward, target, backward, AdamW, bank push) and the
    model. `prefill_bank` pushes that many random batches into a bank first (a bank that has filled)."""
    torch.manual_seed(0)
    shape = (channels, size, size)
    info = {"kind": "class", "latent_shape": list(shape), "num_classes": classes}
    model = build_model(model_name, input_size=size, in_channels=channels, num_classes=classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = Objective(ObjectiveConfig(kind=kind, source=source, candidates=8, bank_per_class=bank_per_class),
                          info, device)
    gen = torch.Generator(device=device).manual_seed(0)
    batch = {"label": torch.randint(0, classes, (batch,), device=device, generator=gen),
             "mean": torch.randn((batch,) + shape, device=device, generator=gen),
             "std": torch.full((batch,) + shape, 0.1, device=device)}
    x = batch["mean"] + batch["std"] * torch.randn(batch["mean"].shape, device=device, generator=gen)
    if kind == "pafm" and source == "bank":
        for _ in range(prefill_bank):
            objective.source.update(torch.randn_like(x), torch.randint(0, classes, (len(x),), device=device))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    times = []
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = objective.loss(model, x, batch["label"], batch, step_generator(0, step, 0, device), autocast)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if out.update is not None:
            out.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SiT-T/2")
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--bank-per-class", type=int, default=64)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=None, help="append rows to this jsonl file (default: print only)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = None
    for kind, source in VARIANTS:
        seconds, model = time_step(args.model, size=args.size, channels=args.channels, classes=args.classes,
                                   batch=args.batch, precision=args.precision, kind=kind, source=source,
                                   device=device, steps=args.steps, warmup=args.warmup,
                                   bank_per_class=args.bank_per_class)
        base = base or seconds
        row = {"device": device_name(device), "torch": torch.__version__,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "model": args.model, "latent": [args.channels, args.size, args.size], "batch": args.batch,
               "precision": args.precision, "objective": kind, "source": source if kind == "pafm" else None,
               "ms_per_step": 1e3 * seconds, "images_per_s": args.batch / seconds,
               "train_gflops_per_image": train_flops_per_image(model) / 1e9, "ratio_to_fm": seconds / base}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
