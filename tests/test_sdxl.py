"""What is special to SDXL (the family x method invariants are in tests/contract): its conditioning
follows StableDiffusionXLPipeline, its kohya files load in diffusers, a config trains end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import base_overrides, make_images

from difftune.cli import main
from difftune.config import load_config
from difftune.export import export_lora, read_file
from difftune.tiny import make_tiny
from difftune.train import train

PROMPT = "a photo of sks dog"
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> Path:
    return make_tiny("sdxl", tmp_path_factory.mktemp("tiny-sdxl"))


def sdxl_pipe(path, lora=None):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe


def images(pipe):
    return pipe(PROMPT, height=64, width=64, num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_conditioning_matches_the_pipeline(tiny_sdxl, tmp_path):
    from difftune.families.registry import get_family

    cfg = load_config(None, [f"model.path={tiny_sdxl}", "train.precision=no", f"output_dir={tmp_path}"])
    family = get_family("sdxl")(cfg, torch.device("cpu"), torch.float32)
    family.load()
    pipe = family.build_pipeline()
    with torch.no_grad():
        mine = family.encode_prompts([PROMPT])
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
        time_ids = family.encode_images(torch.zeros(1, 3, 64, 48))["time_ids"]
    torch.testing.assert_close(mine["encoder_hidden_states"], embeds)
    torch.testing.assert_close(mine["text_embeds"], pooled)
    expected = pipe._get_add_time_ids((64, 48), (0, 0), (64, 48), torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(time_ids, expected)


def test_kohya_file_gives_the_same_images_in_diffusers(tiny_sdxl, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = sdxl_pipe(tiny_sdxl)
    kwargs = {}
    for i, (part, targets) in enumerate([("unet", ["to_q", "to_k", "to_v", "to_out.0"]),
                                         ("text_encoder", CLIP_TARGETS), ("text_encoder_2", CLIP_TARGETS)]):
        torch.manual_seed(i)
        module = getattr(pipe, part)
        module.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
        kwargs[f"{part}_lora_layers"] = get_peft_model_state_dict(module)
        kwargs[f"{part}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    type(pipe).save_lora_weights(str(tmp_path / "orig"), **kwargs)
    original = tmp_path / "orig" / "pytorch_lora_weights.safetensors"

    kohya = tmp_path / "dog.safetensors"
    assert main(["export", str(original), "--format", "kohya", "--family", "sdxl", "--out", str(kohya)]) == 0
    tensors, _ = read_file(kohya)
    prefixes = {k.split("_", 2)[0] + "_" + k.split("_", 2)[1] for k in tensors}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors

    a, b = images(sdxl_pipe(tiny_sdxl, original)), images(sdxl_pipe(tiny_sdxl, kohya))
    assert np.abs(a - images(sdxl_pipe(tiny_sdxl))).max() > 1e-2
    np.testing.assert_allclose(b, a, atol=1e-5)
    back = export_lora(kohya, "diffusers", tmp_path / "back.safetensors", family="sdxl")
    np.testing.assert_allclose(images(sdxl_pipe(tiny_sdxl, back)), a, atol=1e-5)


def test_auto_detected_lora_run_with_text_encoders_loads_in_the_pipeline(tiny_sdxl, tmp_path):
    data = make_images(tmp_path / "data", n=2, caption=PROMPT)
    out = tmp_path / "run"
    cfg = load_config(None, base_overrides(tiny_sdxl, data, out, steps=2, **{
        "method.train_text_encoder": True, "train.lr": 1e-2, "checkpoint.every": 0}))
    train(cfg, log=lambda *_: None)
    before = images(sdxl_pipe(tiny_sdxl))
    pipe = sdxl_pipe(tiny_sdxl, out)
    assert all(getattr(getattr(pipe, n), "peft_config", None) for n in ("unet", "text_encoder", "text_encoder_2"))
    assert np.abs(images(pipe) - before).max() > 1e-3
