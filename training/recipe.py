"""Data recipes: which sources a training run reads, how they mix, and what is held out.

A recipe is a JSON file (``--recipe``) or the equivalent command-line flags::

    {"sources": [
      {"kind": "folder", "root": "../shared/data/rsscn7", "classnames": "rsscn7",
       "val_per_class": 50, "weight": 1.0,
       "caption_pool": {"dir": "../shared/data/captions", "mapping": {"parking": "gParking"}}},
      {"kind": "manifest", "path": "../shared/data/ucm/captions.jsonl", "val_per_class": 10, "weight": 1.0},
      {"kind": "shards", "urls": ["shards/train-{000..009}.tar"]},
      {"kind": "precomp", "captions": "../shared/data/captions", "dataset": "rsicd", "split": "train",
       "images": "RSICD/images"},
      {"kind": "karpathy", "path": "dataset_rsitmd.json", "images": "RSITMD/images", "split": "train"}
    ]}

A folder source may drop the images of a manifest (`"exclude_manifest"`) that trains them with
human captions, and cap its class caption pool (`"caption_pool": {..., "max_per_class": N}`) or give
it inline (`"caption_pool": {"captions": {"<class folder>": [...]}}`, as training.pack writes it); a
manifest source with `"classnames"` is also validated zero-shot. Precomp (RSICD/RSITMD/UCM/Sydney
caption files) and Karpathy `dataset_*.json` sources need the benchmark's images in `images`.
Paths in a recipe file are relative to the file. `classnames` is a JSON map (folder -> human name)
or the name of a bundled map in training/classnames/. Held-out images (`val_per_class`, a
deterministic split from the run's seed) never enter training; they are validated on during the run
(zero-shot for folders, retrieval for manifests).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from pathlib import Path

import torch

from backend.files import file_in_the_way

from . import data as D
from .augment import train_transform
from .templates import TEMPLATES, fill



# the keys each source kind must have; the last three are caption files (one record per image)
SOURCE_KEYS = {"folder": ("root", "classnames"), "shards": ("urls",), "manifest": ("path",),
               "precomp": ("captions", "dataset", "images"), "karpathy": ("path", "images")}
CAPTION_FILE_KINDS = ("manifest", "precomp", "karpathy")
# the keys a recipe's source may have besides those it needs (SOURCE_KEYS); any other is a typo
# ("val_per_clas") that would otherwise be dropped unnoticed, and with it a held-out split
COMMON_KEYS = ("kind", "name", "weight", "val_per_class")
OPTIONAL_KEYS = {"folder": ("caption_pool", "exclude_manifest"), "shards": (), "manifest": ("classnames",),
                 "precomp": ("classnames", "split"), "karpathy": ("classnames", "split")}
# keys whose value is one string (paths, a dataset name, a split)
STRING_KEYS = ("root", "path", "exclude_manifest", "captions", "images", "dataset", "split")
# the keys of a source that name files or folders, relative to the recipe's folder
PATH_KEYS = ("root", "path", "exclude_manifest", "captions", "images")


class RecipeError(ValueError):
    """A data recipe that cannot be used; the message says what to fix."""


SOURCE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_. -]*")


def sources_from_args(recipe: str | None, folders: list[str], classnames: list[str], manifests: list[str],
                      shards: list[str], val_per_class: int) -> list[dict]:
    sources: list[dict] = []
    if recipe and val_per_class:
        # a recipe's sources each say what they hold out; one flag for all of them would be ignored or
        # would override choices made in the file: refused, not silently dropped
        raise RecipeError(f"--val-per-class {val_per_class} is for --folder/--manifest sources; a --recipe sets "
                          'each source\'s own "val_per_class" in its file')
    if recipe:
        path = Path(recipe)
        if not path.is_file():
            raise RecipeError(f"recipe {recipe} is a folder; give the recipe's JSON file" if path.is_dir()
                              else f"recipe file {recipe} does not exist")
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RecipeError(f"recipe {recipe} is not valid JSON: {e}") from None
        base = path.resolve().parent
        if not isinstance(spec, dict) or not isinstance(spec.get("sources"), list):
            raise RecipeError(f'recipe {recipe} must be a JSON object with a "sources" list, e.g. '
                              '{"sources": [{"kind": "manifest", "path": "captions.jsonl"}]}')
        for n, s in enumerate(spec["sources"], 1):
            if not isinstance(s, dict):
                raise RecipeError(f"recipe {recipe}: source {n} must be an object, not {json.dumps(s)[:60]}")
            _check_source_fields(f"recipe {recipe}: source {n}", s)
            weight = s.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
                raise RecipeError(f"recipe {recipe}: source {n} has weight {weight!r}; a weight is a share of "
                                  "each epoch, a number >= 0 (0: left out)")
            name = s.get("name")
            if name is not None and (not isinstance(name, str) or not SOURCE_NAME.fullmatch(name)
                                     or name.casefold() == "recipe.json"):
                # the name is a folder of a packed copy and a file name in the run's val/: a path, or
                # "..", would put them outside it
                raise RecipeError(f"recipe {recipe}: source {n} is named {name!r}; a name is letters, digits, "
                                  "'_', '-', '.' and spaces, starting with a letter, digit or '_' (no '/'), and not "
                                  "'recipe.json'")
            if isinstance(s.get("name"), str) and s["name"].endswith(HELD_OUT_SUFFIX):
                # its held-out list "<name>.jsonl" would read as that of a source named without the suffix
                raise RecipeError(f"recipe {recipe}: source {n} is named {s['name']!r}; a name may not end in "
                                  f"{HELD_OUT_SUFFIX!r} (the suffix of held-out lists): choose another")
            val = s.get("val_per_class", 0)
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise RecipeError(f"recipe {recipe}: source {n} has val_per_class {val!r}; give a whole number >= 0")
            s = dict(s)
            if isinstance(s.get("urls"), str):     # one pattern given as a string, not a list
                s["urls"] = [s["urls"]]
            for key in PATH_KEYS:
                if key in s and not Path(s[key]).is_absolute():
                    s[key] = str(base / s[key])
            if "urls" in s:
                s["urls"] = [u if Path(u).is_absolute() else str(base / u) for u in s["urls"]]
            if isinstance(s.get("classnames"), str) and (base / s["classnames"]).is_file():
                s["classnames"] = str(base / s["classnames"])
            if isinstance(s.get("caption_pool"), dict) and "dir" in s["caption_pool"]:
                s["caption_pool"] = {**s["caption_pool"], "dir": str(base / s["caption_pool"]["dir"])}
            if s.get("weight", 1.0) > 0:    # weight 0: left out, of training, packing, word lists and validation
                sources.append(s)
        if spec["sources"] and not sources and not (folders or manifests or shards):
            raise RecipeError(f"recipe {recipe}: every source has weight 0 (left out), so nothing would be read; "
                              "give at least one a positive weight")
    # each --classnames names the classes of one --folder; with no folder, of one --manifest (its
    # lines' "class" fields), in the order given
    manifest_maps: list = [None] * len(manifests)
    if not folders and classnames and len(classnames) == len(manifests):
        manifest_maps, classnames = list(classnames), []
    elif len(classnames) != len(folders):
        raise RecipeError(f"give one --classnames per --folder ({len(folders)} folders, {len(classnames)} maps), "
                          "or, with no --folder, one per --manifest; to mix both, write a --recipe whose "
                          'manifest sources each name their "classnames"')
    sources += [{"kind": "folder", "root": r, "classnames": c, "val_per_class": val_per_class}
                for r, c in zip(folders, classnames)]
    sources += [{"kind": "manifest", "path": m, "val_per_class": val_per_class,
                 **({"classnames": c} if c else {})} for m, c in zip(manifests, manifest_maps)]
    if shards:
        sources.append({"kind": "shards", "urls": shards})
    if not sources:
        raise RecipeError("no training data: give --folder/--classnames, --manifest, --shards or --recipe")
    for s in sources:
        if s.get("kind") not in SOURCE_KEYS:
            raise RecipeError(f"unknown source kind {s.get('kind')!r} ({', '.join(SOURCE_KEYS)})")
        missing = [k for k in SOURCE_KEYS[s["kind"]] if not s.get(k)]
        if missing:
            raise RecipeError(f"a {s['kind']} source needs {', '.join(repr(k) for k in missing)}: "
                              f"{json.dumps(s)[:200]}")
    return sources


def _check_source_fields(where: str, s: dict) -> None:
    """A recipe source's keys and their types, checked before anything is read: a key no source of
    its kind takes is refused by name, and a value of the wrong type is said, not a traceback."""
    kind = s.get("kind")
    if kind not in SOURCE_KEYS:
        raise RecipeError(f"{where} has kind {kind!r}; a kind is one of {', '.join(SOURCE_KEYS)}")
    allowed = (*COMMON_KEYS, *SOURCE_KEYS[kind], *OPTIONAL_KEYS[kind])
    unknown = [k for k in s if k not in allowed]
    if unknown:
        raise RecipeError(f"{where} ({kind}) has {', '.join(repr(k) for k in unknown)}, which no {kind} source "
                          f"takes; its keys are {', '.join(allowed)}")
    for key in STRING_KEYS:
        if key in s and (not isinstance(s[key], str) or not s[key].strip()):
            raise RecipeError(f"{where} has {key} {json.dumps(s[key])[:60]}; give it as a string")
    urls = s.get("urls")
    if "urls" in s and not (isinstance(urls, str) or (isinstance(urls, list) and urls
                                                      and all(isinstance(u, str) for u in urls))):
        raise RecipeError(f"{where} has urls {json.dumps(urls)[:60]}; give a shard path or pattern, or a list of them")
    names = s.get("classnames")
    if "classnames" in s and not (isinstance(names, str) or (isinstance(names, dict) and names)):
        raise RecipeError(f"{where} has classnames {json.dumps(names)[:60]}; give a class-name map file (or a shipped "
                          'map\'s name), or an object of "folder": "human name" with one entry per class')
    if isinstance(names, dict):
        try:
            D.check_training_names(names, f"{where}: classnames")
        except D.DataError as e:
            raise RecipeError(str(e)) from None
    pool = s.get("caption_pool")
    if "caption_pool" in s:
        inline = isinstance(pool, dict) and isinstance(pool.get("captions"), dict)
        read = isinstance(pool, dict) and isinstance(pool.get("dir"), str) and isinstance(pool.get("mapping"), (str, dict))
        cap = pool.get("max_per_class", 1) if isinstance(pool, dict) else 1
        if not (inline or read) or isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise RecipeError(f"{where} has caption_pool {json.dumps(pool)[:80]}; give "
                              '{"dir": CAPTION_FOLDER, "mapping": CLASS_WORDS (a shipped name or an object), '
                              '"max_per_class": N (optional, a whole number >= 1)}')
        if read and not inline and isinstance(pool["mapping"], str) and pool["mapping"] not in D.CAPTION_CLASS_WORDS:
            raise RecipeError(f"{where} has caption_pool mapping {pool['mapping']!r}, which is no shipped one "
                              f"({', '.join(sorted(D.CAPTION_CLASS_WORDS))}); give one of those, or an object of "
                              '"class folder": "caption class word"')


def build_sources(sources: list[dict], seed: int) -> tuple[list[dict], dict[str, dict]]:
    """Read every source's records and carve its validation split.

    Returns (train sources with their `records`, validation sets by name)."""
    train, val = [], {}
    pooled: dict[int, set[str]] = {}   # source index -> its class caption pool (normalised)
    names: set[str] = set()
    for i, s in enumerate(sources):
        name = s.get("name") or Path(s.get("root") or s.get("path") or f"shards{i}").stem
        if name in names:
            # validation sets, their lists and packed copies are kept by source name: one would replace the other
            raise RecipeError(f"two sources are named {name!r} (named after their folder or file when no \"name\" "
                              "is given): in a --recipe give each a distinct \"name\"; on the command line give "
                              "folders or files of different names")
        names.add(name)
        if s["kind"] == "shards":
            train.append({**s, "name": name})
            continue
        try:
            if s["kind"] == "folder":
                mapping = s["classnames"] if isinstance(s["classnames"], dict) else D.load_classnames(s["classnames"])
                pool = None
                if s.get("caption_pool") and "captions" in s["caption_pool"]:
                    pool = _inline_pool(s["caption_pool"]["captions"])  # class key -> captions (a packed copy)
                elif s.get("caption_pool"):
                    words = s["caption_pool"]["mapping"]           # a dict, or a bundled name ("rsscn7")
                    words = D.CAPTION_CLASS_WORDS[words] if isinstance(words, str) else words
                    pool = D.class_caption_pool(s["caption_pool"]["dir"], words)
                    if s["caption_pool"].get("max_per_class"):
                        k = int(s["caption_pool"]["max_per_class"])
                        # a fixed sample, so templates keep a real share of each class's captions
                        pool = {c: random.Random(f"pool:{c}").sample(list(v), min(k, len(v))) for c, v in pool.items()}
                records = D.folder_records(s["root"], mapping, caption_pool=pool)
                if pool:
                    pooled[i] = {_norm(c) for caps in pool.values() for c in caps}
                if s.get("exclude_manifest"):
                    # images that another source already trains with human captions
                    taken = {r.image for r in D.manifest_records(s["exclude_manifest"])}
                    records = [r for r in records if r.image not in taken]
            else:
                mapping = s.get("classnames") or None
                if mapping is not None and not isinstance(mapping, dict):
                    mapping = D.load_classnames(mapping)
                if s["kind"] == "precomp":
                    records = D.precomp_records(s["captions"], s["dataset"], s.get("split", "train"), s["images"])
                elif s["kind"] == "karpathy":
                    records = D.karpathy_records(s["path"], s["images"], s.get("split", "train"))
                else:
                    records = D.manifest_records(s["path"])
        except (FileNotFoundError, ValueError) as e:
            if s["kind"] in ("precomp", "karpathy"):
                # a path resolved against the recipe, or a caption file found inside a folder: say which
                # source it is (its place in the recipe, and its name)
                label = f"{s['kind']} source {i + 1}" + (f" {s['name']!r}" if s.get("name") else "")
                raise RecipeError(f"{label}: {e}") from None
            raise RecipeError(str(e)) from None
        n_val = int(s.get("val_per_class", 0))
        held = []
        if n_val > 0:
            records, held = D.split_records(records, n_val, seed)
        # class_map: the resolved map (folder key -> human name), for class-aware training
        if mapping is not None:
            _check_classes(name, records + held, mapping)
        train.append({**s, "name": name, "records": records, "class_map": mapping})
        if held:
            if mapping is not None:
                val[name] = {"kind": "zero-shot", "records": held, "classnames": mapping}
            if s["kind"] in CAPTION_FILE_KINDS:
                val[name + "/retrieval"] = {"kind": "retrieval", "records": held}
    _drop_held_out_pool_captions(train, val, pooled)
    return train, val


def _check_classes(name: str, records: list, mapping: dict) -> None:
    """Every class of a source's images must be named by its class map (by key or by one of its
    names): checked before training, not at its first validation; a class the map leaves out would
    train under a made-up name, apart from the same concept in other sets, and get no templates."""
    unknown = sorted({str(r.class_name) for r in records
                      if r.class_name is not None and D.class_key(r.class_name, mapping) is None})
    if unknown:
        raise RecipeError(f"source {name}: images have classes its class-name map does not name: "
                          f"{', '.join(unknown[:8])}{', ...' if len(unknown) > 8 else ''}; add them to the map")


def classes_without_images(source: dict, held_out: list) -> list[str]:
    """The classes of a source's class map that none of its images, trained or `held_out`, has; for a
    folder source each says why (no folder, no images in it, or all of them left out as images of its
    exclude_manifest). Such a class is not trained on, yet its name is one of the candidates of the
    source's zero-shot validation."""
    mapping = source.get("class_map")
    if not mapping:
        return []
    used = {D.class_key(r.class_name, mapping) for r in [*source.get("records", []), *held_out]}
    missing = [k for k in mapping if k not in used]
    if source["kind"] != "folder":
        return missing
    class_root = D.find_class_root(source["root"])
    return [f"{k} ({_why_no_images(class_root / k, source)})" for k in missing]


def _why_no_images(class_folder: Path, source: dict) -> str:
    """Why a folder source has no image of a class whose folder is `class_folder`."""
    if not class_folder.is_dir():
        return "no folder"
    if source.get("exclude_manifest") and any(D._is_image(name) for name in os.listdir(class_folder)):
        # the folder's images are there: build_sources dropped them all as the manifest's
        return f"all its images are left out as images of its exclude_manifest {source['exclude_manifest']}"
    return "no images in its folder"


def _inline_pool(captions) -> dict[str, list[str]]:
    if not (isinstance(captions, dict) and all(isinstance(v, list) and all(isinstance(c, str) for c in v)
                                               for v in captions.values())):
        raise RecipeError('"caption_pool": {"captions": ...} must map each class folder to a list of captions')
    return {k: list(v) for k, v in captions.items()}


def _norm(caption: str) -> str:
    return " ".join(caption.lower().split())


def _drop_held_out_pool_captions(train: list[dict], val: dict[str, dict], pooled: dict[int, set[str]]) -> None:
    """Class caption pools come from benchmark train splits that may hold captions of images another
    source holds out (UC Merced's precomp train split covers the UCM validation images): drop every
    pooled caption that is also a validation caption, so retrieval and captioning metrics on the
    split never score text the model trained on through a pool. Templates are never dropped.
    `pooled`: index in `train` (which lists every source, in order) -> that source's pool captions."""
    # the captions retrieval and captioning are scored on (zero-shot splits score class prompts)
    held = {_norm(c) for vs in val.values() if vs["kind"] == "retrieval" for r in vs["records"] for c in r.captions}
    for i, s in enumerate(train):
        drop = pooled.get(i, set()) & held
        if not drop:
            continue
        kept = []
        for r in s["records"]:
            captions = tuple(c for c in r.captions if _norm(c) not in drop)
            if captions:   # a record with nothing left (no templates) is left out
                kept.append(r if captions == r.captions else dataclasses.replace(r, captions=captions))
        s["records"] = kept


def source_name(source: dict) -> str:
    """A source's name: its "name", else the stem of its folder or file (the validation lists' names)."""
    return source.get("name") or Path(source.get("root") or source.get("path") or "").stem


HELD_OUT_SUFFIX = ".val"


def validation_list_texts(sources: list[dict], val_sets: dict[str, dict]) -> dict[str, str]:
    """Each validation split as the file write_validation_lists writes: file name -> its text."""
    roots = {source_name(s): s for s in sources}
    texts = {}
    for name, vs in val_sets.items():
        base = name.split("/")[0]
        source = roots.get(base, {})
        if vs["kind"] == "zero-shot" and source.get("kind") == "folder":
            # relative without resolving links: an image may be a link to a file elsewhere
            root = os.path.abspath(source["root"])
            lines = [Path(os.path.relpath(os.path.abspath(r.image), root)).as_posix() for r in vs["records"]]
            texts[f"{base}.txt"] = "\n".join(lines) + "\n"
        elif vs["kind"] == "retrieval":
            texts[f"{base}.jsonl" if source.get("name") else f"{base}{HELD_OUT_SUFFIX}.jsonl"] = "".join(
                json.dumps({"image": str(Path(r.image).resolve()), "class": r.class_name,
                            "captions": list(r.captions)}) + "\n" for r in vs["records"])
    return texts


def write_validation_lists(sources: list[dict], val_sets: dict[str, dict], out_dir: str | Path) -> list[Path]:
    """Write each validation split so the evaluation CLI can reproduce the training's numbers:
    `<name>.txt` (image paths relative to the source's folder, for `evaluate zero-shot --files`) and,
    for caption-file sources, `<name>.jsonl` (a manifest for `evaluate retrieval --manifest`), or
    `<name>.val.jsonl` when the source has no "name": its name is then its caption file's, and
    `val/train.jsonl` would read as the training manifest."""
    out = Path(out_dir)
    texts = validation_list_texts(sources, val_sets)
    read = _files_read(sources)
    for file_name in texts:
        if os.path.realpath(out / file_name) in read:
            # a manifest source named as its file ({"name": "train", "path": "train.jsonl"}) listed in
            # its own folder: its held-out lines would replace the training manifest itself
            raise RecipeError(f"{out / file_name} is a file the recipe reads, where its held-out list of that name "
                              "would go; give another --out (or another name to the source)")
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for file_name, text in texts.items():
            (out / file_name).write_text(text)
            written.append(out / file_name)
    except OSError as e:
        raise RecipeError(f"cannot write the held-out lists in {out} ({e.strerror or e}); give a folder you can "
                          "write in") from None
    return written


def _files_read(sources: list[dict]) -> set[str]:
    """Real paths of the files the sources name (manifests, caption files, class maps)."""
    named = [s.get(key) for s in sources for key in (*PATH_KEYS, "classnames")]
    return {os.path.realpath(p) for p in named if isinstance(p, (str, Path)) and str(p) and os.path.isfile(p)}


def changed_validation_lists(sources: list[dict], val_sets: dict[str, dict], out_dir: str | Path) -> list[str]:
    """The validation lists in `out_dir` (a run's val/) that these sources and seed would not write
    again as they are, and those they would add: resuming with them would train on images held out
    before, or hold out images already trained on."""
    out = Path(out_dir)
    texts = validation_list_texts(sources, val_sets)
    there = {p.name for p in out.iterdir() if p.is_file()} if out.is_dir() else set()
    return sorted(name for name in there | set(texts)
                  if name not in there or name not in texts or (out / name).read_text() != texts[name])


def validation_list_source(path: Path) -> str:
    """The name of the source a list of `write_validation_lists` holds out images of."""
    return path.stem.removesuffix(HELD_OUT_SUFFIX) if path.suffix == ".jsonl" else path.stem


def caption_texts(train_sources: list[dict]):
    """Every distinct caption of the sources, in first-seen order (tokenizer training)."""
    seen: set[str] = set()
    for s in train_sources:
        texts = (D.shard_captions(s["urls"]) if s["kind"] == "shards"
                 else (c for r in s.get("records", []) for c in r.captions))
        for c in texts:
            if c not in seen:
                seen.add(c)
                yield c


def class_labels(source: dict) -> dict[str, int]:
    """Class key -> label id for one source's records. Classes are named by the source's class map
    (human names), so one concept shared by several sets ("forest", "parking lot") is one class
    across them; without a map, the class key qualified by the source name."""
    mapping = source.get("class_map") or {}
    out = {}
    for key in {r.class_name for r in source.get("records", []) if r.class_name is not None}:
        name = mapping.get(key)
        out[key] = D.class_label_id(name if isinstance(name, str) and name.strip() else f"{source['name']}:{key}")
    return out


def class_templates(source: dict) -> dict[str, list[str]]:
    """Class key -> the class's caption templates filled with its human name, for the classes of a
    source's class map that its records use (template mixing; sources without a map have none)."""
    mapping = source.get("class_map") or {}
    keys = {r.class_name for r in source.get("records", []) if r.class_name is not None}
    return {k: fill(TEMPLATES, mapping[k]) for k in sorted(keys)
            if isinstance(mapping.get(k), str) and mapping[k].strip()}


def check_source_mix(sources: list[dict], class_aware: bool) -> None:
    """RecipeError for sources one run cannot train on together (asked before any data is read)."""
    shards = [s for s in sources if s["kind"] == "shards"]
    if shards and class_aware:
        raise RecipeError("--class-aware needs the class of each image, and shards carry none: "
                          "train from folder or manifest sources, or without --class-aware")
    if shards and len(shards) != len(sources):
        # shards stream (an IterableDataset); folder, manifest and caption-file sources are indexed
        # datasets mixed by weight: one run reads either kind, not both
        others = sorted({s["kind"] for s in sources if s["kind"] != "shards"})
        raise RecipeError(f"shards train alone: they cannot be mixed with {'/'.join(others)} sources in one run. "
                          "Train on the shards alone, from a model trained on the others (--init-checkpoint, e.g. "
                          "backend/checkpoints/default); or, to mix them, extract the shards (tar -xf) and list "
                          "each KEY.jpg with the caption of its KEY.txt in a JSONL --manifest (README, Training)")


def make_dataset(train_sources: list[dict], image_size: int, model_config, seed: int,
                 class_aware: bool = False, augment: str = "overhead", template_mix: float = 0.0,
                 warn_of_replaced: bool = True):
    """The training dataset of a recipe's sources; with `class_aware`, items carry class label ids.

    `augment` picks the image augmentation (training.augment.AUGMENTATIONS); `template_mix` is the
    probability that an item of a known class is captioned with one of its class templates instead;
    `warn_of_replaced` False makes CaptionDatasets that do not warn of the unreadable images they
    replace (training names them from the batches)."""
    transform = train_transform(image_size, model_config.image_mean, model_config.image_std, augment=augment)
    check_source_mix(train_sources, class_aware)
    shards = [s for s in train_sources if s["kind"] == "shards"]
    if shards:
        urls = [u for s in shards for u in s["urls"]]
        return D.WebDatasetShards(urls, transform, seed=seed)
    templates = [class_templates(s) if template_mix else None for s in train_sources]
    if template_mix and not any(templates):
        raise RecipeError("--template-mix needs sources whose images have classes named by a class map "
                          "(--folder with --classnames, or a --manifest with a class field on its lines and a "
                          "--classnames for it)")
    datasets = [D.CaptionDataset(s["records"], transform, seed=seed + i,
                                 labels=class_labels(s) if class_aware else None,
                                 class_templates=templates[i], template_mix=template_mix,
                                 warn_of_replaced=warn_of_replaced)
                for i, s in enumerate(train_sources)]
    if len(datasets) == 1:
        return datasets[0]
    weights = [float(s.get("weight", 1.0)) for s in train_sources]
    return D.MixedDataset(datasets, weights, length=sum(len(d) for d in datasets), seed=seed)


class Collate:
    """Picklable collate function (DataLoader workers): drops unreadable items, tokenizes captions."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, batch):
        out = D.collate_captions(batch, self.tokenizer, self.context_length)
        if out is None:
            return {"images": torch.empty(0), "tokens": torch.empty(0, dtype=torch.long), "skipped": len(batch),
                    "unreadable": D.unreadable_in(batch)}
        # Drop the all-padding tail: the decoder then runs on the batch's longest caption rather than
        # the full context (captions average ~14 tokens of 64), and padding never changes the result.
        keep = int((out["tokens"] != self.tokenizer.pad_id).sum(1).max())
        out["tokens"] = out["tokens"][:, :max(keep, 2)]
        return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m training.recipe",
                                     description="Write a recipe's validation split (the images training holds out) as "
                                                 "file lists and manifests for `python -m training.evaluate`.")
    parser.add_argument("recipe", help="recipe JSON, e.g. training/recipes/default.json")
    parser.add_argument("--seed", type=int, default=0, help="the training run's --seed (default 0)")
    parser.add_argument("--out", required=True,
                        help="folder for <source>.txt / <source>.jsonl (<source>.val.jsonl for a source with no name)")
    args = parser.parse_args(argv)
    blocking = file_in_the_way(args.out)
    if blocking is not None:
        print(f"training.recipe: --out {args.out}: {blocking} is a file; give a folder for the lists", file=sys.stderr)
        return 2
    try:
        sources = sources_from_args(args.recipe, [], [], [], [], 0)
        _, val = build_sources(sources, seed=args.seed)
        written = write_validation_lists(sources, val, args.out)
        for path in written:
            print(path)
        if not written:     # a packed recipe (its held-out images left behind), or no val_per_class
            print(f"training.recipe: {args.recipe} holds out no images (no source sets val_per_class): no lists "
                  "were written", file=sys.stderr)
    except (RecipeError, D.DataError) as e:
        print(f"training.recipe: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
