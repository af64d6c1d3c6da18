"""Shared fixtures: tiny pipelines built once per session, image folders, a config builder."""

from __future__ import annotations

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
    config.addinivalue_line("markers", "long: a test of a minute or more, started first (see below)")


def pytest_collection_modifyitems(config, items):
    """Start the long tests first. `make test` runs two workers that split the suite and steal from each
    other; a 6-minute test collected last would otherwise run alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


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
