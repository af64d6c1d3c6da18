"""One way to write a file so that no reader ever sees half of it, and one file hash.

`atomic_write` writes through a temporary file beside the target (so the rename stays on one file
system), flushes it to disk and renames it into place; checkpoints, caches, samples, saved LoRAs and
downloaded data all use it. `file_sha256` is the content hash that checkpoints and caches record.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any, Callable


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], Any], durable: bool = False) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside `path`, then rename it to `path`.

    A failure leaves `path` as it was and no temporary file behind. `durable`: also flush the file
    and the rename to disk (for results that must survive a power cut, not for caches).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the suffix keeps the format for writers that read it from the name (PIL, safetensors need none)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(tmp)
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), durable)


def atomic_write_text(path: str | Path, text: str, durable: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable)


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
