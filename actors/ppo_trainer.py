"""PPOTrainer: one data-parallel rank of the policy + value model trained with PPO under ZeRO.

A group of W ranks trains ONE `PolicyWithValue` (`actors.core.value_model`) with clipped PPO
against a frozen reference policy, scoring rollouts with the serving reward model (or a
programmatic reward function). The actor owns process state — the DeepSpeed engine, the
reference model, the reward model, the KL controller — and calls `actors.core.ppo_step` for the
math. `PPOTrainerGroup` is the driver-side handle.

    ppo = PPOTrainerGroup.from_config(cfg, num_cpus=1)
    ppo.set_reward_model(rm.version, rm.weights)   # ObjectRef of pack_state(RM state)
    result = ppo.update(ray.put(batch))            # PPOResult: ppo/* + timing/ppo_update
    ref = ppo.publish(version)                     # ObjectRef for RolloutGroup.publish
    ppo.shutdown()

One update: every rank scores and evaluates (π_old, π_ref, V_old) its contiguous chunk of the
batch; the chunks are all-gathered so each rank builds the same `Experience` (rewards, GAE,
whitening over the whole batch); then `ppo.epochs` × minibatches of `ppo.minibatch_size` rows,
each rank training on its share (`run_ppo_epochs`). β is updated once per batch.

A batch whose `policy_version` is older than the trainer's last published version (the loop's
overlapped rollout samples one version behind) is trained with decoupled PPO: its advantages are
weighted per token by min(π_old / π_sampler, `ppo.stale_is_cap`) (`truncated_is_weights`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import ray
import torch

from actors.core.ensemble import EnsembleSettings, combine
from actors.core.kl_control import make_kl_controller
from actors.core.policy import load_policy
from actors.core.ppo_math import masked_mean, truncated_is_weights
from actors.core.ppo_step import (
    Experience,
    PolicyInputs,
    RolloutEval,
    build_experience,
    evaluate_rollout,
    policy_inputs,
    run_ppo_epochs,
    update_metrics,
)
from actors.core.reward_model import disable_dropout
from actors.core.rm_scoring import build_scorer, reward_members, score_texts
from actors.core.sampling import RolloutBatch
from actors.core.value_model import PolicyWithValue
from actors.core.weight_transport import PackedState, pack_state, unpack_state
from actors.dist import deepspeed_config, pick_free_port, rank_chunk, set_dist_env

if TYPE_CHECKING:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from loop.config import Config, ModelSpec, PPOConfig

RewardFn = Callable[[RolloutBatch], torch.Tensor]
"""A programmatic reward: a rollout batch → `(N,)` sequence rewards (e.g. `TokenRangeReward`)."""


@dataclass(frozen=True)
class RewardScores:
    """Rewards of N rollout rows, stamped with the reward model that gave them.

    Attributes:
        rm_version: Version of the reward model (or reward function) that scored.
        rewards: `(N,)` float32, the members combined as `rm.ensemble` says.
        members: `(K, N)` float32 member rewards (K = 1 for a single RM).
    """

    rm_version: int
    rewards: torch.Tensor
    members: torch.Tensor


@dataclass(frozen=True)
class PPOResult:
    """What one `update` did.

    Attributes:
        metrics: Means over the optimizer steps of `ppo/policy_loss`, `ppo/value_loss`,
            `ppo/entropy`, `ppo/approx_kl`, `ppo/clipfrac`, `ppo/vf_clipfrac`,
            `ppo/explained_variance`, `ppo/kl_coef`; the batch's `ppo/mean_reward`,
            `ppo/mean_kl`, `ppo/mean_non_score_reward`, `ppo/mean_response_tokens`,
            `ppo/sampler_logprob_gap`; `ppo/rm_version`, `ppo/tokens_per_s` (real tokens of the
            batch per second of update) and `timing/ppo_update` (seconds). A stale batch adds
            `ppo/staleness` (versions behind), `ppo/is_weight_mean` and `ppo/is_capped_frac`
            (share of tokens whose weight hit the cap).
        rewards: `(N,)` float32 sequence rewards of the batch rows (before KL shaping).
        rm_version: Version of the reward model that scored them.
        history: Per optimizer step, the global minibatch's `PPOStats.as_metrics()`.
    """

    metrics: dict[str, float]
    rewards: torch.Tensor
    rm_version: int
    history: tuple[dict[str, float], ...] = field(repr=False)


@ray.remote(num_cpus=1)
class PPOTrainer:
    """One rank. Call `setup` on all ranks of a group at once (they rendezvous)."""

    def __init__(self, rank: int, world_size: int, policy_spec: ModelSpec, ppo_cfg: PPOConfig,
                 ensemble: EnsembleSettings, seed: int, reward_spec: ModelSpec | None = None):
        self.rank, self.world_size = rank, world_size
        self.spec, self.cfg, self.ensemble, self.seed = policy_spec, ppo_cfg, ensemble, seed
        self.reward_spec = reward_spec
        self.engine = self.ref = self.tokenizer = self.kl = None
        self.rm = self.rm_tokenizer = self.rm_built_for = self.reward_fn = None
        self.rm_version: int | None = None
        self.updates = self.published = 0

    def rendezvous(self) -> tuple[str, int]:
        """This node's IP and a free port on it (asked of rank 0)."""
        return ray.util.get_node_ip_address(), pick_free_port("")

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the process group, load the policy, build the engine; returns the trainable
        parameter count."""
        import deepspeed

        set_dist_env(self.rank, self.world_size, master_addr, master_port)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        policy, self.tokenizer = load_policy(self.spec.name, self.seed, self.spec.dtype)
        disable_dropout(policy)  # deterministic forward passes: ratio 1 at an update's start
        self.ref = copy.deepcopy(policy).eval().requires_grad_(False)
        model = PolicyWithValue(policy, self.cfg.separate_critic).train()
        params = [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel instead of ~10 elementwise passes over the parameters
        # (SmolLM2-135M on 2 CPU cores: 0.44 -> 0.06 s per optimizer step)
        optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, fused=True)
        config = deepspeed_config(self.cfg.minibatch_size // self.world_size,
                                  self.cfg.zero_stage, bf16=self.spec.dtype == "bfloat16",
                                  max_grad_norm=self.cfg.max_grad_norm)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.kl = make_kl_controller(self.cfg.kl)
        return sum(p.numel() for p in params)

    def info(self) -> dict[str, int]:
        """Rank, world size, ZeRO stage, torch threads, updates done, last published version."""
        return {"rank": self.rank, "world_size": self.world_size,
                "zero_stage": self.engine.zero_optimization_stage(),
                "threads": torch.get_num_threads(), "updates": self.updates,
                "published": self.published}

    def set_reward_model(self, version: int, packed: PackedState, model_spec: ModelSpec) -> None:
        """Score with RM `version` from now on: the architecture of `model_spec` (K heads when
        the state holds a `(K, H)` head) with the weights of `packed` (`pack_state` output)."""
        state = unpack_state(packed)
        members = reward_members(state)
        if members != self.ensemble.members:
            raise ValueError(f"RM v{version} has {members} member head(s) but "
                             f"rm.ensemble.members is {self.ensemble.members}")
        if self.rm_built_for != (model_spec, members):  # a refresh reuses the architecture
            self.rm, self.rm_tokenizer = build_scorer(model_spec.name, members, self.seed,
                                                      model_spec.dtype)
            self.rm_built_for = (model_spec, members)
        self.rm.load_state_dict(state)  # copies out of the read-only shared-memory arrays
        self.reward_spec, self.rm_version, self.reward_fn = model_spec, version, None

    def set_reward_fn(self, version: int, fn: RewardFn) -> None:
        """Score with a programmatic reward (K = 1) from now on, stamped `version`."""
        self.reward_fn, self.rm_version = fn, version

    def score_members(self, batch: RolloutBatch, rows: Sequence[int] | None = None
                      ) -> torch.Tensor:
        """`(K, len(rows))` float32 member rewards of `rows` (default: this rank's chunk)."""
        if self.rm_version is None:
            raise RuntimeError("the PPO trainer has no reward model yet: call set_reward_model")
        rows = list(rank_chunk(batch.num_rows, self.world_size, self.rank) if rows is None
                    else rows)
        if not rows:
            return torch.empty(self.ensemble.members, 0)
        if self.reward_fn is not None:
            return self.reward_fn(batch).float()[rows].unsqueeze(0)
        prompts = [batch.prompts[i] for i in batch.prompt_index[rows].tolist()]
        return score_texts(self.rm, self.rm_tokenizer, prompts, [batch.texts[i] for i in rows],
                           self.reward_spec.max_length, self.cfg.minibatch_size)

    def score(self, batch: RolloutBatch) -> tuple[int, torch.Tensor]:
        """The RM version and `(K, chunk)` member rewards of this rank's chunk of the rows."""
        return self.rm_version, self.score_members(batch)

    def _gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's chunk rows (each padded to one width) joined in rank order: `(n, …)`."""
        if self.world_size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, local.contiguous())
        return torch.cat([p[:len(rank_chunk(n, self.world_size, r))]
                          for r, p in enumerate(parts)])

    def _evaluate(self, batch: RolloutBatch, inputs: PolicyInputs
                  ) -> tuple[RolloutEval, torch.Tensor]:
        """π_old, π_ref, V_old and `(K, N)` member scores of all rows, computed chunk-wise.

        Every rank evaluates the same number of rows (short chunks repeat a row): ZeRO-3
        all-gathers parameters in each forward pass, so all ranks must run the same passes."""
        n = inputs.num_rows
        chunk = list(rank_chunk(n, self.world_size, self.rank))
        width = len(rank_chunk(n, self.world_size, 0))
        index = chunk + [chunk[0] if chunk else 0] * (width - len(chunk))
        local = evaluate_rollout(self.engine, self.ref, inputs.rows(index),
                                 chunk=self.cfg.minibatch_size)
        stacked = torch.stack([local.logprobs, local.ref_logprobs, local.values], 1)
        full = self._gather_rows(stacked, n)  # (N, 3, Tr)
        scores = self._gather_rows(self.score_members(batch, index).T.contiguous(), n).T
        return RolloutEval(*full.unbind(1)), scores  # scores (K, N)

    def update(self, batch: RolloutBatch) -> PPOResult:
        """One PPO update on the batch (every rank gets the same batch)."""
        start = time.perf_counter()
        self.engine.train()
        inputs = policy_inputs(batch)
        evaluated, members = self._evaluate(batch, inputs)
        scores = combine(members, self.ensemble.combine, self.ensemble.k)  # (N,)
        exp = build_experience(inputs, evaluated, scores, self.kl.value, self.cfg,
                               sampler_logprobs=batch.logprobs)
        # the weights are the last published version: the loop publishes after every update
        stale = batch.policy_version is not None and batch.policy_version < self.published
        exp, stale_metrics = self._decouple(exp, batch) if stale else (exp, {})

        def step(loss: torch.Tensor) -> None:
            self.engine.backward(loss)
            self.engine.step()

        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            torch.distributed.all_reduce(t)
            return t

        history = run_ppo_epochs(self.engine, exp, self.cfg, step, self.seed, self.updates,
                                 self.world_size, self.rank,
                                 all_reduce if self.world_size > 1 else None)
        self.kl.update(float(exp.kl.mean()), exp.num_rows)
        self.updates += 1
        seconds = time.perf_counter() - start
        metrics = update_metrics(exp, history) | stale_metrics | {
            "ppo/rm_version": float(self.rm_version),
            "ppo/tokens_per_s": float(inputs.attention_mask.sum()) / seconds,
            "timing/ppo_update": seconds}
        return PPOResult(metrics=metrics, rewards=scores, rm_version=self.rm_version,
                         history=tuple(s.as_metrics() for s in history))

    def _decouple(self, exp: Experience, batch: RolloutBatch
                  ) -> tuple[Experience, dict[str, float]]:
        """A batch sampled by an older policy version: each token's advantage weighted by
        w = min(π_old / π_sampler, c), the decoupled-PPO correction (`truncated_is_weights`;
        a fixed w ≥ 0 multiplies the clipped term exactly as it multiplies A)."""
        mask = exp.inputs.response_mask  # (N, Tr)
        cap = self.cfg.stale_is_cap
        weights = truncated_is_weights(exp.old_logprobs, batch.logprobs, mask, cap)  # (N, Tr)
        return replace(exp, advantages=exp.advantages * weights), {
            "ppo/staleness": float(self.published - batch.policy_version),
            "ppo/is_weight_mean": float(masked_mean(weights, mask)),
            "ppo/is_capped_frac": float(masked_mean((weights >= cap).float(), mask))}

    def _gathered(self):
        import deepspeed

        params = list(self.engine.module.parameters())
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def publish(self, version: int) -> ray.ObjectRef | None:
        """Rank 0: `ray.put(pack_state(policy state))` (ZeRO-3 parameters gathered on every
        rank first); other ranks: None."""
        self.published = version
        with self._gathered():
            if self.rank != 0:
                return None
            return ray.put(pack_state(self.engine.module.policy_state_dict()))

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The policy's logits `(B, T, V)` float32 on a fixed input (as `RolloutWorker.logits`)."""
        with self._gathered():
            policy = self.engine.module.policy
            return policy(input_ids=input_ids, attention_mask=attention_mask).logits.float()

    def state_dict(self) -> dict:
        """What a checkpoint needs besides the engine: the KL controller and the update count."""
        return {"kl": self.kl.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`."""
        self.kl.load_state_dict(state["kl"])
        self.updates = int(state["updates"])

    def save_checkpoint(self, directory: str) -> None:
        """DeepSpeed checkpoint (weights, optimizer) with `state_dict()` as client state."""
        self.engine.save_checkpoint(directory, tag="ppo", client_state=self.state_dict())

    def load_checkpoint(self, directory: str) -> None:
        """Restore what `save_checkpoint` wrote."""
        _, client = self.engine.load_checkpoint(directory, tag="ppo")
        self.load_state_dict(client)

    def save_policy(self, directory: str) -> None:
        """Rank 0 writes the policy (`save_pretrained`) and its tokenizer: a `load_policy` path."""
        with self._gathered():
            if self.rank == 0:
                self.engine.module.policy.save_pretrained(directory)
                self.tokenizer.save_pretrained(directory)


class PPOTrainerGroup:
    """Driver-side handle of W `PPOTrainer` ranks named `{name_prefix}-{rank}`.

    Build with `launch` (or `from_config`); always `shutdown`: a rank left alive after its
    peers die waits on them forever.
    """

    def __init__(self, actors: list, ensemble: EnsembleSettings,
                 reward_spec: ModelSpec | None):
        self.actors = actors
        self.ensemble = ensemble
        self.reward_spec = reward_spec

    @classmethod
    def launch(cls, world_size: int, policy_spec: ModelSpec, ppo_cfg: PPOConfig,
               ensemble: EnsembleSettings, seed: int, reward_spec: ModelSpec | None = None,
               name_prefix: str = "ppo-trainer", num_cpus: float = 1.0,
               scheduling: Sequence[PlacementGroupSchedulingStrategy] | None = None
               ) -> PPOTrainerGroup:
        """Start W ranks and set them up together (rank 0 picks the rendezvous port).
        `scheduling` gives rank i its placement-group bundle (`loop.placement`); None lets Ray
        place them."""
        places = [None] * world_size if scheduling is None else list(scheduling)
        if len(places) != world_size:
            raise ValueError(f"{len(places)} scheduling strategies for {world_size} ranks")
        actors = [PPOTrainer.options(name=f"{name_prefix}-{rank}", num_cpus=num_cpus,
                                     scheduling_strategy=place)
                  .remote(rank, world_size, policy_spec, ppo_cfg, ensemble, seed, reward_spec)
                  for rank, place in enumerate(places)]
        group = cls(actors, ensemble, reward_spec)
        try:
            addr, port = ray.get(actors[0].rendezvous.remote())
            ray.get([a.setup.remote(addr, port) for a in actors])
        except BaseException:
            group.shutdown()
            raise
        return group

    @classmethod
    def from_config(cls, cfg: Config, num_cpus: float = 1.0, world_size: int = 1,
                    name_prefix: str = "ppo-trainer",
                    scheduling: Sequence[PlacementGroupSchedulingStrategy] | None = None
                    ) -> PPOTrainerGroup:
        """`launch` with the campaign's sections: models.policy, ppo, rm.ensemble,
        models.reward, campaign.seed."""
        return cls.launch(world_size, cfg.models.policy, cfg.ppo, cfg.rm.ensemble,
                          cfg.campaign.seed, cfg.models.reward, name_prefix, num_cpus,
                          scheduling)

    def info(self) -> list[dict[str, int]]:
        """Each rank's `info()`."""
        return ray.get([a.info.remote() for a in self.actors])

    def set_reward_model(self, version: int, weights: ray.ObjectRef,
                         model_spec: ModelSpec | None = None) -> None:
        """Score with RM `version`: `weights` is the ObjectRef of its `pack_state` weights (e.g.
        `ServingRM.weights`); `model_spec` defaults to the `reward_spec` given at launch."""
        spec = model_spec or self.reward_spec
        if spec is None:
            raise ValueError("set_reward_model needs the RM's model_spec (none given at launch)")
        ray.get([a.set_reward_model.remote(version, weights, spec) for a in self.actors])

    def set_reward_fn(self, version: int, fn: RewardFn) -> None:
        """Score with a programmatic reward function instead of an RM."""
        ray.get([a.set_reward_fn.remote(version, fn) for a in self.actors])

    def score(self, batch: RolloutBatch | ray.ObjectRef) -> RewardScores:
        """The batch's rewards (members combined as rm.ensemble says), split across the ranks
        and stamped with the version of the reward model that gave them."""
        ref = batch if isinstance(batch, ray.ObjectRef) else ray.put(batch)
        parts = ray.get([a.score.remote(ref) for a in self.actors])
        members = torch.cat([m for _, m in parts], dim=1)  # (K, N)
        return RewardScores(rm_version=parts[0][0], members=members,
                            rewards=combine(members, self.ensemble.combine, self.ensemble.k))

    def score_members(self, batch: RolloutBatch | ray.ObjectRef) -> torch.Tensor:
        """`(K, N)` float32 member rewards of the batch rows (for disagreement selection)."""
        return self.score(batch).members

    def update(self, batch: ray.ObjectRef | RolloutBatch) -> PPOResult:
        """One PPO update (ppo.epochs × minibatches) on the batch; rank 0's `PPOResult`."""
        ref = batch if isinstance(batch, ray.ObjectRef) else ray.put(batch)
        return ray.get([a.update.remote(ref) for a in self.actors])[0]

    def publish(self, version: int) -> ray.ObjectRef:
        """The policy's weights as ONE `ray.put(pack_state(...))` ObjectRef, for
        `RolloutGroup.publish(version, ref)`."""
        return ray.get([a.publish.remote(version) for a in self.actors])[0]

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The trained policy's logits `(B, T, V)` on a fixed input."""
        return ray.get([a.logits.remote(input_ids, attention_mask) for a in self.actors])[0]

    def state_dict(self) -> dict:
        """KL controller state and update count (`{"kl": {"value": β}, "updates": n}`)."""
        return ray.get(self.actors[0].state_dict.remote())

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` on every rank."""
        ray.get([a.load_state_dict.remote(state) for a in self.actors])

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Engine (weights + optimizer) and `state_dict()` into `directory`."""
        ray.get([a.save_checkpoint.remote(str(directory)) for a in self.actors])
        return Path(directory)

    def load_checkpoint(self, directory: str | Path) -> None:
        """Resume from `save_checkpoint`'s directory."""
        ray.get([a.load_checkpoint.remote(str(directory)) for a in self.actors])

    def save_policy(self, directory: str | Path) -> Path:
        """The policy as a `load_policy`-able directory (for the weight store)."""
        ray.get([a.save_policy.remote(str(directory)) for a in self.actors])
        return Path(directory)

    def shutdown(self) -> None:
        """Kill every rank (idempotent)."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
