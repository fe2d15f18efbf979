"""`python -m training.evaluate`: each subcommand on a tiny checkpoint and tiny images, its JSON,
and its one-line errors (exit status 2)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from training import evaluate as ev
from training.data import load_image

RECALL_KEYS = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall"}
CLASSES = {"grass": "grassland", "field": "farmland", "river": "river", "forest": "forest",
           "parking": "parking lot"}


def _image(path, seed):
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 256, size=3)
    pixels = np.clip(colour + rng.integers(-40, 40, size=(40, 48, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer, tiny_config):
    from backend.model import MaMMUT
    from backend.model.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    ckpt = save_checkpoint(MaMMUT(tiny_config), tokenizer, root / "ckpt")
    # RSSCN7/AID layout: <class>/*.jpg, 5 classes x 2 images
    for c, cls in enumerate(CLASSES):
        for j in range(2):
            _image(root / "scenes" / cls / f"{cls}_{j}.jpg", 10 * c + j)
    names = root / "names.json"
    names.write_text(json.dumps(CLASSES))
    # UCM layout with a manifest: images/<class>/<class>NN.png, 2 classes x 3 images, 2-5 captions
    lines = []
    for c, cls in enumerate(["beach", "forest"]):
        for j in range(3):
            rel = f"images/{cls}/{cls}{j:02d}.png"
            _image(root / "ucm" / rel, 100 + 10 * c + j)
            caps = [f"a {cls} seen from above", f"there is a {cls} here"] + [f"{cls} number {j}"] * (j + 1)
            lines.append(json.dumps({"image": rel, "class": cls, "captions": caps}))
    manifest = root / "ucm" / "captions.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    (root / "ucm" / "names.json").write_text(json.dumps({"beach": "beach", "forest": ["forest", "woods"]}))
    return {"root": root, "ckpt": ckpt, "names": names, "manifest": manifest}


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "training.evaluate", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def run_main(capsys, *args):
    rc = ev.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# ---- the three subcommands through the real command line -----------------------------------------
def test_retrieval_cli_json(setup):
    p = run_cli("retrieval", "--checkpoint", setup["ckpt"], "--manifest", setup["manifest"], "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert RECALL_KEYS <= set(out)
    assert all(0.0 <= out[k] <= 100.0 for k in RECALL_KEYS)
    assert out["n_images"] == 6 and out["n_captions"] == 2 * 6 + (1 + 2 + 3) * 2   # duplicates kept
    assert 0.0 < out["class_oracle_mean_recall"] <= 100.0
    assert out["t2i_r10"] == 100.0                               # only 6 images: all in the top 10
    assert "images" in p.stderr                                  # progress bar on stderr


def test_scores_read_by_a_reader_that_stops_early_end_quietly(setup):
    """`evaluate retrieval ... | head -1`: the reader is gone before the scores are printed; no
    "Broken pipe" traceback, status 0."""
    proc = subprocess.Popen([sys.executable, "-m", "training.evaluate", "retrieval", "--checkpoint",
                             str(setup["ckpt"]), "--manifest", str(setup["manifest"]), "--quiet"],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception ignored" not in err


def test_zero_shot_cli_json_rsscn7_layout(setup):
    p = run_cli("zero-shot", "--checkpoint", setup["ckpt"], "--data", setup["root"] / "scenes",
                "--classnames", setup["names"], "--json", "--quiet")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["classes"] == list(CLASSES) and out["n_images"] == 10
    assert 0 <= out["top1"] <= out["top5"] <= 100
    assert set(out["per_class"]) == set(CLASSES)
    cm = np.array(out["confusion"])
    assert cm.shape == (5, 5) and cm.sum(axis=1).tolist() == [2] * 5
    assert out["top1"] == pytest.approx(100 * np.trace(cm) / 10)


def test_unreadable_images_are_left_out_named_and_counted(setup, tmp_path, capsys):
    """A folder training reads (it skips damaged files) evaluates too: the damaged files are named, every
    one, left out, and the results say how many images were scored and how many were left out."""
    import shutil

    scenes = tmp_path / "scenes"
    shutil.copytree(setup["root"] / "scenes", scenes)
    truncated = scenes / "grass" / "grass_cut.jpg"
    truncated.write_bytes((scenes / "grass" / "grass_0.jpg").read_bytes()[:300])
    fake = scenes / "river" / "river_fake.png"
    fake.write_text("not an image")
    zero_shot = ["zero-shot", "--checkpoint", setup["ckpt"], "--data", scenes, "--classnames", setup["names"], "--quiet"]
    rc, out, err = run_main(capsys, *zero_shot, "--json")
    assert rc == 0, err
    assert "warning: 2 image(s) cannot be read and are left out; the results count the 10 scored:" in err
    assert f"\n  {truncated}: OSError: " in err and f"\n  {fake}: UnidentifiedImageError: " in err
    result = json.loads(out)
    assert result["n_images"] == 10 and result["n_unreadable"] == 2
    assert sorted(result["unreadable_images"]) == sorted([str(truncated), str(fake)])
    rc, out, err = run_main(capsys, *zero_shot)
    assert rc == 0 and "zero-shot classification: 10 images, 5 classes" in out
    assert "prompt template(s); 2 unreadable image(s) left out\n" in out, err
    # a probe's training images are checked as its held-out ones are
    (tmp_path / "held.txt").write_text("grass/grass_1.jpg\nriver/river_1.jpg\n")
    rc, out, err = run_main(capsys, "probe", *zero_shot[1:], "--files", tmp_path / "held.txt")
    assert rc == 0 and "probe: 2 held-out images, 5 classes" in out, err
    assert "; 2 unreadable image(s) left out (0 held-out, 2 to learn from)\n" in out, out
    # nothing readable: refused on one line, which names the first 5 and counts the others
    for image in scenes.glob("*/*_[01].jpg"):
        image.write_text("gone")
    rc, out, err = run_main(capsys, *zero_shot)
    assert rc == 2 and "none of the 12 images can be read: " in err and err.count("Error: ") == 5
    assert "; and 7 more\n" in err and len(err.strip().splitlines()) == 1, err


def test_a_long_list_of_unreadable_images_names_the_first_five(setup, tmp_path, capsys):
    """600 Git LFS pointer files named .jpg were 600 lines of warning (and, when none could be read, one
    error line of 86,501 characters): the first 5 are named, the others counted; --json lists them all."""
    import shutil

    scenes = tmp_path / "scenes"
    shutil.copytree(setup["root"] / "scenes", scenes)
    pointers = [scenes / "field" / f"field_lfs{i}.jpg" for i in range(7)]
    for pointer in pointers:
        pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    rc, out, err = run_main(capsys, "zero-shot", "--checkpoint", setup["ckpt"], "--data", scenes, "--classnames",
                            setup["names"], "--quiet", "--json")
    assert rc == 0, err
    assert "warning: 7 image(s) cannot be read and are left out; the results count the 10 scored:" in err
    assert err.count(": UnidentifiedImageError: ") == 5, err
    assert "\n  ... and 2 more: --json lists them all (unreadable_images)\n" in err
    assert sorted(json.loads(out)["unreadable_images"]) == sorted(map(str, pointers))


def test_a_probe_decodes_only_the_images_it_uses(setup, tmp_path, capsys, monkeypatch):
    """Its check of the images decoded all of --data (8,000 AID images) where the probe learns from a
    sample of them: only the held-out images and the sample are read. An unreadable image drawn into the
    sample is left out and another drawn in its place."""
    import shutil

    scenes = tmp_path / "scenes"
    shutil.copytree(setup["root"] / "scenes", scenes)
    for cls in CLASSES:
        for j in range(2, 5):
            _image(scenes / cls / f"{cls}_{j}.jpg", 100 + j)
    bad = scenes / "grass" / "grass_bad.jpg"
    bad.write_text("not an image")
    for image in scenes.glob("grass/grass_[234].jpg"):
        image.unlink()                  # grass learns from grass_0 or grass_bad, whichever is drawn
    held = tmp_path / "held.txt"
    held.write_text("".join(f"{cls}/{cls}_1.jpg\n" for cls in CLASSES))
    decoded = []
    monkeypatch.setattr(ev, "load_image", lambda path: decoded.append(str(path)) or load_image(path))
    drawn_bad = set()
    for seed in (0, 1):              # grass_0 drawn, then grass_bad
        decoded.clear()
        rc, out, err = run_main(capsys, "probe", "--checkpoint", setup["ckpt"], "--data", scenes, "--classnames",
                                setup["names"], "--files", held, "--train-per-class", "1", "--seed", seed, "--json",
                                "--quiet")
        assert rc == 0, err
        result = json.loads(out)
        assert result["n_train"] == 5 and result["n_images"] == 5
        drawn_bad.add(result["n_unreadable"] == 1)
        # the 5 held out, the sample of 5 (and grass_bad, where drawn), each read to check it and to score it
        assert len(set(decoded)) == 10 + result["n_unreadable"] and len(decoded) == 20 + result["n_unreadable"]
    assert drawn_bad == {True, False}


def test_caption_cli_json(setup):
    p = run_cli("caption", "--checkpoint", setup["ckpt"], "--manifest", setup["manifest"], "--json",
                "--beam-size", "2", "--max-len", "6", "--examples", "2", "--quiet")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert 0.0 <= out["bleu4"] <= 1.0 and 0.0 <= out["cider"] <= 10.0
    assert out["n_images"] == 6 and len(out["examples"]) == 2
    assert {"image", "caption", "references"} <= set(out["examples"][0])


# ---- the same entry point in-process: layouts, options, and errors ------------------------------
def test_zero_shot_ucm_layout_synonyms_files_and_limit(setup, capsys):
    ucm = setup["root"] / "ucm"
    files = setup["root"] / "split.txt"
    files.write_text("images/beach/beach00.png\nforest/forest02.png\n\n")
    rc, out, err = run_main(capsys, "zero-shot", "--checkpoint", setup["ckpt"], "--data", ucm, "--classnames",
                            ucm / "names.json", "--files", files, "--templates", "single", "--json", "--quiet")
    assert rc == 0, err
    res = json.loads(out)
    assert res["n_images"] == 2 and res["classes"] == ["beach", "forest"] and "top5" not in res
    assert res["class_names"]["forest"] == ["forest", "woods"] and res["n_templates"] == 1
    rc, out, err = run_main(capsys, "zero-shot", "--checkpoint", setup["ckpt"], "--data", ucm, "--classnames",
                            ucm / "names.json", "--limit-per-class", "1", "--quiet")
    assert rc == 0, err
    assert "top-1" in out and "confusion" in out                       # the human-readable table


def test_zero_shot_from_a_manifest_with_classes(setup, capsys, tmp_path):
    ucm = setup["root"] / "ucm"
    args = ("zero-shot", "--checkpoint", setup["ckpt"], "--classnames", ucm / "names.json", "--json", "--quiet")
    rc, out, err = run_main(capsys, *args, "--manifest", setup["manifest"])
    assert rc == 0, err
    res = json.loads(out)
    assert res["n_images"] == 6 and res["classes"] == ["beach", "forest"]
    # the same images as the folder gives, so the same result
    rc, out_folder, err = run_main(capsys, *args, "--data", ucm)
    assert rc == 0, err
    assert json.loads(out_folder)["per_class"] == res["per_class"] and json.loads(out_folder)["n_images"] == 6
    rc, out, err = run_main(capsys, *args, "--manifest", setup["manifest"], "--limit-per-class", "1")
    assert rc == 0 and json.loads(out)["n_images"] == 2
    # a line without a class, and both or neither of --data/--manifest: clear errors, exit 2
    bad = tmp_path / "noclass.jsonl"
    bad.write_text(json.dumps({"image": str(ucm / "images/beach/beach00.png"), "captions": ["a beach"]}) + "\n")
    rc, out, err = run_main(capsys, *args, "--manifest", bad)
    assert rc == 2 and f"{bad}:1: image " in err and 'has no "class"' in err
    bad.write_text(json.dumps({"image": str(ucm / "images/forest/forest00.png"), "class": "forest",
                               "captions": ["woods"]}) + "\n" + json.dumps(
        {"image": "ucm/images/beach/beach00.png", "class": "volcano", "captions": ["a beach"]}) + "\n")
    (tmp_path / "ucm").symlink_to(ucm)
    rc, out, err = run_main(capsys, *args, "--manifest", bad)
    assert rc == 2 and f"{bad}:2: image " in err and "has class 'volcano', which is not in the class-name map" in err
    rc, out, err = run_main(capsys, *args)
    assert rc == 2 and "--data FOLDER or as --manifest FILE" in err
    rc, out, err = run_main(capsys, *args, "--manifest", setup["manifest"], "--files", tmp_path / "x.txt")
    assert rc == 2 and "--files" in err
    # a map of one class: every image would be right (top-1 100%, said as a result)
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"beach": "beach"}))
    (tmp_path / "one_class").mkdir()
    (tmp_path / "one_class" / "beach").symlink_to(ucm / "images" / "beach")
    rc, out, err = run_main(capsys, "zero-shot", "--checkpoint", setup["ckpt"], "--classnames", one, "--data",
                            tmp_path / "one_class", "--quiet")
    assert rc == 2 and "the class-name map has 1 class(es); zero-shot chooses" in err and "2 or more" in err and out == ""


def test_retrieval_table_output(setup, capsys):
    rc, out, err = run_main(capsys, "retrieval", "--checkpoint", setup["ckpt"], "--manifest", setup["manifest"],
                            "--limit", "4", "--ties", "pessimistic", "--quiet")
    assert rc == 0, err
    assert "R@10" in out and "mean recall" in out and "class-oracle" in out
    # one image is every caption's first hit: refused, not 100% recall
    rc, out, err = run_main(capsys, "retrieval", "--checkpoint", setup["ckpt"], "--manifest", setup["manifest"],
                            "--limit", "1", "--quiet")
    assert rc == 2 and "1 image; retrieval ranks images against each other" in err and out == ""


@pytest.mark.parametrize("case, message", [
    ("no_checkpoint", "does not exist"),
    ("bad_checkpoint", "config.json is missing"),
    ("run_folder", "run is a training run's folder: give one of its checkpoints, e.g. "),
    ("no_data", "does not exist"),
    ("no_classnames", "does not exist"),
    ("unmapped_class", "; add them as \"folder\": \"human name\", or list only the images of the named classes (--files)"),
    ("empty_folder", "no class sub-folders with images"),
    ("empty_list", "no images to evaluate"),
    ("empty_manifest", "no records"),
    ("bad_manifest_line", "not valid JSON"),
])
def test_errors_exit_2_with_one_line(setup, tmp_path, capsys, case, message):
    ck, scenes, names = setup["ckpt"], setup["root"] / "scenes", setup["names"]
    zero_shot = ["zero-shot", "--checkpoint", ck, "--json"]
    if case == "no_checkpoint":
        args = ["retrieval", "--checkpoint", tmp_path / "nope", "--manifest", setup["manifest"]]
    elif case == "bad_checkpoint":
        args = ["retrieval", "--checkpoint", tmp_path, "--manifest", setup["manifest"]]
    elif case == "run_folder":   # training's --out, where its checkpoints are
        (tmp_path / "run" / "checkpoints" / "step_0000020").mkdir(parents=True)
        args = ["retrieval", "--checkpoint", tmp_path / "run", "--manifest", setup["manifest"]]
        message += str(tmp_path / "run" / "checkpoints" / "step_0000020")
    elif case == "no_data":
        args = zero_shot + ["--data", tmp_path / "missing", "--classnames", names]
    elif case == "no_classnames":
        args = zero_shot + ["--data", scenes, "--classnames", tmp_path / "missing.json"]
    elif case == "unmapped_class":
        partial = tmp_path / "partial.json"
        partial.write_text(json.dumps({k: v for k, v in CLASSES.items() if k != "river"}))
        args = zero_shot + ["--data", scenes, "--classnames", partial]
    elif case == "empty_folder":
        (tmp_path / "empty" / "grass").mkdir(parents=True)
        args = zero_shot + ["--data", tmp_path / "empty", "--classnames", names]
    elif case == "empty_list":
        (tmp_path / "list.txt").write_text("\n")
        args = zero_shot + ["--data", scenes, "--classnames", names, "--files", tmp_path / "list.txt"]
    elif case == "empty_manifest":
        (tmp_path / "m.jsonl").write_text("")
        args = ["retrieval", "--checkpoint", ck, "--manifest", tmp_path / "m.jsonl"]
    else:
        image = next((setup["root"] / "scenes" / "grass").iterdir())
        (tmp_path / "m.jsonl").write_text(json.dumps({"image": str(image), "captions": ["x"]}) + "\n{oops\n")
        args = ["caption", "--checkpoint", ck, "--manifest", tmp_path / "m.jsonl"]
    rc, out, err = run_main(capsys, *args)
    assert rc == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


# ---- the functions the training loop calls ------------------------------------------------------
def test_evaluate_functions_take_records(setup, tokenizer, tiny_config):
    from backend.model import MaMMUT

    torch.manual_seed(0)
    model = MaMMUT(tiny_config).train()
    records = ev.read_manifest(setup["manifest"])
    r = ev.evaluate_retrieval(model, tokenizer, records, "cpu", batch_size=4)
    assert RECALL_KEYS <= set(r) and "class_oracle_mean_recall" in r
    assert model.training                                       # mode restored
    # records may name classes by folder key or by human name
    named = [ev.ImageRecord(x.image, (), "woods" if x.class_name == "forest" else x.class_name) for x in records]
    z = ev.evaluate_zero_shot(model, tokenizer, named, {"beach": "beach", "forest": ["forest", "woods"]},
                              "cpu", batch_size=4)
    assert z["n_images"] == 6 and sum(map(sum, z["confusion"])) == 6
    folder = ev.evaluate_zero_shot(model, tokenizer, setup["root"] / "scenes", CLASSES, "cpu", batch_size=8,
                                   limit_per_class=1)
    assert folder["n_images"] == 5 and "top5" in folder


def test_help_names_every_subcommand_and_option():
    parser = ev.build_parser()
    text = parser.format_help()
    assert "retrieval" in text and "zero-shot" in text and "caption" in text
    sub = parser._subparsers._group_actions[0].choices
    assert "--classnames" in sub["zero-shot"].format_help() and "--files" in sub["zero-shot"].format_help()
    assert "--beam-size" in sub["caption"].format_help() and "--ties" in sub["retrieval"].format_help()
    # every value --methods takes is named, 'default' (its default) among them
    methods = " ".join(sub["segmentation"].format_help().split())
    assert "comma-separated, 'default' or 'all'" in methods and "'default' (the default) is what the" in methods
    # an example cut over two lines keeps its break, as a shell line continuation
    assert "--classnames aid \\\n      --files runs/default/val/aid.txt" in text


def test_rerank_with_captioner_reorders_inside_each_top_k_only(setup, tokenizer, tiny_config):
    from backend.model import MaMMUT

    torch.manual_seed(0)
    model = MaMMUT(tiny_config).eval()
    records = ev.read_manifest(setup["manifest"])
    paths = [str(r.image) for r in records]
    texts = [c for r in records for c in r.captions]
    unique = list(dict.fromkeys(texts))
    index = np.asarray([unique.index(t) for t in texts])
    sim = np.random.default_rng(0).uniform(-0.5, 0.5, (len(paths), len(texts))).astype(np.float32)
    k = 3
    i2t, t2i = ev.rerank_with_captioner(model, tokenizer, paths, unique, index, sim, k, 1000.0, "cpu", 4)
    # the decoder's own scores for every pair, straight from the model
    transform = ev.eval_transform(tiny_config.image_size, tiny_config.image_mean, tiny_config.image_std)
    with torch.no_grad():
        image_tokens = model.visual(torch.stack([ev._load_image(p, transform) for p in paths]))
        tokens = tokenizer(unique, context_length=tiny_config.context_length)
        ll = np.stack([model.caption_log_likelihood(image_tokens[i:i + 1].expand(len(unique), -1, -1), tokens).numpy()
                       for i in range(len(paths))])                        # [n_images, n_unique]
    for j in range(len(texts)):
        top = set(np.argsort(-sim[:, j])[:k])
        assert set(np.argsort(-t2i[:, j])[:k]) == top                    # the same top k, still on top
        order = [int(i) for i in np.argsort(-t2i[:, j])[:k]]
        assert order == sorted(top, key=lambda i: -ll[i, index[j]])     # a huge weight: the decoder's order
        rest = [i for i in range(len(paths)) if i not in top]
        assert np.array_equal(t2i[rest, j], sim[rest, j])               # the others untouched
    for i in range(len(paths)):
        top = set(np.argsort(-sim[i])[:k])
        assert set(np.argsort(-i2t[i])[:k]) == top
    # weight 0 keeps the similarity order inside each top k
    i2t0, t2i0 = ev.rerank_with_captioner(model, tokenizer, paths, unique, index, sim, k, 0.0, "cpu", 4)
    assert all(list(np.argsort(-t2i0[:, j])[:k]) == list(np.argsort(-sim[:, j])[:k]) for j in range(len(texts)))


def test_rerank_scores_tie_where_the_combined_scores_tie():
    scores = ev._above_every_cosine([0.5, 0.2, 0.5, -1.0])
    assert scores[0] == scores[2] > scores[1] > scores[3] > 1.0


def test_retrieval_cli_rerank(setup):
    p = run_cli("retrieval", "--checkpoint", setup["ckpt"], "--manifest", setup["manifest"], "--rerank", "2", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert RECALL_KEYS <= set(out) and out["rerank"] == 2 and out["rerank_weight"] == 1.0
    assert all(0.0 <= out[k] <= 100.0 for k in RECALL_KEYS)
    p = run_cli("retrieval", "--checkpoint", setup["ckpt"], "--manifest", setup["manifest"], "--rerank", "-1")
    assert p.returncode == 2 and "--rerank K" in p.stderr and "Traceback" not in p.stderr


def test_views_average_each_images_turns_in_every_evaluation(setup, tokenizer, tiny_config, tmp_path, capsys):
    from backend.model import MaMMUT

    torch.manual_seed(0)
    model = MaMMUT(tiny_config).eval()
    # at the model's size, so the evaluation transform resamples nothing and a turned file is a turned input
    side = tiny_config.image_size
    pixels = np.random.default_rng(3).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(np.ascontiguousarray(np.rot90(pixels))).save(tmp_path / "turned.png")
    paths = [str(tmp_path / "a.png"), str(tmp_path / "turned.png")]
    one, four = ev.encode_images(model, paths, "cpu"), ev.encode_images(model, paths, "cpu", views=4)
    assert (one[0] - one[1]).abs().max() > 1e-3
    torch.testing.assert_close(four[0], four[1], atol=1e-5, rtol=0)
    rc, out, _ = run_main(capsys, "zero-shot", "--checkpoint", setup["ckpt"], "--data", setup["root"] / "scenes",
                          "--classnames", setup["names"], "--views", "4", "--json", "--quiet")
    assert rc == 0 and json.loads(out)["views"] == 4
    rc, out, _ = run_main(capsys, "retrieval", "--checkpoint", setup["ckpt"], "--manifest", setup["manifest"],
                          "--views", "8", "--quiet")
    assert rc == 0 and "8 views per image" in out
    with pytest.raises(SystemExit):
        ev.main(["retrieval", "--checkpoint", str(setup["ckpt"]), "--manifest", str(setup["manifest"]), "--views", "3"])
    assert "invalid choice: 3" in capsys.readouterr().err


# ---- inputs refused before a model is loaded, and notes on what is not read ----------------------
def _one_line_error(rc, out, err, *parts):
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and all(p in err for p in parts), err


def test_caption_references_without_a_word_are_refused_before_the_model(setup, tmp_path, capsys):
    """References of punctuation alone ("...", "!!!") have no n-gram: with no word in any of them
    pycocoevalcap's CIDEr failed (max() of an empty sequence) after every caption was generated."""
    ucm = setup["root"] / "ucm"
    image = ucm / "images/beach/beach00.png"
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": str(image), "captions": ["...", "!!!"]}) + "\n"
                        + json.dumps({"image": str(ucm / "images/forest/forest00.png"), "captions": ["- -"]}) + "\n")
    # a checkpoint that does not exist: the references are refused first, so no model is loaded
    rc, out, err = run_main(capsys, "caption", "--checkpoint", tmp_path / "nope", "--manifest", manifest)
    _one_line_error(rc, out, err, f"{manifest}:1: image {image}", "no reference caption with a word",
                    "'...'", "1 more image")
    # one image without a word among images with words: the same, at its line
    manifest.write_text(json.dumps({"image": str(ucm / "images/forest/forest00.png"), "captions": ["woods"]}) + "\n"
                        + json.dumps({"image": str(image), "captions": ["?!"]}) + "\n")
    rc, out, err = run_main(capsys, "caption", "--checkpoint", setup["ckpt"], "--manifest", manifest)
    _one_line_error(rc, out, err, f"{manifest}:2: image {image}", "no reference caption with a word")


def test_caption_of_one_image_warns_that_cider_is_0(setup, capsys):
    args = ("caption", "--checkpoint", setup["ckpt"], "--manifest", setup["manifest"], "--max-len", "3",
            "--json", "--quiet")
    rc, out, err = run_main(capsys, *args, "--limit", "1")
    assert rc == 0, err
    assert json.loads(out)["cider"] == 0.0
    assert "warning:" in err and "1 image: CIDEr-D is 0" in err and "2 or more" in err
    rc, out, err = run_main(capsys, *args, "--limit", "2")
    assert rc == 0 and "CIDEr-D" not in err


def test_too_few_images_are_counted_after_the_unreadable_ones_are_left_out(setup, tmp_path, capsys):
    """Two images, one unreadable: one is left to score, which retrieval refuses (every caption's top hit:
    a mean recall of 100%) and captioning warns of (CIDEr-D 0), as they do for a manifest of one."""
    (tmp_path / "bad.jpg").write_text("not an image")
    good = setup["manifest"].parent / "images" / "beach" / "beach00.png"
    captions = ["a beach seen from above", "there is a beach here"]
    manifest = tmp_path / "two.jsonl"
    manifest.write_text("".join(json.dumps({"image": str(image), "captions": captions}) + "\n"
                                for image in (good, tmp_path / "bad.jpg")))
    args = ("--checkpoint", setup["ckpt"], "--manifest", manifest, "--quiet")
    rc, out, err = run_main(capsys, "retrieval", *args)
    assert rc == 2 and "1 image that can be read (1 cannot); retrieval ranks images against each other" in err, err
    rc, out, err = run_main(capsys, "caption", *args, "--max-len", "3")
    assert rc == 0 and "1 image that can be read (1 cannot): CIDEr-D is 0 for one image" in err, err


def test_caption_scores_only_the_references_with_a_word(setup, tokenizer, tiny_config, monkeypatch, tmp_path):
    """A reference of punctuation alone beside real ones is not scored: kept, it lowered CIDEr-D as
    a reference nothing can match."""
    from backend.model import MaMMUT

    ucm = setup["root"] / "ucm"
    refs = [("images/beach/beach00.png", ["a sandy beach", "..."]), ("images/forest/forest00.png", ["dense woods"])]
    records = [ev.ImageRecord(str(ucm / p), tuple(c)) for p, c in refs]
    clean = [ev.ImageRecord(r.image, tuple(c for c in r.captions if c != "...")) for r in records]
    monkeypatch.setattr(ev, "generate_captions", lambda *a, **kw: ["a sandy beach", "dense woods"])
    model = MaMMUT(tiny_config)
    with_dots = ev.evaluate_captions(model, tokenizer, records, "cpu")
    without = ev.evaluate_captions(model, tokenizer, clean, "cpu")
    assert with_dots["cider"] == pytest.approx(without["cider"]) and without["cider"] > 0
    assert with_dots["n_references"] == 2 and with_dots["examples"][0]["references"] == ["a sandy beach"]


@pytest.mark.parametrize("option, value", [
    ("--rerank-weight", "nan"), ("--rerank-weight", "inf"), ("--rerank-weight", "-1"),
    ("--threshold", "nan"), ("--threshold", "inf"), ("--threshold", "1.5"),
])
def test_float_options_must_be_finite_and_in_range(setup, capsys, option, value):
    """NaN passes `< 0`: a --rerank-weight nan re-ranked with NaN scores and changed the recalls."""
    if option == "--rerank-weight":
        args = ["retrieval", "--checkpoint", setup["ckpt"], "--manifest", setup["manifest"], "--rerank", "2"]
        bound = "must be 0 or more (a finite number)"
    else:
        args = ["segmentation", "--checkpoint", setup["ckpt"], "--data", setup["root"] / "scenes", "--classnames",
                setup["names"], "--end-to-end"]
        bound = "must be between 0 and 1 (a finite number)"
    rc, out, err = run_main(capsys, *args, option, value, "--quiet")
    _one_line_error(rc, out, err, f"{option} {float(value)} {bound}")


@pytest.mark.parametrize("device", ["mps", "meta", "xpu:0", "nonsense"])
def test_devices_other_than_cpu_and_cuda_are_one_line(setup, capsys, device):
    for command in (["retrieval", "--manifest", setup["manifest"]],
                    ["segmentation", "--data", setup["root"] / "scenes", "--classnames", setup["names"]]):
        rc, out, err = run_main(capsys, *command, "--checkpoint", setup["ckpt"], "--device", device, "--quiet")
        _one_line_error(rc, out, err, f"--device {device!r} is not supported: give cpu, cuda or cuda:N")


def test_a_cuda_device_past_the_visible_gpus_is_one_line(setup, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    rc, out, err = run_main(capsys, "retrieval", "--checkpoint", setup["ckpt"], "--manifest", setup["manifest"],
                            "--device", "cuda:3")
    _one_line_error(rc, out, err, "--device cuda:3: only 1 GPU(s) visible")


@pytest.mark.parametrize("tolerance", ["100000", "97", "-1"])
def test_segmentation_tolerance_is_checked_before_any_work(setup, tmp_path, capsys, tolerance):
    """--tolerance 100000 asked for a 37 GiB array after every mosaic was scored."""
    rc, out, err = run_main(capsys, "segmentation", "--checkpoint", tmp_path / "nope", "--data",
                            setup["root"] / "scenes", "--classnames", setup["names"], "--size", "96",
                            "--tolerance", tolerance)
    _one_line_error(rc, out, err, f"--tolerance {tolerance} must be 0 or more and at most the mosaic's side "
                                  "(--size 96)")


def test_files_may_name_images_by_absolute_paths_under_the_folder(setup, tmp_path, capsys):
    scenes = setup["root"] / "scenes"
    listing = tmp_path / "val.txt"
    listing.write_text(f"{scenes / 'forest' / 'forest_0.jpg'}\nriver/river_1.jpg\n")
    args = ("zero-shot", "--checkpoint", setup["ckpt"], "--data", scenes, "--classnames", setup["names"],
            "--files", listing, "--json", "--quiet")
    rc, out, err = run_main(capsys, *args)
    assert rc == 0, err
    res = json.loads(out)
    assert res["n_images"] == 2 and sum(res["confusion"][res["classes"].index("forest")]) == 1
    outside = tmp_path / "elsewhere" / "forest_0.jpg"
    listing.write_text(f"{outside}\n")
    rc, out, err = run_main(capsys, *args)
    _one_line_error(rc, out, err, f"{outside} is not under the data folder {scenes}", "relative to the folder")


def test_images_in_sub_folders_of_class_folders_are_named_not_dropped_silently(setup, tmp_path, capsys):
    scenes = setup["root"] / "scenes"
    data = tmp_path / "data"
    for cls in CLASSES:
        (data / cls).mkdir(parents=True)
        for f in (scenes / cls).iterdir():
            (data / cls / f.name).symlink_to(f)
    # river's images one level down, plus one two levels down under forest
    river = data / "river"
    (river / "2019").mkdir()
    for f in list(river.glob("*.jpg")):
        f.rename(river / "2019" / f.name)
    (data / "forest" / "a" / "b").mkdir(parents=True)
    (data / "forest" / "a" / "b" / "extra.jpg").symlink_to(next((scenes / "forest").iterdir()))
    args = ("zero-shot", "--checkpoint", setup["ckpt"], "--classnames", setup["names"], "--json", "--quiet")
    rc, out, err = run_main(capsys, *args, "--data", data)
    assert rc == 0, err
    notes = [line for line in err.splitlines() if "sub-folders" in line]
    assert len(notes) == 1, err
    assert "3 image(s) in sub-folders of class folders are not read (forest: 1, river: 2)" in notes[0]
    assert "FOLDER/<class>/*" in notes[0]
    assert json.loads(out)["n_images"] == 8
    # every class's images one level down: the error says why no class folder was found
    nested = tmp_path / "nested"
    for cls in CLASSES:
        (nested / cls / "tiles").mkdir(parents=True)
        for f in (scenes / cls).iterdir():
            (nested / cls / "tiles" / f.name).symlink_to(f)
    rc, out, err = run_main(capsys, *args, "--data", nested)
    _one_line_error(rc, out, err, "no class sub-folders with images found: its 10 images are in sub-folders of "
                                  "the class folders", "move each class's images into its folder")


def test_a_missing_validation_list_names_the_command_that_writes_it(setup, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = json.loads(setup["names"].read_text())
    with pytest.raises(ev.EvalError, match=r"file list runs/default/val/rsscn7.txt does not exist: .*"
                                           r"python -m training.recipe training/recipes/default.json --out runs/default/val"):
        ev.scan_folder(setup["root"] / "scenes", names, files="runs/default/val/rsscn7.txt")
    with pytest.raises(ev.EvalError, match=r"manifest runs/default/val/ucm.jsonl does not exist: .*training.recipe"):
        ev.read_manifest("runs/default/val/ucm.jsonl")
    with pytest.raises(ev.EvalError, match=r"file list elsewhere.txt does not exist$"):
        ev.scan_folder(setup["root"] / "scenes", names, files="elsewhere.txt")
