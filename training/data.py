"""Training data: readers that turn datasets on disk into Records, and the torch datasets over them.

Readers (each returns list[Record]: one image and every caption it may be trained with):
- folder_records:   a folder of class sub-folders + a class-name map + caption templates, and
                    optionally class-level human caption pools (class_caption_pool);
- precomp_records:  RSICD/RSITMD/UCM/Sydney "precomp" caption files + the user's image folder;
- karpathy_records: Karpathy-style dataset_*.json + image folder;
- manifest_records: a JSONL or CSV manifest of image paths and captions.
For corpora too large for a list, WebDatasetShards streams tar shards instead.

Determinism, so that `--resume` continues exactly: which caption an image is paired with, and how
it is augmented, is a pure function of (seed, epoch, index). CaptionDataset seeds a fresh
`random.Random(f"{seed}:{epoch}:{index}:{draw}")` per item (string seeds go through SHA-512, so
they are the same in every process and unaffected by PYTHONHASHSEED), draws the caption from it and
hands the same generator to the transform. Nothing depends on worker count or on order of access.

Unreadable images never stop a run: each is counted in `skipped` and warned about once per file.
CaptionDataset replaces it with the next readable record, so batches stay full (every DDP rank must
add the same number of rows to the gathered contrastive loss) and the item says how many it
replaced, and which (path, why); where none of its records can be read, it gives a NoImage that
names them all, and a streamed sample comes back as None instead. collate_captions drops None and
NoImage items and reports both counts as the batch's "skipped", and the images named as its
"unreadable".
Set the epoch with set_epoch in each epoch before iterating; DataLoader workers get a copy of the
dataset when they start, so use persistent_workers=False (the default) or the epoch will not
reach them.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import random
import re
import sys
import tarfile
import warnings
import zlib
from collections import defaultdict
from dataclasses import dataclass
from inspect import Parameter, signature
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from backend.defaults import DEFAULT_STRETCH
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from training.templates import TEMPLATES, fill

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
FIRST_FEW = 5  # how many individual problems an error message lists before the total

CLASSNAMES_DIR = Path(__file__).resolve().parent / "classnames"

# UC Merced's 21 classes in sorted order: the precomp UCM files name images N.tif, N = 1..2100,
# and the N-th hundred is the N-th class of this list.
UCM_CLASSES = (
    "agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral",
    "denseresidential", "forest", "freeway", "golfcourse", "harbor", "intersection",
    "mediumresidential", "mobilehomepark", "overpass", "parkinglot", "river", "runway",
    "sparseresidential", "storagetanks", "tenniscourt",
)

# Class words in caption-benchmark image names (RSICD/RSITMD "parking_12.jpg", UCM by number) ->
# class keys of the sets shipped in training/classnames; the `mapping` for class_caption_pool.
# Only words whose images clearly show the target class are mapped: a pool of wrong sentences
# teaches the wrong words.
CAPTION_CLASS_WORDS: dict[str, dict[str, str]] = {
    "rsscn7": {
        "meadow": "aGrass",
        "farmland": "bField", "agricultural": "bField",
        "industrial": "cIndustry",
        "river": "dRiverLake", "pond": "dRiverLake",
        "forest": "eForest",
        "denseresidential": "fResident", "mediumresidential": "fResident",
        "sparseresidential": "fResident",
        "parking": "gParking", "parkinglot": "gParking",
    },
    "ucm": {
        **{c: c for c in UCM_CLASSES},
        "farmland": "agricultural", "plane": "airplane", "baseballfield": "baseballdiamond",
        "port": "harbor", "boat": "harbor", "parking": "parkinglot",
    },
    "aid": {
        **{c.lower(): c for c in (
            "Airport", "BareLand", "BaseballField", "Beach", "Bridge", "Center", "Church",
            "Commercial", "DenseResidential", "Desert", "Farmland", "Forest", "Industrial",
            "Meadow", "MediumResidential", "Mountain", "Park", "Parking", "Playground", "Pond",
            "Port", "RailwayStation", "Resort", "River", "School", "SparseResidential", "Square",
            "Stadium", "StorageTanks", "Viaduct")},
        "agricultural": "Farmland", "baseballdiamond": "BaseballField", "harbor": "Port",
        "parkinglot": "Parking",
    },
}


class DataError(ValueError):
    """A dataset that cannot be read as asked: the message says which file, line or class."""


class ManifestError(DataError):
    """A manifest line that cannot be used; the message names the file and line numbers."""


class UnnamedClassesError(DataError):
    """Class folders with images that the class-name map does not name. The message says to add
    them to the map; a command that can leave them out says how (evaluate's --files)."""


class SkippedImageWarning(UserWarning):
    """An image that could not be decoded and was left out of training."""


class ReplacedImageWarning(SkippedImageWarning):
    """An unreadable image a CaptionDataset replaced by the next readable one. Its item names it too
    (collate_captions puts it in the batch's "unreadable"), so that training names each such image
    once from its batches, in the main process, and makes its datasets without this warning
    (warn_of_replaced=False): each DataLoader worker holds its own copy of the dataset, and would warn
    of the image once per copy."""


def skipping_unreadable_image(what: str, why: str) -> str:
    """How an unreadable image that is skipped is named: alike by the datasets, the image bank and
    training's log, so that a search of a log finds every one."""
    return f"skipping unreadable image {what}: {why}"


def show_skipped_images_plainly() -> None:
    """Print SkippedImageWarnings as one "warning: ..." line, without the file, line and source line
    of the code that warned (which read like a traceback to someone training); others as before.
    For command-line entry points; data loader processes forked after it inherit it."""
    shown = warnings.showwarning
    if getattr(shown, "plain_skipped_images", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SkippedImageWarning):
            print(f"warning: {message}", file=file or sys.stderr, flush=True)
        else:
            shown(message, category, filename, lineno, file, line)

    show.plain_skipped_images = True
    warnings.showwarning = show


@dataclass(frozen=True)
class Record:
    """One image and every caption it may be trained with."""

    image: str  # absolute path
    captions: tuple[str, ...]
    class_name: str | None = None  # folder/class key (not the human name), if known

    def __post_init__(self):
        # Readers build lists; a tuple keeps Records hashable and safe to share across workers.
        if not isinstance(self.captions, tuple):
            object.__setattr__(self, "captions", tuple(self.captions))
        if not self.captions:
            raise DataError(f"{self.image}: no captions")


# --- small helpers -----------------------------------------------------------------------------


def _listing(items: Sequence[str], total: int | None = None) -> str:
    """'a, b, c' or 'a, b, c, ... (12 in all)' for error messages."""
    total = len(items) if total is None else total
    shown = ", ".join(items[:FIRST_FEW])
    return shown if total <= FIRST_FEW else f"{shown}, ... ({total} in all)"


def first_unreadable(unreadable: Mapping[str, str], form: str) -> tuple[list[str], int]:
    """The first FIRST_FEW unreadable images (path -> why), each as `form` ("{path}", "{why}"), and how
    many more there are: a message names a few (a folder of Git LFS pointers in place of its images
    has hundreds), and says where they are all listed."""
    shown = [form.format(path=path, why=why) for path, why in list(unreadable.items())[:FIRST_FEW]]
    return shown, len(unreadable) - len(shown)


def unreadable_listing(unreadable: Mapping[str, str], all_listed: str = "") -> str:
    """Unreadable images (path -> why) on one line, for an error or a warning: the first few, and how
    many more (and where `all_listed` they are)."""
    shown, more = first_unreadable(unreadable, "{path} ({why})")
    listing = "; ".join(shown)
    if more:
        listing += f"; and {more} more" + (f" ({all_listed})" if all_listed else "")
    return listing


def _problems(source: str, problems: Sequence[str], what: str | tuple[str, str]) -> str:
    """`what` the problems are, or (one, several) where one problem is worded otherwise."""
    if isinstance(what, tuple):
        what = what[0] if len(problems) == 1 else what[1]
    lines = [f"{source}: {len(problems)} {what}:"]
    lines += [f"  {p}" for p in problems[:FIRST_FEW]]
    if len(problems) > FIRST_FEW:
        lines.append(f"  ... and {len(problems) - FIRST_FEW} more")
    return "\n".join(lines)


def _need_path(path: Path, what: str, folder: bool, fix: str, error: type[DataError] = DataError) -> None:
    """A path a reader needs, named as missing (or as a file where a folder goes, or the reverse)
    with what to give instead, rather than left to fail as an OSError."""
    if path.is_dir() if folder else path.is_file():
        return
    if not path.exists():
        raise error(f"{what} {path} does not exist: {fix}")
    raise error(f"{what} {path} is a {'file' if folder else 'folder'}; {fix}")


def _check_images_exist(records: Sequence[Record], source: str) -> None:
    """Raise one DataError naming the first few missing images and the total."""
    missing = [r.image for r in records if not os.path.isfile(r.image)]
    if missing:
        raise DataError(_problems(source, missing, (f"of {len(records)} images is not a file (missing, or a "
                                                    "folder)", f"of {len(records)} images are not files (missing, "
                                                    "or folders)")))


def caption_field(obj: dict):
    """A JSON record's captions as written: its "captions" (a list) when present, else its "caption"
    (a string), else None. Manifests, shard .json members and the web filter read them alike."""
    return obj["captions"] if "captions" in obj else obj.get("caption")


def caption_list(found: Any) -> list[str]:
    """caption_field's value as a list of captions, stripped, blanks dropped: one string is one
    caption, None none; anything but a string or a list of strings is a ValueError."""
    if found is None:
        return []
    if isinstance(found, str):
        found = [found]
    if not isinstance(found, list) or not all(isinstance(c, str) for c in found):
        raise ValueError("\"captions\" must be a list of strings (or \"caption\" one string)")
    return _nonblank(found)


def _nonblank(captions: Iterable[str]) -> list[str]:
    """Captions as given, stripped, blanks dropped. Duplicates stay: benchmark files repeat a
    sentence on purpose, and retrieval counts every caption line (5 per image)."""
    return [c.strip() for c in captions if c.strip()]


def _clean_captions(captions: Iterable[str]) -> list[str]:
    """Whitespace collapsed, blanks dropped, duplicates (ignoring case) dropped, order kept."""
    seen: dict[str, str] = {}
    for c in captions:
        c = " ".join(c.split())
        if c and c.lower() not in seen:
            seen[c.lower()] = c
    return list(seen.values())


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


# what PIL raises for a file it cannot read as an image: not one, truncated, damaged, or past its
# size limit (DecompressionBombError is none of the others)
UNREADABLE_IMAGE = (OSError, ValueError, Image.DecompressionBombError)

# PIL modes of one value per pixel wider than 8 bits (16-bit PNG and TIFF, 32-bit integer or float)
WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def rgb_image(im: Image.Image) -> Image.Image:
    """`im` as 8-bit RGB. Values wider than 8 bits (16-bit imagery is common in remote sensing) are
    stretched linearly between their 2nd and 98th percentiles: PIL's own conversion clips them at
    255, which makes most 16-bit images one flat white. (load_image reads TIFFs of such data through
    GDAL instead, as the backend shows them, where GDAL's bindings are installed.) Transparent pixels
    of an image with alpha, or of a transparent colour or palette entry (a PNG's tRNS), are black, as
    the backend shows them."""
    if "transparency" in im.info and im.mode not in WIDE_MODES:
        # a transparent colour or palette entry: PIL's conversion to RGB keeps its colour, where GDAL
        # masks it; as alpha it is made black below
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        # transparent pixels black, as the backend shows them (PIL's conversion keeps their stored colour)
        rgb = np.array(im.convert("RGB"))
        rgb[np.asarray(im.getchannel("A")) == 0] = 0
        return Image.fromarray(rgb, "RGB")
    if im.mode not in WIDE_MODES:
        return im.convert("RGB")
    values = np.asarray(im, dtype=np.float64)
    valid = np.isfinite(values)
    low, high = np.percentile(values[valid], DEFAULT_STRETCH) if valid.any() else (0.0, 1.0)
    scaled = (np.where(valid, values, low) - low) * (255.0 / max(high - low, 1e-12))
    grey = np.where(valid, np.clip(scaled + 0.5, 0, 255), 0).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


TIFF_SUFFIXES = (".tif", ".tiff")


def load_image(path: str) -> Image.Image:
    """An RGB PIL image, fully decoded (so a truncated file fails here, not later); see rgb_image.
    A TIFF of data wider than 8 bits (16-bit or float, one band or the several of most sensors'
    chips, which PIL often cannot decode), or one with a nodata value or a mask, and an image of any
    format with a nodata value or a mask in files beside it, is read through GDAL
    as the backend reads rasters (gdal_rgb_image), so training sees the pixels the server shows."""
    try:
        with Image.open(path) as im:
            if _wide_tiff(im) or _masked_tiff(im) or _masked_beside(path):
                try:
                    return gdal_rgb_image(path)
                except ImportError:     # no GDAL bindings (a training machine): PIL's reading, as before
                    pass
            return rgb_image(im)
    except UNREADABLE_IMAGE:
        if not str(path).lower().endswith(TIFF_SUFFIXES):
            raise
        try:
            return gdal_rgb_image(path)
        except (ImportError, OSError, ValueError):
            pass
        raise


def _wide_tiff(im: Image.Image) -> bool:
    """A TIFF of samples wider than 8 bits, or of floats: PIL decodes some of them (a 48-bit RGB) by
    keeping each sample's high byte, unstretched, so 12-bit data comes out near black, and knows
    nothing of their nodata values."""
    tags = getattr(im, "tag_v2", None)
    if im.format != "TIFF" or tags is None:
        return False
    bits = tags.get(258, (8,))                                                  # BitsPerSample
    formats = tags.get(339, (1,))                                               # SampleFormat: 3 = float
    as_tuple = lambda v: v if isinstance(v, tuple) else (v,)    # noqa: E731
    return max(as_tuple(bits)) > 8 or 3 in as_tuple(formats)


GDAL_NODATA_TAG = 42113     # the TIFF tag in which GDAL writes a nodata value


def _masked_tiff(im: Image.Image) -> bool:
    """A TIFF with pixels GDAL masks and PIL knows nothing of: a nodata value, or a mask, which GDAL
    keeps as a further image in the file (only reading it tells it from an overview, which GDAL reads
    past as PIL does, so any further image counts) or in a .msk file beside it."""
    tags = getattr(im, "tag_v2", None)
    if im.format != "TIFF" or tags is None:
        return False
    return GDAL_NODATA_TAG in tags or bool(getattr(tags, "next", 0))


def _masked_beside(path: str) -> bool:
    """An image of any format whose masked pixels GDAL keeps beside it: a mask in a .msk file, or a
    nodata value in its .aux.xml (where GDAL writes one set on a file opened read-only, or on a format
    with no place for it, such as PNG or JPEG)."""
    if os.path.exists(f"{path}.msk"):
        return True
    try:
        with open(f"{path}.aux.xml", "rb") as f:
            return b"<NoDataValue" in f.read()
    except OSError:
        return False


def gdal_rgb_image(path: str) -> Image.Image:
    """A raster file as 8-bit RGB the way the backend shows a raster by default, by the backend's
    own band choice and stretch (backend.raster): the bands marked red, green and blue, else the
    first three but an alpha band (fewer: the first as grey); each band not 8-bit stretched
    linearly between the 2nd and 98th percentiles of its valid values; nodata and transparent
    pixels black. No georeferencing is needed. OSError when GDAL cannot read it, ImportError where
    GDAL's Python bindings are not installed."""
    from osgeo import gdal

    from backend import raster as R

    shown, default = str(path), R.BandMapping()
    with R._gdal_exceptions():     # on for this read only, as the backend does it
        try:
            ds = R.expand_palette(gdal.Open(shown, gdal.GA_ReadOnly), shown)
            if ds.RasterCount < 1:
                raise OSError(f"'{shown}' has no raster bands")
            alpha = R.find_alpha_band(ds)
            bands, _ = R.choose_rgb_bands(ds, default, alpha, f"'{shown}'")
            mask = R.plan_mask(ds, bands, alpha)
            whole = (0, 0, ds.RasterXSize, ds.RasterYSize, ds.RasterXSize, ds.RasterYSize)
            data = R.read_bands(ds, sorted(set(bands)), *whole, gdal.GRIORA_NearestNeighbour)
            valid = R.read_valid(ds, mask, *whole)
            ranges = R.compute_stretch(ds, bands, mask, default)
        except (RuntimeError, R.RasterError) as e:
            raise OSError(f"GDAL cannot read it ({e})") from None
    rgb, _ = R.to_rgb(data, valid, bands, ranges)
    return Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 2, 0)), "RGB")


def read_classnames_file(name_or_path: str | os.PathLike) -> tuple[dict, Path]:
    """The JSON object of a class-name map and its path: a shipped map by name ("rsscn7", "ucm",
    "aid") or any JSON file. Values are not checked here (training wants one name per class,
    evaluation also takes lists of synonyms)."""
    path = Path(name_or_path)
    if not path.is_file() and (CLASSNAMES_DIR / f"{name_or_path}.json").is_file():
        path = CLASSNAMES_DIR / f"{name_or_path}.json"
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, IsADirectoryError):
        shipped = ", ".join(sorted(p.stem for p in CLASSNAMES_DIR.glob("*.json")))
        what = "is a folder" if path.is_dir() else "does not exist"
        raise DataError(f"class-name map {name_or_path} {what}: give a JSON file of folder -> name, or a "
                        f"shipped map ({shipped})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: class-name map is not valid JSON ({e})") from None
    if not isinstance(mapping, dict):
        raise DataError(f"{path}: a class-name map must be one JSON object of \"folder\": \"human name\"")
    return mapping, path


def load_classnames(name_or_path: str | os.PathLike) -> dict[str, str]:
    """A class-name map (folder key -> human name) for training."""
    mapping, path = read_classnames_file(name_or_path)
    check_training_names(mapping, str(path))
    return mapping


def check_training_names(mapping: Mapping, where: str) -> None:
    """DataError naming the first class of a map that has no one human name. Training captions each
    image with its class's name; evaluation's maps may give a list of synonyms, which training has
    no use for: such a class is named, with its first synonym as the name to give."""
    for key, name in mapping.items():
        if isinstance(name, str) and name.strip():
            continue
        shown = f"{where}: class {key!r} has {json.dumps(name, ensure_ascii=False)[:80]}"
        if isinstance(name, list) and name and isinstance(name[0], str) and name[0].strip():
            raise DataError(f"{shown}: lists of names are for evaluation (each a prompt); training takes one name "
                            f"per class: give it one, e.g. {json.dumps({key: name[0]}, ensure_ascii=False)[1:-1]}")
        raise DataError(f"{shown}; give each class one human name, as \"folder\": \"human name\"")


# --- folder of classes -------------------------------------------------------------------------


def visible_subfolders(folder: Path) -> list[Path]:
    """The sub-folders of `folder` not hidden (".name"), sorted; none where it cannot be listed."""
    try:
        return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError:
        return []


def _class_dirs(root: Path) -> list[Path]:
    return [d for d in visible_subfolders(root) if any(_is_image(f) for f in os.listdir(d))]


def find_class_root(root: str | os.PathLike) -> Path:
    """The folder that holds the class sub-folders: `root` itself, or `root/images` (UCM's layout)."""
    root = Path(root)
    if not _class_dirs(root) and _class_dirs(root / "images"):
        return root / "images"
    return root


def folder_records(root: str | os.PathLike, classnames: Mapping[str, str],
                   templates: Sequence[str] | None = None,
                   caption_pool: Mapping[str, Sequence[str]] | None = None,
                   files: Sequence[str] | None = None) -> list[Record]:
    """Records for root/<class>/*.jpg|png|tif (or root/images/<class>/...).

    Captions: every template filled with the class's human name, then the class's human caption
    pool (keyed by folder name) if given. `files` keeps only these paths, relative to `root` or to
    the class folder's parent ("gParking/g001.jpg", "images/beach/beach03.jpg").
    """
    root = Path(os.path.abspath(root))
    # a mistyped path, named as such rather than as a folder without classes
    _need_path(root, "data folder", True, "give the folder that holds the class sub-folders")
    class_root = find_class_root(root)
    dirs = _class_dirs(class_root)
    if not dirs:
        raise DataError(f"{root}: no class sub-folders with images ({', '.join(IMAGE_EXTENSIONS)}) found")
    wanted = None if files is None else {Path(f).as_posix() for f in files}
    if wanted is not None:      # only the folders of the listed files need a name: a map of a few classes
        dirs = [d for d in dirs if any(f.startswith((f"{d.relative_to(root).as_posix()}/",
                                                     f"{d.relative_to(class_root).as_posix()}/")) for f in wanted)]
    unnamed = [d.name for d in dirs if d.name not in classnames]
    if unnamed:
        raise UnnamedClassesError(f"{root}: {len(unnamed)} class folder(s) have no entry in the class-name map: "
                                  f"{', '.join(unnamed)}; add them as \"folder\": \"human name\"")
    templates = TEMPLATES if templates is None else templates
    caption_pool = caption_pool or {}
    found: set[str] = set()
    records = []
    for d in dirs:
        captions = _clean_captions([*fill(templates, classnames[d.name]), *caption_pool.get(d.name, ())])
        if not captions:
            raise DataError(f"{root}: class {d.name} has no captions (no templates and no caption pool)")
        for name in sorted(f for f in os.listdir(d) if _is_image(f)):
            path = d / name
            if wanted is not None:
                keys = {path.relative_to(root).as_posix(), path.relative_to(class_root).as_posix()} & wanted
                if not keys:
                    continue
                found |= keys
            records.append(Record(str(path), tuple(captions), d.name))
    if wanted is not None and len(found) < len(wanted):
        missing = sorted(wanted - found)
        raise DataError(_problems(str(root), missing, ("listed file is not an image of a class folder",
                                                       "listed files are not images of a class folder")))
    return records


# --- caption benchmarks: precomp files and Karpathy JSON -----------------------------------------


def caption_file_class(dataset: str, filename: str) -> str | None:
    """The class word an RS caption benchmark puts in its image names, lowercased, or None.

    RSICD/RSITMD: "parking_12.jpg" -> "parking". UCM precomp: "N.tif" -> the N-th hundred of
    UCM_CLASSES. Sydney and RSICD's "00001.jpg" images carry no class.
    """
    stem = Path(filename).stem.lower()
    if dataset.lower().startswith("ucm") and stem.isdigit():
        n = int(stem)
        return UCM_CLASSES[(n - 1) // 100] if 1 <= n <= 100 * len(UCM_CLASSES) else None
    m = re.fullmatch(r"([a-z]+)_?\d+", stem)
    return m.group(1) if m else None


def _read_lines(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():  # trailing blank lines only: inner ones keep alignment
        lines.pop()
    return [line.strip() for line in lines]


def read_precomp(captions_dir: str | os.PathLike, dataset: str, split: str) -> list[tuple[str, list[str]]]:
    """(file name, captions) pairs from `<ds>_<split>_caps.txt` + `<ds>_<split>_filename.txt`.

    Train files have k consecutive caption lines per file-name line (k = 5 in all four sets);
    test files repeat the file name on every caption line. Both layouts are recognised by counts.
    """
    caps_path = Path(captions_dir) / f"{dataset}_{split}_caps.txt"
    names_path = Path(captions_dir) / f"{dataset}_{split}_filename.txt"
    _need_path(Path(captions_dir), "caption folder", True,
               f"give the folder that holds {caps_path.name} and {names_path.name}")
    for path in (caps_path, names_path):
        if not path.is_file():   # a dataset or split the folder has no files for: name the ones it has
            found = [m.group(1) + "/" + m.group(2) for q in sorted(Path(captions_dir).glob("*_caps.txt"))
                     if (m := re.fullmatch(r"(.+)_([^_]+)_caps\.txt", q.name))]
            raise DataError(f"caption file {path} does not exist: "
                            + (f"the folder has the captions of {_listing(found)} (dataset/split); give one of them"
                               if found else "the folder has no <dataset>_<split>_caps.txt files"))
    caps, names = _read_lines(caps_path), _read_lines(names_path)
    if not names:
        raise DataError(f"{names_path}: no file names")
    if len(caps) == len(names):
        per_name = [[c] for c in caps]
    elif len(caps) % len(names) == 0:
        k = len(caps) // len(names)
        per_name = [caps[i * k:(i + 1) * k] for i in range(len(names))]
    else:
        raise DataError(
            f"{caps_path} has {len(caps)} captions for {len(names)} file names in {names_path}: "
            f"expected one caption per name, or the same number per name"
        )
    grouped: dict[str, list[str]] = {}
    for name, cs in zip(names, per_name):
        grouped.setdefault(name, []).extend(cs)
    return list(grouped.items())


def precomp_records(captions_dir: str | os.PathLike, dataset: str, split: str,
                    image_dir: str | os.PathLike) -> list[Record]:
    """Records from the precomp caption files of `dataset` ("rsicd", "rsitmd", "ucm", "sydney")
    and the folder that holds its images under the names the files list."""
    image_dir = Path(os.path.abspath(image_dir))
    pairs = read_precomp(captions_dir, dataset, split)
    _need_path(image_dir, "image folder", True,
               f"give the folder that holds the images {dataset}_{split}_filename.txt lists")
    records = []
    for name, caps in pairs:
        captions = _nonblank(caps)
        if not captions:
            raise DataError(f"{Path(captions_dir) / f'{dataset}_{split}_caps.txt'}: {name} has only empty captions")
        records.append(Record(str(image_dir / name), tuple(captions), caption_file_class(dataset, name)))
    _check_images_exist(records, f"{dataset} {split} images in {image_dir}")
    return records


def karpathy_records(json_path: str | os.PathLike, image_dir: str | os.PathLike,
                     split: str | None = None) -> list[Record]:
    """Records from a Karpathy-style dataset_*.json ({"images": [{"filename", "split",
    "sentences": [{"raw"}], optional "filepath"}]}); `split` keeps one split ("train", "val",
    "test"; "restval" is its own split, as in the file)."""
    json_path, image_dir = Path(json_path), Path(os.path.abspath(image_dir))
    _need_path(json_path, "Karpathy caption file", False, "give the path of its dataset_*.json")
    _need_path(image_dir, "image folder", True, f"give the folder that holds the images {json_path.name} lists")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{json_path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{json_path}: expected a Karpathy-style object with an \"images\" list")
    dataset = str(data.get("dataset", json_path.stem.removeprefix("dataset_")))
    records, splits_seen = [], set()
    for i, entry in enumerate(data["images"]):
        splits_seen.add(entry.get("split"))
        if split is not None and entry.get("split") != split:
            continue
        name = entry.get("filename")
        if not name:
            raise DataError(f"{json_path}: images[{i}] has no \"filename\"")
        raw = [karpathy_sentence(s) for s in entry.get("sentences", ())]
        captions = _nonblank(raw)
        if not captions:
            raise DataError(f"{json_path}: images[{i}] ({name}) has no captions")
        path = image_dir / entry.get("filepath", "") / name
        records.append(Record(str(path), tuple(captions), caption_file_class(dataset, name)))
    if not records:
        raise DataError(f"{json_path}: no images in split {split!r} (splits present: "
                        f"{_listing(sorted(str(s) for s in splits_seen))})")
    _check_images_exist(records, f"{json_path} (images in {image_dir})")
    return records


def class_caption_pool(captions_dir: str | os.PathLike, mapping: Mapping[str, str],
                       splits: Sequence[str] = ("train",)) -> dict[str, list[str]]:
    """Class-level human captions: every caption of every precomp image whose name carries a class
    word in `mapping` (word -> target class key), grouped by target class, deduplicated.

    Only the train splits by default: the test captions belong to the benchmarks' held-out images,
    and keeping them out lets those benchmarks stay honest checks of a model trained on the pool.
    Datasets whose image names carry no class (Sydney) add nothing.
    """
    words = {k.lower(): v for k, v in mapping.items()}
    pool: dict[str, list[str]] = defaultdict(list)
    found = [re.fullmatch(r"(.+)_([^_]+)_filename\.txt", p.name) for p in Path(captions_dir).glob("*_filename.txt")]
    sources = sorted((m.groups() for m in found if m and m.group(2) in splits),
                     key=lambda ds_split: (list(splits).index(ds_split[1]), ds_split[0]))
    if not sources:
        raise DataError(f"{captions_dir}: no <dataset>_<split>_filename.txt files for splits {list(splits)}")
    for dataset, split in sources:
        for name, caps in read_precomp(captions_dir, dataset, split):
            target = words.get(caption_file_class(dataset, name) or "")
            if target is not None:
                pool[target].extend(caps)
    return {k: _clean_captions(v) for k, v in sorted(pool.items())}


# --- manifests -------------------------------------------------------------------------------------


class _ManifestBuilder:
    """Collects (image, captions, class) rows, merging rows of one image, and the problems found."""

    def __init__(self, path: Path):
        self.path, self.base = path, path.absolute().parent
        self.rows: dict[str, tuple[list[str], str | None, int]] = {}
        self.problems: list[str] = []

    def problem(self, line: int, message: str) -> None:
        self.problems.append(f"{self.path}:{line}: {message}")

    def add(self, line: int, image: Any, captions: Any, class_name: Any) -> None:
        if not isinstance(image, str) or not image.strip():
            return self.problem(line, "no \"image\" path")
        try:
            captions = caption_list(captions)
        except ValueError as e:
            return self.problem(line, str(e))
        if not captions:
            return self.problem(line, f"empty captions for {image} (give \"captions\": [...] or \"caption\": \"...\")")
        if class_name is not None and not isinstance(class_name, str):
            return self.problem(line, "\"class\" must be a string")
        path = os.path.normpath(self.base / image.strip())
        if path in self.rows:
            caps, known_class, first = self.rows[path]
            if class_name and known_class and class_name != known_class:
                return self.problem(line, f"class {class_name!r} for {image}, which line {first} gave class {known_class!r}")
            caps.extend(captions)
            self.rows[path] = (caps, known_class or class_name or None, first)
        else:
            self.rows[path] = (list(captions), class_name or None, line)

    def missing(self) -> list[tuple[int, str]]:
        """(first line, path) of each image that is not a file."""
        return [(line, p) for p, (_, _, line) in self.rows.items() if not os.path.isfile(p)]

    def records(self) -> list[Record]:
        if self.problems:
            raise ManifestError(_problems(str(self.path), self.problems, ("bad line", "bad lines")))
        if not self.rows:
            raise ManifestError(f"{self.path}: no records")
        missing = [f"{self.path}:{line}: {p}" for line, p in self.missing()]
        if missing:
            raise ManifestError(_problems(str(self.path), missing, (f"of {len(self.rows)} images is not a file "
                                                                    "(missing, or a folder)",
                                                                    f"of {len(self.rows)} images are not files "
                                                                    "(missing, or folders)")))
        return [Record(p, tuple(c), k) for p, (c, k, _) in self.rows.items()]


def manifest_records(path: str | os.PathLike) -> list[Record]:
    """Records from a manifest; image paths are relative to the manifest's folder.

    JSONL (.jsonl, .json): one object a line with "image", "captions" (list) or "caption" (str),
    optional "class". CSV (.csv, .tsv): a header with image,caption[,class]; rows of one image
    merge. Problems are collected and raised together (first few, then the total), each as
    file:line: bad JSON, a missing image, empty captions.
    """
    path = Path(path)
    _need_path(path, "manifest", False, "give the JSONL/CSV file", ManifestError)
    builder = _ManifestBuilder(path)
    if path.suffix.lower() in (".csv", ".tsv"):
        _read_csv_manifest(path, builder)
    else:
        _read_jsonl_manifest(path, builder)
    return builder.records()


def jsonl_manifest_problems(path: str | os.PathLike, captions: Callable[[dict], Any] = caption_field) -> list[str]:
    """What manifest_records refuses in a JSONL manifest, each as "file:line: what": its bad lines,
    then the lines whose image does not exist; empty when every line reads. `captions` gives a
    line's captions from its object (the web-pair filter also takes a "text")."""
    path = Path(path)
    builder = _ManifestBuilder(path)
    _read_jsonl_manifest(path, builder, captions)
    return builder.problems + [f"{path}:{line}: image {p} does not exist" for line, p in builder.missing()]


def _read_jsonl_manifest(path: Path, builder: _ManifestBuilder,
                         captions: Callable[[dict], Any] = caption_field) -> None:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                # without its newline: an object cut short is then reported where the line ends,
                # not as column 1 of a line after it
                obj = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                builder.problem(line_no, f"not valid JSON ({e.msg}, column {e.colno})")
                continue
            if not isinstance(obj, dict):
                builder.problem(line_no, "expected a JSON object")
                continue
            builder.add(line_no, obj.get("image"), captions(obj), obj.get("class"))


def _read_csv_manifest(path: Path, builder: _ManifestBuilder) -> None:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        header = [h.strip() for h in reader.fieldnames or []]
        if "image" not in header or "caption" not in header:
            raise ManifestError(f"{path}:1: the header must name the columns image,caption[,class]; got {header}")
        reader.fieldnames = header
        for row in reader:
            builder.add(reader.line_num, row.get("image"), row.get("caption") or "", row.get("class") or None)


# --- splits ------------------------------------------------------------------------------------------


def split_records(records: Sequence[Record], per_class: int, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, val) with `per_class` validation images from every class (records without a class
    form one group of their own).

    The choice in a class depends only on (seed, class, the class's image paths): not on the
    order of `records` nor on other classes, so a split can be reproduced from its description.
    Both lists keep the input order.
    """
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    by_class: dict[str | None, list[str]] = defaultdict(list)
    for r in records:
        by_class[r.class_name].append(r.image)
    too_small = [f"{k} ({len(v)})" for k, v in by_class.items() if per_class and len(v) <= per_class]
    if too_small:
        most = min(map(len, by_class.values())) - 1    # the smallest class keeps one image for training
        fix = f"hold out at most {most} per class" if most else "a class of one image can hold none out"
        raise DataError(f"cannot hold out {per_class} images per class and keep some for training: "
                        f"{_listing(too_small)}; {fix}")
    val_images: set[str] = set()
    for class_name, images in by_class.items():
        images = sorted(set(images))
        random.Random(f"{seed}:{class_name}").shuffle(images)
        val_images.update(images[:per_class])
    train = [r for r in records if r.image not in val_images]
    val = [r for r in records if r.image in val_images]
    return train, val


# --- map-style datasets --------------------------------------------------------------------------


def _accepts_rng(transform: Callable) -> bool:
    """Whether transform(image, rng) may be called: ours take an rng; a plain callable may not."""
    try:
        params = list(signature(transform).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (Parameter.POSITIONAL_ONLY, Parameter.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == Parameter.VAR_POSITIONAL for p in params)


class Item(tuple):
    """A dataset item (image, caption[, label]) that stood in for the unreadable images in
    `unreadable`, each as (path, why it could not be read)."""

    unreadable: tuple[tuple[str, str], ...] = ()

    @property
    def replaced(self) -> int:
        """How many unreadable images the item stood in for."""
        return len(self.unreadable)


class NoImage(Item):
    """A CaptionDataset's item when none of its records can be read: no image and no caption, only the
    `unreadable` ones, so that the batch carries them to training's log (collate_captions drops the
    item itself)."""


def has_image(item) -> bool:
    """Whether a dataset item is one to train on: not None (a streamed sample that could not be used)
    and not NoImage."""
    return item is not None and not isinstance(item, NoImage)


def unreadable_in(batch: Sequence) -> list[tuple[str, str]]:
    """(path, why) of each unreadable image a batch's items stood in for (Item.unreadable)."""
    return [pair for item in batch if item is not None for pair in getattr(item, "unreadable", ())]


class _CountsSkips:
    """Mixin: `skipped` counts unusable samples seen by this copy of the dataset (each DataLoader
    worker has its own copy; collate_captions reports per-batch counts to the training process),
    and each file is warned about once."""

    skipped: int = 0
    _warned: frozenset[str] = frozenset()

    def _skip(self, what: str, error: BaseException, category: type[Warning] = SkippedImageWarning,
              warn: bool = True) -> str:
        """Count an unusable sample, warn of it the first time (where `warn`); returns why it is unusable."""
        self.skipped += 1
        why = f"{type(error).__name__}: {error}"
        if warn and what not in self._warned:
            self._warned = self._warned | {what}
            warnings.warn(skipping_unreadable_image(what, why), category, stacklevel=3)
        return why


def karpathy_sentence(sentence: dict) -> str:
    """One sentence of a Karpathy split file: its raw text, else its tokens joined."""
    return sentence.get("raw") or " ".join(sentence.get("tokens", ()))


def class_key(class_name: str | None, names: Mapping) -> str | None:
    """The class-map key a record's class names: the key itself, or a key one of whose human names
    (a string or a sequence of them) it is; None when the map names it nowhere."""
    if class_name in names:
        return class_name
    for key, synonyms in names.items():
        if class_name == synonyms or (not isinstance(synonyms, str) and class_name in synonyms):
            return key
    return None


def class_label_id(name: str) -> int:
    """A stable non-negative int for a class name, the same in every process and run (the
    class-aware contrastive loss compares labels across ranks): case and spacing do not matter."""
    key = " ".join(name.lower().split())
    return zlib.crc32(key.encode("utf-8")) & 0x7FFFFFFF


class CaptionDataset(_CountsSkips, Dataset):
    """(image tensor, one caption) per Record; an unreadable image is replaced by the next readable one.

    With `labels` (class key -> int id, e.g. from class_label_id) items are (image, caption, label),
    label -1 for a record whose class has no id; the class-aware contrastive loss uses them.
    `warn_of_replaced` False: no ReplacedImageWarning, for a reader that names the images from the
    items. An attribute of the dataset, it goes with every copy a DataLoader worker gets, however
    the worker was started (a warnings filter of the main process reaches forked workers only).
    """

    def __init__(self, records: Sequence[Record], transform: Callable, seed: int = 0,
                 labels: Mapping[str, int] | None = None,
                 class_templates: Mapping[str, Sequence[str]] | None = None, template_mix: float = 0.0,
                 warn_of_replaced: bool = True):
        if not 0.0 <= template_mix <= 1.0:
            raise ValueError(f"template_mix must be in [0, 1], got {template_mix}")
        # Template mixing ("caption dropout"): with probability `template_mix` an item whose class has
        # templates gets one of them instead of its own caption, so human-captioned images also
        # learn the short class prompts users and zero-shot classification write.
        self.class_templates = {k: list(v) for k, v in (class_templates or {}).items() if v}
        self.template_mix = template_mix if self.class_templates else 0.0
        self.records = list(records)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self._pass_rng = _accepts_rng(transform)
        self.skipped = 0
        self.warn_of_replaced = warn_of_replaced
        self.labels = dict(labels) if labels is not None else None
        # With the images decoded once into a bank (training.device_images), each record's row in
        # it, -1 for an unreadable image: items then carry the row, not pixels.
        self.image_rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int, epoch: int, draw: int = 0) -> random.Random:
        """The generator for one item: caption choice first, then the transform's draws."""
        return random.Random(f"{self.seed}:{epoch}:{index}:{draw}")

    def caption(self, index: int, epoch: int | None = None, draw: int = 0) -> str:
        """The caption item `index` gets in `epoch` (default: the current one)."""
        return self._pick_caption(self.records[index], self.rng(index, self.epoch if epoch is None else epoch, draw))

    def _pick_caption(self, record: Record, rng: random.Random) -> str:
        caption = record.captions[rng.randrange(len(record.captions))]
        # no extra draw without mixing, so runs without it see the same captions and crops as before
        if self.template_mix and record.class_name in self.class_templates and rng.random() < self.template_mix:
            templates = self.class_templates[record.class_name]
            caption = templates[rng.randrange(len(templates))]
        return caption

    def load(self, index: int, epoch: int, draw: int = 0) -> tuple[torch.Tensor, str] | NoImage:
        """Item `index` as it is in `epoch`; `draw` tells apart repeats of one image in an epoch
        (MixedDataset oversampling) so that they get different captions and crops.

        An unreadable image is counted, warned about once, and replaced by the next readable record
        (deterministically), so batches stay full: under DDP every rank must contribute the same
        number of rows to the gathered contrastive loss. NoImage only when no record can be read."""
        n = len(self.records)
        unreadable = []      # (path, why) of each record this item stands in for
        for k in range(n):   # k: how many unreadable records this item stands in for
            index_k = (index + k) % n
            record = self.records[index_k]
            rng = self.rng(index_k, epoch, draw)
            caption = self._pick_caption(record, rng)
            if self.image_rows is not None:
                if self.image_rows[index_k] < 0:
                    why = self._skip(record.image, OSError("it could not be decoded into the image bank"),
                                     ReplacedImageWarning, self.warn_of_replaced)
                    unreadable.append((record.image, why))
                    continue
                break
            try:
                image = load_image(record.image)
            except Exception as e:  # any decoder failure: a long run must not die on one bad file
                unreadable.append((record.image, self._skip(record.image, e, ReplacedImageWarning,
                                                            self.warn_of_replaced)))
                continue
            break
        else:
            item = NoImage()
            item.unreadable = tuple(unreadable)
            return item
        if self.image_rows is not None:
            tensor = torch.tensor(int(self.image_rows[index_k]))   # BankAugment makes the pixels
        else:
            tensor = self.transform(image, rng) if self._pass_rng else self.transform(image)
        item = Item((tensor, caption) if self.labels is None else
                    (tensor, caption, self.labels.get(record.class_name, -1)))
        item.unreadable = tuple(unreadable)
        return item

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str] | NoImage:
        return self.load(index, self.epoch)


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to `total`, as close to total * weights as integers allow."""
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


class MixedDataset(Dataset):
    """Several datasets mixed by ratio: `weights` are the shares of each epoch's `length` items
    (default: the datasets' total length) that come from each dataset.

    Each epoch's plan is drawn from (seed, epoch): the exact counts per dataset (largest
    remainder), in shuffled order; within a dataset, items come from successive random
    permutations, so a small dataset oversampled k times shows every image k times with
    different captions and crops, and a large one undersampled shows distinct images.
    """

    def __init__(self, datasets: Sequence[Dataset], weights: Sequence[float], length: int | None = None,
                 seed: int = 0):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"need one weight per dataset, got {len(datasets)} datasets and {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
        empty = [i for i, (d, wi) in enumerate(zip(datasets, w)) if wi > 0 and len(d) == 0]
        if empty:
            raise ValueError(f"datasets {empty} are empty but have a positive weight")
        self.datasets, self.weights, self.seed = list(datasets), w / w.sum(), seed
        self.length = sum(len(d) for d in datasets) if length is None else int(length)
        self.epoch = 0
        self._plan: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.length

    @property
    def skipped(self) -> int:
        return sum(getattr(d, "skipped", 0) for d in self.datasets)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for d in self.datasets:
            if hasattr(d, "set_epoch"):
                d.set_epoch(epoch)

    def counts(self) -> list[int]:
        """How many items of an epoch come from each dataset."""
        return _largest_remainder(self.length, self.weights).tolist()

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dataset index, item index, draw) for every position of `epoch`."""
        if self._plan is None or self._plan[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            # int32: a plan of tens of millions of positions stays small in every worker
            which = np.full(self.length, -1, dtype=np.int32)
            item = np.zeros(self.length, dtype=np.int32)
            draw = np.zeros(self.length, dtype=np.int32)
            positions = rng.permutation(self.length)
            start = 0
            for k, n in enumerate(self.counts()):
                size = len(self.datasets[k])
                if n == 0:
                    continue
                rounds = math.ceil(n / size)
                items = np.concatenate([rng.permutation(size) for _ in range(rounds)])[:n]
                slots = positions[start:start + n]
                which[slots], item[slots], draw[slots] = k, items, np.arange(n) // size
                start += n
            self._plan = (epoch, which, item, draw)
        return self._plan[1:]

    def __getitem__(self, index: int):
        which, item, draw = self.plan(self.epoch)
        d, j, r = self.datasets[which[index]], int(item[index]), int(draw[index])
        return d.load(j, self.epoch, r) if hasattr(d, "load") else d[j]


# --- WebDataset tar shards --------------------------------------------------------------------------


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard paths from paths, brace patterns ("shards-{000..009}.tar", "{a,b}.tar") and shell
    wildcards ("shards/*.tar", sorted). A wildcard that matches nothing is an error naming it."""
    if isinstance(urls, (str, os.PathLike)):
        urls = [urls]
    out: list[str] = []
    for url in urls:
        for path in _expand_braces(os.fspath(url)):
            if glob.has_magic(path):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise DataError(f"no shard matches {path}: check the folder and the pattern")
                out.extend(matches)
            else:
                out.append(path)
    return out


def check_shards_exist(paths: Sequence[str]) -> None:
    """Refuse shard paths that are not files, all named at once (a missing shard otherwise shows only
    as a warning per epoch while training waits for samples)."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(f"{len(missing)} of {len(paths)} shards are not files: {shown}; "
                        "check the paths (brace patterns {000..009} and wildcards * are expanded)")


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        choices = body.split(",")
    return [x for c in choices for x in _expand_braces(head + c + tail)]


def distributed_rank() -> tuple[int, int]:
    """(rank, world size): torch.distributed when initialised, else RANK/WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: "dir/abc.seg.jpg" -> key "dir/abc", extension "seg.jpg"."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem), ext.lower()


def tar_samples(shard: str, exts: Sequence[str] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a WebDataset tar: its file members grouped by key
    (`_split_key`) in stream order; with `exts`, only those members are read.
    A damaged tar raises to the caller after the samples read before the damage."""
    key, parts = None, {}
    with tarfile.open(shard, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, ext = _split_key(member.name)
            if exts is not None and ext not in exts:
                continue
            if k != key:
                if key is not None:
                    yield key, parts
                key, parts = k, {}
            parts[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, parts


_SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp")


class WebDatasetShards(_CountsSkips, IterableDataset):
    """Streams (image tensor, caption) from WebDataset-style tar shards: members key.jpg/.png and
    key.txt (one caption a line), optionally key.json (its "captions"/"caption" are used when no
    .txt is there).

    Shards are shuffled per epoch with (seed, epoch) - the same order on every rank - and dealt
    out by shard to rank * num_workers + worker, so across all ranks and DataLoader workers every
    shard, hence every sample, is read exactly once per epoch. Give at least world_size x
    num_workers shards, ideally a multiple, or some readers get none. Samples are shuffled through
    a buffer of `shuffle_buffer` raw samples (decoded only on the way out). A sample that cannot
    be used (undecodable image, no caption, a truncated tar) comes out as None, counted in
    `skipped` and warned about once, so collate_captions reports it like CaptionDataset's.
    """

    def __init__(self, urls: str | Sequence[str], transform: Callable, seed: int = 0, shuffle_buffer: int = 1000):
        self.urls = expand_urls(urls)
        if not self.urls:
            raise DataError("no shards given")
        check_shards_exist(self.urls)
        self.transform = transform
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self._pass_rng = _accepts_rng(transform)
        self.skipped = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def my_shards(self) -> list[str]:
        """The shards this rank and DataLoader worker read in the current epoch."""
        rank, world = distributed_rank()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = list(self.urls)
        random.Random(f"{self.seed}:{self.epoch}:shards").shuffle(shards)
        readers = world * workers
        if len(shards) < readers:
            warnings.warn(f"{len(shards)} shards for {readers} readers (ranks x workers): some read nothing",
                          RuntimeWarning, stacklevel=2)
        return shards[rank * workers + worker::readers]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str] | None]:
        rank, _ = distributed_rank()
        info = get_worker_info()
        rng = random.Random(f"{self.seed}:{self.epoch}:{rank}:{info.id if info else 0}")
        buffer: list = []
        for sample in self._raw_samples(self.my_shards()):
            if sample is None:
                yield None
            elif len(buffer) < max(self.shuffle_buffer, 1):
                buffer.append(sample)
            else:
                k = rng.randrange(len(buffer))
                sample, buffer[k] = buffer[k], sample
                yield self._decode(sample, rng)
        rng.shuffle(buffer)
        for sample in buffer:
            yield self._decode(sample, rng)

    def _decode(self, sample: tuple[str, bytes, list[str]], rng: random.Random):
        where, data, captions = sample
        caption = captions[rng.randrange(len(captions))]
        try:
            with Image.open(io.BytesIO(data)) as im:
                image = rgb_image(im)
        except Exception as e:
            self._skip(where, e)
            return None
        return (self.transform(image, rng) if self._pass_rng else self.transform(image)), caption

    def _raw_samples(self, shards: Sequence[str]) -> Iterator[tuple[str, bytes, list[str]] | None]:
        """(where, image bytes, captions) per complete sample, None per unusable one."""
        for shard in shards:
            key = None
            try:
                for key, parts in tar_samples(shard):
                    yield self._assemble(shard, key, parts)
            except (tarfile.TarError, OSError, EOFError) as e:
                self._skip(f"{shard} (shard cut short after {key or 'its start'})", e)
                yield None

    def _assemble(self, shard: str, key: str, parts: dict[str, bytes]):
        where = f"{shard}:{key}"
        image = next((parts[e] for e in _SHARD_IMAGE_EXTS if e in parts), None)
        try:
            captions = _member_captions(parts)
        except (ValueError, AttributeError, TypeError) as e:   # bad text, JSON or caption values
            self._skip(where, e)
            return None
        if image is None or not captions:
            self._skip(where, DataError("no image" if image is None else "no caption"))
            return None
        return where, image, captions


def _member_captions(parts: dict[str, bytes]) -> list[str]:
    """A shard sample's captions: key.txt (one a line), else key.json's "captions" or "caption"."""
    if "txt" in parts:
        return _nonblank(parts["txt"].decode("utf-8").splitlines())
    if "json" in parts:
        return caption_list(caption_field(json.loads(parts["json"])))
    return []


def shard_captions(urls: str | Sequence[str]) -> Iterator[str]:
    """Every caption in the shards, read without decoding an image (tokenizer training). Members
    that cannot be read are passed over here: the training reader reports them."""
    for shard in expand_urls(urls):
        try:
            for _, parts in tar_samples(shard, exts=("txt", "json")):
                yield from _safe_captions(parts)
        except (tarfile.TarError, OSError, EOFError):
            pass


def _safe_captions(parts: dict[str, bytes]) -> list[str]:
    try:
        return _member_captions(parts)
    except (ValueError, AttributeError, TypeError):   # bad text, JSON or caption values
        return []


# --- batching ------------------------------------------------------------------------------------------


def collate_captions(batch: Sequence[tuple | None], tokenizer: Callable,
                     context_length: int) -> dict | None:
    """Stack images and tokenize captions, dropping None and NoImage items (unreadable images).

    Items are (image, caption) or (image, caption, class label id). Returns {"images": [B,3,H,W],
    "tokens": LongTensor [B,T], "captions": list[str], "skipped": how many unreadable images the
    batch dropped or replaced, "unreadable": (path, why) of each image it replaced or found none in
    place of (unreadable_in), and "labels": LongTensor [B] for labelled items}, or None when every item
    was dropped. Use it with functools.partial(collate_captions, tokenizer=..., context_length=...).
    """
    kept = [item for item in batch if has_image(item)]
    if not kept:
        return None
    captions = [item[1] for item in kept]
    out = {
        "images": torch.stack([item[0] for item in kept]),
        "tokens": tokenizer(captions, context_length),
        "captions": captions,
        "skipped": len(batch) - len(kept) + sum(getattr(item, "replaced", 0) for item in kept),
        "unreadable": unreadable_in(batch),
    }
    if len(kept[0]) > 2:
        out["labels"] = torch.tensor([item[2] for item in kept], dtype=torch.long)
    return out
