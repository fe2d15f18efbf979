"""The backend server as users run it: a real `python -m backend serve` subprocess on a free loopback
port, with a `tiny` checkpoint built here (random weights: these tests check plumbing, geometry and
safety, not model quality), called over real gRPC and through the real command-line client."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import shapely
from grpc_health.v1 import health_pb2, health_pb2_grpc
from osgeo import gdal, ogr, osr
from shapely import wkb as shapely_wkb
from shapely.geometry import box

from test_raster import GEOTIFF_DIR, make_tif, noise

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-123"
MAX_MESSAGE_MB = 4
SHARED_TIFS = sorted(GEOTIFF_DIR.glob("*.tif")) if GEOTIFF_DIR.is_dir() else []


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer, tiny_config):
    import torch
    from backend.model import MaMMUT
    from backend.model.checkpoint import save_checkpoint

    from backend.model.vocabulary import TrainingWords, count_words

    torch.manual_seed(0)
    path = save_checkpoint(MaMMUT(tiny_config).eval(), tokenizer, tmp_path_factory.mktemp("ckpt") / "tiny")
    # a word list, as training writes one: searches then name the query words outside it
    TrainingWords(count_words(["roads and houses, green fields and trees by a harbour"] * 3)).save(path)
    return path


class LiveServer:
    """A server subprocess; restartable on the same data dir."""

    def __init__(self, checkpoint: Path, data_dir: Path, roots: list[Path], token: str | None = TOKEN,
                 extra: tuple[str, ...] = ()):
        self.checkpoint, self.data_dir, self.roots, self.token = checkpoint, data_dir, roots, token
        self.extra = list(extra)
        self.proc = None
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"

    def start(self, timeout: float = 120.0, stdin=None) -> "LiveServer":
        port_file = self.data_dir.parent / f"{self.data_dir.name}.port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "backend", "serve", "--checkpoint", str(self.checkpoint), "--port", "0",
               "--port-file", str(port_file), "--data-dir", str(self.data_dir), "--device", "cpu",
               "--max-message-mb", str(MAX_MESSAGE_MB)]
        for root in self.roots:
            cmd += ["--allow-root", str(root)]
        cmd += self.extra
        env = {**os.environ, "SKYPROMPT_TOKEN": self.token or ""}
        if not self.token:
            env.pop("SKYPROMPT_TOKEN")
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=stdin, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{self.log_path.read_text()}")
            time.sleep(0.1)
        self.address = f"127.0.0.1:{port_file.read_text()}"
        self.channel = grpc.insecure_channel(self.address, options=[("grpc.max_send_message_length", 64 << 20)])
        from backend.rpc import skyprompt_pb2_grpc as pb_grpc
        self.stub = pb_grpc.SkyPromptStub(self.channel)
        return self

    @property
    def metadata(self):
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def stop(self, sig=signal.SIGTERM) -> int:
        self.channel.close()
        self.proc.send_signal(sig)
        code = self.proc.wait(60)
        self.log.close()
        return code

    def log_text(self) -> str:
        return self.log_path.read_text()


@pytest.fixture(scope="module")
def rasters(tmp_path_factory):
    """Rasters the tests make: RGB UTM, 1-band UInt16, 4-band with alpha in Web Mercator."""
    folder = tmp_path_factory.mktemp("rasters")
    rgb = make_tif(folder / "rgb_utm.tif", noise((3, 300, 400), seed=1))
    grey16 = make_tif(folder / "grey16.tif", noise((1, 200, 200), np.uint16, 100, 4000, seed=2),
                      geotransform=(-1000.0, 2.0, 0.0, 2000.0, 0.0, -2.0), crs="EPSG:3035")
    rgba = noise((4, 160, 160), seed=3)
    rgba[3] = 255
    rgba[3, :, :80] = 0        # left half transparent
    alpha = make_tif(folder / "rgba_3857.tif", rgba, geotransform=(1113194.9, 5.0, 0.0, 6800000.0, 0.0, -5.0),
                     crs="EPSG:3857", colours=[gdal.GCI_RedBand, gdal.GCI_GreenBand, gdal.GCI_BlueBand,
                                               gdal.GCI_AlphaBand])
    (folder / "not_a_raster.tif").write_text("hello")
    return {"rgb": rgb, "grey16": grey16, "rgba": alpha, "folder": folder}


@pytest.fixture(scope="module")
def server(checkpoint, rasters, tmp_path_factory):
    roots = [rasters["folder"]] + ([GEOTIFF_DIR] if GEOTIFF_DIR.is_dir() else [])
    live = LiveServer(checkpoint, tmp_path_factory.mktemp("data") / "d", roots).start()
    yield live
    if live.proc.poll() is None:
        live.stop()


def pb():
    from backend.rpc import skyprompt_pb2
    return skyprompt_pb2


def index(server, path, **kw):
    request = pb().IndexRasterRequest(source=pb().RasterSource(path=str(path)), **kw)
    return list(server.stub.IndexRaster(request, metadata=server.metadata, timeout=120))


def segment(server, path, prompts, **kw):
    request = pb().SegmentRequest(source=pb().RasterSource(path=str(path)), prompts=prompts, **kw)
    events = list(server.stub.Segment(request, metadata=server.metadata, timeout=120))
    return [e.result for e in events if e.HasField("result")], [e.progress for e in events if e.HasField("progress")]


def code_of(call) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "DESCRIPTOR"):
            list(result)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def srs_of(wkt: str) -> osr.SpatialReference:
    srs = osr.SpatialReference()
    srs.ImportFromWkt(wkt)
    return srs


def same_crs(a: osr.SpatialReference, b: osr.SpatialReference) -> bool:
    return bool(a.IsSame(b, ["IGNORE_DATA_AXIS_TO_SRS_AXIS_MAPPING=YES"]))


# ---- the whole path on real rasters ------------------------------------------------------------

@pytest.mark.parametrize("name", [p.name for p in SHARED_TIFS] or ["(no shared data)"])
def test_shared_geotiff_index_search_segment(server, name):
    path = GEOTIFF_DIR / name
    if not path.exists():
        pytest.skip(f"{path} not found")
    ds = gdal.Open(str(path))
    native_srs = ds.GetSpatialRef()
    progress = index(server, path)
    assert progress[-1].done and all(not p.done for p in progress[:-1])
    result = progress[-1].result
    assert result.tile_count > 0 and result.width == ds.RasterXSize and result.height == ds.RasterYSize
    assert same_crs(srs_of(result.crs.wkt), native_srs)

    hits = server.stub.Search(pb().SearchRequest(query="a river next to fields", k=5, raster_ids=[result.raster_id],
                                                 include_thumbnails=True), metadata=server.metadata).hits
    assert 0 < len(hits) <= 5
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    for hit in hits:
        footprint = shapely.from_wkt(hit.footprint_wkt)
        raster_box = box(result.bounds.xmin, result.bounds.ymin, result.bounds.xmax, result.bounds.ymax)
        assert footprint.within(raster_box.buffer(1e-6 * max(1.0, abs(result.bounds.xmax))))
        assert hit.thumbnail_png.startswith(b"\x89PNG")

    # a quarter of the raster, given in the raster's own CRS
    b = result.bounds
    extent = pb().Extent(xmin=b.xmin, ymin=b.ymin, xmax=(b.xmin + b.xmax) / 2, ymax=(b.ymin + b.ymax) / 2)
    results, progress = segment(server, path, ["trees", "buildings"], extent=extent, threshold=0.2,
                                return_relevance_map=True)
    assert [r.prompt for r in results] == ["trees", "buildings"]
    assert progress and progress[-1].stage == pb().SEGMENT_STAGE_POLYGONIZING
    area = box(extent.xmin, extent.ymin, extent.xmax, extent.ymax)
    pixel = abs(ds.GetGeoTransform()[1])
    for r in results:
        assert same_crs(srs_of(r.crs.wkt), native_srs)
        for polygon in r.polygons:
            geometry = shapely_wkb.loads(polygon.wkb)
            # one region a result: several parts only where its pixels touch at corners alone
            assert geometry.geom_type in ("Polygon", "MultiPolygon") and geometry.is_valid and not geometry.is_empty
            assert geometry.within(area.buffer(2 * pixel))     # snapped to whole pixels
            assert 0.2 <= polygon.score <= polygon.max_score <= 1.0
            assert polygon.area == pytest.approx(geometry.area)
        relevance = gdal.Open(_vsimem(r.relevance_map_tiff))
        assert relevance.RasterCount == 1 and same_crs(srs_of(relevance.GetProjection()), native_srs)
        values = relevance.GetRasterBand(1).ReadAsArray()
        assert 0.0 <= values.min() and values.max() <= 1.0 and values.max() == pytest.approx(r.max_relevance, abs=1e-5)


def _vsimem(data: bytes) -> str:
    name = f"/vsimem/test-{time.monotonic_ns()}.tif"
    gdal.FileFromMemBuffer(name, data)
    return name


def test_generated_rasters_one_band_16_bit_and_alpha(server, rasters):
    grey = index(server, rasters["grey16"])[-1].result
    assert grey.band_count == 1 and grey.crs.authid == "EPSG:3035" and grey.tile_count > 0
    rgba = index(server, rasters["rgba"], min_valid_fraction=0.9)[-1].result
    # 160 px wide, 64 px tiles: columns start at 0, 64, 96; the left 80 px are transparent
    assert rgba.tiles_skipped > 0 and rgba.tile_count > 0
    again = index(server, rasters["rgba"], min_valid_fraction=0.9)[-1].result
    assert again.outcome == pb().INDEX_OUTCOME_UNCHANGED and again.raster_id == rgba.raster_id
    forced = index(server, rasters["rgba"], min_valid_fraction=0.9, force=True)[-1].result
    assert forced.outcome == pb().INDEX_OUTCOME_REPLACED

    results, _ = segment(server, rasters["rgba"], ["water"], threshold=0.0)
    polygons = [shapely_wkb.loads(p.wkb) for p in results[0].polygons]
    assert polygons, "threshold 0 marks every valid pixel"
    # transparent pixels are never part of a mask
    gt = gdal.Open(str(rasters["rgba"])).GetGeoTransform()
    transparent = box(gt[0], gt[3] + 160 * gt[5], gt[0] + 80 * gt[1], gt[3])
    assert sum(p.intersection(transparent).area for p in polygons) < 1e-6 * transparent.area


def test_extent_in_another_crs_and_search_extent_filter(server, rasters):
    result = index(server, rasters["rgb"])[-1].result
    wgs = result.bounds_wgs84
    west_half = pb().Extent(xmin=wgs.xmin, ymin=wgs.ymin, xmax=(wgs.xmin + wgs.xmax) / 2, ymax=wgs.ymax)
    response = server.stub.Search(pb().SearchRequest(query="roads", k=100, raster_ids=[result.raster_id],
                                                     extent=west_half), metadata=server.metadata)
    everything = server.stub.Search(pb().SearchRequest(query="roads", k=100, raster_ids=[result.raster_id]),
                                    metadata=server.metadata)
    assert 0 < response.tiles_searched < everything.tiles_searched == result.tile_count
    for hit in response.hits:
        assert hit.bounds_wgs84.xmin <= west_half.xmax
    # Segment over the same half given in EPSG:4326: the polygons come back in the raster's UTM CRS
    west_half.crs = "EPSG:4326"
    results, _ = segment(server, rasters["rgb"], ["roads"], extent=west_half, threshold=0.0)
    assert results[0].crs.authid == "EPSG:32633"
    b = result.bounds
    assert results[0].extent.xmax < (b.xmin + b.xmax) / 2 + 20  # roughly the west half, in metres


def test_search_extent_in_a_rotated_crs_keeps_to_the_extent_itself(server, rasters):
    """A box in a polar stereographic CRS is a rotated quadrilateral in longitude/latitude: the index's
    longitude/latitude box round it takes in tiles well outside it, which the search then drops."""
    path = make_tif(rasters["folder"] / "polar_3413.tif", noise((3, 300, 400), seed=21),
                    geotransform=(1_000_000.0, 500.0, 0.0, -850_000.0, 0.0, -500.0), crs="EPSG:3413")
    result = index(server, path)[-1].result
    p = pb()
    west = p.Extent(xmin=1_000_000.0, ymin=-1_000_000.0, xmax=1_100_000.0, ymax=-850_000.0, crs="EPSG:3413")
    response = server.stub.Search(p.SearchRequest(query="roads", k=1000, raster_ids=[result.raster_id], extent=west),
                                  metadata=server.metadata)
    everything = server.stub.Search(p.SearchRequest(query="roads", k=1000, raster_ids=[result.raster_id]),
                                    metadata=server.metadata).hits
    inside = {h.tile_id for h in everything if h.bounds.xmin < west.xmax}
    assert 0 < len(inside) < len(everything)
    assert {h.tile_id for h in response.hits} == inside
    assert response.tiles_searched > len(inside)        # what the longitude/latitude box alone let in
    # k below the tiles in the extent: the best k of those in it, not fewer
    few = server.stub.Search(p.SearchRequest(query="roads", k=5, raster_ids=[result.raster_id], extent=west),
                             metadata=server.metadata).hits
    assert [h.tile_id for h in few] == [h.tile_id for h in response.hits][:5]
    # extents that are no local box keep every tile they hold: the whole world, and a box round the
    # pole in the raster's own CRS (reprojected, their outlines would fold or wrap)
    for extent in (p.Extent(xmin=-180, ymin=-90, xmax=180, ymax=90),
                   p.Extent(xmin=-2e6, ymin=-2e6, xmax=2e6, ymax=2e6, crs="EPSG:3413"),
                   p.Extent(xmin=-2e7, ymin=-2e7, xmax=2e7, ymax=2e7, crs="EPSG:3857")):
        held = server.stub.Search(p.SearchRequest(query="roads", k=1000, raster_ids=[result.raster_id], extent=extent),
                                  metadata=server.metadata).hits
        assert len(held) == len(everything), extent
    server.stub.RemoveRaster(p.RemoveRasterRequest(raster_id=result.raster_id), metadata=server.metadata)


def test_a_world_or_polar_search_extent_keeps_every_tile_it_holds(server, rasters):
    """Reprojected, the outline of the whole world, or of a box round a pole, folds or wraps: such an
    extent is left to the index's longitude/latitude box, and every tile in it is found."""
    p = pb()
    utm = index(server, rasters["rgb"])[-1].result
    arctic_path = make_tif(rasters["folder"] / "arctic_4326.tif", noise((3, 100, 200), seed=22),
                           geotransform=(-40.0, 0.05, 0.0, 87.0, 0.0, -0.01), crs="EPSG:4326")
    arctic = index(server, arctic_path)[-1].result

    def hits(raster, extent=None):
        request = p.SearchRequest(query="roads", k=1000, raster_ids=[raster.raster_id])
        if extent is not None:
            request.extent.CopyFrom(extent)
        return len(server.stub.Search(request, metadata=server.metadata).hits)

    world = p.Extent(xmin=-180, ymin=-90, xmax=180, ymax=90)
    assert hits(utm, world) == hits(utm) == utm.tile_count
    assert hits(utm, p.Extent(xmin=-2.0e7, ymin=-2.0e7, xmax=2.0e7, ymax=2.0e7, crs="EPSG:3857")) == utm.tile_count
    pole = p.Extent(xmin=-6e5, ymin=-6e5, xmax=6e5, ymax=6e5, crs="EPSG:3413")
    assert hits(arctic, pole) == hits(arctic) == arctic.tile_count
    server.stub.RemoveRaster(p.RemoveRasterRequest(raster_id=arctic.raster_id), metadata=server.metadata)


def test_a_search_polygon_within_the_extent_keeps_hits_to_it(server, rasters):
    """SearchRequest.extent_polygon_wkt (a rotated map view): hits meet the polygon, not only the box
    round it, in the raster's CRS and moved from another; a polygon that is no polygon, crosses
    itself, has holes or reaches past the extent is refused by name."""
    from osgeo import osr

    from backend.raster import parse_crs

    p = pb()
    path = make_tif(rasters["folder"] / "rotated_view_utm.tif", noise((3, 640, 640), seed=41),
                    geotransform=(500000.0, 1.0, 0.0, 5000000.0, 0.0, -1.0))
    raster = index(server, path)[-1].result
    extent = p.Extent(xmin=500000.0, ymin=4999360.0, xmax=500640.0, ymax=5000000.0, crs="EPSG:32633")

    def found(extent, polygon=""):
        request = p.SearchRequest(query="roads", k=1000, raster_ids=[raster.raster_id], extent=extent,
                                  extent_polygon_wkt=polygon)
        return {h.tile_id: shapely.from_wkt(h.footprint_wkt) for h in
                server.stub.Search(request, metadata=server.metadata).hits}

    everything = found(extent)
    assert len(everything) == raster.tile_count >= 16
    # the view turned 45 degrees: a diamond touching the middle of each edge of the box
    diamond = shapely.Polygon([(500320.0, 4999360.0), (500640.0, 4999680.0), (500320.0, 5000000.0),
                               (500000.0, 4999680.0)])
    kept = found(extent, diamond.wkt)
    # tiles that share ground with it: one that only touches it (a corner on its edge) is not in the view
    assert set(kept) == {t for t, footprint in everything.items()
                         if footprint.intersects(diamond) and not footprint.touches(diamond)}
    assert len(kept) < len(everything)          # the corners' tiles are in the box, not the view
    # a tile's own extent finds that tile, not its 8 neighbours whose edges touch it
    tile, footprint = next((t, f) for t, f in everything.items() if f.bounds[0] > 500000.0 and f.bounds[1] > 4999360.0)
    x0, y0, x1, y1 = footprint.bounds
    assert set(found(p.Extent(xmin=x0, ymin=y0, xmax=x1, ymax=y1, crs="EPSG:32633"))) == {tile}
    # the same diamond in longitude/latitude, over the raster in UTM
    to_lonlat = osr.CoordinateTransformation(parse_crs("EPSG:32633"), parse_crs("EPSG:4326"))
    ring = shapely.segmentize(diamond.exterior, 10.0)
    lonlat = shapely.Polygon(np.asarray(to_lonlat.TransformPoints(np.asarray(ring.coords)[:, :2].tolist()))[:, :2])
    west, south, east, north = lonlat.bounds
    moved = found(p.Extent(xmin=west, ymin=south, xmax=east, ymax=north, crs="EPSG:4326"), lonlat.wkt)
    for tile, footprint in everything.items():
        if footprint.centroid.within(diamond) or footprint.intersection(diamond).area > 1000.0:
            assert tile in moved
        if footprint.distance(diamond) > 5.0:
            assert tile not in moved

    def refused(polygon, on=extent) -> str:
        request = p.SearchRequest(query="roads", raster_ids=[raster.raster_id], extent_polygon_wkt=polygon)
        if on is not None:
            request.extent.CopyFrom(on)
        with pytest.raises(grpc.RpcError) as e:
            server.stub.Search(request, metadata=server.metadata)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return e.value.details()

    assert "not WKT" in refused("POLYGON((1 2, 3")
    assert "one POLYGON, not MULTIPOLYGON" in refused(shapely.MultiPolygon([diamond, diamond]).wkt)
    bowtie = "POLYGON((500000 4999400, 500600 4999900, 500600 4999400, 500000 4999900, 500000 4999400))"
    assert "must not cross itself" in refused(bowtie)
    assert "without holes" in refused(shapely.Polygon(diamond.exterior.coords, [
        [(500300.0, 4999660.0), (500340.0, 4999660.0), (500340.0, 4999700.0)]]).wkt)
    assert "reaches past the extent" in refused(shapely.affinity.translate(diamond, 100.0).wkt)
    assert "needs an extent" in refused(diamond.wkt, on=None)
    # the client's --within: the polygon's box is the extent
    out = client(server, "search", "roads", "--k", "1000", "--raster", str(path), "--within", diamond.wkt,
                 "--extent-crs", "EPSG:32633", "--json")
    assert out.returncode == 0, out.stderr
    assert {h["tile_id"] for h in json.loads(out.stdout)["results"]} == set(kept)
    out = client(server, "search", "roads", "--raster", str(path), "--within", "POLYGON((0 0, 1", "--extent-crs",
                 "EPSG:32633")
    assert out.returncode == 2 and "--within is not WKT" in out.stderr and "Traceback" not in out.stderr
    far = shapely.affinity.translate(diamond, 1e5)
    out = client(server, "search", "roads", "--raster", str(path), "--within", far.wkt, "--extent-crs", "EPSG:32633")
    assert out.returncode == 0 and "no tile of the rasters given (--raster, --raster-id) lies in the --within polygon (EPSG:32633)" in out.stderr


def test_an_extent_partly_off_the_globe_gets_a_box_round_its_part_on_it():
    """A view partly past the globe's rim (orthographic) or past a Mollweide map's edge gets a
    longitude/latitude box for the index, holding every point of the view that lies on the globe
    (checked on a grid four times as fine as the one the box is made from), and small where the view
    is: without one, every tile in the index was met with the view one by one."""
    from backend import service
    from backend.raster import parse_crs, transform_points_quietly, transformation

    rng = np.random.default_rng(7)
    radius = 6.371e6
    checked = 0
    for i in range(44):
        if i % 2 == 0:      # an orthographic globe anywhere, poles and 180 degrees included
            crs = f"+proj=ortho +lat_0={rng.uniform(-90, 90):.3f} +lon_0={rng.uniform(-180, 180):.3f} +datum=WGS84"
            rim = np.array([radius, radius])
        else:
            crs = f"+proj=moll +lon_0={rng.uniform(-180, 180):.2f} +datum=WGS84"
            rim = np.array([2 * math.sqrt(2) * radius, math.sqrt(2) * radius])
        angle = rng.uniform(0, 2 * math.pi)
        centre = rim * [math.cos(angle), math.sin(angle)] * rng.uniform(0.9, 1.1)
        half = np.exp(rng.uniform(math.log(radius / 400), math.log(radius), 2))
        parts = (*(centre - half), *(centre + half), crs)
        fine = 257
        gx, gy = np.meshgrid(np.linspace(parts[0], parts[2], fine), np.linspace(parts[1], parts[3], fine))
        placed = transform_points_quietly(transformation(parse_crs(crs)), np.column_stack([gx.ravel(), gy.ravel()]))
        placed = placed[np.isfinite(placed).all(axis=1)]
        if not 0 < len(placed) < fine * fine:
            continue
        checked += 1
        box, shape = service._search_extent(parts)
        assert box is not None and shape.on_globe, parts
        west, south, east, north = box
        lon = (placed[:, 0] - west) % 360.0 + west
        outside = (lon > east + 1e-9) | (placed[:, 1] < south - 1e-9) | (placed[:, 1] > north + 1e-9)
        assert not outside.any(), (parts, box, placed[outside][:3])
    assert checked >= 20
    # a small view at the rim of a globe centred on Europe: a box of tens of degrees, not the world
    rim_view = (4e6, -2e6, 9e6, 2e6, "+proj=ortho +lat_0=40 +lon_0=10 +datum=WGS84")
    west, south, east, north = service._search_extent(rim_view)[0]
    assert 40 < west and east < 125 and -25 < south and north < 55
    # wholly off the globe: no box, and nothing on the globe to find
    box, shape = service._search_extent((2e7, 2e7, 3e7, 3e7, "+proj=ortho +lat_0=40 +lon_0=10 +datum=WGS84"))
    assert box is None and not shape.on_globe


def test_a_search_extent_past_its_crs_or_round_a_pole_keeps_to_the_extent(server, rasters):
    """An orthographic view zoomed out past the globe has corners with no longitude/latitude: it is
    searched, not refused, and holds the tiles on the visible globe only. An extent round a pole in a
    polar CRS is judged in that CRS, so tiles inside its longitude/latitude cap but outside the
    extent itself are left out."""
    p = pb()
    north = index(server, rasters["rgb"])[-1].result            # UTM 33N, about 45 degrees north
    south_path = make_tif(rasters["folder"] / "south_4326.tif", noise((3, 64, 64), seed=23),
                          geotransform=(20.0, 0.001, 0.0, -30.0, 0.0, -0.001), crs="EPSG:4326")
    south = index(server, south_path)[-1].result
    polar_path = make_tif(rasters["folder"] / "polar_east_3413.tif", noise((3, 64, 64), seed=24),
                          geotransform=(1_000_000.0, 500.0, 0.0, -850_000.0, 0.0, -500.0), crs="EPSG:3413")
    polar = index(server, polar_path)[-1].result
    ids = [north.raster_id, south.raster_id, polar.raster_id]

    def rasters_hit(extent):
        request = p.SearchRequest(query="roads", k=1000, raster_ids=ids, extent=extent)
        hits = server.stub.Search(request, metadata=server.metadata).hits
        return {h.raster_id: sum(g.raster_id == h.raster_id for g in hits) for h in hits}

    # North Pole orthographic, out past the globe: the northern hemisphere is in view, whole
    globe = p.Extent(xmin=-3e7, ymin=-3e7, xmax=3e7, ymax=3e7, crs="ESRI:102035")
    assert rasters_hit(globe) == {north.raster_id: north.tile_count, polar.raster_id: polar.tile_count}
    # the polar raster lies east of the pole (x from 1,000 km): the western half round the pole misses it
    west_of_pole = p.Extent(xmin=-3e6, ymin=-3e6, xmax=0.0, ymax=3e6, crs="EPSG:3413")
    east_of_pole = p.Extent(xmin=0.0, ymin=-3e6, xmax=3e6, ymax=3e6, crs="EPSG:3413")
    assert polar.raster_id not in rasters_hit(west_of_pole)
    assert rasters_hit(east_of_pole)[polar.raster_id] == polar.tile_count
    for raster in (south, polar):
        server.stub.RemoveRaster(p.RemoveRasterRequest(raster_id=raster.raster_id), metadata=server.metadata)


def test_search_extents_across_the_maps_seam_round_a_pole_and_at_the_globes_edge(server, rasters):
    """Extents whose longitude/latitude box is no simple box, each checked against the tiles that truly
    meet them (each tile's outline, 20 points an edge, moved into the extent's CRS):
    an orthographic view out past the globe's edge (the box GDAL gives round its on-globe corners
    left out the edge), a Web Mercator view panned past 180 degrees, a wide view in a CRS centred on
    150 degrees east (refused as an "inverted" box before), a box round the south pole in
    longitude/latitude, and a local polar box across 180 degrees, which tears when moved into a
    longitude/latitude raster CRS (and then let in every candidate)."""
    from osgeo import osr
    from shapely.geometry import box as shapely_box, shape as shapely_shape  # noqa: F401
    import shapely

    from backend.raster import densified_box, parse_crs

    p = pb()
    folder = rasters["folder"]
    pacific = index(server, make_tif(folder / "pacific_4326.tif", noise((3, 100, 100), seed=31),
                                     geotransform=(-176.0, 0.01, 0.0, -20.0, 0.0, -0.01), crs="EPSG:4326"))[-1].result
    hidden = index(server, make_tif(folder / "atlantic_4326.tif", noise((3, 64, 64), seed=32),
                                    geotransform=(0.0, 0.01, 0.0, 21.0, 0.0, -0.01), crs="EPSG:4326"))[-1].result
    pole = index(server, make_tif(folder / "south_pole_3031.tif", noise((3, 64, 64), seed=33),
                                  geotransform=(-1000.0, 100.0, 0.0, 1000.0, 0.0, -100.0), crs="EPSG:3031"))[-1].result
    ross = index(server, make_tif(folder / "ross_sea_4326.tif", noise((3, 100, 800), seed=34),
                                  geotransform=(140.0, 0.1, 0.0, -65.0, 0.0, -0.1), crs="EPSG:4326"))[-1].result
    gap = index(server, make_tif(folder / "mid_atlantic_4326.tif", noise((3, 64, 64), seed=35),
                                 geotransform=(-30.0, 0.01, 0.0, 2.0, 0.0, -0.01), crs="EPSG:4326"))[-1].result
    # one 320 km tile with a corner on the south pole, reaching lon 90..180 only
    corner = index(server, make_tif(folder / "pole_corner_3031.tif", noise((3, 64, 64), seed=36),
                                    geotransform=(0.0, 5000.0, 0.0, 0.0, 0.0, -5000.0), crs="EPSG:3031"))[-1].result
    # Web Mercator pixels running past 180 degrees (175..185 E)
    seam = index(server, make_tif(folder / "past_180_3857.tif", noise((3, 64, 1100), seed=37),
                                  geotransform=(19_480_000.0, 1000.0, 0.0, -2_200_000.0, 0.0, -1000.0),
                                  crs="EPSG:3857"))[-1].result
    # one coarse 32 x 32 degree tile reaching the rim of an orthographic globe
    coarse = index(server, make_tif(folder / "coarse_4326.tif", noise((3, 64, 64), seed=38),
                                    geotransform=(170.0, 0.5, 0.0, 0.0, 0.0, -0.5), crs="EPSG:4326"))[-1].result
    ids = [r.raster_id for r in (pacific, hidden, pole, ross, gap, corner, seam, coarse)]
    everything = server.stub.Search(p.SearchRequest(query="roads", k=1000, raster_ids=ids),
                                    metadata=server.metadata).hits

    def truly_in(extent, hit) -> bool:
        target = parse_crs(extent.crs or "EPSG:4326")
        xs, ys = densified_box(hit.bounds.xmin, hit.bounds.ymin, hit.bounds.xmax, hit.bounds.ymax, 20)
        moved = np.asarray(osr.CoordinateTransformation(parse_crs(hit.crs.wkt), target).TransformPoints(
            np.column_stack([xs, ys]).tolist()))[:, :2]
        moved = moved[np.isfinite(moved).all(axis=1)]
        inside = (moved[:, 0] >= extent.xmin) & (moved[:, 0] <= extent.xmax) & \
                 (moved[:, 1] >= extent.ymin) & (moved[:, 1] <= extent.ymax)
        return bool(inside.any())

    def found(extent) -> set:
        request = p.SearchRequest(query="roads", k=1000, raster_ids=ids, extent=extent)
        return {h.tile_id for h in server.stub.Search(request, metadata=server.metadata).hits}

    ortho = "+proj=ortho +lat_0=-30 +lon_0=100 +datum=WGS84 +units=m +no_defs"
    by_raster = lambda raster: {h.tile_id for h in everything if h.raster_id == raster.raster_id}  # noqa: E731
    # the Pacific raster lies near the visible globe's edge, the Atlantic one on its hidden side
    past_the_edge = p.Extent(xmin=5e6, ymin=-3e6, xmax=3e7, ymax=3e6, crs=ortho)
    assert found(past_the_edge) & (by_raster(pacific) | by_raster(hidden)) == by_raster(pacific)
    # Web Mercator panned east past 180 degrees: the Pacific raster at 184 degrees east is in view
    past_180 = p.Extent(xmin=1.0e7, ymin=-3e6, xmax=3.0e7, ymax=-1e6, crs="EPSG:3857")
    assert found(past_180) & (by_raster(pacific) | by_raster(hidden) | by_raster(ross)) == by_raster(pacific)
    # a Web Mercator or Pacific-centred map zoomed out past one world: GDAL's box of it wraps its ends
    for wide in (p.Extent(xmin=-8e7, ymin=-3e7, xmax=8e7, ymax=3e7, crs="EPSG:3857"),
                 p.Extent(xmin=-2.84e7, ymin=-1.5e7, xmax=2.84e7, ymax=1.5e7, crs="EPSG:3832")):
        assert found(wide) >= by_raster(pacific) | by_raster(hidden), wide
    # nearly the whole world in a CRS centred on 150 degrees east
    assert found(p.Extent(xmin=-2e7, ymin=-1.5e7, xmax=2e7, ymax=1.5e7, crs="EPSG:3832")) >= \
        by_raster(pacific) | by_raster(hidden)
    # the tile holding the south pole, in a box round the pole
    cap = p.Extent(xmin=-180, ymin=-90, xmax=180, ymax=-89.95, crs="EPSG:4326")
    at_pole = found(cap)
    assert at_pole and at_pole == {h.tile_id for h in everything if truly_in(cap, h)}
    assert all(h.bounds_wgs84.ymin == -90.0 for h in everything if h.tile_id in at_pole)
    # a local box across 180 degrees in the south polar CRS, over a longitude/latitude raster
    across = p.Extent(xmin=-5e5, ymin=-2.5e6, xmax=5e5, ymax=-2.0e6, crs="EPSG:3031")
    truth = {h.tile_id for h in everything if h.raster_id == ross.raster_id and truly_in(across, h)}
    assert truth and found(across) == truth and len(truth) < len(by_raster(ross))
    # a cylindrical view just under one world shows no tile in the longitudes it leaves out
    assert not found(p.Extent(xmin=-1.9e7, ymin=-1e7, xmax=1.9e7, ymax=1e7, crs="EPSG:3832")) & by_raster(gap)
    assert found(p.Extent(xmin=-2.0e7, ymin=-1e7, xmax=2.0e7, ymax=1e7, crs="EPSG:3832")) >= by_raster(gap)
    # a tile with a corner on the pole spans the longitudes it covers, not those the pole is given
    assert not found(p.Extent(xmin=0, ymin=-89, xmax=10, ymax=-87)) & by_raster(corner)
    assert found(p.Extent(xmin=120, ymin=-89, xmax=130, ymax=-87)) >= by_raster(corner)
    # a local extent east of 180 over Web Mercator pixels past 180
    east = p.Extent(xmin=-179, ymin=-21, xmax=-176, ymax=-19)
    truth = {h.tile_id for h in everything if h.raster_id == seam.raster_id and truly_in(east, h)}
    assert truth and found(east) & by_raster(seam) == truth
    # an orthographic view at the globe's rim, inside one coarse tile: none of the tile's outline is in it
    rim = osr.CoordinateTransformation(parse_crs("EPSG:4326"), parse_crs(ortho)).TransformPoint(190.0, -10.0)
    at_rim = p.Extent(xmin=rim[0] - 2e5, ymin=rim[1] - 2e5, xmax=rim[0] + 2e5, ymax=rim[1] + 2e5, crs=ortho)
    assert found(at_rim) & by_raster(coarse) == by_raster(coarse)
    for raster in (pacific, hidden, pole, ross, gap, corner, seam, coarse):
        server.stub.RemoveRaster(p.RemoveRasterRequest(raster_id=raster.raster_id), metadata=server.metadata)


def test_caption_and_embed_text(server, rasters):
    response = server.stub.Caption(pb().CaptionRequest(source=pb().RasterSource(path=str(rasters["rgb"])),
                                                       max_len=8, beam_size=2), metadata=server.metadata)
    assert isinstance(response.caption, str) and response.mean_log_prob <= 0.0
    assert response.crs.authid == "EPSG:32633"
    embedded = server.stub.EmbedText(pb().EmbedTextRequest(texts=["a lake", "a road"]), metadata=server.metadata)
    vectors = np.array([e.values for e in embedded.embeddings])
    assert vectors.shape == (2, embedded.dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    info = server.stub.GetInfo(pb().GetInfoRequest(), metadata=server.metadata)
    assert embedded.checkpoint_hash == info.checkpoint_hash and info.model_preset == "tiny"


def test_a_segment_answer_past_the_message_limit_says_what_to_leave_out(checkpoint, rasters, tmp_path):
    p = pb()
    live = LiveServer(checkpoint, tmp_path / "data", [rasters["folder"]], extra=("--max-message-mb", "0.0625")).start()
    try:
        request = p.SegmentRequest(source=p.RasterSource(path=str(rasters["rgb"])), prompts=["trees"],
                                   return_relevance_map=True, threshold=0.0)
        with pytest.raises(grpc.RpcError) as e:
            list(live.stub.Segment(request, metadata=live.metadata, timeout=120))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than this server's message limit" in e.value.details()
        assert "leave return_relevance_map off" in e.value.details(), e.value.details()
        request.return_relevance_map = False
        assert [ev for ev in live.stub.Segment(request, metadata=live.metadata, timeout=120) if ev.HasField("result")]
    finally:
        live.stop()


def test_caption_and_segment_of_an_extent_with_no_valid_pixel_are_refused(server, rasters):
    """The transparent half of a raster: black pixels got a confident caption; now INVALID_ARGUMENT.
    The half with imagery is described. Segment said "0 polygons" there, as if nothing of the kind
    were on the ground; it is refused alike."""
    p = pb()
    x0, y0 = 1113194.9, 6800000.0          # rgba_3857.tif: 160 x 160 pixels of 5 m, the left 80 columns transparent

    def caption(x1, x2):
        return server.stub.Caption(p.CaptionRequest(source=p.RasterSource(path=str(rasters["rgba"])),
                                                    extent=p.Extent(xmin=x1, ymin=y0 - 700, xmax=x2, ymax=y0 - 100)),
                                   metadata=server.metadata)
    with pytest.raises(grpc.RpcError) as e:
        caption(x0 + 10, x0 + 350)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "holds no valid pixels" in e.value.details()
    assert caption(x0 + 450, x0 + 750).caption
    # a large extent (read as it is) and one smaller than a model tile (read with the ground around it)
    for x1, x2 in ((x0 + 10, x0 + 390), (x0 + 100, x0 + 200)):
        with pytest.raises(grpc.RpcError) as e:
            segment(server, rasters["rgba"], ["trees"], extent=p.Extent(xmin=x1, ymin=y0 - 790, xmax=x2, ymax=y0 - 10),
                    threshold=0.0)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "holds no valid pixels" in e.value.details()
    results, _ = segment(server, rasters["rgba"], ["trees"], threshold=0.0,
                         extent=p.Extent(xmin=x0 + 10, ymin=y0 - 790, xmax=x0 + 750, ymax=y0 - 10))
    assert results[0].polygons


def test_caption_extent_of_a_rotated_raster_covers_all_four_corners(server, rasters):
    import math

    c, s_ = math.cos(math.radians(30)), math.sin(math.radians(30))
    path = make_tif(rasters["folder"] / "rotated.tif", noise((3, 50, 100), seed=9),
                    geotransform=(1000.0, c, s_, 2000.0, s_, -c))
    response = server.stub.Caption(pb().CaptionRequest(source=pb().RasterSource(path=str(path)), max_len=4),
                                   metadata=server.metadata)
    xs = [1000.0 + c * px + s_ * py for px, py in ((0, 0), (100, 0), (0, 50), (100, 50))]
    ys = [2000.0 + s_ * px - c * py for px, py in ((0, 0), (100, 0), (0, 50), (100, 50))]
    e = response.extent
    assert (e.xmin, e.ymin, e.xmax, e.ymax) == pytest.approx((min(xs), min(ys), max(xs), max(ys)), abs=1e-6)


def test_a_raster_across_180_degrees_indexes_and_measures_areas_there(server, rasters):
    from osgeo import osr
    from shapely.geometry import box as shapely_box

    from backend.segment import equal_area_transformation, geodesic_area_m2

    # UTM zone 60 north from 830 km to 930 km east: the 180th meridian runs through it
    path = make_tif(rasters["folder"] / "antimeridian.tif", noise((3, 100, 100), seed=11),
                    geotransform=(830000.0, 1000.0, 0.0, 100000.0, 0.0, -1000.0), crs="EPSG:32660")
    done = index(server, path)[-1].result
    assert done.tile_count > 0 and done.bounds_wgs84.xmin > done.bounds_wgs84.xmax    # as GDAL gives them
    # a search extent in the raster's own CRS, which reaches EPSG:4326 across 180 degrees, finds its
    # tiles; one on the far side of the world does not
    p = pb()

    def found(extent):
        return server.stub.Search(p.SearchRequest(query="fields", k=100, raster_ids=[done.raster_id], extent=extent),
                                  metadata=server.metadata).hits

    assert len(found(p.Extent(xmin=840000, ymin=20000, xmax=920000, ymax=90000, crs="EPSG:32660"))) == done.tile_count
    assert len(found(p.Extent(xmin=20, ymin=0, xmax=30, ymax=1, crs="EPSG:4326"))) == 0
    # in longitude/latitude across 180 degrees, as xmin > xmax (no CRS: EPSG:4326 for a Search)
    assert len(found(p.Extent(xmin=170, ymin=0, xmax=-170, ymax=2))) == done.tile_count
    # ... or with longitudes past 180, which reach a longitude/latitude raster west of it too
    west = make_tif(rasters["folder"] / "west_of_180.tif", noise((3, 100, 100), seed=12),
                    geotransform=(-176.0, 0.02, 0.0, 1.0, 0.0, -0.02), crs="EPSG:4326")
    west_done = index(server, west)[-1].result
    past = server.stub.Search(p.SearchRequest(query="fields", k=100, raster_ids=[west_done.raster_id],
                                              extent=p.Extent(xmin=170, ymin=0, xmax=190, ymax=2)),
                              metadata=server.metadata).hits
    assert len(past) == west_done.tile_count > 0
    server.stub.RemoveRaster(p.RemoveRasterRequest(raster_id=west_done.raster_id), metadata=server.metadata)
    # a longitude/latitude raster whose own coordinates run past 180: its tiles east of 180 lie in
    # an extent given west of -179, as longitudes are usually written
    over = make_tif(rasters["folder"] / "over_180.tif", noise((3, 100, 100), seed=13),
                    geotransform=(179.8, 0.005, 0.0, 0.5, 0.0, -0.005), crs="EPSG:4326")
    over_done = index(server, over)[-1].result
    every = server.stub.Search(p.SearchRequest(query="fields", k=1000, raster_ids=[over_done.raster_id]),
                               metadata=server.metadata).hits
    east = server.stub.Search(p.SearchRequest(query="fields", k=1000, raster_ids=[over_done.raster_id],
                                              extent=p.Extent(xmin=-180, ymin=0, xmax=-179, ymax=1)),
                              metadata=server.metadata).hits
    assert {h.tile_id for h in east} == {h.tile_id for h in every if h.bounds.xmax > 180} != set()
    server.stub.RemoveRaster(p.RemoveRasterRequest(raster_id=over_done.raster_id), metadata=server.metadata)
    # projected numbers read as longitude/latitude: refused with the way out, not an empty answer
    code, details = code_of(lambda: found(p.Extent(xmin=840000, ymin=20000, xmax=920000, ymax=90000)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "give that CRS" in details
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32660)
    to_area = equal_area_transformation(srs, 830000.0, 55000.0)
    across, west = shapely_box(880000, 50000, 890000, 60000), shapely_box(760000, 50000, 770000, 60000)
    assert geodesic_area_m2(across, to_area) == pytest.approx(1e8, rel=0.02)   # 10 km x 10 km, give or take
    assert geodesic_area_m2(across, to_area) == pytest.approx(geodesic_area_m2(west, to_area), rel=0.02)


def test_model_work_that_runs_out_of_memory_is_resource_exhausted_with_what_to_ask(checkpoint):
    """The allocator's failure is raised by replacing the engine's compute step (memory cannot be
    exhausted safely in a test): the caller gets RESOURCE_EXHAUSTED saying what to ask for, not an
    internal error, and the engine goes on serving."""
    from backend.engine import EngineError, ModelEngine

    engine = ModelEngine(checkpoint, "cpu")
    real = engine._compute
    try:
        engine._compute = lambda *a: (_ for _ in ()).throw(RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you tried to "
            "allocate 14763950080 bytes"))
        with pytest.raises(EngineError) as e:
            engine.embed_texts(["fields"])
        assert e.value.kind == "resource_exhausted" and "ran out of memory on cpu" in e.value.message
        assert "smaller extent, fewer prompts" in e.value.message
        engine._compute = real
        assert engine.embed_texts(["fields"]).shape[0] == 1
    finally:
        engine.stop()


def test_a_small_extent_is_segmented_with_the_ground_around_it(checkpoint, rasters):
    from backend.engine import ModelEngine
    from backend.raster import open_raster
    from backend.segment import segment

    engine = ModelEngine(checkpoint, "cpu")
    try:
        with open_raster(rasters["rgb"]) as raster:
            gt, size = raster.geotransform, engine.image_size
            x0, y0 = gt[0] + 180 * gt[1], gt[3] + 130 * gt[5]          # a 24 x 24 pixel extent inside
            extent = (x0, y0 + 24 * gt[5], x0 + 24 * gt[1], y0)
            out = segment(raster, ["trees", "roads"], engine, extent=extent, threshold=0.0, edge_radius=0,
                          keep_relevance=True)
    finally:
        engine.stop()
    assert out.extent == pytest.approx(extent)                          # the request's extent, not the read's
    assert min(out.shape) >= size                                       # the model saw a whole tile of ground
    for result in out.results:
        assert result.relevance[result.relevance > 0].size == 24 * 24  # relevance only inside the extent
        for polygon in result.polygons:
            b = polygon.geometry.bounds
            assert b[0] >= extent[0] - 1e-6 and b[2] <= extent[2] + 1e-6 and b[1] >= extent[1] - 1e-6
            assert b[3] <= extent[3] + 1e-6


def test_the_ground_around_a_small_extent_keeps_square_working_pixels_and_the_pixel_limit(checkpoint):
    from backend.engine import ModelEngine
    from backend.raster import RasterError, raster_from_pixels
    from backend.segment import segment

    # pixels 1 m wide and 2 m tall: at a 4 m target resolution the working pixels are 4 x 4 m, as
    # for a large extent, not 4 x 8
    tall = raster_from_pixels(noise((3, 1000, 1000), seed=5), 1000, 1000, 3, "Byte",
                              (500000.0, 1.0, 0.0, 5002000.0, 0.0, -2.0), "EPSG:32614")
    # a long strip thinner than one tile: widening it to a tile of ground would pass the pixel limit
    strip = raster_from_pixels(noise((3, 200, 4000), seed=6), 4000, 200, 3, "Byte",
                               (500000.0, 1.0, 0.0, 5000200.0, 0.0, -1.0), "EPSG:32614")
    engine = ModelEngine(checkpoint, "cpu")
    try:
        small = segment(tall, ["trees"], engine, extent=(500400, 5001000, 500460, 5001100), target_resolution=4.0,
                        threshold=0.0, edge_radius=0)
        large = segment(tall, ["trees"], engine, extent=(500000, 5000000, 501000, 5002000), target_resolution=4.0,
                        threshold=0.0, edge_radius=0)
        assert (small.geotransform[1], small.geotransform[5]) == pytest.approx((4.0, -4.0))
        assert (large.geotransform[1], large.geotransform[5]) == pytest.approx((4.0, -4.0))
        out = segment(strip, ["trees"], engine, extent=(500000, 5000190, 504000, 5000200), max_pixels=100_000,
                      threshold=0.0, edge_radius=0)
        assert out.shape == (10, 4000)              # the strip itself, within the limit
        with pytest.raises(RasterError) as e:       # and a strip over the limit is refused, not widened
            segment(strip, ["trees"], engine, extent=(500000, 5000190, 504000, 5000200), max_pixels=30_000)
        assert e.value.kind == "resource_exhausted"
    finally:
        engine.stop()
        tall.close()    # in-memory GDAL datasets: closed here, not by the garbage collector at exit
        strip.close()


def test_segment_refuses_prompts_the_model_reads_as_one(server, rasters):
    """"houses" and "Houses." embed alike: relevance is shared among the prompts, so each would get
    half of every pixel and neither a polygon; the request is refused, naming both."""
    p = pb()
    request = p.SegmentRequest(source=p.RasterSource(path=str(rasters["rgb"])), prompts=["trees", "houses", "Houses."])
    code, details = code_of(lambda: server.stub.Segment(request, metadata=server.metadata, timeout=120))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompts 2 ('houses') and 3 ('Houses.') read the same to the model" in details, details
    results, _ = segment(server, rasters["rgb"], ["trees", "houses"], threshold=0.0)
    assert [r.prompt for r in results] == ["trees", "houses"]


def test_segment_of_a_rotated_raster_keeps_to_the_requested_extent(checkpoint, rasters):
    import math

    import shapely

    from backend.engine import ModelEngine
    from backend.raster import RasterError, open_raster
    from backend.segment import segment

    c, s_ = math.cos(math.radians(30)), math.sin(math.radians(30))
    path = make_tif(rasters["folder"] / "rotated_scene.tif", noise((3, 300, 300), seed=3),
                    geotransform=(500000.0, c, s_, 5000000.0, s_, -c))
    engine = ModelEngine(checkpoint, "cpu")
    try:
        with open_raster(path) as raster:
            b = raster.bounds
            cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
            extent = (cx - 40, cy - 40, cx + 40, cy + 40)
            out = segment(raster, ["trees"], engine, extent=extent, threshold=0.0, edge_radius=0)
            # just off the raster's first corner, where the box round the extent in the raster's grid
            # still takes in a few pixels: refused, where it gave no polygons and named those pixels
            # as the extent segmented
            with pytest.raises(RasterError, match="the extent covers no pixel of .*rotated_scene.tif"):
                segment(raster, ["trees"], engine, extent=(499983.1, 4999996.9, 499995.1, 5000008.9))
        # an Arctic raster and the southern hemisphere: the box round it in the raster's CRS is all of it
        arctic = make_tif(rasters["folder"] / "arctic_segment_3413.tif", noise((3, 64, 64), seed=5),
                          geotransform=(1_000_000.0, 500.0, 0.0, -850_000.0, 0.0, -500.0), crs="EPSG:3413")
        with open_raster(arctic) as raster, pytest.raises(RasterError, match="does not overlap"):
            segment(raster, ["trees"], engine, extent=(-180.0, -90.0, 180.0, 0.0, "EPSG:4326"))
    finally:
        engine.stop()
    assert out.extent == pytest.approx(extent)
    polygons = [p.geometry for p in out.results[0].polygons]
    covered = sum(p.area for p in polygons)
    outside = sum(p.difference(shapely.box(*extent)).area for p in polygons)
    assert covered == pytest.approx(80 * 80, rel=0.05) and outside < 0.02 * covered   # pixel edges only


def test_pixels_touching_at_a_corner_are_kept_or_dropped_as_one_region():
    from osgeo import osr

    from backend.segment import polygons_for_prompt

    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    relevance = np.zeros((6, 6))
    relevance[0:2, 0:2] = relevance[2:4, 2:4] = 1.0          # two 2 x 2 blocks meeting at one corner: 8 px
    args = (np.ones((6, 6), bool), (500000.0, 1.0, 0.0, 5000000.0, 0.0, -1.0), srs, 0.5)
    kept, dropped = polygons_for_prompt(relevance, *args, 5.0, 0.0, None)       # region of 8 m2 >= 5
    assert dropped == 0 and sum(r.area for r in kept) == 8.0
    kept, dropped = polygons_for_prompt(relevance, *args, 9.0, 0.0, None)       # one region below 9 m2
    assert kept == [] and dropped == 1


def test_simplified_edges_leave_no_slivers_smaller_than_a_pixel():
    from osgeo import osr

    from backend.segment import polygons_for_prompt

    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    field = np.random.default_rng(0).normal(size=(200, 200))
    for _ in range(4):                       # a smooth relevance field: blobs with staircase edges
        field = sum(np.roll(np.roll(field, dy, 0), dx, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
    pixel = 0.5
    kept, _ = polygons_for_prompt(field, np.ones(field.shape, bool), (500000.0, pixel, 0.0, 5000000.0, 0.0, -pixel),
                                  srs, float(np.median(field)), 0.0, pixel, None)
    # no half-pixel triangle beside a region's larger parts (a region that is all small stays whole)
    for r in kept:
        large_parts = [part.area >= 0.75 * pixel ** 2 for part in getattr(r.geometry, "geoms", [r.geometry])]
        assert all(large_parts) or not any(large_parts)
    small = [r.geometry for r in kept if r.area < 0.75 * pixel ** 2]
    large = shapely.union_all([r.geometry for r in kept if r.area >= 0.75 * pixel ** 2])
    # no half-pixel triangle beside a region's real parts: what small parts stay are whole tiny regions,
    # which touch no other region (corner-touching pixels are one region)
    assert not any(part.intersects(large) for part in small)
    assert sum(r.area for r in kept) == pytest.approx((field >= np.median(field)).sum() * pixel ** 2, rel=0.05)
    lone = np.zeros((6, 6))
    lone[3, 3] = 1.0                                                # one pixel: a detection, kept
    alone, dropped = polygons_for_prompt(lone, np.ones((6, 6), bool), (500000.0, 1.0, 0.0, 5000000.0, 0.0, -1.0),
                                         srs, 0.5, 0.0, 1.0, None)
    assert len(alone) == 1 and dropped == 0


def test_a_raster_without_longitude_latitude_is_never_placed_on_the_globe(server, rasters):
    path = make_tif(rasters["folder"] / "local_grid.tif", noise((3, 64, 64), seed=12),
                    geotransform=(10.0, 1.0, 0.0, 50.0, 0.0, -1.0), crs="LOCAL_CS[\"site grid\",UNIT[\"metre\",1]]")
    done = index(server, path)[-1].result
    p = pb()
    only = [done.raster_id]
    hits = server.stub.Search(p.SearchRequest(query="x", k=5, raster_ids=only), metadata=server.metadata).hits
    assert hits and all(not h.HasField("bounds_wgs84") and h.footprint_wgs84_wkt == "" for h in hits)
    assert all(h.bounds.xmin >= 10.0 and h.bounds.ymax <= 50.0 for h in hits)         # its own grid is kept
    # its grid numbers are no longitudes: an extent around (20 E, 30 N) does not find it
    placed = server.stub.Search(p.SearchRequest(query="x", k=5, raster_ids=only, extent=p.Extent(
        xmin=20, ymin=30, xmax=21, ymax=31, crs="EPSG:4326")), metadata=server.metadata)
    assert not placed.hits
    anywhere = server.stub.Search(p.SearchRequest(query="x", k=5, raster_ids=only, extent=p.Extent(
        xmin=-180, ymin=-90, xmax=180, ymax=90, crs="EPSG:4326")), metadata=server.metadata)
    assert not anywhere.hits                                   # not even the whole globe
    # nor an extent with no longitude/latitude box of its own (corners off the globe), nor a box round a pole
    for extent in (p.Extent(xmin=-3e7, ymin=-3e7, xmax=3e7, ymax=3e7, crs="ESRI:102035"),
                   p.Extent(xmin=-3e6, ymin=-3e6, xmax=3e6, ymax=3e6, crs="EPSG:3413")):
        assert not server.stub.Search(p.SearchRequest(query="x", k=5, raster_ids=only, extent=extent),
                                      metadata=server.metadata).hits
    out = client(server, "search", "--json", "x", "--k", "2", "--raster-id", done.raster_id)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)["results"]
    assert found and all(r["bounds_wgs84"] is None for r in found)
    # its CRS has no code: segment names it by its WKT, as search does
    out = client(server, "segment", "--json", "--raster", str(path), "--prompt", "x", "--threshold", "0")
    assert out.returncode == 0, out.stderr
    assert "site grid" in json.loads(out.stdout)["crs"] and "site grid" in found[0]["crs"]


def test_segment_refines_relevance_along_the_image_edges_unless_asked_not_to(server, rasters, tiny_config):
    from backend.defaults import default_edge_radius
    from backend.edges import edge_refined

    info = server.stub.GetInfo(pb().GetInfoRequest(), metadata=server.metadata)
    assert "edge_refinement" in info.capabilities
    assert info.default_edge_radius == default_edge_radius(tiny_config.image_size) > 0
    path = rasters["rgb"]

    def relevance(**kw):
        (r,), _ = segment(server, path, ["trees"], return_relevance_map=True, threshold=0.5, **kw)
        ds = gdal.Open(_vsimem(r.relevance_map_tiff))    # held: a band outlives no dataset
        return ds.GetRasterBand(1).ReadAsArray(), r

    raw, _ = relevance(edge_radius=0)
    refined, result = relevance()
    radius = info.default_edge_radius
    # the server's default is exactly the unrefined map refined with the image as the guide
    rgb = gdal.Open(str(path)).ReadAsArray()
    valid = np.ones(raw.shape, bool)
    expected = edge_refined(raw[None], rgb, valid, radius)[0]
    np.testing.assert_allclose(refined, expected, atol=1e-4)
    assert np.abs(refined - raw).max() > 1e-3
    assert result.max_relevance == pytest.approx(float(refined.max()), abs=1e-5)
    smaller, _ = relevance(edge_radius=radius // 4)
    np.testing.assert_allclose(smaller, edge_refined(raw[None], rgb, valid, radius // 4)[0], atol=1e-4)
    for bad in (-1, info.limits.max_edge_radius + 1):
        code, details = code_of(lambda: segment(server, path, ["trees"], edge_radius=bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "edge_radius" in details, (bad, details)


def test_search_embeds_the_query_as_a_prompt_ensemble_unless_raw(server, rasters, tokenizer):
    """A search scores tiles against the mean of the query's phrasings (re-normalised); raw_query
    scores them against the query as typed. Checked exactly through the wire: a tile's ensemble
    score is the sum of its raw scores for each phrasing over the norm of the phrasings' sum."""
    from backend.model.prompts import ensemble_prompts

    p = pb()
    result = index(server, rasters["rgb"])[-1].result
    n = result.tile_count

    def scores(query, raw):
        hits = server.stub.Search(p.SearchRequest(query=query, k=n, raster_ids=[result.raster_id], raw_query=raw),
                                  metadata=server.metadata).hits
        assert len(hits) == n
        return {h.tile_id: h.score for h in hits}

    query = "green fields next to a road."
    phrasings, _ = ensemble_prompts([query])
    assert "an aerial photo of green fields next to a road." in phrasings
    vectors = np.array([e.values for e in server.stub.EmbedText(p.EmbedTextRequest(texts=phrasings),
                                                                metadata=server.metadata).embeddings])
    norm = np.linalg.norm(vectors.sum(0))
    # each phrasing searched as typed, as the model reads it: the tiny model reads fewer tokens than some
    # phrasings take (the ensemble cuts them there; a query that long is refused), so those are sent cut
    room = server.stub.GetInfo(p.GetInfoRequest(), metadata=server.metadata).text_context_length - 2
    as_read = []
    for text in phrasings:
        ids = tokenizer.encode(text)
        if len(ids) > room:
            text = tokenizer.decode(ids[:room])
            assert tokenizer.encode(text) == ids[:room]
        as_read.append(text)
    per_phrasing = [scores(text, raw=True) for text in as_read]
    ensemble = scores(query, raw=False)
    for tile, score in ensemble.items():
        assert score == pytest.approx(sum(s[tile] for s in per_phrasing) / norm, abs=1e-4)
    raw = scores(query, raw=True)
    assert max(abs(raw[t] - ensemble[t]) for t in raw) > 1e-3      # raw_query is not the ensemble
    assert "prompt_ensemble" in server.stub.GetInfo(p.GetInfoRequest(), metadata=server.metadata).capabilities

    results, _ = segment(server, rasters["rgb"], ["trees"], return_relevance_map=True)
    raw_results, _ = segment(server, rasters["rgb"], ["trees"], return_relevance_map=True, raw_prompts=True)
    assert results[0].max_relevance != pytest.approx(raw_results[0].max_relevance, abs=1e-6)


def test_pixel_source_round_trip(server):
    pixels = noise((3, 100, 120), seed=9)
    source = pb().RasterSource(pixels=pb().PixelSource(
        width=120, height=100, band_count=3, data_type=pb().DATA_TYPE_UINT8, data=pixels.tobytes(),
        geotransform=[600000.0, 1.0, 0.0, 5500000.0, 0.0, -1.0], crs="EPSG:32631", label="canvas view"))
    done = list(server.stub.IndexRaster(pb().IndexRasterRequest(source=source), metadata=server.metadata))[-1]
    assert done.result.raster_name == "canvas view" and done.result.raster_path == ""
    hits = server.stub.Search(pb().SearchRequest(query="houses", raster_ids=[done.result.raster_id],
                                                 include_thumbnails=True), metadata=server.metadata).hits
    assert hits and all(h.raster_path == "" and h.thumbnail_png == b"" for h in hits)
    # no file to have changed: no note, and the state says why
    assert all(h.changed_on_disk == "" and h.file_state == pb().FILE_STATE_PIXELS for h in hits)
    listed = {r.raster_id: r for r in server.stub.ListRasters(pb().ListRastersRequest(), metadata=server.metadata).rasters}
    assert listed[done.result.raster_id].file_state == pb().FILE_STATE_PIXELS
    events = list(server.stub.Segment(pb().SegmentRequest(source=source, prompts=["houses"], threshold=0.0),
                                      metadata=server.metadata))
    assert events[-1].result.crs.authid == "EPSG:32631" and events[-1].result.polygons


# ---- bad input: a status and a message a person can act on; the server keeps serving ----------

def test_bad_requests_get_clear_statuses(server, rasters, tmp_path):
    p, md, stub = pb(), server.metadata, server.stub
    src = lambda path: p.RasterSource(path=str(path))  # noqa: E731
    outside = make_tif(tmp_path / "outside.tif", noise((3, 32, 32)))
    rgb = rasters["rgb"]
    context = stub.GetInfo(p.GetInfoRequest(), metadata=md).text_context_length
    cases = [
        (lambda: index(server, rasters["folder"] / "missing.tif"), grpc.StatusCode.NOT_FOUND, "does not exist"),
        (lambda: index(server, rasters["folder"] / "not_a_raster.tif"), grpc.StatusCode.INVALID_ARGUMENT, "not a raster"),
        (lambda: index(server, outside), grpc.StatusCode.PERMISSION_DENIED, "allowed roots"),
        (lambda: stub.Search(p.SearchRequest(query=""), metadata=md), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (lambda: stub.Search(p.SearchRequest(query="x" * 5000), metadata=md), grpc.StatusCode.INVALID_ARGUMENT, "limit"),
        # nothing to look for: it embedded, and its hits looked like any search's
        (lambda: stub.Search(p.SearchRequest(query="!!! 123"), metadata=md), grpc.StatusCode.INVALID_ARGUMENT,
         "has no word to look for"),
        (lambda: next(stub.Segment(p.SegmentRequest(source=src(rgb), prompts=["trees", "\U0001F3DF\uFE0F"]),
                                   metadata=md)), grpc.StatusCode.INVALID_ARGUMENT, "prompts[1]"),
        # past the text tower's context: its end was cut off without a word (searches alike whatever it said)
        (lambda: stub.Search(p.SearchRequest(query="a long field " * context, raw_query=True), metadata=md),
         grpc.StatusCode.INVALID_ARGUMENT, f"the model reads at most {context - 2}"),
        (lambda: next(stub.Segment(p.SegmentRequest(source=src(rgb), prompts=["trees", "a road " * context]),
                                   metadata=md)), grpc.StatusCode.INVALID_ARGUMENT, "prompts[1] is"),
        (lambda: stub.Search(p.SearchRequest(query="roads", k=10**6), metadata=md), grpc.StatusCode.INVALID_ARGUMENT, "k="),
        (lambda: stub.Search(p.SearchRequest(query="roads", raster_ids=["999999"]), metadata=md),
         grpc.StatusCode.NOT_FOUND, "999999"),
        # ids no index can hold: a digit str.isdigit accepts and int() does not, and past SQLite's integers
        (lambda: stub.Search(p.SearchRequest(query="roads", raster_ids=["\u00b2"]), metadata=md),
         grpc.StatusCode.NOT_FOUND, "is not in the tile index"),
        (lambda: stub.Search(p.SearchRequest(query="roads", raster_ids=["9" * 23]), metadata=md),
         grpc.StatusCode.NOT_FOUND, "is not in the tile index"),
        (lambda: stub.RemoveRaster(p.RemoveRasterRequest(raster_id="\u00b2"), metadata=md),
         grpc.StatusCode.NOT_FOUND, "is not in the tile index"),
        (lambda: stub.Search(p.SearchRequest(like_tile_id=2**63), metadata=md),
         grpc.StatusCode.NOT_FOUND, "is not in the tile index"),
        (lambda: segment(server, rgb, ["trees"], extent=p.Extent(xmin=10, ymin=0, xmax=0, ymax=10)),
         grpc.StatusCode.INVALID_ARGUMENT, "inverted"),
        (lambda: segment(server, rgb, ["trees"], extent=p.Extent(xmin=0, ymin=0, xmax=10, ymax=10)),
         grpc.StatusCode.INVALID_ARGUMENT, "does not overlap"),
        (lambda: segment(server, rgb, ["trees"], extent=p.Extent(xmin=0, ymin=0, xmax=1, ymax=1, crs="EPSG:999999")),
         grpc.StatusCode.INVALID_ARGUMENT, "EPSG:999999"),
        (lambda: segment(server, rgb, []), grpc.StatusCode.INVALID_ARGUMENT, "prompts is empty"),
        (lambda: segment(server, rgb, ["ok", "  "]), grpc.StatusCode.INVALID_ARGUMENT, "prompts[1]"),
        (lambda: segment(server, rgb, ["trees"], threshold=1.5), grpc.StatusCode.INVALID_ARGUMENT, "threshold"),
        (lambda: segment(server, rgb, ["trees"], min_area_m2=-1.0), grpc.StatusCode.INVALID_ARGUMENT,
         "min_area_m2 -1.0 must be 0 or a positive area in square metres"),
        (lambda: segment(server, rgb, ["trees"], min_area_m2=math.inf), grpc.StatusCode.INVALID_ARGUMENT, "min_area_m2"),
        (lambda: segment(server, rgb, ["trees"], bands=p.BandMapping(red=7)), grpc.StatusCode.INVALID_ARGUMENT, "7"),
        (lambda: stub.Caption(p.CaptionRequest(source=src(rgb), beam_size=99), metadata=md),
         grpc.StatusCode.INVALID_ARGUMENT, "beam_size"),
        # the start token takes one place of the text context: a caption fills the rest at most
        (lambda: stub.Caption(p.CaptionRequest(source=src(rgb), max_len=context), metadata=md),
         grpc.StatusCode.INVALID_ARGUMENT, f"at most {context - 1} tokens"),
        # a thumbnail size over the limit is refused whether thumbnails were asked for or not
        (lambda: stub.Search(p.SearchRequest(query="roads", thumbnail_size=100_000), metadata=md),
         grpc.StatusCode.INVALID_ARGUMENT, "thumbnail_size 100000"),
        (lambda: stub.EmbedText(p.EmbedTextRequest(), metadata=md), grpc.StatusCode.INVALID_ARGUMENT, "texts is empty"),
        (lambda: stub.IndexRaster(p.IndexRasterRequest(), metadata=md), grpc.StatusCode.INVALID_ARGUMENT, "source"),
        (lambda: stub.Segment(p.SegmentRequest(source=p.RasterSource(pixels=p.PixelSource(
            width=10, height=10, band_count=3, data_type=p.DATA_TYPE_UINT8, data=b"x" * 7,
            geotransform=[0, 1, 0, 0, 0, -1], crs="EPSG:3857")), prompts=["a"]), metadata=md),
         grpc.StatusCode.INVALID_ARGUMENT, "300 bytes"),
        (lambda: stub.Segment(p.SegmentRequest(source=p.RasterSource(pixels=p.PixelSource(
            width=1000, height=1000, band_count=5, data_type=p.DATA_TYPE_UINT8, data=b"\0" * 5_000_000,
            geotransform=[0, 1, 0, 0, 0, -1], crs="EPSG:3857")), prompts=["a"]), metadata=md),
         grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    ]
    for call, expected, words in cases:
        code, details = code_of(call)
        assert code == expected, (expected, code, details)
        assert words in details, (words, details)
    assert stub.GetInfo(p.GetInfoRequest(), metadata=md).api_version == "skyprompt.v1"


def test_token_and_health(server):
    p = pb()
    code, details = code_of(lambda: server.stub.GetInfo(p.GetInfoRequest()))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "token" in details
    code, _ = code_of(lambda: list(server.stub.IndexRaster(p.IndexRasterRequest(),
                                                           metadata=(("authorization", "Bearer wrong"),))))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(server.channel)
    for name in ("", "skyprompt.v1.SkyPrompt"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = list(stub.ServerReflectionInfo(iter([request]), metadata=server.metadata))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"skyprompt.v1.SkyPrompt", "grpc.health.v1.Health"} <= names


def test_search_query_expansion_over_the_wire(checkpoint, tmp_path):
    """`serve --search-expand 2` makes expansion the default: GetInfo says so, a request without
    expand gets it, expand 0 turns it off, and the hits are those of TileIndex.search with the same
    expansion on the server's own index (opened here once the server has stopped). Bad counts are
    refused by name; the client passes --expand through and shows the default."""
    from backend.defaults import EXPAND_WEIGHT
    from backend.index import TileIndex

    p = pb()
    raster = make_tif(tmp_path / "grid.tif", noise((3, 256, 256), seed=11))
    live = LiveServer(checkpoint, tmp_path / "data", [tmp_path], extra=("--search-expand", "2")).start()
    try:
        info = live.stub.GetInfo(p.GetInfoRequest(), metadata=live.metadata)
        assert info.default_search_expand == 2 and "query_expansion" in info.capabilities
        result = index(live, raster)[-1].result
        n = result.tile_count
        assert n >= 9

        def search(**kw):
            hits = live.stub.Search(p.SearchRequest(query="a quarry", k=n, raw_query=True, **kw),
                                    metadata=live.metadata).hits
            return [(h.tile_id, h.score) for h in hits]

        default, off, two, three = search(), search(expand=0), search(expand=2), search(expand=3)
        assert default == two and two != off and three != two
        vector = np.array(live.stub.EmbedText(p.EmbedTextRequest(texts=["a quarry"]),
                                              metadata=live.metadata).embeddings[0].values)
        for bad in (info.limits.max_expand + 1,):
            code, details = code_of(lambda: search(expand=bad))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and f"expand {bad}" in details, details
        out = client(live, "info")
        assert out.returncode == 0 and "query expansion from the 2 best tiles" in out.stdout, out.stderr
        out = client(live, "search", "--json", "--raw-query", "--k", str(n), "--expand", "3", "a quarry")
        assert out.returncode == 0, out.stderr
        assert [r["tile_id"] for r in json.loads(out.stdout)["results"]] == [t for t, _ in three]
        for flag in ("--expand", "--k"):
            out = client(live, "search", flag, "-1", "a quarry")
            assert out.returncode != 0 and f"{flag} -1 must be 0 or more" in out.stderr
            assert "Traceback" not in out.stderr
    finally:
        live.stop()
    with TileIndex(tmp_path / "data" / "index") as tiles:
        for expand, wire in ((0, off), (2, two), (3, three)):
            local = tiles.search(vector, n, info.checkpoint_hash, expand=expand, expand_weight=EXPAND_WEIGHT)
            assert [h.tile_id for h in local] == [t for t, _ in wire]
            np.testing.assert_allclose([h.score for h in local], [s for _, s in wire], atol=1e-5)


def test_query_expansion_within_a_polygon_expands_from_tiles_in_it(checkpoint, tmp_path):
    """--expand with a polygon (a rotated view, --within): the index expanded from the best tiles of the
    box round the polygon, which may all lie outside it, so tiles the user never sees steered the
    search. It expands from the best tiles that meet the polygon, as the hits returned do."""
    from backend.index import TileIndex, expanded_queries

    p = pb()
    path = make_tif(tmp_path / "view.tif", noise((3, 512, 512), seed=43),
                    geotransform=(500000.0, 1.0, 0.0, 5000000.0, 0.0, -1.0))
    extent = p.Extent(xmin=500000.0, ymin=4999488.0, xmax=500512.0, ymax=5000000.0, crs="EPSG:32633")
    corner = shapely.Polygon([(500000.0, 4999488.0), (500200.0, 4999488.0), (500000.0, 4999688.0)])
    live = LiveServer(checkpoint, tmp_path / "data", [tmp_path]).start()
    try:
        info = live.stub.GetInfo(p.GetInfoRequest(), metadata=live.metadata)
        n = index(live, path)[-1].result.tile_count

        def search(**kw):
            request = p.SearchRequest(query="a quarry", k=n, raw_query=True, extent=extent, keyword_weight=0.0, **kw)
            return [(h.tile_id, h.score) for h in live.stub.Search(request, metadata=live.metadata).hits]
        inside = search(extent_polygon_wkt=corner.wkt, expand=0)
        expanded = search(extent_polygon_wkt=corner.wkt, expand=2)
        # min_score is for the expanded query's scores: the tiles expanded from are picked without it
        floor = expanded[len(expanded) // 2][1]
        floored = search(extent_polygon_wkt=corner.wkt, expand=2, min_score=floor)
        assert floored == [(t, sc) for t, sc in expanded if sc >= floor] and floored
        whole = search(expand=0)
        vector = np.array(live.stub.EmbedText(p.EmbedTextRequest(texts=["a quarry"]),
                                              metadata=live.metadata).embeddings[0].values, np.float32)
    finally:
        live.stop()
    assert 2 <= len(inside) < len(whole) and [t for t, _ in whole[:2]] != [t for t, _ in inside[:2]]
    with TileIndex(tmp_path / "data" / "index") as tiles:
        best = np.stack([tiles.tile_embedding(t, info.checkpoint_hash) for t, _ in inside[:2]])
        moved = expanded_queries(vector[None], best.T, [np.arange(2)], 2, 2.0)[0]
        ranked = tiles.search(moved, n, info.checkpoint_hash)
    in_corner = {t for t, _ in inside}
    assert [t for t, _ in expanded] == [h.tile_id for h in ranked if h.tile_id in in_corner]


def test_search_for_tiles_like_a_tile(server, rasters):
    """like_tile_id: that tile's stored embedding is the query, so it comes first with score 1; with a
    query too, or an unknown tile, the call fails by name; the client's --like-tile does the same."""
    p = pb()
    result = index(server, rasters["rgb"])[-1].result
    n = result.tile_count
    text = server.stub.Search(p.SearchRequest(query="green fields", k=n, raster_ids=[result.raster_id]),
                              metadata=server.metadata).hits
    target = text[-1].tile_id                                  # the tile least like the words
    like = server.stub.Search(p.SearchRequest(like_tile_id=target, k=n, raster_ids=[result.raster_id]),
                              metadata=server.metadata)
    assert like.hits[0].tile_id == target and like.hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert len(like.hits) == n and list(like.unfamiliar_words) == []
    assert [h.tile_id for h in like.hits] != [h.tile_id for h in text]
    info = server.stub.GetInfo(p.GetInfoRequest(), metadata=server.metadata)
    assert "like_tile" in info.capabilities
    code, details = code_of(lambda: server.stub.Search(p.SearchRequest(query="fields", like_tile_id=target),
                                                       metadata=server.metadata))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not both" in details
    code, details = code_of(lambda: server.stub.Search(p.SearchRequest(like_tile_id=10 ** 9), metadata=server.metadata))
    assert code == grpc.StatusCode.NOT_FOUND and f"tile {10 ** 9} is not in the tile index" in details
    out = client(server, "search", "--json", "--k", str(n), "--raster-id", result.raster_id, "--like-tile", str(target))
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["like_tile_id"] == target and [r["tile_id"] for r in data["results"]] == [h.tile_id for h in like.hits]
    # the text answer shows the ids --like-tile and remove take
    out = client(server, "search", "--k", "2", "--raster-id", result.raster_id, "--like-tile", str(target))
    assert out.returncode == 0 and f"tile {like.hits[0].tile_id} " in out.stdout
    assert f"(raster id {result.raster_id})" in out.stdout
    out = client(server, "search", "--like-tile", str(target), "green fields")
    assert out.returncode != 0 and "not both" in out.stderr and "Traceback" not in out.stderr
    out = client(server, "search")
    assert out.returncode != 0 and "give what to look for" in out.stderr and "Traceback" not in out.stderr


def test_serve_on_a_port_in_use_names_the_port(checkpoint, tmp_path):
    """Setup errors Server finds (here: the port is taken) exit 2 like the option checks."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "backend", "serve", "--port", str(port), "--checkpoint",
                              str(checkpoint), "--data-dir", str(tmp_path / "data")], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
    assert out.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in out.stderr, out.stderr
    assert "try --port" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr           # one line, no gRPC log beside it


@pytest.mark.parametrize("flags, message", [
    (["--port", "-5"], "--port -5 must be 0"), (["--workers", "0"], "--workers 0 must be at least 1"),
    (["--sao-window", "4"], "--sao-window 4 must be odd"),
    (["--segments-at-once", "0"], "--segments-at-once 0 must be 1 or more"), (["--max-message-mb", "0"], "--max-message-mb 0"),
    (["--max-message-mb", "0.001"], "--max-message-mb 0.001 is below 0.0625 (64 KiB)"),
    (["--log-level", "LOUD"], "--log-level LOUD: use one of"), (["--data-dir", "FILE"], "is a file"),
    (["--port-file", "MISSING/port"], "its folder does not exist"),
    (["--port-file", "."], "--port-file . is a folder: give a file name in it"),
    (["--tls-cert", "MISSING/c.pem", "--tls-key", "MISSING/k.pem"], "--tls-cert MISSING/c.pem cannot be read"),
    (["--tls-cert", "FILE"], "give both --tls-cert and --tls-key"),
    (["--host", "0.0.0.0"], "off loopback a token is required"), (["--index-views", "3"], "--index-views 3"),
    (["--edge-radius", "-2"], "--edge-radius -2"), (["--search-expand", "-1"], "--search-expand -1"),
    (["--data-dir", ""], "argument --data-dir: empty: give a path"), (["--allow-root", " "], "argument --allow-root: empty"),
], ids=["port", "workers", "sao-window", "segments-at-once", "max-message", "max-message-tiny", "log-level", "data-dir", "port-file", "port-file-folder", "tls", "tls-pair",
        "token", "views", "edge-radius", "search-expand", "empty-data-dir", "empty-root"])
def test_serve_checks_its_options_before_loading_the_model(tmp_path, flags, message):
    # the checkpoint does not exist: a message about the option shows it was checked before the model loaded
    (tmp_path / "FILE").write_text("not a folder")
    out = subprocess.run([sys.executable, "-m", "backend", "serve", "--checkpoint", str(tmp_path / "no-checkpoint"),
                          "--data-dir", str(tmp_path / "data"), *flags], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120,
                         env={**{k: v for k, v in os.environ.items() if k != "SKYPROMPT_TOKEN"}, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert (tmp_path / "FILE").read_text() == "not a folder"


def test_serve_refuses_a_damaged_index_and_leaves_it_alone(checkpoint, tmp_path):
    from backend.index import DB_NAME

    db = tmp_path / "data" / "index" / DB_NAME
    db.parent.mkdir(parents=True)
    garbage = b"this is not an sqlite database " * 300
    db.write_bytes(garbage)
    out = subprocess.run([sys.executable, "-m", "backend", "serve", "--checkpoint", str(checkpoint), "--data-dir",
                          str(tmp_path / "data"), "--port", "0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "cannot be read" in out.stderr and "move it aside" in out.stderr
    assert "Traceback" not in out.stderr and db.read_bytes() == garbage


# ---- concurrency, cancellation, crashes ------------------------------------------------------------

def test_32_concurrent_clients(server, rasters):
    index(server, rasters["rgb"])
    p = pb()

    def client(i):
        channel = grpc.insecure_channel(server.address)
        from backend.rpc import skyprompt_pb2_grpc as pb_grpc
        stub = pb_grpc.SkyPromptStub(channel)
        try:
            if i % 2:
                return len(stub.Search(p.SearchRequest(query=f"query number {i}", k=3), metadata=server.metadata,
                                       timeout=120).hits)
            return len(stub.EmbedText(p.EmbedTextRequest(texts=[f"text {i}", "lake"]), metadata=server.metadata,
                                      timeout=120).embeddings)
        finally:
            channel.close()

    with ThreadPoolExecutor(32) as pool:
        counts = list(pool.map(client, range(32)))
    assert all(c > 0 for c in counts)


def big_raster(folder: Path, side: int = 3000) -> Path:
    path = folder / f"big_{side}.tif"
    if not path.exists():
        make_tif(path, noise((3, side, side), seed=5), options=["TILED=YES"])
    return path


def test_cancelled_index_stops_within_a_second_and_stores_nothing(server, rasters):
    path = big_raster(rasters["folder"])
    p = pb()
    index(server, rasters["rgb"])   # an index the cancel must leave searchable (unchanged if an earlier test made it)
    call = server.stub.IndexRaster(p.IndexRasterRequest(source=p.RasterSource(path=str(path))),
                                   metadata=server.metadata)
    for progress in call:
        if progress.stage == p.INDEX_STAGE_EMBEDDING and progress.tiles_done > 0:
            break
    cancelled_at = time.monotonic()
    call.cancel()
    marker = f"indexing {path.name} stopped after"
    while marker not in server.log_text():
        assert time.monotonic() - cancelled_at < 1.0 + 0.5, "indexing did not stop within a second"
        time.sleep(0.02)
    hits = server.stub.Search(p.SearchRequest(query="x", k=1000, raster_paths=[str(rasters["rgb"])]),
                              metadata=server.metadata)
    assert hits.tiles_searched > 0
    code, details = code_of(lambda: server.stub.Search(p.SearchRequest(query="x", raster_paths=[str(path)]),
                                                       metadata=server.metadata))
    assert code == grpc.StatusCode.NOT_FOUND


def test_ctrl_c_in_the_cli_cancels_indexing_on_the_server(server, rasters):
    import select
    import signal

    path = big_raster(rasters["folder"], side=2900)
    marker = f"indexing {path.name} stopped after"
    for attempt in range(3):     # Ctrl-C pressed twice once made the client hang now and then, closing its channel
        proc = subprocess.Popen([sys.executable, "-m", "backend", "client", "index", str(path), "--server",
                                 server.address], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "SKYPROMPT_TOKEN": server.token})
        shown, deadline = b"", time.monotonic() + 120
        while b"%|" not in shown:                      # the progress bar: the server is working on it
            assert time.monotonic() < deadline and proc.poll() is None, shown
            if select.select([proc.stderr], [], [], 0.1)[0]:
                shown += os.read(proc.stderr.fileno(), 4096)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.02 * attempt)
        proc.send_signal(signal.SIGINT)         # pressed twice, as an impatient user does
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"the client hung after Ctrl-C (attempt {attempt + 1})") from None
        assert proc.returncode == 130 and b"interrupted" in err and b"Traceback" not in err, err
        stopped = time.monotonic()
        while server.log_text().count(marker) < attempt + 1:
            assert time.monotonic() - stopped < 5, "the server went on indexing"
            time.sleep(0.05)
    p = pb()
    code, _ = code_of(lambda: server.stub.Search(p.SearchRequest(query="x", raster_paths=[str(path)]),
                                                 metadata=server.metadata))
    assert code == grpc.StatusCode.NOT_FOUND


def _until_embedding(call, p):
    """Read an IndexRaster stream until it has embedded some tiles; the rest of the stream."""
    for progress in call:
        if progress.stage == p.INDEX_STAGE_EMBEDDING and progress.tiles_done > 0:
            return call
    raise AssertionError("the stream ended before it embedded a tile")


def test_two_requests_indexing_one_raster_embed_it_once(server, rasters):
    path = big_raster(rasters["folder"], 1500)
    p = pb()
    request = p.IndexRasterRequest(source=p.RasterSource(path=str(path)))
    first = _until_embedding(server.stub.IndexRaster(request, metadata=server.metadata, timeout=300), p)
    second = list(server.stub.IndexRaster(request, metadata=server.metadata, timeout=300))
    first = list(first)
    assert first[-1].result.outcome == p.INDEX_OUTCOME_INDEXED
    # the second waited for the first, then found the raster indexed already
    assert [m.stage for m in second][:2] == [p.INDEX_STAGE_OPENING, p.INDEX_STAGE_QUEUED]
    assert "waiting: another request is indexing" in second[1].message
    assert second[-1].result.outcome == p.INDEX_OUTCOME_UNCHANGED
    assert second[-1].result.tile_count == first[-1].result.tile_count
    assert server.log_text().count(f"indexed {path.name}:") == 1
    server.stub.RemoveRaster(p.RemoveRasterRequest(raster_path=str(path)), metadata=server.metadata)


def test_remove_during_a_forced_reindex_stays_removed(server, rasters):
    path = big_raster(rasters["folder"], 1400)
    p = pb()
    first = index(server, path)[-1].result
    request = p.IndexRasterRequest(source=p.RasterSource(path=str(path)), force=True)
    call = _until_embedding(server.stub.IndexRaster(request, metadata=server.metadata, timeout=300), p)
    waiter = server.stub.IndexRaster(request, metadata=server.metadata, timeout=300)
    assert next(m for m in waiter if m.stage == p.INDEX_STAGE_QUEUED)       # waiting for the first
    removed = server.stub.RemoveRaster(p.RemoveRasterRequest(raster_id=first.raster_id), metadata=server.metadata)
    assert removed.indexing_stopped and removed.tiles_removed == first.tile_count
    code, details = code_of(lambda: call)
    assert code == grpc.StatusCode.ABORTED and "removed from the index" in details and "nothing was stored" in details
    assert "while it was being indexed" in details
    # the request that waited was made before the removal too: it stops, and says it only waited
    code, details = code_of(lambda: waiter)
    assert code == grpc.StatusCode.ABORTED and "waited to index it" in details
    assert f"indexing {path.name} stopped after" in server.log_text() and "removed from the index meanwhile" in \
        server.log_text()
    listed = server.stub.ListRasters(p.ListRastersRequest(), metadata=server.metadata).rasters
    assert str(path) not in {r.raster_path for r in listed}
    # indexing it afterwards works as for any raster not in the index
    assert index(server, path)[-1].result.outcome == p.INDEX_OUTCOME_INDEXED
    server.stub.RemoveRaster(p.RemoveRasterRequest(raster_path=str(path)), metadata=server.metadata)


def test_a_removal_stops_requests_opening_waiting_or_indexing_and_nothing_stored():
    """How a removal meets the requests on one raster: one still opening it (a large VRT takes a
    while) or waiting for another is stopped when it comes to work; one indexing is stopped; one
    whose tiles are already stored stops nothing, and the removal must not claim it did."""
    import threading

    from backend.service import RequestError, _RasterJobs

    jobs = _RasterJobs()
    key = "/data/r.tif"

    def take(job):
        holding = jobs.acquire(job, "r.tif", lambda: False)
        try:
            while True:
                next(holding)
        except StopIteration:
            return job

    # opening: counted in before the raster is opened, stopped when it comes to work
    opening = jobs.join(key)
    assert jobs.mark_removed(key) is True
    with pytest.raises(RequestError, match="while this request opened it or waited to index it"):
        take(opening)
    jobs.leave(opening)
    # indexing, not stored yet: stopped
    job = take(jobs.join(key))
    assert jobs.mark_removed(key) is True and job.removed.is_set()
    jobs.release(job)
    jobs.leave(job)
    # stored already: the removal removes its tiles and stops nothing
    job = take(jobs.join(key))
    job.committed = True
    assert jobs.mark_removed(key) is False
    jobs.release(job)
    jobs.leave(job)
    # stored, with a request waiting for it: that one is stopped
    job = take(jobs.join(key))
    job.committed = True
    outcome = []

    def waiter():
        queued = jobs.join(key)
        try:
            outcome.append(take(queued))
        except RequestError as e:
            outcome.append(e)
        finally:
            jobs.leave(queued)

    thread = threading.Thread(target=waiter)
    thread.start()
    deadline = time.monotonic() + 10
    while job.users < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert jobs.mark_removed(key) is True
    jobs.release(job)
    jobs.leave(job)
    thread.join(10)
    assert isinstance(outcome[0], RequestError) and "waited to index it" in outcome[0].message
    assert jobs.mark_removed(key) is False and not jobs._jobs          # nothing left behind


def test_remove_by_path_stops_a_first_indexing_through_the_client(server, rasters):
    path = big_raster(rasters["folder"], 1300)
    p = pb()
    call = _until_embedding(server.stub.IndexRaster(p.IndexRasterRequest(source=p.RasterSource(path=str(path))),
                                                    metadata=server.metadata, timeout=300), p)
    out = subprocess.run([sys.executable, "-m", "backend", "client", "remove", str(path), "--server", server.address],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "SKYPROMPT_TOKEN": server.token},
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"stopped the indexing of {path.name} under way" in out.stdout
    code, details = code_of(lambda: call)
    assert code == grpc.StatusCode.ABORTED and "removed from the index" in details
    code, _ = code_of(lambda: server.stub.Search(p.SearchRequest(query="x", raster_paths=[str(path)]),
                                                 metadata=server.metadata))
    assert code == grpc.StatusCode.NOT_FOUND


def test_raster_rewritten_mid_index_is_aborted(server, rasters):
    path = big_raster(rasters["folder"], 2500)
    p = pb()
    call = server.stub.IndexRaster(p.IndexRasterRequest(source=p.RasterSource(path=str(path))),
                                   metadata=server.metadata)
    code = None
    try:
        for progress in call:
            if progress.stage == p.INDEX_STAGE_EMBEDDING and progress.tiles_done > 0:
                os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))   # "rewritten"
    except grpc.RpcError as e:
        code, details = e.code(), e.details()
    assert code == grpc.StatusCode.ABORTED and "changed on disk" in details


def test_restart_keeps_the_index_and_kill_9_mid_index_leaves_it_consistent(checkpoint, rasters, tmp_path):
    data = tmp_path / "data"
    roots = [rasters["folder"]]
    live = LiveServer(checkpoint, data, roots).start()
    first = index(live, rasters["rgb"])[-1].result
    assert live.stop() == 0
    assert "SkyPrompt server stopped" in live.log_text()

    live = LiveServer(checkpoint, data, roots).start()
    again = index(live, rasters["rgb"])[-1].result
    assert again.outcome == pb().INDEX_OUTCOME_UNCHANGED and again.tile_count == first.tile_count
    # start indexing a big raster and kill -9 the server in the middle
    big = big_raster(rasters["folder"])
    call = live.stub.IndexRaster(pb().IndexRasterRequest(source=pb().RasterSource(path=str(big))),
                                 metadata=live.metadata)
    with pytest.raises(grpc.RpcError):
        for progress in call:
            if progress.tiles_done > 0:
                live.proc.kill()
    live.proc.wait(30)
    live.log.close()

    live = LiveServer(checkpoint, data, roots).start()
    info = live.stub.GetInfo(pb().GetInfoRequest(), metadata=live.metadata)
    assert info.index_stats.raster_count == 1 and info.index_stats.tile_count == first.tile_count
    hits = live.stub.Search(pb().SearchRequest(query="fields", k=3), metadata=live.metadata).hits
    assert hits and {h.raster_id for h in hits} == {first.raster_id}
    assert not list((data / "index" / "embeddings").glob(".tmp-*"))
    live.stop()


def test_sigterm_mid_index_cancels_it_at_once_and_stores_nothing(checkpoint, rasters, tmp_path):
    from backend.server import GRACE_S

    data, roots = tmp_path / "data", [rasters["folder"]]
    live = LiveServer(checkpoint, data, roots).start()
    big = big_raster(rasters["folder"])
    call = live.stub.IndexRaster(pb().IndexRasterRequest(source=pb().RasterSource(path=str(big))),
                                 metadata=live.metadata)
    with pytest.raises(grpc.RpcError) as stopped:
        for progress in call:
            if progress.tiles_done > 0 and live.proc.poll() is None:
                signalled = time.monotonic()
                live.proc.send_signal(signal.SIGTERM)
    assert stopped.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert live.proc.wait(60) == 0
    assert time.monotonic() - signalled < GRACE_S          # the running call did not hold shutdown up
    live.log.close()
    assert "SkyPrompt server stopped" in live.log_text()
    live = LiveServer(checkpoint, data, roots).start()
    info = live.stub.GetInfo(pb().GetInfoRequest(), metadata=live.metadata)
    assert info.index_stats.raster_count == 0 and info.index_stats.tile_count == 0
    live.stop()


# ---- command-line client ----------------------------------------------------------------------

def client(server, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend", "client", *args, "--server", server.address],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SKYPROMPT_TOKEN": server.token, **(env or {})})


def test_the_client_and_server_modules_run_as_the_backend_commands(server):
    """`python -m backend.client ...` and `python -m backend.server ...` are what a user types after
    `python -m training.train`: they run the client and the server, not nothing with exit status 0."""
    out = subprocess.run([sys.executable, "-m", "backend.client", "info", "--json", "--server", server.address],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SKYPROMPT_TOKEN": server.token})
    assert out.returncode == 0 and json.loads(out.stdout)["model_preset"] == "tiny", out.stderr
    out = subprocess.run([sys.executable, "-m", "backend.server", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "usage: python -m backend serve" in out.stdout


def ground_cover_raster(path: Path) -> Path:
    """Eight 128 px tiles of four kinds of ground, twice each: water, grass, a grey jumble and sand,
    which the bundled checkpoint captions differently ("... river or lake.", "... meadow.", ...)."""
    rng = np.random.default_rng(0)
    colours = {"water": (20, 60, 110, 6), "grass": (40, 110, 40, 25), "jumble": (128, 128, 128, 60),
               "sand": (210, 190, 150, 0)}
    bands = np.zeros((3, 256, 512), np.uint8)
    for i, (r, g, b, noise_sd) in enumerate(list(colours.values()) * 2):
        row, col = divmod(i, 4)
        tile = np.array([r, g, b], np.float64)[:, None, None] + rng.normal(0, noise_sd, (3, 128, 128))
        bands[:, row * 128:(row + 1) * 128, col * 128:(col + 1) * 128] = np.clip(tile, 0, 255)
    return make_tif(path, bands, geotransform=(500000.0, 1.0, 0.0, 5000000.0, 0.0, -1.0))


def test_search_matches_query_words_against_tile_captions(tmp_path):
    """Indexing writes a caption per tile (the bundled checkpoint's: the test checkpoint's random
    decoder writes one caption for everything); a search adds BM25 of its words in those captions
    to the cosine (keyword_score), so tiles whose caption holds the query's words move up, and
    weight 0 gives the embeddings' order alone."""
    from backend.defaults import BUNDLED_CHECKPOINT
    from backend.keywords import words

    p = pb()
    raster = ground_cover_raster(tmp_path / "ground.tif")
    live = LiveServer(BUNDLED_CHECKPOINT, tmp_path / "data", [tmp_path]).start()
    try:
        assert index(live, raster)[-1].result.tile_count == 8

        def search(query, **kw):
            return list(live.stub.Search(p.SearchRequest(query=query, k=8, **kw), metadata=live.metadata).hits)

        plain = search("a lake", keyword_weight=0.0)
        assert len({h.caption for h in plain}) >= 3 and not any(h.keyword_score for h in plain)
        assert [h.score for h in plain] == sorted((h.score for h in plain), reverse=True)
        lake = {h.tile_id for h in plain if "lake" in words(h.caption)}
        assert len(lake) == 2, [h.caption for h in plain]            # the two water tiles
        cosine = {h.tile_id: h.score for h in plain}
        matched = search("a lake", keyword_weight=5.0)
        assert {h.tile_id for h in matched[:2]} == lake
        assert [h.score for h in matched] == sorted((h.score for h in matched), reverse=True)
        for h in matched:
            assert (h.keyword_score > 0) == (h.tile_id in lake)
            assert h.score == pytest.approx(cosine[h.tile_id] + h.keyword_score, abs=1e-5)
        # unset: the server's default weight, which the answer to GetInfo names
        info = live.stub.GetInfo(p.GetInfoRequest(), metadata=live.metadata)
        assert "keyword_matching" in info.capabilities and info.default_keyword_weight > 0
        assert all((h.keyword_score > 0) == (h.tile_id in lake) for h in search("a lake"))
        with pytest.raises(grpc.RpcError) as refused:
            search("a lake", keyword_weight=-1.0)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "keyword_weight -1" in refused.value.details()
        out = client(live, "search", "--json", "a lake", "--keyword-weight", "5", "--k", "3")
        assert out.returncode == 0, out.stderr
        first = json.loads(out.stdout)["results"][0]
        assert first["tile_id"] in lake and "lake" in first["caption"] and first["keyword_score"] > 0
    finally:
        live.stop()
    # a server that writes no captions (faster indexing) indexes the raster again, without them
    bare = LiveServer(BUNDLED_CHECKPOINT, tmp_path / "data", [tmp_path],
                      extra=("--no-tile-captions", "--keyword-weight", "2")).start()
    try:
        assert index(bare, raster)[-1].result.outcome == p.INDEX_OUTCOME_REPLACED
        assert bare.stub.GetInfo(p.GetInfoRequest(), metadata=bare.metadata).default_keyword_weight == 2.0
        hits = list(bare.stub.Search(p.SearchRequest(query="a lake", k=8), metadata=bare.metadata).hits)
        assert len(hits) == 8 and not any(h.caption or h.keyword_score for h in hits)
    finally:
        bare.stop()
    out = subprocess.run([sys.executable, "-m", "backend", "serve", "--keyword-weight", "11"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--keyword-weight 11 must be in [0, 10]" in out.stderr, out.stderr


def test_thumbnails_stop_where_the_message_limit_would_be_passed(checkpoint, tmp_path):
    """Thumbnails of many hits can outgrow the message limit: the answer keeps every hit, with
    thumbnails for the best ones that fit, instead of failing to send at all. The notes of the hits
    left without one count too: with many hits left, they passed the limit the thumbnails had filled."""
    p = pb()
    raster = make_tif(tmp_path / "noisy.tif", noise((3, 1024, 1024), seed=12))   # noise: PNGs barely compress
    live = LiveServer(checkpoint, tmp_path / "data", [tmp_path], extra=("--max-message-mb", "1")).start()
    try:
        n = index(live, raster)[-1].result.tile_count
        hits = live.stub.Search(p.SearchRequest(query="fields", k=n, include_thumbnails=True, thumbnail_size=128),
                                metadata=live.metadata).hits
    finally:
        live.stop()
    # hits alone past a lower limit: what to ask for, not gRPC's "Sent message larger than max"
    low = LiveServer(checkpoint, tmp_path / "data", [tmp_path], extra=("--max-message-mb", "0.25")).start()
    try:
        with pytest.raises(grpc.RpcError) as e:
            low.stub.Search(p.SearchRequest(query="fields", k=n), metadata=low.metadata)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"{n} hits take" in e.value.details() and "ask for at most" in e.value.details(), e.value.details()
        fit = int(e.value.details().rsplit("at most ", 1)[1].split()[0])
        assert 0 < fit < n and len(low.stub.Search(p.SearchRequest(query="fields", k=fit), metadata=low.metadata).hits) == fit
        # as many with thumbnails: the notes of the hits left without one take room too; what to ask
        # for counts them, where gRPC's own "Sent message larger than max" came back
        with pytest.raises(grpc.RpcError) as e:
            low.stub.Search(p.SearchRequest(query="fields", k=fit, include_thumbnails=True), metadata=low.metadata)
        assert "ask for at most" in e.value.details(), e.value.details()
        fewer = int(e.value.details().rsplit("at most ", 1)[1].split()[0])
        got = low.stub.Search(p.SearchRequest(query="fields", k=fewer, include_thumbnails=True), metadata=low.metadata)
        assert 0 < fewer < fit and len(got.hits) == fewer
    finally:
        low.stop()
    with_png = [bool(h.thumbnail_png) for h in hits]
    assert len(hits) == n and 0 < sum(with_png) < n
    assert with_png == sorted(with_png, reverse=True)               # the best hits have theirs
    assert sum(len(h.thumbnail_png) for h in hits) < 2**20
    # ... and the others say why they have none
    assert all(("message limit" in h.thumbnail_error) != bool(h.thumbnail_png) for h in hits)


@pytest.mark.parametrize("suffix", [".gpkg", ".geojson"])
def test_cli_index_search_segment_caption(server, rasters, tmp_path, suffix):
    out = client(server, "info", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["model_preset"] == "tiny"
    out = client(server, "index", "--json", str(rasters["rgb"]), str(rasters["grey16"]))
    assert out.returncode == 0, out.stderr
    indexed = json.loads(out.stdout)
    assert [Path(r["raster_path"]).name for r in indexed] == ["rgb_utm.tif", "grey16.tif"]
    out = client(server, "search", "--json", "green fields", "--k", "4", "--raster", str(rasters["rgb"]),
                 "--raster", str(rasters["grey16"]))
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert len(found["results"]) == 4 and found["results"][0]["score"] >= found["results"][-1]["score"]
    out = client(server, "search", "--json", "green fields", "--k", "4", "--raster", str(rasters["rgb"]),
                 "--raster", str(rasters["grey16"]), "--raw-query")
    assert out.returncode == 0, out.stderr
    raw = json.loads(out.stdout)["results"]
    assert [h["score"] for h in raw] != [h["score"] for h in found["results"]]
    for hit in found["results"]:
        assert Path(hit["raster"]).name in ("rgb_utm.tif", "grey16.tif") and hit["crs"] in ("EPSG:32633", "EPSG:3035")
        xmin, ymin, xmax, ymax = hit["extent"]
        assert xmin < xmax and ymin < ymax and len(hit["window"]) == 4 and hit["window"][2] > 0
    target = tmp_path / f"out{suffix}"
    out = client(server, "segment", "--json", "--raster", str(rasters["rgb"]), "--prompt", "trees", "--prompt",
                 "roads", "--threshold", "0.3", "--output", str(target))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    ds = ogr.Open(str(target))
    layer = ds.GetLayer(0)
    assert layer.GetFeatureCount() == summary["polygons_written"] == sum(len(r["polygons"]) for r in summary["results"])
    assert same_crs(layer.GetSpatialRef(), srs_of(gdal.Open(str(rasters["rgb"])).GetProjection()))
    prompts = {f.GetField("prompt") for f in layer}
    assert prompts <= {"trees", "roads"}
    out = client(server, "segment", "--json", "--raster", str(rasters["rgb"]), "--prompt", "trees",
                 "--edge-radius", "-3")
    assert out.returncode == 2 and "--edge-radius -3" in out.stderr
    out = client(server, "caption", "--json", "--raster", str(rasters["rgb"]))
    assert out.returncode == 0, out.stderr
    described = json.loads(out.stdout)
    assert described["crs"] == "EPSG:32633" and described["mean_log_prob"] <= 0 and isinstance(described["caption"], str)


CUSTOM_LCC = ('PROJCS["site grid",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],'
              'PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],PROJECTION["Lambert_Conformal_Conic_2SP"],'
              'PARAMETER["standard_parallel_1",44],PARAMETER["standard_parallel_2",46],'
              'PARAMETER["latitude_of_origin",45],PARAMETER["central_meridian",11.3],PARAMETER["false_easting",5000],'
              'PARAMETER["false_northing",7000],UNIT["metre",1]]')


def test_cli_within_across_180_degrees_takes_the_short_way(server, rasters):
    """A --within polygon whose corners lie either side of 180 degrees, written with -179.99: it went
    the long way round (a band round the globe leaving out the area meant); taken the short way, as
    --extent's xmin > xmax is, it finds what the same polygon written past 180 finds."""
    dateline = make_tif(rasters["folder"] / "dateline.tif", noise((3, 128, 256), seed=35),
                        geotransform=(179.9872, 0.0001, 0.0, -16.99, 0.0, -0.0001), crs="EPSG:4326")
    assert client(server, "index", str(dateline)).returncode == 0

    def tiles(polygon):
        out = client(server, "search", "--json", "fields", "--k", "50", "--raster", str(dateline), "--within", polygon)
        assert out.returncode == 0, out.stderr
        return sorted(h["tile_id"] for h in json.loads(out.stdout)["results"])
    from backend.client import _the_short_way

    for meant in ("POLYGON((-10 35, 180 35, 180 75, -10 75, -10 35))",        # 190 degrees wide, ending on 180
                  "POLYGON((-100 20, 100 20, 100 40, -100 40, -100 20))",     # 200 degrees, meant as drawn
                  "POLYGON((-180 60, 180 60, 180 90, -180 90, -180 60))"):   # a polar cap
        assert _the_short_way(meant) == meant
    past = tiles("POLYGON((179.995 -17.002, 180.005 -17.002, 180.005 -16.995, 179.995 -16.995, 179.995 -17.002))")
    wrapped = tiles("POLYGON((179.995 -17.002, -179.995 -17.002, -179.995 -16.995, 179.995 -16.995, 179.995 -17.002))")
    assert past and wrapped == past


def test_cli_index_min_valid_keeps_the_tiles_along_a_ragged_nodata_edge(server, rasters):
    """A tile less than half valid is not stored, so imagery along a nodata edge was in no tile and no
    search found it; `index --min-valid F` (the request's min_valid_fraction) keeps such tiles."""
    data = noise((4, 128, 128), seed=33)
    data[3] = 0
    data[3, :, 108:] = 255          # only the right 20 columns are imagery: under a third of their tile
    edge = make_tif(rasters["folder"] / "ragged_edge.tif", data, colours=[gdal.GCI_RedBand, gdal.GCI_GreenBand,
                                                                          gdal.GCI_BlueBand, gdal.GCI_AlphaBand])
    out = client(server, "index", "--json", str(edge))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["tile_count"] == 0
    out = client(server, "index", "--json", "--min-valid", "0.25", str(edge))
    assert out.returncode == 0, out.stderr
    kept = json.loads(out.stdout)[0]
    assert kept["tile_count"] == 2 and kept["outcome"] == "replaced"      # the two tiles of the right column
    for bad in ("0", "1.5", "nan"):
        out = client(server, "index", "--min-valid", bad, str(edge))
        assert out.returncode == 2 and "--min-valid" in out.stderr and "(0, 1]" in out.stderr, out.stderr


def test_cli_geojson_of_a_crs_without_an_epsg_code_is_longitude_latitude(server, rasters, tmp_path):
    """GDAL's GeoJSON writer names a CRS by its EPSG code only: the polygons of a raster in a custom
    CRS went out in its metres with no CRS named, which every reader takes for WGS 84 degrees. They
    are written in longitude/latitude (RFC 7946) now, and a local CRS, with none, is refused."""
    custom = make_tif(rasters["folder"] / "site_grid.tif", noise((3, 64, 64), seed=31),
                      geotransform=(5000.0, 2.0, 0.0, 7128.0, 0.0, -2.0), crs=CUSTOM_LCC)
    target = tmp_path / "site.geojson"
    out = client(server, "segment", "--json", "--raster", str(custom), "--prompt", "trees", "--threshold", "0",
                 "--output", str(target))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["output_crs"] == "EPSG:4326" and summary["polygons_written"] >= 1
    ds = ogr.Open(str(target))      # held: a layer outlives no data source
    layer = ds.GetLayer(0)
    assert layer.GetSpatialRef().GetAuthorityCode(None) == "4326"
    xmin, xmax, ymin, ymax = layer.GetExtent()
    # the raster's 128 m square starts at its grid's false origin (5000, 7000 m), which is 11.3 E, 45 N
    assert 11.2999 < xmin < xmax < 11.3017 and 44.9999 < ymin < ymax < 45.0012
    text = client(server, "segment", "--raster", str(custom), "--prompt", "trees", "--threshold", "0",
                  "--output", str(tmp_path / "again.geojson"))
    assert text.returncode == 0 and "EPSG:4326, longitude/latitude" in text.stdout, text.stdout + text.stderr
    kept = tmp_path / "site.gpkg"       # a GeoPackage keeps the CRS itself
    text = client(server, "segment", "--raster", str(custom), "--prompt", "trees", "--threshold", "0",
                  "--output", str(kept))
    assert text.returncode == 0 and "('site grid' (a CRS with no EPSG code))" in text.stdout, text.stdout
    # lines of text name such a CRS, where its whole WKT filled the screen on each of them (JSON keeps it)
    assert client(server, "index", str(custom)).returncode == 0
    for command in (["list"], ["search", "trees", "--raster", str(custom), "--k", "2"]):
        text = client(server, *command)
        assert text.returncode == 0 and "'site grid' (a CRS with no EPSG code)" in text.stdout, text.stdout
        assert "PROJCRS[" not in text.stdout and "PROJCS[" not in text.stdout
    ds = ogr.Open(str(kept))
    assert same_crs(ds.GetLayer(0).GetSpatialRef(), srs_of(CUSTOM_LCC))
    # a WKT without its id that GDAL recognises (a VRT's WKT1, often): the GeoJSON names its EPSG code,
    # where it named no CRS, its metres read as degrees, while the answer said EPSG:32611
    utm = osr.SpatialReference()
    utm.ImportFromEPSG(32611)
    no_id = utm.ExportToWkt().replace(',AUTHORITY["EPSG","32611"]', "")
    assert srs_of(no_id).GetAuthorityCode(None) is None
    plain = make_tif(rasters["folder"] / "utm_plain.tif", noise((3, 64, 64), seed=34))
    vrt = rasters["folder"] / "utm_no_id.vrt"
    gdal.Translate(str(vrt), str(plain), format="VRT", outputSRS=no_id).FlushCache()
    target = tmp_path / "utm.geojson"
    out = client(server, "segment", "--json", "--raster", str(vrt), "--prompt", "trees", "--threshold", "0",
                 "--output", str(target))
    assert out.returncode == 0 and json.loads(out.stdout)["crs"] == "EPSG:32611", out.stderr
    assert json.loads(out.stdout)["output_crs"] is None
    assert "32611" in json.dumps(json.loads(target.read_text()).get("crs")), target.read_text()[:300]
    local = make_tif(rasters["folder"] / "local_grid.tif", noise((3, 64, 64), seed=32),
                     geotransform=(0.0, 1.0, 0.0, 64.0, 0.0, -1.0), crs='LOCAL_CS["plant floor",UNIT["metre",1]]')
    refused = client(server, "segment", "--raster", str(local), "--prompt", "trees", "--threshold", "0",
                     "--output", str(tmp_path / "local.geojson"))
    assert refused.returncode == 1 and "give a .gpkg file name" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "local.geojson").exists()


def test_cli_min_area_is_square_metres_whatever_the_crs(server, rasters, tmp_path):
    """--min-area is ground area in m^2, as the plugin's minimum area: on a lon/lat raster (where map
    units^2 are square degrees) and on Web Mercator at 60 N (where they are four times the ground's)."""
    geographic = make_tif(rasters["folder"] / "lonlat_60n.tif", noise((3, 64, 64), seed=21),
                          geotransform=(10.0, 0.0001, 0.0, 60.0032, 0.0, -0.0001), crs="EPSG:4326")
    mercator = make_tif(rasters["folder"] / "mercator_60n.tif", noise((3, 64, 64), seed=22),
                        geotransform=(1113194.9, 10.0, 0.0, 8399737.9, 0.0, -10.0), crs="EPSG:3857")

    def segment_with(path, *flags):
        # threshold 0: the whole raster is one polygon, of a known ground area
        out = client(server, "segment", "--json", "--raster", str(path), "--prompt", "fields", "--threshold", "0",
                     *flags)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    for path, m2_per_map_unit2 in ((geographic, 6.18e9), (mercator, 0.25)):
        whole = segment_with(path)["results"][0]["polygons"]
        assert len(whole) == 1
        area_m2 = whole[0]["area_m2"]
        assert area_m2 / whole[0]["area"] == pytest.approx(m2_per_map_unit2, rel=0.02)
        target = tmp_path / f"{path.stem}.gpkg"
        kept = segment_with(path, "--min-area", str(0.5 * area_m2), "--output", str(target))
        assert len(kept["results"][0]["polygons"]) == 1 and kept["results"][0]["dropped_small"] == 0
        assert kept["polygons_written"] == 1 == ogr.Open(str(target)).GetLayer(0).GetFeatureCount()
        dropped = segment_with(path, "--min-area", str(1.5 * area_m2))
        assert dropped["results"][0]["polygons"] == [] and dropped["results"][0]["dropped_small"] == 1
    text = client(server, "segment", "--raster", str(mercator), "--prompt", "fields", "--threshold", "0",
                  "--min-area", "1e9")
    assert text.returncode == 0 and "1 smaller than --min-area dropped" in text.stdout, text.stderr
    assert "0 polygons" in text.stdout and "m^2)" not in text.stdout        # no ground area of nothing
    # a CRS without longitude/latitude has no area_m2: its polygons stay, and the user is told so
    local = make_tif(rasters["folder"] / "local_grid_min_area.tif", noise((3, 64, 64), seed=23),
                     geotransform=(10.0, 1.0, 0.0, 50.0, 0.0, -1.0), crs="LOCAL_CS[\"site grid\",UNIT[\"metre\",1]]")
    out = client(server, "segment", "--json", "--raster", str(local), "--prompt", "fields", "--threshold", "0",
                 "--min-area", "1e9")
    assert out.returncode == 0 and "1 polygon(s) have no known area in square metres" in out.stderr, out.stderr
    assert len(json.loads(out.stdout)["results"][0]["polygons"]) == 1
    text = client(server, "segment", "--raster", str(local), "--prompt", "fields", "--threshold", "0")
    assert text.returncode == 0 and "1 polygons" in text.stdout and "m^2)" not in text.stdout, text.stdout
    out = client(server, "segment", "--raster", str(mercator), "--prompt", "fields", "--min-area", "-1")
    assert out.returncode == 2 and "--min-area -1" in out.stderr and "square metres" in out.stderr
    assert "segment:" not in out.stderr                                         # refused before the work


def test_cli_segment_checks_options_and_outputs_before_the_work_and_leaves_no_half_output(server, rasters, tmp_path):
    """Options given wrongly and outputs that cannot be written are said before the server works
    (exit status 2); a failure writing the polygons leaves no relevance map behind, nor a temporary
    file (the maps were written one by one, before, and stayed)."""
    import sqlite3

    rgb = str(rasters["rgb"])
    for option, said in ((["--threshold", "1.5"], "--threshold 1.5 must be a relevance in [0, 1]"),
                         (["--resolution", "-1"], "--resolution -1.0 must be 0"),
                         (["--window", "-1"], "--window -1 must be 0"),
                         (["--output", "/sys/skyprompt.gpkg"], "cannot be written in"),
                         (["--relevance-map", "/sys/skyprompt.tif"], "cannot be written in")):
        out = client(server, "segment", "--raster", rgb, "--prompt", "trees", *option)
        assert out.returncode == 2 and said in out.stderr and "segment:" not in out.stderr, (option, out.stderr)
    # latitude first, in longitude/latitude: said as Search says it
    out = client(server, "segment", "--raster", rgb, "--prompt", "trees", "--extent", "30", "120", "31", "121",
                 "--extent-crs", "EPSG:4326")
    assert out.returncode == 1 and "gives latitude first: longitude comes first" in out.stderr, out.stderr
    # a GeoPackage another program holds locked: the polygons fail after the work, and the maps go too
    target = tmp_path / "locked.gpkg"
    ogr.GetDriverByName("GPKG").CreateDataSource(str(target)).CreateLayer("theirs")
    holder = sqlite3.connect(target, timeout=0.1)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        out = client(server, "segment", "--raster", rgb, "--prompt", "trees", "--prompt", "roads", "--threshold",
                     "0.3", "--output", str(target), "--relevance-map", str(tmp_path / "maps.tif"))
    finally:
        holder.rollback()
        holder.close()
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "another program holds it locked" in out.stderr and "is not a GeoPackage" not in out.stderr, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked.gpkg"]
    assert [layer.GetName() for layer in ogr.Open(str(target))] == ["theirs"]
    out = client(server, "segment", "--raster", rgb, "--prompt", "trees", "--prompt", "roads", "--threshold", "0.3",
                 "--output", str(target), "--relevance-map", str(tmp_path / "maps.tif"))
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked.gpkg", "maps_0.tif", "maps_1.tif"]
    assert gdal.Open(str(tmp_path / "maps_1.tif")).RasterXSize > 0


def test_cli_connection_options_go_before_or_after_the_command(server):
    """--server, --token, --json (and the TLS options and --timeout) work on either side of the
    command; given on both sides, the one after it wins."""
    def run(*args, token=server.token):
        return subprocess.run([sys.executable, "-m", "backend", "client", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "SKYPROMPT_TOKEN": token})

    for args in (["--server", server.address, "--json", "--timeout", "60", "info"],
                 ["info", "--server", server.address, "--json", "--timeout", "60"],
                 ["--server", "127.0.0.1:1", "info", "--server", server.address, "--json"]):
        out = run(*args)
        assert out.returncode == 0, (args, out.stderr)
        assert json.loads(out.stdout)["model_preset"] == "tiny"
    # a token given before the command is not replaced by the command's default (the environment's)
    out = run("--token", "bad", "info", "--server", server.address)
    assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr
    out = run("--server", server.address, "--token", server.token, "list", token="bad")
    assert out.returncode == 0 and "raster(s) in the index" in out.stdout, out.stderr


def test_cli_band_mapping_reaches_the_server(server, rasters):
    out = client(server, "index", "--json", str(rasters["rgb"]))
    assert out.returncode == 0, out.stderr
    out = client(server, "index", "--json", "--bands", "3", "2", "1", str(rasters["rgb"]))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["outcome"] == "replaced"        # other bands: other tiles
    out = client(server, "index", "--json", "--bands", "3", "2", "1", str(rasters["rgb"]))
    assert json.loads(out.stdout)[0]["outcome"] == "unchanged"
    out = client(server, "caption", "--raster", str(rasters["rgb"]), "--bands", "1", "2", "9")
    assert out.returncode != 0 and "INVALID_ARGUMENT" in out.stderr and "9" in out.stderr
    out = client(server, "segment", "--raster", str(rasters["rgb"]), "--prompt", "x", "--bands", "0", "1", "2")
    assert out.returncode != 0 and "band numbers start at 1" in out.stderr and "Traceback" not in out.stderr
    out = client(server, "index", "--json", "--stretch", "98", "2", str(rasters["rgb"]))
    assert out.returncode == 2 and "--stretch 98 2: give LOW then HIGH" in out.stderr, out.stderr
    out = client(server, "index", "--json", "--stretch", "1", "99", str(rasters["rgb"]))
    assert json.loads(out.stdout)[0]["outcome"] == "replaced"
    out = client(server, "index", "--json", str(rasters["rgb"]))        # back to the server's choice, for the rest
    assert json.loads(out.stdout)[0]["outcome"] == "replaced"


def test_cli_says_which_bands_the_server_guessed_for_four_unmarked_bands(server, rasters):
    """A 16-bit stack of four bands marks no colours: the server reads bands 1, 2, 3 as red, green and
    blue, and every answer about it says so (band_note), until the bands are given."""
    stack = make_tif(rasters["folder"] / "four_bands.tif", noise((4, 96, 96), np.uint16, 100, 3000, seed=7))
    out = client(server, "index", "--json", str(stack))
    assert out.returncode == 0, out.stderr
    assert "bands 1, 2, 3 were read as red, green, blue" in json.loads(out.stdout)[0]["band_note"]
    out = client(server, "caption", "--raster", str(stack))
    assert out.returncode == 0 and "note: raster" in out.stderr and "--bands 3 2 1" in out.stderr, out.stderr
    out = client(server, "segment", "--json", "--raster", str(stack), "--prompt", "fields", "--bands", "3", "2", "1")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["band_note"] == "" and "note:" not in out.stderr


def geopackage_with_a_layer(path: Path, name: str, wkt: str) -> Path:
    """A GeoPackage holding one layer `name` with one feature: the user's work an output must keep."""
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    geometry = ogr.CreateGeometryFromWkt(wkt)
    layer = ds.CreateLayer(name, geom_type=geometry.GetGeometryType())
    feature = ogr.Feature(layer.GetLayerDefn())
    feature.SetGeometry(geometry)
    layer.CreateFeature(feature)
    ds = layer = feature = None
    return path

def test_cli_segment_into_an_existing_geopackage_adds_a_layer(server, rasters, tmp_path):
    target = geopackage_with_a_layer(tmp_path / "mywork.gpkg", "my_fields", "POLYGON ((0 0, 1 0, 1 1, 0 0))")
    for _ in range(2):
        out = client(server, "segment", "--json", "--raster", str(rasters["rgb"]), "--prompt", "trees",
                     "--threshold", "0.3", "--output", str(target))
        assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["layer"] == "skyprompt (2)"
    ds = ogr.Open(str(target))
    names = [ds.GetLayer(i).GetName() for i in range(ds.GetLayerCount())]
    assert sorted(names) == ["my_fields", "skyprompt", "skyprompt (2)"]    # the user's layer stays
    assert ds.GetLayerByName("my_fields").GetFeatureCount() == 1
    ds = None
    not_gpkg = tmp_path / "notes.gpkg"
    not_gpkg.write_text("my notes")
    out = client(server, "segment", "--raster", str(rasters["rgb"]), "--prompt", "trees", "--output", str(not_gpkg))
    assert out.returncode != 0 and "not a GeoPackage" in out.stderr and "Traceback" not in out.stderr
    assert not_gpkg.read_text() == "my notes"


def test_polygons_join_a_geopackage_another_program_holds_open(tmp_path):
    """QGIS keeps a GeoPackage open in write-ahead-log mode: the layer is added through SQLite, in
    place, so neither its new layer nor the other program's recent one is lost. A GeoPackage of
    raster tiles only takes a polygon layer too."""
    import shapely as shp

    from backend.client import write_polygons

    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    result = pb().SegmentResult(prompt="a", crs=pb().Crs(authid="EPSG:32633", wkt=srs.ExportToWkt()),
                                polygons=[pb().SegmentPolygon(wkb=shp.to_wkb(shp.box(0, 0, 1, 1)), score=1.0)])
    path = tmp_path / "work.gpkg"
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    ds.CreateLayer("first", srs=srs)
    ds = None
    other = ogr.Open(str(path), update=1)
    other.ExecuteSQL("PRAGMA journal_mode=WAL")
    other.CreateLayer("edited_elsewhere", srs=srs)
    other.FlushCache()
    assert write_polygons(str(path), [result]) == (1, "skyprompt")
    other = None
    listing = subprocess.run([sys.executable, "-c", "import sys; from osgeo import ogr; ds = ogr.Open(sys.argv[1]); "
                              "print(sorted(ds.GetLayer(i).GetName() for i in range(ds.GetLayerCount())))", str(path)],
                             capture_output=True, text=True, timeout=60)
    assert listing.stdout.strip() == "['edited_elsewhere', 'first', 'skyprompt']", listing.stderr
    tiles = tmp_path / "tiles.gpkg"
    raster = gdal.GetDriverByName("GPKG").Create(str(tiles), 8, 8, 3, gdal.GDT_Byte)
    raster.SetGeoTransform((0, 1, 0, 0, 0, -1))
    raster = None
    assert write_polygons(str(tiles), [result]) == (1, "skyprompt")
    named = tmp_path / "named.gpkg"     # a raster table may hold the name too: the polygons take another
    raster = gdal.GetDriverByName("GPKG").Create(str(named), 8, 8, 3, gdal.GDT_Byte,
                                                 options=["RASTER_TABLE=SkyPrompt"])
    raster.SetGeoTransform((0, 1, 0, 0, 0, -1))
    raster = None
    assert write_polygons(str(named), [result]) == (1, "skyprompt (2)")
    assert gdal.OpenEx(str(named), gdal.OF_RASTER).RasterXSize == 8


def test_remove_raster_by_path_and_id(server, rasters):
    p = pb()
    first = index(server, rasters["grey16"])[-1].result
    # list shows it, with the id remove takes
    out = client(server, "list", "--json")
    assert out.returncode == 0, out.stderr
    listed = {r["raster_id"]: r for r in json.loads(out.stdout)}
    assert listed[first.raster_id]["raster_name"] == "grey16.tif"
    assert listed[first.raster_id]["tile_count"] == first.tile_count and listed[first.raster_id]["current_checkpoint"]
    assert listed[first.raster_id]["crs"] == "EPSG:3035" and len(listed[first.raster_id]["bounds"]) == 4
    out = client(server, "list")
    assert out.returncode == 0 and "grey16.tif" in out.stdout and first.raster_id in out.stdout
    out = client(server, "remove", "--json", str(rasters["grey16"]))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [{"raster_id": first.raster_id, "raster_name": "grey16.tif",
                                       "tiles_removed": first.tile_count, "indexing_stopped": False,
                                       "outcome": "removed"}]
    code, details = code_of(lambda: server.stub.Search(p.SearchRequest(query="x", raster_ids=[first.raster_id]),
                                                       metadata=server.metadata))
    assert code == grpc.StatusCode.NOT_FOUND
    assert first.raster_id not in [r.raster_id for r in server.stub.ListRasters(
        p.ListRastersRequest(all_checkpoints=True), metadata=server.metadata).rasters]
    assert rasters["grey16"].exists()          # the file itself is never touched
    again = index(server, rasters["grey16"])[-1].result
    assert again.outcome == p.INDEX_OUTCOME_INDEXED
    removed = server.stub.RemoveRaster(p.RemoveRasterRequest(raster_id=again.raster_id), metadata=server.metadata)
    assert removed.tiles_removed == again.tile_count
    for request, expected in ((p.RemoveRasterRequest(), grpc.StatusCode.INVALID_ARGUMENT),
                              (p.RemoveRasterRequest(raster_id="1", raster_path="/x"), grpc.StatusCode.INVALID_ARGUMENT),
                              (p.RemoveRasterRequest(raster_id=again.raster_id), grpc.StatusCode.NOT_FOUND),
                              (p.RemoveRasterRequest(raster_path="/nowhere.tif"), grpc.StatusCode.NOT_FOUND)):
        assert code_of(lambda: server.stub.RemoveRaster(request, metadata=server.metadata))[0] == expected
    # a raster file whose name is a number, removed from its folder by that name: the file, not an id
    import shutil
    numbered = rasters["folder"] / "2020"
    shutil.copy(rasters["grey16"], numbered)
    indexed = index(server, numbered)[-1].result
    out = subprocess.run([sys.executable, "-m", "backend", "client", "remove", "--json", "2020", "--server",
                          server.address], cwd=rasters["folder"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SKYPROMPT_TOKEN": server.token, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["raster_id"] == indexed.raster_id
    numbered.unlink()
    # one that is not indexed among several: said, and the others are still removed
    kept = index(server, rasters["grey16"])[-1].result
    out = client(server, "remove", "--json", "999999", kept.raster_id)
    assert out.returncode == 1 and "999999: NOT_FOUND" in out.stderr and "1 of 2 rasters could not be removed" in out.stderr
    items = json.loads(out.stdout)
    assert [i["outcome"] for i in items] == ["failed", "removed"] and items[1]["raster_id"] == kept.raster_id


def test_cli_errors_exit_non_zero_with_the_message(server, rasters):
    out = client(server, "search", "   ")
    assert out.returncode != 0 and "INVALID_ARGUMENT" in out.stderr and "Traceback" not in out.stderr
    out = client(server, "segment", "--raster", str(rasters["folder"] / "nope.tif"), "--prompt", "x")
    assert out.returncode != 0 and "NOT_FOUND" in out.stderr
    out = client(server, "search", "roads", "--k", str(2**32))      # more than the request's field holds
    assert out.returncode == 2 and "out of range" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "backend", "client", "info", "--server", server.address, "--token", "bad"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "UNAUTHENTICATED" in out.stderr
    # a later raster's failure: the JSON of the rasters indexed before it still comes out
    out = client(server, "index", "--json", str(rasters["rgb"]), str(rasters["folder"] / "nope.tif"))
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr
    assert [Path(r["raster_path"]).name for r in json.loads(out.stdout) if r["outcome"] != "failed"] == ["rgb_utm.tif"]
    out = client(server, "caption", "--raster", str(rasters["rgb"]), "--max-len", "-3")
    assert out.returncode == 2 and "--max-len -3" in out.stderr and "Traceback" not in out.stderr
    for flags, message in ((["--output", "masks.shp"], "use a .gpkg, .geojson or .json"),
                           (["--relevance-map", "/nowhere/map.tif"], "its folder does not exist")):
        out = client(server, "segment", "--raster", str(rasters["rgb"]), "--prompt", "trees", *flags)
        assert out.returncode == 2 and message in out.stderr and "segment:" not in out.stderr    # no progress bar ran
    for address in ("localhost", "127.0.0.1:-5", "127.0.0.1:70000"):
        out = subprocess.run([sys.executable, "-m", "backend", "client", "info", "--server", address],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "give host:port" in out.stderr and "Traceback" not in out.stderr


# ---- random requests: no crash, no hang, no corrupted index ------------------------------------

def test_random_requests_never_break_the_server(server, rasters):
    from hypothesis import HealthCheck, given, settings, strategies as st

    p = pb()
    index(server, rasters["rgb"])
    before = server.stub.GetInfo(p.GetInfoRequest(), metadata=server.metadata).index_stats
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
               grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    text = st.text(max_size=40)
    number = st.floats(allow_nan=True, allow_infinity=True, width=32)
    extent = st.builds(lambda a, b, c, d, crs: p.Extent(xmin=a, ymin=b, xmax=c, ymax=d, crs=crs),
                       number, number, number, number, st.sampled_from(["", "EPSG:4326", "EPSG:32633", "nonsense"]))
    path = st.sampled_from([str(rasters["rgb"]), str(rasters["grey16"]), "/etc/passwd", "", "relative.tif",
                            str(rasters["folder"] / "not_a_raster.tif")])
    requests = st.one_of(
        st.builds(lambda q, k, e: ("Search", p.SearchRequest(query=q, k=k, extent=e)), text,
                  st.integers(0, 5000), extent),
        st.builds(lambda src, prompts, t, w, e: ("Segment", p.SegmentRequest(
            source=p.RasterSource(path=src), prompts=prompts, threshold=t, sao_window=p.SaoWindow(size=w), extent=e)),
            path, st.lists(text, max_size=3), st.floats(-1, 2, width=32), st.integers(0, 20), extent),
        st.builds(lambda texts: ("EmbedText", p.EmbedTextRequest(texts=texts)), st.lists(text, max_size=4)),
        st.builds(lambda src, b: ("Caption", p.CaptionRequest(source=p.RasterSource(path=src), beam_size=b)),
                  path, st.integers(0, 12)),
    )

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(requests)
    def check(item):
        method, request = item
        call = getattr(server.stub, method)
        code, details = code_of(lambda: call(request, metadata=server.metadata, timeout=60))
        assert code in allowed, (method, request, code, details)
        if code != grpc.StatusCode.OK:
            assert details and "Traceback" not in details

    check()
    assert server.proc.poll() is None
    after = server.stub.GetInfo(p.GetInfoRequest(), metadata=server.metadata).index_stats
    assert (after.raster_count, after.tile_count) == (before.raster_count, before.tile_count)


def test_tls_server_with_the_cli(checkpoint, rasters, tmp_path):
    """A TLS server (self-signed certificate for 127.0.0.1): the CLI connects with --tls-ca; a
    plaintext client does not get through."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    live = LiveServer(checkpoint, tmp_path / "data", [rasters["folder"]],
                      extra=("--tls-cert", str(cert), "--tls-key", str(key))).start()
    try:
        out = client(live, "info", "--json", "--tls-ca", str(cert))
        assert out.returncode == 0, out.stderr
        assert "tls" in json.loads(out.stdout)["capabilities"]
        plain = client(live, "info", "--json")
        assert plain.returncode != 0 and "UNAVAILABLE" in plain.stderr and "add --tls or --tls-ca" in plain.stderr
        untrusted = client(live, "info", "--json", "--tls")        # the system's roots do not know it
        assert untrusted.returncode == 1 and "needs that certificate: --tls-ca PEM" in untrusted.stderr
        assert len(untrusted.stderr.strip().splitlines()) == 1, untrusted.stderr    # no gRPC log beside it
        # --tls (the system's roots, here made our certificate) takes no value: the raster after it
        # is the raster to index, not a CA file
        out = client(live, "index", "--json", "--tls", str(rasters["grey16"]),
                     env={"GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(cert)})
        assert out.returncode == 0, out.stderr
        assert [Path(r["raster_path"]).name for r in json.loads(out.stdout)] == ["grey16.tif"]
        out = client(live, "--tls-ca", str(cert), "list", "--json")                 # before the command too
        assert out.returncode == 0 and len(json.loads(out.stdout)) == 1, out.stderr
        out = client(live, "index", str(rasters["grey16"]), "--tls-ca")
        assert out.returncode == 2 and "--tls-ca: expected one argument" in out.stderr
        out = client(live, "info", "--tls-ca", "")
        assert out.returncode == 2 and "give --tls" in out.stderr and "Traceback" not in out.stderr
        # a file that is no certificate, and the certificate of another server
        out = client(live, "info", "--tls-ca", str(key))
        assert out.returncode == 2 and f"--tls-ca {key} is not a PEM certificate" in out.stderr, out.stderr
        other, _ = openssl_pair(tmp_path, "other")
        out = client(live, "info", "--tls-ca", str(other))
        assert out.returncode == 1 and f"is not signed by --tls-ca {other}" in out.stderr, out.stderr
        assert "needs that certificate" not in out.stderr
    finally:
        live.stop()


def openssl_pair(folder: Path, name: str) -> tuple[Path, Path]:
    import shutil
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.mark.parametrize("case, message", [
    ("other-key", "does not belong to --tls-cert"), ("swapped", "are not a PEM certificate chain"),
    ("folder", "is a folder"), ("encrypted", "is encrypted"),
])
def test_tls_files_that_are_not_a_pair_are_refused_before_the_model_loads(tmp_path, case, message):
    """gRPC finds a wrong key only after the model has loaded and says just that it failed to bind,
    with C-core log lines beside it: the pair is checked first, in one line."""
    cert, key = openssl_pair(tmp_path, "a")
    other_cert, other_key = openssl_pair(tmp_path, "b")
    if case == "encrypted":
        subprocess.run(["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:x", "-out",
                        str(tmp_path / "enc.key")], check=True, capture_output=True)
    flags = {"other-key": [cert, other_key], "swapped": [key, cert], "folder": [tmp_path, key],
             "encrypted": [cert, tmp_path / "enc.key"]}[case]
    out = subprocess.run([sys.executable, "-m", "backend", "serve", "--checkpoint", str(tmp_path / "no-checkpoint"),
                          "--data-dir", str(tmp_path / "data"), "--port", "0", "--tls-cert", str(flags[0]),
                          "--tls-key", str(flags[1])], cwd=REPO, capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_tls_pair_check_takes_what_grpc_serves(tmp_path):
    """The pair check is about the two files belonging together, not their strength: a 1024-bit RSA
    key with a SHA-1 signature (which OpenSSL's default security level refuses, and gRPC serves) and
    EC keys in SEC1 or PKCS#8 form pass; a key of another certificate still does not."""
    from backend.server import tls_pair_problem

    cert, key = openssl_pair(tmp_path, "a")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:1024", "-sha1", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-keyout", str(tmp_path / "weak.key"), "-out", str(tmp_path / "weak.pem")],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(tmp_path / "ec.key")],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-x509", "-new", "-key", str(tmp_path / "ec.key"), "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-out", str(tmp_path / "ec.pem")], check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", str(tmp_path / "ec.key"), "-out", str(tmp_path / "ec8.key")],
                   check=True, capture_output=True)
    for c, k in (("weak.pem", "weak.key"), ("ec.pem", "ec.key"), ("ec.pem", "ec8.key")):
        assert tls_pair_problem(str(tmp_path / c), str(tmp_path / k)) is None, (c, k)
    assert "does not belong" in tls_pair_problem(str(tmp_path / "weak.pem"), str(key))


def test_client_says_when_tls_is_the_wrong_way_round(server, checkpoint, tmp_path):
    """TLS asked of a plaintext server, and a certificate that does not name the address: each says
    what to change instead of asking whether the server runs."""
    out = client(server, "info", "--tls")
    assert out.returncode == 1 and "does not serve TLS: leave out --tls and --tls-ca" in out.stderr, out.stderr
    named = openssl_pair(tmp_path, "named")                     # CN only: no subjectAltName for 127.0.0.1
    other = tmp_path / "other.pem", tmp_path / "other.key"     # names another address only
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=10.1.2.3",
                    "-addext", "subjectAltName=IP:10.1.2.3", "-keyout", str(other[1]), "-out", str(other[0])],
                   check=True, capture_output=True)
    for cert, key in (named, other):
        live = LiveServer(checkpoint, tmp_path / "data", [tmp_path],
                          extra=("--tls-cert", str(cert), "--tls-key", str(key))).start()
        try:
            out = client(live, "info", "--tls-ca", str(cert))
            assert out.returncode == 1 and "certificate does not name 127.0.0.1" in out.stderr, out.stderr
        finally:
            live.stop()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="watches /proc for torch being loaded")
def test_ctrl_c_while_the_model_loads_exits_130_without_a_traceback(checkpoint, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--checkpoint", str(checkpoint), "--port", "0",
                             "--data-dir", str(tmp_path / "data"), "--device", "cpu"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text():   # torch is being imported
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted while starting" in err, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "serving on" not in out


def test_ctrl_c_that_library_code_would_swallow_while_starting_still_exits_130(tmp_path, monkeypatch, capfd):
    """Native code of the libraries that load at start can check for signals and drop a
    KeyboardInterrupt (or abort on one); the server must leave from the handler, raising nothing
    through that code. That race cannot be timed from a test, so a stand-in for Server does what
    such code does: takes the Ctrl-C and swallows any KeyboardInterrupt."""
    import backend.server as server_module
    from backend.__main__ import main

    reached = []

    class SwallowingServer:
        def __init__(self, **kw):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)            # the handler runs here; a KeyboardInterrupt would be dropped
            except KeyboardInterrupt:
                reached.append("KeyboardInterrupt")

    def exit_now(code):
        raise SystemExit(code)

    monkeypatch.setattr(server_module, "Server", SwallowingServer)
    monkeypatch.setattr(server_module.os, "_exit", exit_now)
    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as stopped:
            main(["serve", "--port", "0", "--data-dir", str(tmp_path / "data")])
    finally:
        signal.signal(signal.SIGINT, before)
    assert stopped.value.code == 130 and reached == []     # nothing raised through the loading code
    assert "interrupted while starting; nothing was served" in capfd.readouterr().err


def test_the_start_log_names_the_checkpoint_and_rasters_another_checkpoint_indexed(checkpoint, rasters, tiny_config,
                                                                                tokenizer, tmp_path):
    """After a checkpoint switch searches find nothing that the old one indexed: the log says so."""
    import torch
    from backend.model import MaMMUT
    from backend.model.checkpoint import save_checkpoint

    data = tmp_path / "data"
    live = LiveServer(checkpoint, data, [rasters["folder"], tmp_path]).start()
    index(live, rasters["rgb"])
    many = [make_tif(tmp_path / f"small_{i:02d}.tif", noise((3, 16, 16), seed=100 + i)) for i in range(21)]
    for path in many:       # more than a search names one by one
        index(live, path)
    assert live.stop() == 0
    assert f"at {checkpoint.resolve()}" in live.log_text()
    torch.manual_seed(7)
    other = save_checkpoint(MaMMUT(tiny_config).eval(), tokenizer, tmp_path / "other")
    live = LiveServer(other, data, [rasters["folder"], tmp_path]).start()
    try:
        # a search says why it found nothing, where "0 hits among 0 tiles" said nothing: 20 named, the
        # other 2 counted in one entry
        response = live.stub.Search(pb().SearchRequest(query="fields"), metadata=live.metadata)
        named = [r.raster_name for r in response.unsearchable_rasters]
        assert not response.hits and named[:2] == ["rgb_utm.tif", "small_00.tif"] and len(named) == 21
        assert named[-1] == "2 more rasters" and "another checkpoint" in response.unsearchable_rasters[-1].reason
        assert [r.raster_count for r in response.unsearchable_rasters] == [0] * 20 + [2]
        assert "indexed with checkpoint" in response.unsearchable_rasters[0].reason
        out = client(live, "search", "fields")
        assert out.returncode == 0 and "not searched: rgb_utm.tif" in out.stderr and "index it again" in out.stderr
        assert "... and 17 more rasters not searched" in out.stderr, out.stderr      # 21 entries, 22 rasters
    finally:
        live.stop()
    text = live.log_text().split("SkyPrompt server stopped")[1]          # the second start
    assert f"at {Path(other).resolve()}" in text and "0 raster(s), 0 tiles for this checkpoint" in text
    assert "22 raster(s) indexed with another checkpoint are not searched" in text


def test_server_stops_when_the_program_that_started_it_ends(checkpoint, tmp_path):
    """A launcher (the QGIS plugin) names itself in SKYPROMPT_PARENT_PID; when it dies without
    stopping the server (killed, crashed), the server shuts down cleanly instead of holding the port."""
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    live = LiveServer(checkpoint, tmp_path / "data", [tmp_path], token=None)
    os.environ["SKYPROMPT_PARENT_PID"] = str(launcher.pid)
    try:
        live.start()
    finally:
        del os.environ["SKYPROMPT_PARENT_PID"]
    try:
        time.sleep(1.5)
        assert live.proc.poll() is None                   # serves while its launcher lives
        launcher.kill()
        launcher.wait()
        assert live.proc.wait(30) == 0
        assert "has ended: shutting down" in live.log_text()
    finally:
        launcher.kill()
        if live.proc.poll() is None:
            live.stop()
        live.log.close()


def test_serve_on_a_port_in_use_leaves_no_data_dir_behind(checkpoint, tmp_path):
    """The port is checked before the data dir is made: a start that cannot listen creates nothing."""
    data = tmp_path / "new" / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "backend", "serve", "--port", str(port), "--checkpoint",
                              str(checkpoint), "--data-dir", str(data)], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
    assert out.returncode == 2 and f"cannot listen on 127.0.0.1:{port}: the port is in use" in out.stderr, out.stderr
    assert not (tmp_path / "new").exists()


def test_a_host_that_does_not_resolve_or_is_another_machines_is_told_apart_from_a_taken_port():
    from backend.server import listen_problem

    assert listen_problem("127.0.0.1", 0) is None
    problem = listen_problem("nosuchhost.invalid", 0)
    assert "--host nosuchhost.invalid does not resolve" in problem and "port" not in problem.split(";")[0]
    problem = listen_problem("192.0.2.1", 0)          # TEST-NET-1: never an address of this machine
    assert "--host 192.0.2.1 is not an address of this machine" in problem and "try --port" not in problem


def test_refused_tokens_are_logged_once_per_address_without_the_token(checkpoint, tmp_path):
    """An operator sees who was refused (address and method) once at WARNING, later refusals from the
    same address at DEBUG only; the token the client sent never reaches the log."""
    sent = "not-the-token-5f3a91"
    live = LiveServer(checkpoint, tmp_path / "data", [tmp_path], extra=("--log-level", "DEBUG")).start()
    try:
        p, wrong = pb(), (("authorization", f"Bearer {sent}"),)
        for call in (lambda: live.stub.GetInfo(p.GetInfoRequest(), metadata=wrong),
                     lambda: live.stub.IndexRaster(p.IndexRasterRequest(), metadata=wrong),
                     lambda: live.stub.GetInfo(p.GetInfoRequest())):
            assert code_of(call)[0] == grpc.StatusCode.UNAUTHENTICATED
    finally:
        assert live.stop() == 0
    refusals = [line for line in live.log_text().splitlines() if "refused a call" in line]
    assert len(refusals) == 3, refusals
    assert "WARNING" in refusals[0] and "/skyprompt.v1.SkyPrompt/GetInfo from ipv4:127.0.0.1:" in refusals[0]
    assert "wrong token" in refusals[0]
    assert "DEBUG" in refusals[1] and "/skyprompt.v1.SkyPrompt/IndexRaster" in refusals[1]
    assert "DEBUG" in refusals[2] and "no token" in refusals[2]
    assert sent not in live.log_text() and TOKEN not in live.log_text()


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="pidfds are Linux-only")
def test_server_stops_when_the_program_that_started_it_ends_unreaped(checkpoint, tmp_path):
    """A launcher that ends but is never reaped (a zombie: its own parent is busy or careless) has
    ended all the same: the server shuts down instead of serving on until the zombie is reaped."""
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    live = LiveServer(checkpoint, tmp_path / "data", [tmp_path], token=None)
    os.environ["SKYPROMPT_PARENT_PID"] = str(launcher.pid)
    try:
        live.start()
    finally:
        del os.environ["SKYPROMPT_PARENT_PID"]
    try:
        launcher.kill()                   # and not waited for: this test, its parent, leaves it a zombie
        deadline = time.monotonic() + 10
        while Path(f"/proc/{launcher.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the launcher did not end"
            time.sleep(0.05)
        assert live.proc.wait(30) == 0
        assert "has ended: shutting down" in live.log_text()
    finally:
        launcher.kill()
        launcher.wait()
        if live.proc.poll() is None:
            live.stop()
        live.log.close()


def test_server_with_stop_on_stdin_close_stops_cleanly_when_its_launcher_closes_the_pipe(checkpoint, tmp_path):
    """--stop-on-stdin-close: the launcher's way to stop the server on every OS (no SIGTERM on
    Windows), and the server's way to end with a launcher that ends: what it writes changes nothing,
    closing the pipe shuts it down cleanly, the index closed."""
    live = LiveServer(checkpoint, tmp_path / "data", [tmp_path], token=None, extra=("--stop-on-stdin-close",))
    live.start(stdin=subprocess.PIPE)
    try:
        live.proc.stdin.write(b"anything\n")
        live.proc.stdin.flush()
        assert live.stub.GetInfo(pb().GetInfoRequest(), timeout=30).api_version == "skyprompt.v1"
        assert live.proc.poll() is None
        live.proc.stdin.close()
        assert live.proc.wait(30) == 0
        assert "standard input closed: shutting down" in live.log_text()
    finally:
        if live.proc.poll() is None:
            live.stop()
        live.channel.close()
        live.log.close()


def test_server_whose_launcher_closes_the_pipe_while_it_starts_leaves_without_serving(checkpoint, tmp_path):
    """A launcher that gives up on a start (the plugin's start timeout, 'Cancel start') closes the pipe
    while torch imports or the model loads: the server leaves then, instead of loading, serving and
    only then seeing the pipe closed while the launcher waited (or killed it) meanwhile."""
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--port", "0", "--port-file", str(port_file),
                             "--checkpoint", str(checkpoint), "--data-dir", str(tmp_path / "data"),
                             "--stop-on-stdin-close"], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(input="", timeout=120)     # the pipe closed at once: the server is still importing
    assert proc.returncode == 0, err
    assert "standard input closed while starting; nothing was served" in err, err
    assert "SkyPrompt serving on" not in out and not port_file.exists()


def test_a_raster_indexed_through_a_link_is_answered_by_its_real_path(server, rasters, tmp_path):
    """IndexResult, ListRasters and Search name a raster by the one path the index keys it by: the
    file a link leads to, whichever path it was indexed through."""
    p = pb()
    real = make_tif(rasters["folder"] / "link_target.tif", noise((3, 64, 64), seed=21))
    link = tmp_path / "through_a_link.tif"
    link.symlink_to(real)
    result = index(server, link)[-1].result
    assert result.raster_path == str(real.resolve())
    listed = {r.raster_id: r for r in server.stub.ListRasters(p.ListRastersRequest(), metadata=server.metadata).rasters}
    assert listed[result.raster_id].raster_path == result.raster_path
    hits = server.stub.Search(p.SearchRequest(query="fields", raster_ids=[result.raster_id]),
                              metadata=server.metadata).hits
    assert hits and {h.raster_path for h in hits} == {result.raster_path}
    # indexed again through the link: unchanged, and still the real path
    again = index(server, link)[-1].result
    assert again.outcome == p.INDEX_OUTCOME_UNCHANGED and again.raster_path == result.raster_path


# ---- the command line: outputs, partial failures, hints ----------------------------------------

@pytest.mark.parametrize("suffix", [".geojson", ".json"])
def test_cli_segment_refuses_to_replace_an_existing_geojson(server, rasters, tmp_path, suffix):
    """A GeoJSON holds one layer: an existing one is refused before the work, not silently replaced."""
    target = tmp_path / f"mine{suffix}"
    target.write_text('{"type": "FeatureCollection", "features": []}')
    out = client(server, "segment", "--raster", str(rasters["rgb"]), "--prompt", "trees", "--output", str(target))
    assert out.returncode == 2 and "segment:" not in out.stderr                 # refused before the work
    assert f"--output {target} exists; give a new file name, or a .gpkg to add a layer to" in out.stderr
    assert target.read_text() == '{"type": "FeatureCollection", "features": []}'


def test_cli_index_goes_on_past_a_raster_that_fails(server, rasters):
    missing = rasters["folder"] / "missing.tif"
    out = client(server, "index", str(rasters["rgb"]), str(missing), str(rasters["grey16"]))
    assert out.returncode == 1, out.stderr
    assert "rgb_utm.tif:" in out.stdout and "grey16.tif:" in out.stdout        # the raster after it was indexed
    assert f"{missing}: NOT_FOUND" in out.stderr and "1 of 3 rasters could not be indexed" in out.stderr
    out = client(server, "index", "--json", str(missing), str(rasters["rgb"]), str(rasters["folder"] / "not_a_raster.tif"))
    assert out.returncode == 1 and "2 of 3 rasters could not be indexed" in out.stderr
    items = json.loads(out.stdout)
    assert [(Path(i["raster_path"]).name, i["outcome"]) for i in items] == [
        ("missing.tif", "failed"), ("rgb_utm.tif", "unchanged"), ("not_a_raster.tif", "failed")]
    assert items[0]["error"].startswith("NOT_FOUND: ") and items[2]["error"]


def test_cli_unknown_host_gets_a_hint():
    out = subprocess.run([sys.executable, "-m", "backend", "client", "info", "--server", "nosuchhost.invalid:50051",
                          "--timeout", "60"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "UNAVAILABLE" in out.stderr, out.stderr
    assert "check the host name in --server nosuchhost.invalid:50051; is the server running there?" in out.stderr


def test_cli_pointed_at_a_web_server_says_something_else_answers(tmp_path):
    import http.server
    import threading

    web = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{web.server_address[1]}"
        out = subprocess.run([sys.executable, "-m", "backend", "client", "info", "--server", address, "--timeout", "30"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        web.shutdown()
        web.server_close()
    assert out.returncode == 1 and f"something other than a SkyPrompt server answers at {address}" in out.stderr, \
        out.stderr


def test_search_extent_with_latitude_first_says_longitude_comes_first(server):
    out = client(server, "search", "roads", "--extent", "47.01", "-99.16", "47.02", "-99.14")
    assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr
    assert "longitude comes first" in out.stderr and "--extent LON0 LAT0 LON1 LAT1" in out.stderr
    assert "give that CRS" not in out.stderr
    # numbers that are no longitudes and latitudes either way still get the hint to name their CRS
    out = client(server, "search", "roads", "--extent", "500000", "5000000", "501000", "5001000")
    assert out.returncode == 1 and "give that CRS" in out.stderr and "longitude comes first" not in out.stderr


def test_cli_says_where_thumbnails_and_relevance_maps_were_saved(server, rasters, tmp_path):
    assert client(server, "index", str(rasters["rgb"])).returncode == 0
    folder = tmp_path / "thumbs"
    out = client(server, "search", "roads", "--k", "2", "--raster", str(rasters["rgb"]), "--thumbnails", str(folder))
    assert out.returncode == 0, out.stderr
    assert f"thumbnails saved in {folder}" in out.stdout and len(list(folder.glob("*.png"))) == 2
    # a second search into the same folder: its PNGs alone, not mixed with the first one's; other files stay
    (folder / "my_notes.png").write_bytes(b"the user's")
    out = client(server, "search", "fields", "--k", "1", "--raster", str(rasters["rgb"]), "--thumbnails", str(folder))
    assert out.returncode == 0 and "(the 2 of an earlier search removed)" in out.stdout, out.stdout
    assert sorted(p.name for p in folder.glob("*.png"))[0].startswith("001_tile")
    assert len(list(folder.glob("*_tile*.png"))) == 1 and (folder / "my_notes.png").read_bytes() == b"the user's"
    # a relative folder: the JSON names each PNG by its absolute path, as the text says where they went
    out = subprocess.run([sys.executable, "-m", "backend", "client", "search", "roads", "--k", "1", "--json",
                          "--raster", str(rasters["rgb"]), "--thumbnails", "relative", "--server", server.address],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SKYPROMPT_TOKEN": server.token, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    hit = json.loads(out.stdout)["results"][0]
    assert hit["thumbnail"] == str(tmp_path / "relative" / f"001_tile{hit['tile_id']}.png")
    stem = tmp_path / "relevance.tif"
    out = client(server, "segment", "--raster", str(rasters["rgb"]), "--prompt", "trees", "--prompt", "roads",
                 "--relevance-map", str(stem))
    assert out.returncode == 0, out.stderr
    saved = [tmp_path / "relevance_0.tif", tmp_path / "relevance_1.tif"]
    assert f"relevance map(s) saved: {saved[0]}, {saved[1]}" in out.stdout and all(p.exists() for p in saved)


def test_cli_says_why_a_hit_has_no_thumbnail_and_when_an_extent_holds_no_tile(server, rasters):
    import shutil

    gone = rasters["folder"] / "gone.tif"
    shutil.copy(rasters["rgb"], gone)
    assert client(server, "index", str(gone)).returncode == 0
    gone.unlink()       # moved away after indexing: the hits stay, their pixels are gone
    out = client(server, "search", "roads", "--k", "2", "--raster", str(gone), "--thumbnails",
                 str(rasters["folder"] / "thumbs_gone"), "--json")
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)["results"]
    assert len(hits) == 2 and all("was moved or deleted since it was indexed" in h["thumbnail_error"]
                                  and "thumbnail" not in h for h in hits)
    assert all(h["changed_on_disk"] == h["thumbnail_error"] for h in hits)     # flagged, thumbnails or not
    assert all(h["file_state"] == "missing" for h in hits)
    # one note says why, not a second one for the thumbnails as well
    assert "note: 2 of 2 hits show a raster as it was when indexed: " in out.stderr
    assert "moved or deleted" in out.stderr and "no thumbnail" not in out.stderr
    out = client(server, "search", "roads", "--k", "2", "--raster", str(gone), "--json")
    assert all("was moved or deleted since it was indexed" in h["changed_on_disk"]
               for h in json.loads(out.stdout)["results"])
    assert client(server, "remove", str(gone)).returncode == 0
    # overwritten with another image after indexing: no thumbnail cut from the new pixels at the old windows
    changed = rasters["folder"] / "changed.tif"
    shutil.copy(rasters["rgb"], changed)
    assert client(server, "index", str(changed)).returncode == 0
    make_tif(changed, noise((3, 300, 500), seed=77))
    out = client(server, "search", "roads", "--k", "2", "--raster", str(changed), "--thumbnails",
                 str(rasters["folder"] / "thumbs_changed"), "--json")
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)["results"]
    assert all("changed on disk since it was indexed: index it again" in h["thumbnail_error"] for h in hits)
    assert all("changed on disk since it was indexed" in h["changed_on_disk"] and h["file_state"] == "changed"
               for h in hits)
    listed = {r["raster_path"]: r for r in json.loads(client(server, "list", "--json").stdout)}
    assert "changed on disk since it was indexed" in listed[str(changed.resolve())]["changed_on_disk"]
    assert listed[str(changed.resolve())]["file_state"] == "changed"
    assert client(server, "index", str(rasters["rgb"])).returncode == 0
    listed = {r["raster_path"]: r for r in json.loads(client(server, "list", "--json").stdout)}
    assert listed[str(rasters["rgb"].resolve())]["changed_on_disk"] == ""       # one as it was indexed
    assert listed[str(rasters["rgb"].resolve())]["file_state"] == "unchanged"
    unchanged = json.loads(client(server, "search", "roads", "--k", "2", "--raster", str(rasters["rgb"]),
                                  "--json").stdout)["results"]
    assert unchanged and all(h["changed_on_disk"] == "" and h["file_state"] == "unchanged" for h in unchanged)
    out = client(server, "list")
    assert out.returncode == 0 and "note: raster" in out.stdout and "changed on disk" in out.stdout
    assert not (rasters["folder"] / "thumbs_changed").exists() or not list((rasters["folder"] / "thumbs_changed").iterdir())
    assert client(server, "remove", str(changed)).returncode == 0
    changed.unlink()
    # longitudes and latitudes both ways, with no raster there: the search says so, and offers the swap
    out = client(server, "search", "roads", "--extent", "-8.5", "-74.5", "-8.4", "-74.3")
    assert out.returncode == 0 and out.stdout.startswith("0 hits") and "among 0 tiles" in out.stdout
    assert "note: no indexed tile lies in --extent -8.5 -74.5 -8.4 -74.3 (EPSG:4326)" in out.stderr
    assert "give --extent -74.5 -8.5 -74.3 -8.4" in out.stderr
    # kept to a raster elsewhere: its tiles are the ones said to lie elsewhere, not the whole index's
    out = client(server, "search", "roads", "--extent", "-8.5", "-74.5", "-8.4", "-74.3", "--raster", str(rasters["rgb"]))
    assert out.returncode == 0 and "no tile of the rasters given (--raster, --raster-id) lies in" in out.stderr
    # where the swap gives the same numbers, or no latitudes, none is offered
    for extent in (["0", "0", "1", "1"], ["-120", "10", "-119", "11"]):
        out = client(server, "search", "roads", "--extent", *extent)
        assert out.returncode == 0 and "no indexed tile lies in --extent" in out.stderr, out.stderr
        assert "latitude first" not in out.stderr, (extent, out.stderr)
    # index options checked once, before any raster, and said once
    out = client(server, "index", "--overlap", "0.95", str(rasters["rgb"]), str(rasters["grey16"]))
    assert out.returncode == 2 and out.stderr.count("--overlap 0.95 is out of range") == 1, out.stderr
    out = client(server, "index", "--resolution", "-1", str(rasters["rgb"]))
    assert out.returncode == 2 and "--resolution -1.0 must be 0 (native resolution)" in out.stderr, out.stderr


def test_cli_outputs_that_cannot_be_written_are_refused_before_the_work(server, rasters, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    out = client(server, "search", "roads", "--thumbnails", str(a_file))
    assert out.returncode == 2 and f"--thumbnails {a_file}: cannot make that folder" in out.stderr     # an option
    # a folder that is there and takes no file (root may write anywhere but such): refused before the
    # search, where its answer was lost after it with a bare "[Errno 13] Permission denied"
    out = client(server, "search", "roads", "--thumbnails", "/proc/self")
    assert out.returncode == 2 and "cannot be written in" in out.stderr and "Errno" not in out.stderr, out.stderr
    out = client(server, "segment", "--raster", str(rasters["rgb"]), "--prompt", "x",
                 "--output", str(tmp_path / "no" / "such" / "x.geojson"))
    assert out.returncode == 2 and "its folder does not exist" in out.stderr and not (tmp_path / "no").exists()
    for stem, message in ((tmp_path / "map.png", "give a name ending in .tif"),
                          (tmp_path / "none" / "map.tif", "its folder does not exist")):
        out = client(server, "segment", "--raster", str(rasters["rgb"]), "--prompt", "x", "--relevance-map", str(stem))
        assert out.returncode == 2 and message in out.stderr, out.stderr
    (tmp_path / "map_1.tif").write_bytes(b"the user's")
    out = client(server, "segment", "--raster", str(rasters["rgb"]), "--prompt", "x", "--prompt", "y",
                 "--relevance-map", str(tmp_path / "map.tif"))
    assert out.returncode == 2 and f"{tmp_path / 'map_1.tif'} exist(s)" in out.stderr
    assert (tmp_path / "map_1.tif").read_bytes() == b"the user's" and not (tmp_path / "map_0.tif").exists()


def test_an_allowed_root_that_is_no_folder_is_warned_about_at_start(checkpoint, tmp_path):
    live = LiveServer(checkpoint, tmp_path / "data", [tmp_path / "not_mounted"]).start()
    try:
        assert f"--allow-root {tmp_path / 'not_mounted'} is not a folder" in live.log_text()
    finally:
        live.stop()


def test_cli_extent_crs_without_an_extent_is_refused(server, rasters):
    for command in (["search", "roads"], ["caption", "--raster", str(rasters["rgb"])]):
        out = client(server, *command, "--extent-crs", "EPSG:99999")
        assert out.returncode == 2 and "--extent-crs EPSG:99999 is the CRS of --extent: give --extent" in out.stderr


def test_a_segment_that_fails_mid_stream_closes_its_progress_bar_first(rasters, capsys):
    """The failure's message starts a line of its own, not the end of the bar's. The stub stands in
    for a server that fails after its first progress message (a real one cannot be made to, on cue)."""
    import argparse

    from backend.client import add_client_arguments, cmd_segment

    class Failed(grpc.RpcError):
        pass

    class Stub:
        def Segment(self, request, metadata=None, timeout=None):  # noqa: N802 - gRPC API
            yield pb().SegmentEvent(progress=pb().SegmentProgress(tiles_done=1, tiles_total=4))
            raise Failed()

    parser = argparse.ArgumentParser()
    add_client_arguments(parser)
    args = parser.parse_args(["segment", "--raster", str(rasters["rgb"]), "--prompt", "trees"])
    try:
        cmd_segment(Stub(), args)
    except Failed:      # as run_client reports it: while the failed call's frames are still alive
        print("skyprompt client: UNAVAILABLE: gone", file=sys.stderr)
    err = capsys.readouterr().err
    assert "segment:" in err and "\nskyprompt client: UNAVAILABLE: gone\n" in err, repr(err)


class Context:
    """A gRPC servicer context for calls made in process: active for `active_calls` checks."""

    def __init__(self, active_calls: int = 10**6):
        self.left, self.aborted = active_calls, None

    def is_active(self):
        self.left -= 1
        return self.left >= 0

    def abort(self, code, message):
        self.aborted = (code, message)
        raise grpc.RpcError(message)


def test_a_search_whose_client_is_gone_cuts_no_more_thumbnails(checkpoint, rasters, tmp_path):
    """In process, with the real model and index: the gRPC context stands in for a client that gave up
    after the search began (a real one cannot be made to leave at that line)."""
    from backend.engine import ModelEngine
    from backend.index import TileIndex
    from backend.service import SkyPromptService

    engine = ModelEngine(checkpoint, device="cpu")
    index = TileIndex(tmp_path / "index")
    try:
        service = SkyPromptService(engine, index, allowed_roots=[str(rasters["folder"])])
        p = pb()
        list(service.IndexRaster(p.IndexRasterRequest(source=p.RasterSource(path=str(rasters["rgb"]))), Context(10**6)))
        cut = []
        original = service._thumbnail
        service._thumbnail = lambda *a: cut.append(1) or original(*a)
        request = p.SearchRequest(query="roads", k=50, include_thumbnails=True)
        answer = service.Search(request, Context(10**6))
        assert len(cut) == len(answer.hits) > 2 and all(h.thumbnail_png for h in answer.hits)
        cut.clear()
        gone = Context(2)           # gone after two checks: nobody to answer, and the call ends in an abort
        with pytest.raises(grpc.RpcError):
            service.Search(request, gone)
        assert gone.aborted[0] == grpc.StatusCode.CANCELLED and len(cut) < 3
        # each raster is opened once a search for all its thumbnails, and closed after: a 16-bit one works
        # out its stretch on opening, from a read of the whole raster
        import backend.service as service_module

        list(service.IndexRaster(p.IndexRasterRequest(source=p.RasterSource(path=str(rasters["grey16"]))),
                                 Context(10**6)))
        opened = []
        real_open = service_module.open_raster

        def counted_open(*args, **kw):
            opened.append(real_open(*args, **kw))
            return opened[-1]

        service_module.open_raster = counted_open
        try:
            answer = service.Search(request, Context(10**6))
        finally:
            service_module.open_raster = real_open
        assert {h.raster_path for h in answer.hits} == {str(rasters["rgb"]), str(rasters["grey16"])}
        assert all(h.thumbnail_png for h in answer.hits) and len(answer.hits) > 2
        assert sorted(r.path for r in opened) == sorted({h.raster_path for h in answer.hits})
        assert all(r._ds is None for r in opened)       # closed when the search is answered
        # the 16-bit raster's thumbnails take the stretch its tiles were indexed with, kept in the index:
        # not worked out again from a read of the whole raster, and the same pixels as working it out
        from backend.raster import Raster

        worked_out = []
        real_compute = Raster._compute_stretch
        Raster._compute_stretch = lambda self: worked_out.append(self.path) or real_compute(self)
        try:
            again = service.Search(request, Context(10**6))
        finally:
            Raster._compute_stretch = real_compute
        assert str(rasters["grey16"]) not in worked_out and all(h.thumbnail_png for h in again.hits)
        grey16_id = next(h.raster_id for h in again.hits if h.raster_path == str(rasters["grey16"]))
        from backend.raster import open_raster as fresh_open

        with fresh_open(rasters["grey16"]) as fresh:
            assert service.index.raster(int(grey16_id))["extra"]["stretch_ranges"] == \
                [list(r) for r in fresh.stretch_ranges()]
    finally:
        engine.stop()
        index.close()


def test_cli_timeout_must_be_positive_and_a_deadline_passed_says_which(server):
    for bad in ("0", "-1", "nan"):
        out = client(server, "search", "roads", "--timeout", bad)
        assert out.returncode == 2 and "give a positive number of seconds" in out.stderr, out.stderr
    out = client(server, "search", "roads", "--timeout", "0.000001")
    assert out.returncode == 1 and "DEADLINE_EXCEEDED" in out.stderr
    assert "the call took longer than --timeout 1e-06 s" in out.stderr


def test_cli_output_read_by_a_reader_that_stops_early_ends_quietly(server, rasters):
    """`client search ... | head -1`: the reader closes the pipe; no "Broken pipe" error, status 0."""
    assert client(server, "index", str(rasters["rgb"])).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "backend", "client", "search", "roads", "--server", server.address],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SKYPROMPT_TOKEN": server.token})
    proc.stdout.close()             # the reader is gone before anything is printed
    with proc.stderr:
        err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception ignored" not in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_serve_removes_its_port_file_on_a_clean_stop(checkpoint, tmp_path, sig):
    """SIGTERM, and SIGHUP (the terminal that ran it closed), stop the server cleanly."""
    # a suite started under nohup ignores SIGHUP, and its children with it (as the server then should)
    inherited = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        live = LiveServer(checkpoint, tmp_path / "data", [tmp_path]).start()
    finally:
        signal.signal(signal.SIGHUP, inherited)
    port_file = tmp_path / "data.port"
    assert port_file.read_text() == live.address.rsplit(":", 1)[1]
    assert live.stop(sig) == 0
    assert not port_file.exists()


def test_a_data_dir_given_with_a_tilde_is_in_the_home_folder(monkeypatch, tmp_path):
    """SKYPROMPT_DATA_DIR="~/skyprompt" set where no shell expands it (a service unit, QGIS's
    environment settings) is the home folder's, not a folder named "~" in the working folder."""
    from backend.server import default_data_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SKYPROMPT_DATA_DIR", "~/skyprompt")
    assert default_data_dir() == tmp_path / "skyprompt"


def test_serve_path_options_given_with_a_tilde_are_in_the_home_folder(checkpoint, tmp_path):
    """--checkpoint=~/... (no shell expands a tilde after '=', nor a launcher that runs no shell)
    loads the home folder's checkpoint, and the data dir, allowed root and port file are there too."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "ckpt").symlink_to(checkpoint, target_is_directory=True)
    proc = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--checkpoint=~/ckpt", "--port", "0",
                             "--port-file=~/port", "--data-dir=~/data", "--allow-root=~/maps", "--device", "cpu"],
                            cwd=tmp_path, env={**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (home / "port").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (home / "port").exists(), proc.stderr.read() if proc.poll() is not None else "no port file"
        assert (home / "data").is_dir() and not (tmp_path / "~").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 0, err
    assert f"at {checkpoint}" in err, err                 # the start log names the checkpoint it loaded
    assert f"{home / 'maps'}" in err, err                 # the allowed root that is no folder, warned about by its path


def test_stop_on_stdin_close_leaves_a_standard_input_that_is_no_pipe_alone(checkpoint, tmp_path):
    """/dev/null (a service manager, nohup) would end at once: the server serves on, and says the
    flag is not in force, instead of stopping right after it started."""
    live = LiveServer(checkpoint, tmp_path / "data", [tmp_path], token=None, extra=("--stop-on-stdin-close",))
    live.start(stdin=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        assert live.proc.poll() is None
        assert live.stub.GetInfo(pb().GetInfoRequest(), timeout=30).api_version == "skyprompt.v1"
        assert "standard input is not a pipe" in live.log_text()
    finally:
        assert live.stop() == 0


def test_search_names_a_raster_it_cannot_read_and_a_damaged_database_is_data_loss(checkpoint, rasters, tmp_path):
    """An embedding file overwritten on disk (the right size, values no number): a search of the whole
    index leaves that raster out and says so (JSON and stderr), a search of it alone names it as the
    error; damage inside the database that opening it does not reach is DATA_LOSS with what to do,
    not an internal error."""
    import sqlite3
    live = LiveServer(checkpoint, tmp_path / "data", [rasters["folder"]])
    live.start()
    try:
        for name in ("rgb", "rgba"):
            assert client(live, "index", str(rasters[name])).returncode == 0
    finally:
        live.stop()
    index_dir = tmp_path / "data" / "index"
    db = sqlite3.connect(index_dir / "index.sqlite3")
    (file_name,) = db.execute("SELECT embeddings_file FROM rasters WHERE source_key LIKE '%rgba_3857.tif'").fetchone()
    db.close()
    damaged = index_dir / "embeddings" / file_name
    data = bytearray(damaged.read_bytes())
    data[128:] = b"\xff" * (len(data) - 128)
    damaged.write_bytes(bytes(data))
    live.start()
    try:
        r = client(live, "search", "fields", "--k", "50", "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert [u["raster_name"] for u in out["unsearchable_rasters"]] == ["rgba_3857.tif"]
        assert out["results"] and {h["raster_name"] for h in out["results"]} == {"rgb_utm.tif"}
        assert "note: not searched: rgba_3857.tif (" in r.stderr and "damaged: re-index it" in r.stderr
        r = client(live, "search", "fields", "--raster", str(rasters["rgba"]))
        assert r.returncode == 1 and "UNAVAILABLE" in r.stderr
        assert "cannot be searched: its embedding file is damaged: re-index it" in r.stderr, r.stderr
    finally:
        live.stop()
    db = sqlite3.connect(index_dir / "index.sqlite3")
    (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name='tiles'").fetchone()
    (page_size,) = db.execute("PRAGMA page_size").fetchone()
    db.close()
    with open(index_dir / "index.sqlite3", "r+b") as f:        # the tiles table's first page, garbage
        f.seek((root - 1) * page_size)
        f.write(b"\x0d\xff" * (page_size // 2))
    live.start()
    try:
        r = client(live, "search", "fields")
        assert r.returncode == 1 and "DATA_LOSS: the tile index database is damaged" in r.stderr, r.stderr
        assert "move index.sqlite3 in its --data-dir aside" in r.stderr and "internal" not in r.stderr
    finally:
        live.stop()


def test_segments_past_the_few_run_at_once_wait_queued_and_then_run(checkpoint, rasters, tmp_path):
    """Segments hold gigabytes at the largest extents: SEGMENTS_AT_ONCE run, the next waits with a
    QUEUED message until one ends, then runs; one whose client goes while it waits stops."""
    from backend.engine import ModelEngine
    from backend.index import TileIndex
    from backend.service import SkyPromptService

    SEGMENTS_AT_ONCE = 3      # serve --segments-at-once 3

    engine = ModelEngine(checkpoint, device="cpu")
    index = TileIndex(tmp_path / "index")
    try:
        service = SkyPromptService(engine, index, allowed_roots=[str(rasters["folder"])],
                                   segments_at_once=SEGMENTS_AT_ONCE)
        p = pb()
        request = p.SegmentRequest(source=p.RasterSource(path=str(rasters["rgb"])), prompts=["trees"])
        for _ in range(SEGMENTS_AT_ONCE):          # as if that many were running
            service._segment_slots.acquire()
        events = service.Segment(request, Context())
        first = next(events)
        assert first.progress.stage == p.SEGMENT_STAGE_QUEUED and "3 segmentations are running" in first.progress.message
        service._segment_slots.release()           # one ends: this one runs to its result
        rest = list(events)
        assert any(e.HasField("result") for e in rest)
        gone = Context()
        waiting = service.Segment(request, gone)
        assert service._segment_slots.acquire(blocking=False)     # all taken again (one is still ours)
        assert next(waiting).progress.stage == p.SEGMENT_STAGE_QUEUED
        gone.left = 0
        with pytest.raises(Exception):              # cancelled while waiting: it ends, holding no slot
            next(waiting)
        for _ in range(SEGMENTS_AT_ONCE):
            service._segment_slots.release()
        assert service._segment_slots.acquire(blocking=False)
    finally:
        index.close()
        engine.stop()


def test_a_device_that_refuses_the_model_is_one_line_at_start(checkpoint, monkeypatch):
    """A GPU busy in exclusive mode or a driver mismatch raises a RuntimeError when the weights move
    to it; it is raised here by replacing the checkpoint loader (there is no GPU to refuse). Start-up
    says it, with what to do, as an EngineError the server prints in one line."""
    from backend import engine as engine_module
    from backend.engine import EngineError, ModelEngine

    def refusing(*a, **kw):
        raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable")
    monkeypatch.setattr(engine_module, "load_checkpoint", refusing)
    with pytest.raises(EngineError) as e:
        ModelEngine(checkpoint, "cpu")
    assert e.value.kind == "unavailable" and "cannot load the model on cpu" in e.value.message
    assert "another --device" in e.value.message


def test_a_segment_stream_closed_midway_ends_its_work_before_closing_the_raster(checkpoint, rasters, tmp_path):
    """gRPC closes a Segment's stream at a yield when its client goes: the worker thread stopped
    only when it next saw the context, while the raster it read was being closed under it (GDAL then
    reads a closed dataset). Now closing waits for the work, which stops at its next check."""
    from backend.engine import ModelEngine
    from backend.index import TileIndex
    from backend.service import SkyPromptService

    path = rasters["folder"] / "closing.tif"
    if not path.exists():
        make_tif(path, noise((3, 1024, 1024), seed=41))
    engine = ModelEngine(checkpoint, device="cpu")
    index = TileIndex(tmp_path / "index")
    try:
        service = SkyPromptService(engine, index, allowed_roots=[str(rasters["folder"])])
        p = pb()
        events = service.Segment(p.SegmentRequest(source=p.RasterSource(path=str(path)), prompts=["trees"]),
                                 Context())
        stages = [next(events).progress.stage for _ in range(3)]         # reading, then the work's progress
        assert p.SEGMENT_STAGE_RELEVANCE in stages or p.SEGMENT_STAGE_POLYGONIZING in stages, stages
        events.close()                                                   # the client is gone
        assert not [t for t in threading.enumerate() if t.name == "skyprompt-segment" and t.is_alive()]
        assert service._segment_slots.acquire(blocking=False)            # its slot is free again
        service._segment_slots.release()
    finally:
        index.close()
        engine.stop()


def test_running_out_of_memory_outside_the_model_is_resource_exhausted_too():
    """Edge refinement and polygons run in the request's thread, outside the engine: the allocator's
    failure there is the request's size too, said as RESOURCE_EXHAUSTED (the error is made here, as
    memory cannot be exhausted safely in a test)."""
    from backend.service import _status_for

    code, message = _status_for(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                             "9663676416 bytes"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "smaller extent or fewer prompts" in message
    code, _ = _status_for(MemoryError())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, message = _status_for(RuntimeError("something else"))
    assert code == grpc.StatusCode.INTERNAL and "something else" in message


def test_client_extent_takes_negative_numbers_written_with_an_exponent():
    """argparse knows "-2" and "-2.5" as negative numbers only: "--extent -2e7 ..." (a Web Mercator
    world, as a user copies it) was refused as "expected 4 arguments"."""
    import argparse

    from backend.client import add_client_arguments

    parser = argparse.ArgumentParser()
    add_client_arguments(parser)
    for command in (["caption", "--raster", "x.tif"], ["segment", "--raster", "x.tif", "--prompt", "trees"]):
        args = parser.parse_args([*command, "--extent", "-2e7", "-1.5E7", "2e7", "-.5", "--extent-crs", "EPSG:3857"])
        assert args.extent == [-2e7, -1.5e7, 2e7, -0.5]


def test_client_paths_and_options_a_user_gets_wrong_are_named(server, rasters, tmp_path):
    """A file name that is not UTF-8 is named, and `index` goes on to the next raster (it stopped the
    run as "check the numbers given", exit 2); a URL reaches the server as the remote name it is (it
    became a local path under the working folder); an empty path, --within a point, an --extent with
    no area (all zeros searched the whole index) and outputs that cannot be written are usage errors,
    exit 2. A longitude/latitude raster stored past 180 degrees reports its bounds_wgs84 within
    [-180, 180], across the antimeridian as xmin > xmax."""
    folder = rasters["folder"] / "client_paths"
    folder.mkdir(exist_ok=True)
    bad = folder / os.fsdecode(b"caf\xe9-latin1.tif")          # a Latin-1 name, not UTF-8
    os.replace(make_tif(folder / "cafe.tif", noise((3, 64, 64), seed=9)), os.fsencode(bad))
    past_180 = make_tif(folder / "past_180.tif", noise((3, 40, 40), seed=10), crs="EPSG:4326",
                        geotransform=(179.99, 0.001, 0.0, 10.0, 0.0, -0.001))
    out = client(server, "index", "--json", str(bad), str(past_180))
    assert out.returncode == 1 and "is not valid UTF-8" in out.stderr and "rename the file" in out.stderr, out.stderr
    assert "check the numbers" not in out.stderr and "1 of 2 rasters could not be indexed" in out.stderr
    failed, indexed = json.loads(out.stdout)
    assert failed["outcome"] == "failed" and indexed["outcome"] == "indexed"
    west, _, east, _ = indexed["bounds_wgs84"]
    assert west == pytest.approx(179.99) and east == pytest.approx(-179.97), indexed["bounds_wgs84"]
    listed = json.loads(client(server, "list", "--json").stdout)
    assert [r["bounds_wgs84"] for r in listed if r["raster_path"] == str(past_180)] == [indexed["bounds_wgs84"]]
    out = client(server, "index", "http://127.0.0.1:9/x.tif")
    assert out.returncode == 1 and "http://127.0.0.1:9/x.tif' is a GDAL virtual or remote name" in out.stderr, out.stderr
    out = client(server, "remove", "")
    assert out.returncode == 1 and "a raster path is empty" in out.stderr, out.stderr
    for args, message in ((["search", "fields", "--within", "POINT (0 0)"], "--within must be one POLYGON with an area, not POINT"),
                          (["search", "fields", "--within", "POLYGON ((1 1, 1 2, 1 3, 1 1))"],
                           "--within must be one POLYGON with an area"),
                          (["search", "fields", "--extent", "0", "0", "0", "0"], "--extent 0 0 0 0 has no area"),
                          (["search", "fields", "--thumbnails", str(past_180)], "cannot make that folder"),
                          (["segment", "--raster", str(past_180), "--prompt", "trees", "--output", str(bad)[:-4] + ".gpkg"],
                           "exists and is not a GeoPackage"),
                          (["segment", "--raster", str(past_180), "--prompt", "trees", "--output",
                            str(tmp_path / "notes.sqlite.gpkg")], "exists and is not a GeoPackage")):
        if args[0] == "segment":
            Path(args[-1]).write_text("not a GeoPackage")
        if args[0] == "segment" and "sqlite" in args[-1]:       # an SQLite database, not a GeoPackage, nor locked
            Path(args[-1]).unlink()
            with sqlite3.connect(args[-1]) as db:
                db.execute("CREATE TABLE notes (text)")
        out = client(server, *args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


def test_index_of_an_extent_in_another_crs_stores_the_tiles_that_meet_it_and_counts_them(server, rasters):
    """A Pacific map (EPSG:3832) over a world raster: the tiles at its two ends are stored, none between
    (the whole band was), and progress counts those tiles (it counted grid positions: past its total)."""
    world = make_tif(rasters["folder"] / "world_pacific.tif", noise((3, 800, 4000), seed=11), crs="EPSG:4326",
                     geotransform=(-180.0, 0.09, 0.0, 36.0, 0.0, -0.09))
    from backend.raster import parse_crs

    to_pacific = osr.CoordinateTransformation(parse_crs("EPSG:4326"), parse_crs("EPSG:3832"))
    xmin, ymin, xmax, ymax = to_pacific.TransformBounds(170.0, -35.0, 190.0, 35.0, 21)
    extent = pb().Extent(xmin=xmin, ymin=ymin, xmax=xmax, ymax=ymax, crs="EPSG:3832")
    events = index(server, world, extent=extent, force=True)
    progress = [e for e in events if not e.done]
    assert all(p.tiles_done <= p.tiles_total for p in progress), [(p.tiles_done, p.tiles_total) for p in progress]
    result = events[-1].result
    assert 32 < result.tile_count == max(p.tiles_total for p in progress)     # more than one batch of them
    hits = server.stub.Search(pb().SearchRequest(query="water", k=1000, raster_ids=[result.raster_id]),
                              metadata=server.metadata, timeout=60).hits
    assert len(hits) == result.tile_count
    lons = sorted({round((h.bounds.xmin + h.bounds.xmax) / 2) for h in hits})
    assert lons and all(abs(lon) > 165 for lon in lons), lons               # at the two ends only
    assert min(lons) < 0 < max(lons)


def test_long_calls_are_bounded_and_a_segment_frees_its_slot_before_its_answers_are_read(checkpoint, rasters,
                                                                                           tmp_path):
    """In process, with the real model and index (a client that stops reading cannot be made to stop
    at a given line). Segment and IndexRaster calls beyond workers - max(2, workers/4) are refused as
    busy (queued ones took every call thread: health checks went unanswered); a Segment gives its slot
    back once its answers are made (a client that read them slowly kept every other Segment waiting);
    a unary call whose client has gone ends in an abort, not None (gRPC logged a traceback)."""
    from backend.engine import ModelEngine
    from backend.index import TileIndex
    from backend.service import SkyPromptService

    engine = ModelEngine(checkpoint, device="cpu")
    index = TileIndex(tmp_path / "index")
    try:
        service = SkyPromptService(engine, index, allowed_roots=[str(rasters["folder"])], segments_at_once=1,
                                   workers=6)
        assert service.long_calls == 4
        p = pb()
        request = p.SegmentRequest(source=p.RasterSource(path=str(rasters["rgb"])), prompts=["trees", "roads"],
                                   threshold=0.0)
        slow_reader = service.Segment(request, Context())
        for event in slow_reader:           # up to its first answer; its client reads no further
            if event.HasField("result"):
                break
        assert service._segment_slots.acquire(blocking=False)      # its slot is free meanwhile
        service._segment_slots.release()
        other = list(service.Segment(request, Context()))
        assert [e.result.prompt for e in other if e.HasField("result")] == ["trees", "roads"]
        assert not any(e.HasField("progress") and e.progress.stage == p.SEGMENT_STAGE_QUEUED for e in other)
        slow_reader.close()
        assert service._segment_slots.acquire(blocking=False)      # given back when the stream closed
        service._segment_slots.release()
        for _ in range(service.long_calls):     # as if that many were under way or queued: every slot free again
            assert service._long_call_slots.acquire(timeout=5)
        index_request = p.IndexRasterRequest(source=p.RasterSource(path=str(rasters["rgb"])))
        for call, req in ((service.Segment, request), (service.IndexRaster, index_request)):
            context = Context()
            with pytest.raises(grpc.RpcError):
                list(call(req, context))
            code, message = context.aborted
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "the server is busy: 4 Segment and IndexRaster" \
                in message and "serve --workers 6" in message, message
        for _ in range(service.long_calls):
            service._long_call_slots.release()
        gone = Context(active_calls=0)
        with pytest.raises(grpc.RpcError):
            service.EmbedText(p.EmbedTextRequest(texts=["trees"]), gone)
        assert gone.aborted[0] == grpc.StatusCode.CANCELLED
    finally:
        index.close()
        engine.stop()


def test_a_busy_server_stops_a_run_over_several_rasters_and_other_refusals_do_not():
    """RESOURCE_EXHAUSTED "the server is busy" is the whole server's: `client index` and `remove` over
    several rasters stop at it (each raster failed in turn); other RESOURCE_EXHAUSTED (one raster over
    the pixel limit) stay one raster's."""
    from backend.client import stops_all

    class Refusal(grpc.RpcError):
        def __init__(self, code, details):
            self._code, self._details = code, details

        def code(self):
            return self._code

        def details(self):
            return self._details

    busy = Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "the server is busy: 24 Segment and IndexRaster calls ...")
    assert stops_all(busy) and stops_all(Refusal(grpc.StatusCode.UNAVAILABLE, "gone"))
    assert not stops_all(Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "the extent is over the pixel limit"))
    assert not stops_all(Refusal(grpc.StatusCode.NOT_FOUND, "no such raster"))
