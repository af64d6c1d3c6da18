"""Kandinsky 2.2: the prior (``KandinskyV22PriorPipeline``) and the decoder (``KandinskyV22Pipeline``)."""
