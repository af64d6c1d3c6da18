"""The Family interface: everything the training loop needs to know about one kind of model.

A family wraps a diffusers pipeline folder (hub id or local) and answers, in model-agnostic terms:

- which *parts* it has (``self.parts``: name -> module, tokenizer or scheduler, as in
  ``pipeline.components``) and which of them is the *denoiser* that gets trained;
- how a batch of images becomes per-image features (`encode_images`: always an ``x0`` tensor in
  the space the objective works in, plus any image conditioning) and how prompts become per-prompt
  features (`encode_prompts`);
- which objective it trains with (`make_objective`) and how the denoiser predicts the objective's
  target from a noisy ``x_t`` (`predict`);
- how trained weights are written so that the matching diffusers pipeline loads them
  (`save_lora`, `save_full`) and how images are sampled (`sample`, `load_pipeline`, `generate`).

Shared code (train.py, generate.py, methods) only talks to this interface; it never asks which
family it has. Feature dicts hold batched tensors whose first dimension is the batch, so they can
be cached per item and collated again.
"""

from __future__ import annotations

import importlib
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .. import DifftuneError
from ..run_layout import RunLayout

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from ..config import Config


@dataclass
class NoOptions:
    """A family without options of its own: any ``model.options`` key is an error."""


@dataclass(frozen=True)
class Preset:
    """A model size for `difftune bench` (each family folder's ``presets.py``): config overrides per part
    on top of the tiny pipeline's configs. ``tiny`` changes nothing; ``small`` only the denoiser (its
    conditioning sizes stay the tiny encoders'); ``real`` every part whose sizes the inputs depend on."""

    resolution: int
    parts: dict[str, dict] = field(default_factory=dict)
    note: str = ""


def unwrap(module: Any) -> Any:
    """The plain module under DDP / DeepSpeed / torch.compile wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif module.__class__.__name__ in ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine") and hasattr(module, "module"):
            module = module.module
        else:
            return module


def read_model_index(path: str, revision: str | None = None) -> dict:
    """`model_index.json` of a local folder or hub id (a clear error when neither works)."""
    local = Path(path)
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise DifftuneError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
        return json.loads(index.read_text())
    from ..config import PATH_RULE, looks_local

    if local.exists() or looks_local(path):  # refused at once, never sent to the hub
        raise DifftuneError(f"model path not found or not a folder: {path} ({PATH_RULE})")
    from diffusers import DiffusionPipeline

    try:  # in the local hub cache: no network needed
        return dict(DiffusionPipeline.load_config(path, revision=revision, local_files_only=True))
    except Exception:
        pass
    _check_hub_repo(path, revision)
    try:
        return dict(DiffusionPipeline.load_config(path, revision=revision))
    except Exception as e:  # network, auth, missing repo: say which and why in one line
        raise DifftuneError(f"cannot read model_index.json of {path!r} from the hub: {type(e).__name__}: {e}") from None


def _check_hub_repo(repo: str, revision: str | None) -> None:
    """One quick request (no retries) so that a missing repo or an unreachable hub is one line in
    seconds, not a minute of retries ending in a confusing file-not-found."""
    import huggingface_hub
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    from ..config import PATH_RULE

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise DifftuneError(f"{repo}: not a local folder, and not in the hub cache (HF_HUB_OFFLINE is set)")
    try:
        huggingface_hub.model_info(repo, revision=revision, timeout=10)
    except GatedRepoError:
        raise DifftuneError(f"{repo}: gated on the hub: accept its licence on huggingface.co, then "
                            "`huggingface-cli login`") from None
    except RevisionNotFoundError:
        raise DifftuneError(f"{repo}: the hub has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise DifftuneError(f"{repo}: neither a local folder nor a model on the hub ({PATH_RULE}; private "
                            "hub models need `huggingface-cli login`)") from None
    except Exception as e:
        raise DifftuneError(f"{repo}: not a local folder, and the hub cannot be reached to fetch it "
                            f"({type(e).__name__}: {e})") from None


def read_part_config(path: str, part: str, name: str = "config.json", revision: str | None = None) -> dict:
    """A part's config file (e.g. ``vae/config.json``) without loading any weights."""
    local = Path(path)
    if local.is_dir():
        f = local / part / name
        return json.loads(f.read_text()) if f.is_file() else {}
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, f"{part}/{name}", revision=revision)).read_text())
    except Exception:
        return {}


def load_part(path: str, name: str, spec: list, dtype: Any = None, revision: str | None = None,
              variant: str | None = None) -> Any:
    """One component of a pipeline folder or hub id, as ``model_index.json`` names it (``spec`` =
    [library, class]). Modules come frozen, in eval mode and in `dtype`; a failure is one clear line."""
    import torch

    library, class_name = spec
    cls = getattr(importlib.import_module(library), class_name)
    kwargs: dict[str, Any] = {"subfolder": name, "revision": revision}
    if issubclass(cls, torch.nn.Module):
        kwargs["dtype"] = dtype
        if variant:
            kwargs["variant"] = variant
    try:
        part = cls.from_pretrained(path, **kwargs)
    except Exception as e:
        raise DifftuneError(f"cannot load {name} ({class_name}) from {path}: {type(e).__name__}: {e}") from None
    if isinstance(part, torch.nn.Module):
        part.requires_grad_(False)
        part.eval()
    return part


@dataclass
class Usage:
    """How to use a finished run, as its report.md shows it: a `difftune generate` command line and
    a complete Python script. Both run as written (tests/test_report_usage.py runs them)."""

    command: str
    python: str


@dataclass
class UsageSettings:
    """What the usage examples take from a run's config: a prompt it trained or sampled, the
    training resolution, the sampling steps and the LoRA / full-pipeline paths."""

    prompt: str
    size: int
    steps: int
    run: str
    base: str
    lora: bool

    @classmethod
    def of(cls, run_dir: str, config: dict) -> "UsageSettings":
        validation = config.get("validation") or {}
        concepts = (config.get("data") or {}).get("concepts") or []
        prompts = list(validation.get("prompts") or []) + [c.get("prompt") for c in concepts if c.get("prompt")]
        return cls(
            prompt=prompts[0] if prompts else "a photo",
            size=int((config.get("data") or {}).get("resolution") or 512),
            steps=int(validation.get("steps") or 25),
            run=str(run_dir),
            base=config["model"]["path"],
            lora=RunLayout(run_dir).lora.is_file() or _adapter_method(config["method"]["kind"]),
        )


def _adapter_method(kind: str) -> bool:
    """Whether method `kind` writes an adapter (a LoRA file) rather than a whole pipeline."""
    from ..methods import get_method_class

    return get_method_class(kind).adapter


def pipeline_parts(index: dict) -> dict[str, list]:
    """The component entries of a ``model_index.json`` (name -> [library, class]), absent ones left out."""
    return {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None}


class Family:
    """Base class of model families. Subclasses set the class attributes and the encode/predict maths."""

    #: registry name, e.g. ``sd``
    name: ClassVar[str] = ""
    #: diffusers pipeline class names (``model_index.json``'s ``_class_name``) this family handles
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    #: the part that is trained (``unet``, ``transformer``, ``prior``)
    denoiser: ClassVar[str] = "unet"
    #: text encoder parts, trainable with ``method.train_text_encoder``
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    #: default LoRA target module names per part (``method.target_modules`` overrides the denoiser's)
    lora_targets: ClassVar[dict[str, list[str]]] = {}
    #: the denoiser's lists of repeated blocks (attribute names of ``nn.ModuleList``s), in the order
    #: they run; what ``speed.block_swap`` swaps (empty: the family does not support it)
    block_lists: ClassVar[tuple[str, ...]] = ()
    #: whether ``speed.compile: auto`` compiles the denoiser regionally (long runs on one CUDA GPU): set
    #: only where a GPU run measured it paying (`speed.compile_mode`)
    compile_pays: ClassVar[bool] = False
    #: guidance scale for samples when the config gives none
    default_guidance: ClassVar[float] = 7.5
    #: the part whose spatial factor constrains resolutions (None: nothing spatial is denoised)
    autoencoder: ClassVar[str | None] = "vae"
    #: the dataclass of this family's ``model.options`` (its folder's ``options.py``)
    options_class: ClassVar[type] = NoOptions
    #: `difftune generate`'s tasks -> the diffusers pipeline class for each (``text2img``, ``img2img``,
    #: ``inpaint``, and with ControlNets ``controlnet``, ``controlnet-img2img``, ``controlnet-inpaint``);
    #: a task left out is one the family does not offer. `task_pipeline` builds them from the loaded pipeline.
    task_pipelines: ClassVar[dict[str, str]] = {}
    #: the diffusers ControlNet model class this family's ControlNet pipelines take (None: no ControlNet)
    controlnet_class: ClassVar[str | None] = None
    #: scheduler names (`difftune.inference.schedulers.SCHEDULERS`) `difftune generate` may swap in
    schedulers: ClassVar[tuple[str, ...]] = ()
    #: the one-file checkpoint layout `save_single_file` writes (``difftune merge --format single-file``), or None
    single_file_format: ClassVar[str | None] = None
    #: per part, the block classes that each become one FSDP unit (``parallel.strategy: fsdp``); a part not
    #: named here uses its model's own ``_no_split_modules`` (diffusers and transformers set them)
    fsdp_blocks: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: for a family that makes no images (no `task_pipelines`): how to generate with a model of it instead
    #: (``{path}`` is the model given)
    generate_hint: ClassVar[str | None] = None

    def __init__(self, cfg: "Config", device: "torch.device", weight_dtype: "torch.dtype"):
        self.cfg = cfg
        self.device = device
        self.weight_dtype = weight_dtype
        self.options = self.options_for(cfg)
        self.parts: dict[str, Any] = {}
        self.index: dict[str, Any] = {}
        #: prompts sampled during training besides ``validation.prompts`` (``validation.eval_every``): a
        #: family that frees text encoders in `after_prompt_cache` encodes these first
        self.sampling_prompts: list[str] = []

    @classmethod
    def options_for(cls, cfg: "Config") -> Any:
        """``model.options`` as this family's typed options, checked (a ConfigError names the key)."""
        from ..config import ConfigError, build_options

        options = build_options(cls.options_class, cfg.model.options)
        problems = options.problems() if hasattr(options, "problems") else []
        if problems:
            raise ConfigError("; ".join(problems))
        return options

    # ---- static facts, readable before loading -------------------------------------------

    @classmethod
    def resolution_multiple(cls, model_path: str, revision: str | None = None) -> int:
        """Image sides must be a multiple of this, read from the model's configs without loading it:
        the autoencoder's scale factor (as diffusers pipelines compute ``vae_scale_factor``) times the
        denoiser's own multiple in latent pixels (`denoiser_multiple`), and a multiple of what the
        family's pipeline checks besides (`pipeline_multiple`), so that validation samples and
        `difftune generate` accept the training resolution."""
        import math

        if cls.autoencoder is None:
            return 1
        blocks = read_part_config(model_path, cls.autoencoder, revision=revision).get("block_out_channels")
        factor = 2 ** (len(blocks) - 1) if blocks else 8
        own = cls.denoiser_multiple(read_part_config(model_path, cls.denoiser, revision=revision))
        return math.lcm(factor * own, cls.pipeline_multiple(factor))

    @classmethod
    def denoiser_multiple(cls, config: dict) -> int:
        """Latent sides must be a multiple of this for the denoiser (`config`: its ``config.json``).
        Default, a UNet: 2 for each downsampling (every down block but the last)."""
        blocks = config.get("down_block_types")
        return 2 ** (len(blocks) - 1) if blocks else 1

    @classmethod
    def pipeline_multiple(cls, vae_factor: int) -> int:
        """What the family's diffusers pipeline requires of image sides on its own. Default: the
        autoencoder factor."""
        return vae_factor

    @classmethod
    def shard_blocks(cls, part: str, module: Any) -> tuple[str, ...]:
        """Class names of the blocks of `part` that are sharded as one unit each (see `fsdp_blocks`)."""
        return tuple(cls.fsdp_blocks.get(part) or getattr(module, "_no_split_modules", None) or ())

    # ---- loading -----------------------------------------------------------------------------

    def trainable_part_names(self) -> list[str]:
        """Parts that get trained (LoRA or full): the denoiser, plus text encoders when asked."""
        names = [self.denoiser]
        if self.cfg.method.train_text_encoder:
            names += list(self.text_encoders)
        return names

    def load(self, denoiser_on_host: bool = False) -> None:
        """Load every part: frozen ones in the mixed-precision dtype, fully trained ones in fp32, each on
        the device, but for the denoiser with `denoiser_on_host` (training under block swap or an fp8
        base: `speed.denoiser_on_host`), which `speed.apply` puts there when it is ready.

        Loading part by part keeps peak RAM near the size of the final model (no fp32 copy of a
        model that will live in bf16).
        """
        import torch

        from ..methods import get_method

        m = self.cfg.model
        self.index = read_model_index(m.path, m.revision)
        trained = set(self.trainable_part_names())
        trained_dtype = get_method(self.cfg.method).part_dtype(self.weight_dtype)
        for name, spec in pipeline_parts(self.index).items():
            dtype = trained_dtype if name in trained else self.weight_dtype
            part = load_part(m.path, name, spec, dtype, m.revision, m.variant)
            if isinstance(part, torch.nn.Module) and not (name == self.denoiser and denoiser_on_host):
                part.to(self.device)
            self.parts[name] = part
        missing = [p for p in [self.denoiser, *self.text_encoders] if p not in self.parts]
        if missing:
            raise DifftuneError(f"{m.path}: the {self.name} family needs parts {missing}, which model_index.json lacks")
        self.after_load()

    def after_load(self) -> None:
        """Hook for family-specific setup once parts are loaded (e.g. loading a second pipeline)."""

    def after_prompt_cache(self) -> None:
        """Called by the training loop once every training prompt is encoded (frozen text encoders):
        free what only prompt encoding needed. Default: move the text encoders off the accelerator."""
        if self.device.type != "cpu":
            self.text_encoders_to("cpu")

    # ---- the maths (subclasses) -----------------------------------------------------------------

    def encode_images(self, pixels: "torch.Tensor") -> dict[str, "torch.Tensor"]:
        """``pixels``: float ``[B, 3, H, W]`` in [-1, 1] on the device. Returns per-image features,
        always with ``x0`` (the clean sample in the objective's space)."""
        raise NotImplementedError  # abstract

    def encode_prompts(self, prompts: list[str]) -> dict[str, "torch.Tensor"]:
        """Per-prompt conditioning, batched on the first dimension."""
        raise NotImplementedError  # abstract

    def feature_identity(self, kind: str) -> dict[str, Any]:
        """Everything other than its input that `encode_images` (``kind="images"``) or `encode_prompts`
        (``kind="prompts"``) output depends on. The on-disk feature caches are keyed by it, so a family
        whose encoders read more parts or settings than these defaults extends it.

        Default: the family, the weight dtype, the model (path, revision, variant, family options) and
        the on-disk identity of the parts involved: the autoencoder for images; the text encoders and
        their tokenizers (``text_encoder_2`` -> ``tokenizer_2``) for prompts.
        """
        import dataclasses

        from ..data.cache import part_fingerprint

        m = self.cfg.model
        if kind == "images":
            parts = [self.autoencoder] if self.autoencoder else []
        else:
            parts = [*self.text_encoders, *(name.replace("text_encoder", "tokenizer") for name in self.text_encoders)]
        settings: dict[str, Any] = {}
        return {
            "family": self.name, "kind": kind, "dtype": str(self.weight_dtype), "settings": settings,
            "model": {"path": m.path, "revision": m.revision, "variant": m.variant,
                      "options": dataclasses.asdict(self.options)},
            "parts": {name: part_fingerprint(m.path, name, m.revision) for name in parts},
        }

    def make_objective(self) -> Any:
        """The objective (DDPM or flow matching) configured from the model and ``cfg.objective``."""
        raise NotImplementedError  # abstract

    def predict(self, x_t: "torch.Tensor", t: "torch.Tensor", features: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """The denoiser's prediction of the objective's target, same shape as ``x_t``."""
        raise NotImplementedError  # abstract

    # ---- outputs ------------------------------------------------------------------------------

    def save_lora(self, out_dir: Path, states: dict[str, dict], metadata: dict[str, dict]) -> None:
        """Write ``pytorch_lora_weights.safetensors`` the way the pipeline's ``load_lora_weights`` reads it.

        ``states``: part name -> LoRA state dict (peft naming); ``metadata``: part name -> the
        peft LoraConfig as a dict (rank, alpha, targets), stored in the file's header.
        """
        import diffusers

        pipeline_cls = getattr(diffusers, self.pipeline_classes[0])
        kwargs = {}
        for part, state in states.items():
            kwargs[f"{part}_lora_layers"] = state
            kwargs[f"{part}_lora_adapter_metadata"] = metadata[part]
        pipeline_cls.save_lora_weights(str(out_dir), **kwargs)

    def build_pipeline(self) -> Any:
        """A diffusers pipeline made of the current (possibly trained) parts, for sampling or saving."""
        import diffusers

        pipeline_cls = getattr(diffusers, self.pipeline_classes[0])
        modules, optional = pipeline_cls._get_signature_keys(pipeline_cls)
        kwargs = {k: unwrap(self.parts.get(k)) for k in modules}
        kwargs.update({k: v for k, v in self.index.items() if k in optional and not isinstance(v, list)})
        return pipeline_cls(**kwargs)

    def sampling_pipeline(self) -> Any:
        """The pipeline `sample` gets for validation images: `build_pipeline`'s, unless the saved pipeline
        cannot make images from a prompt alone (Kandinsky 2.2's prior and decoder each need the other)."""
        return self.build_pipeline()

    def text_encoders_to(self, device: Any) -> None:
        """Move the text encoders (e.g. back to the accelerator for sampling, or off it)."""
        import torch

        for name in self.text_encoders:
            part = self.parts.get(name)
            if isinstance(part, torch.nn.Module):
                part.to(device)

    def source_dir(self) -> Path | None:
        """The local folder of the base model (the hub cache for a hub id), or None if there is none."""
        local = Path(self.cfg.model.path)
        if local.is_dir():
            return local
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(self.cfg.model.path, revision=self.cfg.model.revision, local_files_only=True))
        except Exception:
            return None

    def save_full(self, out_dir: Path) -> None:
        """Write a complete pipeline folder with the trained parts (``from_pretrained(out_dir)`` loads it).

        Trained parts are written from their fp32 weights; everything else (frozen models,
        tokenizers, scheduler, ``model_index.json``) is copied byte for byte from the base model, so a
        bf16 run does not degrade the VAE or text encoders it never trained, and parts released
        from memory during training (FLUX's T5) need no reloading.
        """
        import shutil

        source = self.source_dir()
        if source is None:
            raise DifftuneError(f"cannot find the files of {self.cfg.model.path} to complete the pipeline folder")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        trained = set(self.trainable_part_names())
        for name in pipeline_parts(self.index):
            target = out / name
            shutil.rmtree(target, ignore_errors=True)
            if name in trained:
                unwrap(self.parts[name]).save_pretrained(str(target), safe_serialization=True)
            else:
                shutil.copytree(source / name, target)
        shutil.copy2(source / "model_index.json", out / "model_index.json")

    @classmethod
    def load_pipeline(cls, path: str, device: Any, dtype: Any, extra: dict | None = None) -> Any:
        """A pipeline for `difftune generate`: base model (hub id or folder) on `device`."""
        import diffusers

        pipeline_cls = getattr(diffusers, cls.pipeline_classes[0])
        try:
            pipe = pipeline_cls.from_pretrained(path, dtype=dtype)
        except Exception as e:  # a broken folder, a missing part, the network for a hub id: one line
            raise DifftuneError(f"cannot load {path} as a {pipeline_cls.__name__}: {type(e).__name__}: {e}") from None
        return pipe.to(device)

    @classmethod
    def apply_loras(cls, pipe: Any, loras: list[Any]) -> None:
        """Load LoRAs (`difftune.inference.loras.LoraSpec`: ``path``, ``scale``...) into `pipe` as named
        adapters and activate them with their scales. Default: checked against the pipeline's modules,
        then its ``load_lora_weights`` (`difftune.inference.loras.load`)."""
        from ..inference.loras import load

        load(pipe, cls, list(loras))

    @classmethod
    def save_single_file(cls, pipe: Any, file: Path) -> Path:
        """Write `pipe` as the one-file checkpoint of `single_file_format` (families that have one override this)."""
        raise DifftuneError(f"--format single-file: the {cls.name} family has no one-file checkpoint layout")

    @classmethod
    def lora_parts(cls) -> tuple[str, ...]:
        """The pipeline parts a LoRA file of this family may hold weights for (its key prefixes); empty
        when its files carry no part prefix (then only loading can tell whether a file fits)."""
        return (cls.denoiser, *cls.text_encoders)

    @classmethod
    def task_pipeline(cls, pipe: Any, task: str, controlnet: Any = None) -> Any:
        """The pipeline for `task` (a `task_pipelines` key) sharing `pipe`'s modules, with `controlnet`
        (one ControlNet model or a list of them) for the ControlNet tasks."""
        import diffusers

        if task == "text2img" and controlnet is None:
            return pipe
        pipeline_cls = getattr(diffusers, cls.task_pipelines[task])
        return pipeline_cls.from_pipe(pipe, **({"controlnet": controlnet} if controlnet is not None else {}))

    @classmethod
    def sample(cls, pipe: Any, prompt: str, *, steps: int, guidance: float, width: int, height: int,
               generator: Any, num: int = 1, **inputs: Any) -> list[Any]:
        """Images (PIL) for one prompt with a ready pipeline. `inputs`: further arguments of the
        pipeline's call (``negative_prompt``, ``image``, ``mask_image``, ``strength``, ``control_image``...)."""
        out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                   generator=generator, num_images_per_prompt=num, **inputs)
        return list(out.images)

    @classmethod
    def usage(cls, run_dir: str | Path, config: dict) -> Usage:
        """How to use what a finished run wrote into `run_dir` (`config`: its config.yaml as plain
        data): the `difftune generate` command and a Python script with the family's pipeline. Default:
        ``load_lora_weights`` on the base pipeline for a LoRA, ``from_pretrained(run_dir)`` for a full run."""
        u = UsageSettings.of(str(run_dir), config)
        pipeline = cls.pipeline_classes[0]
        q = shlex.quote
        model = f"--model {q(u.base)} --lora {q(u.run)}" if u.lora else f"--model {q(u.run)}"
        command = (f"difftune generate {model} --prompt {q(u.prompt)} --steps {u.steps} --width {u.size} "
                   f"--height {u.size} --out {q(str(Path(u.run) / 'generated'))}")
        load = (f"pipe = {pipeline}.from_pretrained({u.base!r}, dtype=dtype).to(device)\n"
                f"pipe.load_lora_weights({u.run!r})\n") if u.lora else \
            f"pipe = {pipeline}.from_pretrained({u.run!r}, dtype=dtype).to(device)\n"
        python = (
            f"import torch\nfrom diffusers import {pipeline}\n\n"
            "device = 'cuda' if torch.cuda.is_available() else 'cpu'\n"
            "dtype = torch.bfloat16 if device == 'cuda' else torch.float32\n"
            f"{load}"
            f"image = pipe({u.prompt!r}, num_inference_steps={u.steps}, width={u.size}, height={u.size}).images[0]\n"
            "image.save('image.png')\n"
        )
        return Usage(command, python)

    @classmethod
    def kohya_layout(cls) -> Any:
        """How `difftune export` names this family's LoRA modules in the kohya layout (formats/kohya.py).

        Default, kohya's naming of SD 1.x/2.x LoRAs: the module path with ``_`` for ``.`` after
        ``lora_unet`` (the denoiser) or ``lora_te`` (the first text encoder; ``lora_te2``... after it),
        text encoders named as CLIP checkpoints name them (``text_model.encoder...``).
        """
        from ..formats.kohya import KohyaLayout

        prefixes = {cls.denoiser: "lora_unet"}
        prefixes.update({name: f"lora_te{i + 1 if i else ''}" for i, name in enumerate(cls.text_encoders)})
        return KohyaLayout(prefixes, clip_parts=cls.text_encoders)
