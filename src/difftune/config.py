"""The run configuration: typed dataclasses, a strict YAML loader and `key.path=value` overrides.

Every field is documented in its ``doc`` metadata; ``difftune config-reference`` and the README's
config reference are generated from these docstrings, so this file is the one source of truth.

Strictness is the point: an unknown key is an error that names the key and suggests the closest
valid one, a value of the wrong type is an error naming the key, and cross-field checks
(`validate`) run before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from . import DifftuneError
from .methods import get_method_class


class ConfigError(DifftuneError):
    """A config file or override that cannot be used. The message names the key."""


def _f(default: Any = dataclasses.MISSING, doc: str = "", factory: Any = dataclasses.MISSING,
       resume_locked: bool = False, path: str | None = None):
    """A dataclass field with a docstring kept in its metadata.

    `resume_locked`: a run may not resume with another value (used by family options; the core sections
    list theirs in train.RESUME_LOCKED). `path` marks fields that hold paths (see `resolve_path`):
    ``"local"`` for files and folders, ``"local_or_hub"`` for values that may also be a Hugging Face hub
    id, ``"resume"`` for `checkpoint.resume` (a path unless `auto` / `never`), ``"options"`` for
    ``model.options`` (each key by the family option field of that name).
    """
    metadata = {"doc": doc, "resume_locked": resume_locked}
    if path:
        metadata["path"] = path
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


#: for the option dataclasses of families and methods: a documented config field
doc_field = _f


@dataclass
class ModelConfig:
    """Which base model to fine-tune."""

    path: str = _f("", "Hub id (e.g. `black-forest-labs/FLUX.1-dev`) or a local diffusers pipeline folder.",
                   path="local_or_hub")
    family: str = _f(
        "auto", "`auto` reads `model_index.json`; or a family name (`difftune train --help` lists them)."
    )
    revision: Optional[str] = _f(None, "Hub revision (branch, tag or commit) to load.")
    variant: Optional[str] = _f(None, "Weight variant to load, e.g. `fp16`.")
    options: dict = _f(
        factory=dict,
        doc="The family's own options (`model.options.KEY`); each family's keys are listed below under "
        "**model.options (FAMILY)**. An unknown key is an error.",
        path="options",
    )


@dataclass
class MethodConfig:
    """How the model is adapted."""

    kind: str = _f("lora", "The training method, one of those in the **methods** table below.")
    rank: int = _f(16, "LoRA rank.")
    alpha: Optional[float] = _f(None, "LoRA alpha (scale = alpha / rank); defaults to the rank.")
    dropout: float = _f(0.0, "LoRA dropout probability.")
    target_modules: Optional[Union[str, list[str]]] = _f(
        None,
        "Module names (or suffixes) that get LoRA; `all-linear` for every linear layer; empty = the "
        "family's default (attention projections).",
    )
    train_text_encoder: bool = _f(
        False, "Also train the text encoder(s): LoRA on their attention with `lora`, all weights with `full`."
    )
    init_lora: Optional[str] = _f(
        None, "Start from an existing LoRA (a folder or .safetensors file); rank and targets must match.",
        path="local",
    )

    def __post_init__(self):
        from .methods import method_kinds

        if self.kind not in method_kinds():
            close = difflib.get_close_matches(str(self.kind), method_kinds(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"method.kind: {self.kind!r} is not one of {', '.join(map(repr, method_kinds()))}{hint}")


@dataclass
class ConceptConfig:
    """One source of training images. Several concepts are mixed in one run."""

    dir: Optional[str] = _f(
        None, "Image folder. Captions: a sidecar `NAME.txt`, or `metadata.jsonl` / `metadata.csv` (file_name, text).",
        path="local",
    )
    hf: Optional[str] = _f(
        None, "A Hugging Face dataset: hub id, or a local parquet/arrow file or folder (instead of `dir`).",
        path="local_or_hub",
    )
    split: str = _f("train", "Dataset split (with `hf`).")
    image_column: str = _f("image", "Image column (with `hf`).")
    caption_column: str = _f("text", "Caption column (with `hf`).")
    prompt: str = _f("", "Prompt for images without their own caption.")
    caption_template: str = _f(
        "{caption}", "How the caption becomes the prompt, e.g. `{caption}, in sksartist style`."
    )
    caption_dropout: float = _f(0.0, "Probability of training an image with an empty prompt.")
    repeats: int = _f(1, "How many times each image appears per epoch.")
    sampling_weight: float = _f(
        1.0, "Joint training: how often this concept's images are drawn relative to other concepts' (an image of "
        "weight 2 is seen twice as often as one of weight 1; whole multiples of the smallest weight)."
    )
    loss_weight: float = _f(1.0, "Joint training: this concept's samples count this much in the loss.")
    class_prompt: Optional[str] = _f(
        None, "Prior preservation (DreamBooth): prompt of the class (e.g. `a dog`); the base model draws "
        "`class_images` images for it once (cached, resumable, reused by runs of the same model)."
    )
    class_dir: Optional[str] = _f(
        None, "Prior preservation: a folder of class images (captions as for `dir`, else `class_prompt`); "
        "with `class_prompt`, missing images up to `class_images` are generated into it."
    )
    class_images: int = _f(100, "Prior preservation: how many class images to use.")
    prior_loss_weight: float = _f(
        1.0, "Prior preservation: loss = mean over the concept's samples + this x mean over its class samples "
        "(one class image per instance image in each batch)."
    )


@dataclass
class DataConfig:
    """Training images and how they are prepared."""

    resolution: int = _f(512, "Training resolution in pixels (the side of the square pixel budget).")
    concepts: list[ConceptConfig] = _f(factory=list, doc="One or more concepts, trained together.")
    crop: Literal["center", "random"] = _f("center", "How images are cropped to their bucket.")
    random_flip: bool = _f(False, "Flip images horizontally at random.")
    buckets: bool = _f(
        False, "Aspect-ratio buckets: keep each image's shape within resolution² pixels instead of a square crop."
    )
    cache: bool = _f(True, "Cache VAE latents and text embeddings on disk (when their encoders are frozen).")
    cache_dir: Optional[str] = _f(
        None, "Where caches live; default `OUTPUT_DIR/cache` (generated class images: `~/.cache/difftune`).",
        path="local",
    )
    replay: list[str] = _f(
        factory=list, doc="Replay when continuing: earlier runs' output_dirs whose concepts (images and captions, "
        "from their saved config) are mixed into every batch. Their base model must be this run's."
    )
    replay_ratio: float = _f(0.5, "Share of each batch's samples that come from `replay` runs, in [0, 1).")


@dataclass
class ObjectiveConfig:
    """The denoising objective. Defaults come from the model's scheduler."""

    prediction_type: Optional[Literal["epsilon", "v_prediction", "sample"]] = _f(
        None, "DDPM families: what the network predicts; default from the scheduler config."
    )
    min_snr_gamma: Optional[float] = _f(None, "DDPM families: min-SNR loss weighting (5.0 is common); off if empty.")
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = _f(
        "uniform", "How training timesteps are drawn. Flow matching usually uses `logit_normal`."
    )
    logit_mean: float = _f(0.0, "Mean for `logit_normal` sampling.")
    logit_std: float = _f(1.0, "Standard deviation for `logit_normal` sampling.")
    mode_scale: float = _f(1.29, "Scale for `mode` sampling.")
    shift: Optional[float] = _f(
        None,
        "Flow matching: timestep shift. Empty = resolution-dependent shift from the scheduler config when "
        "it uses dynamic shifting, else the scheduler's `shift`.",
    )
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = _f("none", "Flow matching: loss weighting scheme.")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    steps: int = _f(1000, "Optimizer steps.")
    batch_size: int = _f(1, "Images per micro-batch per device.")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    lr: float = _f(1.0e-4, "Peak learning rate.")
    text_encoder_lr: Optional[float] = _f(None, "Learning rate for the text encoder(s); default `lr`.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = _f(
        "constant", "Learning-rate schedule."
    )
    lr_warmup_steps: int = _f(0, "Warm-up steps for the schedule.")
    seed: int = _f(0, "Seed for weights of new layers, data order, noise and timesteps.")
    precision: Literal["no", "fp16", "bf16"] = _f(
        "bf16", "Mixed precision. Frozen weights are stored in this dtype; trained ones stay fp32."
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    optimizer: Literal["adamw", "adamw8bit"] = _f("adamw", "`adamw8bit` needs bitsandbytes and a CUDA GPU.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1.0e-8, "AdamW epsilon.")
    weight_decay: float = _f(1.0e-2, "AdamW weight decay.")
    max_grad_norm: Optional[float] = _f(1.0, "Clip gradients to this global norm; empty = no clipping.")
    max_nonfinite_steps: int = _f(5, "Stop after this many optimizer steps in a row with a non-finite loss.")
    log_every: int = _f(10, "Write loss, lr and grad norm to the trackers every N steps.")
    report_to: list[Literal["tensorboard", "wandb"]] = _f(
        factory=lambda: ["tensorboard"],
        doc="Trackers that get the logged numbers, through accelerate: `tensorboard` (in `OUTPUT_DIR/logs`), "
        "`wandb` (`pip install difftune[wandb]`; `WANDB_MODE=offline` keeps it local), both, or `[]`.",
    )


@dataclass
class CheckpointConfig:
    """Checkpoints that a rerun resumes from."""

    every: int = _f(200, "Save a checkpoint every N optimizer steps (0 = only at the end).")
    keep: int = _f(3, "Keep the newest N complete checkpoints (at least 1).")
    resume: str = _f(
        "auto", "`auto`: continue from the newest complete checkpoint in output_dir; `never`; or a checkpoint path.",
        path="resume",
    )


@dataclass
class ValidationConfig:
    """Sample images and validation loss during training."""

    prompts: list[str] = _f(
        factory=list, doc="Prompts to sample (at step 0, every `every` steps and at the end); none = no samples."
    )
    every: int = _f(0, "Sample and score the validation loss every N steps (0 = only at the start and the end).")
    images: Optional[str] = _f(
        None,
        "Validation loss on this image folder (captions as in a concept; images without one use the first "
        "concept's prompt and template).", path="local",
    )
    holdout: float = _f(
        0.0, "Validation loss on this fraction of the training images, kept out of training (e.g. `0.1`)."
    )
    loss_draws: int = _f(
        4, "Noise draws (timestep and noise) per validation image; the same at every evaluation, from `seed`."
    )
    steps: int = _f(25, "Inference steps per sample.")
    guidance: Optional[float] = _f(None, "Guidance scale; default the family's.")
    seed: int = _f(0, "Seed for the samples, so runs compare image for image.")
    num_images: int = _f(1, "Images per prompt.")
    eval_every: int = _f(
        0, "Score concepts and drift (as `difftune eval` does) every N steps, logged next to the loss (0 = never)."
    )
    eval_prompts: Optional[str] = _f(
        None, "Prompts file for scoring (`concepts: {NAME: [...]}`, `neutral: [...]`); default: from the concepts."
    )
    eval_prompts_per_concept: int = _f(4, "Default scoring prompts per concept (and neutral prompts).")
    eval_scorer: Literal["auto", "world", "encoders"] = _f(
        "auto", "`world` oracle, `encoders` (CLIP + DINOv2), or `auto`: the oracle when every prompt is a world caption."
    )
    clip_model: str = _f("openai/clip-vit-large-patch14", "CLIP model (hub id or folder) for the `encoders` scorer.")
    dino_model: str = _f("facebook/dinov2-small", "DINOv2 model (hub id or folder) for the `encoders` scorer.")


@dataclass
class SpeedConfig:
    """Speed and memory switches (applied by `difftune.speed`; figures in BENCHMARKS.md)."""

    attention_backend: str = _f(
        "native",
        "diffusers attention backend for models with attention dispatch (FLUX): `native` is PyTorch SDPA, which "
        "picks FlashAttention / memory-efficient kernels on CUDA itself; `flash`, `_native_cudnn`, `sage`, "
        "`xformers`, ... need CUDA and their package. UNets always use PyTorch SDPA (AttnProcessor2_0).",
    )
    compile: Literal["auto", "none", "regional", "full"] = _f(
        "auto",
        "torch.compile the denoiser: `regional` compiles its repeated transformer blocks (short warm-up), `full` "
        "the whole forward; needs triton on CUDA, a C++ compiler on CPU. `auto`: `regional` where it was measured "
        "to pay (a FLUX transformer on one CUDA GPU, 500 steps or more, no gradient checkpointing, block swap or "
        "fp8/nf4 base), else `none`.",
    )
    tf32: bool = _f(True, "TF32 for fp32 matmuls and convolutions on Ampere or newer GPUs (no effect elsewhere).")
    fused_optimizer: bool = _f(True, "Fused AdamW kernel where torch has one (CUDA, CPU); ignored with adamw8bit.")
    channels_last: bool = _f(
        False, "Channels-last memory format for convolution weights (UNets; faster convolutions on CUDA)."
    )
    base_weights: Literal["auto", "fp8", "nf4"] = _f(
        "auto",
        "LoRA only, how the frozen denoiser weights are stored: `auto` in train.precision's dtype; `fp8` in "
        "float8_e4m3 with a scale per row (half of bf16), dequantised as each layer runs; `nf4` 4-bit NormalFloat "
        "(QLoRA, needs bitsandbytes). Linear layers only; embedders and the first/last projections stay as they are.",
    )
    block_swap: int = _f(
        0,
        "LoRA only, low VRAM: keep the frozen weights of this many transformer blocks (the first ones in run order) in "
        "host memory and copy each to the GPU just before it runs (forward and backward), overlapped with compute on a "
        "side CUDA stream. 0 = off. Single process only; not with speed.compile.",
    )
    offload_activations: bool = _f(
        False,
        "Low VRAM: keep the activations the denoiser saves for the backward in (pinned) host memory instead of the "
        "GPU; costs host-device copies, saves the activation memory that gradient checkpointing would recompute.",
    )


@dataclass
class ParallelConfig:
    """Several processes (`accelerate launch`): how the trained weights are spread over them (parallel/)."""

    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = _f(
        "auto",
        "`auto`: `ddp` with several processes, none with one; `ddp` replicates the trained weights; `fsdp` shards "
        "them, their gradients and optimizer states (FSDP2, one unit per block); `deepspeed` uses DeepSpeed ZeRO "
        "through accelerate (`pip install deepspeed`; ZeRO-2 and ZeRO-3 tested on CPU processes). `difftune plan CONFIG` says which fits.",
    )
    zero_stage: Literal[2, 3] = _f(3, "DeepSpeed ZeRO stage: 2 shards gradients and optimizer states, 3 weights too.")
    cpu_offload: bool = _f(
        False, "`fsdp` / `deepspeed`: keep sharded weights and optimizer states in CPU memory (slower, much less "
        "accelerator memory)."
    )
    disk: Literal["shared", "per_node"] = _f(
        "shared",
        "`shared`: output_dir is one folder every machine sees (written by the global main process); `per_node`: "
        "each machine has its own disk, checkpoints and caches are written by each machine's main process "
        "(`ddp` only; final outputs land on the first machine).",
    )


@dataclass
class PreserveConfig:
    """Keeping what the model already draws while it learns (see the README's forgetting section)."""

    output_weight: float = _f(
        0.0, "Output preservation: for `prompts` (no trigger), pull the adapted model's prediction toward the base "
        "model's on the same noisy inputs, at this weight; no extra images. LoRA: the base is the adapter disabled; "
        "full fine-tune: a frozen copy of the starting denoiser (its memory once more)."
    )
    prompts: list[str] = _f(factory=list, doc="Output preservation: trigger-free prompts, cycled through the batch.")
    clora_weight: float = _f(
        0.0, "Rehearsal-free continuation (C-LoRA style) with `method.init_lora`: penalise changing each LoRA weight "
        "in proportion to how much the earlier LoRA uses it (|its weight delta|), at this weight."
    )


@dataclass
class Config:
    """A difftune training run."""

    model: ModelConfig = _f(factory=ModelConfig, doc="The base model.")
    method: MethodConfig = _f(factory=MethodConfig, doc="LoRA or full fine-tune.")
    data: DataConfig = _f(factory=DataConfig, doc="Training data.")
    objective: ObjectiveConfig = _f(factory=ObjectiveConfig, doc="Denoising objective.")
    train: TrainConfig = _f(factory=TrainConfig, doc="Optimisation.")
    checkpoint: CheckpointConfig = _f(factory=CheckpointConfig, doc="Checkpoints and resume.")
    validation: ValidationConfig = _f(factory=ValidationConfig, doc="Samples during training.")
    speed: SpeedConfig = _f(factory=SpeedConfig, doc="Speed and memory switches.")
    parallel: ParallelConfig = _f(factory=ParallelConfig, doc="Several processes and machines.")
    preserve: PreserveConfig = _f(factory=PreserveConfig, doc="Keeping earlier knowledge while learning.")
    output_dir: str = _f("", "Where everything lands: weights, checkpoints, samples, logs, the resolved config.",
                         path="local")


# --------------------------------------------------------------------------------------------
# Building typed values from plain YAML data


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " / ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        # sorted: equal unions are cached objects, so their member order depends on what was imported first
        return " or ".join(sorted(_type_name(a) for a in typing.get_args(tp) if a is not type(None)))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


_YAML_FALSE = ("no", "off", "false")
_YAML_TRUE = ("yes", "on", "true")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check and convert one YAML value to the field type `tp`; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads `no`, `off`, `yes`, `on` as booleans
            spelled = [a for a in allowed if str(a).lower() in (_YAML_FALSE if not value else _YAML_TRUE)]
            value = spelled[0] if spelled else value
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}{hint}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _unknown_key(cls, name: str, prefix: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(cls)]
    where = f"{prefix}.{name}" if prefix else name
    moved = moved_keys().get(where)
    if moved:
        return ConfigError(f"config key {where!r} is now {moved!r}; rename it in your config")
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {where!r}{hint} (valid keys here: {', '.join(valid)})")


def _build(cls, data: dict, prefix: str = ""):
    hints = _hints(cls)
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for name, value in data.items():
        if name not in names:
            # an older difftune's config.yaml (a checkpoint's) lists every key: its moved defaults say nothing
            old = moved_keys(defaults=True)
            if (where := f"{prefix}.{name}" if prefix else str(name)) in old and value == old[where]:
                continue
            raise _unknown_key(cls, str(name), prefix)
        kwargs[name] = _convert(value, hints[name], f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def moved_keys(defaults: bool = False) -> dict[str, Any]:
    """Old config key -> its new name, as the family folders declare them (``options.py``'s ``MOVED``);
    with `defaults`, old key -> the value older versions wrote for it by default (``WRITTEN_BY_DEFAULT``)."""
    from .families.registry import folder_module, folders

    moved: dict[str, Any] = {}
    for folder in folders():
        moved.update(getattr(folder_module(folder, "options"), "WRITTEN_BY_DEFAULT" if defaults else "MOVED", {}))
    return moved


def build_options(cls: Any, data: dict, prefix: str = "model.options") -> Any:
    """A family's typed options (dataclass `cls`) from ``model.options``, as strictly as the rest."""
    return _build(cls, data or {}, prefix)


def to_dict(cfg: Any) -> dict:
    """The config as plain data (what is written to `config.yaml`)."""
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------------------
# Paths: one rule. A relative path written in a config file is relative to the folder of that file;
# one given on the command line (`key=value`) is relative to the current directory. Local paths are
# made absolute when the config is loaded, so `config.yaml` in output_dir means the same files from
# anywhere. A value that may be a hub id stays one unless it exists locally or *looks* local.

#: file endings that mark a path, never a hub id
LOCAL_SUFFIXES = (".safetensors", ".parquet", ".arrow", ".json", ".jsonl", ".csv", ".yaml", ".yml", ".bin", ".pt")
PATH_RULE = "relative paths in a config file are relative to its folder; on the command line, to the current directory"


def looks_local(value: str, base: Path | None = None) -> bool:
    """Whether `value` is meant as a local path rather than a hub id (``owner/name``).

    Local: starts with ``/``, ``.`` or ``~``; has a backslash, no ``/`` or more than one; ends in a
    file ending (`LOCAL_SUFFIXES`); or its first component is an existing folder (``runs/nope`` when
    ``runs/`` exists). Such a value that does not exist is refused at once, never sent to the hub.
    """
    if value.startswith(("/", ".", "~")) or "\\" in value or value.count("/") != 1:
        return True
    if value.lower().endswith(LOCAL_SUFFIXES):
        return True
    return ((base or Path.cwd()) / value.split("/", 1)[0]).is_dir()


def resolve_path(value: Any, kind: str, base: Path) -> Any:
    """A path field's value with relative local paths made absolute against `base` (see `PATH_RULE`)."""
    if not isinstance(value, str) or not value or (kind == "resume" and value in ("auto", "never")):
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    if kind == "local_or_hub" and not (base / p).exists() and not looks_local(value, base):
        return value  # a hub id
    return os.path.normpath(os.path.abspath(base / p))


def option_path_kinds() -> dict[str, str]:
    """``model.options`` key -> its path kind, for the keys some family's options declare as paths
    (the family is not known when a config is read, so the keys of all families count)."""
    from .families.registry import folder_module, folders

    kinds: dict[str, str] = {}
    for folder in folders():
        module = folder_module(folder, "options")
        for obj in vars(module).values() if module else ():
            if isinstance(obj, type) and dataclasses.is_dataclass(obj):
                kinds.update({f.name: f.metadata["path"] for f in dataclasses.fields(obj) if f.metadata.get("path")})
    return kinds


def _resolve_paths(value: Any, tp: Any, kind: str | None, base: Path) -> Any:
    """Apply `resolve_path` to every path field in the plain data `value` of schema type `tp`."""
    if kind == "options":
        if not isinstance(value, dict):
            return value
        kinds = option_path_kinds()
        return {k: resolve_path(v, kinds[k], base) if k in kinds else v for k, v in value.items()}
    if kind:
        return resolve_path(value, kind, base)
    if typing.get_origin(tp) is list and isinstance(value, list):
        (item,) = typing.get_args(tp)
        return [_resolve_paths(v, item, None, base) for v in value]
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        fields = {f.name: f for f in dataclasses.fields(tp)}
        hints = _hints(tp)
        return {k: _resolve_paths(v, hints[k], fields[k].metadata.get("path"), base) if k in fields else v
                for k, v in value.items()}
    return value


def _schema_at(path: list[str]) -> tuple[Any, str | None]:
    """(type, path kind) of the config entry at `path` (list indices allowed), for an override's value."""
    tp: Any = Config
    kind = None
    for part in path:
        if kind == "options":  # model.options.KEY: the path kind some family gives KEY
            return None, option_path_kinds().get(part)
        if typing.get_origin(tp) is list:
            (tp,) = typing.get_args(tp)
            kind = None
            continue
        if not dataclasses.is_dataclass(tp):
            return None, None
        fields = {f.name: f for f in dataclasses.fields(tp)}
        if part not in fields:
            return None, None
        kind = fields[part].metadata.get("path")
        tp = _hints(tp)[part]
    return tp, kind


# --------------------------------------------------------------------------------------------
# Overrides, loading, validation


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-5` -> (["train", "lr"], 1e-5). The value is read as YAML, so types come out right."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    """Set `value` at `path` in the nested dict `data`, checking each key against the schema.

    A list index may appear in the path (`data.concepts.0.repeats=5`).
    """
    cls: Any = Config
    node: Any = data
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        where = ".".join(path[:depth])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{where}: {part!r} is not an index of a list of {len(node)} items")
            if last:
                node[int(part)] = value
                return
            node = node[int(part)]
            continue
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            raise _unknown_key(cls, part, where)
        if last:
            node[part] = value
            return
        tp = _hints(cls)[part]
        if tp is dict:  # a free mapping (model.options), checked against its family later
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(path[: depth + 1])} must be a mapping")
            for key in path[depth + 1 : -1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
            return
        if typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            node = node.setdefault(part, [])
            cls = item
            continue
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{'.'.join(path[: depth + 1])} is a value, not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(path[: depth + 1])} must be a mapping")
        cls = tp


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict | None = None) -> Config:
    """Read a YAML config, apply `key.path=value` overrides, check types. Does not touch models or data.

    Paths follow `PATH_RULE`. `base`: plain config data to start from when there is no file (its
    paths are relative to the current directory, like overrides)."""
    import yaml

    data: dict = _resolve_paths(dict(base or {}), Config, None, Path.cwd())
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data = _resolve_paths(loaded, Config, None, p.parent)
    for text in overrides:
        keys, value = parse_override(text)
        tp, kind = _schema_at(keys)
        apply_override(data, keys, _resolve_paths(value, tp, kind, Path.cwd()))
    return _build(Config, data)


def config_from_dict(data: dict) -> Config:
    """Build a Config from plain data (e.g. a checkpoint's saved config)."""
    return _build(Config, data)


def validate(cfg: Config, *, resolution_multiple: int | None = None, check_paths: bool = True) -> None:
    """Cross-field checks that need no model. `resolution_multiple` comes from the family."""
    problems: list[str] = []
    if not cfg.model.path:
        problems.append("model.path is required (a hub id or a local diffusers pipeline folder)")
    if check_paths:
        option_paths = option_path_kinds()
        for key, value in (("model.path", cfg.model.path), ("method.init_lora", cfg.method.init_lora),
                           *((f"model.options.{k}", v) for k, v in cfg.model.options.items()
                             if k in option_paths and isinstance(v, str))):
            if value and looks_local(value) and not Path(value).exists():
                problems.append(f"{key}: not found: {value} ({PATH_RULE})")
    if not cfg.output_dir:
        problems.append("output_dir is required")
    m, t, d, c = cfg.method, cfg.train, cfg.data, cfg.checkpoint
    problems += get_method_class(m.kind).problems(m)
    for key, value in (("train.steps", t.steps), ("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum)):
        if value < 1:
            problems.append(f"{key} must be >= 1, got {value}")
    if t.lr <= 0:
        problems.append(f"train.lr must be > 0, got {t.lr}")
    if t.max_grad_norm is not None and t.max_grad_norm <= 0:
        problems.append(f"train.max_grad_norm must be > 0 or empty, got {t.max_grad_norm}")
    if t.max_nonfinite_steps < 1:
        problems.append(f"train.max_nonfinite_steps must be >= 1, got {t.max_nonfinite_steps}")
    if c.keep < 1:
        problems.append(f"checkpoint.keep must be >= 1, got {c.keep}")
    if c.every < 0:
        problems.append(f"checkpoint.every must be >= 0, got {c.every}")
    problems += data_problems(d, resolution_multiple=resolution_multiple, check_paths=check_paths)
    v = cfg.validation
    if v.every < 0:
        problems.append(f"validation.every must be >= 0, got {v.every}")
    if not 0.0 <= v.holdout < 1.0:
        problems.append(f"validation.holdout must be in [0, 1), got {v.holdout}")
    if v.images and v.holdout:
        problems.append("set validation.images or validation.holdout, not both")
    if v.images and check_paths and not Path(v.images).is_dir():
        problems.append(f"validation.images: folder not found: {v.images} ({PATH_RULE})")
    if v.loss_draws < 1:
        problems.append(f"validation.loss_draws must be >= 1, got {v.loss_draws}")
    if v.eval_every < 0:
        problems.append(f"validation.eval_every must be >= 0, got {v.eval_every}")
    p = cfg.preserve
    if p.output_weight < 0 or p.clora_weight < 0:
        problems.append("preserve.output_weight and preserve.clora_weight must be >= 0")
    if p.output_weight > 0:
        if not p.prompts:
            problems.append("preserve.output_weight needs preserve.prompts (trigger-free prompts to keep)")
        if m.train_text_encoder:
            problems.append("preserve.output_weight needs method.train_text_encoder: false (the base prediction "
                            "is the starting denoiser's, on the same prompt embeddings)")
    if p.clora_weight > 0 and not m.init_lora:
        problems.append("preserve.clora_weight needs method.init_lora (the LoRA whose use it protects)")
    if problems:
        raise ConfigError("; ".join(problems))


def data_problems(d: DataConfig, *, resolution_multiple: int | None = None, check_paths: bool = True) -> list[str]:
    """The checks of the `data` section alone (also run by `difftune data check` on a folder)."""
    problems: list[str] = []
    if d.resolution <= 0:
        problems.append(f"data.resolution must be > 0, got {d.resolution}")
    elif resolution_multiple and d.resolution % resolution_multiple:
        problems.append(
            f"data.resolution {d.resolution} is not a multiple of {resolution_multiple}, which this model needs"
            f" (try {max(resolution_multiple, round(d.resolution / resolution_multiple) * resolution_multiple)})"
        )
    if not d.concepts:
        problems.append("data.concepts is empty: add at least one concept with a `dir` or `hf`")
    for i, concept in enumerate(d.concepts):
        key = f"data.concepts[{i}]"
        if bool(concept.dir) == bool(concept.hf):
            problems.append(f"{key} needs exactly one of `dir` or `hf`")
        elif concept.dir and check_paths and not Path(concept.dir).is_dir():
            problems.append(f"{key}.dir: folder not found: {concept.dir} ({PATH_RULE})")
        elif concept.hf and check_paths and looks_local(concept.hf) and not Path(concept.hf).exists():
            problems.append(f"{key}.hf: not found: {concept.hf} ({PATH_RULE})")
        if concept.repeats < 1:
            problems.append(f"{key}.repeats must be >= 1, got {concept.repeats}")
        if not 0.0 <= concept.caption_dropout <= 1.0:
            problems.append(f"{key}.caption_dropout must be in [0, 1], got {concept.caption_dropout}")
        if "{caption}" not in concept.caption_template:
            problems.append(f"{key}.caption_template must contain {{caption}}, got {concept.caption_template!r}")
    if d.replay and d.buckets:
        problems.append("data.replay needs data.buckets: false (replayed images join every batch at one size)")
    if not 0.0 <= d.replay_ratio < 1.0:
        problems.append(f"data.replay_ratio must be in [0, 1), got {d.replay_ratio}")
    for i, concept in enumerate(d.concepts):
        key = f"data.concepts[{i}]"
        if concept.sampling_weight <= 0 or concept.loss_weight < 0:
            problems.append(f"{key}: sampling_weight must be > 0 and loss_weight >= 0")
        if concept.class_prompt or concept.class_dir:
            if d.buckets:
                problems.append(f"{key}: prior preservation needs data.buckets: false")
            if concept.class_images < 1 or concept.prior_loss_weight < 0:
                problems.append(f"{key}: class_images must be >= 1 and prior_loss_weight >= 0")
    return problems


def reference_markdown() -> str:
    """The config reference (every key, its type, default and meaning) as Markdown, for the README."""
    lines: list[str] = []

    def section(cls, prefix: str, title: str | None = None) -> None:
        hints = _hints(cls)
        rows = []
        nested = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(tp):
                nested.append((tp, key + "."))
                continue
            if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
                nested.append((typing.get_args(tp)[0], key + "[]."))
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            else:
                default = f.default_factory()  # type: ignore[misc]
            if isinstance(default, bool):
                default = str(default).lower()  # as written in YAML
            shown = "" if default in ("", None, []) else f"`{default}`"
            rows.append(f"| `{key}` | {_type_name(tp)} | {shown} | {f.metadata.get('doc', '')} |")
        if rows:
            lines.append(f"**{title or prefix.rstrip('.') or 'top level'}** — {(cls.__doc__ or '').strip()}\n")
            lines.append("| key | type | default | meaning |")
            lines.append("| --- | --- | --- | --- |")
            lines.extend(rows)
            lines.append("")
        for tp, p in nested:
            section(tp, p)

    section(Config, "")
    from .families.registry import FAMILIES, get_family
    from .methods import get_method_class, method_kinds

    lines += ["**methods** — what `method.kind` chooses.\n", "| method.kind | what it trains |", "| --- | --- |"]
    for kind in method_kinds():
        lines.append(f"| `{kind}` | {' '.join((get_method_class(kind).__doc__ or '').split(chr(10) + chr(10))[0].split())} |")
    lines.append("")
    for name in FAMILIES:  # each family's own model.options
        section(get_family(name).options_class, "model.options.", f"model.options ({name})")
    return "\n".join(lines)
