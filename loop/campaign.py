"""The campaign driver: what `prefloop run` does.

The online loop (rollout → label → RM refresh → PPO → monitors) is being built stage by stage.
This driver runs every stage that exists, for real, and names the ones that do not exist yet
instead of inventing results. Today that is: prepare the run directory, join or start Ray, open
the ledger, seed it with labeled pairs, train the first reward model on the ledger snapshot
under DeepSpeed ZeRO, evaluate it on held-out pairs, publish it to the weight store and
register it (with its training-set watermark and hash) in the ledger.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from actors.core.metrics import JsonlSink
from loop.config import Config
from loop.ray_env import connect
from loop.rm_refresh import RMService
from loop.run_dir import prepare_run_dir
from loop.seed import load_seed_pairs, resolve_pairs_path, seed_pairs
from storage.db import resolve_url
from storage.ledger import Ledger

NOT_BUILT = ("rollout workers", "AI labelers", "PPO", "reward-hacking monitors")


class Reporter:
    """Plain progress lines (what job logs and terminals both read well)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[prefloop {time.monotonic() - self.t0:7.1f}s] {message}", flush=True)


@contextmanager
def timed(metrics: dict[str, float], stage: str):
    t0 = time.perf_counter()
    yield
    metrics[f"timing/{stage}"] = time.perf_counter() - t0


def run_campaign(cfg: Config, config_path: Path, resume: Path | None = None) -> None:
    """Run what exists of the campaign `cfg` (read from `config_path`)."""
    say = Reporter()
    run_dir = prepare_run_dir(cfg, resume)
    say(f"campaign {cfg.campaign.name!r} from {config_path}; run directory {run_dir}")
    url = resolve_url(cfg.storage.db_url, run_dir)
    ledger = Ledger.open(url, cfg.storage.max_text_chars)  # before Ray: a bad URL fails fast
    name = cfg.campaign.name
    ledger.ensure_campaign(name, cfg.model_dump(mode="json"))
    say(f"ledger: {url}")
    where = connect()
    say(f"Ray: {'joined the cluster' if where == 'cluster' else 'started a local instance'}")
    sink = JsonlSink(run_dir / "metrics.jsonl")
    metrics: dict[str, float] = {}
    try:
        if cfg.rm.seed_pairs:
            with timed(metrics, "seed"):
                path = resolve_pairs_path(cfg.rm.seed_pairs, "rm.seed_pairs")
                loaded = load_seed_pairs(cfg, path)
                seeded = seed_pairs(ledger, name, loaded.pairs, source=cfg.rm.seed_pairs,
                                    labeler_kind=loaded.labeler_kind, seed=cfg.campaign.seed)
            metrics.update({"label/seed_pairs": seeded.pairs, "label/seed_created": seeded.created,
                            "label/seed_skipped": seeded.skipped})
            say(f"seeded the ledger from {path}: {seeded.pairs} pairs, {seeded.created} new "
                f"preferences ({seeded.skipped} skipped: empty or identical replies), "
                f"watermark {seeded.watermark}")
        snap = ledger.snapshot(name)
        say(f"ledger snapshot: {len(snap.rows)} preferences at watermark {snap.watermark}, "
            f"sha256 {snap.sha256[:16]}…")
        rm = RMService(cfg, ledger, run_dir, say)
        try:
            if rm.restore_serving() is not None:
                say("the first RM exists already (resumed campaign): not retrained")
            elif snap.rows:
                with timed(metrics, "rm_refresh"):
                    first = rm.refresh(snap, version=1)
                metrics.update(first.metrics)
            else:
                say("the ledger holds no preferences: no RM to train (set rm.seed_pairs)")
        finally:
            rm.shutdown()
        sink.log(metrics, step=0)
        ledger.log_metrics(name, 0, metrics)
    finally:
        sink.close()
    say(f"not built yet, so not run: {', '.join(NOT_BUILT)}")
    say(f"done; metrics in {run_dir / 'metrics.jsonl'}")
