"""Atomic checkpoints, retention and resume.

Layout: ``OUTPUT_DIR/checkpoints/step-00000200/`` holding

- ``trainable.safetensors``: the trained weights (LoRA adapters in peft naming, or full parts),
  keys prefixed with the part name (``unet.``, ``text_encoder.``);
- ``optimizer.pt``: the optimizer state (tensors and numbers only; loaded with weights_only=True);
- or, from ``parallel.strategy: fsdp``, ``sharded/``: torch.distributed.checkpoint shards of both,
  one file per process, readable by any number of processes;
- ``rng/rank-R.safetensors`` and ``rng/rank-R.json``: each process's torch CPU and accelerator,
  python and numpy RNG states;
- ``state.json``: step, epoch, data position, lr scheduler, grad scaler;
- ``config.yaml``: the resolved config;
- ``COMPLETE.json``: written last, lists every file with its size and sha256.

A checkpoint is written into a hidden temporary folder beside its final place (by every process
when the weights are sharded), each file flushed to disk, the marker written last (with every file of
every process), then renamed into place. A checkpoint without a marker, or whose
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


def start_checkpoint(output_dir: str | Path, step: int, need_bytes: int) -> tuple[Path, Path]:
    """Make the empty temporary folder the checkpoint of `step` is written into; returns (temporary, final).

    Raises CheckpointError, before anything is written, if the disk has no room for about `need_bytes`.
    """
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}"
    free = shutil.disk_usage(root).free
    if free < need_bytes * 1.05:
        raise CheckpointError(
            f"not enough disk space for the checkpoint of step {step} in {root}: need about "
            f"{need_bytes / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free; earlier checkpoints are intact"
        )
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp, final


def write_failed(tmp: Path, step: int, root: Path, e: OSError) -> CheckpointError:
    """Remove a half-written checkpoint; the error to raise (disk full, I/O error)."""
    shutil.rmtree(tmp, ignore_errors=True)
    what = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else f"{type(e).__name__}: {e}"
    return CheckpointError(f"could not write the checkpoint of step {step} to {root}: {what}; earlier checkpoints are intact")


def seal_checkpoint(output_dir: str | Path, tmp: Path, final: Path, step: int, keep: int) -> Path:
    """Flush every file in `tmp` (sub-folders included, e.g. per-process shards), write the marker with
    their sizes and sha256 last, rename `tmp` to `final` atomically, then apply retention."""
    root = tmp.parent
    try:
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            fsync_file(f)
            files[f.relative_to(tmp).as_posix()] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
        for d in sorted(p for p in tmp.rglob("*") if p.is_dir()):
            fsync_dir(d)
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
        raise write_failed(tmp, step, root, e) from None
    apply_retention(output_dir, keep)
    return final


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
    """Write a complete one-process checkpoint for `step` atomically, then apply retention. Returns its path.

    On failure (full disk, I/O error) nothing of the new checkpoint remains, every earlier
    checkpoint is untouched, and a CheckpointError says what happened. (Runs with several processes
    write through `difftune.parallel`, which uses the same start / seal steps.)
    """
    import torch
    from safetensors.torch import save_file

    from .util.tensors import for_safetensors

    tmp, final = start_checkpoint(output_dir, step, _estimate_bytes(tensors, optimizer_state))
    try:
        save_file(for_safetensors(tensors), str(tmp / "trainable.safetensors"))
        write_rng(tmp, 0, rng_tensors, state.get("rng", {}))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        (tmp / "config.yaml").write_text(config_yaml)
    except OSError as e:
        raise write_failed(tmp, step, checkpoints_dir(output_dir), e) from None
    return seal_checkpoint(output_dir, tmp, final, step, keep)


def write_rng(folder: Path, rank: int, tensors: dict[str, Any], plain: dict) -> None:
    """One process's RNG states: ``rng/rank-R.safetensors`` (torch generators) and ``rng/rank-R.json``."""
    from safetensors.torch import save_file

    (folder / "rng").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "rng" / f"rank-{rank:05d}.safetensors"))
    (folder / "rng" / f"rank-{rank:05d}.json").write_text(json.dumps(plain))


def read_rng(folder: Path, rank: int) -> tuple[dict, dict] | None:
    """The RNG states process `rank` saved, or None if that process did not exist in the saving run."""
    from safetensors.torch import load_file

    f = folder / "rng" / f"rank-{rank:05d}.safetensors"
    if not f.is_file():
        return None
    return load_file(str(f)), json.loads(f.with_suffix(".json").read_text())


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
    """Read a verified one-process checkpoint: {"tensors", "optimizer", "rng", "state", "config_yaml"}
    ("rng": process 0's (tensors, plain) states)."""
    import torch
    from safetensors.torch import load_file

    reason = verify(path)
    if reason:
        raise CheckpointError(f"checkpoint {path} cannot be used: {reason}")
    return {
        "tensors": load_file(str(path / "trainable.safetensors")),
        "rng": read_rng(path, 0),
        "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        "state": read_state(path)["state"],
        "config_yaml": (path / "config.yaml").read_text(),
    }


def read_state(path: Path, verify_files: bool = True) -> dict[str, Any]:
    """The small files of a checkpoint (weights are read by the strategy): {"state", "config_yaml"}.
    Raises CheckpointError if `path` is torn (checked unless `verify_files` is False: processes other than
    the writers trust the writers' check instead of hashing the same files again)."""
    reason = verify(path) if verify_files else None
    if reason:
        raise CheckpointError(f"checkpoint {path} cannot be used: {reason}")
    return {"state": json.loads((path / "state.json").read_text()), "config_yaml": (path / "config.yaml").read_text()}
