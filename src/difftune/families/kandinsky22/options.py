"""The Kandinsky 2.2 families' own config keys (``model.options.*``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...config import doc_field

#: keys of older configs -> where they live now (a clear error names the new key)
MOVED = {"model.prior": "model.options.prior", "model.decoder": "model.options.decoder"}
#: what older versions wrote for them by default in every saved config.yaml (dropped without a word)
WRITTEN_BY_DEFAULT = {"model.prior": None, "model.decoder": None}


@dataclass
class DecoderOptions:
    """`kandinsky22-decoder`: the decoder is conditioned on CLIP image embeddings made by a prior pipeline."""

    prior: Optional[str] = doc_field(
        None,
        "Required: the prior pipeline (hub id or folder, e.g. `kandinsky-community/kandinsky-2-2-prior`) whose "
        "CLIP image encoder makes the decoder's conditioning embeddings, and which draws validation samples.",
        resume_locked=True,
        path="local_or_hub",
    )


@dataclass
class PriorOptions:
    """`kandinsky22-prior`: the prior makes image embeddings; images need a decoder."""

    decoder: Optional[str] = doc_field(
        None,
        "A decoder pipeline that turns the prior's embeddings into validation images; needed only with "
        "`validation.prompts`.",
        path="local_or_hub",
    )
