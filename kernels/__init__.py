"""Posterior-velocity op for Posterior-Augmented Flow Matching: a PyTorch reference and fused Triton kernels.

Importing this package never touches a GPU driver; the Triton kernels are imported on first use.
"""
from .posterior_velocity import PosteriorTarget, combine_posteriors, posterior_velocity

__all__ = ["posterior_velocity", "combine_posteriors", "PosteriorTarget"]
