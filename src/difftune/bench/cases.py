"""One bench case, and what it runs on: the family's size presets, the run config, the models built
from them with random weights, and random cached inputs of the shapes the family's encoders produce.

Models: ``tiny`` is the pipeline of `difftune.tiny.make_tiny`; ``small`` swaps in a larger denoiser
(CPU-sized); ``real`` builds the published architecture of FLUX.1-dev, SD 1.5 or the Kandinsky 2.2
decoder from its config (each family folder's ``presets.py``) with random weights: the denoiser directly on the device in the
weight dtype, the encoders on the ``meta`` device, where running them costs nothing and yields the
shapes of the cached inputs (``generate`` builds every part on the device). No download is needed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import DifftuneError
from ..families.base import Preset
from ..methods import get_method

MODES = ("train", "bare", "overhead", "baseline", "compare", "generate", "e2e", "baseline-e2e", "flops")

PROMPT = "a photo of sks dog"


def family_presets(family: str) -> dict[str, Preset]:
    """The bench presets of `family` (its folder's ``presets.py``)."""
    from ..families.registry import FAMILIES, family_module

    if family not in FAMILIES:
        raise DifftuneError(f"--family {family!r}: one of {', '.join(FAMILIES)}")
    module = family_module(family, "presets")
    presets = getattr(module, "PRESETS", {}).get(family)
    if not presets:
        have = [n for n in FAMILIES if getattr(family_module(n, "presets"), "PRESETS", {}).get(n)]
        raise DifftuneError(f"--family {family!r}: the bench knows {', '.join(have)}")
    return presets


@dataclass
class Case:
    """One benchmark case; `overrides` are config `key.path=value` strings."""

    family: str = "sd"
    preset: str = "tiny"
    resolution: int | None = None
    batch: int = 1
    method: str = "lora"
    rank: int = 16
    precision: str | None = None
    mode: str = "train"
    steps: int | None = None
    warmup: int = 2
    gen_steps: int = 28
    peak_tflops: float | None = None
    overrides: list[str] = field(default_factory=list)


# ---- building models --------------------------------------------------------------------------------


@contextlib.contextmanager
def _default_dtype(dtype: Any):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_part(like: Any, overrides: dict, device: Any, dtype: Any) -> Any:
    """A randomly initialised module of `like`'s class with `like`'s config updated by `overrides`,
    created directly on `device` (``meta``: no memory) in `dtype`, frozen, in eval mode."""
    import torch

    cls = type(like)
    with torch.device(device), _default_dtype(dtype):
        if hasattr(like.config, "to_dict"):  # transformers: a PretrainedConfig object
            config = type(like.config).from_dict({**like.config.to_dict(), **overrides})
            module = cls(config)
        else:  # diffusers: a FrozenDict of __init__ arguments
            config = {k: v for k, v in dict(like.config).items() if not k.startswith("_")}
            module = cls.from_config({**config, **overrides})
    return module.to(device=device, dtype=dtype).requires_grad_(False).eval()


def tiny_model(family: str, work: Path) -> dict[str, str]:
    """Config keys naming the tiny pipeline of `family` (and any companion), written once under `work`."""
    from ..tiny import make_tiny, tiny_config, tiny_folder

    folder = tiny_folder(family)
    root = work / f"tiny-{folder}"
    if not root.exists():
        make_tiny(folder, root)
    return tiny_config(root, family)


def case_config(case: Case, model: dict[str, str], resolution: int, precision: str, out: Path,
                 data_dir: Path | None = None) -> Any:
    """The run config of `case` on `model` (`tiny_model`'s keys) with its overrides applied, as
    `difftune train` would load it; with `data_dir`, its images are the one concept."""
    from ..config import load_config

    items = {
        **model, "model.family": case.family, "method.kind": case.method, "method.rank": case.rank,
        "data.resolution": resolution, "train.batch_size": case.batch, "train.precision": precision,
        "checkpoint.every": 0, "output_dir": str(out),
    }
    if data_dir is not None:
        items["data.concepts"] = f"[{{dir: '{data_dir}', prompt: '{PROMPT}'}}]"
    if case.steps is not None:
        items["train.steps"] = case.steps
    return load_config(None, [f"{k}={v}" for k, v in items.items()] + list(case.overrides))


def build_family(cfg: Any, device: Any, weight_dtype: Any, preset: Preset, everything_on_device: bool = False) -> Any:
    """The family of `cfg`, loaded from its tiny pipeline, with the preset's parts swapped in: the denoiser
    on `device` (fp32 if fully trained), the other swapped parts on ``meta`` unless `everything_on_device`."""
    import torch

    from ..families.registry import get_family

    family = get_family(cfg.model.family)(cfg, device, weight_dtype)
    family.load()
    trained = set(family.trainable_part_names())
    trained_dtype = get_method(cfg.method).part_dtype(weight_dtype)
    meta = torch.device("meta")
    on_device = {name: everything_on_device or name == family.denoiser for name in preset.parts}
    if device.type != "meta":  # fail before building what cannot fit (the real FLUX on a laptop)
        shapes = {name: build_part(family.parts[name], preset.parts[name], meta, torch.float32)
                  for name, here in on_device.items() if here}
        need = sum(p.numel() * (trained_dtype.itemsize if name in trained else weight_dtype.itemsize)
                   for name, part in shapes.items() for p in part.parameters())
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else _available_ram()
        if need > free:
            raise DifftuneError(
                f"{preset.note} ({', '.join(shapes)}): {need / 1e9:.1f} GB of weights alone, but the {device.type} has "
                f"{free / 1e9:.1f} GB free; use a smaller preset, or --mode flops to count its FLOPs without running it")
    for name, overrides in preset.parts.items():
        dtype = trained_dtype if name in trained else weight_dtype
        family.parts[name] = build_part(family.parts[name], overrides, device if on_device[name] else meta, dtype)
    return family


def _available_ram() -> int:
    import psutil

    return psutil.virtual_memory().available


def cached_inputs(family: Any, resolution: int, batch: int, encoders_device: Any, seed: int = 0) -> tuple[dict, dict]:
    """Random (image features, prompt features) for a batch, shaped and typed as the family's encoders
    output them at `resolution`: floating tensors are standard normal (like scaled latents and
    embeddings), integer and boolean ones (token masks) all ones. The encoders run once, on
    `encoders_device` (``meta`` for the real presets), just for the shapes."""
    import torch

    device = family.device
    family.device = encoders_device
    try:
        with torch.no_grad():
            pixels = torch.zeros(1, 3, resolution, resolution, device=encoders_device)
            image = family.encode_images(pixels)
            prompt = family.encode_prompts([PROMPT])
    finally:
        family.device = device
    generator = torch.Generator().manual_seed(seed)

    def fill(t: Any) -> Any:
        shape = (batch, *t.shape[1:])
        if t.is_floating_point():
            return torch.randn(shape, generator=generator).to(device=device, dtype=t.dtype)
        return torch.ones(shape, dtype=t.dtype, device=device)

    return {k: fill(v) for k, v in image.items()}, {k: fill(v) for k, v in prompt.items()}


def denoiser_call(family: Any, objective: Any, images: dict, prompts: dict) -> tuple[tuple, dict]:
    """The positional and keyword arguments `family.predict` passes to the denoiser for these cached
    inputs (at timesteps the objective draws): what ``bare`` mode and the FLOP count run it on."""
    import torch

    from ..families.base import unwrap

    features = {k: v for k, v in images.items() if k != "x0"}
    features.update(prompts)
    x0 = images["x0"].float()
    generator = torch.Generator().manual_seed(0)
    t = objective.sample_timesteps(x0, generator)
    x_t = torch.randn(x0.shape, generator=generator).to(x0.device)
    seen: dict[str, Any] = {}
    hook = unwrap(family.parts[family.denoiser]).register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(args=args, kwargs=kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            family.predict(x_t, t, features)
    finally:
        hook.remove()
    return seen["args"], seen["kwargs"]


# ---- the re-created diffusers example ------------------------------------------------------------------


def baseline_for(family: str) -> Any:
    """The re-created diffusers example `family` is compared with (its folder's ``peer.py``: ``PEER``)."""
    from ..families.registry import FAMILIES, family_module

    peer = getattr(family_module(family, "peer"), "PEER", None)
    if peer is None:
        have = [n for n in FAMILIES if getattr(family_module(n, "peer"), "PEER", None) is not None]
        raise DifftuneError(f"no re-created diffusers script for {family} (have: {', '.join(have)})")
    return peer
