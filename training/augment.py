"""Image transforms for overhead imagery: PIL in, normalised float tensor [3, size, size] out.

Aerial and satellite scenes have no "up": a parking lot rotated by 90 degrees or mirrored is still
a parking lot, so training uses all eight flips/rotations of the square, not only the horizontal
flip that photos of the ground allow. Colour jitter stays mild because colour carries meaning
here (water, vegetation, bare soil).

Randomness comes from an explicit `random.Random` passed per call, so the same seed gives the same
augmentation in any process (CaptionDataset seeds one per (seed, epoch, index); see training.data).
Without one, the module-level `random` is used.

The transforms are classes, not closures, so DataLoader workers can pickle them under any start
method.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image

# One dihedral-group element per (horizontal flip, vertical flip, quarter turns): 16 draws cover
# the 8 symmetries of the square twice each, so every orientation is equally likely.
_ROTATIONS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, what PIL's "L" mode uses


def to_normalised_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image -> float32 tensor [3, H, W], (x/255 - mean) / std per channel."""
    x = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return _normalise(x, mean, std)


def _normalise(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def random_resized_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                       rng: random.Random) -> tuple[int, int, int, int]:
    """A crop box (left, top, right, bottom) covering a random `scale` fraction of the area with a
    random aspect ratio (log-uniform in `ratio`); the centre crop if ten draws do not fit."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    side = min(width, height)
    return centre_square(width, height, side)


def centre_square(width: int, height: int, side: int) -> tuple[int, int, int, int]:
    left = (width - side) // 2
    top = (height - side) // 2
    return left, top, left + side, top + side


def centre_square_resized(image: Image.Image, size: int) -> Image.Image:
    """The image's centre square resized to size x size in one bicubic resample (RGB): the same
    picture as resize-then-crop, and it copes with the UCM images a pixel short of 256."""
    image = image.convert("RGB")
    box = centre_square(image.width, image.height, min(image.width, image.height))
    return image.resize((size, size), Image.Resampling.BICUBIC, box=box)


def colour_jitter(x: np.ndarray, strength: float, rng: random.Random) -> np.ndarray:
    """Brightness, contrast and saturation each scaled by a factor in [1 - strength, 1 + strength];
    x is float [3, N] (channels first) in [0, 1] and stays in it; changed in place.

    Each of the three is affine in RGB, so together they are one 3x3 matrix and an offset: one
    pass over the pixels instead of three (this runs for every training image). The contrast pivot,
    the mean grey level, is linear in the pixels, so it comes from the channel means.
    """
    if strength <= 0:
        return x
    brightness, contrast, saturation = (rng.uniform(1 - strength, 1 + strength) for _ in range(3))
    # saturation: mix each pixel with its grey value; rows are output channels
    sat = saturation * np.eye(3) + (1 - saturation) * np.outer(np.ones(3), _LUMA)
    # contrast: scale about the mean grey level of the brightened image
    mean_grey = brightness * float(x.mean(axis=1) @ _LUMA)
    matrix = (contrast * brightness * sat).astype(np.float32)
    offset = (sat @ np.full(3, (1 - contrast) * mean_grey)).astype(np.float32)
    x[:] = matrix @ x
    x += offset[:, None]
    return np.clip(x, 0.0, 1.0, out=x)


class TrainTransform:
    """Random resized crop (aspect 3/4..4/3), flips, quarter turns, mild colour jitter, normalise."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 scale: tuple[float, float] = (0.5, 1.0), jitter: float = 0.2,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.scale, self.ratio, self.jitter = tuple(scale), tuple(ratio), jitter
        self._mean = np.asarray(mean, dtype=np.float32)
        self._inv_std = (1 / np.asarray(std, dtype=np.float64)).astype(np.float32)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        rng = rng if rng is not None else random  # the module-level generator has the same methods
        image = image.convert("RGB")
        box = random_resized_box(image.width, image.height, self.scale, self.ratio, rng)
        # One resample straight from the crop box: no intermediate image, no double blur.
        image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC, box=box)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        rotation = _ROTATIONS[rng.randrange(4)]
        if rotation is not None:
            image = image.transpose(rotation)
        # channels first from here: numpy's per-channel passes are fast over rows, slow over a last
        # axis of 3 (this is most of the dataset's share of a GPU run's time)
        x = np.ascontiguousarray(np.asarray(image, dtype=np.float32).transpose(2, 0, 1)).reshape(3, -1)
        x *= np.float32(1 / 255)
        colour_jitter(x, self.jitter, rng)
        x -= self._mean[:, None]
        x *= self._inv_std[:, None]
        return torch.from_numpy(x.reshape(3, self.image_size, self.image_size))

    def __repr__(self) -> str:
        return (f"TrainTransform(image_size={self.image_size}, scale={self.scale}, ratio={self.ratio}, "
                f"jitter={self.jitter}, mean={self.mean}, std={self.std})")


class EvalTransform:
    """Resize the shorter side to `image_size` and take the centre square (centre_square_resized),
    normalise."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        del rng  # deterministic; accepted so datasets can call every transform the same way
        return to_normalised_tensor(centre_square_resized(image, self.image_size), self.mean, self.std)

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size}, mean={self.mean}, std={self.std})"


# `--augment` choices: "overhead" (the default) is the augmentation above; "none" trains on the
# evaluation transform (resize + centre crop), the baseline of the model card's recipe ablation.
AUGMENTATIONS = ("overhead", "none")


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                    scale: tuple[float, float] = (0.5, 1.0), jitter: float = 0.2,
                    augment: str = "overhead") -> TrainTransform | EvalTransform:
    """The training augmentation; call it as `transform(pil_image, rng)`."""
    if augment == "none":
        return EvalTransform(image_size, mean, std)
    if augment != "overhead":
        raise ValueError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
    return TrainTransform(image_size, mean, std, scale=scale, jitter=jitter)


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> EvalTransform:
    """The evaluation transform; call it as `transform(pil_image)`."""
    return EvalTransform(image_size, mean, std)
