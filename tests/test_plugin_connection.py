"""The plugin's backend connection (plugin/connection.py) against a real server subprocess."""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
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


def test_an_address_with_no_port_is_named_as_the_likely_mistake():
    """gRPC takes "127.0.0.1" as port 443: nothing answers there, and the address is what to fix."""
    with BackendConnection("127.0.0.1") as conn:
        with pytest.raises(BackendError) as err:
            conn.info(timeout=5)
    assert err.value.code == "UNAVAILABLE" and "give the address as HOST:PORT" in err.value.message


def test_connection_mistakes_are_named_as_what_to_fix(live, tmp_path):
    """A CA file that is no certificate, TLS against a plaintext backend, no address at all and a port
    where something listens but never answers gRPC were each "no backend answers ... start it", or a
    bare gRPC text."""
    import socket

    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("this is not a certificate\n")
    with pytest.raises(BackendError, match=r"ca.pem holds no PEM certificate .* in SkyPrompt settings"):
        BackendConnection(live.address, token=TOKEN, tls_ca=str(not_pem))
    with BackendConnection(live.address, token=TOKEN, tls_ca="") as conn:
        with pytest.raises(BackendError) as err:
            conn.info(timeout=10)
    assert err.value.code == "UNAVAILABLE" and "does not speak TLS as SkyPrompt settings ask" in err.value.message
    for blank in ("", "  "):
        with pytest.raises(BackendError, match="no backend address is set: give it as HOST:PORT"):
            BackendConnection(blank)
    with socket.socket() as silent:         # accepts, never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with BackendConnection(f"127.0.0.1:{silent.getsockname()[1]}") as conn:
            with pytest.raises(BackendError) as err:
                conn.info(timeout=1)
    assert err.value.code == "DEADLINE_EXCEEDED" and "did not answer in time" in err.value.message
    assert "is a SkyPrompt backend's" in err.value.message


# a backend process that dies in the middle of a Segment: one progress message, then gone
_DYING_BACKEND = """
import os, sys, time
from concurrent import futures
import grpc
from plugin.rpc import skyprompt_pb2 as pb, skyprompt_pb2_grpc as pb_grpc

class Servicer(pb_grpc.SkyPromptServicer):
    def Segment(self, request, context):
        yield pb.SegmentEvent(progress=pb.SegmentProgress(stage=pb.SEGMENT_STAGE_READING))
        time.sleep(0.5)
        os._exit(1)

server = grpc.server(futures.ThreadPoolExecutor(2))
pb_grpc.add_SkyPromptServicer_to_server(Servicer(), server)
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
server.wait_for_termination()
"""


def test_a_backend_that_dies_mid_call_is_said_to_have_stopped_answering():
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.Popen([sys.executable, "-c", _DYING_BACKEND], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        port = int(proc.stdout.readline())
        with BackendConnection(f"127.0.0.1:{port}") as conn:
            request = conn.pb.SegmentRequest(source=conn.pb.RasterSource(path="/x.tif"), prompts=["trees"])
            with pytest.raises(BackendError) as err:
                conn.segment(request)
        assert err.value.code == "UNAVAILABLE", err.value
        assert "stopped answering in the middle of the call: it may have crashed" in err.value.message
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


SILENT_S = 8.0


class _SilentBackend:
    """A gRPC server whose Segment sends one progress message, then nothing for SILENT_S seconds, as
    the real backend does while it refines edges or polygonizes a large area (for a time that
    depends on the raster and the machine; here it is certain). It notes when the client goes away."""

    def __init__(self):
        from plugin.rpc import skyprompt_pb2 as pb
        from plugin.rpc import skyprompt_pb2_grpc as pb_grpc

        self.client_gone = threading.Event()
        outer = self

        class Servicer(pb_grpc.SkyPromptServicer):
            def Segment(self, request, context):  # noqa: N802 - gRPC API
                yield pb.SegmentEvent(progress=pb.SegmentProgress(stage=pb.SEGMENT_STAGE_READING))
                deadline = time.monotonic() + SILENT_S
                while time.monotonic() < deadline:
                    if not context.is_active():
                        outer.client_gone.set()
                        return
                    time.sleep(0.02)
                yield pb.SegmentEvent(result=pb.SegmentResult(prompt=request.prompts[0]))

        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_SkyPromptServicer_to_server(Servicer(), self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()


def test_cancel_reaches_a_backend_that_sends_nothing_for_a_while():
    silent = _SilentBackend()
    try:
        cancel = threading.Event()
        with BackendConnection(silent.address) as conn:
            request = conn.pb.SegmentRequest(source=conn.pb.RasterSource(path="/x.tif"), prompts=["trees"])
            threading.Timer(0.5, cancel.set).start()               # the user presses Cancel
            started = time.monotonic()
            with pytest.raises(BackendError) as err:
                conn.segment(request, cancelled=cancel.is_set)
            took = time.monotonic() - started
        assert err.value.code == "CANCELLED" and took < 1.5, (err.value, took)
        assert silent.client_gone.wait(1.0)                       # the backend stops its work too
        time.sleep(0.3)
        assert not [t for t in threading.enumerate() if t.name == "skyprompt-cancel-watch"]
    finally:
        silent.server.stop(0)


def _info_backend(model_name: str, asked: list, port: int = 0):
    """(server, port): a gRPC server that serves health and a GetInfo naming `model_name`, noting each
    GetInfo in `asked`."""
    from plugin.rpc import skyprompt_pb2 as pb
    from plugin.rpc import skyprompt_pb2_grpc as pb_grpc

    class Servicer(pb_grpc.SkyPromptServicer):
        def GetInfo(self, request, context):  # noqa: N802 - gRPC API
            asked.append(model_name)
            return pb.ServerInfo(model_name=model_name)

        def Caption(self, request, context):  # noqa: N802 - gRPC API
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the extent is over the limit")

    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_SkyPromptServicer_to_server(Servicer(), server)
    serving = grpc.unary_unary_rpc_method_handler(lambda request, context: b"\x08\x01")   # SERVING
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("grpc.health.v1.Health",
                                                                          {"Check": serving}),))
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, port


def test_server_info_is_asked_once_per_backend_and_again_after_it_went_away(monkeypatch):
    from plugin import connection

    asked = []
    first, port = _info_backend("first", asked)
    address = f"127.0.0.1:{port}"
    try:
        for _ in range(2):                          # every task makes a connection of its own
            with BackendConnection(address) as conn:
                assert conn.info().model_name == "first"
        assert asked == ["first"]
        with BackendConnection(address, token="other") as conn:     # another token: another answer
            conn.info()
        with BackendConnection(address) as conn:
            assert conn.info(fresh=True).model_name == "first"
        assert asked == ["first"] * 3
        # a refusal the cached limits may explain (the backend restarted with others) forgets them
        with BackendConnection(address) as conn:
            with pytest.raises(BackendError, match="RESOURCE_EXHAUSTED|over the limit"):
                conn.caption(conn.pb.CaptionRequest())
            conn.info()
        assert asked == ["first"] * 4
        # a backend restarted between two health checks leaves no trace: an answer ages out
        monkeypatch.setattr(connection, "INFO_MAX_AGE_S", 0.0)
        with BackendConnection(address) as conn:
            conn.info()
        assert asked == ["first"] * 5
    finally:
        first.stop(0)
    # a backend restarted at the same address may have other limits: a health check that finds
    # none there forgets what the last one said
    with BackendConnection(address) as conn:
        assert conn.health(timeout=1.0) == UNREACHABLE
    second, _ = _info_backend("second", asked, port)
    try:
        with BackendConnection(address) as conn:
            assert conn.info().model_name == "second" and asked[-1] == "second"
    finally:
        second.stop(0)


def test_a_minimum_area_is_refused_by_name_by_a_backend_that_would_ignore_it(tmp_path):
    """A backend older than SegmentRequest.min_area_m2 ignores the field: the plugin and the client
    say so before segmenting, instead of returning every small polygon as if filtered."""
    import subprocess
    import sys
    from pathlib import Path

    from plugin import operations

    asked = []
    old, port = _info_backend("old", asked)          # its ServerInfo names no capabilities
    address = f"127.0.0.1:{port}"
    try:
        with BackendConnection(address) as conn:
            with pytest.raises(BackendError, match="does not apply a minimum area"):
                operations.segment(conn, str(tmp_path / "a.tif"), ["trees"], None, None, None, 0.5, 1024,
                                   lambda p: None, lambda: False, min_area_m2=100.0)
        out = subprocess.run([sys.executable, "-m", "backend", "client", "--server", address, "segment",
                              "--raster", str(tmp_path / "a.tif"), "--prompt", "trees", "--min-area", "100"],
                             cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and "does not apply --min-area" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    finally:
        old.stop(0)


def test_a_busy_backend_stops_work_over_several_layers():
    """RESOURCE_EXHAUSTED "the server is busy" (as many long calls as the backend takes) is the backend's,
    not one layer's: indexing and removing several stop at it, as at a backend gone."""
    from plugin.operations import stops_all

    assert stops_all(BackendError("RESOURCE_EXHAUSTED", "the server is busy: 24 Segment and IndexRaster calls"))
    assert stops_all(BackendError("UNAVAILABLE", "no SkyPrompt backend answers"))
    assert not stops_all(BackendError("RESOURCE_EXHAUSTED", "the extent is over the pixel limit"))
    # the plugin ships without the backend, so it keeps its own copy of the words: the two must agree
    from backend.defaults import BUSY
    from plugin.operations import BUSY as plugin_busy
    assert plugin_busy == BUSY


def test_a_port_out_of_range_is_refused_by_name():
    """gRPC takes port 99999 as 34463 (modulo 65536) and would call whatever listens there: the
    address check refuses it, naming the port and the range, for every caller (panel, Processing)."""
    from plugin.settings import address_problem

    for address, port in (("127.0.0.1:99999", 99999), ("[::1]:70000", 70000), ("backend.lan:0", 0),
                          ("dns:///127.0.0.1:65536", 65536)):
        with pytest.raises(BackendError) as err:
            BackendConnection(address)
        assert err.value.code == "INVALID_ARGUMENT", err.value
        assert f"has port {port}, outside 1..65535" in err.value.message, err.value.message
        assert address_problem(address) == err.value.message
    for fine in ("127.0.0.1:1", "127.0.0.1:65535", "[::1]:50051", "::1", "127.0.0.1", "unix:///run/sp.sock:99999"):
        BackendConnection(fine).close()
        assert address_problem(fine) is None, fine


def test_a_url_whose_port_is_out_of_range_is_not_its_own_example():
    """"http://127.0.0.1:99999" was told to be written "e.g. 127.0.0.1:99999", which the port check then
    refuses: the example is the usual address then, and the URL's own HOST:PORT where its port is one."""
    from plugin.settings import address_problem

    for url in ("http://127.0.0.1:99999", "127.0.0.1:0/skyprompt", "https://[::1]:70000/"):
        assert "e.g. 127.0.0.1:50051," in address_problem(url), address_problem(url)
    assert "e.g. 127.0.0.1:7," in address_problem("http://127.0.0.1:7/")
    # the settings' check and a failed call give one example (a call's kept the path: 127.0.0.1:7/skyprompt)
    for url, example in (("http://127.0.0.1:99999", "127.0.0.1:50051"), ("http://127.0.0.1:7/", "127.0.0.1:7"),
                         ("http://127.0.0.1:7/skyprompt", "127.0.0.1:7"), ("http://127.0.0.1:99999/x", "127.0.0.1:50051")):
        assert f"e.g. {example}," in address_problem(url), address_problem(url)
        with BackendConnection(url) as conn:
            with pytest.raises(BackendError) as err:
                conn.info(timeout=5)
        assert f"starts with 'http://': give it as HOST:PORT, e.g. {example} (" in err.value.message, err.value


def test_an_address_that_is_no_host_port_is_said_to_be_so_in_one_line():
    """"::::" showed gRPC's resolver text, "errors resolving ::::: [field:hostname lookup error:...]"."""
    for garbage in ("::::", "a:b:c", ":50051", "back end:50051"):
        with BackendConnection(garbage) as conn:
            with pytest.raises(BackendError) as err:
                conn.info(timeout=5)
        assert err.value.code == "UNAVAILABLE", err.value
        assert err.value.message == f"the backend address {garbage!r} is not HOST:PORT, e.g. 127.0.0.1:50051"


class _HungBackend:
    """A port that accepts connections and never answers: gRPC waits 20 s for its first frame, and a
    unary call its whole deadline."""

    def __init__(self):
        import socket

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen()
        self.address = f"127.0.0.1:{self.socket.getsockname()[1]}"

    def __enter__(self) -> "_HungBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.socket.close()


def _cancelled_after(seconds: float):
    """cancelled() as the user's Cancel makes it: false, then true from `seconds` on."""
    pressed = threading.Event()
    threading.Timer(seconds, pressed.set).start()
    return pressed.is_set


def _stops_at_cancel(call) -> None:
    """call(cancelled) ends with CANCELLED within a moment of the cancel, not at gRPC's own timeout."""
    started = time.monotonic()
    with pytest.raises(BackendError) as err:
        call(_cancelled_after(0.3))
    took = time.monotonic() - started
    assert err.value.code == "CANCELLED" and took < 1.5, (err.value, took)


def _deleted_after(seconds: float):
    """cancelled() of a task deleted under its call: false, then from `seconds` on the error PyQt
    raises for a deleted object."""
    deleted = _cancelled_after(seconds)

    def cancelled() -> bool:
        if deleted():
            raise RuntimeError("wrapped C/C++ object of type QgsTask has been deleted")
        return False

    return cancelled


def test_a_cancel_check_that_fails_cancels_the_call_before_its_error_goes_on():
    """cancelled() raising left the call running on, unwatched, to its deadline: the call is cancelled
    first, a unary call (GetInfo) as a stream (Segment, which the backend then stops)."""
    with _HungBackend() as hung, BackendConnection(hung.address) as conn:
        calls = []
        make_call = conn.stub.GetInfo.future
        conn.stub.GetInfo.future = lambda *args, **kw: calls.append(make_call(*args, **kw)) or calls[-1]
        with pytest.raises(RuntimeError, match="has been deleted"):
            conn.info(timeout=30, fresh=True, cancelled=_deleted_after(0.3))
        assert calls[-1].cancelled()
    silent = _SilentBackend()
    try:
        with BackendConnection(silent.address) as conn:
            request = conn.pb.SegmentRequest(source=conn.pb.RasterSource(path="/x.tif"), prompts=["trees"])
            started = time.monotonic()
            with pytest.raises(RuntimeError, match="has been deleted"):
                conn.segment(request, cancelled=_deleted_after(0.5))
            took = time.monotonic() - started
        assert took < 1.5 and silent.client_gone.wait(1.0), took
    finally:
        silent.server.stop(0)


def test_cancel_stops_calls_to_a_backend_that_never_answers(tmp_path):
    """Search waited 20 s, and Prompt to polygons its first GetInfo's 10 s, for a backend that accepts
    and never answers, whatever the user's Cancel."""
    from plugin import operations

    with _HungBackend() as hung, BackendConnection(hung.address) as conn:
        pb = conn.pb
        _stops_at_cancel(lambda cancelled: conn.info(cancelled=cancelled))
        _stops_at_cancel(lambda cancelled: conn.search(pb.SearchRequest(query="trees", k=5), cancelled=cancelled))
        _stops_at_cancel(lambda cancelled: operations.search(conn, "trees", 5, cancelled=cancelled))
        # a file's area is checked against the backend's pixel limit (GetInfo) before Segment
        _stops_at_cancel(lambda cancelled: operations.segment(
            conn, str(tmp_path / "a.tif"), ["trees"], None, None, None, 0.5, 1024, lambda p: None, cancelled,
            native=(1e6, 1.0)))
        # Describe: the Caption call itself, and the GetInfo that sizes a large file's read first
        _stops_at_cancel(lambda cancelled: operations.caption(conn, str(tmp_path / "a.tif"), None, None, None, 1024,
                                                              cancelled=cancelled))
        _stops_at_cancel(lambda cancelled: operations.caption(conn, str(tmp_path / "a.tif"), None, None, None, 1024,
                                                              native=(1e6, 1.0), file_reader=object(),
                                                              cancelled=cancelled))
        # a layer read as pixels is capped to the backend's side limit (GetInfo) before it is read
        _stops_at_cancel(lambda cancelled: operations.pixel_side(conn, 1024, cancelled))
        started = time.monotonic()
        assert not conn.wait_until_serving(10, _cancelled_after(0.3))
        assert time.monotonic() - started < 1.0
