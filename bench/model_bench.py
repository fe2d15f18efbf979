"""Model benchmark: matmul peak, image-encoding throughput, training-step time, targets.

Everything is measured in one process so ratios compare like with like; a model and its peer are
timed in alternation (one iteration each, in turn), so load from other work on the machine hits
both alike. All models are built from configs with random weights: nothing is downloaded.
See bench/README.md for what each number means.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from backend.model import MaMMUT, MaMMUTLoss, get_preset
from backend.model.precision import autocast_context, cpu_supports_bf16
from bench import preset_names, save_results

NAME = "model"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MATMUL_N = 2048
ENCODE_BATCH = 32
TRAIN_BATCH = 8
MFU_BATCH = 64
GPU_BF16_PEAK = 989e12      # H100 SXM bf16 dense tensor-core peak, FLOP/s
NOT_SUPPORTED = "not supported on this CPU"
TARGETS = {"fp32_vs_clip": 1.0, "fp32_matmul_fraction": 0.80, "bf16_vs_clip": 1.3, "bf16_cosine": 0.99}


# ---- timing -----------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, warmup: int, iters: int, device=torch.device("cpu")) -> dict:
    """Seconds per call for each fn, {name: {"median_s", "times_s"}}; the fns take turns."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(t), "times_s": t} for name, t in times.items()}


# ---- machine ----------------------------------------------------------------------------------
def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "bf16_supported": cpu_supports_bf16(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def matmul_gflops(dtype: torch.dtype, warmup: int, iters: int) -> dict:
    """GFLOP/s of one MATMUL_N^3 matmul (2 n^3 FLOPs), median over repeats."""
    a, b = torch.randn(MATMUL_N, MATMUL_N, dtype=dtype), torch.randn(MATMUL_N, MATMUL_N, dtype=dtype)
    c = torch.empty(MATMUL_N, MATMUL_N, dtype=dtype)
    r = time_interleaved({"mm": lambda: torch.mm(a, b, out=c)}, warmup, iters)["mm"]
    return {"gflops": 2 * MATMUL_N ** 3 / r["median_s"] / 1e9, **r}


# ---- analytic FLOPs ---------------------------------------------------------------------------
def conv_flops(module: nn.Module, image_size: int) -> int:
    """Forward FLOPs of every Conv2d in `module` (e.g. a convolutional patch stem) for one image."""
    total = 0

    def hook(m, _, out):
        nonlocal total
        total += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
    hooks = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        weight = next(module.parameters())
        module(torch.zeros(1, 3, image_size, image_size, device=weight.device, dtype=weight.dtype))
    for h in hooks:
        h.remove()
    return total


def vit_flops(width: int, layers: int, heads: int, mlp: int, stem: int, tokens: int, pool_embed: int | None = None) -> int:
    """Forward FLOPs per image of a ViT (2 x multiply-adds of every matmul; norms and softmax not counted).

    stem: FLOPs of the patch embedding; tokens: sequence length in the blocks (patches, + 1 with a
    class token); pool_embed: the embed_dim of our attention pool, None for an encoder without one.
    """
    c, n = width, tokens
    f = stem + layers * (2 * n * c * 3 * c                           # qkv
                         + 2 * n * n * c + 2 * n * n * c             # scores q.k, weighted sum of v
                         + 2 * n * c * c                             # output projection
                         + 2 * 2 * n * c * mlp)                      # MLP fc1 + fc2
    if pool_embed:
        # as AttentionPool.forward computes it: query, Wk^T q, per-head scores and token mix,
        # Wv on the mix, out, proj
        f += 2 * c * c + 2 * c * c + 2 * n * c * heads + 2 * heads * n * c + 2 * c * c + 2 * c * c + 2 * c * pool_embed
    return f


def encoder_flops(cfg, model: str, stem: nn.Module | None = None) -> int:
    """Per-image forward FLOPs of our image path ("skyprompt") or of the CLIP vision tower ("hf-clip").
    Without `stem` (our patch-embedding module) the patch embedding is one patch-sized conv."""
    g = cfg.grid_size ** 2
    mlp = int(cfg.vision_width * cfg.mlp_ratio)
    patch_conv = 2 * g * (3 * cfg.patch_size ** 2) * cfg.vision_width
    if model == "skyprompt":
        s = conv_flops(stem, cfg.image_size) if stem is not None else patch_conv
        return vit_flops(cfg.vision_width, cfg.vision_layers, cfg.vision_heads, mlp, s, g, cfg.embed_dim)
    return vit_flops(cfg.vision_width, cfg.vision_layers, cfg.vision_heads, mlp, patch_conv, g + 1)


def train_flops_per_sample(model: MaMMUT) -> int:
    """nanoGPT-style estimate of forward + backward FLOPs for one (image, caption) pair.

    6 FLOPs per weight per token it is applied to (2 forward, 4 backward), plus 12 * layers * width *
    (query, key) pairs for attention scores and values. Image tokens n = grid^2 meet the ViT and the
    cross-attention key/value weights (the one-query attention pool is negligible); the decoder blocks
    run on the T tokens of the contrastive pass and the T-1 of the generative one; cross-attention's
    other weights and the tied output head run in the generative pass only.
    """
    cfg = model.config
    n, tc, tg = cfg.grid_size ** 2, cfg.context_length, cfg.context_length - 1
    count = lambda m: sum(p.numel() for p in m.parameters())         # noqa: E731
    crossed = [b for b in model.text.blocks if b.cross_attn is not None]
    cross_kv = sum(count(b.cross_attn.kv) for b in crossed)
    cross_rest = sum(count(b.cross_attn) + count(b.ln_cross) for b in crossed) - cross_kv
    blocks = sum(count(b) for b in model.text.blocks) - cross_kv - cross_rest
    vision = count(model.visual) - model.visual.pos_embed.numel()      # the one-query pool is negligible
    weight_tokens = ((vision + cross_kv) * n + blocks * (tc + tg) + cross_rest * tg
                     + model.text.token_embed.weight.numel() * tg)
    attention = 12 * (cfg.vision_layers * cfg.vision_width * n * n
                      + cfg.text_layers * cfg.text_width * (tc * tc + tg * tg)
                      + len(crossed) * cfg.text_width * tg * n)
    return 6 * weight_tokens + attention


# ---- models -----------------------------------------------------------------------------------
def _have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def clip_vision(cfg) -> nn.Module:
    """transformers' CLIPVisionModel at our ViT's size (tanh GELU like ours), SDPA attention where supported."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hf = CLIPVisionConfig(hidden_size=cfg.vision_width, intermediate_size=int(cfg.vision_width * cfg.mlp_ratio),
                          num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                          image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act="gelu_pytorch_tanh")
    try:
        return CLIPVisionModel._from_config(hf, attn_implementation="sdpa")
    except (ValueError, ImportError, TypeError):
        return CLIPVisionModel(hf)


class _ClipTokens(nn.Module):
    """CLIPVisionModel as an image encoder that returns all tokens (MaMMUT-pytorch's `img_encoder`)."""

    def __init__(self, cfg):
        super().__init__()
        self.clip = clip_vision(cfg)

    def forward(self, images):
        return self.clip(pixel_values=images).last_hidden_state


def mammut_pytorch(cfg) -> nn.Module:
    """MaMMUT-pytorch at our dims: same ViT size (CLIP's), decoder width/depth/heads/vocab/cross-attention
    spacing, one pooled image query per image token, our loss weights."""
    from mammut_pytorch import MaMMUT as PeerMaMMUT

    return PeerMaMMUT(dim=cfg.text_width, num_tokens=cfg.vocab_size, depth=cfg.text_layers,
                      cross_attend_every=cfg.cross_attn_every, dim_latents=cfg.embed_dim,
                      image_dim=cfg.vision_width, num_img_queries=cfg.grid_size ** 2,
                      dim_head=cfg.text_width // cfg.text_heads, heads=cfg.text_heads, ff_mult=int(cfg.mlp_ratio),
                      img_encoder=_ClipTokens(cfg), caption_loss_weight=cfg.caption_weight,
                      contrastive_loss_weight=cfg.contrastive_weight, pad_id=cfg.pad_id)


def make_batch(cfg, batch: int, device=torch.device("cpu")) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normalised images and <bos> caption <eos> <pad>... token ids."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=gen)
    t = cfg.context_length
    tokens = torch.randint(4, cfg.vocab_size, (batch, t), generator=gen)
    ends = torch.randint(t // 2, t, (batch, 1), generator=gen)
    pos = torch.arange(t)
    tokens[:, 0] = cfg.bos_id
    tokens = torch.where(pos == ends, cfg.eos_id, torch.where(pos > ends, cfg.pad_id, tokens))
    return images.to(device), tokens.to(device)


# ---- benchmarks -------------------------------------------------------------------------------
def bench_encode(cfg, dtype: str, peers: bool, warmup: int, iters: int, matmul_gflops: float) -> list[dict]:
    """Image-encoding throughput of our encode_image, and of transformers' CLIP vision tower.

    matmul_gflops: this machine's measured matmul GFLOP/s in the same dtype.
    """
    images, _ = make_batch(cfg, ENCODE_BATCH)
    models = {"skyprompt": MaMMUT(cfg).eval()}
    if peers:
        models["hf-clip"] = clip_vision(cfg).eval()
    embed = {"skyprompt": lambda x: models["skyprompt"].encode_image(x),
             "hf-clip": lambda x: models["hf-clip"](pixel_values=x).pooler_output}
    ctx = lambda: autocast_context("cpu", enabled=dtype == "bf16")       # noqa: E731

    def run(name):
        with ctx():
            return embed[name](images)

    timed = time_interleaved({name: (lambda name=name: run(name)) for name in models}, warmup, iters)
    rows = []
    for name in models:
        gflop = encoder_flops(cfg, name, models[name].visual.patch_embed if name == "skyprompt" else None) / 1e9
        ips = ENCODE_BATCH / timed[name]["median_s"]
        row = {"preset": cfg.preset, "model": name, "dtype": dtype, "images_per_s": ips,
               "ms_per_batch": 1e3 * timed[name]["median_s"], "times_s": timed[name]["times_s"],
               "gflop_per_image": gflop, "matmul_fraction": gflop * ips / matmul_gflops,
               "attn_implementation": getattr(getattr(models[name], "config", None), "_attn_implementation", "sdpa")}
        if dtype == "bf16":
            cos = F.cosine_similarity(run(name).float(), embed[name](images).float(), dim=-1)
            row["cosine_min"] = cos.min().item()
        rows.append(row)
    if peers:
        rows[0]["vs_clip"] = rows[0]["images_per_s"] / rows[1]["images_per_s"]
    return rows


def bench_train(cfg, peers: bool, warmup: int, iters: int) -> list[dict]:
    """fp32 training step (forward + backward + AdamW) of our MaMMUT and of MaMMUT-pytorch."""
    images, tokens = make_batch(cfg, TRAIN_BATCH)
    torch.manual_seed(0)
    ours = MaMMUT(cfg).train()
    crit = MaMMUTLoss(cfg.contrastive_weight, cfg.caption_weight, cfg.pad_id)
    models = {"skyprompt": (ours, lambda: crit(ours(images, tokens), tokens)["loss"])}
    if peers:
        peer = mammut_pytorch(cfg).train()
        models["mammut-pytorch"] = (peer, lambda: peer(text=tokens, images=images, return_loss=True))
    steps = {}
    for name, (model, loss_fn) in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(loss_fn=loss_fn, opt=opt):
            loss_fn().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[name] = step
    timed = time_interleaved(steps, warmup, iters)
    rows = [{"preset": cfg.preset, "model": name, "batch": TRAIN_BATCH, "params": sum(p.numel() for p in m.parameters()),
             "ms_per_step": 1e3 * timed[name]["median_s"], "times_s": timed[name]["times_s"]}
            for name, (m, _) in models.items()]
    if peers:
        rows[0]["vs_peer"] = rows[1]["ms_per_step"] / rows[0]["ms_per_step"]    # > 1: ours is faster
    return rows


def autocast_train_step(model: MaMMUT, batch: int, device: torch.device, forward: nn.Module | None = None):
    """A closure running one training step on a fixed random batch: forward (through `forward`, e.g. the
    compiled model, else `model`) under bf16 autocast where it pays, both losses, backward, AdamW
    (fused on CUDA)."""
    cfg = model.config
    crit = MaMMUTLoss(cfg.contrastive_weight, cfg.caption_weight, cfg.pad_id)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    images, tokens = make_batch(cfg, batch, device)
    forward = forward or model

    def step():
        with autocast_context(device):
            loss = crit(forward(images, tokens), tokens)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_mfu(cfg, device, batch: int = MFU_BATCH, warmup: int = 3, iters: int = 10) -> dict:
    """bf16-autocast training step of our MaMMUT on `device`; MFU = estimated FLOP/s / GPU_BF16_PEAK."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = MaMMUT(cfg).to(device).train()
    step = autocast_train_step(model, batch, device)
    r = time_interleaved({"step": step}, warmup, iters, device)["step"]
    flops = train_flops_per_sample(model) * batch
    return {"preset": cfg.preset, "device": str(device), "batch": batch, "ms_per_step": 1e3 * r["median_s"],
            "times_s": r["times_s"], "flops_per_step": flops, "tflops": flops / r["median_s"] / 1e12,
            "peak_tflops": GPU_BF16_PEAK / 1e12, "mfu": flops / r["median_s"] / GPU_BF16_PEAK}


# ---- targets ----------------------------------------------------------------------------------
def clip_not_measured(peers: bool) -> str:
    """Why transformers' CLIP has no numbers: its encode rows' status and its targets' N/A reason."""
    return "transformers not installed" if peers else "peers off (--no-peers)"


def evaluate_targets(results: dict) -> list[dict]:
    enc = {(r["preset"], r["model"], r["dtype"]): r for r in results["encode"] if "images_per_s" in r}
    fp32, bf16 = enc.get(("base", "skyprompt", "fp32")), enc.get(("base", "skyprompt", "bf16"))
    native = results["machine"]["bf16_supported"]

    def target(name, row, key, threshold, why_na):
        value = row.get(key) if row else None
        if value is None:
            return {"name": name, "value": None, "threshold": threshold, "result": "N/A", "reason": why_na}
        return {"name": name, "value": value, "threshold": threshold,
                "result": "PASS" if value >= threshold else "FAIL", "reason": None}

    no_base = "base not measured"
    no_clip = clip_not_measured(results["settings"].get("peers", True))
    no_bf16 = no_base if native else f"bf16 {NOT_SUPPORTED}"
    return [
        target("base fp32 images/s vs transformers CLIP fp32", fp32, "vs_clip", TARGETS["fp32_vs_clip"],
               no_clip if fp32 else no_base),
        target("base fp32 share of measured fp32 matmul GFLOP/s", fp32, "matmul_fraction",
               TARGETS["fp32_matmul_fraction"], no_base),
        # the speed target is about native bf16: numbers forced on an emulating CPU do not count
        target("base bf16 images/s vs transformers CLIP bf16", bf16 if native else None, "vs_clip",
               TARGETS["bf16_vs_clip"], no_clip if bf16 and native else no_bf16),
        target("base bf16-vs-fp32 embedding cosine (min)", bf16, "cosine_min", TARGETS["bf16_cosine"], no_bf16),
    ]


# ---- report -----------------------------------------------------------------------------------
def _table(headers: list[str], rows: list[list[str]]) -> str:
    """Aligned plain-text table. Cells past the header's count form a note at the end of the row;
    a row of None cells and a note (e.g. "not supported") prints the note in place of the numbers."""
    k = len(headers)
    widths = [max(len(r[i] or "") for r in rows + [headers] if i < len(r)) for i in range(k)]
    line = lambda r: "  ".join((c or "").rjust(w) if i else (c or "").ljust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    out = [line(headers), "  ".join("-" * w for w in widths)]
    for r in rows:
        cells, note = r[:k], " ".join(r[k:])
        filled = [c for c in cells if c is not None]
        out.append((line(filled) + "  " + note).rstrip())
    return "\n".join(out)


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def report(results: dict) -> str:
    m = results["machine"]
    parts = [f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['cpu_capability']}), "
             f"bf16: {'native' if m['bf16_supported'] else NOT_SUPPORTED}"
             + (f", GPU: {m['gpu']}" if m.get("gpu") else "")]
    mm = results["matmul"]
    parts.append(_table(["matmul 2048^3", "GFLOP/s"],
                        [[dt, _f(mm[dt]["gflops"], ".1f")] if "gflops" in mm[dt] else [dt, None, mm[dt]["status"]]
                         for dt in ("fp32", "bf16")]))
    rows = []
    for r in results["encode"]:
        head = [r["preset"], r["model"], r["dtype"]]
        if "images_per_s" not in r:
            rows.append(head + [None] * 6 + [r["status"]])
            continue
        rows.append(head + [_f(r["images_per_s"], ".1f"), _f(r["ms_per_batch"], ".0f"), _f(r["gflop_per_image"], ".2f"),
                            _f(100 * r["matmul_fraction"], ".0f") + "%", _f(r.get("vs_clip"), ".2f") + "x" if r.get("vs_clip") else "-",
                            _f(r.get("cosine_min"), ".4f")])
    parts.append(f"image encoding, batch {ENCODE_BATCH} (median of {results['settings']['encode_iters']})\n" + _table(
        ["preset", "model", "dtype", "img/s", "ms/batch", "GFLOP/img", "of mm peak", "vs CLIP", "cos bf16"], rows))
    if results["train"]:
        rows = [[r["preset"], r["model"], f"{r['params'] / 1e6:.1f}M", _f(r["ms_per_step"], ".0f"),
                 _f(r.get("vs_peer"), ".2f") + "x" if r.get("vs_peer") else "-"] for r in results["train"]]
        parts.append(f"training step, fp32, batch {TRAIN_BATCH} (median of {results['settings']['train_iters']})\n"
                     + _table(["preset", "model", "params", "ms/step", "speed vs peer"], rows))
    if results.get("mfu"):
        r = results["mfu"]
        parts.append(f"GPU training step, bf16, {r['preset']} batch {r['batch']} on {m.get('gpu')}: "
                     f"{r['ms_per_step']:.0f} ms/step, {r['tflops']:.0f} TFLOP/s, "
                     f"MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']:.0f} TFLOP/s")
    rows = [[t["name"], "-" if t["value"] is None else f"{t['value']:.3g}", f">= {t['threshold']:g}", t["result"]]
            + ([t["reason"]] if t["reason"] else []) for t in results["targets"]]
    parts.append("targets\n" + _table(["target", "value", "needs", "result"], rows))
    return "\n\n".join(parts)


# ---- entry ------------------------------------------------------------------------------------
def run(presets=("small", "base"), quick: bool = False, force_bf16: bool = False, peers: bool = True,
        results_dir: str | os.PathLike = RESULTS_DIR, train_presets=None, mfu: bool | None = None,
        threads: int | None = None, echo=print) -> dict:
    """Run the model benchmark, write `results_dir/model.json`, return the results.

    Threads default to every core; mfu (the GPU training step) defaults to "when CUDA is available".
    """
    torch.set_num_threads(threads or os.cpu_count())
    warm, enc_iters, mm_iters, train_iters = (1, 2, 3, 2) if quick else (2, 5, 10, 3)
    if train_presets is None:
        train_presets = [p for p in presets if not (quick and p == "base")]
    have_clip, have_peer = peers and _have("transformers"), peers and _have("mammut_pytorch")
    native = cpu_supports_bf16()
    run_bf16 = native or force_bf16
    results = {"machine": machine_info(),
               "settings": {"quick": quick, "presets": list(presets), "train_presets": list(train_presets),
                            "force_bf16": force_bf16, "warmup": warm, "encode_iters": enc_iters,
                            "matmul_iters": mm_iters, "train_iters": train_iters, "encode_batch": ENCODE_BATCH,
                            "train_batch": TRAIN_BATCH, "matmul_n": MATMUL_N, "peers": peers, "peers_clip": have_clip,
                            "peers_mammut_pytorch": have_peer},
               "matmul": {}, "encode": [], "train": [], "mfu": None}
    with torch.inference_mode():
        results["matmul"]["fp32"] = matmul_gflops(torch.float32, warm + 1, mm_iters)
        results["matmul"]["bf16"] = (matmul_gflops(torch.bfloat16, warm + 1, mm_iters) if run_bf16
                                     else {"status": NOT_SUPPORTED})
        echo(f"matmul fp32: {results['matmul']['fp32']['gflops']:.1f} GFLOP/s")
        for name in presets:
            cfg = get_preset(name)
            for dtype in ("fp32", "bf16"):
                if dtype == "bf16" and not run_bf16:
                    results["encode"] += [{"preset": name, "model": m, "dtype": dtype, "status": NOT_SUPPORTED}
                                          for m in ("skyprompt", "hf-clip")]
                    continue
                rows = bench_encode(cfg, dtype, have_clip, warm, enc_iters, results["matmul"][dtype]["gflops"])
                if not have_clip:
                    rows.append({"preset": name, "model": "hf-clip", "dtype": dtype,
                                 "status": "skipped: " + clip_not_measured(peers)})
                results["encode"] += rows
                echo(f"encode {name} {dtype}: " + ", ".join(f"{r['model']} {r['images_per_s']:.1f} img/s"
                                                             for r in rows if "images_per_s" in r))
    for name in train_presets:
        rows = bench_train(get_preset(name), have_peer and have_clip, warm, train_iters)
        results["train"] += rows
        echo(f"train {name}: " + ", ".join(f"{r['model']} {r['ms_per_step']:.0f} ms" for r in rows))
    if torch.cuda.is_available() if mfu is None else mfu:
        results["mfu"] = bench_mfu(get_preset("base"), "cuda", warmup=2 if quick else 3, iters=3 if quick else 10)
    results["targets"] = evaluate_targets(results)
    save_results(results, NAME, results_dir)
    echo("\n" + report(results) + f"\n\nresults: {Path(results_dir) / 'model.json'}")
    return results


def add_arguments(parser) -> None:
    g = parser.add_argument_group("model benchmark")
    g.add_argument("--presets", default="small,base", help="model presets, comma-separated (default: small,base)")
    g.add_argument("--force-bf16", action="store_true",
                   help="run the bf16 rows even where this CPU has no native bf16 (emulated, slow)")
    g.add_argument("--no-peers", action="store_true", help="skip transformers CLIP and MaMMUT-pytorch")


def main(args) -> dict:
    return run(presets=preset_names(args.presets, "--presets"), quick=args.quick, force_bf16=args.force_bf16,
               peers=not args.no_peers, results_dir=args.results_dir)


if __name__ == "__main__":      # `python -m bench.<name>_bench [bench.run's options]`
    import sys

    from bench.run import run_one

    sys.exit(run_one(NAME))
