"""difftune: fine-tune text-to-image diffusion models on your own pictures.

The package root stays import-light on purpose: `difftune --help` must be instant, so heavy
libraries (torch, diffusers, transformers) are imported inside the functions that need them.
"""

__version__ = "0.1.0"


class DifftuneError(Exception):
    """An error caused by the user's input (config, data, paths). The CLI prints it as one line."""


def _light_imports() -> None:
    from .util.imports import defer_deepspeed

    defer_deepspeed()


_light_imports()
