"""The CUDA paths: the model, the backend's engine and the training command on a GPU.

Every test here needs a CUDA GPU and is skipped without one (CI has none). They compare the
GPU against this same code on the CPU: bf16 autocast on the GPU must give the embeddings,
relevance maps and captions of fp32 on the CPU up to bf16 rounding, training must learn, and a
checkpoint trained on the GPU must load on a machine without one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend.defaults import BUNDLED_CHECKPOINT
from backend.model import MaMMUT, MaMMUTLoss
from backend.model.checkpoint import load_checkpoint
from backend.model.precision import autocast_context
from test_train import _args, make_scene_folder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda", 0)


def _min_cosine(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(np.asarray(a)).float(), torch.as_tensor(np.asarray(b)).float()
    return float(F.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1).min())


def test_bf16_embeddings_on_gpu_match_fp32_on_cpu(tiny_model, tokenizer, images):
    tokens = tokenizer(["a river through the forest", "many cars in a parking lot"], tiny_model.config.context_length)
    with torch.inference_mode():
        cpu_img, cpu_txt = tiny_model.encode_image(images), tiny_model.encode_text(tokens)
        gpu = tiny_model.to(CUDA)
        with autocast_context(CUDA):
            gpu_img = gpu.encode_image(images.to(CUDA)).float().cpu()
            gpu_txt = gpu.encode_text(tokens.to(CUDA)).float().cpu()
    assert _min_cosine(cpu_img, gpu_img) > 0.99
    assert _min_cosine(cpu_txt, gpu_txt) > 0.99


def test_sao_relevance_map_on_gpu_matches_cpu(tiny_model, images):
    text = F.normalize(torch.randn(4, tiny_model.config.embed_dim, generator=torch.Generator().manual_seed(2)), dim=-1)
    with torch.inference_mode():
        cpu = tiny_model.sao_relevance_map(images, text, window=3, gaussian=True)
        gpu_model = tiny_model.to(CUDA)
        with autocast_context(CUDA):
            gpu = gpu_model.sao_relevance_map(images.to(CUDA), text.to(CUDA), window=3, gaussian=True).float().cpu()
    assert gpu.shape == cpu.shape
    # cosines in [-1, 1]; bf16 keeps about 3 significant digits
    assert float((gpu - cpu).abs().max()) < 0.05
    # the ranking of positions, which is what thresholds and masks use, is kept
    assert float(torch.corrcoef(torch.stack([gpu.flatten(), cpu.flatten()]))[0, 1]) > 0.99


def test_bf16_training_steps_learn_on_gpu(tiny_config):
    """Fused AdamW + bf16 autocast, as training.train runs on a GPU: the loss on a fixed batch falls."""
    torch.manual_seed(0)
    model = MaMMUT(tiny_config).to(CUDA).train()
    crit = MaMMUTLoss(tiny_config.contrastive_weight, tiny_config.caption_weight, tiny_config.pad_id)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(8, 3, tiny_config.image_size, tiny_config.image_size, generator=g).to(CUDA)
    tokens = torch.randint(4, tiny_config.vocab_size, (8, tiny_config.context_length), generator=g).to(CUDA)
    losses = []
    for _ in range(30):
        with autocast_context(CUDA):
            loss = crit(model(images, tokens), tokens)["loss"]
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.75 * losses[0] and np.mean(losses[-5:]) < np.mean(losses[5:10])
    assert all(p.dtype == torch.float32 for p in model.parameters())   # autocast keeps fp32 master weights


@pytest.mark.skipif(not BUNDLED_CHECKPOINT.is_dir(), reason="no bundled checkpoint")
def test_engine_on_gpu_matches_engine_on_cpu():
    """The backend's ModelEngine (what `python -m backend serve --device cuda` runs) on both devices."""
    from backend.engine import ModelEngine

    gpu, cpu = ModelEngine(device="cuda"), ModelEngine(device="cpu")
    try:
        assert gpu.device.type == "cuda" and next(gpu.model.parameters()).is_cuda
        size = gpu.image_size
        tiles = np.random.default_rng(0).integers(0, 256, (6, 3, size, size), dtype=np.uint8)
        texts = ["a forest", "an airport with planes", "a river"]
        assert _min_cosine(gpu.embed_images(tiles), cpu.embed_images(tiles)) > 0.99
        text_gpu, text_cpu = gpu.embed_texts(texts), cpu.embed_texts(texts)
        assert _min_cosine(text_gpu, text_cpu) > 0.99
        maps_gpu = gpu.relevance(tiles[:2], text_cpu, window=5, sigma=0.0)
        maps_cpu = cpu.relevance(tiles[:2], text_cpu, window=5, sigma=0.0)
        assert maps_gpu.shape == maps_cpu.shape == (2, 3, gpu.grid, gpu.grid)
        assert float(np.abs(maps_gpu - maps_cpu).max()) < 0.05
        caption, logp = gpu.caption(tiles[0], max_len=20, beam_size=3)
        assert caption.strip() and np.isfinite(logp) and logp < 0
    finally:
        gpu.stop()
        cpu.stop()


def test_edge_refinement_on_gpu_matches_cpu():
    """Segment refines on its engine's device: the guided filter on the GPU gives the CPU's maps."""
    from backend.edges import edge_refined, guided_filter

    rng = np.random.default_rng(4)
    rel = rng.random((3, 700, 530)).astype(np.float32) / 3
    rgb = rng.integers(0, 256, (3, 700, 530), dtype=np.uint8)
    valid = np.ones((700, 530), bool)
    valid[:200, :100] = False
    for radius in (12, 64):     # exact, and fits on 4 x 4 blocks
        cpu = edge_refined(rel, rgb, valid, radius)
        gpu = edge_refined(rel, rgb, valid, radius, device="cuda")
        assert gpu.shape == cpu.shape and gpu.dtype == np.float32
        assert float(np.abs(gpu - cpu).max()) < 1e-4
    # a large plane: float64 running sums on the GPU too
    flat = np.full((4096, 4096), 0.7, np.float32)
    out = guided_filter(flat[None], np.zeros_like(flat), 64, device="cuda")
    np.testing.assert_allclose(out, 0.7, atol=1e-5)


def test_bank_augment_on_gpu_matches_cpu():
    from training.augment import TrainTransform
    from training.device_images import BankAugment

    images = torch.randint(0, 256, (32, 3, 48, 48), dtype=torch.uint8)
    augment = BankAugment(TrainTransform(32, (0.4, 0.4, 0.4), (0.2, 0.2, 0.2)))
    params = augment.step_params(0, 5, 32)
    on_cpu, on_gpu = augment(images, params), augment(images.to(CUDA), params)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=2e-3, rtol=0)


@pytest.mark.parametrize("compile_model, extra", [(False, ()), (True, ()), (False, ("--images-on-device",))],
                         ids=["eager", "compiled", "image-bank"])
def test_train_command_on_gpu(tmp_path, compile_model, extra):
    """`python -m training.train --device cuda` end to end (bf16 autocast by --precision auto, fused AdamW,
    pinned-memory loader; torch.compile when asked; the images in a bank on the GPU when asked); its
    fp16 export loads on a CPU-only machine."""
    folder = make_scene_folder(tmp_path / "scenes", per_class=16)
    out = tmp_path / "run"
    # the CPU tests' arguments; the later --device, --precision and --batch-size win
    args = _args(folder, out, 12, "--batch-size", "16", "--workers", "2", "--save-every", "6", "--device", "cuda",
                 "--precision", "auto", "--val-per-class", "4", "--eval-every", "12",
                 "--export-fp16", str(tmp_path / "fp16"), *(["--compile"] if compile_model else []), *extra)
    r = subprocess.run([sys.executable, "-m", "training.train", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=900, env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cuda" in r.stdout + r.stderr
    if extra:
        assert "image bank: 36 images at 64 px on cuda" in r.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if row["kind"] == "train"]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    evals = [row for row in rows if row["kind"] == "eval"]
    assert evals and 0.0 <= evals[-1][f"{folder.name}/top1"] <= 100.0
    # trained on the GPU, loaded where there is none: every tensor on the CPU, no compile prefixes
    model, tokenizer = load_checkpoint(tmp_path / "fp16", device="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    with torch.inference_mode():
        emb = model.encode_image(torch.zeros(1, 3, model.config.image_size, model.config.image_size))
    assert torch.isfinite(emb).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL DDP")
def test_train_command_ddp_nccl(tmp_path):
    folder = make_scene_folder(tmp_path / "scenes", per_class=16)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "training.train", *_args(folder, out, 6, "--batch-size", "16", "--device", "cuda",
                                                       "--precision", "auto")],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout + r.stderr
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert len(losses) == 6 and all(np.isfinite(losses))
