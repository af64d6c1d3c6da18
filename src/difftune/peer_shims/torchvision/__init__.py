"""A stand-in for torchvision's image transforms, for running the diffusers example scripts on a CPU
machine without torchvision (see ../README.md)."""

__version__ = "0.0+difftune-stand-in"
