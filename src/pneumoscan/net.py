"""A quick reachability check, so that offline use fails at once instead of hanging."""

from __future__ import annotations

import socket

from pneumoscan.errors import PneumoscanError

CONNECT_TIMEOUT_S = 3.0


def require_network(host: str, *, what: str, instead: str, port: int = 443) -> None:
    """Raise a one-line PneumoscanError unless ``host`` accepts a TCP connection quickly."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return
    except OSError as e:
        raise PneumoscanError(
            f"cannot reach {host} to download {what} ({e.__class__.__name__}); "
            f"offline, pass {instead} instead"
        ) from None
