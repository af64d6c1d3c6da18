"""torchvision.transforms.functional, the part the diffusers example scripts call."""


def crop(img, top: int, left: int, height: int, width: int):
    return img.crop((left, top, left + width, top + height))


def pil_to_tensor(img):
    """PIL image -> uint8 tensor [C, H, W] (transformers imports this name when torchvision is present)."""
    import numpy as np
    import torch

    a = np.asarray(img, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a.copy()).permute(2, 0, 1)
