"""A checkpoint's word list (backend.model.vocabulary, training.vocabulary): counting, plural forms,
unfamiliar words, the file's errors, the command, the export, and SearchResponse / SegmentResult
unfamiliar_words through a live server and the client (training's own words.json is checked in
test_train, the dock's and Processing's warnings in test_plugin)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from backend.model.vocabulary import RARE_COUNT, WORDS_FILE, TrainingWords, VocabularyError, count_words, words_of

REPO = Path(__file__).resolve().parents[1]


def test_words_counts_and_unfamiliar_words():
    assert words_of("A bird's-eye view of Storage TANKS, 2 piers.") == ["a", "bird's", "eye", "view", "of",
                                                                        "storage", "tanks", "piers"]
    words = TrainingWords(count_words(["storage tanks near a pier"] * 2 + ["a storage tank", "one pier",
                                                                             "many factories", "a factory"]))
    assert words.count("tanks") == words.count("tank") == 3          # singular and plural together
    assert words.count("factory") == words.count("factories") == 2  # -y / -ies
    assert words.count("piers") == 3 and words.count("quarry") == 0
    assert RARE_COUNT == 3
    # in query order, each once (a plural after its singular is the same word), case ignored
    assert words.unfamiliar("Factories and a QUARRY, quarries, storage TANKS") == ["factories", "and", "quarry"]
    assert words.unfamiliar("storage tanks by a pier") == ["by"]
    assert TrainingWords({}).unfamiliar("") == []


def test_words_of_any_script_are_whole_words():
    assert words_of("São Paulo harbour") == ["são", "paulo", "harbour"]
    assert words_of("Café near the Großstadt") == ["café", "near", "the", "großstadt"]   # lower-cased as the tokenizer does
    assert words_of("the bird\u2019s nest") == ["the", "bird's", "nest"]
    assert words_of("ＡＩＲＰＯＲＴ") == ["airport"]                                       # NFKC: full-width letters


def test_close_spellings_catch_typing_errors():
    words = TrainingWords(count_words(["a parking lot beside the residential area and a tennis court"] * 3
                                      + ["one park", "a parking"]))
    assert words.close_spellings("parkng") == ["parking"]
    assert words.close_spellings("resedential") == ["residential"]
    assert words.close_spellings("Tenis") == ["tennis"]
    assert words.close_spellings("quarry") == []                   # nothing near it
    assert words.close_spellings("parkings") == []                 # a form of a familiar word is no typo
    both = TrainingWords(count_words(["residential", "residentials"] * 3))
    assert both.close_spellings("resedential") == ["residential"]  # one form of a word, not two
    assert "park" not in words.close_spellings("parkng", n=5)      # seen twice: not familiar


def test_two_swapped_letters_are_one_typing_error_and_trees_has_no_treees():
    """"hosues", "fiedls" and "rvier" (two letters swapped) got no suggestion, and "treees" passed as
    a plural of "tree" (and "tree" counted "treees" as its own)."""
    words = TrainingWords(count_words(["houses beside fields and a river with trees and churches"] * 3
                                      + ["a box", "two boxes", "one box"]))
    assert words.close_spellings("hosues") == ["houses"]
    assert words.close_spellings("fiedls") == ["fields"]
    assert words.close_spellings("rvier") == ["river"]
    assert words.unfamiliar("treees") == ["treees"] and words.close_spellings("treees") == ["trees"]
    assert words.count("tree") == 3 and TrainingWords({"treees": 5}).count("tree") == 0
    assert words.count("church") == 3 and words.count("box") == 3        # -es plurals still count
    assert words.close_spellings("cat") == []                            # three letters: too many words are one edit away


def test_word_file_round_trip_and_errors(tmp_path):
    assert TrainingWords.load(tmp_path) is None                       # optional: absent is no list
    words = TrainingWords({"pier": 4, "tank": 9}, "toy")
    path = words.save(tmp_path)
    assert path == tmp_path / WORDS_FILE and [p.name for p in tmp_path.iterdir()] == [WORDS_FILE]
    back = TrainingWords.load(tmp_path)
    assert back.counts == {"pier": 4, "tank": 9} and back.source == "toy"
    assert list(json.loads(path.read_text())["words"]) == ["tank", "pier"]   # most frequent first
    for text in ("{not json", json.dumps({"format": "other", "words": {}}),
                 json.dumps({"format": "skyprompt-words", "words": {"pier": -1}}),
                 json.dumps({"format": "skyprompt-words", "words": ["pier"]})):
        path.write_text(text)
        with pytest.raises(VocabularyError) as e:
            TrainingWords.load(tmp_path)
        assert str(path) in str(e.value) and "training.vocabulary" in str(e.value)


def _recipe(tmp_path: Path) -> Path:
    """A folder of two classes with a class map, and a captioned manifest, as a recipe."""
    from PIL import Image

    for cls in ("pier", "tank"):
        (tmp_path / "scenes" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (10 * i, 50, 90)).save(tmp_path / "scenes" / cls / f"{cls}{i}.png")
    (tmp_path / "scenes.json").write_text(json.dumps({"pier": "wooden pier", "tank": "storage tank"}))
    lines = [{"image": f"scenes/pier/pier{i}.png", "class": "pier", "captions": [f"a jetty number {i}"]}
             for i in range(4)]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    recipe = {"sources": [{"name": "scenes", "kind": "folder", "root": "scenes", "classnames": str(tmp_path / "scenes.json"),
                           "val_per_class": 1},
                          {"name": "caps", "kind": "manifest", "path": "captions.jsonl", "val_per_class": 0}]}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    return tmp_path / "recipe.json"


def test_training_vocabulary_command_counts_captions_and_templates(tmp_path, tiny_model, tokenizer):
    from backend.model.checkpoint import save_checkpoint
    from training.templates import TEMPLATES

    recipe = _recipe(tmp_path)
    ckpt = save_checkpoint(tiny_model, tokenizer, tmp_path / "ckpt")
    run = lambda *a: subprocess.run([sys.executable, "-m", "training.vocabulary", *a], cwd=REPO,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    out = run("--recipe", str(recipe), "--checkpoint", str(ckpt))
    assert out.returncode == 0, out.stderr
    words = TrainingWords.load(ckpt)
    assert words.count("jetty") == 4                                   # the manifest's captions
    # the class templates, filled with the human names, for the 3 training images' classes
    assert words.count("wooden") == words.count("storage") == len(TEMPLATES)
    assert words.count("satellite") >= 4 and words.unfamiliar("a wooden jetty by a quarry") == ["by", "quarry"]
    assert "seed 0" in words.source
    out = run("--recipe", str(recipe), "--checkpoint", str(tmp_path / "scenes"))
    assert out.returncode == 2 and "not a checkpoint directory" in out.stderr and "Traceback" not in out.stderr
    out = run("--recipe", str(tmp_path / "none.json"), "--checkpoint", str(ckpt))
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr
    # shards' captions are not listed ahead of training: the list there is kept (an empty one replaced it)
    sharded = tmp_path / "sharded.json"
    sharded.write_text(json.dumps({"sources": [{"kind": "shards", "urls": ["pairs-{000..001}.tar"]}]}))
    before = (ckpt / "words.json").read_bytes()
    out = run("--recipe", str(sharded), "--checkpoint", str(ckpt))
    assert out.returncode == 2 and "has shard sources" in out.stderr and "left as it is" in out.stderr, out.stderr
    assert (ckpt / "words.json").read_bytes() == before
    # a checkpoint that records its run: another --seed, or a recipe of other sources, would count words
    # it never trained on (its list was replaced without a word)
    meta = json.loads((ckpt / "config.json").read_text())
    names = [s.get("name") for s in json.loads(recipe.read_text())["sources"]]
    meta["training"] = {"train_config": {"seed": 3, "sources": [{"name": n} for n in names]}}
    (ckpt / "config.json").write_text(json.dumps(meta))
    out = run("--recipe", str(recipe), "--checkpoint", str(ckpt))
    assert out.returncode == 2 and "trained with --seed 3" in out.stderr and "give --seed 3" in out.stderr, out.stderr
    meta["training"]["train_config"]["sources"] = [{"name": "elsewhere"}]
    (ckpt / "config.json").write_text(json.dumps(meta))
    out = run("--recipe", str(recipe), "--checkpoint", str(ckpt), "--seed", "3")
    assert out.returncode == 2 and "trained on the sources elsewhere" in out.stderr, out.stderr
    assert (ckpt / "words.json").read_bytes() == before
    meta["training"]["train_config"]["sources"] = [{"name": n} for n in names]
    (ckpt / "config.json").write_text(json.dumps(meta))
    assert run("--recipe", str(recipe), "--checkpoint", str(ckpt), "--seed", "3").returncode == 0


def test_a_caption_counts_once_per_image_that_carries_it(tmp_path):
    """A user's caption repeated across a class ("golf fairways ..." on 12 images) trained 12 times:
    its words are familiar; a word of one image's caption is not. The captions every image of a
    folder class shares (its templates, its caption pool) are drawn at random: counted once each."""
    from PIL import Image

    from training import vocabulary

    for cls, n in (("golf", 12), ("harbor", 4), ("tank", 5)):
        (tmp_path / "scenes" / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (16, 16), (10 * i, 60, 90)).save(tmp_path / "scenes" / cls / f"{cls}{i}.png")
    lines = [{"image": f"scenes/golf/golf{i}.png", "captions": ["golf fairways between rows of trees"]}
             for i in range(12)]
    lines += [{"image": "scenes/harbor/harbor0.png", "captions": ["boats moored at a marina"]}]
    lines += [{"image": f"scenes/harbor/harbor{i}.png", "captions": ["boats along a quay", "boats along a quay"]}
              for i in (1, 2, 3)]                               # twice on one image: once for it
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    pool = {"captions": {"tank": ["a refinery with round tanks"]}}
    recipe = {"sources": [{"name": "caps", "kind": "manifest", "path": "captions.jsonl"},
                          {"name": "tanks", "kind": "folder", "root": "scenes", "caption_pool": pool,
                           "classnames": {"golf": "golf course", "harbor": "harbour", "tank": "storage tank"}}]}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    assert vocabulary.main(["--recipe", str(tmp_path / "recipe.json"), "--checkpoint", str(ckpt)]) == 0
    words = TrainingWords.load(ckpt)
    assert words.count("fairways") == 12 and words.count("quay") == 3
    assert words.unfamiliar("golf fairways by a quay") == ["by"]
    assert words.count("marina") == 1 and words.unfamiliar("a marina") == ["marina"]
    # the pool's caption is drawn for the 5 tank images, not trained on by each: once
    assert words.count("refinery") == 1 and words.unfamiliar("a refinery") == ["refinery"]


def test_export_carries_the_word_list(tmp_path, tiny_model, tokenizer):
    from backend.model.checkpoint import checkpoint_hash, save_checkpoint
    from training.export import export_checkpoint

    src = save_checkpoint(tiny_model, tokenizer, tmp_path / "src")
    before = checkpoint_hash(src)
    TrainingWords({"pier": 5}, "toy").save(src)
    assert checkpoint_hash(src) == before          # the list does not change the model's identity
    dst, _, _ = export_checkpoint(src, tmp_path / "dst")
    assert TrainingWords.load(dst).counts == {"pier": 5}
    # an average learned what each of its checkpoints learned; one without a list leaves it unknown
    other = save_checkpoint(tiny_model, tokenizer, tmp_path / "other")
    TrainingWords({"pier": 1, "jetty": 3}, "other run").save(other)
    averaged, _, _ = export_checkpoint(src, tmp_path / "avg", average=[other])
    assert TrainingWords.load(averaged).counts == {"pier": 6, "jetty": 3}
    (other / WORDS_FILE).unlink()
    assert TrainingWords.load(export_checkpoint(src, tmp_path / "avg2", average=[other])[0]) is None
    (src / WORDS_FILE).write_text("{broken")
    with pytest.raises(Exception, match="cannot be read"):
        export_checkpoint(src, tmp_path / "dst2")
    assert not (tmp_path / "dst2").exists()


def test_search_reports_unfamiliar_words_over_the_wire(tmp_path, tiny_model, tokenizer):
    from test_raster import make_tif, noise
    from test_server import LiveServer, client, segment

    from backend.model.checkpoint import save_checkpoint
    from backend.rpc import skyprompt_pb2 as pb

    plain = save_checkpoint(tiny_model, tokenizer, tmp_path / "plain")
    known = save_checkpoint(tiny_model, tokenizer, tmp_path / "known")
    TrainingWords(count_words(["green fields near a road"] * 3)).save(known)
    query = "Green fields, quarries by a roadd"
    broken = save_checkpoint(tiny_model, tokenizer, tmp_path / "broken")
    (broken / WORDS_FILE).write_text("{broken")
    raster = make_tif(tmp_path / "r.tif", noise((3, 128, 128), seed=3))
    as_json = [{"word": "quarries", "close_spellings": []}, {"word": "by", "close_spellings": []},
               {"word": "roadd", "close_spellings": ["road"]}]
    for ckpt, expected in ((known, as_json), (plain, []), (broken, [])):
        live = LiveServer(ckpt, tmp_path / f"data-{ckpt.name}", [tmp_path]).start()
        try:
            info = live.stub.GetInfo(pb.GetInfoRequest(), metadata=live.metadata)
            assert ("unfamiliar_words" in info.capabilities) == bool(expected)
            list(live.stub.IndexRaster(pb.IndexRasterRequest(source=pb.RasterSource(path=str(raster))),
                                       metadata=live.metadata))
            response = live.stub.Search(pb.SearchRequest(query=query, k=3), metadata=live.metadata)
            assert [{"word": w.word, "close_spellings": list(w.close_spellings)}
                    for w in response.unfamiliar_words] == expected and len(response.hits) > 0
            out = client(live, "search", "--json", query)
            assert out.returncode == 0 and json.loads(out.stdout)["unfamiliar_words"] == expected, out.stderr
            out = client(live, "search", query)
            assert out.returncode == 0
            note = "rarely or never saw 'quarries', 'by', 'roadd' (close in spelling: 'road') in training"
            assert (note in out.stderr) == bool(expected), out.stderr
            # Segment names them per prompt, and so does the client
            results, _ = segment(live, raster, ["green fields", "quarries by a roadd"])
            assert [[w.word for w in r.unfamiliar_words] for r in results] == [[], [w["word"] for w in expected]]
            out = client(live, "segment", "--json", "--raster", str(raster), "--prompt", "quarries by a roadd")
            assert out.returncode == 0 and json.loads(out.stdout)["results"][0]["unfamiliar_words"] == expected
            out = client(live, "segment", "--raster", str(raster), "--prompt", "quarries by a roadd")
            assert out.returncode == 0 and ("rarely or never saw" in out.stderr) == bool(expected), out.stderr
        finally:
            live.stop()
        if ckpt == broken:   # the server starts without the list and says why
            assert "cannot be read" in live.log_text() and "unfamiliar words" in live.log_text()
