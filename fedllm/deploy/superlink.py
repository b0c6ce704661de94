"""Flower's SuperLink with its APIs split over two addresses: the served one answers the Fleet
API alone (the parties' SuperNodes: TLS + node authentication), and the Control and Runtime
APIs (`flwr run/list/stop/supernode register`, the ServerApp) listen on 127.0.0.1 only.

Flower 1.42 serves Fleet, Control and Runtime on one HTTP address, and its Control API
authenticates nobody without Flower Enterprise's account plugins: anyone who could reach
the served address could list, stop and submit runs (whose ClientApp then runs on every
party). This module is `flower-superlink` run by Flower's own code (its argument parser,
`create_app` and lifespan, uvicorn) with a second uvicorn server on the same app for the
public address, which passes on only the Fleet routes. It dies with `fedllm serve`
(PR_SET_PDEATHSIG) and takes the SuperExec and ServerApp it started with it.

    python -m fedllm.deploy.superlink PUBLIC_HOST PUBLIC_PORT PARENT_PID FLOWER-SUPERLINK-ARGS...
(the Flower arguments carry --host 127.0.0.1 --port INTERNAL_PORT)"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys

from fedllm.deploy.processes import descendants, die_with_parent, kill_all

FLEET_PREFIX = "/v1/fleet/"
# Flower sends a message's arrays in chunks of FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE (5 MiB): a Fleet
# request above this is no SuperNode's, and is refused before Flower reads it into memory
MAX_REQUEST_BYTES = max(32 * 2**20, 4 * int(os.environ.get("FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", 5 * 2**20)))


class FleetOnly:
    """An ASGI app that passes to `app` only requests for one of its Fleet routes, by exact
    path; everything else (Control, Runtime, docs, websockets) gets 404 and never reaches it."""

    def __init__(self, app):
        from fastapi.routing import iter_route_contexts

        self.app = app
        self.paths = frozenset(c.path for c in iter_route_contexts(app.routes) if c.path.startswith(FLEET_PREFIX))
        if not self.paths:
            raise SystemExit("this Flower version's SuperLink has no /v1/fleet/ routes: install the tested one, "
                             "pip install 'fedllm[flower]'")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") in self.paths:
            if declared_length(scope) > MAX_REQUEST_BYTES:
                return await answer(send, 413, f"a request body is at most {MAX_REQUEST_BYTES} bytes here")
            return await self.app(scope, capped(receive), send)
        if scope["type"] == "lifespan":  # the internal server runs the app's lifespan, once
            return
        if scope["type"] != "http":
            return await send({"type": "websocket.close", "code": 1008})
        await answer(send, 404, "not served on this address")


def declared_length(scope) -> int:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else MAX_REQUEST_BYTES + 1
    return 0


def capped(receive):
    """`receive` that ends the request (as a client disconnect) once its body passes MAX_REQUEST_BYTES:
    Flower parses a request's whole body before it authenticates the node that sent it."""
    received = 0

    async def receive_capped():
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > MAX_REQUEST_BYTES:
                return {"type": "http.disconnect"}
        return message

    return receive_capped


async def answer(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def servers(public_host: str, public_port: int):
    """(internal server, public server): Flower's SuperLink app on its own --host/--port, and
    the Fleet-only view of the same app on the public address, both with Flower's TLS files."""
    import uvicorn
    from flwr.superlink.cli.flower_superlink import SuperLinkLifespan, _parse_superlink_lifespan_config
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.main import create_app

    config = _parse_superlink_lifespan_config()
    if config.certificates is None:
        raise SystemExit("fedllm's SuperLink serves TLS only: give --ssl-ca-certfile, --ssl-certfile, --ssl-keyfile")
    app = create_app(config, SuperLinkLifespan)
    common = dict(ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile, workers=1, access_log=True,
                  log_config=get_uvicorn_log_config(console_handler.level))
    internal = uvicorn.Config(app, host=config.host, port=config.port, lifespan="on", **common)
    public = uvicorn.Config(FleetOnly(app), host=public_host, port=public_port, lifespan="off", **common)
    return SharedSignals(internal), SharedSignals(public)


class SharedSignals:
    """A uvicorn server whose signals main() handles once for both servers."""

    def __init__(self, config):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        self.server = Server(config)

    async def serve(self) -> bool:
        """Serves until told to exit; False if it never started (its port taken, the app's start-up failed)."""
        await self.server.serve()
        return self.server.started

    def exit(self):
        self.server.should_exit = True


async def serve_both(internal: SharedSignals, public: SharedSignals) -> int:
    """Both servers until a signal, or until either stops (then the other stops too); 1 if one never started."""
    loop = asyncio.get_running_loop()
    doomed: list[int] = []

    def on_signal():
        doomed.extend(descendants(os.getpid()))  # before the shutdown lets the SuperExec go and its ServerApp drift off
        internal.exit()
        public.exit()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    tasks = [asyncio.create_task(internal.serve()), asyncio.create_task(public.serve())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        internal.exit()
        public.exit()
        started = await asyncio.gather(*tasks)
        return 0 if all(started) else 1
    finally:
        kill_all(sorted(set(doomed + descendants(os.getpid()))), seconds=5.0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    public_host, public_port, parent, *flower_args = argv
    die_with_parent(signal.SIGTERM, int(parent))
    for name in [n for n in os.environ if n.startswith("FLWR_INTERNAL_GRPC_")]:  # Flower's old gRPC APIs: not opened
        del os.environ[name]
    sys.argv = ["flower-superlink", *flower_args]  # Flower's parser reads them from there
    internal, public = servers(public_host, int(public_port))
    return asyncio.run(serve_both(internal, public))


if __name__ == "__main__":
    raise SystemExit(main())
