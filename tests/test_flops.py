"""The model-FLOP count (pafm.models.flops) against torch's own counter, and the peak table."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pafm.models import build_model
from pafm.models.flops import dense_bf16_peak, forward_flops_per_image, train_flops_per_image

CASES = [
    ("SiT-T/2", dict(input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=64, num_heads=2)),
    ("SiT-T/4", dict(input_size=28, in_channels=1, num_classes=10, mlp_ratio=2.0)),
    ("MMDiT-T/2", dict(input_size=8, in_channels=4, depth=3, hidden_size=64, num_heads=2, text_dim=32, pooled_dim=16,
                       max_text_len=7)),
]


def counted(model, batch: int, backward: bool) -> float:
    """FlopCounterMode's FLOPs per image.  The math attention backend runs attention as matrix products, which the
    counter sees on the CPU (it has no formula for the CPU's fused attention kernel)."""
    kw = model.config["kwargs"]
    x = torch.randn(batch, kw["in_channels"], kw["input_size"], kw["input_size"])
    if model.cond_kind == "class":
        cond = torch.randint(0, kw["num_classes"], (batch,))
    else:
        length = kw["max_text_len"]
        cond = {"tokens": torch.randn(batch, length, kw["text_dim"]),
                "mask": torch.ones(batch, length, dtype=torch.bool), "pooled": torch.randn(batch, kw["pooled_dim"])}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(x, torch.rand(batch), cond)
        if backward:
            out.square().sum().backward()
    return counter.get_total_flops() / batch


@pytest.mark.parametrize("name,kwargs", CASES)
def test_flop_count_agrees_with_torch_counter(name, kwargs):
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    # The forward's matrix products are counted exactly alike (neither counts elementwise work).
    assert counted(model, 3, backward=False) == forward_flops_per_image(model.config)
    # The backward's autograd skips the input gradient of the layers whose inputs need none (patch embedding,
    # timestep MLP, text embeddings), so the measured count is a little under 3x the forward: within 1%.
    measured, ours = counted(model, 3, backward=True), train_flops_per_image(model.config)
    assert 0.99 * ours <= measured <= ours


def test_peak_table_knows_data_center_gpus_and_nothing_else():
    assert dense_bf16_peak("NVIDIA H100 80GB HBM3") == 989e12 and dense_bf16_peak("NVIDIA H200") == 989e12
    assert dense_bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert dense_bf16_peak("NVIDIA H100 PCIe") == 756e12 and dense_bf16_peak("NVIDIA H100 NVL") == 835e12
    assert dense_bf16_peak("NVIDIA GeForce RTX 4090") is None and dense_bf16_peak("cpu") is None
