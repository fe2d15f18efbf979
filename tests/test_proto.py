"""The skyprompt.v1 wire contract: it compiles, its stubs build and import, its shape is the one the
backend and plugin rely on, and it works over a real gRPC channel on loopback."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
PROTO_FILE = "skyprompt/v1/skyprompt.proto"
BUILD_SCRIPT = REPO / "tools" / "build_proto.py"
INCLUDE = Path(protoc.__file__).resolve().parent / "_proto"
STUB_FILES = {"__init__.py", "skyprompt_pb2.py", "skyprompt_pb2.pyi", "skyprompt_pb2_grpc.py"}

EXPECTED_METHODS = {
    # name: (input, output, client_streaming, server_streaming)
    "GetInfo": ("GetInfoRequest", "ServerInfo", False, False),
    "IndexRaster": ("IndexRasterRequest", "IndexProgress", False, True),
    "Search": ("SearchRequest", "SearchResponse", False, False),
    "Segment": ("SegmentRequest", "SegmentEvent", False, True),
    "Caption": ("CaptionRequest", "CaptionResponse", False, False),
    "EmbedText": ("EmbedTextRequest", "EmbedTextResponse", False, False),
    "RemoveRaster": ("RemoveRasterRequest", "RemoveRasterResponse", False, False),
    "ListRasters": ("ListRastersRequest", "ListRastersResponse", False, False),
}


def _run_build(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def _descriptor_set(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path / "contract.pb"
    code = protoc.main(
        ["protoc", f"-I{PROTO_ROOT}", f"-I{INCLUDE}", "--include_source_info",
         f"--descriptor_set_out={out}", PROTO_FILE]
    )
    assert code == 0
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (fd,) = [f for f in fds.file if f.name == PROTO_FILE]
    return fd


@pytest.fixture(scope="module")
def built_stubs(tmp_path_factory):
    """Stubs built by tools/build_proto.py into a fresh folder, imported under a unique package name."""
    root = tmp_path_factory.mktemp("stubs")
    name = f"skyprompt_stubs_{uuid.uuid4().hex[:8]}"
    result = _run_build("--out", str(root / name))
    assert result.returncode == 0, result.stderr
    sys.path.insert(0, str(root))
    try:
        pb2 = importlib.import_module(f"{name}.skyprompt_pb2")
        pb2_grpc = importlib.import_module(f"{name}.skyprompt_pb2_grpc")
    finally:
        sys.path.remove(str(root))
    return root / name, pb2, pb2_grpc


# (a) ------------------------------------------------------------------------------------------

def test_proto_compiles_with_protoc(tmp_path):
    code = protoc.main(
        ["protoc", f"-I{PROTO_ROOT}", f"-I{INCLUDE}", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", PROTO_FILE]
    )
    assert code == 0
    for name in ("skyprompt_pb2.py", "skyprompt_pb2_grpc.py", "skyprompt_pb2.pyi"):
        assert (tmp_path / "skyprompt" / "v1" / name).is_file()


def test_proto_package_and_syntax(tmp_path):
    fd = _descriptor_set(tmp_path)
    assert fd.package == "skyprompt.v1"
    assert fd.syntax == "proto3"
    assert [s.name for s in fd.service] == ["SkyPrompt"]


# (b) ------------------------------------------------------------------------------------------

def test_build_script_writes_flat_package(built_stubs):
    folder, pb2, pb2_grpc = built_stubs
    assert {p.name for p in folder.iterdir() if p.name != "__pycache__"} == STUB_FILES
    init = (folder / "__init__.py").read_text()
    assert "do not edit" in init.lower()
    assert "import" not in re.sub(r'""".*?"""', "", init, flags=re.S)  # docstring only
    assert pb2.DESCRIPTOR.package == "skyprompt.v1"
    assert hasattr(pb2_grpc, "SkyPromptStub")
    assert hasattr(pb2_grpc, "SkyPromptServicer")
    assert hasattr(pb2_grpc, "add_SkyPromptServicer_to_server")


def test_build_script_runs_from_any_directory(tmp_path):
    out = tmp_path / "elsewhere_rpc"
    result = _run_build("--out", str(out), "--out", str(tmp_path / "second_rpc"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == STUB_FILES
    assert {p.name for p in (tmp_path / "second_rpc").iterdir()} == STUB_FILES
    # nothing but the two packages is left behind (no staging folders)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere_rpc", "second_rpc"]


def test_build_script_help():
    result = _run_build("--help")
    assert result.returncode == 0
    assert "--out" in result.stdout


def test_failed_build_leaves_existing_stubs_untouched(tmp_path):
    out = tmp_path / "rpc"
    assert _run_build("--out", str(out)).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    broken = tmp_path / "broken"
    (broken / "skyprompt" / "v1").mkdir(parents=True)
    source = (PROTO_ROOT / PROTO_FILE).read_text()
    (broken / PROTO_FILE).write_text(source.replace("message SearchHit {", "message SearchHit { oops", 1))
    result = _run_build("--out", str(out), "--proto-root", str(broken))
    assert result.returncode != 0
    assert "protoc failed" in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "rpc"]


def test_build_script_refuses_to_replace_a_foreign_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = _run_build("--out", str(foreign))
    assert result.returncode != 0
    assert "refusing" in result.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("package", ["backend.rpc", "plugin.rpc"])
def test_repo_stubs_are_current_and_import(package, built_stubs):
    folder = REPO / Path(*package.split("."))
    assert (folder / "skyprompt_pb2_grpc.py").is_file(), (
        f"{folder} has no generated stubs; run `make proto` (or .venv/bin/python tools/build_proto.py)"
    )
    fresh_folder, fresh_pb2, _ = built_stubs
    for name in sorted(STUB_FILES):
        assert (folder / name).read_text() == (fresh_folder / name).read_text(), (
            f"{package}/{name} is stale: the .proto or the generator changed since it was built; "
            "run `make proto`"
        )
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    pb2 = importlib.import_module(f"{package}.skyprompt_pb2")
    pb2_grpc = importlib.import_module(f"{package}.skyprompt_pb2_grpc")
    assert pb2_grpc.skyprompt_dot_v1_dot_skyprompt__pb2 is pb2
    assert pb2.DESCRIPTOR.serialized_pb == fresh_pb2.DESCRIPTOR.serialized_pb
    request = pb2.SearchRequest(query="roofs", k=3)
    assert pb2.SearchRequest.FromString(request.SerializeToString()) == request


# (c) ------------------------------------------------------------------------------------------

def test_service_has_exactly_the_expected_methods(built_stubs):
    _, pb2, _ = built_stubs
    service = descriptor_pb2.ServiceDescriptorProto()
    pb2.DESCRIPTOR.services_by_name["SkyPrompt"].CopyToProto(service)
    got = {
        m.name: (m.input_type.rsplit(".", 1)[-1], m.output_type.rsplit(".", 1)[-1],
                 m.client_streaming, m.server_streaming)
        for m in service.method
    }
    assert got == EXPECTED_METHODS
    assert all(m.input_type.startswith(".skyprompt.v1.") for m in service.method)


def test_stub_and_servicer_expose_the_methods(built_stubs):
    _, _, pb2_grpc = built_stubs
    for name in EXPECTED_METHODS:
        assert callable(getattr(pb2_grpc.SkyPromptServicer, name))


# (d) ------------------------------------------------------------------------------------------

def test_generated_imports_are_package_relative(built_stubs):
    folder, _, _ = built_stubs
    for name in ("skyprompt_pb2.py", "skyprompt_pb2_grpc.py", "skyprompt_pb2.pyi"):
        text = (folder / name).read_text()
        assert not re.search(r"^\s*(from|import)\s+skyprompt\b", text, re.M), name
    grpc_text = (folder / "skyprompt_pb2_grpc.py").read_text()
    assert re.search(r"^from \. import skyprompt_pb2 as \w+$", grpc_text, re.M)


# contract shape -------------------------------------------------------------------------------

def test_every_element_is_documented(tmp_path):
    """Every message, field, enum, enum value, oneof, service and method has a leading comment."""
    fd = _descriptor_set(tmp_path)
    documented = {
        tuple(loc.path) for loc in fd.source_code_info.location if loc.leading_comments.strip()
    }
    missing: list[str] = []

    def need(path: tuple, what: str) -> None:
        if path not in documented:
            missing.append(what)

    def walk_enum(enum, path, prefix):
        need(path, f"enum {prefix}{enum.name}")
        for i, value in enumerate(enum.value):
            need(path + (2, i), f"enum value {prefix}{enum.name}.{value.name}")

    def walk_message(msg, path, prefix):
        need(path, f"message {prefix}{msg.name}")
        for i, field in enumerate(msg.field):
            need(path + (2, i), f"field {prefix}{msg.name}.{field.name}")
        for i, oneof in enumerate(msg.oneof_decl):
            if not oneof.name.startswith("_"):  # "_x": synthetic oneof of an `optional` field
                need(path + (8, i), f"oneof {prefix}{msg.name}.{oneof.name}")
        for i, nested in enumerate(msg.nested_type):
            walk_message(nested, path + (3, i), f"{prefix}{msg.name}.")
        for i, enum in enumerate(msg.enum_type):
            walk_enum(enum, path + (4, i), f"{prefix}{msg.name}.")

    for i, msg in enumerate(fd.message_type):
        walk_message(msg, (4, i), "")
    for i, enum in enumerate(fd.enum_type):
        walk_enum(enum, (5, i), "")
    for i, service in enumerate(fd.service):
        need((6, i), f"service {service.name}")
        for j, method in enumerate(service.method):
            need((6, i, 2, j), f"rpc {service.name}.{method.name}")
    assert not missing, "undocumented: " + ", ".join(missing)

    # the comment above `syntax = "proto3";` is the file header
    (syntax,) = [loc for loc in fd.source_code_info.location if tuple(loc.path) == (12,)]
    header = syntax.leading_comments + " ".join(syntax.leading_detached_comments)
    for word in ("authorization", "Bearer", "grpc.health.v1", "reflection", "UNAUTHENTICATED",
                 "INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                 "UNAVAILABLE", "CANCELLED"):
        assert word in header, f"top-of-file comment does not mention {word!r}"


def test_enums_start_with_unspecified(tmp_path):
    fd = _descriptor_set(tmp_path)
    enums = list(fd.enum_type) + [e for m in fd.message_type for e in m.enum_type]
    assert enums
    for enum in enums:
        zero = enum.value[0]
        assert zero.number == 0 and zero.name.endswith("_UNSPECIFIED"), enum.name


def test_raster_requests_carry_source_extent_and_bands(built_stubs):
    _, pb2, _ = built_stubs
    for name in ("IndexRasterRequest", "SegmentRequest", "CaptionRequest"):
        fields = pb2.DESCRIPTOR.message_types_by_name[name].fields_by_name
        assert fields["source"].message_type.name == "RasterSource", name
        assert fields["extent"].message_type.name == "Extent", name
        assert fields["bands"].message_type.name == "BandMapping", name
    source = pb2.DESCRIPTOR.message_types_by_name["RasterSource"]
    assert [f.name for f in source.oneofs_by_name["kind"].fields] == ["path", "pixels"]


# (e) ------------------------------------------------------------------------------------------

def _pixel_source(pb2):
    return pb2.PixelSource(
        width=3, height=2, band_count=4, data_type=pb2.DATA_TYPE_UINT8,
        data=bytes(range(3 * 2 * 4)), interleave=pb2.INTERLEAVE_PIXEL,
        geotransform=[500000.0, 0.5, 0.0, 4649776.0, 0.0, -0.5],
        crs="EPSG:32633", nodata=0.0, alpha_band=4, label="XYZ tiles",
    )


def test_search_and_segment_requests_round_trip(built_stubs):
    _, pb2, _ = built_stubs
    search = pb2.SearchRequest(
        query="parking lots next to a highway", k=25, raster_ids=["r1", "r2"],
        raster_paths=["/data/a.tif"],
        extent=pb2.Extent(xmin=12.1, ymin=41.8, xmax=12.6, ymax=42.0, crs="EPSG:4326"),
        include_thumbnails=True, thumbnail_size=96, mode=pb2.SEARCH_MODE_EXACT, min_score=0.2,
    )
    again = pb2.SearchRequest.FromString(search.SerializeToString())
    assert again == search
    assert again.HasField("min_score") and again.extent.crs == "EPSG:4326"

    segment = pb2.SegmentRequest(
        source=pb2.RasterSource(pixels=_pixel_source(pb2)),
        extent=pb2.Extent(xmin=500000, ymin=4649775, xmax=500001.5, ymax=4649776, crs="EPSG:32633"),
        bands=pb2.BandMapping(red=3, green=2, blue=1, stretch_low_percent=1.0, stretch_high_percent=99.0),
        prompts=["buildings", "water"], threshold=0.0, min_area=4.0, simplify_tolerance=0.0,
        sao_window=pb2.SaoWindow(size=5, sigma=1.5), return_relevance_map=True,
    )
    data = segment.SerializeToString()
    again = pb2.SegmentRequest.FromString(data)
    assert again == segment
    assert again.source.WhichOneof("kind") == "pixels"
    assert again.source.pixels.data == bytes(range(24))
    assert list(again.source.pixels.geotransform) == [500000.0, 0.5, 0.0, 4649776.0, 0.0, -0.5]
    # optional fields keep "set to zero" apart from "unset"
    assert again.HasField("threshold") and again.threshold == 0.0
    assert again.HasField("simplify_tolerance")
    assert again.source.pixels.HasField("nodata")
    assert not pb2.SegmentRequest(prompts=["x"]).HasField("threshold")
    # a different request does not compare equal
    assert pb2.SegmentRequest.FromString(data) != pb2.SegmentRequest(prompts=["buildings"])

    by_path = pb2.SegmentRequest(source=pb2.RasterSource(path="/data/a.tif"), prompts=["trees"])
    assert pb2.SegmentRequest.FromString(by_path.SerializeToString()).source.WhichOneof("kind") == "path"


# (f) ------------------------------------------------------------------------------------------

def _make_servicer(pb2, pb2_grpc):
    class Servicer(pb2_grpc.SkyPromptServicer):
        def GetInfo(self, request, context):
            metadata = dict(context.invocation_metadata())
            if metadata.get("authorization") != "Bearer s3cret":
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")
            return pb2.ServerInfo(
                server_version="0.1.0", api_version="skyprompt.v1", model_name="MaMMUT",
                model_preset="tiny", device="cpu", image_size=224, patch_size=16, embed_dim=256,
                capabilities=["index", "search"],
                index_stats=pb2.IndexStats(raster_count=1, tile_count=42),
                default_sao_window=pb2.SaoWindow(size=5),
                limits=pb2.Limits(max_prompt_chars=512, max_k=1000, max_pixel_source_side=4096,
                                  max_message_bytes=64 << 20),
            )

        def IndexRaster(self, request, context):
            if request.source.WhichOneof("kind") != "path":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "source.path is required here")
            for done in range(3):
                yield pb2.IndexProgress(stage=pb2.INDEX_STAGE_EMBEDDING, tiles_done=done, tiles_total=3)
            yield pb2.IndexProgress(
                stage=pb2.INDEX_STAGE_DONE, tiles_done=3, tiles_total=3, done=True,
                result=pb2.IndexResult(raster_id="r1", raster_path=request.source.path,
                                       outcome=pb2.INDEX_OUTCOME_INDEXED, tile_count=3),
            )

        def Segment(self, request, context):
            yield pb2.SegmentEvent(progress=pb2.SegmentProgress(stage=pb2.SEGMENT_STAGE_RELEVANCE))
            for i, prompt in enumerate(request.prompts):
                yield pb2.SegmentEvent(result=pb2.SegmentResult(
                    prompt=prompt, prompt_index=i,
                    crs=pb2.Crs(authid=request.source.pixels.crs),
                    polygons=[pb2.SegmentPolygon(wkb=b"\x01\x03\x00\x00\x00", score=0.9, area=12.5)],
                ))

    return Servicer()


@pytest.fixture()
def loopback(built_stubs):
    _, pb2, pb2_grpc = built_stubs
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb2_grpc.add_SkyPromptServicer_to_server(_make_servicer(pb2, pb2_grpc), server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield pb2, pb2_grpc.SkyPromptStub(channel)
    finally:
        channel.close()
        server.stop(grace=None)


def test_grpc_round_trip_on_loopback(loopback):
    pb2, stub = loopback
    auth = [("authorization", "Bearer s3cret")]

    info = stub.GetInfo(pb2.GetInfoRequest(), metadata=auth, timeout=10)
    assert (info.model_name, info.embed_dim, info.image_size) == ("MaMMUT", 256, 224)
    assert info.index_stats.tile_count == 42
    assert info.limits.max_k == 1000

    with pytest.raises(grpc.RpcError) as err:
        stub.GetInfo(pb2.GetInfoRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    events = list(stub.IndexRaster(
        pb2.IndexRasterRequest(source=pb2.RasterSource(path="/data/a.tif"), force=True), timeout=10))
    assert [e.tiles_done for e in events] == [0, 1, 2, 3]
    assert [e.done for e in events] == [False, False, False, True]
    assert events[-1].result.raster_path == "/data/a.tif"
    assert events[-1].result.outcome == pb2.INDEX_OUTCOME_INDEXED

    with pytest.raises(grpc.RpcError) as err:
        list(stub.IndexRaster(pb2.IndexRasterRequest(
            source=pb2.RasterSource(pixels=_pixel_source(pb2))), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    request = pb2.SegmentRequest(source=pb2.RasterSource(pixels=_pixel_source(pb2)),
                                 prompts=["buildings", "water"])
    events = list(stub.Segment(request, timeout=10))
    assert [e.WhichOneof("event") for e in events] == ["progress", "result", "result"]
    assert [e.result.prompt for e in events[1:]] == ["buildings", "water"]
    assert events[1].result.crs.authid == "EPSG:32633"
    assert events[2].result.polygons[0].area == 12.5

    # a method the servicer does not implement answers UNIMPLEMENTED, not a hang
    with pytest.raises(grpc.RpcError) as err:
        stub.Caption(pb2.CaptionRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
