"""Child process of test_spilling.py: rollouts held in flight on a Ray whose object store is
capped, then collected.

Usage: ``python tests/fault/spilling_child.py OUT_DIR STORE_MIB``. Starts its own local Ray
(2 CPUs, an object store of STORE_MIB MiB, spilling to OUT_DIR/spill), so the test process's
Ray is left alone. Two rollout workers sample `CALLS` rollouts — seeds 0..CALLS-1, sample
offsets c·K, as successive loop iterations would pass them — all submitted at once, and every
shard's ObjectRef is held until all are sealed; then each rollout is collected, in order.

Writes OUT_DIR/result.json: the store's capacity; the size Ray recorded for each shard object;
Ray's own spill and restore counters (`memory_summary(stats_only=True)`) and the files in the
spill directory, both read after all shards were sealed and before any was collected; per
rollout, its rows and a sha256 of every field of the collected batch but its ledger ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray
import torch
from ray._private.internal_api import memory_summary
from ray.experimental import get_object_locations

from actors.core.sampling import RolloutBatch
from actors.rollout import RolloutGroup
from loop.config import ModelSpec, RolloutConfig
from storage.ledger import Ledger

CAMPAIGN = "spill"
CALLS = 40
"""Rollouts in flight together."""
SPEC = ModelSpec(name="tiny-gpt2", max_length=1024)
CFG = RolloutConfig(workers=2, prompts_per_iteration=8, samples_per_prompt=64,
                    max_new_tokens=1)
WORDS = ("rivers", "bread", "maps", "tea", "clocks", "kites", "salt", "bees")
PROMPTS = [f"\n\nHuman: Question {i}: " + " ".join(f"tell me about {w} and its history"
                                                   for w in WORDS * 20) + "\n\nAssistant:"
           for i in range(8)]
"""8 prompts of ~1150 tokens, cut to the last 1023 (max_length − max_new_tokens): a rollout is
8 × 64 = 512 rows whose prompt tokens, repeated per sample as `RolloutBatch` keeps them (int64
ids and mask: 16 B a token), make ~8.4 MB; its two shards ~4.2 MB each; 40 rollouts ~340 MB.
Long prompts and one new token keep the sampling cheap per byte: the cost is one prefill per
prompt and one (rows × vocabulary) draw."""


def spill_stats(address: str) -> dict[str, int]:
    """Ray's spill/restore counters: MiB and objects (0 where Ray reports none)."""
    text = memory_summary(address, stats_only=True)
    stats = {}
    for what in ("Spilled", "Restored"):
        found = re.search(rf"{what} (\d+) MiB, (\d+) objects", text)
        stats[f"{what.lower()}_mib"] = int(found.group(1)) if found else 0
        stats[f"{what.lower()}_objects"] = int(found.group(2)) if found else 0
    return stats


def digest(batch: RolloutBatch) -> str:
    """sha256 of every field of the batch but its ledger ids."""
    h = hashlib.sha256()
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        if field.name == "generation_ids":
            continue
        h.update(value.numpy().tobytes() if isinstance(value, torch.Tensor)
                 else repr(value).encode())
    return h.hexdigest()


def main(out: Path, store_mib: int) -> None:
    spill = out / "spill"
    spill.mkdir()
    ledger = Ledger.open(f"sqlite:///{out / 'ledger.sqlite'}")
    ledger.ensure_campaign(CAMPAIGN)
    config = {"object_spilling_config": json.dumps(
        {"type": "filesystem", "params": {"directory_path": str(spill)}})}
    with tempfile.TemporaryDirectory(prefix="rs-", dir="/tmp") as temp_dir:
        info = ray.init(address="local", num_cpus=2, object_store_memory=store_mib * 2**20,
                        include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir,
                        _system_config=config)
        try:
            result = run(info.address_info["gcs_address"], ledger, spill)
        finally:
            ray.shutdown()
    result["capacity"] = store_mib * 2**20
    (out / "result.json").write_text(json.dumps(result, indent=1))


def run(address: str, ledger: Ledger, spill: Path) -> dict:
    group = RolloutGroup.launch(2, SPEC, CFG, seed=0, ledger_url=ledger.url, campaign=CAMPAIGN,
                                num_cpus=1)
    try:
        start = time.monotonic()
        calls = [group.generate(PROMPTS, seed=c, sample_offset=c * CFG.samples_per_prompt)
                 for c in range(CALLS)]
        shards = [ref for refs in calls for ref in refs]
        ready, _ = ray.wait(shards, num_returns=len(shards), fetch_local=False, timeout=1200)
        assert len(ready) == len(shards), f"{len(ready)}/{len(shards)} shards sealed in 1200 s"
        sealed_s = time.monotonic() - start
        sizes = [where["object_size"] for where in get_object_locations(shards).values()]
        stats = spill_stats(address)
        spill_files = sum(1 for p in spill.rglob("*") if p.is_file())
        batches = [group.collect(refs) for refs in calls]
        return {"shard_bytes": sizes, "sealed": stats, "spill_files": spill_files,
                "after_collect": spill_stats(address), "seconds": time.monotonic() - start,
                "sealed_seconds": sealed_s,
                "rollouts": [{"rows": b.num_rows, "sha256": digest(b),
                              "written": sum(i is not None for i in b.generation_ids)}
                             for b in batches]}
    finally:
        group.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
