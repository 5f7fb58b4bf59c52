"""Seed a campaign's ledger with existing preference pairs (e.g. the shipped HH-RLHF pairs).

Each pair becomes one prompt, two generations (`policy_version` 0, worker `dataset:<source>`),
one comparison and one preference with the dataset's labeler kind. The side each response lands
on (a or b) is drawn from a seeded RNG, so the labels carry no position bias. Every write is
idempotent: seeding twice, or resuming a campaign that was killed mid-seed, adds nothing twice.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from actors.core.datasets import LoadedPairs, load_preferences
from actors.core.hh import PreferencePair
from loop.config import Config
from loop.config_load import ConfigError
from storage.ledger import Ledger
from storage.records import NewComparison, NewGeneration, NewPreference

SHIPPED = {"hh-rlhf": "hh-rlhf/train.jsonl.gz", "hh-rlhf-holdout": "hh-rlhf/holdout.jsonl.gz"}


@dataclass(frozen=True)
class SeedResult:
    """What seeding wrote: pairs offered, pairs skipped (an empty reply, or two identical
    replies: nothing to learn), preferences newly created, the ledger watermark after it."""

    pairs: int
    skipped: int
    created: int
    watermark: int


def data_dir() -> Path:
    """$PREFLOOP_DATA_DIR, else the project's `shared/data` beside the checkout."""
    if os.environ.get("PREFLOOP_DATA_DIR"):
        return Path(os.environ["PREFLOOP_DATA_DIR"])
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def resolve_pairs_path(source: str, key: str) -> Path:
    """A shipped dataset name (`hh-rlhf`, `hh-rlhf-holdout`) or a path to a data file."""
    path = data_dir() / SHIPPED[source] if source in SHIPPED else Path(source)
    if not path.is_file():
        hint = (" (set PREFLOOP_DATA_DIR to the folder that holds hh-rlhf/)"
                if source in SHIPPED else "")
        raise ConfigError(f"{key}: {path} not found{hint}")
    return path


def load_seed_pairs(cfg: Config, path: Path) -> LoadedPairs:
    """Read `rm.seed_pairs` in `rm.seed_format`'s schema; a bad file is a `ConfigError`."""
    try:
        return load_preferences(cfg.rm.seed_format, path=str(path), limit=cfg.rm.seed_max_pairs,
                                attribute_weights=cfg.rm.seed_attribute_weights)
    except ValueError as exc:
        raise ConfigError(f"rm.seed_pairs: {exc}") from None


def seed_pairs(ledger: Ledger, campaign: str, pairs: Sequence[PreferencePair], *,
               source: str, labeler_kind: str = "human", seed: int = 0) -> SeedResult:
    """Write `pairs` into the ledger as labeled comparisons (idempotent)."""
    worker = f"dataset:{source}"
    usable = [p for p in pairs if p.chosen and p.rejected and p.chosen != p.rejected]
    skipped, pairs = len(pairs) - len(usable), usable
    prompt_ids = ledger.add_prompts(campaign, [p.prompt for p in pairs], source=source)
    rng = random.Random(seed)
    flips = [rng.random() < 0.5 for _ in pairs]
    gens, uses = [], Counter[int]()
    for pid, pair, flip in zip(prompt_ids, pairs, flips, strict=True):
        first, second = (pair.rejected, pair.chosen) if flip else (pair.chosen, pair.rejected)
        base = 2 * uses[pid]  # several pairs can share one prompt: distinct sample indices
        uses[pid] += 1
        gens += [NewGeneration(pid, text, len(text.split()), 0, worker, base + index,
                               {"source": source, "token_count": "whitespace words"})
                 for index, text in enumerate((first, second))]
    gen_ids = ledger.add_generations(campaign, gens)
    comps = [NewComparison(gen_ids[2 * i], gen_ids[2 * i + 1], selection=f"dataset:{source}")
             for i in range(len(pairs))]
    comp_ids = ledger.add_comparisons(campaign, comps)
    prefs = [NewPreference(cid, "b" if flip else "a", labeler_kind, worker,
                           strength=pair.margin or None, idempotency_key=f"seed:{source}:{cid}")
             for cid, flip, pair in zip(comp_ids, flips, pairs, strict=True)]
    created = sum(r.created for r in ledger.record_preferences(campaign, prefs))
    return SeedResult(len(pairs) + skipped, skipped, created, ledger.watermark(campaign))
