"""Raster access and tiling (backend.raster) on real GDAL rasters.

The shared GeoTIFFs (../shared/data/geotiff) cover four CRSs, a 4-band NAIP image, an alpha
orthophoto and a non-RGB Landsat band order; those tests skip where that folder is absent. The
rest build their rasters in tmp_path with GDAL's GTiff driver.
"""
from __future__ import annotations

import gc
import math
import os
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import shapely
from osgeo import gdal, osr

from backend.raster import (
    BandMapping, Raster, RasterError, Tile, open_raster, parse_crs, raster_from_pixels, transform_bounds,
)

GEOTIFF_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "geotiff"

# authid and a generous lon/lat box where each shared raster must lie.
SHARED = {
    "naip_m_4709963_se_14_2009.tif": ("EPSG:26914", (-100.0, 46.0, -98.0, 48.0)),
    "naip_m_4709963_se_14_2020.tif": ("EPSG:26914", (-100.0, 46.0, -98.0, 48.0)),
    "pix4d_orthophoto_alpha.tif": ("EPSG:32750", (114.0, -10.0, 117.0, -7.0)),
    "colorado_aerial_0p15m.tif": ("EPSG:26913", (-106.0, 38.0, -104.0, 40.0)),
    "landsat_pucallpa_2020.tif": ("EPSG:4326", (-76.0, -10.0, -73.0, -7.0)),
}
SHARED_FILES = sorted(p.name for p in GEOTIFF_DIR.glob("*.tif")) if GEOTIFF_DIR.is_dir() else []
needs_shared = pytest.mark.skipif(not SHARED_FILES, reason=f"shared rasters not found in {GEOTIFF_DIR}")

UTM = "EPSG:32633"


def shared(name: str) -> Path:
    path = GEOTIFF_DIR / name
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path


def make_tif(path: Path, bands: np.ndarray, geotransform=(500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0),
             crs: str | None = UTM, nodata=None, colours=None, options=()) -> Path:
    """Write a GeoTIFF from a (bands, rows, cols) array."""
    bands = np.asarray(bands)
    if bands.ndim == 2:
        bands = bands[None]
    gdal_type = {np.uint8: gdal.GDT_Byte, np.uint16: gdal.GDT_UInt16, np.int16: gdal.GDT_Int16,
                 np.float32: gdal.GDT_Float32, np.float64: gdal.GDT_Float64}[bands.dtype.type]
    count, rows, cols = bands.shape
    ds = gdal.GetDriverByName("GTiff").Create(str(path), cols, rows, count, gdal_type, list(options))
    if geotransform is not None:
        ds.SetGeoTransform(geotransform)
    if crs is not None:
        srs = osr.SpatialReference()
        srs.SetFromUserInput(crs)
        ds.SetSpatialRef(srs)
    for i in range(count):
        band = ds.GetRasterBand(i + 1)
        band.WriteArray(bands[i])
        if nodata is not None:
            band.SetNoDataValue(nodata)
        if colours is not None:
            band.SetColorInterpretation(colours[i])
    ds.FlushCache()
    ds = None
    return path


@pytest.fixture(autouse=True)
def free_gdal_objects_before_the_session_ends():
    """A caught error's traceback holds the frames it passed through, and pytest.raises' record of it
    makes a reference cycle: the GDAL datasets in those frames wait for the garbage collector. Freed
    after pytest-qgis has shut QGIS (and GDAL's drivers) down at the session's end, they crash the
    interpreter; collect them after each test instead."""
    yield
    gc.collect()


def noise(shape, dtype=np.uint8, low=1, high=255, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, shape).astype(dtype)


def alpha_fraction(alpha: np.ndarray, tile: Tile) -> float:
    return float((alpha[tile.row:tile.row + tile.height, tile.col:tile.col + tile.width] > 0).mean())


# ---------------------------------------------------------------------------------------------
# The shared GeoTIFFs
# ---------------------------------------------------------------------------------------------

@needs_shared
@pytest.mark.parametrize("name", SHARED_FILES or ["none"])
def test_shared_raster_opens_in_its_crs_and_covers_it_with_tiles(name):
    with open_raster(shared(name)) as raster:
        assert raster.width > 0 and raster.height > 0 and raster.band_count >= 3
        assert raster.data_type == "Byte"
        if name in SHARED:
            authid, (lon0, lat0, lon1, lat1) = SHARED[name]
            assert raster.crs_authid == authid
        else:
            assert raster.crs_authid.startswith("EPSG:")
            lon0, lat0, lon1, lat1 = -180.0, -90.0, 180.0, 90.0
        west, south, east, north = raster.bounds_wgs84
        assert lon0 <= west < east <= lon1 and lat0 <= south < north <= lat1
        assert -180 <= west <= 180 and -90 <= south <= 90
        assert raster.crs_wkt.startswith(("PROJCRS", "GEOGCRS"))
        xmin, ymin, xmax, ymax = raster.bounds
        assert xmax - xmin == pytest.approx(raster.width * raster.pixel_size[0])
        assert ymax - ymin == pytest.approx(raster.height * raster.pixel_size[1])

        tiles = raster.tiles(min_valid_fraction=0)
        assert len(tiles) == raster.count_tiles()
        covered = np.zeros((raster.height, raster.width), bool)
        for tile in tiles:
            assert (tile.width, tile.height) == (min(224, raster.width), min(224, raster.height))
            covered[tile.row:tile.row + tile.height, tile.col:tile.col + tile.width] = True
        assert covered.all()
        assert [t.index for t in tiles] == list(range(len(tiles)))

        last = tiles[-1]
        footprint = shapely.from_wkt(last.footprint_wkt)
        assert footprint.is_valid and footprint.bounds == pytest.approx(last.bounds)
        assert footprint.area == pytest.approx(last.width * last.height * raster.pixel_size[0] * raster.pixel_size[1])
        on_globe = shapely.from_wkt(last.footprint_wgs84_wkt)
        assert on_globe.is_valid and on_globe.bounds == pytest.approx(last.bounds_wgs84)
        assert shapely.box(*raster.bounds_wgs84).buffer(1e-9).contains(on_globe)

        tile, rgb, valid = next(raster.iter_tiles_with_pixels(min_valid_fraction=0))
        assert rgb.shape[0] == 3 and rgb.dtype == np.uint8 and valid.dtype == bool
        assert rgb.shape[1:] == valid.shape == (224, 224)


@needs_shared
def test_naip_four_bands_use_the_first_three_and_pass_bytes_through():
    path = shared("naip_m_4709963_se_14_2020.tif")
    with open_raster(path) as raster:
        assert raster.band_count == 4 and raster.rgb_bands == (1, 2, 3)
        assert raster.stretch_ranges() == (None, None, None)
        rgb, valid = raster.read_window(100, 50, 64, 32)
    ds = gdal.Open(str(path))
    expected = ds.ReadAsArray(100, 50, 64, 32, band_list=[1, 2, 3])
    assert valid.all()
    np.testing.assert_array_equal(rgb, expected)


@needs_shared
def test_colour_interpretation_chooses_rgb(tmp_path):
    with open_raster(shared("colorado_aerial_0p15m.tif")) as raster:
        assert raster.rgb_bands == (1, 2, 3)
    # Stored blue, green, red, then an infrared band: colour interpretation wins over band order.
    data = np.stack([np.full((8, 8), v, np.uint8) for v in (30, 20, 10, 40)])
    colours = [gdal.GCI_BlueBand, gdal.GCI_GreenBand, gdal.GCI_RedBand, gdal.GCI_Undefined]
    with open_raster(make_tif(tmp_path / "bgr.tif", data, colours=colours)) as raster:
        assert raster.rgb_bands == (3, 2, 1)
        rgb, _ = raster.read_window(0, 0, 8, 8)
        assert rgb[:, 0, 0].tolist() == [10, 20, 30]


def test_colour_bands_guessed_from_four_unmarked_bands_are_named_in_a_note(tmp_path):
    """Blue, green, red and infrared stored with no colour marks: the first three are read as red,
    green, blue, and the raster says so, so a user can give the bands; given bands, or marked
    colours, or no more than three colour bands to choose from, leave nothing to say."""
    data = np.stack([np.full((8, 8), v, np.uint8) for v in (30, 20, 10, 40)])
    plain = ["PHOTOMETRIC=MINISBLACK"]        # else GeoTIFF marks 3 or 4 bytes a pixel as RGB(A)
    unmarked = make_tif(tmp_path / "bgrn.tif", data, options=plain)
    with open_raster(unmarked) as raster:
        assert raster.rgb_bands == (1, 2, 3)
        assert "4 bands" in raster.band_note and "bands 1, 2, 3 were read as red, green, blue" in raster.band_note
        assert "bgrn.tif" in raster.band_note
    with open_raster(unmarked, bands=BandMapping(red=3, green=2, blue=1)) as raster:
        assert raster.rgb_bands == (3, 2, 1) and raster.band_note == ""
        assert raster.read_window(0, 0, 8, 8)[0][:, 0, 0].tolist() == [10, 20, 30]
    with open_raster(unmarked, bands=BandMapping(red=3)) as raster:       # green and blue still guessed
        assert raster.rgb_bands == (3, 2, 3) and "bands 3, 2, 3 were read" in raster.band_note
    marked = [gdal.GCI_BlueBand, gdal.GCI_GreenBand, gdal.GCI_RedBand, gdal.GCI_Undefined]
    with open_raster(make_tif(tmp_path / "marked.tif", data, colours=marked)) as raster:
        assert raster.band_note == ""
    with_alpha = [gdal.GCI_Undefined, gdal.GCI_Undefined, gdal.GCI_Undefined, gdal.GCI_AlphaBand]
    with open_raster(make_tif(tmp_path / "alpha.tif", data, colours=with_alpha, options=plain)) as raster:
        assert raster.rgb_bands == (1, 2, 3) and raster.band_note == ""
    with open_raster(make_tif(tmp_path / "three.tif", data[:3], options=plain)) as raster:
        assert raster.band_note == ""
    # two unmarked bands: band 1 shown as grey, band 2 dropped without a word before
    with open_raster(make_tif(tmp_path / "two.tif", data[:2], options=plain)) as raster:
        assert raster.rgb_bands == (1, 1, 1) and "2 bands" in raster.band_note and "band 2 is not used" in raster.band_note
    with open_raster(make_tif(tmp_path / "two.tif", data[:2], options=plain), bands=BandMapping(2, 2, 2)) as raster:
        assert raster.rgb_bands == (2, 2, 2) and raster.band_note == ""
    alpha_first = make_tif(tmp_path / "alpha_first.tif", data[:3], options=plain,
                           colours=[gdal.GCI_AlphaBand, gdal.GCI_Undefined, gdal.GCI_Undefined])
    with open_raster(alpha_first) as raster:        # the two others named, not "band 1" (the alpha)
        assert raster.rgb_bands == (2, 2, 2) and "band 2 was read as grey and band 3 is not used" in raster.band_note
        assert "besides its alpha band 1" in raster.band_note and "--bands 3 3 3" in raster.band_note
    grey_alpha = make_tif(tmp_path / "grey_alpha.tif", data[:2], colours=[gdal.GCI_GrayIndex, gdal.GCI_AlphaBand])
    with open_raster(grey_alpha) as raster:
        assert raster.band_note == ""


@needs_shared
@pytest.mark.parametrize("index_type", [gdal.GDT_Byte, gdal.GDT_UInt16], ids=["byte", "uint16"])
def test_a_colour_table_image_is_read_as_its_colours(tmp_path, index_type):
    path = tmp_path / "classes.tif"
    ds = gdal.GetDriverByName("GTiff").Create(str(path), 4, 1, 1, index_type)
    ds.SetGeoTransform((500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    ds.SetSpatialRef(srs)
    table = gdal.ColorTable()
    palette = [(0, 0, 255), (0, 160, 0), (128, 128, 128), (255, 0, 0)]
    for i, rgb in enumerate(palette):
        table.SetColorEntry(i, (*rgb, 255))
    band = ds.GetRasterBand(1)
    band.SetColorTable(table)
    band.SetColorInterpretation(gdal.GCI_PaletteIndex)
    band.WriteArray(np.array([[0, 1, 2, 3]], np.uint8))
    ds = None
    with open_raster(path) as raster:
        rgb, valid = raster.read_window(0, 0, 4, 1)
    assert valid.all()
    # the colours, not 0..3, and not stretched as 16-bit data
    assert [tuple(int(v) for v in rgb[:, 0, i]) for i in range(4)] == palette


def test_wide_integers_far_from_zero_keep_their_levels_in_the_stretch(tmp_path):
    # 256 levels at 1e8: float32 has a step of 8 there, float64 keeps all of them
    data = (1e8 + np.broadcast_to(np.arange(256, dtype=np.float64), (3, 4, 256))).copy()
    path = make_tif(tmp_path / "f64.tif", data)
    with open_raster(path, bands=BandMapping(stretch_low=0, stretch_high=100)) as raster:
        rgb, _ = raster.read_window(0, 0, 256, 4)
    assert len(np.unique(rgb[0, 0])) == 256


def test_pix4d_alpha_marks_empty_corners_invalid_and_skips_mostly_empty_tiles():
    path = shared("pix4d_orthophoto_alpha.tif")
    ds = gdal.Open(str(path))
    alpha = ds.GetRasterBand(4).ReadAsArray()
    assert not alpha[0, 0] and not alpha[-1, -1]
    with open_raster(path) as raster:
        assert raster.rgb_bands == (1, 2, 3)          # the alpha band is never a colour
        assert raster.mask_kind == "dataset"
        rgb, valid = raster.read_window(0, 0, raster.width, raster.height, out_size=(200, 221))
        assert not valid[0, 0] and not valid[-1, -1] and not valid[0, -1] and not valid[-1, 0]
        assert valid[110, 100]
        assert (rgb[:, ~valid] == 0).all()

        every = raster.tiles(tile_size=128, min_valid_fraction=0)
        kept = raster.tiles(tile_size=128)
        mostly_empty = {t.index for t in every if alpha_fraction(alpha, t) < 0.5}
        assert mostly_empty, "the corners should leave some 128-pixel tiles mostly empty"
        assert {t.index for t in kept} == {t.index for t in every} - mostly_empty

        read = list(raster.iter_tiles_with_pixels(tile_size=128))
        assert [t.index for t, _, _ in read] == [t.index for t in kept]
        corner_tile, corner_rgb, corner_valid = read[0]
        assert corner_tile.index == 0 and not corner_valid[0, 0] and (corner_rgb[:, 0, 0] == 0).all()
        assert corner_valid.mean() == pytest.approx(alpha_fraction(alpha, corner_tile), abs=0.02)


@needs_shared
def test_landsat_band_order_is_mapped_explicitly():
    path = shared("landsat_pucallpa_2020.tif")   # bands: SWIR1, NIR, Red, Green
    false_colour = BandMapping(red=2, green=3, blue=4)   # NIR, Red, Green
    with open_raster(path, bands=false_colour) as raster:
        assert raster.crs_authid == "EPSG:4326"
        assert raster.rgb_bands == (2, 3, 4)
        rgb, valid = raster.read_window(0, 0, raster.width, raster.height)
    ds = gdal.Open(str(path))
    nir, red, green = ds.ReadAsArray(band_list=[2, 3, 4])
    np.testing.assert_array_equal(valid, (nir != 0) | (red != 0) | (green != 0))
    np.testing.assert_array_equal(rgb[0][valid], nir[valid])
    np.testing.assert_array_equal(rgb[2][valid], green[valid])

    with pytest.raises(RasterError) as error:
        open_raster(path, bands=BandMapping(red=2, green=5, blue=4))
    assert error.value.kind == "invalid_argument"
    assert "green=5" in str(error.value) and "4 band" in str(error.value)


# ---------------------------------------------------------------------------------------------
# Band choice, scaling, masks
# ---------------------------------------------------------------------------------------------

def test_one_band_byte_becomes_three_grey_channels(tmp_path):
    data = noise((40, 50))
    with open_raster(make_tif(tmp_path / "grey.tif", data)) as raster:
        assert raster.rgb_bands == (1, 1, 1) and raster.mask_kind == "none"
        rgb, valid = raster.read_window(0, 0, 50, 40)
    assert valid.all()
    for channel in rgb:
        np.testing.assert_array_equal(channel, data)


def test_uint16_is_stretched_once_from_a_decimated_read(tmp_path, monkeypatch):
    # A gradient wider than the decimated read: the stretch must not read it at full size.
    cols = np.linspace(1000, 41000, 3000).astype(np.uint16)
    data = np.broadcast_to(cols, (3, 200, 3000)).copy()
    path = make_tif(tmp_path / "u16.tif", data, options=["TILED=YES"])
    reads = []
    original = gdal.Dataset.ReadAsArray

    def recording(self, *args, **kwargs):
        reads.append((args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(gdal.Dataset, "ReadAsArray", recording)
    with open_raster(path) as raster:
        assert raster.data_type == "UInt16"
        rgb, valid = raster.read_window(0, 0, 3000, 200, out_size=(600, 40))
        low, high = raster.stretch_ranges()[0]
        raster.read_window(0, 0, 100, 100)
        raster.read_window(100, 0, 100, 100)
    assert low == pytest.approx(1000 + 0.02 * 40000, rel=0.01)
    assert high == pytest.approx(1000 + 0.98 * 40000, rel=0.01)
    assert valid.all() and rgb.min() == 0 and rgb.max() == 255
    assert np.all(np.diff(rgb[0, 0].astype(int)) >= 0)      # a monotonic stretch
    stats_reads = [kw for _, kw in reads if kw.get("buf_xsize") and kw["buf_xsize"] <= 1024
                   and kw.get("resample_alg") == gdal.GRIORA_NearestNeighbour]
    assert len(stats_reads) == 1 and stats_reads[0]["buf_xsize"] == 1024
    assert len(reads) == 4   # one statistics read, three window reads


def test_stretch_percentiles_are_configurable_and_apply_to_bytes_when_set(tmp_path):
    data = np.tile(np.arange(100, 200, dtype=np.uint8), (10, 1))
    path = make_tif(tmp_path / "bytes.tif", data)
    with open_raster(path, bands=BandMapping(stretch_low=0, stretch_high=100)) as raster:
        assert raster.stretch_ranges()[0] == (100.0, 199.0)
        rgb, _ = raster.read_window(0, 0, 100, 10)
        assert rgb[0, 0, 0] == 0 and rgb[0, 0, -1] == 255
    with pytest.raises(RasterError, match="stretch_low=90.0 must be below stretch_high=10.0") as error:
        open_raster(path, bands=BandMapping(stretch_low=90.0, stretch_high=10.0))
    assert error.value.kind == "invalid_argument"


def test_nodata_is_honoured_only_where_every_colour_band_is_nodata(tmp_path):
    data = noise((3, 30, 30))
    data[:, :10, :] = 0                 # a no-data strip
    data[0, 20, 20] = 0                 # a dark red value in a real pixel
    with open_raster(make_tif(tmp_path / "nodata.tif", data, nodata=0)) as raster:
        assert raster.mask_kind == "nodata" and raster.nodata == [0.0, 0.0, 0.0]
        rgb, valid = raster.read_window(0, 0, 30, 30)
        assert not valid[:10].any() and valid[10:].all()
        assert (rgb[:, :10] == 0).all()
        assert rgb[:, 20, 20].tolist() == [0, data[1, 20, 20], data[2, 20, 20]]
        assert raster.tiles(tile_size=10, min_valid_fraction=0.5)[0].row == 10

    floats = noise((1, 20, 20), np.float32, 0, 1000)
    floats[0, :5] = np.nan
    with open_raster(make_tif(tmp_path / "float.tif", floats)) as raster:
        rgb, valid = raster.read_window(0, 0, 20, 20)
        assert not valid[:5].any() and valid[5:].all()
        assert rgb[:, 5:].max() == 255 and (rgb[:, :5] == 0).all()


def test_raster_without_georeferencing_is_refused(tmp_path):
    no_crs = make_tif(tmp_path / "no_crs.tif", noise((4, 4)), crs=None)
    with pytest.raises(RasterError, match="no CRS") as error:
        open_raster(no_crs)
    assert error.value.kind == "invalid_argument" and "gdal_edit" in str(error.value)
    # a JPEG with a world file: gdal_edit cannot open it for update, so a GeoTIFF copy is what works
    jpeg = tmp_path / "photo.jpg"
    gdal.GetDriverByName("JPEG").CreateCopy(str(jpeg), gdal.Open(str(no_crs)), options=["WORLDFILE=YES"])
    with pytest.raises(RasterError, match="no CRS") as error:
        open_raster(jpeg)
    assert "gdal_translate -a_srs" in str(error.value) and "gdal_edit" not in str(error.value)
    nothing = make_tif(tmp_path / "plain.tif", noise((4, 4)), geotransform=None, crs=None)
    with pytest.raises(RasterError, match="no georeferencing") as error:
        open_raster(nothing)
    assert error.value.kind == "invalid_argument"


# ---------------------------------------------------------------------------------------------
# Tiles
# ---------------------------------------------------------------------------------------------

def test_overlap_steps_the_grid_and_edge_tiles_shift_inward(tmp_path):
    with open_raster(make_tif(tmp_path / "grid.tif", np.zeros((1, 600, 1000), np.uint8) + 7)) as raster:
        def starts(overlap):
            tiles = raster.tiles(tile_size=200, overlap=overlap)
            return sorted({t.col for t in tiles}), sorted({t.row for t in tiles}), tiles

        cols, rows, tiles = starts(0.0)
        assert cols == [0, 200, 400, 600, 800] and rows == [0, 200, 400]
        cols, rows, tiles = starts(0.5)
        assert cols == list(range(0, 801, 100)) and rows == [0, 100, 200, 300, 400]
        cols, rows, tiles = starts(0.25)
        assert cols == [0, 150, 300, 450, 600, 750, 800] and rows == [0, 150, 300, 400]
        assert all((t.width, t.height) == (200, 200) for t in tiles)
        assert raster.count_tiles(tile_size=200, overlap=0.25) == len(tiles) == 28
        for bad in (-0.1, 0.9, 1.0):
            with pytest.raises(RasterError, match="overlap") as error:
                raster.tiles(tile_size=200, overlap=bad)
            assert error.value.kind == "invalid_argument"


def test_target_resolution_sets_the_native_window(tmp_path):
    # 10 m pixels: a 100-pixel tile at 20 m spans 200 native pixels, at 40 m 400.
    with open_raster(make_tif(tmp_path / "res.tif", noise((1, 800, 800)))) as raster:
        assert raster.pixel_size == (10.0, 10.0)
        assert raster.tiles(tile_size=100)[0].width == 100
        assert raster.tiles(tile_size=100, target_resolution=20)[0].width == 200
        assert raster.tiles(tile_size=100, target_resolution=40)[0].width == 400
        assert raster.count_tiles(tile_size=100, target_resolution=40) == 4
        tile, rgb, valid = next(raster.iter_tiles_with_pixels(tile_size=100, target_resolution=40))
        assert (tile.width, tile.height) == (400, 400) and rgb.shape == (3, 100, 100) and valid.all()
        with pytest.raises(RasterError, match="target_resolution"):
            raster.tiles(target_resolution=-5)


def test_a_target_resolution_in_the_wrong_units_is_refused_with_the_rasters_own(tmp_path):
    # about 30 m pixels in degrees (EPSG:4326): "30" meant as metres would be 30 degrees, one tile
    degrees = make_tif(tmp_path / "deg.tif", noise((3, 400, 600)), geotransform=(-74.6, 0.00027, 0, -8.3, 0, -0.00027),
                       crs="EPSG:4326")
    with open_raster(degrees) as raster:
        assert raster.map_units == "degrees"
        with pytest.raises(RasterError, match=r"30 degrees per pixel would show the whole raster \(0\.162 degrees "
                                              r"across\) in under 8 pixels") as error:
            raster.tiles(tile_size=128, target_resolution=30)
        assert error.value.kind == "invalid_argument" and "its own pixels are 0.00027 degrees" in str(error.value)
        with pytest.raises(RasterError, match="in under 8 pixels"):
            raster.read_extent(target_resolution=30)
        assert raster.count_tiles(tile_size=128, target_resolution=0.00054) == 6    # twice the pixel: fine
    # 10 m pixels in metres: 0.01 (centimetres meant as metres?) would make a thousand pixels of each
    with open_raster(make_tif(tmp_path / "m.tif", noise((3, 800, 800)))) as raster:
        assert raster.map_units == "metre"
        with pytest.raises(RasterError, match="would enlarge each of the raster's pixels 1,000 times"):
            raster.count_tiles(tile_size=128, target_resolution=0.01)
        assert raster.count_tiles(tile_size=128, target_resolution=0.5) > 0    # 20x: allowed


def test_raster_smaller_than_a_tile_gives_one_padded_tile(tmp_path):
    with open_raster(make_tif(tmp_path / "small.tif", noise((3, 60, 100)))) as raster:
        tiles = raster.tiles(tile_size=224)
        assert [(t.col, t.row, t.width, t.height) for t in tiles] == [(0, 0, 100, 60)]
        [(tile, rgb, valid)] = list(raster.iter_tiles_with_pixels(tile_size=224))
    assert rgb.shape == (3, 224, 224)
    assert valid[:60, :100].all() and not valid[60:].any() and not valid[:, 100:].any()


def test_extent_in_wgs84_over_a_utm_raster(tmp_path):
    with open_raster(make_tif(tmp_path / "utm.tif", noise((3, 1000, 1000)))) as raster:
        # The UTM box of pixels 200..400 (cols) and 300..500 (rows), sent in EPSG:4326.
        utm_box = (502000.0, 4995000.0, 504000.0, 4997000.0)
        lon_lat = transform_bounds(utm_box, UTM, "EPSG:4326")
        assert 14 < lon_lat[0] < lon_lat[2] < 16 and 45 < lon_lat[1] < lon_lat[3] < 46
        col, row, width, height = raster.window_for_extent((*lon_lat, "EPSG:4326"))
        # The reprojected box is a little larger than the original one, never smaller.
        assert 195 <= col <= 200 and 295 <= row <= 300
        assert 200 <= width <= 210 and 200 <= height <= 210
        assert raster.window_for_extent((*utm_box, "")) == (200, 300, 200, 200)

        rgb, valid, gt = raster.read_extent((*utm_box, UTM), target_resolution=20)
        assert rgb.shape == (3, 100, 100) and valid.all()
        assert gt == pytest.approx((502000.0, 20.0, 0.0, 4997000.0, 0.0, -20.0))
        rgb, valid, gt = raster.read_extent((*lon_lat, "EPSG:4326"), out_size=(64, 32))
        assert rgb.shape == (3, 32, 64)

        tiles = raster.tiles(tile_size=100, extent=(*utm_box, UTM))
        assert sorted({t.col for t in tiles}) == [200, 300] and sorted({t.row for t in tiles}) == [300, 400]
        # An extent smaller than one tile still gets one full tile around it.
        [tile] = raster.tiles(tile_size=100, extent=(502000.0, 4995000.0, 502100.0, 4995100.0))
        assert (tile.width, tile.height) == (100, 100) and tile.col <= 200 < tile.col + 100


def test_a_world_view_in_another_crs_is_clipped_to_the_raster_before_it_is_transformed(tmp_path):
    # a zoomed-out web-map view reaches where UTM zone 33 is undefined; only its part over the raster counts
    path = make_tif(tmp_path / "utm.tif", noise((3, 100, 100)))
    world = (-20037508.0, -15e6, 20037508.0, 15e6, "EPSG:3857")
    with open_raster(path) as raster:
        assert raster.window_for_extent(world) == (0, 0, 100, 100)
        polygon, exact = raster.extent_polygon(world)
        assert not exact and polygon.contains(shapely.box(*raster.bounds))


def _pixel_centres_in(raster, extent) -> np.ndarray:
    """Which pixel centres of the raster the extent's polygon (extent_polygon) holds, as a mask."""
    polygon, _ = raster.extent_polygon(extent)
    rows, cols = np.mgrid[0:raster.height, 0:raster.width] + 0.5
    gt = raster.geotransform
    return shapely.contains_xy(polygon, gt[0] + cols * gt[1], gt[3] + rows * gt[5])


def test_a_map_across_180_degrees_in_a_pacific_projection_is_placed_on_the_raster(tmp_path):
    """A longitude/latitude raster at 180 degrees (stored past it, 179.9 to 180.1, or before it,
    -180.1 to -179.9) on a Pacific Mercator map (EPSG:3832): the map's rectangle comes back from GDAL
    as a box across the antimeridian or one world away from the raster, and was refused or missed it."""
    to_pacific = osr.CoordinateTransformation(parse_crs("EPSG:4326"), parse_crs("EPSG:3832"))
    for west in (179.9, -180.1):
        path = make_tif(tmp_path / f"at_{west}.tif", noise((3, 400, 400)), crs="EPSG:4326",
                        geotransform=(west, 0.0005, 0.0, -16.0, 0.0, -0.0005))
        with open_raster(path) as raster:
            whole = (*to_pacific.TransformBounds(179.9, -16.2, 180.1, -16.0, 21), "EPSG:3832")
            assert raster.window_for_extent(whole) == (0, 0, 400, 400)
            assert _pixel_centres_in(raster, whole).all()
            # the map showing only the part east of 180 degrees: the raster's east half
            east = (*to_pacific.TransformBounds(180.0, -16.2, 180.2, -16.1, 21), "EPSG:3832")
            assert raster.window_for_extent(east) == (200, 200, 200, 200)
            inside = _pixel_centres_in(raster, east)
            assert inside[200:, 200:].all() and not inside[:, :199].any() and not inside[:199].any()
            # and only the part east of 180.05 degrees: GDAL's box, -179.95 to -179.9, one world away
            far_east = (*to_pacific.TransformBounds(180.05, -16.2, 180.2, -16.1, 21), "EPSG:3832")
            assert raster.window_for_extent(far_east)[0] == 300
            # a Web Mercator map zoomed out past one world shows all of it
            assert raster.window_for_extent((-2.5e7, -3e6, 2.5e7, 3e6, "EPSG:3857")) == (0, 0, 400, 400)
            beside = (*to_pacific.TransformBounds(181.0, -16.2, 181.2, -16.1, 21), "EPSG:3832")
            with pytest.raises(RasterError, match="does not overlap"):
                raster.window_for_extent(beside)


def test_a_whole_globe_orthographic_view_is_placed_on_the_raster_it_shows(tmp_path):
    """An orthographic map zoomed out to the whole globe: the view's corners lie off the globe, so
    GDAL gives no box for it in longitude/latitude. A raster in view is read where the globe shows
    it; one at the rim only as far as the rim; one on the hidden side is said not to be in the view."""
    facing_180 = "+proj=ortho +lat_0=-10 +lon_0=170 +R=6370997 +units=m +no_defs"
    facing_0 = "+proj=ortho +lat_0=0 +lon_0=0 +R=6370997 +units=m +no_defs"
    globe = (-1.5e7, -1.5e7, 1.5e7, 1.5e7)
    across = make_tif(tmp_path / "across.tif", noise((3, 400, 400)), crs="EPSG:4326",
                      geotransform=(179.9, 0.0005, 0.0, -16.0, 0.0, -0.0005))
    with open_raster(across) as raster:
        assert raster.window_for_extent((*globe, facing_180)) == (0, 0, 400, 400)
        assert _pixel_centres_in(raster, (*globe, facing_180)).all()
        with pytest.raises(RasterError, match="does not overlap .*no point of the raster lies in it"):
            raster.window_for_extent((*globe, facing_0))
    # 80 to 100 degrees east, seen from 0 degrees: the globe's rim is at 90 degrees
    rim = make_tif(tmp_path / "rim.tif", noise((3, 200, 200)), crs="EPSG:4326",
                   geotransform=(80.0, 0.1, 0.0, 10.0, 0.0, -0.1))
    with open_raster(rim) as raster:
        col, row, width, height = raster.window_for_extent((*globe, facing_0))
        assert (col, row, height) == (0, 0, 200) and 100 <= width <= 110


def test_a_world_raster_is_read_on_both_sides_of_180_degrees_and_only_where_the_globe_shows_it(tmp_path):
    """A longitude/latitude raster of the whole world (1-degree pixels): a Pacific view meets both
    of its ends (one of them was read); a band across an orthographic globe reaches the rim (GDAL's
    box of its part on the globe stopped at 61 degrees); a whole-globe view holds the visible
    hemisphere and not the hidden one (to a lattice cell of 1/64 of the raster)."""
    world = make_tif(tmp_path / "world.tif", noise((3, 180, 360)), crs="EPSG:4326",
                     geotransform=(-180.0, 1.0, 0.0, 90.0, 0.0, -1.0))
    to_pacific = osr.CoordinateTransformation(parse_crs("EPSG:4326"), parse_crs("EPSG:3832"))
    facing_0 = "+proj=ortho +lat_0=0 +lon_0=0 +R=6370997 +units=m +no_defs"
    lon, lat = np.meshgrid(np.arange(-179.5, 180.0), np.arange(89.5, -90.0, -1.0))
    with open_raster(world) as raster:
        pacific = (*to_pacific.TransformBounds(170.0, -10.0, 190.0, 10.0, 21), "EPSG:3832")
        assert raster.window_for_extent(pacific) == (0, 80, 360, 20)
        inside = _pixel_centres_in(raster, pacific)
        assert inside[80:100, :10].all() and inside[80:100, 350:].all() and not inside[:, 11:349].any()
        col, row, width, height = raster.window_for_extent((-1.5e7, -1e6, 1.5e7, 1e6, facing_0))
        assert col <= 90 and col + width >= 270 and 75 <= row <= 81 and row + height <= 105
        inside = _pixel_centres_in(raster, (-1.5e7, -1.5e7, 1.5e7, 1.5e7, facing_0))
        visible = np.abs(lon) < 90
        assert inside[visible].all() and inside[~visible].mean() < 0.1
        # Segment's cell by cell judgement of the same view: the visible hemisphere exactly, and in
        # blocks (here 7 cells a side, for at most 1,500 judged) to within a block
        whole_globe = (-1.5e7, -1.5e7, 1.5e7, 1.5e7, facing_0)
        exact = raster.grid_in_extent(whole_globe, raster.geotransform, 360, 180)
        assert exact.shape == (180, 360) and (exact == visible).all()
        blocks = raster.grid_in_extent(whole_globe, raster.geotransform, 360, 180, most=1500)
        assert blocks.shape == (180, 360) and (blocks != visible).mean() < 0.05
        assert raster.grid_in_extent((-10.0, -10.0, 10.0, 10.0, "EPSG:4326"), raster.geotransform, 360, 180) is None
        # a box met a world over only is that box, exact (its window holds it): no per-pixel or per-tile test
        area, exact = raster.extent_polygon((180.5, -10.0, 182.5, 10.0, ""))
        assert exact and area.bounds == (-179.5, -10.0, -177.5, 10.0)
        # an extent placed by its own outline: the polygon is exact, no cell by cell judgement is paid for
        assert raster.grid_in_extent(pacific, raster.geotransform, 360, 180) is None
        # zoomed in at the rim, 20 km across: smaller than a 64th of the raster, so no lattice point
        # of it lies in the view; the view's own points on the globe place it (it was refused)
        radius = 6370997.0
        col, row, width, height = raster.window_for_extent((radius - 1e4, -1e4, radius + 1e4, 1e4, facing_0))
        assert 260 <= col and col + width <= 271 and 85 <= row and row + height <= 95


def test_tiles_of_an_extent_in_another_crs_are_those_that_meet_it(tmp_path):
    """Index's tiles for an extent are those that meet it, not all of the window that holds it: a
    Pacific view over a world raster (a window 360 degrees wide) gives tiles at both ends only, and
    a UTM box over a longitude/latitude raster (a curved, tilted shape there) leaves out the corner
    tiles it misses. An extent in the raster's own CRS keeps the whole window, as before."""
    world = make_tif(tmp_path / "world.tif", noise((3, 180, 360)), crs="EPSG:4326",
                     geotransform=(-180.0, 1.0, 0.0, 90.0, 0.0, -1.0))
    to_pacific = osr.CoordinateTransformation(parse_crs("EPSG:4326"), parse_crs("EPSG:3832"))
    pacific = (*to_pacific.TransformBounds(170.0, -10.0, 190.0, 10.0, 21), "EPSG:3832")
    with open_raster(world) as raster:
        tiles = raster.tiles(tile_size=10, extent=pacific, min_valid_fraction=0)
        assert len(tiles) == raster.count_tiles(tile_size=10, extent=pacific) == 4       # 2 a side, 2 rows
        assert sorted({t.col for t in tiles}) == [0, 350] and {t.row for t in tiles} == {80, 90}
        read = [t for t, _, _ in raster.iter_tiles_with_pixels(tile_size=10, extent=pacific, min_valid_fraction=0)]
        assert [t.index for t in read] == [t.index for t in tiles] == [0, 35, 36, 71]    # grid positions, as before
        done = raster.tiles_done_counter(tile_size=10, extent=pacific)         # progress counts the tiles that meet it
        assert [done(t.index) for t in tiles] == [1, 2, 3, 4]
        first_row = raster.iter_tiles_with_pixels(tile_size=10, extent=pacific, min_valid_fraction=0, tile_range=(0, 36))
        assert [t.index for t, _, _ in first_row] == [0, 35]                   # a range of grid indices, not of positions
        assert len(raster.tiles(tile_size=10, extent=(-20.0, -10.0, 40.0, 10.0, "EPSG:4326"),
                                min_valid_fraction=0)) == 6 * 2
    # a square in UTM 33N, tilted over degrees
    degrees = make_tif(tmp_path / "degrees.tif", noise((3, 200, 200)), crs="EPSG:4326",
                       geotransform=(10.0, 0.05, 0.0, 50.0, 0.0, -0.05))
    to_utm = osr.CoordinateTransformation(parse_crs("EPSG:4326"), parse_crs("EPSG:32633"))
    cx, cy, _ = to_utm.TransformPoint(12.5, 46.0)           # 2.5 degrees west of the zone's meridian: tilted
    utm_box = (cx - 150e3, cy - 150e3, cx + 150e3, cy + 150e3, "EPSG:32633")
    with open_raster(degrees) as raster:
        window = raster.window_for_extent(utm_box)
        tiles = raster.tiles(tile_size=4, extent=utm_box, min_valid_fraction=0)
        in_window = math.ceil(window[2] / 4) * math.ceil(window[3] / 4)
        assert 0 < len(tiles) < in_window
        area, _ = raster.extent_polygon(utm_box)
        assert all(area.intersects(shapely.box(*t.bounds)) for t in tiles)


def test_a_raster_on_the_hidden_side_is_not_in_the_view_whatever_its_crs(tmp_path):
    """Polar stereographic and UTM give the far side of the globe finite coordinates: an
    orthographic view of the other hemisphere was placed over such a raster, which was then read,
    segmented and indexed whole. Each is now said not to overlap, and read where it is in view."""
    polar = make_tif(tmp_path / "polar.tif", noise((3, 300, 300)), crs="EPSG:3413",
                     geotransform=(-1.5e6, 1e4, 0.0, 1.5e6, 0.0, -1e4))
    utm = make_tif(tmp_path / "utm.tif", noise((3, 100, 100)))        # UTM 33N, about 15 E 45 N
    south_pole = "+proj=ortho +lat_0=-90 +lon_0=0 +datum=WGS84"
    facing_180 = "+proj=ortho +lat_0=0 +lon_0=180 +datum=WGS84"
    with open_raster(polar) as raster:
        with pytest.raises(RasterError, match="does not overlap .*no point of the raster lies in it"):
            raster.window_for_extent((-1e5, -1e5, 1e5, 1e5, south_pole))
        assert raster.window_for_extent((-7e6, -7e6, 7e6, 7e6, "+proj=ortho +lat_0=90 +lon_0=0 +datum=WGS84")) \
            == (0, 0, 300, 300)
    with open_raster(utm) as raster:
        with pytest.raises(RasterError, match="does not overlap"):
            raster.window_for_extent((-7e6, -7e6, 7e6, 7e6, facing_180))
        assert raster.window_for_extent((-7e6, -7e6, 7e6, 7e6, "+proj=ortho +lat_0=45 +lon_0=15 +datum=WGS84")) \
            == (0, 0, 100, 100)


def test_a_longitude_latitude_extent_past_180_meets_a_raster_stored_before_it(tmp_path):
    """179.95 to 180.05 degrees in EPSG:4269 over a raster stored as -180.1 to -179.9: the box was
    cut to the raster's bounds without going round the world, and refused."""
    west = make_tif(tmp_path / "west.tif", noise((3, 400, 400)), crs="EPSG:4326",
                    geotransform=(-180.1, 0.0005, 0.0, -16.0, 0.0, -0.0005))
    with open_raster(west) as raster:
        assert raster.window_for_extent((179.95, -16.15, 180.05, -16.05, "EPSG:4269")) == (100, 100, 200, 200)
        # in the raster's own CRS too, as a search extent is met (it was read literally, and refused)
        for crs in ("EPSG:4326", ""):
            assert raster.window_for_extent((179.95, -16.15, 180.05, -16.05, crs)) == (100, 100, 200, 200)
    world = make_tif(tmp_path / "world.tif", noise((3, 180, 360)), crs="EPSG:4326",
                     geotransform=(-180.0, 1.0, 0.0, 90.0, 0.0, -1.0))
    with open_raster(world) as raster:
        across = (170.0, -30.0, 190.0, -10.0, "EPSG:4326")        # both ends of the raster: 170 to 180, -180 to -170
        assert raster.window_for_extent(across) == (0, 100, 360, 20)
        inside = _pixel_centres_in(raster, across)
        assert inside[100:120, :10].all() and inside[100:120, 350:].all() and not inside[:, 10:350].any()
        assert raster.extent_polygon((10.0, -30.0, 20.0, -10.0, "EPSG:4326")) == (shapely.box(10, -30, 20, -10), True)


def test_an_extent_round_the_pole_holds_the_pole_on_a_longitude_latitude_raster(tmp_path):
    """A polar stereographic box round the North Pole over a longitude/latitude raster of the Arctic:
    its outline there goes once round the world, and the area is what it encloses on the pole's
    side (the polygon was a band along the outline, which left the pole out)."""
    arctic = make_tif(tmp_path / "arctic.tif", noise((3, 30, 360)), crs="EPSG:4326",
                      geotransform=(-180.0, 1.0, 0.0, 90.0, 0.0, -1.0))
    with open_raster(arctic) as raster:
        round_pole = (-5e5, -5e5, 5e5, 5e5, "EPSG:3413")       # 500 km each way: north of 83.5 degrees
        assert raster.window_for_extent(round_pole) == (0, 0, 360, 7)
        inside = _pixel_centres_in(raster, round_pole)
        assert inside[:4].all() and not inside[8:].any()
    # the same box over a Web Mercator raster of the world: closed past the map's top edge, not at
    # y = 90 (metres: the equator), which took in the whole northern half
    edge = 20037508.342789244
    mercator = make_tif(tmp_path / "mercator.tif", noise((3, 400, 400)), crs="EPSG:3857",
                        geotransform=(-edge, 2 * edge / 400, 0.0, edge, 0.0, -2 * edge / 400))
    with open_raster(mercator) as raster:
        col, row, width, height = raster.window_for_extent(round_pole)
        assert (col, row, width) == (0, 0, 400) and height <= 20
        inside = _pixel_centres_in(raster, round_pole)
        assert inside[0].any() and not inside[20:].any()


def test_a_web_mercator_raster_past_the_world_edge_is_read_whole_and_one_far_from_it_is_not(tmp_path):
    """GDAL's box of an extent across 180 degrees in Web Mercator runs from one edge of the world to
    the other: a raster stored past the edge (x 19.94e6 to 20.14e6) was half read, and one at 0
    degrees was read whole for a Pacific view that does not show it."""
    edge = 20037508.342789244
    past = make_tif(tmp_path / "past.tif", noise((3, 100, 200)), crs="EPSG:3857",
                    geotransform=(edge - 1e5, 1000.0, 0.0, -1.7e6, 0.0, -1000.0))
    with open_raster(past) as raster:
        assert raster.window_for_extent((179.0, -17.0, 181.0, -15.0, "EPSG:4326")) == (0, 0, 200, 100)
        assert _pixel_centres_in(raster, (179.0, -17.0, 181.0, -15.0, "EPSG:4326")).all()
    at_0 = make_tif(tmp_path / "at_0.tif", noise((3, 100, 100)), crs="EPSG:3857",
                    geotransform=(0.0, 1000.0, 0.0, 0.0, 0.0, -1000.0))
    to_pacific = osr.CoordinateTransformation(parse_crs("EPSG:4326"), parse_crs("EPSG:3832"))
    with open_raster(at_0) as raster:
        with pytest.raises(RasterError, match="does not overlap"):
            raster.window_for_extent((*to_pacific.TransformBounds(178.0, -1.0, 182.0, 1.0, 21), "EPSG:3832"))


@pytest.mark.parametrize("extent, words", [
    ((504000.0, 4995000.0, 502000.0, 4997000.0, UTM), ["inverted", "xmin=504000.0"]),
    ((502000.0, 4997000.0, 504000.0, 4995000.0, ""), ["inverted", "ymin=4997000.0"]),
    ((502000.0, 4995000.0, 502000.0, 4997000.0, UTM), ["degenerate", "502000.0"]),
    ((600000.0, 4995000.0, 601000.0, 4997000.0, UTM), ["does not overlap", "600000.0", "EPSG:32633"]),
    ((-20.0, -10.0, -19.0, -9.0, "EPSG:4326"), ["does not overlap"]),
    ((1.0, 2.0, 3.0, 4.0, "EPSG:999999"), ["unknown CRS", "EPSG:999999"]),
    ((1.0, 2.0, 3.0, 4.0, "not a crs"), ["unknown CRS"]),
    ((float("nan"), 2.0, 3.0, 4.0, UTM), ["finite"]),
])
def test_bad_extents_are_invalid_arguments_with_the_numbers(tmp_path, extent, words):
    with open_raster(make_tif(tmp_path / "utm.tif", noise((3, 100, 100)))) as raster:
        for call in (lambda: raster.tiles(extent=extent), lambda: raster.read_extent(extent)):
            with pytest.raises(RasterError) as error:
                call()
            assert error.value.kind == "invalid_argument"
            for word in words:
                assert word in str(error.value)


def test_read_extent_caps_the_output_pixels(tmp_path):
    with open_raster(make_tif(tmp_path / "cap.tif", noise((3, 100, 100)))) as raster:
        with pytest.raises(RasterError, match="limit is 1000") as error:
            raster.read_extent(None, target_resolution=1, max_pixels=1000)
        assert error.value.kind == "resource_exhausted"
        rgb, valid, gt = raster.read_extent(None, max_pixels=100 * 100)
        assert rgb.shape == (3, 100, 100) and gt == raster.geotransform


def test_read_window_checks_its_arguments(tmp_path):
    with open_raster(make_tif(tmp_path / "w.tif", noise((3, 50, 50)))) as raster:
        for args in ((40, 0, 20, 10), (0, 0, 0, 10), (-1, 0, 5, 5)):
            with pytest.raises(RasterError) as error:
                raster.read_window(*args)
            assert error.value.kind == "invalid_argument"
        with pytest.raises(RasterError, match="resample"):
            raster.read_window(0, 0, 10, 10, resample="sideways")
        rgb, valid = raster.read_window(0, 0, 50, 50, out_size=(10, 5), resample="nearest")
        assert rgb.shape == (3, 5, 10) and valid.shape == (5, 10)


# ---------------------------------------------------------------------------------------------
# Paths, permissions, changes on disk
# ---------------------------------------------------------------------------------------------

def test_a_raster_error_crosses_process_boundaries_whole():
    import pickle

    again = pickle.loads(pickle.dumps(RasterError("not_found", "raster 'x.tif' does not exist")))
    assert isinstance(again, RasterError) and again.kind == "not_found" and str(again) == "raster 'x.tif' does not exist"
    assert again.message == str(again)


def test_bad_paths_get_the_right_kinds(tmp_path):
    with pytest.raises(RasterError) as error:
        open_raster(tmp_path / "missing.tif")
    assert error.value.kind == "not_found" and "missing.tif" in str(error.value)
    text = tmp_path / "notes.txt"
    text.write_text("this is not a raster\n")
    with pytest.raises(RasterError) as error:
        open_raster(text)
    assert error.value.kind == "invalid_argument" and "notes.txt" in str(error.value)
    assert "not a raster" in str(error.value)
    with pytest.raises(RasterError) as error:
        open_raster(tmp_path)
    assert error.value.kind == "invalid_argument" and "folder" in str(error.value)
    pipe = tmp_path / "pipe.tif"
    os.mkfifo(pipe)                             # opening a pipe would wait forever for a writer
    outcome = []

    def opening():
        try:
            open_raster(pipe)
        except RasterError as e:
            outcome.append(e)

    reader = threading.Thread(target=opening, daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():                       # release the blocked open() before failing
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
    assert outcome and outcome[0].kind == "invalid_argument" and "not a regular file" in str(outcome[0])
    for name in ("/vsicurl/http://example.com/a.tif", "https://example.com/a.tif", ""):
        with pytest.raises(RasterError) as error:
            open_raster(name)
        assert error.value.kind == "invalid_argument"


def test_allowed_roots_resolve_symlinks(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    inside_tif = make_tif(root / "in.tif", noise((8, 8)))
    outside_tif = make_tif(outside / "out.tif", noise((8, 8)))
    with open_raster(inside_tif, allowed_roots=[root]) as raster:
        assert raster.identity()["path"] == os.path.realpath(inside_tif)

    for path in (outside_tif, root / ".." / "outside" / "out.tif", outside / "missing.tif"):
        with pytest.raises(RasterError) as error:
            open_raster(path, allowed_roots=[root])
        assert error.value.kind == "permission_denied" and "allowed roots" in str(error.value)

    for path in (outside_tif, root / ".." / "outside" / "out.tif"):          # not links: not called one
        with pytest.raises(RasterError, match="is outside the allowed roots"):
            open_raster(path, allowed_roots=[root])
    escape = root / "escape.tif"
    escape.symlink_to(outside_tif)
    with pytest.raises(RasterError) as error:
        open_raster(escape, allowed_roots=[str(root)])
    # named as a link that leads out, without saying where to (nothing of the files outside is told)
    assert error.value.kind == "permission_denied" and "is a link (or lies under one) that leads outside" in str(error.value)
    assert "outside/out.tif" not in str(error.value) and str(outside) not in str(error.value)
    linked_folder = root / "linked"
    linked_folder.symlink_to(outside)
    with pytest.raises(RasterError, match="is a link \\(or lies under one\\)"):
        open_raster(linked_folder / "out.tif", allowed_roots=[root])
    alias = root / "alias.tif"
    alias.symlink_to(inside_tif)
    open_raster(alias, allowed_roots=[root]).close()
    # A root given through a symlink is compared by its real path too.
    root_link = tmp_path / "root_link"
    root_link.symlink_to(root)
    open_raster(inside_tif, allowed_roots=[root_link]).close()

    # A VRT inside the root that reads a file outside it is refused as well.
    vrt = root / "sneaky.vrt"
    gdal.BuildVRT(str(vrt), [str(outside_tif)]).FlushCache()
    with pytest.raises(RasterError) as error:
        open_raster(vrt, allowed_roots=[root])
    assert error.value.kind == "permission_denied" and "out.tif" in str(error.value)
    open_raster(vrt).close()
    # ... also when it does so through another VRT inside the root.
    outer = root / "outer.vrt"
    gdal.BuildVRT(str(outer), [str(vrt)]).FlushCache()
    with pytest.raises(RasterError) as error:
        open_raster(outer, allowed_roots=[root])
    assert error.value.kind == "permission_denied" and "out.tif" in str(error.value)


def write_vrt(path: Path, source: Path, declaration: bool = False) -> Path:
    """A VRT of `source` (any name: GDAL knows a VRT by its content), optionally led by an XML declaration."""
    text = gdal.BuildVRT("", [str(source)]).GetMetadata("xml:VRT")[0]
    path.write_text(('<?xml version="1.0" encoding="UTF-8"?>\n' if declaration else "") + text)
    return path


def rewrite_in_place(source: Path, seed: int) -> None:
    """New pixels, same size, and an mtime a second on: what a VRT's own size and mtime never show."""
    before = source.stat()
    make_tif(source, noise((8, 8), seed=seed))
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert source.stat().st_size == before.st_size


@pytest.mark.parametrize("inner_name, declaration", [("inner.xml", False), ("inner.vrt", True)],
                         ids=["not-named-vrt", "xml-declaration"])
def test_a_nested_vrt_is_followed_by_its_content_for_the_identity_and_the_roots(tmp_path, inner_name, declaration):
    """A VRT inside a VRT is known by its content, not its name, both where its sources join the
    raster's identity and where they are checked against the allowed roots."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    source = make_tif(root / "source.tif", noise((8, 8)))
    inner = write_vrt(root / inner_name, source, declaration)
    outer = root / "outer.vrt"
    gdal.BuildVRT(str(outer), [str(inner)]).FlushCache()
    with open_raster(outer, allowed_roots=[root]) as raster:
        before = raster.identity()
    rewrite_in_place(source, seed=1)
    with open_raster(outer, allowed_roots=[root]) as raster:
        assert raster.read_window(0, 0, 8, 8)[0][:, 0, 0].tolist() == [noise((8, 8), seed=1)[0, 0]] * 3
        after = raster.identity()
    assert (after["size"], after["mtime_ns"]) == (before["size"], before["mtime_ns"])
    assert after["sources"] != before["sources"]

    source.rename(outside / "source.tif")
    write_vrt(inner, outside / "source.tif", declaration)
    with pytest.raises(RasterError) as error:
        open_raster(outer, allowed_roots=[root])
    assert error.value.kind == "permission_denied" and "source.tif" in str(error.value)


def vrt_chain(folder: Path, source: Path, nested: int) -> Path:
    """A VRT of a VRT of ... `source`, with `nested` VRTs below the one returned."""
    below = source
    for level in range(nested + 1):
        below = write_vrt(folder / f"level{level}.vrt", below)
    return below


def test_vrt_nesting_is_limited_alike_for_the_identity_and_the_roots(tmp_path):
    source = make_tif(tmp_path / "source.tif", noise((8, 8)))
    deepest_allowed = vrt_chain(tmp_path, source, nested=8)
    with open_raster(deepest_allowed, allowed_roots=[tmp_path]) as raster:
        before = raster.identity()
    rewrite_in_place(source, seed=1)
    with open_raster(deepest_allowed, allowed_roots=[tmp_path]) as raster:
        assert raster.identity()["sources"] != before["sources"]

    too_deep = write_vrt(tmp_path / "too_deep.vrt", deepest_allowed)
    with pytest.raises(RasterError) as refused:
        open_raster(too_deep, allowed_roots=[tmp_path])
    assert refused.value.kind == "invalid_argument" and "more than 8 deep" in str(refused.value)
    # without roots it opens (GDAL reads any depth), but its identity cannot cover its sources either
    with open_raster(too_deep) as raster:
        with pytest.raises(RasterError) as error:
            raster.identity()
    assert (error.value.kind, str(error.value)) == (refused.value.kind, str(refused.value))


def test_a_cycle_of_vrts_is_followed_once_round(tmp_path):
    """GDAL opens VRTs that refer to themselves (reading them fails); listing their files must end."""
    source = make_tif(tmp_path / "source.tif", noise((8, 8)))
    first, second, looped = tmp_path / "first.vrt", tmp_path / "second.vrt", tmp_path / "self.vrt"
    for vrt, refers_to in ((first, second), (second, first), (looped, looped)):
        text = gdal.BuildVRT("", [str(source)]).GetMetadata("xml:VRT")[0]
        vrt.write_text(text.replace(str(source), str(refers_to)))
    top = tmp_path / "top.vrt"
    gdal.BuildVRT(str(top), [str(first)]).FlushCache()
    for path, reads_others in ((top, True), (first, True), (looped, False)):
        for roots in ([tmp_path], None):
            with open_raster(path, allowed_roots=roots) as raster:
                assert ("sources" in raster.identity()) == reads_others, path.name
    with open_raster(top) as raster:
        before = raster.identity()
    os.utime(second, ns=(second.stat().st_atime_ns, second.stat().st_mtime_ns + 10**9))
    with open_raster(top) as raster:
        assert raster.identity()["sources"] != before["sources"]    # second.vrt is read through first.vrt


def test_unreadable_file_is_permission_denied(tmp_path, monkeypatch):
    path = make_tif(tmp_path / "locked.tif", noise((8, 8)))
    if os.geteuid() == 0:
        # root reads files whatever their mode: make the read itself fail the way it would.
        import backend.raster as raster_module

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(raster_module, "open", refuse, raising=False)
    path.chmod(0)
    try:
        with pytest.raises(RasterError) as error:
            open_raster(path)
        assert error.value.kind == "permission_denied" and "locked.tif" in str(error.value)
    finally:
        path.chmod(0o644)


def test_check_unchanged_detects_a_rewritten_file(tmp_path):
    path = make_tif(tmp_path / "live.tif", noise((3, 300, 300)))
    with open_raster(path) as raster:
        before = raster.identity()
        assert before["path"] == os.path.realpath(path) and before["size"] == path.stat().st_size
        assert before["mtime_ns"] == path.stat().st_mtime_ns
        raster.check_unchanged()
        tiles = raster.iter_tiles_with_pixels(tile_size=100)
        next(tiles)
        make_tif(tmp_path / "replacement.tif", noise((3, 300, 300), seed=1)).replace(path)
        with pytest.raises(RasterError) as error:
            raster.check_unchanged()
        assert error.value.kind == "aborted" and "changed on disk" in str(error.value)
        with pytest.raises(RasterError) as error:
            next(tiles)
        assert error.value.kind == "aborted"
        path.unlink()
        with pytest.raises(RasterError, match="removed") as error:
            raster.check_unchanged()
        assert error.value.kind == "aborted"


# ---------------------------------------------------------------------------------------------
# Pixel sources
# ---------------------------------------------------------------------------------------------

def test_raster_from_pixels_round_trips_both_layouts():
    rgb = noise((3, 20, 30))
    gt = (1000.0, 2.0, 0.0, 2000.0, 0.0, -2.0)
    by_band = raster_from_pixels(rgb.tobytes(), 30, 20, 3, "Byte", gt, "EPSG:3857", label="layer")
    by_pixel = raster_from_pixels(rgb.transpose(1, 2, 0).tobytes(), 30, 20, 3, 1, gt, "EPSG:3857",
                                  interleave="pixel")
    for raster in (by_band, by_pixel):
        assert isinstance(raster, Raster) and raster.crs_authid == "EPSG:3857"
        assert raster.bounds == (1000.0, 1960.0, 1060.0, 2000.0)
        out, valid = raster.read_window(0, 0, 30, 20)
        np.testing.assert_array_equal(out, rgb)
        assert valid.all()
    assert by_band.name == "layer" and by_band.identity()["path"] == ""
    assert by_band.identity() == by_pixel.identity()   # same image, same place: same key
    moved = raster_from_pixels(rgb.tobytes(), 30, 20, 3, "Byte", (0.0, 2.0, 0.0, 0.0, 0.0, -2.0), "EPSG:3857")
    assert moved.identity()["sha256"] != by_band.identity()["sha256"]
    by_band.check_unchanged()   # nothing on disk to change

    # 16-bit with an alpha band in the middle and a nodata value.
    values = noise((3, 10, 10), np.uint16, 100, 5000)
    values[1, :, :3] = 0          # alpha 0: no data
    values[0, 9, :] = 7
    values[2, 9, :] = 7           # nodata in every colour band
    raster = raster_from_pixels(values, 10, 10, 3, np.uint16, gt, "EPSG:3857", nodata=7, alpha_band=2)
    assert raster.rgb_bands == (1, 1, 1)      # two colour bands left: the first is repeated
    out, valid = raster.read_window(0, 0, 10, 10)
    assert not valid[:, :3].any() and not valid[9].any() and valid[:9, 3:].all()
    assert out[:, valid].max() == 255


@pytest.mark.parametrize("kwargs, words", [
    (dict(data=b"\0" * 599), ["599 bytes", "600 bytes"]),
    (dict(data=b"\0" * 1200), ["1200 bytes", "600 bytes"]),
    (dict(dtype="UInt16"), ["1200 bytes"]),
    (dict(dtype="Complex64"), ["data_type"]),
    (dict(geotransform=(0.0, 1.0, 0.0, 0.0, 0.0)), ["geotransform", "6"]),
    (dict(geotransform=(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)), ["geotransform"]),
    (dict(crs=""), ["crs is required"]),
    (dict(crs="EPSG:0"), ["unknown CRS"]),
    (dict(width=0), ["width"]),
    (dict(alpha_band=4), ["alpha_band"]),
    (dict(interleave="rows"), ["interleave"]),
    # a small message naming a million bands: refused before GDAL makes an object for each
    (dict(data=b"\0" * 1_000_000, width=1, height=1, band_count=1_000_000), ["band_count", "1..256"]),
])
def test_raster_from_pixels_rejects_bad_input(kwargs, words):
    args = dict(data=b"\0" * 600, width=20, height=10, band_count=3, dtype="Byte",
                geotransform=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0), crs="EPSG:3857")
    args.update(kwargs)
    with pytest.raises(RasterError) as error:
        raster_from_pixels(**args)
    assert error.value.kind == "invalid_argument"
    for word in words:
        assert word in str(error.value)


# ---------------------------------------------------------------------------------------------
# CRS helpers, error handling, the wire contract
# ---------------------------------------------------------------------------------------------

def test_crs_helpers():
    wgs84 = parse_crs("EPSG:4326")
    assert wgs84.GetAxisMappingStrategy() == osr.OAMS_TRADITIONAL_GIS_ORDER
    assert parse_crs(wgs84.ExportToWkt()).IsSame(wgs84)
    lon0, lat0, lon1, lat1 = transform_bounds((500000.0, 4990000.0, 510000.0, 5000000.0), UTM, wgs84)
    assert 14.9 < lon0 < lon1 < 15.2 and 45.0 < lat0 < lat1 < 45.2   # longitude first
    for text in ("", "EPSG:999999", "/etc/passwd", "http://example.com/crs.wkt", "bogus"):
        with pytest.raises(RasterError) as error:
            parse_crs(text)
        assert error.value.kind == "invalid_argument"


def test_gdal_exception_setting_is_restored(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a raster")
    before = gdal.GetUseExceptions(), osr.GetUseExceptions()
    with pytest.raises(RasterError):
        open_raster(text)
    with pytest.raises(RasterError):
        parse_crs("EPSG:999999")
    assert (gdal.GetUseExceptions(), osr.GetUseExceptions()) == before
    # Callers that run with exceptions on keep them on.
    gdal.UseExceptions()
    try:
        with pytest.raises(RasterError):
            open_raster(text)
        assert gdal.GetUseExceptions()
    finally:
        if not before[0]:
            gdal.DontUseExceptions()


def test_concurrent_readers_and_failures_do_not_disturb_each_other(tmp_path):
    path = make_tif(tmp_path / "shared.tif", noise((3, 300, 300), np.uint16, 1, 60000), nodata=0)
    text = tmp_path / "notes.txt"
    text.write_text("not a raster")
    with open_raster(path) as raster:
        expected = [(t.index, rgb.copy()) for t, rgb, _ in raster.iter_tiles_with_pixels(tile_size=64)]

    def read_all(job: int):
        if job % 2:
            with pytest.raises(RasterError):
                open_raster(text)
            return None
        with open_raster(path) as own:
            return [(t.index, rgb) for t, rgb, _ in own.iter_tiles_with_pixels(tile_size=64)]

    before = gdal.GetUseExceptions()
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(read_all, range(8)))
    assert gdal.GetUseExceptions() == before
    for result in results[::2]:
        assert [i for i, _ in result] == [i for i, _ in expected]
        for (_, got), (_, want) in zip(result, expected):
            np.testing.assert_array_equal(got, want)


def test_band_mapping_and_extent_from_wire_messages(tmp_path):
    pb = pytest.importorskip("backend.rpc.skyprompt_pb2")
    assert BandMapping.from_message(pb.BandMapping()) == BandMapping()
    mapping = BandMapping.from_message(pb.BandMapping(red=3, green=2, blue=1, stretch_high_percent=99.5))
    assert mapping == BandMapping(3, 2, 1, None, 99.5) and mapping.percentiles() == (2.0, 99.5)
    with open_raster(make_tif(tmp_path / "m.tif", noise((3, 100, 100))), bands=pb.BandMapping(red=3)) as raster:
        assert raster.rgb_bands == (3, 2, 3)
        assert raster.window_for_extent(pb.Extent()) == (0, 0, 100, 100)   # unset = whole raster
        extent = pb.Extent(xmin=500100, ymin=4999000, xmax=500300, ymax=4999500)
        assert raster.window_for_extent(extent) == (10, 50, 20, 50)


# ---------------------------------------------------------------------------------------------
# Memory: a 20000 x 20000 raster is read tile by tile
# ---------------------------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_large_vrt_is_read_by_windows_with_flat_memory(tmp_path):
    piece = make_tif(tmp_path / "piece.tif", noise((3, 500, 500), np.uint16, 1, 4000), options=["TILED=YES"])
    repeats = 40   # 40 x 40 copies of the 500-pixel piece: 20000 x 20000 x 3 UInt16 = 2.4 GB of pixels
    bands = []
    for band in (1, 2, 3):
        sources = "".join(
            f'<SimpleSource><SourceFilename relativeToVRT="1">{piece.name}</SourceFilename>'
            f'<SourceBand>{band}</SourceBand><SrcRect xOff="0" yOff="0" xSize="500" ySize="500"/>'
            f'<DstRect xOff="{i * 500}" yOff="{j * 500}" xSize="500" ySize="500"/></SimpleSource>'
            for j in range(repeats) for i in range(repeats))
        bands.append(f'<VRTRasterBand dataType="UInt16" band="{band}"><NoDataValue>0</NoDataValue>{sources}'
                     f'</VRTRasterBand>')
    vrt = tmp_path / "big.vrt"
    vrt.write_text(f'<VRTDataset rasterXSize="20000" rasterYSize="20000"><SRS>{UTM}</SRS>'
                   f'<GeoTransform>500000, 1, 0, 5000000, 0, -1</GeoTransform>{"".join(bands)}</VRTDataset>')

    rss_before = _rss_bytes()
    tracemalloc.start()
    try:
        with open_raster(vrt) as raster:
            assert (raster.width, raster.height, raster.data_type) == (20000, 20000, "UInt16")
            assert raster.count_tiles() == math.ceil(20000 / 224) ** 2
            tiles = raster.iter_tiles_with_pixels(tile_size=224)
            for _ in range(5):
                tile, rgb, valid = next(tiles)
                assert rgb.shape == (3, 224, 224) and valid.all() and rgb.max() > 200
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"Python allocations peaked at {peak / 2**20:.0f} MiB"
    assert _rss_bytes() - rss_before < 300 * 2**20


def test_a_vrt_whose_source_is_missing_says_so_rather_than_damaged(tmp_path):
    """A VRT (or a mosaic) whose source file was moved away: the message said the file may be damaged."""
    source = make_tif(tmp_path / "src.tif", noise((3, 32, 32)))
    vrt = tmp_path / "mosaic.vrt"
    gdal.BuildVRT(str(vrt), [str(source)]).FlushCache()
    source.unlink()
    with open_raster(vrt) as raster:
        with pytest.raises(RasterError) as error:
            raster.read_window(0, 0, 32, 32)
    assert error.value.kind == "not_found" and "a file it reads is missing" in str(error.value)
    assert "src.tif" in str(error.value) and "damaged" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# Training reads image files as the backend shows them (training.data.gdal_rgb_image)
# ---------------------------------------------------------------------------------------------

def _alpha_first(count: int) -> tuple[np.ndarray, dict]:
    data = noise((count, 24, 32), np.uint16, 100, 60000, seed=count)
    data[0] = 65535
    data[0, :6, :10] = 0                # a transparent corner
    return data, {"colours": [gdal.GCI_AlphaBand] + [gdal.GCI_Undefined] * (count - 1)}


def _float_near_flat_and_nan() -> tuple[np.ndarray, dict]:
    data = noise((3, 24, 32), np.float32, 0, 1000, seed=1) / np.float32(7)
    data[1] = 5.0
    data[1, 0, :5] = 5.3                # under 2% of the band: its 2nd and 98th percentiles are both 5.0
    data[2, 10, 10] = np.nan            # not finite in one band: black in every channel
    return data, {}


def _nodata_in_one_band() -> tuple[np.ndarray, dict]:
    data = noise((3, 24, 32), np.uint16, 1, 4000, seed=2)
    data[0, :4] = 0                     # nodata in band 1 alone: a dark pixel, not a hole
    data[:, 20:] = 0                    # nodata in every band: a hole
    return data, {"nodata": 0}


def _wider_than_the_statistics_read() -> tuple[np.ndarray, dict]:
    # its stretch comes from a decimated read of STATS_SIDE columns, not from every pixel
    return noise((1, 30, 1100), np.uint16, 1, 60000, seed=3), {}


def _uint16_palette() -> tuple[np.ndarray, dict]:
    return (np.arange(24 * 32) % 4).reshape(1, 24, 32).astype(np.uint16), {"palette": True}


def _byte_rgb_with_alpha() -> tuple[np.ndarray, dict]:
    data = noise((4, 24, 32), seed=4)
    data[3] = 255
    data[3, 5:9, 3:20] = 0
    return data, {"options": ["PHOTOMETRIC=RGB", "ALPHA=YES"]}


@pytest.mark.parametrize("make", [
    lambda: _alpha_first(4), lambda: _alpha_first(2), _float_near_flat_and_nan, _nodata_in_one_band,
    _wider_than_the_statistics_read, _uint16_palette, _byte_rgb_with_alpha,
], ids=["uint16-alpha-first-4-bands", "uint16-alpha-first-2-bands", "float-near-flat-band-and-nan",
        "nodata-in-one-band", "wider-than-STATS_SIDE", "uint16-palette", "byte-rgb-alpha"])
def test_training_reads_a_chip_as_the_backend_shows_it(tmp_path, make):
    """Training's reading of a wide TIFF chip (which may have no georeferencing) gives the pixels the
    backend shows for the same file: the same band choice (an alpha band never a colour), masks and
    stretch (percentiles from the same statistics read, a flat band's range one level wide)."""
    from training.data import gdal_rgb_image

    data, options = make()
    palette = options.pop("palette", False)

    def write(path: Path, georeferenced: bool) -> Path:
        extra = {} if georeferenced else {"geotransform": None, "crs": None}
        make_tif(path, data, **extra, **options)
        if palette:
            ds = gdal.Open(str(path), gdal.GA_Update)
            table = gdal.ColorTable()
            for i, rgb in enumerate([(0, 0, 255), (0, 160, 0), (128, 128, 128), (255, 0, 0)]):
                table.SetColorEntry(i, (*rgb, 255))
            ds.GetRasterBand(1).SetColorTable(table)
            ds.GetRasterBand(1).SetColorInterpretation(gdal.GCI_PaletteIndex)
            ds = None
        return path

    with open_raster(write(tmp_path / "geo.tif", georeferenced=True)) as raster:
        shown, valid = raster.read_window(0, 0, raster.width, raster.height)
    trained = np.asarray(gdal_rgb_image(str(write(tmp_path / "chip.tif", georeferenced=False))))
    assert gdal.Open(str(tmp_path / "chip.tif")).GetGeoTransform(can_return_null=True) is None
    assert trained.shape == (*data.shape[1:], 3) and shown.max() > 0
    np.testing.assert_array_equal(trained, shown.transpose(1, 2, 0))


def test_training_loads_a_one_band_16_bit_tiff_with_nodata_as_the_backend_shows_it(tmp_path):
    """One band of 16-bit data PIL decodes, but knowing nothing of its nodata value: the nodata
    border was stretched with the rest (it set the 2nd percentile) and not black. Read through GDAL
    as the backend reads it, it is."""
    from training.data import load_image

    data = noise((24, 32), np.uint16, 1000, 5000, seed=5)
    data[:, :8] = 0
    path = make_tif(tmp_path / "dem.tif", data, nodata=0)
    with open_raster(path) as raster:
        shown, valid = raster.read_window(0, 0, raster.width, raster.height)
    assert not valid[:, :8].any() and valid[:, 8:].all()
    np.testing.assert_array_equal(np.asarray(load_image(str(path))), shown.transpose(1, 2, 0))


HIDDEN = (slice(5, 9), slice(3, 20))     # the pixels each case below makes transparent


def _tiff_with_alpha(path: Path, options: list[str]) -> Path:
    data = noise((4 if "PHOTOMETRIC=RGB" in options else 2, 24, 32), seed=6)
    data[-1] = 255
    data[-1][HIDDEN] = 0                    # transparent, over stored colours that are not black
    data[:-1, HIDDEN[0], HIDDEN[1]] = 200
    return make_tif(path / "alpha.tif", data, options=options)


def _rgb_tiff_with_mask(path: Path, internal: bool) -> Path:
    tif = make_tif(path / "masked.tif", noise((3, 24, 32), seed=7), options=["PHOTOMETRIC=RGB"])
    gdal.SetConfigOption("GDAL_TIFF_INTERNAL_MASK", "YES" if internal else "NO")
    try:
        ds = gdal.Open(str(tif), gdal.GA_Update)
        ds.CreateMaskBand(gdal.GMF_PER_DATASET)
        mask = np.full((24, 32), 255, np.uint8)
        mask[HIDDEN] = 0
        ds.GetRasterBand(1).GetMaskBand().WriteArray(mask)
        ds = None
    finally:
        gdal.SetConfigOption("GDAL_TIFF_INTERNAL_MASK", None)
    assert os.path.exists(f"{tif}.msk") != internal
    return tif


def _rgb_tiff_with_nodata(path: Path) -> Path:
    data = noise((3, 24, 32), low=10, seed=8)
    data[:, HIDDEN[0], HIDDEN[1]] = 9       # nodata in every band: a hole
    return make_tif(path / "nodata.tif", data, nodata=9, options=["PHOTOMETRIC=RGB"])


def _palette_png_with_transparency(path: Path) -> Path:
    from PIL import Image

    index = (np.arange(24 * 32) % 3).reshape(24, 32).astype(np.uint8)
    index[HIDDEN] = 3                       # the palette's transparent entry (tRNS), red
    image = Image.fromarray(index, "P")
    image.putpalette([0, 0, 255, 0, 160, 0, 128, 128, 128, 255, 0, 0])
    png = path / "palette.png"
    image.save(png, transparency=3)
    ds = gdal.Open(str(png))                # georeferenced in an .aux.xml beside it, for open_raster
    ds.SetGeoTransform((500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0))
    srs = osr.SpatialReference()
    srs.SetFromUserInput(UTM)
    ds.SetSpatialRef(srs)
    ds = None
    return png


def _nodata_beside(path: Path, suffix: str) -> Path:
    """An RGB image with its nodata value in the .aux.xml beside it, as `gdal_edit.py -a_nodata` leaves
    it for a format with no place for one (PNG, JPEG) or a file it may not write to."""
    from PIL import Image

    data = noise((24, 32, 3), low=10, seed=9)
    data[HIDDEN] = 9
    image = path / f"nodata_beside{suffix}"
    Image.fromarray(data, "RGB").save(image)
    ds = gdal.Open(str(image))
    ds.SetGeoTransform((500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0))
    srs = osr.SpatialReference()
    srs.SetFromUserInput(UTM)
    ds.SetSpatialRef(srs)
    ds = None
    aux = Path(f"{image}.aux.xml")
    bands = "".join(f'<PAMRasterBand band="{i}"><NoDataValue>9</NoDataValue></PAMRasterBand>' for i in (1, 2, 3))
    aux.write_text(aux.read_text().replace("</PAMDataset>", bands + "</PAMDataset>"))
    ds = gdal.Open(str(image))
    assert [ds.GetRasterBand(i).GetNoDataValue() for i in (1, 2, 3)] == [9, 9, 9]
    ds = None
    return image


@pytest.mark.parametrize("write", [
    lambda path: _tiff_with_alpha(path, ["PHOTOMETRIC=RGB", "ALPHA=YES"]),
    lambda path: _tiff_with_alpha(path, ["ALPHA=YES"]),
    lambda path: _rgb_tiff_with_mask(path, internal=True),
    lambda path: _rgb_tiff_with_mask(path, internal=False),
    _rgb_tiff_with_nodata,
    _palette_png_with_transparency,
    lambda path: _nodata_beside(path, ".png"),
    lambda path: _nodata_beside(path, ".tif"),
], ids=["rgba", "grey-alpha", "rgb-internal-mask", "rgb-mask-file", "rgb-nodata", "palette-png-transparency",
        "png-nodata-in-aux-xml", "tiff-nodata-in-aux-xml"])
def test_training_loads_an_8_bit_image_with_transparent_pixels_as_the_backend_shows_it(tmp_path, write,
                                                                                      monkeypatch):
    """8-bit imagery that PIL decodes, with pixels the backend masks: PIL's conversion to RGB dropped an
    alpha band and a PNG's transparent palette entry (the pixels kept their stored colour), and knows
    nothing of a TIFF's nodata value or mask; the backend shows all of them black."""
    from training.data import load_image

    monkeypatch.setenv("GDAL_PAM_ENABLED", "YES")     # a PNG's georeferencing is in its .aux.xml
    path = write(tmp_path)
    with open_raster(path) as raster:
        shown, valid = raster.read_window(0, 0, raster.width, raster.height)
    assert not valid[HIDDEN].any() and valid.sum() == 24 * 32 - 4 * 17
    np.testing.assert_array_equal(np.asarray(load_image(str(path))), shown.transpose(1, 2, 0))
