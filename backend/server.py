"""`python -m backend serve`: the SkyPrompt gRPC server.

Binds to loopback by default. Off loopback a token is required (the server refuses to start
without one), and it is worth adding TLS. Health (grpc.health.v1) answers without a token so
launchers can wait for the server; every other call needs `authorization: Bearer <token>` when a
token is set. SIGINT/SIGTERM/SIGHUP: health goes NOT_SERVING, new calls are refused with UNAVAILABLE,
in-flight calls see cancellation at once (gRPC gets a grace period to deliver their last messages),
and the index is closed cleanly.
"""
from __future__ import annotations

import argparse
import errno
import hmac
import ipaddress
import logging
import math
import os
import select
import signal
import socket
import ssl
import stat
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc

from .defaults import (BUNDLED_CHECKPOINT, SAN_EXAMPLE, DEFAULT_EDGE_RADIUS_FRACTION, DEFAULT_INDEX_VIEWS, DEFAULT_KEYWORD_WEIGHT,
                       DEFAULT_SAO_WINDOW, DEFAULT_SEARCH_EXPAND, SEGMENTS_AT_ONCE, SERVICE_NAME, VIEW_HELP, Limits,
                       check_edge_radius, check_expand, check_keyword_weight, check_views, token_problem)
from .files import write_text_atomically

log = logging.getLogger("skyprompt.server")

TOKEN_ENV = "SKYPROMPT_TOKEN"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
GRACE_S = 10.0


def default_data_dir() -> Path:
    """$SKYPROMPT_DATA_DIR, else $XDG_DATA_HOME/skyprompt, else ~/.local/share/skyprompt."""
    if os.environ.get("SKYPROMPT_DATA_DIR"):
        # "~/skyprompt" set where no shell expands it (a service unit, QGIS's environment settings)
        return Path(os.environ["SKYPROMPT_DATA_DIR"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "skyprompt"


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def peer_host(peer: str) -> str:
    """The address in a gRPC peer name without its port ("ipv4:127.0.0.1:50312" -> "127.0.0.1",
    "ipv6:[::1]:50312" -> "::1"); other kinds ("unix:/path") as they are."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rpartition(":")[0].strip("[]") or rest
    return peer


class TokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` (health checks excepted), and logs each
    rejection: at WARNING the first time for an address, then at DEBUG (a client retrying with a
    stale token must not flood the log). The token sent is never logged."""

    # addresses already warned about; past this many, new ones are logged at DEBUG too
    MAX_WARNED_PEERS = 1024

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()
        self._warned: set[str] = set()
        self._warned_lock = threading.Lock()

    def _log_rejection(self, peer: str, method: str, had_token: bool) -> None:
        host = peer_host(peer)
        with self._warned_lock:
            first = host not in self._warned and len(self._warned) < self.MAX_WARNED_PEERS
            if first:
                self._warned.add(host)
        log.log(logging.WARNING if first else logging.DEBUG,
                "refused a call to %s from %s: %s%s", method, peer,
                "wrong token" if had_token else "no token",
                " (further refusals from this address are logged at DEBUG)" if first else "")

    def intercept_service(self, continuation, details):
        if details.method.startswith(HEALTH_PREFIX):
            return continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if isinstance(given, str):
            given = given.encode()
        if hmac.compare_digest(given, self._expected):
            return continuation(details)
        handler = continuation(details)
        had_token = bool(given)
        message = ("missing or wrong token: send the metadata 'authorization: Bearer <token>' with the token the "
                   "server was started with (client: --token or $SKYPROMPT_TOKEN; QGIS: Token in SkyPrompt "
                   "settings)")

        def deny(request, context):
            self._log_rejection(context.peer(), details.method, had_token)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(lambda it, ctx: deny(None, ctx))
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(lambda it, ctx: deny(None, ctx))
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny, handler.request_deserializer)
        return grpc.unary_unary_rpc_method_handler(deny, handler.request_deserializer)


class ServerSetupError(ValueError):
    """A server that cannot start as asked: the message names the setting and what to do."""


def server_settings_problem(host: str, token: str | None, tls_cert, tls_key, edge_radius: int | None,
                            index_views: int, search_expand: int, limits: Limits,
                            keyword_weight: float = DEFAULT_KEYWORD_WEIGHT,
                            segments_at_once: int = SEGMENTS_AT_ONCE) -> str | None:
    """What is wrong with the settings `Server` is given, in one line, or None (cheap: no model, no files)."""
    problem = token_problem(token, f"--token (or ${TOKEN_ENV})")
    if problem:
        return problem
    if not is_loopback(host) and not token:
        return (f"refusing to listen on {host}: off loopback a token is required (--token or ${TOKEN_ENV}); "
                "add TLS too (--tls-cert/--tls-key)")
    if bool(tls_cert) != bool(tls_key):
        return "give both --tls-cert and --tls-key, or neither"
    try:
        if edge_radius is not None:
            check_edge_radius(edge_radius, "--edge-radius", limits.max_edge_radius)
        check_views(index_views, "--index-views")
        check_expand(search_expand, "--search-expand", limits.max_expand)
        check_keyword_weight(keyword_weight, "--keyword-weight")
    except ValueError as e:
        return str(e)
    if segments_at_once < 1:
        return f"--segments-at-once {segments_at_once} must be 1 or more"
    return None


def listen_address(host: str, port: int) -> str:
    """host:port as gRPC takes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def listen_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port, found by binding a probe socket as gRPC would
    (SO_REUSEADDR: a port left in TIME_WAIT by a stopped server counts as free): a host name that
    does not resolve, an address of another machine, a port in use; else None (any other failure
    is left for gRPC to report)."""
    address = listen_address(host, port)
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        return (f"cannot listen on {address}: --host {host} does not resolve ({e.strerror}); give an address of "
                "this machine (127.0.0.1 for this machine only, 0.0.0.0 for every network) or its host name")
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(sockaddr)
    except OSError as e:
        if e.errno == errno.EADDRINUSE and port:
            return f"cannot listen on {address}: the port is in use; is another server using the port? try --port"
        if e.errno == errno.EADDRNOTAVAIL:
            return (f"cannot listen on {address}: --host {host} is not an address of this machine; give one of its "
                    "own (127.0.0.1 for this machine only, 0.0.0.0 for every network)")
    return None


def nested_index_problem(data_dir: Path) -> str | None:
    """What is wrong with a --data-dir that is itself another data dir's index folder (it holds
    index.sqlite3, which is what is checked; embeddings/ is named to help recognise it): the server would start a new, empty index nested in it. None for
    an empty or new folder, a data dir, and one that already holds such a nested index."""
    from .index import DB_NAME, EMBEDDINGS_DIR

    if (data_dir / DB_NAME).is_file() and not (data_dir / "index" / DB_NAME).exists():
        return (f"--data-dir {data_dir} holds an index itself ({DB_NAME}, {EMBEDDINGS_DIR}/): give the folder above "
                f"it, {data_dir.resolve().parent}")
    return None


class Server:
    """The model, the index and the gRPC server, started and stopped together.

    Raises ServerSetupError for settings it cannot start with (before loading the model) and when it
    cannot listen; EngineError and TileIndexError for a checkpoint or index it cannot open.
    """

    def __init__(self, checkpoint=None, host: str = "127.0.0.1", port: int = 50051, device: str = "auto",
                 data_dir=None, allowed_roots=(), token: str | None = None, tls_cert=None, tls_key=None,
                 workers: int = 32, sao_window: int = DEFAULT_SAO_WINDOW, limits: Limits | None = None,
                 edge_radius: int | None = None, index_views: int = DEFAULT_INDEX_VIEWS,
                 search_expand: int = DEFAULT_SEARCH_EXPAND, keyword_weight: float = DEFAULT_KEYWORD_WEIGHT,
                 tile_captions: bool = True, segments_at_once: int = SEGMENTS_AT_ONCE):
        problem = server_settings_problem(host, token, tls_cert, tls_key, edge_radius, index_views, search_expand,
                                          limits or Limits(), keyword_weight, segments_at_once)
        if problem:
            raise ServerSetupError(problem)
        address = listen_address(host, port)
        # asked before the model loads and the data dir is made (a taken port leaves no new folder
        # behind), and before gRPC tries: its own failure also prints a C-core log line beside ours
        problem = listen_problem(host, port)
        if problem:
            raise ServerSetupError(problem)
        for root in allowed_roots:
            if not Path(root).is_dir():     # a typo, or a share not mounted yet: nothing under it can be read
                log.warning("--allow-root %s is not a folder: no raster under it can be opened until it exists", root)
        if tls_cert and not certificate_has_san(tls_cert):
            log.warning("--tls-cert %s has no subjectAltName: gRPC clients check only that, not the subject's CN, "
                        "so every TLS client will refuse it as not naming the server. Make one with it, e.g. %s",
                        tls_cert, SAN_EXAMPLE)
        if not is_loopback(host) and not allowed_roots:
            log.warning("listening on %s with no --allow-root: clients may open any raster this user can read", host)
        if not is_loopback(host) and not tls_cert:
            log.warning("listening on %s without TLS: the token, queries and imagery cross the network in the "
                        "clear; add --tls-cert and --tls-key", host)
        # heavy imports (torch, GDAL) only when a server is really made: the CLI starts fast
        from grpc_health.v1 import health, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        from .engine import ModelEngine
        from .index import TileIndex
        from .rpc import skyprompt_pb2 as pb
        from .rpc import skyprompt_pb2_grpc as pb_grpc
        from .service import SkyPromptService
        self.limits = limits or Limits()
        self.data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
        problem = nested_index_problem(self.data_dir)
        if problem:
            raise ServerSetupError(problem)
        # the index first: one that another server holds is refused at once, not after the model loaded
        self.index = TileIndex(self.data_dir / "index")
        try:
            self.engine = ModelEngine(checkpoint, device)
        except BaseException:
            self.index.close()
            raise
        self.service = SkyPromptService(self.engine, self.index, allowed_roots=list(allowed_roots),
                                        limits=self.limits, sao_window=sao_window, tls=bool(tls_cert),
                                        auth=bool(token), edge_radius=edge_radius, index_views=index_views,
                                        search_expand=search_expand, keyword_weight=keyword_weight,
                                        tile_captions=tile_captions, segments_at_once=segments_at_once,
                                        workers=workers)
        self.health = health.HealthServicer()
        limit = self.limits.max_message_bytes
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                   ("grpc.so_reuseport", 0)]
        interceptors = [TokenInterceptor(token)] if token else []
        self.grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="skyprompt-rpc"),
                                       options=options, interceptors=interceptors,
                                       maximum_concurrent_rpcs=workers * 4)
        pb_grpc.add_SkyPromptServicer_to_server(self.service, self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        names = (pb.DESCRIPTOR.services_by_name["SkyPrompt"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.grpc_server)
        try:
            if tls_cert:
                creds = grpc.ssl_server_credentials([(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())])
                self.port = self.grpc_server.add_secure_port(address, creds)
            else:
                self.port = self.grpc_server.add_insecure_port(address)
        except (RuntimeError, OSError) as e:
            self._close_resources()
            if tls_cert:
                raise ServerSetupError(f"cannot listen on {address} with TLS: {e}; check that --tls-cert and --tls-key "
                                       "are a matching PEM certificate chain and private key, and that the port is "
                                       "free") from None
            raise ServerSetupError(f"cannot listen on {address}: {e}; is another server using the port? "
                                   "try --port") from None
        self.address = f"{host}:{self.port}"
        self._stopped = threading.Event()

    def start(self) -> None:
        from grpc_health.v1 import health_pb2
        self.grpc_server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("SkyPrompt server listening on %s (model %s on %s, checkpoint %s at %s, data %s)", self.address,
                 self.engine.config.preset, self.engine.device, self.engine.checkpoint_hash[:12],
                 self.engine.checkpoint_dir, self.data_dir)
        ours, everyone = self.index.counts(self.engine.checkpoint_hash), self.index.counts()
        log.info("tile index: %d raster(s), %d tiles for this checkpoint", ours["rasters"], ours["tiles"])
        if everyone["rasters"] > ours["rasters"]:
            # after a checkpoint switch searches look empty: say why before the analysts ask
            log.warning("tile index: %d raster(s) indexed with another checkpoint are not searched; index them again "
                        "with this one (client list --all shows them)", everyone["rasters"] - ours["rasters"])

    def stop(self, grace: float = GRACE_S) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        from grpc_health.v1 import health_pb2
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.service.stopping.set()   # new calls: UNAVAILABLE; running ones see cancellation
        self.grpc_server.stop(grace).wait()
        self._close_resources()
        log.info("SkyPrompt server stopped")

    def _close_resources(self) -> None:
        self.engine.stop()
        self.index.close()

    def wait(self) -> None:
        self.grpc_server.wait_for_termination()


def local_path(text: str) -> str:
    """A path option with ~ expanded: a launcher that runs no shell (QProcess, systemd) passes it as typed,
    and so does a shell for --option=~/path. An empty one is refused: a launcher's setting left empty
    would otherwise be the default data dir (a user's own index) or, as a root, the working folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: give a path, or leave the option out for its default")
    return os.path.expanduser(text)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=50051, help="port (default 50051; 0 picks a free one)")
    parser.add_argument("--checkpoint", default=None, type=local_path,
                        help=f"checkpoint directory (default: the bundled one, {BUNDLED_CHECKPOINT})")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto: a GPU when present)")
    parser.add_argument("--data-dir", default=None, type=local_path,
                        help=f"where the tile index lives (default $SKYPROMPT_DATA_DIR, else $XDG_DATA_HOME/skyprompt, "
                             f"else ~/.local/share/skyprompt: here {default_data_dir()})")
    parser.add_argument("--allow-root", action="append", default=[], type=local_path, metavar="PATH",
                        help="only open rasters under this folder (repeatable); default: any local path")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"require this bearer token on every call (env {TOKEN_ENV}); required off loopback")
    parser.add_argument("--tls-cert", default=None, type=local_path, help="PEM certificate chain: serve over TLS")
    parser.add_argument("--tls-key", default=None, type=local_path, help="PEM private key for --tls-cert, unencrypted")
    parser.add_argument("--workers", type=int, default=32,
                        help="concurrent calls served (default 32); Segment and IndexRaster calls, running or "
                             "queued, take at most N - max(2, N/4) of them (24 of 32), so searches and health "
                             "checks still get an answer: past that they are refused as busy")
    parser.add_argument("--sao-window", type=int, default=DEFAULT_SAO_WINDOW,
                        help=f"default SAO window in patches for Segment (default {DEFAULT_SAO_WINDOW})")
    parser.add_argument("--edge-radius", type=int, default=None, metavar="PIXELS",
                        help="default radius of Segment's edge refinement (a guided filter along the image's "
                             "edges), in pixels of the working grid; default "
                             f"{DEFAULT_EDGE_RADIUS_FRACTION:g} x the model's input side (64 for 128-pixel tiles); "
                             "0 = off unless a request asks")
    parser.add_argument("--index-views", type=int, default=DEFAULT_INDEX_VIEWS, metavar="N",
                        help="default views per tile when indexing, their embeddings averaged: "
                             f"{VIEW_HELP}; more views search a little better and index N times slower "
                             f"(default {DEFAULT_INDEX_VIEWS}; a request's views overrides it)")
    parser.add_argument("--search-expand", type=int, default=DEFAULT_SEARCH_EXPAND, metavar="N",
                        help="default query expansion of Search: rank, move the query toward the mean embedding "
                             "of its N best tiles, rank again (more of the best hits' kind, for better or "
                             f"worse); 0 = off (default {DEFAULT_SEARCH_EXPAND}; a request's expand overrides it)")
    parser.add_argument("--keyword-weight", type=float, default=DEFAULT_KEYWORD_WEIGHT, metavar="W",
                        help="default weight of keyword matching in Search: the query's words looked up in the "
                             "caption the model wrote for each tile at indexing, added to the similarity "
                             f"(0 = embeddings alone; default {DEFAULT_KEYWORD_WEIGHT:g}; a request's keyword_weight "
                             "overrides it)")
    parser.add_argument("--segments-at-once", type=int, default=SEGMENTS_AT_ONCE, metavar="N",
                        help="Segment requests computed at once; more wait, queued (default %(default)s: the largest, "
                             "4096 x 4096 pixels with 16 prompts, holds about 4.5 GB after the model; raise it on "
                             "a machine with the memory)")
    parser.add_argument("--no-tile-captions", action="store_true",
                        help="index without writing a caption per tile: indexing on a CPU is about 1.8x faster, "
                             "and keyword matching then has no words to match (rasters indexed with captions "
                             "are indexed again)")
    parser.add_argument("--max-message-mb", type=float, default=Limits.max_message_bytes / 2**20,
                        help=f"largest message received or sent, in MiB (default {Limits.max_message_bytes // 2**20}; "
                             f"at least {MIN_MESSAGE_MB:g}, 64 KiB)")
    parser.add_argument("--port-file", default=None, type=local_path,
                        help="write the bound port to this file once serving (for launchers using --port 0)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG | INFO | WARNING | ERROR (default INFO)")
    parser.add_argument("--stop-on-stdin-close", action="store_true",
                        help="shut down cleanly when standard input closes: for a launcher that holds its write "
                             "end (the QGIS plugin), so the server stops when the launcher closes it or ends, on "
                             "every OS (a launcher's own end is also watched through $SKYPROMPT_PARENT_PID on POSIX)")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MIN_MESSAGE_MB = 1 / 16


def check_serve_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the serve options, in one line, or None: checked before the model loads."""
    if not 0 <= args.port <= 65535:
        return f"--port {args.port} must be 0 (pick a free one) to 65535"
    if args.workers < 1:
        return f"--workers {args.workers} must be at least 1"
    if args.sao_window < 1 or args.sao_window % 2 == 0:
        return f"--sao-window {args.sao_window} must be odd (1, 3, 5, ...) so the window centres on a patch"
    if not (args.max_message_mb > 0 and math.isfinite(args.max_message_mb)):
        return f"--max-message-mb {args.max_message_mb} must be a positive size in MiB"
    if args.max_message_mb < MIN_MESSAGE_MB:
        # the limit also caps answers: under it, even GetInfo and ListRasters fail to send
        return f"--max-message-mb {args.max_message_mb:g} is below {MIN_MESSAGE_MB:g} (64 KiB), too small for the server's own answers"
    if str(args.log_level).upper() not in LOG_LEVELS:
        return f"--log-level {args.log_level}: use one of {', '.join(LOG_LEVELS)}"
    if args.data_dir and Path(args.data_dir).expanduser().exists() and not Path(args.data_dir).expanduser().is_dir():
        return f"--data-dir {args.data_dir} is a file; give a folder for the tile index"
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path and not os.access(path, os.R_OK):
            return f"{flag} {path} cannot be read: {'no such file' if not Path(path).exists() else 'permission denied'}"
        if path and Path(path).is_dir():
            return f"{flag} {path} is a folder; give the PEM file"
    if args.tls_cert and args.tls_key:
        problem = tls_pair_problem(args.tls_cert, args.tls_key)
        if problem:
            return problem
    if args.port_file:
        port_file = Path(args.port_file)
        if not port_file.resolve().parent.is_dir():
            return f"--port-file {args.port_file}: its folder does not exist"
        if port_file.is_dir():
            return f"--port-file {args.port_file} is a folder: give a file name in it, e.g. {port_file / 'port'}"
        if not os.access(port_file.resolve().parent, os.W_OK | os.X_OK):
            return f"--port-file {args.port_file}: its folder is not writable (read-only, or not yours)"
    return server_settings_problem(args.host, args.token, args.tls_cert, args.tls_key, args.edge_radius,
                                   args.index_views, args.search_expand, serve_limits(args), args.keyword_weight,
                                   args.segments_at_once)


def certificate_has_san(cert: str) -> bool:
    """Whether the first certificate of PEM file `cert` has a subjectAltName (True when it cannot be
    told: no `cryptography` package and no openssl command, or a file neither reads)."""
    try:
        from cryptography import x509
    except ImportError:
        import shutil
        import subprocess
        if shutil.which("openssl") is None:
            return True
        try:
            out = subprocess.run(["openssl", "x509", "-noout", "-in", str(cert), "-ext", "subjectAltName"],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return True
        return out.returncode != 0 or "Subject Alternative Name" in out.stdout
    try:
        certificate = x509.load_pem_x509_certificate(Path(cert).read_bytes())
        certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return False
    except (OSError, ValueError):
        return True
    return True


def tls_pair_problem(cert: str, key: str) -> str | None:
    """Whether a PEM certificate chain and private key load as a pair, in one line (None: they do).
    Checked here because gRPC finds out only after the model has loaded, and says just that it
    failed to bind."""
    def no_passphrase():
        raise ValueError("encrypted")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # OpenSSL's default security level refuses small keys and SHA-1 signatures that gRPC serves: this
    # checks only that the two files are a pair, not how strong they are
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    try:
        context.load_cert_chain(cert, key, password=no_passphrase)
    except ValueError:
        return f"--tls-key {key} is encrypted; gRPC needs an unencrypted PEM key (openssl pkey -in KEY -out PLAIN)"
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e) or "key values mismatch" in str(e):
            return f"--tls-key {key} does not belong to --tls-cert {cert}; give the key the certificate was made with"
        return (f"--tls-cert {cert} and --tls-key {key} are not a PEM certificate chain and its private key; "
                "check that the two are not swapped and are PEM files (-----BEGIN ...)")
    except OSError as e:
        return f"--tls-cert {cert} / --tls-key {key} cannot be read: {e.strerror or e}"
    return None


def serve_limits(args: argparse.Namespace) -> Limits:
    return Limits(max_message_bytes=max(1, int(args.max_message_mb * 2**20)))


def serve(args: argparse.Namespace) -> int:
    problem = check_serve_arguments(args)
    if problem:
        print(f"skyprompt serve: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    done = StopRequest()
    # watched from the start: a launcher that gives up or ends while the model loads (minutes on a slow
    # disk) would otherwise wait for the load, then for a server nobody asked for any more
    watch_parent(os.environ.get(PARENT_PID_ENV, ""), done)
    if args.stop_on_stdin_close:
        watch_stdin(done)

    def on_signal(signum, _frame):
        log.info("received %s: shutting down", signal.Signals(signum).name)
        done.set()

    def on_interrupt_while_starting(_signum, _frame):
        # Ctrl-C while torch imports or the model loads (seconds to minutes): nothing is served yet and
        # the index is crash-safe, so leave from the handler itself. A KeyboardInterrupt raised here
        # would have to unwind through the native code loading now (gRPC, torch), which can drop it
        # (the server would then start anyway) or abort the process on it
        # os.write, not print: a print the main thread was in the middle of (a full pipe to a launcher)
        # would make this one raise "reentrant call" instead of leaving
        os.write(2, b"skyprompt serve: interrupted while starting; nothing was served\n")
        os._exit(130)

    signal.signal(signal.SIGINT, on_interrupt_while_starting)
    from .engine import EngineError
    from .index import TileIndexError
    try:
        server = Server(checkpoint=args.checkpoint, host=args.host, port=args.port, device=args.device,
                        data_dir=args.data_dir, allowed_roots=args.allow_root, token=args.token,
                        tls_cert=args.tls_cert, tls_key=args.tls_key, workers=args.workers,
                        sao_window=args.sao_window, edge_radius=args.edge_radius, index_views=args.index_views,
                        search_expand=args.search_expand, limits=serve_limits(args),
                        keyword_weight=args.keyword_weight, tile_captions=not args.no_tile_captions,
                        segments_at_once=args.segments_at_once)
    except (EngineError, TileIndexError, ServerSetupError) as e:
        print(f"skyprompt serve: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, on_signal)     # from here on, Ctrl-C stops the server cleanly
    signal.signal(signal.SIGTERM, on_signal)
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        # its terminal closed: stop as for SIGTERM (under nohup, SIGHUP stays ignored)
        signal.signal(signal.SIGHUP, on_signal)
    # from here a launcher's end is a shutdown like a signal's (the port file removed), not an exit
    done.serving()
    server.start()
    if args.port_file:
        try:
            write_text_atomically(args.port_file, str(server.port))
        except OSError as e:    # checked before the model loaded; the disk may have filled since
            print(f"skyprompt serve: cannot write --port-file {args.port_file}: {e.strerror or e}; stopped",
                  file=sys.stderr, flush=True)
            server.stop()
            logging.shutdown()
            os._exit(2)
    # what a client needs to connect, said where an admin looks first
    security = f"{'TLS' if args.tls_cert else 'no TLS'}, {'a token required' if args.token else 'no token'}"
    print(f"SkyPrompt serving on {server.address} ({security})", flush=True)
    while not done.wait(0.5):
        pass
    server.stop()
    if args.port_file:
        remove_port_file(args.port_file, server.port)
    # everything is closed and on disk: leave without interpreter finalization, during which gRPC's
    # and torch's native threads could abort the process ("terminate called without an active
    # exception", exit 134) after a clean stop
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def remove_port_file(path: str, port: int) -> None:
    """Remove the port file of a server that has stopped, so a launcher does not take it for a running
    one's; left alone when it no longer holds this server's port (another server has written it since)."""
    try:
        if Path(path).read_text().strip() == str(port):
            os.unlink(path)
    except OSError:
        pass    # gone already, or not ours to remove


# set by a launcher (the QGIS plugin) to its own process id: a server it started stops when it ends,
# even when it ends without stopping the server (killed, crashed)
PARENT_PID_ENV = "SKYPROMPT_PARENT_PID"


class StopRequest(threading.Event):
    """The server's end, asked by a signal or by a launcher (its pipe closed, its process ended). Asked
    by a launcher before the server serves, while torch imports or the model loads, the process leaves
    at once: nothing is served yet and the index is crash-safe (as for Ctrl-C then)."""

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()
        self._serving = False

    def serving(self) -> None:
        with self._lock:
            self._serving = True

    def launcher_ended(self, why: str) -> None:
        with self._lock:
            if not self._serving:
                print(f"skyprompt serve: {why} while starting; nothing was served", file=sys.stderr, flush=True)
                os._exit(0)
        self.set()


def watch_parent(pid_text: str, done: StopRequest, every_s: float = 1.0) -> None:
    """Set `done` once process `pid_text` has ended (POSIX; elsewhere, and for "", nothing: on
    Windows os.kill(pid, 0) would end that process instead of probing it)."""
    if os.name != "posix" or not pid_text.strip().isdigit():
        return
    pid = int(pid_text)
    ended = process_end_probe(pid)

    def watch():
        while not done.wait(every_s):
            if ended():
                log.warning("the program that started this server (process %d) has ended: shutting down", pid)
                done.launcher_ended(f"the program that started it (process {pid}) ended")

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def watch_stdin(done: StopRequest) -> bool:
    """Set `done` once standard input, a pipe or socket a launcher holds, reaches its end. A
    launcher stops the server by closing the pipe (Windows has no SIGTERM: QProcess.terminate()
    there sends WM_CLOSE, which a console program never sees), and a launcher that ends in any way
    closes it too. Any other standard input is not watched (returns False, with a warning): /dev/null
    would end at once, and a terminal read from a background job would suspend the server."""
    try:
        fd = sys.stdin.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError):
        mode = None
    if mode is None or not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        log.warning("--stop-on-stdin-close: standard input is not a pipe (a terminal, a file or none), so it is "
                    "not watched; the flag is for a launcher that starts the server with a pipe")
        return False

    def watch():
        try:
            while os.read(fd, 4096):
                pass    # what a launcher writes means nothing; only the end does
        except OSError:
            pass        # the pipe broke: closed, as far as this server can tell
        log.info("standard input closed: shutting down")
        done.launcher_ended("standard input closed")

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()
    return True


def process_end_probe(pid: int) -> Callable[[], bool]:
    """A function telling whether process `pid` has ended. On Linux a pidfd: it names that very
    process, so an ended parent that nobody reaps (a zombie) counts as ended, and its number given
    to a new process later does not keep the server up. Elsewhere (or on kernels without pidfds)
    os.kill(pid, 0), which sees a zombie or a reused number as alive."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return lambda: True
    except (AttributeError, OSError):
        pass
    else:
        # readable once the process has ended, reaped or not; open for the server's whole life
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return lambda: bool(poller.poll(0))

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass    # alive, another user's
        return False

    return gone


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    # `python -m backend.server ...` is `python -m backend serve ...`
    from .__main__ import main

    sys.exit(main(["serve", *sys.argv[1:]]))
