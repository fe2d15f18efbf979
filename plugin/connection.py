"""The plugin's side of the wire: one connection to a SkyPrompt backend.

Pure Python (no QGIS): the dock, the QgsTasks and the Processing algorithms all call the backend
through `BackendConnection`, so every gRPC detail lives here. gRPC is imported lazily: the plugin
must load, and explain what is missing, in a QGIS whose Python has no grpc.

Failures become `BackendError` with the server's status name and message, ready for the message
bar. The health check speaks grpc.health.v1 by hand (an empty request; the response's field 1 is
the status), so the plugin needs no grpcio-health-checking package.
"""
from __future__ import annotations

import contextlib
import re
import threading
import time
from typing import Callable, Iterator

MAX_MESSAGE = 256 * 1024 * 1024
HEALTH_METHOD = "/grpc.health.v1.Health/Check"
SERVING, NOT_SERVING, UNREACHABLE = "SERVING", "NOT_SERVING", "UNREACHABLE"
_HEALTH_STATUS = {0: "UNKNOWN", 1: SERVING, 2: NOT_SERVING, 3: "SERVICE_UNKNOWN"}
PORT_AT_END = re.compile(r":\d+$")   # "host:50051", "[::1]:50051"
HOST_PORT = re.compile(r"(\[[^\]\s]+\]|[^\s:/\[\]]+):\d+")   # the same, with one host (which may be unknown)
# "http://", "grpc://": an address copied from a browser or written as a URL
URL_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
# the name schemes gRPC itself resolves, which a channel takes as they are
GRPC_SCHEME = re.compile(r"^(dns|unix|unix-abstract|ipv4|ipv6|vsock):", re.IGNORECASE)
CANCEL_POLL_S = 0.1   # how often a call checks whether the user cancelled it
PORTS = (1, 65535)    # gRPC takes a port past these modulo 65536 (99999 is 34463) and calls whoever listens there

# ServerInfo per backend (address, token, TLS CA), shared by the connections every task makes: Segment
# and Describe read its limits on every call, and GetInfo walks the index. A health check that finds
# no backend serving forgets it (the next backend at that address may have other limits), as does a
# call that finds none; info(fresh=True) asks again. A backend restarted between two health checks
# leaves no trace, so an answer is also kept no longer than INFO_MAX_AGE_S.
INFO_MAX_AGE_S = 60.0
_server_info: dict[tuple, tuple[float, object]] = {}
_server_info_lock = threading.Lock()


def port_problem(address: str) -> str | None:
    """Why the port of `address` ("host:port", "[v6]:port", also after "dns:///") is no port, else None.
    An address without a port, a bare IPv6 address ("::1") and a socket path are left to gRPC."""
    address = address.strip()
    scheme = GRPC_SCHEME.match(address)
    if scheme and scheme[1].lower() in ("unix", "unix-abstract", "vsock"):
        return None
    host, colon, port = address[scheme.end() if scheme else 0:].lstrip("/").rpartition(":")
    if not colon or not port.isdigit() or (":" in host and not host.startswith("[")):
        return None
    low, high = PORTS
    if low <= int(port) <= high:
        return None
    return (f"the address {address!r} has port {int(port)}, outside {low}..{high}: give the address as HOST:PORT, "
            "e.g. 127.0.0.1:50051, with the port the backend serves on")


def address_example(bare: str) -> str:
    """The example an address written as a URL is told to take: itself without the scheme and path
    (`bare`), unless that is no HOST:PORT or its port would be refused in turn."""
    return bare if HOST_PORT.fullmatch(bare) and port_problem(bare) is None else "127.0.0.1:50051"


def never() -> bool:
    """The cancelled() of work that cannot be cancelled: a call's default."""
    return False


class BackendError(Exception):
    """A failed call: `code` is the gRPC status name ("INVALID_ARGUMENT", ...), `message` the server's words."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}" if code else message)
        self.code = code
        self.message = message


def _parse_health(data: bytes) -> str:
    # HealthCheckResponse { ServingStatus status = 1; }: varint field 1, or empty for 0 (UNKNOWN)
    if not data:
        return "UNKNOWN"
    if data[0] == 0x08 and len(data) >= 2:
        return _HEALTH_STATUS.get(data[1], "UNKNOWN")
    return "UNKNOWN"


def _read_file(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _wait(call, cancelled: Callable[[], bool]) -> bool:
    """Wait for a gRPC future to end: True when it did, False when cancelled() came first (the call is
    cancelled then). Asked every CANCEL_POLL_S: gRPC alone waits out the deadline, or 20 s for a host
    that accepts the connection and never answers. Should cancelled() itself fail (its task deleted
    under it: "wrapped C/C++ object ... has been deleted"), the call is cancelled before the error goes
    on: no one would wait for it any more."""
    ended = threading.Event()
    call.add_done_callback(lambda _: ended.set())
    try:
        while not ended.wait(CANCEL_POLL_S):
            if cancelled():
                call.cancel()
                return False
    except BaseException:
        call.cancel()
        raise
    return True


def token_problem(token: str | None) -> str | None:
    """Why the Token of SkyPrompt settings cannot be sent, in one line, or None (the backend's
    backend.defaults.token_problem, which the plugin does not ship with): gRPC metadata takes printable
    ASCII only, and a token pasted from a file often ends with a line end."""
    if not token:
        return None
    name = "the Token in SkyPrompt settings"
    if not token.strip():
        return f"{name} is only spaces: give the backend's token, or leave it empty for a backend without one"
    if token.endswith(("\r", "\n")):
        return (f"{name} ends with a line end (pasted from a file saved with Windows line endings?): "
                "give it without")
    if token != token.strip():
        return f"{name} {'begins' if token[0].isspace() else 'ends'} with a space or tab: give it without"
    bad = next((c for c in token if not " " <= c <= "~"), None)
    if bad is not None:
        return f"{name} holds {bad!r}, which gRPC cannot send (printable ASCII only): give it without"
    return None


class BackendConnection:
    """A channel to `address` ("host:port"), with the bearer token and TLS settings of the plugin.

    tls_ca: None = plaintext; "" = TLS with the system's root certificates; else a PEM file.
    """

    def __init__(self, address: str, token: str | None = None, tls_ca: str | None = None):
        import grpc

        from .rpc import skyprompt_pb2 as pb
        from .rpc import skyprompt_pb2_grpc as pb_grpc

        if not address.strip():
            raise BackendError("INVALID_ARGUMENT", "no backend address is set: give it as HOST:PORT "
                                                   "(e.g. 127.0.0.1:50051) in SkyPrompt settings")
        bad_port = port_problem(address)
        if bad_port:
            raise BackendError("INVALID_ARGUMENT", bad_port)
        self.address = address
        bad_token = token_problem(token)
        if bad_token:
            raise BackendError("INVALID_ARGUMENT", bad_token)
        self._tls_ca = tls_ca
        self._backend = (address, token, tls_ca)     # the key of its cached ServerInfo
        self._grpc, self.pb = grpc, pb
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
        if tls_ca is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            try:
                root = _read_file(tls_ca) if tls_ca else None
            except OSError as e:   # every caller (panel tasks, Processing, the local backend) says this alike
                raise BackendError("INVALID_ARGUMENT", f"cannot read the TLS CA file {tls_ca} ({e.strerror or e}); "
                                                       "fix it in SkyPrompt settings") from None
            if root is not None and b"-----BEGIN CERTIFICATE-----" not in root:
                # gRPC would only say it failed to create a security handshaker, as for no backend at all
                raise BackendError("INVALID_ARGUMENT", f"the TLS CA file {tls_ca} holds no PEM certificate "
                                                       "(-----BEGIN CERTIFICATE-----): choose the backend's "
                                                       "certificate, or its CA's, in SkyPrompt settings")
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root), options=options)
        self.stub = pb_grpc.SkyPromptStub(self.channel)
        self._health = self.channel.unary_unary(HEALTH_METHOD, request_serializer=lambda b: b,
                                                response_deserializer=lambda b: b)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "BackendConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _error(self, error) -> BackendError:
        code = error.code().name if hasattr(error, "code") and error.code() else "UNKNOWN"
        message = error.details() if hasattr(error, "details") and error.details() else str(error)
        if code == "CANCELLED":   # the user's own cancel never gets here (see _wait, _stream): the backend's doing
            message = f"the backend cancelled the call, perhaps because it was stopped ({message})"
        if code in ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"):
            # gone, or a refusal the cached limits may explain (a backend restarted with others)
            self._forget_info()
        # "http://host:port" reaches gRPC as a host name it cannot resolve (its own "dns:///" names do not)
        scheme = None if GRPC_SCHEME.match(self.address) else URL_SCHEME.match(self.address)
        if scheme:
            example = address_example(self.address[scheme.end():].split("/", 1)[0])
            return BackendError(code, f"the backend address {self.address} starts with {scheme[0]!r}: give it as "
                                      f"HOST:PORT, e.g. {example} ({message})")
        if code == "UNAVAILABLE" or "ssl server name" in message.lower():   # the latter UNAUTHENTICATED
            message = self._unavailable(message)
        elif code == "DEADLINE_EXCEEDED":
            message = (f"the backend at {self.address} did not answer in time ({message}): check that the address "
                       "is a SkyPrompt backend's, and that it is running and not stuck (see its log)")
        return BackendError(code, message)

    def _unavailable(self, message: str) -> str:
        """What an UNAVAILABLE call's gRPC message means for the user, and what to do."""
        low = message.lower()
        host = self.address.strip().rpartition(":")[0].strip("[]") or self.address
        if "wrong_version_number" in low:
            return (f"the backend at {self.address} does not speak TLS as SkyPrompt settings ask: turn TLS "
                    f"off there, or start the backend with --tls-cert and --tls-key ({message})")
        if "hostname verification" in low or "does not match ssl server name" in low:
            return (f"the backend's certificate does not name {host} in its subjectAltName (the only part gRPC "
                    "checks; a subject CN is not read): give an address it names in SkyPrompt settings, or "
                    "start the backend with a certificate made for this one "
                    "(openssl req ... -addext \"subjectAltName=IP:127.0.0.1,DNS:localhost\") "
                    f"({message})")
        if "handshake" in low and re.search(r"socket closed|connection reset|broken pipe|end of file", low):
            return (f"the backend at {self.address} closed the connection during the TLS handshake: it is not "
                    "running or is restarting, or a tunnel to it is up but its far end is not; start it or "
                    f"check its log ({message})")
        if "tls handshake failed" in low or "certificate" in low:
            where = (f"the CA file {self._tls_ca}" if self._tls_ca else "the system's root certificates")
            return (f"the backend's certificate is not trusted by {where}: in SkyPrompt settings give as CA file "
                    f"the backend's own certificate (--tls-cert) or its CA's ({message})")
        if "socket closed" in low and self._tls_ca is None and "stream removed" not in low:
            return (f"the backend at {self.address} closed the connection at once: if it serves TLS, turn TLS on "
                    f"in SkyPrompt settings (and give its CA file); else start it or check the address ({message})")
        if "resolv" in low and not GRPC_SCHEME.match(self.address) and not HOST_PORT.fullmatch(self.address.strip()):
            # "::::", "a:b:c", ":50051": gRPC's resolver says only "[field:hostname lookup error:...]"
            return f"the backend address {self.address!r} is not HOST:PORT, e.g. 127.0.0.1:50051"
        if "connect" in low:
            # with no port, gRPC tries 443: the address is the likely mistake, not the backend
            advice = ("give the address as HOST:PORT, e.g. 127.0.0.1:50051" if not PORT_AT_END.search(self.address)
                      else "start it or check the address")
            return f"no SkyPrompt backend answers at {self.address} ({message}); {advice}"
        if "stream removed" in low or "socket closed" in low:
            return (f"the backend at {self.address} stopped answering in the middle of the call: it may have "
                    f"crashed or been killed (see its log), so start it again ({message})")
        return message

    # -- health --
    def health(self, timeout: float = 2.0) -> str:
        """SERVING, NOT_SERVING, UNKNOWN, or UNREACHABLE when nothing answers."""
        return self.health_result(self.health_async(timeout))

    def health_async(self, timeout: float = 2.0):
        """The health check as a future: poll `.done()` from a timer (the GUI thread never blocks),
        then read it with health_result. Keep the connection open until then."""
        return self._health.future(b"", timeout=timeout)

    def health_result(self, future) -> str:
        try:
            state = _parse_health(future.result())
        except self._grpc.RpcError as e:
            state = NOT_SERVING if e.code() == self._grpc.StatusCode.NOT_FOUND else UNREACHABLE
        if state != SERVING:
            self._forget_info()
        return state

    def wait_until_serving(self, timeout: float, cancelled: Callable[[], bool] = never) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not cancelled():
            check = self.health_async(timeout=1.0)
            if not _wait(check, cancelled):
                return False
            if self.health_result(check) == SERVING:
                return True
            time.sleep(0.2)
        return False

    # -- calls --
    def _unary(self, method: str, request, timeout: float | None, cancelled: Callable[[], bool] = never):
        call = getattr(self.stub, method).future(request, metadata=self._metadata, timeout=timeout)
        if not _wait(call, cancelled):
            raise BackendError("CANCELLED", "cancelled")
        try:
            return call.result()
        except self._grpc.RpcError as e:
            raise self._error(e) from None

    def _stream(self, method: str, request, cancelled: Callable[[], bool]) -> Iterator:
        call = getattr(self.stub, method)(request, metadata=self._metadata)
        # the backend sends nothing for long stretches (edge refinement, polygonizing), so a watcher
        # cancels the call within CANCEL_POLL_S of the user's cancel rather than at the next message;
        # it ends with the call (the reader's own end cancels it: see finally)

        def watch():
            with contextlib.suppress(Exception):    # cancelled() failed: _wait cancelled the call, and the
                _wait(call, cancelled)              # reader meets the same error when it asks cancelled()

        threading.Thread(target=watch, name="skyprompt-cancel-watch", daemon=True).start()
        try:
            for message in call:
                yield message
        except self._grpc.RpcError as e:
            if cancelled():     # our own call.cancel(), not a failure
                raise BackendError("CANCELLED", "cancelled") from None
            raise self._error(e) from None
        finally:
            call.cancel()       # a reader that stops early wants no more (a call that ended: no effect)

    def info(self, timeout: float = 10.0, fresh: bool = False, cancelled: Callable[[], bool] = never):
        """The backend's ServerInfo (read it, do not change it: it is shared). Asked once per backend
        and kept up to INFO_MAX_AGE_S; `fresh` asks again (its index counts change with every index).
        A BackendError CANCELLED once cancelled() is true, as search, index and segment end."""
        if not fresh:
            with _server_info_lock:
                asked_at, known = _server_info.get(self._backend, (0.0, None))
            if known is not None and time.monotonic() - asked_at < INFO_MAX_AGE_S:
                return known
        info = self._unary("GetInfo", self.pb.GetInfoRequest(), timeout, cancelled)
        with _server_info_lock:
            _server_info[self._backend] = (time.monotonic(), info)
        return info

    def _forget_info(self) -> None:
        with _server_info_lock:
            _server_info.pop(self._backend, None)

    def index(self, request, progress: Callable[[object], None] | None = None,
              cancelled: Callable[[], bool] = never):
        """Run IndexRaster; progress(IndexProgress) for every message; the IndexResult at the end."""
        for message in self._stream("IndexRaster", request, cancelled):
            if progress:
                progress(message)
            if message.done:
                return message.result
        raise BackendError("UNKNOWN", "the server ended indexing without a result")

    def search(self, request, timeout: float | None = 60.0, cancelled: Callable[[], bool] = never):
        return self._unary("Search", request, timeout, cancelled)

    def segment(self, request, progress: Callable[[object], None] | None = None,
                cancelled: Callable[[], bool] = never) -> list:
        """Run Segment; progress(SegmentProgress) while it works; the SegmentResults in prompt order."""
        results = []
        for event in self._stream("Segment", request, cancelled):
            if event.HasField("result"):
                results.append(event.result)
            elif progress:
                progress(event.progress)
        return results

    def caption(self, request, timeout: float | None = 120.0, cancelled: Callable[[], bool] = never):
        return self._unary("Caption", request, timeout, cancelled)

    def remove(self, request, timeout: float | None = 30.0):
        return self._unary("RemoveRaster", request, timeout)

    def list_rasters(self, request, timeout: float | None = 30.0):
        return self._unary("ListRasters", request, timeout)
