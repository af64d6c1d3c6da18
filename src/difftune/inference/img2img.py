"""Image inputs of `difftune generate`: the init image (img2img), the mask (inpainting) and strength.

The init image sets the output size unless ``--width`` / ``--height`` say otherwise (rounded down to
what the model needs); the mask is resized to the output size, white = repaint, black = keep, as in
diffusers' inpainting pipelines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import DifftuneError


def open_image(path: str | Path, flag: str, mode: str = "RGB") -> Any:
    """A PIL image in `mode`, fully read; one line naming `flag` if it is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.is_file():
        raise DifftuneError(f"{flag} {path}: no such file")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert(mode)
    except (UnidentifiedImageError, OSError) as e:
        raise DifftuneError(f"{flag} {path}: not a readable image ({type(e).__name__}: {e})") from None


def check_strength(strength: float | None, has_init: bool) -> None:
    if strength is None:
        return
    if not has_init:
        raise DifftuneError("--strength needs --init-image (how far to move away from that image)")
    if not 0.0 <= strength <= 1.0:
        raise DifftuneError(f"--strength {strength}: must be between 0 (keep the init image) and 1 (ignore it)")


def fit(image: Any, width: int, height: int) -> Any:
    """`image` resized to `width` x `height` (no-op when it already is)."""
    from PIL import Image

    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


def zero_steps(steps: int, strength: float | None) -> bool:
    """Whether img2img at `strength` runs no denoising step (diffusers' pipelines denoise
    ``int(steps * strength)`` steps and fail on none)."""
    return strength is not None and int(steps * strength) < 1


def round_trip(pipe: Any, autoencoder: str, image: Any) -> Any:
    """`image` through the pipeline's autoencoder (encode, posterior mode, decode): what img2img with no
    denoising step returns, the init image within the autoencoder's reconstruction error."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    vae = getattr(pipe, autoencoder)
    processor = getattr(pipe, "image_processor", None) or VaeImageProcessor()
    with torch.no_grad():
        x = processor.preprocess(image).to(vae.device, vae.dtype)
        encoded = vae.encode(x)
        latents = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
        decoded = vae.decode(latents).sample
    return processor.postprocess(decoded.float(), output_type="pil")[0]
