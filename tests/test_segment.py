"""Polygons from a relevance map: the minimum ground area and the sliver rule (backend.segment)."""
import numpy as np
import pytest
from osgeo import osr

from backend.segment import clean_polygon, polygons_for_prompt, wgs84_transform


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
            wgs84_transform(srs))
    kept, dropped = polygons_for_prompt(relevance, *args, min_area_m2=7.5)
    assert dropped == 0 and len(kept) == 2                   # the two parts stand together
    assert sum(r.area_m2 for r in kept) == pytest.approx(8.0, rel=0.01)
    kept, dropped = polygons_for_prompt(relevance, *args, min_area_m2=8.5)
    assert kept == [] and dropped == 1                        # fall together: one region counted


def test_min_area_m2_is_ground_area_on_a_longitude_latitude_raster():
    srs = _srs("EPSG:4326")
    degree = 1e-4                                             # about 11 m x 5.6 m at 60 N
    relevance = np.zeros((8, 8))
    relevance[2:5, 2:5] = 1.0
    gt = (10.0, degree, 0.0, 60.0, 0.0, -degree)
    args = (np.ones((8, 8), bool), gt, srs, 0.5, 0.0, 0.0, wgs84_transform(srs))
    (whole,), _ = polygons_for_prompt(relevance, *args)
    assert whole.area == pytest.approx(9 * degree ** 2)       # map units: square degrees
    assert 500 < whole.area_m2 < 600                          # 9 x 11.1 m x 5.57 m
    kept, dropped = polygons_for_prompt(relevance, *args, min_area_m2=whole.area_m2 * 0.9)
    assert len(kept) == 1 and dropped == 0
    kept, dropped = polygons_for_prompt(relevance, *args, min_area_m2=whole.area_m2 * 1.1)
    assert kept == [] and dropped == 1


def test_min_area_m2_keeps_regions_whose_ground_area_is_unknown():
    srs = _srs('LOCAL_CS["site grid",UNIT["metre",1]]')       # no transform to longitude/latitude
    assert wgs84_transform(srs) is None
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
