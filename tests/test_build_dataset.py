"""`python -m training.build_dataset landmarks` on a real GeoTIFF (UTM) with an OpenStreetMap .osm file
and a GeoPackage in EPSG:4326 that the tests write: captions name the right tiles, nodata tiles are
skipped, the shards train, a re-run does nothing, and bad input gets clear messages."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal, ogr, osr
from PIL import Image, ImageDraw

from conftest import run_main
from test_raster import GEOTIFF_DIR, make_tif, noise
from test_server import REPO

from training.datasets import landmarks as LM

COLORADO = GEOTIFF_DIR / "colorado_aerial_0p15m.tif"
TILE = 64


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "training.build_dataset", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def refused(capfd, *args):
    """training.build_dataset's main in this process (conftest.run_main), for refusals: no new
    interpreter and torch import per case; `capfd` sees what GDAL writes to stderr too."""
    from training.build_dataset import main

    return run_main(main, args, capfd)


def _srs(crs: str):
    """A CRS from anything GDAL reads as one ("EPSG:32632", WKT), in x, y (lon, lat) axis order."""
    srs = osr.SpatialReference()
    srs.SetFromUserInput(crs)
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    return srs


def _to_wgs84(crs: str):
    """(x, y) in `crs` -> (lon, lat)."""
    ct = osr.CoordinateTransformation(_srs(crs), _srs("EPSG:4326"))
    return lambda x, y: ct.TransformPoint(x, y)[:2]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A raster (the shared aerial GeoTIFF when present, else a generated one), its left 64 columns set
    to nodata, and tile centres in WGS 84."""
    root = tmp_path_factory.mktemp("landmarks")
    if COLORADO.is_file():
        src = gdal.Open(str(COLORADO))
        data = np.stack([src.GetRasterBand(b + 1).ReadAsArray() for b in range(3)])
        gt, wkt = src.GetGeoTransform(), src.GetProjection()
    else:
        data = noise((3, 232, 383), seed=4)
        gt, wkt = (519467.5, 0.15, 0.0, 4311669.8, 0.0, -0.15), None
    data = np.maximum(data, 1)
    data[:, :, :TILE] = 0                                                   # a nodata strip: one column of tiles
    crs = _srs(wkt or "EPSG:26913").ExportToWkt()
    raster = make_tif(root / "scene.tif", data, geotransform=gt, crs=crs, nodata=0)
    to_wgs = _to_wgs84(crs)

    def centre(col, row):   # the centre of tile (col, row) of the TILE-pixel grid, in WGS 84
        return to_wgs(gt[0] + (col + 0.5) * TILE * gt[1], gt[3] + (row + 0.5) * TILE * gt[5])

    def corner(px, py):
        return to_wgs(gt[0] + px * gt[1], gt[3] + py * gt[5])

    return {"root": root, "raster": raster, "centre": centre, "corner": corner, "width": data.shape[2],
            "height": data.shape[1]}


@pytest.fixture(scope="module")
def vectors(scene):
    root = scene["root"]
    school = scene["centre"](2, 1)                     # inside tile column 2, row 1
    a, b = scene["corner"](64, 2 * 64 + 20), scene["corner"](383, 2 * 64 + 20)   # a street along tile row 2
    osm = root / "city.osm"
    osm.write_text(f"""<?xml version="1.0" encoding="UTF-8"?>
<osm version="0.6" generator="test">
  <node id="1" lat="{school[1]:.9f}" lon="{school[0]:.9f}" version="1">
    <tag k="name" v="Lincoln Elementary School"/><tag k="amenity" v="school"/>
  </node>
  <node id="2" lat="{a[1]:.9f}" lon="{a[0]:.9f}" version="1"/>
  <node id="3" lat="{b[1]:.9f}" lon="{b[0]:.9f}" version="1"/>
  <way id="10" version="1"><nd ref="2"/><nd ref="3"/><tag k="highway" v="residential"/></way>
</osm>
""")
    gpkg = root / "landuse.gpkg"
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(gpkg))
    layer = ds.CreateLayer("landuse", _srs("EPSG:4326"), ogr.wkbPolygon)
    layer.CreateField(ogr.FieldDefn("landuse", ogr.OFTString))
    ring = ogr.Geometry(ogr.wkbLinearRing)
    for px, py in ((64, 0), (scene["width"], 0), (scene["width"], 64), (64, 64), (64, 0)):  # tile row 0
        x, y = scene["corner"](px, py)
        ring.AddPoint_2D(x, y)
    poly = ogr.Geometry(ogr.wkbPolygon)
    poly.AddGeometry(ring)
    f = ogr.Feature(layer.GetLayerDefn())
    f.SetField("landuse", "residential")
    f.SetGeometry(poly)
    layer.CreateFeature(f)
    ds = None
    return {"osm": osm, "gpkg": gpkg}


@pytest.fixture(scope="module")
def built(scene, vectors):
    out = scene["root"] / "out"
    p = run("landmarks", "--raster", scene["raster"], "--features", vectors["osm"], "--features", vectors["gpkg"],
            "--out", out, "--tile-size", TILE, "--unit-tiles", 8, "--workers", 2)
    assert p.returncode == 0, p.stderr
    return out, p


def test_named_features_caption_exactly_their_tiles_and_nodata_is_skipped(built, scene):
    out, p = built
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    cols, nrows = -(-scene["width"] // TILE), -(-scene["height"] // TILE)
    assert summary["tiles_seen"] == cols * nrows and summary["skipped"]["skipped_nodata"] == nrows
    assert summary["kept"] == len(rows) > 0
    named = [r for r in rows if "Lincoln Elementary School" in r["caption"]]
    assert len(named) == 1
    x, y = named[0]["extent"][0], named[0]["extent"][3]
    gt = gdal.Open(str(scene["raster"])).GetGeoTransform()
    assert (round((x - gt[0]) / gt[1] / TILE), round((y - gt[3]) / gt[5] / TILE)) == (2, 1)
    for r in rows:
        assert set(r) >= {"key", "caption", "extent", "crs", "raster"} and r["crs"] == "EPSG:26913"
        assert r["extent"][0] >= gt[0] + TILE * gt[1] - 1e-6         # never a tile of the nodata strip
    assert any("residential street" in r["caption"] for r in rows)       # the OSM way, on its row
    assert any("residential buildings" in r["caption"] for r in rows)    # the GeoPackage cover
    assert summary["vocabulary"] > 5 and summary["caption_words"]["mean"] > 3


def test_shards_open_in_the_training_reader(built):
    out, _ = built
    from training.data import WebDatasetShards

    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    data = WebDatasetShards(shards, transform=lambda im: np.asarray(im), seed=0, shuffle_buffer=1)
    samples = [s for s in data if s is not None]
    manifest = (out / "manifest.jsonl").read_text().splitlines()
    assert len(samples) == len(manifest) and all(isinstance(c, str) and c for _, c in samples)
    assert samples[0][0].shape == (TILE, TILE, 3)


def test_rerun_is_a_no_op(built, scene, vectors):
    out, _ = built
    before = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}
    p = run("landmarks", "--raster", scene["raster"], "--features", vectors["osm"], "--features", vectors["gpkg"],
            "--out", out, "--tile-size", TILE, "--unit-tiles", 8)
    assert p.returncode == 0 and "already done" in p.stderr
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")} == before
    # other settings into the same folder would mix two datasets: refused, nothing touched
    summary = (out / "summary.json").read_text()
    p = run("landmarks", "--raster", scene["raster"], "--features", vectors["osm"], "--features", vectors["gpkg"],
            "--out", out, "--tile-size", TILE, "--unit-tiles", 4)
    assert p.returncode == 2 and "unit_tiles: 8 before, 4 now" in p.stderr and "Traceback" not in p.stderr
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")} == before
    assert (out / "summary.json").read_text() == summary


def test_a_summary_write_that_fails_midway_leaves_the_previous_summary_whole(built, scene, vectors, monkeypatch):
    """A run that dies while writing summary.json (disk full: part of the text written, then an error)
    leaves the previous run's summary.json as it was, not a truncated file."""
    out, _ = built
    before = (out / "summary.json").read_text()
    write_text = Path.write_text

    def disk_fills(self, text, *args, **kwargs):
        if not self.name.startswith("summary.json"):
            return write_text(self, text, *args, **kwargs)
        write_text(self, text[:len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_fills)
    with pytest.raises(OSError, match="No space left"):
        _build(scene["raster"], vectors["osm"], out, "--features", vectors["gpkg"], "--unit-tiles", 8)
    monkeypatch.undo()
    assert (out / "summary.json").read_text() == before
    json.loads(before)


def test_bad_input(scene, vectors, tmp_path, capfd):
    far = tmp_path / "far.geojson"
    far.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "properties":
                   {"name": "Elsewhere", "amenity": "school"}, "geometry": {"type": "Point", "coordinates": [10, 50]}}]}))
    broken = tmp_path / "broken.tif"
    broken.write_text("not a raster")
    p = run("landmarks", "--raster", scene["raster"], "--raster", broken, "--features", far, "--out", tmp_path / "o",
            "--tile-size", TILE)
    # nothing to build: an error before any tile is cut, saying why (and the unreadable raster skipped)
    assert p.returncode == 2 and "none of the 1 feature(s) with a caption" in p.stderr, p.stderr
    assert "lies on the rasters" in p.stderr and "unreadable raster" in p.stderr
    assert not (tmp_path / "o" / "parts").exists()
    mapping = tmp_path / "tags.tsv"
    mapping.write_text("# my tags\nshop=bakery\ta bakery\tobject\nshop=butcher a butcher object\n")
    p = refused(capfd, "landmarks", "--raster", scene["raster"], "--features", vectors["osm"], "--out", tmp_path / "o2",
            "--mapping", mapping)
    assert p.returncode == 2 and f"{mapping} line 3" in p.stderr and "Traceback" not in p.stderr
    p = refused(capfd, "landmarks", "--raster", scene["raster"], "--features", far, "--out", mapping, "--tile-size", TILE)
    assert p.returncode == 2 and "is a file" in p.stderr and "Traceback" not in p.stderr
    assert mapping.read_text().startswith("# my tags")
    # every raster unreadable: an error, not an empty dataset and exit 0
    p = refused(capfd, "landmarks", "--raster", broken, "--raster", tmp_path / "missing.tif", "--features", far,
            "--out", tmp_path / "o3", "--tile-size", TILE)
    assert p.returncode == 2 and "none of the 2 raster(s) could be read" in p.stderr
    assert f"{tmp_path / 'missing.tif'} does not exist" in p.stderr and "server" not in p.stderr


def test_template_captions_and_mapping_rules():
    rules = LM.read_mapping(LM.DEFAULT_MAPPING)
    assert LM.match(rules, {"amenity": "parking"}) == ("a parking lot", "object")
    assert LM.match(rules, {"leisure": "dog_park"}) == ("a dog park", "object")
    assert LM.match(rules, {"building": "no"}) is None
    features = [{"name": "Lincoln Elementary School", "phrase": "a school", "kind": "object", "share": 0.1},
                {"name": "", "phrase": "a parking lot", "kind": "object", "share": 0.05},
                {"name": "", "phrase": "a baseball field", "kind": "object", "share": 0.04},
                {"name": "", "phrase": "residential buildings", "kind": "cover", "share": 0.7}]
    captions = {LM.template_caption(features, f"k{i}") for i in range(20)}
    assert len(captions) > 3                                              # varied sentence patterns
    for c in captions:
        assert c.count("Lincoln Elementary School") == 1 and "a parking lot" in c and "residential buildings" in c
    assert LM.template_caption(features, "same") == LM.template_caption(features, "same")


def test_custom_captioner_command(scene, vectors, tmp_path):
    script = tmp_path / "cap.py"
    script.write_text("import json, sys\ninfo = json.load(sys.stdin)\n"
                      "print('custom: ' + ', '.join(sorted(f['phrase'] or f['name'] for f in info['features'])))\n")
    out = tmp_path / "c"
    p = run("landmarks", "--raster", scene["raster"], "--features", vectors["osm"], "--out", out, "--tile-size", TILE,
            "--captioner", f"{sys.executable} {script}")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert rows and all(r["caption"].startswith("custom: ") for r in rows)
    # a captioner that is not there, or that hangs: one line naming it
    p = run("landmarks", "--raster", scene["raster"], "--features", vectors["osm"], "--out", tmp_path / "d",
            "--tile-size", TILE, "--captioner", str(tmp_path / "no-such-captioner"))
    assert p.returncode == 2 and "cannot run the captioner" in p.stderr and "Traceback" not in p.stderr


def test_a_hanging_captioner_times_out(scene, vectors, tmp_path, monkeypatch, capsys):
    from training import build_dataset

    monkeypatch.setattr(LM, "CAPTIONER_TIMEOUT_S", 1)
    code = build_dataset.main(["landmarks", "--raster", str(scene["raster"]), "--features", str(vectors["osm"]),
                               "--out", str(tmp_path / "h"), "--tile-size", str(TILE), "--workers", "1",
                               "--captioner", f"{sys.executable} -c 'import time; time.sleep(30)'"])
    assert code == 2 and "gave no caption within 1 s" in capsys.readouterr().err


def test_a_python_captioner_that_raises_is_one_line_and_leaves_no_part_file(scene, vectors, tmp_path, monkeypatch,
                                                                           capsys):
    from training import build_dataset

    (tmp_path / "my_captioner.py").write_text("def caption(info):\n    raise KeyError('phrase')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "p"
    code = build_dataset.main(["landmarks", "--raster", str(scene["raster"]), "--features", str(vectors["osm"]),
                               "--out", str(out), "--tile-size", str(TILE), "--workers", "1",
                               "--captioner", "my_captioner:caption"])
    err = capsys.readouterr().err
    assert code == 2 and "captioner my_captioner:caption failed on tile" in err and "(KeyError: 'phrase')" in err, err
    assert not list(out.rglob("*.part"))


# ---- rasters and vectors of other shapes ---------------------------------------------------------
UTM32 = "EPSG:32632"
ORIGIN = (500000.0, 5000128.0)          # top-left corner of the small rasters below
NORTH_UP = (ORIGIN[0], 1.0, 0.0, ORIGIN[1], 0.0, -1.0)      # 1 m pixels


def _gpkg(path: Path, layers: dict) -> Path:
    """A GeoPackage: {layer name: (CRS, [(WKT, {field: value}), ...])}."""
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    for name, (crs, features) in layers.items():
        layer = ds.CreateLayer(name, _srs(crs), ogr.wkbUnknown)
        for field in sorted({k for _, fields in features for k in fields}):
            layer.CreateField(ogr.FieldDefn(field, ogr.OFTString))
        for wkt, fields in features:
            f = ogr.Feature(layer.GetLayerDefn())
            for k, v in fields.items():
                f.SetField(k, v)
            f.SetGeometry(ogr.CreateGeometryFromWkt(wkt))
            layer.CreateFeature(f)
    ds = None
    return path


def _build(raster, features, out, *extra) -> tuple[int, str]:
    """The landmarks build in this process (faster than a subprocess): (exit code, stderr)."""
    import contextlib
    import io

    from training import build_dataset

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = build_dataset.main(["landmarks", "--raster", str(raster), "--features", str(features),
                                   "--out", str(out), "--tile-size", str(TILE), *map(str, extra)])
    return code, err.getvalue()


def _tiles_naming(out: Path, name: str) -> set[int]:
    """The tiles (index in the raster's grid: the key's last part) whose caption names `name`."""
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return {int(r["key"].rsplit("-", 1)[1]) for r in rows if name in r["caption"]}


def test_each_layer_of_a_geopackage_is_reprojected_with_its_own_crs(tmp_path):
    raster = make_tif(tmp_path / "scene.tif", noise((3, 128, 128)), geotransform=NORTH_UP, crs=UTM32)
    lon, lat = _to_wgs84(UTM32)(ORIGIN[0] + 32, ORIGIN[1] - 32)      # tile 0's centre
    gpkg = _gpkg(tmp_path / "two.gpkg", {
        "in_wgs84": ("EPSG:4326", [(f"POINT ({lon!r} {lat!r})", {"name": "Alpha Tower"})]),
        "in_utm": (UTM32, [(f"POINT ({ORIGIN[0] + 96} {ORIGIN[1] - 96})", {"name": "Beta Hall"})])})   # tile 3
    code, err = _build(raster, gpkg, tmp_path / "out")
    assert code == 0, err
    assert _tiles_naming(tmp_path / "out", "Alpha Tower") == {0}
    assert _tiles_naming(tmp_path / "out", "Beta Hall") == {3}


def test_a_point_on_a_tile_edge_or_corner_counts_for_the_tiles_that_share_it(tmp_path):
    raster = make_tif(tmp_path / "scene.tif", noise((3, 128, 128)), geotransform=NORTH_UP, crs=UTM32)
    gpkg = _gpkg(tmp_path / "p.gpkg", {"p": (UTM32, [
        (f"POINT ({ORIGIN[0] + 64} {ORIGIN[1] - 64})", {"name": "Corner Stone"}),     # where all four tiles meet
        (f"POINT ({ORIGIN[0] + 32} {ORIGIN[1] - 64})", {"name": "Edge Well"})])})     # between tiles 0 and 2
    code, err = _build(raster, gpkg, tmp_path / "out")
    assert code == 0, err
    assert _tiles_naming(tmp_path / "out", "Corner Stone") == {0, 1, 2, 3}
    assert _tiles_naming(tmp_path / "out", "Edge Well") == {0, 2}


def test_a_rotated_raster_captions_a_feature_in_its_own_tile_only(tmp_path):
    c = s = math.sqrt(0.5)                                  # 1 m pixels, the grid turned 45 degrees
    gt = (ORIGIN[0], c, s, ORIGIN[1], s, -c)
    raster = make_tif(tmp_path / "rot.tif", noise((3, 128, 128)), geotransform=gt, crs=UTM32)
    px, py = 70, 15             # in tile 1 (columns 64..127, rows 0..63), and in tile 0's bounding box
    x, y = gt[0] + px * gt[1] + py * gt[2], gt[3] + px * gt[4] + py * gt[5]
    gpkg = _gpkg(tmp_path / "p.gpkg", {"p": (UTM32, [(f"POINT ({x!r} {y!r})", {"name": "Gamma Mill"})])})
    code, err = _build(raster, gpkg, tmp_path / "out")
    assert code == 0, err
    assert _tiles_naming(tmp_path / "out", "Gamma Mill") == {1}


def test_a_raster_narrower_than_a_tile_is_padded_not_stretched(tmp_path):
    import io
    import tarfile

    data = np.full((3, 40, 200), 50, np.uint8)              # 40 rows: shorter than one 64-pixel tile
    data[:, 8:24, 10:26] = 250                              # a 16 x 16 m building
    raster = make_tif(tmp_path / "strip.tif", data, geotransform=NORTH_UP, crs=UTM32)
    x0, y0 = ORIGIN[0] + 10, ORIGIN[1] - 8
    building = f"POLYGON (({x0} {y0}, {x0 + 16} {y0}, {x0 + 16} {y0 - 16}, {x0} {y0 - 16}, {x0} {y0}))"
    gpkg = _gpkg(tmp_path / "b.gpkg", {"b": (UTM32, [(building, {"building": "yes"})])})
    code, err = _build(raster, gpkg, tmp_path / "out")
    assert code == 0, err
    [shard] = (tmp_path / "out" / "shards").glob("*.tar")
    with tarfile.open(shard) as tar:
        [member] = [m for m in tar.getnames() if m.endswith(".jpg")]
        image = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())))
    assert image.shape == (TILE, TILE, 3)
    rows, cols = np.nonzero(image.mean(axis=2) > 150)
    # the building keeps its 16 x 16 pixels at 1 m (stretched, it would be 16 x 26 lower down)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (8, 23, 10, 25)
    assert image[44:].max() < 20                            # below the raster: padding, as the backend's tiler


def test_a_damaged_raster_block_skips_its_unit_and_the_build_goes_on(tmp_path):
    raster = make_tif(tmp_path / "damaged.tif", noise((3, 128, 128)), geotransform=NORTH_UP, crs=UTM32,
                      options=("TILED=YES", "BLOCKXSIZE=64", "BLOCKYSIZE=64", "COMPRESS=DEFLATE"))
    ds = gdal.Open(str(raster))
    offset, size = (int(ds.GetRasterBand(1).GetMetadataItem(f"BLOCK_{k}_1_1", "TIFF")) for k in ("OFFSET", "SIZE"))
    ds = None
    with open(raster, "r+b") as fh:                          # tile 3's compressed block, overwritten
        fh.seek(offset)
        fh.write(b"\xff" * size)
    gpkg = _gpkg(tmp_path / "p.gpkg", {"p": (UTM32, [
        (f"POINT ({ORIGIN[0] + 32} {ORIGIN[1] - 32})", {"name": "Alpha Tower"}),      # tile 0
        (f"POINT ({ORIGIN[0] + 96} {ORIGIN[1] - 96})", {"name": "Beta Hall"})])})     # tile 3, unreadable
    out = tmp_path / "out"
    for attempt in range(2):        # a re-run tries the damaged unit again: it was not done
        p = run("landmarks", "--raster", raster, "--features", gpkg, "--out", out, "--tile-size", TILE,
                "--unit-tiles", 1, "--workers", 2)
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
        assert f"skipping unreadable raster {raster} (tiles 3-3 of its grid): " in p.stderr
        assert "damaged" in p.stderr and ("3 of 4 units already done" in p.stderr) == (attempt == 1)
    summary = json.loads((out / "summary.json").read_text())
    assert [(u["raster"], u["tiles"]) for u in summary["unreadable_rasters"]] == [(str(raster), [3, 4])]
    assert _tiles_naming(out, "Alpha Tower") == {0} and _tiles_naming(out, "Beta Hall") == set()


def test_features_with_no_transformation_to_the_rasters_crs_get_one_clear_line(tmp_path):
    local_cs = 'LOCAL_CS["site grid",UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'
    raster = make_tif(tmp_path / "local.tif", noise((3, 64, 64)), geotransform=(0.0, 1.0, 0.0, 64.0, 0.0, -1.0),
                      crs=local_cs)
    features = tmp_path / "office.geojson"
    features.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "properties":
                        {"name": "Site Office"}, "geometry": {"type": "Point", "coordinates": [10, 50]}}]}))
    code, err = _build(raster, features, tmp_path / "out")
    assert code == 2 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if "error:" in line]
    assert str(features) in line and str(raster) in line and "EPSG:4326" in line and "'site grid'" in line
    assert "no transformation" in line


def test_ray_engine_reports_a_units_build_error_in_one_line(tmp_path):
    pytest.importorskip("ray.data", exc_type=ImportError)
    raster = make_tif(tmp_path / "scene.tif", noise((3, 64, 64)), geotransform=NORTH_UP, crs=UTM32)
    gpkg = _gpkg(tmp_path / "p.gpkg", {"p": (UTM32, [(f"POINT ({ORIGIN[0] + 32} {ORIGIN[1] - 32})",
                                                       {"name": "Alpha Tower"})])})
    p = run("landmarks", "--raster", raster, "--features", gpkg, "--out", tmp_path / "out", "--tile-size", TILE,
            "--engine", "ray", "--workers", 1, "--captioner", f"{sys.executable} -c 'import sys; sys.exit(3)'",
            timeout=600)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "error: captioner" in p.stderr and "failed (3)" in p.stderr


# ---- filter ----------------------------------------------------------------------------------------
SHARED = GEOTIFF_DIR.parent
CHECKPOINT = REPO / "backend" / "checkpoints" / "default"


def _rendered(kind: str, seed: int) -> Image.Image:
    """Non-overhead pictures the test draws: a page of text, a bar chart, a logo."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (256, 256), "white")
    draw = ImageDraw.Draw(im)
    if kind == "page":
        for y in range(20, 240, 14):
            draw.text((16, y), " ".join("lorem ipsum dolor sit amet".split()[: rng.integers(2, 6)]), fill="black")
    elif kind == "chart":
        for i in range(6):
            h = int(rng.integers(30, 200))
            draw.rectangle((20 + 38 * i, 240 - h, 48 + 38 * i, 240), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        draw.line((15, 240, 245, 240), fill="black", width=2)
    else:
        draw.ellipse((48, 48, 208, 208), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        draw.text((100, 120), "ACME", fill="white")
    return im


@pytest.mark.skipif(not (SHARED / "ucm" / "captions.jsonl").is_file(), reason="shared UCM captions not found")
def test_filter_keeps_remote_sensing_pairs_dedups_and_decontaminates(tmp_path):
    import skimage.data

    pairs, truth = [], {}
    rows = [json.loads(line) for line in (SHARED / "ucm" / "captions.jsonl").read_text().splitlines()][::60][:24]
    images = tmp_path / "images"
    images.mkdir()
    for i, row in enumerate(rows):                                  # remote sensing, with their human captions
        src = SHARED / "ucm" / row["image"]
        dst = images / f"rs{i}{src.suffix}"
        shutil.copy(src, dst)
        # half the pairs carry all five captions as a list (the manifest format the trainer reads too)
        pairs.append({"image": f"images/{dst.name}", **({"captions": row["captions"]} if i % 2 else
                                                         {"text": row["captions"][0]})})
        truth[len(pairs)] = True
    photos = {"astronaut.png": "an astronaut in a white suit with a flag", "chelsea.png": "a cat looking at the camera",
              "coffee.png": "a cup of coffee on a saucer", "rocket.jpg": "a rocket on the launch pad",
              "motorcycle_left.png": "a motorcycle in a garage", "horse.png": "a horse silhouette"}
    bundled = Path(skimage.data.__file__).parent                    # sample photos shipped inside the package
    for name, text in photos.items():                               # ground-level photos, with their alt texts
        with Image.open(bundled / name) as im:
            im.convert("RGB").save(images / f"{Path(name).stem}.png")
        pairs.append({"image": f"images/{Path(name).stem}.png", "text": text})
        truth[len(pairs)] = False
    for k, (kind, text) in enumerate([("page", "page two of the report"), ("chart", "quarterly sales chart"),
                                      ("logo", "our company logo"), ("page", "terms and conditions")]):
        _rendered(kind, k).save(images / f"{kind}{k}.png")
        pairs.append({"image": f"images/{kind}{k}.png", "text": text})
        truth[len(pairs)] = False
    shutil.copy(images / "rs0.tif" if (images / "rs0.tif").exists() else next(images.glob("rs0.*")),
                images / "rs0_copy.bin")
    pairs.append({"image": "images/rs0_copy.bin", "text": rows[0]["captions"][1]})      # an exact duplicate
    dup_line = len(pairs)
    # the planted evaluation image: its re-encoded, slightly brighter copy must be dropped
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    test_image = SHARED / "ucm" / rows[5]["image"]
    shutil.copy(test_image, evaluation / test_image.name)
    with Image.open(test_image) as im:
        brighter = Image.fromarray(np.clip(np.asarray(im.convert("RGB"), np.int16) + 6, 0, 255).astype(np.uint8))
    brighter.save(images / "leak.jpg", quality=70)
    pairs.append({"image": "images/leak.jpg", "text": rows[5]["captions"][0]})
    leak_line = len(pairs)
    (images / "broken.jpg").write_bytes(b"not an image")     # unreadable: counted, and the run goes on
    pairs.append({"image": "images/broken.jpg", "text": "an aerial photo of a river"})
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    out = tmp_path / "out"
    p = run("filter", "--manifest", manifest, "--checkpoint", CHECKPOINT, "--out", out, "--eval-folder", evaluation)
    assert p.returncode == 0, p.stderr
    assert "hashing evaluation images" in p.stderr     # a bar while the evaluation folder is read
    report = json.loads((out / "report.json").read_text())
    c = report["counts"]
    assert c["seen"] == len(pairs) and c["unreadable"] == 1 and c["eval_match"] >= 1 and c["duplicate"] >= 1
    kept = {int(k.rsplit("-", 1)[1]) for k in report["kept_keys"]}
    assert leak_line not in kept and dup_line not in kept
    positives = {n for n, is_rs in truth.items() if is_rs and n != 6}       # rows[5] (line 6) is the leaked one
    true_pos = len(kept & positives)
    precision, recall = true_pos / max(1, len(kept)), true_pos / len(positives)
    assert precision >= 0.9 and recall >= 0.7, (precision, recall)
    assert sum(report["image_score_histogram"]["counts"]) == c["seen"] - c["unreadable"] - c["duplicate"] - c["eval_match"]
    from training.data import WebDatasetShards

    shards = sorted(str(s) for s in (out / "shards").glob("*.tar"))
    samples = [s for s in WebDatasetShards(shards, transform=lambda im: im, seed=0, shuffle_buffer=1) if s]
    assert len(samples) == c["kept"]
    listed = {n for n in kept if n in truth and truth[n] and (n - 1) % 2}      # pairs given a captions list
    assert len(listed) >= 0.7 * sum(1 for n in positives if (n - 1) % 2)
    scored = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scored) == sum(report["image_score_histogram"]["counts"])
    assert all(0 <= s["image_score"] <= 1 and 0 <= s["text_score"] <= 1 for s in scored)


@pytest.mark.skipif(not (SHARED / "ucm" / "captions.jsonl").is_file(), reason="shared UCM captions not found")
def test_a_pair_dropped_by_the_thresholds_does_not_make_its_copy_a_duplicate(tmp_path):
    row = json.loads((SHARED / "ucm" / "captions.jsonl").read_text().splitlines()[0])
    shutil.copy(SHARED / "ucm" / row["image"], tmp_path / "scene.tif")
    pairs = [{"image": "scene.tif", "text": "my cat sleeping on the sofa"},        # dropped: not about the ground
             {"image": "scene.tif", "text": row["captions"][0]},                 # the same picture, its caption
             {"image": "scene.tif", "text": row["captions"][1]}]                 # and now a real duplicate
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in pairs) + "\n")
    p = run("filter", "--manifest", tmp_path / "pairs.jsonl", "--checkpoint", CHECKPOINT, "--out", tmp_path / "out")
    assert p.returncode == 0, p.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["counts"]["kept"] == 1 and report["counts"]["duplicate"] == 1
    assert [int(k.rsplit("-", 1)[1]) for k in report["kept_keys"]] == [2]


def test_kept_images_are_stored_in_formats_training_reads():
    import io

    from training.data import _SHARD_IMAGE_EXTS
    from training.datasets.web_filter import shard_image

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    encoded = {}
    for fmt, kw in (("JPEG", {}), ("MPO", {"save_all": True, "append_images": [picture]}), ("GIF", {})):
        buf = io.BytesIO()
        picture.save(buf, format=fmt, **kw)
        encoded[fmt] = buf.getvalue()
    for fmt, data in encoded.items():
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            ext, payload = shard_image(im, data)
        assert ext in _SHARD_IMAGE_EXTS
        assert (payload == data) == (fmt != "GIF")              # JPEG and MPO as they came, GIF re-encoded
        with Image.open(io.BytesIO(payload)) as back:
            assert back.size == (32, 32)


def test_filter_bad_shards_give_one_clear_line(tmp_path, capfd):
    (tmp_path / "notatar.tar").write_text("just text")
    p = refused(capfd, "filter", "--shards", tmp_path / "web-*.tar", "--checkpoint", CHECKPOINT, "--out", tmp_path / "o1")
    assert p.returncode == 2 and "no shard matches" in p.stderr and "Traceback" not in p.stderr
    p = refused(capfd, "filter", "--shards", tmp_path / "web-{000..002}.tar", "--checkpoint", CHECKPOINT, "--out", tmp_path / "o2")
    assert p.returncode == 2 and "3 of 3 shards are not files" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    p = refused(capfd, "filter", "--shards", tmp_path / "notatar.tar", "--checkpoint", CHECKPOINT, "--out", tmp_path / "o3")
    assert p.returncode == 2 and "notatar.tar is not a readable tar file" in p.stderr and "Traceback" not in p.stderr


def test_a_bad_manifest_line_stops_the_filter_before_the_model_loads(tmp_path, capfd):
    _web_pairs(tmp_path)
    good = (tmp_path / "all.jsonl").read_text().splitlines()
    for name, last, problem in (("json", '{"image": "images/p0.jpg", ', "not valid JSON"),
                                ("image", json.dumps({"image": "images/gone.jpg", "text": "a river"}),
                                 f"image {tmp_path / 'images' / 'gone.jpg'} does not exist"),
                                ("caption", json.dumps({"image": "images/p1.jpg", "captions": [" "]}), "empty captions")):
        manifest, out = tmp_path / f"{name}.jsonl", tmp_path / f"out-{name}"
        manifest.write_text("\n".join(good + [last]) + "\n")           # the last of 6 lines is bad
        p = refused(capfd, "filter", "--manifest", manifest, "--checkpoint", CHECKPOINT, "--out", out)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        (line,) = p.stderr.strip().splitlines()
        assert f"error: {manifest}:6: {problem}" in line and "fix the manifest and run again" in line, line
        # --out is made just before the model loads: no folder, so no model and no pair scored
        assert not out.exists()
    # several bad lines: the first is named, the others counted
    (tmp_path / "two.jsonl").write_text("\n".join(["not json"] + good + ["{}"]) + "\n")
    p = refused(capfd, "filter", "--manifest", tmp_path / "two.jsonl", "--checkpoint", CHECKPOINT, "--out", tmp_path / "o")
    assert p.returncode == 2 and f"{tmp_path / 'two.jsonl'}:1: not valid JSON" in p.stderr and "(and 1 more)" in p.stderr


def test_a_shard_damaged_mid_run_says_what_it_leaves_and_a_rerun_starts_clean(tmp_path):
    import tarfile

    shard, _ = _web_pairs(tmp_path)
    intact = shard.read_bytes()
    with tarfile.open(shard) as tar:
        cut = tar.getmember("scene2.jpg").offset_data + 100
    damaged = tmp_path / "web.v1-001.tar"
    damaged.write_bytes(intact[:cut])               # cut inside the last pair: the two pairs before it are read
    out = tmp_path / "out"
    p = run("filter", "--shards", damaged, "--checkpoint", CHECKPOINT, "--out", out, "--text-threshold", "0",
            "--batch-size", "1")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    line = p.stderr.strip().splitlines()[-1]           # after the progress bar
    assert line.startswith("python -m training.build_dataset filter: error: shard ")
    assert "web.v1-001.tar is not a readable tar file" in line and "fix or drop this shard and run again" in line
    assert f"stopped after 2 pairs and leaves partial outputs in {out} (no report.json)" in line
    assert "a re-run replaces, starting from the first pair" in line
    assert [json.loads(x)["kept"] for x in (out / "scores.jsonl.part").read_text().splitlines()] == [True, True]
    assert not (out / "report.json").exists()
    damaged.write_bytes(intact)                     # fixed: the re-run filters every pair, from the first
    p = run("filter", "--shards", damaged, "--checkpoint", CHECKPOINT, "--out", out, "--text-threshold", "0")
    assert p.returncode == 0, p.stderr
    assert json.loads((out / "report.json").read_text())["counts"]["kept"] == 3
    assert len((out / "scores.jsonl").read_text().splitlines()) == 3
    assert not [q for q in out.rglob("*.part")]


def _web_pairs(tmp_path: Path) -> tuple[Path, Path]:
    """A shard and a manifest whose names hold dots, with 3 + 2 pairs of distinct noise images: two
    captioned wholly in remote-sensing words, three partly; and all.jsonl, the 5 pairs in one manifest."""
    import io
    import tarfile

    rng = np.random.default_rng(7)

    def jpeg() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
        return buf.getvalue()

    captions = ["forest river", "an aerial photo of fields", "my holiday picture of a forest",
                "dense residential buildings and roads", "an aerial photo of a lake and my boat"]
    (tmp_path / "images").mkdir()
    for i in range(5):
        (tmp_path / "images" / f"p{i}.jpg").write_bytes(jpeg())
    shard = tmp_path / "web.v1-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            members = [(f"scene{i}.jpg", (tmp_path / "images" / f"p{i}.jpg").read_bytes()),
                       (f"scene{i}.txt", captions[i].encode())]
            if i == 0:      # a second image of the same sample (training's reader groups it with scene0)
                members.append(("scene0.seg.png", jpeg()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    rows = [json.dumps({"image": f"images/p{i}.jpg", "text": captions[i]}) for i in range(5)]
    manifest = tmp_path / "pairs.v2.jsonl"
    manifest.write_text("\n".join(rows[3:]) + "\n")
    (tmp_path / "all.jsonl").write_text("\n".join(rows) + "\n")
    return shard, manifest


def _members(folder: Path) -> list[str]:
    import tarfile

    names = []
    for shard in sorted(folder.glob("filtered-*.tar")):
        with tarfile.open(shard) as tar:
            names += tar.getnames()
    return names


def test_filter_reads_pairs_as_training_does_and_writes_keys_it_reads(tmp_path):
    from training.data import WebDatasetShards

    shard, manifest = _web_pairs(tmp_path)
    out = tmp_path / "out"
    p = run("filter", "--shards", shard, "--manifest", manifest, "--checkpoint", CHECKPOINT, "--out", out,
            "--text-threshold", "0")
    assert p.returncode == 0, p.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["seen"] == 5 and report["counts"]["kept"] == 5    # scene0.seg.png is scene0's
    # each scored pair says which image it is: a shard's member, a manifest line's file
    sources = sorted(json.loads(line)["source"] for line in (out / "scores.jsonl").read_text().splitlines())
    assert sources[:2] == sorted(str((tmp_path / "images" / f"p{i}.jpg").resolve()) for i in (3, 4))
    assert sources[2:] == [f"{shard}#scene{i}" for i in range(3)]
    # no dot in a written key: training's reader ends a key at the first one
    names = _members(out / "shards")
    assert len(names) == 15 and all(n.count(".") == 1 for n in names), names
    assert {n.split(".")[0] for n in names} == set(report["kept_keys"])
    samples = [x for x in WebDatasetShards([str(s) for s in sorted((out / "shards").glob("*.tar"))],
                                           transform=lambda im: im, seed=0, shuffle_buffer=1) if x]
    assert len(samples) == 5 and all(caption for _, caption in samples)


def test_filter_keeps_pairs_apart_whose_shards_share_a_name(tmp_path):
    """Two crawls' "00000.tar" in two folders hold pairs of one key each: written under one key, the
    training reader would group them into one sample and lose a pair."""
    import io
    import tarfile

    from training.data import WebDatasetShards

    rng = np.random.default_rng(3)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        with tarfile.open(tmp_path / folder / "00000.tar", "w") as tar:
            for key in ("000", "001", "002"):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
                for name, data in ((f"{key}.png", buf.getvalue()), (f"{key}.txt", f"fields {folder}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    p = run("filter", "--shards", tmp_path / "a" / "00000.tar", "--shards", tmp_path / "b" / "00000.tar",
            "--checkpoint", CHECKPOINT, "--out", out, "--text-threshold", "0")
    assert p.returncode == 0, p.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["kept"] == 6 and len(set(report["kept_keys"])) == 6, report
    samples = [x for x in WebDatasetShards([str(s) for s in sorted((out / "shards").glob("*.tar"))],
                                           transform=lambda im: im, seed=0, shuffle_buffer=1) if x]
    assert len(samples) == 6


def test_filter_rerun_replaces_its_own_shards_only(tmp_path):
    _web_pairs(tmp_path)
    manifest = tmp_path / "all.jsonl"
    out = tmp_path / "out"
    p = run("filter", "--manifest", manifest, "--checkpoint", CHECKPOINT, "--out", out,
            "--text-threshold", "0", "--shard-size", "1")
    assert p.returncode == 0, p.stderr
    assert len(list((out / "shards").glob("filtered-*.tar"))) == 5
    (out / "shards" / "filtered-000009.tar.part").write_bytes(b"cut short")    # a killed run's
    (out / "shards" / "notes.txt").write_text("mine")
    (out / "shards" / "mine.tar").write_bytes(b"")
    # stricter: the two captions made of remote-sensing words only, so two shards
    p = run("filter", "--manifest", manifest, "--checkpoint", CHECKPOINT, "--out", out,
            "--text-threshold", "1.0", "--shard-size", "1")
    assert p.returncode == 0, p.stderr
    assert "removed the earlier run's outputs" in p.stderr and "6 shard file(s)" in p.stderr
    assert "also holds 1 .tar file(s) the filter did not write (mine.tar)" in p.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["kept"] == 2
    assert sorted(q.name for q in (out / "shards").iterdir()) == ["filtered-000000.tar", "filtered-000001.tar",
                                                                  "mine.tar", "notes.txt"]
    assert {n.split(".")[0] for n in _members(out / "shards")} == set(report["kept_keys"])
    # filtering an earlier run's shards into its own --out would delete them before they are read
    p = run("filter", "--shards", out / "shards" / "filtered-*.tar", "--checkpoint", CHECKPOINT, "--out", out)
    assert p.returncode == 2 and "holds shards this run reads" in p.stderr and "Traceback" not in p.stderr
    assert len(list((out / "shards").glob("filtered-*.tar"))) == 2


def test_ray_engine_resumes_a_half_done_run_and_writes_the_same_dataset(built, scene, vectors, tmp_path):
    pytest.importorskip("ray.data", exc_type=ImportError)
    local, _ = built
    out = tmp_path / "ray"
    (out / "parts").mkdir(parents=True)
    (out / "shards").mkdir()
    done = sorted((local / "parts").glob("*.json"))[:1]              # one unit finished earlier...
    for part in done:
        shutil.copy(part, out / "parts" / part.name)
        shard = local / "shards" / f"{part.stem}.tar"
        if shard.exists():
            shutil.copy(shard, out / "shards" / shard.name)
    p = run("landmarks", "--raster", scene["raster"], "--features", vectors["osm"], "--features", vectors["gpkg"],
            "--out", out, "--tile-size", TILE, "--unit-tiles", 8, "--engine", "ray", "--workers", 2, timeout=600)
    assert p.returncode == 0, p.stderr
    assert f"{len(done)} of" in p.stderr and "already done" in p.stderr   # ...is not redone by Ray

    def rows(folder):
        return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    assert [(r["key"], r["caption"]) for r in rows(out)] == [(r["key"], r["caption"]) for r in rows(local)]


def _slow_build_interrupted(tmp_path: Path, towers: int, sigint) -> tuple[subprocess.Popen, Path, int, str]:
    """A --workers 2 build of one-tile units, half a second a tile, started with SIGINT's disposition
    `sigint` and sent SIGINT (as Ctrl-C sends it, to the process group) once its first unit is done:
    (the process, OUT, units done then, its stderr)."""
    import signal

    raster = make_tif(tmp_path / "scene.tif", noise((3, 128, 64 * towers)), geotransform=NORTH_UP, crs=UTM32)
    gpkg = _gpkg(tmp_path / "p.gpkg", {"p": (UTM32, [(f"POINT ({ORIGIN[0] + 32 + 64 * i} {ORIGIN[1] - 32})",
                                                       {"name": f"Tower {i}"}) for i in range(towers)])})
    slow = tmp_path / "slow_captioner.py"
    slow.write_text("import json, sys, time\ninfo = json.load(sys.stdin)\ntime.sleep(0.5)\nprint('a tile')\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "training.build_dataset", "landmarks", "--raster", str(raster),
                             "--features", str(gpkg), "--out", str(out), "--tile-size", str(TILE), "--unit-tiles", "1",
                             "--workers", "2", "--captioner", f"{sys.executable} {slow}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))
    deadline = time.monotonic() + 120
    while not list((out / "parts").glob("*.json")) if (out / "parts").is_dir() else True:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    at_signal = len(list((out / "parts").glob("*.json")))
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc, out, at_signal, err


def test_ctrl_c_with_workers_drops_the_units_not_started(tmp_path):
    """Ctrl-C during a --workers 2 build of 20 units: the units not started yet are dropped at once;
    before, the pool ran every queued unit before exiting."""
    import signal

    # a suite started in the background has SIGINT ignored, and its children with it: the build's is the default
    proc, out, at_signal, err = _slow_build_interrupted(tmp_path, 10, signal.SIG_DFL)
    assert proc.returncode == 130, err
    done = len(list((out / "parts").glob("*.json")))
    # the units running stop, and those queued to the workers are not run (3 more ran, after Ctrl-C);
    # one may have finished between the look and the signal
    assert done <= at_signal + 1, f"{done - at_signal} units finished after Ctrl-C"


def test_a_build_started_to_ignore_ctrl_c_with_workers_goes_on(tmp_path):
    """A build started with SIGINT ignored (`cmd &` in a script, nohup) ignores it in its worker
    processes too, as with one worker: the workers' own handler made it stop."""
    import signal

    proc, out, _, err = _slow_build_interrupted(tmp_path, 2, signal.SIG_IGN)
    assert proc.returncode == 0 and len(list((out / "parts").glob("*.json"))) == 4, err


@pytest.mark.parametrize("suffix", [".gpkg", ".shp"])
def test_a_where_filter_naming_no_field_is_refused_before_anything_is_built(tmp_path, suffix):
    """A GeoPackage takes any --where and fails only at the first read: the build said "kept 0 of N
    tiles", exit 0, and the --out then counted as built with that filter, refusing the corrected one."""
    raster = make_tif(tmp_path / "scene.tif", noise((3, 64, 64)), geotransform=NORTH_UP, crs=UTM32)
    gpkg = _gpkg(tmp_path / "p.gpkg", {"p": (UTM32, [(f"POINT ({ORIGIN[0] + 32} {ORIGIN[1] - 32})",
                                                       {"name": "Alpha Tower"})])})
    features = gpkg
    if suffix == ".shp":
        features = tmp_path / "p.shp"
        ogr.GetDriverByName("ESRI Shapefile").CopyDataSource(ogr.Open(str(gpkg)), str(features))
    out = tmp_path / "out"
    code, err = _build(raster, features, out, "--where", "nosuchfield = 1")
    assert code == 2 and "--where 'nosuchfield = 1' is not a valid filter for" in err, err
    assert not (out / "summary.json").exists()
    code, err = _build(raster, features, out, "--where", "name = 'Alpha Tower'")
    assert code == 0, err
    assert _tiles_naming(out, "Alpha Tower") == {0}


def test_landmark_options_given_wrongly_are_named_and_a_source_without_a_crs_is_noted(tmp_path):
    raster = make_tif(tmp_path / "scene.tif", noise((3, 64, 64)), geotransform=NORTH_UP, crs=UTM32)
    gpkg = _gpkg(tmp_path / "p.gpkg", {"p": (UTM32, [(f"POINT ({ORIGIN[0] + 32} {ORIGIN[1] - 32})",
                                                       {"name": "Alpha Tower"})])})
    code, err = _build(raster, gpkg, tmp_path / "out", "--resolution", "-5")
    assert code == 2 and "--resolution -5.0 must be a ground size above 0" in err, err
    code, err = _build(raster, gpkg, tmp_path / "out", "--min-line", "-1")
    assert code == 2 and "--min-line -1.0 must be 0 or more" in err, err
    # a shapefile without its .prj, by the rule evaluate segmentation --raster follows (training.labels):
    # numbers on the raster in its CRS are read in it; numbers off it that can be degrees, as
    # longitude/latitude; each said so
    shp = tmp_path / "noprj.shp"
    ogr.GetDriverByName("ESRI Shapefile").CopyDataSource(ogr.Open(str(gpkg)), str(shp))
    (tmp_path / "noprj.prj").unlink()
    code, err = _build(raster, shp, tmp_path / "out2")
    assert code == 0 and f"note: {shp} (layer noprj) says no CRS" in err, err
    assert "overlap the raster's extent in the raster's CRS, so they are taken in it (EPSG:32632)" in err, err
    assert _tiles_naming(tmp_path / "out2", "Alpha Tower") == {0}
    lon, lat = _to_wgs84(UTM32)(ORIGIN[0] + 32, ORIGIN[1] - 32)
    in_degrees = _gpkg(tmp_path / "deg.gpkg", {"deg": ("EPSG:4326", [(f"POINT ({lon!r} {lat!r})",
                                                                       {"name": "Alpha Tower"})])})
    shp = tmp_path / "deg.shp"
    ogr.GetDriverByName("ESRI Shapefile").CopyDataSource(ogr.Open(str(in_degrees)), str(shp))
    (tmp_path / "deg.prj").unlink()
    code, err = _build(raster, shp, tmp_path / "out3")
    assert code == 0 and "so they are taken as longitude/latitude (EPSG:4326)" in err, err
    assert _tiles_naming(tmp_path / "out3", "Alpha Tower") == {0}


def test_a_rerun_from_another_folder_naming_the_same_files_resumes(tmp_path, monkeypatch):
    """The same raster and features given by other paths (relative from another working folder): the
    same settings, so the run resumes, where it was refused as built with other settings."""
    (tmp_path / "data").mkdir()
    raster = make_tif(tmp_path / "data" / "scene.tif", noise((3, 64, 64)), geotransform=NORTH_UP, crs=UTM32)
    gpkg = _gpkg(tmp_path / "data" / "p.gpkg", {"p": (UTM32, [(f"POINT ({ORIGIN[0] + 32} {ORIGIN[1] - 32})",
                                                               {"name": "Alpha Tower"})])})
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path / "data")
    code, err = _build("scene.tif", "p.gpkg", out)
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    code, err = _build("data/scene.tif", str(gpkg), out)
    assert code == 0 and "units already done" in err, err
    code, err = _build(raster, gpkg, out, "--overlap", "0.5")      # other settings are still refused
    assert code == 2 and "built with other settings" in err


def test_landmark_inputs_of_the_field(tmp_path, capfd):
    """Files as users have them: a Latin-1 GeoJSON (its names crashed the build as surrogates), a
    curve polygon (a traceback), a GeoPackage layer of no CRS (taken as degrees unsaid, GDAL's lines
    for every point), a --where that one layer of several has (refused for the others), a mapping file
    named by another path (refused as other settings), a --resolution that does not suit a raster
    (skipped as unreadable), --out under a file (a traceback)."""
    raster = make_tif(tmp_path / "scene.tif", noise((3, 128, 128)), geotransform=NORTH_UP, crs=UTM32)
    lon, lat = _to_wgs84(UTM32)(ORIGIN[0] + 32, ORIGIN[1] - 32)      # tile 0's centre
    latin1 = tmp_path / "latin1.geojson"
    latin1.write_bytes(b'{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": '
                       b'{"name": "Escuela Ni\xf1o"}, "geometry": {"type": "Point", "coordinates": '
                       + f'[{lon!r}, {lat!r}]}}}}]}}'.encode())          # \xf1: n with tilde in Latin-1, no UTF-8
    code, err = _build(raster, latin1, tmp_path / "latin1")
    assert code == 0, err
    assert _tiles_naming(tmp_path / "latin1", "Escuela Ni\u00f1o") == {0}
    x, y = ORIGIN[0] + 96, ORIGIN[1] - 96                            # tile 3's centre
    curved = _gpkg(tmp_path / "curve.gpkg", {"pond": (UTM32, [
        (f"CURVEPOLYGON (CIRCULARSTRING ({x - 5} {y}, {x} {y + 5}, {x + 5} {y}, {x} {y - 5}, {x - 5} {y}))",
         {"name": "Round Pond"})])})
    code, err = _build(raster, curved, tmp_path / "curve")
    assert code == 0 and _tiles_naming(tmp_path / "curve", "Round Pond") == {3}, err
    two = _gpkg(tmp_path / "two.gpkg", {"roads": (UTM32, [(f"POINT ({ORIGIN[0] + 32} {ORIGIN[1] - 32})",
                                                            {"name": "Alpha Road", "highway": "primary"})]),
                                        "places": (UTM32, [(f"POINT ({x} {y})", {"name": "Beta Hall"})])})
    code, err = _build(raster, two, tmp_path / "where", "--where", "highway = 'primary'")
    assert code == 0 and _tiles_naming(tmp_path / "where", "Alpha Road") == {0}, err
    assert not _tiles_naming(tmp_path / "where", "Beta Hall")
    code, err = _build(raster, two, tmp_path / "where2", "--where", "nosuch = 1")
    assert code == 2 and "no layer of" in err and "give --layer" in err, err
    no_crs = tmp_path / "no_crs.gpkg"
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(no_crs))
    layer = ds.CreateLayer("p", None, ogr.wkbPoint)
    layer.CreateField(ogr.FieldDefn("name", ogr.OFTString))
    f = ogr.Feature(layer.GetLayerDefn())
    f.SetField("name", "Gamma Mill")
    f.SetGeometry(ogr.CreateGeometryFromWkt(f"POINT ({ORIGIN[0] + 32} {ORIGIN[1] - 32})"))   # metres, not degrees
    layer.CreateFeature(f)
    ds = layer = f = None
    capfd.readouterr()
    code, err = _build(raster, no_crs, tmp_path / "no_crs")
    gdal_lines = capfd.readouterr().err
    assert code == 0 and f"note: {no_crs} (layer p) says no CRS" in err, err
    assert _tiles_naming(tmp_path / "no_crs", "Gamma Mill") == {0}     # its metres read in the raster's CRS
    assert "ERROR 1" not in gdal_lines and "Invalid" not in gdal_lines, gdal_lines
    mapping = tmp_path / "map.tsv"
    mapping.write_text("highway=primary\ta main road\tline\n")
    code, err = _build(raster, two, tmp_path / "mapped", "--mapping", mapping)
    assert code == 0, err
    code, err = _build(raster, two, tmp_path / "mapped", "--mapping", f"{tmp_path}/../{tmp_path.name}/map.tsv")
    assert code == 0 and "units already done" in err, err
    degrees = make_tif(tmp_path / "degrees.tif", noise((3, 64, 64)), crs="EPSG:4326",
                       geotransform=(10.0, 0.001, 0.0, 50.0, 0.0, -0.001))
    code, err = _build(raster, two, tmp_path / "res", "--raster", degrees, "--resolution", "0.5")
    assert code == 2 and f"--resolution 0.5 does not suit {degrees}" in err, err
    code, err = _build(raster, two, tmp_path / "res0", "--resolution", "0")         # 0: the raster's own, as advised
    assert code == 0, err
    (tmp_path / "a_file").write_text("notes")
    code, err = _build(raster, two, tmp_path / "a_file" / "out")
    assert code == 2 and "a_file is a file; give a folder" in err and "Traceback" not in err, err


def test_a_captioner_that_gives_nothing_is_named(tmp_path):
    """Empty captions for every tile: said as such (not as "check ... CRSs"), and the build fails (exit
    2): nothing was kept to train on."""
    raster = make_tif(tmp_path / "scene.tif", noise((3, 64, 64)), geotransform=NORTH_UP, crs=UTM32)
    gpkg = _gpkg(tmp_path / "p.gpkg", {"p": (UTM32, [(f"POINT ({ORIGIN[0] + 32} {ORIGIN[1] - 32})",
                                                       {"name": "Alpha Tower"})])})
    silent = tmp_path / "silent.py"
    silent.write_text("import sys\nsys.stdin.read()\n")
    out = tmp_path / "out"
    code, err = _build(raster, gpkg, out, "--captioner", f"{sys.executable} {silent}")
    assert code == 2 and "the captioner gave an empty caption for all 1 tiles with features" in err, err
    assert "build into a new --out" in err and "CRSs" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept"] == 0 and summary["skipped"]["skipped_empty_caption"] == 1


def test_an_evaluation_folder_with_no_image_is_refused(tmp_path):
    from training.datasets.web_filter import eval_hashes

    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("notes")
    with pytest.raises(ValueError, match="holds no image"):
        eval_hashes([str(tmp_path / "empty")], 4)
    with pytest.raises(ValueError, match="is a file; give the folder"):
        eval_hashes([str(tmp_path / "notes.txt")], 4)


# ---- inputs changed, nothing to build, folders of other runs, captioner paths, colour bands ------
def _point(name: str | None = None, px: float = 32, py: float = 32, **fields) -> tuple[str, dict]:
    """A point `px`, `py` metres into the small rasters above (tile 0's centre by default)."""
    return f"POINT ({ORIGIN[0] + px} {ORIGIN[1] - py})", {**({"name": name} if name else {}), **fields}


def test_a_rerun_after_an_input_file_was_edited_is_refused_naming_it(tmp_path):
    """A features file (a GeoPackage; a shapefile's .dbf) or --mapping file edited in place: the
    finished units hold the old captions, so a re-run into the same --out is refused, naming the file;
    one of unchanged inputs resumes, and an --out from before fingerprints were recorded resumes too."""
    raster = make_tif(tmp_path / "scene.tif", noise((3, 128, 128)), geotransform=NORTH_UP, crs=UTM32)
    gpkg = _gpkg(tmp_path / "labels.gpkg", {"landuse": (UTM32, [_point(px=32, cls="farmland")])})
    mapping = tmp_path / "map.tsv"
    mapping.write_text("cls=*\t{value}\tobject\n")
    out = tmp_path / "out"
    code, err = _build(raster, gpkg, out, "--mapping", mapping)
    assert code == 0 and _tiles_naming(out, "farmland") == {0}, err
    code, err = _build(raster, gpkg, out, "--mapping", mapping)
    assert code == 0 and "1 of 1 units already done" in err, err
    _gpkg(gpkg.with_name("edit.gpkg"), {"landuse": (UTM32, [_point(px=32, cls="orchard")])})
    os.replace(gpkg.with_name("edit.gpkg"), gpkg)
    code, err = _build(raster, gpkg, out, "--mapping", mapping)
    assert code == 2 and f"{gpkg} changed since {out} was built from it" in err, err
    assert "give another --out, or delete" in err and "Traceback" not in err
    code, err = _build(raster, gpkg, tmp_path / "fresh", "--mapping", mapping)
    assert code == 0 and _tiles_naming(tmp_path / "fresh", "orchard") == {0}, err
    mapping.write_text("cls=*\ta field of {value}\tobject\n")
    code, err = _build(raster, gpkg, tmp_path / "fresh", "--mapping", mapping)
    assert code == 2 and f"{mapping} changed since" in err, err
    # a record written before fingerprints were kept: unknown, so the run resumes as it did then
    settings = tmp_path / "fresh" / "settings.json"
    settings.write_text(json.dumps({k: v for k, v in json.loads(settings.read_text()).items() if k != "fingerprints"}))
    code, err = _build(raster, gpkg, tmp_path / "fresh", "--mapping", mapping)
    assert code == 0 and "units already done" in err, err
    # a shapefile is several files: its attributes are in the .dbf
    shp = tmp_path / "labels.shp"
    ogr.GetDriverByName("ESRI Shapefile").CopyDataSource(ogr.Open(str(gpkg)), str(shp))
    code, err = _build(raster, shp, tmp_path / "shp", "--mapping", mapping)
    assert code == 0, err
    ds = ogr.Open(str(shp), 1)
    f = ds.GetLayer().GetNextFeature()
    f.SetField("cls", "vineyard")
    ds.GetLayer().SetFeature(f)
    ds = f = None
    code, err = _build(raster, shp, tmp_path / "shp", "--mapping", mapping)
    assert code == 2 and f"{tmp_path / 'labels.dbf'} changed since" in err, err


def test_a_build_that_keeps_no_tile_fails_saying_why_and_counts_features_honestly(tmp_path):
    """0 tiles kept exits 2, saying why (nothing read; nothing a rule or name captions, with the
    --mapping line a GIS field needs; nothing on the raster); summary.json counts features off the
    raster and those no rule matched apart from the usable ones."""
    raster = make_tif(tmp_path / "scene.tif", noise((3, 128, 128)), geotransform=NORTH_UP, crs=UTM32)
    empty = _gpkg(tmp_path / "empty.gpkg", {"labels": (UTM32, [])})
    code, err = _build(raster, empty, tmp_path / "empty")
    assert code == 2 and f"no feature was read from {empty}" in err, err
    fields = _gpkg(tmp_path / "class.gpkg", {"labels": (UTM32, [_point(px=32, **{"class": "farm_building"}),
                                                                _point(px=96, **{"class": "farmland"})])})
    code, err = _build(raster, fields, tmp_path / "class")
    assert code == 2 and "2 feature(s) have no name and match no caption rule" in err, err
    assert "'class=*<TAB>a {value}<TAB>object'" in err
    mapping = tmp_path / "map.tsv"
    mapping.write_text("class=*\ta {value}\tobject\n")          # the line the README and the message give
    code, err = _build(raster, fields, tmp_path / "mapped", "--mapping", mapping)
    assert code == 0 and _tiles_naming(tmp_path / "mapped", "a farm building") == {0}, err
    far = _gpkg(tmp_path / "far.gpkg", {"labels": (UTM32, [_point("Far Tower", px=5000, py=5000)])})
    code, err = _build(raster, far, tmp_path / "far")
    assert code == 2 and "none of the 1 feature(s) with a caption" in err and "lies on the rasters" in err, err
    mixed = _gpkg(tmp_path / "mixed.gpkg", {"labels": (UTM32, [_point("Alpha Tower"), _point("Far Tower", px=5000),
                                                               _point(px=96, **{"class": "farmland"})])})
    code, err = _build(raster, mixed, tmp_path / "mixed")
    assert code == 0, err
    counts = json.loads((tmp_path / "mixed" / "summary.json").read_text())["features"][str(mixed)]
    assert counts == {"read": 3, "usable": 1, "off_raster": 1, "no_rule": 1, "no_geometry": 0}, counts


def test_a_landmarks_build_into_a_folder_of_another_kind_of_run_is_refused(tmp_path):
    """A filter run's shards or a training run's files in --out: a build there would mix datasets."""
    import tarfile

    raster = make_tif(tmp_path / "scene.tif", noise((3, 64, 64)), geotransform=NORTH_UP, crs=UTM32)
    gpkg = _gpkg(tmp_path / "p.gpkg", {"p": (UTM32, [_point("Alpha Tower")])})
    (tmp_path / "web" / "shards").mkdir(parents=True)
    with tarfile.open(tmp_path / "web" / "shards" / "filtered-000000.tar", "w"):
        pass
    code, err = _build(raster, gpkg, tmp_path / "web")
    assert code == 2 and "holds files of another kind of run (shards/filtered-000000.tar)" in err, err
    assert not (tmp_path / "web" / "parts").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_config.json").write_text("{}")
    code, err = _build(raster, gpkg, tmp_path / "run")
    assert code == 2 and "(train_config.json)" in err, err
    code, err = _build(raster, gpkg, tmp_path / "out")      # and its own folder resumes
    assert code == 0, err
    code, err = _build(raster, gpkg, tmp_path / "out")
    assert code == 0 and "units already done" in err, err


def test_a_captioner_path_with_spaces_runs_and_a_split_one_is_explained(tmp_path):
    raster = make_tif(tmp_path / "scene.tif", noise((3, 64, 64)), geotransform=NORTH_UP, crs=UTM32)
    gpkg = _gpkg(tmp_path / "p.gpkg", {"p": (UTM32, [_point("Alpha Tower")])})
    tool = tmp_path / "my data" / "cap tool.sh"
    tool.parent.mkdir()
    tool.write_text('#!/bin/sh\ncat >/dev/null\necho "a tower by the ${1:-road}"\n')
    tool.chmod(0o755)
    code, err = _build(raster, gpkg, tmp_path / "out", "--captioner", tool)
    assert code == 0 and _tiles_naming(tmp_path / "out", "a tower by the road") == {0}, err
    code, err = _build(raster, gpkg, tmp_path / "out2", "--captioner", f"{tool} river")
    assert code == 2 and f"tried the command {[str(tmp_path / 'my'), 'data/cap', 'tool.sh', 'river']}" in err, err
    assert "quote a path with spaces inside the option" in err and "Traceback" not in err
    code, err = _build(raster, gpkg, tmp_path / "out3", "--captioner", f"'{tool}' river")
    assert code == 0 and _tiles_naming(tmp_path / "out3", "a tower by the river") == {0}, err


def test_four_bands_of_no_colour_are_noted_once_and_bands_picks_them(tmp_path):
    """Four bands marked as no colour: read as 1, 2, 3, and said once, as the backend says it;
    --bands 3 2 1 reads band 3 as red."""
    data = np.stack([np.full((64, 128), v, np.uint8) for v in (10, 100, 200, 50)])
    raster = make_tif(tmp_path / "four.tif", data, geotransform=NORTH_UP, crs=UTM32,
                      colours=[gdal.GCI_Undefined] * 4)
    gpkg = _gpkg(tmp_path / "p.gpkg", {"p": (UTM32, [_point("Alpha Tower"), _point("Beta Hall", px=96)])})

    def red(out):
        import tarfile
        with tarfile.open(next((out / "shards").glob("*.tar"))) as tar:
            jpg = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
            return int(np.asarray(Image.open(tar.extractfile(jpg)))[..., 0].mean())

    code, err = _build(raster, gpkg, tmp_path / "auto")
    assert code == 0 and err.count("note: ") == 1, err
    assert f"note: raster '{raster}' has 4 bands and marks none as red, green or blue: bands 1, 2, 3" in err
    assert "--bands R G B" in err and abs(red(tmp_path / "auto") - 10) < 5
    code, err = _build(raster, gpkg, tmp_path / "bands", "--bands", 3, 2, 1)
    assert code == 0 and "note: " not in err and abs(red(tmp_path / "bands") - 200) < 5, err
    code, err = _build(raster, gpkg, tmp_path / "bad", "--bands", 3, 2, 9)
    assert code == 2 and "--bands 3 2 9: band mapping blue=9" in err and "has 4 band(s)" in err, err


def test_shards_of_a_thousandth_raster_are_the_builds_own():
    """Units are numbered by raster from 000: the 1001st raster's shards ("1000-...") were taken for
    another kind of run's, and every re-run of such a build was refused."""
    from training.datasets.outputs import LANDMARKS_SHARD

    assert LANDMARKS_SHARD.fullmatch("1000-ortho-00000.tar") and LANDMARKS_SHARD.fullmatch("007-a_b-00012.tar.part")
    assert not LANDMARKS_SHARD.fullmatch("filtered-000000.tar")


def test_a_captioner_in_the_working_folder_is_run_by_its_name(tmp_path, monkeypatch):
    """An executable "cap.sh" in the working folder was refused as "not executable": a bare name is
    looked for on PATH only. It runs from there; one that is not executable is still named so."""
    script = tmp_path / "cap.sh"
    script.write_text("#!/bin/sh\necho a caption\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    assert LM.captioner_command("cap.sh") == [str(script)]
    assert LM.captioner_command("cap.sh --flag") == [str(script), "--flag"]
    script.chmod(0o644)
    with pytest.raises(LM.BuildError, match="is not executable"):
        LM.captioner_command("cap.sh")


def test_a_spatial_index_made_between_runs_is_no_edit(tmp_path):
    """A shapefile's .qix, made by QGIS's "Create spatial index" between two runs, counted as an edit of
    the features, and the resume was refused."""
    raster = make_tif(tmp_path / "scene.tif", noise((3, 64, 64)), geotransform=NORTH_UP, crs=UTM32)
    gpkg = _gpkg(tmp_path / "p.gpkg", {"p": (UTM32, [(f"POINT ({ORIGIN[0] + 32} {ORIGIN[1] - 32})",
                                                       {"name": "Alpha Tower"})])})
    shp = tmp_path / "p.shp"
    ogr.GetDriverByName("ESRI Shapefile").CopyDataSource(ogr.Open(str(gpkg)), str(shp))
    out = tmp_path / "out"
    code, err = _build(raster, shp, out)
    assert code == 0, err
    ds = ogr.Open(str(shp), 1)
    ds.ExecuteSQL("CREATE SPATIAL INDEX ON p")
    ds = None
    assert (tmp_path / "p.qix").exists()
    code, err = _build(raster, shp, out)
    assert code == 0 and "units already done" in err, err
