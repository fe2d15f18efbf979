"""Tile index: tile metadata in SQLite, tile embeddings in one float16 .npy matrix per raster.

Layout under the index directory:

    index.sqlite3               rasters and tiles (WAL journal, synchronous=FULL)
    index.lock                  flock held while a TileIndex is open: one owner per directory
    embeddings/<token>.npy      float16 [tile_count, dim]; row i is tile `first_tile_id + i`
    embeddings/.tmp-<token>.npy a matrix being written; SQLite never refers to one
    embeddings/unused/          files no row refers to, set aside (never deleted) when the index opens

Crash safety: a raster's matrix is written under a temporary name, fsynced, renamed to its final
name (directory fsynced), and only then registered in SQLite together with all its tiles in one
transaction. Whatever moment a process dies, the raster is either completely in SQLite with a
complete file, or absent; opening the index deletes temporary files and the files the database
noted as disposable (one renamed just before the crash, a replaced or removed raster's old file),
sets aside in unused/ any other file no row refers to (those of a database that was moved aside:
they come back when their rows do) and drops rows whose
file is missing or has the wrong shape (a file unreadable for another reason, e.g. permissions, is
kept). When no row's file is there at all (embeddings/ moved, or not yet copied back) it refuses to
open rather than drop every row.

Search keeps, per checkpoint, an in-memory float32 copy of every raster's matrix laid out
dimension-major ([dim, tiles]): one contiguous matrix-vector product over it is the fastest exact
search numpy offers (float16 arithmetic in numpy is over ten times slower, and a [tiles, dim]
layout takes up to twice as long). The copy is rebuilt lazily when the set of rasters changes,
reusing the columns of rasters that did not change. Past `ann_threshold` tiles an inverted-file
index (spherical k-means coarse quantiser, `nprobe` lists scanned) answers approximate searches.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import numbers
import os
import re
import sqlite3
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .defaults import EXPAND_WEIGHT

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: run without the directory lock
    fcntl = None

log = logging.getLogger(__name__)

DB_NAME = "index.sqlite3"
LOCK_NAME = "index.lock"
EMBEDDINGS_DIR = "embeddings"
TEMP_PREFIX = ".tmp-"
UNUSED_DIR = "unused"       # under embeddings/: files no row refers to, kept for the operator to judge
# meta keys "disposable:<file>": an embedding file the database itself let go of (replaced, removed)
# or is about to take (published, not yet registered); opening deletes it when no row refers to it
DISPOSABLE = "disposable:"
SCHEMA_VERSION = 1
# Fixed header size for the .npy files, so a streaming writer can reserve it before the tile count
# is known and fill it in at the end (numpy pads headers to 64-byte multiples; any length reads).
NPY_HEADER_BYTES = 128
# Columns of the float32 copy converted per step when rebuilding it (bounds the temporary memory).
CONVERT_ROWS = 16384
# Block size of the two-stage top-k: the k best scores lie in the k blocks with the best maxima.
TOPK_BLOCK = 1024
DEFAULT_ANN_THRESHOLD = 200_000
DEFAULT_NPROBE = 32

UNCHANGED, NEW, CHANGED = "unchanged", "new", "changed"


# SQLite errors of the storage under a database rather than of its content (sqlite3's error names)
STORAGE_ERRORS = ("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_PERM", "SQLITE_BUSY",
                  "SQLITE_LOCKED", "SQLITE_NOMEM")


class TileIndexError(Exception):
    """A request the index cannot serve; `kind` is "not_found", "invalid_argument" or "unavailable"."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Hit:
    """One search result: the tile, its raster, and the cosine similarity to the query."""
    score: float
    raster_id: int
    raster_path: str
    raster_name: str
    tile_id: int
    col: int                    # pixel window: left column in the raster's native grid
    row: int                    # pixel window: top row
    width: int
    height: int
    bounds: tuple               # (xmin, ymin, xmax, ymax) in the raster's CRS
    bounds_wgs84: tuple | None  # (lon_min, lat_min, lon_max, lat_max); None: the CRS has no lon/lat
    footprint_wkt: str
    footprint_wgs84_wkt: str
    crs_authid: str
    crs_wkt: str
    extra: dict = field(default_factory=dict)


class SearchHits(list):
    """Hits best first, plus what the search looked at (fills SearchResponse)."""

    def __init__(self, hits: Iterable[Hit] = (), tiles_searched: int = 0, approximate: bool = False):
        super().__init__(hits)
        self.tiles_searched = tiles_searched
        self.approximate = approximate


@dataclass(frozen=True)
class Ranking:
    """The best tiles for one query, best first, without their metadata (see TileIndex.rank)."""
    tile_ids: np.ndarray       # int64
    scores: np.ndarray         # float32 cosine similarities
    raster_ids: np.ndarray     # int64, the raster of each tile
    tiles_searched: int        # tiles the query was compared against, after filters
    approximate: bool          # True when the inverted-file index answered


# ---- keys -------------------------------------------------------------------------------------
_NOT_A_FILE_PATH = re.compile(r"^(/vsi|[A-Za-z][A-Za-z0-9+.\-]+:)")


def normalise_raster_path(path: str | os.PathLike) -> str:
    """The key a raster is stored under: its real absolute path.

    GDAL virtual names ("/vsizip/...") and "scheme:..." keys (e.g. "pixels:<sha256>" for rasters
    sent as pixels) are kept as given: resolving them as file paths would corrupt them.
    """
    text = os.fspath(path)
    if not text:
        raise TileIndexError("invalid_argument", "the raster path is empty")
    if _NOT_A_FILE_PATH.match(text):
        return text
    return os.path.realpath(os.path.expanduser(text))


def raster_identity(path: str | os.PathLike) -> dict:
    """{"path", "size", "mtime_ns"} of a raster that is one file, the identity `needs_indexing` compares
    (backend.raster's Raster.identity adds "sources" for one that reads more files, e.g. a VRT)."""
    real = normalise_raster_path(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise TileIndexError("not_found", f"raster file {real!r} does not exist") from None
    return {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def canonical_settings(settings: dict | str | None) -> str:
    """Settings as canonical JSON, so equal settings compare equal whatever their key order."""
    if settings is None:
        settings = {}
    if isinstance(settings, str):
        try:
            settings = json.loads(settings)
        except ValueError:
            return settings
    try:
        return json.dumps(settings, sort_keys=True, separators=(",", ":"))
    except TypeError as e:
        raise TileIndexError("invalid_argument", f"indexing settings must be JSON-serialisable: {e}") from None


def _identity_fields(identity: dict) -> tuple[str, int, int, str]:
    """(key, size, mtime_ns, sources): "sources" is optional text standing for the other files the
    raster reads (a VRT's sources), "" for a raster that is one file."""
    try:
        key = normalise_raster_path(identity["path"])
        size = int(identity.get("size", identity.get("size_bytes")))
        mtime_ns = int(identity["mtime_ns"])
        sources = identity.get("sources") or ""
        if not isinstance(sources, str):
            raise TypeError
    except (KeyError, TypeError, ValueError):
        raise TileIndexError("invalid_argument", "a raster identity needs 'path', 'size' (bytes) and 'mtime_ns' "
                                                 "(and text 'sources', if any); raster_identity(path) builds "
                                                 "one") from None
    return key, size, mtime_ns, sources


def _box(value, what: str, wraps: bool = False) -> tuple[float, float, float, float]:
    """(xmin, ymin, xmax, ymax) from a 4-sequence or a dict with those keys. With `wraps` (longitudes of
    a raster across 180 degrees, as GDAL reports them) xmin may be above xmax."""
    if isinstance(value, dict):
        value = [value.get(k) for k in ("xmin", "ymin", "xmax", "ymax")]
    try:
        box = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise TileIndexError("invalid_argument", f"{what} must be (xmin, ymin, xmax, ymax), got {value!r}") from None
    if len(box) != 4 or not all(np.isfinite(box)):
        raise TileIndexError("invalid_argument",
                             f"{what} must be 4 finite numbers (xmin, ymin, xmax, ymax), got {value!r}")
    if (box[0] > box[2] and not wraps) or box[1] > box[3]:
        raise TileIndexError("invalid_argument", f"{what} {box} is inverted: xmin must be <= xmax and ymin <= ymax")
    return box


def crosses_antimeridian(west: float, east: float) -> bool:
    """Whether longitudes west > east name a box across 180 degrees, as GDAL reports such boxes
    (e.g. 179 to -179), rather than an inverted one (11 to 10)."""
    return west > east and 0 < west <= 180 and -180 <= east < 0


# The EPSG:4326 box stored for the tiles of a raster whose CRS has no longitude/latitude (a local
# engineering CRS, or none): outside every longitude/latitude extent, so extent filters never match
# them, and hits report no box and no footprint in EPSG:4326.
NO_LONLAT_BOX = (1000.0, 1000.0, 1000.0, 1000.0)


def _rectangle_wkt(b) -> str:
    return f"POLYGON (({b[0]!r} {b[1]!r}, {b[2]!r} {b[1]!r}, {b[2]!r} {b[3]!r}, {b[0]!r} {b[3]!r}, {b[0]!r} {b[1]!r}))"


# ---- embedding files --------------------------------------------------------------------------
def _npy_header(rows: int, dim: int) -> bytes:
    text = "{'descr': '<f2', 'fortran_order': False, 'shape': (%d, %d), }" % (rows, dim)
    text = text.ljust(NPY_HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish_file(temp: Path, final: Path) -> None:
    """Give a complete, fsynced temp file its final name, durably."""
    os.replace(temp, final)
    _fsync_dir(final.parent)


def _discard_file(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _close_quietly(file) -> None:
    """Close a file about to be discarded: a failing flush (a full disk) must not hide why, nor keep
    the file from being deleted (the descriptor is closed either way)."""
    try:
        file.close()
    except OSError:
        pass


def _out_of_space(error: BaseException, directory: Path) -> TileIndexError | None:
    """A clear RESOURCE_EXHAUSTED error for a write that failed because the index's disk is full."""
    if (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or \
            getattr(error, "sqlite_errorname", "") == "SQLITE_FULL":
        return TileIndexError("resource_exhausted", f"the disk holding the tile index ({directory}) is full, so "
                                                    "nothing was changed; free space there (or start the server "
                                                    "with another --data-dir) and try again")
    return None


def _read_matrix(path: Path) -> np.ndarray:
    """The float16 matrix of an embedding file, memory-mapped; ValueError when it is not one."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version != (1, 0):
            raise ValueError(f"unexpected .npy version {version}")
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        offset = f.tell()
    if dtype != np.dtype("<f2") or fortran or len(shape) != 2:
        raise ValueError(f"holds {dtype} {shape}, not a float16 matrix")
    expected = offset + shape[0] * shape[1] * 2
    actual = path.stat().st_size
    if actual != expected:
        raise ValueError(f"is {actual} bytes, {expected} expected for {shape}")
    if shape[0] == 0:
        return np.zeros(shape, np.float16)
    return np.memmap(path, dtype=np.float16, mode="r", offset=offset, shape=shape)


# ---- schema -----------------------------------------------------------------------------------
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rasters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source_key TEXT NOT NULL UNIQUE,        -- normalised path (or "scheme:..." key)
    size_bytes INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sources TEXT NOT NULL DEFAULT '',       -- stands for the other files it reads (a VRT's); '' for one file
    checkpoint_hash TEXT NOT NULL,
    settings TEXT NOT NULL,                 -- canonical JSON
    name TEXT NOT NULL,
    crs_authid TEXT NOT NULL,
    crs_wkt TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    band_count INTEGER NOT NULL,
    xmin REAL, ymin REAL, xmax REAL, ymax REAL,
    wgs84_xmin REAL, wgs84_ymin REAL, wgs84_xmax REAL, wgs84_ymax REAL,
    -- union of the tiles' EPSG:4326 boxes: lets an extent filter skip or take whole rasters
    tiles_wgs84_xmin REAL, tiles_wgs84_ymin REAL, tiles_wgs84_xmax REAL, tiles_wgs84_ymax REAL,
    tiles_skipped INTEGER NOT NULL,
    tile_count INTEGER NOT NULL,
    dim INTEGER NOT NULL,
    first_tile_id INTEGER NOT NULL,         -- tiles are first_tile_id .. first_tile_id + tile_count - 1
    embeddings_file TEXT NOT NULL UNIQUE,
    embeddings_bytes INTEGER NOT NULL,
    indexed_at REAL NOT NULL,
    extra TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rasters_checkpoint ON rasters (checkpoint_hash);
CREATE TABLE IF NOT EXISTS tiles (
    id INTEGER PRIMARY KEY,
    raster_id INTEGER NOT NULL,
    col INTEGER NOT NULL, row INTEGER NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL,
    xmin REAL NOT NULL, ymin REAL NOT NULL, xmax REAL NOT NULL, ymax REAL NOT NULL,
    wgs84_xmin REAL NOT NULL, wgs84_ymin REAL NOT NULL, wgs84_xmax REAL NOT NULL, wgs84_ymax REAL NOT NULL,
    footprint_wkt TEXT NOT NULL,
    footprint_wgs84_wkt TEXT NOT NULL,
    extra TEXT
);
"""
RASTER_FIELDS = ("name", "crs_authid", "crs_wkt", "width", "height", "band_count", "bounds", "bounds_wgs84",
                 "tiles_skipped")
TILE_COLUMNS = ("id, raster_id, col, row, width, height, xmin, ymin, xmax, ymax, wgs84_xmin, wgs84_ymin, wgs84_xmax, "
                "wgs84_ymax, footprint_wkt, footprint_wgs84_wkt, extra")
TILE_FIELDS = ("col", "row", "width", "height", "bounds", "bounds_wgs84", "footprint_wkt", "footprint_wgs84_wkt")


def _connect(path: Path) -> sqlite3.Connection:
    # check_same_thread=False only so close() may run on any thread: each connection is used by
    # one thread at a time (the writer's under the index lock, readers' per thread).
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def _raster_dict(row: sqlite3.Row) -> dict:
    def box(prefix):
        values = tuple(row[prefix + c] for c in ("xmin", "ymin", "xmax", "ymax"))
        return None if values[0] is None else values
    return {
        "id": row["id"], "path": row["source_key"], "name": row["name"], "size": row["size_bytes"],
        "mtime_ns": row["mtime_ns"], "sources": row["sources"] or "", "checkpoint_hash": row["checkpoint_hash"], "settings": json.loads(row["settings"]),
        "crs_authid": row["crs_authid"], "crs_wkt": row["crs_wkt"], "width": row["width"], "height": row["height"],
        "band_count": row["band_count"], "bounds": box(""), "bounds_wgs84": box("wgs84_"),
        "tile_count": row["tile_count"], "tiles_skipped": row["tiles_skipped"], "dim": row["dim"],
        "first_tile_id": row["first_tile_id"], "embeddings_file": row["embeddings_file"],
        "embeddings_bytes": row["embeddings_bytes"],
        "indexed_at": row["indexed_at"], "extra": json.loads(row["extra"]),
    }


# ---- in-memory search structures --------------------------------------------------------------
@dataclass
class _Slot:
    """One raster's columns in a snapshot."""
    raster_id: int
    file: str
    start: int
    stop: int
    first_tile_id: int
    envelope: tuple            # union of its tiles' EPSG:4326 boxes


class _Stale(Exception):
    """The snapshot a search used was replaced by a write while the search ran: retry."""


@dataclass
class _Ivf:
    """Inverted lists over one snapshot: row-major vectors grouped by list."""
    centroids: np.ndarray      # [nlist, dim] float32, unit norm
    vectors: np.ndarray        # [n, dim] float32, list by list
    columns: np.ndarray        # [n] snapshot column of each row of `vectors`
    offsets: np.ndarray        # [nlist + 1] list boundaries in `vectors`


@dataclass
class _Snapshot:
    """Every searchable embedding of one checkpoint, as of one index generation."""
    generation: int
    checkpoint_hash: str
    dim: int
    vectors_t: np.ndarray      # [dim, n] float32, raster after raster
    slot_of_column: np.ndarray  # [n] int32 index into `slots`
    slots: list
    slot_by_raster: dict
    tile_boxes: dict = field(default_factory=dict)   # raster id -> [tile_count, 4] EPSG:4326 boxes
    ivf: _Ivf | None = None

    def __post_init__(self):
        # per-slot arrays turn snapshot columns into tile and raster ids without a Python loop
        self.start_of_slot = np.array([s.start for s in self.slots], np.int64)
        self.first_tile_of_slot = np.array([s.first_tile_id for s in self.slots], np.int64)
        self.raster_of_slot = np.array([s.raster_id for s in self.slots], np.int64)

    @property
    def size(self) -> int:
        return self.vectors_t.shape[1]


@dataclass
class _Quantiser:
    """A trained coarse quantiser for one checkpoint, with each raster's list assignments."""
    centroids: np.ndarray
    trained_on: int
    trained_rasters: frozenset = frozenset()         # (raster id, file) of the rasters it was trained on
    labels: dict = field(default_factory=dict)       # (raster id, file) -> [tile_count] int32


def expanded_queries(q: np.ndarray, vectors_t: np.ndarray, top_columns: Sequence[np.ndarray], n: int,
                     weight: float) -> np.ndarray:
    """Each unit query plus `weight` x the mean embedding of its `n` best tiles, re-normalised
    (pseudo-relevance feedback). Tiles of one scene type lie closer to each other than any text
    lies to them, so the best few hits pull in more of their kind; a query with no tile left is kept.
    q [queries, dim]; vectors_t [dim, tiles]; top_columns: each query's best columns, best first."""
    out = q.astype(np.float32, copy=True)
    for i, columns in enumerate(top_columns):
        best = np.asarray(columns[:n], dtype=np.int64)
        if len(best):
            out[i] += weight * vectors_t[:, best].mean(axis=1)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.ascontiguousarray(out / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def _check_expansion(expand, weight) -> tuple[int, float]:
    if isinstance(expand, bool) or not isinstance(expand, (int, np.integer)) or expand < 0:
        raise TileIndexError("invalid_argument", f"expand must be 0 (off) or a number of tiles, got {expand!r}")
    if not (np.isfinite(weight) and weight > 0):
        raise TileIndexError("invalid_argument", f"the expansion weight must be a positive number, got {weight!r}")
    return int(expand), float(weight)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first.

    Two stages: the k best scores all lie in the k blocks whose maxima are largest, so argpartition
    runs over k blocks instead of every score (a full argpartition at 1M costs ~20 ms here).
    """
    n = scores.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, np.int64)
    blocks = n // TOPK_BLOCK
    if k * TOPK_BLOCK * 4 > n or blocks < k:
        idx = np.argpartition(scores, n - k)[n - k:] if k < n else np.arange(n)
    else:
        maxima = scores[:blocks * TOPK_BLOCK].reshape(blocks, TOPK_BLOCK).max(axis=1)
        best_blocks = np.argpartition(maxima, blocks - k)[blocks - k:]
        candidates = (best_blocks[:, None] * TOPK_BLOCK + np.arange(TOPK_BLOCK)).ravel()
        candidates = np.concatenate([candidates, np.arange(blocks * TOPK_BLOCK, n)])
        cand_scores = scores[candidates]
        idx = candidates[np.argpartition(cand_scores, len(candidates) - k)[len(candidates) - k:]]
    return idx[np.argsort(-scores[idx], kind="stable")]


def _nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    labels = np.empty(len(x), np.int32)
    for s in range(0, len(x), CONVERT_ROWS):
        labels[s:s + CONVERT_ROWS] = np.argmax(x[s:s + CONVERT_ROWS] @ centroids.T, axis=1)
    return labels


def lists_for(n: int) -> int:
    """Inverted lists for n vectors: ~sqrt(n), the usual balance of list scan and centroid scan."""
    return int(np.clip(round(np.sqrt(n)), 8, 4096))


def spherical_kmeans(x: np.ndarray, nlist: int, iterations: int = 8, seed: int = 0) -> np.ndarray:
    """Unit-norm centroids of `x` (unit rows) maximising cosine similarity to their members."""
    rng = np.random.default_rng(seed)
    nlist = min(nlist, len(x))
    centroids = x[rng.choice(len(x), nlist, replace=False)].astype(np.float32, copy=True)
    for _ in range(iterations):
        labels = _nearest_centroid(x, centroids)
        order = np.argsort(labels, kind="stable")
        present, starts = np.unique(labels[order], return_index=True)
        sums = np.add.reduceat(x[order], starts, axis=0)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        keep = norms[:, 0] > 0
        centroids[present[keep]] = sums[keep] / norms[keep]
        empty = np.setdiff1d(np.arange(nlist), present[keep])
        if len(empty):  # re-seed empty lists on random points so every list stays useful
            centroids[empty] = x[rng.choice(len(x), len(empty), replace=False)]
    return centroids


# ---- the index --------------------------------------------------------------------------------
class TileIndex:
    """Persistent index of raster tiles and their embeddings under `directory` (created if missing).

    One process owns a directory at a time (an flock on index.lock). Thread-safe: writes and
    rebuilding the in-memory search copy take one lock; searches run concurrently, each on its
    own SQLite connection. `ann_threshold` is the tile count from which `exact=False` searches
    use the inverted-file index (below it they are exact); `nprobe` is how many lists it scans.
    """

    def __init__(self, directory: str | os.PathLike, ann_threshold: int = DEFAULT_ANN_THRESHOLD,
                 nprobe: int = DEFAULT_NPROBE):
        self.directory = Path(directory)
        self.embeddings_dir = self.directory / EMBEDDINGS_DIR
        self.ann_threshold = int(ann_threshold)
        self.nprobe = int(nprobe)
        self._made_embeddings_dir = not self.embeddings_dir.exists()
        try:
            self.embeddings_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TileIndexError("unavailable", f"cannot use {self.directory} for the tile index: "
                                                f"{e.strerror or e}; give a writable folder (--data-dir)") from None
        self._lock = threading.RLock()
        self._generation = 0
        self._snapshots: dict[str, _Snapshot] = {}
        self._headers: dict[tuple, tuple] = {}
        self._quantisers: dict[str, _Quantiser] = {}
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._closed = False
        self._folder_fd: int | None = None   # the index folder, flocked beside index.lock
        # checkpoint -> {raster id: why its embeddings are left out}, as of that checkpoint's snapshot
        self._unsearchable: dict[str, dict[int, str]] = {}
        self._lock_file = self._acquire_directory_lock()
        try:
            self._open_database()
        except sqlite3.DatabaseError as e:
            # never repaired or replaced here: the file may be the only copy of a long indexing run
            # (_open_database has closed it and released the folder's lock)
            if getattr(e, "sqlite_errorname", "").startswith(STORAGE_ERRORS):
                # a sound file the server cannot write (read-only, full disk, I/O error): calling it
                # damaged would have the operator move a good index aside
                raise TileIndexError("unavailable", f"the tile index database {self.directory / DB_NAME} cannot be "
                                                    f"opened for writing ({e}); give the server's user write access "
                                                    "to it and its folder, or free disk space, and start again; it "
                                                    "was left as it is") from None
            raise TileIndexError("unavailable", f"the tile index database {self.directory / DB_NAME} cannot be read "
                                                f"({e}): it is damaged or not a SkyPrompt index; move it aside "
                                                f"with its {DB_NAME}-wal and {DB_NAME}-shm files, if any (keep "
                                                "them: the -wal file holds its latest changes) to start a new "
                                                "index, or use another --data-dir") from None

    def _open_database(self) -> None:
        try:
            self._db = _connect(self.directory / DB_NAME)
            self._db.row_factory = sqlite3.Row
            self._db.executescript(SCHEMA)
            if "sources" not in {r["name"] for r in self._db.execute("PRAGMA table_info(rasters)")}:
                # added within schema version 1 (older versions ignore it): rows written before it
                # read as rasters that are one file, so they stay "unchanged": only rasters that read other files
                # (VRTs, world files) re-index, once
                self._db.execute("ALTER TABLE rasters ADD COLUMN sources TEXT NOT NULL DEFAULT ''")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('next_tile_id', '1')")
            version = int(self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
            if version != SCHEMA_VERSION:
                raise TileIndexError("unavailable", f"the tile index in {self.directory} has schema version "
                                                    f"{version}; this SkyPrompt reads version {SCHEMA_VERSION}. "
                                                    "Use a new data directory or re-index.")
            self._recover()
        except BaseException:
            if hasattr(self, "_db"):
                self._db.close()
            self._release_directory_lock()
            raise

    # -- opening and recovery --
    def _acquire_directory_lock(self):
        try:
            lock_file = open(self.directory / LOCK_NAME, "a+")
        except OSError as e:   # a read-only folder or disk: as unusable as one that cannot be made
            raise TileIndexError("unavailable", f"cannot use {self.directory} for the tile index: "
                                                f"{e.strerror or e}; give a writable folder (--data-dir)") from None
        if fcntl is not None:
            # the folder itself is locked too: index.lock is an empty file an operator may take for a
            # stale one and delete, and a second server would then lock a new one beside the first
            try:
                self._folder_fd = os.open(self.directory, os.O_RDONLY)
            except OSError:
                pass     # a platform that cannot open folders: index.lock alone
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if self._folder_fd is not None:
                    fcntl.flock(self._folder_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock_file = lock_file
                self._release_directory_lock()
                raise TileIndexError("unavailable", f"the tile index in {self.directory} is open in another "
                                                    "process (or another TileIndex); stop that server or use "
                                                    "another --data-dir") from None
            except OSError as e:
                # a file system without locks (NFS without its lock service): two servers could
                # then write one index, which would corrupt it
                self._lock_file = lock_file
                self._release_directory_lock()
                raise TileIndexError("unavailable", f"the tile index folder {self.directory} cannot be locked "
                                                    f"({e.strerror or e}), so another server could write it at the "
                                                    "same time: give a --data-dir on a local disk") from None
        return lock_file

    def _release_directory_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the file releases the flock
            self._lock_file = None
        if self._folder_fd is not None:
            os.close(self._folder_fd)
            self._folder_fd = None

    def _recover(self) -> None:
        """Drop rows whose matrix is missing or malformed, delete temporary files, and set aside the
        files no row refers to (in embeddings/unused/, from where a row's file returns).

        A matrix that cannot be read for any other reason (permission denied, too many open files,
        an I/O error) may be intact, and the only copy of a long indexing run: its row and file are
        kept, and searches report that raster unavailable until the file can be read. Files are
        never deleted here but temporary ones: a database moved aside (as a damaged one is) or one
        cut short leaves every file unreferenced, and they are the index's only copy."""
        unused = self.embeddings_dir / UNUSED_DIR
        disposable = {r[0][len(DISPOSABLE):] for r in self._db.execute(
            "SELECT key FROM meta WHERE key LIKE ?", (DISPOSABLE + "%",))}
        rows = self._db.execute(
            "SELECT id, source_key, tile_count, dim, first_tile_id, embeddings_file FROM rasters").fetchall()
        referenced, broken, missing = set(), [], []
        for row in rows:
            path = self.embeddings_dir / row["embeddings_file"]
            if not path.exists() and (unused / row["embeddings_file"]).is_file():
                # set aside by an open without this row (its database moved aside, then put back)
                try:
                    os.replace(unused / row["embeddings_file"], path)
                    log.warning("tile index: raster %s (%s): its embedding file is back from %s", row["id"],
                                row["source_key"], unused)
                except OSError as e:
                    log.warning("tile index: could not move %s back from %s: %s", row["embeddings_file"], unused, e)
            try:
                matrix = _read_matrix(path)
                if matrix.shape != (row["tile_count"], row["dim"]):
                    raise ValueError(f"has shape {matrix.shape}, ({row['tile_count']}, {row['dim']}) expected")
                del matrix
                referenced.add(row["embeddings_file"])
            except FileNotFoundError:
                missing.append(row)
            except ValueError as e:
                log.warning("tile index: dropping raster %s (%s): its embedding file %s %s; re-index it",
                            row["id"], row["source_key"], path, e)
                broken.append(row)
            except OSError as e:
                referenced.add(row["embeddings_file"])
                _log_unreadable(row, path, e)
        if missing and len(missing) == len(rows) and (len(rows) > 1 or self._made_embeddings_dir):
            # not files lost one by one: the folder is elsewhere (moved, renamed, still being copied)
            if self._made_embeddings_dir:
                try:
                    self.embeddings_dir.rmdir()
                except OSError:
                    pass
            raise TileIndexError("unavailable", f"none of the embedding files of the {len(rows)} indexed rasters is "
                                                f"in {self.embeddings_dir}: if that folder was moved, renamed or is "
                                                "still being copied back, put it back and start again (nothing was "
                                                f"changed); to start a new index instead, move {DB_NAME} aside")
        for row in missing:
            log.warning("tile index: dropping raster %s (%s): its embedding file %s is missing; re-index it",
                        row["id"], row["source_key"], self.embeddings_dir / row["embeddings_file"])
        if broken or missing:
            self._db.execute("BEGIN IMMEDIATE")
            for row in broken + missing:
                self._delete_tiles(row["first_tile_id"], row["tile_count"], row["id"])
                self._db.execute("DELETE FROM rasters WHERE id=?", (row["id"],))
            self._db.execute("COMMIT")
        set_aside = 0
        for path in self.embeddings_dir.iterdir():
            if path.name in referenced or path.name == UNUSED_DIR:
                continue
            try:
                if (path.name.startswith(TEMP_PREFIX) or path.name in disposable) and path.is_file():
                    # a write that was interrupted, or a file the database let go of
                    path.unlink()
                elif path.name.endswith(".npy") and path.is_file():
                    unused.mkdir(exist_ok=True)
                    os.replace(path, unused / path.name)
                    set_aside += 1
            except OSError as e:        # left where it is: the index works without it
                log.warning("tile index: could not delete or set aside %s, which no indexed raster uses (%s)",
                            path, e.strerror or e)
        if disposable:
            self._db.execute("DELETE FROM meta WHERE key LIKE ?", (DISPOSABLE + "%",))
        kept = sum(1 for p in unused.iterdir() if p.is_file()) if unused.is_dir() else 0
        if kept:
            log.warning("tile index: %d embedding file(s) that no indexed raster uses are kept in %s (%d set aside "
                        "now): an interrupted write's, a replaced raster's, or those of a database moved aside, "
                        "which come back when it is put back; delete them if the index lists what you expect",
                        kept, unused, set_aside)
        self._check_writable()

    def _check_writable(self) -> None:
        """Indexing writes in embeddings/: one that cannot be written in is said when the index opens,
        not by every later indexing."""
        probe = self.embeddings_dir / f"{TEMP_PREFIX}probe-{uuid.uuid4().hex}"
        try:
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise _out_of_space(e, self.directory) or TileIndexError(
                "unavailable", f"cannot write in {self.embeddings_dir} ({e.strerror or e}): give the server's user "
                               "write access to it") from None

    def _delete_tiles(self, first_tile_id: int, tile_count: int, raster_id: int) -> None:
        self._db.execute("DELETE FROM tiles WHERE id BETWEEN ? AND ? AND raster_id=?",
                         (first_tile_id, first_tile_id + tile_count - 1, raster_id))

    # -- connections --
    def _reader(self) -> sqlite3.Connection:
        if self._closed:
            raise TileIndexError("unavailable", "the tile index is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.directory / DB_NAME)
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
            with self._lock:
                self._readers.append(conn)
        return conn

    def close(self) -> None:
        """Close every connection and release the directory; the object is unusable afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for conn in self._readers:
                conn.close()
            self._readers.clear()
            self._db.close()
            self._snapshots.clear()
            self._quantisers.clear()
            self._release_directory_lock()

    def __enter__(self) -> "TileIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise TileIndexError("unavailable", "the tile index is closed")

    # -- queries about rasters --
    def needs_indexing(self, identity: dict, checkpoint_hash: str, settings: dict | str | None) -> str:
        """"unchanged" (same file, checkpoint and settings: nothing to do), "new", or "changed"."""
        key, size, mtime_ns, sources = _identity_fields(identity)
        row = self._reader().execute("SELECT size_bytes, mtime_ns, sources, checkpoint_hash, settings FROM rasters "
                                     "WHERE source_key=?", (key,)).fetchone()
        if row is None:
            return NEW
        same = (row["size_bytes"] == size and row["mtime_ns"] == mtime_ns and row["sources"] == sources
                and row["checkpoint_hash"] == checkpoint_hash and row["settings"] == canonical_settings(settings))
        return UNCHANGED if same else CHANGED

    def list_rasters(self, checkpoint_hash: str | None = None) -> list[dict]:
        """Every indexed raster (or those of one checkpoint), by id."""
        sql, args = "SELECT * FROM rasters", ()
        if checkpoint_hash is not None:
            sql, args = sql + " WHERE checkpoint_hash=?", (checkpoint_hash,)
        return [_raster_dict(r) for r in self._reader().execute(sql + " ORDER BY id", args)]

    def other_checkpoint_rasters(self, checkpoint_hash: str, limit: int) -> tuple[list[dict], int]:
        """The first `limit` rasters indexed with another checkpoint than `checkpoint_hash` (searches of
        it leave them out), as {"id", "path", "name", "checkpoint_hash"} by id, and how many there are."""
        conn = self._reader()
        rows = conn.execute("SELECT id, source_key, name, checkpoint_hash FROM rasters WHERE checkpoint_hash != ? "
                            "ORDER BY id LIMIT ?", (checkpoint_hash, limit))
        listed = [{"id": r["id"], "path": r["source_key"], "name": r["name"], "checkpoint_hash": r["checkpoint_hash"]}
                  for r in rows]
        total = conn.execute("SELECT COUNT(*) FROM rasters WHERE checkpoint_hash != ?", (checkpoint_hash,)).fetchone()[0]
        return listed, total

    def raster(self, raster_id: int | str) -> dict:
        """One raster by id; TileIndexError(not_found) when it is not in the index."""
        rid = self._raster_id_arg(raster_id)
        row = self._reader().execute("SELECT * FROM rasters WHERE id=?", (rid,)).fetchone()
        if row is None:
            raise TileIndexError("not_found", f"raster id {raster_id} is not in the tile index; "
                                              "`client list` (ListRasters) shows the indexed rasters")
        return _raster_dict(row)

    def raster_by_path(self, path: str | os.PathLike) -> dict | None:
        row = self._reader().execute("SELECT * FROM rasters WHERE source_key=?",
                                     (normalise_raster_path(path),)).fetchone()
        return None if row is None else _raster_dict(row)

    def counts(self, checkpoint_hash: str | None = None) -> dict:
        """{"rasters", "tiles"} for one checkpoint (or all): one query, no walk of the embedding files."""
        sql, args = "SELECT COUNT(*), COALESCE(SUM(tile_count), 0) FROM rasters", ()
        if checkpoint_hash is not None:
            sql, args = sql + " WHERE checkpoint_hash=?", (checkpoint_hash,)
        rasters, tiles = self._reader().execute(sql, args).fetchone()
        return {"rasters": rasters, "tiles": tiles}

    def stats(self, checkpoint_hash: str | None = None) -> dict:
        """counts() and "bytes": what the whole index holds on disk (a walk of its files)."""
        out = self.counts(checkpoint_hash)
        disk = 0
        for path in [*self.directory.glob(DB_NAME + "*"), *self.embeddings_dir.iterdir()]:
            try:
                disk += path.stat().st_size
            except FileNotFoundError:
                pass  # a replaced raster's file deleted meanwhile
        out["bytes"] = disk
        if checkpoint_hash is not None:
            out["ann_active"] = out["tiles"] >= self.ann_threshold
        return out

    @staticmethod
    def _raster_id_arg(raster_id) -> int:
        """A raster id as the index stores it: a non-negative 64-bit integer, given as an int or as its
        ASCII digits (ids travel as text on the wire). Text that can name no raster ("abc", "²", which
        str.isdigit accepts and int() does not, or 2**63 and up) is simply not in the index: not_found."""
        if isinstance(raster_id, str):
            text = raster_id.strip()
            value = int(text) if text.isascii() and text.isdigit() else -1
        elif isinstance(raster_id, numbers.Integral) and not isinstance(raster_id, bool):
            value = int(raster_id)
        else:
            raise TileIndexError("invalid_argument", f"a raster id is an int or its digits as text, "
                                                     f"not {type(raster_id).__name__} {raster_id!r}")
        if not 0 <= value < 2**63:
            raise TileIndexError("not_found", f"raster id {raster_id!r} is not in the tile index (ids are the whole "
                                              f"numbers `client list` and IndexResult.raster_id give)")
        return value

    # -- writing --
    def writer(self, identity: dict, checkpoint_hash: str, settings: dict | str | None, raster_meta: dict,
               dim: int) -> "RasterWriter":
        """A streaming writer for one raster: `with index.writer(...) as w: w.add(tiles, embeddings)`.

        Chunks go to a temporary file; a clean exit from the `with` block publishes the raster (it
        replaces any earlier entry for the same path), an exception or `w.abort()` discards it.
        """
        self._check_open()
        return RasterWriter(self, identity, checkpoint_hash, settings, raster_meta, dim)

    def add_raster(self, identity: dict, checkpoint_hash: str, settings: dict | str | None, raster_meta: dict,
                   tiles: Sequence[dict], embeddings: np.ndarray) -> int:
        """Store a raster's tiles and their [n, dim] embeddings (replacing any earlier entry); its id."""
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2:
            raise TileIndexError("invalid_argument",
                                 f"embeddings must be a [tiles, dim] matrix, got shape {embeddings.shape}")
        with self.writer(identity, checkpoint_hash, settings, raster_meta, embeddings.shape[1]) as w:
            w.add(tiles, embeddings)
        return w.raster_id

    def remove_raster(self, path_or_id: str | os.PathLike | int) -> None:
        """Delete a raster's tiles and embedding file; TileIndexError(not_found) if it is not indexed."""
        self._check_open()
        with self._lock:
            if isinstance(path_or_id, (int, np.integer)):
                row = self._db.execute("SELECT * FROM rasters WHERE id=?",
                                       (self._raster_id_arg(path_or_id),)).fetchone()
            else:
                row = self._db.execute("SELECT * FROM rasters WHERE source_key=?",
                                       (normalise_raster_path(path_or_id),)).fetchone()
            if row is None:
                raise TileIndexError("not_found", f"raster {path_or_id!s} is not in the tile index; nothing to remove "
                                                  "(`client list` shows what is indexed)")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._delete_tiles(row["first_tile_id"], row["tile_count"], row["id"])
                self._db.execute("DELETE FROM rasters WHERE id=?", (row["id"],))
                self._note_disposable(row["embeddings_file"])
                self._db.execute("COMMIT")
            except BaseException as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise _out_of_space(e, self.directory) or e
            self._generation += 1
            self._dispose(row["embeddings_file"])

    def _note_disposable(self, file_name: str) -> None:
        """Note in the database that `file_name` may be deleted whenever no row refers to it."""
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, '')", (DISPOSABLE + file_name,))

    def _dispose(self, file_name: str) -> None:
        """Delete a file noted disposable, then the note; what fails is left to the next open."""
        try:
            _discard_file(self.embeddings_dir / file_name)
            self._db.execute("DELETE FROM meta WHERE key=?", (DISPOSABLE + file_name,))
        except (OSError, sqlite3.Error) as e:   # committed already: the next open deletes it
            log.warning("tile index: could not delete embedding file %s now (%s); it goes when the index next "
                        "opens", file_name, e)

    def _register(self, w: "RasterWriter", final_name: str, file_bytes: int) -> tuple[int, bool]:
        """Put a published raster into SQLite, replacing an earlier entry, in one transaction."""
        with self._lock:
            self._check_open()
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                old = db.execute("SELECT id, first_tile_id, tile_count, embeddings_file, dim FROM rasters "
                                 "WHERE source_key=?", (w.key,)).fetchone()
                first = int(db.execute("SELECT value FROM meta WHERE key='next_tile_id'").fetchone()[0])
                dims = {r[0] for r in db.execute("SELECT DISTINCT dim FROM rasters "
                                                 "WHERE checkpoint_hash=? AND source_key<>?",
                                                 (w.checkpoint_hash, w.key))}
                if dims and dims != {w.dim}:
                    raise TileIndexError("invalid_argument", f"checkpoint {w.checkpoint_hash} already has "
                                                             f"{dims.pop()}-dim embeddings in the index; these are "
                                                             f"{w.dim}-dim")
                env = w.envelope()
                m = w.meta
                values = dict(
                    source_key=w.key, size_bytes=w.size, mtime_ns=w.mtime_ns, sources=w.sources,
                    checkpoint_hash=w.checkpoint_hash,
                    settings=w.settings, name=m["name"], crs_authid=m["crs_authid"], crs_wkt=m["crs_wkt"],
                    width=m["width"], height=m["height"], band_count=m["band_count"],
                    xmin=m["bounds"][0] if m["bounds"] else None, ymin=m["bounds"][1] if m["bounds"] else None,
                    xmax=m["bounds"][2] if m["bounds"] else None, ymax=m["bounds"][3] if m["bounds"] else None,
                    wgs84_xmin=m["bounds_wgs84"][0] if m["bounds_wgs84"] else None,
                    wgs84_ymin=m["bounds_wgs84"][1] if m["bounds_wgs84"] else None,
                    wgs84_xmax=m["bounds_wgs84"][2] if m["bounds_wgs84"] else None,
                    wgs84_ymax=m["bounds_wgs84"][3] if m["bounds_wgs84"] else None,
                    tiles_wgs84_xmin=env[0], tiles_wgs84_ymin=env[1], tiles_wgs84_xmax=env[2], tiles_wgs84_ymax=env[3],
                    tiles_skipped=m["tiles_skipped"], tile_count=w.rows, dim=w.dim, first_tile_id=first,
                    embeddings_file=final_name, embeddings_bytes=file_bytes, indexed_at=time.time(), extra=m["extra"])
                if old is None:
                    cols = ", ".join(values)
                    cur = db.execute(f"INSERT INTO rasters ({cols}) VALUES ({', '.join('?' * len(values))})",
                                     tuple(values.values()))
                    raster_id = cur.lastrowid
                else:
                    raster_id = old["id"]
                    self._delete_tiles(old["first_tile_id"], old["tile_count"], raster_id)
                    db.execute(f"UPDATE rasters SET {', '.join(c + '=?' for c in values)} WHERE id=?",
                               (*values.values(), raster_id))
                db.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               ((first + i, raster_id, *t) for i, t in enumerate(w.tile_rows)))
                db.execute("UPDATE meta SET value=? WHERE key='next_tile_id'", (str(first + w.rows),))
                db.execute("DELETE FROM meta WHERE key=?", (DISPOSABLE + final_name,))   # a row's own now
                if old is not None:
                    self._note_disposable(old["embeddings_file"])
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # a failed COMMIT may have rolled back already
                    db.execute("ROLLBACK")
                raise
            self._generation += 1
            if old is not None:
                self._dispose(old["embeddings_file"])
            return raster_id, old is not None

    # -- search --
    def search(self, query: np.ndarray, k: int, checkpoint_hash: str, raster_ids: Iterable | None = None,
               raster_paths: Iterable | None = None, bbox_wgs84: Sequence[float] | None = None, exact: bool = True,
               nprobe: int | None = None, min_score: float | None = None, expand: int = 0,
               expand_weight: float = EXPAND_WEIGHT) -> SearchHits | list[SearchHits]:
        """The k tiles most similar (cosine) to `query`, best first, among tiles embedded with `checkpoint_hash`.

        `query` is one [dim] vector (returns SearchHits) or a [q, dim] batch (returns a list of them).
        `raster_ids` and `raster_paths` restrict the search to those rasters (their union);
        `bbox_wgs84` (lon_min, lat_min, lon_max, lat_max) keeps tiles whose EPSG:4326 box intersects
        it. `exact=False` uses the inverted-file index when at least `ann_threshold` tiles are
        candidates (else the search is exact; SearchHits.approximate says which ran). `min_score`
        drops hits below that cosine similarity. `expand` N > 0 ranks twice: the second time for the
        query plus `expand_weight` x the mean embedding of its N best tiles (`expanded_queries`);
        scores are then cosine similarities to that expanded query.
        """
        request = self._search_request(query, k, checkpoint_hash, raster_ids, raster_paths, bbox_wgs84, nprobe)
        expansion = _check_expansion(expand, expand_weight)
        single = np.ndim(query) == 1

        def attempt():
            return [SearchHits(self._hits(r), tiles_searched=r.tiles_searched, approximate=r.approximate)
                    for r in self._rank(*request, exact, min_score, *expansion)]
        results = self._consistent(attempt)
        return results[0] if single else results

    def rank(self, query: np.ndarray, k: int, checkpoint_hash: str, raster_ids: Iterable | None = None,
             raster_paths: Iterable | None = None, bbox_wgs84: Sequence[float] | None = None, exact: bool = True,
             nprobe: int | None = None, min_score: float | None = None, expand: int = 0,
             expand_weight: float = EXPAND_WEIGHT) -> Ranking | list[Ranking]:
        """`search` without the tiles' metadata: ids and scores only, for callers that need no more."""
        request = self._search_request(query, k, checkpoint_hash, raster_ids, raster_paths, bbox_wgs84, nprobe)
        expansion = _check_expansion(expand, expand_weight)
        results = self._consistent(lambda: self._rank(*request, exact, min_score, *expansion))
        return results[0] if np.ndim(query) == 1 else results

    def tile_embedding(self, tile_id: int, checkpoint_hash: str) -> np.ndarray:
        """The stored unit embedding of one tile (float32 [dim]), as a query for tiles like it."""
        self._check_open()
        if isinstance(tile_id, bool) or not isinstance(tile_id, (int, np.integer)) or tile_id < 0:
            raise TileIndexError("invalid_argument", f"a tile id is a whole number >= 0, got {tile_id!r}")

        def attempt() -> np.ndarray:
            conn = self._reader()
            # SQLite's integers stop at 2**63 - 1: a larger id names no tile
            row = None if tile_id >= 2**63 else conn.execute("SELECT raster_id FROM tiles WHERE id=?",
                                                              (int(tile_id),)).fetchone()
            if row is None:
                raise TileIndexError("not_found", f"tile {tile_id} is not in the tile index (ids are SearchHit."
                                                  "tile_id of a search; re-indexing a raster gives its tiles new ids)")
            header = conn.execute("SELECT id, source_key, checkpoint_hash FROM rasters WHERE id=?",
                                  (row[0],)).fetchone()
            if header is None:
                raise _Stale()
            raster_id = self._check_checkpoint(header, checkpoint_hash)
            snap = self._snapshot(checkpoint_hash)
            if snap is None or raster_id not in snap.slot_by_raster:
                raise _Stale()
            slot = snap.slots[snap.slot_by_raster[raster_id]]
            column = slot.start + int(tile_id) - slot.first_tile_id
            if not slot.start <= column < slot.stop:
                raise _Stale()
            return np.array(snap.vectors_t[:, column], dtype=np.float32)
        return self._consistent(attempt)

    def _consistent(self, work):
        """Run `work` until no write lands while it runs (it raises _Stale when one does)."""
        for _ in range(2):
            try:
                return work()
            except _Stale:
                pass
        with self._lock:  # no write can land now
            try:
                return work()
            except _Stale:
                # still inconsistent with no write landing: a raster whose embedding file could not
                # be read (the server log names it) is in the tables but in no snapshot
                raise TileIndexError("unavailable", "a raster asked for cannot be searched now: its embeddings "
                                                    "could not be read (the server log says why); re-index it, or "
                                                    "make its embedding file readable") from None

    def _search_request(self, query, k, checkpoint_hash, raster_ids, raster_paths, bbox_wgs84, nprobe) -> tuple:
        """Checked search arguments: (unit queries [q, dim], k, checkpoint, filters (raster ids, paths),
        the search box as given and a turn of the globe either way (or None), nprobe)."""
        self._check_open()
        q = np.asarray(query, dtype=np.float32)
        if q.ndim not in (1, 2) or q.shape[-1] == 0 or (q.ndim == 2 and q.shape[0] == 0):
            raise TileIndexError("invalid_argument",
                                 f"the query must be a [dim] vector or a [queries, dim] matrix, got shape {q.shape}")
        q = np.atleast_2d(q)
        norms = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64))[:, None]
        if not np.isfinite(norms).all():  # NaN and infinity both reach the norm
            raise TileIndexError("invalid_argument", "the query embedding contains NaN or infinite values")
        if (norms == 0).any():
            raise TileIndexError("invalid_argument", "the query embedding is all zeros; cosine similarity is undefined")
        q = np.ascontiguousarray(q / norms, dtype=np.float32)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise TileIndexError("invalid_argument", f"k must be a positive whole number of hits, got {k!r}")
        box = None
        if bbox_wgs84 is not None:
            box = _box(bbox_wgs84, "the search extent (EPSG:4326)", wraps=True)
            if box[0] > box[2]:
                if not crosses_antimeridian(box[0], box[2]):
                    raise TileIndexError("invalid_argument", f"the search extent (EPSG:4326) {box} is inverted: "
                                                             "xmin must be <= xmax (or east of 0 with xmax west of "
                                                             "it, for a box across 180 degrees)")
                box = (box[0], box[1], box[2] + 360.0, box[3])   # across 180 degrees: continuous instead
            # west edge into [-180, 180), as the tiles' boxes start: then a turn either way reaches them all
            turn = 360.0 * math.floor((box[0] + 180.0) / 360.0)
            # and a turn of the globe either way, worked out once for every raster the search tests
            box = tuple((box[0] - turn + t, box[1], box[2] - turn + t, box[3]) for t in (-360.0, 0.0, 360.0))
        # the filters are resolved to raster ids inside each attempt (`_rank`), so a raster removed or
        # re-indexed meanwhile is found missing there, not left to fail every retry
        filters = (list(raster_ids or ()), list(raster_paths or ()))
        nprobe = self.nprobe if nprobe is None else int(nprobe)
        if nprobe <= 0:
            raise TileIndexError("invalid_argument", f"nprobe must be positive, got {nprobe}")
        return q, int(k), checkpoint_hash, filters, box, nprobe

    def _selected_rasters(self, raster_ids, raster_paths, checkpoint_hash: str) -> set | None:
        """Raster ids named by the filters (None = all); unknown or stale ones raise not_found."""
        if not raster_ids and not raster_paths:
            return None
        conn = self._reader()
        selected = set()
        for rid in raster_ids or ():
            row = conn.execute("SELECT id, source_key, checkpoint_hash FROM rasters WHERE id=?",
                               (self._raster_id_arg(rid),)).fetchone()
            if row is None:
                raise TileIndexError("not_found", f"raster id {rid} is not in the tile index; index the raster first "
                                                  "or drop it from the filter")
            selected.add(self._check_checkpoint(row, checkpoint_hash))
        for path in raster_paths or ():
            key = normalise_raster_path(path)
            row = conn.execute("SELECT id, source_key, checkpoint_hash FROM rasters WHERE source_key=?",
                               (key,)).fetchone()
            if row is None:
                raise TileIndexError("not_found", f"raster {key!r} is not in the tile index; index it first "
                                                  "or drop it from the filter")
            selected.add(self._check_checkpoint(row, checkpoint_hash))
        return selected

    @staticmethod
    def _check_checkpoint(row, checkpoint_hash: str) -> int:
        if row["checkpoint_hash"] != checkpoint_hash:
            raise TileIndexError("not_found", f"raster {row['source_key']!r} (id {row['id']}) was indexed with "
                                              f"checkpoint {row['checkpoint_hash']}, not {checkpoint_hash}; "
                                              "re-index it to search it")
        return row["id"]

    def _rank(self, q: np.ndarray, k: int, checkpoint_hash: str, filters: tuple, boxes_turned, nprobe: int,
              exact: bool, min_score: float | None, expand: int = 0,
              expand_weight: float = EXPAND_WEIGHT) -> list[Ranking]:
        selected = self._selected_rasters(*filters, checkpoint_hash)
        snap = self._snapshot(checkpoint_hash)
        for r in () if selected is None else selected - set(snap.slot_by_raster if snap else ()):
            # an empty raster (every tile skipped) is in no snapshot; nor is one whose embeddings
            # could not be read; any other was added after this one
            why = self._unsearchable.get(checkpoint_hash, {}).get(r)
            row = self._reader().execute("SELECT tile_count, source_key FROM rasters WHERE id=?", (r,)).fetchone()
            if why and row is not None:
                raise TileIndexError("unavailable", f"raster {row['source_key']!r} (id {r}) cannot be searched: {why}")
            if row is None or row[0] > 0:
                raise _Stale()
        if snap is None:
            return [Ranking(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64), 0, False) for _ in q]
        if snap.dim != q.shape[1]:
            raise TileIndexError("invalid_argument", f"the query has {q.shape[1]} dims but the index holds "
                                                     f"{snap.dim}-dim embeddings from checkpoint {checkpoint_hash}; "
                                                     "embed the query with that checkpoint")
        slots = snap.slots if selected is None else [snap.slots[snap.slot_by_raster[r]] for r in sorted(selected)
                                                     if r in snap.slot_by_raster]
        masks = {}
        if boxes_turned is not None:
            kept = []
            for slot in slots:
                mask = self._box_mask(snap, slot, boxes_turned)
                if mask is False:
                    continue
                kept.append(slot)
                if mask is not True:
                    masks[slot.raster_id] = mask
            slots = kept
        candidates = sum(s.stop - s.start for s in slots) - sum(int((~m).sum()) for m in masks.values())

        def ranked_by(queries: np.ndarray, n: int) -> tuple[list, bool]:
            if not exact and candidates >= self.ann_threshold:
                found = self._approximate(snap, queries, n, slots, masks, nprobe, candidates)
                if found is not None:
                    return found, True
            return self._exact(snap, queries, n, slots, masks), False
        ranked, approximate = ranked_by(q, max(k, expand))
        if expand > 0:
            # pseudo-relevance feedback: one more ranking, for the query moved toward its best tiles
            ranked, approximate = ranked_by(expanded_queries(q, snap.vectors_t, [c for c, _, _ in ranked],
                                                             expand, expand_weight), k)
        out = []
        for columns, scores, searched in ranked:
            if min_score is not None:
                keep = scores >= min_score
                columns, scores = columns[keep], scores[keep]
            owner = snap.slot_of_column[columns]
            tile_ids = snap.first_tile_of_slot[owner] + (columns - snap.start_of_slot[owner])
            out.append(Ranking(tile_ids, scores, snap.raster_of_slot[owner], searched, approximate))
        return out

    def _box_mask(self, snap: _Snapshot, slot: _Slot, boxes_turned):
        """True (every tile of the raster intersects the box), False (none does) or a per-tile mask.
        Longitudes are continuous, so a box or a tile may reach past 180 degrees: `boxes_turned` is
        the box as given and a turn of the globe either way (from _search_request)."""
        env = slot.envelope
        if env == NO_LONLAT_BOX:
            return False    # a raster without longitude/latitude lies in no EPSG:4326 box, whatever its numbers
        shifted = [b for b in boxes_turned if not (env[0] > b[2] or env[2] < b[0] or env[1] > b[3] or env[3] < b[1])]
        if not shifted:
            return False
        if any(env[0] >= b[0] and env[2] <= b[2] and env[1] >= b[1] and env[3] <= b[3] for b in shifted):
            return True
        boxes = snap.tile_boxes.get(slot.raster_id)
        if boxes is None:
            rows = self._reader().execute(
                "SELECT wgs84_xmin, wgs84_ymin, wgs84_xmax, wgs84_ymax FROM tiles WHERE id BETWEEN ? AND ? ORDER BY id",
                (slot.first_tile_id, slot.first_tile_id + slot.stop - slot.start - 1)).fetchall()
            boxes = np.array(rows, dtype=np.float64).reshape(-1, 4)
            if len(boxes) != slot.stop - slot.start:
                raise _Stale()
            snap.tile_boxes[slot.raster_id] = boxes
        mask = np.zeros(len(boxes), bool)
        for b in shifted:
            mask |= (boxes[:, 0] <= b[2]) & (boxes[:, 2] >= b[0]) & (boxes[:, 1] <= b[3]) & (boxes[:, 3] >= b[1])
        return mask

    @staticmethod
    def _exact(snap: _Snapshot, q: np.ndarray, k: int, slots: list, masks: dict) -> list:
        """(columns, scores, searched) per query over the given slots, best first."""
        if not slots:
            return [(np.zeros(0, np.int64), np.zeros(0, np.float32), 0) for _ in q]
        ranges = []
        for slot in slots:  # merge neighbours: fewer, larger matrix products
            if ranges and ranges[-1][1] == slot.start:
                ranges[-1][1] = slot.stop
            else:
                ranges.append([slot.start, slot.stop])
        vt = snap.vectors_t
        if ranges == [[0, snap.size]]:
            # a 1-D dot over the whole contiguous matrix is BLAS gemv without a copy
            scores = np.dot(q[0], vt)[None] if len(q) == 1 else q @ vt
            columns = None
        else:
            scores = np.concatenate([q @ vt[:, a:b] for a, b in ranges], axis=1)
            columns = np.concatenate([np.arange(a, b) for a, b in ranges])
        for slot in slots:
            mask = masks.get(slot.raster_id)
            if mask is not None:
                offset = slot.start if columns is None else int(np.searchsorted(columns, slot.start))
                scores[:, offset:offset + len(mask)][:, ~mask] = -np.inf
        searched = scores.shape[1] - sum(int((~m).sum()) for m in masks.values())
        out = []
        for row in scores:
            top = _top_k(row, min(k, searched))
            out.append((top if columns is None else columns[top], row[top], searched))
        return out

    def _approximate(self, snap: _Snapshot, q: np.ndarray, k: int, slots: list, masks: dict, nprobe: int,
                     candidates: int) -> list | None:
        """Inverted-file search; None when it found fewer than k tiles and exact search must answer."""
        ivf = self._ivf(snap)
        allowed = None
        if len(slots) != len(snap.slots) or masks:
            allowed = np.zeros(snap.size, bool)
            for slot in slots:
                allowed[slot.start:slot.stop] = masks.get(slot.raster_id, True)
        nprobe = min(nprobe, len(ivf.centroids))
        out = []
        for query in q:
            lists = np.argpartition(ivf.centroids @ query, len(ivf.centroids) - nprobe)[len(ivf.centroids) - nprobe:]
            parts, cols = [], []
            for lst in lists:
                a, b = ivf.offsets[lst], ivf.offsets[lst + 1]
                if a < b:
                    parts.append(ivf.vectors[a:b] @ query)
                    cols.append(ivf.columns[a:b])
            scores = np.concatenate(parts) if parts else np.zeros(0, np.float32)
            columns = np.concatenate(cols) if cols else np.zeros(0, np.int64)
            if allowed is not None:
                keep = allowed[columns]
                scores, columns = scores[keep], columns[keep]
            if len(scores) < min(k, candidates):
                return None
            top = _top_k(scores, k)
            out.append((columns[top], scores[top], len(scores)))
        return out

    def _hits(self, ranking: Ranking) -> list[Hit]:
        """The ranked tiles with their metadata; _Stale when a write removed some meanwhile."""
        if len(ranking.tile_ids) == 0:
            return []
        tile_ids = ranking.tile_ids.tolist()
        # rasters first: if their tiles still exist afterwards, no write replaced them in between
        rasters = {rid: self._raster_header(rid) for rid in set(ranking.raster_ids.tolist())}
        rows = {}
        conn = self._reader()
        for s in range(0, len(tile_ids), 500):
            chunk = tile_ids[s:s + 500]
            sql = f"SELECT {TILE_COLUMNS} FROM tiles WHERE id IN ({','.join('?' * len(chunk))})"
            for r in conn.execute(sql, chunk):
                rows[r[0]] = r
        if len(rows) != len(tile_ids):
            raise _Stale()  # a raster was replaced or removed since the ranking
        hits = []
        for tid, score in zip(tile_ids, ranking.scores.tolist()):
            (_, rid, col, row, width, height, x0, y0, x1, y1, gx0, gy0, gx1, gy1, footprint, footprint_wgs84,
             extra) = rows[tid]
            path, name, crs_authid, crs_wkt = rasters[rid]
            lonlat = None if (gx0, gy0, gx1, gy1) == NO_LONLAT_BOX else (gx0, gy0, gx1, gy1)
            hits.append(Hit(score, rid, path, name, tid, col, row, width, height, (x0, y0, x1, y1),
                            lonlat, footprint, footprint_wgs84, crs_authid, crs_wkt,
                            json.loads(extra) if extra else {}))
        return hits

    def _raster_header(self, raster_id: int) -> tuple:
        """(path, name, crs_authid, crs_wkt) of a raster, cached per index generation (a header read
        while a write landed is cached under the older generation, which no later search asks for)."""
        key = (raster_id, self._generation)
        header = self._headers.get(key)
        if header is None:
            header = self._reader().execute("SELECT source_key, name, crs_authid, crs_wkt FROM rasters WHERE id=?",
                                            (raster_id,)).fetchone()
            if header is None:
                raise _Stale()
            header = tuple(header)
            if len(self._headers) > 4096:
                self._headers.clear()
            self._headers[key] = header
        return header

    # -- in-memory copies --
    def prepare(self, checkpoint_hash: str, ann: bool = False) -> None:
        """Build the search copy (and the inverted-file index) now, e.g. at server start-up, so the
        first search does not pay for it."""
        snap = self._snapshot(checkpoint_hash)
        if ann and snap is not None and snap.size >= self.ann_threshold:
            self._ivf(snap)

    def unsearchable_rasters(self, checkpoint_hash: str) -> list[dict]:
        """The rasters of `checkpoint_hash` that searches leave out now, as {"id", "path", "name",
        "reason"}: their embedding file could not be read or is damaged (the server log has more)."""
        self._snapshot(checkpoint_hash)
        reasons = self._unsearchable.get(checkpoint_hash, {})
        out = []
        for raster_id, reason in sorted(reasons.items()):
            row = self._reader().execute("SELECT source_key, name FROM rasters WHERE id=?", (raster_id,)).fetchone()
            if row is not None:     # removed since
                out.append({"id": raster_id, "path": row["source_key"], "name": row["name"], "reason": reason})
        return out

    def _snapshot(self, checkpoint_hash: str) -> _Snapshot | None:
        snap = self._snapshots.get(checkpoint_hash)
        if snap is not None and snap.generation == self._generation:
            return snap
        with self._lock:
            self._check_open()
            snap = self._snapshots.get(checkpoint_hash)
            if snap is not None and snap.generation == self._generation:
                return snap
            snap = self._build_snapshot(checkpoint_hash, snap)
            if snap is None:
                self._snapshots.pop(checkpoint_hash, None)
            else:
                self._snapshots[checkpoint_hash] = snap
            return snap

    def _build_snapshot(self, checkpoint_hash: str, previous: _Snapshot | None) -> _Snapshot | None:
        """Concatenate the checkpoint's matrices as float32 [dim, n]; reuse unchanged rasters' columns."""
        rows = self._db.execute(
            "SELECT id, embeddings_file, tile_count, dim, first_tile_id, tiles_wgs84_xmin, tiles_wgs84_ymin, "
            "tiles_wgs84_xmax, tiles_wgs84_ymax FROM rasters WHERE checkpoint_hash=? AND tile_count>0 ORDER BY id",
            (checkpoint_hash,)).fetchall()
        unsearchable: dict[int, str] = {}
        self._unsearchable[checkpoint_hash] = unsearchable
        if not rows:
            return None
        dim = rows[0]["dim"]
        reuse = {}
        if previous is not None and previous.dim == dim:
            reuse = {(s.raster_id, s.file): s for s in previous.slots}
        sources, slots, start = [], [], 0
        for row in rows:
            key = (row["id"], row["embeddings_file"])
            old = reuse.get(key)
            if old is None:
                try:
                    matrix = _read_matrix(self.embeddings_dir / row["embeddings_file"])
                    if matrix.shape != (row["tile_count"], dim):
                        raise ValueError(f"has shape {matrix.shape}")
                    if not all(np.isfinite(matrix[i:i + CONVERT_ROWS]).all() for i in range(0, len(matrix), CONVERT_ROWS)):
                        # the right size, but overwritten: every score with it would be NaN
                        raise ValueError("holds values that are not numbers (it was overwritten)")
                except (FileNotFoundError, ValueError) as e:
                    log.error("tile index: raster %s is not searchable: its embedding file %s: %s; re-index it",
                              row["id"], row["embeddings_file"], e)
                    lost = "missing" if isinstance(e, FileNotFoundError) else "damaged"
                    unsearchable[row["id"]] = f"its embedding file is {lost}: re-index it"
                    continue
                except OSError as e:  # e.g. permission denied: the file may be intact, so no re-index
                    _log_unreadable(row, self.embeddings_dir / row["embeddings_file"], e)
                    unsearchable[row["id"]] = (f"its embedding file cannot be read ({e.strerror or e}): make it readable "
                                               "and restart the server")
                    continue
            else:
                matrix = None
            n = row["tile_count"]
            envelope = tuple(row["tiles_wgs84_" + c] for c in ("xmin", "ymin", "xmax", "ymax"))
            slots.append(_Slot(row["id"], row["embeddings_file"], start, start + n, row["first_tile_id"], envelope))
            sources.append((old, matrix))
            start += n
        if not slots:
            return None
        vt = np.empty((dim, start), np.float32)
        for slot, (old, matrix) in zip(slots, sources):
            if old is not None:
                vt[:, slot.start:slot.stop] = previous.vectors_t[:, old.start:old.stop]
                continue
            for s in range(0, len(matrix), CONVERT_ROWS):
                chunk = np.asarray(matrix[s:s + CONVERT_ROWS], dtype=np.float32)
                vt[:, slot.start + s:slot.start + s + len(chunk)] = chunk.T
            del matrix
        slot_of_column = np.repeat(np.arange(len(slots), dtype=np.int32), [s.stop - s.start for s in slots])
        return _Snapshot(self._generation, checkpoint_hash, dim, vt, slot_of_column, slots,
                         {s.raster_id: i for i, s in enumerate(slots)})

    def _ivf(self, snap: _Snapshot) -> _Ivf:
        """The snapshot's inverted-file index; trains the quantiser when there is none yet, when
        fewer than half of today's tiles were among those it was trained on (rasters added, replaced
        or removed since: its centroids describe data mostly gone, lists grow unbalanced and recall
        drops; this also covers growing past 2x), or when the index has shrunk 4x (too many lists
        for what is left). Assigns only rasters it has not seen."""
        if snap.ivf is not None:
            return snap.ivf
        with self._lock:
            if snap.ivf is not None:
                return snap.ivf
            quant = self._quantisers.get(snap.checkpoint_hash)
            n = snap.size
            known = 0 if quant is None else sum(s.stop - s.start for s in snap.slots
                                                if (s.raster_id, s.file) in quant.trained_rasters)
            if (quant is None or quant.centroids.shape[1] != snap.dim
                    or n * 4 < quant.trained_on or known * 2 < n):
                nlist = lists_for(n)
                rng = np.random.default_rng(0)
                sample = np.sort(rng.choice(n, min(n, 64 * nlist), replace=False))
                train = np.ascontiguousarray(snap.vectors_t[:, sample].T)
                quant = _Quantiser(spherical_kmeans(train, nlist), trained_on=n,
                                   trained_rasters=frozenset((s.raster_id, s.file) for s in snap.slots))
                self._quantisers[snap.checkpoint_hash] = quant
            labels = np.empty(n, np.int32)
            live = set()
            for slot in snap.slots:
                key = (slot.raster_id, slot.file)
                live.add(key)
                if key not in quant.labels:
                    vectors = snap.vectors_t[:, slot.start:slot.stop].T
                    quant.labels[key] = _nearest_centroid(vectors, quant.centroids)
                labels[slot.start:slot.stop] = quant.labels[key]
            for key in set(quant.labels) - live:
                del quant.labels[key]
            columns = np.argsort(labels, kind="stable")
            offsets = np.zeros(len(quant.centroids) + 1, np.int64)
            np.cumsum(np.bincount(labels, minlength=len(quant.centroids)), out=offsets[1:])
            vectors = np.empty((n, snap.dim), np.float32)
            for s in range(0, n, CONVERT_ROWS):
                vectors[s:s + CONVERT_ROWS] = snap.vectors_t[:, columns[s:s + CONVERT_ROWS]].T
            snap.ivf = _Ivf(quant.centroids, vectors, columns, offsets)
            return snap.ivf


def _log_unreadable(row, path: Path, error: OSError) -> None:
    """A raster kept, though its embedding file cannot be read now (permission, I/O): what to do."""
    log.error("tile index: raster %s is kept but cannot be searched: its embedding file %s cannot be read (%s); "
              "give the server's user read access to it (or fix the disk) and restart the server",
              row["id"], path, error.strerror or error)


class RasterWriter:
    """Streams one raster's tiles and embeddings into a temporary file; see TileIndex.writer."""

    def __init__(self, index: TileIndex, identity: dict, checkpoint_hash: str, settings, raster_meta: dict, dim: int):
        self.key, self.size, self.mtime_ns, self.sources = _identity_fields(identity)
        if not checkpoint_hash or not isinstance(checkpoint_hash, str):
            raise TileIndexError("invalid_argument", "a checkpoint hash is required: embeddings are only "
                                                     "comparable within one checkpoint")
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise TileIndexError("invalid_argument", f"the embedding dimension must be a positive integer, got {dim!r}")
        self.index = index
        self.checkpoint_hash = checkpoint_hash
        self.settings = canonical_settings(settings)
        self.meta = self._raster_meta(raster_meta or {})
        self.dim = int(dim)
        self.rows = 0
        self.tile_rows: list[tuple] = []
        self._env = [np.inf, np.inf, -np.inf, -np.inf]
        self.raster_id: int | None = None
        self.replaced = False
        self._done = False
        self._temp = index.embeddings_dir / f"{TEMP_PREFIX}{uuid.uuid4().hex}.npy"
        try:
            self._file = open(self._temp, "wb")
        except OSError as e:
            raise _out_of_space(e, index.directory) or e
        self._write(_npy_header(0, self.dim))  # rewritten with the real count on commit

    def _write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as e:
            raise _out_of_space(e, self.index.directory) or e

    def _raster_meta(self, meta: dict) -> dict:
        unknown = {k: v for k, v in meta.items() if k not in RASTER_FIELDS}
        try:
            extra = json.dumps(unknown, sort_keys=True)
        except TypeError as e:
            raise TileIndexError("invalid_argument", f"raster metadata must be JSON-serialisable: {e}") from None
        return {
            "name": str(meta.get("name") or os.path.basename(self.key) or self.key),
            "crs_authid": str(meta.get("crs_authid") or ""), "crs_wkt": str(meta.get("crs_wkt") or ""),
            "width": int(meta.get("width") or 0), "height": int(meta.get("height") or 0),
            "band_count": int(meta.get("band_count") or 0), "tiles_skipped": int(meta.get("tiles_skipped") or 0),
            "bounds": None if meta.get("bounds") is None else _box(meta["bounds"], "raster bounds"),
            "bounds_wgs84": None if meta.get("bounds_wgs84") is None else _box(meta["bounds_wgs84"],
                                                                                "raster bounds_wgs84", wraps=True),
            "extra": extra,
        }

    def _tile_row(self, tile: dict, i: int) -> tuple:
        try:
            col, row, width, height = (int(tile[k]) for k in ("col", "row", "width", "height"))
        except (KeyError, TypeError, ValueError):
            raise TileIndexError("invalid_argument", f"tile {i} needs integer 'col', 'row', 'width' and 'height' "
                                                     f"(its pixel window), got {sorted(tile)}") from None
        if "bounds" not in tile or "bounds_wgs84" not in tile:
            raise TileIndexError("invalid_argument", f"tile {i} needs 'bounds' (raster CRS) and 'bounds_wgs84'")
        b = _box(tile["bounds"], f"tile {i} bounds")
        g = NO_LONLAT_BOX if tile["bounds_wgs84"] is None else _box(tile["bounds_wgs84"], f"tile {i} bounds_wgs84")
        footprint_wgs84 = "" if g == NO_LONLAT_BOX else str(tile.get("footprint_wgs84_wkt") or _rectangle_wkt(g))
        unknown = {k: v for k, v in tile.items() if k not in TILE_FIELDS}
        return (col, row, width, height, *b, *g, str(tile.get("footprint_wkt") or _rectangle_wkt(b)),
                footprint_wgs84, json.dumps(unknown) if unknown else None)

    def add(self, tiles: Sequence[dict], embeddings: np.ndarray) -> None:
        """Append tiles and their [len(tiles), dim] embeddings (rows are L2-normalised here)."""
        if self._done:
            raise TileIndexError("invalid_argument", "this raster writer is already committed or aborted")
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise TileIndexError("invalid_argument", f"embeddings must have shape [tiles, {self.dim}], got {emb.shape}")
        if len(tiles) != len(emb):
            raise TileIndexError("invalid_argument", f"{len(tiles)} tiles but {len(emb)} embeddings; they must pair up")
        if not np.isfinite(emb).all():
            raise TileIndexError("invalid_argument", "the embeddings contain NaN or infinite values")
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        if (norms == 0).any():
            row = int(np.flatnonzero(norms[:, 0] == 0)[0])
            raise TileIndexError("invalid_argument", f"embedding row {row} is all zeros")
        rows = [self._tile_row(t, self.rows + i) for i, t in enumerate(tiles)]
        self._write((emb / norms).astype("<f2").tobytes())
        self.tile_rows.extend(rows)
        if rows:
            boxes = np.array([r[8:12] for r in rows])
            lo, hi = boxes.min(axis=0), boxes.max(axis=0)
            self._env = [min(self._env[0], lo[0]), min(self._env[1], lo[1]),
                         max(self._env[2], hi[2]), max(self._env[3], hi[3])]
        self.rows += len(emb)

    def envelope(self) -> tuple:
        return tuple(float(v) for v in self._env) if self.rows else (None, None, None, None)

    def commit(self) -> int:
        """Publish the raster: finish and fsync the file, rename it, register it in SQLite."""
        if self._done:
            raise TileIndexError("invalid_argument", "this raster writer is already committed or aborted")
        self._done = True
        final = self.index.embeddings_dir / f"{uuid.uuid4().hex}.npy"
        published = False
        try:
            self._file.seek(0)
            self._file.write(_npy_header(self.rows, self.dim))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            with self.index._lock:      # noted first: a crash between renaming and registering leaves no stray file
                self.index._check_open()
                self.index._note_disposable(final.name)
            _publish_file(self._temp, final)
            published = True
            self.raster_id, self.replaced = self.index._register(self, final.name, final.stat().st_size)
        except BaseException as e:
            _close_quietly(self._file)
            _discard_file(final if published else self._temp)
            raise _out_of_space(e, self.index.directory) or e
        return self.raster_id

    def abort(self) -> None:
        """Discard everything written so far; the index is as if the writer never existed."""
        if self._done:
            return
        self._done = True
        _close_quietly(self._file)
        _discard_file(self._temp)

    def __enter__(self) -> "RasterWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._done:
            self.commit()
        else:
            self.abort()
