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

Losing a node. A shard's batch lives in the object store of the node that sampled it until
`collect` fetches it; when that node dies, the object goes with it, and so does the worker. Ray
restarts the worker (`max_restarts`) as a new, empty process: it re-runs `__init__`, nothing
else. `collect` then samples exactly that shard again — same prompts, same `shard_seed`, same
`sample_offset` — after `setup` and the weights it was asked with have been loaded into the
new process: the rows are those the lost worker sampled (the sampler is seeded), and their ledger
writes find the rows the lost worker already wrote (the ledger is idempotent on the natural key
(prompt, policy_version, worker, sample_index) when the text is the same). At most
`max_regenerations` times per shard; each loss is one log line naming the shard, the worker and
its node. Ray's own retry of `generate` is off (`max_task_retries=0`): it would re-run the call
on the restarted, un-set-up worker. A worker that restarts between calls refuses work
(`WorkerNotReady`) until the group sets it up again (in `collect`, or in `publish`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import ray
import torch
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    NodeDiedError,
    ObjectLostError,
    RayActorError,
    RayTaskError,
)

from actors.core.policy import load_policy
from actors.core.sampling import RolloutBatch, concat_batches, generate
from actors.core.weight_transport import PackedState, pack_state, unpack_state
from actors.dist import rank_chunk
from storage.ledger import DEFAULT_MAX_TEXT_CHARS, Ledger
from storage.records import NewGeneration

if TYPE_CHECKING:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from loop.config import ModelSpec, RolloutConfig


log = logging.getLogger(__name__)
RESTART_POLL_S = 0.5
"""How often `RolloutGroup` asks a restarting worker whether it is back."""


class WorkerNotReady(RuntimeError):
    """A rollout worker holds no policy: `setup` was never called, or Ray restarted the actor
    (a restart re-runs `__init__` only)."""


class RolloutLost(RuntimeError):
    """A shard, or the weights to sample it again, could not be recovered."""


LOSSES = (ObjectLostError, RayActorError, NodeDiedError, WorkerNotReady)
"""What fetching a shard raises when its object or its worker is gone: the object was lost with
its node (`OwnerDiedError` and `ObjectReconstructionFailedError` subclass `ObjectLostError`), the
worker died or is restarting (`ActorDiedError`, `ActorUnavailableError` subclass
`RayActorError`), or the restarted worker has no policy yet (`WorkerNotReady`)."""


def shard_seed(seed: int, shard: int) -> int:
    """The sampling seed of worker `shard` for a call seeded `seed` (independent streams)."""
    return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """What worker `shard` was asked to sample, with which weights (`RolloutGroup.weights`
    then; None: version 0): enough to sample it again, row for row."""

    shard: int
    prompts: tuple[str, ...]
    seed: int
    sample_offset: int
    weights: tuple[int, ray.ObjectRef] | None


class ShardRefs(list):
    """What `RolloutGroup.generate` returns: one ObjectRef of a `RolloutBatch` per shard, in
    prompt order (a list, so `ray.get` takes it as is), plus the `ShardJob` of each and the
    group that can sample a lost shard again (`RolloutGroup.collect`)."""

    def __init__(self, refs: Iterable[ray.ObjectRef], jobs: Iterable[ShardJob],
                 group: RolloutGroup):
        super().__init__(refs)
        self.jobs, self.group = tuple(jobs), group


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
        """Name, node id, weight version, parameter count, torch threads and the process's nice
        value (Ray starts workers at nice 15: on a busy machine they lose to anything at 0)."""
        self._ready()
        return {"name": self.name, "node": ray.get_runtime_context().get_node_id(),
                "version": self._version, "threads": torch.get_num_threads(),
                "nice": os.nice(0), "params": sum(p.numel() for p in self.model.parameters())}

    def _ready(self) -> None:
        if self.model is None:
            raise WorkerNotReady(f"{self.name} (pid {os.getpid()}) holds no policy: setup() was "
                                 "not called in this process (a restart re-runs __init__ only)")

    def version(self) -> int:
        """Version of the weights this worker samples with."""
        self._ready()
        return self._version

    def load_weights(self, version: int, state: PackedState) -> int:
        """Load a full state dict published as version `version` (pass the ObjectRef of ONE
        `ray.put(pack_state(...))`: Ray hands every worker the same shared-memory arrays)."""
        self._ready()
        if version < self._version:
            raise ValueError(f"{self.name}: refusing policy version {version}, older than the "
                             f"loaded version {self._version}")
        self.model.load_state_dict(unpack_state(state))  # copies out of the read-only arrays
        self._version = version
        return version

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits `(B, T, V)` float32 of a fixed input (for checks: same weights, same logits)."""
        self._ready()
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()

    @ray.method(max_task_retries=0)  # a retry would run on a restarted, un-set-up worker
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
        self._ready()
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
    """Driver-side handle of R `RolloutWorker`s named `{name_prefix}-{i}`. Build with `launch`.

    Args:
        workers: The worker actors, set up.
        names: Their names (for messages, as `nodes`: the node each was last set up on).
        max_regenerations: Times `collect` samples one lost shard again before it gives up
            (`RolloutLost`); 0: a lost shard raises Ray's error as it is.
        say: Where the one line per lost shard goes (default: this module's logger, WARNING).
        restart_timeout_s: How long a lost worker may take to come back (Ray restarts it when
            its bundle finds a node again) before the shard counts as lost for good.
    """

    def __init__(self, workers: list, names: Sequence[str] = (), max_regenerations: int = 3,
                 say: Callable[[str], None] | None = None, restart_timeout_s: float = 300.0):
        self.workers = workers
        self.names = list(names) or [f"worker {i}" for i in range(len(workers))]
        self.nodes = ["?"] * len(workers)
        self.max_regenerations, self.restart_timeout_s = max_regenerations, restart_timeout_s
        self.say = say if say is not None else log.warning
        self.weights: tuple[int, ray.ObjectRef] | None = None
        """The last published (version, ref): what a restarted worker loads again. The ref, not
        a copy: its owner (the driver, or the trainer that put it) keeps it alive while the
        group holds it. An owner lost with its node takes the weights along (`RolloutLost`
        then); a driver-owned copy would cost a full copy per publish, to save a campaign whose
        trainer is gone anyway."""

    @classmethod
    def launch(cls, num_workers: int, model_spec: ModelSpec, rollout_cfg: RolloutConfig,
               seed: int, ledger_url: str | None = None, campaign: str | None = None,
               name_prefix: str = "rollout", num_cpus: float = 1.0,
               max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
               scheduling: Sequence[PlacementGroupSchedulingStrategy] | None = None,
               max_restarts: int = 3, max_regenerations: int = 3,
               say: Callable[[str], None] | None = None,
               restart_timeout_s: float = 300.0) -> RolloutGroup:
        """Start R workers and load the version-0 policy in all of them at once.

        `scheduling` gives worker i its placement-group bundle (`loop.placement`); None lets
        Ray place them. Ray restarts a dead worker up to `max_restarts` times (in its bundle);
        see the class for `max_regenerations`, `say` and `restart_timeout_s`.
        """
        places = [None] * num_workers if scheduling is None else list(scheduling)
        if len(places) != num_workers:
            raise ValueError(f"{len(places)} scheduling strategies for {num_workers} workers")
        names = [f"{name_prefix}-{i}" for i in range(num_workers)]
        workers = [RolloutWorker.options(name=name, num_cpus=num_cpus, max_restarts=max_restarts,
                                         scheduling_strategy=place)
                   .remote(name, model_spec, rollout_cfg, seed, ledger_url, campaign,
                           max_text_chars)
                   for name, place in zip(names, places, strict=True)]
        group = cls(workers, names, max_regenerations=max_regenerations, say=say,
                    restart_timeout_s=restart_timeout_s)
        try:
            group.nodes = [info["node"] for info in ray.get([w.setup.remote() for w in workers])]
        except BaseException:
            group.shutdown()
            raise
        return group

    def publish(self, version: int,
                state: Mapping[str, torch.Tensor] | ray.ObjectRef) -> ray.ObjectRef:
        """Give every worker the weights of `version`; returns when all have loaded them.

        `state` is a state dict (packed and put here, once) or the ObjectRef of a `PackedState`
        that a trainer already put. Returns the ref every worker loaded. A worker that Ray
        restarted since the last call is set up again first.
        """
        ref = state if isinstance(state, ray.ObjectRef) else ray.put(pack_state(state))
        loading = [w.load_weights.remote(version, ref) for w in self.workers]
        for i, call in enumerate(loading):
            try:
                ray.get(call)
            except (RayActorError, WorkerNotReady) as err:
                self.say(f"rollout {self._where(i)} restarted ({_brief(err)}); setting it "
                         f"up again with policy v{version}")
                self._revive(i, (version, ref))
        self.weights = (version, ref)
        return ref

    def versions(self) -> list[int]:
        """The weight version of each worker."""
        return ray.get([w.version.remote() for w in self.workers])

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Each worker's logits `(B, T, V)` on the same input."""
        return ray.get([w.logits.remote(input_ids, attention_mask) for w in self.workers])

    def generate(self, prompts: Sequence[str], seed: int, sample_offset: int = 0) -> ShardRefs:
        """Split the prompts into R contiguous shards, one per worker (an empty shard is not
        sent); worker i samples with `shard_seed(seed, i)`. Returns one ObjectRef of a
        `RolloutBatch` per shard, in prompt order, as a `ShardRefs` (for `collect`)."""
        jobs = []
        for i in range(len(self.workers)):
            shard = rank_chunk(len(prompts), len(self.workers), i)
            if len(shard):
                jobs.append(ShardJob(i, tuple(prompts[j] for j in shard), shard_seed(seed, i),
                                     sample_offset, self.weights))
        return ShardRefs([self._submit(job) for job in jobs], jobs, self)

    @staticmethod
    def collect(refs: Sequence[ray.ObjectRef]) -> RolloutBatch:
        """Wait for the shards and join them into one batch (rows in prompt order).

        The shards of a `generate` call (`ShardRefs`) that were lost with their node or worker
        are sampled again by their group (at most `max_regenerations` times each); plain refs
        are only fetched.

        Raises:
            RolloutLost: A shard was lost more than `max_regenerations` times, or the weights to
                sample it again were lost too.
        """
        if isinstance(refs, ShardRefs):
            return concat_batches([refs.group._fetch(ref, job)
                                   for ref, job in zip(refs, refs.jobs, strict=True)])
        return concat_batches(ray.get(list(refs)))

    def shutdown(self) -> None:
        """Kill every worker and let go of the last weights (idempotent)."""
        for worker in self.workers:
            ray.kill(worker)
        self.workers, self.weights = [], None

    def _submit(self, job: ShardJob) -> ray.ObjectRef:
        return self.workers[job.shard].generate.remote(job.prompts, job.seed, job.sample_offset)

    def _fetch(self, ref: ray.ObjectRef, job: ShardJob) -> RolloutBatch:
        """Shard `job`'s batch; a lost one is sampled again on its restarted worker."""
        losses = 0
        while True:
            try:
                if losses:
                    ref = self._regenerate(job)
                return ray.get(ref)
            except LOSSES as err:
                if self.max_regenerations == 0:
                    raise
                losses += 1
                where, limit = self._where(job.shard), self.max_regenerations
                if losses > limit:
                    raise RolloutLost(
                        f"rollout shard {job.shard} ({where}, {len(job.prompts)} prompts, seed "
                        f"{job.seed}) was lost {losses} times, and max_regenerations={limit} "
                        f"allows {limit} regeneration(s); last: {_brief(err)}") from err
                self.say(f"rollout shard {job.shard} ({where}) lost: {_brief(err)}; sampling it "
                         f"again on the restarted worker ({losses}/{limit})")

    def _regenerate(self, job: ShardJob) -> ray.ObjectRef:
        """Sample shard `job` again on its restarted worker, with the weights it was asked with;
        a publish since then reaches the worker right after (an actor runs calls in order)."""
        self._revive(job.shard, job.weights)
        ref = self._submit(job)
        if self.weights is not None and self.weights != job.weights:
            self.workers[job.shard].load_weights.remote(*self.weights)
        return ref

    def _revive(self, i: int, weights: tuple[int, ray.ObjectRef] | None) -> None:
        """Set worker i up again after a restart: the version-0 policy, then `weights`.

        A call to an actor that Ray is still restarting fails at once (`ActorUnavailableError`,
        "the actor is restarting"): `setup` is tried again every `RESTART_POLL_S` until the
        worker is back or `restart_timeout_s` has passed. A call that was running when the actor
        died fails with `ActorDiedError` even if Ray restarts it; two in a row: it is dead."""
        worker, deadline = self.workers[i], time.monotonic() + self.restart_timeout_s
        died = False
        while True:
            try:
                self.nodes[i] = ray.get(worker.setup.remote())["node"]
                break
            except ActorDiedError as err:
                if died:
                    raise RolloutLost(
                        f"{self._where(i)} is dead and Ray will not restart it (max_restarts "
                        f"used up): {_brief(err)}") from err
                died = True
            except ActorUnavailableError as err:
                died = False
                if time.monotonic() > deadline:
                    raise RolloutLost(
                        f"{self._where(i)} did not come back within {self.restart_timeout_s:g} s "
                        f"(restart_timeout_s): {_brief(err)}; does its placement-group bundle "
                        "fit on a live node?") from err
            time.sleep(RESTART_POLL_S)
        if weights is None:
            return
        version, ref = weights
        try:
            ray.get(worker.load_weights.remote(version, ref))
        except ObjectLostError as err:
            raise RolloutLost(
                f"{self._where(i)} restarted and cannot load policy v{version} again: the "
                f"published weights were lost with their owner ({_brief(err)}); publish "
                "them again (the trainer that put them is gone)") from err

    def _where(self, i: int) -> str:
        return f"{self.names[i]} on node {self.nodes[i][:12]}"


def _brief(err: BaseException, limit: int = 200) -> str:
    """`ErrorType: first sentence of the message` of an error (of its cause, for an error
    raised inside a task), cut to `limit` characters."""
    if isinstance(err, RayTaskError) and err.cause is not None:
        err = err.cause
    first = str(err).strip().split("\n", 1)[0].split(". ", 1)[0]  # the first sentence
    return f"{type(err).__name__}: {first}"[:limit]
