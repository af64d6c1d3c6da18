"""Training items from concepts, and a deterministic, resumable batch order.

An *item* is one image with its prompt source. The order of batches is a pure function of
``(seed, epoch)``, and each item's augmentation (crop offset, flip, caption dropout) a pure function
of ``(seed, epoch, item index)``: the batch at any position can be rebuilt after a resume without
replaying the run, and worker processes cannot change the result.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import DifftuneError
from ..config import ConceptConfig, DataConfig
from .images import IMAGE_EXTENSIONS, ImageProblem, load_image, read_caption


@dataclass(frozen=True)
class Item:
    """One training image. `caption` is None when the image has none of its own."""

    path: str
    caption: str | None
    concept: int


def _metadata_captions(folder: Path) -> dict[str, str]:
    """Captions from ``metadata.jsonl`` or ``metadata.csv`` (columns file_name and text)."""
    captions: dict[str, str] = {}
    jsonl = folder / "metadata.jsonl"
    if jsonl.is_file():
        for n, line in enumerate(jsonl.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[str(row["file_name"])] = str(row.get("text", row.get("caption", "")))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DifftuneError(f"{jsonl}:{n}: expected a JSON object with file_name and text ({e})") from None
    table = folder / "metadata.csv"
    if table.is_file():
        with table.open(encoding="utf-8-sig", newline="") as fh:
            for row in csv.DictReader(fh):
                if "file_name" not in row:
                    raise DifftuneError(f"{table}: needs a file_name column (and text)")
                captions[row["file_name"]] = row.get("text") or row.get("caption") or ""
    return captions


def folder_items(concept: ConceptConfig, index: int) -> list[Item]:
    """Images of a folder concept, with their captions (sidecar .txt beats metadata)."""
    folder = Path(concept.dir or "")
    if not folder.is_dir():
        raise DifftuneError(f"data.concepts[{index}].dir: folder not found: {folder}")
    meta = _metadata_captions(folder)
    items = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
        rel = path.relative_to(folder).as_posix()
        sidecar = path.with_suffix(".txt")
        caption = read_caption(sidecar) if sidecar.is_file() else meta.get(rel)
        items.append(Item(str(path), caption, index))
    return items


def build_items(data: DataConfig, log: Callable[[str], None] = print) -> list[Item]:
    """All usable items of all concepts. Broken images are skipped, one line each naming the file
    and the reason; no usable image at all is an error."""
    items: list[Item] = []
    for i, concept in enumerate(data.concepts):
        if concept.hf:
            from .hf import hf_items

            found = hf_items(concept, i)
        else:
            found = folder_items(concept, i)
        usable = []
        for item in found:
            try:
                load_image(item.path)
            except ImageProblem as e:
                log(f"skipping {e}")
                continue
            usable.append(item)
        if not usable:
            where = concept.dir or concept.hf
            log(f"warning: data.concepts[{i}] ({where}) has no usable image")
        items.extend(usable)
    if not items:
        raise DifftuneError("no usable training images in data.concepts (see the lines above for why each was skipped)")
    return items


def prompt_for(item: Item, concept: ConceptConfig) -> str:
    """The caption (or the concept's fallback prompt) put into the concept's caption template."""
    caption = item.caption if item.caption else concept.prompt
    return concept.caption_template.format(caption=caption).strip()


class BatchPlan:
    """Which items form global batch number `k`, for any k, without state.

    Each epoch is a seeded permutation of the repeated items, cut into batches of `batch_size`
    (the last, smaller batch of an epoch is dropped so every batch has the same shape, unless the
    epoch is smaller than one batch).
    """

    def __init__(self, items: list[Item], concepts: list[ConceptConfig], batch_size: int, seed: int):
        self.entries = [i for i, item in enumerate(items) for _ in range(concepts[item.concept].repeats)]
        self.batch_size = min(batch_size, len(self.entries))
        self.seed = seed
        self.batches_per_epoch = len(self.entries) // self.batch_size

    def _epoch(self, epoch: int) -> list[int]:
        order = list(self.entries)
        random.Random(f"{self.seed}:order:{epoch}").shuffle(order)
        return order

    def batch(self, k: int) -> tuple[int, list[int]]:
        """(epoch, item indices) of global batch `k`."""
        epoch, pos = divmod(k, self.batches_per_epoch)
        order = self._epoch(epoch)
        return epoch, order[pos * self.batch_size : (pos + 1) * self.batch_size]


class TrainingData:
    """Turns a global batch number into tensors: pixels in [-1, 1], prompts and file names."""

    def __init__(self, items: list[Item], data: DataConfig, resolution_multiple: int, batch_size: int, seed: int):
        self.items = items
        self.data = data
        self.concepts = data.concepts
        self.seed = seed
        self.plan = BatchPlan(items, data.concepts, batch_size, seed)
        self.size = (data.resolution // resolution_multiple) * resolution_multiple

    def all_prompts(self) -> list[str]:
        """Every distinct prompt training can use (for the text-embedding cache)."""
        prompts = {prompt_for(item, self.concepts[item.concept]) for item in self.items}
        if any(c.caption_dropout > 0 for c in self.concepts):
            prompts.add("")
        return sorted(prompts)

    def example(self, index: int, epoch: int) -> dict[str, Any]:
        import numpy as np
        import torch

        item = self.items[index]
        concept = self.concepts[item.concept]
        rng = random.Random(f"{self.seed}:item:{epoch}:{index}")
        image = load_image(item.path)
        image = _resize_crop(image, self.size, self.data.crop == "random", rng)
        if self.data.random_flip and rng.random() < 0.5:
            from PIL import Image

            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        prompt = "" if rng.random() < concept.caption_dropout else prompt_for(item, concept)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
        return {"pixels": pixels, "prompt": prompt, "path": item.path}

    def batch(self, k: int) -> dict[str, Any]:
        import torch

        epoch, indices = self.plan.batch(k)
        examples = [self.example(i, epoch) for i in indices]
        return {
            "pixels": torch.stack([e["pixels"] for e in examples]),
            "prompts": [e["prompt"] for e in examples],
            "paths": [e["path"] for e in examples],
            "epoch": epoch,
        }


def _resize_crop(image: Any, size: int, random_crop: bool, rng: random.Random) -> Any:
    """Scale the short side to `size` and crop a `size` x `size` square (centred or at random)."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.LANCZOS)
    if random_crop:
        left, top = rng.randint(0, nw - size), rng.randint(0, nh - size)
    else:
        left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))
