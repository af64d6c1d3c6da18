"""LoRA file layouts and conversions between them; no family is named here."""
