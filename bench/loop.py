"""The online loop's own cost: per-stage wall time, loop overhead, and RM refresh time as the
ledger grows.

1. **Stages and overhead.** Each config given (default: `configs/tiny.yaml`, then
   `configs/demo.yaml` cut to `--demo-iterations`) runs as a real campaign, `python -m
   loop.main run CONFIG campaign.run_dir=<tmp> …`, in a process of its own. From its
   `metrics.jsonl`: the median of each `timing/<stage>` over the iterations, and the loop
   overhead = (wall − Σ stages) / wall, where wall runs from the start of iteration 1 (its
   record's time less its `timing/iteration`) to the last iteration's record, so it counts
   what the loop does between stages and between iterations (metrics to every sink,
   checkpoints), not the campaign's start-up (seeding, RM v1, starting actors) or its report.
   Goal (issue 7): overhead ≤ 5%.

2. **RM refresh as the ledger grows.** For each size N (default 1,000 and 100,000): a fresh
   SQLite ledger with N AI preferences (synthetic prompts and replies of HH-like length), the
   tiny config's RM (DeepSpeed ZeRO-2, one rank). RM v1 trains on the ledger's first 256
   preferences (a real snapshot at that watermark); the service is then told that v1 has seen
   all N (its serving watermark is set to N's), which is where a long campaign stands when its
   ledger holds N labels. Each of `--repeats` rounds then adds `--fresh` new labeled
   comparisons and times one refresh end to end: the ledger snapshot, the split (the fresh
   labels plus a replay of older ones from the bounded window `rm.replay_window`, 512 by
   default: below the smallest size, so that every size reads a full window), the warm start,
   training, the gate's evaluations, publishing and the ledger rows. The gate is told to promote
   every candidate (`rm.promotion_tolerance=1`): this measures time, not quality.
   refresh_growth = median(N=largest) / median(N=smallest). Goal: ≤ 1.2.

3. **Synchronous vs overlapped rollout.** The tiny campaign runs `--overlap-repeats` times
   each way, `campaign.overlap_rollout` false and true, taking turns (sync first in even rounds,
   overlap first in odd ones, so that drift in the machine's load reaches both alike), each
   `--overlap-iterations` long with one checkpoint at the end (so overlap samples ahead in all
   iterations but the last). Per run: loop seconds per iteration (the loop wall of part 1 over
   its iterations; start-up excluded). overlap_speedup = median(sync) / median(overlap). Ray
   pins each fractional-CPU actor to one torch thread, so on 2 cores a rollout and a PPO update
   really run at once. overlap_ideal = sync / (sync − its rollout stage): the speedup if hiding
   the rollout cost nothing else; the two modes sample different replies (from the policy one
   version apart), so their other stages need not take the same time.

    .venv/bin/python bench/loop.py                          # tiny + demo (2 iterations) + growth
    .venv/bin/python bench/loop.py --configs tiny --sizes 1000 10000 --repeats 2   # a quick look
    .venv/bin/python bench/loop.py --configs --sizes --overlap-repeats 5   # only sync vs overlap

Ends with `RESULT overhead=… refresh_growth=… … overlap_speedup=…` (overhead: the largest over
the configs run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_worker_niceness", "0")  # Ray's default niceness 15 skews timings

CONFIGS = {"tiny": "configs/tiny.yaml", "demo": "configs/demo.yaml"}
NESTED = {"rm_fit": "rm_refresh", "ppo_update": "ppo"}
"""Timings measured inside a stage (by the trainer actors); every other `timing/<stage>` is one
of the stages `CampaignLoop.run_iteration` times one after another."""
WORDS = ["the", "a", "model", "answer", "helpful", "question", "because", "reward", "policy",
         "length", "good", "bad", "clear", "short", "long", "safe", "unsafe", "explain",
         "reason", "step", "first", "then", "finally", "however"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="*", default=["tiny", "demo"], choices=list(CONFIGS),
                        help="campaigns to time stage by stage (none: skip part 1)")
    parser.add_argument("--tiny-iterations", type=int, default=4)
    parser.add_argument("--demo-iterations", type=int, default=2)
    parser.add_argument("--sizes", nargs="*", type=int, default=[1_000, 100_000],
                        help="ledger sizes for the refresh timing (none: skip part 2)")
    parser.add_argument("--fresh", type=int, default=64, help="new labels per refresh")
    parser.add_argument("--repeats", type=int, default=5, help="refreshes per ledger size")
    parser.add_argument("--replay-window", type=int, default=512,
                        help="rm.replay_window; below the smallest size, so that every size "
                             "reads a full window")
    parser.add_argument("--overlap-repeats", type=int, default=3,
                        help="tiny campaigns per mode, sync vs overlap (0: skip part 3)")
    parser.add_argument("--overlap-iterations", type=int, default=8)
    parser.add_argument("--overlap-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra overrides of both modes' tiny campaigns")
    return parser.parse_args()


# -- part 1: stages and overhead -------------------------------------------------------------

def run_campaign(config: str, iterations: int, run_dir: Path, checkpoint_every: int = 0,
                 overrides: tuple[str, ...] = ()) -> float:
    """Run one campaign in its own process; returns its wall time. `checkpoint_every` 0:
    half the iterations."""
    every = checkpoint_every or max(1, iterations // 2)
    cmd = [sys.executable, "-m", "loop.main", "run", CONFIGS[config],
           f"campaign.run_dir={run_dir}", f"campaign.iterations={iterations}",
           f"campaign.checkpoint_every={every}", "metrics.progress=lines", *overrides]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"bench/loop.py: the {config} campaign failed (exit {done.returncode}):\n"
                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall


def stage_report(metrics_file: Path) -> tuple[dict[str, float], float, float, int]:
    """(median seconds per stage, loop wall, Σ stages, iterations) from a run's metrics."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    its = [r for r in records if r["step"] >= 1]
    if not its:
        sys.exit(f"bench/loop.py: {metrics_file} holds no iteration records")
    timings = {k for r in its for k in r if k.startswith("timing/")} - {"timing/iteration"}
    medians = {k.removeprefix("timing/"): statistics.median(r.get(k, 0.0) for r in its)
               for k in timings}
    stages = sorted(timings - {f"timing/{inner}" for inner in NESTED})
    wall = its[-1]["time"] - (its[0]["time"] - its[0]["timing/iteration"])
    summed = sum(r.get(k, 0.0) for r in its for k in stages)
    return medians, wall, summed, len(its)


def part_stages(configs: list[str], iterations: dict[str, int]) -> dict[str, float]:
    overheads: dict[str, float] = {}
    for config in configs:
        with tempfile.TemporaryDirectory(prefix=f"bench-loop-{config}-") as tmp:
            run_dir = Path(tmp) / config
            total = run_campaign(config, iterations[config], run_dir)
            medians, wall, summed, n = stage_report(run_dir / "metrics.jsonl")
        overheads[config] = (wall - summed) / wall
        print(f"\n{config}: {n} iterations, campaign wall {total:.1f}s, loop wall {wall:.1f}s, "
              f"stages {summed:.1f}s, overhead {100 * overheads[config]:.2f}%")
        for stage, sec in sorted(medians.items(), key=lambda kv: -kv[1]):
            within = f"  (within {NESTED[stage]})" if stage in NESTED else ""
            print(f"  {stage:<14} median {sec:8.3f}s{within}")
    return overheads


# -- part 2: refresh time against ledger size ------------------------------------------------

def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def add_labeled(ledger, campaign: str, n: int, rng: random.Random, tag: str) -> None:
    """`n` new prompts, two replies each, one comparison each, labeled by an AI judge."""
    from storage.records import NewComparison, NewGeneration, NewPreference

    for lo in range(0, n, 5_000):
        k = min(5_000, n - lo)
        prompts = ledger.add_prompts(campaign, [f"{tag}-{lo + i}: {_text(rng, 50)}"
                                                for i in range(k)])
        gens = ledger.add_generations(campaign, [
            NewGeneration(p, _text(rng, rng.randint(20, 120)), 80, 0, "bench", s)
            for p in prompts for s in range(2)])
        comps = ledger.add_comparisons(campaign, [NewComparison(gens[2 * i], gens[2 * i + 1])
                                                  for i in range(k)])
        ledger.record_preferences(campaign, [
            NewPreference(c, "a" if i % 3 else "b", "ai", "bench-judge")
            for i, c in enumerate(comps)])


@dataclass
class Ledgered:
    """One ledger size under test: its ledger and RM service (v1 serving, as of all N)."""

    size: int
    ledger: object
    rm: object
    rng: random.Random
    times: list[float]


def prepare(size: int, tmp: Path, replay_window: int):
    from actors.reward_trainer import RewardTrainerGroup
    from loop.config_load import load_config
    from loop.rm_refresh import RMService
    from storage.ledger import Ledger

    cfg = load_config(REPO / CONFIGS["tiny"], ["rm.promotion_tolerance=1.0",
                                              "rm.seed_pairs=null",
                                              f"rm.replay_window={replay_window}"])
    name, rng = cfg.campaign.name, random.Random(size)
    ledger = Ledger.open(f"sqlite:///{tmp}/ledger.sqlite")
    ledger.ensure_campaign(name)
    start = time.perf_counter()
    add_labeled(ledger, name, size, rng, "old")
    seeded = time.perf_counter() - start
    start = time.perf_counter()
    whole = ledger.snapshot(name)
    print(f"  N={size}: ledger seeded in {seeded:.1f}s; reading its whole snapshot takes "
          f"{time.perf_counter() - start:.2f}s ({len(whole.rows)} rows)", flush=True)
    rm = RMService(cfg, ledger, tmp, lambda line: None)
    rm.group = RewardTrainerGroup.launch(  # a name of its own: one group per ledger size
        1, cfg.models.reward, cfg.rm, cfg.campaign.seed, name_prefix=f"rm-trainer-n{size}")
    rm.refresh(ledger.snapshot(name, watermark=min(256, size)), version=1)
    rm.serving = dataclasses.replace(rm.serving, watermark=ledger.watermark(name))
    return Ledgered(size, ledger, rm, rng, [])


def part_growth(sizes: list[int], fresh: int, repeats: int, replay_window: int) -> float:
    """Refreshes at each ledger size, taking turns (size 1, size 2, size 1, …) so that the
    machine's load drifts over all sizes alike; returns median(largest) / median(smallest)."""
    from loop.ray_env import connect

    connect(num_cpus=2)
    print("\nRM refresh time against ledger size (tiny RM, one rank)")
    with tempfile.TemporaryDirectory(prefix="bench-loop-refresh-") as tmp:
        runs: list[Ledgered] = []
        try:
            for size in sizes:
                (Path(tmp) / str(size)).mkdir()
                runs.append(prepare(size, Path(tmp) / str(size), replay_window))
            for k in range(repeats):
                for run in runs:
                    name = run.rm.name
                    add_labeled(run.ledger, name, fresh, run.rng, f"fresh{k}")
                    start = time.perf_counter()
                    done = run.rm.refresh(run.rm.snapshot(), version=k + 2)
                    run.times.append(time.perf_counter() - start)
                    print(f"  N={run.size}: refresh v{done.version} {run.times[-1]:.2f}s "
                          f"({done.pairs} pairs)", flush=True)
        finally:
            for run in runs:
                run.rm.shutdown()
    medians = {run.size: statistics.median(run.times) for run in runs}
    for size in sizes:
        print(f"  N={size:>7}: median refresh {medians[size]:.2f}s")
    return medians[max(sizes)] / medians[min(sizes)]


# -- part 3: synchronous vs overlapped rollout -----------------------------------------------

def part_overlap(repeats: int, iterations: int, extra: list[str]) -> dict[str, float]:
    """Tiny campaigns with `campaign.overlap_rollout` false and true, taking turns; returns
    the medians of loop seconds per iteration and their ratio."""
    print(f"\nsync vs overlapped rollout: tiny, {iterations} iterations, checkpoint at the end, "
          f"{repeats} run(s) each, taking turns")
    per_it: dict[str, list[float]] = {"sync": [], "overlap": []}
    stages: dict[str, list[dict[str, float]]] = {"sync": [], "overlap": []}
    for k in range(repeats):
        for mode in (("sync", "overlap") if k % 2 == 0 else ("overlap", "sync")):
            overrides = (f"campaign.overlap_rollout={str(mode == 'overlap').lower()}", *extra)
            with tempfile.TemporaryDirectory(prefix=f"bench-loop-{mode}-") as tmp:
                run_dir = Path(tmp) / "tiny"
                run_campaign("tiny", iterations, run_dir, iterations, overrides)
                medians, wall, _, n = stage_report(run_dir / "metrics.jsonl")
            per_it[mode].append(wall / n)
            stages[mode].append(medians)
            print(f"  round {k}: {mode:<7} {wall / n:.3f}s per iteration (loop wall {wall:.1f}s, "
                  f"{n} iterations); median rollout {medians['rollout']:.3f}s, rollout wait "
                  f"{medians.get('rollout_wait', 0.0):.3f}s, RM refresh "
                  f"{medians['rm_refresh']:.3f}s, PPO {medians['ppo']:.3f}s", flush=True)
    sync, overlap = (statistics.median(per_it[m]) for m in ("sync", "overlap"))
    rollout = statistics.median(s["rollout"] for s in stages["sync"])
    ideal = sync / max(sync - rollout, 1e-9)
    print(f"  median: sync {sync:.3f}s, overlap {overlap:.3f}s per iteration → speedup "
          f"{sync / overlap:.3f} (ideal, the sync rollout stage of {rollout:.3f}s hidden: "
          f"{ideal:.3f})")
    return {"overlap_speedup": sync / overlap, "sync_s_per_it": sync,
            "overlap_s_per_it": overlap, "overlap_ideal": ideal}


def main() -> None:
    args = parse_args()
    iterations = {"tiny": args.tiny_iterations, "demo": args.demo_iterations}
    overheads = part_stages(args.configs, iterations) if args.configs else {}
    growth = (part_growth(args.sizes, args.fresh, args.repeats, args.replay_window)
              if args.sizes else float("nan"))
    overlap = (part_overlap(args.overlap_repeats, args.overlap_iterations, args.overlap_set)
               if args.overlap_repeats else {})
    worst = max(overheads.values()) if overheads else float("nan")
    per_config = " ".join(f"{c}_overhead={o:.4f}" for c, o in overheads.items())
    overlapped = " ".join(f"{k}={v:.3f}" for k, v in overlap.items())
    print(f"RESULT overhead={worst:.4f} refresh_growth={growth:.3f} {per_config} "
          f"sizes={'/'.join(map(str, args.sizes))} fresh={args.fresh} repeats={args.repeats} "
          f"replay_window={args.replay_window} {overlapped} "
          f"overlap_repeats={args.overlap_repeats} overlap_iterations={args.overlap_iterations}")


if __name__ == "__main__":
    main()
