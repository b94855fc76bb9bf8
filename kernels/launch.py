"""What the shared-pool and per-row Triton modules share: the inputs as the kernels take them, prepared on the host,
the sizes that shape the grids, and the in-kernel load of a row's path coefficients.

Nothing on the host reads a tensor's values, which would make it wait for the device: only shapes, dtypes and
strides, so a call is a few asynchronous launches.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Set by tests/conftest.py before the kernel modules are imported. The interpreter mishandles bf16 dots and bf16
# arithmetic (triton 3.8), so the kernels upcast 16-bit operands there; on a GPU the native tensor-core dots run.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The interpreter has no waves to fill, so it does not split reductions unless a test raises this.
SMS_WITHOUT_GPU = 1


class KernelInputs(NamedTuple):
    """The op's inputs as the kernels take them: contiguous, flattened to (B, D), a stand-in pointer (z) for each
    absent optional tensor, and the flags that select the kernels' compiled variants."""

    z: torch.Tensor  # (B, D)
    pool: torch.Tensor  # (K, D) shared or (B, K, D) per row
    alpha: torch.Tensor  # (B,) each, any float dtype: the kernels convert on load (no cast launches)
    sigma: torch.Tensor
    d_alpha: torch.Tensor
    d_sigma: torch.Tensor
    tau: torch.Tensor  # (B,) when row_tau, else a stand-in and tau_value holds the one temperature
    tau_value: float
    row_labels: torch.Tensor
    pool_labels: torch.Tensor
    log_prior: torch.Tensor
    endpoint: torch.Tensor
    noise: torch.Tensor
    endpoint_index: torch.Tensor
    pool_index: torch.Tensor
    active: torch.Tensor  # (B,) bool when has_active: the rows to compute
    order: torch.Tensor  # (B,) shared pools under the gate: the row indices, active rows first (else a stand-in)
    n_active: torch.Tensor  # (1,) int32 on the device: how many rows are active (else a stand-in)
    pool_sq_norms: torch.Tensor | None  # (K,) fp32 ||x_j||^2 of a shared pool when the caller has them
    row_tau: bool
    has_labels: bool
    labels_2d: bool
    has_prior: bool
    residual: bool
    has_own: bool
    has_pool_index: bool
    has_active: bool


def prepare(z, pool, alpha, sigma, d_alpha, d_sigma, temperature, *, row_labels=None, pool_labels=None,
            log_prior=None, endpoint=None, noise=None, endpoint_index=None, pool_index=None,
            active=None, pool_sq_norms=None) -> KernelInputs:
    """Inputs already validated by `posterior_velocity`; `temperature` is a float or a (B,) tensor."""
    def arg(t):
        return z if t is None else t.contiguous()  # contiguous() is free on the trainer's (contiguous) tensors

    row_tau = isinstance(temperature, torch.Tensor)
    order = n_active = z
    if active is not None and pool.dim() == 2:
        # The shared-pool kernels give each row block consecutive entries of `order`, so under the gate only the
        # first ceil(n_active / BLOCK_M) row blocks do any work; both stay on the device (no host sync).
        order = torch.argsort((~active).to(torch.uint8), stable=True)
        n_active = active.sum(dtype=torch.int32).reshape(1)
    # Per-row pools are read through their strides, so a bank's slice (N, K, D) is used in place.
    per_row_in_place = pool.dim() == 3 and pool.stride(-1) == 1
    return KernelInputs(
        z.contiguous(), pool if per_row_in_place else pool.contiguous(), arg(alpha), arg(sigma), arg(d_alpha),
        arg(d_sigma), arg(temperature if row_tau else None), 1.0 if row_tau else float(temperature),
        arg(row_labels), arg(pool_labels), arg(log_prior), arg(endpoint), arg(noise), arg(endpoint_index),
        arg(pool_index), arg(active), order, n_active, pool_sq_norms, row_tau, row_labels is not None,
        pool_labels is not None and pool_labels.dim() == 2, log_prior is not None, endpoint is not None,
        endpoint_index is not None, pool_index is not None, active is not None)


def size_bucket(n: int) -> int:
    """Autotuning key for a size that changes from step to step (a filling bank): the next power of two."""
    return triton.next_power_of_2(n)


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return SMS_WITHOUT_GPU
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def split_factor(programs: int, parts: int, sms: int) -> int:
    """Ways (a power of two) to split a reduction of `parts` minimal chunks so that `programs` programs fill at
    least half of `sms` SMs: a smaller grid leaves SMs idle while each program walks the whole reduction; past half
    a wave, another doubling gains at most the idle half and costs a pass over the partial sums."""
    split = 1
    while 2 * programs * split <= sms and parts >= 2 * split:
        split *= 2
    return split


@triton.jit
def load_row_coefficients(ALPHA, SIGMA, TAU, tau_value, rows, mask, ROW_TAU: tl.constexpr):
    """(alpha, sigma, tau, 1 / (2 sigma^2 tau)) of `rows` in fp32, whatever the coefficients' dtype."""
    a = tl.load(ALPHA + rows, mask=mask, other=0.0).to(tl.float32)
    sg = tl.load(SIGMA + rows, mask=mask, other=1.0).to(tl.float32)
    if ROW_TAU:
        tau = tl.load(TAU + rows, mask=mask, other=1.0).to(tl.float32)
    else:
        tau = tau_value
    return a, sg, tau, 1.0 / (2.0 * sg * sg * tau)
