"""Stable Diffusion XL (``StableDiffusionXLPipeline``)."""
