"""Training items from concepts, and a deterministic, resumable batch order.

An *item* is one image with its prompt source. The order of batches is a pure function of
``(seed, epoch)``, and each item's augmentation (crop offset, flip, caption dropout) a pure function
of ``(seed, epoch, item index)``: the batch at any position can be rebuilt after a resume without
replaying the run, and worker processes cannot change the result.

Shapes: without buckets every image is resized to cover a ``size x size`` square (``size`` =
``data.resolution`` rounded down to the model's multiple) and cropped to it; with
``data.buckets: true`` each image goes to the bucket (see `buckets.py`) nearest its aspect ratio and
every batch holds images of one bucket only. Pixels are float ``[3, H, W]`` in [-1, 1].
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from .. import DifftuneError
from ..config import ConceptConfig, DataConfig
from .buckets import cover_size, make_buckets, nearest_bucket
from .images import IMAGE_EXTENSIONS, ImageProblem, load_image, read_caption
from .items import Item


@dataclass(frozen=True)
class View:
    """How item `index` becomes pixels: resized (LANCZOS) to `resized` = (width, height), cropped to
    `box` = (left, top, right, bottom), then mirrored left-right if `flip`. With the file's content
    it fully determines the image features, so it is part of their cache key."""

    index: int
    resized: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool


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


def concept_items(concept: ConceptConfig, index: int, data: DataConfig) -> list[Item]:
    """The candidate items of one concept (not yet checked): a folder, or a Hugging Face dataset
    whose images are written once as files (see `hf.py`)."""
    if concept.hf:
        from .hf import hf_items

        return hf_items(concept, index, data.cache_dir)
    return folder_items(concept, index)


def scan_items(data: DataConfig) -> tuple[list[Item], list[tuple[Item, ImageProblem]]]:
    """Decode every candidate image once: (usable items with their sizes, skipped items with why)."""
    from tqdm.auto import tqdm

    candidates = [item for i, concept in enumerate(data.concepts) for item in concept_items(concept, i, data)]
    usable: list[Item] = []
    skipped: list[tuple[Item, ImageProblem]] = []
    for item in tqdm(candidates, desc="checking images", unit="img", disable=None, leave=False):
        try:
            with load_image(item.path) as image:
                usable.append(replace(item, size=image.size))
        except ImageProblem as e:
            skipped.append((item, e))
    return usable, skipped


def describe_problem(item: Item, problem: ImageProblem) -> str:
    """One line: the file, the reason, and the dataset row it came from if any."""
    return f"{problem}; {item.origin}" if item.origin else str(problem)


def build_items(data: DataConfig, log: Callable[[str], None] = print) -> list[Item]:
    """All usable items of all concepts. Broken images are skipped, one line each naming the file
    and the reason; no usable image at all is an error."""
    items, skipped = scan_items(data)
    for item, problem in skipped:
        log(f"skipping {describe_problem(item, problem)}")
    for i, concept in enumerate(data.concepts):
        if not any(item.concept == i for item in items):
            log(f"warning: data.concepts[{i}] ({concept.dir or concept.hf}) has no usable image")
    if not items:
        from .check import no_images_message

        raise DifftuneError(no_images_message(data, len(skipped)))
    return items


def prompt_for(item: Item, concept: ConceptConfig) -> str:
    """The caption (or the concept's fallback prompt) put into the concept's caption template."""
    caption = item.caption if item.caption else concept.prompt
    return concept.caption_template.format(caption=caption).strip()


class BatchPlan:
    """Which items form global batch number `k`, for any k, without state.

    Each epoch is a seeded permutation of the repeated items. Items are grouped by bucket (one
    bucket when buckets are off), keeping the permuted order, and each group is cut into batches of
    `batch_size`: the incomplete rest of a group is dropped (a different rest each epoch), except
    that a group smaller than one batch is filled up by repeating its own items, so that no bucket
    goes untrained. Batches are then ordered by where their first item falls in the permutation.
    An item appears ``repeats`` times per epoch, times its concept's ``sampling_weight`` in whole
    multiples of the lightest concept's (weights 1 and 2: once and twice).
    The number of batches per epoch is therefore the same in every epoch; with one bucket this is
    the plain "shuffle, cut, drop the last partial batch" plan. If all items together are fewer
    than `batch_size`, the batch size shrinks to their number.
    """

    def __init__(self, items: list[Item], concepts: list[ConceptConfig], batch_size: int, seed: int,
                 bucket_of: list[int] | None = None):
        used = {item.concept for item in items}
        lightest = min((concepts[c].sampling_weight for c in used), default=1.0)
        times = {c: concepts[c].repeats * max(1, round(concepts[c].sampling_weight / lightest)) for c in used}
        self.entries = [i for i, item in enumerate(items) for _ in range(times[item.concept])]
        self.bucket_of = bucket_of or [0] * len(items)
        self.batch_size = min(batch_size, len(self.entries))
        self.seed = seed
        sizes: dict[int, int] = {}
        for i in self.entries:
            sizes[self.bucket_of[i]] = sizes.get(self.bucket_of[i], 0) + 1
        self.batches_per_epoch = sum(max(1, n // self.batch_size) for n in sizes.values())
        self._memo: tuple[int, list[list[int]]] | None = None

    def _epoch(self, epoch: int) -> list[int]:
        order = list(self.entries)
        random.Random(f"{self.seed}:order:{epoch}").shuffle(order)
        return order

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches (lists of item indices) of `epoch`, in training order."""
        if self._memo is not None and self._memo[0] == epoch:
            return self._memo[1]
        groups: dict[int, list[tuple[int, int]]] = {}
        for position, index in enumerate(self._epoch(epoch)):
            groups.setdefault(self.bucket_of[index], []).append((position, index))
        batches: list[tuple[int, list[int]]] = []
        bs = self.batch_size
        for members in groups.values():
            if len(members) < bs:
                filled = [members[j % len(members)] for j in range(bs)]
                batches.append((members[0][0], [index for _, index in filled]))
                continue
            for start in range(0, len(members) // bs * bs, bs):
                chunk = members[start : start + bs]
                batches.append((chunk[0][0], [index for _, index in chunk]))
        ordered = [batch for _, batch in sorted(batches)]
        self._memo = (epoch, ordered)
        return ordered

    def batch(self, k: int) -> tuple[int, list[int]]:
        """(epoch, item indices) of global batch `k`."""
        epoch, pos = divmod(k, self.batches_per_epoch)
        return epoch, self.epoch_batches(epoch)[pos]


class TrainingData:
    """Turns a global batch number into views, prompts and (optionally) pixels.

    `resolution_multiple` is what the family needs image sides to be a multiple of.
    """

    def __init__(self, items: list[Item], data: DataConfig, resolution_multiple: int, batch_size: int, seed: int,
                 companions: list | None = None):
        self.items = items
        self.data = data
        self.concepts = data.concepts
        self.companions = companions or []
        self.seed = seed
        self.size = (data.resolution // resolution_multiple) * resolution_multiple
        self.sizes = [item.size or _image_size(item.path) for item in items]
        if data.buckets:
            self.buckets = make_buckets(data.resolution, resolution_multiple)
            self.bucket_of = [nearest_bucket(size, self.buckets) for size in self.sizes]
        else:
            self.buckets = [(self.size, self.size)]
            self.bucket_of = [0] * len(items)
        self.plan = BatchPlan(items, data.concepts, batch_size, seed, self.bucket_of)
        self.groups: dict[int, str] = {}
        if self.companions:  # replay / class images join every batch (data/mix.py)
            from .mix import MixedPlan

            joined = {c: comp for comp in self.companions for c in comp.concepts}
            self.groups = {c: comp.group for c, comp in joined.items()}
            own = [i for i, item in enumerate(items) if item.concept not in joined]
            streams = []
            for n, comp in enumerate(self.companions):
                members = [i for i, item in enumerate(items) if item.concept in comp.concepts]
                if not members:
                    raise DifftuneError(f"{comp.name}: no usable images")
                streams.append((comp, BatchPlan([items[i] for i in members], data.concepts, 1, f"{seed}:mix{n}"), members))
            self.plan = MixedPlan(BatchPlan([items[i] for i in own], data.concepts, batch_size, seed), own, streams)

    def all_prompts(self) -> list[str]:
        """Every distinct prompt training can use (for the text-embedding cache)."""
        prompts = {prompt_for(item, self.concepts[item.concept]) for item in self.items}
        if any(c.caption_dropout > 0 for c in self.concepts):
            prompts.add("")
        return sorted(prompts)

    def _view(self, index: int, rng: random.Random | None, flip: bool) -> View:
        """The view of item `index`: a random crop offset from `rng`, or centred when it is None."""
        bw, bh = self.buckets[self.bucket_of[index]]
        nw, nh = cover_size(self.sizes[index], (bw, bh))
        if rng is not None:
            left, top = rng.randint(0, nw - bw), rng.randint(0, nh - bh)
        else:
            left, top = (nw - bw) // 2, (nh - bh) // 2
        return View(index, (nw, nh), (left, top, left + bw, top + bh), flip)

    def sample(self, index: int, epoch: int) -> tuple[View, str]:
        """The view and prompt of item `index` in `epoch` (a pure function of seed, epoch, index)."""
        concept = self.concepts[self.items[index].concept]
        rng = random.Random(f"{self.seed}:item:{epoch}:{index}")
        view = self._view(index, rng if self.data.crop == "random" else None, False)
        if self.data.random_flip and rng.random() < 0.5:
            view = replace(view, flip=True)
        prompt = "" if rng.random() < concept.caption_dropout else prompt_for(self.items[index], concept)
        return view, prompt

    def fixed_views(self) -> list[View] | None:
        """Every view training can ever use, when that set is finite (centre crops: one per item, two
        with random flips); None for random crops, whose offsets differ from epoch to epoch."""
        if self.data.crop == "random":
            return None
        flips = (False, True) if self.data.random_flip else (False,)
        return [self._view(i, None, flip) for i in range(len(self.items)) for flip in flips]

    def pixels(self, view: View) -> Any:
        """Float ``[3, H, W]`` in [-1, 1] for `view` (H, W = the view's box size)."""
        import numpy as np
        import torch
        from PIL import Image

        with load_image(self.items[view.index].path) as image:
            image = image.resize(view.resized, Image.Resampling.LANCZOS).crop(view.box)
        if view.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0

    def example(self, index: int, epoch: int) -> dict[str, Any]:
        """Pixels, prompt, file and view of item `index` in `epoch`."""
        view, prompt = self.sample(index, epoch)
        return {"pixels": self.pixels(view), "prompt": prompt, "path": self.items[index].path, "view": view}

    def batch(self, k: int, pixels: bool = True) -> dict[str, Any]:
        """Global batch `k`: views, prompts, file paths, epoch and, if asked, stacked pixels
        ``[B, 3, H, W]`` (all views of a batch have the same size)."""
        import torch

        epoch, indices = self.plan.batch(k)
        samples = [self.sample(i, epoch) for i in indices]
        views = [view for view, _ in samples]
        from .mix import loss_weights

        batch = {
            "views": views,
            "prompts": [prompt for _, prompt in samples],
            "paths": [self.items[i].path for i in indices],
            "epoch": epoch,
            "loss_weights": loss_weights(self.concepts, self.groups, [self.items[i].concept for i in indices]),
        }
        if pixels:
            batch["pixels"] = torch.stack([self.pixels(view) for view in views])
        return batch


def _image_size(path: str) -> tuple[int, int]:
    """The upright (width, height) of an image that was not measured when its item was made."""
    with load_image(path) as image:
        return image.size
