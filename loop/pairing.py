"""Which generations of a rollout become comparisons for the labelers.

For each prompt the K samples give K(K−1)/2 candidate pairs; `labeling.pairs_per_prompt` of them
are queued. Selection `random` draws them with a seeded generator; `disagreement` queues the
pairs on which the serving RM ensemble disagrees most (population std over members of
P(a beats b), `actors.core.ensemble.pair_disagreement`) and gives each comparison that value as
its claim priority, so labelers take the most informative pairs first. Pairs whose texts are
equal, or with a sample the ledger did not store (an empty response), are never queued.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from actors.core.ensemble import pair_disagreement
from actors.core.sampling import RolloutBatch
from storage.records import NewComparison


@dataclass(frozen=True)
class PairPlan:
    """Comparisons to queue for one rollout batch.

    Attributes:
        comparisons: The new comparisons (generation ids, selection, priority).
        rows: For each comparison, the two batch rows it compares.
    """

    comparisons: tuple[NewComparison, ...]
    rows: tuple[tuple[int, int], ...]


def candidate_pairs(batch: RolloutBatch) -> list[tuple[int, int]]:
    """Row pairs (i, j), i < j, of the same prompt, both stored and with different texts."""
    ids = batch.generation_ids or (None,) * batch.num_rows
    by_prompt: dict[int, list[int]] = {}
    for row, prompt in enumerate(batch.prompt_index.tolist()):
        if ids[row] is not None:
            by_prompt.setdefault(prompt, []).append(row)
    return [(i, j) for rows in by_prompt.values() for i, j in itertools.combinations(rows, 2)
            if batch.texts[i] != batch.texts[j]]


def plan_pairs(batch: RolloutBatch, pairs_per_prompt: int, selection: str, seed: int,
               member_scores: torch.Tensor | None = None) -> PairPlan:
    """Choose up to `pairs_per_prompt` pairs per prompt.

    Args:
        batch: A rollout batch whose rows carry ledger `generation_ids`.
        pairs_per_prompt: Comparisons per prompt.
        selection: "random" or "disagreement".
        seed: Seed of the random choice (e.g. derived from the campaign seed and iteration).
        member_scores: `(K, N)` serving-RM member rewards of the batch rows (needed for
            "disagreement"; one member gives zero disagreement everywhere).
    """
    candidates = candidate_pairs(batch)
    if selection == "disagreement" and member_scores is None:
        raise ValueError("selection 'disagreement' needs the RM members' scores of the batch")
    rng = np.random.default_rng([seed, 5])
    priority = {}
    if selection == "disagreement":
        a = torch.tensor([i for i, _ in candidates], dtype=torch.long)
        b = torch.tensor([j for _, j in candidates], dtype=torch.long)
        spread = (pair_disagreement(member_scores[:, a], member_scores[:, b]) if candidates
                  else torch.empty(0))
        priority = {pair: float(s) for pair, s in zip(candidates, spread.tolist(), strict=True)}
    chosen: list[tuple[int, int]] = []
    by_prompt: dict[int, list[tuple[int, int]]] = {}
    for pair in candidates:
        by_prompt.setdefault(int(batch.prompt_index[pair[0]]), []).append(pair)
    for prompt in sorted(by_prompt):
        options = by_prompt[prompt]
        if selection == "disagreement":
            options = sorted(options, key=lambda p: (-priority[p], p))
        else:
            options = [options[k] for k in rng.permutation(len(options))]
        chosen += options[:pairs_per_prompt]
    ids = batch.generation_ids
    kind = "ensemble_disagreement" if selection == "disagreement" else "random"
    comparisons = tuple(NewComparison(ids[i], ids[j], selection=kind,
                                      priority=priority.get((i, j), 0.0)) for i, j in chosen)
    return PairPlan(comparisons, tuple(chosen))
