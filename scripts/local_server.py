"""An aiohttp app on 127.0.0.1, served from a background thread or as a process of its own: the
lifecycle of the local servers the tests and benchmarks talk to (scripts/openai_server.py's
chat-completions server, scripts/completions_server.py's completions server).

    class MyServer(LocalServer):
        def routes(self, app): app.router.add_post("/v1/x", self.handler)
    with MyServer() as server: server.base_url           # http://127.0.0.1:<port>/v1
    serve_printing_url(MyServer())                        # in a process of its own: prints the URL
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Optional

from aiohttp import web


class LocalServer:
    port: int = 0                       # 0: a free port, known once serving
    start_timeout_s: float = 10.0

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def background(self) -> None:
        """A task that runs beside the app while it serves (none by default)."""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def serve(self, started: Optional[threading.Event] = None) -> None:
        """Serve on this event loop until cancelled."""
        self._loop = asyncio.get_running_loop()
        app = web.Application(client_max_size=64 << 20)
        self.routes(app)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(runner, sock, backlog=1024).start()
        worker = asyncio.ensure_future(self.background())
        if started:
            started.set()
        try:
            await asyncio.Event().wait()
        finally:
            worker.cancel()
            await runner.cleanup()

    def start(self):
        """Serve from a background thread with its own event loop."""
        started = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve_until_stopped(started)), daemon=True)
        self._thread.start()
        if not started.wait(self.start_timeout_s):
            raise RuntimeError(f"{type(self).__name__} did not start")
        return self

    async def _serve_until_stopped(self, started: threading.Event) -> None:
        self._task = asyncio.current_task()
        try:
            await self.serve(started)
        except asyncio.CancelledError:
            pass

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_printing_url(server: LocalServer) -> None:
    """Serve in this process until killed, after printing the base URL on stdout (for a parent)."""
    async def main():
        started = threading.Event()
        task = asyncio.ensure_future(server.serve(started))
        while not started.is_set():
            await asyncio.sleep(0.01)
        print(server.base_url, flush=True)
        await task
    asyncio.run(main())
