"""The TRL side of bench/ppo.py: TRL 1.12's `PPOTrainer` on the same tiny GPT-2 and prompts.

Run in TRL's own environment (bench/peers/setup.sh trl-1.12 "trl==1.12.0"); prints one line
`PEER_JSON {...}` with the per-update wall times. TRL's `train()` loop interleaves generation
with the update, so the update of iteration k is timed from the end of its generation (a wrapper
around TRL's `batch_generation`) to its `on_step_end` callback: the reference/value/reward
forward passes, GAE and the PPO epochs — what prefloop's `PPOTrainer.update` does. TRL takes its
old log-probs from the generation logits, so that work falls in the untimed generation; prefloop
recomputes them in a forward pass inside its timed update.

The policy, value model (a separate critic: `AutoModelForSequenceClassification` on the
policy's weights, TRL's only option) and reward model are loaded from the directories bench/ppo.py
wrote; prompts arrive as token ids (exactly the ones prefloop's sampler builds).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch
import trl.experimental.ppo.ppo_trainer as trl_ppo
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
)
from trl.experimental.ppo import PPOConfig, PPOTrainer


class UpdateClock(TrainerCallback):
    """Per update: seconds from the end of its generation to the end of its optimizer steps."""

    def __init__(self) -> None:
        self.generated_at: float | None = None
        self.updates: list[float] = []
        self.generation: list[float] = []

    def wrap(self, generate):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = generate(*args, **kwargs)
            self.generated_at = time.perf_counter()
            self.generation.append(self.generated_at - start)
            return out
        return timed

    def on_step_end(self, args, state, control, **kwargs):
        self.updates.append(time.perf_counter() - self.generated_at)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reward", required=True)
    parser.add_argument("--prompts", required=True, help="JSON list of prompt token-id lists")
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with open(args.prompts, encoding="utf-8") as handle:
        prompts = json.load(handle)
    data = Dataset.from_dict({"input_ids": prompts})
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    tokenizer.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(args.policy)
    ref = AutoModelForCausalLM.from_pretrained(args.policy)
    value = AutoModelForSequenceClassification.from_pretrained(args.policy, num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1)
    config = PPOConfig(
        output_dir=args.out, use_cpu=True, report_to="none", seed=args.seed,
        learning_rate=args.lr, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=args.epochs,
        local_rollout_forward_batch_size=args.batch, response_length=args.response_length,
        total_episodes=args.batch * args.iterations, num_sample_generations=0,
        kl_coef=args.kl_coef, temperature=1.0, stop_token=None, missing_eos_penalty=None,
        save_strategy="no", logging_steps=10**6, dataloader_num_workers=0, bf16=False)
    clock = UpdateClock()
    trl_ppo.batch_generation = clock.wrap(trl_ppo.batch_generation)
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref,
                         reward_model=reward, value_model=value, train_dataset=data,
                         eval_dataset=data, callbacks=[clock])
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    tokens = args.batch * (len(prompts[0]) + args.response_length)
    print("PEER_JSON " + json.dumps({
        "update_seconds": clock.updates, "generation_seconds": clock.generation,
        "train_seconds": total, "tokens_per_update": tokens,
        "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
