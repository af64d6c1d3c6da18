"""Scorers: how well images show what their prompts ask, and how far images moved from the base's.

A scorer has two methods, each returning plain ``{metric: float}``:

- ``concept(images, prompts, references)``: images generated for one concept's prompts (same order),
  and the concept's training images (paths; may be empty). Always returns ``score`` in [0, 1]-ish,
  higher is better.
- ``neutral(images, prompts, base_images)``: images for trigger-free prompts, and the base model's
  images for the same prompts and seeds (None when there are none). Returns ``drift`` (0 = the same
  as the base, higher = further) when base images are given.

`WorldScorer` reads pixels with the world oracle (difftune.world.oracle); `EncoderScorer` uses a CLIP
model (text-image and image-image cosine similarity) and a DINOv2 model (image-image similarity and
feature drift), both loaded by hub id or local folder with transformers' Auto classes.
"""

from __future__ import annotations

from typing import Any

from .. import DifftuneError

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dinov2-small"
#: metrics where lower is better (`--select` minimises them); every other metric is maximised
LOWER_IS_BETTER = ("drift",)


class WorldScorer:
    """The world oracle. Concept ``score``: fraction of images showing the asked style or place (for a
    plain prompt: background, colour and shape all right); ``colour`` / ``shape`` / ``background``:
    fraction right where the prompt asks for them. Neutral ``correct``: fraction drawn exactly as
    asked (plain, right colours and shape); ``drift``: fraction whose oracle reading (background,
    colour, shape, style) differs from the base's image with the same seed."""

    name = "world"
    KEYS = ("background", "colour", "shape", "style")

    @staticmethod
    def accepts(prompts: list[str]) -> bool:
        from ..world import scenes

        try:
            for p in prompts:
                scenes.parse_caption(p)
        except ValueError:
            return False
        return bool(prompts)

    def concept(self, images: list, prompts: list[str], references: list | None = None) -> dict[str, float]:
        from ..world import oracle, scenes

        hits: dict[str, list[bool]] = {}
        for image, prompt in zip(images, prompts):
            want = scenes.parse_caption(prompt)
            result = oracle.score(image, prompt)
            if want["place"]:
                asked = result["place"]
            elif want["style"]:
                asked = result["style"]
            else:
                asked = result["background"] and result["colour"] and result["shape"] and result["style"]
            hits.setdefault("score", []).append(bool(asked))
            for key in ("background", "colour", "shape"):
                if key in result:
                    hits.setdefault(key, []).append(bool(result[key]))
        return {k: sum(v) / len(v) for k, v in hits.items()}

    def neutral(self, images: list, prompts: list[str], base_images: list | None = None) -> dict[str, float]:
        from ..world import oracle

        out = {"correct": self.concept(images, prompts)["score"]}
        if base_images is not None:
            moved = [
                any(oracle.analyse(a)[k] != oracle.analyse(b)[k] for k in self.KEYS) for a, b in zip(images, base_images)
            ]
            out["drift"] = sum(moved) / max(1, len(moved))
        return out


class EncoderScorer:
    """CLIP and DINOv2 features. Concept ``clip_text``: mean cosine similarity of each image with its
    prompt; ``clip_image`` / ``dino_image``: mean cosine similarity of each image with the concept's
    training images (averaged over them); ``score`` = ``clip_image`` when there are training images,
    else ``clip_text``. Neutral ``clip_text`` as above and ``drift``: mean (1 - cosine similarity) of
    the DINOv2 features of each image and the base's image with the same seed."""

    name = "encoders"

    def __init__(self, clip_model: str = DEFAULT_CLIP, dino_model: str = DEFAULT_DINO, device: Any = "cpu"):
        from transformers import AutoImageProcessor, AutoModel, AutoProcessor

        self.device = device
        self.clip, self.clip_processor = self._load(AutoModel, AutoProcessor, clip_model, "CLIP", "--clip-model")
        self.dino, self.dino_processor = self._load(AutoModel, AutoImageProcessor, dino_model, "DINO", "--dino-model")
        if not hasattr(self.clip, "get_image_features"):
            raise DifftuneError(f"{clip_model} is not a CLIP model (it has no image and text towers); set --clip-model")

    def _load(self, model_cls, processor_cls, name: str, what: str, option: str):
        try:
            model = model_cls.from_pretrained(name).to(self.device).eval()
            processor = processor_cls.from_pretrained(name)
        except Exception as e:  # offline, missing repo, not a model folder: one line naming the encoder
            raise DifftuneError(f"cannot load the {what} encoder {name!r} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); set {option} or validation.{what.lower()}_model") from None
        return model, processor

    @staticmethod
    def _unit(x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @staticmethod
    def _pil(images: list) -> list:
        from PIL import Image

        return [Image.open(i).convert("RGB") if not isinstance(i, Image.Image) else i.convert("RGB") for i in images]

    def _tensor(self, out):
        """A features tensor from transformers' return value (a tensor, or an output with a pooled one)."""
        return out if hasattr(out, "norm") else out.pooler_output

    def clip_images(self, images: list):
        import torch

        with torch.no_grad():
            inputs = self.clip_processor(images=self._pil(images), return_tensors="pt").to(self.device)
            return self._unit(self._tensor(self.clip.get_image_features(**inputs)).float())

    def clip_texts(self, texts: list[str]):
        import torch

        tokenizer = getattr(self.clip_processor, "tokenizer", self.clip_processor)
        with torch.no_grad():
            inputs = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
            return self._unit(self._tensor(self.clip.get_text_features(**inputs)).float())

    def dino_images(self, images: list):
        import torch

        with torch.no_grad():
            inputs = self.dino_processor(images=self._pil(images), return_tensors="pt").to(self.device)
            return self._unit(self.dino(**inputs).pooler_output.float())

    def concept(self, images: list, prompts: list[str], references: list | None = None) -> dict[str, float]:
        out = {"clip_text": float((self.clip_images(images) * self.clip_texts(prompts)).sum(-1).mean())}
        if references:
            out["clip_image"] = float((self.clip_images(images) @ self.clip_images(references).T).mean())
            out["dino_image"] = float((self.dino_images(images) @ self.dino_images(references).T).mean())
        out["score"] = out.get("clip_image", out["clip_text"])
        return out

    def neutral(self, images: list, prompts: list[str], base_images: list | None = None) -> dict[str, float]:
        out = {"clip_text": float((self.clip_images(images) * self.clip_texts(prompts)).sum(-1).mean())}
        if base_images is not None:
            out["drift"] = float((1 - (self.dino_images(images) * self.dino_images(base_images)).sum(-1)).clamp_min(0).mean())
        return out


def pick_scorer(kind: str, prompts: list[str], clip_model: str | None = None, dino_model: str | None = None,
                device: Any = "cpu"):
    """``kind``: ``world``, ``encoders`` or ``auto`` (the world oracle when every prompt is a world caption)."""
    if kind not in ("auto", "world", "encoders"):
        raise DifftuneError(f"unknown scorer {kind!r}: use auto, world or encoders")
    if kind == "world" or (kind == "auto" and WorldScorer.accepts(prompts)):
        if not WorldScorer.accepts(prompts):
            raise DifftuneError("the world scorer needs world captions ('a COLOUR SHAPE on a COLOUR background ...') as prompts")
        return WorldScorer()
    return EncoderScorer(clip_model or DEFAULT_CLIP, dino_model or DEFAULT_DINO, device)
