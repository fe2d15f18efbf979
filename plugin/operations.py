"""What the plugin asks the backend, shared by the dock's tasks and the Processing algorithms.

Each function runs off the main thread: it takes a connection, a prepared source (see sources.py),
plain values and two callbacks, progress(percent) and cancelled() -> bool.
"""
from __future__ import annotations

import math
import re
from typing import Callable, NamedTuple

from qgis.core import QgsCoordinateReferenceSystem, QgsGeometry, QgsRectangle

from .connection import BackendError, never
from .sources import DEFAULT_LABEL_CHARS, band_mapping, build_source, crs_name, wire_extent, within_crs_area

Progress = Callable[[float], None]
Cancelled = Callable[[], bool]


def split_prompts(text: str) -> list[str]:
    """The prompts of what the user typed: separated by commas, semicolons ("buildings; trees") or
    line breaks (a list pasted into a batch or a script's), blanks dropped. The dock and Processing
    read prompts alike."""
    return [p.strip() for p in re.split(r"[,;\r\n]", text) if p.strip()]


def _percent(done: int, total: int) -> float:
    return 100.0 * done / total if total else 0.0


def pixel_side(conn, max_side: int, cancelled: Cancelled = never) -> int:
    """The side a pixel source is read at most: `max_side` (the user's setting), but no more than the
    backend takes (ServerInfo.limits.max_pixel_source_side; larger is refused, RESOURCE_EXHAUSTED)."""
    limit = conn.info(cancelled=cancelled).limits.max_pixel_source_side
    return min(max_side, limit) if limit > 0 else max_side


def _source_and_extent(conn, prepared, rect: QgsRectangle | None, rect_crs: QgsCoordinateReferenceSystem | None,
                       rect_in_layer_crs: QgsRectangle | None, max_side: int, resolution: float | None,
                       cancelled: Cancelled = never):
    """(RasterSource, Extent or None, note). Paths get the extent as drawn (any CRS: the backend
    reprojects it); pixel sources are read over the extent in the layer's CRS and need none, at
    most `max_side` a side as `pixel_side` caps it."""
    pb = conn.pb
    label_chars = DEFAULT_LABEL_CHARS
    if not isinstance(prepared, str):       # a path is read by the backend: no side to cap, no label
        max_side = pixel_side(conn, max_side, cancelled)
        label_chars = conn.info(cancelled=cancelled).limits.max_label_chars or DEFAULT_LABEL_CHARS
    source, note = build_source(pb, prepared, rect_in_layer_crs, max_side, resolution, label_chars)
    extent = None
    if rect is not None and source.WhichOneof("kind") == "path":
        if rect_crs is not None and rect_crs.isGeographic():
            # a longitude/latitude map zoomed out past the poles shows latitudes that are no coordinates
            rect = QgsRectangle(rect.xMinimum(), max(rect.yMinimum(), -90.0), rect.xMaximum(),
                                min(rect.yMaximum(), 90.0))
        extent = wire_extent(pb, rect, rect_crs)
    return source, extent, note


# an older backend's words for an extent it cannot take to the raster's CRS (a map across 180 degrees
# in a Pacific projection, an orthographic view of the whole globe); one with the capability
# "extent_placement" places such extents itself
_UNMAPPABLE = re.compile(r"does not map to a usable rectangle|cannot reproject")


def _placed_for_older_backend(conn, call, request, rect_in_layer_crs: QgsRectangle | None,
                              cancelled: Cancelled = never):
    """call(request); where a backend without "extent_placement" cannot take the request's extent to
    the raster's CRS, again with the extent QGIS placed in the layer's CRS (an empty crs: the raster's)."""
    try:
        return call(request)
    except BackendError as e:
        if (e.code != "INVALID_ARGUMENT" or not _UNMAPPABLE.search(e.message) or rect_in_layer_crs is None
                or not request.HasField("extent") or not request.extent.crs or rect_in_layer_crs.isEmpty()
                or "extent_placement" in conn.info(cancelled=cancelled).capabilities):
            raise
    r = rect_in_layer_crs
    request.extent.CopyFrom(conn.pb.Extent(xmin=r.xMinimum(), ymin=r.yMinimum(), xmax=r.xMaximum(),
                                           ymax=r.yMaximum()))
    return call(request)


def _for_layer(pb, request, prepared):
    """`request` with the bands the layer shows (sources.band_mapping) when it is sent by path; a
    layer sent as pixels is read in those bands already."""
    mapping = band_mapping(pb, prepared)
    if mapping is not None:
        request.bands.CopyFrom(mapping)
    return request


# what a QGIS user does about the backend's band_note (its own advice names the wire and the client)
BAND_NOTE_ADVICE = ("in QGIS, show the layer's red, green and blue bands with a Multiband color renderer "
                    "(Layer Properties > Symbology) and SkyPrompt sends those")


def _keep_band_note(notes: list | None, note: str) -> None:
    """The backend's word on colour bands it had to guess (band_note of an answer), said once."""
    if note and notes is not None:
        said = f"{note}; {BAND_NOTE_ADVICE}"
        if said not in notes:
            notes.append(said)


def outcome_word(result) -> str:
    """An IndexResult's outcome as a word ("indexed", "unchanged", "replaced"), from the wire enum's
    own names, as the command-line client writes it."""
    enum = result.DESCRIPTOR.fields_by_name["outcome"].enum_type
    return enum.values_by_number[result.outcome].name.removeprefix("INDEX_OUTCOME_").lower()


# the views per tile the dock's "Rotation views" asks for (IndexRasterRequest.views)
ROTATION_VIEWS = 4
# the best tiles the dock's "More like the best hits" expands the query from (SearchRequest.expand):
# 3 had the best mean precision@10 of the search benchmark's sweep (README)
EXPAND_TILES = 3


def index_layer(conn, prepared, max_side: int, progress: Progress, cancelled: Cancelled,
                force: bool = False, notes: list | None = None, views: int | None = None,
                view: QgsRectangle | None = None, resolution: float | None = None,
                said: Callable[[str], None] | None = None):
    """Index a whole layer, or for a pixel source `view` (layer CRS) at `resolution`; the IndexResult.
    `views`: views per tile averaged (1, 2, 4 or 8; None = the server's default,
    ServerInfo.default_index_views). `said(text)` hears what the user should know while it runs:
    that the backend waits for another client indexing the same file."""
    pb = conn.pb
    source, _, note = _source_and_extent(conn, prepared, None, None, view, max_side, resolution, cancelled)
    if note and notes is not None:
        notes.append(note)
    request = _for_layer(pb, pb.IndexRasterRequest(source=source, force=force), prepared)
    if views is not None:
        request.views = views
    def on_progress(message):
        if message.stage == pb.INDEX_STAGE_QUEUED and said is not None:
            said(message.message)
        progress(_percent(message.tiles_done, message.tiles_total))

    result = conn.index(request, progress=on_progress, cancelled=cancelled)
    _keep_band_note(notes, result.band_note)
    return result


def unfamiliar_note(words) -> str:
    """What to tell a user about UnfamiliarWord messages (SearchResponse / SegmentResult
    unfamiliar_words; the backend client says the same)."""
    listed = ", ".join(f"'{w.word}'" + (f" (close in spelling: {', '.join(repr(c) for c in w.close_spellings)})"
                                        if w.close_spellings else "") for w in words)
    return (f"the model rarely or never saw {listed} in training and can hardly follow "
            f"{'it' if len(words) == 1 else 'them'}; other words for the same thing may work better")


def indexed_rasters(conn) -> list:
    """The backend's IndexedRaster entries, those of other checkpoints too (they take disk space and
    are not searched: worth seeing, to remove or index again)."""
    return list(conn.list_rasters(conn.pb.ListRastersRequest(all_checkpoints=True)).rasters)


# errors of the backend or the call, not of one raster: work over several rasters stops at them
STOP_ALL = ("UNAVAILABLE", "UNAUTHENTICATED", "CANCELLED", "DEADLINE_EXCEEDED")
BUSY = "the server is busy"     # RESOURCE_EXHAUSTED for as many long calls as the backend takes (the wire contract)


def stops_all(error) -> bool:
    """Whether a BackendError is the backend's or the call's (the rest of the rasters would fail the
    same way), not one raster's."""
    return error.code in STOP_ALL or (error.code == "RESOURCE_EXHAUSTED" and error.message.startswith(BUSY))


def remove_rasters(conn, raster_ids: list[str], cancelled: Cancelled) -> tuple[list, list[tuple[str, str]]]:
    """RemoveRaster for each id: (the RemoveRasterResponses, (id, why) for each id that failed).
    One that fails (removed meanwhile by another client, say) does not stop the others; a backend
    that cannot be reached does."""
    from .connection import BackendError

    removed, failed = [], []
    for raster_id in raster_ids:
        if cancelled():
            break
        try:
            removed.append(conn.remove(conn.pb.RemoveRasterRequest(raster_id=raster_id)))
        except BackendError as e:
            if stops_all(e):        # the backend, not this raster: the rest would fail too
                raise
            failed.append((raster_id, e.message))
    return removed, failed


def file_change(entry) -> str:
    """What became of the file of an IndexedRaster or SearchHit since it was indexed, in a few words:
    "" (unchanged, or a pixel source), "moved or deleted", or "changed"."""
    from .rpc import skyprompt_pb2 as pb    # here, not at import: the plugin loads before its dependencies may

    if entry.file_state == pb.FILE_STATE_MISSING:
        return "moved or deleted"
    if entry.file_state == pb.FILE_STATE_CHANGED:
        return "changed"
    # a backend older than file_state says it only in words
    return "changed, moved or deleted" if entry.changed_on_disk else ""


def raster_state(entry) -> str:
    """What an IndexedRaster's row says about it: whether searches use it and whether it is still
    what was indexed."""
    change = file_change(entry)
    if change == "moved or deleted":
        return "moved or deleted since indexed: remove it, or index it where it is now"
    if change:
        return f"{change} on disk since indexed: index it again"
    if not entry.current_checkpoint:
        return "indexed with another model: not searched (index it again, or remove it)"
    return "up to date"


# the backend's refusal of a token tells any client what to send on the wire and which option sets it
_TOKEN_ADVICE = re.compile(r"send the metadata '[^']*' with the token the server was started with \([^)]*\)")


def in_panel_words(text: str) -> str:
    """A backend message without the command-line client's commands it names, "(client index)", and
    a refused token said as what to fix in SkyPrompt settings."""
    text = _TOKEN_ADVICE.sub("fix it in SkyPrompt settings (Token: the one the backend was started with)", text)
    return re.sub(r" \(client \w+\)", "", text)


def empty_area_note(where: str, remedy: str = "pan or zoom out to where they are, or Index them",
                    of_layers: bool = True) -> str:
    """Why a search in an area found nothing, when the index has no tile there (of the layers
    searched, or, `of_layers` False, at all)."""
    return f"no indexed tile {'of the layers searched ' if of_layers else ''}lies in {where}: {remedy}"


class SearchArea(NamedTuple):
    """A map view or Extent as a search area: `rect` as the backend takes it (within_crs_area), or
    `problem` ("no_crs", "local", "outside") and `words` saying it, for the panel's and Processing's
    own sentences. `polygon`: WKT of the shape within `rect` that hits must meet (a rotated map
    view), or "" for the whole rectangle."""
    rect: QgsRectangle
    problem: str = ""
    words: str = ""
    polygon: str = ""

    def wire(self, crs: QgsCoordinateReferenceSystem) -> tuple:
        """The `area` operations.search takes."""
        return (self.rect, crs, self.polygon)


LATITUDES_FIRST = ("were its latitudes given first? Longitude comes first "
                   "(xmin,xmax,ymin,ymax = west,east,south,north)")


def latitudes_first(rect: QgsRectangle, crs: QgsCoordinateReferenceSystem) -> bool:
    """Whether a typed longitude/latitude rectangle lies past the poles only because its latitudes came first."""
    if not crs.isGeographic() or not within_crs_area(rect, crs).isEmpty():
        return False
    swapped = QgsRectangle(rect.yMinimum(), rect.xMinimum(), rect.yMaximum(), rect.xMaximum())
    return not within_crs_area(swapped, crs).isEmpty()


def search_area(rect: QgsRectangle, crs: QgsCoordinateReferenceSystem, typed: bool = False,
                shown: QgsGeometry | None = None) -> SearchArea:
    """`rect` in `crs` as a search area. `typed`: its numbers were typed (Processing's Extent), so
    latitude may have come first. `shown`: what a rotated map shows (its visible polygon, in `crs`),
    of which `rect` is the box."""
    from qgis.core import QgsCoordinateTransform, QgsCsException, QgsPointXY, QgsProject

    if not crs.isValid():
        return SearchArea(QgsRectangle(), "no_crs", "has no CRS, so it cannot be placed")
    to_lonlat = QgsCoordinateTransform(crs, QgsCoordinateReferenceSystem("EPSG:4326"), QgsProject.instance())

    def transforms(call) -> bool:
        try:
            call()
            return True
        except QgsCsException:
            return False

    # an invalid transformation (a local grid) passes points through unchanged
    if not crs.isGeographic() and not to_lonlat.isValid():
        return SearchArea(QgsRectangle(), "local",
                          f"is in {crs_name(crs)}, a CRS with no place on the globe (a local grid)")
    # the centre may be off an orthographic globe whose rim is in view, and then the box is placed
    placed = crs.isGeographic() or transforms(lambda: to_lonlat.transform(QgsPointXY(rect.center()))) \
        or transforms(lambda: to_lonlat.transformBoundingBox(rect))
    if not placed:
        return SearchArea(QgsRectangle(), "outside", f"lies outside what its CRS ({crs_name(crs)}) places on the globe")
    area = within_crs_area(rect, crs)
    if area.isEmpty():
        if typed and latitudes_first(rect, crs):
            return SearchArea(area, "outside", f"lies past the poles: {LATITUDES_FIRST}")
        return SearchArea(area, "outside", f"lies outside the area {crs.authid() or 'its CRS'} covers")
    if shown is None or shown.isEmpty() or shown.isGeosEqual(QgsGeometry.fromRect(rect)):
        return SearchArea(area)
    # moved as the rectangle was (a longitude/latitude view panned a turn round the globe), and kept
    # to it (latitudes past the poles): the backend takes a polygon its extent holds
    shown = QgsGeometry(shown)
    shown.translate(area.xMinimum() - rect.xMinimum(), 0.0)
    return SearchArea(area, polygon=shown.intersection(QgsGeometry.fromRect(area)).asWkt(17))


def stale_notes(hits, names: dict | None = None) -> list[str]:
    """One line per raster whose file changed, moved or went since it was indexed
    (SearchHit.file_state): its hits show it as it was."""
    stale: dict[str, list] = {}
    for h in hits:
        change = file_change(h)
        if change:
            stale.setdefault(h.raster_path, [change, 0])[1] += 1
    shown = {h.raster_path: h.raster_name for h in hits}
    todo = {"moved or deleted": "Index it where it is now, and remove the old entry (Indexed…)"}
    return [f"{count} of {len(hits)} hit{'s' if len(hits) != 1 else ''} {'is' if count == 1 else 'are'} from "
            f"{(names or {}).get(path) or shown[path]!r}, which was {change} "
            f"on disk since it was indexed: they show it as it was. "
            + todo.get(change, "Index it again to search what it holds now")
            for path, (change, count) in stale.items()]


def unsearchable_notes(response, names: dict | None = None, shown: int = 3) -> list[str]:
    """A line per indexed raster a search left out (SearchResponse.unsearchable_rasters: its embeddings
    cannot be read on the backend, or it was indexed with another checkpoint), the first `shown` of
    them and a count of the rest: after a checkpoint change that is every raster indexed."""
    left_out = list(response.unsearchable_rasters)
    notes = [f"not searched: {(names or {}).get(r.raster_path) or r.raster_name!r} on the backend: {r.reason}"
             for r in left_out[:shown]]
    rest = sum(max(1, r.raster_count) for r in left_out[shown:])     # a counting entry stands for many
    if rest:
        notes.append(f"... and {rest} more rasters not searched (the Indexed rasters window shows each)")
    return notes


def distinct_unfamiliar(answers) -> list:
    """The UnfamiliarWord messages of several SegmentResults, each word once."""
    seen = {}
    for answer in answers or ():
        for w in answer.unfamiliar_words:
            seen.setdefault(w.word, w)
    return list(seen.values())


def search(conn, query: str, k: int, raster_ids: list[str] = (), thumbnails: bool = False,
           min_score: float | None = None, expand: int | None = None, like_tile_id: int | None = None,
           raster_paths: list[str] = (), keyword_weight: float | None = None, area=None,
           cancelled: Cancelled = never):
    """The SearchResponse, over the union of `raster_ids` and `raster_paths` (both empty: the whole
    index). `expand`: query expansion from that many best tiles (SearchRequest.expand; None = the
    server's default, ServerInfo.default_search_expand; 0 = off). `keyword_weight`: matching the
    query's words against the tiles' captions (SearchRequest.keyword_weight; None = the server's
    default; 0 = off). `like_tile_id`: tiles like that one instead of the text (`query` is then
    ignored). `area`: (QgsRectangle, its CRS[, WKT of a polygon within it]) that hits must lie in, e.g.
    the map view (SearchArea.wire); None: anywhere. A backend without the capability "extent_polygon"
    searches the rectangle. CANCELLED (BackendError) once cancelled() is true."""
    pb = conn.pb
    request = pb.SearchRequest(query=query if like_tile_id is None else "", k=k, raster_ids=list(raster_ids),
                               raster_paths=list(raster_paths), include_thumbnails=thumbnails,
                               thumbnail_size=96 if thumbnails else 0)
    if area is not None:
        request.extent.CopyFrom(wire_extent(pb, *area[:2]))
        if len(area) > 2 and area[2]:
            request.extent_polygon_wkt = area[2]
    if like_tile_id is not None:
        request.like_tile_id = like_tile_id
    if min_score is not None:
        request.min_score = min_score
    if expand is not None:
        request.expand = expand
    if keyword_weight is not None:
        request.keyword_weight = keyword_weight
    return conn.search(request, cancelled=cancelled)


# how much coarser than the bare limit an automatic resolution is: the backend's window rounds out to
# whole pixels and reprojects an extent in another CRS a little differently than QGIS does
RESOLUTION_MARGIN = 1.02


def fitting_resolution(pixels: float, native: float, limit: int) -> float | None:
    """The target_resolution at which an area of `pixels` at `native` map units per pixel fits in
    `limit` pixels (ServerInfo.limits.max_extent_pixels); None when it fits as it is or there is no limit."""
    if not limit or pixels <= limit:
        return None
    return native * math.sqrt(pixels / limit) * RESOLUTION_MARGIN


class CoarserRead:
    """A file layer's area over one of the backend's pixel limits: the resolution it fits at, and
    the note that tells the user what was done instead of refusing it."""

    def __init__(self, native: tuple[float, float], limit: int):
        self.pixels, self.own = native
        self.limit = limit
        self.resolution = fitting_resolution(self.pixels, self.own, limit)

    def note(self, limit_of: str, done: str, resolution: float, full_detail: str) -> str:
        return (f"the area is {self.pixels / 1e6:.3g} million pixels at the layer's resolution ({self.own:.3g} map "
                f"units per pixel), over the backend's limit of {self.limit / 1e6:.3g} million{limit_of}: {done} "
                f"at a coarser {resolution:.3g} map units per pixel (a smaller area is {full_detail} at full detail)")


def segment(conn, prepared, prompts: list[str], rect: QgsRectangle | None, rect_crs, rect_in_layer_crs,
            threshold: float, max_side: int, progress: Progress, cancelled: Cancelled,
            resolution: float | None = None, notes: list | None = None, edge_radius: int | None = None,
            native: tuple[float, float] | None = None, path_resolution: float | None = None,
            min_area_m2: float = 0.0) -> list:
    """SegmentResults (one per prompt) over `rect` (in `rect_crs`; None = the whole layer).
    `edge_radius`: the edge refinement radius in pixels (None = the server's default, 0 = off).
    `min_area_m2`: polygons under this ground area are dropped by the backend (0 = keep all).
    `resolution` is what a pixel source is read at; a layer sent by path is segmented at
    `path_resolution`, else at its own resolution, or, when `native` (sources.native_pixels: the
    area's pixel count and the layer's resolution) is over the server's limit, coarser (said in `notes`)."""
    pb = conn.pb
    if min_area_m2 > 0 and "min_area_m2" not in conn.info(cancelled=cancelled).capabilities:
        # an older backend ignores the field it does not know: every small polygon would come back
        # (asked before a layer sent as pixels is read)
        raise BackendError("FAILED_PRECONDITION", f"the backend at {conn.address} does not apply a minimum area "
                                                  "(it is older than this plugin): update it, or set Minimum area to 0")
    source, extent, note = _source_and_extent(conn, prepared, rect, rect_crs, rect_in_layer_crs, max_side, resolution,
                                              cancelled)
    if note and notes is not None:
        notes.append(note)
    request = _for_layer(pb, pb.SegmentRequest(source=source, prompts=prompts, threshold=threshold,
                                               min_area_m2=min_area_m2), prepared)
    if edge_radius is not None:
        request.edge_radius = edge_radius
    if extent is not None:
        request.extent.CopyFrom(extent)
    if source.WhichOneof("kind") == "path":
        if path_resolution:
            request.target_resolution = path_resolution
        elif native is not None:
            # the backend refuses an area over its limit at full resolution: read it coarser instead
            coarser = CoarserRead(native, conn.info(cancelled=cancelled).limits.max_extent_pixels)
            if coarser.resolution is not None:
                request.target_resolution = coarser.resolution
                if notes is not None:
                    notes.append(coarser.note("", "segmented", coarser.resolution, "segmented"))
    results = _placed_for_older_backend(
        conn, lambda r: conn.segment(r, progress=lambda p: progress(_percent(p.tiles_done, p.tiles_total)),
                                     cancelled=cancelled), request, rect_in_layer_crs, cancelled)
    for result in results:
        _keep_band_note(notes, result.band_note)
    return results


# Caption takes this many times ServerInfo.limits.max_extent_pixels (backend.service.CAPTION_EXTENT_FACTOR;
# the plugin ships without the backend): it resamples the area to one model input, reading it decimated
CAPTION_LIMIT_FACTOR = 16


def caption(conn, prepared, rect: QgsRectangle | None, rect_crs, rect_in_layer_crs, max_side: int,
            resolution: float | None = None, notes: list | None = None,
            native: tuple[float, float] | None = None, file_reader=None, cancelled: Cancelled = never):
    """The CaptionResponse for `rect` (in `rect_crs`; None = the whole layer). `resolution` is what a
    pixel source is read at. A layer sent by path is described at its own resolution unless `native`
    (sources.native_pixels) is over the backend's Caption limit; CaptionRequest has no
    target_resolution, so the area is then read through `file_reader` (a sources.PixelReader of the
    same layer) at the coarser resolution that fits and sent as pixels (said in `notes`)."""
    pb = conn.pb
    coarser = None
    if isinstance(prepared, str) and native is not None and file_reader is not None:
        coarser = CoarserRead(native, conn.info(cancelled=cancelled).limits.max_extent_pixels * CAPTION_LIMIT_FACTOR)
        if coarser.resolution is not None:
            prepared, resolution = file_reader, coarser.resolution
    source, extent, note = _source_and_extent(conn, prepared, rect, rect_crs, rect_in_layer_crs, max_side, resolution,
                                              cancelled)
    if coarser is not None and coarser.resolution is not None:
        # one note with the resolution actually read (the max_side cap may have made it coarser still)
        gt = source.pixels.geotransform
        note = coarser.note(" for a caption", "described from its pixels read", math.sqrt(abs(gt[1] * gt[5])),
                            "described")
    if note and notes is not None:
        notes.append(note)
    request = _for_layer(pb, pb.CaptionRequest(source=source), prepared)
    if extent is not None:
        request.extent.CopyFrom(extent)
    response = _placed_for_older_backend(conn, lambda r: conn.caption(r, cancelled=cancelled), request,
                                         rect_in_layer_crs, cancelled)
    _keep_band_note(notes, response.band_note)
    return response
