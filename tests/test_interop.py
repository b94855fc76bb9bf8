"""SiT's and REPA's checkpoint formats on random weights: names and shapes of every size, SiT's time embedding
against an independent float64 sinusoid, REPA's reversed time against REPA's own sampler equations, the export back
to SiT's format, and the whole evaluation path on a random SiT-S/2 written as SiT writes its checkpoints."""
import argparse
import math

import numpy as np
import pytest
import torch

from pafm.config import ConfigError
from pafm.evaluation import evaluate
from pafm.export import load_export, read_export_meta, save_export
from pafm.metrics import write_random_inception
from pafm.models import build_model, list_models, model_from_config
from pafm.models.interop import (InteropError, export_sit_checkpoint, import_state_dict, infer_sit_config,
                                 pafm_to_sit_state_dict, read_torch_state_dict, sit_format_shapes)
from pafm.paths import build_path
from pafm.sampling import SamplerConfig, guided_velocity, sample

@pytest.fixture(autouse=True)
def one_thread():
    """SiT-S/2 on a handful of tokens is many tiny matmuls: on a busy machine two threads are much slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# SiT's models.py, as a table: (depth, hidden size, heads) per size; every one has patch sizes 2, 4, 8.
SIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def sit_key_shapes(depth, hidden, patch, channels=4, classes=1000, input_size=32, learn_sigma=True):
    """The state dict of SiT's models.py (SiT class, timm blocks), written out by hand from its layer list."""
    tokens, out = (input_size // patch) ** 2, patch * patch * channels * (2 if learn_sigma else 1)
    shapes = {"pos_embed": (1, tokens, hidden), "x_embedder.proj.weight": (hidden, channels, patch, patch),
              "x_embedder.proj.bias": (hidden,), "t_embedder.mlp.0.weight": (hidden, 256),
              "t_embedder.mlp.0.bias": (hidden,), "t_embedder.mlp.2.weight": (hidden, hidden),
              "t_embedder.mlp.2.bias": (hidden,), "y_embedder.embedding_table.weight": (classes + 1, hidden)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "attn.qkv.weight": (3 * hidden, hidden), b + "attn.qkv.bias": (3 * hidden,),
                       b + "attn.proj.weight": (hidden, hidden), b + "attn.proj.bias": (hidden,),
                       b + "mlp.fc1.weight": (4 * hidden, hidden), b + "mlp.fc1.bias": (4 * hidden,),
                       b + "mlp.fc2.weight": (hidden, 4 * hidden), b + "mlp.fc2.bias": (hidden,),
                       b + "adaLN_modulation.1.weight": (6 * hidden, hidden),
                       b + "adaLN_modulation.1.bias": (6 * hidden,)})
    shapes.update({"final_layer.linear.weight": (out, hidden), "final_layer.linear.bias": (out,),
                   "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
                   "final_layer.adaLN_modulation.1.bias": (2 * hidden,)})
    return shapes


def randomize(model, seed=0, std=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(std * torch.randn(p.shape, generator=gen))
    return model.eval()


def small_sit(seed=0, **kw):
    return randomize(build_model("SiT-S/2", **{"input_size": 8, "num_classes": 10, **kw}), seed)


def sit_release(model, seed=1):
    """`model` as SiT's released 256-px checkpoint holds it: learned-sigma head, its sigma half random."""
    state = pafm_to_sit_state_dict(model, learn_sigma=True)
    pp, c = model.patch_size ** 2, model.in_channels
    gen = torch.Generator().manual_seed(seed)
    for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
        v = state[key].reshape(pp, 2 * c, *state[key].shape[1:])
        v[:, c:] = torch.randn(v[:, c:].shape, generator=gen)
        state[key] = v.reshape(state[key].shape)
    return state


# ---------------------------------------------------------------- names and shapes


@pytest.mark.parametrize("size", list(SIT_SIZES))
def test_every_sit_size_maps_names_and_shapes_both_ways(size):
    depth, hidden, heads = SIT_SIZES[size]
    for patch in (2, 4, 8):
        name = f"SiT-{size}/{patch}"
        assert name in list_models()
        with torch.device("meta"):
            model = build_model(name)
        assert model.blocks[0].attn.num_heads == heads
        for learn_sigma in (True, False):
            expected = sit_key_shapes(depth, hidden, patch, learn_sigma=learn_sigma)
            assert sit_format_shapes(model, learn_sigma) == expected  # names, shapes and SiT's order
            state = {k: torch.empty(s, device="meta") for k, s in expected.items()}
            inferred, kwargs, sigma = infer_sit_config(state)
            assert (inferred, sigma) == (name, learn_sigma)
            with torch.device("meta"):
                again = build_model(inferred, **kwargs)
            assert again.config == model.config  # the same architecture, time_scale 1 recorded


def test_import_keeps_the_velocity_and_drops_the_sigma_half():
    model = small_sit()
    state = sit_release(model)
    imported, fmt = import_state_dict(state)
    assert fmt == "sit" and imported.config["name"] == "SiT-S/2" and not imported.reverse_time
    assert imported.config["kwargs"]["time_scale"] == 1.0 and imported.num_classes == 10
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 9, 10])
    with torch.no_grad():
        assert torch.equal(imported(x, t, y), model(x, t, y))
    # the export without the sigma half round-trips exactly too
    again, _ = import_state_dict(pafm_to_sit_state_dict(model))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_a_mismatched_checkpoint_is_refused_naming_the_first_wrong_key():
    state = sit_release(small_sit())
    bad = dict(state)
    bad["blocks.3.attn.qkv.weight"] = torch.zeros(5, 384)
    with pytest.raises(InteropError, match=r"blocks\.3\.attn\.qkv\.weight has shape \(5, 384\), expected "
                                           r"\(1152, 384\)"):
        import_state_dict(bad)
    extra = {**state, "blocks.0.attn.q_norm.weight": torch.ones(64)}
    with pytest.raises(InteropError, match=r"unexpected key blocks\.0\.attn\.q_norm\.weight \(64\)"):
        import_state_dict(extra)
    missing = {k: v for k, v in state.items() if k != "final_layer.linear.bias"}
    with pytest.raises(InteropError, match=r"missing key final_layer\.linear\.bias \(32\)"):
        import_state_dict(missing)
    with pytest.raises(InteropError, match="does not fit SiT-B/2"):
        import_state_dict(state, name="SiT-B/2")
    moved = {**state, "pos_embed": state["pos_embed"] + 0.01}
    with pytest.raises(InteropError, match="pos_embed differs"):
        import_state_dict(moved)


def test_checkpoint_files_weights_only_and_the_cli(tmp_path, capsys):
    from pafm.models.interop import main

    model = small_sit()
    state = sit_release(model)
    # SiT's train.py checkpoints hold the EMA next to argparse args: read with weights_only=True, args allowed
    torch.save({"model": state, "ema": state, "args": argparse.Namespace(model="SiT-S/2")}, tmp_path / "train.pt")
    assert read_torch_state_dict(tmp_path / "train.pt").keys() == state.keys()

    class Evil:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    torch.save({"ema": state, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(InteropError, match="weights_only=True"):
        read_torch_state_dict(tmp_path / "evil.pt")
    assert "pickle code ran" not in capsys.readouterr().out
    bad = dict(state)
    bad["y_embedder.embedding_table.weight"] = torch.zeros(11, 100)
    torch.save(bad, tmp_path / "bad.pt")
    assert main(["import", str(tmp_path / "bad.pt"), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "y_embedder.embedding_table.weight has shape (11, 100), expected (11, 384)" in err
    assert not (tmp_path / "x.safetensors").exists()
    torch.save(state, tmp_path / "sit.pt")
    assert main(["import", str(tmp_path / "sit.pt"), str(tmp_path / "sit.safetensors")]) == 0
    loaded, meta = load_export(tmp_path / "sit.safetensors")
    assert meta["import"]["format"] == "sit" and meta["data"]["info"]["normalization"]["scale"] == [0.18215] * 4
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))
    assert main(["export", str(tmp_path / "sit.safetensors"), str(tmp_path / "back.pt")]) == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in back.items()} == sit_format_shapes(model, learn_sigma=False)
    assert all(torch.equal(back[k], state[k]) for k in back if not k.startswith("final_layer.linear"))
    capsys.readouterr()
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "back.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_export_refuses_what_sits_code_cannot_run(tmp_path):
    for kwargs, match in (({"qk_norm": True}, "QK RMSNorm"), ({"time_scale": 1000.0}, "embeds 1000 t"),
                          ({"reverse_time": True}, "REPA-direction")):
        with pytest.raises(InteropError, match=match):
            export_sit_checkpoint(small_sit(**kwargs), tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


# ---------------------------------------------------------------- time


def sit_sinusoid64(t, dim=256):
    """SiT's TimestepEmbedder features, re-derived in float64: [cos(t w_k), sin(t w_k)], w_k = 10000^(-k / half)."""
    half = dim // 2
    w = torch.tensor([math.pow(10000.0, -k / half) for k in range(half)], dtype=torch.float64)
    args = t.double()[:, None] * w[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def embedder_input(model, t):
    seen = []
    handle = model.t_embedder.mlp[0].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(torch.zeros(len(t), 4, 8, 8), t, torch.zeros(len(t), dtype=torch.long))
    handle.remove()
    return seen[0]


def test_time_embedding_is_sits_and_old_configs_keep_1000t():
    t = torch.tensor([0.0, 0.04, 0.5, 0.731, 1.0])
    model = small_sit()
    got = embedder_input(model, t)
    assert torch.allclose(got.double(), sit_sinusoid64(t), atol=1e-6, rtol=0)
    assert torch.allclose(got[:, 0].double(), torch.cos(t.double()), atol=1e-7)  # w_0 = 1: cos t and sin t
    assert torch.allclose(got[:, 128].double(), torch.sin(t.double()), atol=1e-7)
    assert model.config["kwargs"]["time_scale"] == 1.0  # recorded, so exports and runs carry it
    # A config saved before the option (every other argument, no time_scale) embeds 1000 t as its model did.
    old = {k: v for k, v in model.config["kwargs"].items() if k not in ("time_scale", "reverse_time")}
    legacy = model_from_config({"name": "SiT-S/2", "kwargs": old})
    assert legacy.config["kwargs"]["time_scale"] == 1000.0
    assert build_model("SiT-S/2", **old).config["kwargs"]["time_scale"] == 1.0  # given arguments are never changed
    legacy.load_state_dict(model.state_dict())
    assert torch.allclose(embedder_input(legacy.eval(), t).double(), sit_sinusoid64(1000 * t.double()), atol=2e-4)
    partial = {k: v for k, v in old.items() if k != "mlp_ratio"}  # not a whole saved config: SiT's scale
    assert model_from_config({"name": "SiT-S/2", "kwargs": partial}).config["kwargs"]["time_scale"] == 1.0


def test_an_old_export_without_time_scale_samples_as_before(tmp_path):
    model = small_sit(time_scale=1000.0)
    kwargs = {k: v for k, v in model.config["kwargs"].items() if k not in ("time_scale", "reverse_time")}
    meta = {"model": {"name": "SiT-S/2", "kwargs": kwargs}, "data": {"spec": "x", "info": {}}, "path": "linear",
            "step": 1}
    save_export(tmp_path / "ema.safetensors", model.state_dict(), meta)
    loaded, _ = load_export(tmp_path)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))


def repa_checkpoint(net):
    """`net`'s weights as REPA's train.py stores them: SiT names plus projector heads (build_mlp, z_dim 32)."""
    state = pafm_to_sit_state_dict(net)
    gen = torch.Generator().manual_seed(5)
    for i, (o, n) in enumerate([(64, 384), (64, 64), (32, 64)]):
        state[f"projectors.0.{2 * i}.weight"] = torch.randn(o, n, generator=gen)
        state[f"projectors.0.{2 * i}.bias"] = torch.randn(o, generator=gen)
    return state


def repa_euler_maruyama(net, x, y, num_steps, gen):
    """REPA's SDE sampler written out from its equations: time from 1 (noise) to 0 (data), linear path
    x_t = (1 - t) x + t eps, diffusion 2 t, last (mean) step from 0.04 to 0; the noise drawn as the sampler here
    draws it (one randn per step from `gen`)."""
    ts = torch.cat([torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])

    def drift(x, t):
        tt = torch.full((len(x),), float(t))
        v = net(x, tt, y).double()
        score = -((1 - t) * v + x.double()) / t  # eps = (1 - t) v + x for this path; score = -eps / t
        return v - 0.5 * (2 * t) * score

    for i in range(num_steps - 1):
        t, dt = ts[i].item(), (ts[i + 1] - ts[i]).item()
        noise = torch.randn(x.shape, generator=gen)
        x = (x.double() + drift(x, t) * dt + math.sqrt(2 * t) * math.sqrt(abs(dt)) * noise.double()).float()
    t, dt = ts[-2].item(), (ts[-1] - ts[-2]).item()
    return (x.double() + drift(x, t) * dt).float()


def test_repa_reversed_time_gives_the_direct_models_trajectory():
    net = small_sit(seed=4)  # read as REPA's network: noise at t = 1, velocity towards the noise
    imported, fmt = import_state_dict(repa_checkpoint(net))
    assert fmt == "repa" and imported.reverse_time and imported.config["kwargs"]["reverse_time"]
    x, s, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([2, 5, 10])
    with torch.no_grad():
        assert torch.allclose(imported(x, s, y), -net(x, 1 - s, y), atol=1e-6, rtol=0)
        # the ODE: REPA's Euler from t = 1 to 0 is this project's Euler from 0 to 1 on the imported model
        steps, z = 6, x.clone()
        for t0, t1 in zip(torch.linspace(1, 0, steps + 1)[:-1], torch.linspace(1, 0, steps + 1)[1:]):
            z = z + (t1 - t0) * net(z, t0.expand(3), y)
        mine, _ = sample(guided_velocity(imported, y), x.clone(), build_path("linear"),
                         SamplerConfig(method="euler", steps=steps))
        assert torch.allclose(mine, z, atol=1e-5, rtol=0), (mine - z).abs().max()
        # the SDE, noise and all
        theirs = repa_euler_maruyama(net, x.clone(), y, 8, torch.Generator().manual_seed(3))
        cfg = SamplerConfig(method="sde", steps=7, diffusion="sigma", last_step="mean", last_step_size=0.04)
        mine, nfe = sample(guided_velocity(imported, y), x.clone(), build_path("linear"), cfg,
                           generator=torch.Generator().manual_seed(3))
    assert nfe == 8 and torch.allclose(mine, theirs, atol=1e-5, rtol=0), (mine - theirs).abs().max()


def test_cfg_on_the_first_three_channels():
    model = small_sit(seed=6)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 4])
    with torch.no_grad():
        c, u = model(x, t, y).double(), model(x, t, torch.full_like(y, 10)).double()
        guided = u + 2.5 * (c - u)
        three = model.forward_with_cfg(x, t, y, 2.5, channels=3).double()
        every = model.forward_with_cfg(x, t, y, 2.5).double()
    assert torch.allclose(three[:, :3], guided[:, :3], atol=1e-5) and torch.allclose(three[:, 3], c[:, 3], atol=1e-5)
    assert torch.allclose(every, guided, atol=1e-5) and not torch.allclose(every, three, atol=1e-3)
    with pytest.raises(ValueError, match="cfg_channels"):
        SamplerConfig(cfg_channels=0)


# ---------------------------------------------------------------- the whole path


def tiny_vae_folder(path):
    """A random diffusers AutoencoderKL with 4 latent channels and no down-sampling (8x8 latents -> 8x8 RGB)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        layers_per_block=1, norm_num_groups=4, sample_size=8)
    vae.save_pretrained(path)
    return path


@pytest.mark.slow
def test_eval_of_a_sit_format_checkpoint_with_every_sampler(tmp_path):
    model = small_sit(seed=7)
    ckpt = tmp_path / "SiT-S-2-random.pt"
    torch.save(sit_release(model), ckpt)
    vae = tiny_vae_folder(tmp_path / "vae")
    weights = write_random_inception(tmp_path / "inception.pth")
    reference = tmp_path / "reference.npz"
    np.savez(reference, arr_0=np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    common = ["eval.num_samples=6", "eval.batch_size=3", f"eval.vae={vae}", "sampler.cfg_scale=1.5"]
    fid = ["eval.metrics=[fid]", f"eval.reference={reference}", f"eval.inception_weights={weights}"]
    # FID (a 2048-dim matrix square root, seconds on a CPU) once, for SiT's protocol sampler; the others write the
    # ADM-format samples only.
    samplers = {"euler": ["sampler.method=euler", "sampler.steps=3", "eval.metrics=[]"],
                "heun": ["sampler.method=heun", "sampler.steps=2", "sampler.cfg_channels=3", "eval.metrics=[]"],
                "dopri5": ["sampler.method=dopri5", "sampler.rtol=0.1", "sampler.atol=0.01", "eval.metrics=[]"],
                "sde": ["sampler.method=sde", "sampler.steps=3", "sampler.cfg_interval=[0.3,1.0]", *fid]}
    images = {}
    for name, args in samplers.items():
        report = evaluate(ckpt, common + args + [f"eval.out_dir={tmp_path / name}"])
        assert report["model"] == "SiT-S/2" and report["import"]["format"] == "sit" and report["step"] is None
        with np.load(tmp_path / name / "samples.npz") as data:
            assert data["arr_0"].shape == (6, 8, 8, 3) and data["arr_0"].dtype == np.uint8
            assert data["arr_1"].min() >= 0 and data["arr_1"].max() < 10  # random labels of the 10 classes
            images[name] = data["arr_0"]
    assert report["model_evaluations_per_sample"] == 4  # SDE: 3 Euler-Maruyama steps and the last step
    assert np.isfinite(report["metrics"]["fid"]) and report["metrics"]["fid"] > 0
    assert all(not np.array_equal(images[a], images[b]) for a in images for b in images if a < b)
    # What eval.* needs for a SiT checkpoint is checked before anything is sampled.
    with pytest.raises(ConfigError, match="eval.vae is required"):
        evaluate(ckpt, [a for a in common if not a.startswith("eval.vae")] + fid)
    with pytest.raises(InteropError, match="does not exist"):
        evaluate(tmp_path / "missing.pt", common + fid)
    save_export(tmp_path / "run" / "ema.safetensors", model.state_dict(),
                {"model": model.config, "data": {"spec": "x", "info": {}}, "path": "linear", "step": 1})
    with pytest.raises(ConfigError, match="eval.vae applies to SiT and REPA"):
        evaluate(tmp_path / "run", common)
    assert read_export_meta(tmp_path / "run")["model"]["kwargs"]["time_scale"] == 1.0


def test_sample_cli_points_a_torch_checkpoint_to_the_import(tmp_path, capsys):
    from pafm.sample import main as sample_main

    torch.save(sit_release(small_sit()), tmp_path / "sit.pt")
    assert sample_main([str(tmp_path / "sit.pt"), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python -m pafm.models.interop import" in err
