"""torchvision.transforms for PIL images, the part the diffusers example scripts use."""

import enum
import random

from . import functional
from .functional import crop


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _pil(mode):
    from PIL import Image

    return {"nearest": Image.NEAREST, "nearest-exact": Image.NEAREST, "bilinear": Image.BILINEAR,
            "bicubic": Image.BICUBIC, "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}[mode.value]


def _size(size):
    return (size, size) if isinstance(size, int) else tuple(size)


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Resize:
    """An int resizes the shorter side to it (aspect kept); a pair gives (height, width)."""

    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size, self.interpolation = size, interpolation

    def __call__(self, img):
        w, h = img.size
        if isinstance(self.size, int):
            if w <= h:
                new = (self.size, int(self.size * h / w))
            else:
                new = (int(self.size * w / h), self.size)
        else:
            new = (self.size[1], self.size[0])
        return img.resize(new, _pil(self.interpolation))


class CenterCrop:
    def __init__(self, size):
        self.size = _size(size)

    def __call__(self, img):
        th, tw = self.size
        top = int(round((img.height - th) / 2.0))
        left = int(round((img.width - tw) / 2.0))
        return crop(img, top, left, th, tw)


class RandomCrop:
    def __init__(self, size):
        self.size = _size(size)

    @staticmethod
    def get_params(img, output_size):
        th, tw = output_size
        return random.randint(0, img.height - th), random.randint(0, img.width - tw), th, tw

    def __call__(self, img):
        return crop(img, *self.get_params(img, self.size))


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        from PIL import Image

        return img.transpose(Image.FLIP_LEFT_RIGHT) if random.random() < self.p else img


class Lambda:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)


class ToTensor:
    """PIL image -> float tensor [C, H, W] in [0, 1]."""

    def __call__(self, img):
        import numpy as np
        import torch

        a = np.asarray(img, dtype=np.uint8)
        if a.ndim == 2:
            a = a[:, :, None]
        return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div(255.0)


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, t):
        import torch

        mean = torch.tensor(self.mean, dtype=t.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=t.dtype).view(-1, 1, 1)
        return (t - mean) / std
