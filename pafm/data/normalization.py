"""A dataset's latent normalisation, `info["normalization"]`: normalised = (latent - shift) * scale per channel."""
from __future__ import annotations

import torch


class LatentNormalization:
    """The forward map for training and neighbour search, its inverse for decoding samples; float32 throughout."""

    def __init__(self, info: dict, device=None):
        norm = info.get("normalization") or {}
        self.shift = torch.tensor(norm.get("shift", [0.0]), dtype=torch.float32, device=device).view(-1, 1, 1)
        self.scale = torch.tensor(norm.get("scale", [1.0]), dtype=torch.float32, device=device).view(-1, 1, 1)

    def normalize(self, latent: torch.Tensor) -> torch.Tensor:
        return (latent.float() - self.shift) * self.scale

    def normalize_std(self, std: torch.Tensor) -> torch.Tensor:
        """The posterior std in normalised units (the shift does not move it)."""
        return std.float() * self.scale

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / self.scale + self.shift
