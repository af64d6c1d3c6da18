"""Kandinsky 2.2: a prior (text -> CLIP image embedding) and a decoder (CLIP image embedding -> image).

The two models are separate pipelines, trained separately; both are families here.

**Decoder** (``kandinsky22-decoder``, ``KandinskyV22Pipeline``): a UNet over MoVQ latents, conditioned
only on a CLIP image embedding (``added_cond_kwargs={"image_embeds": [B, D]}``). Conventions follow
diffusers' ``train_text_to_image_decoder.py``: latents = ``movq.encode(pixels).latents`` (before
quantisation, no scaling factor), ``[B, C, H/f, W/f]`` with f the MoVQ factor (8 for the real model);
the UNet outputs ``2C`` channels, predicted noise then learned variance, and only the first ``C`` are
trained (epsilon objective from the decoder scheduler). The training images' CLIP image embeddings
come from the image encoder of the prior pipeline named by ``model.options.prior``; they are per-image
features, so they are computed (and cached) with the latents. The decoder has no text encoder.

**Prior** (``kandinsky22-prior``, ``KandinskyV22PriorPipeline``): a ``PriorTransformer`` that denoises
a CLIP image embedding ``[B, D]`` given the CLIP text embedding (``text_embeds``), the text hidden
states (``last_hidden_state``) and the token mask. The target x0 is the training image's CLIP image
embedding normalised with the prior's ``clip_mean`` / ``clip_std`` (``prior.post_process_latents``
is the inverse the pipeline applies); the objective predicts the sample itself (the prior
scheduler's ``prediction_type="sample"``, squared-cosine betas), as diffusers'
``train_text_to_image_prior.py`` does.

Images for either part need the other one: sampling (``difftune generate`` and validation images)
runs text -> prior -> decoder through diffusers' ``KandinskyV22CombinedPipeline``. A decoder run names
its prior with ``model.options.prior``; a prior run that asks for validation images names a decoder with
``model.options.decoder``. Saved outputs are each part's own pipeline folder (full) or a LoRA file written the
way ``model.save_lora_adapter`` writes it (keys without a part prefix, LoraConfig in the header), so
``pipe.unet.load_lora_adapter(DIR, weight_name="pytorch_lora_weights.safetensors", prefix=None)``
and ``pipe.prior.load_lora_adapter(...)`` load them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ... import DifftuneError
from ...objectives.ddpm import DDPMObjective
from ...run_layout import LORA_FILE, RunLayout
from ...util.atomic import atomic_write
from ..base import Family, Usage, UsageSettings, load_part, read_model_index
from .options import DecoderOptions, PriorOptions

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
#: the decoder's SimpleCrossAttn blocks project the image-embedding tokens with their own key/value layers
DECODER_ATTENTION = [*ATTENTION, "add_k_proj", "add_v_proj"]
#: the decoder named in a prior run's usage examples when its config names none
DEFAULT_DECODER = "kandinsky-community/kandinsky-2-2-decoder"
PRIOR_PIPELINE = "KandinskyV22PriorPipeline"
DECODER_PIPELINE = "KandinskyV22Pipeline"


def clip_pixels(pixels: Any, processor: Any) -> Any:
    """CLIP image-encoder input from training pixels, with tensor ops on their device.

    ``pixels``: ``[B, 3, H, W]`` in [-1, 1]. Does what the pipeline's ``CLIPImageProcessor`` does to a
    PIL image (resize the short side, centre crop, normalise with ``image_mean`` / ``image_std``),
    without a PIL round trip per step. Returns float32 ``[B, 3, crop_h, crop_w]``.
    """
    import torch
    import torch.nn.functional as F

    x = (pixels.float() + 1.0) / 2.0
    h, w = x.shape[-2:]
    if getattr(processor, "do_resize", True):
        size = processor.size
        short = size.get("shortest_edge")
        if short:
            scale = short / min(h, w)
            new = (max(short, int(h * scale)), max(short, int(w * scale)))
        else:
            new = (size.get("height"), size.get("width"))
        if new != (h, w):
            x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True)
    if getattr(processor, "do_center_crop", True):
        ch, cw = processor.crop_size.get("height"), processor.crop_size.get("width")
        top, left = max(0, (x.shape[-2] - ch) // 2), max(0, (x.shape[-1] - cw) // 2)
        x = x[..., top : top + ch, left : left + cw]
    # bicubic overshoots; the processor works on 8-bit images, which cannot leave [0, 1]
    x = x.clamp(0.0, 1.0)
    if getattr(processor, "do_normalize", True):
        mean = torch.tensor(processor.image_mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(processor.image_std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x


def _expect_pipeline(path: str, class_name: str, what: str) -> dict:
    """`model_index.json` of `path`, which must be a `class_name` folder (else a clear error naming `what`)."""
    index = read_model_index(path)
    found = index.get("_class_name")
    if found != class_name:
        raise DifftuneError(f"{what} {path}: expected a {class_name} folder, found {found!r}")
    return index


def _load_pipeline(class_name: str, path: str, dtype: Any, what: str, **components: Any) -> Any:
    import diffusers

    _expect_pipeline(path, class_name, what)
    try:
        return getattr(diffusers, class_name).from_pretrained(path, dtype=dtype, **components)
    except Exception as e:
        raise DifftuneError(f"{what} {path}: cannot load it ({type(e).__name__}: {e})") from None


def combine(prior_pipe: Any, decoder_pipe: Any) -> Any:
    """A ``KandinskyV22CombinedPipeline`` (text -> image) sharing the two pipelines' modules."""
    from diffusers import KandinskyV22CombinedPipeline

    return KandinskyV22CombinedPipeline(
        **decoder_pipe.components, **{f"prior_{k}": v for k, v in prior_pipe.components.items()}
    )


def _lora_source(spec: str, flag: str, part: str) -> tuple[str, str, str | None]:
    """(folder or hub id, weight file name, key prefix) of a LoRA given as a folder, file or hub id.

    Files written by a model's ``save_lora_adapter`` (and by difftune) have no part prefix; files
    written by a pipeline's ``save_lora_weights`` prefix every key with the part (``unet.``).
    """
    p = Path(spec)
    if p.is_file():
        folder, weight_name = str(p.parent), p.name
    elif p.is_dir():
        folder, weight_name = str(p), LORA_FILE
        if not (p / LORA_FILE).is_file():
            raise DifftuneError(f"{flag} {spec}: no {LORA_FILE} in this folder")
    else:
        return spec, LORA_FILE, None
    from safetensors import safe_open

    try:
        with safe_open(str(Path(folder) / weight_name), framework="pt") as fh:
            keys = list(fh.keys())
    except Exception as e:
        raise DifftuneError(f"{flag} {spec}: not a readable safetensors file ({e})") from None
    prefix = part if {k.split(".", 1)[0] for k in keys} == {part} else None
    return folder, weight_name, prefix


def load_adapters(model: Any, loras: list[tuple[str, float]], flag: str, label: str) -> None:
    """Load LoRA files into `model` (the pipeline part named `label`: ``unet`` or ``prior``) as named
    adapters and activate them with their scales."""
    names = []
    for i, (spec, _) in enumerate(loras):
        folder, weight_name, prefix = _lora_source(spec, flag, label)
        name = f"{label}{i}"
        try:
            model.load_lora_adapter(folder, weight_name=weight_name, prefix=prefix, adapter_name=name)
        except Exception as e:
            raise DifftuneError(f"{flag} {spec}: cannot load it into the {label} ({type(e).__name__}: {e})") from None
        if name not in getattr(model, "peft_config", {}):
            raise DifftuneError(f"{flag} {spec}: holds no weights for the {label}")
        names.append(name)
    if names:
        model.set_adapters(names, weights=[scale for _, scale in loras])


def kandinsky_usage(u: UsageSettings, prior: str, decoder: str, flags: str, lora_into: str | None) -> Usage:
    """Usage of a Kandinsky 2.2 run: the prior makes image embeddings from the prompt, the decoder
    images from them; `lora_into` is the pipeline part (``decoder.unet``, ``prior.prior``) that gets
    the run's LoRA (these pipelines have no ``load_lora_weights``), None for a full run."""
    import shlex

    q = shlex.quote
    command = (f"difftune generate {flags} --prompt {q(u.prompt)} --steps {u.steps} --width {u.size} "
               f"--height {u.size} --out {q(str(Path(u.run) / 'generated'))}")
    load = f"{lora_into}.load_lora_adapter({u.run!r}, weight_name={LORA_FILE!r}, prefix=None)\n" if lora_into else ""
    python = (
        f"import torch\nfrom diffusers import {DECODER_PIPELINE}, {PRIOR_PIPELINE}\n\n"
        "device = 'cuda' if torch.cuda.is_available() else 'cpu'\n"
        "dtype = torch.bfloat16 if device == 'cuda' else torch.float32\n"
        f"prior = {PRIOR_PIPELINE}.from_pretrained({prior!r}, dtype=dtype).to(device)\n"
        f"decoder = {DECODER_PIPELINE}.from_pretrained({decoder!r}, dtype=dtype).to(device)\n"
        f"{load}"
        f"embeds = prior({u.prompt!r}, num_inference_steps={u.steps})\n"
        "image = decoder(image_embeds=embeds.image_embeds, negative_image_embeds=embeds.negative_image_embeds,\n"
        f"                num_inference_steps={u.steps}, width={u.size}, height={u.size}).images[0]\n"
        "image.save('image.png')\n"
    )
    return Usage(command, python)


class _Kandinsky(Family):
    """What the prior and the decoder share: checks, objective, LoRA file, text -> image sampling."""

    default_guidance = 4.0

    def __init__(self, cfg, device, weight_dtype):
        super().__init__(cfg, device, weight_dtype)
        self._companion: Any = None

    def load(self, denoiser_on_host: bool = False) -> None:
        if self.cfg.method.train_text_encoder:
            raise DifftuneError(
                f"method.train_text_encoder: the {self.name} family trains the {self.denoiser} only "
                "(diffusers' Kandinsky pipelines load no text-encoder LoRA); set it to false"
            )
        super().load(denoiser_on_host)

    def clip_sources(self) -> tuple[str, list[str]]:
        """(pipeline folder, parts) that `encode_images` reads besides the autoencoder."""
        raise NotImplementedError  # abstract

    def feature_identity(self, kind: str) -> dict[str, Any]:
        """The base identity plus, for images, the on-disk identity of the CLIP image encoder and its
        processor (and of whatever else `clip_sources` names), so a changed encoder misses the cache."""
        from ...data.cache import part_fingerprint

        identity = super().feature_identity(kind)
        if kind == "images":
            path, parts = self.clip_sources()
            revision = self.cfg.model.revision if path == self.cfg.model.path else None
            identity["clip"] = {"path": path, "parts": {name: part_fingerprint(path, name, revision) for name in parts}}
        return identity

    def make_objective(self) -> Any:
        o = self.cfg.objective
        sched = dict(self.parts["scheduler"].config)
        native = sched.get("prediction_type", "epsilon")
        if o.prediction_type and o.prediction_type != native:
            raise DifftuneError(
                f"objective.prediction_type={o.prediction_type}: the {self.name} scheduler of {self.cfg.model.path} "
                f"samples with {native!r}, so a model trained otherwise would not work in its pipeline; leave it empty"
            )
        return DDPMObjective(
            sched, native, o.min_snr_gamma, o.timestep_sampling, o.logit_mean, o.logit_std, o.mode_scale
        )

    def save_lora(self, out_dir: Path, states: dict[str, dict], metadata: dict[str, dict]) -> None:
        """``pytorch_lora_weights.safetensors`` as ``save_lora_adapter`` writes it: peft key names with no
        part prefix, the LoraConfig (rank, alpha, targets) as JSON under ``lora_adapter_metadata``."""
        from diffusers.utils import convert_unet_state_dict_to_peft
        from safetensors.torch import save_file

        # peft names throughout: diffusers naming would mix `to_q.lora.down` with `add_k_proj.lora_A`,
        # and the loader converts a file only when its first key is in the old naming
        state = convert_unet_state_dict_to_peft(dict(states[self.denoiser]))
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in metadata[self.denoiser].items()}
        header = {"format": "pt", "lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)}
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        atomic_write(RunLayout(out_dir).lora, lambda tmp: save_file(tensors, str(tmp), metadata=header))

    def companion(self) -> Any:
        """The other part's pipeline (decoder for the prior, prior for the decoder) on the device, for
        samples; loaded once, on first use."""
        if self._companion is None:
            self._companion = self.load_companion()
        return self._companion

    def load_companion(self) -> Any:
        raise NotImplementedError  # abstract

    @classmethod
    def sample(cls, pipe: Any, prompt: str, *, steps: int, guidance: float, width: int, height: int,
               generator: Any, num: int = 1, **inputs: Any) -> list[Any]:
        """Images for `prompt` from a ``KandinskyV22CombinedPipeline``; `guidance` and `steps` apply to both
        the prior and the decoder. Default size: the decoder UNet's sample size times the MoVQ factor."""
        sample_size = pipe.unet.config.sample_size
        default = sample_size * pipe.decoder_pipe.movq_scale_factor if isinstance(sample_size, int) else 512
        out = pipe(
            prompt, num_inference_steps=steps, prior_num_inference_steps=steps, guidance_scale=guidance,
            prior_guidance_scale=guidance, width=width or default, height=height or default,
            generator=generator, num_images_per_prompt=num, **inputs,
        )
        return list(out.images)


class KandinskyDecoder(_Kandinsky):
    name = "kandinsky22-decoder"
    pipeline_classes = (DECODER_PIPELINE,)
    denoiser = "unet"
    text_encoders = ()
    lora_targets = {"unet": DECODER_ATTENTION}
    autoencoder = "movq"
    options_class = DecoderOptions
    task_pipelines = {
        "text2img": "KandinskyV22CombinedPipeline", "img2img": "KandinskyV22Img2ImgCombinedPipeline",
        "inpaint": "KandinskyV22InpaintCombinedPipeline",
    }

    @classmethod
    def pipeline_multiple(cls, vae_factor: int) -> int:
        """KandinskyV22Pipeline rounds sides up to multiples of the MoVQ factor squared
        (``downscale_height_and_width``): samples at other sizes would not be the trained size."""
        return vae_factor**2

    def load(self, denoiser_on_host: bool = False) -> None:
        prior = self.options.prior
        if not prior:
            raise DifftuneError(
                "model.options.prior is required for the kandinsky22-decoder family: the Kandinsky 2.2 prior pipeline "
                "(e.g. kandinsky-community/kandinsky-2-2-prior) whose CLIP image encoder conditions the decoder"
            )
        index = _expect_pipeline(prior, PRIOR_PIPELINE, "model.options.prior")
        for name in ("image_encoder", "image_processor"):
            if not isinstance(index.get(name), list) or index[name][0] is None:
                raise DifftuneError(f"model.options.prior {prior}: its model_index.json has no {name}")
        super().load(denoiser_on_host)

    def after_load(self) -> None:
        prior = self.options.prior
        index = read_model_index(prior)
        encoder = load_part(prior, "image_encoder", index["image_encoder"], self.weight_dtype)
        self.parts["image_encoder"] = encoder.to(self.device)
        self.parts["image_processor"] = load_part(prior, "image_processor", index["image_processor"], None)

    def clip_sources(self) -> tuple[str, list[str]]:
        return self.options.prior, ["image_encoder", "image_processor"]

    def encode_images(self, pixels):
        """``{"x0": MoVQ latents [B, C, H/f, W/f], "image_embeds": CLIP image embeddings [B, D]}``."""
        movq, encoder = self.parts["movq"], self.parts["image_encoder"]
        latents = movq.encode(pixels.to(movq.dtype)).latents
        clip = clip_pixels(pixels, self.parts["image_processor"]).to(encoder.dtype)
        return {"x0": latents, "image_embeds": encoder(clip).image_embeds}

    def encode_prompts(self, prompts: list[str]):
        """The decoder sees no text: its conditioning is the image embedding."""
        return {}

    def predict(self, x_t, t, features):
        """The predicted noise: the first C of the UNet's 2C output channels (the rest is learned variance)."""
        unet = self.parts["unet"]
        embeds = features["image_embeds"].to(x_t.dtype)
        out = unet(x_t, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": embeds}).sample
        return out.split(x_t.shape[1], dim=1)[0]

    def sampling_pipeline(self) -> Any:
        """Text -> image for validation samples: the prior of ``model.options.prior`` and this decoder as trained."""
        return combine(self.companion(), self.build_pipeline())

    def load_companion(self) -> Any:
        pipe = _load_pipeline(
            PRIOR_PIPELINE, self.options.prior, self.weight_dtype, "model.options.prior",
            image_encoder=self.parts["image_encoder"], image_processor=self.parts["image_processor"],
        )
        return pipe.to(self.device)

    @classmethod
    def load_pipeline(cls, path: str, device: Any, dtype: Any, extra: dict | None = None) -> Any:
        """Prior (``extra["prior"]``, plus ``extra["prior_loras"]``) and this decoder as one text -> image pipeline."""
        extra = extra or {}
        prior = extra.get("prior")
        if not prior:
            raise DifftuneError(
                f"{path} is a Kandinsky 2.2 decoder: add --prior PATH, the prior pipeline (base or fine-tuned, "
                "e.g. kandinsky-community/kandinsky-2-2-prior) that turns the prompt into an image embedding"
            )
        decoder_pipe = _load_pipeline(DECODER_PIPELINE, path, dtype, "--model")
        prior_pipe = _load_pipeline(PRIOR_PIPELINE, prior, dtype, "--prior")
        load_adapters(prior_pipe.prior, list(extra.get("prior_loras") or []), "--prior-lora", "prior")
        return combine(prior_pipe, decoder_pipe).to(device)

    @classmethod
    def apply_loras(cls, pipe: Any, loras: list[Any]) -> None:
        """Decoder LoRAs (``--lora``) into the UNet of a combined pipeline."""
        load_adapters(pipe.unet, [(spec.path, spec.scale) for spec in loras], "--lora", "unet")

    @classmethod
    def lora_parts(cls) -> tuple[str, ...]:
        return ()  # files written by save_lora_adapter: keys carry no part prefix

    @classmethod
    def usage(cls, run_dir, config: dict) -> Usage:
        """The decoder needs the prior of ``model.options.prior`` to turn the prompt into an image embedding."""
        import shlex

        u = UsageSettings.of(str(run_dir), config)
        prior = (config["model"].get("options") or {}).get("prior")
        decoder = u.base if u.lora else u.run
        flags = f"--model {shlex.quote(decoder)} --prior {shlex.quote(prior)}"
        flags += f" --lora {shlex.quote(u.run)}" if u.lora else ""
        return kandinsky_usage(u, prior, decoder, flags, "decoder.unet" if u.lora else None)


class KandinskyPrior(_Kandinsky):
    name = "kandinsky22-prior"
    pipeline_classes = (PRIOR_PIPELINE,)
    denoiser = "prior"
    text_encoders = ("text_encoder",)
    lora_targets = {"prior": ATTENTION}
    # the image encoder resizes whatever it gets; nothing spatial is denoised
    autoencoder = None
    options_class = PriorOptions
    generate_hint = ("{path} is a Kandinsky 2.2 prior: it makes image embeddings, not images. Generate with "
                     "--model DECODER --prior {path} (and --prior-lora for a prior LoRA)")

    def load(self, denoiser_on_host: bool = False) -> None:
        import diffusers

        cfg = self.cfg
        if cfg.train.gradient_checkpointing and not diffusers.PriorTransformer._supports_gradient_checkpointing:
            raise DifftuneError(
                "train.gradient_checkpointing: diffusers' PriorTransformer does not support it; set it to false"
            )
        if cfg.validation.prompts and not self.options.decoder:
            raise DifftuneError(
                "validation.prompts: the kandinsky22-prior family makes image embeddings, not images; set "
                "model.options.decoder to a Kandinsky 2.2 decoder pipeline (e.g. kandinsky-community/kandinsky-2-2-decoder) "
                "to sample images, or remove validation.prompts"
            )
        if self.options.decoder:
            _expect_pipeline(self.options.decoder, DECODER_PIPELINE, "model.options.decoder")
        super().load(denoiser_on_host)

    def after_load(self) -> None:
        # a copy, so that full fine-tuning (which makes these parameters trainable) cannot move the targets
        prior = self.parts["prior"]
        self._clip_mean = prior.clip_mean.detach().float().clone()
        self._clip_std = prior.clip_std.detach().float().clone()

    def clip_sources(self) -> tuple[str, list[str]]:
        # the targets are normalised with the prior's own clip_mean / clip_std
        return self.cfg.model.path, ["image_encoder", "image_processor", "prior"]

    def encode_images(self, pixels):
        """``{"x0": (CLIP image embedding - clip_mean) / clip_std}``, ``[B, D]`` float32."""
        encoder = self.parts["image_encoder"]
        clip = clip_pixels(pixels, self.parts["image_processor"]).to(encoder.dtype)
        embeds = encoder(clip).image_embeds.float()
        return {"x0": (embeds - self._clip_mean) / self._clip_std}

    def encode_prompts(self, prompts: list[str]):
        """``proj_embedding`` (CLIP ``text_embeds``, ``[B, D]``), ``encoder_hidden_states`` (``[B, L, H]``)
        and ``attention_mask`` (bool ``[B, L]``), padded to the tokenizer's max length as the pipeline does."""
        tokenizer, text_encoder = self.parts["tokenizer"], self.parts["text_encoder"]
        tokens = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        out = text_encoder(tokens.input_ids.to(text_encoder.device))
        return {
            "proj_embedding": out.text_embeds,
            "encoder_hidden_states": out.last_hidden_state,
            "attention_mask": tokens.attention_mask.bool().to(text_encoder.device),
        }

    def predict(self, x_t, t, features):
        """The predicted clean (normalised) image embedding, ``[B, D]``."""
        prior = self.parts["prior"]
        return prior(
            x_t,
            timestep=t,
            proj_embedding=features["proj_embedding"].to(x_t.dtype),
            encoder_hidden_states=features["encoder_hidden_states"].to(x_t.dtype),
            attention_mask=features["attention_mask"],
        ).predicted_image_embedding

    def sampling_pipeline(self) -> Any:
        """Text -> image for validation samples: this prior as trained and the decoder of ``model.options.decoder``."""
        return combine(self.build_pipeline(), self.companion())

    def load_companion(self) -> Any:
        pipe = _load_pipeline(DECODER_PIPELINE, self.options.decoder, self.weight_dtype, "model.options.decoder")
        return pipe.to(self.device)

    @classmethod
    def usage(cls, run_dir, config: dict) -> Usage:
        """The prior makes image embeddings only: images come from a decoder (``model.options.decoder``, else the
        public Kandinsky 2.2 decoder) fed with this prior."""
        import shlex

        u = UsageSettings.of(str(run_dir), config)
        decoder = (config["model"].get("options") or {}).get("decoder") or DEFAULT_DECODER
        prior = u.base if u.lora else u.run
        flags = f"--model {shlex.quote(decoder)} --prior {shlex.quote(prior)}"
        flags += f" --prior-lora {shlex.quote(u.run)}" if u.lora else ""
        return kandinsky_usage(u, prior, decoder, flags, "prior.prior" if u.lora else None)

    @classmethod
    def load_pipeline(cls, path: str, device: Any, dtype: Any, extra: dict | None = None) -> Any:
        raise DifftuneError(cls.generate_hint.format(path=path))
