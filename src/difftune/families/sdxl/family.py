"""Stable Diffusion XL: a UNet over VAE latents conditioned on two CLIP text encoders, a pooled text
embedding and the size / crop "time ids".

Conventions (as ``StableDiffusionXLPipeline.encode_prompt`` and diffusers' SDXL training scripts):

- latents = VAE posterior mean * ``vae.config.scaling_factor`` (0.13025 for SDXL), ``[B, 4, H/8, W/8]``;
  timesteps are integers in [0, 1000) and the prediction type comes from the scheduler (epsilon for
  SDXL base) unless ``objective.prediction_type`` overrides it, as for SD 1.x.
- ``encoder_hidden_states`` ``[B, 77, 768 + 1280]``: the penultimate hidden states of ``text_encoder``
  (CLIP-L) and ``text_encoder_2`` (OpenCLIP bigG), concatenated on the last dimension;
  ``text_embeds`` ``[B, 1280]``: the projected pooled output of ``text_encoder_2``.
- ``time_ids`` ``[B, 6]``: (original height, original width, crop top, crop left, target height,
  target width) in pixels. difftune hands the denoiser the cropped, resized training view, so the
  original size is taken to be the view's size and the crop (0, 0), which is what the pipeline feeds
  at sampling time by default. Time ids are per-image features (cached with the latents).
- Both text encoders are trainable with ``method.train_text_encoder``, as in diffusers' SDXL LoRA script.
"""

from __future__ import annotations

from typing import Any

from ..sd.family import ATTENTION, CLIP_ATTENTION, StableDiffusion


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    denoiser = "unet"
    text_encoders = ("text_encoder", "text_encoder_2")
    lora_targets = {"unet": ATTENTION, "text_encoder": CLIP_ATTENTION, "text_encoder_2": CLIP_ATTENTION}
    default_guidance = 5.0
    task_pipelines = {
        "text2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
        "inpaint": "StableDiffusionXLInpaintPipeline", "controlnet": "StableDiffusionXLControlNetPipeline",
        "controlnet-img2img": "StableDiffusionXLControlNetImg2ImgPipeline",
        "controlnet-inpaint": "StableDiffusionXLControlNetInpaintPipeline",
    }
    single_file_format = None  # sd's single_file.py writes the SD 1.x/2.x layout only

    def encode_images(self, pixels):
        import torch

        features = super().encode_images(pixels)
        h, w = pixels.shape[-2:]
        time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32, device=pixels.device)
        features["time_ids"] = time_ids.expand(pixels.shape[0], 6).clone()
        return features

    def encode_prompts(self, prompts: list[str]):
        import torch

        hidden, pooled = [], None
        for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            tokenizer, encoder = self.parts[tok_name], self.parts[enc_name]
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected pooled output (text_embeds)
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def predict(self, x_t, t, features):
        unet = self.parts["unet"]
        added = {"text_embeds": features["text_embeds"].to(x_t.dtype), "time_ids": features["time_ids"].to(x_t.dtype)}
        hidden = features["encoder_hidden_states"].to(x_t.dtype)
        return unet(x_t, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample

    @classmethod
    def kohya_layout(cls) -> Any:
        from .kohya import layout

        return layout()
