"""Polygons from a relevance map: the minimum ground area and the sliver rule (backend.segment)."""
import numpy as np
import pytest
import shapely
from osgeo import osr

from backend.raster import transformation
from backend.segment import clean_polygon, equal_area_transformation, polygons_for_prompt
from test_server import checkpoint, rasters, server  # noqa: F401 - fixtures: a live server on a tiny checkpoint


def _srs(definition: str) -> osr.SpatialReference:
    srs = osr.SpatialReference()
    srs.SetFromUserInput(definition)
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    return srs


def _corner_blocks() -> np.ndarray:
    relevance = np.zeros((6, 6))
    relevance[0:2, 0:2] = relevance[2:4, 2:4] = 1.0          # two 2 x 2 blocks meeting at one corner: 8 px
    return relevance


def test_min_area_m2_drops_whole_regions_by_their_ground_area():
    srs = _srs("EPSG:32633")                                  # 1 m pixels: 8 m² for the region
    relevance = _corner_blocks()
    args = (np.ones((6, 6), bool), (500000.0, 1.0, 0.0, 5000000.0, 0.0, -1.0), srs, 0.5, 0.0, 0.0,
            equal_area_transformation(srs, 500003.0, 4999997.0))
    kept, dropped = polygons_for_prompt(relevance, *args, min_area_m2=7.5)
    assert dropped == 0 and len(kept) == 1                   # the two parts stand together, as one result
    assert kept[0].geometry.geom_type == "MultiPolygon" and len(kept[0].geometry.geoms) == 2
    assert kept[0].area_m2 == pytest.approx(8.0, rel=0.01) and kept[0].area == 8.0
    kept, dropped = polygons_for_prompt(relevance, *args, min_area_m2=8.5)
    assert kept == [] and dropped == 1                        # fall together: one region counted


def test_min_area_m2_is_ground_area_on_a_longitude_latitude_raster():
    srs = _srs("EPSG:4326")
    degree = 1e-4                                             # about 11 m x 5.6 m at 60 N
    relevance = np.zeros((8, 8))
    relevance[2:5, 2:5] = 1.0
    gt = (10.0, degree, 0.0, 60.0, 0.0, -degree)
    args = (np.ones((8, 8), bool), gt, srs, 0.5, 0.0, 0.0, equal_area_transformation(srs, 10.0004, 59.9996))
    (whole,), _ = polygons_for_prompt(relevance, *args)
    assert whole.area == pytest.approx(9 * degree ** 2)       # map units: square degrees
    assert 500 < whole.area_m2 < 600                          # 9 x 11.1 m x 5.57 m
    kept, dropped = polygons_for_prompt(relevance, *args, min_area_m2=whole.area_m2 * 0.9)
    assert len(kept) == 1 and dropped == 0
    kept, dropped = polygons_for_prompt(relevance, *args, min_area_m2=whole.area_m2 * 1.1)
    assert kept == [] and dropped == 1


def test_min_area_m2_keeps_regions_whose_ground_area_is_unknown():
    srs = _srs('LOCAL_CS["site grid",UNIT["metre",1]]')       # no transform to longitude/latitude
    assert transformation(srs) is None
    kept, dropped = polygons_for_prompt(_corner_blocks(), np.ones((6, 6), bool), (10.0, 1.0, 0.0, 50.0, 0.0, -1.0),
                                        srs, 0.5, 0.0, 0.0, None, min_area_m2=1e9)
    assert dropped == 0 and sum(r.area for r in kept) == 8.0 and all(r.area_m2 == 0.0 for r in kept)
    # min_area, in map units squared, still applies
    kept, dropped = polygons_for_prompt(_corner_blocks(), np.ones((6, 6), bool), (10.0, 1.0, 0.0, 50.0, 0.0, -1.0),
                                        srs, 0.5, 9.0, 0.0, None, min_area_m2=1e9)
    assert kept == [] and dropped == 1


def test_clean_polygon_drops_slivers_but_keeps_a_region_that_is_all_small():
    import shapely

    big = shapely.box(0, 0, 10, 10)
    sliver = shapely.Polygon([(10, 10), (10.4, 10), (10, 10.4)])  # a half-pixel triangle at its corner
    parts = clean_polygon(shapely.MultiPolygon([big, sliver]), 0.0, min_part_area=0.75)
    assert [p.area for p in parts] == [100.0]
    tiny = clean_polygon(sliver, 0.0, min_part_area=0.75)      # alone it is a detection: kept
    assert len(tiny) == 1 and tiny[0].area == pytest.approx(0.08)
    assert len(clean_polygon(shapely.MultiPolygon([big, sliver]), 0.0)) == 2     # no minimum: both


def test_a_region_of_a_pixel_or_a_diagonal_chain_keeps_its_area_through_simplification():
    """Simplified at the pixel size, a pixel's square would become a triangle of half its area: a
    region that simplifying would change by over a quarter keeps its pixel outline."""
    srs = _srs("EPSG:32614")
    gt = (487000.0, 5.0, 0.0, 5206000.0, 0.0, -5.0)                 # 5 m pixels, as NAIP resampled
    relevance = np.zeros((12, 12))
    relevance[1, 1] = 1.0                                            # one pixel: 25 m²
    for i in range(4):
        relevance[5 + i, 5 + i] = 1.0                                # a diagonal chain of four pixels
    relevance[8:12, 0:4] = 1.0                                       # a 4 x 4 block, simplified as before
    kept, _ = polygons_for_prompt(relevance, np.ones((12, 12), bool), gt, srs, 0.5, 0.0, 5.0,
                                  equal_area_transformation(srs, 487030.0, 5205970.0))
    areas = sorted(r.area for r in kept)
    assert areas == [25.0, 100.0, 400.0]
    pixel = min(kept, key=lambda r: r.area).geometry
    assert pixel.equals(shapely.box(487005.0, 5205990.0, 487010.0, 5205995.0))


def test_crop_to_window_cuts_the_map_and_moves_its_origin():
    from backend.segment import crop_to_window

    rel = np.arange(100, dtype=np.float32).reshape(10, 10)
    gt = (1000.0, 2.0, 0.0, 5000.0, 0.0, -2.0)
    cropped, new_gt = crop_to_window(rel, gt, (2, 3, 3, 6))
    assert cropped.shape == (6, 3) and cropped[0, 0] == rel[3, 2]
    assert new_gt == (1004.0, 2.0, 0.0, 4994.0, 0.0, -2.0)
    assert crop_to_window(np.stack([rel, rel]), gt, (2, 3, 3, 6))[0].shape == (2, 6, 3)
    assert crop_to_window(rel, gt, None)[0] is rel


def test_the_cut_map_is_the_extent_segmented_also_on_a_resampled_grid(checkpoint, tmp_path):
    """The window of a small extent's own pixels is the one its polygons come from (`inside`),
    also where working pixels are coarser than the raster's and their centres fall on its edges."""
    from backend.engine import ModelEngine
    from backend.raster import open_raster
    from backend.segment import segment
    from test_raster import make_tif, noise

    path = make_tif(tmp_path / "scene.tif", noise((3, 300, 400), seed=2))
    engine = ModelEngine(checkpoint, "cpu")
    try:
        with open_raster(path) as raster:
            gt = raster.geotransform
            x0, y0 = gt[0] + 181 * gt[1], gt[3] + 131 * gt[5]        # odd offsets, 2x coarser working pixels
            extent = (x0, y0 + 30 * gt[5], x0 + 30 * gt[1], y0)
            out = segment(raster, ["trees"], engine, extent=extent, threshold=0.0, edge_radius=0,
                          keep_relevance=True, target_resolution=2 * abs(gt[1]))
    finally:
        engine.stop()
    c0, r0, w, h = out.window
    relevance = out.results[0].relevance
    outside = np.ones(relevance.shape, bool)
    outside[r0:r0 + h, c0:c0 + w] = False
    assert (relevance[outside] == 0).all()                            # nothing of the extent is cut off
    assert (relevance[r0:r0 + h, c0:c0 + w] > 0).all()                # and no zero row or column is kept
    assert abs(w * out.geotransform[1] - 30 * gt[1]) <= 2 * abs(gt[1])


def test_the_relevance_map_of_a_small_extent_covers_that_extent(server, rasters):
    """A small extent is segmented with a tile of ground around it; the relevance GeoTIFF the server
    returns is the extent's own (as SegmentRequest.return_relevance_map says), not the wider read."""
    from osgeo import gdal

    from backend.rpc import skyprompt_pb2 as pb

    ds = gdal.Open(str(rasters["rgb"]))
    gt = ds.GetGeoTransform()
    ds = None
    x0, y0 = gt[0] + 180 * gt[1], gt[3] + 130 * gt[5]                  # a 24 x 24 pixel extent inside
    extent = (x0, y0 + 24 * gt[5], x0 + 24 * gt[1], y0)
    request = pb.SegmentRequest(source=pb.RasterSource(path=str(rasters["rgb"])), prompts=["trees"],
                                extent=pb.Extent(xmin=extent[0], ymin=extent[1], xmax=extent[2], ymax=extent[3]),
                                return_relevance_map=True, edge_radius=0)
    (result,) = [e.result for e in server.stub.Segment(request, metadata=server.metadata, timeout=120)
                 if e.HasField("result")]
    name = "/vsimem/test-relevance.tif"
    gdal.FileFromMemBuffer(name, result.relevance_map_tiff)
    try:
        ds = gdal.Open(name)
        t, w, h = ds.GetGeoTransform(), ds.RasterXSize, ds.RasterYSize
        ds = None
    finally:
        gdal.Unlink(name)
    assert (w, h) == (24, 24)
    assert (t[0], t[3] + h * t[5], t[0] + w * t[1], t[3]) == pytest.approx(extent)


def test_every_result_is_at_least_the_minimum_area():
    """A minimum area is kept by each result a user sees: a large region's corner-touching specks
    are parts of that region's result, not results of their own under the minimum."""
    srs = _srs("EPSG:32633")
    rng = np.random.default_rng(3)
    relevance = (rng.random((60, 60)) > 0.55).astype(float)          # speckle: many corner contacts
    relevance[10:40, 10:40] = 1.0
    args = (np.ones((60, 60), bool), (500000.0, 1.0, 0.0, 5000000.0, 0.0, -1.0), srs, 0.5, 0.0, 1.0,
            equal_area_transformation(srs, 500030.0, 4999970.0))
    kept, dropped = polygons_for_prompt(relevance, *args, min_area_m2=20.0)
    assert kept and dropped > 0
    assert all(r.area_m2 >= 20.0 for r in kept), sorted(r.area_m2 for r in kept)[:5]
    assert all(r.area == pytest.approx(r.geometry.area) for r in kept)


def _zone_area_m2(lat1: float, lat2: float, dlon: float) -> float:
    """Area of the WGS84 ellipsoid between two parallels over `dlon` degrees of longitude, in closed form."""
    import math

    a, f = 6378137.0, 1 / 298.257223563
    e = math.sqrt(f * (2 - f))
    b = a * (1 - f)

    def q(lat):
        s = math.sin(math.radians(lat))
        return s / (1 - (e * s) ** 2) + math.log((1 + e * s) / (1 - e * s)) / (2 * e)
    return math.radians(dlon) * b ** 2 / 2 * (q(lat2) - q(lat1))


def test_ground_areas_are_right_at_the_poles_and_along_parallels():
    """Ground areas against the ellipsoid's in closed form: a longitude/latitude box near the north
    pole (its edges along parallels), a disc round the south pole in a polar CRS, and a square round
    the pole that equals its four quarters (the square holding the pole was 59% too large)."""
    import math

    from backend.segment import geodesic_area_m2

    lonlat = _srs("EPSG:4326")
    box = shapely.box(10.0, 88.0, 20.0, 89.0)
    assert geodesic_area_m2(box, equal_area_transformation(lonlat, 15.0, 88.5)) == pytest.approx(
        _zone_area_m2(88.0, 89.0, 10.0), rel=1e-4)
    polar = _srs("EPSG:3031")
    to_area = equal_area_transformation(polar, 0.0, 0.0)
    # the parallel of 89.9 S, as points in EPSG:3031
    to_polar = osr.CoordinateTransformation(lonlat, polar)
    ring = np.asarray(to_polar.TransformPoints([[lon, -89.9] for lon in np.linspace(0, 360, 721)[:-1]]))[:, :2]
    assert geodesic_area_m2(shapely.Polygon(ring), to_area) == pytest.approx(_zone_area_m2(-90.0, -89.9, 360.0),
                                                                           rel=1e-4)
    square = geodesic_area_m2(shapely.box(-1000.0, -1000.0, 1000.0, 1000.0), to_area)
    quarters = [geodesic_area_m2(shapely.box(x, y, x + 1000.0, y + 1000.0), to_area)
                for x in (-1000.0, 0.0) for y in (-1000.0, 0.0)]
    assert square == pytest.approx(sum(quarters), rel=1e-6)
    assert all(q == pytest.approx(quarters[0], rel=1e-6) for q in quarters)
    # true to scale at 71 S, the map is about 3% too small at the pole: a 2 km square there is more ground
    assert math.isfinite(square) and 4.0e6 < square < 4.5e6


def test_segment_of_a_whole_globe_view_stops_at_the_rim(checkpoint, tmp_path):
    """A world raster under an orthographic view of the whole globe: the pixels kept are those whose
    centres the globe shows, to the pixel (the area's polygon follows the rim only to a 64th of the
    raster, and polygons reached 6 pixels onto the hidden side)."""
    import shapely

    from backend.engine import ModelEngine
    from backend.raster import open_raster
    from backend.segment import segment
    from test_raster import make_tif, noise

    path = make_tif(tmp_path / "world.tif", noise((3, 180, 360), seed=4), crs="EPSG:4326",
                    geotransform=(-180.0, 1.0, 0.0, 90.0, 0.0, -1.0))
    view = (-7e6, -7e6, 7e6, 7e6, "+proj=ortho +lat_0=0 +lon_0=0 +datum=WGS84")
    engine = ModelEngine(checkpoint, "cpu")
    try:
        with open_raster(path) as raster:
            out = segment(raster, ["trees"], engine, extent=view, threshold=0.0, edge_radius=0, min_area_m2=0.0)
    finally:
        engine.stop()
    polygons = [p.geometry for r in out.results for p in r.polygons]
    assert polygons
    west, _, east, _ = shapely.union_all(polygons).bounds
    assert -91.0 <= west < -85.0 and 85.0 < east <= 91.0, (west, east)


def test_specks_and_pinholes_below_the_smallest_region_are_merged_into_their_surroundings():
    """A one-pixel speck beside a region, and a one-pixel hole in it, are noise of the upsampled map:
    merged away before polygons are made, while a region of the smallest size stays."""
    srs = _srs("EPSG:32633")
    relevance = np.zeros((30, 30))
    relevance[2:14, 2:14] = 1.0
    relevance[7, 7] = 0.0                       # a pinhole
    relevance[20, 20] = 1.0                     # a speck
    relevance[20:24, 25:29] = 1.0               # 16 pixels: the smallest region kept
    args = (np.ones((30, 30), bool), (500000.0, 1.0, 0.0, 5000000.0, 0.0, -1.0), srs, 0.5, 0.0, 0.0, None)
    before, _ = polygons_for_prompt(relevance, *args)
    assert sorted(r.area for r in before) == [1.0, 16.0, 143.0]
    after, dropped = polygons_for_prompt(relevance, *args, speck_pixels=16)
    assert sorted(r.area for r in after) == [16.0, 144.0] and dropped == 0
    assert all(not r.geometry.interiors for r in after)


def test_segment_makes_no_region_smaller_than_a_quarter_of_a_model_patch(checkpoint, tmp_path):
    """Through Segment itself, on noise that a random model maps to a ragged relevance map: no
    polygon is smaller than a quarter of the model's patch, in working pixels (one-pixel squares
    were most of its polygons)."""
    from backend.engine import ModelEngine
    from backend.raster import open_raster
    from backend.segment import segment
    from test_raster import make_tif, noise

    path = make_tif(tmp_path / "scene.tif", noise((3, 200, 260), seed=5))
    engine = ModelEngine(checkpoint, "cpu")
    try:
        smallest = engine.config.patch_size ** 2 / 4
        with open_raster(path) as raster:
            pixel_area = abs(raster.geotransform[1] * raster.geotransform[5])
            # the threshold at the map's median: half of it in, in the ragged pattern of noise
            first = segment(raster, ["trees"], engine, threshold=1.0, keep_relevance=True)
            median = float(np.median(first.results[0].relevance))
            out = segment(raster, ["trees"], engine, threshold=median)
    finally:
        engine.stop()
    areas = [p.area / pixel_area for result in out.results for p in result.polygons]
    assert smallest > 1 and areas
    assert min(areas) >= smallest - 0.5, sorted(areas)[:5]
