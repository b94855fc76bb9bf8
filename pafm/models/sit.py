"""SiT / DiT: class-conditional transformer on latent patches with adaLN-Zero blocks."""
import torch
import torch.nn as nn
from timm.layers import Mlp, PatchEmbed

from .layers import Attention, FinalLayer, FlowBackbone, TimestepEmbedder, modulate, tanh_gelu


class SiTBlock(nn.Module):
    """adaLN-Zero transformer block: shift, scale, gate from the condition for attention and for the MLP."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=tanh_gelu)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        """x (B, N, D) tokens, c (B, D) condition embedding."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(c).chunk(6, dim=-1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        x = x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x


class SiT(FlowBackbone):
    """Class-conditional SiT. forward(x, t, labels, drop=None) -> velocity with the shape of x.

    t in [0, 1] with data at t = 1, embedded as time_scale * t: 1 as SiT does, 1000 as DiT's integer timesteps.
    reverse_time: the weights were trained with noise at t = 1 and a velocity pointing towards the noise (REPA);
    the model then returns -net(x, 1 - t), the velocity of this project's convention. Labels are int64 in
    [0, num_classes]; the label num_classes, or drop[i] = True, selects the learned null row (classifier-free
    guidance). Label dropout during training is the trainer's job.
    """

    cond_kind = "class"

    def __init__(self, *, input_size=32, patch_size=2, in_channels=4, num_classes=1000, depth=28, hidden_size=1152,
                 num_heads=16, mlp_ratio=4.0, qk_norm=False, time_scale=1.0, reverse_time=False):
        super().__init__(input_size, patch_size, in_channels, hidden_size)
        self.num_classes = num_classes
        self.reverse_time = bool(reverse_time)
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size, time_scale)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)  # last row: the null label
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * in_channels)
        self.init_weights()

    def _init_extra(self):
        nn.init.normal_(self.y_embedder.weight, std=0.02)

    def _check_cond(self, cond, batch):
        if not torch.is_tensor(cond) or cond.dtype not in (torch.int64, torch.int32) or tuple(cond.shape) != (batch,):
            got = (cond.dtype, tuple(cond.shape)) if torch.is_tensor(cond) else type(cond)
            raise ValueError(f"SiT: cond must be an integer label tensor of shape ({batch},), got {got}")
        if torch.compiler.is_compiling():
            return
        # An asynchronous assert: on a GPU it fails on the device without making the host wait for every batch; on
        # the CPU it raises here, and the message names the labels.
        valid = f"[0, {self.num_classes}] ({self.num_classes} = null)"
        out_of_range = (cond < 0) | (cond > self.num_classes)
        try:
            torch._assert_async(~out_of_range.any(), f"SiT: labels must lie in {valid}")
        except RuntimeError:
            raise ValueError(f"SiT: labels must lie in {valid}, got {cond[out_of_range][:5].tolist()}") from None

    def _cat_cond(self, a, b):
        return torch.cat([a, b])

    def forward(self, x, t, cond, drop=None):
        """x (B, C, H, W), t (B,) in [0, 1], cond (B,) int labels, drop (B,) bool or None -> (B, C, H, W)."""
        t, drop = self._check_inputs(x, t, drop)
        self._check_cond(cond, x.shape[0])
        labels = cond.long()
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        if self.reverse_time:
            t = 1.0 - t
        h = self.embed_patches(x)
        c = self.t_embedder(t) + self.y_embedder(labels)
        for block in self.blocks:
            h = block(h, c)
        out = self.unpatchify(self.final_layer(h, c)).to(x.dtype)
        return -out if self.reverse_time else out
