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
from transformers import PreTrainedTokenizerBase

from actors.core.backbones import pick_attention, set_attention
from actors.core.bradley_terry import PairMetrics, pair_metrics
from actors.core.ensemble import (
    bootstrap_bradley_terry_losses,
    bootstrap_counts,
    bootstrap_indices,
    build_multi_head_reward_model,
    combine,
)
from actors.core.hh import PreferencePair
from actors.core.reward_model import build_reward_model, encode, join_text
from actors.core.weight_transport import unpack_state
from actors.dist import (
    deepspeed_config,
    epoch_batches,
    pick_free_port,
    rank_chunk,
    set_dist_env,
)

if TYPE_CHECKING:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

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


def pair_lengths(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PreferencePair],
                 max_length: int) -> list[int]:
    """Per pair, the token length of its longer input (prompt + reply), capped at max_length:
    the padded width the pair needs in a batch."""
    texts = [join_text(tokenizer, p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)]
    counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False,
                                            verbose=False)["input_ids"]]
    return [min(max(counts[2 * i], counts[2 * i + 1]), max_length) for i in range(len(pairs))]


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
        """Join the process group and build the engine; returns the trainable parameter count.

        gloo on CPU; NCCL when the actor was given a GPU (Ray sets CUDA_VISIBLE_DEVICES).
        """
        import deepspeed  # heavy import (and a C++ op build): only in the actor process

        set_dist_env(self.rank, self.world_size, master_addr, master_port)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        members = self.cfg.ensemble.members
        model, self.tokenizer = (build_reward_model(self.spec.name, self.seed) if members == 1
                                 else build_multi_head_reward_model(self.spec.name, members,
                                                                    self.seed))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        set_attention(model.backbone, pick_attention(self.spec.attention,
                                                     getattr(torch, self.spec.dtype), device))
        params = [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel over ZeRO's flat fp32 partition instead of ~10 elementwise passes
        # (MiniLM bf16 on CPU: the optimizer step 112 -> 10 ms of a ~1 s step)
        optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                      fused=True)
        config = deepspeed_config(self.cfg.micro_batch_size, self.cfg.zero_stage,
                                  bf16=self.spec.dtype == "bfloat16",
                                  max_grad_norm=self.cfg.max_grad_norm)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return sum(p.numel() for p in params)

    def info(self) -> dict[str, int | str]:
        """Placement facts for logs and benchmarks: rank, world size, ZeRO stage, torch threads,
        compute dtype and attention kernel."""
        module = self.engine.module
        return {"rank": self.rank, "world_size": self.world_size,
                "zero_stage": self.engine.zero_optimization_stage(),
                "threads": torch.get_num_threads(),
                "dtype": str(next(module.parameters()).dtype).removeprefix("torch."),
                "attention": module.backbone.config._attn_implementation}

    def _rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """`(K, N)` member rewards (K = 1 for a single RM)."""
        tokens = encode(self.tokenizer, prompts, responses, self.spec.max_length)
        device = self.engine.device
        rewards = self.engine(tokens.input_ids.to(device), tokens.attention_mask.to(device))
        return rewards.view(-1, len(prompts)).float()

    def _step(self, batch: list[PreferencePair], counts: torch.Tensor) -> StepMetrics:
        """One update on this rank's micro-batch; `counts` `(K, B)` are the bootstrap counts
        times label weights of its pairs."""
        prompts = [p.prompt for p in batch]
        rewards = self._rewards(prompts * 2, [p.chosen for p in batch]
                                + [p.rejected for p in batch])  # (K, 2B) chosen then rejected
        r_chosen, r_rejected = rewards.chunk(2, dim=1)  # (K, B) each
        margin = (torch.tensor([p.margin for p in batch], device=rewards.device)
                  if self.cfg.margin else None)
        counts = counts.to(rewards.device)
        loss = bootstrap_bradley_terry_losses(r_chosen, r_rejected, counts, margin,
                                              self.cfg.label_smoothing).sum()
        self.engine.backward(loss)
        self.engine.step()
        # The step's numbers over the GLOBAL batch: gather every rank's rewards, margins, counts.
        zero = torch.zeros_like(r_chosen[:1])
        local = torch.cat([r_chosen.detach(), r_rejected.detach(), counts.to(r_chosen.dtype),
                           margin[None] if margin is not None else zero])  # (3K + 1, B)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        torch.distributed.all_gather(gathered, local)
        k = r_chosen.shape[0]
        r_c, r_r, c, m = torch.cat(gathered, dim=1).cpu().split([k, k, k, 1])  # (K, W·B) ×3
        m = m[0]  # (W·B,)
        global_loss = bootstrap_bradley_terry_losses(
            r_c, r_r, c, m if self.cfg.margin else None, self.cfg.label_smoothing).sum()
        how = self.cfg.ensemble
        return StepMetrics(loss=float(global_loss),
                           pairs=pair_metrics(combine(r_c, how.combine, how.k),
                                              combine(r_r, how.combine, how.k)))

    def _lengths(self, pairs: list[PreferencePair]) -> list[int] | None:
        """Token lengths for length-grouped batches (None: grouping off)."""
        if self.cfg.bucket_window < 2:
            return None
        return pair_lengths(self.tokenizer, pairs, self.spec.max_length)

    def _pair_counts(self, pairs: list[PreferencePair], bootstrap_seed: int) -> torch.Tensor:
        """`(K, n)`: how often member k drew pair i (all ones for K = 1) × each pair's weight."""
        members, n = self.cfg.ensemble.members, len(pairs)
        draws = (torch.ones(1, n) if members == 1
                 else bootstrap_counts(bootstrap_indices(n, members, bootstrap_seed), n).float())
        return draws * torch.tensor([p.weight for p in pairs])  # (K, n)

    def fit(self, pairs: list[PreferencePair], epochs: int, first_epoch: int = 0,
            bootstrap_seed: int = 0) -> list[StepMetrics]:
        """Train on this rank's shard of `pairs` for epochs first_epoch, first_epoch + 1, …"""
        self.engine.train()
        history: list[StepMetrics] = []
        lengths, counts = self._lengths(pairs), self._pair_counts(pairs, bootstrap_seed)
        t0 = time.perf_counter()
        for epoch in range(first_epoch, first_epoch + epochs):
            batches = epoch_batches(len(pairs), self.world_size, self.rank,
                                    self.cfg.micro_batch_size, self.seed, epoch, lengths,
                                    self.cfg.bucket_window)
            for step, index in enumerate(batches, 1):
                history.append(self._step([pairs[i] for i in index], counts[:, index]))
                if self.rank == 0 and step % max(1, len(batches) // 10) == 0:
                    # a plain line: Ray forwards it to the driver's terminal and the job log
                    print(f"rm epoch {epoch} step {step}/{len(batches)} loss "
                          f"{history[-1].loss:.4f} ({time.perf_counter() - t0:.0f}s)",
                          flush=True)
        return history

    def load_state(self, packed) -> None:
        """Replace the model's weights (every rank gets the full state) and start a fresh
        optimizer: what a warm start from the serving RM needs. `packed` is
        `weight_transport.pack_state` output (the object store's zero-copy form)."""
        import deepspeed

        state = unpack_state(packed)
        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
            module.load_state_dict(state)
        if hasattr(self.engine.optimizer, "refresh_fp32_params"):
            self.engine.optimizer.refresh_fp32_params()  # ZeRO keeps fp32 master copies
        base = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        base.state.clear()  # Adam moments and step counts restart, as in a fresh engine

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """`(K, len(chunk))` member rewards of this rank's chunk of the items (`rank_chunk`).

        Every rank runs the same number of forward passes (short chunks are padded with item 0),
        which ZeRO-3 needs: each forward all-gathers the partitioned parameters.
        """
        self.engine.eval()
        chunk = rank_chunk(len(prompts), self.world_size, self.rank)
        width = len(rank_chunk(len(prompts), self.world_size, 0))
        index = list(chunk) + [0] * (width - len(chunk))
        size = 2 * self.cfg.micro_batch_size
        out = [self._rewards([prompts[i] for i in index[s:s + size]],
                             [responses[i] for i in index[s:s + size]]).cpu()
               for s in range(0, width, size)]
        members = self.cfg.ensemble.members
        return torch.cat(out, dim=1)[:, :len(chunk)] if out else torch.empty(members, 0)

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
               name_prefix: str = "rm-trainer", num_cpus: float = 1.0,
               num_gpus: float = 0.0,
               scheduling: Sequence[PlacementGroupSchedulingStrategy] | None = None
               ) -> RewardTrainerGroup:
        """Start W ranks and set them up together (rank 0 picks the rendezvous port). With
        `num_gpus` > 0 each rank trains on its GPU and the group talks NCCL. `scheduling`
        gives rank i its placement-group bundle (`loop.placement`); None lets Ray place them."""
        places = [None] * world_size if scheduling is None else list(scheduling)
        if len(places) != world_size:
            raise ValueError(f"{len(places)} scheduling strategies for {world_size} ranks")
        actors = [RewardTrainer.options(name=f"{name_prefix}-{rank}", num_cpus=num_cpus,
                                        num_gpus=num_gpus, scheduling_strategy=place)
                  .remote(rank, world_size, model_spec, rm_cfg, seed)
                  for rank, place in enumerate(places)]
        group = cls(actors, rm_cfg)
        try:
            addr, port = ray.get(actors[0].rendezvous.remote())
            ray.get([a.setup.remote(addr, port) for a in actors])
        except BaseException:
            group.shutdown()
            raise
        return group

    def fit(self, pairs: ray.ObjectRef | list[PreferencePair], epochs: int | None = None,
            bootstrap_seed: int = 0) -> FitResult:
        """Train on the pairs for `epochs` (default `rm_cfg.epochs`) fresh shuffles.

        Each epoch takes len(pairs) // (W · micro_batch_size) steps (the incomplete last global
        batch is dropped); successive calls continue the epoch count, so shuffles never repeat.
        Ensemble members (rm.ensemble.members > 1) train on bootstrap resamples of `pairs`
        drawn with `bootstrap_seed`.
        """
        epochs = self.cfg.epochs if epochs is None else epochs
        pairs_ref = pairs if isinstance(pairs, ray.ObjectRef) else ray.put(list(pairs))
        start = time.perf_counter()
        histories = ray.get([a.fit.remote(pairs_ref, epochs, self.epochs_done, bootstrap_seed)
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

    def load_state(self, packed: ray.ObjectRef) -> None:
        """Warm start: every rank takes the weights of `packed` (an ObjectRef of
        `weight_transport.pack_state` output, e.g. the serving RM's), a fresh optimizer and
        epoch 0's shuffle — so what follows equals a new group started from those weights."""
        ray.get([a.load_state.remote(packed) for a in self.actors])
        self.epochs_done = 0  # a warm start is a new training run from those weights

    def score_members(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """`(K, N)` float32 member rewards of N prompt/response pairs, split across the ranks."""
        prompts_ref, responses_ref = ray.put(list(prompts)), ray.put(list(responses))
        return torch.cat(ray.get([a.score.remote(prompts_ref, responses_ref)
                                  for a in self.actors]), dim=1)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """`(N,)` float32 rewards: the members combined as rm.ensemble says (K = 1: the RM)."""
        how = self.cfg.ensemble
        return combine(self.score_members(prompts, responses), how.combine, how.k)

    def evaluate(self, pairs: Sequence[PreferencePair]) -> PairMetrics:
        """Accuracy, mean margin and ECE of the current (combined) model on `pairs`."""
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
