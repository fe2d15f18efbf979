"""Training images decoded once and augmented on the training device (`train --images-on-device`).

Without it the data loader's processes decode and augment every image of every step with PIL
(decode, crop, resize, flips, jitter). On a GPU with a small dataset that is what bounds a run: the
default checkpoint's run got about 2,500 samples/s out of 14 loader processes on an H100. With it:

- `ImageBank` decodes every training image once, as its centre square resized to the bank's side,
  into one uint8 tensor on the device (the default recipe's 11,180 images at 128 px: 550 MB), and
  tells each CaptionDataset which bank row holds each of its records (-1: unreadable); under DDP
  each process decodes its share and the processes all-gather the rest;
- the loader's processes then only pick each item's caption and label (the same draws as without
  the bank) and hand over bank rows instead of pixels;
- `BankAugment` augments a whole batch in one pass on the device: the same random resized crop
  (scale and aspect as training.augment), the eight flips and quarter turns, and the same colour
  jitter (brightness, contrast, saturation as one 3x3 matrix and offset), then normalises. Crop and
  orientation are one affine resampling (bicubic) per image, supersampled k x k when the bank is
  k times the training resolution (`--bank-size`), so that detail does not alias.

The crop is taken from the bank's centre square, not from the whole picture: the same for the
square scenes of RSSCN7, UC Merced and AID. Its parameters are drawn on the CPU for the whole global batch
from a generator seeded by (seed, step), so a resumed run, and a run on any number of processes or
any device, augments each sample as the first one did.
"""
from __future__ import annotations

import math
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import data as D
from .augment import _LUMA, EvalTransform, TrainTransform, centre_square_resized


class ImageBankError(D.DataError):
    """A bank that cannot be built; the message says what to do."""


def decode_square(job: tuple[str, int]) -> np.ndarray | str:
    """One image's centre square at side x side, uint8 [3, side, side]; or what went wrong reading it."""
    path, side = job
    try:
        image = centre_square_resized(D.load_image(path), side)     # the evaluation view, uint8
    except Exception as e:  # any decoder failure, as CaptionDataset treats it: skipped, not fatal
        return f"{type(e).__name__}: {e}"
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def caption_datasets(dataset) -> list[D.CaptionDataset]:
    """The CaptionDatasets a training dataset draws from (one, or a MixedDataset's)."""
    parts = dataset.datasets if isinstance(dataset, D.MixedDataset) else [dataset]
    if not all(isinstance(d, D.CaptionDataset) for d in parts):
        raise ImageBankError("--images-on-device needs folder or manifest sources (shards are streamed, not held "
                             "in memory): train from those, or without --images-on-device")
    return parts


class ImageBank:
    """Every record's image of some CaptionDatasets, decoded once: `images` uint8 [N, 3, side, side]."""

    def __init__(self, images: torch.Tensor, unreadable: int):
        self.images, self.unreadable = images, unreadable

    @property
    def side(self) -> int:
        return int(self.images.shape[-1])

    @classmethod
    def build(cls, datasets: Sequence[D.CaptionDataset], side: int, device, workers: int = 0,
              progress: bool = True, rank: int = 0, world: int = 1) -> "ImageBank":
        """Decode the datasets' images (with `workers` processes; 0: in this one) and point each
        dataset at its rows (`dataset.image_rows`); unreadable images get row -1, and the datasets
        replace them as they replace unreadable files.

        Under DDP (`world` > 1, every rank calls this) each rank decodes one contiguous share of the
        images and the ranks all-gather the rest, so a node decodes each image once, not once per GPU.
        Rows of unreadable images stay in the bank, zero and never used: dropping them would copy the
        whole bank on the device."""
        from tqdm import tqdm

        if side < 8:
            raise ImageBankError(f"an image bank of {side} px is too small; give a side of at least 8")
        # an image that several records share is decoded and held once
        paths = list(dict.fromkeys(r.image for d in datasets for r in d.records))
        if not paths:
            raise ImageBankError("no training images to hold on the device")
        need = len(paths) * 3 * side * side
        if torch.device(device).type == "cuda":
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            if need > 0.5 * free:
                raise ImageBankError(f"{len(paths)} images at {side} px need {need / 2**30:.1f} GiB, more than half "
                                     f"of the GPU's free {free / 2**30:.1f} GiB: lower --bank-size or train without "
                                     "--images-on-device")
        per_rank = -(-len(paths) // world)          # all-gather wants equal parts: the last one padded
        mine = paths[rank * per_rank:(rank + 1) * per_rank]
        decoded = torch.zeros((per_rank, 3, side, side), dtype=torch.uint8)
        readable = torch.zeros(per_rank, dtype=torch.uint8)
        bar = tqdm(total=len(mine), desc="decoding training images" + (f" (1 in {world} on each process)"
                                                                       if world > 1 else ""),
                   unit="img", disable=not progress, dynamic_ncols=True)
        pool = ProcessPoolExecutor(workers) if workers > 0 else None
        try:
            jobs = [(p, side) for p in mine]
            results = pool.map(decode_square, jobs, chunksize=64) if pool else map(decode_square, jobs)
            for i, (path, result) in enumerate(zip(mine, results)):
                if isinstance(result, str):
                    warnings.warn(D.skipping_unreadable_image(path, result), D.SkippedImageWarning, stacklevel=2)
                else:
                    decoded[i], readable[i] = torch.from_numpy(result), 1
                bar.update(1)
        finally:
            bar.close()
            if pool:
                pool.shutdown()
        if world > 1:
            decoded, readable = _all_gather_rows(decoded, device), _all_gather_rows(readable, device).cpu()
        # row j of `decoded` is paths[j] now, on every rank
        kept = [j for j in range(len(paths)) if readable[j]]
        if not kept:
            raise ImageBankError(f"none of the {len(paths)} training images could be read (first: {paths[0]})")
        row_of = {paths[j]: j for j in kept}
        for d in datasets:
            d.image_rows = np.array([row_of.get(r.image, -1) for r in d.records], dtype=np.int64)
            # warned about above: the dataset counts their stand-ins without warning again
            d._warned = d._warned | {r.image for r in d.records if r.image not in row_of}
        return cls(decoded[:len(paths)].to(device), unreadable=len(paths) - len(kept))   # padding sliced off


def _all_gather_rows(part: torch.Tensor, device) -> torch.Tensor:
    """Every rank's equal-sized `part`, concatenated in rank order, on `device` (gloo or NCCL)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    whole = torch.empty((world * part.shape[0], *part.shape[1:]), dtype=part.dtype, device=device)
    dist.all_gather(list(whole.chunk(world)), part.to(device))   # written in place into the chunks
    return whole


# The eight symmetries of the square as 2x2 matrices acting on (x, y) output coordinates: quarter
# turns, each with and without a mirror. Aerial scenes have no "up" (training.augment).
_DIHEDRAL = torch.tensor([[[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]], [[0, 1], [-1, 0]],
                          [[-1, 0], [0, 1]], [[0, 1], [1, 0]], [[1, 0], [0, -1]], [[0, -1], [-1, 0]]],
                         dtype=torch.float32)


def jitter_affine(factors: torch.Tensor, channel_means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Brightness, contrast, saturation factors [B, 3] and each image's channel means [B, 3] ->
    the (matrix [B, 3, 3], offset [B, 3]) that applies all three, as training.augment.colour_jitter
    does one image: saturation mixes each pixel with its grey value, contrast scales about the mean
    grey level of the brightened image."""
    brightness, contrast, saturation = factors.unbind(1)
    luma = torch.as_tensor(_LUMA, dtype=factors.dtype, device=factors.device)
    eye = torch.eye(3, dtype=factors.dtype, device=factors.device)
    sat = saturation[:, None, None] * eye + (1 - saturation)[:, None, None] * luma.expand(3, 3)
    mean_grey = brightness * (channel_means @ luma)
    matrix = (contrast * brightness)[:, None, None] * sat
    offset = sat @ ((1 - contrast) * mean_grey)[:, None].expand(-1, 3)[..., None]
    return matrix, offset[..., 0]


class BankAugment:
    """Bank images (uint8 [B, 3, S, S], on the training device) -> the training batch, float
    [B, 3, size, size], normalised: what `transform` (the loader's training.augment.TrainTransform,
    with its size, crop scale and aspect, jitter and normalisation) does to one image, for a whole
    batch; for an EvalTransform (`--augment none`) the evaluation view (the bank already holds
    centre squares)."""

    def __init__(self, transform: TrainTransform | EvalTransform):
        if not isinstance(transform, (TrainTransform, EvalTransform)):
            raise TypeError(f"BankAugment follows a TrainTransform or EvalTransform, not {type(transform).__name__}")
        self.image_size = transform.image_size
        self.augment = "overhead" if isinstance(transform, TrainTransform) else "none"
        # the evaluation view is the whole square, unjittered (its draws are then never used)
        self.scale, self.ratio, self.jitter = ((transform.scale, transform.ratio, transform.jitter)
                                               if self.augment == "overhead" else ((1.0, 1.0), (1.0, 1.0), 0.0))
        self.mean = torch.tensor(transform.mean, dtype=torch.float32)
        self.std = torch.tensor(transform.std, dtype=torch.float32)

    def draw(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Each image's crop (width and height as fractions of the side, centre in [0, 1]), orientation
        and jitter factors, drawn on the CPU. Like training.augment.random_resized_box: ten tries
        at a random area and aspect, the whole square when none fits."""
        tries = 10
        area = torch.empty(n, tries).uniform_(*self.scale, generator=generator)
        log_ratio = torch.empty(n, tries).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]),
                                                   generator=generator)
        w, h = (area * log_ratio.exp()).sqrt(), (area / log_ratio.exp()).sqrt()
        fits = (w <= 1) & (h <= 1)
        first = torch.where(fits.any(1), fits.float().argmax(1), torch.zeros(n, dtype=torch.long))
        pick = lambda t: t.gather(1, first[:, None])[:, 0]  # noqa: E731 - the chosen try of each row
        w = torch.where(fits.any(1), pick(w), torch.ones(n))
        h = torch.where(fits.any(1), pick(h), torch.ones(n))
        cx = w / 2 + torch.rand(n, generator=generator) * (1 - w)
        cy = h / 2 + torch.rand(n, generator=generator) * (1 - h)
        orientation = torch.randint(0, 8, (n,), generator=generator)
        factors = torch.empty(n, 3).uniform_(1 - self.jitter, 1 + self.jitter, generator=generator)
        return {"w": w, "h": h, "cx": cx, "cy": cy, "orientation": orientation, "factors": factors}

    def step_params(self, seed: int, step: int, global_batch: int, rank: int = 0, world: int = 1) -> dict:
        """One optimizer step's draws for this process's slice of the global batch: drawn for the
        whole batch from (seed, step), so any number of processes augments each sample the same way
        (and a resumed run as the first did)."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        per_rank = global_batch // world
        return {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in self.draw(global_batch, g).items()}

    def __call__(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch augmented with `params` (from `draw` or `step_params`, at least one row per image)."""
        device, n = images.device, images.shape[0]
        x = images.float().div_(255)
        if self.augment == "none":
            if x.shape[-1] != self.image_size:
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                                  antialias=True).clamp_(0, 1)
        else:
            # affine_grid maps output (x, y) in [-1, 1] to input coordinates: first the orientation,
            # then the crop's scale, then its centre; built on the CPU and sent in one copy a step
            theta = torch.zeros(n, 2, 3)
            theta[:, :, :2] = torch.stack([params["w"][:n], params["h"][:n]], 1)[:, :, None] * \
                _DIHEDRAL[params["orientation"][:n]]
            theta[:, 0, 2], theta[:, 1, 2] = 2 * params["cx"][:n] - 1, 2 * params["cy"][:n] - 1
            theta, factors = torch.cat([theta.flatten(1), params["factors"][:n]], 1).to(device).split([6, 3], 1)
            theta = theta.reshape(n, 2, 3)
            # a bank larger than the output is sampled at k times the output size and averaged down
            # (k x k supersampling), so that fine detail does not alias into the smaller crop
            k = max(1, round(x.shape[-1] / self.image_size))
            grid = F.affine_grid(theta, [n, 3, k * self.image_size, k * self.image_size], align_corners=False)
            x = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
            x = (F.avg_pool2d(x, k) if k > 1 else x).clamp_(0, 1)
            if self.jitter > 0:
                matrix, offset = jitter_affine(factors, x.mean(dim=(2, 3)))
                x = (torch.einsum("bij,bjhw->bihw", matrix, x) + offset[:, :, None, None]).clamp_(0, 1)
        if self.mean.device != device:      # once: the constants then live where the bank does
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        return (x - self.mean[None, :, None, None]) / self.std[None, :, None, None]

