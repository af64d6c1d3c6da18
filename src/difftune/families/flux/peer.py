"""The FLUX baseline of `difftune bench --mode baseline / compare / baseline-e2e`: the per-step work of
diffusers' DreamBooth LoRA example for FLUX, re-created (see `DreamBoothLoraFlux`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class DreamBoothLoraFlux:
    """The per-step work of diffusers' ``examples/dreambooth/train_dreambooth_lora_flux.py``, re-created.

    Not the script itself (it is not installed and cannot be downloaded here): a faithful copy of what
    its training loop does per step with its defaults (no ``--cache_latents``, per-image captions so
    ``custom_instance_prompts`` is on, ``--weighting_scheme none``, ``--guidance_scale 3.5``,
    ``--max_sequence_length 512``): encode the captions with CLIP and T5, encode the pixels with the
    VAE (``latent_dist.sample()``), shift and scale, build the latent image ids, draw noise and
    ``compute_density_for_timestep_sampling`` timesteps, look the sigmas up one by one in a scheduler
    copy (``get_sigmas``), pack, run the transformer, unpack, weight the loss, backward, clip the
    gradients of all transformer parameters, AdamW step, lr-scheduler step, zero the gradients.
    LoRA on the same modules as difftune (the script's defaults name the same attention layers).
    Images come as ready pixel tensors (the script's dataset prepares them once up front).
    """

    #: the difftune method it is compared with
    method = "lora"

    def __init__(self, cfg: Any, device: Any, weight_dtype: Any):
        import copy

        import torch
        from accelerate import Accelerator
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from diffusers.optimization import get_scheduler
        from peft import LoraConfig
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        from .family import ATTENTION

        path = cfg.model.path
        self.device, self.weight_dtype, self.cfg = device, weight_dtype, cfg
        self.accelerator = Accelerator(mixed_precision=cfg.train.precision)
        self.tokenizer_one = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        self.tokenizer_two = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2")
        self.text_encoder_one = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
        self.text_encoder_two = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2")
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        self.transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer")
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        self.noise_scheduler_copy = copy.deepcopy(scheduler)
        for m in (self.transformer, self.vae, self.text_encoder_one, self.text_encoder_two):
            m.requires_grad_(False)
        self.vae.to(device, dtype=torch.float32)  # the script keeps the VAE in fp32
        for m in (self.transformer, self.text_encoder_one, self.text_encoder_two):
            m.to(device, dtype=weight_dtype)
        if cfg.train.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.transformer.add_adapter(LoraConfig(r=cfg.method.rank, lora_alpha=cfg.method.rank,
                                                init_lora_weights="gaussian", target_modules=ATTENTION))
        lora_params = [p for p in self.transformer.parameters() if p.requires_grad]
        for p in lora_params:
            p.data = p.data.to(torch.float32)  # cast_training_params
        self.n_trained = sum(p.numel() for p in lora_params)
        t = cfg.train
        optimizer = torch.optim.AdamW([{"params": lora_params, "lr": t.lr}], betas=(t.adam_beta1, t.adam_beta2),
                                      weight_decay=t.weight_decay, eps=t.adam_epsilon)
        self.lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                                          num_training_steps=max(t.steps, 1))
        self.transformer, self.optimizer = self.accelerator.prepare(self.transformer, optimizer)
        self.vae_shift = self.vae.config.shift_factor
        self.vae_scale = self.vae.config.scaling_factor
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode_prompt(self, prompts: list[str]) -> tuple[Any, Any, Any]:
        """The script's ``compute_text_embeddings``: CLIP pooled output, T5 hidden states, zero text ids."""
        import torch

        with torch.no_grad():
            ids = self.tokenizer_one(prompts, padding="max_length", max_length=77, truncation=True,
                                     return_overflowing_tokens=False, return_length=False, return_tensors="pt").input_ids
            pooled = self.text_encoder_one(ids.to(self.device), output_hidden_states=False).pooler_output
            pooled = pooled.to(dtype=self.text_encoder_one.dtype, device=self.device)
            ids = self.tokenizer_two(prompts, padding="max_length", max_length=512, truncation=True,
                                     return_length=False, return_overflowing_tokens=False, return_tensors="pt").input_ids
            embeds = self.text_encoder_two(ids.to(self.device))[0].to(dtype=self.text_encoder_two.dtype, device=self.device)
            text_ids = torch.zeros(embeds.shape[1], 3).to(device=self.device, dtype=self.text_encoder_one.dtype)
        return embeds, pooled, text_ids

    def get_sigmas(self, timesteps: Any, n_dim: int, dtype: Any) -> Any:
        sigmas = self.noise_scheduler_copy.sigmas.to(device=self.device, dtype=dtype)
        schedule_timesteps = self.noise_scheduler_copy.timesteps.to(self.device)
        timesteps = timesteps.to(self.device)
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    def step(self, pixel_values: Any, prompts: list[str]) -> float:
        import torch
        from diffusers import FluxPipeline
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        accelerator, transformer = self.accelerator, self.transformer
        o = self.cfg.objective
        with accelerator.accumulate([transformer]):
            prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(prompts)
            pixel_values = pixel_values.to(dtype=self.vae.dtype)
            model_input = self.vae.encode(pixel_values).latent_dist.sample()
            model_input = (model_input - self.vae_shift) * self.vae_scale
            model_input = model_input.to(dtype=self.weight_dtype)
            latent_image_ids = FluxPipeline._prepare_latent_image_ids(
                model_input.shape[0], model_input.shape[2] // 2, model_input.shape[3] // 2, self.device, self.weight_dtype)
            noise = torch.randn_like(model_input)
            bsz = model_input.shape[0]
            u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=bsz, logit_mean=o.logit_mean,
                                                      logit_std=o.logit_std, mode_scale=o.mode_scale)
            indices = (u * self.noise_scheduler_copy.config.num_train_timesteps).long()
            timesteps = self.noise_scheduler_copy.timesteps[indices].to(device=model_input.device)
            sigmas = self.get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
            noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
            packed = FluxPipeline._pack_latents(noisy_model_input, batch_size=model_input.shape[0],
                                                num_channels_latents=model_input.shape[1],
                                                height=model_input.shape[2], width=model_input.shape[3])
            if accelerator.unwrap_model(transformer).config.guidance_embeds:
                guidance = torch.tensor([3.5], device=self.device).expand(model_input.shape[0])
            else:
                guidance = None
            with accelerator.autocast():
                model_pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                         pooled_projections=pooled_prompt_embeds, encoder_hidden_states=prompt_embeds,
                                         txt_ids=text_ids, img_ids=latent_image_ids, return_dict=False)[0]
            model_pred = FluxPipeline._unpack_latents(model_pred, height=model_input.shape[2] * self.vae_scale_factor,
                                                      width=model_input.shape[3] * self.vae_scale_factor,
                                                      vae_scale_factor=self.vae_scale_factor)
            weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
            target = noise - model_input
            loss = torch.mean(
                (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
            loss = loss.mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients and self.cfg.train.max_grad_norm is not None:
                accelerator.clip_grad_norm_(transformer.parameters(), self.cfg.train.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        return loss.detach().item()

    @classmethod
    def run(cls, cfg: Any, device: Any, weight_dtype: Any, data_dir: Path, steps: int, out: Path) -> None:
        """A whole run as the script does it: load, prepare the images once, train, save the LoRA."""
        import numpy as np
        import torch
        from diffusers import FluxPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        from PIL import Image

        baseline = cls(cfg, device, weight_dtype)
        size = cfg.data.resolution
        paths = sorted(data_dir.glob("*.png"))
        pixels, prompts = [], []
        for path in paths:  # DreamBoothDataset: resize, centre crop, to tensor, normalise, all up front
            image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
            pixels.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
            prompts.append(path.with_suffix(".txt").read_text())
        b = cfg.train.batch_size
        for k in range(steps):
            idx = [(k * b + i) % len(paths) for i in range(b)]
            baseline.step(torch.stack([pixels[i] for i in idx]).to(device), [prompts[i] for i in idx])
        transformer = baseline.accelerator.unwrap_model(baseline.transformer)
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(transformer))
        FluxPipeline.save_lora_weights(str(out), transformer_lora_layers=layers)


#: what the bench compares this family with
PEER = DreamBoothLoraFlux
