"""A quick reachability check, so that offline use fails at once instead of hanging."""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request

from pneumoscan.errors import PneumoscanError

CONNECT_TIMEOUT_S = 3.0


def require_network(host: str, *, what: str, instead: str, port: int = 443) -> None:
    """Raise a one-line PneumoscanError unless ``host`` accepts a TCP connection quickly.

    Where the download would go through an HTTPS proxy (``HTTPS_PROXY``) or a Hugging Face
    mirror (``HF_ENDPOINT``), that is the host checked. The whole check, name lookup included
    (which a socket timeout does not bound), ends within a few seconds.
    """
    target = _where_it_connects(host, port)
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            with socket.create_connection(target, timeout=CONNECT_TIMEOUT_S):
                outcome.append(None)
        except OSError as e:
            outcome.append(e)

    # A daemon thread: a resolver that never answers is left behind, not waited for.
    checker = threading.Thread(target=connect, daemon=True)
    checker.start()
    checker.join(2 * CONNECT_TIMEOUT_S + 1.0)  # time for a second address (IPv6, then IPv4)
    if outcome and outcome[0] is None:
        return
    why = type(outcome[0]).__name__ if outcome else "no answer in time"
    via = f" through {target[0]}" if target[0] != host else ""
    raise PneumoscanError(
        f"cannot reach {host}{via} to download {what} ({why}); offline, pass {instead} instead"
    )


def _where_it_connects(host: str, port: int) -> tuple[str, int]:
    if host == "huggingface.co" and (mirror := os.environ.get("HF_ENDPOINT")):
        host, port = _host_and_port(mirror, (host, port))
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(host):
        return _host_and_port(proxy if "://" in proxy else f"http://{proxy}", (host, port))
    return host, port


def _host_and_port(url: str, otherwise: tuple[str, int]) -> tuple[str, int]:
    """A URL's host and port (the scheme's default without one); ``otherwise`` when the URL
    names no usable host or port, so that a mistyped variable costs the check, not a crash."""
    parsed = urllib.parse.urlsplit(url)
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:  # "proxy:abc", or a port above 65535
        return otherwise
    return (parsed.hostname, port) if parsed.hostname else otherwise
