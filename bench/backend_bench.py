"""Backend benchmark: a real server subprocess, called over gRPC on loopback.

Measures
  - indexing throughput (tiles/s) of a generated 2048 x 2048 GeoTIFF, next to the bare model
    encoding and captioning the same number of tiles in the same run (the ratio is what reading,
    tiling and writing the index cost on top of the model; the server captions each tile for
    keyword matching), and encoding alone;
  - Segment latency for a 1024 x 1024-pixel extent (target: under 3 s on CPU with `small`), with
    the default edge refinement next to the same request without it (`edge_radius` 0);
  - peak RSS of the server while indexing a raster of about 20000 x 20000 pixels (18432^2: a VRT mosaic of one
    generated GeoTIFF; target: under 1.5 GB), at a coarser target resolution so the run is short
    on CPU: the reads are still windowed over the full-size raster. The server's peak is reset just
    before (Linux: /proc/<pid>/clear_refs), so what the earlier sections reached does not count;
    where it cannot be reset the row says it is the server's peak so far;
  - end-to-end Search latency through gRPC (query embedding + index lookup) on what was indexed,
    with the query's prompt ensemble (the default) and as typed (`raw_query`);
  - Search with thumbnails, as the plugin asks for them: 50 hits from a 16-bit, DEFLATE-compressed
    5000 x 5000 GeoTIFF (its stretch is worked out from a read of the whole raster, decimated, when
    it is opened), next to the same search without thumbnails.
Search latency of the index alone at 10k / 100k / 1M embeddings next to FAISS is in index.json.

Uses the bundled checkpoint when present, else a random-weight `small` (conv stem, 128 px): speed
does not depend on the weights' values.
"""
from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import save_results, write_geotiff

NAME = "backend"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
SEGMENT_TARGET_S = 3.0
RSS_TARGET_MB = 1536


def _geotiff(path: Path, side: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    # smooth-ish structured content rather than white noise: blocks of colour plus texture
    base = rng.integers(0, 255, (3, side // 32 + 1, side // 32 + 1)).astype(np.uint8)
    data = np.repeat(np.repeat(base, 32, 1), 32, 2)[:, :side, :side]
    data = np.clip(data.astype(np.int16) + rng.integers(-20, 20, data.shape), 0, 255).astype(np.uint8)
    return write_geotiff(path, data, origin=(500000.0, 4000000.0))


def _geotiff16(path: Path, side: int, seed: int = 1) -> Path:
    """A 16-bit, DEFLATE-compressed GeoTIFF, as satellite imagery is often delivered."""
    rng = np.random.default_rng(seed)
    base = rng.integers(200, 3000, (3, side // 32 + 1, side // 32 + 1)).astype(np.uint16)
    data = np.repeat(np.repeat(base, 32, 1), 32, 2)[:, :side, :side] + rng.integers(0, 200, (3, side, side), np.uint16)
    return write_geotiff(path, data, origin=(600000.0, 4000000.0), options=("COMPRESS=DEFLATE",))


def _mosaic_vrt(path: Path, tile: Path, tile_side: int, side: int) -> Path:
    """A side x side VRT made of copies of one tile_side GeoTIFF (no pixels written)."""
    n = side // tile_side
    sources = []
    for r in range(n):
        for c in range(n):
            for b in range(1, 4):
                sources.append((b, f"""    <SimpleSource><SourceFilename relativeToVRT="0">{tile}</SourceFilename>
      <SourceBand>{b}</SourceBand><SrcRect xOff="0" yOff="0" xSize="{tile_side}" ySize="{tile_side}"/>
      <DstRect xOff="{c * tile_side}" yOff="{r * tile_side}" xSize="{tile_side}" ySize="{tile_side}"/></SimpleSource>"""))
    from osgeo import osr
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    bands = []
    for b, colour in zip(range(1, 4), ("Red", "Green", "Blue")):
        body = "\n".join(s for bb, s in sources if bb == b)
        bands.append(f'  <VRTRasterBand dataType="Byte" band="{b}"><ColorInterp>{colour}</ColorInterp>\n{body}\n  </VRTRasterBand>')
    path.write_text(f'<VRTDataset rasterXSize="{side}" rasterYSize="{side}">\n  <SRS>{srs.ExportToWkt()}</SRS>\n'
                    f'  <GeoTransform>500000.0, 0.5, 0.0, 4000000.0, 0.0, -0.5</GeoTransform>\n'
                    + "\n".join(bands) + "\n</VRTDataset>\n")
    return path


def _checkpoint(work: Path) -> Path:
    from backend.engine import BUNDLED_CHECKPOINT
    if (BUNDLED_CHECKPOINT / "model.safetensors").exists():
        return BUNDLED_CHECKPOINT
    import torch
    from backend.model import MaMMUT, get_preset
    from backend.model.checkpoint import save_checkpoint
    from backend.model.tokenizer import train_tokenizer

    tok = train_tokenizer(["an aerial image of fields and roads", "a river near a town"] * 10, vocab_size=300,
                          min_frequency=1)
    cfg = get_preset("small", vocab_size=8192, image_size=128, patch_stem="conv")
    torch.manual_seed(0)
    return save_checkpoint(MaMMUT(cfg).eval(), tok, work / "small-random")


def _status_mb(pid: int, field: str) -> float:
    """A memory field of /proc/<pid>/status in MB; NaN where there is none (not Linux)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return float("nan")
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith(field + ":")), float("nan"))


def peak_rss_mb(pid: int) -> float:
    """Process `pid`'s peak resident set size (VmHWM): over its whole life, or since reset_peak_rss."""
    return _status_mb(pid, "VmHWM")


def rss_mb(pid: int) -> float:
    return _status_mb(pid, "VmRSS")


def reset_peak_rss(pid: int) -> bool:
    """Set process `pid`'s peak RSS (VmHWM) back to its RSS now (Linux: 5 into /proc/<pid>/clear_refs),
    so a later peak_rss_mb is the peak of what it did in between; False where that cannot be done
    (not Linux, another user's process), and the peak stays the process's lifetime peak."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


# what the large-raster row's peak RSS is the peak of: indexing alone when the peak could be reset
# before it, else everything the server did until then (the earlier sections too)
PEAK_WHILE_INDEXING = "while indexing the large raster (reset just before it)"
PEAK_SO_FAR = "so far, the earlier sections' included (it could not be reset here)"


class _Server:
    def __init__(self, checkpoint: Path, data_dir: Path, root: Path):
        self.port_file = data_dir.parent / "port"
        cmd = [sys.executable, "-m", "backend", "serve", "--checkpoint", str(checkpoint), "--port", "0",
               "--port-file", str(self.port_file), "--data-dir", str(data_dir), "--device", "cpu",
               "--allow-root", str(root), "--log-level", "WARNING"]
        self.log_path = data_dir.parent / "server.log"
        with open(self.log_path, "w") as log:   # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 300
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"benchmark server did not start: {self.log_path.read_text()}")
            time.sleep(0.1)
        import grpc
        from backend.rpc import skyprompt_pb2_grpc as pb_grpc
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port_file.read_text()}")
        self.stub = pb_grpc.SkyPromptStub(self.channel)

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.proc.pid)

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def stop(self) -> None:
        self.channel.close()
        self.proc.terminate()
        self.proc.wait(60)


def run(quick: bool = False, out_dir: Path | None = RESULTS_DIR, checkpoint: Path | None = None,
        index_side: int | None = None, big_side: int = 20000, deep_side: int | None = None, echo=print) -> dict:
    """Measure everything (see the module docstring); `checkpoint`, `index_side`, `big_side` and
    `deep_side` (the 16-bit raster's) make smaller runs for tests."""
    import torch
    from backend.engine import ModelEngine
    from backend.rpc import skyprompt_pb2 as pb

    work = Path(tempfile.mkdtemp(prefix="skyprompt-bench-"))
    checkpoint = checkpoint or _checkpoint(work)
    index_side = index_side or (1024 if quick else 2048)
    raster = _geotiff(work / "index.tif", index_side)
    results: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                                 "torch": torch.__version__},
                     "checkpoint": str(checkpoint)}

    # bare model, in-process: the peer for indexing throughput
    engine = ModelEngine(checkpoint, "cpu")
    size = engine.image_size
    n_tiles = (index_side // size) ** 2
    tiles = np.random.default_rng(0).integers(0, 255, (n_tiles, 3, size, size)).astype(np.uint8)
    engine.embed_images(tiles[:8])
    t = time.perf_counter()
    engine.embed_images(tiles)
    model_tps = n_tiles / (time.perf_counter() - t)
    # and with each tile's caption too, as the server indexes by default (keyword matching)
    engine.embed_and_describe(tiles[:8])
    t = time.perf_counter()
    engine.embed_and_describe(tiles)
    captioned_tps = n_tiles / (time.perf_counter() - t)
    results["model"] = {"preset": engine.config.preset, "image_size": size}
    engine.stop()
    del engine

    server = _Server(checkpoint, work / "data", work)
    try:
        baseline_rss = server.rss_mb()
        t = time.perf_counter()
        done = list(server.stub.IndexRaster(pb.IndexRasterRequest(source=pb.RasterSource(path=str(raster)))))[-1]
        seconds = time.perf_counter() - t
        results["indexing"] = {"raster_pixels": f"{index_side}x{index_side}", "tiles": done.result.tile_count,
                               "seconds": seconds, "tiles_per_s": done.result.tile_count / seconds,
                               "bare_model_tiles_per_s": model_tps,
                               "ratio_to_bare_model": done.result.tile_count / seconds / model_tps,
                               "bare_model_with_captions_tiles_per_s": captioned_tps,
                               "ratio_to_bare_model_with_captions": done.result.tile_count / seconds / captioned_tps}

        # Segment latency: 1024 x 1024 pixels at native resolution, one prompt
        gt_x0, gt_y0, px = 500000.0, 4000000.0, 0.5
        extent = pb.Extent(xmin=gt_x0, ymin=gt_y0 - 1024 * px, xmax=gt_x0 + 1024 * px, ymax=gt_y0)
        request = pb.SegmentRequest(source=pb.RasterSource(path=str(raster)), prompts=["buildings"], extent=extent)
        unrefined = pb.SegmentRequest(source=request.source, prompts=request.prompts, extent=extent, edge_radius=0)
        list(server.stub.Segment(request))  # warm-up
        runs, unrefined_runs = [], []
        for _ in range(1 if quick else 3):       # interleaved: both see the same machine load
            t = time.perf_counter()
            events = list(server.stub.Segment(request))
            runs.append(time.perf_counter() - t)
            t = time.perf_counter()
            list(server.stub.Segment(unrefined))
            unrefined_runs.append(time.perf_counter() - t)
        tiles_done = max((e.progress.tiles_total for e in events if e.HasField("progress")), default=0)
        results["segment"] = {"extent_pixels": "1024x1024", "tiles": tiles_done, "median_s": float(np.median(runs)),
                              "runs_s": runs, "target_s": SEGMENT_TARGET_S,
                              "no_edge_refinement_median_s": float(np.median(unrefined_runs)),
                              "no_edge_refinement_runs_s": unrefined_runs}

        # Search through gRPC, end to end: the default (query averaged over its phrasings) against the
        # query embedded as typed, requests interleaved so both see the same machine load
        latencies = {False: [], True: []}
        for i in range(20 if quick else 100):
            for raw in (False, True):
                t = time.perf_counter()
                server.stub.Search(pb.SearchRequest(query=f"a parking lot number {i}", k=10, raw_query=raw))
                latencies[raw].append(time.perf_counter() - t)
        ms, raw_ms = (np.array(latencies[raw]) * 1000 for raw in (False, True))
        results["search_grpc"] = {"tiles": done.result.tile_count, "p50_ms": float(np.percentile(ms, 50)),
                                  "p99_ms": float(np.percentile(ms, 99)),
                                  "raw_query_p50_ms": float(np.percentile(raw_ms, 50)),
                                  "raw_query_p99_ms": float(np.percentile(raw_ms, 99))}

        # Search with thumbnails of 50 hits from a 16-bit raster, against the same search without
        deep_side = deep_side or (2000 if quick else 5000)
        deep = _geotiff16(work / "deep16.tif", deep_side)
        deep_done = list(server.stub.IndexRaster(pb.IndexRasterRequest(source=pb.RasterSource(path=str(deep)),
                                                                        target_resolution=2.0)))[-1]
        k = min(50, deep_done.result.tile_count)
        plain = pb.SearchRequest(query="fields", k=k, raster_ids=[deep_done.result.raster_id])
        with_thumbs = pb.SearchRequest(query="fields", k=k, raster_ids=[deep_done.result.raster_id],
                                       include_thumbnails=True, thumbnail_size=128)
        server.stub.Search(with_thumbs)      # warm-up
        timed = {False: [], True: []}
        for _ in range(3 if quick else 5):   # interleaved: both see the same machine load
            for thumbs, request in ((False, plain), (True, with_thumbs)):
                t = time.perf_counter()
                answer = server.stub.Search(request)
                timed[thumbs].append(time.perf_counter() - t)
        results["search_thumbnails"] = {
            "raster_pixels": f"{deep_side}x{deep_side}", "data_type": "UInt16, DEFLATE", "hits": len(answer.hits),
            "thumbnails": sum(1 for h in answer.hits if h.thumbnail_png), "thumbnail_size": 128,
            "median_ms": float(np.median(timed[True]) * 1000), "no_thumbnails_median_ms": float(np.median(timed[False]) * 1000)}

        # Peak RSS while indexing a big raster: whole index tiles of the mosaic, so a little under big_side
        side = big_side
        vrt = _mosaic_vrt(work / "big.vrt", raster, index_side, side - side % index_side)
        resolution = 0.5 * (16 if quick else 4)
        earlier_peak = server.peak_rss_mb()         # reached in the sections above
        reset = reset_peak_rss(server.proc.pid)
        rss_before = server.rss_mb()
        t = time.perf_counter()
        big = list(server.stub.IndexRaster(pb.IndexRasterRequest(source=pb.RasterSource(path=str(vrt)),
                                                                  target_resolution=resolution)))[-1]
        results["large_raster"] = {"raster_pixels": f"{side - side % index_side}^2", "target_resolution": resolution,
                                   "tiles": big.result.tile_count, "seconds": time.perf_counter() - t,
                                   "server_rss_at_start_mb": baseline_rss,
                                   "server_peak_rss_earlier_sections_mb": earlier_peak,
                                   "rss_before_indexing_mb": rss_before, "peak_rss_mb": server.peak_rss_mb(),
                                   "peak_rss_of": PEAK_WHILE_INDEXING if reset else PEAK_SO_FAR,
                                   "target_mb": RSS_TARGET_MB}
    finally:
        server.stop()
    results["targets"] = [
        {"target": f"Segment 1024x1024 under {SEGMENT_TARGET_S} s",
         "result": "PASS" if results["segment"]["median_s"] < SEGMENT_TARGET_S else "FAIL"},
        {"target": f"server peak RSS {results['large_raster']['peak_rss_of']}, a "
                   f"{results['large_raster']['raster_pixels']} raster, under {RSS_TARGET_MB} MB",
         "result": "PASS" if results["large_raster"]["peak_rss_mb"] < RSS_TARGET_MB else "FAIL"},
    ]
    save_results(results, NAME, out_dir)
    echo(report(results))
    shutil.rmtree(work, ignore_errors=True)     # rasters, index, server log: kept only when the run fails
    return results


def report(r: dict) -> str:
    i, s, q, th, big = r["indexing"], r["segment"], r["search_grpc"], r["search_thumbnails"], r["large_raster"]
    lines = [
        f"model: {r['model']['preset']} @ {r['model']['image_size']} px ({r['checkpoint']})",
        "",
        "| measure | value | peer / target |",
        "|---|---|---|",
        f"| indexing {i['raster_pixels']} ({i['tiles']} tiles, captions included) | {i['tiles_per_s']:.1f} tiles/s | "
        f"bare model embedding and captioning: {i['bare_model_with_captions_tiles_per_s']:.1f} tiles/s (ratio "
        f"{i['ratio_to_bare_model_with_captions']:.2f}); embedding alone: {i['bare_model_tiles_per_s']:.1f} tiles/s "
        f"(ratio {i['ratio_to_bare_model']:.2f}) |",
        f"| Segment {s['extent_pixels']} ({s['tiles']} tiles) | {s['median_s']:.2f} s | < {s['target_s']} s; "
        f"without edge refinement {s['no_edge_refinement_median_s']:.2f} s "
        f"(ratio {s['median_s'] / s['no_edge_refinement_median_s']:.2f}) |",
        f"| Search over gRPC, {q['tiles']} tiles | p50 {q['p50_ms']:.1f} ms, p99 {q['p99_ms']:.1f} ms | query as "
        f"typed: p50 {q['raw_query_p50_ms']:.1f} ms, p99 {q['raw_query_p99_ms']:.1f} ms "
        f"(p50 ratio {q['p50_ms'] / q['raw_query_p50_ms']:.2f}) |",
        f"| Search with {th['thumbnails']} thumbnails ({th['thumbnail_size']} px) from a {th['raster_pixels']} "
        f"{th['data_type']} raster | {th['median_ms']:.0f} ms | without thumbnails {th['no_thumbnails_median_ms']:.0f} ms "
        f"(ratio {th['median_ms'] / th['no_thumbnails_median_ms']:.1f}) |",
        f"| server peak RSS {big['peak_rss_of']}; large raster {big['raster_pixels']} px at "
        f"{big['target_resolution']} m ({big['tiles']} tiles, {big['seconds']:.0f} s) | {big['peak_rss_mb']:.0f} MB "
        f"(RSS before it {big['rss_before_indexing_mb']:.0f} MB; earlier sections' peak "
        f"{big['server_peak_rss_earlier_sections_mb']:.0f} MB) | < {big['target_mb']} MB |",
        "",
    ]
    lines += [f"{t['result']:>4}  {t['target']}" for t in r["targets"]]
    return "\n".join(lines)


def main(args) -> dict:
    return run(quick=getattr(args, "quick", False), out_dir=getattr(args, "results_dir", RESULTS_DIR))


if __name__ == "__main__":      # `python -m bench.backend_bench [bench.run's options]`
    from bench.run import run_one

    sys.exit(run_one(NAME))
