"""Tile index: real SQLite and embedding files under tmp_path, crashes by SIGKILL in subprocesses."""
from __future__ import annotations

import errno
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal, osr

from backend import index as index_module
from backend.index import TileIndex, TileIndexError, _top_k, raster_identity
from backend.raster import open_raster

REPO = Path(__file__).resolve().parents[1]
CK = "ckpt-a"
DIM = 32


def unit(rng, n, dim=DIM):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_tiles(n, lon0=10.0, lat0=50.0, per_row=10):
    """A grid of 256-pixel tiles, 0.01 degrees each, west-to-east then north-to-south."""
    tiles = []
    for i in range(n):
        c, r = i % per_row, i // per_row
        lon, lat = lon0 + c * 0.01, lat0 - r * 0.01
        tiles.append({"col": c * 256, "row": r * 256, "width": 256, "height": 256,
                      "bounds": (c * 256.0, -(r + 1) * 256.0, (c + 1) * 256.0, -r * 256.0),
                      "bounds_wgs84": (lon, lat - 0.01, lon + 0.01, lat)})
    return tiles


def ident(tmp_path, name, size=1000, mtime_ns=1):
    return {"path": str(tmp_path / f"{name}.tif"), "size": size, "mtime_ns": mtime_ns}


def meta(name, n=0):
    return {"name": f"{name}.tif", "crs_authid": "EPSG:3857", "crs_wkt": "PROJCS[...]", "width": 2560,
            "height": 256 * (n // 10 + 1), "band_count": 3, "bounds": (0, -2560, 2560, 0),
            "bounds_wgs84": (10.0, 49.0, 10.1, 50.0), "tiles_skipped": 2}


def add(index, tmp_path, name, emb, checkpoint=CK, mtime_ns=1, settings=None, **tile_kw):
    return index.add_raster(ident(tmp_path, name, mtime_ns=mtime_ns), checkpoint, settings or {"tile": 224},
                            meta(name, len(emb)), make_tiles(len(emb), **tile_kw), emb)


def embedding_files(directory):
    """The files in embeddings/ (not those set aside in embeddings/unused/)."""
    return sorted(p.name for p in (Path(directory) / "embeddings").iterdir() if p.is_file())


def unused_files(directory):
    unused = Path(directory) / "embeddings" / "unused"
    return sorted(p.name for p in unused.iterdir()) if unused.is_dir() else []


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_add_then_search_returns_the_matching_tile_first_with_its_metadata(tmp_path, rng):
    emb = unit(rng, 50)
    with TileIndex(tmp_path / "idx") as index:
        rid = add(index, tmp_path, "a", emb)
        query = emb[7] + 0.01 * unit(rng, 1)[0]
        hits = index.search(query, 5, CK)

        assert len(hits) == 5 and hits.tiles_searched == 50 and not hits.approximate
        best = hits[0]
        assert best.raster_id == rid and best.score > 0.99
        assert (best.col, best.row, best.width, best.height) == (7 * 256, 0, 256, 256)
        assert best.tile_id == index.raster(rid)["first_tile_id"] + 7
        assert best.raster_path == str((tmp_path / "a.tif").resolve()) and best.raster_name == "a.tif"
        assert best.bounds == (7 * 256.0, -256.0, 8 * 256.0, 0.0)
        assert best.bounds_wgs84 == pytest.approx((10.07, 49.99, 10.08, 50.0))
        assert best.footprint_wkt.startswith("POLYGON ((") and best.crs_authid == "EPSG:3857"
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)
        exact = emb @ (query / np.linalg.norm(query))
        assert scores == pytest.approx(np.sort(exact)[::-1][:5], abs=2e-3)  # float16 storage

        batch = index.search(np.stack([emb[3], emb[9]]), 1, CK)
        assert [b[0].col for b in batch] == [3 * 256, 9 * 256]
        assert len(index.search(query, 500, CK)) == 50
        assert all(h.score >= 0.5 for h in index.search(query, 50, CK, min_score=0.5))

        r = index.raster(rid)
        assert (r["tile_count"], r["tiles_skipped"], r["dim"], r["checkpoint_hash"]) == (50, 2, DIM, CK)
        assert r["bounds_wgs84"] == (10.0, 49.0, 10.1, 50.0) and r["settings"] == {"tile": 224}
        s = index.stats(CK)
        assert (s["rasters"], s["tiles"]) == (1, 50) and s["bytes"] >= 50 * DIM * 2 and not s["ann_active"]


def test_filters_by_raster_id_path_union_and_wgs84_extent(tmp_path, rng):
    with TileIndex(tmp_path / "idx") as index:
        emb_a, emb_b = unit(rng, 40), unit(rng, 40)
        a = add(index, tmp_path, "a", emb_a, lon0=10.0)
        b = add(index, tmp_path, "b", emb_b, lon0=20.0)
        query = emb_b[0]
        assert index.search(query, 1, CK)[0].raster_id == b
        only_a = index.search(query, 100, CK, raster_ids=[a])
        assert {h.raster_id for h in only_a} == {a} and len(only_a) == 40
        by_path = index.search(query, 100, CK, raster_paths=[tmp_path / "a.tif"])
        assert {h.raster_id for h in by_path} == {a}
        both = index.search(query, 100, CK, raster_ids=[str(a)], raster_paths=[str(tmp_path / "b.tif")])
        assert {h.raster_id for h in both} == {a, b} and both.tiles_searched == 80

        # first two tile columns of raster a: lon 10.00..10.02; a box touching 10.005..10.015
        box = (10.005, 40.0, 10.015, 60.0)
        hits = index.search(query, 100, CK, bbox_wgs84=box)
        assert hits and {h.raster_id for h in hits} == {a} and {h.col for h in hits} == {0, 256}
        assert hits.tiles_searched == len(hits) == 8
        assert all(h.bounds_wgs84[0] <= box[2] and h.bounds_wgs84[2] >= box[0] for h in hits)
        whole_b = index.search(query, 100, CK, bbox_wgs84=(19, 40, 21, 60))
        assert {h.raster_id for h in whole_b} == {b} and len(whole_b) == 40
        assert len(index.search(query, 5, CK, bbox_wgs84=(-50, -50, -40, -40))) == 0
        assert len(index.search(query, 100, CK, raster_ids=[b], bbox_wgs84=box)) == 0

        with pytest.raises(TileIndexError) as e:
            index.search(query, 5, CK, raster_ids=[999])
        assert e.value.kind == "not_found" and "999" in str(e.value)
        # ids as text, as the wire carries them: digits name a raster, text that can name none is not found
        assert {h.raster_id for h in index.search(query, 100, CK, raster_ids=[f" {b} "])} == {b}
        assert index.raster(np.int64(b))["id"] == b
        for never in ("abc", "\u00b2", "-1", "9" * 23, 2**63, -1):
            with pytest.raises(TileIndexError) as e:
                index.search(query, 5, CK, raster_ids=[never])
            assert e.value.kind == "not_found", never
            with pytest.raises(TileIndexError) as e:
                index.raster(never)
            assert e.value.kind == "not_found", never
        with pytest.raises(TileIndexError) as e:
            index.remove_raster(2**63)                          # no raster can have it: not an overflow
        assert e.value.kind == "not_found"
        for wrong_type in (None, 1.0, True):
            with pytest.raises(TileIndexError) as e:
                index.raster(wrong_type)
            assert e.value.kind == "invalid_argument" and type(wrong_type).__name__ in str(e.value)
        with pytest.raises(TileIndexError) as e:
            index.search(query, 5, CK, raster_paths=[tmp_path / "nope.tif"])
        assert e.value.kind == "not_found" and "nope.tif" in str(e.value)
        with pytest.raises(TileIndexError) as e:
            index.search(query, 5, CK, bbox_wgs84=(11, 50, 10, 51))
        assert e.value.kind == "invalid_argument" and "inverted" in str(e.value)


def test_tiles_across_180_degrees_match_only_extents_over_them(tmp_path, rng):
    """A raster in a Pacific CRS over 176E..176W: its tiles' EPSG:4326 boxes are continuous (one
    spans about 179.7..180.3), so extents on either side of 180 degrees, or across it as GDAL reports
    such boxes (xmin > xmax), find them, and an extent on the other side of the world does not."""
    from osgeo import osr

    from backend.raster import raster_from_pixels, transform_bounds

    x0, y0 = transform_bounds((176.0, -15.0, 176.0, -15.0), "EPSG:4326", "EPSG:3832")[:2]
    x1, y1 = transform_bounds((-176.0, -17.0, -176.0, -17.0), "EPSG:4326", "EPSG:3832")[:2]
    width, height = 768, 256
    raster = raster_from_pixels(np.full((3, height, width), 100, np.uint8), width, height, 3, "Byte",
                                (x0, (x1 - x0) / width, 0, y0, 0, (y1 - y0) / height), "EPSG:3832")
    try:
        tiles = raster.tiles(tile_size=256)
        meta = dict(name="pacific", crs_authid="EPSG:3832", crs_wkt=raster.crs_wkt, width=width, height=height,
                    band_count=3, bounds=raster.bounds, bounds_wgs84=raster.bounds_wgs84)
        rows = [dict(col=t.col, row=t.row, width=t.width, height=t.height, bounds=t.bounds,
                     bounds_wgs84=t.bounds_wgs84, footprint_wkt=t.footprint_wkt,
                     footprint_wgs84_wkt=t.footprint_wgs84_wkt) for t in tiles]
    finally:
        raster.close()
    assert [round(t.bounds_wgs84[2] - t.bounds_wgs84[0], 1) for t in tiles] == [2.7, 2.7, 2.7]
    assert tiles[1].bounds_wgs84[0] < 180 < tiles[1].bounds_wgs84[2]
    emb = unit(rng, 3)
    with TileIndex(tmp_path / "idx") as index:
        index.add_raster(ident(tmp_path, "pacific"), CK, {}, meta, rows, emb)

        def cols(box):
            return sorted(h.col // 256 for h in index.search(emb[0], 10, CK, bbox_wgs84=box))

        assert cols((20, -17, 30, -15)) == []                       # southern Africa
        assert cols((176.5, -17, 177, -15)) == [0]
        assert cols((179.9, -17, 180, -15)) == [1]                  # west of 180
        assert cols((-180, -17, -179.9, -15)) == [1]                # east of 180
        assert cols((-178, -17, -177, -15)) == [2]
        assert cols((179, -17, 181, -15)) == [1]                    # continuous longitudes, as the tiles'
        assert cols((170, -17, -170, -15)) == [0, 1, 2]             # across 180, GDAL-style
        with pytest.raises(TileIndexError, match="inverted"):       # west > east, but not across 180
            cols((11, -17, 10, -15))
        assert cols((-184, -17, -183, -15)) == [0]                  # 176E..177E written as -184..-183
        assert cols((-539.9, -17, -539.5, -15)) == [1]              # east of 180, two turns west


def test_a_filtered_raster_removed_mid_search_or_unreadable_is_a_clear_error(tmp_path, rng, monkeypatch):
    """The filter's rasters are looked up in each attempt: one removed between the request's check and
    the ranking is not_found (it used to fail every retry with an internal error), and one whose
    embedding file went bad is unavailable, naming what to do."""
    with TileIndex(tmp_path / "idx") as index:
        a, b = add(index, tmp_path, "a", unit(rng, 20)), add(index, tmp_path, "b", unit(rng, 20))
        query = unit(rng, 1)[0]
        index.search(query, 5, CK)                       # a snapshot holding both
        checked = index._selected_rasters
        calls = []

        def removing_after_the_first_check(*args):
            out = checked(*args)
            if not calls:
                calls.append(1)
                index.remove_raster(b)                   # another request's RemoveRaster lands here
            return out

        monkeypatch.setattr(index, "_selected_rasters", removing_after_the_first_check)
        with pytest.raises(TileIndexError) as e:
            index.search(query, 5, CK, raster_ids=[a, b])
        assert e.value.kind == "not_found" and str(b) in str(e.value)
        monkeypatch.undo()
        c = add(index, tmp_path, "c", unit(rng, 20))
        with open(tmp_path / "idx" / "embeddings" / index.raster(c)["embeddings_file"], "r+b") as f:
            f.truncate(100)                               # damaged on disk while the index is open
        with pytest.raises(TileIndexError) as e:
            index.search(query, 5, CK, raster_ids=[c])
        assert e.value.kind == "unavailable" and "re-index" in str(e.value)
        assert {h.raster_id for h in index.search(query, 5, CK, raster_ids=[a])} == {a}


def test_unchanged_is_a_noop_changed_is_replaced_and_remove_deletes(tmp_path, rng):
    directory = tmp_path / "idx"
    with TileIndex(directory) as index:
        path = tmp_path / "a.tif"
        path.write_bytes(b"x" * 100)
        identity = raster_identity(path)
        settings = {"tile": 224, "overlap": 0.25, "resolution": 0, "bands": [1, 2, 3]}
        assert index.needs_indexing(identity, CK, settings) == "new"
        emb1 = unit(rng, 30)
        rid = index.add_raster(identity, CK, settings, meta("a"), make_tiles(30), emb1)
        first_file = embedding_files(directory)
        reordered = {"bands": [1, 2, 3], "resolution": 0, "overlap": 0.25, "tile": 224}
        assert index.needs_indexing(identity, CK, reordered) == "unchanged"
        assert index.needs_indexing(dict(identity, mtime_ns=identity["mtime_ns"] + 1), CK, settings) == "changed"
        assert index.needs_indexing(dict(identity, size=101), CK, settings) == "changed"
        assert index.needs_indexing(identity, "ckpt-b", settings) == "changed"
        assert index.needs_indexing(identity, CK, dict(settings, overlap=0.5)) == "changed"
        old_tiles = {h.tile_id for h in index.search(emb1[0], 100, CK)}

        path.write_bytes(b"y" * 120)
        changed = raster_identity(path)
        assert index.needs_indexing(changed, CK, settings) == "changed"
        emb2 = unit(rng, 12)
        assert index.add_raster(changed, CK, settings, meta("a"), make_tiles(12), emb2) == rid  # id kept
        assert index.needs_indexing(changed, CK, settings) == "unchanged"
        hits = index.search(emb2[5], 100, CK)
        assert len(hits) == 12 and hits[0].col == 5 * 256 and not old_tiles & {h.tile_id for h in hits}
        assert len(embedding_files(directory)) == 1 and embedding_files(directory) != first_file
        assert index.stats(CK)["tiles"] == 12 and len(index.list_rasters()) == 1

        index.remove_raster(path)
        assert index.search(emb2[5], 10, CK) == [] and index.stats()["rasters"] == 0
        assert embedding_files(directory) == [] and index.needs_indexing(changed, CK, settings) == "new"
        assert index._reader().execute("SELECT COUNT(*) FROM tiles").fetchone()[0] == 0
        with pytest.raises(TileIndexError) as e:
            index.remove_raster(path)
        assert e.value.kind == "not_found"
        with pytest.raises(TileIndexError) as e:
            index.raster(rid)
        assert e.value.kind == "not_found" and "client list" in str(e.value)


def write_geotiff(path, value, size=64):
    """A 3-band Byte GeoTIFF in UTM 33N filled with `value`: rewriting it keeps its size in bytes."""
    ds = gdal.GetDriverByName("GTiff").Create(str(path), size, size, 3, gdal.GDT_Byte)
    ds.SetGeoTransform((500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    ds.SetSpatialRef(srs)
    for band in range(1, 4):
        ds.GetRasterBand(band).WriteArray(np.full((size, size), value, np.uint8))
    ds = None


def test_georeferencing_set_in_an_aux_xml_makes_the_raster_changed(tmp_path, rng, monkeypatch):
    """GDAL takes a GeoTIFF's georeferencing, nodata and band colours from an .aux.xml beside it
    before its own: one that moves the raster (gdal_edit on a read-only file, a georeferencer) makes
    it "changed", and the old tiles would lie elsewhere, and its search hits and `list` say so.
    Statistics alone, which QGIS writes on display, leave it "unchanged"."""
    from backend.rpc import skyprompt_pb2 as pb
    from backend.service import _changed_since_indexing

    path, aux = tmp_path / "ortho.tif", tmp_path / "ortho.tif.aux.xml"
    write_geotiff(path, 10)
    monkeypatch.setenv("GDAL_PAM_ENABLED", "YES")      # the tests turn it off (conftest); GDAL's default is on
    settings = {"tile": 224}
    with TileIndex(tmp_path / "idx") as index:
        with open_raster(path) as raster:
            identity = raster.identity()
            index.add_raster(identity, CK, settings, meta("ortho"), make_tiles(3), unit(rng, 3))
        stats = ('<PAMRasterBand band="1"><Metadata><MDI key="STATISTICS_MEAN">10</MDI></Metadata>'
                 '</PAMRasterBand>')
        aux.write_text(f"<PAMDataset>{stats}</PAMDataset>")
        with open_raster(path) as raster:
            assert index.needs_indexing(raster.identity(), CK, settings) == "unchanged"
        entry = index.list_rasters()[0]
        assert _changed_since_indexing(entry) == (pb.FILE_STATE_UNCHANGED, "")   # what search hits and `list` say
        changes = {"moved": "<GeoTransform>600000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0</GeoTransform>",
                   "nodata": '<PAMRasterBand band="2"><NoDataValue>10</NoDataValue></PAMRasterBand>'}
        for what, element in changes.items():
            aux.write_text(f"<PAMDataset>{element}{stats}</PAMDataset>")
            with open_raster(path) as raster:
                if what == "moved":
                    assert raster.bounds[0] == 600000.0      # GDAL does read it
                assert index.needs_indexing(raster.identity(), CK, settings) == "changed", what
            state, reason = _changed_since_indexing(entry)
            assert state == pb.FILE_STATE_CHANGED and "georeferencing in its .aux.xml, changed since it was indexed" in reason
        # histograms of any size are read past (QGIS writes large ones), the georeferencing kept
        histogram = "<Histograms>" + "<HistItem>" + "0|" * 9_000_000 + "</HistItem></Histograms>"
        aux.write_text(f'<PAMDataset><PAMRasterBand band="1">{histogram}</PAMRasterBand></PAMDataset>')
        assert aux.stat().st_size > 16 << 20
        with open_raster(path) as raster:
            assert index.needs_indexing(raster.identity(), CK, settings) == "unchanged"
        aux.write_text(f'<PAMDataset><PAMRasterBand band="1">{histogram}</PAMRasterBand>{changes["moved"]}</PAMDataset>')
        with open_raster(path) as raster:
            assert index.needs_indexing(raster.identity(), CK, settings) == "changed"
        aux.write_text("not xml at all")                     # GDAL ignores it: so does the identity
        with open_raster(path) as raster:
            assert index.needs_indexing(raster.identity(), CK, settings) == "unchanged"
        aux.write_text(f"<PAMDataset>{changes['moved']}</PAMDataset>")
        monkeypatch.setenv("GDAL_PAM_ENABLED", "NO")      # GDAL then reads no .aux.xml, nor does the identity
        with open_raster(path) as raster:
            assert raster.bounds[0] == 500000.0
            assert index.needs_indexing(raster.identity(), CK, settings) == "unchanged"


def test_a_vrts_sources_are_digested_once_a_while_not_once_a_search(tmp_path, monkeypatch):
    """Search flags hits from a raster changed since indexing: for a VRT that means reading every
    file behind it, tens of milliseconds for thousands of files. The digest is kept for a while per
    VRT, so searches do not pay it each time; a change behind the VRT shows when it runs out."""
    import backend.service as service

    source, vrt = tmp_path / "source.tif", tmp_path / "mosaic.vrt"
    write_geotiff(source, 10)
    gdal.BuildVRT(str(vrt), [str(source)]).FlushCache()
    digested = []
    real_digest = service.sources_digest_of
    monkeypatch.setattr(service, "sources_digest_of", lambda path: digested.append(path) or real_digest(path))
    recent = service._RecentDigests(ttl_s=3600)
    st = vrt.stat()
    first = recent.digest(str(vrt), st.st_size, st.st_mtime_ns, None)
    assert recent.digest(str(vrt), st.st_size, st.st_mtime_ns, None) == first and len(digested) == 1
    before = source.stat()
    write_geotiff(source, 200)
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert recent.digest(str(vrt), st.st_size, st.st_mtime_ns, None) == first        # kept for its while
    recent.ttl_s = 0.0
    assert recent.digest(str(vrt), st.st_size, st.st_mtime_ns, None) != first and len(digested) == 2


def test_a_source_rewritten_behind_a_vrt_makes_the_vrt_changed(tmp_path, rng):
    """A VRT's own size and mtime stay the same when a GeoTIFF behind it is rewritten; its identity
    also covers every file GDAL reads for it (nested VRTs' sources too), so re-indexing it is no longer
    skipped as "unchanged". A raster that is one file keeps the identity it always had."""
    source, vrt, outer = tmp_path / "source.tif", tmp_path / "mosaic.vrt", tmp_path / "outer.vrt"
    write_geotiff(source, 10)
    gdal.BuildVRT(str(vrt), [str(source)]).FlushCache()
    gdal.BuildVRT(str(outer), [str(vrt)]).FlushCache()
    settings = {"tile": 224}
    with TileIndex(tmp_path / "idx") as index:
        for path in (source, vrt, outer):
            with open_raster(path) as raster:
                identity = raster.identity()
                index.add_raster(identity, CK, settings, meta(path.stem), make_tiles(3), unit(rng, 3))
                assert index.needs_indexing(identity, CK, settings) == "unchanged"
            if path == source:   # one file: the same keys as ever, so existing indexes stay "unchanged"
                assert identity == raster_identity(source)
        # QGIS and GDAL write statistics to an .aux.xml when they only display a raster: not a change
        (tmp_path / "source.tif.aux.xml").write_text("<PAMDataset></PAMDataset>")
        for path in (source, vrt, outer):
            with open_raster(path) as raster:
                assert index.needs_indexing(raster.identity(), CK, settings) == "unchanged", path.name
        vrt_before, outer_before = vrt.stat(), outer.stat()
        source_before = source.stat()

        write_geotiff(source, 200)
        os.utime(source, ns=(source_before.st_atime_ns, source_before.st_mtime_ns + 10**9))
        assert source.stat().st_size == source_before.st_size
        for path, before in ((vrt, vrt_before), (outer, outer_before)):
            assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        for path in (source, vrt, outer):
            with open_raster(path) as raster:
                assert raster.read_window(0, 0, 8, 8)[0][:, 0, 0].tolist() == [200, 200, 200]
                assert index.needs_indexing(raster.identity(), CK, settings) == "changed", path.name
        # and its search hits and `list` say so, though the VRT's own file is as it was
        from backend.service import _changed_since_indexing
        said = {Path(entry["path"]).name: _changed_since_indexing(entry).reason for entry in index.list_rasters()}
        assert "source.tif' changed on disk since it was indexed" in said["source.tif"]
        assert "a file it reads" in said["mosaic.vrt"] and "a file it reads" in said["outer.vrt"]



def test_pyramids_leave_the_identity_a_world_file_or_archive_member_changes_it(tmp_path):
    """A GeoTIFF with external overviews (QGIS's "Build pyramids") keeps the identity it always had:
    building pyramids re-indexes nothing. A world file moved beside a raster moves its tiles on the
    ground, so it counts; so does a zip rewritten behind a VRT that reads a member of it."""
    import zipfile
    tif = tmp_path / "pyramids.tif"
    write_geotiff(tif, 10, size=256)
    ds = gdal.Open(str(tif))
    ds.BuildOverviews("AVERAGE", [2, 4])     # read-only open: written as pyramids.tif.ovr
    ds = None
    assert (tmp_path / "pyramids.tif.ovr").exists()
    erdas = tmp_path / "erdas.tif"        # QGIS's "External (Erdas Imagine)" pyramids: erdas.aux
    write_geotiff(erdas, 10, size=256)
    gdal.SetConfigOption("USE_RRD", "YES")
    try:
        ds = gdal.Open(str(erdas))
        ds.BuildOverviews("AVERAGE", [2, 4])
        ds = None
    finally:
        gdal.SetConfigOption("USE_RRD", None)
    assert (tmp_path / "erdas.aux").exists()
    for path in (tif, erdas):
        with open_raster(path) as raster:
            assert raster.identity() == raster_identity(path)

    placed = tmp_path / "placed.tif"      # its CRS inside, its place on the ground in placed.tfw alone
    ds = gdal.GetDriverByName("GTiff").Create(str(placed), 64, 64, 3, gdal.GDT_Byte)
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    ds.SetSpatialRef(srs)
    ds = None
    keys = []
    for origin in (500000.0, 600000.0):
        (tmp_path / "placed.tfw").write_text(f"10\n0\n0\n-10\n{origin}\n5000000\n")
        with open_raster(placed) as raster:
            assert raster.geotransform[0] == origin - 5.0     # the world file names pixel centres
            keys.append(raster.identity())
    assert keys[0]["size"] == keys[1]["size"] and keys[0]["sources"] != keys[1]["sources"]

    member = tmp_path / "t.tif"
    zipped = tmp_path / "z.zip"
    vrt = tmp_path / "zip.vrt"
    identities = []
    for value, stamp in ((10, (2020, 1, 1, 0, 0, 0)), (200, (2021, 1, 1, 0, 0, 0))):
        write_geotiff(member, value)
        with zipfile.ZipFile(zipped, "w") as z:
            z.writestr(zipfile.ZipInfo("t.tif", date_time=stamp), member.read_bytes())
        # GDAL keeps an archive's listing while its size and mtime (in seconds) stay the same
        os.utime(zipped, (1_600_000_000 + value, 1_600_000_000 + value))
        if not vrt.exists():
            gdal.BuildVRT(str(vrt), [f"/vsizip/{zipped}/t.tif"]).FlushCache()
        with open_raster(vrt) as raster:
            assert raster.read_window(0, 0, 4, 4)[0][:, 0, 0].tolist() == [value] * 3
            identities.append(raster.identity())
    assert identities[0]["sources"] != identities[1]["sources"]


def test_an_index_written_before_the_sources_column_opens_with_its_rasters_unchanged(tmp_path, rng):
    """Indexes made before rasters' identities covered a VRT's sources gain the column on open; the
    rasters in them (one file each: no sources) stay "unchanged", so nothing is indexed again."""
    directory = tmp_path / "idx"
    emb = unit(rng, 10)
    with TileIndex(directory) as index:
        rid = add(index, tmp_path, "a", emb)
    with sqlite3.connect(directory / "index.sqlite3") as conn:
        conn.execute("ALTER TABLE rasters DROP COLUMN sources")
    with TileIndex(directory) as index:
        assert index.needs_indexing(ident(tmp_path, "a"), CK, {"tile": 224}) == "unchanged"
        assert index.search(emb[4], 1, CK)[0].raster_id == rid
        vrt = dict(ident(tmp_path, "v"), sources="digest-1")
        index.add_raster(vrt, CK, {}, meta("v"), make_tiles(2), unit(rng, 2))
        assert index.needs_indexing(vrt, CK, {}) == "unchanged"
        assert index.needs_indexing(dict(vrt, sources="digest-2"), CK, {}) == "changed"
        assert index.needs_indexing(ident(tmp_path, "v"), CK, {}) == "changed"


def test_only_embeddings_of_the_given_checkpoint_are_searched(tmp_path, rng):
    with TileIndex(tmp_path / "idx") as index:
        emb_a, emb_b = unit(rng, 20), unit(rng, 20, dim=64)
        a = add(index, tmp_path, "a", emb_a, checkpoint="ckpt-a")
        b = add(index, tmp_path, "b", emb_b, checkpoint="ckpt-b")
        assert {h.raster_id for h in index.search(emb_a[0], 100, "ckpt-a")} == {a}
        assert {h.raster_id for h in index.search(emb_b[0], 100, "ckpt-b")} == {b}
        assert index.search(emb_a[0], 10, "ckpt-never-seen") == []
        assert index.stats("ckpt-a")["tiles"] == 20 and index.stats()["tiles"] == 40
        with pytest.raises(TileIndexError) as e:
            index.search(emb_b[0], 10, "ckpt-a")
        assert e.value.kind == "invalid_argument"
        assert str(e.value).startswith(
            "the query has 64 dims but the index holds 32-dim embeddings from checkpoint ckpt-a")
        with pytest.raises(TileIndexError) as e:
            index.search(emb_a[0], 10, "ckpt-a", raster_ids=[b])
        assert e.value.kind == "not_found" and "ckpt-b" in str(e.value)
        with pytest.raises(TileIndexError) as e:  # one checkpoint, one dimension
            add(index, tmp_path, "c", unit(rng, 5, dim=16), checkpoint="ckpt-a")
        assert e.value.kind == "invalid_argument" and len(embedding_files(tmp_path / "idx")) == 2


def test_bad_arguments_get_actionable_errors(tmp_path, rng):
    with TileIndex(tmp_path / "idx") as index:
        emb = unit(rng, 10)
        add(index, tmp_path, "a", emb)
        for k in (0, -3, 2.5):
            with pytest.raises(TileIndexError) as e:
                index.search(emb[0], k, CK)
            assert e.value.kind == "invalid_argument" and "k must be" in str(e.value)
        for query in (np.zeros(DIM), np.full(DIM, np.nan), np.zeros((2, 2, DIM))):
            with pytest.raises(TileIndexError) as e:
                index.search(query, 3, CK)
            assert e.value.kind == "invalid_argument"
        with pytest.raises(TileIndexError, match="3 tiles but 2 embeddings"):
            index.add_raster(ident(tmp_path, "b"), CK, {}, meta("b"), make_tiles(3), emb[:2])
        with pytest.raises(TileIndexError, match="needs 'path', 'size'"):
            index.add_raster({"path": "x.tif"}, CK, {}, meta("b"), make_tiles(2), emb[:2])
        with pytest.raises(TileIndexError, match="tile 0 needs integer"):
            index.add_raster(ident(tmp_path, "b"), CK, {}, meta("b"), [{"bounds": (0, 0, 1, 1)}], emb[:1])
        with pytest.raises(TileIndexError, match="is all zeros"):
            index.add_raster(ident(tmp_path, "b"), CK, {}, meta("b"), make_tiles(1), np.zeros((1, DIM)))
        assert len(index.list_rasters()) == 1 and len(embedding_files(tmp_path / "idx")) == 1
        with pytest.raises(TileIndexError) as e:
            TileIndex(tmp_path / "idx")  # one owner per directory
        assert e.value.kind == "unavailable" and "another process" in str(e.value)
        # index.lock deleted as if stale: the folder's own lock still keeps a second owner out
        (tmp_path / "idx" / "index.lock").unlink()
        with pytest.raises(TileIndexError, match="another process"):
            TileIndex(tmp_path / "idx")
    with pytest.raises(TileIndexError, match="closed"):
        index.search(emb[0], 3, CK)


def test_query_expansion_ranks_again_for_the_query_moved_toward_its_best_tiles(tmp_path, rng):
    """expand N: the query plus weight x the mean of its N best tiles, re-normalised, ranks the final
    hits; their scores are cosine similarities to that expanded query. Built so it matters: a
    cluster of 12 tiles of which the query is near only 3, and 20 scattered tiles that score between."""
    base, query = unit(rng, 2, 64)
    query = query - (query @ base) * base
    query /= np.linalg.norm(query)
    cluster = base + 0.25 * unit(rng, 12, 64)
    cluster[:3] += 1.2 * query                     # the three the query finds
    cluster /= np.linalg.norm(cluster, axis=1, keepdims=True)
    scattered = unit(rng, 20, 64) + 0.35 * query   # nearer the query than most of the cluster
    scattered /= np.linalg.norm(scattered, axis=1, keepdims=True)
    emb = np.concatenate([cluster, scattered]).astype(np.float32)
    with TileIndex(tmp_path / "idx") as index:
        rid = add(index, tmp_path, "a", emb)
        first = index._reader().execute("SELECT MIN(id) FROM tiles WHERE raster_id=?", (rid,)).fetchone()[0]
        plain = index.search(query, 10, CK)
        in_cluster = lambda hits: sum(h.tile_id - first < 12 for h in hits)  # noqa: E731
        assert in_cluster(plain) < 6 and {h.tile_id - first for h in plain[:3]} == {0, 1, 2}
        assert [h.tile_id for h in index.search(query, 10, CK, expand=0)] == [h.tile_id for h in plain]

        expanded = index.search(query, 10, CK, expand=3, expand_weight=2.0)
        assert in_cluster(expanded) >= in_cluster(plain) + 3, (in_cluster(plain), in_cluster(expanded))
        stored = emb.astype(np.float16).astype(np.float32)   # the index keeps float16 embeddings
        moved = query + 2.0 * stored[[h.tile_id - first for h in plain[:3]]].mean(0)
        moved /= np.linalg.norm(moved)
        by_hand = stored @ moved
        assert [h.tile_id - first for h in expanded] == list(np.argsort(-by_hand)[:10])
        np.testing.assert_allclose([h.score for h in expanded], np.sort(by_hand)[::-1][:10], atol=1e-5)
        # the weight matters, and min_score filters the expanded scores
        assert [h.score for h in index.search(query, 10, CK, expand=3, expand_weight=0.5)] != \
            pytest.approx([h.score for h in expanded])
        kept = index.search(query, 10, CK, expand=3, expand_weight=2.0, min_score=float(by_hand.max()) - 1e-4)
        assert [h.tile_id - first for h in kept] == [int(np.argmax(by_hand))]
        # more tiles asked for than there are: every tile averaged, no error
        assert len(index.search(query, 5, CK, expand=100)) == 5
        for bad in (-1, 2.5, True):
            with pytest.raises(TileIndexError) as e:
                index.search(query, 10, CK, expand=bad)
            assert e.value.kind == "invalid_argument" and "expand must be" in str(e.value)
        with pytest.raises(TileIndexError, match="weight must be a positive"):
            index.search(query, 10, CK, expand=3, expand_weight=float("nan"))


def test_tile_embedding_is_the_stored_vector_and_a_query_for_tiles_like_it(tmp_path, rng):
    with TileIndex(tmp_path / "idx") as index:
        emb = unit(rng, 12)
        add(index, tmp_path, "a", unit(rng, 5))
        rid = add(index, tmp_path, "b", emb)
        add(index, tmp_path, "other", unit(rng, 4), checkpoint="ckpt-b")
        first = index._reader().execute("SELECT MIN(id) FROM tiles WHERE raster_id=?", (rid,)).fetchone()[0]
        vector = index.tile_embedding(first + 7, CK)
        np.testing.assert_array_equal(vector, emb[7].astype(np.float16).astype(np.float32))
        hits = index.search(vector, 3, CK)
        assert hits[0].tile_id == first + 7 and hits[0].score == pytest.approx(1.0, abs=1e-3)
        other = index._reader().execute("SELECT MIN(t.id) FROM tiles t JOIN rasters r ON r.id = t.raster_id "
                                        "WHERE r.checkpoint_hash='ckpt-b'").fetchone()[0]
        for tile, kind, words in ((10_000, "not_found", "is not in the tile index"),
                                  (other, "not_found", "was indexed with checkpoint ckpt-b"),
                                  (-1, "invalid_argument", "whole number"), (True, "invalid_argument", "whole number")):
            with pytest.raises(TileIndexError) as e:
                index.tile_embedding(tile, CK)
            assert e.value.kind == kind and words in str(e.value), (tile, e.value)


def test_index_persists_across_reopen(tmp_path, rng):
    emb = unit(rng, 25)
    with TileIndex(tmp_path / "idx") as index:
        rid = add(index, tmp_path, "a", emb)
        before = index.search(emb[4], 3, CK)
    with TileIndex(tmp_path / "idx") as index:
        after = index.search(emb[4], 3, CK)
        assert after == before and after[0].raster_id == rid
        assert index.needs_indexing(ident(tmp_path, "a"), CK, {"tile": 224}) == "unchanged"
        next_id = add(index, tmp_path, "b", unit(rng, 3))
        assert next_id != rid and index.search(emb[4], 1, CK)[0].tile_id == before[0].tile_id


def test_streaming_writer_commits_on_clean_exit_and_leaves_nothing_when_aborted(tmp_path, rng):
    directory = tmp_path / "idx"
    with TileIndex(directory) as index:
        emb = unit(rng, 90)
        tiles = make_tiles(90)
        with index.writer(ident(tmp_path, "a"), CK, {}, meta("a"), DIM) as w:
            for s in range(0, 90, 25):
                w.add(tiles[s:s + 25], emb[s:s + 25])
        assert w.raster_id is not None and not w.replaced
        assert index.search(emb[60], 1, CK)[0].col == tiles[60]["col"]
        files = embedding_files(directory)

        with pytest.raises(RuntimeError, match="cancelled"):
            with index.writer(ident(tmp_path, "a", mtime_ns=2), CK, {}, meta("a"), DIM) as w:
                w.add(tiles[:10], unit(rng, 10))
                raise RuntimeError("cancelled")
        with index.writer(ident(tmp_path, "b"), CK, {}, meta("b"), DIM) as w:
            w.add(tiles[:10], unit(rng, 10))
            w.abort()
        assert embedding_files(directory) == files  # no temp files, the old raster untouched
        assert index.needs_indexing(ident(tmp_path, "b"), CK, {}) == "new"
        assert index.needs_indexing(ident(tmp_path, "a"), CK, {}) == "unchanged"
        assert len(index.search(emb[0], 1000, CK)) == 90

        with index.writer(ident(tmp_path, "empty"), CK, {}, meta("empty"), DIM) as w:
            pass  # every tile skipped: still recorded, so re-indexing it is a no-op
        assert index.needs_indexing(ident(tmp_path, "empty"), CK, {}) == "unchanged"
        assert len(index.search(emb[0], 1000, CK)) == 90


CHILD = r"""
import sys, time
import numpy as np
sys.path.insert(0, sys.argv[3])
from backend import index as ix


def make_tiles(n):
    return [{"col": i, "row": 0, "width": 1, "height": 1, "bounds": (i, 0, i + 1, 1), "bounds_wgs84": (0, 0, 1, 1)}
            for i in range(n)]


def unit(rng, n, dim=32):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


stage, directory, tmp = sys.argv[1], sys.argv[2], sys.argv[4]
index = ix.TileIndex(directory)
rng = np.random.default_rng(1)
big = {"path": tmp + "/big.tif", "size": 1, "mtime_ns": 1}
if stage == "mid_write":
    tiles, emb = make_tiles(2000), unit(rng, 2000)
    with index.writer(big, "ckpt-a", {}, {"name": "big.tif"}, emb.shape[1]) as w:
        for i in range(10**9):
            w.add(tiles, emb)
            if i == 2:
                print("writing", flush=True)
elif stage == "after_rename":
    publish = ix._publish_file
    def publish_then_hang(temp, final):
        publish(temp, final)
        print("renamed", flush=True)
        time.sleep(60)
    ix._publish_file = publish_then_hang
    index.add_raster(big, "ckpt-a", {}, {"name": "big.tif"}, make_tiles(500), unit(rng, 500))
elif stage == "after_commit":
    def hang(path):
        print("committed", flush=True)
        time.sleep(60)
    ix._discard_file = hang  # killed before the replaced raster's old file is deleted
    keep = {"path": tmp + "/keep.tif", "size": 1000, "mtime_ns": 2}
    index.add_raster(keep, "ckpt-a", {}, {"name": "keep.tif"}, make_tiles(7), unit(rng, 7))
"""


@pytest.mark.parametrize("stage", ["mid_write", "after_rename", "after_commit"])
def test_kill_9_while_indexing_leaves_each_raster_complete_or_absent(tmp_path, rng, stage):
    directory = tmp_path / "idx"
    keep = unit(rng, 20)
    with TileIndex(directory) as index:
        add(index, tmp_path, "keep", keep)
    with subprocess.Popen([sys.executable, "-c", CHILD, stage, str(directory), str(REPO), str(tmp_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) as proc:
        watchdog = threading.Timer(20, proc.kill)
        watchdog.start()
        try:
            line = proc.stdout.readline().strip()
            assert line in ("writing", "renamed", "committed"), proc.stderr.read()
            if stage == "mid_write":
                time.sleep(0.1)
                assert any(n.startswith(".tmp-") for n in embedding_files(directory))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            watchdog.cancel()
    assert proc.returncode == -signal.SIGKILL

    with TileIndex(directory) as index:
        rasters = {Path(r["path"]).name: r for r in index.list_rasters()}
        assert "big.tif" not in rasters and index.raster_by_path(tmp_path / "big.tif") is None
        if stage == "after_commit":  # the replacement committed: complete and searchable
            assert rasters["keep.tif"]["tile_count"] == 7
            assert len(index.search(keep[0], 100, CK)) == 7
        else:
            assert rasters["keep.tif"]["tile_count"] == 20
            assert index.search(keep[3], 1, CK)[0].col == 3 * 256
        referenced = sorted(r["embeddings_file"] for r in rasters.values())
        assert embedding_files(directory) == referenced  # no orphans, no temp files
        # a file renamed just before the kill, or a replaced raster's old one, was noted disposable
        # by the database: deleted, not set aside for the operator
        assert unused_files(directory) == []
        tiles = index._reader().execute("SELECT COUNT(*) FROM tiles").fetchone()[0]
        assert tiles == sum(r["tile_count"] for r in rasters.values())


def test_open_drops_rows_whose_file_is_missing_or_malformed(tmp_path, rng, caplog):
    directory = tmp_path / "idx"
    with TileIndex(directory) as index:
        a = add(index, tmp_path, "a", unit(rng, 10))
        b = add(index, tmp_path, "b", unit(rng, 10))
        keep = unit(rng, 10)
        add(index, tmp_path, "c", keep)
        files = {r["id"]: directory / "embeddings" / r["embeddings_file"] for r in index.list_rasters()}
    files[a].unlink()
    np.save(files[b], np.zeros((3, DIM), np.float16))  # wrong shape
    (directory / "embeddings" / "stray.npy").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger="backend.index"), TileIndex(directory) as index:
        assert [Path(r["path"]).name for r in index.list_rasters()] == ["c.tif"]
        assert index.search(keep[2], 1, CK)[0].col == 2 * 256
        assert index._reader().execute("SELECT COUNT(*) FROM tiles").fetchone()[0] == 10
        assert len(embedding_files(directory)) == 1
    # files no row refers to are set aside, not deleted: the database may not be the one they belong to
    assert unused_files(directory) == sorted(["stray.npy", files[b].name])
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "a.tif" in warnings and "b.tif" in warnings and "re-index" in warnings
    assert "2 embedding file(s) that no indexed raster uses are kept in" in warnings


@pytest.mark.parametrize("how", ["moved_aside", "emptied"])
def test_a_database_moved_aside_or_emptied_loses_no_embedding_file(tmp_path, rng, how):
    """A damaged database's message says to move it aside: the new index that starts then sets the
    old files aside (it has no row for them), and they come back, searchable, when it is put back."""
    directory = tmp_path / "idx"
    emb = unit(rng, 10)
    with TileIndex(directory) as index:
        add(index, tmp_path, "a", emb)
        add(index, tmp_path, "b", unit(rng, 10))
    files = embedding_files(directory)
    db = directory / "index.sqlite3"
    for extra in ("-wal", "-shm"):
        Path(str(db) + extra).unlink(missing_ok=True)
    os.replace(db, tmp_path / "kept.sqlite3")
    if how == "emptied":
        db.write_bytes(b"")             # a restore cut short
    with TileIndex(directory) as index:
        assert index.list_rasters() == []
    assert embedding_files(directory) == [] and unused_files(directory) == files
    db.unlink()
    os.replace(tmp_path / "kept.sqlite3", db)
    with TileIndex(directory) as index:
        assert sorted(Path(r["path"]).name for r in index.list_rasters()) == ["a.tif", "b.tif"]
        assert index.search(emb[4], 1, CK)[0].col == 4 * 256
    assert embedding_files(directory) == files and unused_files(directory) == []


def test_an_index_whose_embeddings_folder_is_gone_is_refused_not_emptied(tmp_path, rng):
    """embeddings/ moved, renamed or not yet copied back: every row's file missing at once is not
    files lost one by one; the open is refused, and the rows are all kept for when it is back."""
    directory = tmp_path / "idx"
    emb = unit(rng, 10)
    with TileIndex(directory) as index:
        add(index, tmp_path, "a", emb)
    os.replace(directory / "embeddings", tmp_path / "elsewhere")
    with pytest.raises(TileIndexError, match=r"none of the embedding files of the 1 indexed rasters is in .*put it "
                                             r"back and start again \(nothing was changed\)"):
        TileIndex(directory)
    assert not (directory / "embeddings").exists()
    os.replace(tmp_path / "elsewhere", directory / "embeddings")
    with TileIndex(directory) as index:
        assert index.search(emb[2], 1, CK)[0].col == 2 * 256
    # two rasters, embeddings/ there but empty (a copy not finished): refused too
    with TileIndex(directory) as index:
        add(index, tmp_path, "b", unit(rng, 10))
    aside = tmp_path / "aside"
    aside.mkdir()
    for f in embedding_files(directory):
        os.replace(directory / "embeddings" / f, aside / f)
    with pytest.raises(TileIndexError, match="none of the embedding files of the 2 indexed rasters"):
        TileIndex(directory)
    for f in os.listdir(aside):
        os.replace(aside / f, directory / "embeddings" / f)
    with TileIndex(directory) as index:
        assert len(index.list_rasters()) == 2


def test_leftovers_that_cannot_be_deleted_do_not_stop_the_index_opening(tmp_path, rng, caplog):
    directory = tmp_path / "idx"
    with TileIndex(directory) as index:
        add(index, tmp_path, "a", unit(rng, 10))
    (directory / "embeddings" / "a_folder.npy").mkdir()
    (directory / "embeddings" / ".tmp-left").mkdir()
    with caplog.at_level(logging.WARNING, logger="backend.index"), TileIndex(directory) as index:
        assert len(index.list_rasters()) == 1
    assert (directory / "embeddings" / "a_folder.npy").is_dir()


def test_an_index_that_cannot_be_locked_or_written_is_refused_at_open(tmp_path, monkeypatch):
    """A file system without locks (NFS without its lock service) and an embeddings folder the
    server cannot write in are said when the index opens, not as a traceback or by each indexing.
    Both are raised by replacing one call: the tests run as root, whom chmod does not stop."""
    def no_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")
    with monkeypatch.context() as m:
        m.setattr(index_module.fcntl, "flock", no_locks)
        with pytest.raises(TileIndexError, match=r"cannot be locked \(No locks available\).*on a local disk"):
            TileIndex(tmp_path / "nolock")
    real_touch = Path.touch

    def read_only(self, *a, **kw):
        if self.parent.name == "embeddings":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_touch(self, *a, **kw)
    with monkeypatch.context() as m:
        m.setattr(Path, "touch", read_only)
        with pytest.raises(TileIndexError, match=r"cannot write in .*embeddings \(Permission denied\): give the "):
            TileIndex(tmp_path / "ro")
    with TileIndex(tmp_path / "ro") as index:       # the refusal left it usable
        assert index.list_rasters() == []


def test_a_raster_whose_embeddings_were_overwritten_is_named_not_scored_nan(tmp_path, rng):
    directory = tmp_path / "idx"
    keep = unit(rng, 10)
    with TileIndex(directory) as index:
        a = add(index, tmp_path, "a", keep)
        b = add(index, tmp_path, "b", unit(rng, 10))
        path = directory / "embeddings" / index.raster(b)["embeddings_file"]
    data = bytearray(path.read_bytes())
    data[-40:] = b"\xff" * 40              # float16 NaNs where embeddings were, the size unchanged
    path.write_bytes(bytes(data))
    with TileIndex(directory) as index:
        hits = index.search(keep[1], 20, CK)
        assert {h.raster_id for h in hits} == {a} and all(np.isfinite(h.score) for h in hits)
        skipped = index.unsearchable_rasters(CK)
        assert [(s["id"], Path(s["path"]).name) for s in skipped] == [(b, "b.tif")]
        assert "damaged: re-index it" in skipped[0]["reason"]
        with pytest.raises(TileIndexError, match=r"b\.tif.*cannot be searched: its embedding file is damaged"):
            index.search(keep[1], 5, CK, raster_ids=[b])


@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "Permission denied"),
                                   OSError(errno.EIO, "Input/output error"),
                                   OSError(errno.EMFILE, "Too many open files")])
def test_open_keeps_a_raster_whose_file_cannot_be_read_for_another_reason(tmp_path, rng, monkeypatch, caplog, error):
    """Only a missing or malformed matrix drops its raster: one that cannot be read for another reason
    (permissions, an I/O error, too many open files) may be intact, so its row and file survive the
    open, searches report it unavailable, and once it can be read it is searched again.

    The tests run as root, where chmod 000 does not stop a read, so the failure is raised by replacing
    the module's _read_matrix for that one file: the only honest way to get EACCES here."""
    directory = tmp_path / "idx"
    emb_a, emb_b = unit(rng, 10), unit(rng, 10)
    with TileIndex(directory) as index:
        a, b = add(index, tmp_path, "a", emb_a), add(index, tmp_path, "b", emb_b)
        file_a = directory / "embeddings" / index.raster(a)["embeddings_file"]
    before = embedding_files(directory)
    read_matrix = index_module._read_matrix

    def unreadable_a(path):
        if Path(path) == file_a:
            raise type(error)(error.errno, error.strerror, str(path))
        return read_matrix(path)

    monkeypatch.setattr(index_module, "_read_matrix", unreadable_a)
    with caplog.at_level(logging.WARNING, logger="backend.index"), TileIndex(directory) as index:
        assert [r["id"] for r in index.list_rasters()] == [a, b]
        assert {h.raster_id for h in index.search(emb_a[3], 5, CK)} == {b}
        with pytest.raises(TileIndexError) as e:
            index.search(emb_a[3], 5, CK, raster_ids=[a])
        assert e.value.kind == "unavailable" and "readable" in str(e.value)
    assert embedding_files(directory) == before
    logged = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert file_a.name in logged and error.strerror in logged and "dropping" not in logged

    monkeypatch.undo()                                   # readable again
    with TileIndex(directory) as index:
        hits = index.search(emb_a[3], 1, CK)
        assert hits[0].raster_id == a and hits[0].col == 3 * 256
        assert index._reader().execute("SELECT COUNT(*) FROM tiles").fetchone()[0] == 20
    assert embedding_files(directory) == before


def test_concurrent_readers_never_see_a_partial_raster(tmp_path, rng):
    with TileIndex(tmp_path / "idx") as index:
        add(index, tmp_path, "base", unit(rng, 200))
        query = unit(rng, 1)[0]
        seen, errors, stop = [], [], threading.Event()

        def reader():
            try:
                while not stop.is_set():
                    hits = index.search(query, 5000, CK)
                    new = sorted(h.tile_id for h in hits if h.raster_name == "new.tif")
                    seen.append(len(new))
                    # all tiles of one version of the raster: one contiguous id range
                    assert new == list(range(new[0], new[0] + len(new))) if new else True
                    assert len(hits) == 200 + len(new)
            except Exception as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        for version, n in ((1, 600), (2, 900)):
            with index.writer(ident(tmp_path, "new", mtime_ns=version), CK, {}, meta("new"), DIM) as w:
                tiles = make_tiles(n)
                for s in range(0, n, 100):
                    w.add(tiles[s:s + 100], unit(rng, 100))
                    time.sleep(0.01)
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors
        assert set(seen) <= {0, 600, 900} and 900 in seen


def clustered(rng, n, dim, centers, noise):
    c = unit(rng, centers, dim)
    x = c[rng.integers(0, centers, n)] + noise / np.sqrt(dim) * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ann_recall_at_10_against_exact_on_clustered_data(tmp_path):
    rng = np.random.default_rng(0)
    data = clustered(rng, 20_500, 64, centers=500, noise=0.9)
    vectors, queries = data[:20_000], data[20_000:]  # queries: fresh draws from the same mixture
    with TileIndex(tmp_path / "idx", ann_threshold=6_000) as index:
        ids = [add(index, tmp_path, f"r{i}", vectors[i * 5000:(i + 1) * 5000]) for i in range(4)]
        recalls = []
        for q in queries:
            exact = index.search(q, 10, CK)
            approx = index.search(q, 10, CK, exact=False)
            assert approx.approximate and not exact.approximate and approx.tiles_searched < 20_000
            recalls.append(len({h.tile_id for h in exact} & {h.tile_id for h in approx}) / 10)
            assert [h.score for h in approx] == sorted((h.score for h in approx), reverse=True)
        recall = float(np.mean(recalls))
        print(f"IVF recall@10 vs exact: {recall:.3f} (nprobe={index.nprobe}, 20k x 64 clustered)")
        assert recall >= 0.9, f"recall@10 {recall:.3f} at nprobe={index.nprobe}"

        # filters still hold; below the threshold exact search answers
        subset = index.search(queries[0], 10, CK, raster_ids=ids[:2], exact=False)
        assert {h.raster_id for h in subset} <= set(ids[:2]) and subset.approximate
        small = index.search(queries[0], 10, CK, raster_ids=ids[:1], exact=False)
        assert not small.approximate and {h.raster_id for h in small} == {ids[0]}
        # query expansion ranks both times through the inverted file, within the filter
        expanded = index.search(queries[0], 10, CK, raster_ids=ids[:2], exact=False, expand=3)
        assert expanded.approximate and {h.raster_id for h in expanded} <= set(ids[:2])
        assert [h.score for h in expanded] == sorted((h.score for h in expanded), reverse=True)
        assert [h.tile_id for h in expanded] != [h.tile_id for h in subset]

        # a new raster is found by the approximate search without retraining
        extra = clustered(rng, 100, 64, centers=1, noise=0.3)
        new_id = add(index, tmp_path, "new", extra)
        assert index.search(extra[0], 1, CK, exact=False)[0].raster_id == new_id


def around_axis(rng, n, axis, dim=DIM):
    """Unit vectors in 50 clusters near one coordinate axis: one region of the sphere."""
    centres = np.eye(dim, dtype=np.float32)[axis] + 0.5 * unit(rng, 50, dim)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, 50, n)] + 0.3 / np.sqrt(dim) * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_quantiser_is_retrained_when_most_tiles_are_new_though_their_count_is_the_same(tmp_path):
    """Replacing every raster with other content keeps the tile count, but the old centroids describe
    data that is gone: most new tiles fall in a few lists and an approximate search scans a large
    part of the index. Fewer than half of the tiles known at training time retrains the quantiser;
    an unchanged index, or one raster of four replaced, keeps it."""
    rng = np.random.default_rng(0)
    with TileIndex(tmp_path / "idx", ann_threshold=1000, nprobe=2) as index:
        for i in range(4):
            add(index, tmp_path, f"r{i}", around_axis(rng, 1000, axis=0))
        assert index.search(around_axis(rng, 1, axis=0)[0], 10, CK, exact=False).approximate
        trained = index._quantisers[CK]
        index.search(around_axis(rng, 1, axis=0)[0], 10, CK, exact=False)
        assert index._quantisers[CK] is trained                    # unchanged: not trained again

        add(index, tmp_path, "r0", around_axis(rng, 1000, axis=1), mtime_ns=2)
        index.search(around_axis(rng, 1, axis=1)[0], 10, CK, exact=False)
        assert index._quantisers[CK] is trained                    # 3 of 4 rasters still known

        for i in range(1, 4):
            add(index, tmp_path, f"r{i}", around_axis(rng, 1000, axis=1), mtime_ns=2)
        assert index.stats(CK)["tiles"] == 4000
        scanned = [index.search(q, 10, CK, exact=False).tiles_searched for q in around_axis(rng, 50, axis=1)]
        assert index._quantisers[CK] is not trained
        assert np.mean(scanned) < 400, f"an approximate search scans {np.mean(scanned):.0f} of 4000 tiles"


@pytest.mark.parametrize("n,k", [(10, 3), (5000, 10), (100_000, 7), (100_000, 64), (3000, 3000)])
def test_top_k_matches_a_full_sort(n, k):
    scores = np.random.default_rng(n + k).standard_normal(n).astype(np.float32)
    scores[::17] = -np.inf  # filtered-out tiles
    k = min(k, int(np.isfinite(scores).sum()))
    assert np.array_equal(_top_k(scores, k), np.argsort(-scores, kind="stable")[:k])


def test_index_benchmark_smoke_writes_results(tmp_path):
    from bench import index_bench

    res = index_bench.run(sizes=(3000,), dim=32, out_dir=tmp_path, queries=5, warmup=1, echo=lambda *a, **k: None)
    (size,) = res["sizes"]
    assert size["skyprompt_search"]["p50_ms"] > 0 and size["skyprompt_rank"]["p50_ms"] > 0
    assert size["skyprompt_search_expanded"]["p50_ms"] > 0 and "expand 3 p50" in index_bench.report(res)
    assert 0 <= size["skyprompt_ivf"]["recall_at_10"] <= 1
    assert size["faiss_flat"] == "N/A" or size["faiss_flat"]["p50_ms"] > 0
    assert {t["result"] for t in res["targets"]} <= {"PASS", "FAIL", "N/A"}
    assert (tmp_path / "index.json").exists()


def test_a_folder_the_index_cannot_write_is_one_clear_error(tmp_path):
    """A data folder that cannot be written (read-only disk, another user's folder) is a TileIndexError
    naming it, not an OSError traceback; here the lock file cannot be opened for writing."""
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "index.lock").mkdir()           # opening it for writing fails, as on a read-only disk
    with pytest.raises(TileIndexError, match="cannot use .* for the tile index: .*give a writable folder"):
        TileIndex(tmp_path)


def test_a_sound_database_that_cannot_be_opened_for_writing_is_not_called_damaged(tmp_path, rng):
    """SQLite cannot open a good index for writing (here its WAL file cannot be made, as on a
    read-only disk): the message must not tell the operator to move a sound index aside."""
    with TileIndex(tmp_path) as index:
        add(index, tmp_path, "a", unit(rng, 5))
    db = tmp_path / index_module.DB_NAME
    before = db.read_bytes()
    (tmp_path / f"{index_module.DB_NAME}-wal").mkdir()
    with pytest.raises(TileIndexError) as error:
        TileIndex(tmp_path)
    assert "write access" in str(error.value) and "damaged" not in str(error.value)
    assert db.read_bytes() == before


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs: a disk that really fills up (root only)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_resource_exhausted_and_changes_nothing(tiny_disk, tmp_path, rng):
    index = TileIndex(tiny_disk / "index")
    try:
        first = unit(rng, 20)
        add(index, tmp_path, "a", first)
        filler = tiny_disk / "filler"
        with open(filler, "wb", buffering=0) as f:     # fill the disk to the last byte
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
        with pytest.raises(TileIndexError, match="disk holding the tile index .* is full") as error:
            add(index, tmp_path, "a", unit(rng, 3000), mtime_ns=2)     # a re-index that does not fit
        assert error.value.kind == "resource_exhausted"
        assert not list((tiny_disk / "index" / "embeddings").glob(".tmp-*"))   # no partial file left behind
        assert [r["tile_count"] for r in index.list_rasters()] == [20]       # the old embeddings stay
        assert index.search(first[0], 1, CK)[0].score > 0.99
        filler.unlink()
        add(index, tmp_path, "b", unit(rng, 5))                               # room again: it works
    finally:
        index.close()


def test_counts_are_those_of_stats_without_reading_the_embedding_files(tmp_path, rng):
    """The server's start-up log counts rasters per checkpoint: a query, not a walk of every embedding file."""
    with TileIndex(tmp_path / "idx") as index:
        add(index, tmp_path, "a", unit(rng, 20), checkpoint="ckpt-a")
        add(index, tmp_path, "b", unit(rng, 7, dim=64), checkpoint="ckpt-b")
        for checkpoint in ("ckpt-a", "ckpt-b", None):
            stats = index.stats(checkpoint)
            assert index.counts(checkpoint) == {"rasters": stats["rasters"], "tiles": stats["tiles"]}
        assert index.counts() == {"rasters": 2, "tiles": 27} and index.counts("never") == {"rasters": 0, "tiles": 0}
        index.embeddings_dir.rename(tmp_path / "moved")       # stats would need these files; counts does not
        assert index.counts("ckpt-a") == {"rasters": 1, "tiles": 20}
        (tmp_path / "moved").rename(index.embeddings_dir)
