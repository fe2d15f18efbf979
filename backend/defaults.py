"""Defaults and limits shared by the server, its command line and the client (no heavy imports here:
`python -m backend client` and `--help` must start fast)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

# The checkpoint shipped with the package (the model card in README.md says how it was trained), used when none is given.
BUNDLED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "default"

SERVICE_NAME = "skyprompt.v1.SkyPrompt"
API_VERSION = "skyprompt.v1"
# 5 x 5 patches, no Gaussian: the best mIoU of the localization ablation at the default checkpoint, on
# the relevance maps and end to end through Segment (README; tied with Gaussian 5; 7 x 7 led at the
# CPU-trained defaults before it)
DEFAULT_SAO_WINDOW = 5
DEFAULT_THRESHOLD = 0.5
# Segment requests computed at once unless `serve --segments-at-once` says otherwise; more wait,
# queued. The largest (4096 x 4096 pixels, 16 prompts) holds about 4.5 GB of planes after the model,
# so unbounded concurrency could end the server on memory
SEGMENTS_AT_ONCE = 2
# how the RESOURCE_EXHAUSTED refusal of a server taking all the long calls it takes begins (the wire
# contract): the whole server's state, so clients stop work over several rasters at it
BUSY = "the server is busy"
# percentiles of the linear stretch that turns data of more than 8 bits into 0..255 (rasters' non-Byte
# bands, training's 16-bit images), unless a request sets its own
DEFAULT_STRETCH = (2.0, 98.0)
# Edge refinement (backend.edges): the guided filter's radius as a fraction of the model's input
# side, so 64 pixels of the working grid at 128-pixel tiles. Half a tile had the best mIoU of the
# localization benchmark's radius sweep on RSSCN7 and AID mosaics (README); 0 turns it off.
DEFAULT_EDGE_RADIUS_FRACTION = 0.5


def default_edge_radius(image_size: int) -> int:
    """The guided filter radius, in pixels of the working grid, Segment uses when none is asked for."""
    return int(round(DEFAULT_EDGE_RADIUS_FRACTION * image_size))


def edge_radius_for(asked: int | None, image_size: int) -> int:
    """The radius a caller gets: what it asked for, or the default for the model's tile (None)."""
    return default_edge_radius(image_size) if asked is None else asked


# Index views (backend.model.views): embeddings of each tile's flips / rotations averaged. 1 = off:
# four views score a little better on most measures of the model card (README) but cost four model
# passes per tile.
VIEW_COUNTS = (1, 2, 4, 8)
VIEW_HELP = ("1 = the tile as it is, 2 = + its mirror image, 4 = its four 90-degree rotations, 8 = the "
             "rotations and their mirror images")
DEFAULT_INDEX_VIEWS = 1

# Query expansion (TileIndex.search `expand`, pseudo-relevance feedback): a search ranks once, moves
# the query toward the mean embedding of its N best tiles (weight EXPAND_WEIGHT) and ranks again.
# The search benchmark measures it against the plain ranking (README).
DEFAULT_SEARCH_EXPAND = 0
EXPAND_WEIGHT = 2.0

# Keyword matching (backend.keywords): a search's words against each tile's generated caption, BM25
# over the best KEYWORD_POOL tiles by cosine, added with this weight (in standard deviations of
# the two scores; 0 = embeddings alone). The search benchmark measures it (README model card).
DEFAULT_KEYWORD_WEIGHT = 0.5
MAX_KEYWORD_WEIGHT = 10.0
KEYWORD_POOL = 1000


@dataclass(frozen=True)
class Limits:
    """Request limits the server enforces (reported in ServerInfo.limits)."""
    max_prompt_chars: int = 1000
    max_k: int = 1000
    max_pixel_source_side: int = 8192
    # an 8192^2 RGB pixel source (192 MiB) fits; four bands at that size are the whole 256 MiB with
    # nothing left for the request's other fields: serve --max-message-mb 260 for those
    max_message_bytes: int = 256 * 1024 * 1024
    max_prompts: int = 16
    max_texts: int = 256
    max_extent_pixels: int = 4096 * 4096
    max_thumbnail_side: int = 512
    max_beam_size: int = 8
    max_edge_radius: int = 1024
    max_expand: int = 100
    # PixelSource.label, in characters (code points): it names the raster in answers and the index
    max_label_chars: int = 256


def check_keyword_weight(weight: float, name: str = "keyword_weight") -> float:
    """weight, or ValueError naming the setting (`name`) and the range."""
    if not (math.isfinite(weight) and 0.0 <= weight <= MAX_KEYWORD_WEIGHT):
        raise ValueError(f"{name} {weight:g} must be in [0, {MAX_KEYWORD_WEIGHT:g}] (0: embeddings alone)")
    return weight


def check_views(views: int, name: str = "views") -> int:
    """views, or ValueError naming the setting (`name`) and the choices."""
    if views not in VIEW_COUNTS:
        raise ValueError(f"{name} {views} must be one of {', '.join(map(str, VIEW_COUNTS))} ({VIEW_HELP})")
    return views


def check_edge_radius(radius: int, name: str = "edge_radius", limit: int = Limits.max_edge_radius) -> int:
    """radius, or ValueError naming the setting (`name`) and the range."""
    if not 0 <= radius <= limit:
        raise ValueError(f"{name} {radius} must be 0 (no edge refinement) or a radius in pixels up to {limit}")
    return radius


def check_expand(expand: int, name: str = "expand", limit: int = Limits.max_expand) -> int:
    """expand, or ValueError naming the setting (`name`) and the range."""
    if not 0 <= expand <= limit:
        raise ValueError(f"{name} {expand} must be 0 (no query expansion) or a number of tiles up to {limit}")
    return expand


def check_tile_overlap(overlap: float, name: str = "tile_overlap") -> float:
    """overlap, or ValueError naming the setting (`name`) and the range."""
    if not (math.isfinite(overlap) and 0.0 <= overlap < 0.9):
        raise ValueError(f"{name} {overlap:.6g} is out of range: give a fraction of the tile side in [0, 0.9)")
    return float(overlap)


# Fraction of a tile that must be valid (not nodata, not transparent) for Index to store it: a tile
# mostly of black padding embeds as "dark ground" and is found by no query
DEFAULT_MIN_VALID = 0.5


def check_min_valid(fraction: float, name: str = "min_valid_fraction") -> float:
    """fraction, or ValueError naming the setting (`name`) and the range."""
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise ValueError(f"{name} {fraction:.6g} is out of range: give the fraction of a tile that must be valid, "
                         f"in (0, 1] (default {DEFAULT_MIN_VALID:g})")
    return float(fraction)


def check_target_resolution(resolution: float, name: str = "target_resolution") -> float:
    """resolution (0: native), or ValueError naming the setting (`name`)."""
    if not math.isfinite(resolution) or resolution < 0:
        raise ValueError(f"{name} {resolution} must be 0 (native resolution) or a positive ground size in map "
                         "units per pixel")
    return float(resolution)


LONLAT_CRS = ("EPSG:4326", "OGC:CRS84")    # extents in these are longitude/latitude as the index stores


# Bearer tokens travel as gRPC metadata, which takes printable ASCII only: a token with a line end
# (read from a file) makes every call fail with gRPC's bare "Invalid metadata", and one of only spaces
# is no secret. The plugin, which ships without this package, has its own copy (plugin/connection.py).
# how to make a certificate gRPC clients accept (they check its subjectAltName only, not the subject's CN)
SAN_EXAMPLE = ('openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=127.0.0.1" -addext '
               '"subjectAltName=IP:127.0.0.1,DNS:localhost" -keyout server.key -out server.pem')


def token_problem(token: str | None, name: str) -> str | None:
    """What is wrong with a bearer token given as `name` (e.g. "--token"), in one line, or None.
    None and "" are no token, which is no problem here."""
    if not token:
        return None
    if not token.strip():
        return f"{name}: the token is only spaces: give a token of visible characters (or none on loopback)"
    if token.endswith("\r\n") or token.endswith("\r"):
        return (f"{name}: the token ends with a carriage return (read from a file saved with Windows line "
                "endings?): give it without")
    if token.endswith("\n"):
        return f"{name}: the token ends with a newline (read from a file?): give it without"
    if token != token.strip():
        where = "begins" if token[0].isspace() else "ends"
        return f"{name}: the token {where} with a space or tab: give it without"
    for i, c in enumerate(token):
        if not " " <= c <= "~":
            what = "a control character" if c < " " or c == "\x7f" else "a character that is not ASCII"
            return (f"{name}: the token holds {what} ({c!r} at position {i + 1}): gRPC sends only printable "
                    "ASCII; give one without")
    return None
