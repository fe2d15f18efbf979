"""Index views (backend.model.views): a tile's flips / rotations embedded and averaged, in the model,
the engine, the server's IndexRaster and the client (`serve --index-views` is checked in test_server,
the evaluation commands' --views in test_evaluate, Processing's VIEWS in test_plugin)."""
from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend.model.views import check_views, dihedral_views

def test_views_are_the_turns_and_mirrors_of_each_image():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    assert torch.equal(dihedral_views(x, 1), x)
    two = dihedral_views(x, 2)
    assert torch.equal(two[:2], x) and torch.equal(two[2:], x.flip(-1))
    four = dihedral_views(x, 4)
    for k in range(4):          # view k of every image at rows k*B .. k*B + B
        assert torch.equal(four[2 * k:2 * k + 2], torch.rot90(x, k, (-2, -1)))
    eight = dihedral_views(x, 8).view(8, 2, -1)
    # all eight views of an image without symmetry differ from each other
    assert len({tuple(v.tolist()) for v in eight[:, 0]}) == 8
    for bad in (0, 3, 16):
        with pytest.raises(ValueError, match=f"views {bad} must be one of 1, 2, 4, 8"):
            check_views(bad)


def test_four_view_embedding_does_not_depend_on_which_way_the_tile_faces(tiny_model, images):
    with torch.inference_mode():
        single = tiny_model.encode_image(images)
        turned_single = tiny_model.encode_image(torch.rot90(images, 1, (-2, -1)))
        four = tiny_model.encode_image(images, views=4)
        turned_four = tiny_model.encode_image(torch.rot90(images, 1, (-2, -1)), views=4)
        mirrored_eight = tiny_model.encode_image(images.flip(-1), views=8)
        eight = tiny_model.encode_image(images, views=8)
        by_hand = F.normalize(torch.stack([tiny_model.encode_image(torch.rot90(images, k, (-2, -1)))
                                           for k in range(4)]).mean(0), dim=-1)
    # a random model is not rotation invariant by itself ...
    assert (single - turned_single).abs().max() > 1e-3
    # ... the four-view embedding is: the same four views, in another order
    torch.testing.assert_close(four, turned_four, atol=1e-5, rtol=0)
    torch.testing.assert_close(four, by_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(eight, mirrored_eight, atol=1e-5, rtol=0)
    assert four.shape == single.shape and torch.allclose(four.norm(dim=-1), torch.ones(len(images)))
    with pytest.raises(ValueError, match="normalize=True"):
        tiny_model.encode_image(images, normalize=False, views=4)


def test_engine_embeds_tiles_with_views_and_refuses_bad_counts(checkpoint_dir):
    from backend.engine import EngineError, ModelEngine

    engine = ModelEngine(checkpoint_dir, "cpu")
    try:
        size = engine.image_size
        tiles = np.random.default_rng(0).integers(0, 256, (40, 3, size, size), dtype=np.uint8)
        turned = np.ascontiguousarray(np.rot90(tiles, 1, (2, 3)))
        # 40 tiles x 4 views is more than one forward pass holds: chunked, same answer
        four, turned_four = engine.embed_images(tiles, views=4), engine.embed_images(turned, views=4)
        np.testing.assert_allclose(four, turned_four, atol=1e-5)
        assert np.abs(engine.embed_images(tiles) - engine.embed_images(turned)).max() > 1e-3
        with pytest.raises(EngineError, match="views 3 must be one of") as e:
            engine.embed_images(tiles, views=3)
        assert e.value.kind == "invalid_argument"
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, tokenizer):
    from backend.model import MaMMUT, get_preset
    from backend.model.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = MaMMUT(get_preset("tiny", vocab_size=tokenizer.vocab_size)).eval()
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("ckpt") / "tiny")


def test_index_raster_views_over_the_wire(checkpoint_dir, tmp_path, tiny_config):
    """One tile, and the same tile turned by 90 degrees as its own raster: with 4 views the index
    stores one embedding for both (a search scores them alike); with 1 view it does not. Changing the
    views re-indexes; bad counts are refused by name; the server's default is in GetInfo."""
    from test_raster import make_tif, noise
    from test_server import LiveServer, client

    from backend.rpc import skyprompt_pb2 as pb

    size = tiny_config.image_size
    pixels = noise((3, size, size), seed=7)
    a = make_tif(tmp_path / "tile.tif", pixels)
    b = make_tif(tmp_path / "tile_turned.tif", np.ascontiguousarray(np.rot90(pixels, 1, (1, 2))))
    live = LiveServer(checkpoint_dir, tmp_path / "data", [tmp_path]).start()
    try:
        info = live.stub.GetInfo(pb.GetInfoRequest(), metadata=live.metadata)
        assert info.default_index_views == 1 and "index_views" in info.capabilities

        def index(path, **kw):
            request = pb.IndexRasterRequest(source=pb.RasterSource(path=str(path)), tile_overlap=0.0, **kw)
            return list(live.stub.IndexRaster(request, metadata=live.metadata, timeout=120))[-1].result

        def scores():
            hits = live.stub.Search(pb.SearchRequest(query="a harbour", k=10, raw_query=True),
                                    metadata=live.metadata).hits
            return {Path(h.raster_path).name: h.score for h in hits}

        assert index(a).tile_count == 1 and index(b).tile_count == 1
        one = scores()
        assert abs(one["tile.tif"] - one["tile_turned.tif"]) > 1e-4
        assert index(a, views=4).outcome == pb.INDEX_OUTCOME_REPLACED      # other views: indexed again
        assert index(a, views=4).outcome == pb.INDEX_OUTCOME_UNCHANGED
        assert index(b, views=4).outcome == pb.INDEX_OUTCOME_REPLACED
        four = scores()
        assert four["tile.tif"] == pytest.approx(four["tile_turned.tif"], abs=1e-5)
        assert index(a).outcome == pb.INDEX_OUTCOME_REPLACED               # back to the default, 1
        for bad in (0, 3, -1):
            with pytest.raises(grpc.RpcError) as e:
                index(a, views=bad)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"views {bad}" in e.value.details()
        # the client passes --views through and shows the server's default
        out = client(live, "info")
        assert out.returncode == 0 and "1 view(s) per tile" in out.stdout, out.stderr
        out = client(live, "index", "--json", "--views", "4", str(b))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)[0]["outcome"] == "unchanged"
        out = client(live, "index", "--views", "3", str(b))
        assert out.returncode != 0 and "invalid choice: 3" in out.stderr and "Traceback" not in out.stderr
    finally:
        live.stop()



def test_index_progress_with_views_moves_once_per_batch_of_model_work(checkpoint_dir, tmp_path, monkeypatch,
                                                                      tiny_config):
    """With 8 views a tile is 8 images of model work: progress comes after every few tiles (a batch
    of INDEX_BATCH images), not once per INDEX_BATCH tiles. The stored embeddings are still those of
    embedding all tiles together. An in-process server (real gRPC) with the throttle off, so every
    batch's message is seen."""
    from test_raster import make_tif, noise

    from backend import service
    from backend.raster import open_raster
    from backend.rpc import skyprompt_pb2 as pb
    from backend.rpc import skyprompt_pb2_grpc as pb_grpc
    from backend.server import Server

    monkeypatch.setattr(service, "PROGRESS_INTERVAL_S", 0.0)
    size = tiny_config.image_size
    path = make_tif(tmp_path / "grid.tif", noise((3, 8 * size, 5 * size), seed=11))       # 40 tiles
    server = Server(checkpoint_dir, port=0, device="cpu", data_dir=tmp_path / "data", allowed_roots=[tmp_path])
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            request = pb.IndexRasterRequest(source=pb.RasterSource(path=str(path)), tile_overlap=0.0, views=8)
            messages = list(pb_grpc.SkyPromptStub(channel).IndexRaster(request, timeout=120))
        assert messages[-1].result.tile_count == 40
        done = [m.tiles_done for m in messages if m.stage == pb.INDEX_STAGE_EMBEDDING]
        steps = np.diff(done)
        assert done[-1] == 40 and (steps >= 0).all()
        assert steps.max() == service.INDEX_BATCH // 8, done        # 4 tiles = 32 images a message
        with open_raster(str(path)) as raster:
            tiles = list(raster.iter_tiles_with_pixels(size, 0.0))
        together = server.engine.embed_images(np.stack([rgb for _, rgb, _ in tiles]), views=8)
        query = together[17]
        hits = server.index.search(query, 40, server.engine.checkpoint_hash)
        expected = {(t.col, t.row): float(e @ query) for (t, _, _), e in zip(tiles, together)}
        assert len(hits) == 40
        for hit in hits:        # stored as float16
            assert hit.score == pytest.approx(expected[hit.col, hit.row], abs=2e-3)
    finally:
        server.stop(grace=1.0)



def test_a_call_racing_engine_stop_is_answered_not_left_waiting(checkpoint_dir):
    """A job put on the queue while stop() runs: it gets an answer (here UNAVAILABLE), not a wait
    that only its caller's cancellation could end. The put is slowed to open the window."""
    import threading
    import time

    from backend.engine import EngineError, ModelEngine

    engine = ModelEngine(checkpoint_dir, "cpu")
    put = engine._queue.put_nowait

    def slow_put(job):
        if job is not None:
            time.sleep(0.5)
        put(job)

    engine._queue.put_nowait = slow_put
    outcome = []

    def call():
        try:
            outcome.append(engine.embed_texts(["a harbour"]))
        except EngineError as e:
            outcome.append(e.kind)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.1)
    engine.stop()
    caller.join(10)
    assert not caller.is_alive() and outcome
    assert outcome[0] == "unavailable" if isinstance(outcome[0], str) else outcome[0].shape[0] == 1
