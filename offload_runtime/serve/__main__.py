"""`python -m offload_runtime.serve --model M [--draft D] [--host 127.0.0.1] [--port 8000] [--api-key K] ...`

The same model flags as the chat. Binds 127.0.0.1 unless --host says otherwise, and warns when it listens
beyond loopback without an API key. Logs one statistics line per request; prompts and replies only with
--log-prompts.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
from typing import Any

from ..cli import ArgumentParser, add_model_args, load_engine, run_main
from ..errors import UsageError
from ..memory import parse_bytes

API_KEY_ENV = "OFFLOAD_RUNTIME_API_KEY"  # so the key need not show in the process list


def parse_args(argv: list[str] | None = None):
    p = ArgumentParser(prog="python -m offload_runtime.serve",
                       description="An OpenAI-compatible server (default model: the demo pair).")
    add_model_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free one; the log says which)")
    s.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (default: ${API_KEY_ENV})")
    s.add_argument("--batch-size", type=int, default=4, help="requests decoded together, sharing each sweep")
    s.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait for a free row; beyond that, 429 with Retry-After")
    s.add_argument("--max-request-bytes", default="1MiB", help="largest request body accepted, e.g. 1MiB or 65536")
    s.add_argument("--served-model-name", default=None, help="the model's name in the API (default: --model)")
    s.add_argument("--log-prompts", action="store_true", help="log every prompt and reply (off: they stay private)")
    # load_engine also reads the chat's sampling flags; here every request brings its own.
    p.set_defaults(temperature=None, top_p=None, max_new_tokens=None, seed=None)
    return p.parse_args(argv)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for a server that others can reach without a key (None when there is none to give)."""
    if api_key or is_loopback(host):
        return None
    return (f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model; "
            f"pass --api-key KEY (or set {API_KEY_ENV})")


def check_args(args) -> None:
    try:
        args.max_request_bytes = parse_bytes(args.max_request_bytes)
    except UsageError as e:
        raise UsageError(f"--max-request-bytes: {e}") from None
    for flag, value, lowest in (("--batch-size", args.batch_size, 1), ("--max-queue", args.max_queue, 0),
                                ("--max-request-bytes", args.max_request_bytes, 1024), ("--port", args.port, 0)):
        if value < lowest:
            raise UsageError(f"{flag} must be >= {lowest}, got {value}")
    if args.port > 65535:
        raise UsageError(f"--port must be at most 65535, got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key is empty; give a key or leave the flag out")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a taken port is one clear line (and port 0 tells its number)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UsageError(f"cannot listen on {host!r} ({e.strerror}); give an address of this machine to --host") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
    sock.listen(128)
    return sock


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    try:
        import uvicorn

        from .app import ServeSettings, create_app
    except ImportError as e:
        raise UsageError(f"the server needs FastAPI and uvicorn ({e.name} is missing): "
                         f"pip install 'offload-runtime[serve]'") from None
    warning = exposure_warning(args.host, args.api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    sock = bind(args.host, args.port)  # before loading: a taken port should not cost a model load
    engine = load_engine(args, batch_size=args.batch_size)
    name = args.served_model_name or args.model
    app = create_app(engine, ServeSettings(name, args.api_key, args.max_queue, args.max_request_bytes,
                                           args.log_prompts))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logger = logging.getLogger("offload_runtime.serve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    tree = len(engine.tree_for(engine.sampling_params()))
    logger.info("serving %s on http://%s:%d/v1 (%s, batch %d, queue %d%s)", name, shown, port,
                f"speculative, {tree}-node trees" if engine.draft else "plain decoding", args.batch_size,
                args.max_queue, ", offloaded" if engine.offloaded else "")
    server = app.state.server

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            server.stopping()  # uvicorn waits for open connections before the app's own shutdown runs
            super().handle_exit(sig, frame)

    Uvicorn(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)).run(sockets=[sock])
    return 0


def entry() -> None:
    run_main(main)


if __name__ == "__main__":
    entry()
