"""Reward-model training throughput: the DeepSpeed ZeRO trainer actor vs plain torch.

Both train MiniLM (22.7M parameters) with the Bradley–Terry loss on real HH train pairs —
max_length 256, micro-batch 8 pairs (16 sequences), AdamW, gradient clipping 1.0, fp32 — on
EXACTLY the same batches from the same initial weights (lr: the `RMConfig` default, untuned):

* DeepSpeed: a `RewardTrainerGroup` of one rank (ZeRO stage `--zero-stage`), in its own Ray
  actor process with `--threads` CPUs; a window is one `group.fit` call, timed in the driver, so
  the Ray round trip and the object-store transfer of the pairs count against it.
* peer: a plain torch loop over the same `RewardModel` in this process, `torch.set_num_threads`
  equal to the actor's.

Windows alternate (DeepSpeed, torch, DeepSpeed, …) so load from other processes on the machine
hits both alike; pairs/s is the median over `--windows` timed windows after one warm-up window.
Afterwards the DeepSpeed model trains `--extra-steps` more steps and is scored on the holdout
pairs (evaluation only). The last line is `RESULT ratio_vs_torch=… pairs_per_s=… …`.

    .venv/bin/python bench/rm_train.py            # ~5-6 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actors.core.bradley_terry import bradley_terry_loss  # noqa: E402
from actors.core.hh import PreferencePair, load_hh_jsonl  # noqa: E402
from actors.core.reward_model import RewardModel, build_reward_model, encode  # noqa: E402
from actors.dist import epoch_batches  # noqa: E402
from actors.reward_trainer import RewardTrainerGroup  # noqa: E402
from loop.config import ModelSpec, RMConfig  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "hh-rlhf"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per timed window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows (median taken)")
    parser.add_argument("--extra-steps", type=int, default=60,
                        help="further DeepSpeed steps before the holdout evaluation")
    parser.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


class TorchPeer:
    """The same model, loss, optimizer and batches, without DeepSpeed or Ray."""

    def __init__(self, model: RewardModel, tokenizer, spec: ModelSpec, cfg: RMConfig, seed: int):
        self.model, self.tokenizer, self.spec, self.cfg, self.seed = (
            model, tokenizer, spec, cfg, seed)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.epoch = 0

    def fit(self, pairs: list[PreferencePair]) -> None:
        """One epoch over `pairs`, batched exactly as a one-rank `RewardTrainerGroup.fit`."""
        self.model.train()
        for index in epoch_batches(len(pairs), 1, 0, self.cfg.micro_batch_size, self.seed,
                                   self.epoch):
            batch = [pairs[i] for i in index]
            tokens = encode(self.tokenizer, [p.prompt for p in batch] * 2,
                            [p.chosen for p in batch] + [p.rejected for p in batch],
                            self.spec.max_length)
            r_chosen, r_rejected = self.model(tokens.input_ids, tokens.attention_mask).chunk(2)
            loss = bradley_terry_loss(r_chosen, r_rejected)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
            self.optimizer.step()
        self.epoch += 1


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_windows(group: RewardTrainerGroup, peer: TorchPeer,
                 windows: list[list[PreferencePair]]) -> tuple[list[float], list[float]]:
    """Alternate DeepSpeed and torch windows on the same pairs; pairs/s of each timed window."""
    ds_rates, torch_rates = [], []
    for k, pairs in enumerate(windows):  # window 0 warms both up
        ref = ray.put(pairs)
        ds_s = timed(lambda ref=ref: group.fit(ref, epochs=1))
        torch_s = timed(lambda pairs=pairs: peer.fit(pairs))
        print(f"window {k}{' (warm-up)' if k == 0 else ''}: deepspeed {ds_s:.2f}s "
              f"torch {torch_s:.2f}s", flush=True)
        if k:
            ds_rates.append(len(pairs) / ds_s)
            torch_rates.append(len(pairs) / torch_s)
    return ds_rates, torch_rates


def same_model_gap(group: RewardTrainerGroup, peer: TorchPeer,
                   pairs: list[PreferencePair]) -> float:
    """max |r_deepspeed − r_torch| on a few texts: both trained on the same batches."""
    prompts, responses = [p.prompt for p in pairs], [p.chosen for p in pairs]
    ds_r = group.score(prompts, responses)
    tokens = encode(peer.tokenizer, prompts, responses, peer.spec.max_length)
    with torch.no_grad():
        peer_r = peer.model.eval()(tokens.input_ids, tokens.attention_mask)
    return (ds_r - peer_r).abs().max().item()


def main() -> None:
    args = parse_args()
    spec = ModelSpec(name="minilm", max_length=256)
    cfg = RMConfig(zero_stage=args.zero_stage, micro_batch_size=8)  # default lr, untuned
    per_window = args.steps * cfg.micro_batch_size
    train = load_hh_jsonl(DATA / "train.jsonl.gz")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    train = [train[i] for i in order.tolist()]
    windows = [train[k * per_window:(k + 1) * per_window] for k in range(args.windows + 1)]
    extra = train[len(windows) * per_window:][:args.extra_steps * cfg.micro_batch_size]
    holdout = load_hh_jsonl(DATA / "holdout.jsonl.gz")  # evaluation only

    ray.init(address="local", num_cpus=args.threads, include_dashboard=False,
             log_to_driver=False)
    torch.set_num_threads(args.threads)
    group = RewardTrainerGroup.launch(1, spec, cfg, seed=args.seed, name_prefix="bench-rm",
                                      num_cpus=args.threads)
    try:
        info = ray.get(group.actors[0].info.remote())
        peer = TorchPeer(*build_reward_model(spec.name, args.seed), spec, cfg, args.seed)
        print(f"MiniLM RM, max_length {spec.max_length}, micro-batch {cfg.micro_batch_size} "
              f"pairs, lr {cfg.lr}, {args.steps} steps/window; actor {info}, driver threads "
              f"{torch.get_num_threads()}", flush=True)
        ds_rates, torch_rates = time_windows(group, peer, windows)
        print(f"same batches, same init: max |r_deepspeed - r_torch| on 8 holdout texts = "
              f"{same_model_gap(group, peer, holdout[:8]):.2e}", flush=True)
        seen = sum(map(len, windows)) + (group.fit(extra, epochs=1).pairs_seen if extra else 0)
        eval_s = time.perf_counter()
        metrics = group.evaluate(holdout)
        print(f"holdout after {seen} training pairs: accuracy {metrics.accuracy:.3f} "
              f"mean_margin {metrics.mean_margin:.3f} ece {metrics.ece:.3f} ({metrics.n} "
              f"pairs, {time.perf_counter() - eval_s:.0f}s)", flush=True)
    finally:
        group.shutdown()
        ray.shutdown()
    ds_med, torch_med = statistics.median(ds_rates), statistics.median(torch_rates)
    print(f"RESULT ratio_vs_torch={ds_med / torch_med:.3f} pairs_per_s={ds_med:.2f} "
          f"torch_pairs_per_s={torch_med:.2f} holdout_accuracy={metrics.accuracy:.3f} "
          f"holdout_pairs={metrics.n} train_pairs={seen} zero_stage={cfg.zero_stage} "
          f"threads={args.threads} windows={len(ds_rates)} steps_per_window={args.steps}")


if __name__ == "__main__":
    main()
