"""Training-data benchmark: samples/s of the two ways `training.train` feeds images, on the same images
in the same run, as a ratio.

- loader: what training does by default, DataLoader processes that decode and augment each image
  with PIL (training.augment.TrainTransform), batches of 256 at 128 px;
- bank: `--images-on-device`, the images decoded once into a uint8 bank (its build time reported
  apart), each batch gathered and augmented by training.device_images.BankAugment on this machine's
  CPU and, where CUDA is available, on the GPU (synchronised).

The images are what a GPU run trains on: 128 px WebP copies (as `training.pack` writes them) of
IMAGES images of the shared RSSCN7, UC Merced and AID sets, or of generated scenes without ../shared/data.
Target: the bank on the GPU >= 10x the loader, so a GPU is no longer waiting on the data.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import check_results_dir, checked_or_exit, save_results

NAME = "training_data"
REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DATA = REPO.parent / "shared" / "data"
IMAGES, SIZE, BATCH = 768, 128, 256
MEAN, STD = (0.4, 0.4, 0.4), (0.2, 0.2, 0.2)
TARGET = 10.0


def shared_images(n: int) -> list[Path]:
    """n images spread over the shared sets' class folders (empty without ../shared/data)."""
    found = []
    for root in (DATA / "rsscn7", DATA / "ucm" / "images", DATA / "aid"):
        if root.is_dir():
            found += sorted(p for p in root.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif"))
    if not found:
        return []
    pick = np.random.default_rng(0).choice(len(found), size=min(n, len(found)), replace=False)
    return [found[i] for i in sorted(pick)]


def make_images(folder: Path, n: int) -> tuple[list[str], str]:
    """128 px WebP copies of shared images (or of generated smooth scenes), and where they came from."""
    from training.pack import _shrink

    sources = shared_images(n)
    paths = []
    if sources:
        for i, src in enumerate(sources):
            dst = folder / f"{i:05d}.webp"
            if not isinstance(_shrink((str(src), str(dst), SIZE, "webp", 90)), str):
                paths.append(str(dst))
        return paths, f"{len(paths)} shared RSSCN7 / UCM / AID images packed to {SIZE} px WebP"
    rng = np.random.default_rng(0)
    for i in range(n):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        dst = folder / f"{i:05d}.webp"
        image.save(dst, "WEBP", quality=90)
        paths.append(str(dst))
    return paths, f"{n} generated {SIZE} px WebP scenes (no ../shared/data)"


def _dataset(paths: list[str]):
    from training.augment import train_transform
    from training.data import CaptionDataset, Record

    records = [Record(p, ("an aerial scene",), None) for p in paths]
    return CaptionDataset(records, train_transform(SIZE, MEAN, STD), seed=0)


def loader_rate(paths: list[str], workers: int, batches: int) -> float:
    """samples/s of the DataLoader path in its steady state: the batches the workers made ahead
    while starting (prefetch 2 each) are taken before the clock starts, and at least as many timed."""
    from torch.utils.data import DataLoader

    ahead = max(1, 2 * workers)
    batches = max(batches, ahead)
    dataset = _dataset(paths)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=BATCH * (batches + ahead),
                                             generator=torch.Generator().manual_seed(0))
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=workers,
                        collate_fn=lambda items: torch.stack([item[0] for item in items]))
    it = iter(loader)
    for _ in range(ahead):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return BATCH * batches / (time.perf_counter() - t0)


def bank_rate(bank_images: torch.Tensor, device: torch.device, batches: int) -> float:
    """samples/s of gathering and augmenting batches from the bank on `device`, after one warm-up batch."""
    from training.augment import train_transform
    from training.device_images import BankAugment

    images = bank_images.to(device)
    augment = BankAugment(train_transform(SIZE, MEAN, STD))   # the loader's augmentation, on the device
    rows = torch.randint(0, images.shape[0], (batches + 1, BATCH), generator=torch.Generator().manual_seed(0))

    def one(step: int) -> None:
        augment(images[rows[step].to(device)], augment.step_params(0, step, BATCH))

    one(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for step in range(1, batches + 1):
        one(step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return BATCH * batches / (time.perf_counter() - t0)


def run(quick: bool = False, out_dir: Path | None = RESULTS_DIR, echo=print, workers: int | None = None,
        images: int | None = None) -> dict:
    from training.data import CaptionDataset, Record
    from training.device_images import ImageBank

    workers = workers or os.cpu_count() or 1
    batches = 2 if quick else 6
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        paths, origin = make_images(Path(tmp), images or (IMAGES // 4 if quick else IMAGES))
        echo(f"images: {origin}")
        rows = [{"pipeline": "loader (PIL, DataLoader)", "device": "cpu", "workers": workers,
                 "samples_per_s": loader_rate(paths, workers, batches)}]
        t0 = time.perf_counter()
        bank = ImageBank.build([CaptionDataset([Record(p, ("x",), None) for p in paths], lambda image: image)],
                               SIZE, "cpu", workers=workers, progress=False)
        build_s = time.perf_counter() - t0
        devices = [torch.device("cpu")] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else [])
        for device in devices:
            rows.append({"pipeline": "bank (BankAugment)", "device": device.type, "workers": 0,
                         "samples_per_s": bank_rate(bank.images, device, batches)})
    base = rows[0]["samples_per_s"]
    for row in rows:
        row["vs_loader"] = row["samples_per_s"] / base
    gpu = [r for r in rows if r["device"] == "cuda"]
    target = {"target": f"bank on the GPU / loader >= {TARGET:g}x"}
    target.update({"result": "PASS" if gpu[0]["vs_loader"] >= TARGET else "FAIL", "value": gpu[0]["vs_loader"]}
                  if gpu else {"result": "N/A", "why": "no CUDA GPU on this machine"})
    results = {"images": origin, "image_size": SIZE, "batch": BATCH, "batches": batches,
               "bank_build_s": build_s, "bank_images_per_s": len(paths) / build_s, "rows": rows, "targets": [target]}
    save_results(results, NAME, out_dir)
    echo(report(results))
    return results


def report(results: dict) -> str:
    lines = [f"batch {results['batch']} at {results['image_size']} px; bank built once in "
             f"{results['bank_build_s']:.1f} s ({results['bank_images_per_s']:.0f} images/s)", "",
             "| pipeline | device | loader processes | samples/s | vs loader |", "|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['pipeline']} | {r['device']} | {r['workers'] or '-'} | {r['samples_per_s']:.0f} | "
                     f"{r['vs_loader']:.2f}x |")
    lines.append("")
    lines += [f"{t['result']:>4}  {t['target']}" + (f" ({t['value']:.1f}x)" if "value" in t else f" ({t['why']})")
              for t in results["targets"]]
    return "\n".join(lines)


def main(args) -> dict:
    return run(quick=args.quick, out_dir=args.results_dir)


if __name__ == "__main__":   # alone, e.g. on a GPU machine without GDAL (bench.run imports every benchmark)
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.training_data_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and batches")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where training_data.json goes")
    args = parser.parse_args()
    checked_or_exit(check_results_dir, args.results_dir)
    main(args)
