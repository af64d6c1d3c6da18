"""ControlNets for `difftune generate`: ``--controlnet PATH_OR_ID[:SCALE]`` (several: diffusers'
multi-ControlNet), their control images, and control images made from photos.

The family names the ControlNet model class its pipelines take (``Family.controlnet_class``:
``ControlNetModel`` for SD 1.x/2.x, ``FluxControlNetModel`` for FLUX.1); a local ControlNet folder's
``config.json`` tells its class, so one for another family is refused before anything loads.

Control images: ``--control-image IMG`` is used as it is (``--control none``), or made from the
photo with ``--control canny`` (OpenCV's Canny edge detector: white edges on black, thresholds
``--canny LOW,HIGH``) or ``--control depth`` (a depth map from the transformers depth-estimation
pipeline of ``--depth-model ID``, near = bright). Give one image and kind for all ControlNets or
one per ControlNet, in order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import DifftuneError
from .loras import parse_spec

KINDS = ("none", "canny", "depth")


def parse(specs: list[str]) -> list[tuple[str, float]]:
    return [parse_spec(s, "--controlnet") for s in specs]


def check(controlnets: list[tuple[str, float]], family: Any) -> None:
    """One line if the family has no ControlNet pipelines or a local ControlNet is of another class."""
    if not controlnets:
        return
    if family.controlnet_class is None or "controlnet" not in family.task_pipelines:
        raise DifftuneError(f"--controlnet: the {family.name} family has no ControlNet pipeline in diffusers")
    for path, _ in controlnets:
        local = Path(path).expanduser()
        if not local.exists():
            continue  # a hub id; loading will tell
        config = local / "config.json"
        if not config.is_file():
            raise DifftuneError(f"--controlnet {path}: not a ControlNet folder (no config.json)")
        try:
            found = json.loads(config.read_text()).get("_class_name")
        except (ValueError, OSError) as e:
            raise DifftuneError(f"--controlnet {path}: unreadable config.json ({e})") from None
        if found != family.controlnet_class:
            owner = _family_of(found)
            raise DifftuneError(
                f"--controlnet {path}: a {found}{f' (for the {owner} family)' if owner else ''}, but the model is "
                f"{family.name}, whose pipelines take a {family.controlnet_class}"
            )


def _family_of(class_name: str | None) -> str | None:
    from ..families.registry import FAMILIES, get_family

    for name in FAMILIES:
        try:
            if get_family(name).controlnet_class == class_name:
                return name
        except DifftuneError:
            continue
    return None


def load(controlnets: list[tuple[str, float]], family: Any, dtype: Any) -> Any:
    """The ControlNet model (one) or a list of them (several) in `dtype`, on the CPU."""
    import diffusers

    cls = getattr(diffusers, family.controlnet_class)
    models = []
    for path, _ in controlnets:
        try:
            models.append(cls.from_pretrained(str(Path(path).expanduser()) if Path(path).expanduser().exists() else path,
                                              dtype=dtype))
        except Exception as e:
            raise DifftuneError(f"--controlnet {path}: cannot load it as a {cls.__name__} ({type(e).__name__}: {e})") from None
    return models[0] if len(models) == 1 else models


def per_controlnet(values: list, n: int, flag: str, default: Any = None) -> list:
    """One value per ControlNet: `values` as given (n of them), or one repeated, or `default`."""
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise DifftuneError(f"{flag}: give one for all {n} ControlNets or one per ControlNet, not {len(values)}")
    return list(values)


def canny(image: Any, low: int = 100, high: int = 200) -> Any:
    """Canny edges of `image` (PIL): white edges on black, RGB, same size."""
    import numpy as np
    from PIL import Image

    try:
        import cv2
    except ImportError:
        raise DifftuneError("--control canny needs OpenCV: pip install opencv-python-headless") from None
    gray = np.asarray(image.convert("L"))
    edges = cv2.Canny(gray, low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def depth(image: Any, model: str | None) -> Any:
    """A depth map of `image` from transformers' depth-estimation pipeline with `model`, as RGB."""
    if not model:
        raise DifftuneError("--control depth needs --depth-model ID_OR_FOLDER (a transformers depth-estimation model, "
                            "e.g. Intel/dpt-hybrid-midas)")
    from transformers import pipeline

    try:
        estimator = pipeline("depth-estimation", model=model)
        return estimator(image)["depth"].convert("RGB")
    except Exception as e:
        raise DifftuneError(f"--depth-model {model}: cannot estimate depth with it ({type(e).__name__}: {e})") from None


def make(image: Any, kind: str, *, thresholds: tuple[int, int] = (100, 200), depth_model: str | None = None) -> Any:
    """The control image of kind `kind` made from the photo `image`."""
    if kind == "canny":
        return canny(image, *thresholds)
    if kind == "depth":
        return depth(image, depth_model)
    return image
