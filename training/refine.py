"""Pseudo-label refinement of the dense path: distil image-level knowledge into localization.

    python -m training.refine --checkpoint backend/checkpoints/default --recipe training/recipes/default.json \
        --rounds 3 --steps-per-round 200 --out runs/refine --export-fp16 runs/refine/fp16

Round r = 1..R:
  1. Pseudo-labels. Training mosaics at the model's image size (--regions regions, 2 or more, 3 by
     default, of training images of the recipe's folder-of-classes sources) get one label per patch
     from the current model's SAO maps, restricted to the classes the mosaic is known to contain:
     image-level labels only, never its mask. A patch whose best class does not beat the runner-up
     by --margin (in probability) is ignored.
  2. Training. --steps-per-round steps of the usual contrastive + captioning loss on the recipe's
     caption data (so retrieval does not collapse) plus --dense-weight x a per-patch cross-entropy:
     each patch's SAO embedding against every class's text embedding at the model's temperature (text
     side and temperature held fixed: the per-patch loss trains the image side only).
  3. Measurement. The pseudo-labels' accuracy against the mosaics' own masks (monitoring only: the
     masks never reach training; rank 0's mosaics), localization mIoU (training.localization on
     validation mosaics, as `evaluate segmentation` computes it), zero-shot top-1 and retrieval mR on
     the recipe's validation split.
Round 0 is the starting checkpoint, measured the same way. Rows go to OUT/metrics.jsonl, weights to
OUT/rounds/round_N (atomic), each with words.json as training writes it (the starting checkpoint's
words and the recipe's training captions). A re-run resumes after the last complete round. Runs
under torchrun like training.train (each rank labels and trains on its own slice of the mosaics).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from backend.defaults import DEFAULT_SAO_WINDOW
from backend.files import file_in_the_way
from backend.model import MaMMUTLoss
from backend.model.checkpoint import CheckpointError, check_checkpoint_target, load_checkpoint, save_checkpoint
from backend.model.precision import autocast_context
from backend.model.prompts import ensemble_prompts, pool_ensemble
from backend.segment import relevance_map

from . import recipe as recipes
from .augment import AUGMENTATIONS
from .localization import SEGMENT_OVERLAP, DirectModel, upsample_image
from .mosaic import MosaicError, build_mosaic, build_mosaics
from .train import (TrainConfig, _append_metrics, batch_stream, is_main, launched_as_rank_zero, log, param_groups,
                    run_words, setup_distributed)

PROMPT = "an aerial photo of {}."   # the class prompt of --class-prompts single
IGNORE = -1


@dataclass
class RefineConfig:
    checkpoint: str = "backend/checkpoints/default"
    recipe: str = "training/recipes/default.json"
    out: str = "runs/refine"
    rounds: int = 3
    steps_per_round: int = 200
    batch_size: int = 32             # caption pairs per step (global)
    dense_batch: int = 16            # pseudo-labelled mosaics per step (global)
    mosaics_per_round: int = 512
    regions: int = 3
    window: int = DEFAULT_SAO_WINDOW
    label_zoom: int = 2               # pseudo-labels from maps of the mosaic upsampled this much
    margin: float = 0.2
    class_aware: bool = True         # same-class pairs are positives, as the default checkpoint trained
    augment: str = "overhead"        # image augmentation of the caption pairs (training.augment.AUGMENTATIONS)
    template_mix: float = 0.0        # P(caption -> one of its class's templates), as training.train --template-mix
    dense_weight: float = 1.0
    class_prompts: str = "ensemble"  # class text for labels and the dense loss: "ensemble" (as evaluation) or "single"
    keep_global: float = 0.0         # weight of 1 - cos(global image embedding, the starting model's)
    lr: float = 5e-5
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    benchmark: str = ""              # validation set for the mIoU (default: the first folder source's)
    eval_mosaics: int = 20
    eval_seed: int = 0
    device: str = "auto"
    workers: int = 1
    export_fp16: str | None = None


class RefineStep(torch.nn.Module):
    """One forward for all losses, so DDP sees every parameter's gradient through forward()."""

    def __init__(self, model, loss_fn, window: int, teacher=None):
        super().__init__()
        self.model, self.loss_fn, self.window = model, loss_fn, window
        # the frozen starting model, kept out of the module tree: DDP and the optimizer never see it
        self._teacher = [teacher] if teacher is not None else []

    def forward(self, images, tokens, class_ids, mosaics, labels, class_tokens, class_owner):
        out = self.model(images, tokens)
        losses = self.loss_fn(out, tokens, class_ids)
        if self._teacher:
            # keep each caption image's global embedding where the starting model put it: the dense
            # loss may reshape the patch path, but what zero-shot search and retrieval use stays put
            with torch.no_grad():
                target = self._teacher[0].encode_image(images)
            losses["keep_loss"] = (1 - (out["image_features"] * target.to(out["image_features"].dtype)).sum(-1)).mean()
        dense = self.model.sao_embeddings(mosaics, self.window)
        # the per-patch loss moves the image side only: pseudo-labels are noisy, and letting them pull
        # the class prompts' text embeddings or the temperature would move what zero-shot search uses
        with torch.no_grad():
            text = class_text(self.model, class_tokens, class_owner)
            scale = self.model.logit_scale.clamp(max=self.model.config.max_logit_scale).exp()
        logits = scale * torch.einsum("bxye,ce->bcxy", dense, text)
        losses["dense_loss"] = F.cross_entropy(logits, labels, ignore_index=IGNORE)
        return losses


def class_text(model, tokens: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """[C, E] class text embeddings from the tokens of every class's prompts ([P, L]; `owner`: the
    class of each prompt), pooled per class as zero-shot evaluation pools its prompt ensemble."""
    return pool_ensemble(F.normalize(model.encode_text(tokens), dim=-1), owner, int(owner.max()) + 1)


def class_prompt_texts(names, kind: str) -> tuple[list[str], list[int]]:
    """The prompts of each class name and their class index: the zero-shot ensemble, or one prompt."""
    if kind == "ensemble":
        return ensemble_prompts(list(names))
    return [PROMPT.format(n) for n in names], list(range(len(names)))


def round_lr(step: int, steps: int, peak: float) -> float:
    """Each round: linear warm-up over its first tenth, then cosine down to a tenth of the peak, so a
    round ends on small steps before its weights label the next round's mosaics."""
    warm = max(1, steps // 10)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def folder_sources(train_sources: list[dict]) -> list[dict]:
    """Training sources whose records carry classes: the ones mosaics can be made of."""
    out = []
    for s in train_sources:
        if s.get("kind") != "folder":
            continue
        by_class: dict[str, list[str]] = {}
        for r in s["records"]:
            by_class.setdefault(r.class_name, []).append(str(r.image))
        mapping = s["classnames"] if isinstance(s["classnames"], dict) else recipes.D.load_classnames(s["classnames"])
        names = {k: (v if isinstance(v, str) else v[0]) for k, v in mapping.items() if k in by_class}
        if len(names) >= 2:
            out.append({"name": s["name"], "by_class": {k: by_class[k] for k in names}, "names": names})
    return out


@torch.no_grad()
def pseudo_labels(model, mosaics: np.ndarray, present: list[list[int]], text: torch.Tensor, window: int,
                  margin: float, device, zoom: int = 1) -> torch.Tensor:
    """[B, G, G] class index per patch (IGNORE where unsure; on the CPU), from the model's own SAO maps
    over the classes each mosaic contains.

    With zoom > 1 each mosaic is first upsampled `zoom` times and mapped tile by tile as the backend's
    Segment does, and the probabilities are averaged back onto the patch grid: each tile then holds
    fewer regions, and the model's maps of it are more accurate than at 1x (stage-4 checkpoint, RSSCN7
    training mosaics of 3 regions, SAO 7x7: 65% of patches right at zoom 2 against 47% at 1x), so the
    labels teach the 1x maps what the model sees when it looks closer."""
    was = model.training
    model.eval()
    grid = model.config.image_size // model.config.patch_size
    allowed = torch.zeros(len(present), text.shape[0], dtype=torch.bool)
    for i, classes in enumerate(present):
        allowed[i, classes] = True
    if zoom == 1:
        x = model.preprocess(torch.from_numpy(mosaics).to(device))
        cos = model.sao_relevance_map(x, text, window).cpu()                   # [B, C, G, G]
        scale = float(model.logit_scale.clamp(max=model.config.max_logit_scale).exp())
        probs = (cos * scale).masked_fill(~allowed[:, :, None, None], float("-inf")).softmax(1)
    else:
        engine = DirectModel(model, None, device)
        text_np = text.float().cpu().numpy()
        probs = torch.zeros(len(present), text.shape[0], grid, grid)
        for i, classes in enumerate(present):
            big = upsample_image(mosaics[i], zoom)
            blended, _ = relevance_map(big, np.ones(big.shape[1:], bool), text_np[classes], len(classes), engine,
                                       window, 0.0, SEGMENT_OVERLAP)
            probs[i, classes] = F.adaptive_avg_pool2d(torch.from_numpy(blended)[None], grid)[0]
    top = probs.topk(2, dim=1)
    labels = top.indices[:, 0]
    labels[(top.values[:, 0] - top.values[:, 1]) < margin] = IGNORE
    model.train(was)
    return labels


def patch_classes(mask: np.ndarray, patch: int) -> np.ndarray:
    """[G, G] the class covering most of each patch of a [H, W] class mask."""
    g_h, g_w = mask.shape[0] // patch, mask.shape[1] // patch
    cells = mask[:g_h * patch, :g_w * patch].reshape(g_h, patch, g_w, patch).transpose(0, 2, 1, 3)
    cells = cells.reshape(g_h, g_w, patch * patch).astype(np.int64)
    classes = np.unique(cells)
    counts = np.stack([(cells == c).sum(-1) for c in classes])
    return classes[counts.argmax(0)]


def _augment(images: torch.Tensor, labels: torch.Tensor, g: torch.Generator):
    """Same random flip / 90-degree rotation for a mosaic and its label grid."""
    k = int(torch.randint(4, (1,), generator=g))
    images, labels = torch.rot90(images, k, (-2, -1)), torch.rot90(labels, k, (-2, -1))
    if torch.rand(1, generator=g) < 0.5:
        images, labels = images.flip(-1), labels.flip(-1)
    return images, labels


def measure(model, tokenizer, val_sets: dict, bench: dict | None, cfg: RefineConfig, device,
            progress: bool = False) -> dict:
    from . import evaluate as ev
    from . import localization as L

    model.eval()
    row: dict = {}
    if bench is not None:
        direct = L.DirectModel(model, tokenizer, device)
        text = ev.class_text_embeddings(model, tokenizer, bench["names"], device=device).numpy().astype(np.float32)
        mosaics = build_mosaics({k: bench["by_class"].get(k, []) for k in bench["names"]}, cfg.eval_seed,
                                cfg.eval_mosaics, size=512, regions=5, scene_px=model.config.image_size)
        # the dense maps refinement trains, and the same maps refined along the image's edges as
        # Segment serves them (the labels never see the edges: the gain is the model's own)
        plain = f"sao{cfg.window}" if f"sao{cfg.window}-edges" in L.METHODS else f"sao{DEFAULT_SAO_WINDOW}"
        r = L.evaluate_mosaics(direct, mosaics, text, [plain, f"{plain}-edges"], progress=progress)
        edges = r[f"{plain}-edges"]
        row.update({"miou": r[plain]["miou"], "pixel_accuracy": r[plain]["pixel_accuracy"],
                    "boundary_f": r[plain]["boundary_f"], "miou_edges": edges["miou"],
                    "boundary_f_edges": edges["boundary_f"]})
    for name, vs in val_sets.items():
        if vs["kind"] == "zero-shot":
            row[f"{name}/top1"] = ev.evaluate_zero_shot(model, tokenizer, vs["records"], vs["classnames"], device,
                                                        progress=progress)["top1"]
        else:
            row[f"{name}/mean_recall"] = ev.evaluate_retrieval(model, tokenizer, vs["records"], device,
                                                               progress=progress)["mean_recall"]
    model.train()
    return row


class RefineError(ValueError):
    """Refinement that cannot start as asked; the message says what to fix."""


def _benchmark_set(val_sets: dict, name: str) -> dict | None:
    candidates = {k: v for k, v in val_sets.items() if v["kind"] == "zero-shot"}
    if not candidates:
        return None
    key = name or next(iter(candidates))
    if key not in candidates:
        raise RefineError(f"--benchmark {key!r} is not a validation set of the recipe "
                          f"(choose from {', '.join(candidates)})")
    vs = candidates[key]
    mapping = vs["classnames"]
    by_class: dict[str, list[str]] = {}
    for r in vs["records"]:
        by_class.setdefault(r.class_name, []).append(str(r.image))
    names = {k: (v if isinstance(v, str) else v[0]) for k, v in mapping.items() if k in by_class}
    return {"name": key, "by_class": by_class, "names": names}


def _rounds_done(out: Path) -> list[Path]:
    root = out / "rounds"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("round_") and p.name[6:].isdigit()]
    return sorted(done, key=lambda p: int(p.name[6:]))     # by number: round_10 after round_9


# settings a resumed run may change: the rounds to reach, and where and how it runs
RESUME_MAY_CHANGE = ("out", "rounds", "device", "workers", "export_fp16")
PATH_SETTINGS = ("checkpoint", "recipe")      # recorded as absolute paths: a resume may run from another folder


def settings_changed(out: Path, cfg: RefineConfig) -> list[str]:
    """The settings of `cfg` that differ from those of the rounds already in `out` ("--lr 5e-05 ->
    0.001"): a resume continues their run, and its rounds and metrics would mix two."""
    try:
        first = json.loads((out / "refine_config.json").read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(first, dict) or not _rounds_done(out):
        return []

    def same(key, a, b) -> bool:
        if key in PATH_SETTINGS and isinstance(a, str) and isinstance(b, str):
            # a relative path recorded by an earlier version was relative to a folder not known here
            return not os.path.isabs(a) or os.path.realpath(a) == os.path.realpath(b)
        return a == b

    return [f"--{k.replace('_', '-')} {first[k]} -> {v}" for k, v in _recorded(cfg).items()
            if k not in RESUME_MAY_CHANGE and k in first and not same(k, first[k], v)]


def _recorded(cfg: RefineConfig) -> dict:
    """The settings as refine_config.json keeps them: paths absolute, so a resume from another folder
    compares the same files."""
    return {**asdict(cfg), **{k: os.path.abspath(getattr(cfg, k)) for k in PATH_SETTINGS}}


def refine(cfg: RefineConfig) -> list[dict]:
    rank, world, device = setup_distributed(cfg.device)
    out = Path(cfg.out)
    if cfg.batch_size % world or cfg.dense_batch % world:
        raise RefineError(f"--batch-size and --dense-batch must be divisible by the {world} processes")
    changed = settings_changed(out, cfg)
    if changed:
        raise RefineError(f"--out {out} holds rounds of a run with other settings ({'; '.join(changed)}): resume "
                          "it with its own (its refine_config.json), or give a new --out")
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "refine_config.json").write_text(json.dumps(_recorded(cfg), indent=2) + "\n")
    done = _rounds_done(out)
    start_round = int(done[-1].name.split("_")[1]) if done else 0
    source = done[-1] if done else Path(cfg.checkpoint)
    model, tokenizer = load_checkpoint(source, device=device, dtype=torch.float32)
    if start_round:
        log(f"resuming after round {start_round} ({source})")
    sources = recipes.sources_from_args(cfg.recipe, [], [], [], [], 0)   # paths resolved as training.train does
    train_sources, val_sets = recipes.build_sources(sources, seed=cfg.seed)
    mosaic_sources = folder_sources(train_sources)
    if not mosaic_sources:
        raise RefineError("the recipe has no folder-of-classes source with two or more classes to make "
                          "mosaics of")
    fewest = min(sum(1 for paths in s["by_class"].values() if paths) for s in mosaic_sources)
    if cfg.regions > fewest:
        log(f"note: --regions {cfg.regions}: a source has only {fewest} classes with images, and a mosaic's regions "
            f"are of distinct classes: its mosaics have {fewest} regions")
    bench = _benchmark_set(val_sets, cfg.benchmark)
    # every checkpoint written gets words.json, as training's do: the starting checkpoint's words and
    # this run's captions (the backend tells a user which words of a search the model barely knows)
    words = run_words(TrainConfig(init_checkpoint=cfg.checkpoint), train_sources) if is_main() else None
    write_words = words.save if words is not None else None
    mcfg = model.config
    size = mcfg.image_size
    dataset = recipes.make_dataset(train_sources, size, mcfg, seed=cfg.seed, class_aware=cfg.class_aware,
                                   augment=cfg.augment, template_mix=cfg.template_mix)
    loss_fn = MaMMUTLoss(mcfg.contrastive_weight, mcfg.caption_weight, mcfg.pad_id)
    teacher = None
    if cfg.keep_global > 0:
        teacher, _ = load_checkpoint(cfg.checkpoint, device=device, dtype=torch.float32)
        teacher.requires_grad_(False)
    step_module = RefineStep(model, loss_fn, cfg.window, teacher)
    model.to(device).train()
    train_module = (torch.nn.parallel.DistributedDataParallel(step_module, device_ids=[device.index]
                                                             if device.type == "cuda" else None)
                    if world > 1 else step_module)
    amp = autocast_context(device)
    metrics_path = out / "metrics.jsonl"
    rows = []
    if start_round == 0 and is_main():
        row = {"round": 0, **measure(model, tokenizer, val_sets, bench, cfg, device, progress=True)}
        log("round 0 " + json.dumps(row))
        _append_metrics(metrics_path, row)
        rows.append(row)
    class_tokens, class_owner = [], []
    for s in mosaic_sources:
        texts, owner = class_prompt_texts(s["names"].values(), cfg.class_prompts)
        class_tokens.append(tokenizer(texts, mcfg.context_length).to(device))
        class_owner.append(torch.tensor(owner, dtype=torch.long, device=device))

    from tqdm import tqdm

    for rnd in range(start_round + 1, cfg.rounds + 1):
        t0 = time.time()
        # 1. pseudo-labels for this rank's mosaics
        per_rank = max(cfg.mosaics_per_round // world, cfg.dense_batch // world)
        pool = []           # (source index, uint8 image [3,S,S], labels [G,G])
        right = labelled = 0  # pseudo-labels checked against the mosaics' masks (monitoring only)
        with torch.no_grad():
            text = [class_text(model, t, o) for t, o in zip(class_tokens, class_owner)]
        # minutes of work at the default settings: shown (rank 0 counts its own share)
        label_bar = tqdm(total=per_rank, desc=f"round {rnd} pseudo-labels", unit="mosaic", disable=not is_main(),
                         dynamic_ncols=True)
        for start in range(0, per_rank, 32):
            chunk = range(start, min(start + 32, per_rank))
            made = []
            for j in chunk:
                idx = rank * per_rank + j
                s = idx % len(mosaic_sources)
                m = build_mosaic(mosaic_sources[s]["by_class"], cfg.seed * 1000 + rnd, idx, size=size,
                                 regions=cfg.regions, scene_px=size)
                made.append((s, m))
            for s in {s for s, _ in made}:
                group = [(i, m) for i, (si, m) in enumerate(made) if si == s]
                images = np.stack([m.image for _, m in group])
                labels = pseudo_labels(model, images, [m.present for _, m in group], text[s], cfg.window,
                                       cfg.margin, device, cfg.label_zoom)
                for k, (_, m) in enumerate(group):
                    pool.append((s, images[k], labels[k]))
                    lab = labels[k].numpy()
                    sure = lab != IGNORE
                    right += int((lab == patch_classes(m.mask, mcfg.patch_size))[sure].sum())
                    labelled += int(sure.sum())
                label_bar.update(len(group))
        label_bar.close()
        kept = float(np.mean([(lab != IGNORE).float().mean().item() for _, _, lab in pool]))
        label_accuracy = right / labelled if labelled else None
        # 2. training
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
        stream = batch_stream(dataset, _StreamCfg(cfg), rank, world, (rnd - 1) * cfg.steps_per_round,
                              recipes.Collate(tokenizer, mcfg.context_length), pin_memory=device.type == "cuda")
        g = torch.Generator().manual_seed(cfg.seed * 7919 + rnd * 31 + rank)
        bar = tqdm(range(cfg.steps_per_round), desc=f"round {rnd}", disable=not is_main(), dynamic_ncols=True)
        sums: dict[str, float] = {}
        for step in bar:
            lr = round_lr(step, cfg.steps_per_round, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = next(stream)
            s = step % len(mosaic_sources)
            candidates = [i for i, item in enumerate(pool) if item[0] == s] or list(range(len(pool)))
            pick = torch.randint(len(candidates), (cfg.dense_batch // world,), generator=g).tolist()
            ims, labs = [], []
            for p in pick:
                _, im, lab = pool[candidates[p]]
                a, b = _augment(torch.from_numpy(im), lab, g)
                ims.append(a)
                labs.append(b)
            mosaics = model.preprocess(torch.stack(ims).to(device))
            labels = torch.stack(labs).to(device)
            class_ids = batch.get("labels")     # only with class_aware (and sources that know classes)
            with amp:
                losses = train_module(batch["images"].to(device), batch["tokens"].to(device),
                                      class_ids.to(device) if class_ids is not None else None, mosaics, labels,
                                      class_tokens[pool[candidates[pick[0]]][0]],
                                      class_owner[pool[candidates[pick[0]]][0]])
                loss = losses["loss"] + cfg.dense_weight * losses["dense_loss"]
                if "keep_loss" in losses:
                    loss = loss + cfg.keep_global * losses["keep_loss"]
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{losses['loss'].item():.3f}", dense=f"{losses['dense_loss'].item():.3f}")
        bar.close()
        # 3. measure, then save: a round stopped while it is measured is not saved, and starts over
        # (saved first, a resume went past it, and its metrics row was never written)
        if is_main():
            row = {"round": rnd, "labelled_patch_fraction": kept, "pseudo_label_accuracy": label_accuracy,
                   **{f"train_{k}": v / cfg.steps_per_round for k, v in sums.items()},
                   **measure(model, tokenizer, val_sets, bench, cfg, device, progress=True),
                   "seconds": round(time.time() - t0, 1)}
            path = save_checkpoint(model, tokenizer, out / "rounds" / f"round_{rnd}",
                                   extra={"refine_round": rnd, "refine_config": asdict(cfg)}, write_extra=write_words)
            log(f"round {rnd} " + json.dumps(row) + f" -> {path}")
            _append_metrics(metrics_path, row)
            rows.append(row)
        if dist.is_initialized():
            dist.barrier()
    if cfg.export_fp16 and is_main():
        save_checkpoint(model, tokenizer, cfg.export_fp16, dtype=torch.float16,
                        extra={"refine_rounds": cfg.rounds, "refine_config": asdict(cfg)}, write_extra=write_words)
        log(f"wrote fp16 checkpoint {cfg.export_fp16}")
    if dist.is_initialized():
        dist.barrier()   # as in training: no rank tears the group down while another still uses it
        dist.destroy_process_group()
    return rows


class _StreamCfg:
    """The fields batch_stream reads, from a RefineConfig."""

    def __init__(self, cfg: RefineConfig):
        self.batch_size, self.workers, self.seed = cfg.batch_size, cfg.workers, cfg.seed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.refine", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    d = RefineConfig()
    p.add_argument("--checkpoint", default=d.checkpoint, help="starting weights (default: %(default)s)")
    p.add_argument("--recipe", default=d.recipe, help="training recipe: caption data, folder sources for mosaics, "
                                                      "validation split (default: %(default)s)")
    p.add_argument("--out", default=d.out, help="run folder (default: %(default)s)")
    for name, kind, help_text in (
            ("rounds", int, "refinement rounds"), ("steps_per_round", int, "optimizer steps per round"),
            ("batch_size", int, "caption pairs per step (global)"), ("dense_batch", int, "mosaics per step (global)"),
            ("mosaics_per_round", int, "pseudo-labelled mosaics made each round"),
            ("regions", int, "regions (distinct classes) per training mosaic, at least 2"), ("window", int, "SAO window for labels and training"),
            ("label_zoom", int, "pseudo-labels come from SAO maps of each mosaic upsampled this many times, "
                                "tiled like Segment (1 = the training view itself)"),
            ("margin", float, "a patch's best class must beat the runner-up by this probability, else it is ignored"),
            ("dense_weight", float, "weight of the per-patch loss"),
            ("keep_global", float, "weight of a loss that keeps each caption image's global embedding at the "
                                   "starting checkpoint's (1 - cosine; 0 = off), so zero-shot accuracy holds"), ("lr", float, "peak learning rate"),
            ("weight_decay", float, "AdamW weight decay"), ("grad_clip", float, "gradient clipping (0 = off)"),
            ("seed", int, "seed (also of the validation split: keep the recipe's)"),
            ("eval_mosaics", int, "validation mosaics for the mIoU"), ("eval_seed", int, "their seed"),
            ("workers", int, "data loader workers")):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(d, name),
                       help=f"{help_text} (default: %(default)s)")
    p.add_argument("--class-aware", action=argparse.BooleanOptionalAction, default=d.class_aware,
                   help="contrastive loss with same-class pairs as positives, as training.train --class-aware; "
                        "keep it on for a checkpoint trained that way, like the default (default: %(default)s)")
    p.add_argument("--augment", choices=sorted(AUGMENTATIONS), default=d.augment,
                   help="augmentation of the caption pairs, as training.train --augment (default: %(default)s)")
    p.add_argument("--template-mix", type=float, default=d.template_mix, metavar="P",
                   help="probability that a caption pair of a known class is captioned with one of its class "
                        "templates instead, as training.train --template-mix (default: %(default)s)")
    p.add_argument("--class-prompts", choices=("ensemble", "single"), default=d.class_prompts,
                   help="class text for pseudo-labels and the per-patch loss: the zero-shot prompt ensemble, as "
                        "evaluation and the backend use, or the one prompt %r (default: %%(default)s)" % PROMPT)
    p.add_argument("--benchmark", default="", help="validation set whose mosaics give the mIoU (default: the first)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--export-fp16", default=None, metavar="DIR", help="also write the final weights in fp16 here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = RefineConfig(**{k: v for k, v in vars(args).items()})
    for name in ("rounds", "steps_per_round", "label_zoom", "batch_size", "dense_batch", "mosaics_per_round",
                 "eval_mosaics"):
        if getattr(cfg, name) < 1:
            print(f"python -m training.refine: error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if cfg.regions < 2:
        # a mosaic of one region has nothing to localize (and build_mosaic refuses it): said before round 0
        print(f"python -m training.refine: error: --regions must be at least 2 (distinct classes per training "
              f"mosaic), not {cfg.regions}", file=sys.stderr)
        return 2
    problem = None
    if cfg.window < 1 or cfg.window % 2 == 0:
        problem = f"--window {cfg.window}: give an odd number of patches (1, 3, 5, ...), so the window centres on one"
    elif not 0.0 <= cfg.margin < 1.0:
        problem = (f"--margin {cfg.margin:g} is a gap between two class probabilities: give a value in [0, 1) "
                   "(at 1 or more no patch is labelled)")
    elif cfg.dense_weight < 0 or cfg.weight_decay < 0 or cfg.grad_clip < 0:
        problem = "give --dense-weight >= 0, --weight-decay >= 0 and --grad-clip >= 0 (0: off)"
    elif not cfg.lr > 0:
        problem = f"--lr {cfg.lr:g}: give a positive learning rate"
    if problem:
        print(f"python -m training.refine: error: {problem}", file=sys.stderr)
        return 2
    if cfg.keep_global < 0:
        print(f"python -m training.refine: error: --keep-global is a loss weight: give 0 (off) or more, "
              f"not {cfg.keep_global}", file=sys.stderr)
        return 2
    if not 0.0 <= cfg.template_mix <= 1.0:
        print(f"python -m training.refine: error: --template-mix is a probability: give a value in [0, 1], "
              f"not {cfg.template_mix}", file=sys.stderr)
        return 2
    if not Path(cfg.recipe).is_file():
        print(f"python -m training.refine: error: recipe {cfg.recipe} does not exist", file=sys.stderr)
        return 2
    blocking = file_in_the_way(cfg.out)
    if blocking is not None:
        print(f"python -m training.refine: error: --out {cfg.out}: {blocking} is a file; the run's folder must be a "
              "folder", file=sys.stderr)
        return 2
    if not _rounds_done(Path(cfg.out)) and not Path(cfg.checkpoint).is_dir():
        # checked before the run folder is made: a typo leaves nothing behind
        print(f"python -m training.refine: error: --checkpoint {cfg.checkpoint} is not a checkpoint folder",
              file=sys.stderr)
        return 2
    try:
        if cfg.export_fp16:   # checked now, not after the rounds
            check_checkpoint_target(Path(cfg.export_fp16))
        refine(cfg)
    except (recipes.RecipeError, CheckpointError, RefineError, MosaicError) as e:
        if launched_as_rank_zero():         # each process finds the same: said once
            print(f"python -m training.refine: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if launched_as_rank_zero():
            done = _rounds_done(Path(cfg.out))
            where = f"after {done[-1].name.replace('_', ' ')}" if done else "from the start"
            print(f"python -m training.refine: interrupted; the same command goes on {where} (a round stopped "
                  "midway starts over)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
