"""The plugin's backend connection (plugin/connection.py) against a real server subprocess."""
from __future__ import annotations

import pytest

from test_server import TOKEN, LiveServer, checkpoint, rasters  # noqa: F401 - fixtures

from plugin.connection import SERVING, UNREACHABLE, BackendConnection, BackendError, _parse_health


@pytest.fixture(scope="module")
def live(checkpoint, rasters, tmp_path_factory):  # noqa: F811
    server = LiveServer(checkpoint, tmp_path_factory.mktemp("plugin-data") / "d", [rasters["folder"]]).start()
    yield server
    server.stop()


def test_health_parsing():
    assert _parse_health(b"\x08\x01") == SERVING and _parse_health(b"\x08\x02") == "NOT_SERVING"
    assert _parse_health(b"") == "UNKNOWN"


def test_health_info_index_search_segment(live, rasters):  # noqa: F811
    with BackendConnection(live.address, token=TOKEN) as conn:
        assert conn.health() == SERVING and conn.wait_until_serving(5)
        pb = conn.pb
        assert conn.info().api_version == "skyprompt.v1"
        seen = []
        result = conn.index(pb.IndexRasterRequest(source=pb.RasterSource(path=str(rasters["rgb"]))),
                            progress=seen.append)
        assert result.tile_count > 0 and seen[-1].done
        hits = conn.search(pb.SearchRequest(query="roads", k=3, raster_ids=[result.raster_id])).hits
        assert len(hits) == 3
        stages = []
        results = conn.segment(pb.SegmentRequest(source=pb.RasterSource(path=str(rasters["rgb"])),
                                                 prompts=["roads", "trees"], threshold=0.0), progress=stages.append)
        assert [r.prompt for r in results] == ["roads", "trees"] and stages
        assert conn.remove(pb.RemoveRasterRequest(raster_id=result.raster_id)).tiles_removed == result.tile_count


def test_errors_carry_the_status_and_message(live):
    with BackendConnection(live.address, token="wrong") as conn:
        assert conn.health() == SERVING            # health needs no token
        with pytest.raises(BackendError) as err:
            conn.info()
        assert err.value.code == "UNAUTHENTICATED" and "token" in err.value.message
    with BackendConnection(live.address, token=TOKEN) as conn:
        with pytest.raises(BackendError) as err:
            conn.search(conn.pb.SearchRequest(query=" "))
        assert err.value.code == "INVALID_ARGUMENT"


def test_unreachable_backend_is_reported_not_raised():
    from backend.server import free_port

    with BackendConnection(f"127.0.0.1:{free_port()}") as conn:
        assert conn.health(timeout=0.5) == UNREACHABLE
        assert not conn.wait_until_serving(1.0)
        with pytest.raises(BackendError) as err:
            conn.info(timeout=2)
        assert err.value.code == "UNAVAILABLE"
