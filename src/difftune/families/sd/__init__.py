"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``)."""
