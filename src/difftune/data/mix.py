"""What joins a run's own images in its batches: replayed concepts of earlier runs (``data.replay``)
and prior-preservation class images (``class_prompt`` / ``class_dir``), and how batches mix them.

`mixed_sources(cfg)` returns the run's concept list extended by these *companion* concepts, and one
`Companion` per source saying how many of its samples join each batch and how they count in the
loss. `MixedPlan` composes batch ``k`` from the own plan's batch ``k`` plus each companion's next
samples, still a pure function of ``(seed, k)`` so resume stays exact. `loss_weights` gives each
sample its share of the loss:

- group ``main`` (own concepts and replay): ``concept.loss_weight / (number of main samples)``, so an
  all-default batch is the plain mean;
- group ``prior`` (class images): ``prior_loss_weight / (number of class samples)``, so the loss is
  ``mean(instance) + prior_loss_weight * mean(class)`` as in DreamBooth.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from .. import DifftuneError
from ..config import Config, ConceptConfig
from .images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Companion:
    """Samples of `concepts` (indices into the extended concept list) mixed into every batch: on
    average `rate` per batch (exactly ``floor((k+1)*rate) - floor(k*rate)`` in batch k), counted in
    loss `group` (``main`` or ``prior``)."""

    name: str
    concepts: tuple[int, ...]
    rate: float
    group: str


def replay_concepts(cfg: Config) -> list[ConceptConfig]:
    """The concepts of the runs in ``data.replay``, from their saved configs; a run of another base
    model, or a folder that is no run, is one clear error."""
    import yaml

    from ..config import config_from_dict

    concepts = []
    for run in cfg.data.replay:
        saved = Path(run) / "config.yaml"
        if not saved.is_file():
            raise DifftuneError(f"data.replay: {run} is not a difftune run (no config.yaml)")
        other = config_from_dict(yaml.safe_load(saved.read_text()))
        if _model_key(other) != _model_key(cfg):
            raise DifftuneError(f"data.replay: {run} was trained on {other.model.path!r}, not on this run's model "
                                f"{cfg.model.path!r}; replay needs runs of the same base model")
        concepts += [replace(c, class_prompt=None, class_dir=None, sampling_weight=1.0) for c in other.data.concepts]
    return concepts


def _model_key(cfg: Config) -> tuple:
    path = Path(cfg.model.path)
    return (str(path.resolve()) if path.exists() else cfg.model.path, cfg.model.revision, cfg.model.variant)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else []


def class_folder(cfg: Config, concept: ConceptConfig, index: int) -> tuple[Path, int]:
    """(where concept `index`'s class images are, how many are missing there)."""
    if concept.class_dir:
        folder = Path(concept.class_dir)
    else:
        key = hashlib.sha256(repr((_model_key(cfg), concept.class_prompt, cfg.data.resolution, cfg.validation.steps,
                                   cfg.validation.guidance)).encode()).hexdigest()[:16]
        root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path.home() / ".cache" / "difftune"
        folder = root / "class_images" / key
    missing = max(0, concept.class_images - len(_images_in(folder)))
    if missing and not concept.class_prompt:
        raise DifftuneError(f"data.concepts[{index}].class_dir: {folder} has {concept.class_images - missing} images, "
                            f"class_images asks for {concept.class_images} and there is no class_prompt to draw the rest")
    return folder, missing


def generate_class_images(cfg: Config, family_cls: Any, jobs: list[tuple[Path, str, int]], log: Callable) -> None:
    """Draw the missing class images with the base model: image i of a folder is ``class-{i:05d}.png``
    from seed i, written atomically with a sidecar caption, so an interrupted run resumes where it stopped."""
    import torch
    from tqdm.auto import tqdm

    from ..inference.generate import pick_device
    from ..inference.naming import save_image

    device = pick_device()
    pipe = family_cls.load_pipeline(cfg.model.path, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    pipe.set_progress_bar_config(disable=True)
    guidance = cfg.validation.guidance if cfg.validation.guidance is not None else family_cls.default_guidance
    for folder, prompt, count in jobs:
        folder.mkdir(parents=True, exist_ok=True)
        todo = [i for i in range(count) if not (folder / f"class-{i:05d}.png").is_file()]
        log(f"drawing {len(todo)} class images for {prompt!r} into {folder}")
        for i in tqdm(todo, desc="class images", unit="img", disable=None):
            (image,) = family_cls.sample(pipe, prompt, steps=cfg.validation.steps, guidance=guidance,
                                         width=cfg.data.resolution, height=cfg.data.resolution,
                                         generator=torch.Generator("cpu").manual_seed(i), num=1)
            (folder / f"class-{i:05d}.txt").write_text(prompt + "\n", encoding="utf-8")
            save_image(image, folder / f"class-{i:05d}.png", {"prompt": prompt, "seed": i, "model": cfg.model.path})
    del pipe


def mixed_sources(cfg: Config, family_cls: Any, log: Callable = print) -> tuple[list[ConceptConfig], list[Companion]]:
    """The extended concept list (own concepts first) and the companions that mix into batches.
    Missing class images are drawn here, before the model is loaded for training."""
    concepts = list(cfg.data.concepts)
    companions: list[Companion] = []
    batch = cfg.train.batch_size
    replayed = replay_concepts(cfg) if cfg.data.replay else []
    if replayed:
        r = cfg.data.replay_ratio
        indices = tuple(range(len(concepts), len(concepts) + len(replayed)))
        concepts += replayed
        if r > 0:
            companions.append(Companion("replay", indices, batch * r / (1 - r), "main"))
    jobs = []
    own = cfg.data.concepts
    total = sum(c.repeats * c.sampling_weight for c in own)
    for i, concept in enumerate(own):
        if not (concept.class_prompt or concept.class_dir):
            continue
        folder, missing = class_folder(cfg, concept, i)
        if missing:
            jobs.append((folder, concept.class_prompt, concept.class_images))
        concepts.append(ConceptConfig(dir=str(folder), prompt=concept.class_prompt or "", loss_weight=concept.prior_loss_weight))
        share = concept.repeats * concept.sampling_weight / total
        companions.append(Companion(f"class images of concept {i}", (len(concepts) - 1,), batch * share, "prior"))
    if jobs:
        generate_class_images(cfg, family_cls, jobs, log)
    return concepts, companions


class MixedPlan:
    """Batch ``k`` = the own plan's batch ``k`` + each companion's samples for batch k (see `Companion`).
    Each companion is a stream of its items, shuffled per pass with its own seed."""

    def __init__(self, main: Any, own: list[int], streams: list[tuple[Companion, Any, list[int]]]):
        self.main, self.own, self.streams = main, own, streams
        self.batches_per_epoch = main.batches_per_epoch
        self.batch_size = main.batch_size

    def batch(self, k: int) -> tuple[int, list[int]]:
        epoch, local = self.main.batch(k)
        indices = [self.own[i] for i in local]
        for companion, stream, members in self.streams:
            start, stop = math.floor(k * companion.rate), math.floor((k + 1) * companion.rate)
            indices += [members[stream.batch(j)[1][0]] for j in range(start, stop)]
        return epoch, indices


def loss_weights(concepts: list[ConceptConfig], groups: dict[int, str], concept_of: list[int]) -> list[float]:
    """Each sample's weight in the loss (see the module docstring); `concept_of`: the batch's concepts."""
    counts: dict[str, int] = {}
    for c in concept_of:
        counts[groups.get(c, "main")] = counts.get(groups.get(c, "main"), 0) + 1
    return [concepts[c].loss_weight / counts[groups.get(c, "main")] for c in concept_of]
