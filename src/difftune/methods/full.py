"""Full fine-tuning: every weight of the trained parts, kept in fp32 while the rest stays in the
mixed-precision dtype. Output: a complete diffusers pipeline folder (``Family.save_full``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import Method

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from ..config import MethodConfig


class Full(Method):
    """Every weight of the trained parts (fp32 master weights); the output is a complete pipeline folder."""

    kind = "full"

    @classmethod
    def problems(cls, cfg: "MethodConfig") -> list[str]:
        return [f"method.init_lora needs a LoRA method (method.kind: lora), not {cls.kind}"] if cfg.init_lora else []

    def part_dtype(self, weight_dtype: "torch.dtype") -> "torch.dtype":
        import torch

        return torch.float32

    def attach(self, module: Any, part: str, targets: dict[str, list[str]], denoiser: str) -> None:
        module.requires_grad_(True)

    def state_dict(self, module: Any) -> dict:
        from ..families.base import unwrap

        return unwrap(module).state_dict()

    def load_state_dict(self, module: Any, state: dict, where: str) -> None:
        from ..checkpoint import CheckpointError
        from ..families.base import unwrap

        missing, unexpected = unwrap(module).load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{where} weights do not fit ({len(missing)} missing, {len(unexpected)} unexpected)")

    def save(self, family: Any, out_dir: Path, part_names: list[str]) -> None:
        family.save_full(out_dir)
