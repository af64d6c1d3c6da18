"""FLUX.1 dev and schnell (``FluxPipeline``)."""
