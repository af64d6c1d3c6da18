"""Start-up costs removed (BENCHMARKS.md section 4): what made them unnecessary stays true."""

from __future__ import annotations

import gc
import weakref

import torch

from difftune.config import load_config


def test_flux_t5_is_freed_without_a_garbage_collection(tiny_flux, tmp_path):
    from difftune.families.flux.family import T5, Flux

    cfg = load_config(None, [f"model.path={tiny_flux}", f"output_dir={tmp_path}", "train.precision=no"])
    family = Flux(cfg, torch.device("cpu"), torch.float32)
    family.load()
    t5 = weakref.ref(family.parts[T5])
    family.encode_prompts(["a photo of sks disc"])
    gc.disable()
    try:
        family.after_prompt_cache()
        assert t5() is None  # freed by reference counting alone: nothing else holds T5
    finally:
        gc.enable()
    assert family.parts[T5] is None
