"""Generate N samples from an EMA export, spread over ranks, and score them; resumable.

    torchrun --nproc_per_node=8 -m pafm.eval RUN eval.num_samples=50000 eval.reference=VIRTUAL_imagenet256_labeled.npz \
        eval.inception_weights=weights-inception-2015-12-05-6726825d.pth sampler.method=sde sampler.steps=249
    python -m pafm.eval RUN_DIGITS sampler.cfg_scale=2.0          # the digits: accuracy, pixel FD, memorisation

The protocol is `pafm.evaluation`'s: chunks spread over ranks and resumed after a stop, OUT/samples.npz in ADM's
format, OUT/eval.json (OUT: eval.out_dir, by default RUN/eval/<sampler>-cfg<scale>-n<N>-seed<seed>-<hash>).

Conditions (eval.labels): `random` (the default) follows DiT's and SiT's sample_ddp.py, which draw each label i.i.d.
uniformly (torch.randint); `balanced` gives sample i the class i % num_classes, which lowers FID, so its numbers do not
compare with published ones.  Text models are conditioned on captions of the dataset's held-out split (its train
split where it has none, as data made by `pafm.prep captions`): drawn uniformly with replacement (random) or in order
(balanced).  Seed rule: chunk c draws its conditions, initial noise and SDE noise from CPU generators seeded by
sha256(eval.seed, c, stream).  SiT seeds one generator per rank instead; both draw i.i.d. labels and noise, so the
protocol is statistically the same, but here a chunk's samples depend on neither the number of ranks nor the order
chunks run in, which keeps a resumed evaluation exact.

A SiT or REPA checkpoint (.pt: SiT's SiT-XL-2-256x256.pt, REPA's last.pt) is evaluated directly, no run folder
needed: it is imported (pafm.models.interop) with its latents decoded by eval.vae, the SD-VAE folder they were
trained with (sd-vae-ft-ema for the published numbers); eval.checkpoint_format=auto tells REPA by its projector heads.
SiT's protocol is sampler.method=sde sampler.steps=249 (SiT's num_steps 250: 249 Euler-Maruyama steps and the last
step), sampler.method=dopri5 the ODE alternative, sampler.cfg_channels=3 the compatibility switch for SiT's code,
which guides only the first 3 latent channels.

Every check (config, export, reference, Inception weights, conditions, output folder) runs on every rank before any
sampling; a user error stops every rank with exit code 2 and rank 0 prints it in one line.
"""
from __future__ import annotations

import json
from pathlib import Path

from pafm.cli import OneLineParser, parse_args, report_error
from pafm.distributed import exit_process
from pafm.evaluation import evaluate


def main(argv=None) -> int:
    """Exit code: 0 when the report was written, 2 for a user error (one line on stderr, rank 0 under torchrun)."""
    p = OneLineParser(prog="torchrun -m pafm.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="run folder (uses RUN/ema.safetensors) or an export .safetensors file")
    p.add_argument("overrides", nargs="*", help="config overrides a.b=value (eval.*, sampler.*)")
    p.add_argument("--config", default=None, help="YAML file with eval: and sampler: sections")
    args, code = parse_args(p, argv)
    if args is None:
        return code
    try:
        report = evaluate(args.checkpoint, args.overrides, args.config)
    except Exception as err:  # noqa: BLE001 - report_error raises what is no user error again
        return report_error(err)
    if report is not None:
        print(json.dumps(report["metrics"], indent=2))
        print(report["readme_row"])
        print(f"report: {Path(report['out_dir']) / 'eval.json'}")
    return 0


if __name__ == "__main__":
    exit_process(main())
