"""Rectified-flow (flow matching) objective, as used by FLUX.1 and SD3-style DiTs.

Convention (the one diffusers' FlowMatchEulerDiscreteScheduler samples with): a noise level
``sigma`` in (0, 1), ``x_t = (1 - sigma) * x0 + sigma * noise`` and the network predicts the
velocity ``noise - x0``. Sigma is returned as a float tensor; the family decides how the network
receives it (FLUX takes sigma itself, others sigma * 1000).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .ddpm import _expand
from .timesteps import sample_u


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The timestep shift: pushes sigma towards 1 (more noise) for shift > 1."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def dynamic_shift(seq_len: int, scheduler_config: dict) -> float:
    """Resolution-dependent shift exp(mu), mu linear in the image token count (FLUX.1's schedule).

    Schedulers with ``time_shift_type: linear`` shift by mu itself, as diffusers samples them.
    """
    base_len = scheduler_config.get("base_image_seq_len", 256)
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.5)
    max_shift = scheduler_config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    mu = base_shift + slope * (seq_len - base_len)
    return mu if scheduler_config.get("time_shift_type", "exponential") == "linear" else math.exp(mu)


class FlowMatchingObjective:
    """Flow matching with configurable timestep sampling, shift and loss weighting.

    Args:
        scheduler_config: the model's FlowMatchEulerDiscreteScheduler config (shift settings).
        seq_len: maps a batch of model-space samples ``x0`` to its image token count (for the
            resolution-dependent shift).
        shift: a fixed shift; None = dynamic from the config when it uses dynamic shifting, else
            the config's ``shift``.
        sampling, logit_mean, logit_std, mode_scale: see `timesteps.sample_u`.
        weighting: ``none``, ``sigma_sqrt`` (1 / sigma^2) or ``cosmap`` (SD3's cosine map).
    """

    kind = "flow"

    def __init__(
        self,
        scheduler_config: dict,
        seq_len: Callable[[torch.Tensor], int],
        shift: float | None = None,
        sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        weighting: str = "none",
    ):
        if weighting not in ("none", "sigma_sqrt", "cosmap"):
            raise ValueError(f"unknown weighting {weighting!r}")
        self.scheduler_config = dict(scheduler_config)
        self.seq_len = seq_len
        self.fixed_shift = shift
        self.sampling = (sampling, logit_mean, logit_std, mode_scale)
        self.weighting = weighting

    def shift_for(self, x0: torch.Tensor) -> float:
        """The shift applied to sampled sigmas for a batch like `x0`."""
        if self.fixed_shift is not None:
            return self.fixed_shift
        if self.scheduler_config.get("use_dynamic_shifting", False):
            return dynamic_shift(self.seq_len(x0), self.scheduler_config)
        return float(self.scheduler_config.get("shift", 1.0))

    def sample_timesteps(self, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise levels sigma in (0, 1), one per sample, drawn on the CPU from `generator`."""
        u = sample_u(x0.shape[0], *self.sampling, generator=generator)
        sigma = shift_sigma(u, self.shift_for(x0))
        return sigma.clamp(1e-5, 1.0).to(x0.device)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = _expand(t, x0)
        return (1.0 - s) * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        if self.weighting == "sigma_sqrt":
            return (t.float() ** -2.0).clamp(max=1e4)
        if self.weighting == "cosmap":
            bot = 1.0 - 2.0 * t.float() + 2.0 * t.float() ** 2
            return 2.0 / (math.pi * bot)
        return torch.ones(t.shape[0], device=t.device)
