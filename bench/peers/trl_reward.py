"""The TRL side of bench/rm_train.py: TRL's `RewardTrainer` on MiniLM and the HH train pairs.

Run in TRL's own environment (bench/peers/setup.sh); prints one line `PEER_JSON {...}` with the
training wall time, the pairs and real tokens it trained on, and its holdout rewards. The holdout
is scored with prefloop's `encode` (the same text and left truncation for both sides of the
benchmark), through TRL's trained `AutoModelForSequenceClassification`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from actors.core.backbones import minilm_dir  # noqa: E402
from actors.core.hh import load_hh_jsonl  # noqa: E402
from actors.core.reward_model import encode  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", required=True)
    parser.add_argument("--holdout", required=True)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa",
                        help="attention kernel (transformers' default: sdpa)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    with gzip.open(args.train, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle][:args.limit]
    data = Dataset.from_list([{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    model_dir = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.eos_token = tokenizer.sep_token  # BERT has no EOS; TRL needs one
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, attn_implementation=args.attention)
    config = RewardConfig(output_dir=args.out, use_cpu=True, report_to="none", bf16=args.bf16,
                          per_device_train_batch_size=args.batch, num_train_epochs=1,
                          max_length=args.max_length, learning_rate=args.lr, seed=args.seed,
                          save_strategy="no", logging_steps=10**6, dataloader_num_workers=0)
    trainer = RewardTrainer(model=model, args=config, train_dataset=data,
                            processing_class=tokenizer)
    trained = trainer.train_dataset
    real_tokens = sum(len(a) + len(b) for a, b in zip(trained["chosen_ids"],
                                                      trained["rejected_ids"], strict=True))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start

    holdout = load_hh_jsonl(Path(args.holdout))
    model = trainer.model.float().eval()
    rewards = []
    with torch.no_grad():
        for s in range(0, len(holdout), 32):
            batch = holdout[s:s + 32]
            tokens = encode(tokenizer, [p.prompt for p in batch] * 2,
                            [p.chosen for p in batch] + [p.rejected for p in batch],
                            args.max_length)
            scores = model(input_ids=tokens.input_ids,
                           attention_mask=tokens.attention_mask).logits[:, 0]
            chosen, rejected = scores.chunk(2)
            rewards += list(zip(chosen.tolist(), rejected.tolist(), strict=True))
    print("PEER_JSON " + json.dumps({
        "seconds": seconds, "pairs": len(trained), "pairs_offered": len(rows),
        "real_tokens": real_tokens, "holdout_rewards": rewards, "bf16": args.bf16,
        "attention": model.config._attn_implementation,
        "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
