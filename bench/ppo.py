"""PPO update throughput: prefloop's Ray + DeepSpeed `PPOTrainer` vs TRL's PPO, in one run.

Both sides train the same tiny GPT-2 policy (`tiny-gpt2`: 2 layers, width 128, MiniLM's 30,522
token vocabulary; saved to a directory both load) with the same work per update:

* batch 8 sequences, 48-token prompts (HH transcripts cut from the left by prefloop's sampler;
  TRL gets exactly those token ids), 32-token responses, temperature 1;
* 4 PPO epochs of one minibatch of 8, AdamW lr 1e-5, fixed KL coefficient 0.05, fp32;
* a separate critic (TRL's only option: a sequence-classification copy of the policy), a frozen
  reference, and the same reward model (a random 2-layer, width-64 GPT-2 scorer; prefloop scores
  decoded text re-tokenized, TRL the token ids).

What is timed is the UPDATE, not generation: prefloop's wall time around `PPOTrainerGroup.update`
(the Ray round trip, RM scoring, the π_old / π_ref / V forward passes, GAE, the epochs); TRL's
from the end of an iteration's generation to its `on_step_end` (bench/peers/trl_ppo.py). Both
report sequence tokens (8 × 80 = 640) per second of update.
TRL reads its old log-probs off the generation logits (untimed); prefloop recomputes them inside
its update.

A third side times the same update as a plain single-process torch loop over prefloop's core
functions, which shows what Ray + DeepSpeed cost on top; it is the peer of the RESULT line
(`peer=torch`) if TRL's environment cannot be built or run (`--peer torch` forces it).

The machine this runs on is shared, so the sides take turns: `--rounds` rounds, each side
running `--updates` timed updates per round, in an order that rotates every round; prefloop and
the torch loop stay warm between rounds (`--warmup` untimed updates first), TRL starts a new
process each round (and leaves out its own first `--warmup` updates). The log prints every
update's seconds and the load average. A side's rate in a round is 640 / its median update
seconds there; RESULT gives the median over rounds of the rates and of the per-round ratios.

    .venv/bin/python bench/ppo.py                        # ~6 minutes on 2 idle cores
    .venv/bin/python bench/ppo.py --rounds 1 --updates 3 # a quick look

Ends with `RESULT speedup_vs_peer=… peer=trl|torch tokens_per_s=… peer_tokens_per_s=…`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_worker_niceness", "0")  # Ray starts actors at nice 15: not vs a peer

import ray
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actors.core.hh import load_hh_jsonl  # noqa: E402
from actors.core.kl_control import FixedKLController  # noqa: E402
from actors.core.policy import load_policy  # noqa: E402
from actors.core.ppo_step import (  # noqa: E402
    build_experience,
    evaluate_rollout,
    policy_inputs,
    run_ppo_epochs,
    torch_step,
)
from actors.core.reward_model import build_reward_model, disable_dropout, encode  # noqa: E402
from actors.core.sampling import RolloutBatch, encode_prompts, generate  # noqa: E402
from actors.core.value_model import PolicyWithValue  # noqa: E402
from actors.core.weight_transport import pack_state  # noqa: E402
from actors.ppo_trainer import PPOTrainerGroup  # noqa: E402
from loop.config import EnsembleConfig, KLConfig, ModelSpec, PPOConfig  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "hh-rlhf"
TRL_SPEC = ("trl-1.12", "trl==1.12.0")
BATCH, PROMPT_TOKENS, RESPONSE_TOKENS = 8, 48, 32


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--updates", type=int, default=4, help="timed updates per side a round")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed updates first (TRL: in each of its processes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer", choices=("auto", "trl", "torch"), default="auto")
    return parser.parse_args()


def ppo_config(args) -> PPOConfig:
    return PPOConfig(zero_stage=2, lr=args.lr, epochs=args.epochs, minibatch_size=BATCH,
                     separate_critic=True, kl=KLConfig(controller="fixed", init_coef=0.05))


def write_models(root: Path, seed: int) -> tuple[Path, Path]:
    """The policy and reward-model directories both sides load."""
    policy, tokenizer = load_policy("tiny-gpt2", seed)
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, num_labels=1,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                        eos_token_id=tokenizer.sep_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        GPT2ForSequenceClassification(config).save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")
    return root / "policy", root / "reward"


def long_prompts(tokenizer, count: int) -> list[str]:
    """HH prompts whose rendered form has at least PROMPT_TOKENS tokens (so none is padded)."""
    pairs = load_hh_jsonl(DATA / "train.jsonl.gz", limit=4 * count)
    chosen = []
    for pair in pairs:
        ids, _ = encode_prompts(tokenizer, [pair.prompt])
        if ids.shape[1] >= PROMPT_TOKENS:
            chosen.append(pair.prompt)
        if len(chosen) == count:
            return chosen
    raise SystemExit(f"only {len(chosen)} HH prompts have {PROMPT_TOKENS} tokens")


def batches(policy_dir: Path, prompts: list[str], iterations: int) -> list[RolloutBatch]:
    policy, tokenizer = load_policy(str(policy_dir), 0)
    return [generate(policy, tokenizer, prompts[i * BATCH:(i + 1) * BATCH], 1, RESPONSE_TOKENS,
                     seed=i, max_prompt_tokens=PROMPT_TOKENS) for i in range(iterations)]


def trl_round(args, policy_dir: Path, reward_dir: Path, data: list[RolloutBatch],
              root: Path) -> list[float]:
    """One TRL process: `warmup + updates` updates; the seconds of those after the warmup."""
    python = subprocess.run(["bash", str(REPO / "bench/peers/setup.sh"), *TRL_SPEC],
                            check=True, capture_output=True, text=True).stdout.split()[-1]
    prompt_ids = [row.tolist() for b in data for row in b.prompt_ids]
    (root / "prompts.json").write_text(json.dumps(prompt_ids), encoding="utf-8")
    command = [python, str(REPO / "bench/peers/trl_ppo.py"), "--policy", str(policy_dir),
               "--reward", str(reward_dir), "--prompts", str(root / "prompts.json"),
               "--iterations", str(len(data)), "--batch", str(BATCH),
               "--response-length", str(RESPONSE_TOKENS), "--epochs", str(args.epochs),
               "--lr", str(args.lr), "--kl-coef", "0.05", "--seed", str(args.seed),
               "--threads", str(args.threads), "--out", str(root / "trl-out")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    line = next((x for x in done.stdout.splitlines() if x.startswith("PEER_JSON ")), None)
    if line is None:
        raise RuntimeError(f"TRL run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(line.removeprefix("PEER_JSON "))["update_seconds"][args.warmup:]


class Ours:
    """prefloop's `PPOTrainerGroup`: one rank, ZeRO-2, `--threads` CPUs; one warm actor."""

    def __init__(self, args, policy_dir: Path, reward_dir: Path):
        rm, _ = build_reward_model(str(reward_dir), args.seed)
        self.group = PPOTrainerGroup.launch(
            1, ModelSpec(name=str(policy_dir), max_length=128), ppo_config(args),
            EnsembleConfig(), args.seed, reward_spec=ModelSpec(name=str(reward_dir),
                                                                max_length=128),
            name_prefix="bench-ppo", num_cpus=args.threads)
        self.group.set_reward_model(1, ray.put(pack_state(rm.state_dict())))
        print(f"prefloop trainer: {self.group.info()[0]}", flush=True)

    def update(self, batch: RolloutBatch) -> float:
        """Wall seconds of one `update`, the Ray round trip included."""
        ref = ray.put(batch)
        start = time.perf_counter()
        self.group.update(ref)
        return time.perf_counter() - start


class TorchLoop:
    """The same update as a plain single-process torch loop over prefloop's core functions."""

    def __init__(self, args, policy_dir: Path, reward_dir: Path):
        self.cfg, self.seed, self.updates = ppo_config(args), args.seed, 0
        policy, _ = load_policy(str(policy_dir), args.seed)
        disable_dropout(policy)
        self.ref = copy.deepcopy(policy).eval().requires_grad_(False)
        self.model = PolicyWithValue(policy, separate_critic=True).train()
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr,
                                      fused=True)  # as PPOTrainer's
        self.step = torch_step(self.model, optimizer, self.cfg.max_grad_norm)
        self.rm, self.rm_tokenizer = build_reward_model(str(reward_dir), args.seed)
        self.rm.eval().requires_grad_(False)
        self.kl = FixedKLController(0.05)

    def update(self, batch: RolloutBatch) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            prompts = [batch.prompts[i] for i in batch.prompt_index.tolist()]
            tokens = encode(self.rm_tokenizer, prompts, list(batch.texts), 128)
            scores = self.rm(tokens.input_ids, tokens.attention_mask)
        inputs = policy_inputs(batch)
        exp = build_experience(inputs, evaluate_rollout(self.model, self.ref, inputs, BATCH),
                               scores, self.kl.value, self.cfg)
        run_ppo_epochs(self.model, exp, self.cfg, self.step, self.seed, self.updates)
        self.updates += 1
        return time.perf_counter() - start


def round_rates(rounds: list[list[float]], tokens: int) -> list[float]:
    """Tokens/s of each round: tokens per update / the round's median update seconds."""
    return [tokens / statistics.median(r) for r in rounds if r]


def run_rounds(args, policy_dir: Path, reward_dir: Path, data: list[RolloutBatch],
               root: Path) -> dict[str, list[list[float]]]:
    """`--rounds` rounds; in each, every side runs `--updates` timed updates, in an order that
    rotates from round to round, so a change in the machine's load hits all sides alike.
    Returns per side, per round, the seconds of each timed update."""
    torch.set_num_threads(args.threads)
    sides = {"torch": TorchLoop(args, policy_dir, reward_dir),
             "ours": Ours(args, policy_dir, reward_dir)}
    for side in sides.values():  # warm-up updates, not timed
        for batch in data[:args.warmup]:
            side.update(batch)
    want_trl = args.peer in ("auto", "trl")
    seconds: dict[str, list[list[float]]] = {"ours": [], "torch": [], "trl": []}
    names = ["trl", "torch", "ours"] if want_trl else ["torch", "ours"]
    for r in range(args.rounds):
        batches_r = data[args.warmup + r * args.updates:args.warmup + (r + 1) * args.updates]
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name == "trl":
                try:
                    seconds["trl"].append(trl_round(args, policy_dir, reward_dir,
                                                    data[:args.warmup] + batches_r, root))
                except (RuntimeError, subprocess.CalledProcessError) as err:
                    if args.peer == "trl":
                        raise
                    print(f"TRL unavailable ({str(err).splitlines()[0]}); the peer is the "
                          "torch loop", flush=True)
                    names.remove("trl")
                continue
            seconds[name].append([sides[name].update(batch) for batch in batches_r])
        print(f"round {r + 1}/{args.rounds} done; load average {os.getloadavg()[0]:.1f}",
              flush=True)
    return seconds


def main() -> None:
    args = parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="prefloop-bench-ppo-") as tmp:
        root = Path(tmp)
        policy_dir, reward_dir = write_models(root, args.seed)
        _, tokenizer = load_policy(str(policy_dir), args.seed)
        count = args.warmup + args.rounds * args.updates
        data = batches(policy_dir, long_prompts(tokenizer, BATCH * count), count)
        tokens = BATCH * (PROMPT_TOKENS + RESPONSE_TOKENS)
        assert all(b.sequences()[0].numel() == tokens for b in data), "a padded batch"
        ray.init(address="local", num_cpus=args.threads, include_dashboard=False,
                 log_to_driver=False)
        try:
            seconds = run_rounds(args, policy_dir, reward_dir, data, root)
        finally:
            ray.shutdown()
    report(args, tokens, seconds)


def report(args, tokens: int, seconds: dict[str, list[list[float]]]) -> None:
    """Per side the rate of each round; RESULT takes medians over rounds (of the rates, and of
    the per-round ratios: each ratio compares sides that ran minutes apart, not an hour)."""
    rates = {name: round_rates(rounds, tokens) for name, rounds in seconds.items()}
    for name, label in (("ours", "prefloop (Ray + DeepSpeed ZeRO-2)"),
                        ("torch", "plain torch loop (same core, no Ray/DeepSpeed)"),
                        ("trl", "TRL 1.12 PPOTrainer")):
        if rates[name]:
            per_round = " | ".join(" ".join(f"{x:.2f}" for x in r) for r in seconds[name])
            print(f"{label}: {statistics.median(rates[name]):.0f} tokens/s (median over rounds "
                  f"of {' '.join(f'{x:.0f}' for x in rates[name])}); update seconds by round "
                  f"[{per_round}]")
    peer = "trl" if rates["trl"] else "torch"
    ratios = [o / p for o, p in zip(rates["ours"], rates[peer], strict=False)]
    ours, peer_rate = statistics.median(rates["ours"]), statistics.median(rates[peer])
    print(f"load average at end: {os.getloadavg()}", flush=True)
    print(f"RESULT speedup_vs_peer={statistics.median(ratios):.3f} peer={peer} "
          f"tokens_per_s={ours:.0f} peer_tokens_per_s={peer_rate:.0f} "
          f"torch_loop_tokens_per_s={statistics.median(rates['torch']):.0f} "
          f"round_ratios={','.join(f'{r:.2f}' for r in ratios)} tokens_per_update={tokens} "
          f"epochs={args.epochs} threads={args.threads} rounds={len(ratios)} "
          f"updates_per_round={args.updates}")


if __name__ == "__main__":
    main()
