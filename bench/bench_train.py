"""Training-step throughput and the extra cost of PAFM over FM, on synthetic latents (no dataset needed).

    python bench/bench_train.py                                   # CPU default: SiT-T/2 on 8x8x1, batch 128
    python bench/bench_train.py --model SiT-B/2 --size 32 --channels 4 --batch 256 --precision bf16   # a GPU
    python bench/bench_train.py --bank-classes 10,1000 --size 16 --channels 4 --bank-per-class 4 --depth 1 --width 32
        # the bank's step time against the number of classes, bank full, a model small enough that the pool and
        # the op dominate

One process, one device, no FSDP: it isolates the cost of the objective (the posterior op and its candidate pools)
from the model's forward/backward, through the trainer's building blocks (`build_model`, `Objective.loss`,
`flow_loss`). Each (objective, source) prints one JSON row (appended to --out when given) with the device name,
versions, date, ms/step, images/s, model FLOPs per image (`pafm.models.flops`, as the trainer counts them) and
the ratio to FM measured in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch

from pafm.models import build_model
from pafm.models.flops import train_flops_per_image
from pafm.objectives import Objective, ObjectiveConfig, step_generator

VARIANTS = [("fm", "batch"), ("pafm", "batch"), ("pafm", "bank"), ("pafm", "resample")]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def make_step(model_name, *, size, channels, classes, batch, precision, kind, source, device, bank_per_class=64,
              fill_bank=False, model_kwargs=None, model=None):
    """(step(i) -> None, model): one training step (draws, candidates, forward, target, backward, AdamW, bank
    push) on a fixed synthetic batch.  `fill_bank` fills every class's FIFO first (a bank that has filled).
    `model`: one built before (its weights carry on), so that timing several objectives builds it once."""
    torch.manual_seed(0)
    shape = (channels, size, size)
    info = {"kind": "class", "latent_shape": list(shape), "num_classes": classes}
    if model is None:
        with torch.device(device):  # initialised where it runs: a large model's CPU initialisation takes seconds
            model = build_model(model_name, input_size=size, in_channels=channels, num_classes=classes,
                                **(model_kwargs or {})).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = Objective(ObjectiveConfig(kind=kind, source=source, candidates=8, bank_per_class=bank_per_class),
                          info, device)
    gen = torch.Generator(device=device).manual_seed(0)
    batch = {"label": torch.randint(0, classes, (batch,), device=device, generator=gen),
             "mean": torch.randn((batch,) + shape, device=device, generator=gen),
             "std": torch.full((batch,) + shape, 0.1, device=device)}
    x = batch["mean"] + batch["std"] * torch.randn(batch["mean"].shape, device=device, generator=gen)
    if kind == "pafm" and source == "bank" and fill_bank:
        labels = torch.arange(classes, device=device).repeat_interleave(bank_per_class)
        objective.source.update(torch.randn((len(labels),) + shape, device=device, generator=gen), labels)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(i: int):
        out = objective.loss(model, x, batch["label"], batch, step_generator(0, i, 0, device), autocast)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if out.update is not None:
            out.update()
    return step, model


def timed(step, i: int, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median(values):
    return sorted(values)[len(values) // 2]


def time_step(model_name, *, device, steps=20, warmup=5, **setup):
    """Median seconds per training step, and the model."""
    step, model = make_step(model_name, device=device, **setup)
    times = [timed(step, i, device) for i in range(warmup + steps)]
    return median(times[warmup:]), model


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
    p.add_argument("--depth", type=int, default=None, help="override the model's depth")
    p.add_argument("--width", type=int, default=None, help="override the model's hidden size (2 heads)")
    p.add_argument("--bank-classes", default=None,
                   help="comma-separated class counts: time the full bank at each (ratio to the first)")
    p.add_argument("--out", default=None, help="append rows to this jsonl file (default: print only)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_kwargs = {k: v for k, v in (("depth", args.depth), ("hidden_size", args.width)) if v is not None}
    if args.width is not None:
        model_kwargs["num_heads"] = 2
    if args.bank_classes:
        bank_scaling(args, device, model_kwargs)
        return
    base = None
    for kind, source in VARIANTS:
        seconds, model = time_step(args.model, size=args.size, channels=args.channels, classes=args.classes,
                                   batch=args.batch, precision=args.precision, kind=kind, source=source,
                                   device=device, steps=args.steps, warmup=args.warmup,
                                   bank_per_class=args.bank_per_class, model_kwargs=model_kwargs)
        base = base or seconds
        row = {"device": device_name(device), "torch": torch.__version__,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "model": args.model, "latent": [args.channels, args.size, args.size], "batch": args.batch,
               "precision": args.precision, "objective": kind, "source": source if kind == "pafm" else None,
               "ms_per_step": 1e3 * seconds, "images_per_s": args.batch / seconds,
               "train_gflops_per_image": train_flops_per_image(model.config) / 1e9, "ratio_to_fm": seconds / base}
        emit(row, args.out)


def bank_scaling(args, device, model_kwargs):
    """The full bank's step time at each class count, same per-class size, latent shape and batch.  The setups'
    steps are interleaved, so a load that drifts on a shared machine hits every setup alike."""
    counts = [int(c) for c in args.bank_classes.split(",")]
    steps = [make_step(args.model, size=args.size, channels=args.channels, classes=c, batch=args.batch,
                       precision=args.precision, kind="pafm", source="bank", device=device,
                       bank_per_class=args.bank_per_class, fill_bank=True, model_kwargs=model_kwargs)[0]
             for c in counts]
    # Wall time, and this process's CPU time: on a shared CPU the wall time also counts the time other jobs held
    # the core, the CPU time only the step's own work.
    times, cpu_times = [[] for _ in counts], [[] for _ in counts]
    for i in range(args.warmup + args.steps):
        for step, seen, cpu_seen in zip(steps, times, cpu_times):
            cpu_start = time.process_time()
            seen.append(timed(step, i, device))
            cpu_seen.append(time.process_time() - cpu_start)
    base, cpu_base = median(times[0][args.warmup:]), median(cpu_times[0][args.warmup:])
    for classes, seen, cpu_seen in zip(counts, times, cpu_times):
        seconds, cpu_seconds = median(seen[args.warmup:]), median(cpu_seen[args.warmup:])
        emit({"device": device_name(device), "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "model": args.model, "model_kwargs": model_kwargs, "latent": [args.channels, args.size, args.size],
              "batch": args.batch, "precision": args.precision, "objective": "pafm", "source": "bank",
              "classes": classes, "bank_per_class": args.bank_per_class, "bank_full": True,
              "ms_per_step": 1e3 * seconds, "ratio_to_first": seconds / base,
              "cpu_ms_per_step": 1e3 * cpu_seconds, "cpu_ratio_to_first": cpu_seconds / cpu_base}, args.out)


def emit(row: dict, out):
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
