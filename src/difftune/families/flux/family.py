"""FLUX.1 (dev and schnell): a rectified-flow transformer over packed VAE latents, conditioned on
T5 token embeddings and a pooled CLIP embedding.

Conventions:

- ``x0`` (what the objective and the caches see): the VAE posterior mean, shifted then scaled,
  ``(mean - vae.config.shift_factor) * vae.config.scaling_factor`` (0.1159 and 0.3611 for FLUX.1),
  kept *unpacked* ``[B, 16, H/8, W/8]`` (factor 4 for the tiny test VAE). `predict` packs it into
  2x2 patches, ``[B, (H/16) * (W/16), 64]`` tokens, with diffusers' own ``FluxPipeline`` helpers,
  and unpacks the prediction again, so the generic loop never sees tokens.
- Timesteps are flow-matching noise levels sigma in (0, 1), given to the transformer as they are
  (it multiplies by 1000 inside, as the pipeline's ``timestep / 1000`` shows); so is the guidance
  value for guidance-distilled checkpoints (``model.options.guidance``; only FLUX.1-dev's transformer
  has ``guidance_embeds``, schnell's gets none).
- Position ids: image tokens ``(0, row, col)`` of the packed grid, text tokens all zero, as the
  pipeline makes them.
- Prompt features, tokenized exactly as ``FluxPipeline.encode_prompt`` does: ``prompt_embeds``
  ``[B, max_sequence_length, 4096]`` (T5-XXL last hidden state, ``model.options.max_sequence_length``,
  default 512 as FLUX.1-dev was trained) and ``pooled_prompt_embeds`` ``[B, 768]`` (CLIP-L pooled).
- Only CLIP is trainable (``method.train_text_encoder``), as in diffusers' FLUX DreamBooth script:
  `text_encoders` lists it alone. T5 is frozen; once every prompt (validation prompts included) is
  cached it is dropped from memory entirely, and samples use the cached embeddings. A full
  fine-tune may train T5 too (``model.options.train_t5``; the world pretraining does).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Any

from ... import DifftuneError
from ...objectives.flow_matching import FlowMatchingObjective
from ..base import Family, unwrap
from .options import MAX_T5_TOKENS, FluxOptions

#: attention projections of both stream types (image: to_*, text: add_*), as diffusers'
#: train_dreambooth_lora_flux.py targets them; single blocks have to_q/k/v (no to_out)
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]

#: T5 part and tokenizer (frozen, never in `text_encoders`)
T5 = "text_encoder_2"
T5_TOKENIZER = "tokenizer_2"


def image_tokens(x0: Any) -> int:
    """Packed image token count of unpacked latents ``[B, C, h, w]`` (for the dynamic shift)."""
    return (x0.shape[-2] // 2) * (x0.shape[-1] // 2)


def pack(latents: Any) -> Any:
    """``[B, C, h, w]`` -> ``[B, (h/2) * (w/2), 4C]`` 2x2 patch tokens (diffusers' own helper)."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: Any, h: int, w: int) -> Any:
    """Inverse of `pack` for latents of height `h` and width `w` (both even)."""
    from diffusers import FluxPipeline

    # the helper takes pixel sizes and the VAE factor; in latent units that factor is 1
    return FluxPipeline._unpack_latents(tokens, h, w, 1)


@functools.lru_cache(maxsize=32)
def image_ids(h: int, w: int, device: Any, dtype: Any) -> Any:
    """Position ids ``[(h/2) * (w/2), 3]`` of the packed tokens of ``h x w`` latents; built once per
    size and device (the transformer only reads them), not at every step."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)  # one set for the batch


@dataclass
class _SamplingPrompts:
    """What a pipeline built during training samples with: the training sequence length and the
    prompts encoded before T5 was released (prompt -> (prompt_embeds, pooled_prompt_embeds))."""

    max_sequence_length: int
    embeds: dict[str, tuple[Any, Any]] = field(default_factory=dict)


#: pipeline built by `Flux.build_pipeline` -> its sampling prompts; `Flux.sample` is a classmethod
#: (generate.py calls it without a family instance), so the pipeline is the key it can look up
_SAMPLING: "weakref.WeakKeyDictionary[Any, _SamplingPrompts]" = weakref.WeakKeyDictionary()


class Flux(Family):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    denoiser = "transformer"
    text_encoders = ("text_encoder",)
    lora_targets = {"transformer": ATTENTION, "text_encoder": CLIP_ATTENTION}
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    compile_pays = True  # regional: 0.42 s/step against 0.60 eager, FLUX.1-dev LoRA on an H200 (BENCHMARKS.md)
    default_guidance = 3.5
    autoencoder = "vae"
    task_pipelines = {
        "text2img": "FluxPipeline", "img2img": "FluxImg2ImgPipeline", "inpaint": "FluxInpaintPipeline",
        "controlnet": "FluxControlNetPipeline", "controlnet-img2img": "FluxControlNetImg2ImgPipeline",
        "controlnet-inpaint": "FluxControlNetInpaintPipeline",
    }
    controlnet_class = "FluxControlNetModel"

    @classmethod
    def denoiser_multiple(cls, config: dict) -> int:
        """Latents are packed into 2x2 patches (`pack`)."""
        return 2

    @classmethod
    def pipeline_multiple(cls, vae_factor: int) -> int:
        """FluxPipeline resizes sides that are not multiples of ``vae_scale_factor * 2``."""
        return vae_factor * 2
    fsdp_blocks = {"transformer": ("FluxTransformerBlock", "FluxSingleTransformerBlock")}

    options_class = FluxOptions

    def __init__(self, cfg, device, weight_dtype):
        super().__init__(cfg, device, weight_dtype)
        self._cached: dict[str, tuple[Any, Any]] = {}
        if self.options.train_t5:
            from ...methods import get_method_class

            if get_method_class(cfg.method.kind).adapter or not cfg.method.train_text_encoder:
                raise DifftuneError("model.options.train_t5 trains T5 in a full fine-tune: it needs method.kind=full "
                                    "and method.train_text_encoder=true")
            self.text_encoders = ("text_encoder", T5)  # this run's trained text encoders (the class lists CLIP)

    @property
    def max_sequence_length(self) -> int:
        n = self.options.max_sequence_length
        return MAX_T5_TOKENS if n is None else n

    def after_load(self) -> None:
        missing = [p for p in (T5, T5_TOKENIZER, "tokenizer", "vae", "scheduler") if self.parts.get(p) is None]
        if missing:
            raise DifftuneError(
                f"{self.cfg.model.path}: a FLUX pipeline needs parts {missing}, which model_index.json lacks"
            )

    # ---- features ---------------------------------------------------------------------------

    def encode_images(self, pixels):
        vae = self.parts["vae"]
        mean = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
        return {"x0": (mean - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor}

    def encode_prompts(self, prompts: list[str]):
        clip_tokenizer, clip = self.parts["tokenizer"], self.parts["text_encoder"]
        t5_tokenizer, t5 = self.parts[T5_TOKENIZER], self.parts[T5]
        if t5 is None:  # released by after_prompt_cache; every prompt should have been cached
            raise DifftuneError(f"FLUX: T5 was released after caching, but prompts {prompts!r} were not cached")
        ids = clip_tokenizer(
            prompts, padding="max_length", max_length=clip_tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids
        pooled = clip(ids.to(self.device), output_hidden_states=False).pooler_output
        ids = t5_tokenizer(
            prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt"
        ).input_ids
        embeds = t5(ids.to(self.device), output_hidden_states=False)[0]
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def feature_identity(self, kind: str) -> dict[str, Any]:
        """The base identity plus T5 and its tokenizer for prompts (frozen, so not in `text_encoders`)."""
        from ...data.cache import part_fingerprint

        identity = super().feature_identity(kind)
        if kind == "prompts":
            m = self.cfg.model
            identity["parts"].update({name: part_fingerprint(m.path, name, m.revision) for name in (T5, T5_TOKENIZER)})
            identity["settings"]["max_sequence_length"] = self.max_sequence_length
        return identity

    def after_prompt_cache(self) -> None:
        """Encode the validation prompts too, then drop T5 (9.5 GB in bf16 for FLUX.1) from memory.

        Nothing else refers to T5, so dropping the reference frees it at once; no ``gc.collect()``
        (it cost 0.2-0.5 s of every run's start-up; tests/test_startup.py checks T5 is freed)."""
        import torch

        todo = [p for p in dict.fromkeys([*self.cfg.validation.prompts, *self.sampling_prompts]) if p not in self._cached]
        if todo:
            with torch.no_grad():
                features = self.encode_prompts(todo)
            for i, prompt in enumerate(todo):
                self._cached[prompt] = (
                    features["prompt_embeds"][i : i + 1], features["pooled_prompt_embeds"][i : i + 1]
                )
        self.parts[T5] = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        super().after_prompt_cache()

    # ---- the maths -----------------------------------------------------------------------------

    def make_objective(self) -> Any:
        o = self.cfg.objective
        return FlowMatchingObjective(
            dict(self.parts["scheduler"].config),
            image_tokens,
            shift=o.shift,
            sampling=o.timestep_sampling,
            logit_mean=o.logit_mean,
            logit_std=o.logit_std,
            mode_scale=o.mode_scale,
            weighting=o.weighting,
        )

    def predict(self, x_t, t, features):
        """``x_t`` ``[B, 16, h, w]`` unpacked, ``t`` sigma ``[B]``; returns the velocity, unpacked."""
        import torch

        transformer = self.parts["transformer"]
        _, _, h, w = x_t.shape
        embeds = features["prompt_embeds"].to(x_t.dtype)
        guidance = None
        if unwrap(transformer).config.guidance_embeds:
            guidance = torch.full((x_t.shape[0],), float(self.options.guidance), device=x_t.device)
        out = transformer(
            hidden_states=pack(x_t),
            timestep=t,
            guidance=guidance,
            pooled_projections=features["pooled_prompt_embeds"].to(x_t.dtype),
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
            img_ids=image_ids(h, w, x_t.device, x_t.dtype),
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    # ---- outputs ------------------------------------------------------------------------------

    def text_encoders_to(self, device: Any) -> None:
        super().text_encoders_to(device)
        if self.parts.get(T5) is not None:
            self.parts[T5].to(device)

    def build_pipeline(self) -> Any:
        pipe = super().build_pipeline()
        _SAMPLING[pipe] = _SamplingPrompts(self.max_sequence_length, dict(self._cached))
        return pipe

    @classmethod
    def sample(cls, pipe, prompt, *, steps, guidance, width, height, generator, num=1, **inputs):
        """Images for one prompt; width/height None = the pipeline's default size. A pipeline from
        `build_pipeline` samples cached prompts from their embeddings (T5 may be gone) and others
        at the training sequence length."""
        kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                      generator=generator, **inputs)
        known = _SAMPLING.get(pipe)
        if known is not None:
            kwargs["max_sequence_length"] = known.max_sequence_length
            if prompt in known.embeds:
                embeds, pooled = known.embeds[prompt]
                # the pipeline repeats given embeddings for nothing: one row per image
                out = pipe(prompt_embeds=embeds.repeat(num, 1, 1), pooled_prompt_embeds=pooled.repeat(num, 1), **kwargs)
                return list(out.images)
        return list(pipe(prompt, num_images_per_prompt=num, **kwargs).images)

    @classmethod
    def kohya_layout(cls) -> Any:
        from .kohya import FluxKohyaLayout

        return FluxKohyaLayout({"transformer": "lora_unet", "text_encoder": "lora_te1"}, clip_parts=("text_encoder",))
