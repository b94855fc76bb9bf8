"""This project's SiT against SiT's and REPA's own code, on random weights: the velocity, CFG, the SDE sampler.

    python bench/sit_interop_check.py --sit /path/to/SiT --repa /path/to/REPA [--out FILE.jsonl]

--sit / --repa: a checkout (or a bare git directory) of github.com/willisma/SiT and github.com/sihyun-yu/REPA; their
models.py / models/sit.py / transport/ are imported from there (they need timm; SiT's transport needs torchdiffeq
on the path). Nothing of theirs is part of this project. Prints one JSON row per check, with the max abs difference.
"""
import argparse
import datetime
import importlib
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from pafm.models.interop import import_state_dict, pafm_to_sit_state_dict
from pafm.models import build_model
from pafm.paths import build_path
from pafm.sampling import SamplerConfig, guided_velocity, sample

FILES = {"sit": ["models.py", "transport/__init__.py", "transport/integrators.py", "transport/path.py",
                 "transport/transport.py", "transport/utils.py"],
         "repa": ["models/sit.py", "samplers.py"]}


def checkout(repo: str, files, into: Path) -> Path:
    """The files of a checkout or of a bare git directory (HEAD), copied under `into`."""
    src = Path(repo)
    for name in files:
        dst = into / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if (src / name).is_file():
            dst.write_bytes((src / name).read_bytes())
        else:
            dst.write_bytes(subprocess.run(["git", "--git-dir", str(src), "show", f"HEAD:{name}"], check=True,
                                           capture_output=True).stdout)
    return into


def randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def row(out, **fields):
    fields = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "machine": platform.machine(), **fields}
    print(json.dumps(fields), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(fields) + "\n")


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sit", required=True)
    p.add_argument("--repa", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--sizes", nargs="+", default=["SiT-S/2:32", "SiT-XL/2:16"], help="NAME:INPUT_SIZE")
    args = p.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    sys.path.insert(0, str(checkout(args.sit, FILES["sit"], tmp / "sit")))
    sit_models = importlib.import_module("models")

    for spec in args.sizes:
        name, size = spec.split(":")
        ref = randomize(sit_models.SiT_models[name](input_size=int(size), learn_sigma=True), 1).eval()
        ours, fmt = import_state_dict(ref.state_dict())
        x, t = torch.randn(4, 4, int(size), int(size)), torch.rand(4)
        y = torch.tensor([0, 17, 999, 1000])  # 1000: the null class
        with torch.no_grad():
            theirs, mine = ref(x, t, y), ours(x, t, y)
            d = max_diff(theirs, mine)
            row(args.out, check="velocity", model=name, input_size=int(size), learn_sigma=True, format=fmt,
                max_abs_diff=d, output_abs_max=theirs.abs().max().item())
            theirs_1000t = ref(x, 1000 * t, y)
            legacy = build_model(name, **{**ours.config["kwargs"], "time_scale": 1000.0})
            legacy.load_state_dict(ours.state_dict())
            row(args.out, check="velocity, DiT's 1000 t (SiT fed 1000 t)", model=name,
                max_abs_diff=max_diff(theirs_1000t, legacy.eval()(x, t, y)),
                diff_to_sit_default=max_diff(theirs, legacy(x, t, y)))
            # SiT's forward_with_cfg guides channels 0-2 of a doubled batch; the first half is the sample
            yc = torch.tensor([3, 5, 7, 9])
            theirs_cfg = ref.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([yc, yc * 0 + 1000]),
                                              4.0)[:4]
            mine_cfg = ours.forward_with_cfg(x, t, yc, 4.0, channels=3)
            row(args.out, check="cfg on the first 3 channels", model=name, max_abs_diff=max_diff(theirs_cfg, mine_cfg),
                diff_to_all_channels=max_diff(theirs_cfg, ours.forward_with_cfg(x, t, yc, 4.0)))
        # The reverse export loads strictly into SiT's model as sample.py builds it for --ckpt (learn_sigma=False)
        back = sit_models.SiT_models[name](input_size=int(size), learn_sigma=False).eval()
        back.load_state_dict(pafm_to_sit_state_dict(ours), strict=True)
        with torch.no_grad():
            row(args.out, check="export to SiT's format, SiT's forward", model=name,
                max_abs_diff=max_diff(back(x, t, y), mine))

    # SiT's own SDE sampler (Euler-Maruyama, sigma diffusion, Mean last step 0.04) against this project's, with the
    # same noise: SiT draws it from the global CPU generator, one randn per step, as the sampler here does from its
    # generator. SiT's num_steps = 250 is 249 Euler-Maruyama steps plus the last step: sampler.steps=249 here.
    transport = importlib.import_module("transport")
    name, size, steps = "SiT-S/2", 16, 25
    ref = randomize(sit_models.SiT_models[name](input_size=size, learn_sigma=True), 2).eval()
    ours, _ = import_state_dict(ref.state_dict())
    noise, y = torch.randn(3, 4, size, size), torch.tensor([1, 2, 3])
    sde = transport.Sampler(transport.create_transport("Linear", "velocity", None, None, None)).sample_sde(
        sampling_method="Euler", diffusion_form="sigma", diffusion_norm=1.0, last_step="Mean", last_step_size=0.04,
        num_steps=steps)
    torch.manual_seed(123)
    with torch.no_grad():
        theirs = sde(noise.clone(), ref.forward, y=y)[-1]
    cfg = SamplerConfig(method="sde", steps=steps - 1, diffusion="sigma", last_step="mean", last_step_size=0.04)
    mine, nfe = sample(guided_velocity(ours, y), noise.clone(), build_path("linear"), cfg,
                       generator=torch.Generator().manual_seed(123))
    row(args.out, check="SDE sampler (SiT num_steps=25 vs steps=24 here)", model=name, nfe=nfe,
        max_abs_diff=max_diff(theirs, mine), sample_abs_max=theirs.abs().max().item())
    ode = transport.Sampler(transport.create_transport("Linear", "velocity", None, None, None)).sample_ode(
        sampling_method="dopri5", num_steps=2, atol=1e-6, rtol=1e-3)
    with torch.no_grad():
        theirs = ode(noise.clone(), ref.forward, y=y)[-1]
    mine, nfe = sample(guided_velocity(ours, y), noise.clone(), build_path("linear"), SamplerConfig(method="dopri5"))
    row(args.out, check="ODE dopri5 (torchdiffeq in SiT's code vs this project's)", model=name, nfe=nfe,
        max_abs_diff=max_diff(theirs, mine), sample_abs_max=theirs.abs().max().item())

    if args.repa:
        path = checkout(args.repa, FILES["repa"], tmp / "repa") / "models" / "sit.py"
        spec = importlib.util.spec_from_file_location("repa_sit", path)
        repa_sit = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(repa_sit)
        ref = randomize(repa_sit.SiT_models["SiT-B/2"](input_size=16, z_dims=[768], encoder_depth=4, qk_norm=False),
                        3).eval()
        ours, fmt = import_state_dict(ref.state_dict())
        x, s = torch.randn(4, 4, 16, 16), torch.rand(4)
        y = torch.tensor([0, 17, 999, 1000])
        with torch.no_grad():
            theirs = -ref(x, 1 - s, y)[0]  # REPA: noise at t = 1, velocity towards the noise
            row(args.out, check="REPA velocity, reversed time", model="SiT-B/2", format=fmt,
                max_abs_diff=max_diff(theirs, ours(x, s, y)), output_abs_max=theirs.abs().max().item())
        # REPA's own samplers (time from 1 to 0, float64 state) with CFG 1.8 for REPA t <= 0.7, i.e. t >= 0.3 here
        spec = importlib.util.spec_from_file_location("repa_samplers", tmp / "repa" / "samplers.py")
        repa_samplers = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(repa_samplers)
        noise, y, steps = torch.randn(3, 4, 16, 16), torch.tensor([1, 2, 3]), 20
        kw = dict(num_steps=steps, cfg_scale=1.8, guidance_low=0.0, guidance_high=0.7)
        theirs = repa_samplers.euler_sampler(ref, noise.clone(), y, **kw)
        fn = guided_velocity(ours, y, 1.8, (0.3, 1.0))
        mine, nfe = sample(fn, noise.clone(), build_path("linear"), SamplerConfig(method="euler", steps=steps))
        row(args.out, check="REPA's Euler sampler, cfg 1.8 in REPA t [0, 0.7] = [0.3, 1] here", model="SiT-B/2",
            nfe=nfe, max_abs_diff=max_diff(theirs, mine), sample_abs_max=theirs.abs().max().item())
        # REPA draws its SDE noise with randn_like of its float64 state: fed the float32 draws of the sampler here
        gen, randn_like = torch.Generator().manual_seed(7), torch.randn_like
        torch.randn_like = lambda x: torch.randn(x.shape, generator=gen).to(x.dtype)
        try:
            theirs = repa_samplers.euler_maruyama_sampler(ref, noise.clone(), y, **kw)
        finally:
            torch.randn_like = randn_like
        cfg = SamplerConfig(method="sde", steps=steps - 1, cfg_scale=1.8, cfg_interval=(0.3, 1.0))
        mine, nfe = sample(fn, noise.clone(), build_path("linear"), cfg, generator=torch.Generator().manual_seed(7))
        row(args.out, check=f"REPA's SDE sampler (num_steps={steps} vs steps={steps - 1} here), cfg 1.8 interval",
            model="SiT-B/2", nfe=nfe, max_abs_diff=max_diff(theirs, mine), sample_abs_max=theirs.abs().max().item())


if __name__ == "__main__":
    main()
