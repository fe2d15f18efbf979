"""GPU benchmark: what SkyPrompt does on one CUDA GPU, next to its peers in the same run.

Sections (bench/README.md has the details):
- matmul: this GPU's measured bf16 TFLOP/s (one 8192^3 product), the ceiling the rest is read against;
- image encoding: images/s of our encode_image and of transformers' CLIP vision tower at the same size,
  fp32 and bf16 autocast, batch 256; the default checkpoint's shape (`small`, conv stem, 128 px) and `base`;
- training step: forward + backward + fused AdamW under bf16 autocast, eager and torch.compile, with
  MFU (analytic FLOPs / time / the GPU's bf16 peak) for the default recipe's model and for `base`;
- backend engine: the bundled checkpoint in `backend.engine.ModelEngine` (what `python -m backend serve`
  runs) on the GPU and on this machine's CPU: tiles/s embedded, SAO relevance tiles/s (each tile one map a
  prompt; gpu.json has maps/s too), caption latency.

Without CUDA the module reports that it was skipped and writes that to gpu.json, unless gpu.json already
holds a GPU run's results: those are kept.
Run: `python -m bench.gpu_bench` (or `python -m bench.run --only gpu`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from backend.defaults import BUNDLED_CHECKPOINT
from backend.model import MaMMUT, get_preset
from backend.model.precision import autocast_context
from bench import check_results_dir, checked_or_exit, save_results

from .model_bench import (GPU_BF16_PEAK, _f, _have, _table, autocast_train_step, clip_vision, encoder_flops,
                          machine_info, make_batch, time_interleaved, train_flops_per_sample)

NAME = "gpu"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MATMUL_N = 8192
ENCODE_BATCH = 256
# (label, preset overrides, training batch): the default recipe's model, and the ViT-B/16 size
LARGE_BATCH = 1024
MODELS = {"small-128": ({"preset": "small", "image_size": 128, "patch_stem": "conv"}, 256),
          "base-224": ({"preset": "base"}, 64)}


def model_config(label: str):
    overrides = dict(MODELS[label][0])
    return get_preset(overrides.pop("preset"), **overrides)


def bench_matmul(device, warmup: int, iters: int, n: int = MATMUL_N) -> dict:
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    r = time_interleaved({"mm": lambda: a @ b}, warmup, iters, device)["mm"]
    return {"n": n, "tflops": 2 * n ** 3 / r["median_s"] / 1e12, **r}


def bench_encode(label: str, device, warmup: int, iters: int, peers: bool, batch: int = ENCODE_BATCH) -> list[dict]:
    """images/s of ours and of HF CLIP at the same ViT size, taking turns, fp32 and bf16 autocast."""
    cfg = model_config(label)
    images, _ = make_batch(cfg, batch, device)
    models = {"skyprompt": MaMMUT(cfg).to(device).eval()}
    peer_error = None
    if peers:
        try:
            models["hf-clip"] = clip_vision(cfg).to(device).eval()
        except Exception as e:          # a transformers release that builds CLIP differently: report, go on
            peer_error, peers = f"hf-clip not built: {e!r}", False
    embed = {"skyprompt": lambda x: models["skyprompt"].encode_image(x),
             "hf-clip": lambda x: models["hf-clip"](pixel_values=x).pooler_output}
    rows = []
    for dtype in ("fp32", "bf16"):
        def run(name, dtype=dtype):
            with torch.inference_mode(), autocast_context(device, enabled=dtype == "bf16"):
                return embed[name](images)

        timed = time_interleaved({name: (lambda name=name: run(name)) for name in models}, warmup, iters, device)
        group = []
        for name in models:
            stem = models[name].visual.patch_embed if name == "skyprompt" else None
            ips = batch / timed[name]["median_s"]
            group.append({"model_label": label, "model": name, "dtype": dtype, "batch": batch, "images_per_s": ips,
                          "ms_per_batch": 1e3 * timed[name]["median_s"], "times_s": timed[name]["times_s"],
                          "tflops": encoder_flops(cfg, name, stem) * ips / 1e12})
        if peers:
            group[0]["vs_clip"] = group[0]["images_per_s"] / group[1]["images_per_s"]
        if peer_error:
            group[0]["peer_error"] = peer_error
        rows += group
    return rows


def bench_train(label: str, device, warmup: int, iters: int, compile_model: bool, batch: int | None = None) -> dict:
    """One bf16-autocast training step (forward, contrastive + captioning loss, backward, fused AdamW)."""
    cfg = model_config(label)
    batch = batch or MODELS[label][1]
    torch.manual_seed(0)
    model = MaMMUT(cfg).to(device).train()
    flops = train_flops_per_sample(model) * batch
    if compile_model:
        # a fresh dynamo state per model: compiling a second model after the first in one process
        # failed inside inductor on torch 2.11, where the same model compiled alone did not
        torch._dynamo.reset()
    step = autocast_train_step(model, batch, device, torch.compile(model) if compile_model else None)
    t0 = time.perf_counter()
    step()                          # the first step compiles; timed apart from the rest
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    r = time_interleaved({"step": step}, warmup, iters, device)["step"]
    peak_mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return {"model_label": label, "preset": cfg.preset, "image_size": cfg.image_size, "batch": batch,
            "compiled": compile_model, "first_step_s": first_s, "ms_per_step": 1e3 * r["median_s"],
            "times_s": r["times_s"], "samples_per_s": batch / r["median_s"], "flops_per_step": flops,
            "tflops": flops / r["median_s"] / 1e12, "mfu": flops / r["median_s"] / GPU_BF16_PEAK,
            "peak_memory_gib": peak_mem, "params": model.num_params()}


def time_edge_refinement(device, side: int, prompts: int, radius: int) -> float:
    """Seconds for Segment's edge refinement (backend.edges) of `prompts` maps over side^2 pixels."""
    from backend.edges import edge_refined

    rng = np.random.default_rng(1)
    rel = rng.random((prompts, side, side), dtype=np.float32) / (prompts + 1)
    rgb = rng.integers(0, 256, (3, side, side), dtype=np.uint8)
    valid = np.ones((side, side), bool)
    edge_refined(rel[:1, :256, :256], rgb[:, :256, :256], valid[:256, :256], radius, device=device)   # warm-up
    t0 = time.perf_counter()
    edge_refined(rel, rgb, valid, radius, device=device)
    return time.perf_counter() - t0


def sao_rates(tiles: int, prompts: int, seconds: float) -> dict:
    """Rates of one relevance call over `tiles` tiles and `prompts` prompts: it makes one map per tile
    and prompt, so maps/s is `prompts` times tiles/s."""
    return {"sao_tiles_per_s": tiles / seconds, "sao_maps_per_s": tiles * prompts / seconds}


def bench_engine(device: str, checkpoint=None, tiles: int = 512, sao_tiles: int = 64, prompts: int = 5,
                 caption_iters: int = 5, edge_side: int = 4096, edge_prompts: int = 16) -> dict | None:
    """The serving path on `device` and on the CPU, one after the other (each engine owns its worker);
    edge refinement of `edge_prompts` maps over an edge_side^2 extent (the largest Segment reads)."""
    from backend.defaults import edge_radius_for
    from backend.engine import ModelEngine

    directory = Path(checkpoint) if checkpoint else BUNDLED_CHECKPOINT
    if not directory.is_dir():
        return None
    out = {"checkpoint": str(directory), "tiles": tiles, "sao_tiles": sao_tiles, "prompts": prompts,
           "edge_side": edge_side, "edge_prompts": edge_prompts}
    for where in dict.fromkeys((device, "cpu")):
        engine = ModelEngine(directory, device=where)
        try:
            size = engine.image_size
            rng = np.random.default_rng(0)
            batch = rng.integers(0, 256, (tiles, 3, size, size), dtype=np.uint8)
            texts = ["a forest", "an airport", "a river", "a parking lot", "farmland"][:prompts]
            engine.embed_images(batch[:32])                           # warm-up
            t0 = time.perf_counter()
            engine.embed_images(batch)
            embed_s = time.perf_counter() - t0
            text = engine.embed_texts(texts)
            engine.relevance(batch[:8], text, window=7, sigma=0.0)
            t0 = time.perf_counter()
            engine.relevance(batch[:sao_tiles], text, window=7, sigma=0.0)
            sao_s = time.perf_counter() - t0
            engine.caption(batch[0], max_len=30, beam_size=3)
            times = []
            for i in range(caption_iters):
                t0 = time.perf_counter()
                engine.caption(batch[i + 1], max_len=30, beam_size=3)
                times.append(time.perf_counter() - t0)
            edge_s = time_edge_refinement(engine.device, edge_side, edge_prompts, edge_radius_for(None, size))
            out[engine.device.type] = {"tiles_per_s": tiles / embed_s, **sao_rates(sao_tiles, len(texts), sao_s),
                                       "caption_ms": 1e3 * float(np.median(times)), "edge_refine_s": edge_s,
                                       "threads": torch.get_num_threads()}
        finally:
            engine.stop()
    gpu, cpu = out.get("cuda"), out["cpu"]
    if gpu:
        out["gpu_vs_cpu"] = {k: (gpu[k] / cpu[k] if k.endswith("_per_s") else cpu[k] / gpu[k])
                             for k in ("tiles_per_s", "sao_tiles_per_s", "caption_ms", "edge_refine_s")}
    return out


def report(results: dict) -> str:
    m = results["machine"]
    parts = [f"GPU: {m.get('gpu')}, torch {m['torch']}, host {m['cpu']} ({m['cores']} cores)",
             f"bf16 matmul {results['matmul']['n']}^3: {results['matmul']['tflops']:.0f} TFLOP/s measured "
             f"(spec peak {GPU_BF16_PEAK / 1e12:.0f})"]
    rows = [[r["model_label"], r["model"], r["dtype"], _f(r["images_per_s"], ".0f"), _f(r["ms_per_batch"], ".1f"),
             _f(r["tflops"], ".1f"), _f(r.get("vs_clip"), ".2f") + "x" if r.get("vs_clip") else "-"]
            for r in results["encode"]]
    parts.append(f"image encoding, batch {results['encode'][0]['batch']}, inference mode\n"
                 + _table(["model", "encoder", "dtype", "img/s", "ms/batch", "TFLOP/s", "vs CLIP"], rows))
    mm = results["matmul"]["tflops"]
    rows = [[r["model_label"], str(r["batch"]), "compiled" if r["compiled"] else "eager", _f(r["ms_per_step"], ".1f"),
             _f(r["samples_per_s"], ".0f"), _f(r["tflops"], ".0f"), _f(100 * r["mfu"], ".1f") + "%",
             _f(100 * r["tflops"] / mm, ".0f") + "%", _f(r["peak_memory_gib"], ".1f"), _f(r["first_step_s"], ".1f")]
            for r in results["train"]]
    parts.append("training step, bf16 autocast, fused AdamW\n" + _table(
        ["model", "batch", "mode", "ms/step", "samples/s", "TFLOP/s", "MFU", "of matmul", "GiB", "1st step s"], rows))
    parts += [f"not measured: {err}" for err in results.get("errors", [])]
    e = results.get("engine")
    if e:
        rows = [[where, _f(e[where]["tiles_per_s"], ".0f"), _f(e[where]["sao_tiles_per_s"], ".0f"),
                 _f(e[where]["caption_ms"], ".0f"), _f(e[where]["edge_refine_s"], ".2f"), str(e[where]["threads"])]
                for where in ("cuda", "cpu") if where in e]
        if "gpu_vs_cpu" in e:
            r = e["gpu_vs_cpu"]
            rows.append(["GPU / CPU", _f(r["tiles_per_s"], ".1f") + "x", _f(r["sao_tiles_per_s"], ".1f") + "x",
                         _f(r["caption_ms"], ".1f") + "x", _f(r["edge_refine_s"], ".1f") + "x", ""])
        parts.append(f"backend engine, {Path(e['checkpoint']).name} checkpoint ({e['tiles']} tiles; "
                     f"{e['sao_tiles']} tiles x {e['prompts']} prompts SAO window 7; caption beam 3; edge "
                     f"refinement of {e['edge_prompts']} maps over {e['edge_side']}^2 px)\n"
                     + _table(["device", "tiles/s", f"SAO tiles/s ({e['prompts']} maps each)", "caption ms",
                               "edge refine s", "CPU threads"], rows))
    return "\n\n".join(parts)


def skip(path: Path, echo=print) -> dict:
    """No CUDA here: a skip record in `path`, unless it holds a GPU run's results, which are kept
    (a CPU machine running every benchmark replaced the numbers a GPU machine wrote)."""
    results = {"skipped": "no CUDA GPU on this machine", "machine": machine_info()}
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        earlier = None
    if isinstance(earlier, dict) and "skipped" not in earlier:
        echo(f"GPU benchmark skipped: no CUDA GPU on this machine; kept the GPU results already in {path}")
        return results
    save_results(results, NAME, path.parent)
    echo("GPU benchmark skipped: no CUDA GPU on this machine")
    return results


def run(quick: bool = False, compile_model: bool = True, peers: bool = True, device: str = "cuda",
        models=tuple(MODELS), results_dir: str | os.PathLike = RESULTS_DIR, echo=print) -> dict:
    """Run the GPU benchmark on `device` (the CPU only for smoke tests) and write gpu.json."""
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return skip(out / "gpu.json", echo)
    torch.set_num_threads(os.cpu_count())
    torch.backends.cuda.matmul.allow_tf32 = True      # fp32 rows use TF32 tensor cores, as training does
    torch.backends.cudnn.allow_tf32 = True
    warm, iters = (1, 3) if quick else (3, 10)
    peers = peers and _have("transformers")
    results = {"machine": machine_info(), "device": str(dev),
               "settings": {"quick": quick, "compile": compile_model, "warmup": warm, "iters": iters,
                            "encode_batch": ENCODE_BATCH, "models": list(models), "peers_clip": peers,
                            "tf32": True},
               "matmul": bench_matmul(dev, warm, iters, MATMUL_N if dev.type == "cuda" else 512),
               "encode": [], "train": [], "engine": None, "errors": []}
    echo(f"bf16 matmul: {results['matmul']['tflops']:.0f} TFLOP/s")
    for label in models:
        rows = bench_encode(label, dev, warm, iters, peers, ENCODE_BATCH if dev.type == "cuda" else 4)
        results["encode"] += rows
        echo(f"encode {label}: " + ", ".join(f"{r['model']} {r['dtype']} {r['images_per_s']:.0f} img/s" for r in rows))
    save = lambda: save_results(results, NAME, out)  # noqa: E731
    save()
    for label in models:
        for compiled in ((False, True) if compile_model else (False,)):
            try:
                r = bench_train(label, dev, warm, iters, compiled, None if dev.type == "cuda" else 2)
            except Exception as e:      # e.g. torch.compile without a working compiler: the other rows still count
                if not compiled:
                    raise
                results["errors"].append(f"train {label} compiled: {e!r}"[:2000])
                echo(results["errors"][-1])
                continue
            results["train"].append(r)
            echo(f"train {label} {'compiled' if compiled else 'eager'}: {r['ms_per_step']:.1f} ms/step, "
                 f"MFU {100 * r['mfu']:.1f}%")
            save()
    if dev.type == "cuda" and "small-128" in models:
        # the default's model at 4x the batch, eager: whether a bigger batch buys samples/s (a step this
        # small is bound by kernel launches, not FLOPs) now that --images-on-device can feed it
        r = bench_train("small-128", dev, warm, iters, False, LARGE_BATCH)
        results["train"].append(r)
        echo(f"train small-128 eager, batch {LARGE_BATCH}: {r['ms_per_step']:.1f} ms/step, MFU {100 * r['mfu']:.1f}%")
        save()
    results["engine"] = bench_engine(device, tiles=64 if quick else 512, sao_tiles=8 if quick else 64,
                                     caption_iters=2 if quick else 5, edge_side=512 if quick else 4096,
                                     edge_prompts=2 if quick else 16)
    save()
    echo("\n" + report(results) + f"\n\nresults: {out / 'gpu.json'}")
    return results


def add_arguments(parser) -> None:
    g = parser.add_argument_group("GPU benchmark")
    g.add_argument("--gpu-no-compile", action="store_true", help="skip the torch.compile training rows")


def main(args) -> dict:
    return run(quick=args.quick, compile_model=not args.gpu_no_compile, results_dir=args.results_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke runs; noisier numbers)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where gpu.json goes")
    add_arguments(parser)
    args = parser.parse_args()
    checked_or_exit(check_results_dir, args.results_dir)
    main(args)
    sys.exit(0)
