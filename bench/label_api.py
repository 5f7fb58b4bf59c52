"""Human label API under load: 16 annotators labeling through real uvicorn on loopback.

The label app (`actors/label_app.py`) runs under uvicorn in a process of its own
(`bench/label_api_server.py`, the settings of `prefloop label serve`), so the load generator
does not share its GIL. It serves one campaign of a fresh ledger: SQLite in a temp dir, or a
PostgreSQL database given with `--db-url` (a new campaign is made in it), seeded through the
ledger's bulk calls with 20,000 pending comparisons (prompt ~300 chars, responses ~800 chars)
so the queue cannot run dry, and 16 annotator tokens (`Ledger.add_annotator`).

Each of 16 client threads is one annotator with its own keep-alive `httpx.Client`, looping for
`--seconds` (default 30): GET /api/next, POST /api/labels with a fresh `Idempotency-Key`, and
every 20th round GET /api/stats. Latency is wall time around each request in the client, so it
includes the client's own HTTP work; clients and server share the machine's cores. By default
the clients send back to back (a closed loop: 16 requests always in flight, so by Little's law
the mean latency is 16 / the requests per second the server completes); `--think-ms T` makes
each client pause T ms (uniformly 0.5-1.5 T) between seeing a comparison and labeling it, as a
human reading it would.
`--warmup-rounds N` runs N untimed rounds per client first (the first requests compile the
server's SQL statements and, per annotator, read its leases back). `--server-timings` has the
server print where its time went (see `label_api_server.py`).

The per-token rate limit is set to 1e6 requests/s with a burst of 1e6 so that no request is
refused for rate (the service default, 5/s with a burst of 30, is a human pace, below what a
client labeling back-to-back can send). An error is any non-2xx answer or exception, plus the
gap, if any, between the successful label POSTs and the human preferences the ledger holds at
the end.

Goal (issue 6): p99 < 50 ms and zero errors.

    .venv/bin/python bench/label_api.py                 # ~45 s: ~11 s seeding + 30 s load
    .venv/bin/python bench/label_api.py --seconds 5     # a quick look
    .venv/bin/python bench/label_api.py --think-ms 1000 --warmup-rounds 1  # human-paced
    .venv/bin/python bench/label_api.py --db-url postgresql+psycopg://user@host:5432/db

Ends with `RESULT p99_ms=… p50_ms=… errors=… labels_per_s=… requests=…`.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from storage.db import engine_for  # noqa: E402
from storage.ledger import Ledger  # noqa: E402
from storage.records import NewComparison, NewGeneration  # noqa: E402

HOST = "127.0.0.1"
SERVER = REPO / "bench" / "label_api_server.py"
GEN_PER_PROMPT = 5  # C(5, 2) = 10 comparisons per prompt
RATE_PER_S, BURST = 1e6, 1_000_000  # per token: high enough that no bench request sees a 429
ENDPOINTS = ("next", "label", "stats")
VOCABULARY = ("the model answer should weigh each claim carefully and explain why one step "
              "follows from another so that a reader can check the reasoning before trusting it")
GOAL_P99_MS = 50.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="load duration")
    parser.add_argument("--clients", type=int, default=16, help="concurrent annotators")
    parser.add_argument("--comparisons", type=int, default=20_000, help="pending at the start")
    parser.add_argument("--stats-every", type=int, default=20, help="GET /api/stats every N rounds")
    parser.add_argument("--db-url", default=None, help="ledger URL (default: temp SQLite)")
    parser.add_argument("--think-ms", type=float, default=0.0,
                        help="mean pause between a client's next and its label (default 0)")
    parser.add_argument("--warmup-rounds", type=int, default=0,
                        help="untimed rounds per client before the load (default 0)")
    parser.add_argument("--server-timings", action="store_true",
                        help="the server prints per-route, per-ledger-call and sampled times")
    return parser.parse_args()


# -- the ledger -----------------------------------------------------------------------------


def filler(rng: random.Random, chars: int) -> str:
    vocabulary, words = VOCABULARY.split(), []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(vocabulary))
    return " ".join(words)


def seed(ledger: Ledger, campaign: str, n_comparisons: int) -> int:
    """A campaign with at least ``n_comparisons`` pending comparisons, added in three bulk
    calls; returns how many."""
    rng = random.Random(0)
    n_prompts = -(-n_comparisons // 10)
    ledger.ensure_campaign(campaign)
    prompts = ledger.add_prompts(
        campaign, [f"[{campaign} #{i}] {filler(rng, 300)}?" for i in range(n_prompts)])
    gens = ledger.add_generations(campaign, [
        NewGeneration(p, f"({k}) {filler(rng, 800)}.", 160, 0, "bench", k)
        for p in prompts for k in range(GEN_PER_PROMPT)])
    pairs = [NewComparison(gens[i * GEN_PER_PROMPT + a], gens[i * GEN_PER_PROMPT + b])
             for i in range(n_prompts)
             for a in range(GEN_PER_PROMPT) for b in range(a + 1, GEN_PER_PROMPT)]
    return len(ledger.add_comparisons(campaign, pairs))


# -- the server -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@contextmanager
def label_server(db_url: str, campaign: str,
                 timings: bool = False) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start `label_api_server.py` on a free loopback port; yield it and its URL once /healthz
    answers; stop it with SIGTERM (uvicorn's graceful shutdown)."""
    port = free_port()
    proc = subprocess.Popen([
        sys.executable, str(SERVER), "--db-url", db_url, "--campaign", campaign,
        "--port", str(port), "--rate-per-s", str(RATE_PER_S), "--burst", str(BURST),
        *(["--timings"] if timings else [])])
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"label server exited with {proc.returncode} (stderr above)")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).is_success:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"label server did not answer {url}/healthz within 60 s")
            time.sleep(0.05)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the clients ----------------------------------------------------------------------------


@dataclass
class ClientLog:
    """What one annotator thread saw: (endpoint, ms, ok) per request, labels, error texts."""

    samples: list[tuple[str, float, bool]] = field(default_factory=list)
    labels: int = 0
    warmup_labels: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class Clock:
    """The shared start of the load (set when every client is ready), with the CPU seconds the
    server and this process had used by then."""

    seconds: float
    server_pid: int
    think_s: float = 0.0
    warmup_rounds: int = 0
    start: float = 0.0
    server_cpu: float = 0.0
    client_cpu: float = 0.0

    def go(self) -> None:
        self.server_cpu, self.client_cpu = cpu_seconds(self.server_pid), time.process_time()
        self.start = time.perf_counter()


def request(http: httpx.Client, log: ClientLog, endpoint: str, method: str, path: str,
            **kwargs) -> httpx.Response | None:
    """One timed request; None (and an error logged) unless it answered 2xx."""
    start = time.perf_counter()
    try:
        response = http.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        log.samples.append((endpoint, (time.perf_counter() - start) * 1e3, False))
        log.errors.append(f"{endpoint}: {type(exc).__name__}: {exc}")
        return None
    ok = response.is_success
    log.samples.append((endpoint, (time.perf_counter() - start) * 1e3, ok))
    if not ok:
        log.errors.append(f"{endpoint}: {response.status_code} {response.text[:200]}")
    return response if ok else None


def label_round(http: httpx.Client, log: ClientLog, round_: int, think_s: float,
                rng: random.Random) -> bool:
    """One next + label (after ``think_s``, 0.5-1.5x); False when the queue ran dry."""
    shown = request(http, log, "next", "GET", "/api/next")
    if shown is None:
        return True
    comparison = shown.json()["comparison"]
    if comparison is None:
        log.errors.append("next: the queue ran dry (raise --comparisons)")
        return False
    if think_s > 0:
        time.sleep(think_s * rng.uniform(0.5, 1.5))
    body = {"comparison_id": comparison["id"], "choice": ("a", "b", "tie")[round_ % 3]}
    key = {"Idempotency-Key": uuid.uuid4().hex}
    if request(http, log, "label", "POST", "/api/labels", json=body, headers=key):
        log.labels += 1
    return True


def annotator(url: str, token: str, clock: Clock, ready: threading.Barrier, stats_every: int,
              log: ClientLog) -> None:
    """Label until the clock runs out: next, label (fresh key), and now and then stats. Warm-up
    rounds come first, untimed (their labels and errors still count)."""
    headers = {"Authorization": f"Bearer {token}"}
    rng = random.Random(token)
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        for _ in range(clock.warmup_rounds):
            label_round(http, log, 0, 0.0, rng)
        log.samples.clear()
        log.warmup_labels, log.labels = log.labels, 0
        ready.wait()
        round_ = 0
        while time.perf_counter() < clock.start + clock.seconds:
            round_ += 1
            if not label_round(http, log, round_, clock.think_s, rng):
                return
            if round_ % stats_every == 0:
                request(http, log, "stats", "GET", "/api/stats")


def run_clients(url: str, tokens: list[str], args: argparse.Namespace,
                server_pid: int) -> tuple[list[ClientLog], float, float, float]:
    """Run one annotator thread per token; returns the logs, the wall time of the load and the
    CPU seconds the server and this process used during it (after the warm-up)."""
    clock = Clock(args.seconds, server_pid, args.think_ms / 1e3, args.warmup_rounds)
    stats_every = args.stats_every
    ready = threading.Barrier(len(tokens), action=clock.go)
    logs = [ClientLog() for _ in tokens]
    threads = [threading.Thread(target=annotator, name=f"annotator-{i}",
                                args=(url, token, clock, ready, stats_every, logs[i]))
               for i, token in enumerate(tokens)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - clock.start
    return (logs, wall, cpu_seconds(server_pid) - clock.server_cpu,
            time.process_time() - clock.client_cpu)


# -- the report -----------------------------------------------------------------------------


def percentile(sorted_ms: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of sorted values; NaN when empty."""
    if not sorted_ms:
        return float("nan")
    rank = max(1, -(-len(sorted_ms) * q // 100))
    return sorted_ms[int(rank) - 1]


def latency_table(samples: list[tuple[str, float, bool]]) -> dict[str, tuple[float, float]]:
    """Print requests, errors and p50/p90/p99/max per endpoint and overall; returns
    {name: (p50, p99)}."""
    print(f"{'endpoint':<16}{'requests':>9}{'errors':>8}{'p50_ms':>9}{'p90_ms':>9}"
          f"{'p99_ms':>9}{'max_ms':>9}")
    out = {}
    paths = {"next": "GET /api/next", "label": "POST /api/labels", "stats": "GET /api/stats"}
    for name in (*ENDPOINTS, "all"):
        rows = samples if name == "all" else [s for s in samples if s[0] == name]
        ms = sorted(s[1] for s in rows)
        p50, p90, p99 = (percentile(ms, q) for q in (50, 90, 99))
        top = ms[-1] if ms else float("nan")
        print(f"{paths.get(name, 'all'):<16}{len(rows):>9,}{sum(not s[2] for s in rows):>8}"
              f"{p50:>9.1f}{p90:>9.1f}{p99:>9.1f}{top:>9.1f}")
        out[name] = (p50, p99)
    return out


def report(logs: list[ClientLog], wall: float, human_rows: int, server_cpu: float,
           client_cpu: float) -> None:
    samples = [s for log in logs for s in log.samples]
    failed = [e for log in logs for e in log.errors]
    labels = sum(log.labels for log in logs)
    warmup = sum(log.warmup_labels for log in logs)
    p50, p99 = latency_table(samples)["all"]
    gap = abs(human_rows - labels - warmup)
    errors = len(failed) + gap
    match = "match" if gap == 0 else f"MISMATCH by {gap}, counted as errors"
    plus = f" (+{warmup:,} in the warm-up)" if warmup else ""
    print(f"labels: {labels:,} successful POSTs{plus} in {wall:.1f} s = {labels / wall:,.0f} "
          f"labels/s; the ledger holds {human_rows:,} human preferences ({match})")
    print(f"cpu during the load: server {server_cpu:.1f} s ({server_cpu / wall:.2f} cores), "
          f"clients {client_cpu:.1f} s ({client_cpu / wall:.2f} cores)")
    for text in failed[:5]:
        print(f"error: {text}")
    if len(failed) > 5:
        print(f"... and {len(failed) - 5} more errors")
    verdict = "MET" if p99 < GOAL_P99_MS and errors == 0 else "MISSED"
    print(f"goal p99 < {GOAL_P99_MS:.0f} ms and zero errors: {verdict} "
          f"(p99 {p99:.1f} ms, {errors} errors)")
    print(f"RESULT p99_ms={p99:.1f} p50_ms={p50:.1f} errors={errors} "
          f"labels_per_s={labels / wall:.0f} requests={len(samples)}")


# -- main -----------------------------------------------------------------------------------


@contextmanager
def ledger_url(explicit: str | None) -> Iterator[tuple[str, str]]:
    """The ledger URL and how to name it: the given one, or SQLite in a fresh temp dir."""
    if explicit:
        yield explicit, "the --db-url database"
        return
    with tempfile.TemporaryDirectory(prefix="prefloop-bench-") as tmp:
        yield f"sqlite:///{Path(tmp) / 'ledger.sqlite'}", "SQLite in a temp dir"


def main() -> None:
    args = parse_args()
    campaign = f"bench-label-api-{uuid.uuid4().hex[:8]}"
    with ledger_url(args.db_url) as (url, where):
        start = time.perf_counter()
        ledger = Ledger.open(url)
        pending = seed(ledger, campaign, args.comparisons)
        tokens = [ledger.add_annotator(f"{campaign}-{i:02d}") for i in range(args.clients)]
        print(f"ledger: {where}, campaign {campaign!r}: {pending:,} pending comparisons, "
              f"{len(tokens)} annotator tokens (seeded in {time.perf_counter() - start:.1f} s)")
        print(f"rate limit: {RATE_PER_S:,.0f} req/s per token, burst {BURST:,} (no 429s; the "
              f"service default is 5/s, burst 30)")
        print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
        with label_server(url, campaign, args.server_timings) as (proc, base):
            pace = (f"think {args.think_ms:.0f} ms (0.5-1.5x) before each label"
                    if args.think_ms > 0 else "back to back")
            if args.warmup_rounds:
                pace += f", after {args.warmup_rounds} untimed round(s) per client"
            print(f"server: uvicorn pid {proc.pid} at {base}; {args.clients} clients for "
                  f"{args.seconds:.0f} s: next, label, stats every {args.stats_every} rounds, "
                  f"{pace}", flush=True)
            logs, wall, server_cpu, client_cpu = run_clients(base, tokens, args, proc.pid)
        human_rows = ledger.label_counts(campaign).get("human", 0)
        engine_for(url).dispose()
    report(logs, wall, human_rows, server_cpu, client_cpu)


if __name__ == "__main__":
    main()
