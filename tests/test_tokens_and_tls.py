"""Tokens gRPC cannot send, and TLS failures told by their cause: the server, the client and the plugin."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from types import SimpleNamespace

import grpc
import pytest

from test_server import REPO, TOKEN, LiveServer, checkpoint, client, openssl_pair, rasters  # noqa: F401 - fixtures

from plugin.connection import BackendConnection, BackendError


def _env(token: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SKYPROMPT_TOKEN"}
    if token is not None:
        env["SKYPROMPT_TOKEN"] = token
    return env


@pytest.mark.parametrize("token, flags, message", [
    ("abc\r", [], "$SKYPROMPT_TOKEN): the token ends with a carriage return (read from a file saved with Windows"),
    (None, ["--token", "abc\n"], "the token ends with a newline"),
    (None, ["--host", "0.0.0.0", "--token", "   "], "the token is only spaces"),
    (None, ["--token", " abc"], "the token begins with a space or tab"),
    (None, ["--token", "a\tb"], "the token holds a control character"),
], ids=["crlf", "newline", "spaces", "leading-space", "tab"])
def test_serve_refuses_a_token_gRPC_cannot_send(tmp_path, token, flags, message):
    out = subprocess.run([sys.executable, "-m", "backend", "serve", "--checkpoint", str(tmp_path / "none"),
                          "--data-dir", str(tmp_path / "data"), *flags], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=_env(token))
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


@pytest.mark.parametrize("token, flags, message", [
    ("abc\r", [], "$SKYPROMPT_TOKEN: the token ends with a carriage return"),
    ("good", ["--token", "abc\r"], "--token: the token ends with a carriage return"),
    (None, ["--token", "  "], "--token: the token is only spaces"),
    ("caf\u00e9", [], "$SKYPROMPT_TOKEN: the token holds a character that is not ASCII"),
], ids=["env-crlf", "flag-crlf", "spaces", "non-ascii"])
def test_the_client_refuses_a_token_gRPC_cannot_send_before_any_call(token, flags, message):
    out = subprocess.run([sys.executable, "-m", "backend", "client", "info", "--server", "127.0.0.1:1", *flags],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=_env(token))
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "Invalid metadata" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_the_plugin_refuses_a_token_gRPC_cannot_send():
    with pytest.raises(BackendError, match="the Token in SkyPrompt settings ends with a line end"):
        BackendConnection("127.0.0.1:1", token="abc\r\n")
    with pytest.raises(BackendError, match="the Token in SkyPrompt settings is only spaces"):
        BackendConnection("127.0.0.1:1", token="   ")


@pytest.fixture
def closing_port():
    """A port that accepts connections and closes them at once (a server going down, a tunnel whose
    far end is not there)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()


def test_a_connection_closed_in_the_tls_handshake_blames_the_server_not_the_ca(closing_port, tmp_path):
    cert, _ = openssl_pair(tmp_path, "ca")
    out = subprocess.run([sys.executable, "-m", "backend", "client", "info", "--server",
                          f"127.0.0.1:{closing_port}", "--tls-ca", str(cert), "--timeout", "10"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=_env(None))
    assert out.returncode == 1 and "closed the connection during the TLS handshake" in out.stderr, out.stderr
    assert "not signed by" not in out.stderr
    with BackendConnection(f"127.0.0.1:{closing_port}", tls_ca=str(cert)) as conn:
        with pytest.raises(BackendError) as err:
            conn.info(timeout=10)
    assert "closed the connection during the TLS handshake" in err.value.message, err.value.message


def test_a_stream_removed_mid_call_says_the_server_stopped():
    from backend.client import rpc_error_detail

    args = SimpleNamespace(server="127.0.0.1:50051", tls=False, tls_ca=None, timeout=None)
    error = type("Error", (grpc.RpcError,), {"code": lambda self: grpc.StatusCode.UNAVAILABLE,
                                             "details": lambda self: "Stream removed (Socket closed)"})()
    detail = rpc_error_detail(error, args)
    assert "stopped answering in the middle of the call" in detail and "crashed or been killed" in detail, detail


def test_tls_failures_are_told_by_their_cause(checkpoint, tmp_path):  # noqa: F811
    """A certificate naming 127.0.0.1 only in its subject CN: serve warns, the client and the plugin
    say gRPC reads subjectAltName only; a wrong CA and TLS off each get their own advice."""
    cert, key = openssl_pair(tmp_path, "nosan")                     # CN=127.0.0.1, no subjectAltName
    other, _ = openssl_pair(tmp_path, "other")
    live = LiveServer(checkpoint, tmp_path / "data", [tmp_path], extra=("--tls-cert", str(cert), "--tls-key", str(key))).start()
    try:
        assert f"--tls-cert {cert} has no subjectAltName" in live.log_text(), live.log_text()
        assert f"SkyPrompt serving on {live.address} (TLS, a token required)" in live.log_text()
        out = client(live, "info", "--tls-ca", str(cert))
        assert out.returncode == 1 and "certificate does not name 127.0.0.1" in out.stderr, out.stderr
        assert "subjectAltName=IP:127.0.0.1,DNS:localhost" in out.stderr and "CN is not read" in out.stderr
        out = client(live, "info", "--tls-ca", str(other))
        assert out.returncode == 1 and f"is not signed by --tls-ca {other}" in out.stderr, out.stderr

        def plugin_error(tls_ca):
            with BackendConnection(live.address, token=TOKEN, tls_ca=tls_ca) as conn:
                with pytest.raises(BackendError) as err:
                    conn.info(timeout=10)
            return err.value.message

        message = plugin_error(str(cert))
        assert "does not name 127.0.0.1 in its subjectAltName" in message and "SkyPrompt settings" in message, message
        message = plugin_error(str(other))
        assert f"not trusted by the CA file {other}" in message and "CA file" in message, message
        assert "turn TLS off" not in message
        message = plugin_error(None)
        assert "if it serves TLS, turn TLS on in SkyPrompt settings" in message, message
    finally:
        live.stop()


def test_serve_says_how_it_is_secured_and_warns_of_no_tls_off_loopback(checkpoint, tmp_path):  # noqa: F811
    """The start log did not say whether TLS and a token were on, and a server off loopback with a token
    but no TLS started without a word of the token crossing the network in the clear."""
    live = LiveServer(checkpoint, tmp_path / "data", [tmp_path], extra=("--host", "0.0.0.0")).start()
    try:
        text = live.log_text()
        assert "listening on 0.0.0.0 without TLS: the token, queries and imagery cross the network in the clear; " \
               "add --tls-cert and --tls-key" in text, text
        assert "(no TLS, a token required)" in text, text
    finally:
        live.stop()
