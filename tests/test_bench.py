"""Smoke test of the model benchmark: `tiny` preset, quick mode, results JSON in a temp dir."""
from __future__ import annotations

import errno
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bench import model_bench


def test_model_bench_quick_tiny_writes_results(tmp_path):
    peers = bool(importlib.util.find_spec("transformers") and importlib.util.find_spec("mammut_pytorch"))
    model_bench.run(presets=["tiny"], quick=True, peers=peers, results_dir=tmp_path, mfu=False, threads=1,
                    echo=lambda *a: None)
    res = json.loads((tmp_path / "model.json").read_text())

    assert {"machine", "settings", "matmul", "encode", "train", "mfu", "targets"} <= set(res)
    m = res["machine"]
    assert m["cpu"] and m["cores"] > 0 and m["torch"] and isinstance(m["bf16_supported"], bool)
    assert res["matmul"]["fp32"]["gflops"] > 0

    if not peers:   # turned off here: the peer's row says so (not "transformers not installed")
        clip = [r["status"] for r in res["encode"] if r["model"] == "hf-clip" and r["dtype"] == "fp32"]
        assert clip == ["skipped: peers off (--no-peers)"]
    models = {"skyprompt", "hf-clip"} if peers else {"skyprompt"}
    fp32 = {r["model"]: r for r in res["encode"] if r["dtype"] == "fp32" and "images_per_s" in r}
    assert set(fp32) == models
    for r in fp32.values():
        assert r["preset"] == "tiny"
        assert r["images_per_s"] > 0 and r["gflop_per_image"] > 0 and r["matmul_fraction"] > 0
    if peers:
        assert fp32["skyprompt"]["vs_clip"] > 0
    for r in res["encode"]:
        if r["dtype"] == "bf16" and not m["bf16_supported"]:
            assert r["status"] == "not supported on this CPU"
        elif r["dtype"] == "bf16" and "images_per_s" in r:
            assert r["cosine_min"] > 0.9

    train = {r["model"]: r for r in res["train"]}
    assert set(train) == ({"skyprompt", "mammut-pytorch"} if peers else {"skyprompt"})
    assert all(r["ms_per_step"] > 0 and r["params"] > 0 for r in train.values())

    targets = res["targets"]
    assert len(targets) == 4 and all(t["result"] in ("PASS", "FAIL", "N/A") for t in targets)
    assert all(t["result"] == "N/A" for t in targets)           # no `base` preset in this run


def test_flop_formulas_match_counted_flops():
    """The analytic encoder FLOPs and the nanoGPT-style MFU numerator agree with torch's FLOP counter
    (attention through the math SDPA backend, so its matmuls are counted too)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from backend.model import MaMMUT, MaMMUTLoss, get_preset

    cfg = get_preset("tiny")
    model = MaMMUT(cfg)
    images, tokens = model_bench.make_batch(cfg, 2)

    def counted(fn):
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            fn()
        return counter.get_total_flops() / 2

    with torch.no_grad():
        enc = counted(lambda: model.encode_image(images))
    assert abs(model_bench.encoder_flops(cfg, "skyprompt") / enc - 1) < 0.01
    train = counted(lambda: MaMMUTLoss()(model(images, tokens), tokens)["loss"].backward())
    assert abs(model_bench.train_flops_per_sample(model) / train - 1) < 0.03
    if importlib.util.find_spec("transformers"):
        clip = model_bench.clip_vision(cfg).eval()
        with torch.no_grad():
            enc = counted(lambda: clip(pixel_values=images))
        assert abs(model_bench.encoder_flops(cfg, "hf-clip") / enc - 1) < 0.01


def test_backend_bench_small_run_writes_results(tmp_path, tokenizer, tiny_config):
    """The backend benchmark end to end on a `tiny` checkpoint and small rasters (real server subprocess)."""
    import torch

    from backend.model import MaMMUT
    from backend.model.checkpoint import save_checkpoint
    from bench import backend_bench

    torch.manual_seed(0)
    ckpt = save_checkpoint(MaMMUT(tiny_config).eval(), tokenizer, tmp_path / "tiny")
    folders = lambda: set(Path(tempfile.gettempdir()).glob("skyprompt-bench-*"))  # noqa: E731
    before = folders()
    backend_bench.run(quick=True, out_dir=tmp_path, checkpoint=ckpt, index_side=256, big_side=1024, deep_side=512,
                      echo=lambda *a: None)
    assert folders() == before          # its rasters, index and server log removed after a run that worked
    res = json.loads((tmp_path / "backend.json").read_text())
    assert res["indexing"]["tiles"] == (256 // tiny_config.image_size) ** 2
    assert res["indexing"]["tiles_per_s"] > 0 and res["indexing"]["ratio_to_bare_model"] > 0
    assert res["indexing"]["bare_model_with_captions_tiles_per_s"] > 0
    assert res["segment"]["tiles"] > 0 and res["segment"]["median_s"] > 0
    assert res["segment"]["no_edge_refinement_median_s"] > 0 and len(res["segment"]["no_edge_refinement_runs_s"]) == 1
    assert res["search_grpc"]["p50_ms"] <= res["search_grpc"]["p99_ms"]
    assert 0 < res["search_grpc"]["raw_query_p50_ms"] <= res["search_grpc"]["raw_query_p99_ms"]
    big = res["large_raster"]
    assert big["tiles"] > 0 and big["peak_rss_mb"] > 100
    # the peak is the large raster's indexing alone (reset before it), not what earlier sections reached
    assert big["peak_rss_of"] == (backend_bench.PEAK_WHILE_INDEXING if sys.platform == "linux"
                                  else backend_bench.PEAK_SO_FAR)
    assert big["rss_before_indexing_mb"] <= big["peak_rss_mb"] and "peak_rss_before_mb" not in big
    thumbs = res["search_thumbnails"]
    assert thumbs["thumbnails"] == thumbs["hits"] > 0 and thumbs["median_ms"] > 0 < thumbs["no_thumbnails_median_ms"]
    assert [t["result"] in ("PASS", "FAIL") for t in res["targets"]] == [True, True]


def test_training_bench_quick_tiny_writes_results(tmp_path):
    from bench import training_bench
    from backend.model.precision import cpu_supports_bf16

    training_bench.run(presets=["tiny"], quick=True, results_dir=tmp_path, threads=1, echo=lambda *a: None)
    res = json.loads((tmp_path / "training.json").read_text())
    rows = {r["precision"]: r for r in res["rows"]}
    assert rows["fp32"]["samples_per_s"] > 0 and rows["fp32"]["params"] > 0
    if res["settings"]["peer"]:
        assert rows["fp32"]["vs_peer"] == rows["fp32"]["samples_per_s"] / rows["fp32"]["peer_samples_per_s"]
    if not cpu_supports_bf16():
        assert rows["bf16"]["status"] == "not supported on this CPU"
        assert [t["result"] for t in res["targets"]][1] == "N/A"


def test_search_quality_metrics_and_mosaic_geometry(tmp_path, tokenizer, tiny_config):
    """Average precision on a known case; mosaic cells map back to their images' classes; one small
    end-to-end run through a real server with a `tiny` (random) checkpoint."""
    import numpy as np
    import torch
    from osgeo import gdal
    from PIL import Image

    from backend.model import MaMMUT
    from backend.model.checkpoint import save_checkpoint
    from backend.rpc import skyprompt_pb2 as pb
    from bench import search_quality_bench as sq
    from bench.backend_bench import _Server
    from training.data import Record

    # relevant at ranks 1 and 3 of 2 relevant items: (1/1 + 2/3) / 2
    assert sq.average_precision([True, False, True, False], 2) == (1 + 2 / 3) / 2
    assert sq.average_precision([False, False], 3) == 0.0

    rng = np.random.default_rng(0)
    records = []
    for cls, colour in (("red", (200, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 200))):
        for i in range(4):
            path = tmp_path / f"{cls}{i}.png"
            pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path)
            records.append(Record(str(path), ("x",), cls))
    mosaic, classes = sq.build_mosaic(records, tmp_path / "m.tif")
    ds = gdal.Open(str(mosaic))
    assert ds.RasterXSize == ds.RasterYSize == 4 * sq.CHIP and classes.shape == (4, 4)
    data = ds.ReadAsArray()
    for r in range(4):
        for c in range(4):
            x = sq.ORIGIN[0] + (c + 0.5) * sq.CHIP * sq.PIXEL
            y = sq.ORIGIN[1] - (r + 0.5) * sq.CHIP * sq.PIXEL
            cls = sq.class_at(classes, x, y)
            assert cls == classes[r, c]
            if cls:   # the cell holds that class's colour
                mean = data[:, r * sq.CHIP:(r + 1) * sq.CHIP, c * sq.CHIP:(c + 1) * sq.CHIP].mean(axis=(1, 2))
                assert int(np.argmax(mean)) == ["red", "green", "blue"].index(cls)

    torch.manual_seed(0)
    ckpt = save_checkpoint(MaMMUT(tiny_config).eval(), tokenizer, tmp_path / "tiny")
    server = _Server(ckpt, tmp_path / "data", tmp_path)
    try:
        result = sq.evaluate_set(server.stub, pb, "toy", records, {"red": "red roofs", "blue": "blue water"},
                                 tmp_path, class_queries={"red": "red", "green": "green", "blue": "blue"})
    finally:
        server.stop()
    assert result["images"] == 12 and result["classes"] == 2
    # tiles are resampled so that one tile covers one chip: a 4 x 4 grid of chips is 16 tiles
    assert result["tiles"] == 16
    for v in result["per_class"].values():
        assert 0.0 <= v["p_at_10"] <= 1.0 and 0.0 <= v["ap"] <= 1.0 and v["images"] == 4
    # the peer in the same run: the same queries embedded as typed, reported beside the default
    assert result["raw_query"]["classes"] == 2 and set(result["raw_query"]["per_class"]) == {"red", "blue"}
    # and the default queries without keyword matching against the tiles' captions
    assert set(result["no_keywords"]["per_class"]) == {"red", "blue"}
    # and the mosaic indexed again with four views per tile, timed beside the one-view index
    views = result["views"]
    assert views["views"] == sq.VIEWS_PEER == 4 and set(views["per_class"]) == {"red", "blue"}
    assert views["index_seconds"] > 0 and result["index_seconds"] > 0
    assert 0.0 <= views["mean_p_at_10"] <= 1.0
    # and the default queries expanded from their best tiles, on the one-view index
    expanded = result["expanded"]
    assert expanded["expand"] == sq.EXPAND_PEER == 3 and set(expanded["per_class"]) == {"red", "blue"}
    assert 0.0 <= expanded["mean_p_at_10"] <= 1.0
    # and the class names as queries, every class of the mosaic
    assert set(result["class_names"]["per_class"]) == {"red", "green", "blue"}
    assert result["class_names"]["per_class"]["green"]["query"] == "green"
    # the bundled maps name every class the benchmark's worded queries do
    for name in ("rsscn7", "ucm", "aid"):
        assert set(sq.class_name_queries(name)) == set(json.loads(sq.QUERIES.read_text())[name])
    assert sq.class_name_queries("ucm")["storagetanks"] == "storage tanks"
    text = sq.report({"sets": {"toy": result}, "targets": []})
    assert "class names as queries" in text
    assert "query as typed" in text and "N views per tile" in text and "| 4: " in text
    assert "expanded from N tiles" in text and "| 3: " in text and "no keyword matching" in text
    # a Markdown table: header, separator and rows of one width (a wider separator showed it as text)
    header, separator, row = text.splitlines()[:3]
    assert header.count("|") == separator.count("|") == row.count("|")


def test_dataset_bench_quick_writes_results(tmp_path):
    from bench import dataset_bench

    res = dataset_bench.run(quick=True, out_dir=tmp_path, echo=lambda *a: None, ray=False, side=512, filter_pairs=24,
                            two_processes=False)
    saved = json.loads((tmp_path / "dataset.json").read_text())
    assert saved["landmarks"]["local, 1 process"]["tiles"] == 4 and res["landmarks"]["local, 1 process"]["kept"] > 0
    assert all(r["tiles_per_s"] > 0 for r in saved["landmarks"].values())
    assert saved["landmarks"]["local, 1 process"]["ratio_vs_1_process"] == 1.0
    assert list(saved["landmarks"]) == ["local, 1 process"]     # ray=False: no Ray row, installed or not
    if saved["filter"] is not None:
        assert saved["filter"]["pairs"] == 24 and saved["filter"]["pairs_per_s"] > 0


def test_training_data_bench_quick_writes_results(tmp_path):
    import torch

    from bench import training_data_bench

    training_data_bench.run(quick=True, out_dir=tmp_path, echo=lambda *a: None, workers=1, images=24)
    saved = json.loads((tmp_path / "training_data.json").read_text())
    pipelines = [(r["pipeline"].split()[0], r["device"]) for r in saved["rows"]]
    assert pipelines[:2] == [("loader", "cpu"), ("bank", "cpu")] and saved["rows"][0]["vs_loader"] == 1.0
    assert all(r["samples_per_s"] > 0 for r in saved["rows"]) and saved["bank_images_per_s"] > 0
    assert saved["targets"][0]["result"] in (("PASS", "FAIL") if torch.cuda.is_available() else ("N/A",))
    assert "24 " in saved["images"]


def test_gpu_bench_skips_without_cuda_and_runs_its_sections_on_the_cpu(tmp_path, monkeypatch):
    """The GPU benchmark's code paths, run on the CPU with a `tiny` model (CI has no GPU; the numbers
    mean nothing here). Without CUDA, asking for the GPU writes a skip record instead of failing."""
    import torch
    from bench import gpu_bench

    if not torch.cuda.is_available():
        res = gpu_bench.run(results_dir=tmp_path / "skip", echo=lambda *a: None)
        assert res["skipped"] and json.loads((tmp_path / "skip" / "gpu.json").read_text())["skipped"]

    monkeypatch.setitem(gpu_bench.MODELS, "tiny-64", ({"preset": "tiny"}, 2))
    printed = []
    gpu_bench.run(quick=True, compile_model=False, peers=False, device="cpu", models=("tiny-64",),
                  results_dir=tmp_path, echo=printed.append)
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["matmul"]["tflops"] > 0
    assert [(r["model"], r["dtype"]) for r in res["encode"]] == [("skyprompt", "fp32"), ("skyprompt", "bf16")]
    assert all(r["images_per_s"] > 0 and r["tflops"] > 0 for r in res["encode"])
    (train,) = res["train"]
    assert train["model_label"] == "tiny-64" and not train["compiled"] and train["batch"] == 2
    assert train["ms_per_step"] > 0 and train["flops_per_step"] > 0 and 0 < train["mfu"] < 1
    if res["engine"] is not None:                # the bundled checkpoint, on the CPU only here
        assert set(res["engine"]) >= {"cpu", "checkpoint"} and "cuda" not in res["engine"]
        assert res["engine"]["cpu"]["tiles_per_s"] > 0 and res["engine"]["cpu"]["caption_ms"] > 0
        assert res["engine"]["cpu"]["edge_refine_s"] > 0 and res["engine"]["edge_side"] == 512
        cpu = res["engine"]["cpu"]      # 8 tiles x 5 prompts: 40 maps per timed call
        assert res["engine"]["sao_tiles"] == 8 and cpu["sao_maps_per_s"] == pytest.approx(5 * cpu["sao_tiles_per_s"])
        assert "edge refine s" in printed[-1] and "SAO tiles/s (5 maps each)" in printed[-1]
    assert "training step, bf16 autocast" in printed[-1]


def test_bench_arguments_are_checked_before_any_benchmark_runs(tmp_path, capsys):
    """A results folder that cannot be written, or an unknown preset, was found after the whole run
    (a traceback at its end); each is one line and exit status 2 before anything runs."""
    from bench import run as bench_run
    from bench import search_quality_bench
    from bench import BenchError
    from conftest import run_main

    (tmp_path / "a_file").write_text("")
    r = run_main(bench_run.main, ["--only", "index", "--quick", "--results-dir", tmp_path / "a_file" / "sub"], capsys)
    assert r.returncode == 2 and r.stdout == "" and "--results-dir" in r.stderr and "cannot write results" in r.stderr
    r = run_main(bench_run.main, ["--only", "model", "--quick", "--presets", "small,bogus",
                                  "--results-dir", tmp_path / "out"], capsys)
    assert r.returncode == 2 and "--presets: unknown preset(s) bogus; choose from tiny" in r.stderr and r.stdout == ""
    r = run_main(lambda argv: bench_run.run_one("model", argv), ["--help"], capsys)   # python -m bench.model_bench --help
    assert r.returncode == 0 and "--presets" in r.stdout
    with pytest.raises(BenchError, match="--sets: unknown set.s. bogus"):
        search_quality_bench.check_inputs(None, "ucm,bogus", tmp_path / "out")
    with pytest.raises(BenchError, match="not a checkpoint folder"):
        search_quality_bench.check_inputs(tmp_path, "ucm", tmp_path / "out")


def test_search_quality_in_bench_run_takes_its_sets_and_quick_searches_one(tmp_path, capsys, monkeypatch):
    """bench.run --quick ran all three search mosaics (minutes); it runs UC Merced's, --search-sets
    chooses, and an unknown set is refused before anything runs. The searches themselves are
    stood in for here (they take minutes; test_search_quality_metrics_and_mosaic_geometry runs one)."""
    from bench import run as bench_run
    from bench import search_quality_bench as sq
    from conftest import run_main

    asked = []
    monkeypatch.setattr(sq, "run", lambda out_dir=None, sets=None, **kw: asked.append(sets) or {})
    monkeypatch.setattr(sq, "REPO", tmp_path / "repo")                    # shared data "there"
    (tmp_path / "shared" / "data").mkdir(parents=True)
    for extra, sets in ((["--quick"], ["ucm"]), ([], None), (["--search-sets", "aid,rsscn7"], ["aid", "rsscn7"]),
                        (["--search-sets", "ucm, aid"], ["ucm", "aid"])):     # checked " aid" reached run() as is
        r = run_main(bench_run.main, ["--only", "search_quality", "--results-dir", tmp_path / "out", *extra], capsys)
        assert r.returncode == 0 and asked[-1] == sets, (extra, asked, r.stderr)
    r = run_main(bench_run.main, ["--only", "search_quality", "--search-sets", "ucm,mars",
                                  "--results-dir", tmp_path / "out"], capsys)
    assert r.returncode == 2 and "--search-sets: unknown set(s) mars; choose from rsscn7, ucm, aid" in r.stderr


def _disk_full_midway(monkeypatch):
    """A results file's bytes are written, and putting them on disk fails as a full disk does (the
    other files a benchmark writes, a tile index's, are left to work)."""
    import os
    real = os.fsync

    def full(fd):
        if ".json." not in os.readlink(f"/proc/self/fd/{fd}"):
            return real(fd)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)


def _write_model(out, monkeypatch):
    from bench import model_bench

    monkeypatch.setattr(model_bench, "matmul_gflops", lambda *a: {"gflops": 1.0})       # nothing timed
    monkeypatch.setattr(model_bench, "bench_encode", lambda *a: [])
    model_bench.run(presets=["tiny"], train_presets=[], peers=False, mfu=False, threads=1, results_dir=out,
                    echo=lambda *a: None)


def _write_index(out, monkeypatch):
    from bench import index_bench

    index_bench.run(sizes=[20], dim=8, queries=2, warmup=1, ann=False, out_dir=out, echo=lambda *a, **k: None)


def _write_gpu(out, monkeypatch):
    from bench import gpu_bench

    # nothing timed: rows as the sections give them
    monkeypatch.setattr(gpu_bench, "bench_matmul", lambda *a: {"n": 1, "tflops": 1.0})
    monkeypatch.setattr(gpu_bench, "bench_encode", lambda label, *a: [
        {"model_label": label, "model": "skyprompt", "dtype": "fp32", "batch": 1, "images_per_s": 1.0,
         "ms_per_batch": 1.0, "tflops": 1.0}])
    monkeypatch.setattr(gpu_bench, "bench_train", lambda label, dev, warm, iters, compiled, batch: {
        "model_label": label, "batch": batch, "compiled": compiled, "ms_per_step": 1.0, "samples_per_s": 1.0,
        "tflops": 1.0, "mfu": 0.1, "peak_memory_gib": None, "first_step_s": 1.0})
    monkeypatch.setattr(gpu_bench, "bench_engine", lambda *a, **k: None)
    gpu_bench.run(quick=True, compile_model=False, peers=False, device="cpu", models=("small-128",), results_dir=out,
                  echo=lambda *a: None)


def _write_saved(out, monkeypatch):
    from bench import save_results

    save_results({"new": 1}, "saved", out)


@pytest.mark.parametrize("name, write", [("saved", _write_saved), ("model", _write_model), ("index", _write_index),
                                         ("gpu", _write_gpu)])
def test_results_files_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch, name, write):
    """save_results, model, index and gpu wrote the results file itself: a write that failed midway
    (a full disk, a killed run) left half a JSON file where the last run's results were. Now the
    text goes to a temporary file beside it, renamed over it once whole."""
    out = tmp_path / "results"
    out.mkdir()
    (out / f"{name}.json").write_text('{"earlier": true}\n')
    _disk_full_midway(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        write(out, monkeypatch)
    assert json.loads((out / f"{name}.json").read_text()) == {"earlier": True}
    assert [p.name for p in out.iterdir()] == [f"{name}.json"]        # no temporary file left behind
    monkeypatch.undo()
    write(out, monkeypatch)                                             # and a write that works replaces it
    assert "earlier" not in json.loads((out / f"{name}.json").read_text())
    assert [p.name for p in out.iterdir()] == [f"{name}.json"]


def test_gpu_bench_without_cuda_keeps_a_gpu_runs_results(tmp_path, monkeypatch):
    """On a machine without CUDA, running every benchmark replaced the gpu.json a GPU machine wrote
    with {"skipped": ...}; it is kept, and the run says so. With no results (or a skip record) there,
    the skip record is written as before."""
    from bench import gpu_bench

    monkeypatch.setattr(gpu_bench.torch.cuda, "is_available", lambda: False)
    gpu = {"machine": {"gpu": "H100"}, "matmul": {"n": 8192, "tflops": 748.0}, "encode": [], "train": []}
    (tmp_path / "gpu.json").write_text(json.dumps(gpu))
    printed = []
    res = gpu_bench.run(results_dir=tmp_path, echo=printed.append)
    assert res["skipped"] and json.loads((tmp_path / "gpu.json").read_text()) == gpu
    assert printed == [f"GPU benchmark skipped: no CUDA GPU on this machine; kept the GPU results already in "
                       f"{tmp_path / 'gpu.json'}"]
    for earlier in ('{"skipped": "no CUDA GPU on this machine"}', None):
        if earlier is None:
            (tmp_path / "gpu.json").unlink()
        else:
            (tmp_path / "gpu.json").write_text(earlier)
        gpu_bench.run(results_dir=tmp_path, echo=lambda *a: None)
        assert json.loads((tmp_path / "gpu.json").read_text())["skipped"] == "no CUDA GPU on this machine"


def test_bench_list_options_that_name_nothing_are_refused(tmp_path, capsys, monkeypatch):
    """`--presets ,` or `--presets ''` ran a model benchmark that measured nothing and replaced
    model.json with it; `--training-presets` alike; `--search-sets ''` and search_quality_bench
    `--sets ''` quietly ran all three sets where `,` was refused. Each is one line and exit status 2."""
    from bench import BenchError
    from bench import model_bench
    from bench import run as bench_run
    from bench import search_quality_bench as sq
    from conftest import run_main

    out = tmp_path / "out"
    for only, option, value in (("model", "--presets", ","), ("model", "--presets", ""), ("model", "--presets", " , "),
                                ("training", "--training-presets", ","), ("training", "--training-presets", ""),
                                ("search_quality", "--search-sets", ""), ("search_quality", "--search-sets", ",")):
        r = run_main(lambda argv: bench_run.run_one(only, argv), [option, value, "--results-dir", out], capsys)
        assert r.returncode == 2 and r.stdout == "", (option, value, r)
        assert r.stderr == f"error: {option}: {value!r} names no {option.split('-')[-1][:-1]}; give one or more of " \
            f"{'rsscn7, ucm, aid' if only == 'search_quality' else 'tiny, small, base, large'}, comma-separated\n"
    assert not list(out.glob("*.json"))
    for value in ("", ","):                             # python -m bench.search_quality_bench --sets ...
        with pytest.raises(BenchError, match=f"--sets: {value!r} names no set"):
            sq.check_inputs(None, value, out)
    # the names as checked reach the run: "tiny, small" was run as "tiny" and " small"
    asked = []
    monkeypatch.setattr(model_bench, "run", lambda presets, **kw: asked.append(presets))
    r = run_main(bench_run.main, ["--only", "model", "--presets", "tiny, small", "--results-dir", out], capsys)
    assert r.returncode == 0 and asked == [["tiny", "small"]]


def test_index_bench_arguments_are_checked(tmp_path, capsys):
    """--sizes -5 was a numpy traceback, --queries 0 an IndexError and --dim 0 a TileIndexError, each
    after the work began; --sizes 0 ran and wrote n=0. One line naming the option, exit status 2."""
    from bench import index_bench
    from bench import run as bench_run
    from conftest import run_main

    out = tmp_path / "out"
    for args, line in ((["--sizes", "-5"], "--sizes -5: the number of stored embeddings must be 1 or more"),
                       (["--sizes", "10", "0"], "--sizes 0: the number of stored embeddings must be 1 or more"),
                       (["--sizes", "10", "--queries", "0"], "--queries 0: the number of timed queries must be 1 or more"),
                       (["--sizes", "10", "--dim", "0"], "--dim 0: the embedding dimension must be 1 or more")):
        r = run_main(index_bench.cli, [*args, "--results-dir", out], capsys)
        assert (r.returncode, r.stdout, r.stderr) == (2, "", f"error: {line}\n"), args
    r = run_main(bench_run.main, ["--only", "index", "--index-sizes", "0", "--results-dir", out], capsys)
    assert (r.returncode, r.stderr) == (2, "error: --index-sizes 0: the number of stored embeddings must be 1 or more\n")
    assert not (out / "index.json").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="resetting a process's peak RSS is Linux's /proc/<pid>/clear_refs")
def test_backend_bench_resets_the_servers_peak_rss_before_the_large_raster():
    """The large-raster row reported the server's lifetime peak RSS (reached in earlier sections) as
    its peak while indexing. reset_peak_rss sets a process's peak back to its RSS now, so the peak
    read after a section is that section's; here a child that held 200 MB earlier."""
    from bench import backend_bench

    child = subprocess.Popen([sys.executable, "-c", "import sys; b = b'x' * (200 << 20); del b; print(flush=True); "
                              "sys.stdin.readline()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        child.stdout.readline()                         # it has held 200 MB and freed them
        before = backend_bench.peak_rss_mb(child.pid)
        assert before > 200
        assert backend_bench.reset_peak_rss(child.pid)
        after = backend_bench.peak_rss_mb(child.pid)
        assert after < before - 150 and after == pytest.approx(backend_bench.rss_mb(child.pid), abs=5)
    finally:
        child.communicate("\n", timeout=30)
    assert not backend_bench.reset_peak_rss(child.pid)   # gone: the row then says "server peak so far"
