"""Validation loss: the denoising loss on images the run does not train on, comparable across runs.

The images are either a folder (``validation.images``) or a fraction of the training images kept out
of training (``validation.holdout``, the same ones for a given seed). Every image is scored at
``validation.loss_draws`` fixed (timestep, noise) pairs drawn once from ``validation.seed``: every
evaluation of a run, and every run with the same objective settings, sees the same noisy inputs, so
the numbers move only because the weights did. The loss is the plain mean squared error of the
prediction (no min-SNR or flow weighting), so runs with different weightings still compare.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace
from typing import Any, Callable

from . import DifftuneError
from .config import ConceptConfig, Config
from .data.dataset import Item, TrainingData, build_items, prompt_for


def split_holdout(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """(training items, held-out items): ``round(fraction * n)`` of each concept's n images (never all
    of them; at least one image in all), picked by `seed`, so every concept is trained and scored."""
    if fraction <= 0:
        return items, []
    if len(items) < 2:
        raise DifftuneError(f"validation.holdout needs at least 2 training images, found {len(items)}")
    rng = random.Random(f"{seed}:holdout")
    by_concept: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        by_concept.setdefault(item.concept, []).append(i)
    held: set[int] = set()
    for members in by_concept.values():
        held.update(rng.sample(members, min(len(members) - 1, round(fraction * len(members)))))
    if not held:  # every concept too small for its share: one image of the largest
        largest = max(by_concept.values(), key=len)
        held.add(rng.choice(largest))
    return [it for i, it in enumerate(items) if i not in held], [it for i, it in enumerate(items) if i in held]


def folder_validation_items(cfg: Config, log: Callable[[str], None]) -> tuple[list[Item], list[ConceptConfig]]:
    """The usable images of ``validation.images``, captioned like a concept (fallback: the first
    concept's prompt and template)."""
    first = cfg.data.concepts[0]
    concept = ConceptConfig(dir=cfg.validation.images, prompt=first.prompt, caption_template=first.caption_template)
    try:
        items = build_items(replace(cfg.data, concepts=[concept]), log=log)
    except DifftuneError:
        raise DifftuneError(f"validation.images: no usable image in {cfg.validation.images}") from None
    return items, [concept]


def _seed(seed: int, image: int, draw: int) -> int:
    digest = hashlib.sha256(f"validation:{seed}:{image}:{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ValidationLoss:
    """Scores the family's denoiser on fixed validation inputs.

    `items` with their `concepts` are the images; `image_features` is a factory
    ``(TrainingData) -> ImageFeatures`` (so the training run's feature cache is shared) and
    `prompt_features` maps a list of prompts to batched text features, as in training.
    """

    def __init__(self, cfg: Config, items: list[Item], concepts: list[ConceptConfig], resolution_multiple: int,
                 image_features: Callable[[TrainingData], Any], prompt_features: Callable[[list[str]], dict]):
        data_cfg = replace(cfg.data, concepts=concepts, crop="center", random_flip=False)
        self.data = TrainingData(items, data_cfg, resolution_multiple, 1, cfg.validation.seed)
        self.views = self.data.fixed_views() or []
        self.prompts = [prompt_for(item, concepts[item.concept]) for item in items]
        self.features = image_features(self.data)
        self.prompt_features = prompt_features
        self.seed = cfg.validation.seed
        self.draws = cfg.validation.loss_draws

    def __len__(self) -> int:
        return len(self.views)

    def __call__(self, family: Any, objective: Any, part_names: list[str], autocast: Callable[[], Any]) -> float:
        """The mean loss over every image and draw, with the trained parts in eval mode (no dropout)."""
        import torch

        parts = [family.parts[n] for n in part_names]
        modes = [p.training for p in parts]
        for p in parts:
            p.eval()
        total = 0.0
        try:
            with torch.no_grad(), autocast():
                for i, view in enumerate(self.views):
                    features = self.features([view])
                    features.update(self.prompt_features([self.prompts[i]]))
                    x0 = features.pop("x0").float()
                    for j in range(self.draws):
                        generator = torch.Generator().manual_seed(_seed(self.seed, i, j))
                        t = objective.sample_timesteps(x0, generator)
                        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
                        pred = family.predict(objective.noisy(x0, noise, t), t, dict(features))
                        total += float(((pred.float() - objective.target(x0, noise, t).float()) ** 2).mean())
        finally:
            for p, mode in zip(parts, modes):
                p.train(mode)
        return total / (len(self.views) * self.draws)


def validation_items(cfg: Config, items: list[Item], log: Callable[[str], None]
                     ) -> tuple[list[Item], list[Item], list[ConceptConfig]]:
    """(training items, validation items, the concepts the validation items refer to)."""
    v = cfg.validation
    if v.images:
        val_items, concepts = folder_validation_items(cfg, log)
        log(f"validation loss on {len(val_items)} image(s) in {v.images}")
        return items, val_items, concepts
    if v.holdout:
        items, held = split_holdout(items, v.holdout, cfg.train.seed)
        log(f"validation loss on {len(held)} held-out image(s); {len(items)} left for training")
        return items, held, cfg.data.concepts
    return items, [], cfg.data.concepts
