"""SiT and MMDiT: registry, DiT initialisation, float64 references for every formula, masks, CFG, compile."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from pafm.models import MMDiT, SiT, build_model, list_models
from pafm.models.layers import DIT_TIME_SCALE, RMSNorm, sincos_pos_embed_2d, timestep_embedding

TEXT = dict(text_dim=12, pooled_dim=10, max_text_len=7)


def tiny_sit(**kw):
    return build_model("SiT-T/2", **{"input_size": 8, "in_channels": 2, "num_classes": 10, "depth": 2, **kw})


def tiny_mmdit(**kw):
    return build_model("MMDiT-T/2", **{"input_size": 8, "in_channels": 2, "depth": 3, **TEXT, **kw})


def randomize(model, std=0.1, seed=0):
    """Move away from the zero initialisation so that every path carries signal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p + std * torch.randn(p.shape, generator=gen))
    return model


def text_cond(batch, length=5, real=(5, 3, 1, 4), seed=1):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.arange(length)[None] < torch.tensor(real[:batch])[:, None]
    return {"tokens": torch.randn(batch, length, TEXT["text_dim"], generator=gen), "mask": mask,
            "pooled": torch.randn(batch, TEXT["pooled_dim"], generator=gen)}


def inputs(batch=4, channels=2, size=8, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=gen), torch.rand(batch, generator=gen)


# ---------------------------------------------------------------- registry


def test_registry_names_and_errors():
    names = list_models()
    for size in ("S", "B", "L", "XL"):
        for p in (2, 4, 8):
            assert f"SiT-{size}/{p}" in names
    for name in ("SiT-T/2", "SiT-T/4", "MMDiT-T/2", "MMDiT-S/2", "MMDiT-B/2", "MMDiT-L/2"):
        assert name in names
    mnist = build_model("SiT-T/4", input_size=28, in_channels=1, num_classes=10)
    assert mnist.x_embedder.num_patches == 49
    out = mnist(torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([3, 10]))
    assert out.shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="SiT-XL/2"):
        build_model("SiT-XXL/2")
    with pytest.raises(ValueError, match=r"unknown arguments \['class_dropout_prob'\].*num_classes"):
        build_model("SiT-T/2", class_dropout_prob=0.1)
    with pytest.raises(ValueError, match="text_dim"):
        build_model("SiT-T/2", text_dim=8)  # a text argument is unknown to SiT
    with pytest.raises(ValueError, match="num_heads"):
        build_model("SiT-T/2", hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="patch size"):
        build_model("SiT-T/2", input_size=9)
    with pytest.raises(ValueError, match="qk_norm"):
        build_model("SiT-T/2", qk_norm=1)
    with pytest.raises(ValueError, match="depth"):
        build_model("MMDiT-T/2", depth=0)


def test_config_rebuilds_same_model():
    for model in (tiny_sit(qk_norm=True), tiny_mmdit(hidden_size=64, num_heads=2)):
        config = json.loads(json.dumps(model.config))
        assert config == model.config
        assert model.cond_kind == ("class" if isinstance(model, SiT) else "text")
        assert isinstance(model, (SiT, MMDiT))
        rebuilt = build_model(config["name"], **config["kwargs"])
        assert type(rebuilt) is type(model) and rebuilt.config == model.config
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        assert shapes == {k: v.shape for k, v in rebuilt.state_dict().items()}
        assert isinstance(model.blocks, torch.nn.ModuleList)
        assert len({type(b) for b in model.blocks}) == 1
        assert list(model.buffers()) == []  # nothing beyond parameters: meta + to_empty + init_weights is complete


def sit_count(depth, d, heads, patch, channels, classes):
    """Independent count of SiT parameters from the architecture description."""
    block = (3 * d * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + (d * 6 * d + 6 * d)
    patch_out = patch * patch * channels
    return ((channels * patch * patch * d + d) + (256 * d + d + d * d + d) + (classes + 1) * d + depth * block
            + (d * 2 * d + 2 * d) + (d * patch_out + patch_out))


def test_param_counts_on_meta():
    published = {"SiT-XL/2": 675.1e6, "SiT-B/2": 130.5e6}  # DiT/SiT papers (their count includes the fixed pos_embed)
    dims = {"SiT-XL/2": (28, 1152, 16), "SiT-B/2": (12, 768, 12)}
    for name, target in published.items():
        with torch.device("meta"):
            model = build_model(name)
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - target) / target < 0.01, (name, count)
        assert count == sit_count(*dims[name], 2, 4, 1000)
        assert all(p.is_meta for p in model.parameters())
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in build_model(name).parameters()) for name in list_models()}
    assert counts["SiT-S/2"] < counts["SiT-B/2"] < counts["SiT-L/2"] < counts["SiT-XL/2"]
    assert counts["MMDiT-T/2"] < counts["MMDiT-S/2"] < counts["MMDiT-B/2"] < counts["MMDiT-L/2"]


def test_meta_then_materialise_matches_eager_init():
    eager = tiny_mmdit(qk_norm=True)
    torch.manual_seed(5)
    eager.init_weights()
    with torch.device("meta"):
        model = tiny_mmdit(qk_norm=True)
    model.to_empty(device="cpu")  # uninitialised memory
    torch.manual_seed(5)
    model.init_weights()
    for (k, a), b in zip(eager.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    x, t = inputs()
    assert torch.equal(model(x, t, text_cond(4)), torch.zeros_like(x))


# ---------------------------------------------------------------- formulas against float64


def test_timestep_embedding_float64():
    t = torch.rand(7, dtype=torch.float64) * DIT_TIME_SCALE
    for dim in (256, 9):
        half = dim // 2
        freqs = torch.tensor([10000.0 ** (-k / half) for k in range(half)], dtype=torch.float64)
        ref = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
        if dim % 2:
            ref = torch.cat([ref, torch.zeros(7, 1, dtype=torch.float64)], dim=1)
        got = timestep_embedding(t.float(), dim)
        assert got.dtype == torch.float32 and got.shape == (7, dim)
        assert torch.allclose(got.double(), ref, atol=2e-4)  # fp32 phases up to 1000 rad


def test_pos_embed_float64():
    g, dim = 4, 16
    got = sincos_pos_embed_2d(g, dim)
    assert got.shape == (g * g, dim)
    for token in range(g * g):
        row, col = divmod(token, g)  # PatchEmbed flattens patches row-major
        for half, pos in ((0, col), (1, row)):
            ref = []
            for k in range(dim // 4):
                ref.append(math.sin(pos * 10000.0 ** (-k / (dim // 4))))
            for k in range(dim // 4):
                ref.append(math.cos(pos * 10000.0 ** (-k / (dim // 4))))
            assert torch.allclose(got[token, half * dim // 2:(half + 1) * dim // 2].double(),
                                  torch.tensor(ref, dtype=torch.float64), atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(4, 18)


def test_rmsnorm_float64_and_bf16():
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    ref = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    assert torch.allclose(norm(x.float()).double(), ref, atol=1e-5)
    out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.allclose(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_unpatchify_places_every_pixel():
    model = tiny_sit()
    p, c, g = 2, 2, 4
    tokens = torch.empty(1, g * g, p * p * c)
    for row in range(g):
        for col in range(g):
            for pi in range(p):
                for pj in range(p):
                    for ch in range(c):
                        # value = the flat index of the pixel this output should land on
                        tokens[0, row * g + col, (pi * p + pj) * c + ch] = ch * 64 + (row * p + pi) * 8 + col * p + pj
    assert torch.equal(model.unpatchify(tokens).flatten(), torch.arange(2 * 64, dtype=torch.float32))


def ln64(x):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)


def gelu_tanh64(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def lin64(layer, x):
    return x @ layer.weight.double().T + layer.bias.double()


def heads64(x, h):
    b, n, d = x.shape
    return x.view(b, n, h, d // h).transpose(1, 2)


def rms64(norm, x):
    if isinstance(norm, RMSNorm):
        return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    return x


def attend64(q, k, v, key_mask=None):
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], -math.inf)
    w = torch.exp(logits - logits.amax(-1, keepdim=True))
    out = (w / w.sum(-1, keepdim=True)) @ v
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def mlp64(mlp, x):
    return lin64(mlp.fc2, gelu_tanh64(lin64(mlp.fc1, x)))


def sit_block64(block, x, c, heads):
    mods = lin64(block.modulation[1], F.silu(c)).chunk(6, dim=-1)
    h = ln64(x) * (1 + mods[1][:, None]) + mods[0][:, None]
    q, k, v = (heads64(a, heads) for a in lin64(block.attn.qkv, h).chunk(3, dim=-1))
    x = x + mods[2][:, None] * lin64(block.attn.proj, attend64(rms64(block.attn.q_norm, q),
                                                                rms64(block.attn.k_norm, k), v))
    h = ln64(x) * (1 + mods[4][:, None]) + mods[3][:, None]
    return x + mods[5][:, None] * mlp64(block.mlp, h)


@pytest.mark.parametrize("qk_norm,time_scale", [(False, 1.0), (True, 1.0), (False, DIT_TIME_SCALE)])
def test_sit_forward_float64_reference(qk_norm, time_scale):
    model = randomize(tiny_sit(qk_norm=qk_norm, time_scale=time_scale))
    x, t = inputs()
    y = torch.tensor([1, 0, 10, 7])
    out = model(x, t, y)
    x64 = x.double()
    # patch embedding as a matrix product on (p, p) patches, row-major tokens
    w = model.x_embedder.proj.weight.double()
    patches = x64.unfold(2, 2, 2).unfold(3, 2, 2)  # (B, C, g, g, p, p)
    h = torch.einsum("bcijpq,dcpq->bijd", patches, w).reshape(4, 16, -1) + model.x_embedder.proj.bias.double()
    h = h + sincos_pos_embed_2d(4, model.hidden_size).double()
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * time_scale * freqs
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    mlp = model.t_embedder.mlp
    c = lin64(mlp[2], F.silu(lin64(mlp[0], temb))) + model.y_embedder.weight.double()[y]
    for block in model.blocks:
        h = sit_block64(block, h, c, 4)
    fl = model.final_layer
    shift, scale = lin64(fl.modulation[1], F.silu(c)).chunk(2, dim=-1)
    h = lin64(fl.linear, ln64(h) * (1 + scale[:, None]) + shift[:, None])  # (B, N, p*p*C), (p, p, C) per token
    ref = h.view(4, 4, 4, 2, 2, 2).permute(0, 5, 1, 3, 2, 4).reshape(4, 2, 8, 8)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-4), (out.double() - ref).abs().max()


def stream_pre64(stream, x, c, heads):
    n_mods = 2 if stream.kv_only else 6
    mods = lin64(stream.modulation[1], F.silu(c)).chunk(n_mods, dim=-1)
    parts = [heads64(a, heads) for a in lin64(stream.qkv, ln64(x) * (1 + mods[1][:, None]) + mods[0][:, None])
             .chunk(2 if stream.kv_only else 3, dim=-1)]
    if stream.kv_only:
        return None, rms64(stream.k_norm, parts[0]), parts[1], mods
    return rms64(stream.q_norm, parts[0]), rms64(stream.k_norm, parts[1]), parts[2], mods


def stream_post64(stream, x, attn, mods):
    x = x + mods[2][:, None] * lin64(stream.proj, attn)
    return x + mods[5][:, None] * mlp64(stream.mlp, ln64(x) * (1 + mods[4][:, None]) + mods[3][:, None])


@pytest.mark.parametrize("last", [False, True])
def test_mmdit_block_float64_reference(last):
    model = randomize(tiny_mmdit(qk_norm=True, depth=2))
    block = model.blocks[-1 if last else 0]
    assert block.last == last
    d = model.hidden_size
    gen = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 16, d, generator=gen), torch.randn(2, 5, d, generator=gen)
    c = torch.randn(2, d, generator=gen)
    text_mask = torch.tensor([[True, True, False, True, False], [True, False, False, False, False]])
    key_mask = torch.cat([text_mask, torch.ones(2, 16, dtype=torch.bool)], dim=1)
    out_x, out_ctx = block(x, ctx, c, key_mask[:, None, None])
    qx, kx, vx, mx = stream_pre64(block.image, x.double(), c.double(), 4)
    qc, kc, vc, mc = stream_pre64(block.text, ctx.double(), c.double(), 4)
    k, v = torch.cat([kc, kx], 2), torch.cat([vc, vx], 2)
    ref_x = stream_post64(block.image, x.double(), attend64(qx, k, v, key_mask), mx)
    assert torch.allclose(out_x.double(), ref_x, rtol=1e-4, atol=1e-4)
    if last:
        assert out_ctx is None and qc is None
    else:
        ref_ctx = stream_post64(block.text, ctx.double(), attend64(qc, k, v, key_mask), mc)
        assert torch.allclose(out_ctx.double(), ref_ctx, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- behaviour


def test_zero_output_at_init_and_shapes():
    x, t = inputs()
    sit, mmdit = tiny_sit(), tiny_mmdit()
    for model, cond in ((sit, torch.tensor([1, 2, 3, 10])), (mmdit, text_cond(4))):
        out = model(x, t, cond)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.equal(out, torch.zeros_like(x))
        assert model(x, torch.tensor(0.5), cond).shape == x.shape  # scalar t broadcasts
    assert not mmdit.blocks[0].last and mmdit.blocks[-1].last
    assert not hasattr(mmdit.blocks[-1].text, "mlp")


def test_deterministic_for_fixed_seed():
    x, t = inputs()
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = randomize(tiny_mmdit(), seed=torch.randint(0, 2 ** 31, ()).item())
        outs.append(model(x, t, text_cond(4), drop=torch.tensor([False, True, False, False])))
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(124)
    other = randomize(tiny_mmdit(), seed=torch.randint(0, 2 ** 31, ()).item())
    assert not torch.allclose(other(x, t, text_cond(4)), outs[0])


def test_sit_null_label():
    model = randomize(tiny_sit())
    x, t = inputs()
    y = torch.tensor([3, 4, 5, 6])
    drop = torch.tensor([False, True, False, True])
    out = model(x, t, y, drop=drop)
    same_as_drop = model(x, t, torch.tensor([3, 10, 5, 10]))
    assert torch.allclose(out, same_as_drop, atol=1e-6)
    plain = model(x, t, y)
    assert torch.allclose(out[~drop], plain[~drop], atol=1e-6)  # rows are independent
    assert not torch.allclose(out[drop], plain[drop], atol=1e-3)
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        model(x, t, torch.tensor([0, 11, 2, 3]))
    with pytest.raises(ValueError, match="integer label"):
        model(x, t, y.float())
    with pytest.raises(ValueError, match="shape"):
        model(x[:, :1], t, y)
    with pytest.raises(ValueError, match="drop"):
        model(x, t, y, drop=torch.tensor([0, 1, 0, 1]))


def test_mmdit_padding_and_null_condition():
    model = randomize(tiny_mmdit())
    x, t = inputs()
    cond = text_cond(4)
    out = model(x, t, cond)
    # garbage in the padded slots changes nothing
    garbage = 1e3 * torch.randn_like(cond["tokens"])
    noisy = dict(cond, tokens=torch.where(cond["mask"][..., None], cond["tokens"], garbage))
    assert torch.equal(model(x, t, noisy), out)
    # nor do extra padded slots
    longer = {"tokens": torch.cat([cond["tokens"], torch.randn(4, 2, TEXT["text_dim"])], dim=1),
              "mask": torch.cat([cond["mask"], torch.zeros(4, 2, dtype=torch.bool)], dim=1), "pooled": cond["pooled"]}
    assert torch.allclose(model(x, t, longer), out, atol=1e-5)
    # but a real token does
    unmasked = dict(cond, mask=torch.ones_like(cond["mask"]))
    assert not torch.allclose(model(x, t, unmasked), out, atol=1e-3)
    # the null condition: dropped rows ignore their own text, equal to the explicit null sequence
    drop = torch.tensor([True, False, True, False])
    dropped = model(x, t, cond, drop=drop)
    other = text_cond(4, seed=9)
    assert torch.equal(model(x, t, other, drop=drop)[drop], dropped[drop])
    assert torch.allclose(dropped[~drop], out[~drop], atol=1e-6)
    explicit = {"tokens": model.null_token.detach().expand(4, 1, -1), "mask": torch.ones(4, 1, dtype=torch.bool),
                "pooled": model.null_pooled.detach().expand(4, -1)}
    assert torch.allclose(model(x, t, explicit)[drop], dropped[drop], atol=1e-5)
    assert not torch.allclose(dropped[drop], out[drop], atol=1e-3)
    with pytest.raises(ValueError, match="exactly the keys"):
        model(x, t, {"tokens": cond["tokens"], "attention_mask": cond["mask"], "pooled": cond["pooled"]})
    with pytest.raises(ValueError, match="max_text_len=7"):
        model(x, t, {"tokens": torch.randn(4, 8, 12), "mask": torch.ones(4, 8, dtype=torch.bool),
                     "pooled": cond["pooled"]})
    with pytest.raises(ValueError, match="mask"):
        model(x, t, dict(cond, mask=cond["mask"].long()))
    with pytest.raises(ValueError, match="pooled"):
        model(x, t, dict(cond, pooled=torch.randn(4, 3)))


@pytest.mark.parametrize("kind", ["sit", "mmdit"])
def test_gradients_reach_every_parameter(kind):
    torch.manual_seed(0)
    model = tiny_sit(qk_norm=True) if kind == "sit" else tiny_mmdit(qk_norm=True)
    x, t = inputs()
    cond = torch.tensor([1, 2, 3, 4]) if kind == "sit" else text_cond(4)
    drop = torch.tensor([False, True, False, True])
    target = torch.randn_like(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def step():
        opt.zero_grad()
        ((model(x, t, cond, drop=drop) - target) ** 2).mean().backward()
        opt.step()
        return [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]

    # adaLN-Zero: at initialisation only the zeroed output projection learns; the signal then opens one layer of
    # zeros per step (output projection, modulations and gates, what feeds them); a few steps reach every parameter
    silent = step()
    assert sorted(set(n for n, _ in model.named_parameters()) - set(silent)) == ["final_layer.linear.bias",
                                                                                  "final_layer.linear.weight"]
    for _ in range(3):
        silent = step()
    assert silent == []


def test_forward_with_cfg_matches_two_forwards():
    x, t = inputs()
    for model, cond in ((randomize(tiny_sit()), torch.tensor([1, 2, 3, 4])), (randomize(tiny_mmdit()), text_cond(4))):
        v_cond = model(x, t, cond)
        v_uncond = model(x, t, cond, drop=torch.ones(4, dtype=torch.bool))
        assert torch.allclose(model.forward_with_cfg(x, t, cond, 3.0), v_uncond + 3.0 * (v_cond - v_uncond),
                              atol=1e-5)
        scale = torch.tensor([1.0, 2.5, 1.0, 0.0])
        guided = model.forward_with_cfg(x, t, cond, scale)
        assert torch.allclose(guided, v_uncond + scale.view(4, 1, 1, 1) * (v_cond - v_uncond), atol=1e-5)
        assert torch.allclose(guided[0], v_cond[0], atol=1e-5) and torch.allclose(guided[3], v_uncond[3], atol=1e-5)
        drop = torch.tensor([False, True, False, False])
        assert torch.allclose(model.forward_with_cfg(x, t, cond, 4.0, drop=drop)[1], v_uncond[1], atol=1e-5)
        with pytest.raises(ValueError, match="scale"):
            model.forward_with_cfg(x, t, cond, torch.ones(3))


def test_bf16_autocast_close_to_fp32():
    x, t = inputs()
    for model, cond in ((randomize(tiny_sit(qk_norm=True)), torch.tensor([1, 2, 3, 10])),
                        (randomize(tiny_mmdit(qk_norm=True)), text_cond(4))):
        ref = model(x, t, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, cond)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        rel = (out - ref).norm() / ref.norm()
        assert rel < 0.05, rel


@pytest.mark.slow
def test_compile_blocks_fullgraph():
    """Each block class compiles as one graph (forward and backward); inductor once, aot_eager for the rest."""
    sit, mmdit = randomize(tiny_sit(qk_norm=True)), randomize(tiny_mmdit(qk_norm=True))
    gen = torch.Generator().manual_seed(4)
    d = sit.hidden_size
    h, c = torch.randn(2, 16, d, generator=gen), torch.randn(2, d, generator=gen)
    block = sit.blocks[0]
    compiled = torch.compile(block, fullgraph=True)  # inductor, as the trainer uses it
    assert torch.allclose(compiled(h, c), block(h, c), atol=1e-5)
    d = mmdit.hidden_size
    h, c = torch.randn(2, 16, d, generator=gen), torch.randn(2, d, generator=gen)
    ctx = torch.randn(2, 5, d, generator=gen)
    mask = torch.ones(2, 1, 1, 21, dtype=torch.bool)
    mask[1, ..., 2:5] = False
    for block in (mmdit.blocks[0], mmdit.blocks[-1]):
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        hc = h.clone().requires_grad_()
        got, want = compiled(hc, ctx, c, mask), block(h, ctx, c, mask)
        assert torch.allclose(got[0], want[0], atol=1e-5)
        assert (got[1] is None) == block.last
        got[0].sum().backward()
        assert hc.grad is not None and torch.isfinite(hc.grad).all()
