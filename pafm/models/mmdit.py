"""MMDiT (Stable Diffusion 3 style): image and text streams with their own weights, one joint attention per block."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed

from .layers import (FinalLayer, FlowBackbone, RMSNorm, TimestepEmbedder, merge_heads, modulate, split_heads,
                     tanh_gelu)

COND_KEYS = ("tokens", "mask", "pooled")


class Stream(nn.Module):
    """One stream's weights inside an MMDiT block: adaLN-Zero modulation, QKV (+ QK-norm), output projection, MLP.

    `kv_only` (the text stream of the last block): its outputs would be discarded, so it keeps only what the image
    queries need, the modulated keys and values. No parameter is left without a gradient.
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False, kv_only=False):
        super().__init__()
        self.num_heads = num_heads
        self.kv_only = kv_only
        head_dim = hidden_size // num_heads
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (2 if kv_only else 6) * hidden_size))
        self.qkv = nn.Linear(hidden_size, (2 if kv_only else 3) * hidden_size)
        self.q_norm = RMSNorm(head_dim) if qk_norm and not kv_only else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        if not kv_only:
            self.proj = nn.Linear(hidden_size, hidden_size)
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=tanh_gelu)

    def pre_attention(self, x, c):
        """Return q (None when kv_only), k, v as (B, H, N, Dh) and the MLP-side modulation for post_attention."""
        mods = self.modulation(c).chunk(2 if self.kv_only else 6, dim=-1)
        qkv = self.qkv(modulate(self.norm1(x), mods[0], mods[1]))
        heads = [split_heads(a, self.num_heads) for a in qkv.chunk(2 if self.kv_only else 3, dim=-1)]
        if self.kv_only:
            return None, self.k_norm(heads[0]), heads[1], None
        return self.q_norm(heads[0]), self.k_norm(heads[1]), heads[2], mods[2:]

    def post_attention(self, x, attn_out, mods):
        gate_a, shift_m, scale_m, gate_m = mods
        x = x + gate_a.unsqueeze(1) * self.proj(merge_heads(attn_out))
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class MMDiTBlock(nn.Module):
    """Joint-attention block over [text tokens; image tokens]; `last=True` drops the text branch after attention."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False, last=False):
        super().__init__()
        self.last = last
        self.image = Stream(hidden_size, num_heads, mlp_ratio, qk_norm)
        self.text = Stream(hidden_size, num_heads, mlp_ratio, qk_norm, kv_only=last)

    def forward(self, x, ctx, c, attn_mask):
        """x (B, N, D) image, ctx (B, L, D) text, c (B, D) condition, attn_mask (B, 1, 1, L + N) bool or None.

        Returns (x, ctx); ctx is None after the last block.
        """
        qx, kx, vx, mods_x = self.image.pre_attention(x, c)
        qc, kc, vc, mods_c = self.text.pre_attention(ctx, c)
        k, v = torch.cat([kc, kx], dim=2), torch.cat([vc, vx], dim=2)
        text_len = ctx.shape[1]
        if self.last:  # image queries only
            return self.image.post_attention(x, F.scaled_dot_product_attention(qx, k, v, attn_mask=attn_mask),
                                             mods_x), None
        out = F.scaled_dot_product_attention(torch.cat([qc, qx], dim=2), k, v, attn_mask=attn_mask)
        x = self.image.post_attention(x, out[:, :, text_len:], mods_x)
        ctx = self.text.post_attention(ctx, out[:, :, :text_len], mods_c)
        return x, ctx


class MMDiT(FlowBackbone):
    """Text-conditional MMDiT. forward(x, t, cond, drop=None) -> velocity with the shape of x.

    cond = {"tokens": (B, L, text_dim) float, "mask": (B, L) bool (True = real token), "pooled": (B, pooled_dim)
    float}, L <= max_text_len. Padding tokens are masked out of the keys, so their values never reach the image.
    The pooled vector passes through an MLP and is added to the timestep embedding (t in [0, 1], data at t = 1,
    embedded as 1000 t). drop[i] = True replaces row i's condition by the learned null: one null token (the only
    real token of the row) and a learned null pooled vector.
    """

    cond_kind = "text"

    def __init__(self, *, input_size=32, patch_size=2, in_channels=4, text_dim=768, pooled_dim=768, max_text_len=77,
                 depth=12, hidden_size=768, num_heads=12, mlp_ratio=4.0, qk_norm=False):
        super().__init__(input_size, patch_size, in_channels, hidden_size)
        self.text_dim, self.pooled_dim, self.max_text_len = text_dim, pooled_dim, max_text_len
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.pooled_embedder = Mlp(pooled_dim, hidden_size, hidden_size, act_layer=nn.SiLU)
        self.context_embedder = nn.Linear(text_dim, hidden_size)
        self.null_token = nn.Parameter(torch.zeros(text_dim))
        self.null_pooled = nn.Parameter(torch.zeros(pooled_dim))
        self.blocks = nn.ModuleList(
            MMDiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, last=(i == depth - 1)) for i in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * in_channels)
        self.init_weights()

    def _init_extra(self):
        for layer in (self.pooled_embedder.fc1, self.pooled_embedder.fc2):
            nn.init.normal_(layer.weight, std=0.02)
        nn.init.normal_(self.null_token, std=0.02)
        nn.init.normal_(self.null_pooled, std=0.02)

    def _check_cond(self, cond, batch):
        if not isinstance(cond, dict) or set(cond) != set(COND_KEYS):
            got = sorted(cond) if isinstance(cond, dict) else type(cond)
            raise ValueError(f"MMDiT: cond must be a dict with exactly the keys {list(COND_KEYS)}, got {got}")
        tokens, mask, pooled = (cond[k] for k in COND_KEYS)
        if not torch.is_tensor(tokens) or not tokens.is_floating_point() or tokens.ndim != 3 \
                or tokens.shape[0] != batch or tokens.shape[2] != self.text_dim:
            raise ValueError(f"MMDiT: cond['tokens'] must be a float tensor (B={batch}, L, text_dim={self.text_dim}), "
                             f"got {_describe(tokens)}")
        if not 1 <= tokens.shape[1] <= self.max_text_len:
            raise ValueError(f"MMDiT: text length must be in [1, max_text_len={self.max_text_len}], "
                             f"got {tokens.shape[1]}")
        if not torch.is_tensor(mask) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(tokens.shape[:2]):
            raise ValueError(f"MMDiT: cond['mask'] must be a bool tensor {tuple(tokens.shape[:2])}, "
                             f"got {_describe(mask)}")
        if not torch.is_tensor(pooled) or not pooled.is_floating_point() \
                or tuple(pooled.shape) != (batch, self.pooled_dim):
            raise ValueError(f"MMDiT: cond['pooled'] must be a float tensor ({batch}, {self.pooled_dim}), "
                             f"got {_describe(pooled)}")

    def _cat_cond(self, a, b):
        return {k: torch.cat([a[k], b[k]]) for k in COND_KEYS}

    def forward(self, x, t, cond, drop=None):
        """x (B, C, H, W), t (B,) in [0, 1], cond dict (see the class), drop (B,) bool or None -> (B, C, H, W)."""
        t, drop = self._check_inputs(x, t, drop)
        self._check_cond(cond, x.shape[0])
        tokens, mask, pooled = cond["tokens"], cond["mask"], cond["pooled"]
        if drop is not None:
            first = torch.arange(tokens.shape[1], device=mask.device) == 0
            tokens = torch.where(drop[:, None, None], self.null_token.to(tokens.dtype), tokens)
            mask = torch.where(drop[:, None], first[None], mask)
            pooled = torch.where(drop[:, None], self.null_pooled.to(pooled.dtype), pooled)
        h = self.embed_patches(x)
        ctx = self.context_embedder(tokens)
        c = self.t_embedder(t) + self.pooled_embedder(pooled)
        # Keys are [text; image]; image keys are always real, so no query row is ever fully masked.
        attn_mask = torch.cat([mask, mask.new_ones(mask.shape[0], h.shape[1])], dim=1)[:, None, None, :]
        for block in self.blocks:
            h, ctx = block(h, ctx, c, attn_mask)
        return self.unpatchify(self.final_layer(h, c)).to(x.dtype)


def _describe(value):
    if torch.is_tensor(value):
        return f"{value.dtype} {tuple(value.shape)}"
    return type(value).__name__
