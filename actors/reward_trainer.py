"""RewardTrainer: one data-parallel rank of a reward model trained under DeepSpeed ZeRO.

A group of W ranks trains ONE reward model with the Bradley–Terry loss
(`actors.core.bradley_terry`). The actor owns process state — the DeepSpeed engine, the
tokenizer, the gloo group — and calls the pure core for everything else. `RewardTrainerGroup`
is the driver-side handle: it starts the ranks, sets them up together, and fans each call out.

    group = RewardTrainerGroup.launch(2, model_spec, rm_cfg, seed=0)
    result = group.fit(ray.put(pairs))          # FitResult, rm/* and timing/rm_fit metrics
    metrics = group.evaluate(holdout_pairs)     # PairMetrics
    group.save("runs/x/rm/v3"); group.shutdown()
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import ray
import torch

from actors.core.bradley_terry import PairMetrics, bradley_terry_loss, pair_metrics
from actors.core.hh import PreferencePair
from actors.core.reward_model import build_reward_model, encode
from actors.dist import (
    deepspeed_config,
    epoch_batches,
    pick_free_port,
    rank_chunk,
    set_dist_env,
)

if TYPE_CHECKING:
    from loop.config import ModelSpec, RMConfig


@dataclass(frozen=True)
class StepMetrics:
    """One optimizer step, measured on the step's GLOBAL batch (all ranks' pairs).

    Attributes:
        loss: Bradley–Terry loss of the global batch (before the update).
        pairs: Accuracy, mean margin and ECE of the global batch (before the update).
    """

    loss: float
    pairs: PairMetrics

    def as_metrics(self) -> dict[str, float]:
        """`rm/loss`, `rm/accuracy`, `rm/mean_margin`, `rm/ece` for a metrics sink."""
        return {"rm/loss": self.loss, **self.pairs.as_metrics("rm/")}


@dataclass(frozen=True)
class FitResult:
    """What one `fit` call did, as seen by the whole group.

    Attributes:
        steps: Optimizer steps taken.
        mean_loss: Mean of the per-step global-batch losses.
        final_loss: Loss of the last step's global batch.
        metrics: Means over the steps of `rm/loss`, `rm/accuracy`, `rm/mean_margin`, `rm/ece`,
            plus `timing/rm_fit` (seconds) and `rm/pairs_per_s`.
        pairs_seen: Pairs trained on (steps × W × micro-batch).
        history: Per step, the sink-ready `StepMetrics.as_metrics()` dict (`rm/loss`, …).
    """

    steps: int
    mean_loss: float
    final_loss: float
    metrics: dict[str, float]
    pairs_seen: int
    history: tuple[dict[str, float], ...] = field(repr=False)


@ray.remote(num_cpus=1)
class RewardTrainer:
    """One rank. Call `setup` on all ranks of a group at once (they rendezvous)."""

    def __init__(self, rank: int, world_size: int, model_spec: ModelSpec, rm_cfg: RMConfig,
                 seed: int):
        self.rank, self.world_size = rank, world_size
        self.spec, self.cfg, self.seed = model_spec, rm_cfg, seed
        self.engine = None
        self.tokenizer = None

    def rendezvous(self) -> tuple[str, int]:
        """This node's IP and a free port on it: the group's MASTER_ADDR/PORT (asked of rank 0,
        so ranks on other nodes of a cluster can reach it)."""
        return ray.util.get_node_ip_address(), pick_free_port("")

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the gloo group and build the engine; returns the trainable parameter count."""
        import deepspeed  # heavy import (and a C++ op build): only in the actor process

        set_dist_env(self.rank, self.world_size, master_addr, master_port)
        deepspeed.init_distributed(dist_backend="gloo")
        model, self.tokenizer = build_reward_model(self.spec.name, self.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        config = deepspeed_config(self.cfg.micro_batch_size, self.cfg.zero_stage,
                                  bf16=self.spec.dtype == "bfloat16",
                                  max_grad_norm=self.cfg.max_grad_norm)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return sum(p.numel() for p in params)

    def info(self) -> dict[str, int]:
        """Placement facts for logs and benchmarks: rank, world size, ZeRO stage, torch threads."""
        return {"rank": self.rank, "world_size": self.world_size,
                "zero_stage": self.engine.zero_optimization_stage(),
                "threads": torch.get_num_threads()}

    def _rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        tokens = encode(self.tokenizer, prompts, responses, self.spec.max_length)
        return self.engine(tokens.input_ids, tokens.attention_mask)  # (N,)

    def _step(self, batch: list[PreferencePair]) -> StepMetrics:
        prompts = [p.prompt for p in batch]
        rewards = self._rewards(prompts * 2, [p.chosen for p in batch]
                                + [p.rejected for p in batch])  # (2B,) chosen then rejected
        r_chosen, r_rejected = rewards.chunk(2)  # (B,), (B,)
        margin = torch.tensor([p.margin for p in batch]) if self.cfg.margin else None
        loss = bradley_terry_loss(r_chosen, r_rejected, margin, self.cfg.label_smoothing)
        self.engine.backward(loss)
        self.engine.step()
        # The step's numbers over the GLOBAL batch: gather every rank's rewards and margins.
        local = torch.stack([r_chosen.detach(), r_rejected.detach(),
                             margin if margin is not None else torch.zeros_like(r_chosen)], 1)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        torch.distributed.all_gather(gathered, local)
        r_c, r_r, m = torch.cat(gathered).unbind(1)  # (W·B,) each
        global_loss = bradley_terry_loss(r_c, r_r, m if self.cfg.margin else None,
                                         self.cfg.label_smoothing)
        return StepMetrics(loss=float(global_loss), pairs=pair_metrics(r_c, r_r))

    def fit(self, pairs: list[PreferencePair], epochs: int,
            first_epoch: int = 0) -> list[StepMetrics]:
        """Train on this rank's shard of `pairs` for epochs first_epoch, first_epoch + 1, …"""
        self.engine.train()
        history: list[StepMetrics] = []
        t0 = time.perf_counter()
        for epoch in range(first_epoch, first_epoch + epochs):
            batches = epoch_batches(len(pairs), self.world_size, self.rank,
                                    self.cfg.micro_batch_size, self.seed, epoch)
            for step, index in enumerate(batches, 1):
                history.append(self._step([pairs[i] for i in index]))
                if self.rank == 0 and step % max(1, len(batches) // 10) == 0:
                    # a plain line: Ray forwards it to the driver's terminal and the job log
                    print(f"rm epoch {epoch} step {step}/{len(batches)} loss "
                          f"{history[-1].loss:.4f} ({time.perf_counter() - t0:.0f}s)",
                          flush=True)
        return history

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Rewards of this rank's chunk of the items (see `rank_chunk`), `(len(chunk),)`.

        Every rank runs the same number of forward passes (short chunks are padded with item 0),
        which ZeRO-3 needs: each forward all-gathers the partitioned parameters.
        """
        self.engine.eval()
        chunk = rank_chunk(len(prompts), self.world_size, self.rank)
        width = len(rank_chunk(len(prompts), self.world_size, 0))
        index = list(chunk) + [0] * (width - len(chunk))
        size = 2 * self.cfg.micro_batch_size
        out = [self._rewards([prompts[i] for i in index[s:s + size]],
                             [responses[i] for i in index[s:s + size]])
               for s in range(0, width, size)]
        return torch.cat(out)[:len(chunk)].float() if out else torch.empty(0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Rank 0: the full model state (ZeRO-3 parameters gathered); other ranks: {}."""
        import deepspeed

        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if self.rank != 0:
                return {}
            return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def save(self, directory: str) -> None:
        """Rank 0 writes the consolidated model + tokenizer (`RewardModel.save` layout)."""
        import deepspeed

        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if self.rank == 0:
                module.save(directory, self.tokenizer)


class RewardTrainerGroup:
    """Driver-side handle of W `RewardTrainer` ranks that train one reward model.

    Actors are named `{name_prefix}-{rank}`. Build with `launch`; always `shutdown`: the ranks
    hold a gloo group, and a rank left alive after its peers die waits on them forever.
    """

    def __init__(self, actors: list, rm_cfg: RMConfig):
        self.actors = actors
        self.cfg = rm_cfg
        self.epochs_done = 0

    @classmethod
    def launch(cls, world_size: int, model_spec: ModelSpec, rm_cfg: RMConfig, seed: int,
               name_prefix: str = "rm-trainer", num_cpus: float = 1.0) -> RewardTrainerGroup:
        """Start W ranks and set them up together (rank 0 picks the rendezvous port)."""
        actors = [RewardTrainer.options(name=f"{name_prefix}-{rank}", num_cpus=num_cpus)
                  .remote(rank, world_size, model_spec, rm_cfg, seed)
                  for rank in range(world_size)]
        group = cls(actors, rm_cfg)
        try:
            addr, port = ray.get(actors[0].rendezvous.remote())
            ray.get([a.setup.remote(addr, port) for a in actors])
        except BaseException:
            group.shutdown()
            raise
        return group

    def fit(self, pairs: ray.ObjectRef | list[PreferencePair],
            epochs: int | None = None) -> FitResult:
        """Train on the pairs for `epochs` (default `rm_cfg.epochs`) fresh shuffles.

        Each epoch takes len(pairs) // (W · micro_batch_size) steps (the incomplete last global
        batch is dropped); successive calls continue the epoch count, so shuffles never repeat.
        """
        epochs = self.cfg.epochs if epochs is None else epochs
        pairs_ref = pairs if isinstance(pairs, ray.ObjectRef) else ray.put(list(pairs))
        start = time.perf_counter()
        histories = ray.get([a.fit.remote(pairs_ref, epochs, self.epochs_done)
                             for a in self.actors])
        seconds = time.perf_counter() - start
        self.epochs_done += epochs
        history = tuple(step.as_metrics() for step in histories[0])  # rank 0's = every rank's
        seen = len(history) * len(self.actors) * self.cfg.micro_batch_size
        means = {k: statistics.fmean(h[k] for h in history) for k in history[0]} if history else {}
        metrics = {**means, "rm/pairs_per_s": seen / seconds, "timing/rm_fit": seconds}
        return FitResult(steps=len(history), mean_loss=means.get("rm/loss", float("nan")),
                         final_loss=history[-1]["rm/loss"] if history else float("nan"),
                         metrics=metrics, pairs_seen=seen, history=history)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Rewards `(N,)` float32 of N prompt/response pairs, split across the ranks."""
        prompts_ref, responses_ref = ray.put(list(prompts)), ray.put(list(responses))
        return torch.cat(ray.get([a.score.remote(prompts_ref, responses_ref)
                                  for a in self.actors]))

    def evaluate(self, pairs: Sequence[PreferencePair]) -> PairMetrics:
        """Accuracy, mean margin and ECE of the current model on `pairs`."""
        prompts = [p.prompt for p in pairs]
        rewards = self.score(prompts * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs])
        r_chosen, r_rejected = rewards.chunk(2)  # (N,), (N,)
        return pair_metrics(r_chosen, r_rejected)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full model state from rank 0 (ZeRO-3 parameters gathered on every rank)."""
        return ray.get([a.state_dict.remote() for a in self.actors])[0]

    def save(self, directory: str | Path) -> Path:
        """Write the consolidated model (`RewardModel.load` reads it); returns the directory."""
        ray.get([a.save.remote(str(directory)) for a in self.actors])
        return Path(directory)

    def shutdown(self) -> None:
        """Kill every rank (idempotent)."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
