"""The Processing algorithms' outputs as files: what a write that fails (a full disk) leaves, and the
OUTPUT values a user may give. The writing is called as the algorithms call it, with features made
here: no backend is needed."""
from __future__ import annotations

import os
import resource
import signal
from contextlib import contextmanager

import pytest
from qgis.core import (QgsCoordinateReferenceSystem, QgsFeature, QgsGeometry, QgsProcessingContext,
                       QgsProcessingException, QgsProcessingFeedback, QgsProcessingOutputLayerDefinition, QgsProject)

from test_plugin import gpkg_with_a_roads_layer, QgsVectorLayerFrom

from plugin import results
from plugin.processing_provider import PromptToPolygonsAlgorithm

UTM33 = QgsCoordinateReferenceSystem("EPSG:32633")


@contextmanager
def files_limited_to(size: int):
    """No file written in the block grows past `size` bytes: the system refuses the write, as a
    full disk does (SIGXFSZ, which would end the process, is ignored so that the write fails)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def polygons(count: int) -> list[QgsFeature]:
    """`count` squares side by side, with Prompt to polygons' fields (a long prompt: about 300 bytes each)."""
    fields = results.segment_fields()
    out = []
    for i in range(count):
        f = QgsFeature(fields)
        f.setGeometry(QgsGeometry.fromWkt(f"POLYGON(({i} 0, {i + 1} 0, {i + 1} 1, {i} 1, {i} 0))"))
        f.setAttributes(["x" * 200, 0.5, 0.6, 1.0])
        out.append(f)
    return out


def write(output, features: list[QgsFeature]) -> str:
    """Prompt to polygons' writing of `features` into OUTPUT `output` (a path, or an output definition
    as the Processing dialog gives): the layer source it returns."""
    algorithm = PromptToPolygonsAlgorithm()
    algorithm.initAlgorithm()
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    feedback = QgsProcessingFeedback()
    context.setFeedback(feedback)
    return algorithm._write({"OUTPUT": output}, context, feedback, features, results.segment_fields(), UTM33)


def test_a_new_geopackage_the_disk_cannot_hold_stops_the_run_and_is_not_left(qgis_processing, tmp_path):
    """The GeoPackage writer commits as it closes, and QGIS only logged a failed commit ("database or
    disk is full"): the run returned "out.gpkg|layername=out", a layer that does not open."""
    path = tmp_path / "out.gpkg"
    with files_limited_to(200 * 1024), pytest.raises(QgsProcessingException) as err:
        write(str(path), polygons(4000))
    assert str(err.value).startswith(f"could not write {path}: "), err.value
    assert os.listdir(tmp_path) == []
    # an empty file (a temporary file's name, made beforehand) is left empty
    path.touch()
    with files_limited_to(200 * 1024), pytest.raises(QgsProcessingException, match="could not write"):
        write(str(path), polygons(4000))
    assert os.listdir(tmp_path) == ["out.gpkg"] and path.stat().st_size == 0


def test_a_layer_the_disk_cannot_hold_is_taken_out_of_an_existing_geopackage_and_the_rest_kept(
        qgis_processing, tmp_path):
    survey = gpkg_with_a_roads_layer(tmp_path / "survey.gpkg")
    with files_limited_to(survey.stat().st_size + 100 * 1024), pytest.raises(QgsProcessingException) as err:
        write(str(survey), polygons(4000))
    assert str(err.value).startswith(f"could not write {survey}: "), err.value
    assert results.gpkg_layer_names(str(survey)) == ["roads"]
    assert QgsVectorLayerFrom(f"{survey}|layername=roads").featureCount() == 1
    # and a write that fits adds its layer beside it, as before
    assert write(str(survey), polygons(3)) == f"{survey}|layername=survey"
    assert QgsVectorLayerFrom(f"{survey}|layername=survey").featureCount() == 3


def test_a_feature_processings_own_sink_cannot_write_stops_the_run(qgis_processing, tmp_path):
    """A shapefile (Processing's sink) said each feature it could not write in the log, and the run
    ended as a success. The half-written file goes, with its .dbf, .shx, ... (the sink had replaced
    whatever was there)."""
    path = tmp_path / "out.shp"
    with files_limited_to(100 * 1024), pytest.raises(QgsProcessingException) as err:
        write(str(path), polygons(4000))
    assert str(err.value).startswith(f"could not write {path}: "), err.value
    assert os.listdir(tmp_path) == []


def test_a_layers_address_as_output_writes_a_layer_of_that_name_into_its_file(qgis_processing, tmp_path):
    """A layer dragged from the Browser onto OUTPUT ("x.gpkg|layername=roads") made a file of that
    name, "x.gpkg|layername=roads.gpkg", and returned a layer source that does not open. It names the
    file and the layer to write there, numbered as a rerun's is: the user's layer is never replaced."""
    survey = gpkg_with_a_roads_layer(tmp_path / "survey.gpkg")
    assert write(f"{survey}|layername=roads", polygons(3)) == f"{survey}|layername=roads (2)"
    assert write(f"{survey}|layername=fields", polygons(2)) == f"{survey}|layername=fields"
    assert os.listdir(tmp_path) == ["survey.gpkg"]
    assert sorted(results.gpkg_layer_names(str(survey))) == ["fields", "roads", "roads (2)"]
    counts = {name: QgsVectorLayerFrom(f"{survey}|layername={name}").featureCount()
              for name in ("roads", "roads (2)", "fields")}
    assert counts == {"roads": 1, "roads (2)": 3, "fields": 2}, counts
    # a new file; and another format's layer address: its file, written by Processing's sink
    new = tmp_path / "new.gpkg"
    assert write(f"{new}|layername=trees", polygons(1)) == f"{new}|layername=trees"
    shapefile = tmp_path / "a.shp"
    assert write(f"{shapefile}|layername=a", polygons(2)) == str(shapefile)
    assert QgsVectorLayerFrom(str(shapefile)).featureCount() == 2
    # as the Processing dialog gives it, an output definition
    other = tmp_path / "b.shp"
    assert write(QgsProcessingOutputLayerDefinition(f"{other}|layername=b"), polygons(2)) == str(other)
    assert sorted(n for n in os.listdir(tmp_path) if "|" in n) == []
    # the file's own name may hold a "|": the address is read as QGIS reads it, not cut at the first one
    piped = gpkg_with_a_roads_layer(tmp_path / "east|west.gpkg")
    assert write(f"{piped}|layername=fields", polygons(2)) == f"{piped}|layername=fields"
    assert sorted(results.gpkg_layer_names(str(piped))) == ["fields", "roads"]
    assert not os.path.exists(tmp_path / "east")


def test_a_shapefile_output_declares_its_text_fields_as_wide_as_it_keeps(tmp_path, capfd):
    """Text fields declared with no width became 255-byte shapefile fields, which GDAL cut to 254 with
    a warning on the console for every field of every run ("Field prompt of width 255 truncated to
    254"); they are declared 254 bytes wide, short values stay whole, and a longer one is cut to
    whole characters within 254 bytes (and said so in the log)."""
    features = polygons(3)
    features[0]["prompt"] = "trees"
    features[1]["prompt"] = "é" * 200                  # 400 bytes of two-byte characters
    source = write(str(tmp_path / "out.shp"), features)
    assert "truncated to 254" not in capfd.readouterr().err
    layer = QgsVectorLayerFrom(source)
    assert layer.fields().field("prompt").length() == 254
    prompts = sorted(f["prompt"] for f in layer.getFeatures())
    assert prompts == sorted(["trees", "x" * 200, "é" * 127]), [len(p) for p in prompts]
    del layer
