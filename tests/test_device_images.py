"""`train --images-on-device`: the image bank and the batch augmentation on the device (here the CPU;
tests/test_gpu.py runs the same augmentation on CUDA), next to training.augment's PIL path."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import data as D
from training.augment import EvalTransform, TrainTransform, colour_jitter
from training.device_images import BankAugment, ImageBank, ImageBankError, jitter_affine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import REPO, _args, _run, _train_losses, folder  # noqa: E402,F401 - the fixture

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


class _Draws:
    """A stand-in for random.Random that hands colour_jitter chosen factors."""

    def __init__(self, values):
        self.values = list(values)

    def uniform(self, lo, hi):
        return self.values.pop(0)


def test_jitter_matrix_is_training_augments_colour_jitter():
    rng = np.random.default_rng(1)
    for _ in range(5):
        x = rng.random((3, 64)).astype(np.float32)
        factors = rng.uniform(0.8, 1.2, 3).tolist()
        expected = colour_jitter(x.copy(), 0.2, _Draws(factors))
        matrix, offset = jitter_affine(torch.tensor([factors]), torch.from_numpy(x.mean(1))[None])
        got = (matrix[0] @ torch.from_numpy(x) + offset[0][:, None]).clamp(0, 1).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-6)


def _normalised(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def test_whole_square_crops_give_the_eight_symmetries_of_the_square():
    images = torch.randint(0, 256, (64, 3, 12, 12), dtype=torch.uint8)
    augment = BankAugment(TrainTransform(12, MEAN, STD, scale=(1, 1), ratio=(1, 1), jitter=0))
    out = augment(images, augment.draw(64, torch.Generator().manual_seed(0)))
    seen = set()
    for image, got in zip(_normalised(images), out):
        variants = {(k, m): torch.rot90(image.flip(-1) if m else image, k, (1, 2)) for k in range(4) for m in (0, 1)}
        match = [key for key, v in variants.items() if torch.allclose(got, v, atol=1e-2)]
        assert len(match) == 1, "each output is exactly one flip/rotation of its image"
        seen.add(match[0])
    assert len(seen) == 8


def test_crops_stay_inside_the_image_with_the_asked_area_and_aspect():
    augment = BankAugment(TrainTransform(16, MEAN, STD, scale=(0.3, 0.6), ratio=(3 / 4, 4 / 3)))
    p = augment.draw(2000, torch.Generator().manual_seed(3))
    area, aspect = p["w"] * p["h"], p["w"] / p["h"]
    assert ((area >= 0.3 - 1e-6) & (area <= 0.6 + 1e-6)).all()
    assert ((aspect >= 3 / 4 - 1e-5) & (aspect <= 4 / 3 + 1e-5)).all()
    assert ((p["cx"] - p["w"] / 2 >= 0) & (p["cx"] + p["w"] / 2 <= 1 + 1e-6)).all()
    assert ((p["cy"] - p["h"] / 2 >= 0) & (p["cy"] + p["h"] / 2 <= 1 + 1e-6)).all()
    assert set(p["orientation"].tolist()) == set(range(8))
    # a horizontal ramp (pixel value = column): an upright crop sees only its own columns
    ramp = torch.arange(64, dtype=torch.uint8).mul(4).expand(1, 3, 64, 64).clone()
    params = {"w": torch.tensor([0.25]), "h": torch.tensor([0.5]), "cx": torch.tensor([0.75]),
              "cy": torch.tensor([0.5]), "orientation": torch.tensor([0]), "factors": torch.ones(1, 3)}
    out = BankAugment(TrainTransform(16, (0, 0, 0), (1, 1, 1), jitter=0))(ramp, params)[0, 0] * 255
    assert out.min() >= 4 * 40 - 4 and out.max() <= 4 * 56 + 4     # columns 40..56 of 64
    assert (out[:, 1:] >= out[:, :-1] - 1e-3).all()                 # still increasing left to right


def test_a_larger_bank_is_supersampled_not_aliased():
    # one-pixel stripes in a 64 px bank, 90% of it cropped to 32 px: near grey everywhere (sampled at
    # the output size alone, the stripes alias into full-contrast bands of 0 and 1)
    stripes = (torch.arange(64) % 2 * 255).to(torch.uint8).expand(1, 3, 64, 64).clone()
    params = {"w": torch.tensor([0.9]), "h": torch.tensor([0.9]), "cx": torch.tensor([0.5]),
              "cy": torch.tensor([0.5]), "orientation": torch.tensor([0]), "factors": torch.ones(1, 3)}
    out = BankAugment(TrainTransform(32, (0, 0, 0), (1, 1, 1), jitter=0))(stripes, params)[0, 0]
    assert (out - 0.5).abs().max() < 0.1


def test_no_augmentation_is_the_evaluation_view_of_the_bank():
    images = torch.randint(0, 256, (3, 3, 20, 20), dtype=torch.uint8)
    augment = BankAugment(EvalTransform(20, MEAN, STD))
    out = augment(images, augment.step_params(0, 1, 3))
    torch.testing.assert_close(out, _normalised(images))


def test_step_params_slice_one_global_draw_per_step():
    augment = BankAugment(TrainTransform(16, MEAN, STD))
    whole = augment.step_params(7, 12, 8)
    halves = [augment.step_params(7, 12, 8, rank, 2) for rank in (0, 1)]
    for key in whole:
        torch.testing.assert_close(torch.cat([h[key] for h in halves]), whole[key])
    assert not torch.equal(augment.step_params(7, 13, 8)["cx"], whole["cx"])


def _records(tmp_path: Path, broken: int) -> list[D.Record]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(5):
        path = tmp_path / f"img{i}.png"
        if i == broken:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)
        records.append(D.Record(str(path), (f"caption {i} a", f"caption {i} b"), "c"))
    return records


def test_bank_holds_centre_squares_and_skips_unreadable_images_like_the_files_do(tmp_path):
    records = _records(tmp_path, broken=2)
    on_files = D.CaptionDataset(records, lambda image, rng: torch.zeros(1), seed=4)
    in_bank = D.CaptionDataset(records, lambda image, rng: torch.zeros(1), seed=4)
    sharing = D.CaptionDataset([records[3], records[0]], lambda image, rng: torch.zeros(1))
    with pytest.warns(D.SkippedImageWarning):
        bank = ImageBank.build([in_bank, sharing], side=16, device="cpu", workers=2, progress=False)
    # the unreadable image's row stays (zero, never used): dropping it would copy the whole bank
    assert bank.images.shape == (5, 3, 16, 16) and bank.unreadable == 1 and not bank.images[2].any()
    assert in_bank.image_rows.tolist() == [0, 1, -1, 3, 4] and sharing.image_rows.tolist() == [3, 0]
    expected = Image.open(records[3].image).convert("RGB").resize((16, 16), Image.Resampling.BICUBIC,
                                                                    box=(5, 0, 35, 30))
    assert np.array_equal(bank.images[3].permute(1, 2, 0).numpy(), np.asarray(expected))
    with pytest.warns(D.SkippedImageWarning):      # the file path warns, once; the bank warned when built
        for index in range(5):
            for epoch in (0, 1):
                a, b = on_files.load(index, epoch), in_bank.load(index, epoch)
                assert a[1] == b[1] and a.replaced == b.replaced      # the same caption, the same stand-in
                assert int(b[0]) == in_bank.image_rows[(index + b.replaced) % 5]


def test_ddp_ranks_each_decode_a_share_and_gather_the_same_bank(tmp_path):
    """Two gloo processes (a real process group on loopback) build the bank a single process builds."""
    records = _records(tmp_path, broken=1)    # 5 images in 2 shares of 3: one padded, one broken
    script = tmp_path / "bank_rank.py"
    script.write_text(
        "import json, os, sys, warnings\nimport torch, torch.distributed as dist\n"
        "from training import data as D\nfrom training.device_images import ImageBank\n"
        "dist.init_process_group('gloo')\nrank, world = dist.get_rank(), dist.get_world_size()\n"
        "records = [D.Record(p, ('a caption',), 'c') for p in json.loads(sys.argv[1])]\n"
        "dataset = D.CaptionDataset(records, lambda image, rng: image)\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    bank = ImageBank.build([dataset], side=16, device='cpu', progress=False, rank=rank, world=world)\n"
        "torch.save({'images': bank.images, 'rows': dataset.image_rows.tolist(), 'unreadable': bank.unreadable,"
        " 'warned': len(seen)}, os.path.join(sys.argv[2], f'bank_{rank}.pt'))\n"
        "dist.destroy_process_group()\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), json.dumps([r.image for r in records]), str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    alone = D.CaptionDataset(records, lambda image, rng: image)
    with pytest.warns(D.SkippedImageWarning):
        reference = ImageBank.build([alone], side=16, device="cpu", progress=False)
    ranks = [torch.load(tmp_path / f"bank_{rank}.pt") for rank in (0, 1)]
    for got in ranks:
        assert torch.equal(got["images"], reference.images) and got["rows"] == alone.image_rows.tolist()
        assert got["unreadable"] == 1
    # the broken image was one rank's to decode: that rank alone warned of it
    assert sorted(got["warned"] for got in ranks) == [0, 1]


def test_a_bank_of_nothing_readable_is_refused(tmp_path):
    records = [D.Record(str(tmp_path / "missing.png"), ("a caption",), None)]
    with pytest.raises(ImageBankError, match="none of the 1 training images could be read"), \
            pytest.warns(D.SkippedImageWarning):
        ImageBank.build([D.CaptionDataset(records, lambda image: image)], side=16, device="cpu", progress=False)


def test_training_on_the_bank_runs_resumes_exactly_and_reports_the_bank(folder, tmp_path):
    out = tmp_path / "bank"
    r = _run(_args(folder, out, 6, "--images-on-device", "--class-aware", "--template-mix", "0.3"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "image bank: 24 images at 64 px on cpu" in r.stderr
    reference = _train_losses(out)
    assert sorted(reference) == list(range(1, 7)) and all(np.isfinite(v) for v in reference.values())
    assert json.loads((out / "train_config.json").read_text())["images_on_device"] is True
    shutil.rmtree(out / "checkpoints" / "step_0000006")
    rows = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(x for x in rows if json.loads(x)["step"] <= 3) + "\n")
    r = _run(_args(folder, out, 6, "--images-on-device", "--class-aware", "--template-mix", "0.3", "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = _train_losses(out)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-5)


def test_bank_options_are_checked(folder, tmp_path):
    r = _run(_args(folder, tmp_path / "a", 2, "--bank-size", "96"))
    assert r.returncode == 2 and "--bank-size 96" in r.stderr and "with --images-on-device" in r.stderr
    r = _run(_args(folder, tmp_path / "b", 2, "--images-on-device", "--bank-size", "4"))
    assert r.returncode == 2 and "at least 8 px" in r.stderr
    tar = tmp_path / "s.tar"
    with tarfile.open(tar, "w") as t:
        for name, payload in (("0.jpg", (folder / "red" / "red_0.jpg").read_bytes()), ("0.txt", b"red roofs")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))
    r = subprocess.run([sys.executable, "-m", "training.train", "--shards", str(tar), "--preset", "tiny",
                        "--vocab-size", "300", "--out", str(tmp_path / "c"), "--steps", "1", "--batch-size", "1",
                        "--workers", "0", "--device", "cpu", "--images-on-device"],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "folder or manifest sources" in r.stderr and "Traceback" not in r.stderr
