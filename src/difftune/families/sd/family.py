"""Stable Diffusion 1.x / 2.x: UNet over VAE latents, conditioned on CLIP text hidden states.

Conventions: latents = VAE posterior mean * ``vae.config.scaling_factor`` (0.18215 for SD 1.x),
``[B, 4, H/8, W/8]`` for the real models; timesteps are integers in [0, 1000); the prediction type
(epsilon for SD 1.x, v_prediction for SD 2.x 768) comes from the scheduler config unless
``objective.prediction_type`` overrides it.
"""

from __future__ import annotations

from typing import Any

from ...objectives.ddpm import DDPMObjective
from ..base import Family

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]


class StableDiffusion(Family):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    denoiser = "unet"
    text_encoders = ("text_encoder",)
    lora_targets = {"unet": ATTENTION, "text_encoder": CLIP_ATTENTION}
    default_guidance = 7.5
    task_pipelines = {
        "text2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
        "inpaint": "StableDiffusionInpaintPipeline", "controlnet": "StableDiffusionControlNetPipeline",
        "controlnet-img2img": "StableDiffusionControlNetImg2ImgPipeline",
        "controlnet-inpaint": "StableDiffusionControlNetInpaintPipeline",
    }
    controlnet_class = "ControlNetModel"
    schedulers = ("unipc", "euler", "euler-a", "dpm++", "ddim")
    single_file_format = "ldm"  # the original CompVis names (ComfyUI, A1111): single_file.py

    @classmethod
    def pipeline_multiple(cls, vae_factor: int) -> int:
        """StableDiffusionPipeline.check_inputs refuses sides that are not multiples of 8, whatever the VAE."""
        return 8

    def encode_images(self, pixels):
        vae = self.parts["vae"]
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
        return {"x0": latents * vae.config.scaling_factor}

    def encode_prompts(self, prompts: list[str]):
        tokenizer, text_encoder = self.parts["tokenizer"], self.parts["text_encoder"]
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(text_encoder.device)
        return {"encoder_hidden_states": text_encoder(ids)[0]}

    def make_objective(self) -> Any:
        o = self.cfg.objective
        sched = dict(self.parts["scheduler"].config)
        return DDPMObjective(
            sched,
            o.prediction_type or sched.get("prediction_type", "epsilon"),
            o.min_snr_gamma,
            o.timestep_sampling,
            o.logit_mean,
            o.logit_std,
            o.mode_scale,
        )

    def predict(self, x_t, t, features):
        unet = self.parts["unet"]
        hidden = features["encoder_hidden_states"]
        return unet(x_t, t, encoder_hidden_states=hidden.to(x_t.dtype)).sample

    @classmethod
    def save_single_file(cls, pipe, file):
        from .single_file import save

        return save(pipe, file)
