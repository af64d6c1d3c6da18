"""LoRA through peft, for any part of any family, placed by target-module names.

The family only says which module names to target by default; everything else (config, trainable
parameters, state dicts in diffusers naming, metadata so a loader rebuilds the same rank and alpha,
continuing from an existing LoRA file) is here and family-independent.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import DifftuneError
from ..families.base import unwrap
from ..run_layout import RunLayout
from . import Method

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..config import MethodConfig

ADAPTER = "default"


def targets_for(part: str, defaults: dict[str, list[str]], method: "MethodConfig", denoiser: str) -> Any:
    """Target modules for `part`: the config's `target_modules` for the denoiser, else the family default."""
    if part == denoiser and method.target_modules:
        return method.target_modules
    if part not in defaults:
        raise DifftuneError(f"no default LoRA targets for part {part!r}; set method.target_modules")
    return defaults[part]


def add_lora(module: Any, part: str, targets: Any, method: "MethodConfig", **peft_options: Any) -> None:
    """Inject a trainable LoRA adapter into `module` (a diffusers model or a transformers encoder).

    Base weights are frozen; LoRA weights are created in fp32 (gaussian A, zero B, so the adapted
    model starts exactly at the base model). `peft_options`: further ``LoraConfig`` fields (variants
    of LoRA such as DoRA set theirs).
    """
    import torch
    from peft import LoraConfig

    rank = method.rank
    config = LoraConfig(
        r=rank,
        lora_alpha=method.alpha if method.alpha is not None else rank,
        lora_dropout=method.dropout,
        init_lora_weights="gaussian",
        target_modules=targets,
        **peft_options,
    )
    module.requires_grad_(False)
    try:
        module.add_adapter(config)
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise DifftuneError(f"method.target_modules {targets!r} matched no layer of {part}: {e}") from None
    for p in module.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.float32)


def lora_state_dict(module: Any) -> dict:
    """The adapter weights of `module` in peft naming (``.lora_A.`` / ``.lora_B.``), what the diffusers
    training scripts write and every diffusers loader reads.

    Not diffusers' older ``.lora.down`` naming: `convert_state_dict_to_diffusers` renames only some
    layer types, and a file mixing both namings loses adapters silently when loaded (the loader
    decides from the first key). Checkpoints store the same dict; `set_lora_state_dict` restores it.
    """
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unwrap(module), adapter_name=ADAPTER)


def set_lora_state_dict(module: Any, state: dict, where: str) -> None:
    """Load peft-named adapter weights into `module`; every key must land (no silent second adapter)."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unwrap(module), state, adapter_name=ADAPTER)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise DifftuneError(f"{where}: {len(unexpected)} LoRA weights do not fit this model (e.g. {unexpected[0]})")


def lora_metadata(module: Any) -> dict:
    """The LoraConfig of `module` as a dict (rank, alpha, targets), stored in the saved file."""
    return unwrap(module).peft_config[ADAPTER].to_dict()


def init_from_lora(family: Any, path: str, parts: list[str]) -> None:
    """Start training from an existing diffusers-format LoRA (``method.init_lora``).

    The file must have been made for the same parts, rank and targets: a mismatch is an error,
    never a silently ignored or partially loaded adapter.
    """
    import torch
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    p = Path(path)
    file = RunLayout(p).lora if p.is_dir() else p
    if not file.is_file():
        raise DifftuneError(f"method.init_lora: no LoRA file at {file}")
    try:
        weights = load_file(str(file))
    except Exception as e:
        raise DifftuneError(f"method.init_lora: {file} is not a readable safetensors file ({e})") from None
    for part in parts:
        prefix = f"{part}."
        sub = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        if not sub and len(parts) == 1 and not any(k.startswith(f"{p}.") for p in family.parts for k in weights):
            sub = weights  # one model's adapter (`save_lora_adapter`'s layout) has no part prefix
        if not sub:
            raise DifftuneError(f"method.init_lora: {file} has no weights for {part} (keys start with "
                                f"{sorted({k.split('.')[0] for k in weights})})")
        sub = convert_unet_state_dict_to_peft(sub)
        model = unwrap(family.parts[part])
        expected = lora_state_dict(model)
        missing = sorted(set(expected) - set(sub))
        extra = sorted(set(sub) - set(expected))
        if missing or extra:
            raise DifftuneError(
                f"method.init_lora: {file} does not match the {part} LoRA of this config "
                f"({len(missing)} missing, {len(extra)} unexpected weights; check method.target_modules)"
            )
        for key, tensor in sub.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise DifftuneError(
                    f"method.init_lora: {key} has shape {tuple(tensor.shape)} but this config makes "
                    f"{tuple(expected[key].shape)} (check method.rank)"
                )
        set_lora_state_dict(model, {k: v.to(torch.float32) for k, v in sub.items()}, f"method.init_lora {file}")


class Lora(Method):
    """Low-rank adapters (peft) on the family's target modules; the base weights stay frozen.

    Output: ``pytorch_lora_weights.safetensors`` written by the family (``Family.save_lora``), which
    the pipeline's ``load_lora_weights`` reads.
    """

    kind = "lora"
    adapter = True
    low_precision_base = True
    #: further peft ``LoraConfig`` fields of this variant of LoRA
    peft_options: dict[str, Any] = {}

    @classmethod
    def problems(cls, cfg: "MethodConfig") -> list[str]:
        problems = []
        if cfg.rank <= 0:
            problems.append(f"method.rank must be > 0, got {cfg.rank}")
        if cfg.alpha is not None and cfg.alpha <= 0:
            problems.append(f"method.alpha must be > 0, got {cfg.alpha}")
        if not 0.0 <= cfg.dropout < 1.0:
            problems.append(f"method.dropout must be in [0, 1), got {cfg.dropout}")
        return problems

    def label(self) -> str:
        return f"{self.kind}{self.cfg.rank}"

    def describe(self) -> str:
        return f"{self.kind}, rank {self.cfg.rank}, alpha {self.cfg.alpha or self.cfg.rank}"

    def attach(self, module: Any, part: str, targets: dict[str, list[str]], denoiser: str) -> None:
        add_lora(module, part, targets_for(part, targets, self.cfg, denoiser), self.cfg, **self.peft_options)

    def start(self, family: Any, part_names: list[str], log) -> None:
        if self.cfg.init_lora:
            init_from_lora(family, self.cfg.init_lora, part_names)
            log(f"starting from LoRA {self.cfg.init_lora}")

    def state_dict(self, module: Any) -> dict:
        return lora_state_dict(module)

    def load_state_dict(self, module: Any, state: dict, where: str) -> None:
        set_lora_state_dict(module, state, where)

    def save(self, family: Any, out_dir: Path, part_names: list[str]) -> None:
        family.save_lora(
            out_dir,
            {n: lora_state_dict(family.parts[n]) for n in part_names},
            {n: lora_metadata(family.parts[n]) for n in part_names},
        )


def adapters_disabled(module: Any):
    """A context in which `module` runs as its base model (every LoRA adapter off), then on again."""
    import contextlib

    @contextlib.contextmanager
    def off():
        model = unwrap(module)
        model.disable_adapters()
        try:
            yield
        finally:
            model.enable_adapters()

    return off()


def lora_deltas(module: Any) -> dict[str, tuple[Any, Any, Any]]:
    """Every LoRA layer of `module`: name -> (A, B, scaling), the adapter's weight delta being
    ``scaling * B.flatten(1) @ A.flatten(1)`` (linear layers; for convolutions, B is 1x1 and A has
    the kernel, so the delta is the flattened kernel delta)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, layer in unwrap(module).named_modules():
        if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A and hasattr(layer.lora_A[ADAPTER], "weight"):
            out[name] = (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, layer.scaling[ADAPTER])
    return out
