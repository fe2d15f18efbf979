"""Web image/text pairs -> remote-sensing pairs (the "RS-WebLI" recipe).

Each pair is scored twice:
- image: the checkpoint's zero-shot probability that the image is overhead imagery, the softmax mass
  of OVERHEAD_PROMPTS among OVERHEAD_PROMPTS + OTHER_PROMPTS at the model's own temperature;
- text: the share of the text's content words that are remote-sensing words (rs_vocabulary.txt).
A pair is kept when both scores reach their thresholds, it is not a duplicate of a pair kept before
(same bytes, or a perceptual hash within `dup_distance` bits), and it does not match any image of
the evaluation folders (decontamination: a retrieval number means nothing if test images trained).

Perceptual hash: dHash, 64 bits (9x8 greyscale, one bit per horizontal neighbour pair). Lookups go
through 8 bands of 8 bits, so every hash within 7 bits shares a band with its match.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from training.data import UNREADABLE_IMAGE, rgb_image

from .outputs import FILTER_SHARD, foreign_files, listed

VOCABULARY = Path(__file__).resolve().parent / "rs_vocabulary.txt"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
OVERHEAD_PROMPTS = ("an aerial photo of the ground", "a satellite image", "an overhead view of land",
                    "an aerial view of buildings and roads", "a satellite image of fields and forest")
OTHER_PROMPTS = ("a photo of a person", "a close-up photo of an object", "a page of text", "a diagram",
                 "a photo of an animal", "a street photo taken at ground level", "a drawing", "a logo")
STOPWORDS = frozenset("a an the of in on at to and or with without for from by is are was were be been this that "
                      "these those it its as into over under near next there here some many few two three one "
                      "several very".split())


# ---- hashing -------------------------------------------------------------------------------------
def dhash(image: Image.Image) -> int:
    grey = np.asarray(image.convert("L").resize((9, 8), Image.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def shard_image(im: Image.Image, data: bytes) -> tuple[str, bytes]:
    """(extension, bytes) to store a kept image as: its own bytes when training reads the format
    (training.data's shard extensions; a phone's multi-picture JPEG, MPO, is a JPEG to every
    reader), else re-encoded as PNG (GIF, ICO...)."""
    from training.data import _SHARD_IMAGE_EXTS

    fmt = (im.format or "").lower()
    ext = {"jpeg": "jpg", "mpo": "jpg"}.get(fmt, fmt)
    if ext in _SHARD_IMAGE_EXTS:
        return ext, data
    out = io.BytesIO()
    im.convert("RGB").save(out, format="PNG")
    return "png", out.getvalue()


class HashIndex:
    """Near-duplicate lookup for 64-bit hashes within `distance` bits (distance <= 7)."""

    def __init__(self, distance: int):
        if not 0 <= distance <= 7:
            raise ValueError("dup distance must be 0..7 bits")
        self.distance = distance
        self.bands: list[dict[int, list[int]]] = [{} for _ in range(8)]

    def add(self, h: int) -> None:
        for b in range(8):
            self.bands[b].setdefault((h >> (8 * b)) & 0xFF, []).append(h)

    def near(self, h: int) -> bool:
        for b in range(8):
            for other in self.bands[b].get((h >> (8 * b)) & 0xFF, ()):
                if bin(h ^ other).count("1") <= self.distance:
                    return True
        return False


def eval_hashes(folders: list[str], distance: int, progress: bool = False) -> tuple[HashIndex, int]:
    """The perceptual hashes of every image under `folders` (the evaluation images whose near-copies
    are dropped), and how many there are; `progress`: a bar on stderr, since large folders take minutes."""
    from tqdm import tqdm

    for folder in folders:
        if not Path(folder).is_dir():
            raise ValueError(f"evaluation folder {folder} " + ("is a file; give the folder of the evaluation images"
                                                               if Path(folder).exists() else "does not exist"))
    paths = [os.path.join(root, name) for folder in folders for root, _, files in os.walk(folder)
             for name in sorted(files) if name.lower().endswith(IMAGE_EXTS)]
    for folder in folders:      # no image in it: decontamination against it would quietly do nothing
        if not any(p.startswith(os.path.join(folder, "")) for p in paths):
            raise ValueError(f"evaluation folder {folder} holds no image ({', '.join(IMAGE_EXTS)}); give the folder "
                             "of the evaluation images")
    index, n = HashIndex(distance), 0
    for path in tqdm(paths, desc="hashing evaluation images", unit="image", disable=not progress or not paths):
        try:
            with Image.open(path) as im:
                index.add(dhash(im))
                n += 1
        except UNREADABLE_IMAGE:
            continue
    return index, n


# ---- text ----------------------------------------------------------------------------------------
def read_vocabulary(path: str | os.PathLike = VOCABULARY) -> frozenset[str]:
    words = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip().lower()
        if line and not line.startswith("#"):
            words.update(line.split())
    return frozenset(words)


def text_score(text: str, vocabulary: frozenset[str]) -> float:
    words = [w for w in re.findall(r"[a-z]+", text.lower()) if w not in STOPWORDS]
    if not words:
        return 0.0
    stems = [w[:-1] if w.endswith("s") and w[:-1] in vocabulary else w for w in words]
    return sum(w in vocabulary for w in stems) / len(words)


# ---- inputs --------------------------------------------------------------------------------------
def read_pairs(shards: list[str], manifest: str | None) -> Iterator[tuple[str, bytes | None, str, str]]:
    """(key, image bytes or None when unreadable, text, where it came from: "shard#member key" or the
    image's path) from shards or a JSONL manifest
    (lines {"image": path relative to the manifest, "text", "caption" or "captions": ...}).
    A pair's several captions are joined one a line, as the shard writer stores them. Shard members
    are grouped into pairs as training groups them (WebDataset: the key ends at the file name's
    first dot), so the filter scores exactly the samples training would read."""
    from training.data import expand_urls, tar_samples

    expanded = expand_urls(shards) if shards else []
    stems = Counter(Path(s).stem for s in expanded)
    for n, shard in enumerate(expanded):
        # shards of one name in two folders ("a/00000.tar", "b/00000.tar") would give their pairs
        # one key, and the written shard would hold both under it: training reads them as one
        prefix = Path(shard).stem if stems[Path(shard).stem] == 1 else f"{Path(shard).stem}_{n}"
        try:
            for key, parts in tar_samples(shard):
                yield *_pair(prefix, key, parts), f"{shard}#{key}"
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"shard {shard} is not a readable tar file ({e}): fix or drop this shard and "
                             "run again") from None
    if manifest:
        folder = Path(manifest).absolute().parent     # image paths as check_manifest (and training) join them
        for n, line in enumerate(Path(manifest).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = caption_text(row)
                path = Path(os.path.normpath(folder / row["image"].strip()))
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
                # check_manifest read this line before the run: the file changed since
                raise ValueError(f"{manifest}:{n}: {type(e).__name__}: {e} (the manifest changed during the run): "
                                 "fix the line and run again") from None
            try:
                data = path.read_bytes()
            except OSError:
                data = None
            yield safe_key(f"{Path(manifest).stem}-{n:07d}"), data, text, str(path)


def check_manifest(manifest: str) -> None:
    """Read every line of a pairs manifest by the rules training reads manifests with (a "text"
    counts as its caption) and find every image: a bad line or a missing image stops the run here,
    before the model loads, not when all the pairs above it have been scored."""
    from training.data import caption_field, jsonl_manifest_problems

    problems = jsonl_manifest_problems(manifest, lambda row: row.get("text") or caption_field(row))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{problems[0]}{more}: fix the manifest and run again (no pair was scored)")


def safe_key(key: str) -> str:
    """A written pair's key without dots: training's reader ends a key at the first dot of a member's
    name, so a key with one (a shard or manifest named "web.v2", a member "img.000.jpg") would be
    cut there and its pair lost."""
    return key.replace(".", "_")


def caption_text(meta: dict) -> str:
    """A pair's text: its "text", else its captions as the trainer reads them (a list: one a line)."""
    from training.data import caption_field

    text = meta.get("text") or caption_field(meta) or ""
    if isinstance(text, list):
        text = "\n".join(str(t).strip() for t in text if str(t).strip())
    return str(text)


def _pair(prefix: str, key: str, parts: dict) -> tuple[str, bytes | None, str]:
    from training.data import _SHARD_IMAGE_EXTS

    image = next((parts[e] for e in _SHARD_IMAGE_EXTS if e in parts), None)    # the image training would read
    text = parts.get("txt", b"").decode("utf-8", "replace")
    if not text and "json" in parts:
        try:
            text = caption_text(json.loads(parts["json"]))
        except (json.JSONDecodeError, AttributeError):
            text = ""
    return safe_key(f"{prefix}-{key}"), image, text


# ---- the filter ----------------------------------------------------------------------------------
@dataclass
class FilterConfig:
    checkpoint: str
    out: str
    shards: list[str] = field(default_factory=list)
    manifest: str | None = None
    eval_folders: list[str] = field(default_factory=list)
    image_threshold: float = 0.0
    text_threshold: float = 0.2
    dup_distance: int = 4
    batch_size: int = 64
    shard_size: int = 1000
    device: str = "cpu"


class ImageScorer:
    """The checkpoint's zero-shot overhead-imagery probability (torch is imported only here)."""

    def __init__(self, checkpoint: str, device: str):
        import torch

        from backend.model.checkpoint import load_checkpoint
        from training.evaluate import encode_texts

        self.device = torch.device(device)
        self.model, self.tokenizer = load_checkpoint(checkpoint, device=self.device, dtype=torch.float32)
        self.model.eval()
        self.size = self.model.config.image_size
        self.text = encode_texts(self.model, self.tokenizer, list(OVERHEAD_PROMPTS + OTHER_PROMPTS), self.device)
        self.scale = float(self.model.logit_scale.detach().clamp(max=self.model.config.max_logit_scale).exp())

    def tensor(self, image: Image.Image):
        import torch

        im = rgb_image(image)
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((self.size, self.size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(im).transpose(2, 0, 1).copy())

    def scores(self, images: list) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = self.model.preprocess(torch.stack(images).to(self.device))
            emb = self.model.encode_image(x)
            probs = (emb @ self.text.to(self.device).T * self.scale).softmax(-1)
        return probs[:, :len(OVERHEAD_PROMPTS)].sum(-1).cpu().numpy()


def _hist(values: list[float]) -> dict:
    counts, edges = np.histogram(values, bins=10, range=(0.0, 1.0))
    return {"edges": [round(float(e), 2) for e in edges], "counts": counts.tolist()}


SHARD_PATTERN = FILTER_SHARD     # the writer's names, and nothing else


def earlier_outputs(out: Path) -> list[Path]:
    """What an earlier filter run wrote into `out`: its shards (finished or cut short), report and scores."""
    found = [p for p in (out / "shards").glob("filtered-*") if SHARD_PATTERN.fullmatch(p.name)]
    found += [out / name for name in ("report.json", "scores.jsonl", "report.json.part", "scores.jsonl.part")]
    return sorted(p for p in found if p.is_file())


def clear_earlier_run(out: Path) -> list[str]:
    """Remove an earlier run's outputs (earlier_outputs), so shards/*.tar holds this run's pairs only: a
    run with stricter thresholds writes fewer shards, and the earlier run's higher-numbered ones would
    stay beside them with pairs it drops. Nothing else is touched. Returns the names removed."""
    removed = []
    for path in earlier_outputs(out):
        path.unlink()
        removed.append(str(path.relative_to(out)))
    return removed


class _ShardWriter:
    def __init__(self, folder: Path, size: int):
        self.folder, self.size, self.n, self.tar, self.index = folder, size, 0, None, 0
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, key: str, image: bytes, ext: str, text: str, meta: dict) -> None:
        if self.tar is None or self.n == self.size:
            self.close()
            self.path = self.folder / f"filtered-{self.index:06d}.tar"
            self.tar = tarfile.open(self.path.with_suffix(".tar.part"), "w")
            self.index += 1
            self.n = 0
        for name, data in ((f"{key}.{ext}", image), (f"{key}.txt", text.encode()),
                           (f"{key}.json", json.dumps(meta).encode())):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            self.tar.addfile(info, io.BytesIO(data))
        self.n += 1

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            os.replace(self.path.with_suffix(".tar.part"), self.path)
            self.tar = None


def run_filter(cfg: FilterConfig, progress: bool = True) -> dict:
    from tqdm import tqdm

    from training.data import expand_urls

    out = Path(cfg.out)
    reading = {Path(p).resolve() for p in expand_urls(cfg.shards)} if cfg.shards else set()
    if any(p.resolve() in reading for p in earlier_outputs(out)):
        raise ValueError(f"--out {out} holds shards this run reads: a run replaces the shards of its --out, "
                         "so write the result to another --out")
    out.mkdir(parents=True, exist_ok=True)
    vocabulary = read_vocabulary()
    contamination, n_eval = eval_hashes(cfg.eval_folders, cfg.dup_distance, progress)
    scorer = ImageScorer(cfg.checkpoint, cfg.device)
    removed = clear_earlier_run(out)    # only now: a run that fails to start leaves the earlier one whole
    if removed:
        files = [name for name in removed if "/" not in name]
        print(f"removed the earlier run's outputs from {out}: {len(removed) - len(files)} shard file(s)"
              + "".join(f", {name}" for name in files), file=sys.stderr)
    others = [Path(name).name for name in foreign_files(out, SHARD_PATTERN)]
    if others:
        print(f"note: {out / 'shards'} also holds {len(others)} .tar file(s) the filter did not write "
              f"({listed(others)}): left alone, but training on "
              "shards/*.tar would read them too", file=sys.stderr)
    # duplicates are of pairs kept before: a pair dropped by the thresholds takes no later copy with it
    seen_bytes: set[str] = set()
    seen_hashes = HashIndex(cfg.dup_distance)
    pending_bytes: set[str] = set()                    # the unscored batch's bytes digests and hashes
    pending_hashes = HashIndex(cfg.dup_distance)
    writer = _ShardWriter(out / "shards", cfg.shard_size)
    counts = {"seen": 0, "kept": 0, "unreadable": 0, "duplicate": 0, "eval_match": 0, "low_image_score": 0,
              "low_text_score": 0}
    image_scores, text_scores, near, kept_keys = [], [], {"kept": [], "dropped": []}, []
    t0 = time.time()
    batch: list[tuple] = []     # (key, bytes, text, image, text score, digest, hash, where it came from)
    scores_file = open(out / "scores.jsonl.part", "w")      # every scored pair: for tuning thresholds

    def flush():
        nonlocal pending_hashes
        if not batch:
            return
        scores = scorer.scores([scorer.tensor(im) for _, _, _, im, *_ in batch])
        for (key, data, text, im, ts, digest, h, source), score in zip(batch, scores):
            score = float(score)
            image_scores.append(score)
            keep = score >= cfg.image_threshold and ts >= cfg.text_threshold
            if score < cfg.image_threshold:
                counts["low_image_score"] += 1
            elif ts < cfg.text_threshold:
                counts["low_text_score"] += 1
            if abs(score - cfg.image_threshold) < 0.1:
                side = near["kept" if keep else "dropped"]
                if len(side) < 5:
                    side.append({"key": key, "text": text[:200], "image_score": round(score, 3),
                                 "text_score": round(ts, 3)})
            # "source": which image it is (the key names only its place in the input)
            scores_file.write(json.dumps({"key": key, "source": source, "image_score": round(score, 4),
                                          "text_score": round(ts, 4), "kept": keep}) + "\n")
            if keep:
                ext, payload = shard_image(im, data)
                writer.add(key, payload, ext, text, {"image_score": score, "text_score": ts, "text": text})
                counts["kept"] += 1
                kept_keys.append(key)
                seen_bytes.add(digest)
                seen_hashes.add(h)
        batch.clear()
        pending_bytes.clear()
        pending_hashes = HashIndex(cfg.dup_distance)

    def pairs():
        """read_pairs, saying where a pair that cannot be read (a damaged shard) leaves the run."""
        try:
            yield from read_pairs(cfg.shards, cfg.manifest)
        except ValueError as e:
            scores_file.close()     # the pairs scored so far, whole
            raise ValueError(f"{e}; this run stopped after {counts['seen']} pairs and leaves partial outputs in "
                             f"{out} (no report.json), which a re-run replaces, starting from the first pair") from None

    for key, data, text, source in tqdm(pairs(), desc="pairs", unit="pair", disable=not progress):
        counts["seen"] += 1
        if data is None:
            counts["unreadable"] += 1
            continue
        try:
            im = Image.open(io.BytesIO(data))
            im.load()
        except UNREADABLE_IMAGE:
            counts["unreadable"] += 1
            continue
        h = dhash(im)
        if contamination.near(h):
            counts["eval_match"] += 1
            continue
        digest = hashlib.sha1(data).hexdigest()
        if digest in pending_bytes or pending_hashes.near(h):
            flush()     # a copy of a pair not yet scored: whether it is a duplicate depends on that pair
        if digest in seen_bytes or seen_hashes.near(h):
            counts["duplicate"] += 1
            continue
        pending_bytes.add(digest)
        pending_hashes.add(h)
        ts = text_score(text, vocabulary)
        text_scores.append(ts)
        batch.append((key, data, text, im, ts, digest, h, source))
        if len(batch) >= cfg.batch_size:
            flush()
    flush()
    writer.close()
    scores_file.close()
    os.replace(out / "scores.jsonl.part", out / "scores.jsonl")
    seconds = time.time() - t0
    report = {"counts": counts, "evaluation_images_hashed": n_eval,
              "image_score_histogram": _hist(image_scores), "text_score_histogram": _hist(text_scores),
              "near_threshold": near, "kept_keys": kept_keys, "seconds": round(seconds, 2),
              "pairs_per_second": round(counts["seen"] / seconds, 2) if seconds > 0 else None,
              "settings": asdict(cfg)}
    tmp = out / "report.json.part"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "report.json")
    return report
