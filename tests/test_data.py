"""Training data: readers, datasets, transforms and batching, on tiny images each test makes.

The last tests check the shared data sets (../shared/data) parse as expected; they skip where
that folder is absent.
"""
from __future__ import annotations

import csv
import io
import json
import pickle
import random
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from training import data as data_mod
from training.augment import eval_transform, train_transform
from training.data import (
    CAPTION_CLASS_WORDS, CaptionDataset, DataError, ManifestError, MixedDataset, Record,
    SkippedImageWarning, UnnamedClassesError, WebDatasetShards, caption_file_class, class_caption_pool, collate_captions,
    expand_urls, folder_records, has_image, karpathy_records, load_classnames, manifest_records,
    precomp_records, split_records,
)
from training.recipe import Collate
from training.templates import TEMPLATES, ZERO_SHOT_TEMPLATES

from conftest import SHARED_DATA

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SIZE = 16


def make_image(path: Path, size=(20, 20), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def image_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def class_folder(tmp_path):
    """root/<class>/*.jpg with three classes of four images each."""
    root = tmp_path / "scenes"
    for c, cls in enumerate(("aPark", "bPort", "cRoad")):
        for i in range(4):
            make_image(root / cls / f"{cls}_{i}.jpg", seed=10 * c + i)
    return root


CLASSNAMES = {"aPark": "park", "bPort": "port", "cRoad": "road"}


# --- templates and class-name maps --------------------------------------------------------------


def test_templates_have_one_slot_and_are_varied():
    assert len(TEMPLATES) >= 40 and len(set(TEMPLATES)) == len(TEMPLATES)
    assert all(t.count("{}") == 1 for t in TEMPLATES + ZERO_SHOT_TEMPLATES)
    assert set(ZERO_SHOT_TEMPLATES) <= set(TEMPLATES) and 4 <= len(ZERO_SHOT_TEMPLATES) <= 12


def test_shipped_classnames_cover_every_shared_class_folder():
    expected = {
        "rsscn7": {"aGrass", "bField", "cIndustry", "dRiverLake", "eForest", "fResident", "gParking"},
        "ucm": set(data_mod.UCM_CLASSES),
        "aid": set(CAPTION_CLASS_WORDS["aid"].values()),
    }
    for name, keys in expected.items():
        mapping = load_classnames(name)
        assert set(mapping) == keys, name
        assert all(v == v.strip().lower() and v for v in mapping.values())
    assert load_classnames("aid")["RailwayStation"] == "railway station"
    assert load_classnames("ucm")["baseballdiamond"] == "baseball diamond"
    assert load_classnames("rsscn7")["gParking"] == "parking lot"
    for name in ("rsscn7", "ucm", "aid"):  # every caption word targets a real class key
        assert set(CAPTION_CLASS_WORDS[name].values()) <= set(load_classnames(name))
    with pytest.raises(DataError, match="shipped map"):
        load_classnames("nosuchset")


def test_a_training_class_map_with_synonym_lists_names_the_entry(tmp_path):
    """Evaluation takes "class": ["name", "synonym"]; training takes one name a class, and says which
    class has a list (the file is one JSON object: that is not what is wrong)."""
    synonyms = tmp_path / "synonyms.json"
    synonyms.write_text(json.dumps({"forest": "forest", "Golf Course": ["golf course", "golf links"]}))
    with pytest.raises(DataError) as e:
        load_classnames(synonyms)
    assert str(e.value) == (f"{synonyms}: class 'Golf Course' has [\"golf course\", \"golf links\"]: lists of names "
                            "are for evaluation (each a prompt); training takes one name per class: give it one, "
                            "e.g. \"Golf Course\": \"golf course\"")
    blank = tmp_path / "blank.json"
    blank.write_text(json.dumps({"forest": "  "}))
    with pytest.raises(DataError, match=r"class 'forest' has \"  \"; give each class one human name"):
        load_classnames(blank)


# --- folder of classes ----------------------------------------------------------------------------


def test_folder_records_templates_pool_and_files(class_folder):
    records = folder_records(class_folder, CLASSNAMES, templates=["a photo of {}.", "{} from above."],
                             caption_pool={"bPort": ["boats at a pier .", "a photo of port."]})
    assert len(records) == 12
    assert [r.class_name for r in records] == ["aPark"] * 4 + ["bPort"] * 4 + ["cRoad"] * 4
    assert all(Path(r.image).is_absolute() and Path(r.image).is_file() for r in records)
    assert records[0].captions == ("a photo of park.", "park from above.")
    # the pool follows the templates; a pool sentence equal to a template's is kept once
    assert records[4].captions == ("a photo of port.", "port from above.", "boats at a pier .")

    default = folder_records(class_folder, CLASSNAMES)
    assert len(default[0].captions) == len(TEMPLATES)

    subset = folder_records(class_folder, CLASSNAMES, files=["aPark/aPark_1.jpg", "cRoad/cRoad_3.jpg"])
    assert [Path(r.image).name for r in subset] == ["aPark_1.jpg", "cRoad_3.jpg"]
    with pytest.raises(DataError, match="1 listed file is not"):
        folder_records(class_folder, CLASSNAMES, files=["aPark/aPark_1.jpg", "aPark/nope.jpg"])


def test_folder_records_names_unmapped_classes(class_folder):
    with pytest.raises(DataError) as e:
        folder_records(class_folder, {"aPark": "park"})
    assert "bPort" in str(e.value) and "cRoad" in str(e.value) and "2 class folder" in str(e.value)
    # the reader names what to add; what else a command can do is its own to say (evaluate's --files)
    assert isinstance(e.value, UnnamedClassesError) and "--files" not in str(e.value)
    # a map of some of the classes, with files of those only (zero-shot of a few classes of a set): the
    # other folders need no name (they were refused, whatever the files)
    few = folder_records(class_folder, {"aPark": "green space", "cRoad": "street"},
                         files=["aPark/aPark_1.jpg", "cRoad/cRoad_3.jpg"])
    assert [(Path(r.image).name, r.class_name) for r in few] == [("aPark_1.jpg", "aPark"), ("cRoad_3.jpg", "cRoad")]
    with pytest.raises(DataError, match="1 class folder.*bPort"):
        folder_records(class_folder, {"aPark": "park"}, files=["aPark/aPark_1.jpg", "bPort/bPort_0.jpg"])


def test_folder_records_name_a_mistyped_or_file_path_as_such(class_folder, tmp_path):
    with pytest.raises(DataError, match=r"data folder .*scenez does not exist"):
        folder_records(tmp_path / "scenez", CLASSNAMES)
    not_a_folder = make_image(tmp_path / "one.jpg")
    with pytest.raises(DataError, match=r"one\.jpg is a file; give the folder that holds the class sub-folders"):
        folder_records(not_a_folder, CLASSNAMES)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class sub-folders with images"):
        folder_records(empty, CLASSNAMES)


def test_folder_records_ucm_layout(tmp_path):
    root = tmp_path / "ucm"
    make_image(root / "images" / "beach" / "beach00.jpg")
    make_image(root / "images" / "river" / "river00.png")
    (root / "captions.jsonl").write_text("")
    records = folder_records(root, {"beach": "beach", "river": "river"}, templates=["{}."])
    assert [(r.class_name, r.captions) for r in records] == [("beach", ("beach.",)), ("river", ("river.",))]
    only = folder_records(root, {"beach": "beach", "river": "river"}, files=["images/river/river00.png"])
    assert [r.class_name for r in only] == ["river"]


# --- caption benchmarks ---------------------------------------------------------------------------


def write_precomp(folder: Path, ds: str, split: str, names: list[str], caps: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{ds}_{split}_filename.txt").write_text("\n".join(names) + "\n")
    (folder / f"{ds}_{split}_caps.txt").write_text("\n".join(caps) + "\n")


def test_precomp_records_train_and_test_layouts(tmp_path):
    caps_dir, img_dir = tmp_path / "captions", tmp_path / "images"
    names = ["parking_1.jpg", "forest_2.jpg"]
    for n in names:
        make_image(img_dir / n)
    write_precomp(caps_dir, "rsicd", "train", names, [f"{n} caption {k} ." for n in names for k in range(5)])
    write_precomp(caps_dir, "rsicd", "test", [n for n in names for _ in range(5)],
                  [f"test {n} {k}" for n in names for k in range(5)])
    train = precomp_records(caps_dir, "rsicd", "train", img_dir)
    assert [(Path(r.image).name, r.class_name, len(r.captions)) for r in train] == [
        ("parking_1.jpg", "parking", 5), ("forest_2.jpg", "forest", 5)]
    assert train[0].captions[0] == "parking_1.jpg caption 0 ."
    test = precomp_records(caps_dir, "rsicd", "test", img_dir)
    assert [len(r.captions) for r in test] == [5, 5] and test[1].captions[4] == "test forest_2.jpg 4"

    write_precomp(caps_dir, "rsicd", "val", [f"river_{i}.jpg" for i in range(8)], [f"c{i}" for i in range(8)])
    with pytest.raises(DataError) as e:
        precomp_records(caps_dir, "rsicd", "val", img_dir)
    assert "8 of 8 images are not files (missing, or folders)" in str(e.value) and "river_0.jpg" in str(e.value)
    assert "... and 3 more" in str(e.value)


def test_recipe_trains_from_precomp_and_karpathy_caption_files(tmp_path):
    from training import recipe as recipes

    names = [f"{c}_{i}.jpg" for c in ("parking", "forest") for i in range(3)]
    for i, n in enumerate(names):
        make_image(tmp_path / "bench" / "images" / n, seed=i)
    write_precomp(tmp_path / "bench" / "captions", "rsicd", "train", names,
                  [f"{n} caption {k} ." for n in names for k in range(5)])
    doc = {"images": [{"filename": n, "split": "train" if i % 3 else "test", "sentences": [{"raw": f"about {n} ."}]}
                      for i, n in enumerate(names)]}
    (tmp_path / "bench" / "dataset_rsicd.json").write_text(json.dumps(doc))
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"sources": [
        {"name": "pre", "kind": "precomp", "captions": "bench/captions", "dataset": "rsicd", "images": "bench/images",
         "classnames": {"parking": "parking lot", "forest": "forest"}, "val_per_class": 1},
        {"name": "karp", "kind": "karpathy", "path": "bench/dataset_rsicd.json", "images": "bench/images"}]}))
    sources = recipes.sources_from_args(str(recipe), [], [], [], [], 0)
    train, val = recipes.build_sources(sources, seed=0)
    assert len(train[0]["records"]) == 4 and all(len(r.captions) == 5 for r in train[0]["records"])
    assert len(val["pre"]["records"]) == 2 and len(val["pre/retrieval"]["records"]) == 2   # zero-shot + retrieval
    assert sorted(Path(r.image).name for r in train[1]["records"]) == sorted(n for i, n in enumerate(names) if i % 3)
    assert {r.captions for r in train[1]["records"]} == {(f"about {n} .",) for i, n in enumerate(names) if i % 3}
    # a source that lacks what its kind needs is named, with the missing keys
    recipe.write_text(json.dumps({"sources": [{"kind": "precomp", "captions": "bench/captions"}]}))
    with pytest.raises(recipes.RecipeError, match="a precomp source needs 'dataset', 'images'"):
        recipes.sources_from_args(str(recipe), [], [], [], [], 0)
    for spec, message in (([{"kind": "manifest", "path": "m.jsonl"}], 'must be a JSON object with a "sources" list'),
                          ({"sources": ["m.jsonl"]}, "source 1 must be an object"),
                          ({"sources": [{"kind": "manifest", "path": "m.jsonl", "weight": -1}]}, "weight -1"),
                          ({"sources": [{"kind": "manifest", "path": "m.jsonl", "weight": "2"}]}, "weight '2'"),
                          ({"sources": [{"kind": "manifest", "path": "m.jsonl", "val_per_class": 1.5}]},
                           "val_per_class 1.5"),
                          # its held-out list would be read back as that of a source named "ucm"
                          ({"sources": [{"kind": "manifest", "path": "m.jsonl", "name": "ucm.val"}]},
                           "named 'ucm.val'; a name may not end in '.val'")):
        recipe.write_text(json.dumps(spec))
        with pytest.raises(recipes.RecipeError, match=message):
            recipes.sources_from_args(str(recipe), [], [], [], [], 0)
    recipe.write_text(json.dumps({"sources": [{"kind": "shards", "urls": "web/part-{0..1}.tar"}]}))
    assert recipes.sources_from_args(str(recipe), [], [], [], [], 0)[0]["urls"] == [str(tmp_path / "web/part-{0..1}.tar")]


def test_a_caption_source_missing_its_file_or_image_folder_is_named_in_one_line(tmp_path):
    import subprocess
    import sys

    from conftest import REPO
    from training import recipe as recipes

    make_image(tmp_path / "bench" / "images" / "parking_1.jpg")
    write_precomp(tmp_path / "bench" / "captions", "rsicd", "train", ["parking_1.jpg"], ["cars ."] * 5)
    (tmp_path / "bench" / "dataset_rsicd.json").write_text(json.dumps(
        {"images": [{"filename": "parking_1.jpg", "split": "train", "sentences": [{"raw": "cars ."}]}]}))
    sources = {"precomp": {"kind": "precomp", "captions": "bench/captions", "dataset": "rsicd", "images": "bench/images"},
               "karpathy": {"kind": "karpathy", "path": "bench/dataset_rsicd.json", "images": "bench/images"}}
    recipe = tmp_path / "recipe.json"
    for kind, key, wrong, what in (("precomp", "captions", "bench/caps", "caption folder"),
                                   ("precomp", "images", "bench/imgs", "image folder"),
                                   ("karpathy", "path", "bench/dataset_rsitmd.json", "Karpathy caption file"),
                                   ("karpathy", "images", "bench/imgs", "image folder")):
        other = "karpathy" if kind == "precomp" else "precomp"      # a good source first: the bad one is source 2
        recipe.write_text(json.dumps({"sources": [{**sources[other], "name": "good"},
                                                  {**sources[kind], key: wrong, "name": "bench"}]}))
        r = subprocess.run([sys.executable, "-m", "training.train", "--recipe", str(recipe), "--device", "cpu",
                            "--out", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines() == [
            f"error: {kind} source 2 'bench': {what} {tmp_path / wrong} does not exist: give the "
            + ("path of its dataset_*.json" if key == "path" else "folder that holds "
               + ("rsicd_train_caps.txt and rsicd_train_filename.txt" if key == "captions" else
                  f"the images {'rsicd_train_filename.txt' if kind == 'precomp' else 'dataset_rsicd.json'} lists"))]
    # a dataset or split the caption folder has no files for: the ones it has are named
    recipe.write_text(json.dumps({"sources": [{**sources["precomp"], "split": "val"}]}))
    with pytest.raises(recipes.RecipeError, match=r"^precomp source 1: caption file .*rsicd_val_caps\.txt does not "
                                                  r"exist: the folder has the captions of rsicd/train \(dataset/split\)"):
        recipes.build_sources(recipes.sources_from_args(str(recipe), [], [], [], [], 0), seed=0)


def test_val_per_class_is_for_flag_sources_and_refused_with_a_recipe(tmp_path, class_folder):
    from training import recipe as recipes

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"sources": [{"kind": "folder", "root": str(class_folder),
                                               "classnames": {"aPark": "park", "bPort": "port", "cRoad": "road"}}]}))
    # the recipe's sources set their own hold-out: a flag for all of them is refused, not dropped
    with pytest.raises(recipes.RecipeError, match='--val-per-class 2 is for --folder/--manifest sources.*"val_per_class"'):
        recipes.sources_from_args(str(recipe), [], [], [], [], 2)
    assert recipes.sources_from_args(str(recipe), [], [], [], [], 0)[0].get("val_per_class", 0) == 0
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"aPark": "park", "bPort": "port", "cRoad": "road"}))
    (source,) = recipes.sources_from_args(None, [str(class_folder)], [str(names)], [], [], 2)
    _, val = recipes.build_sources([source], seed=0)
    assert len(val["scenes"]["records"]) == 3 * 2                     # 2 of each class held out


def test_caption_file_class():
    assert caption_file_class("rsicd", "denseresidential_7.jpg") == "denseresidential"
    assert caption_file_class("rsitmd", "baseballfield_452.tif") == "baseballfield"
    assert caption_file_class("rsicd", "00001.jpg") is None
    assert caption_file_class("sydney", "3.tif") is None
    assert caption_file_class("ucm", "1.tif") == "agricultural"
    assert caption_file_class("ucm", "1600.tif") == "parkinglot"
    assert caption_file_class("ucm", "2100.tif") == "tenniscourt"


def test_karpathy_records(tmp_path):
    img_dir = tmp_path / "imgs"
    for n in ("port_1.jpg", "port_2.jpg", "beach_3.jpg"):
        make_image(img_dir / n)
    doc = {"dataset": "rsicd", "images": [
        {"filename": "port_1.jpg", "split": "train", "sentences": [{"raw": "boats . "}, {"tokens": ["a", "pier"]}]},
        {"filename": "port_2.jpg", "split": "test", "sentences": [{"raw": "ships ."}]},
        {"filename": "beach_3.jpg", "split": "train", "sentences": [{"raw": "sand ."}]},
    ]}
    path = tmp_path / "dataset_rsicd.json"
    path.write_text(json.dumps(doc))
    train = karpathy_records(path, img_dir, split="train")
    assert [(Path(r.image).name, r.captions, r.class_name) for r in train] == [
        ("port_1.jpg", ("boats .", "a pier"), "port"), ("beach_3.jpg", ("sand .",), "beach")]
    assert len(karpathy_records(path, img_dir)) == 3
    with pytest.raises(DataError, match="splits present"):
        karpathy_records(path, img_dir, split="val")


def test_class_caption_pool(tmp_path):
    caps = tmp_path / "captions"
    write_precomp(caps, "rsicd", "train", ["parking_1.jpg", "meadow_2.jpg", "00003.jpg"],
                  ["cars ."] * 5 + ["grass ."] * 4 + ["Grass  ."] + ["unknown ."] * 5)
    write_precomp(caps, "rsicd", "test", ["parking_9.jpg"], ["held out ."])
    # UCM numbering: 1501..1600 is the 16th class, parkinglot
    write_precomp(caps, "ucm", "train", ["1501.tif", "1.tif"], ["lots of cars ."] * 5 + ["crops ."] * 5)
    write_precomp(caps, "sydney", "train", ["1.tif"], ["a city ."] * 5)
    pool = class_caption_pool(caps, {"parking": "P", "parkinglot": "P", "Meadow": "G"})
    assert pool == {"G": ["grass ."], "P": ["cars .", "lots of cars ."]}
    with_test = class_caption_pool(caps, {"parking": "P"}, splits=("train", "test"))
    assert with_test["P"] == ["cars .", "held out ."]


# --- manifests ------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_manifest_captions_caption_and_class(tmp_path):
    make_image(tmp_path / "images" / "a.jpg")
    make_image(tmp_path / "images" / "b.jpg")
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"image": "images/a.jpg", "class": "beach", "captions": ["one .", "two ."]},
        "",
        {"image": "images/b.jpg", "caption": "three ."},
    ])
    records = manifest_records(path)
    assert records == [
        Record(str(tmp_path / "images" / "a.jpg"), ("one .", "two ."), "beach"),
        Record(str(tmp_path / "images" / "b.jpg"), ("three .",), None),
    ]


def test_csv_manifest_merges_rows_of_one_image(tmp_path):
    make_image(tmp_path / "x.png")
    make_image(tmp_path / "y.png")
    path = tmp_path / "m.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "class"])
        w.writerows([["x.png", "a port, with ships", "port"], ["y.png", "a road", ""], ["x.png", "a harbour", "port"]])
    records = manifest_records(path)
    assert [(Path(r.image).name, r.captions, r.class_name) for r in records] == [
        ("x.png", ("a port, with ships", "a harbour"), "port"), ("y.png", ("a road",), None)]


def test_manifest_errors_name_file_and_line(tmp_path):
    make_image(tmp_path / "a.jpg")
    bad_json = write_jsonl(tmp_path / "bad.jsonl", [{"image": "a.jpg", "caption": "ok"}, '{"image": "a.jpg", '])
    with pytest.raises(ManifestError, match=r"bad\.jsonl:2: not valid JSON"):
        manifest_records(bad_json)

    empty = write_jsonl(tmp_path / "empty.jsonl", [{"image": "a.jpg", "captions": ["", "  "]},
                                                   {"image": "a.jpg", "caption": "ok"},
                                                   {"image": "a.jpg"}])
    with pytest.raises(ManifestError) as e:
        manifest_records(empty)
    assert "empty.jsonl:1: empty captions" in str(e.value) and "empty.jsonl:3: empty captions" in str(e.value)

    missing = write_jsonl(tmp_path / "missing.jsonl",
                          [{"image": "a.jpg", "caption": "ok"}] + [{"image": f"gone{i}.jpg", "caption": "x"} for i in range(9)])
    with pytest.raises(ManifestError) as e:
        manifest_records(missing)
    msg = str(e.value)
    assert "9 of 10 images are not files (missing, or folders)" in msg and "missing.jsonl:2:" in msg and "gone0.jpg" in msg
    assert "gone5.jpg" not in msg and "... and 4 more" in msg
    # one problem is worded as one, and an image that is a folder is not called missing
    (tmp_path / "a_folder.jpg").mkdir()
    one = write_jsonl(tmp_path / "one.jsonl", [{"image": "a.jpg", "caption": "ok"},
                                               {"image": "a_folder.jpg", "caption": "x"}])
    with pytest.raises(ManifestError, match=r"1 of 2 images is not a file \(missing, or a folder\)"):
        manifest_records(one)
    with pytest.raises(ManifestError, match=r"1 bad line:"):
        manifest_records(write_jsonl(tmp_path / "one_bad.jsonl", [{"image": "a.jpg", "caption": "ok"},
                                                                  {"image": "a.jpg"}]))

    # an object cut short is located on its own line, where it ends (not "column 1" of the next line)
    with pytest.raises(ManifestError, match=r"bad\.jsonl:2: not valid JSON \(Expecting .*, column 20\)"):
        manifest_records(bad_json)
    with pytest.raises(ManifestError, match=r"manifest .*nope\.jsonl does not exist"):
        manifest_records(tmp_path / "nope.jsonl")

    (tmp_path / "nohead.csv").write_text("path,text\na.jpg,x\n")
    with pytest.raises(ManifestError, match=r"nohead\.csv:1: the header"):
        manifest_records(tmp_path / "nohead.csv")


# --- splits ----------------------------------------------------------------------------------------


def test_split_records_deterministic_disjoint_per_class():
    records = [Record(f"/img/{c}/{i}.jpg", ("x",), c) for c in "abc" for i in range(10)]
    train, val = split_records(records, per_class=3, seed=7)
    assert Counter(r.class_name for r in val) == {"a": 3, "b": 3, "c": 3}
    assert len(train) == 21 and not {r.image for r in train} & {r.image for r in val}
    assert split_records(records, 3, 7) == (train, val)
    shuffled = records[::-1]
    assert {r.image for r in split_records(shuffled, 3, 7)[1]} == {r.image for r in val}
    # one class's choice does not depend on the others being there
    only_a = [r for r in records if r.class_name == "a"]
    assert split_records(only_a, 3, 7)[1] == [r for r in val if r.class_name == "a"]
    assert {r.image for r in split_records(records, 3, 8)[1]} != {r.image for r in val}
    with pytest.raises(DataError, match="a \\(10\\)"):
        split_records(records, per_class=10, seed=0)
    # the classes too small are named, and the most that every class allows is said
    uneven = records + [Record(f"/img/d/{i}.jpg", ("x",), "d") for i in range(15)]
    with pytest.raises(DataError, match=r"cannot hold out 12 images per class and keep some for training: "
                                        r"a \(10\), b \(10\), c \(10\); hold out at most 9 per class$"):
        split_records(uneven, per_class=12, seed=0)
    with pytest.raises(DataError, match=r"z \(1\); a class of one image can hold none out$"):
        split_records(records + [Record("/img/z/0.jpg", ("x",), "z")], per_class=2, seed=0)


# --- datasets ---------------------------------------------------------------------------------------


def test_caption_choice_is_deterministic_per_epoch(class_folder):
    records = folder_records(class_folder, CLASSNAMES)
    ds = CaptionDataset(records, train_transform(SIZE, MEAN, STD), seed=3)
    epoch0 = [ds[i][1] for i in range(len(ds))]
    again = CaptionDataset(records, train_transform(SIZE, MEAN, STD), seed=3)
    assert [again[i][1] for i in reversed(range(len(ds)))][::-1] == epoch0  # order of access is irrelevant
    assert torch.equal(ds[5][0], again[5][0])  # and so is the augmentation
    ds.set_epoch(1)
    epoch1 = [ds[i][1] for i in range(len(ds))]
    assert epoch1 != epoch0 and all(c in r.captions for c, r in zip(epoch1, records))
    assert epoch1 == [ds.caption(i, epoch=1) for i in range(len(ds))]
    assert [CaptionDataset(records, eval_transform(SIZE, MEAN, STD), seed=4)[i][1] for i in range(len(ds))] != epoch0


def test_unreadable_image_is_replaced_counted_and_warned_once(tmp_path):
    good = make_image(tmp_path / "good.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    ds = CaptionDataset([Record(str(good), ("g",)), Record(str(bad), ("b",)), Record(str(truncated), ("t",))],
                        eval_transform(SIZE, MEAN, STD))
    with pytest.warns(SkippedImageWarning) as caught:
        items = [ds[0], ds[1], ds[1], ds[2]]
    # an unreadable image is replaced by the next readable record (wrapping round), so batches stay
    # full: bad -> cut -> good, cut -> good
    assert all(torch.equal(item[0], items[0][0]) and item[1] == "g" for item in items)
    assert ds.skipped == 2 + 2 + 1 and [item.replaced for item in items] == [0, 2, 2, 1]
    # the count survives a DataLoader worker's pickling and reaches the batch
    again = pickle.loads(pickle.dumps(items[1]))
    assert again.replaced == 2 and torch.equal(again[0], items[1][0])
    assert collate_captions([items[0], again, None], lambda c, n: torch.zeros(len(c), n), 4)["skipped"] == 3
    with pytest.warns(SkippedImageWarning):
        nothing = CaptionDataset([Record(str(bad), ("b",))], eval_transform(SIZE, MEAN, STD))[0]
    # no record can be read: no image to train on, but the item names the one it could not read, and the
    # batch carries it to training's log
    assert not has_image(nothing) and [path for path, _ in nothing.unreadable] == [str(bad)]
    assert collate_captions([nothing, None], lambda c, n: torch.zeros(len(c), n), 4) is None
    batch = Collate(lambda c, n: torch.zeros(len(c), n, dtype=torch.long), 4)([pickle.loads(pickle.dumps(nothing))])
    assert len(batch["images"]) == 0 and batch["skipped"] == 1 and batch["unreadable"][0][0] == str(bad)
    assert sorted(str(w.message).split(":")[0] for w in caught) == [
        f"skipping unreadable image {bad}", f"skipping unreadable image {truncated}"]


def test_a_skipped_image_is_shown_as_one_warning_line(tmp_path, capsys, monkeypatch):
    import warnings

    from training.data import show_skipped_images_plainly

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)   # restored after the test
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    show_skipped_images_plainly()
    show_skipped_images_plainly()      # once is enough: a second call wraps nothing again
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert not has_image(CaptionDataset([Record(str(bad), ("b",))], eval_transform(SIZE, MEAN, STD))[0])
    lines = capsys.readouterr().err.splitlines()
    # no "file:line: SkippedImageWarning" and no source line under it, which read like a traceback
    assert lines[0].startswith(f"warning: skipping unreadable image {bad}: ") and "data.py" not in lines[0]
    assert len(lines) == 1


class StubDataset(torch.utils.data.Dataset):
    def __init__(self, name: str, n: int):
        self.name, self.n, self.epoch = name, n, None

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        self.epoch = epoch

    def load(self, index, epoch, draw=0):
        return self.name, index, draw


def test_mixed_dataset_ratios_and_determinism():
    small, large = StubDataset("small", 10), StubDataset("large", 1000)
    mixed = MixedDataset([small, large], weights=[3, 1], length=400, seed=1)
    items = [mixed[i] for i in range(len(mixed))]
    counts = Counter(name for name, _, _ in items)
    assert counts == {"small": 300, "large": 100}
    # the small set is oversampled 30x: every image 30 times, each time with another draw
    per_image = Counter((i, d) for name, i, d in items if name == "small")
    assert len(per_image) == 300 and Counter(i for i, _ in per_image) == {i: 30 for i in range(10)}
    assert len({i for name, i, _ in items if name == "large"}) == 100  # undersampled: all distinct
    assert [mixed[i] for i in range(len(mixed))] == items
    mixed.set_epoch(2)
    assert small.epoch == 2 and large.epoch == 2
    assert [mixed[i] for i in range(len(mixed))] != items
    assert len(MixedDataset([small, large], [1, 1])) == 1010


def test_mixed_dataset_of_caption_datasets(class_folder):
    records = folder_records(class_folder, CLASSNAMES)
    a = CaptionDataset(records[:4], eval_transform(SIZE, MEAN, STD))
    b = CaptionDataset(records[4:], eval_transform(SIZE, MEAN, STD))
    mixed = MixedDataset([a, b], [0.5, 0.5], length=8)
    batch = [mixed[i] for i in range(8)]
    assert all(image.shape == (3, SIZE, SIZE) and isinstance(caption, str) for image, caption in batch)
    assert sum(caption in records[0].captions for _, caption in batch) == 4


# --- WebDataset shards ---------------------------------------------------------------------------------


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, payload in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.fixture
def shards(tmp_path):
    """Six shards of four samples; sample captions are unique ids."""
    for s in range(6):
        samples = []
        for k in range(4):
            key = f"s{s}k{k}"
            parts = {"jpg": image_bytes(10 * s + k), "txt": f"{key}\n{key}\n".encode()}
            if (s, k) == (1, 1):
                parts = {"png": image_bytes(11, "PNG"), "json": json.dumps({"captions": [key]}).encode()}
            samples.append((f"data/{key}", parts))
        write_shard(tmp_path / f"shard-{s:03d}.tar", samples)
    return str(tmp_path / "shard-{000..005}.tar")


def test_expand_urls():
    assert expand_urls("a-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar"]
    assert expand_urls(["x{a,b}{1..2}.tar", "y.tar"]) == ["xa1.tar", "xa2.tar", "xb1.tar", "xb2.tar", "y.tar"]


def test_shard_wildcards_expand_and_missing_shards_are_named(shards, tmp_path):
    folder = Path(shards).parent
    assert expand_urls(str(folder / "shard-*.tar")) == [str(folder / f"shard-{s:03d}.tar") for s in range(6)]
    with pytest.raises(DataError, match=r"no shard matches .*nothing-\*\.tar"):
        expand_urls(str(folder / "nothing-*.tar"))
    with pytest.raises(DataError, match=r"2 of 8 shards are not files: .*shard-006\.tar.*shard-007\.tar"):
        WebDatasetShards([str(folder / "shard-*.tar"), str(folder / "shard-{006..007}.tar")],
                         eval_transform(SIZE, MEAN, STD))
    ds = WebDatasetShards(str(folder / "shard-*.tar"), eval_transform(SIZE, MEAN, STD), shuffle_buffer=2)
    assert len([item for item in ds if item is not None]) == 24


def test_webdataset_covers_every_sample_once_across_ranks_and_workers(shards, monkeypatch):
    all_keys = {f"s{s}k{k}" for s in range(6) for k in range(4)}

    def read(rank, worker, epoch):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setattr(data_mod, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=2))
        ds = WebDatasetShards(shards, eval_transform(SIZE, MEAN, STD), seed=5, shuffle_buffer=3)
        ds.set_epoch(epoch)
        items = list(ds)
        assert all(image.shape == (3, SIZE, SIZE) for image, _ in items)
        return [caption for _, caption in items]

    for epoch in (0, 1):
        parts = [read(r, w, epoch) for r in (0, 1) for w in (0, 1)]
        seen = [c for part in parts for c in part]
        assert sorted(seen) == sorted(all_keys) and all(parts)
        if epoch == 0:
            first = parts
    assert [set(p) for p in parts] != [set(p) for p in first]  # set_epoch reshuffled the shard order
    assert read(0, 1, 0) == first[1]  # deterministic


def test_webdataset_in_dataloader_workers_and_bad_members(tmp_path, shards):
    write_shard(tmp_path / "shard-bad.tar", [
        ("ok", {"jpg": image_bytes(1), "txt": b"fine"}),
        ("corrupt", {"jpg": b"not an image", "txt": b"never"}),
        ("nocaption", {"jpg": image_bytes(2)}),
        ("numbers", {"jpg": image_bytes(3), "json": json.dumps({"captions": [1, 2]}).encode()}),
    ])
    good = tmp_path / "shard-000.tar"
    (tmp_path / "shard-cut.tar").write_bytes(good.read_bytes()[:2000])
    ds = WebDatasetShards([str(tmp_path / "shard-bad.tar"), str(tmp_path / "shard-cut.tar")],
                          eval_transform(SIZE, MEAN, STD), shuffle_buffer=10)
    with pytest.warns(SkippedImageWarning):
        items = list(ds)
    captions = [item[1] for item in items if item is not None]
    assert "fine" in captions and "never" not in captions
    assert ds.skipped == items.count(None) == 4  # corrupt image, no caption, captions of numbers, truncated shard

    loader = torch.utils.data.DataLoader(WebDatasetShards(shards, eval_transform(SIZE, MEAN, STD), shuffle_buffer=4),
                                         batch_size=5, num_workers=2,
                                         collate_fn=lambda b: [caption for _, caption in b])
    seen = [c for batch in loader for c in batch]
    assert sorted(seen) == sorted(f"s{s}k{k}" for s in range(6) for k in range(4))


# --- transforms and batching ------------------------------------------------------------------------


def test_train_transform_shape_dtype_and_determinism():
    rng_img = np.random.default_rng(0).integers(0, 256, (255, 256, 3), dtype=np.uint8)  # UCM's odd size
    image = Image.fromarray(rng_img)
    t = train_transform(32, MEAN, STD)
    a, b = t(image, random.Random(1)), t(image, random.Random(1))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, t(image, random.Random(2)))
    assert t(image.convert("L")).shape == (3, 32, 32)  # any mode, default generator


def test_train_transform_keeps_colour_mild_and_uses_all_orientations():
    grey = Image.new("RGB", (40, 40), (128, 128, 128))
    out = train_transform(8, MEAN, STD, jitter=0.2)(grey, random.Random(0))
    pixels = out * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    assert 0.3 < pixels.min() and pixels.max() < 0.7

    # a one-pixel marker in the top-left corner lands in every corner over a few seeds
    marked = np.zeros((8, 8, 3), dtype=np.uint8)
    marked[0, 0] = 255
    t = train_transform(8, (0, 0, 0), (1, 1, 1), scale=(1.0, 1.0), jitter=0.0)
    corners = set()
    for seed in range(40):
        x = t(Image.fromarray(marked), random.Random(seed))[0]
        corners.add(tuple(int(v) for v in np.unravel_index(int(x.argmax()), (8, 8))))
    assert corners == {(0, 0), (0, 7), (7, 0), (7, 7)}


def test_colour_jitter_is_brightness_then_contrast_then_saturation():
    """The one-matrix jitter equals the three steps done one after another, with the same draws."""
    from training.augment import colour_jitter

    x = np.random.default_rng(3).random((3, 64), dtype=np.float32) * 0.8 + 0.1   # [3, N] in [0.1, 0.9]
    draws = random.Random(7)
    b, c, s = (draws.uniform(0.8, 1.2) for _ in range(3))
    luma = np.array([0.299, 0.587, 0.114])
    y = x.astype(np.float64) * b                                  # brightness
    pivot = float((luma @ y).mean())
    y = (y - pivot) * c + pivot                                   # contrast about the mean grey level
    grey = luma @ y
    y = s * y + (1 - s) * grey[None, :]                           # saturation: towards each pixel's grey
    expected = np.clip(y, 0, 1)
    got = colour_jitter(x.copy(), 0.2, random.Random(7))
    assert got.shape == (3, 64) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_eval_transform_centre_crop_and_normalise():
    image = Image.new("RGB", (30, 20), (255, 0, 0))
    out = eval_transform(10, MEAN, STD)(image)
    assert out.shape == (3, 10, 10) and out.dtype == torch.float32
    assert torch.allclose(out[0], torch.full((10, 10), (1 - 0.5) / 0.25))
    assert torch.allclose(out[1], torch.full((10, 10), -2.0))


def test_collate_drops_none(tokenizer):
    image = torch.zeros(3, SIZE, SIZE)
    batch = collate_captions([(image, "a parking lot"), None, (image + 1, "a river")], tokenizer, 12)
    assert batch["images"].shape == (2, 3, SIZE, SIZE) and batch["skipped"] == 1
    assert batch["tokens"].shape == (2, 12) and batch["tokens"].dtype == torch.long
    assert torch.equal(batch["tokens"], tokenizer(["a parking lot", "a river"], 12))
    assert collate_captions([None, None], tokenizer, 12) is None


def test_template_mix_swaps_captions_for_class_templates(class_folder):
    from training.recipe import RecipeError, class_templates, make_dataset

    records = [Record(r.image, (f"a human caption of {r.class_name}",), r.class_name)
               for r in folder_records(class_folder, CLASSNAMES)]
    source = {"name": "s", "class_map": CLASSNAMES, "records": records}
    templates = class_templates(source)
    assert set(templates) == set(CLASSNAMES) and templates["bPort"][0] == TEMPLATES[0].format(CLASSNAMES["bPort"])
    plain = CaptionDataset(records, train_transform(SIZE, MEAN, STD), seed=3)
    off = CaptionDataset(records, train_transform(SIZE, MEAN, STD), seed=3, class_templates=templates, template_mix=0.0)
    always = CaptionDataset(records, train_transform(SIZE, MEAN, STD), seed=3, class_templates=templates,
                            template_mix=1.0)
    # P = 0 is exactly the run without mixing: same captions and the same crops
    assert [off[i][1] for i in range(len(off))] == [plain[i][1] for i in range(len(plain))]
    assert torch.equal(off[2][0], plain[2][0])
    # P = 1 captions every image with a template of its own class
    assert all(always[i][1] in templates[r.class_name] for i, r in enumerate(records))
    half = CaptionDataset(records, train_transform(SIZE, MEAN, STD), seed=3, class_templates=templates,
                          template_mix=0.5)
    mixed = [half.caption(i, epoch=e) for e in range(20) for i in range(len(records))]
    share = sum(c.startswith("a human caption") for c in mixed) / len(mixed)
    assert 0.35 < share < 0.65
    with pytest.raises(ValueError, match="template_mix"):
        CaptionDataset(records, train_transform(SIZE, MEAN, STD), template_mix=1.5)
    cfg = SimpleNamespace(image_mean=MEAN, image_std=STD)
    ds = make_dataset([{**source, "kind": "folder"}], SIZE, cfg, seed=0, template_mix=1.0)
    assert ds[0][1] in templates[records[0].class_name]
    # sources without classes cannot mix templates in: say so rather than train without it
    unclassed = {"name": "m", "kind": "manifest", "records": [Record(records[0].image, ("x",))]}
    with pytest.raises(RecipeError, match="--template-mix needs"):
        make_dataset([unclassed], SIZE, cfg, seed=0, template_mix=0.3)


def test_augment_none_trains_on_the_evaluation_view(class_folder):
    from training.recipe import make_dataset

    records = folder_records(class_folder, CLASSNAMES)
    cfg = SimpleNamespace(image_mean=MEAN, image_std=STD)
    source = {"name": "s", "kind": "folder", "class_map": CLASSNAMES, "records": records}
    plain = make_dataset([source], SIZE, cfg, seed=0, augment="none")
    augmented = make_dataset([source], SIZE, cfg, seed=0)
    reference = eval_transform(SIZE, MEAN, STD)(Image.open(records[1].image))
    assert torch.equal(plain[1][0], reference)
    assert any(not torch.equal(augmented[i][0], plain[i][0]) for i in range(len(records)))
    with pytest.raises(ValueError, match="unknown augmentation"):
        make_dataset([source], SIZE, cfg, seed=0, augment="strong")


def test_class_labels_follow_class_maps_across_sources(tmp_path, tokenizer):
    from training.recipe import class_labels

    for key in ("Forest", "Port"):
        (tmp_path / "a" / key).mkdir(parents=True)
        Image.new("RGB", (16, 16), (0, 90, 0)).save(tmp_path / "a" / key / "x.jpg")
    for key in ("forest", "river"):
        (tmp_path / "b" / key).mkdir(parents=True)
        Image.new("RGB", (16, 16), (0, 0, 90)).save(tmp_path / "b" / key / "y.jpg")
    a = {"name": "a", "class_map": {"Forest": "forest", "Port": "port"},
         "records": folder_records(tmp_path / "a", {"Forest": "forest", "Port": "port"})}
    b = {"name": "b", "class_map": {"forest": "Forest ", "river": "river"},
         "records": folder_records(tmp_path / "b", {"forest": "Forest ", "river": "river"})}
    la, lb = class_labels(a), class_labels(b)
    assert la["Forest"] == lb["forest"]                   # one concept, one class across sets
    assert len({la["Forest"], la["Port"], lb["river"]}) == 3
    assert class_labels({**a, "class_map": None})["Forest"] != lb["forest"]  # no map: per-source keys

    ds = CaptionDataset(a["records"], eval_transform(SIZE, MEAN, STD), labels=la)
    items = [ds[i] for i in range(len(ds))]
    assert {item[2] for item in items} == {la["Forest"], la["Port"]}
    unlabelled = CaptionDataset([Record(a["records"][0].image, ("x",))], eval_transform(SIZE, MEAN, STD), labels=la)
    batch = collate_captions(items + [None, unlabelled[0]], tokenizer, 12)
    assert batch["labels"].tolist() == [item[2] for item in items] + [-1] and batch["skipped"] == 1
    assert "labels" not in collate_captions([items[0][:2]], tokenizer, 12)
    # shards carry no classes: asking for class-aware training from them is a clear error
    from training.recipe import RecipeError, make_dataset

    with pytest.raises(RecipeError, match="shards carry none"):
        make_dataset([{"kind": "shards", "name": "s", "urls": [str(tmp_path / "x.tar")]}], SIZE,
                     SimpleNamespace(image_mean=MEAN, image_std=STD), seed=0, class_aware=True)


# --- the shared data sets -----------------------------------------------------------------------------

needs_shared = pytest.mark.skipif(not all((SHARED_DATA / d).is_dir() for d in ("rsscn7", "ucm", "aid", "captions")),
                                  reason="../shared/data (rsscn7, ucm, aid, captions) not present")


@needs_shared
def test_shared_rsscn7_folder_with_class_caption_pools():
    pool = class_caption_pool(SHARED_DATA / "captions", CAPTION_CLASS_WORDS["rsscn7"])
    sizes = {k: len(v) for k, v in pool.items()}
    assert set(sizes) == set(load_classnames("rsscn7")) and min(sizes.values()) > 100, sizes
    records = folder_records(SHARED_DATA / "rsscn7", load_classnames("rsscn7"), caption_pool=pool)
    assert len(records) == 2450
    assert Counter(r.class_name for r in records) == {k: 350 for k in load_classnames("rsscn7")}
    assert "an aerial photo of parking lot." in records[-1].captions


@needs_shared
def test_shared_ucm_and_aid():
    records = manifest_records(SHARED_DATA / "ucm" / "captions.jsonl")
    assert len(records) == 1680 and all(len(r.captions) == 5 for r in records)
    assert len({r.class_name for r in records}) == 21
    assert len(folder_records(SHARED_DATA / "ucm", load_classnames("ucm"))) == 1890
    assert len(folder_records(SHARED_DATA / "aid", load_classnames("aid"))) == 8000
    pairs = data_mod.read_precomp(SHARED_DATA / "captions", "rsicd", "train")
    assert len(pairs) == 9828 and all(len(c) == 5 for _, c in pairs)


def test_validation_lists_reproduce_the_split_for_the_evaluation_cli(class_folder, tmp_path):
    from training import recipe as recipes
    from training.evaluate import scan_folder

    rows = [{"image": str(make_image(tmp_path / "m" / f"{i}.jpg", seed=i)), "class": "a" if i % 2 else "b",
             "captions": [f"caption {i}"]} for i in range(6)]
    manifest = write_jsonl(tmp_path / "m" / "captions.jsonl", rows)
    names = {p.name: p.name.lower() for p in class_folder.iterdir() if p.is_dir()}
    sources = [{"name": "scenes", "kind": "folder", "root": str(class_folder), "classnames": names, "val_per_class": 1},
               {"name": "caps", "kind": "manifest", "path": str(manifest), "classnames": {"a": "a", "b": "b"},
                "val_per_class": 1}]
    _, val = recipes.build_sources(sources, seed=3)
    written = recipes.write_validation_lists(sources, val, tmp_path / "val")
    assert sorted(p.name for p in written) == ["caps.jsonl", "scenes.txt"]
    # the folder split, read back the way `evaluate zero-shot --files` reads it
    again = scan_folder(class_folder, names, files=tmp_path / "val" / "scenes.txt")
    assert sorted(r.image for r in again) == sorted(r.image for r in val["scenes"]["records"])
    held = [json.loads(line) for line in (tmp_path / "val" / "caps.jsonl").read_text().splitlines()]
    assert sorted(h["image"] for h in held) == sorted(r.image for r in val["caps/retrieval"]["records"])
    assert {h["class"] for h in held} == {"a", "b"}


def test_recipe_problems_are_found_before_training(class_folder, tmp_path):
    import os

    from training import recipe as recipes

    rows = [{"image": str(make_image(tmp_path / d / f"{i}.jpg", seed=i)), "class": "a" if i % 2 else "b",
             "captions": [f"caption {i}"]} for d in ("one", "two") for i in range(4)]
    one = write_jsonl(tmp_path / "one" / "captions.jsonl", rows[:4])
    two = write_jsonl(tmp_path / "two" / "captions.jsonl", rows[4:])
    # two sources named after their files, "captions": their validation sets and packs would collide
    same = [{"kind": "manifest", "path": str(one), "val_per_class": 1},
            {"kind": "manifest", "path": str(two), "val_per_class": 1}]
    with pytest.raises(recipes.RecipeError, match="two sources are named 'captions'"):
        recipes.build_sources(same, seed=0)
    named = [dict(same[0], name="one"), dict(same[1], name="two")]
    assert set(recipes.build_sources(named, seed=0)[1]) == {"one/retrieval", "two/retrieval"}
    # a held-out class the map does not name: found now, not at the first validation of a long run
    with pytest.raises(recipes.RecipeError, match="classes its class-name map does not name: b"):
        recipes.build_sources([dict(named[0], classnames={"a": "the a class"})], seed=0)
    # ... and a class of the training images alone, with nothing held out
    with pytest.raises(recipes.RecipeError, match="classes its class-name map does not name: b"):
        recipes.build_sources([dict(named[0], classnames={"a": "the a class"}, val_per_class=0)], seed=0)
    # on the command line, with no --folder, each --classnames names one --manifest's classes
    given = recipes.sources_from_args(None, [], [str(tmp_path / "map.json")], [str(one)], [], 0)
    assert given == [{"kind": "manifest", "path": str(one), "val_per_class": 0, "classnames": str(tmp_path / "map.json")}]
    with pytest.raises(recipes.RecipeError, match="one per --manifest; to mix both, write a --recipe"):
        recipes.sources_from_args(None, [str(class_folder)], ["rsscn7", "ucm"], [str(one)], [], 0)
    # a class folder of links to images elsewhere: its validation list names the links
    linked = tmp_path / "linked"
    for cls in ("x", "y"):
        (linked / cls).mkdir(parents=True)
        for i in range(3):
            os.symlink(make_image(tmp_path / "elsewhere" / f"{cls}{i}.jpg", seed=i), linked / cls / f"{i}.jpg")
    folder = [{"name": "linked", "kind": "folder", "root": str(linked), "classnames": {"x": "x", "y": "y"},
               "val_per_class": 1}]
    _, val = recipes.build_sources(folder, seed=0)
    recipes.write_validation_lists(folder, val, tmp_path / "val")
    listed = (tmp_path / "val" / "linked.txt").read_text().split()
    assert len(listed) == 2 and all((linked / line).is_symlink() for line in listed)


def test_pooled_captions_of_held_out_images_are_not_trained_on(class_folder, tmp_path):
    """A class caption pool drawn from a benchmark's train split can hold the captions of images
    another source holds out for validation: those captions leave the pool, the rest stay."""
    from training import recipe as recipes

    make_image(tmp_path / "m" / "0.jpg", seed=0)
    make_image(tmp_path / "m" / "1.jpg", seed=1)
    make_image(tmp_path / "m" / "2.jpg", seed=2)
    manifest = write_jsonl(tmp_path / "m" / "captions.jsonl", [
        {"image": "0.jpg", "class": "p", "captions": ["A  park with   trees ."]},
        {"image": "1.jpg", "class": "p", "captions": ["a park with trees ."]},
        {"image": "2.jpg", "class": "p", "captions": ["benches in a park ."]}])
    caps = tmp_path / "captions"
    write_precomp(caps, "rsicd", "train", ["park_1.jpg", "park_2.jpg"],
                  ["a park with trees ."] * 5 + ["benches in a park ."] * 5)
    names = {p.name: p.name.lower() for p in class_folder.iterdir() if p.is_dir()}
    folder = {"name": "scenes", "kind": "folder", "root": str(class_folder), "classnames": names,
              "caption_pool": {"dir": str(caps), "mapping": {"park": "aPark"}}, "val_per_class": 1}
    captions = {"name": "caps", "kind": "manifest", "path": str(manifest), "classnames": {"p": "park"},
                "val_per_class": 1}
    train, val = recipes.build_sources([folder, captions], seed=0)
    held = {c.lower() for r in val["caps/retrieval"]["records"] for c in r.captions}
    parks = [r for r in train[0]["records"] if r.class_name == "aPark"]
    pooled = {c for r in parks for c in r.captions}
    # the folder's own held-out images share its class templates: those stay
    assert len(parks) == 3 and all(len(r.captions) > 2 for r in parks)
    templates = {c for r in val["scenes"]["records"] if r.class_name == "aPark" for c in r.captions}
    templates -= {"a park with trees .", "benches in a park ."}
    assert len(templates) > 2 and templates <= pooled
    assert {"a park with trees .", "benches in a park ."} - pooled == {" ".join(c.split()) for c in held}
    assert not {" ".join(c.lower().split()) for c in pooled} & {" ".join(c.split()) for c in held}
    # the manifest's own training images keep their captions, even one a held-out image shares
    assert sum(len(r.captions) for r in train[1]["records"]) == 2
    # without a validation split of captions nothing is dropped
    train, _ = recipes.build_sources([folder], seed=0)
    assert {"a park with trees .", "benches in a park ."} <= {c for r in train[0]["records"] for c in r.captions}


def test_validation_lists_cli(class_folder, tmp_path, capsys):
    from training import recipe as recipes

    names = tmp_path / "names.json"
    names.write_text(json.dumps({p.name: p.name.lower() for p in class_folder.iterdir() if p.is_dir()}))
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"sources": [{"name": "scenes", "kind": "folder", "root": str(class_folder),
                                               "classnames": str(names), "val_per_class": 2}]}))
    assert recipes.main([str(recipe), "--seed", "1", "--out", str(tmp_path / "val")]) == 0
    lines = (tmp_path / "val" / "scenes.txt").read_text().split()
    assert len(lines) == 2 * 3 and all((class_folder / line).is_file() for line in lines)
    assert recipes.main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "v2")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("suffix, dtype", [(".png", np.uint16), (".tif", np.uint16), (".tif", np.float32)])
def test_images_wider_than_8_bits_are_stretched_not_clipped_white(tmp_path, suffix, dtype):
    """16-bit (and float) single-band images: PIL's own conversion clips every value above 255, so
    500..3500 came out one flat white; they are stretched between their 2nd and 98th percentiles."""
    from PIL import Image

    from training.data import load_image

    values = np.linspace(500, 3500, 64 * 64).reshape(64, 64).astype(dtype)
    path = tmp_path / f"wide{suffix}"
    Image.fromarray(values).save(path)
    rgb = np.asarray(load_image(str(path)))
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    grey = rgb[..., 0].astype(int).ravel()
    assert grey.min() == 0 and grey.max() == 255          # the 2nd and 98th percentiles and past them
    assert np.all(np.diff(grey) >= 0) and len(np.unique(grey)) > 200   # order kept, levels kept


def test_multi_band_16_bit_tiffs_are_read_as_the_backend_shows_them(tmp_path):
    """Three or more bands of 16-bit data, the chips most sensors give: PIL cannot decode them
    ("cannot identify image file"), so they could be neither trained on nor evaluated. They are read
    through GDAL: the bands marked red, green and blue (else the first three), each stretched."""
    from osgeo import gdal

    from training.data import load_image

    exceptions_before = gdal.GetUseExceptions()
    ramp = np.linspace(300, 3300, 48 * 48).reshape(48, 48)
    planes = [ramp, ramp[::-1], ramp.T, np.full((48, 48), 9000.0)]     # 4th: a near-infrared band

    def tif(name, colours=None, nodata=None, georeferenced=True):
        ds = gdal.GetDriverByName("GTiff").Create(str(tmp_path / name), 48, 48, 4, gdal.GDT_UInt16)
        if georeferenced:
            ds.SetGeoTransform((500000, 1, 0, 4000000, 0, -1))
        for i, plane in enumerate(planes):
            band = ds.GetRasterBand(i + 1)
            band.WriteArray(plane.astype(np.uint16))
            if colours:
                band.SetColorInterpretation(colours[i])
            if nodata is not None:
                band.SetNoDataValue(nodata)
        ds = None
        return str(tmp_path / name)

    with pytest.raises(Exception):
        Image.open(tif("plain.tif")).convert("RGB")        # what PIL alone does with it
    rgb = np.asarray(load_image(tif("plain.tif", georeferenced=False))).astype(int)
    assert rgb.shape == (48, 48, 3) and rgb.min() == 0 and rgb.max() == 255
    assert rgb[0, 0].tolist() == [0, 255, 0] and rgb[-1, -1].tolist() == [255, 0, 255]   # bands 1, 2, 3 stretched
    # marked blue-green-red-NIR: the marked ones, in colour order
    marked = tif("bgrn.tif", colours=[gdal.GCI_BlueBand, gdal.GCI_GreenBand, gdal.GCI_RedBand, gdal.GCI_Undefined])
    assert np.asarray(load_image(marked))[0, 0].tolist() == [0, 255, 0][::-1]
    # nodata rows are black, out of the stretch; as in the backend (and GDAL's warper), a pixel is
    # nodata only where all its colour bands are: 0 in one band alone is a dark pixel
    planes[:3] = [plane.copy() for plane in planes[:3]]        # not views of one ramp
    planes[0][:8] = 0
    planes[1][:4] = planes[2][:4] = 0
    rgb = np.asarray(load_image(tif("nodata.tif", nodata=0)))
    assert (rgb[:4] == 0).all() and rgb[4:, :, 0].max() == 255
    assert (rgb[4:8, :, 0] == 0).all() and (rgb[4:8, :, 1] > 0).all()
    # marked RGB (PHOTOMETRIC=RGB, the usual 48-bit TIFF): PIL decodes it, keeping each sample's high
    # byte unstretched (12-bit data near black); it is read as the backend reads it too
    twelve_bit = np.stack([ramp, ramp[::-1], ramp.T]).astype(np.uint16)
    ds = gdal.GetDriverByName("GTiff").Create(str(tmp_path / "rgb48.tif"), 48, 48, 3, gdal.GDT_UInt16,
                                              ["PHOTOMETRIC=RGB"])
    for i in range(3):
        ds.GetRasterBand(i + 1).WriteArray(twelve_bit[i])
    ds = None
    assert np.asarray(Image.open(tmp_path / "rgb48.tif").convert("RGB")).mean() < 20    # what PIL alone gives
    rgb = np.asarray(load_image(str(tmp_path / "rgb48.tif"))).astype(int)
    assert rgb.min() == 0 and rgb.max() == 255 and rgb[0, 0].tolist() == [0, 255, 0]
    assert gdal.GetUseExceptions() == exceptions_before        # left as it was
    (tmp_path / "broken.tif").write_bytes(b"II*\x00 not a tiff")
    with pytest.raises(OSError):
        load_image(str(tmp_path / "broken.tif"))


@pytest.mark.parametrize("source, message", [
    # a typo: the held-out split it was to set would be dropped unnoticed, and validated on images trained on
    ({"kind": "manifest", "path": "c.jsonl", "val_per_clas": 2},
     r"source 1 \(manifest\) has 'val_per_clas', which no manifest source takes; its keys are kind, name, weight, "
     r"val_per_class, path, classnames"),
    ({"kind": "folder", "root": 5, "classnames": "rsscn7"}, r"source 1 has root 5; give it as a string"),
    ({"kind": "manifest", "path": ["a.jsonl"]}, r"has path \[\"a.jsonl\"\]; give it as a string"),
    ({"kind": "shards", "urls": 5}, r"has urls 5; give a shard path or pattern, or a list of them"),
    ({"kind": "folder", "root": "r", "classnames": {}}, r"has classnames \{\}; give a class-name map file"),
    ({"kind": "folder", "root": "r", "classnames": ["a"]}, r"has classnames \[\"a\"\]"),
    # evaluation's synonym lists: the class is named, and the one name training wants suggested
    ({"kind": "folder", "root": "r", "classnames": {"beach": "beach", "golf": ["golf course", "golf links"]}},
     r"source 1: classnames: class 'golf' has \[\"golf course\", \"golf links\"\]: lists of names are for "
     r"evaluation \(each a prompt\); training takes one name per class: give it one, e.g. \"golf\": \"golf course\""),
    ({"kind": "folder", "root": "r", "classnames": "rsscn7", "caption_pool": {"dir": "caps"}},
     r"has caption_pool \{\"dir\": \"caps\"\}; give"),
    ({"kind": "folder", "root": "r", "classnames": "rsscn7", "caption_pool": "caps"}, r"has caption_pool \"caps\""),
    ({"kind": "folder", "root": "r", "classnames": "rsscn7",
      "caption_pool": {"dir": "caps", "mapping": "rsscn7", "max_per_class": "x"}}, r"has caption_pool"),
    ({"kind": "folders", "root": "r"}, r"source 1 has kind 'folders'; a kind is one of folder, shards"),
])
def test_recipe_sources_with_unknown_keys_or_wrong_types_are_refused_by_name(tmp_path, source, message):
    from training import recipe as recipes

    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"sources": [source]}))
    with pytest.raises(recipes.RecipeError, match=message):
        recipes.sources_from_args(str(path), [], [], [], [], 0)


def test_the_shipped_recipe_passes_the_source_checks():
    from training import recipe as recipes

    sources = recipes.sources_from_args(str(Path(recipes.__file__).parent / "recipes" / "default.json"), [], [], [], [], 0)
    assert {s["kind"] for s in sources} == {"folder", "manifest"}
