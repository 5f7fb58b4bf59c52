"""LabelServer: the human label service (`actors.label_app`) hosted by a Ray actor.

The actor runs uvicorn in a thread of its own process, so a campaign can keep the label page up
while it trains. Ray re-runs `__init__` when it restarts the actor: call `start` again (it
returns the URL, which may change when the port was 0).

    server = LabelServer.remote(db_url, "demo", LabelSettings(port=8765))
    url = ray.get(server.start.remote())      # "http://127.0.0.1:8765"
    ...
    ray.get(server.stop.remote())

`serve_in_thread` is the same thing without Ray (tests, benchmarks).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
import uvicorn

from actors.label_app import LabelSettings, create_app
from storage.ledger import Ledger


@dataclass(frozen=True)
class RunningServer:
    """A uvicorn server running in a daemon thread."""

    server: uvicorn.Server
    thread: threading.Thread
    url: str
    """`http://host:port` with the port actually bound."""

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask uvicorn to finish its requests and exit; wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout_s)


def serve_in_thread(app: Any, host: str, port: int, timeout_s: float = 20.0) -> RunningServer:
    """Start uvicorn for ``app`` on ``host:port`` (0: a free port) and wait until it listens.

    Raises:
        RuntimeError: the server did not come up within ``timeout_s`` (e.g. the port is taken).
    """
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                            proxy_headers=False, server_header=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"label-server-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"label server did not start on {host}:{port} (port taken?)")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return RunningServer(server, thread, f"http://{shown}:{bound}")


@ray.remote(num_cpus=0)
class LabelServer:
    """Serves one campaign's label API and page from inside the Ray cluster.

    Args:
        db_url: the ledger URL (the actor opens its own connection pool).
        campaign: the campaign whose comparisons are labeled.
        settings: host, port, allowed hosts/origins, lease and rate limits.
    """

    def __init__(self, db_url: str, campaign: str, settings: LabelSettings) -> None:
        self.db_url, self.campaign, self.settings = db_url, campaign, settings
        self.running: RunningServer | None = None

    def start(self) -> str:
        """Start serving (once); returns the URL."""
        if self.running is None:
            app = create_app(Ledger.open(self.db_url), self.campaign, self.settings)
            self.running = serve_in_thread(app, self.settings.host, self.settings.port)
        return self.running.url

    def url(self) -> str | None:
        """The URL while serving, else None."""
        return None if self.running is None else self.running.url

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        if self.running is not None:
            self.running.stop()
            self.running = None
