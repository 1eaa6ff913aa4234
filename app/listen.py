"""The server's listening socket, bound before the model loads: a busy port fails in a second, not after
the weights are read (uvicorn binds only after the lifespan start-up). `serve` hands it to uvicorn.

Caller: app.cli.run_serve (before parsing pulls in torch), then app.server.serve.
"""

from __future__ import annotations

import socket


def bind_listener(host: str, port: int) -> socket.socket:
    """A bound TCP socket for host:port (SO_REUSEADDR, as uvicorn binds); uvicorn calls listen()."""
    if not 0 <= port < 65536:
        raise ValueError(f"--port: must be in [0, 65535], got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except socket.gaierror as exc:
        sock.close()
        raise ValueError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    except OSError as exc:
        sock.close()
        raise ValueError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); another "
                         f"server may be using it: pick another --port (or --host)") from None
    return sock
