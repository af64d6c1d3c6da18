"""The procedural world: scenes and captions (`scenes`), the oracle (`oracle`), byte-level tokenizers
(`tokenizers`), from-scratch pretraining (`pretrain`) and the shipped base models (`models/`)."""
