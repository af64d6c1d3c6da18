"""Timestep sampling shared by every objective: a number u in (0, 1) per sample.

DDPM objectives turn u into an integer timestep, flow matching into a noise level sigma. Drawing
from an explicit CPU generator makes a run replay exactly after a resume, on any device.
"""

from __future__ import annotations

import math

import torch


def sample_u(
    n: int,
    method: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """`n` values in (0, 1).

    - ``uniform``: U(0, 1).
    - ``logit_normal``: sigmoid(N(mean, std)) — more weight on the middle (SD3, FLUX trainers).
    - ``mode``: the "mode" density of SD3 with heavier middle or tails by `mode_scale`.
    """
    if method == "uniform":
        return torch.rand(n, generator=generator)
    if method == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator) * logit_std + logit_mean)
    if method == "mode":
        u = torch.rand(n, generator=generator)
        return 1.0 - u - mode_scale * (torch.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)
    raise ValueError(f"unknown timestep sampling {method!r}")
