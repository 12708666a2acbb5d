"""pneumoscan serve: the web service and browser page for a run, on 127.0.0.1 unless told."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys

from pneumoscan.commands.train_options import add_device_option, int_at_least


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory (a single model or an ensemble)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_at_least(0, 65535), default=8000,
                   help="port to bind (0: any free port)")
    p.add_argument("--max-upload-mb", type=float, default=20, metavar="MB",
                   help="the largest upload taken, in MiB (an uncompressed DR DICOM can take "
                   "30 or more)")
    add_device_option(p)


def run(args: argparse.Namespace) -> int:
    from pneumoscan.data.decode import MAX_FILE_BYTES
    from pneumoscan.device import resolve_device
    from pneumoscan.errors import PneumoscanError
    from pneumoscan.serve.app import create_app

    if not 0 < args.max_upload_mb <= MAX_FILE_BYTES / 2**20:
        raise PneumoscanError(f"--max-upload-mb {args.max_upload_mb:g}: expected more than 0 "
                              f"and at most {MAX_FILE_BYTES // 2**20} (the decoder's limit)")
    try:
        import uvicorn
    except ImportError:
        raise PneumoscanError("serve needs uvicorn: pip install 'pneumoscan[serve]'") from None
    # Bound before the model loads: a busy port or unknown host is one line at once, not a
    # banner followed by uvicorn's own error, and --port 0 can print the port it got.
    with listen(args.host, args.port) as sock:
        app = create_app(args.run, device=str(resolve_device(args.device)),
                         max_upload_bytes=int(args.max_upload_mb * 2**20))
        # Flushed: when stdout is a pipe or a log file, the address must show while it serves.
        port = sock.getsockname()[1]
        print(f"pneumoscan serve: {url(args.host, port)}  (research use, not a "
              "medical device; Ctrl-C stops)", flush=True)
        if not _local_only(args.host):
            print(network_warning(args.host, port), file=sys.stderr, flush=True)
        _serve(uvicorn, app, sock)
    return 0


def _local_only(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def network_warning(host: str, port: int) -> str:
    """What binding beyond this machine means, and where colleagues can reach it."""
    reach = ""
    if host in ("0.0.0.0", "::", ""):  # every interface: no one opens that address itself
        reach = f" (other machines: {url(socket.gethostname(), port)} or this machine's address)"
    return (f"pneumoscan serve: warning: --host {host} takes uploads from other machines{reach}, "
            "over plain HTTP and with no login: X-rays cross the network unencrypted. To share "
            "it, put a web server with HTTPS and a login in front of it.")


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening; PneumoscanError in one line if not."""
    from pneumoscan.errors import PneumoscanError

    where = _host_port(host, port)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise PneumoscanError(f"{where}: unknown host ({_reason(e)})") from None
    sock = socket.socket(family, kind, proto)
    try:
        # As uvicorn does: a restart need not wait for the old connections' TIME_WAIT. Not on
        # Windows, where the option lets a second server share a port already listened on (so
        # socket.create_server leaves it out there too).
        if os.name != "nt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen()
    except OSError as e:
        sock.close()
        raise PneumoscanError(f"{where}: cannot listen ({_reason(e)})") from None
    return sock


def url(host: str, port: int) -> str:
    return f"http://{_host_port(host, port)}/"


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(e: OSError) -> str:
    return (e.strerror or str(e)).lower()


def _serve(uvicorn, app, sock: socket.socket) -> None:
    """Serve ``app`` on the bound ``sock`` until Ctrl-C, which is a normal way to stop."""

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                # A second Ctrl-C stops at once. uvicorn's own forced exit still waits for the
                # model calls in progress, and prints a traceback for each request it cancels.
                # Nothing is being written: the process can simply end, its clients cut off.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(130)
            busy = app.state.predictions_in_progress
            if busy and sig == signal.SIGINT:
                print(f"pneumoscan serve: stopping once the {busy} prediction(s) in progress are "
                      "answered (Ctrl-C again stops at once)", file=sys.stderr, flush=True)
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, log_level="warning"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt as e:  # uvicorn re-raises the signal it caught once shut down
        from pneumoscan.cli import Terminated

        if isinstance(e, Terminated):
            raise  # stopped by SIGTERM: said, and 143, as every command ends on it
