"""Imagery + map features -> captioned tiles (the "RS-Landmarks" recipe).

Rasters are cut with the backend's tiler (`backend.raster.Raster.iter_tiles_with_pixels`: the one
tiler of the project; tiles mostly nodata/alpha are skipped there). Vector features from any OGR
source (GeoPackage, GeoJSON, Shapefile, OpenStreetMap .osm/.pbf) are reprojected, each layer from
its own CRS, to each raster's CRS and found per tile (its footprint) through a shapely STRtree.
A feature counts for a tile when
- an area covers at least `min_cover` of the tile, or lies wholly inside it and is small
  (under `max_object` of the tile) - a named point or small object counts when inside (a point
  on the tile's edge too);
- a line (road, river) runs at least `min_line` tile sides inside it.
Its words come from a tag -> phrase mapping (training/datasets/osm_tags.tsv, extendable) and its name.

Work is cut into units (one raster, `unit_tiles` consecutive tiles of its grid); each unit writes
one tar shard (key.jpg, key.txt, key.json) and a manifest part, atomically, so a re-run skips
finished units and units run in parallel (local processes or Ray).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shlex
import subprocess
import tarfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import shapely
from osgeo import gdal, ogr, osr
from PIL import Image
from shapely.strtree import STRtree

from ..labels import assumed_label_crs, defined_crs, label_layer, layer_names, set_filter
from .outputs import LANDMARKS_SHARD, foreign_files, listed

DEFAULT_MAPPING = Path(__file__).resolve().parent / "osm_tags.tsv"
KINDS = ("object", "line", "cover")
OSM_LAYERS = ("points", "lines", "multilinestrings", "multipolygons", "other_relations")
_HSTORE = re.compile(r'"((?:[^"\\]|\\.)*)"=>"((?:[^"\\]|\\.)*)"')


class BuildError(ValueError):
    """Bad input the user can fix: the message names the file (and line)."""


# ---- tag mapping ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    key: str
    value: str          # "*" = any
    phrase: str
    kind: str


def read_mapping(path: str | os.PathLike) -> list[Rule]:
    """Rules from a TAG<TAB>PHRASE<TAB>KIND file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise BuildError(f"tag mapping {path} does not exist")
    rules = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise BuildError(f"{path} line {n}: expected TAG<TAB>PHRASE<TAB>KIND (3 tab-separated fields), "
                             f"got {len(parts)}: {line.strip()!r}")
        tag, phrase, kind = (p.strip() for p in parts)
        if "=" not in tag or not tag.split("=", 1)[0] or not tag.split("=", 1)[1]:
            raise BuildError(f"{path} line {n}: tag {tag!r} must be key=value or key=*")
        if kind not in KINDS:
            raise BuildError(f"{path} line {n}: kind {kind!r} must be one of {', '.join(KINDS)}")
        if not phrase:
            raise BuildError(f"{path} line {n}: empty phrase")
        key, value = tag.split("=", 1)
        rules.append(Rule(key.strip(), value.strip(), phrase, kind))
    if not rules:
        raise BuildError(f"tag mapping {path} has no rules")
    return rules


def match(rules: list[Rule], tags: dict[str, str]) -> tuple[str, str] | None:
    """(phrase, kind) of the first rule the tags satisfy, or None."""
    for r in rules:
        v = tags.get(r.key)
        if v is None or v in ("no", "") or (r.value != "*" and v != r.value):
            continue
        return r.phrase.replace("{value}", v.replace("_", " ")), r.kind
    return None


# ---- features -------------------------------------------------------------------------------------
@dataclass
class Feature:
    geometry: object            # shapely, in the source's CRS until reprojected
    name: str
    phrase: str | None
    kind: str                   # object | line | cover
    tags: dict
    source: str
    number: int = -1            # its place among the features read from its layer


_UNDECODED_BYTE = re.compile("[\udc80-\udcff]")


def _text(value: str) -> str:
    """Field text as Unicode: GDAL hands bytes that are not UTF-8 (a Latin-1 shapefile whose .cpg says
    UTF-8, a GeoJSON saved in Latin-1) through as surrogates, which no caption file can hold; each is
    read as the Latin-1 character of its byte, the likeliest encoding, and the text around it stays."""
    return _UNDECODED_BYTE.sub(lambda m: chr(ord(m.group()) - 0xDC00), value)


def _tags_of(feature: ogr.Feature, defn: ogr.FeatureDefn) -> dict[str, str]:
    tags = {}
    for i in range(defn.GetFieldCount()):
        name = _text(defn.GetFieldDefn(i).GetName())
        if not feature.IsFieldSetAndNotNull(i):
            continue
        if name == "other_tags":        # the OSM driver's hstore of the remaining tags
            tags.update({k.replace('\\"', '"'): v.replace('\\"', '"')
                         for k, v in _HSTORE.findall(_text(feature.GetFieldAsString(i)))})
        elif name not in ("osm_id", "osm_way_id", "fid"):
            tags[name] = _text(feature.GetFieldAsString(i))
    return tags


def read_features(path: str | os.PathLike, rules: list[Rule], layers: list[str] | None = None,
                  where: str | None = None) -> tuple[list[tuple[str, osr.SpatialReference | None, list[Feature]]], dict]:
    """Features with a name or a mapped phrase, grouped by layer as (layer name, the layer's CRS, features),
    and counts of those read in all ("read") and of those left out for want of a geometry ("no_geometry")
    or of a name and a caption rule they match ("no_rule"). Each layer keeps its own CRS: a GeoPackage's
    layers may differ."""
    path = str(path)
    ds = ogr.Open(path)
    if ds is None:
        raise BuildError(f"{path} is not a vector file OGR can open")
    names = layers or ([n for n in OSM_LAYERS if ds.GetLayerByName(n)] if ds.GetDriver().GetName() == "OSM"
                       else layer_names(ds))
    groups, refused = [], []
    counts = {"read": 0, "no_geometry": 0, "no_rule": 0}
    for name in names:
        layer = label_layer(ds, path, name, BuildError)
        if where:
            try:
                set_filter(layer, where, f"{path} layer {name}", BuildError)
            except BuildError as e:
                if layers:              # a layer asked for by name must take the filter
                    raise
                refused.append(e)       # one of several (an OSM file's points, lines, ...) without its fields
                continue
        out = []
        defn = layer.GetLayerDefn()
        for f in layer:
            counts["read"] += 1
            g = f.GetGeometryRef()
            if g is None or g.IsEmpty():
                counts["no_geometry"] += 1
                continue
            tags = _tags_of(f, defn)
            hit = match(rules, tags)
            name_tag = tags.get("name", "").strip()
            if hit is None and not name_tag:
                counts["no_rule"] += 1
                continue
            phrase, kind = hit if hit else (None, "object")
            if g.HasCurveGeometry():        # circular arcs and curve polygons: as straight segments
                g = g.GetLinearGeometry()
            geom = shapely.make_valid(shapely.from_wkb(bytes(g.ExportToIsoWkb())))
            out.append(Feature(geom, name_tag, phrase, kind, tags, os.path.basename(path), counts["read"]))
        groups.append((name, defined_crs(layer.GetSpatialRef()), out))
    if refused and not groups:
        raise BuildError(f"{refused[0]}; no layer of {path} takes it (give --layer for the one whose fields it names)")
    return groups, counts


def _crs_label(srs: osr.SpatialReference) -> str:
    from backend.raster import crs_authid

    return crs_authid(srs) or repr(srs.GetName() or "an unnamed CRS")


# formats whose coordinates are longitude/latitude by definition, whatever their layers say
LONLAT_FORMATS = (".geojson", ".json", ".osm", ".pbf")


_FRAMES_CACHE: dict = {}


def _raster_frames(cfg: "LandmarksConfig") -> list[tuple[osr.SpatialReference, tuple]]:
    """(CRS, bounds in it) of each of the run's rasters that can be read; opened once per process for
    every layer that says no CRS (keyed by the rasters as they are now, as _features_for's cache is)."""
    from backend.raster import RasterError

    stamps = tuple((p, *((st.st_size, st.st_mtime_ns) if (st := _stat(p)) else ())) for p in cfg.rasters)
    key = (stamps, tuple(cfg.bands or ()))
    if key in _FRAMES_CACHE:
        return _FRAMES_CACHE[key]
    frames = []
    for path in cfg.rasters:
        try:
            with _open(cfg, path) as raster:
                frames.append((raster.srs.Clone(), tuple(raster.bounds)))
        except RasterError:
            continue                    # unreadable: planning says so
    _FRAMES_CACHE.clear()
    _FRAMES_CACHE[key] = frames
    return frames


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def features_crs(cfg: "LandmarksConfig", source: str, layer: str, srs: osr.SpatialReference | None,
                 features: list[Feature]) -> tuple[osr.SpatialReference, str | None]:
    """The CRS of a layer's features and a note where it was assumed (else None). A layer that says
    none is read by the rule `evaluate segmentation --raster` follows (training.labels.assumed_label_crs),
    for one build as a whole: in the CRS of the first raster whose extent its features overlap in
    it, else as longitude/latitude where its numbers can be, else refused; GeoJSON and OSM data are
    longitude/latitude by definition."""
    if srs is not None:
        return srs, None
    if str(source).lower().endswith(LONLAT_FORMATS) or not features:
        lonlat = osr.SpatialReference()
        lonlat.ImportFromEPSG(4326)
        lonlat.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
        return lonlat, None
    extent = shapely.total_bounds([f.geometry for f in features])
    what, fallback, refusal = f"{source} (layer {layer})", None, None
    for raster_srs, bounds in _raster_frames(cfg):
        try:
            chosen, note = assumed_label_crs(extent, raster_srs, bounds, what, BuildError)
        except BuildError as e:
            refusal = e
            continue
        if chosen.IsSame(raster_srs):
            return chosen, note
        fallback = fallback or (chosen, note)
    if fallback:
        return fallback
    raise refusal or BuildError(f"{what} says no CRS, and no raster could be read to place it")


def reproject(features: list[Feature], src: osr.SpatialReference, dst: osr.SpatialReference,
              source: str = "the features", target: str = "the raster") -> list[Feature]:
    """Features moved from `src` to `dst`; BuildError (naming `source`, `target` and both CRSs) when
    there is no transformation between them, e.g. a local engineering CRS and a geographic one."""
    a, b = src.Clone(), dst.Clone()
    a.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    b.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    if a.IsSame(b):
        return list(features)
    # Create... returns None (or raises, when GDAL exceptions are on) where the constructor would fail
    # with a TypeError; the quiet handler keeps GDAL's own message off stderr: ours names the files
    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        ct = osr.CreateCoordinateTransformation(a, b)
    except RuntimeError:
        ct = None
    finally:
        gdal.PopErrorHandler()
    if ct is None:
        raise BuildError(f"cannot reproject {source} from {_crs_label(a)} to {_crs_label(b)}, the CRS of {target}: "
                         "there is no transformation between them; give features in the raster's CRS or one "
                         "that can be transformed to it")

    def fwd(coords):
        pts = ct.TransformPoints([(float(x), float(y)) for x, y in coords])
        return np.array([(p[0], p[1]) for p in pts])

    out = []
    # points with no place in the target (numbers of another CRS read as degrees) become infinite and
    # the feature is dropped below; GDAL's own line per point would only repeat that
    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        for f in features:
            try:
                g = shapely.transform(f.geometry, fwd)
            except RuntimeError:        # with GDAL exceptions on
                continue
            if g.is_valid and not g.is_empty and np.isfinite(shapely.bounds(g)).all():
                out.append(replace(f, geometry=g))
    finally:
        gdal.PopErrorHandler()
    return out


# ---- per tile -------------------------------------------------------------------------------------
@dataclass
class Thresholds:
    min_cover: float = 0.3       # an area covering this share of the tile counts
    max_object: float = 0.25     # an area wholly inside and smaller than this share counts as an object
    min_line: float = 0.5        # a line counts with this many tile sides of length inside


def features_in_tile(tree: STRtree, features: list[Feature], box, t: Thresholds) -> list[dict]:
    """The features that count for a tile (`box`: its footprint polygon), each with its share of the
    tile (areas) or length (lines)."""
    area = box.area
    side = box.length / 4
    used = []
    for i in tree.query(box, predicate="intersects"):
        f = features[int(i)]
        g = f.geometry
        dim = shapely.get_dimensions(g)
        # covers, not contains: a point on a tile's edge or corner has no part in its interior, and
        # would count for none of the tiles that share that edge
        inside = box.covers(g)
        if dim == 0:
            ok, share = inside, 0.0
        elif dim == 1:
            length = shapely.intersection(g, box).length
            ok, share = length >= t.min_line * side, length / side
        else:
            share = shapely.intersection(g, box).area / area
            ok = share >= t.min_cover or (inside and g.area <= t.max_object * area)
        if ok:
            used.append({"name": f.name, "phrase": f.phrase, "kind": f.kind if dim == 2 or f.kind != "cover"
                         else "object", "share": round(float(share), 4), "tags": f.tags, "source": f.source,
                         "geometry": "point" if dim == 0 else "line" if dim == 1 else "area"})
    return used


# ---- captions -------------------------------------------------------------------------------------
_OPENINGS = ("an aerial image of {}", "a satellite view of {}", "an overhead photo showing {}",
             "aerial imagery of {}", "a top-down view of {}")


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def template_caption(features: list[dict], seed: str) -> str:
    """A sentence from the tile's features: names first, then objects and lines, then the dominant
    cover ("mostly farmland"). Pattern and order are drawn from `seed` (the sample key)."""
    rng = random.Random(seed)
    named = sorted((f for f in features if f["name"]), key=lambda f: -f["share"])
    names = list(dict.fromkeys(f["name"] for f in named))[:2]
    things = [f for f in features if f["kind"] in ("object", "line") and f["phrase"] and not f["name"]]
    phrases = list(dict.fromkeys(f["phrase"] for f in sorted(things, key=lambda f: -f["share"])))[:3]
    covers = sorted((f for f in features if f["kind"] == "cover" and f["phrase"]), key=lambda f: -f["share"])
    cover = ""
    if covers:
        c = covers[0]
        cover = f"mostly {c['phrase']}" if c["share"] >= 0.5 else f"among {c['phrase']}"
    subject = _join(names) if names else (phrases.pop(0) if phrases else (covers[0]["phrase"] if covers else "land"))
    text = rng.choice(_OPENINGS).format(subject)
    if phrases:
        text += rng.choice((" with ", " next to ", " and ")) + _join(phrases)
    if cover and not (not names and not phrases and covers and subject == covers[0]["phrase"]):
        text += ", " + cover if rng.random() < 0.5 else " " + ("in an area of " + covers[0]["phrase"]
                                                                if cover.startswith("among") else cover)
    return text


CAPTIONER_TIMEOUT_S = 300


def captioner_command(spec: str) -> list[str]:
    """The argv of a --captioner command: the whole string when it names a file (a path with spaces
    needs no quotes), else the string split as a shell splits it ("python3 'my data/cap.py' --flag").
    BuildError, showing the argv, when its program cannot be run."""
    import shutil

    if os.path.isfile(spec):
        cmd = [spec]
    else:
        try:
            cmd = shlex.split(spec)
        except ValueError as e:
            raise BuildError(f"--captioner {spec!r} cannot be read as a command ({e}): close its quotes") from None
    if not cmd:
        raise BuildError("--captioner is empty: give a command or module:function")
    if shutil.which(cmd[0]) is None and os.path.isfile(cmd[0]) and os.access(cmd[0], os.X_OK):
        cmd[0] = os.path.abspath(cmd[0])    # "cap.sh" in this folder: which() looks there only for "./cap.sh"
    if shutil.which(cmd[0]) is None:
        found = os.path.isfile(cmd[0])
        raise BuildError(f"cannot run the captioner {spec!r}: tried the command {cmd}, and {cmd[0]!r} is "
                         + ("not executable (make it so, or name its interpreter first: 'python3 cap.py')"
                            if found else "no program or file")
                         + "; quote a path with spaces inside the option, e.g. "
                           "--captioner \"'/path/my data/cap tool.sh' --flag\"")
    return cmd


def load_captioner(spec: str | None) -> Callable[[dict], str]:
    """The template captioner (None), a Python function "module:function" (receives the tile's JSON
    as a dict, returns text), or a command that reads the JSON on stdin and prints the caption
    (captioner_command)."""
    if not spec:
        return lambda info: template_caption(info["features"], info["key"])
    if re.fullmatch(r"[\w.]+:\w+", spec):
        import importlib

        module, name = spec.split(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise BuildError(f"--captioner {spec}: {e}") from None

        def call(info: dict) -> str:
            try:
                return str(fn(info))
            except Exception as e:  # noqa: BLE001 - the user's code: said in one line, as a command's failure is
                raise BuildError(f"captioner {spec} failed on tile {info.get('key')} ({type(e).__name__}: {e}); "
                                 "finished units are kept, fix it and run again to resume") from None

        return call
    cmd = captioner_command(spec)

    def run(info: dict) -> str:
        try:
            p = subprocess.run(cmd, input=json.dumps(info), capture_output=True, text=True,
                               timeout=CAPTIONER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise BuildError(f"captioner {spec!r} gave no caption within {CAPTIONER_TIMEOUT_S} s for tile "
                             f"{info.get('key')}; finished units are kept, run again to resume") from None
        except OSError as e:
            raise BuildError(f"cannot run the captioner {spec!r} (the command {cmd}): {e.strerror or e}") from None
        if p.returncode != 0:
            raise BuildError(f"captioner {spec!r} failed ({p.returncode}): {p.stderr.strip()[-300:]}")
        return p.stdout.strip()

    return run


# ---- units of work --------------------------------------------------------------------------------
@dataclass
class LandmarksConfig:
    rasters: list[str]
    features: list[str]
    out: str
    layers: list[str] | None = None
    where: str | None = None
    mapping: list[str] = field(default_factory=list)      # extra mapping files, before the default
    tile_size: int = 256
    overlap: float = 0.0
    resolution: float | None = None                       # map units per pixel (default native)
    min_valid: float = 0.9
    thresholds: Thresholds = field(default_factory=Thresholds)
    captioner: str | None = None
    unit_tiles: int = 256
    jpeg_quality: int = 90
    bands: list[int] | None = None                        # 1-based red, green, blue (default: the raster's)


def _open(cfg: LandmarksConfig, path: str):
    """open_raster with the run's --bands."""
    from backend.raster import BandMapping, open_raster

    return open_raster(path, BandMapping(*cfg.bands) if cfg.bands else None)


def rules_for(cfg: LandmarksConfig) -> list[Rule]:
    return [r for p in [*cfg.mapping, DEFAULT_MAPPING] for r in read_mapping(p)]


def plan_units(cfg: LandmarksConfig) -> tuple[list[dict], list[dict], list[str]]:
    """(units, problems, notes): one unit per `unit_tiles` planned tiles of each readable raster; unreadable
    rasters become problems (skipped and counted), not errors; notes: the reader's word on each raster
    whose colour bands it guessed (Raster.band_note)."""
    from backend.raster import RasterError

    units, problems, notes = [], [], []
    for r, path in enumerate(cfg.rasters):
        try:
            with _open(cfg, path) as raster:
                if raster.band_note:
                    # said as the option here is named
                    notes.append(raster.band_note.replace("BandMapping; the client's ", ""))
                try:
                    raster.check_target_resolution(cfg.resolution)
                except RasterError as e:    # a setting, not the raster, is wrong: said, not skipped as unreadable
                    raise BuildError(f"--resolution {cfg.resolution:g} does not suit {path}: {e} (rasters of other "
                                     "map units are built in runs of their own)") from None
                n = raster.count_tiles(cfg.tile_size, cfg.overlap, cfg.resolution)
        except RasterError as e:
            if cfg.bands and str(e).startswith("band mapping "):    # a setting, as --resolution above
                raise BuildError(f"--bands {' '.join(map(str, cfg.bands))}: {e}") from None
            problems.append(raster_problem(path, e))
            continue
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem)
        for u, start in enumerate(range(0, n, cfg.unit_tiles)):
            units.append({"raster": str(path), "raster_index": r, "name": f"{r:03d}-{stem}-{u:05d}",
                          "tiles": [start, min(n, start + cfg.unit_tiles)]})
    return units, problems, notes


SETTINGS_FILE = "settings.json"


def check_same_settings(cfg: LandmarksConfig) -> None:
    """A run into an OUT that holds units of a run with other settings would mix two datasets (units are
    named by raster and number, not by settings): refused, naming what changed. So is one whose inputs
    changed since (an edited features or mapping file; a raster with finished units) and one into a
    folder of another kind of run. The first run writes OUT/settings.json, with its inputs' fingerprints;
    the captioner and worker settings may change between runs."""
    out = Path(cfg.out)
    foreign = foreign_files(out, LANDMARKS_SHARD, training_run=True)
    if foreign:
        raise BuildError(f"--out {out} holds files of another kind of run ({listed(foreign)}): landmark tiles "
                         "written there would be mixed with them (training reads every shards/*.tar); give "
                         "another --out")
    ours = _real_paths(json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k not in ("out", "captioner")})))
    prints = fingerprints(cfg)
    path = out / SETTINGS_FILE
    parts = sorted((out / "parts").glob("*.json")) if (out / "parts").is_dir() else []
    if path.is_file() and parts:
        # files as paths from the root, links followed: "scene.tif" from its folder and "data/scene.tif"
        # from the one above are the same raster (a record from before kept relative paths: read
        # from here, the best guess)
        theirs = _real_paths(json.loads(path.read_text()))
        recorded = theirs.pop("fingerprints", None)     # none in a record from before they were kept: unknown
        changed = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if changed:
            shown = "; ".join(f"{k}: {theirs.get(k)!r} before, {ours.get(k)!r} now" for k in changed[:4])
            raise BuildError(f"{out} holds a dataset built with other settings ({shown}); give another --out, "
                             "or remove it to rebuild")
        if recorded is None or recorded == prints:
            return
        # a raster is compared only where units of it are done: one that could not be read may be
        # mended before a re-run tries its units again
        numbered = [int(m[1]) for m in (re.match(r"(\d+)-", p.name) for p in parts) if m]
        built = {ours["rasters"][r] for r in numbered if r < len(ours["rasters"])}
        edited = _changed_files(recorded.get("files", {}), prints["files"])
        edited += _changed_files({k: v for k, v in recorded.get("rasters", {}).items() if k in built},
                                 {k: v for k, v in prints["rasters"].items() if k in built})
        if edited:
            raise BuildError(f"{listed(edited)} changed since {out} was built from it: its finished units hold "
                             "captions and tiles of the old contents, and a re-run would keep them; give another "
                             f"--out, or delete {out} to rebuild")
    elif parts:
        return   # built before settings were recorded: nothing to compare with
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps({**ours, "fingerprints": prints}, indent=2) + "\n")
    os.replace(tmp, path)


SMALL_FILE = 4 << 20        # files up to this size are told apart by their contents, larger ones by size and time


def _fingerprint(path: str, contents: bool = True) -> str | None:
    """A file's contents in a few words: the SHA-256 of a small file, the size and modification time of
    a large one, or of any with `contents` False (rasters: re-reading thousands of small tiles every run
    would take minutes); None when it cannot be read."""
    try:
        stat = os.stat(path)
        if contents and stat.st_size <= SMALL_FILE:
            return "sha256 " + hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None
    return f"{stat.st_size} bytes, modified {stat.st_mtime_ns} ns"


# a shapefile's spatial indexes (QGIS's "Create spatial index", ArcGIS's): made or dropped, no feature changes
SPATIAL_INDEX_FILES = (".qix", ".sbn", ".sbx")


def _source_files(path: str) -> list[str]:
    """The files of a vector source that hold its features: a shapefile's .shp, .dbf, .prj, .cpg... (not
    its spatial indexes); the path itself where OGR names none."""
    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        ds = gdal.OpenEx(str(path), gdal.OF_VECTOR)
        files = (ds.GetFileList() if ds is not None else None) or [str(path)]
    except RuntimeError:
        files = [str(path)]
    finally:
        gdal.PopErrorHandler()
    return sorted({os.path.realpath(f) for f in files if not f.lower().endswith(SPATIAL_INDEX_FILES)})


def fingerprints(cfg: LandmarksConfig) -> dict:
    """{"rasters": {real path: fingerprint}, "files": {...}}: the files of the features and --mapping
    sources under "files"."""
    files = [f for src in cfg.features for f in _source_files(src)] + [os.path.realpath(p) for p in cfg.mapping]
    return {"rasters": {os.path.realpath(p): _fingerprint(p, contents=False) for p in cfg.rasters},
            "files": {f: _fingerprint(f) for f in files}}


def _changed_files(before: dict, now: dict) -> list[str]:
    """The files whose fingerprints differ (one that is new or gone included; one unknown, None, not)."""
    return sorted(f for f in set(before) | set(now)
                  if before.get(f) != now.get(f) and None not in (before.get(f, ""), now.get(f, "")))


def _real_paths(settings: dict) -> dict:
    """Settings with their file paths (rasters, features, the mapping) made real: absolute, links followed."""
    out = dict(settings)
    for key in ("rasters", "features"):
        if isinstance(out.get(key), list):
            out[key] = [os.path.realpath(p) for p in out[key]]
    if isinstance(out.get("mapping"), list):
        out["mapping"] = [os.path.realpath(p) for p in out["mapping"]]
    return out


def _done(out: Path, unit: dict) -> bool:
    return (out / "parts" / f"{unit['name']}.json").is_file()


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


_FEATURE_CACHE: dict = {}


def _features_for(cfg: LandmarksConfig, rules: list[Rule], dst: osr.SpatialReference, raster: str):
    """All features reprojected to `dst` (the CRS of `raster`) and their STRtree, read once per process and CRS."""
    # the files as they are now: a process that builds twice (a library caller) reads an edited file again
    stamps = tuple((f, st.st_size, st.st_mtime_ns, st.st_ino) for src in cfg.features for f in _source_files(src)
                   for st in [os.stat(f)])
    key = (tuple(cfg.features), stamps, tuple(cfg.layers or ()), cfg.where, tuple(rules), dst.ExportToWkt())
    if key not in _FEATURE_CACHE:
        feats = []
        for src_path in cfg.features:
            groups = read_features(src_path, rules, cfg.layers, cfg.where)[0]
            for layer, srs, fs in groups:       # each layer with its own CRS
                srs, _ = features_crs(cfg, src_path, layer, srs, fs)
                feats += reproject(fs, srs, dst, f"the features of {src_path} (layer {layer})", raster)
        _FEATURE_CACHE.clear()
        _FEATURE_CACHE[key] = (feats, STRtree([f.geometry for f in feats]) if feats else None)
    return _FEATURE_CACHE[key]


def count_features(cfg: LandmarksConfig, read: dict, units: list[dict]) -> dict:
    """Per vector source, from `read` ({source: read_features' answer}): the features read, those left
    out for want of a geometry or of a name and a caption rule, those with a caption that lie on no
    raster of `units` once reprojected to its CRS ("off_raster"), and the rest ("usable")."""
    from backend.raster import RasterError

    outlines = {}                       # per CRS (its WKT): (a raster of it, its CRS, the rasters' outlines)
    for path in dict.fromkeys(u["raster"] for u in units):
        try:
            with _open(cfg, path) as raster:
                (x0, a, b, y0, d, e), w, h = raster.geotransform, raster.width, raster.height
                outline = shapely.Polygon([(x0 + px * a + py * b, y0 + px * d + py * e)
                                           for px, py in ((0, 0), (w, 0), (w, h), (0, h))])
                outlines.setdefault(raster.srs.ExportToWkt(), (path, raster.srs, []))[2].append(outline)
        except RasterError:
            continue                    # failed since planning: its units say so
    counts = {}
    for src, (groups, c) in read.items():
        on = set()
        for layer, srs, feats in groups:
            srs, _ = features_crs(cfg, src, layer, srs, feats)
            for path, dst, shapes in outlines.values():     # reprojected once per CRS, not per raster
                moved = reproject(feats, srs, dst, f"the features of {src} (layer {layer})", path)
                hits = shapely.intersects(shapely.union_all(shapes),
                                          np.array([f.geometry for f in moved], dtype=object))
                on.update(f.number for f, hit in zip(moved, hits) if hit)
        captioned = sum(len(feats) for _, _, feats in groups)
        counts[str(src)] = {"read": c["read"], "usable": len(on), "off_raster": captioned - len(on),
                            "no_rule": c["no_rule"], "no_geometry": c["no_geometry"]}
    return counts


def raster_problem(path: str, error) -> dict:
    """How an unreadable raster (a RasterError) is reported: skipped, and listed in the summary."""
    # the reader's words are a server's ("a path the server can see"): here the path is local
    return {"raster": str(path), "error": f"{path} does not exist" if error.kind == "not_found" else str(error)}


def run_unit(cfg: LandmarksConfig, unit: dict) -> dict:
    """Tile one unit, caption its tiles, write its shard and manifest part (atomically). Returns its stats.

    A raster that fails while its windows are read (a damaged block; a file changed since planning) is
    skipped like a raster that cannot be opened: the result is {"unit", "unreadable": {"raster",
    "error", "tiles"}} and no part is written, so the unit is not done and a re-run tries it again."""
    from backend.raster import RasterError

    out = Path(cfg.out)
    if _done(out, unit):
        return json.loads((out / "parts" / f"{unit['name']}.json").read_text())["stats"]
    rules = rules_for(cfg)
    captioner = load_captioner(cfg.captioner)
    t0 = time.time()
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    shard = out / "shards" / f"{unit['name']}.tar"
    tmp = shard.with_suffix(".tar.part")
    try:
        stats, rows = _tile_unit(cfg, unit, rules, captioner, shard, tmp)
    except RasterError as e:
        tmp.unlink(missing_ok=True)
        return {"unit": unit["name"], "unreadable": {**raster_problem(unit["raster"], e), "tiles": unit["tiles"]}}
    except BaseException:       # a captioner's failure, Ctrl-C: the unit is not done, and leaves nothing
        tmp.unlink(missing_ok=True)
        raise
    if rows:
        os.replace(tmp, shard)
    else:
        tmp.unlink()
    stats["seconds"] = round(time.time() - t0, 3)
    part = out / "parts" / f"{unit['name']}.json"
    tmp_part = part.with_suffix(".json.part")
    tmp_part.write_text(json.dumps({"stats": stats, "rows": rows}))
    os.replace(tmp_part, part)          # the unit counts as done only now
    return stats


def _tile_unit(cfg: LandmarksConfig, unit: dict, rules: list[Rule], captioner, shard: Path,
               tmp: Path) -> tuple[dict, list[dict]]:
    """The unit's tiles written to the tar `tmp`: (stats, manifest rows). Raises RasterError."""
    from backend.raster import crs_authid

    out = Path(cfg.out)
    stats = {"unit": unit["name"], "planned": unit["tiles"][1] - unit["tiles"][0], "kept": 0,
             "skipped_nodata": 0, "skipped_no_features": 0, "skipped_empty_caption": 0}
    rows = []
    with _open(cfg, unit["raster"]) as raster:
        dst = raster.srs
        feats, tree = _features_for(cfg, rules, dst, unit["raster"])
        crs = crs_authid(dst) or dst.ExportToWkt()
        # the backend's tiler reads the unit's tiles: a tile cut short by a raster narrower than one
        # tile keeps the ground resolution and is padded, and mostly-nodata tiles are skipped
        read = 0
        with tarfile.open(tmp, "w") as tar:
            for tile, rgb, _ in raster.iter_tiles_with_pixels(cfg.tile_size, cfg.overlap, cfg.resolution,
                                                              min_valid_fraction=cfg.min_valid,
                                                              tile_range=tuple(unit["tiles"])):
                read += 1
                # the footprint, not the bounding box: a rotated raster's tile is a rotated square, and
                # its bounding box reaches into the neighbouring tiles
                box = shapely.from_wkt(tile.footprint_wkt)
                used = features_in_tile(tree, feats, box, cfg.thresholds) if tree is not None else []
                if not used:
                    stats["skipped_no_features"] += 1
                    continue
                key = f"{unit['name']}-{tile.index:06d}"
                info = {"key": key, "raster": unit["raster"], "crs": crs, "extent": list(tile.bounds),
                        "footprint_wkt": tile.footprint_wkt, "features": used}
                caption = captioner(info).strip()
                if not caption:
                    stats["skipped_empty_caption"] += 1
                    continue
                buf = io.BytesIO()
                Image.fromarray(rgb.transpose(1, 2, 0)).save(buf, "JPEG", quality=cfg.jpeg_quality)
                _tar_add(tar, f"{key}.jpg", buf.getvalue())
                _tar_add(tar, f"{key}.txt", caption.encode())
                _tar_add(tar, f"{key}.json", json.dumps({**info, "caption": caption}).encode())
                rows.append({"key": key, "caption": caption, "extent": list(tile.bounds), "crs": crs,
                             "raster": unit["raster"], "shard": str(shard.relative_to(out)),
                             "features": len(used)})
                stats["kept"] += 1
        stats["skipped_nodata"] = stats["planned"] - read
    return stats, rows


def summarize(cfg: LandmarksConfig, units: list[dict], problems: list[dict], feature_counts: dict) -> dict:
    """Rebuild manifest.jsonl from the parts and write summary.json."""
    out = Path(cfg.out)
    rows, stats = [], []
    for unit in units:
        part = json.loads((out / "parts" / f"{unit['name']}.json").read_text())
        rows += part["rows"]
        stats.append(part["stats"])
    tmp = out / "manifest.jsonl.part"
    with open(tmp, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    os.replace(tmp, out / "manifest.jsonl")
    words = [w for r in rows for w in re.findall(r"[a-z]+", r["caption"].lower())]
    lengths = [len(re.findall(r"\S+", r["caption"])) for r in rows]
    summary = {
        "tiles_seen": sum(s["planned"] for s in stats), "kept": len(rows),
        "skipped": {k: sum(s[k] for s in stats) for k in ("skipped_nodata", "skipped_no_features",
                                                          "skipped_empty_caption")},
        "unreadable_rasters": problems, "features": feature_counts,
        "caption_words": {"mean": float(np.mean(lengths)) if lengths else 0.0,
                          "min": min(lengths, default=0), "max": max(lengths, default=0)},
        "vocabulary": len(set(words)), "shards": len({r["shard"] for r in rows}),
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("rasters", "features")},
    }
    # written beside and renamed over: a crash mid-write leaves the previous summary.json whole
    tmp = out / "summary.json.part"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "summary.json")
    return summary
