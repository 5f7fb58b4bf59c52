"""RolloutWorker: holds one version of the policy, samples K responses per prompt, logs them.

The actor owns process state — the policy, its tokenizer, the version of its weights, a ledger
handle — and calls `actors.core.sampling` for everything else. New weights arrive through the
object store: the trainer (or driver) does ONE `ray.put(pack_state(state))` and every worker
receives that ref; Ray maps the packed numpy arrays from shared memory (no pickled tensors, no
disk). `RolloutGroup` is the driver-side handle of R workers.

    group = RolloutGroup.launch(2, model_spec, rollout_cfg, seed=0, ledger_url=url, campaign=c)
    group.publish(1, policy.state_dict())       # one ray.put, every worker loads it
    refs = group.generate(prompts, seed=7)      # one ObjectRef[RolloutBatch] per busy worker
    batch = group.collect(refs)                 # rows in prompt order, policy_version=1
    group.shutdown()
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import ray
import torch

from actors.core.policy import load_policy
from actors.core.sampling import RolloutBatch, concat_batches, generate
from actors.core.weight_transport import PackedState, pack_state, unpack_state
from actors.dist import rank_chunk
from storage.ledger import DEFAULT_MAX_TEXT_CHARS, Ledger
from storage.records import NewGeneration

if TYPE_CHECKING:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from loop.config import ModelSpec, RolloutConfig


def shard_seed(seed: int, shard: int) -> int:
    """The sampling seed of worker `shard` for a call seeded `seed` (independent streams)."""
    return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])


@ray.remote(num_cpus=1)
class RolloutWorker:
    """One rollout worker. Call `setup` once before anything else.

    Args:
        name: This worker's name (its actor name; the `worker` of its ledger rows).
        model_spec: The policy (`models.policy`); version 0 is what `load_policy` gives.
        rollout_cfg: Sampling settings (`rollout`).
        seed: Seed of the version-0 initialization.
        ledger_url: Ledger to log generations to (opened, and migrated, by the driver first);
            None: no logging.
        campaign: Campaign of the ledger rows (required with `ledger_url`).
    """

    def __init__(self, name: str, model_spec: ModelSpec, rollout_cfg: RolloutConfig, seed: int,
                 ledger_url: str | None = None, campaign: str | None = None,
                 max_text_chars: int = DEFAULT_MAX_TEXT_CHARS):
        self.name, self.spec, self.cfg, self.seed = name, model_spec, rollout_cfg, seed
        self.ledger_url, self.campaign, self.max_text_chars = ledger_url, campaign, max_text_chars
        self.model = self.tokenizer = self.ledger = None
        self._version = 0

    def setup(self) -> dict[str, int | str]:
        """Load the version-0 policy and open the ledger; returns `info()`."""
        if self.spec.max_length <= self.cfg.max_new_tokens:
            raise ValueError(f"models.policy.max_length={self.spec.max_length} leaves no room for "
                             f"a prompt after rollout.max_new_tokens={self.cfg.max_new_tokens}")
        if self.ledger_url is not None:
            if not self.campaign:
                raise ValueError(f"{self.name}: a ledger_url needs a campaign")
            self.ledger = Ledger.open(self.ledger_url, self.max_text_chars, migrate=False)
        self.model, self.tokenizer = load_policy(self.spec.name, self.seed, self.spec.dtype)
        return self.info()

    def info(self) -> dict[str, int | str]:
        """Name, weight version, parameter count, torch threads and the process's nice value
        (Ray starts workers at nice 15: on a busy machine they lose to anything at 0)."""
        return {"name": self.name, "version": self._version, "threads": torch.get_num_threads(),
                "nice": os.nice(0), "params": sum(p.numel() for p in self.model.parameters())}

    def version(self) -> int:
        """Version of the weights this worker samples with."""
        return self._version

    def load_weights(self, version: int, state: PackedState) -> int:
        """Load a full state dict published as version `version` (pass the ObjectRef of ONE
        `ray.put(pack_state(...))`: Ray hands every worker the same shared-memory arrays)."""
        if version < self._version:
            raise ValueError(f"{self.name}: refusing policy version {version}, older than the "
                             f"loaded version {self._version}")
        self.model.load_state_dict(unpack_state(state))  # copies out of the read-only arrays
        self._version = version
        return version

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits `(B, T, V)` float32 of a fixed input (for checks: same weights, same logits)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()

    def generate(self, prompts: Sequence[str], seed: int, sample_offset: int = 0) -> RolloutBatch:
        """Sample `rollout.samples_per_prompt` responses per prompt; log them to the ledger.

        Args:
            prompts: P prompts (a list, or the ObjectRef of one: Ray resolves it).
            seed: Sampling seed.
            sample_offset: Added to each row's ledger `sample_index`; the natural key of a
                generation is (prompt, policy_version, worker, sample_index), so a second
                rollout of the same prompt at the same version needs a new offset.

        Returns:
            The `RolloutBatch`, with `policy_version`, `worker` and (with a ledger)
            `generation_ids` set.
        """
        cfg = self.cfg
        batch = generate(self.model, self.tokenizer, list(prompts), cfg.samples_per_prompt,
                         cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed,
                         max_prompt_tokens=self.spec.max_length - cfg.max_new_tokens)
        ids = self._log(batch, seed, sample_offset) if self.ledger is not None else None
        return dataclasses.replace(batch, policy_version=self._version, generation_ids=ids,
                                   worker=self.name)

    def _log(self, batch: RolloutBatch, seed: int, sample_offset: int) -> tuple[int | None, ...]:
        """Write the non-empty responses (the ledger refuses empty text); ids in row order."""
        prompt_ids = self.ledger.add_prompts(self.campaign, batch.prompts)
        k = self.cfg.samples_per_prompt
        params = {"temperature": batch.temperature, "top_p": batch.top_p,
                  "max_new_tokens": self.cfg.max_new_tokens, "seed": seed}
        seen: Counter[int] = Counter()  # a prompt given twice gets sample indices K..2K-1
        rows: list[int] = []
        gens: list[NewGeneration] = []
        for row, (p, s) in enumerate(zip(batch.prompt_index.tolist(),
                                         batch.sample_index.tolist(), strict=True)):
            repeat = seen[prompt_ids[p]] // k
            seen[prompt_ids[p]] += 1
            if batch.texts[row]:
                rows.append(row)
                gens.append(NewGeneration(
                    prompt_id=prompt_ids[p], text=batch.texts[row],
                    token_count=int(batch.response_mask[row].sum()),
                    policy_version=self._version, worker=self.name,
                    sample_index=sample_offset + repeat * k + s, sampling_params=params))
        written = dict(zip(rows, self.ledger.add_generations(self.campaign, gens), strict=True))
        return tuple(written.get(row) for row in range(batch.num_rows))


class RolloutGroup:
    """Driver-side handle of R `RolloutWorker`s named `{name_prefix}-{i}`. Build with `launch`."""

    def __init__(self, workers: list):
        self.workers = workers

    @classmethod
    def launch(cls, num_workers: int, model_spec: ModelSpec, rollout_cfg: RolloutConfig,
               seed: int, ledger_url: str | None = None, campaign: str | None = None,
               name_prefix: str = "rollout", num_cpus: float = 1.0,
               max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
               scheduling: Sequence[PlacementGroupSchedulingStrategy] | None = None
               ) -> RolloutGroup:
        """Start R workers and load the version-0 policy in all of them at once.

        `scheduling` gives worker i its placement-group bundle (`loop.placement`); None lets
        Ray place them.
        """
        places = [None] * num_workers if scheduling is None else list(scheduling)
        if len(places) != num_workers:
            raise ValueError(f"{len(places)} scheduling strategies for {num_workers} workers")
        workers = [RolloutWorker.options(name=f"{name_prefix}-{i}", num_cpus=num_cpus,
                                         scheduling_strategy=place)
                   .remote(f"{name_prefix}-{i}", model_spec, rollout_cfg, seed, ledger_url,
                           campaign, max_text_chars)
                   for i, place in enumerate(places)]
        group = cls(workers)
        try:
            ray.get([w.setup.remote() for w in workers])
        except BaseException:
            group.shutdown()
            raise
        return group

    def publish(self, version: int,
                state: Mapping[str, torch.Tensor] | ray.ObjectRef) -> ray.ObjectRef:
        """Give every worker the weights of `version`; returns when all have loaded them.

        `state` is a state dict (packed and put here, once) or the ObjectRef of a `PackedState`
        that a trainer already put. Returns the ref every worker loaded.
        """
        ref = state if isinstance(state, ray.ObjectRef) else ray.put(pack_state(state))
        ray.get([w.load_weights.remote(version, ref) for w in self.workers])
        return ref

    def versions(self) -> list[int]:
        """The weight version of each worker."""
        return ray.get([w.version.remote() for w in self.workers])

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Each worker's logits `(B, T, V)` on the same input."""
        return ray.get([w.logits.remote(input_ids, attention_mask) for w in self.workers])

    def generate(self, prompts: Sequence[str], seed: int,
                 sample_offset: int = 0) -> list[ray.ObjectRef]:
        """Split the prompts into R contiguous shards, one per worker (an empty shard is not
        sent); worker i samples with `shard_seed(seed, i)`. Returns one ObjectRef of a
        `RolloutBatch` per shard, in prompt order."""
        refs = []
        for i, worker in enumerate(self.workers):
            shard = rank_chunk(len(prompts), len(self.workers), i)
            if len(shard):
                refs.append(worker.generate.remote([prompts[j] for j in shard],
                                                   shard_seed(seed, i), sample_offset))
        return refs

    @staticmethod
    def collect(refs: Sequence[ray.ObjectRef]) -> RolloutBatch:
        """Wait for the shards and join them into one batch (rows in prompt order)."""
        return concat_batches(ray.get(list(refs)))

    def shutdown(self) -> None:
        """Kill every worker (idempotent)."""
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
