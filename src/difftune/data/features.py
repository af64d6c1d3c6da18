"""The one route a micro-batch takes to the training step: ``features, batch = route.features(k)``.

Micro-batch `k` -> its views and prompts (`TrainingData.batch`, a pure function of the seed and k)
-> image features (`ImageFeatures`: the disk cache, or the frozen autoencoder now) and prompt
features (the table of prompts encoded once, or the text encoders now when they train) -> one
feature dict, batched on the first dimension, with ``x0`` among its keys, and the batch itself (its
``paths`` for messages, its ``loss_weights`` for the loss). The loop asks for it and gets it;
nothing walks back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .cache import ImageFeatures
    from .dataset import TrainingData


class FeatureRoute:
    """`prompt_table`: prompt -> its features (first dimension dropped), when the text encoders are
    frozen; None to call `encode_prompts` on every batch (text encoders that train)."""

    def __init__(self, data: "TrainingData", images: "ImageFeatures", prompt_table: dict[str, dict] | None,
                 encode_prompts: Callable[[list[str]], dict]):
        self.data = data
        self.images = images
        self.prompt_table = prompt_table
        self.encode_prompts = encode_prompts

    def prompts(self, prompts: list[str]) -> dict[str, Any]:
        if self.prompt_table is None:
            return self.encode_prompts(prompts)
        import torch

        rows = [self.prompt_table[p] for p in prompts]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]} if rows and rows[0] else {}

    def features(self, k: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(features of micro-batch `k`, the batch: its image files ``paths`` and ``loss_weights``)."""
        batch = self.data.batch(k, pixels=False)
        features = self.images(batch["views"])
        features.update(self.prompts(batch["prompts"]))
        return features, batch
