"""Process RM on PRMBench: train MiniLM on step labels, score step-error F1 on the holdout.

Trains a `ProcessRewardModel` (MiniLM, 22.7M parameters + a linear head) with masked step BCE
for `--steps` AdamW steps of `--batch` solutions drawn from `prmbench/train` (the modified
processes with their wrong steps; `--with-original` adds the all-correct originals), inputs cut
from the left to `--max-length` tokens. The decision threshold on P(step wrong) is picked on a
validation slice of TRAIN (`--val` modified processes kept out of training), never on the
holdout. Defaults take ~4 minutes on 2 idle cores, ~8 when other jobs share them.

Evaluation: the modified processes of `prmbench/holdout` (default all 697; `--holdout N` takes N
evenly spaced in the loader's file/line order, so all eight error types), every labelled step. A
step whose marker was cut by `--eval-max-length` cannot be scored and counts as predicted
correct. Baselines on the same steps: all-wrong, all-correct, and random (wrong with
probability = the train base rate of wrong steps, seeded). The last line is
`RESULT f1=… baseline_f1=… …` (baseline = the best trivial one).

    .venv/bin/python bench/prm_eval.py            # ~4-8 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actors.core.prm_data import StepExample, load_prmbench  # noqa: E402
from actors.core.process_rm import (  # noqa: E402
    ProcessRewardModel,
    build_process_reward_model,
    encode_steps,
    masked_step_bce,
    step_error_f1,
)

DATA = REPO.parent / "shared" / "data" / "prmbench"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=8, help="solutions per step")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=192, help="training tokens per row")
    parser.add_argument("--eval-max-length", type=int, default=384)
    parser.add_argument("--val", type=int, default=64,
                        help="modified train processes held out to pick the threshold")
    parser.add_argument("--holdout", type=int, default=0,
                        help="holdout modified processes evaluated (0 = all 697)")
    parser.add_argument("--with-original", action="store_true",
                        help="also train on the all-correct original processes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


@torch.no_grad()
def wrong_probs(model: ProcessRewardModel, tokenizer, examples: list[StepExample],
                max_length: int, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`(N,)` P(wrong) over every labelled step (cut steps get 0), `(N,)` truth, #cut."""
    probs, truth, cut = [], [], 0
    for start in range(0, len(examples), batch):
        chunk = examples[start:start + batch]
        enc = encode_steps(tokenizer, chunk, max_length)
        logits = model(enc.input_ids, enc.attention_mask, enc.step_positions)  # (b, S)
        p_wrong = torch.where(enc.step_mask, 1 - torch.sigmoid(logits), 0.0)  # (b, S)
        for row, ex in enumerate(chunk):
            probs.append(p_wrong[row, :len(ex.steps)])
            truth.append(torch.tensor([label == 0 for label in ex.labels]))
            cut += len(ex.steps) - int(enc.step_mask[row].sum())
    return torch.cat(probs), torch.cat(truth), cut


def best_threshold(p_wrong: torch.Tensor, true_wrong: torch.Tensor) -> float:
    """The threshold on P(wrong) with the best step-error F1 (a grid of 0.05 … 0.95)."""
    grid = [i / 20 for i in range(1, 20)]
    return max(grid, key=lambda t: step_error_f1(p_wrong >= t, true_wrong).f1)


def train(model: ProcessRewardModel, tokenizer, pool: list[StepExample],
          args: argparse.Namespace) -> list[float]:
    rng = random.Random(args.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=args.lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(args.steps):
        enc = encode_steps(tokenizer, rng.sample(pool, args.batch), args.max_length)
        logits = model(enc.input_ids, enc.attention_mask, enc.step_positions)  # (B, S)
        loss = masked_step_bce(logits, enc.labels, enc.step_mask)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    return losses


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    modified = load_prmbench(DATA / "train", include_original=False)
    random.Random(args.seed).shuffle(modified)
    val, pool = modified[:args.val], modified[args.val:]
    if args.with_original:
        pool += [ex for ex in load_prmbench(DATA / "train") if 0 not in ex.labels]
    holdout = load_prmbench(DATA / "holdout", include_original=False)
    if args.holdout:  # evenly spaced, so all eight error types are in the subset
        holdout = holdout[::max(1, len(holdout) // args.holdout)][:args.holdout]
    train_steps = [label for ex in modified[args.val:] for label in ex.labels]
    base_rate = train_steps.count(0) / len(train_steps)
    print(f"train pool {len(pool)} examples, val {len(val)}, holdout {len(holdout)}; "
          f"train wrong-step rate (modified processes) {base_rate:.4f}", flush=True)

    model, tokenizer = build_process_reward_model("minilm", seed=args.seed)
    losses = train(model, tokenizer, pool, args)
    model.eval()
    trained_s = time.perf_counter() - started

    val_p, val_true, _ = wrong_probs(model, tokenizer, val, args.eval_max_length)
    threshold = best_threshold(val_p, val_true)
    p_wrong, true_wrong, cut = wrong_probs(model, tokenizer, holdout, args.eval_max_length)
    prm = step_error_f1(p_wrong >= threshold, true_wrong)
    generator = torch.Generator().manual_seed(args.seed)
    baselines = {
        "all_wrong": step_error_f1(torch.ones_like(true_wrong), true_wrong),
        "all_correct": step_error_f1(torch.zeros_like(true_wrong), true_wrong),
        "random": step_error_f1(torch.rand(true_wrong.shape, generator=generator) < base_rate,
                                true_wrong),
    }
    n, wrong = true_wrong.numel(), int(true_wrong.sum())
    print(f"holdout: {len(holdout)} solutions, {n} steps, {wrong} wrong "
          f"({wrong / n:.4f}), {cut} steps cut by truncation (counted as predicted correct)")
    print(f"threshold on P(wrong) from train-val: {threshold:.2f}")
    print(f"PRM: precision {prm.precision:.4f} recall {prm.recall:.4f} f1 {prm.f1:.4f}")
    for name, m in baselines.items():
        print(f"baseline {name}: precision {m.precision:.4f} recall {m.recall:.4f} "
              f"f1 {m.f1:.4f}")
    best = max(baselines, key=lambda k: baselines[k].f1)
    elapsed = time.perf_counter() - started
    print(f"RESULT f1={prm.f1:.4f} baseline_f1={baselines[best].f1:.4f} baseline={best} "
          f"precision={prm.precision:.4f} recall={prm.recall:.4f} "
          f"random_f1={baselines['random'].f1:.4f} "
          f"all_correct_f1={baselines['all_correct'].f1:.4f} "
          f"threshold={threshold:.2f} holdout_solutions={len(holdout)} holdout_steps={n} "
          f"holdout_wrong={wrong} cut_steps={cut} "
          f"train_steps={args.steps} batch={args.batch} "
          f"loss_first10={sum(losses[:10]) / 10:.4f} loss_last10={sum(losses[-10:]) / 10:.4f} "
          f"train_s={trained_s:.0f} total_s={elapsed:.0f}")


if __name__ == "__main__":
    main()
