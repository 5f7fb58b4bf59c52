"""The label app under uvicorn in a process of its own, for `bench/label_api.py`.

The same app and uvicorn settings as `prefloop label serve`, except that the per-token rate limit
comes from the command line (the CLI has no flag for it) and access logging is off (the bench
would otherwise time a log line per request). Runs until SIGINT or SIGTERM.

With `--timings`, it also measures where a request's time goes and prints it to stderr when it
stops: per route, the time from the request reaching the app to its last body byte; per ledger
call, its wall time (a database call in a worker thread, including any wait for SQLite's write
lock); and, sampled every 5 ms over all threads, which lines the route threads were at, the
poor man's py-spy (waits in C with the GIL released show as the Python line that called them).
The instrumentation itself costs a little.

    .venv/bin/python bench/label_api_server.py --db-url sqlite:///ledger.sqlite \
        --campaign bench --port 8765 --rate-per-s 1e6 --burst 1000000 [--timings]
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import uvicorn  # noqa: E402

from actors.label_app import LabelSettings, create_app  # noqa: E402
from storage.ledger import Ledger  # noqa: E402

HOST = "127.0.0.1"
LEDGER_CALLS = ("authenticate", "claim", "leased_to", "comparison_counts", "record_preferences",
                "audit", "label_counts", "label_counts_by_labeler")
SAMPLE_S = 0.005


class Timings:
    """Wall times per route and per ledger call, and stack samples of the worker threads."""

    def __init__(self) -> None:
        self.ms: dict[str, list[float]] = defaultdict(list)
        self.lines: Counter[str] = Counter()
        self.samples = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.ms[name].append(seconds * 1e3)

    def wrap_ledger(self, ledger: Ledger) -> None:
        """Time the ledger calls the label routes make (on this instance only)."""
        for name in LEDGER_CALLS:
            method = getattr(ledger, name)

            @functools.wraps(method)
            def timed(*args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return _method(*args, **kwargs)
                finally:
                    self.add(f"ledger.{_name}", time.perf_counter() - start)

            setattr(ledger, name, timed)

    def wrap_app(self, app: Any) -> Any:
        """ASGI wrapper: the time from the request reaching the app to its last body byte."""

        async def timed(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return await app(scope, receive, send)
            start = time.perf_counter()

            async def send_timed(message: Any) -> None:
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    self.add(f"{scope['method']} {scope['path']}", time.perf_counter() - start)

            await app(scope, receive, send_timed)

        return timed

    def sample(self) -> None:
        """Every 5 ms: where the event-loop thread and each worker thread is."""
        me, main = threading.get_ident(), threading.main_thread().ident
        while not self._stop.wait(SAMPLE_S):
            frames = sys._current_frames()
            self.samples += 1
            for ident, frame in frames.items():
                if ident != me:
                    self.lines[f"{'loop' if ident == main else 'worker'}: {_where(frame)}"] += 1

    def start_sampling(self) -> None:
        threading.Thread(target=self.sample, name="sampler", daemon=True).start()

    def report(self) -> None:
        self._stop.set()
        out = sys.stderr
        print("server timings (ms): name, calls, mean, p50, p99, total s", file=out)
        for name, values in sorted(self.ms.items()):
            values.sort()
            p50, p99 = values[len(values) // 2], values[min(len(values) - 1,
                                                             int(len(values) * 0.99))]
            print(f"  {name:<32}{len(values):>7}{sum(values) / len(values):>9.2f}{p50:>9.2f}"
                  f"{p99:>9.2f}{sum(values) / 1e3:>9.1f}", file=out)
        ticks = max(1, self.samples)
        print(f"stack samples every {SAMPLE_S * 1e3:.0f} ms ({self.samples} ticks); threads at "
              "a line on average (the loop thread: the share of time it spent there):", file=out)
        for where, n in self.lines.most_common(30):
            print(f"  {n / ticks:6.2f}  {where}", file=out)


def _where(frame: Any) -> str:
    """The innermost frame in this repo (not .venv), with the library frame it is in, if any."""
    inner = frame
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(str(REPO)) and "/.venv/" not in path:
            here = f"{Path(path).relative_to(REPO)}:{frame.f_lineno} {frame.f_code.co_name}"
            if frame is inner:
                return here
            lib = f"{Path(inner.f_code.co_filename).name}:{inner.f_code.co_name}"
            return f"{here} -> {lib}"
        frame = frame.f_back
    return f"{Path(inner.f_code.co_filename).name}:{inner.f_lineno} {inner.f_code.co_name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db-url", required=True)
    parser.add_argument("--campaign", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate-per-s", type=float, required=True, help="per-token refill rate")
    parser.add_argument("--burst", type=int, required=True, help="per-token bucket size")
    parser.add_argument("--timings", action="store_true",
                        help="measure routes and ledger calls; print them to stderr at exit")
    args = parser.parse_args()

    settings = LabelSettings(host=HOST, port=args.port, rate_per_s=args.rate_per_s,
                             burst=args.burst)
    ledger = Ledger.open(args.db_url, migrate=False)
    timings = Timings() if args.timings else None
    if timings is not None:
        timings.wrap_ledger(ledger)
    app: Any = create_app(ledger, args.campaign, settings)
    if timings is not None:
        app = timings.wrap_app(app)
        timings.start_sampling()
        # uvicorn shuts down gracefully, restores this handler and raises the signal again.
        signal.signal(signal.SIGTERM, lambda *_: (timings.report(), sys.exit(0)))
    uvicorn.run(app, host=HOST, port=args.port, log_level="warning", access_log=False,
                proxy_headers=False, server_header=False, lifespan="off")


if __name__ == "__main__":
    main()
