"""Model FLOPs of SiT and MMDiT, counted from a model's own config, and the dense bf16 peak of known GPUs.

Conventions (those of MFU as PaLM and torchtitan report it): a multiply-add is 2 FLOPs; only matrix products count
(linear layers, the patch embedding, both attention products); elementwise work (norms, activations, softmax,
modulation) does not; training costs 3x the forward (the backward computes the gradients of the inputs and of the
weights, each as costly as the forward).  The objective's own work (PAFM's posterior over candidates) is not model
FLOPs, so FM and PAFM count the same.  Text models see the padded text length the data stores (max_text_len).
"""
from __future__ import annotations

from typing import Optional

import torch

from .layers import FREQ_DIM
from .registry import MODELS

# Dense (no sparsity) bf16 tensor-core peak per GPU; the longest key found in the device name wins, so the PCIe
# and NVL parts of the H100 get their own (lower) peaks rather than the SXM part's.
DENSE_BF16_PEAK_FLOPS = {"H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "H800": 989e12,
                         "A100": 312e12}


def _linear(rows: int, fan_in: int, fan_out: int) -> int:
    return 2 * rows * fan_in * fan_out


def _attention(queries: int, keys: int, width: int) -> int:
    """Scores q k^T and the weighted sum of values, over all heads together."""
    return 2 * 2 * queries * keys * width


def _mlp(rows: int, width: int, mlp_ratio: float) -> int:
    hidden = int(width * mlp_ratio)
    return _linear(rows, width, hidden) + _linear(rows, hidden, width)


def forward_flops_per_image(config: dict) -> int:
    """Forward FLOPs of one image for a `model.config` ({"name": ..., "kwargs": every resolved argument})."""
    cls, patch, _ = MODELS[config["name"]]
    kw = config["kwargs"]
    d, depth, ratio = kw["hidden_size"], kw["depth"], kw["mlp_ratio"]
    tokens = (kw["input_size"] // patch) ** 2
    patch_out = patch * patch * kw["in_channels"]
    flops = _linear(tokens, patch_out, d)  # patch embedding (a strided convolution)
    flops += _linear(1, FREQ_DIM, d) + _linear(1, d, d)  # timestep MLP
    flops += _linear(1, d, 2 * d) + _linear(tokens, d, patch_out)  # final layer
    if cls.__name__ == "SiT":
        block = _linear(1, d, 6 * d) + _linear(tokens, d, 3 * d) + _attention(tokens, tokens, d) \
            + _linear(tokens, d, d) + _mlp(tokens, d, ratio)
        return flops + depth * block
    text = kw["max_text_len"]
    flops += _linear(1, kw["pooled_dim"], d) + _linear(1, d, d)  # pooled-text MLP
    flops += _linear(text, kw["text_dim"], d)  # context embedding
    joint = text + tokens
    image_stream = _linear(1, d, 6 * d) + _linear(tokens, d, 3 * d) + _linear(tokens, d, d) + _mlp(tokens, d, ratio)
    text_stream = _linear(1, d, 6 * d) + _linear(text, d, 3 * d) + _linear(text, d, d) + _mlp(text, d, ratio)
    text_kv_only = _linear(1, d, 2 * d) + _linear(text, d, 2 * d)  # the last block keeps only the text keys, values
    flops += (depth - 1) * (image_stream + text_stream + _attention(joint, joint, d))
    return flops + image_stream + text_kv_only + _attention(tokens, joint, d)


def train_flops_per_image(config: dict) -> int:
    """Forward + backward FLOPs of one training image: 3x the forward."""
    return 3 * forward_flops_per_image(config)


def dense_bf16_peak(device_name: str) -> Optional[float]:
    """FLOP/s of the device's dense bf16 peak; None for a device not in the table (and for CPUs): MFU is then not
    reported rather than guessed."""
    keys = [key for key in DENSE_BF16_PEAK_FLOPS if key in device_name]
    return DENSE_BF16_PEAK_FLOPS[max(keys, key=len)] if keys else None


def device_peak_flops(device: torch.device) -> Optional[float]:
    """`dense_bf16_peak` of a torch device; None on the CPU."""
    return dense_bf16_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
