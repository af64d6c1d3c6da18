"""`difftune plan`: per-device memory of a training config under each strategy, and the one to use.

The model is built on the meta device from its config files (no weights are read or downloaded
beyond ``model_index.json`` and the parts' ``config.json``), the method is attached as training
attaches it, and the parameters are counted. From the counts, per device:

- weights: trained parameters in fp32 (difftune keeps them fp32 under mixed precision), frozen ones
  in ``train.precision``'s dtype; the parts training keeps on the device (the trained parts and the
  autoencoder; text encoders leave after their prompts are cached unless they are trained);
- gradients: fp32, one per trained parameter; optimizer: AdamW's two fp32 moments (8 bytes per trained
  parameter; 2 with ``adamw8bit``);
- activations of the denoiser for one micro-batch, for transformer denoisers (blocks of width ``h``
  over ``s`` tokens): about ``34 * s * h`` bytes per block per sample in 16-bit without gradient
  checkpointing (Korthikanti et al. 2022, with flash attention), ``2 * s * h`` per block plus one
  block's full set with it. UNets mix resolutions too much for that rule: use ``difftune bench``;
- strategy: ``ddp`` holds everything; ``fsdp`` divides trained parts' weights, gradients and optimizer
  states by the process count and adds two unsharded blocks (the one computing, the one prefetched);
  ``deepspeed`` ZeRO-2 divides gradients and optimizer states, ZeRO-3 the weights too; CPU offload
  leaves only the working blocks on the device.

Add 10 % and about 2 GB per device for the framework, caches and fragmentation (``OVERHEAD``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from .. import DifftuneError

GB = 1e9
#: per-device allowance for the CUDA/XLA context, allocator caches and fragmentation
OVERHEAD_BYTES = 2 * GB
OVERHEAD_FRACTION = 0.10

EXAMPLES = """examples:
  difftune plan configs/flux-dev-full.yaml --gpus 8 --gpu-memory 80
  difftune plan configs/sd15-dreambooth-lora.yaml --gpus 1 --gpu-memory 24 train.batch_size=4
"""


@dataclass
class Counts:
    """Parameter counts of a training setup (what the estimate needs)."""

    trained_parts: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (trainable, frozen)
    resident_frozen: int = 0          # parameters of other parts kept on the device (autoencoder)
    largest_block: int = 0            # parameters of the largest FSDP unit of a trained part
    blocks: int = 0                   # transformer blocks of the denoiser (0: no activation estimate)
    width: int = 0                    # their hidden width
    tokens: int = 0                   # tokens per sample at the training resolution

    @property
    def trainable(self) -> int:
        return sum(t for t, _ in self.trained_parts.values())

    @property
    def frozen_in_trained(self) -> int:
        return sum(f for _, f in self.trained_parts.values())


@dataclass
class Estimate:
    strategy: str
    weights: float
    gradients: float
    optimizer: float
    activations: float | None
    total: float

    def fits(self, memory: float) -> bool:
        return self.total <= memory


def activations(c: Counts, batch: int, checkpointing: bool, bytes_per: int = 2) -> float | None:
    if not c.blocks:
        return None
    per_block = 34 * c.tokens * c.width * bytes_per / 2 * batch  # the 34 of the rule counts 16-bit values
    if checkpointing:
        return c.blocks * 2 * c.tokens * c.width * bytes_per * batch + per_block
    return c.blocks * per_block


def estimates(c: Counts, *, gpus: int, precision: str, batch: int, checkpointing: bool,
              optimizer: str = "adamw") -> list[Estimate]:
    """Per-device bytes for each strategy (see the module docstring for the model)."""
    frozen_bytes = 4 if precision == "no" else 2
    opt_bytes = 2 if optimizer == "adamw8bit" else 8
    t, f, r = c.trainable, c.frozen_in_trained, c.resident_frozen
    act = activations(c, batch, checkpointing)
    act_b = act or 0.0
    unit = 2 * c.largest_block * 4  # two unsharded fp32 blocks (computing and prefetched)
    rows = []

    def row(name, weights, grads, opt):
        total = (weights + grads + opt + act_b) * (1 + OVERHEAD_FRACTION) + OVERHEAD_BYTES
        rows.append(Estimate(name, weights, grads, opt, act, total))

    row("ddp", 4 * t + frozen_bytes * (f + r), 2 * 4 * t, opt_bytes * t)  # DDP keeps a gradient bucket copy
    if gpus > 1:
        row("fsdp", (4 * t + frozen_bytes * f) / gpus + frozen_bytes * r + unit, 4 * t / gpus, opt_bytes * t / gpus)
        row("fsdp + cpu_offload", frozen_bytes * r + unit, 0.0, 0.0)
        # ZeRO through accelerate: 16-bit weights, fp32 master copy and moments in the optimizer (12 bytes)
        row("deepspeed zero_stage=2", 2 * (t + f) + frozen_bytes * r, 2 * t / gpus, 12 * t / gpus)
        row("deepspeed zero_stage=3", 2 * (t + f) / gpus + frozen_bytes * r + unit / 2, 2 * t / gpus, 12 * t / gpus)
    return rows


#: the order a suggestion prefers (fastest first)
PREFERENCE = ["ddp", "fsdp", "deepspeed zero_stage=2", "deepspeed zero_stage=3", "fsdp + cpu_offload"]


def suggest(rows: list[Estimate], memory: float) -> Estimate | None:
    fitting = [r for r in rows if r.fits(memory)]
    return min(fitting, key=lambda r: PREFERENCE.index(r.strategy)) if fitting else None


# ---- counting ----------------------------------------------------------------------------------


def _meta_part(path: str, name: str, spec: list, revision: str | None) -> Any:
    """One pipeline part built on the meta device from its config file (None if not a torch module)."""
    import importlib

    import torch

    library, class_name = spec
    cls = getattr(importlib.import_module(library), class_name)
    if not issubclass(cls, torch.nn.Module):
        return None
    try:
        with torch.device("meta"):
            if hasattr(cls, "from_config"):  # diffusers
                return cls.from_config(cls.load_config(path, subfolder=name, revision=revision))
            config = cls.config_class.from_pretrained(path, subfolder=name, revision=revision)
            return cls(config)
    except Exception as e:
        raise DifftuneError(f"plan: cannot read the config of {name} ({class_name}) in {path}: {type(e).__name__}: {e}") from None


def count(cfg: Any, parts: dict, family: Any, part_names: list[str]) -> Counts:
    """Counts of a family whose parts are built and whose method is attached (real or meta modules)."""
    import torch

    from ..families.base import unwrap
    from .fsdp import block_modules

    c = Counts()
    for name in part_names:
        module = unwrap(parts[name])
        params = list(module.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        c.trained_parts[name] = (trainable, sum(p.numel() for p in params) - trainable)
        blocks = block_modules(module, family.shard_blocks(name, module))
        c.largest_block = max([c.largest_block, *(sum(p.numel() for p in b.parameters()) for b in blocks)])
    if family.autoencoder and isinstance(parts.get(family.autoencoder), torch.nn.Module):
        c.resident_frozen = sum(p.numel() for p in parts[family.autoencoder].parameters())
    denoiser = unwrap(parts[family.denoiser])
    conf = getattr(denoiser, "config", {})
    heads, head_dim = conf.get("num_attention_heads"), conf.get("attention_head_dim")
    if isinstance(heads, int) and isinstance(head_dim, int) and "num_layers" in conf:
        c.blocks = conf.get("num_layers", 0) + conf.get("num_single_layers", 0)
        c.width = heads * head_dim
        factor = family.resolution_multiple(cfg.model.path, cfg.model.revision) * conf.get("patch_size", 1)
        text = getattr(family, "max_sequence_length", 0) or 0  # e.g. FLUX: model.options or its default
        c.tokens = (cfg.data.resolution // factor) ** 2 + text
    return c


def count_config(cfg: Any) -> Counts:
    """Counts for a config, from the model's config files only (meta device)."""
    import torch

    from ..families.base import pipeline_parts, read_model_index
    from ..families.registry import resolve_family
    from ..train import attach_method

    m = cfg.model
    family_cls = resolve_family(m.path, m.family, m.revision)
    family = family_cls(cfg, torch.device("meta"), torch.bfloat16)
    family.index = read_model_index(m.path, m.revision)
    for name, spec in pipeline_parts(family.index).items():
        part = _meta_part(m.path, name, spec, m.revision)
        if part is not None:
            family.parts[name] = part
    missing = [n for n in family.trainable_part_names() if n not in family.parts]
    if missing:
        raise DifftuneError(f"plan: {m.path} has no {', '.join(missing)}")
    names = attach_method(family, cfg)
    return count(cfg, family.parts, family, names)


# ---- output ------------------------------------------------------------------------------------


def _gb(x: float | None) -> str:
    return "n/a" if x is None else f"{x / GB:.1f}"


def report(cfg: Any, c: Counts, gpus: int, memory_gb: float) -> str:
    t = cfg.train
    lines = [f"{cfg.model.path}: {cfg.method.kind}, {c.trainable / 1e6:,.1f}M trained parameters "
             f"({', '.join(c.trained_parts)}), {c.frozen_in_trained / 1e6:,.1f}M frozen in them, "
             f"{c.resident_frozen / 1e6:,.1f}M in other parts kept on the device",
             f"per device, GB (batch_size {t.batch_size}, resolution {cfg.data.resolution}, precision {t.precision}, "
             f"{gpus} devices of {memory_gb:g} GB):",
             f"{'strategy':<24}{'weights':>9}{'grads':>8}{'optim':>8}{'activ.':>8}{'total':>8}  fits"]
    for checkpointing in (False, True):
        rows = estimates(c, gpus=gpus, precision=t.precision, batch=t.batch_size, checkpointing=checkpointing,
                         optimizer=t.optimizer)
        lines.append(f"gradient_checkpointing={str(checkpointing).lower()}:")
        for r in rows:
            lines.append(f"  {r.strategy:<22}{_gb(r.weights):>9}{_gb(r.gradients):>8}{_gb(r.optimizer):>8}"
                         f"{_gb(r.activations):>8}{_gb(r.total):>8}  {'yes' if r.fits(memory_gb * GB) else 'no'}")
    lines.append("totals add 10% and 2 GB per device; activations n/a: not estimated for this denoiser "
                 "(measure with difftune bench)" if not c.blocks else "totals add 10% and 2 GB per device")
    lines.append(suggestion(cfg, c, gpus, memory_gb))
    return "\n".join(lines)


def suggestion(cfg: Any, c: Counts, gpus: int, memory_gb: float) -> str:
    t = cfg.train
    for checkpointing in sorted({t.gradient_checkpointing, True}):
        rows = estimates(c, gpus=gpus, precision=t.precision, batch=t.batch_size, checkpointing=checkpointing,
                         optimizer=t.optimizer)
        best = suggest(rows, memory_gb * GB)
        if best:
            name = best.strategy.replace(" + cpu_offload", "").replace(" zero_stage=", " ")
            keys = {"ddp": "parallel.strategy=ddp", "fsdp": "parallel.strategy=fsdp"}
            key = keys.get(name, "parallel.strategy=deepspeed parallel.zero_stage=" + name[-1])
            if "cpu_offload" in best.strategy:
                key += " parallel.cpu_offload=true"
            if checkpointing and not t.gradient_checkpointing:
                key += " train.gradient_checkpointing=true"
            return f"suggestion: {key} (about {best.total / GB:.0f} GB of {memory_gb:g} GB per device)"
    return (f"suggestion: nothing fits {gpus} x {memory_gb:g} GB; lower train.batch_size or data.resolution, "
            "use method.kind=lora, or more devices")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="override config values")
    parser.add_argument("--gpus", type=int, default=1, help="devices (processes) to plan for (default 1)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="memory per device in GB (default 80)")


def run(args: argparse.Namespace) -> int:
    from ..config import load_config

    if args.gpus < 1 or args.gpu_memory <= 0:
        raise DifftuneError("--gpus must be >= 1 and --gpu-memory > 0")
    cfg = load_config(args.config, args.overrides)
    if not cfg.model.path:
        raise DifftuneError("model.path is required (a hub id or a local diffusers folder)")
    print(report(cfg, count_config(cfg), args.gpus, args.gpu_memory))
    return 0
