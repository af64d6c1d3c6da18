"""Tensor helpers shared by the checkpoint writers."""

from __future__ import annotations

from typing import Any


def for_safetensors(tensors: dict[str, Any]) -> dict[str, Any]:
    """Detached, contiguous CPU copies that safetensors can write: a tensor that shares memory with one
    listed before it (tied weights, e.g. T5's ``shared`` and ``encoder.embed_tokens``) is cloned, so
    both names are stored and a strict load finds both."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, value in tensors.items():
        t = value.detach().contiguous().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen:
            t = t.clone()
        else:
            seen.add(key)
        out[name] = t
    return out
