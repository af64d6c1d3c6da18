"""Shared fixtures: tiny pipelines built once per session, image folders, a config builder."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

# one thread: tiny models gain nothing from more, and parallel test runs on 2 cores would oversubscribe
torch.set_num_threads(1)


def pytest_configure(config):
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    config.addinivalue_line("markers", "long(minutes): a test of a minute or more, started first (see below)")


def pytest_collection_modifyitems(config, items):
    """Start the long tests first, spread over the workers. `make test` runs two pytest-xdist workers
    with ``--dist worksteal``, which hands each worker a contiguous share of this list (then an idle
    worker steals from the end of a busy one's queue, never the test it is running). So the long tests
    are dealt out, longest first, each to the share with the fewest long minutes so far, and each share
    starts with its own: with them all at the front of the list, one worker ran every learning test
    back to back (22 minutes, against 15 for the rest)."""
    def minutes(item) -> float:
        marker = item.get_closest_marker("long")
        return marker.kwargs.get("minutes", 1) if marker else 0

    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    sizes, left = [], len(items)
    for k in range(workers):  # the share sizes worksteal hands out
        sizes.append(left // (workers - k))
        left -= sizes[-1]
    heads = [[] for _ in range(workers)]
    for item in sorted((i for i in items if minutes(i)), key=minutes, reverse=True):
        min(heads, key=lambda head: sum(map(minutes, head))).append(item)
    rest = [i for i in items if not minutes(i)]
    ordered = []
    for head, size in zip(heads, sizes):
        take = max(0, size - len(head))
        ordered += head + rest[:take]
        rest = rest[take:]
    items[:] = ordered + rest


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    from difftune.tiny import make_tiny

    return make_tiny("sd", tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    from difftune.tiny import make_tiny

    return make_tiny("flux", tmp_path_factory.mktemp("tiny") / "flux")


@pytest.fixture(scope="session")
def foreign_sd(tmp_path_factory) -> Path:
    from foreign import make_foreign_sd

    return make_foreign_sd(tmp_path_factory.mktemp("foreign") / "sd")


def make_images(folder: Path, n: int = 4, size: int = 64, seed: int = 0, caption: str | None = None,
                color=(255, 140, 0)) -> Path:
    """`n` PNGs of a coloured disc on a teal ground (optionally with sidecar captions)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        image = Image.new("RGB", (size + 8 * (i % 2), size), (0, 128, 128))
        draw = ImageDraw.Draw(image)
        r = rng.randint(size // 5, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
        image.save(folder / f"img-{i:02d}.png")
        if caption is not None:
            (folder / f"img-{i:02d}.txt").write_text(caption, encoding="utf-8")
    return folder


@pytest.fixture
def images(tmp_path) -> Path:
    return make_images(tmp_path / "images", caption="a photo of sks disc")


def base_overrides(model: Path, data: Path, out: Path, steps: int = 4, **extra) -> list[str]:
    """Overrides for a small, fast, CPU run (fp32, no checkpoints unless asked)."""
    items = {
        "model.path": str(model),
        "data.concepts": f"[{{dir: '{data}', prompt: 'a photo of sks disc'}}]",
        "data.resolution": 64,
        "train.steps": steps,
        "train.batch_size": 2,
        "train.lr": "1e-3",
        "train.precision": "no",
        "checkpoint.every": 0,
        "output_dir": str(out),
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]
