"""`python -m backend serve ...` starts the server; `python -m backend client ...` talks to one."""
from __future__ import annotations

import argparse
import os
import sys

if sys.argv[1:2] == ["client"]:
    # gRPC's own log lines (e.g. a failed TLS handshake) beside the client's one-line error only
    # repeat it; read by gRPC when it is first imported, below
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from .client import add_client_arguments, run_client  # noqa: E402
from .server import add_serve_arguments, serve  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backend",
        description="SkyPrompt backend: serve the MaMMUT model over gRPC, or call a running server.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_parser = sub.add_parser("serve", help="start the gRPC server",
                                  description="Start the SkyPrompt gRPC server (index, search, segment, caption).")
    add_serve_arguments(serve_parser)
    client_parser = sub.add_parser("client", help="call a running server (info, list, index, remove, search, segment, caption)",
                                   description="Call a running SkyPrompt server. Add --json for machine-readable output.")
    add_client_arguments(client_parser)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return run_client(args)


if __name__ == "__main__":
    sys.exit(main())
