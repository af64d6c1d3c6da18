"""Per-concept scores for a run's weights (`difftune eval`, ``validation.eval_every``).

Each *concept* is scored on prompts that carry its trigger (how well it is drawn), and the whole
model on trigger-free *neutral* prompts against the base model with the same seeds (how far it
drifted). Two scorers: the world oracle when every prompt is a world caption (the world models),
and CLIP / DINOv2 encoders from the hub everywhere else (see `scorers.py`). `eval.json` (format in
`report.py`) is what other tools read.
"""
