"""Training-step throughput and the extra cost of PAFM over FM, on synthetic latents (no dataset needed).

    python bench/bench_train.py                                   # CPU default: SiT-T/2 on 8x8x1, batch 128
    python bench/bench_train.py --model SiT-B/2 --size 32 --channels 4 --batch 256 --precision bf16   # a GPU

One process, one device, no FSDP: it isolates the cost of the objective (the posterior op and its candidate pools)
from the model's forward/backward. Each (objective, source) writes one JSON row to bench/results/train_<device>.jsonl
with the device name, versions, date, ms/step, images/s and the ratio to FM measured in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from pafm.models import build_model
from pafm.objectives import Objective, ObjectiveConfig, step_generator

VARIANTS = [("fm", "batch"), ("pafm", "batch"), ("pafm", "bank"), ("pafm", "resample")]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(args, kind: str, source: str, device) -> float:
    torch.manual_seed(0)
    shape = (args.channels, args.size, args.size)
    info = {"kind": "class", "latent_shape": list(shape), "num_classes": args.classes}
    model = build_model(args.model, input_size=args.size, in_channels=args.channels, num_classes=args.classes)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = Objective(ObjectiveConfig(kind=kind, source=source, candidates=8, bank_per_class=args.bank_per_class),
                          info, device)
    gen = torch.Generator(device=device).manual_seed(0)
    batch = {"label": torch.randint(0, args.classes, (args.batch,), device=device, generator=gen),
             "mean": torch.randn((args.batch,) + shape, device=device, generator=gen),
             "std": torch.full((args.batch,) + shape, 0.1, device=device)}
    x = batch["mean"] + batch["std"] * torch.randn(batch["mean"].shape, device=device, generator=gen)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = objective.loss(model, x, batch["label"], batch, step_generator(0, step, 0, device), autocast)
        out.loss.backward()
        optimizer.step()
        if out.update is not None:
            out.update()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


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
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out or Path(__file__).parent / "results" / f"train_{device.type}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    base = None
    for kind, source in VARIANTS:
        seconds = run(args, kind, source, device)
        base = base or seconds
        row = {"device": device_name(device), "torch": torch.__version__,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "model": args.model, "latent": [args.channels, args.size, args.size], "batch": args.batch,
               "precision": args.precision, "objective": kind, "source": source if kind == "pafm" else None,
               "ms_per_step": 1e3 * seconds, "images_per_s": args.batch / seconds, "ratio_to_fm": seconds / base}
        print(json.dumps(row))
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
