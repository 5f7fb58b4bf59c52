"""Rollout throughput: a Ray `RolloutWorker` vs plain HF `generate`, same model, same batch.

Both sample SmolLM2-135M-Instruct (fp32 by default; the PyPI GGUF, dequantized) on the same HH
train prompts — `--prompts` prompts × `--samples` samples, `--max-new-tokens` new tokens, prompts
cut to `max_length − max_new_tokens` tokens, temperature 1, top-p 1, no top-k — under the same
seed, so they draw the same tokens (checked: the responses are compared):

* Ray: a `RolloutGroup` of one worker with `--threads` CPUs (torch threads), weights published
  to it through the object store; a window is `group.collect(group.generate(prompts, seed))`
  timed in the driver, so the Ray round trip, chat-template rendering, tokenization, the
  logprob bookkeeping and the ledger writes (SQLite in a temporary directory) count against it.
* peer: `model.generate(do_sample=True, top_k=0, num_return_sequences=K)` in this process with
  `torch.set_num_threads(--threads)`, plus the same prompt encoding and response decoding.

Ray runs its workers at nice 15 by default; here the worker runs at nice 0 like the driver
(`RAY_worker_niceness=0`), so other processes on a shared machine slow both sides alike. Windows
alternate (Ray first, then HF first, …) so that load hits both alike too; tokens/s (sampled
tokens up to and including EOS, padding excluded) is the median over `--windows` timed windows
after one warm-up window, each window on fresh prompts. The worker can beat the peer: the K
samples of a prompt share one prefill (HF prefills every sample), and its decode loop runs no
logits processors. The last line is `RESULT ratio_vs_hf=… tokens_per_s=… hf_tokens_per_s=…`.

    .venv/bin/python bench/rollout.py            # ~3 minutes on 2 cores (2 × ~20-30 s loading)
    .venv/bin/python bench/rollout.py --model tiny-gpt2 --windows 3    # ~1 minute
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray starts worker processes at nice 15; on a shared machine they would then lose CPU to the
# peer in this (nice 0) process. Compare the two at the same priority.
os.environ.setdefault("RAY_worker_niceness", "0")

import ray
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actors.core.hh import load_hh_jsonl  # noqa: E402
from actors.core.policy import load_policy  # noqa: E402
from actors.core.sampling import encode_prompts, stop_token_ids  # noqa: E402
from actors.rollout import RolloutGroup, shard_seed  # noqa: E402
from loop.config import ModelSpec, RolloutConfig  # noqa: E402
from storage.ledger import Ledger  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "hh-rlhf"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="policy name (models.policy.name)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--prompts", type=int, default=4, help="prompts per window")
    parser.add_argument("--samples", type=int, default=2, help="samples per prompt (K)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=256, help="prompt + response tokens")
    parser.add_argument("--windows", type=int, default=5, help="timed windows (median taken)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


class HFPeer:
    """Plain HF `generate` on the same weights, prompts and sampling settings."""

    def __init__(self, model, tokenizer, cfg: RolloutConfig, max_prompt_tokens: int):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.max_prompt_tokens = max_prompt_tokens
        self.eos = list(stop_token_ids(model, tokenizer))

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int) -> tuple[list[str], int]:
        """Responses (cut at the first EOS) and their token count, EOS included."""
        ids, mask = encode_prompts(self.tokenizer, prompts, self.max_prompt_tokens)
        torch.manual_seed(seed)
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=self.cfg.top_p,
            temperature=self.cfg.temperature, num_return_sequences=self.cfg.samples_per_prompt,
            max_new_tokens=self.cfg.max_new_tokens, eos_token_id=self.eos,
            pad_token_id=self.tokenizer.pad_token_id)[:, ids.shape[1]:]
        texts, tokens = [], 0
        for row in out.tolist():
            stop = next((i for i, t in enumerate(row) if t in self.eos), len(row) - 1)
            tokens += stop + 1
            texts.append(self.tokenizer.decode(row[:stop + 1], skip_special_tokens=True).strip())
        return texts, tokens


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def time_windows(group: RolloutGroup, peer: HFPeer, windows: list[list[str]], seed: int
                 ) -> tuple[list[float], list[float], int, int]:
    """Alternate Ray and HF windows; tokens/s of each timed window, identical responses."""
    ray_rates, hf_rates, same, rows = [], [], 0, 0
    for k, prompts in enumerate(windows):  # window 0 warms both up
        window_seed = seed * 1000 + k

        def run_ray(prompts=prompts, window_seed=window_seed):
            return RolloutGroup.collect(group.generate(prompts, window_seed))

        def run_hf(prompts=prompts, window_seed=window_seed):
            return peer.generate(prompts, shard_seed(window_seed, 0))  # worker 0's seed

        if k % 2 == 0:
            batch, ray_s = timed(run_ray)
            (texts, hf_tokens), hf_s = timed(run_hf)
        else:
            (texts, hf_tokens), hf_s = timed(run_hf)
            batch, ray_s = timed(run_ray)
        same += sum(a == b for a, b in zip(batch.texts, texts, strict=True))
        rows += len(texts)
        print(f"window {k}{' (warm-up)' if k == 0 else ''}: ray {batch.response_tokens} tokens "
              f"{ray_s:.2f}s, hf {hf_tokens} tokens {hf_s:.2f}s", flush=True)
        if k:
            ray_rates.append(batch.response_tokens / ray_s)
            hf_rates.append(hf_tokens / hf_s)
    return ray_rates, hf_rates, same, rows


def main() -> None:
    args = parse_args()
    spec = ModelSpec(name=args.model, dtype=args.dtype, max_length=args.max_length)
    cfg = RolloutConfig(samples_per_prompt=args.samples, max_new_tokens=args.max_new_tokens)
    prompts = list(dict.fromkeys(p.prompt for p in load_hh_jsonl(DATA / "train.jsonl.gz")))
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed))
    prompts = [prompts[i] for i in order.tolist()]
    windows = [prompts[k * args.prompts:(k + 1) * args.prompts] for k in range(args.windows + 1)]

    tmp = tempfile.TemporaryDirectory(prefix="bench-rollout-")
    ledger = Ledger.open(f"sqlite:///{Path(tmp.name) / 'ledger.sqlite'}")
    ledger.ensure_campaign("bench")
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False,
             log_to_driver=False)
    torch.set_num_threads(args.threads)
    group = None
    try:
        load_s = time.perf_counter()
        group = RolloutGroup.launch(1, spec, cfg, seed=args.seed, ledger_url=ledger.url,
                                    campaign="bench", name_prefix="bench-rollout",
                                    num_cpus=args.threads)
        worker_load_s = time.perf_counter() - load_s
        (model, tokenizer), driver_load_s = timed(
            lambda: load_policy(spec.name, args.seed, spec.dtype))
        info = ray.get(group.workers[0].info.remote())
        _, publish_s = timed(lambda: group.publish(1, model.state_dict()))
        print(f"{spec.name} {spec.dtype}: {info['params'] / 1e6:.1f}M params; load worker "
              f"{worker_load_s:.1f}s driver {driver_load_s:.1f}s; publish (one ray.put, "
              f"worker load_state_dict) {publish_s:.2f}s; batch {args.prompts} prompts x "
              f"{args.samples} samples, {args.max_new_tokens} new tokens, max_length "
              f"{spec.max_length}; worker {info}, driver threads {torch.get_num_threads()}",
              flush=True)
        peer = HFPeer(model, tokenizer, cfg, spec.max_length - cfg.max_new_tokens)
        ray_rates, hf_rates, same, rows = time_windows(group, peer, windows, args.seed)
    finally:
        if group is not None:
            group.shutdown()
        ray.shutdown()
        tmp.cleanup()
    ray_med, hf_med = statistics.median(ray_rates), statistics.median(hf_rates)
    print(f"RESULT ratio_vs_hf={ray_med / hf_med:.3f} tokens_per_s={ray_med:.1f} "
          f"hf_tokens_per_s={hf_med:.1f} model={spec.name} dtype={spec.dtype} "
          f"rows={args.prompts * args.samples} max_new_tokens={args.max_new_tokens} "
          f"identical_responses={same}/{rows} threads={args.threads} windows={len(ray_rates)} "
          f"publish_s={publish_s:.2f}")


if __name__ == "__main__":
    main()
