"""Concepts from Hugging Face datasets: a hub id, or a local parquet / arrow / csv / json file, a
folder that ``datasets.load_dataset`` understands (parquet shards, an imagefolder with
``metadata.jsonl``), or a ``save_to_disk`` folder.

Rows become ordinary `Item`s with a file path, so checking, augmentation and the feature caches
work the same as for image folders and nothing of the dataset stays in memory during training:

- an image stored as a file path (imagefolder, or a string column) is used in place;
- an image stored as bytes (parquet and arrow datasets such as ``lambdalabs/pokemon-blip-captions``)
  is written once, as it is, to ``difftune-images/NAME-KEY/ROW.EXT`` under ``data.cache_dir`` (or,
  without one, under the ``datasets`` cache, so every run on that dataset shares the files). KEY
  changes with the dataset's fingerprint, split and columns; a folder whose ``items.json`` exists
  is complete and reused without reading the dataset's images again.

Broken rows (bytes that are not an image, no image at all) still become files, so that the usual
check names them, together with the dataset row they came from.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from .. import DifftuneError
from ..config import ConceptConfig
from ..util.atomic import atomic_write_bytes
from .items import Item
from .images import sniff_image_bytes

#: file suffix -> ``datasets`` builder for a single local data file
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
#: bump when the way rows become files changes, so old folders are not reused
LAYOUT_VERSION = 1


def hf_items(concept: ConceptConfig, index: int, cache_dir: str | None) -> list[Item]:
    """The rows of `concept.hf` (split `concept.split`) as items: image file and caption each."""
    import datasets

    where = f"data.concepts[{index}]"
    dataset, base = _load(concept, where, cache_dir)
    columns = list(dataset.column_names)
    if concept.image_column not in columns:
        raise DifftuneError(f"{where}.image_column: {concept.hf} has no column {concept.image_column!r} "
                            f"(columns: {', '.join(columns)})")
    if concept.caption_column and concept.caption_column not in columns:
        raise DifftuneError(f"{where}.caption_column: {concept.hf} has no column {concept.caption_column!r} "
                            f"(columns: {', '.join(columns)}); set caption_column: '' to use the concept prompt")
    feature = dataset.features[concept.image_column]
    if isinstance(feature, datasets.Image):
        dataset = dataset.cast_column(concept.image_column, datasets.Image(decode=False))
    elif getattr(feature, "dtype", None) not in ("binary", "large_binary", "string", "large_string"):
        raise DifftuneError(f"{where}.image_column: column {concept.image_column!r} of {concept.hf} holds "
                            f"{feature}, not images, bytes or file paths")

    root = Path(cache_dir) if cache_dir else Path(datasets.config.HF_DATASETS_CACHE)
    # the dataset's fingerprint changes with its files (local) or its revision (hub)
    key = hashlib.sha256(json.dumps([
        LAYOUT_VERSION, concept.hf, concept.split, concept.image_column, concept.caption_column, dataset._fingerprint,
    ]).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(concept.hf or "").name or "dataset")[:40]
    folder = root / "difftune-images" / f"{slug}-{key}"
    manifest = folder / "items.json"
    rows = _read_manifest(manifest)
    if rows is None:
        rows = _materialise(dataset, concept, folder, base)
        atomic_write_bytes(manifest, json.dumps(rows, ensure_ascii=False).encode())
    origin = f"from {concept.hf}, split {concept.split}, row"
    return [Item(path, caption, index, origin=f"{origin} {row}") for path, caption, row in rows]


def _load(concept: ConceptConfig, where: str, cache_dir: str | None) -> tuple[Any, Path | None]:
    """(the split as a ``datasets.Dataset``, the local folder relative image paths start from)."""
    import datasets

    name = concept.hf or ""
    local = Path(name).expanduser()
    arrow_cache = str(Path(cache_dir) / "hf-datasets") if cache_dir else None
    try:
        if local.is_file():
            builder = FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise DifftuneError(f"{where}.hf: {name}: unsupported file type "
                                    f"(use one of {', '.join(FILE_BUILDERS)})")
            return datasets.load_dataset(builder, data_files={concept.split: str(local)}, split=concept.split,
                                         cache_dir=arrow_cache), local.parent
        if local.is_dir() and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
            saved = datasets.load_from_disk(str(local))
            if isinstance(saved, datasets.DatasetDict):
                if concept.split not in saved:
                    raise DifftuneError(f"{where}.split: {name} has no split {concept.split!r} "
                                        f"(splits: {', '.join(saved)})")
                saved = saved[concept.split]
            return saved, local
        if local.is_dir():
            return datasets.load_dataset(str(local), split=concept.split, cache_dir=arrow_cache), local
        if name.startswith((".", "/", "~")) or local.suffix.lower() in FILE_BUILDERS or name.count("/") > 1:
            raise DifftuneError(f"{where}.hf: no such file or folder: {name}")
        return datasets.load_dataset(name, split=concept.split, cache_dir=arrow_cache), None
    except DifftuneError:
        raise
    except ConnectionError as e:  # the hub cannot be reached (offline, or HF_HUB_OFFLINE=1)
        raise DifftuneError(
            f"{where}.hf: cannot reach {name!r} on the Hugging Face hub ({_first_line(e)}); load it once while "
            "online so it is cached, or point hf at a local parquet/arrow file or folder"
        ) from None
    except Exception as e:  # unknown split, bad file, missing repo: say which and why in one line
        raise DifftuneError(f"{where}.hf: cannot load {name!r} split {concept.split!r}: "
                            f"{type(e).__name__}: {_first_line(e)}") from None


def _materialise(dataset: Any, concept: ConceptConfig, folder: Path, base: Path | None) -> list[list]:
    """Write each row's image bytes to `folder` (paths are used in place); ``[[path, caption, row]]``."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    columns = [concept.image_column] + ([concept.caption_column] if concept.caption_column else [])
    rows: list[list] = []
    progress = tqdm(total=len(dataset), desc=f"reading {concept.hf}", unit="img", disable=None, leave=False)
    for chunk in dataset.select_columns(columns).iter(batch_size=64):
        images = chunk[concept.image_column]
        captions = chunk[concept.caption_column] if concept.caption_column else [None] * len(images)
        for value, caption in zip(images, captions):
            row = len(rows)
            rows.append([_image_file(value, folder, row, base), _caption(caption), row])
            progress.update(1)
    progress.close()
    return rows


def _image_file(value: Any, folder: Path, row: int, base: Path | None) -> str:
    """A file holding the row's image: its own file if it names an existing one, else its bytes
    written to `folder` (empty when the row has no image, which the image check then reports)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, path = bytes(value), None
    else:
        data, path = None, value
    if not data and path:
        candidate = Path(path) if Path(path).is_absolute() or base is None else base / path
        if candidate.is_file():
            return str(candidate)
    fmt = sniff_image_bytes(data or b"")
    suffix = {"jpeg": "jpg"}.get(fmt, fmt) if fmt else "bin"
    target = folder / f"{row:06d}.{suffix}"
    if not target.is_file():
        atomic_write_bytes(target, data or b"")
    return str(target)


def _caption(value: Any) -> str | None:
    """A row's caption as text (the first of a list of captions); None when there is none."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    text = "" if value is None else str(value).strip()
    return text or None


def _read_manifest(path: Path) -> list[list] | None:
    """The rows of a finished folder, or None when it is missing or unreadable (then redone)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(rows, list) and all(isinstance(r, list) and len(r) == 3 for r in rows)
    return rows if ok else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
