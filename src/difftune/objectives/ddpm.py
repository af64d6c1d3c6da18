"""DDPM denoising objective: epsilon, v or sample prediction, with optional min-SNR weighting.

Works on any tensor shape whose first dimension is the batch (image latents ``[B, C, H, W]`` or the
Kandinsky prior's embeddings ``[B, D]``). Timesteps are integers in ``[0, num_train_timesteps)``, the
scale every diffusers UNet and prior expects.
"""

from __future__ import annotations

import torch

from .timesteps import sample_u


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


class DDPMObjective:
    """The noise schedule of a diffusers DDPM-style scheduler config, used for training.

    Args:
        scheduler_config: the model's scheduler config (its betas define the schedule).
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample``.
        min_snr_gamma: if set, weight each sample by min(SNR, gamma) / SNR (eps) or / (SNR + 1) (v).
        sampling, logit_mean, logit_std, mode_scale: how timesteps are drawn (see `timesteps.sample_u`).
    """

    kind = "ddpm"

    def __init__(
        self,
        scheduler_config: dict,
        prediction_type: str,
        min_snr_gamma: float | None = None,
        sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
    ):
        from diffusers import DDPMScheduler

        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = prediction_type
        self.min_snr_gamma = min_snr_gamma
        self.sampling = (sampling, logit_mean, logit_std, mode_scale)
        self.num_timesteps = self.scheduler.config.num_train_timesteps
        alphas_cumprod = self.scheduler.alphas_cumprod.to(torch.float64)
        self._sqrt_a = alphas_cumprod.sqrt().float()
        self._sqrt_1ma = (1.0 - alphas_cumprod).sqrt().float()
        self._snr = (alphas_cumprod / (1.0 - alphas_cumprod)).float()
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sqrt(a), sqrt(1 - a), SNR) per timestep on `device`, copied there once: indexing them with
        the timesteps where they live avoids a device -> host copy (a GPU sync) at every step."""
        if device not in self._on_device:
            self._on_device[device] = (self._sqrt_a.to(device), self._sqrt_1ma.to(device), self._snr.to(device))
        return self._on_device[device]

    def sample_timesteps(self, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Integer timesteps, one per sample, drawn on the CPU from `generator` (so runs replay exactly)."""
        u = sample_u(x0.shape[0], *self.sampling, generator=generator)
        t = (u * self.num_timesteps).long().clamp_(0, self.num_timesteps - 1)
        return t.to(x0.device)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
        sqrt_a, sqrt_1ma, _ = self._tables(t.device)
        return _expand(sqrt_a[t], x0).to(x0.device) * x0 + _expand(sqrt_1ma[t], x0).to(x0.device) * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        sqrt_a, sqrt_1ma, _ = self._tables(t.device)
        return _expand(sqrt_a[t], x0).to(x0.device) * noise - _expand(sqrt_1ma[t], x0).to(x0.device) * x0

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights (ones unless min-SNR weighting is on)."""
        if self.min_snr_gamma is None or self.prediction_type == "sample":
            return torch.ones(t.shape[0], device=t.device)
        snr = self._tables(t.device)[2][t]
        clipped = snr.clamp(max=self.min_snr_gamma)
        denom = snr + 1.0 if self.prediction_type == "v_prediction" else snr
        return clipped / denom
