"""Evaluate a checkpoint: text-image retrieval, zero-shot classification, captioning, localization.

    python -m training.evaluate retrieval --checkpoint DIR --manifest FILE.jsonl --json
    python -m training.evaluate zero-shot --checkpoint DIR --data FOLDER --classnames FILE.json --json
    python -m training.evaluate caption   --checkpoint DIR --manifest FILE.jsonl --json
    python -m training.evaluate segmentation --checkpoint DIR --data FOLDER --classnames FILE.json --seed N --json
    python -m training.evaluate probe     --checkpoint DIR --data FOLDER --classnames FILE.json --files VAL.txt --json

The metric definitions (tie rule, class-oracle reference, BLEU/CIDEr) are in `training.metrics`.
The training loop validates with `evaluate_retrieval` and `evaluate_zero_shot` from this module.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from backend.defaults import VIEW_COUNTS, VIEW_HELP, check_edge_radius
from backend.files import reader_stopped_reading
from backend.model.checkpoint import CheckpointError, load_checkpoint, read_config
from backend.model.prompts import ensemble_prompts, pool_ensemble

from . import metrics as M
from . import probe as P
from .augment import eval_transform
from .data import (CLASSNAMES_DIR, IMAGE_EXTENSIONS, UNREADABLE_IMAGE, DataError, UnnamedClassesError, _class_dirs,
                   _is_image, class_key, find_class_root, first_unreadable, load_image, manifest_records,
                   read_classnames_file, unreadable_listing, visible_subfolders)
from .templates import ZERO_SHOT_TEMPLATES

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "default": tuple(ZERO_SHOT_TEMPLATES),      # prompt ensemble
    "single": ("an aerial photo of {}.",),
}


class EvalError(ValueError):
    """Data that cannot be evaluated; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class ImageRecord:
    """One evaluation image: path, reference captions (may be empty) and class (folder name) if known."""
    image: str
    captions: tuple[str, ...] = ()
    class_name: str | None = None


# ---- inputs ------------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike, limit: int | None = None) -> list:
    """Records of a JSONL/CSV manifest (the training package's reader: every caption line is kept,
    duplicates included, as the retrieval protocol counts each). `limit` keeps the first N images."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"manifest {path} does not exist{_val_list_hint(path)}" if not path.exists()
                        else f"manifest {path} is not a file")
    try:
        records = manifest_records(path)
    except DataError as e:
        raise EvalError(_one_line(str(e))) from None
    if limit is not None:
        records = records[:limit]
    if not records:
        raise EvalError(f"manifest {path} has no images")
    return records


def load_classnames(spec: str | os.PathLike | Mapping) -> dict[str, tuple[str, ...]]:
    """A class-name map: folder -> human name (or a list of synonyms, all used as prompts).

    `spec` is a mapping, a JSON file, or the name of a map bundled in training/classnames/
    (e.g. "rsscn7"). Returns folder -> tuple of names, in the map's order.
    """
    source = "class-name map"
    if not isinstance(spec, Mapping):
        try:
            spec, path = read_classnames_file(spec)
        except DataError as e:
            raise EvalError(str(e)) from None
        source = str(path)
    out: dict[str, tuple[str, ...]] = {}
    for key, value in spec.items():
        names = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else ()
        names = tuple(n.strip() for n in names if isinstance(n, str) and n.strip())
        if not names:
            raise EvalError(f"{source}: class {key!r} needs a name (a non-empty string or list of strings), "
                            f"got {value!r}")
        out[str(key)] = names
    if not out:
        raise EvalError(f"{source} is empty")
    return out


def _val_list_hint(path: Path) -> str:
    """For a missing list of a run's validation split (runs/NAME/val/...): the command that writes it."""
    parts = Path(path).parent.parts
    if len(parts) < 3 or parts[-3] != "runs" or parts[-1] != "val":
        return ""
    recipe = "training/recipes/default.json" if parts[-2] == "default" else "RECIPE.json (the run's recipe)"
    return (f": a run's validation lists are written by training, or by "
            f"python -m training.recipe {recipe} --out {Path(path).parent}")


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def scan_folder(root: str | os.PathLike, classnames: Mapping, files: str | os.PathLike | None = None,
                limit_per_class: int | None = None) -> list:
    """Images of a folder of classes: `<class>/...` (RSSCN7, AID) or `images/<class>/...` (UCM),
    read with the training reader (`training.data.folder_records`), so splits mean the same here.

    Every class folder with images must be in `classnames` (folder -> name). Only the images directly
    in a class folder are read (`<class>/*.jpg`); those in its sub-folders are not, and a note on
    stderr counts them (without `files`). `files` is a list file (one path a line, relative to `root`
    or to the class folders' parent, or absolute under `root`; blank lines and lines starting with #
    are skipped) restricting to a split; `limit_per_class` keeps the first N images (sorted by name)
    of each class. Records come back in the map's class order.
    """
    from .data import folder_records

    root = Path(root)
    if not root.is_dir():
        raise EvalError(f"data folder {root} does not exist" if not root.exists() else f"{root} is not a folder")
    wanted = None
    if files is not None:
        lst = Path(files)
        if not lst.is_file():
            raise EvalError(f"file list {lst} " + ("is a folder: give the list file (one image path a line)"
                                                    if lst.is_dir() else f"does not exist{_val_list_hint(lst)}"))
        wanted = [_listed_under(ln.strip(), root, lst) for ln in lst.read_text(encoding="utf-8").splitlines()
                  if ln.strip() and not ln.strip().startswith("#")]
    class_root = find_class_root(root)
    if not _class_dirs(class_root):
        nested_root = root / "images" if (root / "images").is_dir() else root
        nested = _images_in_sub_folders(nested_root)
        if nested:
            raise EvalError(f"{root}: no class sub-folders with images found: its {sum(nested.values())} images are "
                            f"in sub-folders of the class folders ({_counts(nested)}), and only "
                            f"{_read_pattern(nested_root, root)} is read; move each class's images into its folder")
    first_names = {k: (v if isinstance(v, str) else v[0]) for k, v in classnames.items()}
    try:
        found = folder_records(root, first_names, templates=("{}",), files=wanted)
    except UnnamedClassesError as e:
        # without a list, the images of the named classes can be listed instead (--files)
        more = "" if files is not None else ", or list only the images of the named classes (--files)"
        raise EvalError(_one_line(e) + more) from None
    except (OSError, ValueError) as e:
        raise EvalError(_one_line(e)) from None
    if files is None:
        nested = _images_in_sub_folders(class_root)
        if nested:
            print(f"note: {sum(nested.values())} image(s) in sub-folders of class folders are not read "
                  f"({_counts(nested)}): only {_read_pattern(class_root, root)} is", file=sys.stderr)
    by_class: dict[str, list] = {}
    for r in found:
        by_class.setdefault(r.class_name, []).append(r)
    records = []
    for cls in classnames:  # the map's order
        kept = by_class.get(cls, [])
        records += kept[:limit_per_class] if limit_per_class is not None else kept
    if not records:
        raise EvalError(f"no images to evaluate in {root}" + (f" from the list {files}" if files else ""))
    return records


def _listed_under(line: str, root: Path, listing: Path) -> str:
    """A --files line as a path relative to `root`: relative lines as they are, an absolute path
    under `root` made relative to it; an absolute path elsewhere is an EvalError."""
    if not os.path.isabs(line):
        return line
    for base, path in ((os.path.abspath(root), os.path.abspath(line)),
                       (os.path.realpath(root), os.path.realpath(line))):
        rel = os.path.relpath(path, base)
        if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
            return Path(rel).as_posix()
    raise EvalError(f"file list {listing}: {line} is not under the data folder {root}; give paths relative to "
                    "the folder (e.g. forest/forest_001.jpg) or absolute paths under it")


def _images_in_sub_folders(class_root: Path) -> dict[str, int]:
    """Class folder name -> how many images lie in its sub-folders (at any depth), which the
    folder reader does not read; classes with none are left out."""
    out = {}
    for d in visible_subfolders(class_root):
        n = 0
        for where, dirs, names in os.walk(d):
            dirs[:] = [x for x in dirs if not x.startswith(".")]
            if where != str(d):
                n += sum(map(_is_image, names))
        if n:
            out[d.name] = n
    return out


def _counts(by_class: Mapping[str, int], most: int = 5) -> str:
    items = [f"{k}: {n}" for k, n in by_class.items()]
    return ", ".join(items[:most]) + (f", ... {len(items) - most} more" if len(items) > most else "")


def _read_pattern(class_root: Path, root: Path) -> str:
    prefix = "FOLDER/images" if class_root != root else "FOLDER"
    return f"{prefix}/<class>/*{{{','.join(IMAGE_EXTENSIONS)}}}"


def _unwrap(model):
    return getattr(model, "module", model)  # DistributedDataParallel


def _device_of(model, device) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


class _EvalMode:
    """Put a model in eval mode and inference mode; restore its training flag afterwards."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training
        self.inference = torch.inference_mode()

    def __enter__(self):
        self.model.eval()
        self.inference.__enter__()

    def __exit__(self, *exc):
        self.inference.__exit__(*exc)
        self.model.train(self.was_training)


def _load_image(path: str, transform) -> torch.Tensor:
    try:
        return transform(load_image(path))
    except FileNotFoundError:
        raise EvalError(f"image {path} does not exist") from None
    except UNREADABLE_IMAGE as e:
        raise EvalError(f"cannot read image {path}: {e}") from None


def _image_batches(paths: Sequence[str], transform, batch_size: int) -> Iterator[torch.Tensor]:
    """Decoded, normalised image batches; decoding runs on threads (PIL releases the GIL)."""
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            yield torch.stack(list(pool.map(lambda p: _load_image(p, transform), chunk)))


def unreadable_images(paths: Sequence[str], progress: bool = False) -> dict[str, str]:
    """path -> why, for each of `paths` that cannot be read as an image (missing, damaged, not an
    image): each is decoded once, on threads, as the evaluation would decode it."""
    def problem(path: str) -> str | None:
        try:
            load_image(path)
        except UNREADABLE_IMAGE as e:
            return f"{type(e).__name__}: {e}"
        return None

    paths = list(dict.fromkeys(map(str, paths)))
    found = {}
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool, \
            _bar(len(paths), "reading images", "img", progress) as bar:
        for path, why in zip(paths, pool.map(problem, paths)):
            if why is not None:
                found[path] = why
            bar.update(1)
    return found


def leave_out_unreadable(records: Sequence, progress: bool = False) -> tuple[list, dict[str, str]]:
    """The records less those whose image cannot be read, and those images (path -> why): evaluation
    and training's validation score the others."""
    unreadable = unreadable_images([r.image for r in records], progress)
    return [r for r in records if str(r.image) not in unreadable], unreadable


def _bar(total: int, desc: str, unit: str, progress: bool):
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not progress, leave=False,
                dynamic_ncols=True)


def encode_images(model, paths: Sequence[str], device=None, batch_size: int = 64,
                  progress: bool = False, views: int = 1) -> torch.Tensor:
    """L2-normalised image embeddings [N, E] (float32, on CPU) of image files; `views` > 1 averages
    each image's flips / rotations, as the backend's index does with `views` (backend.model.views)."""
    out = _map_image_batches(model, paths, device, batch_size, progress, "images",
                             lambda m, x: [m.encode_image(x, views=views).float().cpu()])
    return torch.cat(out)


def _map_image_batches(model, paths: Sequence[str], device, batch_size: int, progress: bool, desc: str, fn) -> list:
    """Load images in batches with the model's eval transform and collect fn(model, batch) over them."""
    model = _unwrap(model)
    dev = _device_of(model, device)
    cfg = model.config
    transform = eval_transform(cfg.image_size, cfg.image_mean, cfg.image_std)
    out: list = []
    with _EvalMode(model), _bar(len(paths), desc, "img", progress) as bar:
        for batch in _image_batches(paths, transform, batch_size):
            out += fn(model, batch.to(dev))
            bar.update(len(batch))
    return out


def encode_texts(model, tokenizer, texts: Sequence[str], device=None, batch_size: int = 256,
                 progress: bool = False, desc: str = "texts") -> torch.Tensor:
    """L2-normalised text embeddings [N, E] (float32, on CPU)."""
    model = _unwrap(model)
    dev = _device_of(model, device)
    out = []
    with _EvalMode(model), _bar(len(texts), desc, "text", progress) as bar:
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            tokens = tokenizer(chunk, context_length=model.config.context_length).to(dev)
            out.append(model.encode_text(tokens).float().cpu())
            bar.update(len(chunk))
    return torch.cat(out)


# ---- the three evaluations ---------------------------------------------------------------------
def evaluate_retrieval(model, tokenizer, records: Sequence, device=None, batch_size: int = 64,
                       progress: bool = False, ties: str = "expected", rerank: int = 0,
                       rerank_weight: float = 1.0, views: int = 1) -> dict:
    """Image<->text recall@1/5/10 and mR (percent) over records with `.image` and `.captions`.

    Every caption is a separate text query (identical captions of one image count separately, as
    in the standard protocol). `ties`: "expected" or "pessimistic" (see `training.metrics`). When
    every record has a `.class_name`, the result also holds `class_oracle_mean_recall`.
    `rerank` K > 0 re-orders each query's top K by the captioning decoder (`rerank_with_captioner`).
    `views`: image embeddings averaged over that many flips / rotations (`encode_images`).
    """
    records = list(records)
    if not records:
        raise EvalError("no images to evaluate")
    texts, text_to_image = [], []
    for i, r in enumerate(records):
        caps = [c for c in (r.captions or ()) if c and c.strip()]
        if not caps:
            raise EvalError(f"image {r.image} has no captions; retrieval needs at least one per image")
        texts += caps
        text_to_image += [i] * len(caps)
    img = encode_images(model, [str(r.image) for r in records], device, batch_size, progress, views)
    # each distinct text is encoded once, so identical captions get identical embeddings and tie
    # exactly (the tie rule then decides), whatever batch they would have fallen in
    unique = list(dict.fromkeys(texts))
    where = {t: i for i, t in enumerate(unique)}
    txt = encode_texts(model, tokenizer, unique, device, max(batch_size, 128), progress, desc="captions")
    txt = txt[torch.tensor([where[t] for t in texts], dtype=torch.long)]
    sim = (img @ txt.T).numpy()
    if rerank > 0:
        i2t, t2i = rerank_with_captioner(model, tokenizer, [str(r.image) for r in records], unique,
                                         np.asarray([where[t] for t in texts]), sim, rerank, rerank_weight,
                                         device, batch_size, progress)
        a = M.retrieval_recall(i2t, np.asarray(text_to_image), ties=ties)
        b = M.retrieval_recall(t2i, np.asarray(text_to_image), ties=ties)
        out = {k: (a if k.startswith("i2t") else b)[k] for k in a if k != "mean_recall"}
        out["mean_recall"] = float(np.mean(list(out.values())))
        out["rerank"], out["rerank_weight"] = rerank, rerank_weight
    else:
        out = M.retrieval_recall(sim, np.asarray(text_to_image), ties=ties)
    out["n_images"], out["n_captions"] = len(records), len(texts)
    out["ties"] = ties
    out["views"] = views
    classes = [getattr(r, "class_name", None) for r in records]
    if all(c is not None for c in classes):
        out["class_oracle_mean_recall"] = M.class_oracle_mean_recall(
            classes, [classes[i] for i in text_to_image], np.asarray(text_to_image))
    return out


def rerank_with_captioner(model, tokenizer, paths: Sequence[str], unique_texts: Sequence[str], text_index,
                          sim: np.ndarray, k: int, weight: float, device=None, batch_size: int = 64,
                          progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Re-order each query's top `k` by the captioning decoder: a candidate's score becomes its
    cosine similarity plus `weight` x the caption's mean log-probability per token given the image
    (MaMMUT's generative pass reads the image's patch tokens, so it can tell apart images that the
    single global embedding puts close together). The top-k sets stay the same and stay above
    every other candidate, so recall@k itself does not change; only the order inside them does.

    sim [n_images, n_texts]; text_index [n_texts]: each text's row in `unique_texts`. Returns two
    score matrices of sim's shape: one for image->text queries (rows re-ordered), one for
    text->image queries (columns re-ordered)."""
    model = _unwrap(model)
    dev = _device_of(model, device)
    k_img, k_txt = min(k, sim.shape[0]), min(k, sim.shape[1])
    top_img = np.argsort(-sim, axis=0, kind="stable")[:k_img]          # [k, n_texts]
    top_txt = np.argsort(-sim, axis=1, kind="stable")[:, :k_txt]       # [n_images, k]
    pairs = {(int(i), int(text_index[j])) for j in range(sim.shape[1]) for i in top_img[:, j]}
    pairs |= {(i, int(text_index[j])) for i in range(sim.shape[0]) for j in top_txt[i]}
    by_image: dict[int, list[int]] = {}
    for i, u in sorted(pairs):
        by_image.setdefault(i, []).append(u)
    tokens = tokenizer(list(unique_texts), context_length=model.config.context_length)
    loglik: dict[tuple[int, int], float] = {}
    wanted = sorted(by_image)
    with _EvalMode(model), _bar(len(pairs), "re-ranking", "pair", progress) as bar:
        # each image's patch tokens once, then every candidate caption of it in batches
        image_tokens = _map_image_batches(model, [paths[i] for i in wanted], dev, batch_size, False, "images",
                                          lambda m, x: list(m.visual(x)))
        for i, tok_i in zip(wanted, image_tokens):
            texts = by_image[i]
            for start in range(0, len(texts), 256):
                chunk = texts[start:start + 256]
                t = tokens[torch.tensor(chunk)]
                t = t[:, :max(2, int((t != model.config.pad_id).sum(1).max()))].to(dev)
                ll = model.caption_log_likelihood(tok_i[None].expand(len(chunk), -1, -1), t)
                loglik.update(((i, u), float(v)) for u, v in zip(chunk, ll.float().cpu()))
                bar.update(len(chunk))
    i2t, t2i = sim.copy(), sim.copy()
    for j in range(sim.shape[1]):
        cand = top_img[:, j]
        t2i[cand, j] = _above_every_cosine([sim[i, j] + weight * loglik[(int(i), int(text_index[j]))] for i in cand])
    for i in range(sim.shape[0]):
        cand = top_txt[i]
        i2t[i, cand] = _above_every_cosine([sim[i, j] + weight * loglik[(i, int(text_index[j]))] for j in cand])
    return i2t, t2i


def _above_every_cosine(combined) -> np.ndarray:
    """Scores in `combined`'s order, all above 1 (every cosine's bound), so a re-ordered top k stays
    on top of the candidates outside it: the best gets 2 + k, the next best value 1 less, and so on.
    Equal combined scores get equal ranks (a text that is two images' caption scores the same for
    both), so the metrics' tie rule still holds and the order of the manifest decides nothing."""
    _, dense = np.unique(-np.asarray(combined, dtype=np.float64), return_inverse=True)
    return 2.0 + len(combined) - dense.reshape(-1)


def class_text_embeddings(model, tokenizer, classnames: Mapping, templates: Sequence[str] = ZERO_SHOT_TEMPLATES,
                          device=None, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """Prompt ensemble: per class, the mean of the normalised embeddings of every (name, template)
    prompt, re-normalised. Returns [C, E] in the map's order."""
    names = load_classnames(classnames)
    if not templates:
        raise EvalError("no prompt templates")
    words, class_of = [], []
    for c, synonyms in enumerate(names.values()):
        for name in synonyms:
            words.append(name)
            class_of.append(c)
    prompts, owner = ensemble_prompts(words, templates)
    emb = encode_texts(model, tokenizer, prompts, device, batch_size, progress, desc="class prompts")
    return pool_ensemble(emb, [class_of[o] for o in owner], len(names))


def _class_key(record, names: Mapping[str, tuple[str, ...]]) -> str:
    c = getattr(record, "class_name", None)
    key = class_key(c, names)
    if key is None:
        raise EvalError(f"image {record.image} has class {c!r}, which is not in the class-name map")
    return key


def evaluate_zero_shot(model, tokenizer, records_or_folder, classnames, device=None, batch_size: int = 64,
                       templates: Sequence[str] = ZERO_SHOT_TEMPLATES, files: str | os.PathLike | None = None,
                       limit_per_class: int | None = None, progress: bool = False, views: int = 1) -> dict:
    """Classify images by their similarity to class prompts (top-1/top-5/per-class in percent).

    records_or_folder: a folder of classes (see `scan_folder`) or records with `.image` and
    `.class_name` (a folder name of the map, or one of its human names). classnames: folder ->
    name (or list of names), a JSON file, or a bundled map name. Every class of the map is a
    candidate, including classes with no images here (their per-class accuracy is None). `views`: as
    in `encode_images`.
    """
    names = load_classnames(classnames)
    if isinstance(records_or_folder, (str, os.PathLike)):
        records = scan_folder(records_or_folder, names, files=files, limit_per_class=limit_per_class)
    else:
        records = list(records_or_folder)
        if limit_per_class is not None:
            kept, seen = [], {}
            for r in records:
                k = _class_key(r, names)
                if seen.get(k, 0) < limit_per_class:
                    kept.append(r)
                    seen[k] = seen.get(k, 0) + 1
            records = kept
    if not records:
        raise EvalError("no images to evaluate")
    keys = list(names)
    index = {k: i for i, k in enumerate(keys)}
    labels = np.array([index[_class_key(r, names)] for r in records])
    img = encode_images(model, [str(r.image) for r in records], device, batch_size, progress, views)
    cls = class_text_embeddings(model, tokenizer, names, templates, device, max(batch_size, 128), progress)
    out = M.zero_shot_metrics((img @ cls.T).numpy(), labels, keys)
    out["classes"] = keys
    out["class_names"] = {k: list(v) if len(v) > 1 else v[0] for k, v in names.items()}
    out["n_images"] = len(records)
    out["n_templates"] = len(templates)
    out["views"] = views
    return out


def _sample_per_class(records: Sequence, per_class: int | None, seed: int) -> list:
    by_class: dict[str, list] = {}
    for r in records:
        by_class.setdefault(r.class_name, []).append(r)
    out = []
    for cls, items in by_class.items():
        if per_class is not None and len(items) > per_class:
            items = random.Random(f"{seed}:{cls}").sample(items, per_class)
        out += items
    return out


def probe_training_images(held_out: Sequence, folder_records: Sequence, per_class: int | None, seed: int) -> list:
    """The records a probe learns from: those of the folder that are not held out, at most `per_class`
    of each class (a sample seeded by `seed`)."""
    held_paths = {str(Path(r.image).resolve()) for r in held_out}
    pool = [r for r in folder_records if str(Path(r.image).resolve()) not in held_paths]
    return _sample_per_class(pool, per_class, seed)


def evaluate_probe(model, tokenizer, held_out: Sequence, folder_records: Sequence, classnames, device=None,
                   batch_size: int = 64, train_per_class: int | None = 100, k: int = 10, seed: int = 0,
                   templates: Sequence[str] = ZERO_SHOT_TEMPLATES, progress: bool = False, views: int = 1) -> dict:
    """Zero-shot beside image-only classifiers (class centroids, k nearest neighbours, a linear probe;
    see `training.probe`) learnt from the labelled images of `folder_records` that are not held out
    (at most `train_per_class` of each class, seeded), all scored on `held_out`; and each class's
    top-10 precision when the held-out images are ranked by its prompt ensemble or by its centroid.
    Top-1 in percent, precision in [0, 1]."""
    names = load_classnames(classnames)
    keys = list(names)
    index = {c: i for i, c in enumerate(keys)}
    held_y = np.array([index[_class_key(r, names)] for r in held_out])
    train = probe_training_images(held_out, folder_records, train_per_class, seed)
    train_y = np.array([index[_class_key(r, names)] for r in train])
    held_classes = set(held_y.tolist())
    missing = [c for i, c in enumerate(keys) if i in held_classes and not (train_y == i).any()]
    if missing:
        raise EvalError(f"class {missing[0]!r} has held-out images but no other image in the folder to learn it "
                        f"from; a probe needs training images of every class it scores")
    held_emb = encode_images(model, [str(r.image) for r in held_out], device, batch_size, progress, views)
    train_emb = encode_images(model, [str(r.image) for r in train], device, batch_size, progress, views)
    text = class_text_embeddings(model, tokenizer, names, templates, device, max(batch_size, 128), progress)
    # classes with no training image cannot be learnt; they stay out of the image-only classifiers
    learnt = sorted(set(train_y.tolist()))
    remap = {c: j for j, c in enumerate(learnt)}
    ty = np.array([remap[c] for c in train_y])
    hy = np.array([remap[c] for c in held_y])
    centroids = P.class_centroids(train_emb, ty, len(learnt))
    logits, l2 = P.linear_probe(train_emb, ty, held_emb, len(learnt), seed=seed)
    text_search = P.class_search_precision(text, held_emb, held_y)
    centroid_search = P.class_search_precision(centroids, held_emb, hy)
    return {
        # the neighbours voted: no more than there are training images
        "n_images": len(held_out), "n_train": len(train), "classes": keys, "k": min(k, len(train)), "views": views,
        "zero_shot_top1": P.top1(held_emb @ text.T, held_y),
        "zero_shot_train_top1": P.top1(train_emb @ text.T, train_y),
        "centroid_top1": P.top1(held_emb @ centroids.T, hy),
        "knn_top1": P.top1(P.knn_scores(train_emb, ty, held_emb, len(learnt), k), hy),
        "linear_probe_top1": P.top1(logits, hy),
        "linear_probe_l2": l2,
        "text_search_p10": text_search["mean"],
        "centroid_search_p10": centroid_search["mean"],
        "per_class_search_p10": {keys[c]: {"text": text_search["per_class"][c],
                                           "centroid": centroid_search["per_class"][remap[c]] if c in remap else None}
                                 for c in range(len(keys))},
    }


def references_to_score(records: Sequence, manifest=None) -> list[list[str]]:
    """Each record's reference captions that BLEU and CIDEr score (`training.metrics.scored_references`).
    EvalError naming the first image (and its manifest line where `manifest` is JSONL) that has none,
    and how many such images there are: the command checks this before a model is loaded."""
    if not records:
        raise EvalError("no images to evaluate")
    references = [M.scored_references(r.captions or ()) for r in records]
    bad = [r for r, scored in zip(records, references) if not scored]
    if not bad:
        return references
    r = bad[0]
    caps = [c for c in (r.captions or ()) if c and c.strip()]
    line = _jsonl_line_of(manifest, r.image) if manifest is not None else None
    where = f"{manifest}:{line}: " if line is not None else f"{manifest}: " if manifest is not None else ""
    what = f"no reference caption with a word (only {', '.join(map(repr, caps[:3]))})" if caps else \
        "no reference captions"
    more = f" (and {len(bad) - 1} more image(s) like it)" if len(bad) > 1 else ""
    raise EvalError(f"{where}image {r.image} has {what}{more}; BLEU-4 and CIDEr-D score words, so give each "
                    "image a caption with words")


def generate_captions(model, tokenizer, paths: Sequence[str], device=None, batch_size: int = 32,
                      beam_size: int = 1, max_len: int = 24, progress: bool = False) -> list[str]:
    """One generated caption per image file."""
    return _map_image_batches(
        model, paths, device, batch_size, progress, "captioning",
        lambda m, x: [tokenizer.decode(ids) for ids in m.caption(x, max_len=max_len, beam_size=beam_size)])


def evaluate_captions(model, tokenizer, records: Sequence, device=None, batch_size: int = 32,
                      beam_size: int = 1, max_len: int = 24, n_examples: int = 5,
                      progress: bool = False, references: Sequence[list[str]] | None = None) -> dict:
    """Generate a caption per image and score BLEU-4 (0..1) and CIDEr-D (0..10) against all its
    reference captions that have a word, over the whole set at once. Every image needs one:
    `references` is what `references_to_score(records)` returned (the command checks before it
    loads the model), and is checked here when not given, before any caption is generated."""
    records = list(records)
    if references is None:
        references = references_to_score(records)
    generated = generate_captions(model, tokenizer, [str(r.image) for r in records], device, batch_size,
                                  beam_size, max_len, progress)
    cands = {i: g for i, g in enumerate(generated)}
    refs = dict(enumerate(references))
    picks = sorted({int(i) for i in np.linspace(0, len(records) - 1, num=min(n_examples, len(records))).round()})
    return {
        "bleu4": M.bleu4(cands, refs),
        "cider": M.cider(cands, refs),
        "n_images": len(records),
        "n_references": sum(len(v) for v in refs.values()),
        "beam_size": beam_size,
        "max_len": max_len,
        "examples": [{"image": str(records[i].image), "caption": generated[i], "references": refs[i]}
                     for i in picks],
    }


# ---- command line ------------------------------------------------------------------------------
EPILOG = """\
examples:
  python -m training.evaluate retrieval --checkpoint runs/ucm/checkpoints/step_0010000 \\
      --manifest val.jsonl --json
  python -m training.evaluate zero-shot --checkpoint CKPT --data ../shared/data/rsscn7 \\
      --classnames training/classnames/rsscn7.json --files val.txt
  python -m training.evaluate zero-shot --checkpoint CKPT --data ../shared/data/ucm --classnames ucm
  python -m training.evaluate caption --checkpoint CKPT --manifest val.jsonl --beam-size 3
  python -m training.evaluate probe --checkpoint CKPT --data ../shared/data/aid --classnames aid \\
      --files runs/default/val/aid.txt

Recall and accuracy are in percent, except segmentation's --json, whose IoU, pixel accuracy and
boundary F are fractions in [0, 1] (its table shows them in percent). Tied retrieval scores (identical captions) count as the average
of a random tie-break, computed exactly (--ties pessimistic: as misses); a class tied with the true
one for the top score counts as a miss.
Exit status: 0 on success, 2 on unusable input (missing checkpoint, data or class-name map, a class
folder missing from the map, an empty set, an image whose reference captions have no word, an option
out of its range). An image that cannot be read is left out, named on stderr, and counted
(n_unreadable); with none readable, the status is 2.
"""

MANIFEST_HELP = ("JSONL manifest, one image a line: {\"image\": \"images/beach/beach03.jpg\", \"class\": \"beach\", "
                 "\"captions\": [...]}; paths relative to the manifest's folder")


def _common(p: argparse.ArgumentParser, batch_size: int) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="checkpoint directory (model.safetensors + config.json + tokenizer.json)")
    p.add_argument("--device", default="cpu", help=f"torch device: {DEVICES} (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=batch_size, metavar="N",
                   help="images per forward pass (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bars on stderr")


def _views_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--views", type=int, default=1, choices=VIEW_COUNTS, metavar="N",
                   help=f"average each image's embedding over N views, as the backend's index can: {VIEW_HELP} "
                        "(default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Evaluate a SkyPrompt checkpoint: text<->image retrieval recall, zero-shot scene "
                    "classification with class-name prompts, caption quality (BLEU-4, CIDEr-D), localization "
                    "(segmentation mIoU), or zero-shot beside image-only classifiers (probe).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{retrieval,zero-shot,caption,segmentation,probe}")

    r = sub.add_parser(
        "retrieval", help="image->text and text->image recall@1/5/10 and mean recall (mR)",
        description="Recall@1/5/10 both ways and their mean (mR), in percent. Every caption is a query; an "
                    "image->text query is a hit when ANY of the image's captions is in the top K, a "
                    "text->image query when the caption's own image is. When the manifest has classes, "
                    "also class_oracle_mean_recall: the expected mR of a model that ranks same-class items "
                    "first in random order (above it, the model tells instances apart, not only classes).")
    _common(r, 64)
    r.add_argument("--manifest", required=True, metavar="FILE.jsonl", help=MANIFEST_HELP)
    r.add_argument("--limit", type=int, metavar="N", help="only the first N images of the manifest")
    r.add_argument("--ties", choices=("expected", "pessimistic"), default="expected",
                   help="scores tied with the correct item's (identical captions): 'expected' counts the "
                        "average hit of a random tie-break, exactly; 'pessimistic' ranks every tied wrong "
                        "item first (default: %(default)s)")
    r.add_argument("--rerank", type=int, default=0, metavar="K",
                   help="re-order each query's top K by the captioning decoder: score = cosine + W x the caption's "
                        "mean log-probability given the image (0: off; default: %(default)s)")
    r.add_argument("--rerank-weight", type=float, default=1.0, metavar="W",
                   help="W for --rerank (default: %(default)s)")
    _views_option(r)

    z = sub.add_parser(
        "zero-shot", help="classify a folder of classes by similarity to class-name prompts",
        description="Scene classification from class names alone: each class's text embedding averages "
                    "prompts such as 'an aerial photo of {name}.' (prompt ensembling); each image goes to "
                    "the most similar class. Works for any folder of classes and any map, including "
                    "classes the model never trained on. Every class in the map is a candidate.")
    _common(z, 64)
    z.add_argument("--data", metavar="FOLDER",
                   help="folder of class folders: FOLDER/<class>/*.jpg (RSSCN7, AID) or "
                        "FOLDER/images/<class>/*.jpg (UC Merced); images in sub-folders of a class folder "
                        "are not read (a note counts them)")
    z.add_argument("--manifest", metavar="FILE.jsonl",
                   help="instead of --data: a JSONL/CSV manifest whose lines have a \"class\" (a key or name "
                        "of the map), e.g. a validation split written by training (runs/NAME/val/ucm.jsonl)")
    z.add_argument("--classnames", required=True, metavar="FILE.json",
                   help="JSON object folder -> human name (or a list of synonyms), e.g. "
                        "{\"gParking\": \"parking lot\"}; or a bundled map: "
                        + ", ".join(sorted(q.stem for q in CLASSNAMES_DIR.glob("*.json"))))
    z.add_argument("--templates", default="default", metavar="default|single|FILE",
                   help="prompt templates: 'default' (an ensemble of %d), 'single' (\"an aerial photo of {}.\"), "
                        "or a file with one template a line, '{}' marking the name (default: %%(default)s)"
                        % len(TEMPLATE_SETS["default"]))
    z.add_argument("--files", metavar="LISTFILE",
                   help="evaluate only these images: one path a line, relative to FOLDER or absolute under it (e.g. a "
                        "validation split)")
    z.add_argument("--limit-per-class", type=int, metavar="N", help="only the first N images (by name) of each class")
    _views_option(z)

    c = sub.add_parser(
        "caption", help="generate captions and score BLEU-4 and CIDEr-D against the references",
        description="One caption per image (greedy for --beam-size 1, else beam search), scored against all "
                    "of the image's reference captions with the coco-caption BLEU-4 (0..1) and CIDEr-D "
                    "(0..10) scorers over the whole set.")
    _common(c, 32)
    c.add_argument("--manifest", required=True, metavar="FILE.jsonl", help=MANIFEST_HELP)
    c.add_argument("--limit", type=int, metavar="N", help="only the first N images of the manifest")
    c.add_argument("--beam-size", type=int, default=1, metavar="N",
                   help="beam width: 1 = greedy (default); 3 often scores a little higher and takes "
                        "about 3x as long")
    c.add_argument("--max-len", type=int, default=24, metavar="N",
                   help="most tokens per caption; 24 covers 99%% of UCM captions (default: %(default)s)")
    c.add_argument("--examples", type=int, default=5, metavar="N",
                   help="example captions to show (default: %(default)s)")

    g = sub.add_parser(
        "segmentation", help="localization: mIoU of dense class maps on mosaics with exact masks",
        description="Builds mosaics from FOLDER (irregular regions, each filled with one scene image of one "
                    "class; deterministic from --seed), lets every class of the map compete for every pixel "
                    "(dense embeddings vs prompt-ensemble class embeddings, tiles blended as the backend "
                    "does) and scores the result against the exact mask: IoU per class, mIoU, pixel accuracy, "
                    "boundary F-score. --methods compares dense methods (the README's ablation); "
                    "--end-to-end also runs the backend's Segment and scores its polygons against the "
                    "ground-truth polygons.")
    _common(g, 32)
    g.add_argument("--data", metavar="FOLDER", help="folder of class folders (as for zero-shot)")
    g.add_argument("--classnames", metavar="FILE.json",
                   help="JSON object folder -> human name, or a bundled map (as for zero-shot)")
    g.add_argument("--raster", metavar="FILE",
                   help="instead of mosaics: a real raster, scored against --labels for one --prompt")
    g.add_argument("--labels", metavar="VECTOR", help="labelled features for --raster (any OGR file and CRS)")
    g.add_argument("--label-layer", metavar="NAME", help="layer of --labels (default: the first)")
    g.add_argument("--where", metavar="SQL", help="attribute filter on --labels, e.g. \"building = 'yes'\"")
    g.add_argument("--prompt", metavar="TEXT", help="what the labels are, e.g. 'buildings' (with --raster)")
    g.add_argument("--bands", nargs=3, type=int, metavar=("RED", "GREEN", "BLUE"),
                   help="1-based bands of --raster to show the model as red, green, blue, e.g. 3 2 1 for a sensor "
                        "stored blue-green-red-NIR (default: the bands marked red/green/blue, else the first "
                        "three, with a note naming them when four or more bands mark no colour)")
    g.add_argument("--files", metavar="LISTFILE", help="build mosaics only from these images (e.g. a validation split)")
    g.add_argument("--seed", type=int, default=0, help="mosaic seed (default: %(default)s)")
    g.add_argument("--mosaics", type=int, default=20, metavar="N", help="number of mosaics (default: %(default)s)")
    g.add_argument("--size", type=int, default=512, metavar="PX", help="mosaic side in pixels (default: %(default)s)")
    g.add_argument("--regions", type=int, default=5, metavar="N",
                   help="regions (distinct classes) per mosaic (default: %(default)s)")
    g.add_argument("--layout", choices=("voronoi", "rectangles"), default="voronoi",
                   help="region shapes: Voronoi cells or overlapping random rectangles (default: %(default)s)")
    g.add_argument("--scene-px", type=int, metavar="PX",
                   help="scene images are resized to this side before filling regions "
                        "(default: the checkpoint's image size: one tile shows about one scene)")
    g.add_argument("--methods", default="default", metavar="LIST",
                   help="dense methods, comma-separated, 'default' or 'all' (global, maskclip, sao3, sao5, sao7, "
                        "sao3-gauss, sao5-gauss, sao7-gauss, sao7-zoom2: SAO 7x7 on the mosaic upsampled twice, "
                        "sao3-edges, sao5-edges, sao7-edges: refined along the image's edges); 'default' (the default) is "
                        "what the backend's Segment does (sao5-edges)")
    g.add_argument("--edge-radius", type=int, default=None, metavar="PX",
                   help="guided-filter radius of the -edges methods and of --end-to-end / --raster with them "
                        "(default: the backend's, half the checkpoint's image size; 0 = off)")
    g.add_argument("--templates", default="default", metavar="default|single|FILE",
                   help="class prompt templates, as for zero-shot (default: %(default)s)")
    g.add_argument("--tolerance", type=int, default=3, metavar="PX",
                   help="boundary F-score match distance in pixels (default: %(default)s)")
    g.add_argument("--end-to-end", action="store_true",
                   help="also run the backend's Segment on each mosaic and score polygons vs ground truth")
    g.add_argument("--threshold", type=float, default=None,
                   help="Segment threshold for --end-to-end (default: the backend's)")
    g.add_argument("--raw-prompts", action="store_true",
                   help="Segment embeds each prompt as typed instead of averaging it over the zero-shot "
                        "templates, as the backend does by default (--end-to-end and --raster)")
    g.add_argument("--keep", metavar="DIR", help="write the mosaics (GeoTIFF, mask, class polygons) into DIR")

    b = sub.add_parser(
        "probe", help="zero-shot beside image-only classifiers: is the text or the image side the bound?",
        description="Scores held-out images (--files of FOLDER, or a --manifest with classes) four ways: zero-shot "
                    "with class-name prompts, and three classifiers that use no text, learnt from the labelled "
                    "images of FOLDER that are not held out (for a checkpoint's own recipe split: the images it "
                    "trained on): nearest class centroid, k nearest neighbours, and a linear probe (logistic "
                    "regression, L2 weight picked on a fifth of those images). When zero-shot is about as good "
                    "as the three, its errors are in the image embeddings, and better prompts or a better text "
                    "tower cannot lift it far. Also each class's top-10 precision when the held-out images are "
                    "ranked by its prompt ensemble or by its centroid, the search benchmark's measure.")
    _common(b, 64)
    b.add_argument("--data", required=True, metavar="FOLDER",
                   help="folder of class folders (as for zero-shot); its images that are not held out train the "
                        "image-only classifiers")
    b.add_argument("--classnames", required=True, metavar="FILE.json",
                   help="JSON object folder -> human name, or a bundled map (as for zero-shot)")
    b.add_argument("--files", metavar="LISTFILE",
                   help="the held-out images: one path a line, relative to FOLDER or absolute under it (e.g. "
                        "runs/default/val/aid.txt)")
    b.add_argument("--manifest", metavar="FILE.jsonl",
                   help="instead of --files: the held-out images as a manifest whose lines have a \"class\" "
                        "(e.g. runs/default/val/ucm.jsonl)")
    b.add_argument("--train-per-class", type=int, default=100, metavar="N",
                   help="learn each class from at most N of its other images, a seeded sample (0: all; "
                        "default: %(default)s)")
    b.add_argument("--k", type=int, default=10, metavar="K", help="neighbours of the kNN vote (default: %(default)s)")
    b.add_argument("--seed", type=int, default=0, help="seed of the sample and of the L2 split (default: %(default)s)")
    b.add_argument("--templates", default="default", metavar="default|single|FILE",
                   help="class prompt templates, as for zero-shot (default: %(default)s)")
    _views_option(b)
    return p


def _templates(spec: str) -> tuple[str, ...]:
    if spec in TEMPLATE_SETS:
        return TEMPLATE_SETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise EvalError(f"--templates {spec!r} is neither default, single nor a file")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    bad = [ln for ln in lines if "{}" not in ln]
    if not lines or bad:
        raise EvalError(f"template file {path} needs one template a line, each with '{{}}' for the class name"
                        + (f" (not: {bad[0]!r})" if bad else ""))
    return tuple(lines)


DEVICES = "cpu, cuda or cuda:N"


def _device(spec: str) -> torch.device:
    """The --device as a torch device: the CPU or a CUDA GPU this machine has; else an EvalError."""
    try:
        dev = torch.device(spec.strip().lower())
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise EvalError(f"--device {spec!r} is not supported: give {DEVICES}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EvalError(f"--device {spec}: CUDA is not available on this machine; use --device cpu")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise EvalError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) visible (cuda:0 to "
                            f"cuda:{torch.cuda.device_count() - 1})")
    return dev


def _finite(args, name: str, low: float, high: float | None = None) -> None:
    """A float option (absent or None: not given) that must be a finite number in [low, high]; NaN
    passes every `<`/`>` test, so each is checked here."""
    value = getattr(args, name, None)
    if value is None:
        return
    if not (math.isfinite(value) and value >= low and (high is None or value <= high)):
        option = f"--{name.replace('_', '-')}"
        bound = f"between {low:g} and {high:g}" if high is not None else f"{low:g} or more"
        raise EvalError(f"{option} {value} must be {bound} (a finite number)")


def _positive(args, *names) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _pct(v) -> str:
    return "   -" if v is None else f"{v:5.1f}"


def _views_note(r: dict) -> str:
    return f", {r['views']} views per image" if r.get("views", 1) != 1 else ""


def _left_out(r: dict) -> str:
    """The end of a headline: how many images could not be read and were left out, if any."""
    return f"; {r['n_unreadable']} unreadable image(s) left out" if r.get("n_unreadable") else ""


def _print_retrieval(r: dict) -> None:
    print(f"retrieval: {r['n_images']} images, {r['n_captions']} captions (ties: {r['ties']}{_views_note(r)})"
          f"{_left_out(r)}")
    print(f"{'':14}{'R@1':>7}{'R@5':>7}{'R@10':>7}")
    for label, key in (("image -> text", "i2t"), ("text -> image", "t2i")):
        print(f"{label:14}" + "".join(f"{r[f'{key}_r{k}']:7.1f}" for k in (1, 5, 10)))
    print(f"mean recall (mR): {r['mean_recall']:.2f}")
    if r.get("rerank"):
        print(f"(top {r['rerank']} of each query re-ordered by the captioning decoder, weight {r['rerank_weight']:g})")
    if "class_oracle_mean_recall" in r:
        print(f"class-oracle mR:  {r['class_oracle_mean_recall']:.2f}  "
              f"(expected mR of a model that only tells classes apart)")


def _print_zero_shot(r: dict) -> None:
    print(f"zero-shot classification: {r['n_images']} images, {len(r['classes'])} classes, "
          f"{r['n_templates']} prompt template(s){_views_note(r)}{_left_out(r)}")
    print(f"top-1: {r['top1']:.2f}%" + (f"   top-5: {r['top5']:.2f}%" if "top5" in r else "")
          + f"   mean per class: {r['mean_per_class']:.2f}%")
    width = max(len(k) for k in r["classes"])
    print(f"\n{'#':>3}  {'class':{width}}  {'n':>5}  {'acc %':>5}  name")
    for i, k in enumerate(r["classes"]):
        n = sum(r["confusion"][i])
        name = r["class_names"][k]
        name = name if isinstance(name, str) else " / ".join(name)
        print(f"{i:3d}  {k:{width}}  {n:5d}  {_pct(r['per_class'][k])}  {name}")
    cm = r["confusion"]
    cell = max(3, len(str(max(max(row) for row in cm))) + 1)
    print("\nconfusion (rows: true class #, columns: predicted class #)")
    print("    " + "".join(f"{j:>{cell}}" for j in range(len(cm))))
    for i, row in enumerate(cm):
        print(f"{i:3d} " + "".join(f"{v:>{cell}}" for v in row))


def _probe_left_out(r: dict) -> str:
    """_left_out for a probe, whose unreadable images may be held-out ones or ones to learn from."""
    if not r.get("n_unreadable"):
        return ""
    held_out = r.get("n_unreadable_held_out", 0)
    return (f"; {r['n_unreadable']} unreadable image(s) left out ({held_out} held-out, "
            f"{r['n_unreadable'] - held_out} to learn from)")


def _print_probe(r: dict) -> None:
    print(f"probe: {r['n_images']} held-out images, {len(r['classes'])} classes; image-only classifiers learnt "
          f"from {r['n_train']} other images{_views_note(r)}{_probe_left_out(r)}")
    rows = (("zero-shot (class-name prompts)", r["zero_shot_top1"]),
            ("nearest class centroid", r["centroid_top1"]),
            (f"{r['k']} nearest neighbours", r["knn_top1"]),
            (f"linear probe (L2 {r['linear_probe_l2']:g})", r["linear_probe_top1"]))
    print(f"{'top-1 %':>40}")
    for label, v in rows:
        print(f"{label:33}{v:7.1f}")
    print(f"zero-shot on the training images themselves: {r['zero_shot_train_top1']:.1f}%")
    best = max(v for _, v in rows[1:])
    if r["zero_shot_top1"] >= best - 2.0:
        print(f"-> zero-shot is within 2 points of the best image-only classifier ({best:.1f}%): the image "
              "embeddings, not the prompts, bound it")
    else:
        print(f"-> an image-only classifier does {best - r['zero_shot_top1']:.1f} points better: the class "
              "prompts' embeddings leave accuracy behind")
    print(f"\nclass search, mean precision of each class's top 10: prompts {r['text_search_p10']:.3f}, "
          f"centroids {r['centroid_search_p10']:.3f}")


def _print_caption(r: dict) -> None:
    print(f"captioning: {r['n_images']} images, {r['n_references']} reference captions, "
          f"beam size {r['beam_size']}{_left_out(r)}")
    print(f"BLEU-4: {r['bleu4']:.4f}   CIDEr-D: {r['cider']:.4f}")
    for ex in r["examples"]:
        print(f"\n{ex['image']}\n  generated: {ex['caption']}\n  reference: {ex['references'][0]}")


def _print_segmentation(r: dict) -> None:
    st = r["settings"]
    if "prompt" in r:
        print(f"{r['prompt']!r} on {st['raster']} vs {st['labels']} ({r['method']}, threshold {st['threshold']})")
        iou = "-" if r["iou"] is None else f"{100 * r['iou']:.1f}"
        print(f"pixel IoU {iou}   pixel accuracy {100 * r['pixel_accuracy']:.1f}   boundary F "
              f"{100 * r['boundary_f']:.1f}   labelled {100 * r['truth_fraction']:.1f}% of the raster's valid pixels")
        n = r['end_to_end']['polygons']
        print(f"end to end: polygon IoU {100 * r['end_to_end']['polygon_iou']:.1f} "
              f"({n} polygon{'' if n == 1 else 's'})")
        return
    print(f"localization: {st['mosaics']} {st['layout']} mosaics of {st['size']} px, {st['regions']} regions, "
          f"{len(st['classes'])} classes, seed {st['seed']}")
    print(f"{'method':12}{'mIoU':>7}{'pix acc':>9}{'bound F':>9}")
    for name, m in r["methods"].items():
        print(f"{name:12}{100 * m['miou']:7.1f}{100 * m['pixel_accuracy']:9.1f}{100 * m['boundary_f']:9.1f}")
    print(f"\nper class ({r['method']}):\n  {'':24}{'IoU':>9}{'pix acc':>9}{'bound F':>9}")
    for k, v in r["per_class_iou"].items():
        row = (v, r["per_class_pixel_accuracy"].get(k), r["per_class_boundary_f"].get(k))
        print(f"  {k:24}" + "".join(f"{'-' if x is None else f'{100 * x:.1f}':>9}" for x in row))
    if "end_to_end" in r:
        e = r["end_to_end"]
        print(f"\nend to end (backend Segment, threshold {e['threshold']}): polygon mIoU {100 * e['miou']:.1f}")


def _run_labelled_raster(args: argparse.Namespace) -> dict:
    from backend.defaults import DEFAULT_THRESHOLD
    from backend.engine import EngineError, ModelEngine
    from backend.raster import RasterError

    from . import localization as L

    if not args.labels or not (args.prompt or "").strip():
        raise EvalError("--raster needs --labels VECTOR and --prompt TEXT")
    mosaic_only = [f"--{name}" for name in ("data", "classnames", "files", "keep") if getattr(args, name)]
    if mosaic_only:
        raise EvalError(f"{' and '.join(mosaic_only)} {'is' if len(mosaic_only) == 1 else 'are'} for mosaics, which "
                        "--raster replaces: give one of the two (--raster with --labels and --prompt, or --data and "
                        "--classnames)")
    if args.bands is not None and min(args.bands) < 1:
        raise EvalError(f"--bands {' '.join(map(str, args.bands))}: band numbers start at 1")
    for what, path in (("raster", args.raster), ("labels", args.labels)):
        if not Path(path).exists():
            raise EvalError(f"{what} {path} does not exist")
    methods = [L.DEFAULT_METHOD] if args.methods == "default" else [m.strip() for m in args.methods.split(",")]
    unzoomed = [name for name, m in L.METHODS.items() if m.zoom == 1]
    if len(methods) != 1 or methods[0] not in unzoomed:
        raise EvalError(f"with --raster, --methods takes one of {', '.join(unzoomed)} (to map a raster "
                        "closer, give it a finer pixel size)")
    method = L.METHODS[methods[0]]
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    _device(args.device)
    try:
        engine = ModelEngine(args.checkpoint, device=args.device)
    except EngineError as e:
        raise EvalError(str(e)) from None
    try:
        start = time.perf_counter()
        out = L.evaluate_labelled_raster(engine, args.raster, args.labels, args.prompt.strip(), threshold,
                                         method.window, method.sigma, args.label_layer, args.where, args.tolerance,
                                         ensemble=not args.raw_prompts,
                                         edge_radius=args.edge_radius if method.edges else 0, bands=args.bands)
    except (RasterError, ValueError) as e:
        raise EvalError(_one_line(e)) from None
    finally:
        engine.stop()
    out["method"] = methods[0]
    out["checkpoint"] = str(args.checkpoint)
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def run_segmentation(args: argparse.Namespace, progress: bool) -> dict:
    from backend.defaults import DEFAULT_THRESHOLD
    from backend.engine import EngineError, ModelEngine

    from . import localization as L
    from .mosaic import MosaicError, build_mosaics, write_mosaic

    _positive(args, "mosaics", "size", "scene_px")
    if args.regions < 2:
        raise EvalError(f"--regions must be at least 2 (a mosaic's regions are of distinct classes), got {args.regions}")
    if args.tolerance < 0 or (not args.raster and args.tolerance > args.size):
        # past the mosaic's side every boundary pixel matches, and boundary F would say nothing (a
        # raster's side is known once it is read: training.localization checks it there)
        raise EvalError(f"--tolerance {args.tolerance} must be 0 or more and at most the mosaic's side "
                        f"(--size {args.size}), in pixels")
    if args.edge_radius is not None:
        try:
            check_edge_radius(args.edge_radius, "--edge-radius")
        except ValueError as e:
            raise EvalError(str(e)) from None
    _finite(args, "threshold", 0.0, 1.0)
    if args.raster:
        return _run_labelled_raster(args)
    raster_only = [f"--{name.replace('_', '-')}" for name in ("labels", "label_layer", "where", "prompt", "bands")
                   if getattr(args, name)]
    if raster_only:
        raise EvalError(f"{', '.join(raster_only)}: only with --raster FILE (a labelled raster); mosaics of --data "
                        "take none of them")
    if not args.data or not args.classnames:
        raise EvalError("give --data FOLDER and --classnames FILE.json (mosaics), or --raster, --labels and "
                        "--prompt (a labelled raster)")
    names = load_classnames(args.classnames)
    templates = _templates(args.templates)
    methods = (list(L.METHODS) if args.methods == "all" else [L.DEFAULT_METHOD] if args.methods == "default"
               else [m.strip() for m in args.methods.split(",") if m.strip()])
    unknown = [m for m in methods if m not in L.METHODS]
    if unknown or not methods:
        named = ", ".join(unknown) if unknown else repr(args.methods)
        raise EvalError(f"unknown --methods {named}; choose from "
                        f"{', '.join(L.METHODS)} or 'all'")
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold   # checked above
    records = scan_folder(args.data, names, files=args.files)
    if args.keep and Path(args.keep).exists() and not Path(args.keep).is_dir():
        raise EvalError(f"--keep {args.keep} is a file; give a folder for the mosaics (new or existing)")
    ckpt = Path(args.checkpoint)
    _device(args.device)
    try:
        engine = ModelEngine(ckpt, device=args.device)
    except EngineError as e:
        raise EvalError(str(e)) from None
    try:
        start = time.perf_counter()
        scene_px = args.scene_px or engine.image_size
        by_class = {k: v for k, v in L.images_by_class(records).items()}
        missing = [k for k in names if not by_class.get(k)]
        if missing:
            # mosaics are made of (and score against) the classes that have images; a class with
            # none would be a prediction the truth can never hold
            print(f"note: no images of {len(missing)} class(es) of the map ({', '.join(missing[:5])}"
                  f"{', ...' if len(missing) > 5 else ''}): scoring the other {len(names) - len(missing)}",
                  file=sys.stderr)
            names = {k: v for k, v in names.items() if k not in missing}
        by_class = {k: by_class[k] for k in names}       # the map's order = class indices
        if args.regions > len(names):
            # a mosaic's regions are of distinct classes: the summary and JSON say what was built
            print(f"note: --regions {args.regions}: only {len(names)} classes have images, so the mosaics have "
                  f"{len(names)} regions", file=sys.stderr)
            args.regions = len(names)
        try:
            mosaics = build_mosaics(by_class, args.seed, args.mosaics, size=args.size, regions=args.regions,
                                    scene_px=scene_px, layout=args.layout)
        except MosaicError as e:
            raise EvalError(str(e)) from None
        if args.keep:
            try:
                for i, m in enumerate(mosaics):
                    write_mosaic(m, args.keep, f"mosaic_{i:03d}")
            except OSError as e:     # a folder that cannot be made or written (permissions, a full disk)
                raise EvalError(f"--keep {args.keep}: cannot write the mosaics: {e}") from None
        text = class_text_embeddings(engine.model, engine.tokenizer, names, templates, device=engine.device)
        results = L.evaluate_mosaics(engine, mosaics, text.numpy().astype(np.float32), methods, args.tolerance,
                                     progress, edge_radius=args.edge_radius)
        # the headline is the backend's own method when it was measured
        main = L.DEFAULT_METHOD if L.DEFAULT_METHOD in methods else methods[0]
        first = results[main]
        out = {"miou": first["miou"], "pixel_accuracy": first["pixel_accuracy"], "boundary_f": first["boundary_f"],
               "per_class_iou": first["per_class_iou"], "per_class_pixel_accuracy": first["per_class_pixel_accuracy"],
               "per_class_boundary_f": first["per_class_boundary_f"], "method": main, "methods": results}
        if args.end_to_end:
            method = L.METHODS[main]
            out["end_to_end"] = L.evaluate_end_to_end(engine, mosaics, L.first_names(names), threshold,
                                                      method.window, progress=progress, ensemble=not args.raw_prompts,
                                                      edge_radius=args.edge_radius if method.edges else 0)
        out["settings"] = {"data": str(args.data), "files": args.files, "classnames": str(args.classnames),
                           "classes": list(names), "seed": args.seed, "mosaics": args.mosaics, "size": args.size,
                           "regions": args.regions, "layout": args.layout, "scene_px": scene_px,
                           "templates": len(templates), "tolerance_px": args.tolerance, "overlap": L.SEGMENT_OVERLAP,
                           "threshold": threshold if args.end_to_end else None,
                           "prompt_ensemble": not args.raw_prompts if args.end_to_end else None}
        out["checkpoint"] = str(ckpt)
        out["seconds"] = round(time.perf_counter() - start, 2)
        return out
    finally:
        engine.stop()


def _manifest_with_classes(path, names: Mapping) -> list:
    """A manifest's records, each checked to have a class of the map (before a model is loaded); a
    record without one is named by its manifest line where the manifest is JSONL."""
    records = read_manifest(path)
    for r in records:
        try:
            _class_key(r, names)
        except EvalError as e:
            line = _jsonl_line_of(path, r.image)
            if line is None:
                raise
            c = getattr(r, "class_name", None)
            what = "has no \"class\"" if c is None else f"has class {c!r}, which is not in the class-name map"
            raise EvalError(f"{path}:{line}: image {r.image} {what}; give each line a class of the map") from e
    return records


def _jsonl_line_of(path, image) -> int | None:
    """The number of the first line of JSONL manifest `path` whose "image" is `image` (resolved
    from the manifest's folder, as the reader does), or None."""
    folder, wanted = Path(path).absolute().parent, os.path.normpath(image)
    try:
        with open(path, encoding="utf-8") as f:
            for number, text in enumerate(f, 1):
                try:
                    row = json.loads(text)
                except ValueError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("image"), str) and \
                        os.path.normpath(folder / row["image"].strip()) == wanted:
                    return number
    except (OSError, UnicodeDecodeError):
        return None
    return None


def _records_to_score(records: list, progress: bool) -> tuple[list, dict[str, str]]:
    """leave_out_unreadable for the command: as training leaves such an image out, evaluation scores
    the others, rather than stopping at the first one's batch. EvalError when none can be read."""
    kept, unreadable = leave_out_unreadable(records, progress)
    if not kept:    # an error is one line
        raise EvalError(f"none of the {len(records)} images can be read: {unreadable_listing(unreadable)}")
    return kept, unreadable


def _readable_probe_pool(held_out: list, folder: list, per_class: int | None, seed: int,
                         progress: bool) -> tuple[list, dict[str, str]]:
    """A probe's `folder` less the unreadable images of the sample it learns from, and those images
    (path -> why). Only the sample is decoded, not the whole folder (AID's 8,000 images where it learns
    from 100 of each of 30 classes); an unreadable one leaves the pool, and the sample is drawn again
    from what is left, so that evaluate_probe, given the pool returned, draws the sample checked here."""
    unreadable: dict[str, str] = {}
    readable: set[str] = set()
    while True:
        sample = [str(r.image) for r in probe_training_images(held_out, folder, per_class, seed)]
        found = unreadable_images([path for path in sample if path not in readable], progress)
        if not found:
            return folder, unreadable
        unreadable.update(found)
        readable.update(path for path in sample if path not in found)
        folder = [r for r in folder if str(r.image) not in found]


def _warn_of_unreadable(unreadable: dict[str, str], scored: int) -> None:
    """Name on stderr the images left out as unreadable."""
    if unreadable:
        shown, more = first_unreadable(unreadable, "\n  {path}: {why}")
        named = "".join(shown) + (f"\n  ... and {more} more: --json lists them all (unreadable_images)"
                                  if more else "")
        print(f"warning: {len(unreadable)} image(s) cannot be read and are left out; the results count the "
              f"{scored} scored:{named}", file=sys.stderr)


def _check_set_size(args: argparse.Namespace, records: list, unreadable: dict) -> None:
    """Retrieval and captioning score the images against each other: too few for that is refused
    (retrieval) or warned of (caption). Checked on the images left once the unreadable ones are out."""
    if len(records) >= 2 or args.command not in ("retrieval", "caption"):
        return
    images = f"{len(records)} image" + (f" that can be read ({len(unreadable)} cannot)" if unreadable else "")
    if args.command == "retrieval":
        # one image is every caption's top hit: recalls of 100% that say nothing
        raise EvalError(f"{args.manifest}: {images}; retrieval ranks images against each other, so give a manifest "
                        "of 2 or more (--limit too)")
    # CIDEr's document frequencies come from the set scored: alone, every n-gram of the image's
    # references is in every document, and CIDEr-D is 0 whatever the caption
    print(f"warning: {args.manifest}: {images}: CIDEr-D is 0 for one image whatever its caption (its n-gram "
          "weights come from the set scored); give 2 or more (--limit too) for a CIDEr-D that means something "
          "(BLEU-4 is unaffected)", file=sys.stderr)


def run(args: argparse.Namespace) -> dict:
    if args.command == "segmentation":
        return run_segmentation(args, not args.quiet)
    _positive(args, "batch_size", "limit", "limit_per_class", "beam_size", "max_len")
    if getattr(args, "examples", 0) < 0:
        raise EvalError("--examples must be 0 or more")
    if getattr(args, "rerank", 0) < 0:
        raise EvalError(f"--rerank K must be 0 or more (0: no re-ranking), got {args.rerank}")
    _finite(args, "rerank_weight", 0.0)
    device = _device(args.device)
    progress = not args.quiet
    # inputs first: a bad path fails before a model is loaded
    folder: list = []       # probe's: the folder's images that train its image-only classifiers
    if args.command in ("probe", "zero-shot"):
        names = load_classnames(args.classnames)
        templates = _templates(args.templates)
        if len(names) < 2:
            # every image would be "right": a top-1 of 100% that says nothing (a training run's
            # validation of a one-class source still reports it, as a check that it runs)
            raise EvalError(f"the class-name map has {len(names)} class(es); {args.command} chooses among the "
                            "map's classes, so give a map of 2 or more")
    if args.command == "probe":
        if (args.files is None) == (args.manifest is None):
            raise EvalError("give the held-out images as --files LISTFILE (of --data) or as --manifest FILE "
                            "(one of the two); the folder's other images train the image-only classifiers")
        if args.train_per_class < 0 or args.k < 1:
            raise EvalError("--train-per-class must be 0 or more (0: all) and --k at least 1")
        folder = scan_folder(args.data, names)
        if args.files is not None:
            records = scan_folder(args.data, names, files=args.files)
        else:
            records = _manifest_with_classes(args.manifest, names)
    elif args.command == "zero-shot":
        if (args.data is None) == (args.manifest is None):
            raise EvalError("give the images as --data FOLDER or as --manifest FILE (one of the two)")
        if args.data is not None:
            records = scan_folder(args.data, names, files=args.files, limit_per_class=args.limit_per_class)
        elif args.files is not None:
            raise EvalError("--files selects images of a --data folder; a --manifest already lists its images")
        else:
            records = _manifest_with_classes(args.manifest, names)
    else:
        records = read_manifest(args.manifest, limit=args.limit)
        if args.command == "caption":
            references_to_score(records, args.manifest)     # each image's references have words
    ckpt = Path(args.checkpoint)
    read_config(ckpt)       # a quick look: its errors say what to give instead
    # the images last of the inputs (it decodes each one it scores), and before the model loads
    records, unreadable = _records_to_score(records, progress)
    if args.command == "probe":
        folder = [r for r in folder if str(r.image) not in unreadable]    # held out: no training image either
        held_out_unreadable = len(unreadable)
        folder, unreadable_training = _readable_probe_pool(records, folder, args.train_per_class or None,
                                                           args.seed, progress)
        unreadable = {**unreadable, **unreadable_training}
    _warn_of_unreadable(unreadable, len(records))
    _check_set_size(args, records, unreadable)
    if args.command == "caption":
        references = references_to_score(records, args.manifest)
    model, tokenizer = load_checkpoint(ckpt, device=device)
    start = time.perf_counter()
    if args.command == "retrieval":
        out = evaluate_retrieval(model, tokenizer, records, device, args.batch_size, progress, ties=args.ties,
                                 rerank=args.rerank, rerank_weight=args.rerank_weight, views=args.views)
    elif args.command == "probe":
        out = evaluate_probe(model, tokenizer, records, folder, names, device, args.batch_size,
                             train_per_class=args.train_per_class or None, k=args.k, seed=args.seed,
                             templates=templates, progress=progress, views=args.views)
    elif args.command == "zero-shot":
        out = evaluate_zero_shot(model, tokenizer, records, names, device, args.batch_size, templates=templates,
                                 limit_per_class=args.limit_per_class if args.manifest else None,
                                 progress=progress, views=args.views)
    else:
        out = evaluate_captions(model, tokenizer, records, device, args.batch_size, args.beam_size,
                                args.max_len, args.examples, progress, references=references)
    out["n_unreadable"], out["unreadable_images"] = len(unreadable), unreadable
    if args.command == "probe":     # n_unreadable counts the images it learns from too
        out["n_unreadable_held_out"] = held_out_unreadable
    out["checkpoint"] = str(ckpt)
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except (EvalError, CheckpointError) as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog} {args.command}: interrupted", file=sys.stderr)
        return 130
    try:
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            {"retrieval": _print_retrieval, "zero-shot": _print_zero_shot, "caption": _print_caption,
             "segmentation": _print_segmentation, "probe": _print_probe}[args.command](result)
        sys.stdout.flush()
    except BrokenPipeError:
        reader_stopped_reading()
    return 0


if __name__ == "__main__":
    sys.exit(main())
