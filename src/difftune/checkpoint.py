"""Atomic checkpoints, retention and resume.

Layout: ``OUTPUT_DIR/checkpoints/step-00000200/`` holding

- ``trainable.safetensors``: the trained weights (LoRA adapters in peft naming, or full parts),
  keys prefixed with the part name (``unet.``, ``text_encoder.``);
- ``optimizer.pt``: the optimizer state (tensors and numbers only; loaded with weights_only=True);
- ``rng.safetensors``: torch CPU and accelerator RNG states;
- ``state.json``: step, epoch, data position, lr scheduler, grad scaler, python/numpy RNG, losses;
- ``config.yaml``: the resolved config;
- ``COMPLETE.json``: written last, lists every file with its size and sha256.

A checkpoint is written into a hidden temporary folder beside its final place, each file flushed
to disk, the marker written last, then renamed into place. A checkpoint without a marker, or whose
files do not match it, is *torn* and is never used (nor counted by retention). Old checkpoints are
deleted only after the new one is complete, and the newest complete one is never deleted.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import DifftuneError
from .run_layout import RunLayout
from .util.atomic import file_sha256, fsync_dir, fsync_file

MARKER = "COMPLETE.json"
PREFIX = "step-"


class CheckpointError(DifftuneError):
    """A checkpoint could not be written or read."""


@dataclass
class Checkpoint:
    path: Path
    step: int


def checkpoints_dir(output_dir: str | Path) -> Path:
    return RunLayout(output_dir).checkpoints


def verify(path: Path) -> str | None:
    """None if `path` is a complete checkpoint, else why it is torn."""
    marker = path / MARKER
    if not marker.is_file():
        return "no completion marker (the save was interrupted)"
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, OSError) as e:
        return f"unreadable completion marker ({e})"
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != info["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, expected {info['bytes']} (truncated)"
        if file_sha256(f) != info["sha256"]:
            return f"{name} does not match its checksum (corrupted)"
    return None


def list_checkpoints(output_dir: str | Path) -> tuple[list[Checkpoint], list[tuple[Path, str]]]:
    """(complete checkpoints oldest first, torn ones with the reason)."""
    root = checkpoints_dir(output_dir)
    good: list[Checkpoint] = []
    torn: list[tuple[Path, str]] = []
    if not root.is_dir():
        return good, torn
    for path in sorted(root.iterdir()):
        if not path.is_dir() or not path.name.startswith(PREFIX):
            continue
        try:
            step = int(path.name[len(PREFIX):])
        except ValueError:
            continue
        reason = verify(path)
        if reason:
            torn.append((path, reason))
        else:
            good.append(Checkpoint(path, step))
    good.sort(key=lambda c: c.step)
    return good, torn


def _estimate_bytes(tensors: dict[str, Any], optimizer_state: Any) -> int:
    import torch

    total = sum(t.numel() * t.element_size() for t in tensors.values())

    def walk(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(walk(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v) for v in obj)
        return 0

    return total + walk(optimizer_state) + (1 << 20)


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    tensors: dict[str, Any],
    optimizer_state: dict,
    rng_tensors: dict[str, Any],
    state: dict,
    config_yaml: str,
    keep: int,
) -> Path:
    """Write a complete checkpoint for `step` atomically, then apply retention. Returns its path.

    On failure (full disk, I/O error) nothing of the new checkpoint remains, every earlier
    checkpoint is untouched, and a CheckpointError says what happened.
    """
    import torch
    from safetensors.torch import save_file

    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    need = _estimate_bytes(tensors, optimizer_state)
    free = shutil.disk_usage(root).free
    if free < need * 1.05:
        raise CheckpointError(
            f"not enough disk space for the checkpoint of step {step} in {root}: need about "
            f"{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free; earlier checkpoints are intact"
        )
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(contiguous, str(tmp / "trainable.safetensors"))
        save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / "rng.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        (tmp / "config.yaml").write_text(config_yaml)
        files = {}
        for f in sorted(tmp.iterdir()):
            fsync_file(f)
            files[f.name] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
        marker = tmp / MARKER
        marker.write_text(json.dumps({"step": step, "files": files}, indent=1))
        fsync_file(marker)
        fsync_dir(tmp)
        if final.exists():  # a rerun that saves the same step again: replace it only now
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        what = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else f"{type(e).__name__}: {e}"
        raise CheckpointError(
            f"could not write the checkpoint of step {step} to {root}: {what}; earlier checkpoints are intact"
        ) from None
    apply_retention(output_dir, keep)
    return final


def apply_retention(output_dir: str | Path, keep: int) -> None:
    """Delete the oldest complete checkpoints beyond `keep` (>= 1), and leftovers of failed saves."""
    good, torn = list_checkpoints(output_dir)
    for ckpt in good[: max(0, len(good) - max(1, keep))]:
        shutil.rmtree(ckpt.path, ignore_errors=True)
    newest = good[-1].step if good else -1
    for path, _ in torn:
        # a torn checkpoint older than the newest complete one can never be resumed from
        try:
            step = int(path.name[len(PREFIX):])
        except ValueError:
            continue
        if step < newest:
            shutil.rmtree(path, ignore_errors=True)
    for leftover in checkpoints_dir(output_dir).glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a verified checkpoint: {"tensors", "optimizer", "rng", "state", "config_yaml"}."""
    import torch
    from safetensors.torch import load_file

    reason = verify(path)
    if reason:
        raise CheckpointError(f"checkpoint {path} cannot be used: {reason}")
    return {
        "tensors": load_file(str(path / "trainable.safetensors")),
        "rng": load_file(str(path / "rng.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        "state": json.loads((path / "state.json").read_text()),
        "config_yaml": (path / "config.yaml").read_text(),
    }
