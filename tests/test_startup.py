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


def test_saving_a_text_encoder_does_not_import_deepspeed(tmp_path):
    """accelerate imports DeepSpeed (2-3 s) in every save_pretrained of a transformers model when it is
    installed; difftune makes it ask only once DeepSpeed is loaded (difftune.util.imports)."""
    import subprocess
    import sys

    code = f"""
import sys, difftune
from transformers import CLIPTextConfig, CLIPTextModel
from accelerate.utils.other import extract_model_from_parallel
CLIPTextModel(CLIPTextConfig(vocab_size=99, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
              num_attention_heads=2)).save_pretrained({str(tmp_path / 'te')!r})
print("deepspeed" in sys.modules)
try:
    import deepspeed
except ImportError:
    print("absent")
else:
    from accelerate.utils import other
    print(other.is_deepspeed_available())
"""
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           check=True).stdout.splitlines()
    assert lines[0] == "False" and (tmp_path / "te" / "model.safetensors").is_file()
    assert lines[-1] in ("True", "absent")  # once loaded, accelerate sees DeepSpeed again
