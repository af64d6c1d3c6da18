"""Every path under a run's ``output_dir``, named once.

The same conventions as diffusers' training examples: the LoRA in ``pytorch_lora_weights.safetensors``
(or a full pipeline folder) at the top, checkpoints in ``checkpoints/``, logs in ``logs/``. Code that
reads or writes a run's files asks a `RunLayout` for the path instead of spelling it.
"""

from __future__ import annotations

from pathlib import Path

#: the LoRA file diffusers' ``save_lora_weights`` writes and ``load_lora_weights`` reads in a folder
LORA_FILE = "pytorch_lora_weights.safetensors"


class RunLayout:
    """The files and folders of one run."""

    def __init__(self, output_dir: str | Path):
        self.root = Path(output_dir)

    @property
    def config(self) -> Path:
        """The resolved config of the run (``config.yaml``)."""
        return self.root / "config.yaml"

    @property
    def lora(self) -> Path:
        """The trained LoRA of a LoRA run."""
        return self.root / LORA_FILE

    @property
    def checkpoints(self) -> Path:
        """Folder of the ``step-NNNNNNNN`` checkpoints (their inside is checkpoint.py's)."""
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        """Tensorboard logs and the per-step log."""
        return self.root / "logs"

    @property
    def loss_log(self) -> Path:
        """One JSON line per optimizer step: step, loss, lr, grad_norm."""
        return self.logs / "loss.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    def samples_at(self, step: int) -> Path:
        """Validation images of one training step (numbered as checkpoints are)."""
        return self.samples / f"step-{step:08d}"

    @property
    def cache(self) -> Path:
        """Default home of the feature caches (``data.cache_dir`` moves them)."""
        return self.root / "cache"

    @property
    def report(self) -> Path:
        return self.root / "report.md"
