"""DoRA (weight-decomposed low-rank adaptation, Liu et al. 2024) through peft's ``use_dora``: LoRA's
low-rank update for the direction of each adapted weight plus a trained magnitude vector per output.

Everything else is LoRA's: targets, rank, alpha, checkpoints and the output file, which holds the
``lora_magnitude_vector`` weights beside ``lora_A`` / ``lora_B`` and ``use_dora`` in its header, so
``pipe.load_lora_weights(output_dir)`` rebuilds the same adapter.
"""

from __future__ import annotations

from .lora import Lora


class Dora(Lora):
    """DoRA: LoRA on each weight's direction plus a trained magnitude per output (peft `use_dora`); a LoRA file."""

    kind = "dora"
    # peft dequantises nothing for DoRA's weight norm in difftune's fp8 layers: keep the base as it is
    low_precision_base = False
    peft_options = {"use_dora": True}
