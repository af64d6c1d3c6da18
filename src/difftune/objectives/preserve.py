"""Loss terms that keep what the model already knew while it learns something new.

Each term is a callable ``term(x_t, t, features, seed) -> scalar loss`` that the training loop adds to
the denoising loss of every micro-batch (``x_t``, ``t`` and ``features`` are the batch's; ``seed`` is
the micro-batch's). `make_terms(cfg, family, prompt_features)` builds the ones the config asks for:

- `OutputPreservation` (``preserve.output_weight``): for trigger-free prompts, the adapted model's
  prediction on the batch's noisy inputs is pulled toward the base model's: for an adapter, the same
  denoiser with its LoRA disabled (no extra images, no second model in memory); for a full fine-tune,
  a frozen copy of the starting denoiser (its memory once more, no extra images).
- `ContinualPenalty` (``preserve.clora_weight``, with ``method.init_lora``): in the spirit of C-LoRA
  (Smith et al. 2023, "Continual Diffusion"), which penalises a new task's LoRA product where the
  earlier tasks' LoRA products are large: here the continued adapter's change of weight delta,
  ``|dW_old| * (dW - dW_old)``, squared, summed and normalised per layer, so the new concept is
  learned in directions the earlier LoRA does not use. It needs no old images.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Callable


class OutputPreservation:
    def __init__(self, family: Any, prompts: list[str], weight: float, prompt_features: Callable[[list[str]], dict],
                 adapter: bool = True):
        self.family, self.prompts, self.weight, self.prompt_features = family, list(prompts), weight, prompt_features
        self.base = None
        if not adapter:  # a full fine-tune changes the weights themselves: keep the starting ones aside
            import copy

            from ..families.base import unwrap

            self.base = copy.deepcopy(unwrap(family.parts[family.denoiser])).requires_grad_(False).eval()

    def conditioning(self, features: dict, n: int, seed: int) -> dict:
        """The batch's features with its prompts replaced by `n` preservation prompts (chosen by `seed`)."""
        rng = random.Random(seed)
        prompts = [rng.choice(self.prompts) for _ in range(n)]
        swapped = dict(features)
        swapped.update(self.prompt_features(prompts))
        return swapped

    @contextlib.contextmanager
    def base_model(self):
        """A context in which the family predicts as the base model."""
        from ..methods.lora import adapters_disabled

        if self.base is None:
            with adapters_disabled(self.family.parts[self.family.denoiser]):
                yield
            return
        parts, name = self.family.parts, self.family.denoiser
        trained, parts[name] = parts[name], self.base
        try:
            yield
        finally:
            parts[name] = trained

    def target(self, x_t, t, conditioning: dict):
        """The base model's prediction (the adapter disabled, or the frozen copy), no gradient."""
        import torch

        with torch.no_grad(), self.base_model():
            return self.family.predict(x_t, t, conditioning).float()

    def __call__(self, x_t, t, features: dict, seed: int):
        conditioning = self.conditioning(features, x_t.shape[0], seed)
        target = self.target(x_t, t, conditioning)
        pred = self.family.predict(x_t, t, conditioning).float()
        return self.weight * ((pred - target) ** 2).mean()


class ContinualPenalty:
    def __init__(self, module: Any, weight: float):
        from ..methods.lora import lora_deltas

        self.weight = weight
        self.layers = []
        for a, b, scale in lora_deltas(module).values():
            old = (scale * b.detach().float().flatten(1) @ a.detach().float().flatten(1)).clone()
            usage = old.abs()
            self.layers.append((a, b, scale, old, usage / usage.mean().clamp_min(1e-12)))

    def __call__(self, x_t=None, t=None, features=None, seed=None):
        import torch

        if not self.layers:
            return torch.zeros(())
        total = 0.0
        for a, b, scale, old, usage in self.layers:
            delta = scale * b.float().flatten(1) @ a.float().flatten(1)
            total = total + ((usage * (delta - old)) ** 2).sum() / (old ** 2).sum().clamp_min(1e-12)
        return self.weight * total / len(self.layers)


def make_terms(cfg: Any, family: Any, prompt_features: Callable[[list[str]], dict]) -> list[Callable]:
    """The preservation terms `cfg.preserve` asks for (none by default)."""
    p = cfg.preserve
    terms: list[Callable] = []
    if p.output_weight > 0:
        from ..methods import get_method_class

        adapter = get_method_class(cfg.method.kind).adapter
        terms.append(OutputPreservation(family, p.prompts, p.output_weight, prompt_features, adapter))
    if p.clora_weight > 0:
        terms.append(ContinualPenalty(family.parts[family.denoiser], p.clora_weight))
    return terms
