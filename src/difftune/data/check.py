"""`difftune data check`: what training would see, before any model is loaded.

For each concept: how many images were found and are usable, which files are skipped and why,
how many images have their own caption, their sizes (and how many would be upscaled), then an
aspect-ratio histogram of all usable images and, with ``data.buckets: true``, how they fall into
buckets. The same code as training finds, decodes and checks the images, so what it reports is
what `difftune train` will use.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import DifftuneError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..config import DataConfig

EXAMPLES = """examples:
  difftune data check data/stalenhag                  # an image folder (sidecar .txt or metadata captions)
  difftune data check data/pokemon.parquet            # a local Hugging Face dataset file
  difftune data check data/stalenhag data.resolution=768 data.buckets=true   # overrides apply to a folder too
  difftune data check configs/sd15-dreambooth-lora.yaml    # every concept of a config, as train sees them
  difftune data check configs/sd15-dreambooth-lora.yaml data.buckets=true data.resolution=768

Exit codes: 0 when usable images remain (problems are listed), 2 when none is usable or the input is bad.
"""

#: aspect-ratio (width / height) histogram bins: (upper bound, label); the last bin is open
ASPECT_BINS = (
    (1 / 2 + 1e-9, "1:2 or taller"),
    (2 / 3, "1:2 .. 2:3"),
    (4 / 5, "2:3 .. 4:5"),
    (5 / 4 + 1e-9, "4:5 .. 5:4"),
    (3 / 2 + 1e-9, "5:4 .. 3:2"),
    (2 + 1e-9, "3:2 .. 2:1"),
    (float("inf"), "wider than 2:1"),
)
#: the side multiple assumed when no model is known (the usual VAE factor)
DEFAULT_MULTIPLE = 8


@dataclass
class Report:
    """The printable report and the number of usable images."""

    lines: list[str]
    usable: int
    skipped: int = 0

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def aspect_histogram(sizes: list[tuple[int, int]], width: int = 30) -> list[str]:
    """One line per `ASPECT_BINS` bin: label, a bar and the count (``sizes`` are (width, height))."""
    counts = [0] * len(ASPECT_BINS)
    for w, h in sizes:
        counts[next(i for i, (upper, _) in enumerate(ASPECT_BINS) if w / h <= upper)] += 1
    top = max(counts) or 1
    label_width = max(len(label) for _, label in ASPECT_BINS)
    return [f"  {label:<{label_width}}  {'#' * round(width * n / top):<{width}}  {n}"
            for (_, label), n in zip(ASPECT_BINS, counts)]


def check(data: "DataConfig", multiple: int) -> Report:
    """Scan the concepts of `data` and describe them (see the module docstring)."""
    from .buckets import cover_size, make_buckets, nearest_bucket
    from .dataset import describe_problem, prompt_for, scan_items

    items, skipped = scan_items(data)
    side = data.resolution // multiple * multiple
    buckets = make_buckets(data.resolution, multiple) if data.buckets else [(side, side)]
    lines: list[str] = []
    for i, concept in enumerate(data.concepts):
        mine = [item for item in items if item.concept == i]
        bad = [(item, problem) for item, problem in skipped if item.concept == i]
        source = (f"{concept.dir} (folder)" if concept.dir
                  else f"{concept.hf} (Hugging Face dataset, split {concept.split})")
        lines.append(f"concept {i}: {source}")
        lines.append(f"  images: {len(mine) + len(bad)} found, {len(mine)} usable, {len(bad)} skipped")
        captioned = sum(1 for item in mine if item.caption)
        rest = len(mine) - captioned
        fallback = f"the concept prompt {concept.prompt!r}" if concept.prompt else "an EMPTY prompt (set prompt:)"
        lines.append(f"  captions: {captioned} own" + (f", {rest} use {fallback}" if rest else ""))
        if mine:
            lines.append(f"  example prompt: {prompt_for(mine[0], concept)!r}")
            sizes = [item.size for item in mine if item.size]
            widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
            upscaled = sum(1 for size in sizes
                           if cover_size(size, buckets[nearest_bucket(size, buckets)])[0] > size[0])
            lines.append(
                f"  sizes: {min(widths)}..{max(widths)} x {min(heights)}..{max(heights)} px "
                f"(median {statistics.median_low(widths)} x {statistics.median_low(heights)})"
                + (f"; {upscaled} smaller than the training size (upscaled, may look soft)" if upscaled else "")
            )
        for item, problem in bad:
            lines.append(f"  skipped: {describe_problem(item, problem)}")
    sizes = [item.size for item in items if item.size]
    lines.append(f"aspect ratios (width:height) of the {len(sizes)} usable images:")
    lines += aspect_histogram(sizes)
    if data.buckets and sizes:
        counts: dict[tuple[int, int], int] = {}
        for size in sizes:
            bucket = buckets[nearest_bucket(size, buckets)]
            counts[bucket] = counts.get(bucket, 0) + 1
        lines.append(f"buckets at resolution {data.resolution} (sides multiples of {multiple}):")
        lines += [f"  {w}x{h}: {counts[(w, h)]}" for w, h in buckets if (w, h) in counts]
    lines.append(f"total: {len(items)} usable images in {len(data.concepts)} concept(s), {len(skipped)} skipped")
    return Report(lines, len(items), len(skipped))


def _target(target: str, overrides: list[str], multiple_for=None) -> tuple["DataConfig", int | None]:
    """The data section to check (overrides applied, unknown keys refused) and the model's side
    multiple when the model is a local folder (a config's, or ``model.path=DIR`` given with a folder):
    `multiple_for(model config)` tells it (the command passes the family registry's; None without one).
    The data is checked as `difftune train` checks it; other sections need not be complete."""
    from ..config import ConfigError, data_problems, load_config
    from .hf import FILE_BUILDERS

    path = Path(target)
    if path.is_dir() or (path.is_file() and path.suffix.lower() in FILE_BUILDERS):
        source = "dir" if path.is_dir() else "hf"
        cfg = load_config(None, overrides, base={"data": {"concepts": [{source: target}]}})
    elif path.is_file():
        cfg = load_config(path, overrides)
    else:
        raise DifftuneError(f"{target}: no such folder, dataset file or config file")
    multiple = multiple_for(cfg.model) if multiple_for else None
    problems = data_problems(cfg.data, resolution_multiple=multiple)
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg.data, multiple


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["check"],
                        help="check: counts, sizes, aspect ratios, captions and problems per file")
    parser.add_argument("target", metavar="CONFIG_OR_DIR",
                        help="an image folder, a local dataset file (.parquet, .arrow, ...) or a YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="override config values")


def no_images_message(data: "DataConfig", skipped: int) -> str:
    """Why training would have nothing to learn from: no image files at all, or only broken ones."""
    from .images import IMAGE_EXTENSIONS

    where = ", ".join(c.dir or c.hf or "?" for c in data.concepts)
    if not skipped:
        return f"no images found in {where} (looked for {' '.join(sorted(IMAGE_EXTENSIONS))}, in subfolders too)"
    return f"no usable images in {where}: all {skipped} image files were skipped (reasons above)"


def run(args: argparse.Namespace, multiple_for=None) -> int:
    data, multiple = _target(args.target, args.overrides, multiple_for)
    report = check(data, multiple or DEFAULT_MULTIPLE)
    print(report.text)
    if multiple is None:
        print(f"(bucket and upscale figures assume sides in multiples of {DEFAULT_MULTIPLE}; "
              "check a config with a local model.path for that model's)")
    if not report.usable:
        raise DifftuneError(no_images_message(data, report.skipped))
    return 0
