"""Pieces shared by SiT and MMDiT: embeddings, adaLN modulation, attention helpers, final layer and the base class.

Time convention: data at t = 1, noise at t = 0, t in [0, 1]. The timestep embedding takes sinusoids of `scale * t`:
SiT embeds t in [0, 1] as it is (scale 1, SiT's default here, so SiT's released weights compute SiT's velocity);
DiT and SD3 embed integer-like timesteps 1000 t (`DIT_TIME_SCALE`, MMDiT's scale and an option of SiT).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

DIT_TIME_SCALE = 1000.0
FREQ_DIM = 256  # size of the sinusoidal timestep features before the MLP (DiT's choice)


def modulate(x, shift, scale):
    """adaLN: x (B, N, D) normalised, shift and scale (B, D) from the condition."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal features of t (B,) -> (B, dim) float32: [cos(t f_k), sin(t f_k)], f_k = max_period^(-k / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def sincos_pos_embed_2d(grid_size, dim, device=None, dtype=torch.float32):
    """Fixed 2D sin-cos position embedding (grid_size**2, dim) in `dtype`, tokens in row-major order.

    The first dim/2 channels encode the column, the last dim/2 the row; each half is [sin(p w_k), cos(p w_k)] with
    w_k = 10000^(-k / (dim/4)). Computed on the fly (a few microseconds) so the models hold no buffers: a model
    built on the meta device and materialised with `to_empty` needs only `init_weights()`.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, device=device, dtype=dtype) / quarter)
    coords = torch.arange(grid_size, device=device, dtype=dtype)
    row, col = torch.meshgrid(coords, coords, indexing="ij")

    def embed(pos):
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(col), embed(row)], dim=1)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned gain, computed in float32 whatever the input dtype (QK-norm)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def split_heads(x, num_heads):
    """(B, N, H * Dh) -> (B, H, N, Dh)."""
    b, n, d = x.shape
    return x.view(b, n, num_heads, d // num_heads).transpose(1, 2)


def merge_heads(x):
    """(B, H, N, Dh) -> (B, N, H * Dh)."""
    b, h, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, h * dh)


def tanh_gelu():
    return nn.GELU(approximate="tanh")


class Attention(nn.Module):
    """Multi-head self-attention via F.scaled_dot_product_attention (flash attention on a GPU); optional QK RMSNorm."""

    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = (split_heads(a, self.num_heads) for a in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(merge_heads(out))


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (B,) -> (B, dim): sinusoids of scale * t, then Linear-SiLU-Linear."""

    def __init__(self, dim, scale=DIT_TIME_SCALE):
        super().__init__()
        self.scale = float(scale)
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        t = t.float()
        return self.mlp(timestep_embedding(t if self.scale == 1.0 else t * self.scale, FREQ_DIM))

    def extra_repr(self):
        return f"scale={self.scale:g}"


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + LayerNorm without affine + linear projection to patch pixels."""

    def __init__(self, dim, out_dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x, c):
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class FlowBackbone(nn.Module):
    """What SiT and MMDiT share: input checks, patch bookkeeping, DiT initialisation and the guided forward.

    Subclasses define `x_embedder` (timm PatchEmbed), `t_embedder`, `blocks`, `final_layer`, `_init_extra()`,
    `_check_cond(cond, batch)`, `_cat_cond(a, b)` and `forward(x, t, cond, drop=None)`.
    """

    cond_kind = None

    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.config = None  # set by pafm.models.build_model: {"name": ..., "kwargs": {...}}

    @torch.no_grad()
    def init_weights(self):
        """DiT initialisation; a fresh model outputs exactly zero.

        xavier-uniform linears with zero bias; patch embedding as a linear on flattened patches; N(0, 0.02) for the
        timestep MLP (and the subclass's embeddings); zero adaLN outputs and final projection. Call it after
        `to_empty()` when the model was built on the meta device (it works on FSDP2-sharded parameters too).
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        proj = self.x_embedder.proj
        fan_in = proj.weight.shape[1] * proj.weight.shape[2] * proj.weight.shape[3]
        bound = math.sqrt(6.0 / (fan_in + proj.weight.shape[0]))  # xavier of the (out, C*p*p) view
        nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.zeros_(proj.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        self._init_extra()
        for module in self.modules():
            if hasattr(module, "modulation"):
                nn.init.zeros_(module.modulation[-1].weight)
                nn.init.zeros_(module.modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _check_inputs(self, x, t, drop):
        """Validate x, t, drop; return t as (B,) float and drop as (B,) bool or None."""
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{type(self).__name__}: x must have shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
        batch = x.shape[0]
        if not torch.is_tensor(t) or not t.is_floating_point():
            raise ValueError(f"{type(self).__name__}: t must be a float tensor of shape ({batch},) or a scalar tensor")
        if t.ndim == 0:
            t = t.expand(batch)
        elif tuple(t.shape) != (batch,):
            raise ValueError(f"{type(self).__name__}: t must have shape ({batch},), got {tuple(t.shape)}")
        if drop is not None:
            if not torch.is_tensor(drop) or drop.dtype != torch.bool or tuple(drop.shape) != (batch,):
                got = (drop.dtype, tuple(drop.shape)) if torch.is_tensor(drop) else type(drop)
                raise ValueError(f"{type(self).__name__}: drop must be a bool tensor of shape ({batch},), got {got}")
        return t, drop

    def embed_patches(self, x):
        """(B, C, H, W) -> (B, N, D) patch tokens plus the fixed sin-cos position embedding."""
        h = self.x_embedder(x)
        pos = sincos_pos_embed_2d(self.input_size // self.patch_size, self.hidden_size, device=h.device)
        return h + pos.to(h.dtype)

    def unpatchify(self, h):
        """(B, N, p*p*C) -> (B, C, H, W); each token's outputs are laid out (p, p, C)."""
        b, p, c = h.shape[0], self.patch_size, self.in_channels
        g = self.input_size // p
        h = h.reshape(b, g, g, p, p, c)
        return h.permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)

    def forward_with_cfg(self, x, t, cond, scale, drop=None, channels=None):
        """Classifier-free guidance in one batched forward of 2B rows: out = uncond + scale * (cond - uncond).

        Guidance applies to every output channel unless `channels` = n: then only the first n are guided and the
        others are the conditional output (SiT's and DiT's code guide the first 3 of 4 latent channels).
        `scale`: a float or a (B,) tensor; rows with scale 1 get the plain conditional velocity, so a guidance
        interval in t is a per-row scale. `drop` (B,) bool marks rows whose "conditional" half is also null.
        """
        t, drop = self._check_inputs(x, t, drop)
        batch = x.shape[0]
        self._check_cond(cond, batch)
        if torch.is_tensor(scale):
            if scale.ndim == 0:
                scale = scale.expand(batch)
            if tuple(scale.shape) != (batch,):
                raise ValueError(f"forward_with_cfg: scale must be a float or a ({batch},) tensor, "
                                 f"got shape {tuple(scale.shape)}")
            scale = scale.to(device=x.device, dtype=torch.float32).view(batch, 1, 1, 1)
        elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise ValueError(f"forward_with_cfg: scale must be a float or a ({batch},) tensor, got {type(scale)}")
        cond_drop = drop if drop is not None else torch.zeros(batch, dtype=torch.bool, device=x.device)
        both_drop = torch.cat([cond_drop, torch.ones_like(cond_drop)])
        out = self(torch.cat([x, x]), torch.cat([t, t]), self._cat_cond(cond, cond), drop=both_drop)
        v_cond, v_uncond = out.float().chunk(2)
        guided = v_uncond + scale * (v_cond - v_uncond)
        if channels is not None:
            if not isinstance(channels, int) or isinstance(channels, bool) or not 1 <= channels <= guided.shape[1]:
                raise ValueError(f"forward_with_cfg: channels must be an int in [1, {guided.shape[1]}] or None, "
                                 f"got {channels!r}")
            guided = torch.cat([guided[:, :channels], v_cond[:, channels:]], dim=1)
        return guided.to(out.dtype)

    def extra_repr(self):
        return f"config={self.config}"
