"""The gate study on one GPU, sized for about 10 minutes of an H100: FM against gated PAFM on MNIST with a model that
converges there (SiT-S/2, batch 256, bf16), 3 seeds, the same rows as the CPU study (`gate.py`: per-seed metrics
unguided and at the MNIST recipe's guidance 2.0, paired differences with 95% intervals, sign tests, loss curves,
seconds per step).

    python bench/studies/gpu_gate.py --work /tmp/gpu-gate                     # on the GPU machine (about 10 minutes)
    python bench/studies/gpu_gate.py --work /tmp/gpu-gate --arms exact-g0.5   # FM against the exact source instead
    python bench/studies/gpu_gate.py --dry-run                                # on the CPU: the same pipeline, tiny

Arms: FM and PAFM gated to the recipes' default t_range [0, 0.5], with the class bank (the default) or the exact
whole-class posterior (`--arms exact-g0.5`; both arms, `--arms bank-g0.5 exact-g0.5`, take about 15 minutes); the CPU
study compares the gates themselves.  Seeds outermost, results.json after every run; a rerun with the same --work
reuses finished runs, so a session cut short continues where it stopped.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gate  # noqa: E402  (the CPU study's runs, statistics and plots)

ARMS = gate.arms(gates=(0.5,), sources=("bank", "exact"))
DEFAULT_ARMS = ["bank-g0.5"]
HEUN = ["sampler.method=heun", "sampler.steps=16"]
# 6 runs in about 10 minutes of one H100, by estimate (no GPU has run it): SiT-S/2 at batch 256 is about 10 TFLOP per
# step (3 x 2 x 33M parameters x 50,176 tokens), about 35 ms at 300 TFLOP/s, so 3,000 steps (15 epochs) take about
# 100 s; two runs at a time on the one GPU, plus two evaluations of 1,000 samples and the start-up of each.
SIZE = {"config": "configs/mnist_sit.yaml", "steps": 3000, "seeds": [0, 1, 2], "samples": 1000,
        "extra": ["model.name=SiT-S/2", "data.batch_size=256", "train.precision=bf16", "optim.lr=1.0e-3",
                  "optim.warmup_steps=100", "train.ema_decay=0.999", "train.device=cuda"],
        "checkpoint_every": 1000,
        "samplers": {"cfg1.0": [*HEUN, "sampler.cfg_scale=1.0"], "cfg2.0": [*HEUN, "sampler.cfg_scale=2.0"]},
        "metrics": ("accuracy", "frechet_cnn", "memorization", "diversity")}
DRY_RUN = {**SIZE, "steps": 2, "seeds": [0, 1], "samples": 20, "checkpoint_every": 2,
           "extra": ["model.name=SiT-T/4", "model.kwargs={hidden_size: 32, num_heads: 2, depth: 1}",
                     "data.batch_size=16", "train.precision=fp32", "train.device=cpu"],
           "samplers": {"cfg1.0": ["sampler.method=euler", "sampler.steps=2", "sampler.cfg_scale=1.0"]}}


def main(argv=None) -> int:
    p = gate.parser(__doc__)
    p.add_argument("--dry-run", action="store_true", help="the whole pipeline at a tiny size on the CPU")
    p.add_argument("--jobs", type=int, default=2, help="training processes at a time on the one GPU")
    p.add_argument("--arms", nargs="+", choices=list(ARMS)[1:], default=DEFAULT_ARMS,
                   help="the PAFM arms beside FM, which every arm is compared with (default: %(default)s)")
    args = p.parse_args(argv)
    args.quick = args.dry_run
    out = gate.out_dir(args, "gpu_gate")
    size = DRY_RUN if args.dry_run else SIZE
    return gate.run_study("gpu_gate", out, args.work or out / "runs", {"mnist": size},
                          gate.only_arms(ARMS, args.arms), args.jobs, quick=args.dry_run)


if __name__ == "__main__":
    raise SystemExit(main())
