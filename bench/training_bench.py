"""Training benchmark: samples/s of a full training step (forward, both losses, backward, AdamW) for
`tiny` and `small`, fp32 and bf16 autocast, next to MaMMUT-pytorch at the same dims in the same run.

Targets: ours / MaMMUT-pytorch >= 1.0x in fp32, and >= 2.0x when we train in bf16 and the peer in
fp32 (it has no autocast path of its own). bf16 rows run where the CPU has native bf16 (AVX512-BF16
or AMX) or on a GPU; elsewhere they are reported as not supported (`--force-bf16` runs them emulated).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from backend.model import MaMMUT, MaMMUTLoss, get_preset
from backend.model.precision import autocast_context, cpu_supports_bf16

from . import preset_names, save_results
from .model_bench import NOT_SUPPORTED, _have, machine_info, make_batch, mammut_pytorch, time_interleaved

NAME = "training"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
BATCH = 16
TARGETS = {"fp32": 1.0, "bf16": 2.0}


def step_fns(cfg, batch: int, precision: str, peers: bool) -> dict:
    """{name: a training-step closure} for our model (in `precision`) and the peer (fp32)."""
    images, tokens = make_batch(cfg, batch)
    torch.manual_seed(0)
    ours = MaMMUT(cfg).train()
    crit = MaMMUTLoss(cfg.contrastive_weight, cfg.caption_weight, cfg.pad_id)
    use_bf16 = precision == "bf16"
    models = {"skyprompt": (ours, lambda: crit(ours(images, tokens), tokens)["loss"], use_bf16)}
    if peers:
        peer = mammut_pytorch(cfg).train()
        models["mammut-pytorch"] = (peer, lambda: peer(text=tokens, images=images, return_loss=True), False)
    fns = {}
    for name, (model, loss_fn, bf16) in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(loss_fn=loss_fn, opt=opt, bf16=bf16):
            with autocast_context("cpu", enabled=bf16):
                loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        fns[name] = (step, sum(p.numel() for p in model.parameters()))
    return fns


def run(presets=("tiny", "small"), quick: bool = False, peers: bool = True, force_bf16: bool = False,
        results_dir: str | os.PathLike | None = RESULTS_DIR, threads: int | None = None, echo=print) -> dict:
    torch.set_num_threads(threads or os.cpu_count())
    warmup, iters = (1, 2) if quick else (2, 5)
    peers = peers and _have("mammut_pytorch") and _have("transformers")   # its image encoder is transformers' CLIP
    native = cpu_supports_bf16()
    results = {"machine": machine_info(), "settings": {"batch": BATCH, "warmup": warmup, "iters": iters,
                                                         "peer": peers, "force_bf16": force_bf16},
               "rows": [], "targets": []}
    for name in presets:
        cfg = get_preset(name)
        for precision in ("fp32", "bf16"):
            if precision == "bf16" and not (native or force_bf16):
                results["rows"].append({"preset": name, "precision": precision, "status": NOT_SUPPORTED})
                continue
            fns = step_fns(cfg, BATCH, precision, peers)
            timed = time_interleaved({k: f for k, (f, _) in fns.items()}, warmup, iters)
            row = {"preset": name, "precision": precision, "batch": BATCH, "params": fns["skyprompt"][1],
                   "samples_per_s": BATCH / timed["skyprompt"]["median_s"], "times_s": timed["skyprompt"]["times_s"]}
            if peers:
                row["peer_samples_per_s"] = BATCH / timed["mammut-pytorch"]["median_s"]
                row["vs_peer"] = row["samples_per_s"] / row["peer_samples_per_s"]
            results["rows"].append(row)
            echo(f"train {name} {precision}: {row['samples_per_s']:.1f} samples/s"
                 + (f" (MaMMUT-pytorch fp32 {row['peer_samples_per_s']:.1f}, {row['vs_peer']:.2f}x)" if peers else ""))
    for row in results["rows"]:
        precision = row["precision"]
        goal = f"{row['preset']} {precision}: ours / MaMMUT-pytorch (fp32) >= {TARGETS[precision]}x"
        if "vs_peer" not in row:
            results["targets"].append({"target": goal, "result": "N/A", "why": row.get("status", "no peer")})
        else:
            results["targets"].append({"target": goal, "result": "PASS" if row["vs_peer"] >= TARGETS[precision]
                                       else "FAIL", "value": row["vs_peer"]})
    save_results(results, NAME, results_dir)
    echo(report(results))
    return results


def report(results: dict) -> str:
    lines = ["| preset | precision | ours samples/s | MaMMUT-pytorch fp32 samples/s | ratio |", "|---|---|---|---|---|"]
    for r in results["rows"]:
        if "samples_per_s" not in r:
            lines.append(f"| {r['preset']} | {r['precision']} | {r['status']} | | |")
            continue
        peer = f"{r['peer_samples_per_s']:.1f}" if "peer_samples_per_s" in r else "-"
        ratio = f"{r['vs_peer']:.2f}x" if "vs_peer" in r else "-"
        lines.append(f"| {r['preset']} | {r['precision']} | {r['samples_per_s']:.1f} | {peer} | {ratio} |")
    lines.append("")
    lines += [f"{t['result']:>4}  {t['target']}" for t in results["targets"]]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    g = parser.add_argument_group("training benchmark")
    g.add_argument("--training-presets", default="tiny,small", help="presets for the training benchmark")


def main(args) -> dict:
    presets = preset_names(getattr(args, "training_presets", "tiny,small"), "--training-presets")
    return run(presets=presets, quick=args.quick, peers=not getattr(args, "no_peers", False),
               force_bf16=getattr(args, "force_bf16", False), results_dir=args.results_dir)


if __name__ == "__main__":      # `python -m bench.<name>_bench [bench.run's options]`
    import sys

    from bench.run import run_one

    sys.exit(run_one(NAME))
