"""On-disk caches of image features (VAE latents and any image conditioning) and prompt embeddings.

Why: the frozen encoders turn the same image (with the same augmentation) and the same prompt into
the same features every epoch and every run. Encoding them once, before the first step, and
reading them back afterwards is what makes training fast, and a rerun (or a resume) skips the
encoders entirely.

Layout: ``CACHE_DIR/images/KE/KEY.safetensors`` and ``CACHE_DIR/prompts/KE/KEY.safetensors``, one
file per image view or prompt holding that family's feature dict (first dimension 1 for images,
none for prompts), stored exactly as the encoder returned it (same dtype, so reading it back is
bit-identical to encoding again). The safetensors header records what the file was made from.

Keys are SHA-256 hashes of everything the features depend on, so that a change invalidates only
what it touches:

- images: the file's content hash, the resize size, crop box and flip of the view (`View`), and
  the image side of the family's `feature_identity` (family, weight dtype, model path, the files of
  the autoencoder part);
- prompts: the prompt text and the text side of `feature_identity` (text encoders and tokenizers).

Changing ``data.resolution`` therefore misses every image entry but hits every prompt; editing one
caption re-encodes that one prompt. Entries are never deleted automatically: delete the folder to
reclaim the space.

Writes go to a temporary file renamed into place, so a killed run never leaves half a file; a file
that does not read back (disk trouble, a hand edit) is recomputed with a note, not a crash.
Image features are only cached for views that repeat: centre crops (one view per image, two with
``random_flip``). Random crops give a new view every epoch, so caching them would grow the cache by
one entry per image per epoch; they are encoded on the fly instead.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..util.atomic import atomic_write, file_sha256

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .dataset import TrainingData, View

#: bump when what a cache entry means changes (preprocessing, layout), so old entries are not used
FORMAT_VERSION = 1


def cache_key(*parts: Any) -> str:
    """SHA-256 (hex) of `parts` as canonical JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def part_fingerprint(model_path: str, part: str, revision: str | None = None) -> dict[str, Any]:
    """The on-disk identity of one pipeline part: file name -> [stored name, size, mtime] for every
    file in its folder. For a hub download the stored name is the blob's content hash; for a local
    folder it is the file's own name, and rewriting a file changes its mtime. Reading only file
    metadata keeps this instant even for multi-GB text encoders."""
    local = Path(model_path)
    if local.is_dir():
        folder = local / part
    else:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(model_path, revision=revision, allow_patterns=[f"{part}/*"],
                                            local_files_only=True)) / part
        except Exception:  # not in the local hub cache: the path and revision are all we know
            return {"unresolved": f"{model_path}@{revision}"}
    files: dict[str, Any] = {}
    for f in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if f.is_file():
            real = f.resolve()
            stat = real.stat()
            files[f.relative_to(folder).as_posix()] = [real.name, stat.st_size, stat.st_mtime_ns]
    return files


class FeatureStore:
    """A folder of feature dicts, one safetensors file per key."""

    def __init__(self, folder: str | Path, log: Callable[[str], None] = print):
        self.folder = Path(folder)
        self.log = log

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> dict[str, Any] | None:
        """The tensors stored under `key` (on the CPU), or None if absent or unreadable."""
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))
        except Exception as e:  # truncated or garbled file: recompute rather than fail the run
            self.log(f"cache file {path} is unreadable ({type(e).__name__}); recomputing it")
            return None

    def save(self, key: str, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
        from safetensors.torch import save_file

        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        # never an empty header: safetensors writes an unreadable file for no tensors and metadata={}
        header = {"difftune_cache": str(FORMAT_VERSION), **metadata}
        atomic_write(self.path(key), lambda tmp: save_file(cpu, str(tmp), metadata=header))


class PromptFeatures:
    """Prompt embeddings of a frozen text side, each prompt encoded once (per cache, ever).

    `table(prompts)` gives prompt -> feature dict without the batch dimension, on the family's device.
    """

    def __init__(self, family: Any, store: FeatureStore | None):
        self.family = family
        self.store = store
        self.identity = family.feature_identity("prompts") if store is not None else None
        self.encoded = 0
        self.loaded = 0

    def table(self, prompts: list[str]) -> dict[str, dict[str, Any]]:
        import torch

        out = {}
        device = self.family.device
        for prompt in prompts:
            key = cache_key(FORMAT_VERSION, "prompt", self.identity, prompt) if self.store is not None else ""
            features = self.store.load(key) if self.store is not None else None
            if features is not None:
                self.loaded += 1
                out[prompt] = {k: v.to(device) for k, v in features.items()}
                continue
            with torch.no_grad():
                features = {k: v[0] for k, v in self.family.encode_prompts([prompt]).items()}
            self.encoded += 1
            if self.store is not None:
                self.store.save(key, features, {"prompt": prompt})
            out[prompt] = features
        return out


class ImageFeatures:
    """Image features (``family.encode_images``) of views, from the cache or encoded now.

    Every view is encoded on its own (batch of one), cached or not, so features depend only on the
    image and its view: caching on or off, resumed or not, a batch gets the same numbers. `store` is
    None to cache nothing (``data.cache: false``, or random crops). `autocast` is the mixed-precision
    context the encoder runs in (the same during the precompute and the training step).
    """

    def __init__(self, family: Any, data: "TrainingData", store: FeatureStore | None,
                 autocast: Callable[[], Any]):
        self.family = family
        self.data = data
        self.store = store
        self.autocast = autocast
        self.identity = family.feature_identity("images") if store is not None else None
        self._hashes: dict[int, str] = {}
        self.encoded = 0
        self.loaded = 0

    def key(self, view: "View") -> str:
        index = view.index
        if index not in self._hashes:
            self._hashes[index] = file_sha256(self.data.items[index].path)
        return cache_key(FORMAT_VERSION, "image", self.identity, self._hashes[index], view.resized, view.box, view.flip)

    def _encode(self, view: "View") -> dict[str, Any]:
        import torch

        pixels = self.data.pixels(view)[None].to(self.family.device)
        with torch.no_grad(), self.autocast():
            features = self.family.encode_images(pixels)
        self.encoded += 1
        return features

    def one(self, view: "View") -> dict[str, Any]:
        """Features of one view, first dimension 1, on the family's device."""
        if self.store is None:
            return self._encode(view)
        key = self.key(view)
        cached = self.store.load(key)
        if cached is not None:
            self.loaded += 1
            return {k: v.to(self.family.device) for k, v in cached.items()}
        features = self._encode(view)
        self.store.save(key, features, {"image": self.data.items[view.index].path, "view": json.dumps([
            view.resized, view.box, view.flip])})
        return features

    def __call__(self, views: list["View"]) -> dict[str, Any]:
        """Features of a batch of views (all of one size), batched on the first dimension."""
        import torch

        rows = [self.one(view) for view in views]
        return {k: torch.cat([row[k] for row in rows]) for k in rows[0]}

    def prepare(self, views: list["View"], rank: int = 0, world: int = 1, progress: bool = True) -> int:
        """Encode and store every view of `views` not yet in the cache (this process's share of
        them: every `world`-th from `rank`). Returns how many were encoded."""
        from tqdm.auto import tqdm

        if self.store is None:
            return 0
        todo = [view for view in views[rank::world] if not self.store.has(self.key(view))]
        before = self.encoded
        for view in tqdm(todo, desc="encoding images", unit="img", disable=None if progress and todo else True):  # None: a bar on a terminal only
            self.one(view)
        return self.encoded - before
