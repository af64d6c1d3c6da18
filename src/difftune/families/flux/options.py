"""FLUX.1's own config keys (``model.options.*``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...config import doc_field

#: FluxPipeline refuses longer T5 sequences
MAX_T5_TOKENS = 512

#: keys of older configs -> where they live now (a clear error names the new key)
MOVED = {
    "objective.guidance": "model.options.guidance",
    "objective.max_sequence_length": "model.options.max_sequence_length",
}
#: what older versions wrote for them by default in every saved config.yaml (dropped without a word)
WRITTEN_BY_DEFAULT = {"objective.guidance": 1.0, "objective.max_sequence_length": None}


@dataclass
class FluxOptions:
    """`flux`: the guidance value, the T5 sequence length, and whether T5 trains."""

    guidance: float = doc_field(
        1.0, "Guidance-distilled checkpoints (FLUX.1-dev): the value fed to the guidance embedding while training; "
        "schnell has none."
    )
    max_sequence_length: Optional[int] = doc_field(
        None, f"T5 tokens per prompt, 1-{MAX_T5_TOKENS}; default {MAX_T5_TOKENS}, as FLUX.1-dev was trained."
    )

    train_t5: bool = doc_field(
        False, "Full fine-tunes with `method.train_text_encoder`: train T5 as well as CLIP (diffusers' FLUX script "
        "trains CLIP only; difftune's world pretraining trains both, as text tokens carry word order)."
    )

    def problems(self) -> list[str]:
        n = self.max_sequence_length
        if n is not None and not 1 <= n <= MAX_T5_TOKENS:
            return [f"model.options.max_sequence_length must be between 1 and {MAX_T5_TOKENS} for FLUX, got {n}"]
        return []
