"""Batched sampling from any HF causal LM, with the logprob of every sampled token.

The distribution. At response step t of row i the policy's raw logits z (float32, no processor
applied) define the temperature-T policy

    π_T(· | x, y_<t) = softmax(z / T)

`RolloutBatch.logprobs[i, t] = log π_T(y_t | x, y_<t)`: the log_softmax of z / T at the sampled
token — exactly what PPO recomputes from a forward pass (`recompute_logprobs`). The token itself
is drawn from π_T restricted to the top-p nucleus and renormalized; the logprob is NOT
renormalized over the nucleus (with top_p = 1, the default, the two coincide). There is no top-k,
repetition penalty, or any other processor, whatever the model's `generation_config` says.

The loop. Prompts are rendered (the tokenizer's chat template, else "User: …\\nAssistant:"),
tokenized, cut from the LEFT to `max_prompt_tokens` and left-padded. One prefill runs over the P
prompts; its KV cache is repeated K times, so the K samples of a prompt share their prefill; then
one decode step per token for all N = P·K rows (row i·K + k is sample k of prompt i). A row stops
at its first EOS (which is part of the response, masked 1, with its logprob: stopping is an
action), and is fed padding afterwards; the loop ends when every row has stopped or after
`max_new_tokens`. Position ids count real tokens only (`cumsum(mask) − 1`), so left padding
shifts nothing: a trainer recomputing logprobs must pass the same positions (as
`recompute_logprobs` does). Under one seed the tokens are those of HF `generate(do_sample=True,
top_k=0, temperature=T, top_p=top_p, num_return_sequences=K)` under `torch.manual_seed(seed)`
(tested on CPU fp32; on an H100 identical in fp32, 99.99% of tokens in bf16, where rounding can
differ); the RNG state of the caller is left untouched.

>>> from actors.core.policy import load_policy  # doctest: +SKIP
>>> model, tok = load_policy("tiny-gpt2", seed=0)  # doctest: +SKIP
>>> batch = generate(model, tok, ["hi", "bye"], 2, max_new_tokens=8, seed=0)  # doctest: +SKIP
>>> batch.response_ids.shape, batch.prompt_index.tolist()  # doctest: +SKIP
(torch.Size([4, 8]), [0, 0, 1, 1])
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from actors.core.hh import transcript_messages


@dataclass(frozen=True)
class RolloutBatch:
    """N = P·K sampled responses to P prompts (K per prompt), row i·K + k = sample k of prompt i.

    Attributes:
        prompts: `(P,)` the prompt strings as given (before any chat template).
        prompt_index: `(N,)` int64, the prompt of each row (index into `prompts`).
        sample_index: `(N,)` int64, k of each row, in [0, K).
        prompt_ids: `(N, Tp)` int64 rendered prompt tokens, LEFT padded with `pad_token_id`.
        prompt_mask: `(N, Tp)` int64, 1 on prompt tokens, 0 on padding.
        response_ids: `(N, Tr)` int64 sampled tokens, RIGHT padded; Tr ≤ max_new_tokens.
        response_mask: `(N, Tr)` int64, 1 on response tokens up to and including the first EOS.
        logprobs: `(N, Tr)` float32, log softmax(z / T) at each sampled token; 0 on padding.
        ended: `(N,)` bool, True where the response stopped at an EOS (not at the token limit).
        texts: `(N,)` decoded responses (special tokens dropped, whitespace stripped).
        temperature: T of the logprobs and of the sampling.
        top_p: Nucleus mass of the sampling (not of the logprobs).
        pad_token_id: The padding token of `prompt_ids` and `response_ids`.
        policy_version: Version of the weights that sampled (set by the rollout worker).
        generation_ids: `(N,)` ledger ids of the rows (None where a row was not written, e.g.
            an empty response), set by a rollout worker that writes to the ledger.
        worker: Name of the worker that sampled.
    """

    prompts: tuple[str, ...]
    prompt_index: torch.Tensor
    sample_index: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ended: torch.Tensor
    texts: tuple[str, ...]
    temperature: float
    top_p: float
    pad_token_id: int
    policy_version: int | None = None
    generation_ids: tuple[int | None, ...] | None = None
    worker: str | None = None

    @property
    def num_rows(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def response_tokens(self) -> int:
        """Sampled tokens, EOS included, padding excluded."""
        return int(self.response_mask.sum())

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt ⊕ response: `input_ids` and `attention_mask`, both `(N, Tp + Tr)`."""
        return (torch.cat([self.prompt_ids, self.response_ids], 1),
                torch.cat([self.prompt_mask, self.response_mask], 1))

    def metrics(self) -> dict[str, float]:
        """`rollout/` metrics: samples, mean response and prompt tokens, EOS share, mean
        per-token logprob."""
        tokens = max(self.response_tokens, 1)
        return {"rollout/samples": float(self.num_rows),
                "rollout/response_tokens_mean": self.response_tokens / max(self.num_rows, 1),
                "rollout/prompt_tokens_mean": float(self.prompt_mask.sum(1).float().mean()),
                "rollout/eos_fraction": float(self.ended.float().mean()),
                "rollout/logprob_mean": float(self.logprobs.sum()) / tokens}


def concat_batches(batches: Sequence[RolloutBatch]) -> RolloutBatch:
    """One batch from several (e.g. the shards of R workers), rows in order.

    Prompts are re-padded on the left and responses on the right to the widest shard;
    `prompt_index` is shifted to index the joined `prompts`. `generation_ids` are kept when every
    shard has them; `worker` when all shards come from one worker.

    Raises:
        ValueError: If the shards differ in temperature, top_p, pad token or policy version.
    """
    if not batches:
        raise ValueError("concat_batches needs at least one batch")
    first = batches[0]
    for key in ("temperature", "top_p", "pad_token_id", "policy_version"):
        values = {getattr(b, key) for b in batches}
        if len(values) > 1:
            raise ValueError(f"cannot join rollout batches with different {key}: {values}")
    tp = max(b.prompt_ids.shape[1] for b in batches)
    tr = max(b.response_ids.shape[1] for b in batches)
    pad = first.pad_token_id

    def left(t: torch.Tensor, value: int) -> torch.Tensor:  # (n, w) → (n, tp)
        return torch.nn.functional.pad(t, (tp - t.shape[1], 0), value=value)

    def right(t: torch.Tensor, value: float) -> torch.Tensor:  # (n, w) → (n, tr)
        return torch.nn.functional.pad(t, (0, tr - t.shape[1]), value=value)

    offsets = [0]
    for b in batches[:-1]:
        offsets.append(offsets[-1] + len(b.prompts))
    ids = [b.generation_ids for b in batches]
    workers = {b.worker for b in batches}
    return RolloutBatch(
        prompts=tuple(p for b in batches for p in b.prompts),
        prompt_index=torch.cat([b.prompt_index + o for b, o in zip(batches, offsets,
                                                                     strict=True)]),
        sample_index=torch.cat([b.sample_index for b in batches]),
        prompt_ids=torch.cat([left(b.prompt_ids, pad) for b in batches]),
        prompt_mask=torch.cat([left(b.prompt_mask, 0) for b in batches]),
        response_ids=torch.cat([right(b.response_ids, pad) for b in batches]),
        response_mask=torch.cat([right(b.response_mask, 0) for b in batches]),
        logprobs=torch.cat([right(b.logprobs, 0.0) for b in batches]),
        ended=torch.cat([b.ended for b in batches]),
        texts=tuple(t for b in batches for t in b.texts),
        temperature=first.temperature, top_p=first.top_p, pad_token_id=pad,
        policy_version=first.policy_version,
        generation_ids=None if any(i is None for i in ids) else tuple(x for i in ids for x in i),
        worker=first.worker if len(workers) == 1 else None)


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text the policy continues: the chat template with a generation prompt where the
    tokenizer has one, else "User: …\\nAssistant: …\\nUser: …\\nAssistant:". HH transcripts
    ("\\n\\nHuman: … \\n\\nAssistant:") become turns; any other prompt is one user turn.

    >>> class Plain: chat_template = None
    >>> render_prompt(Plain(), "\\n\\nHuman: hi\\n\\nAssistant: yo\\n\\nHuman: bye\\n\\nAssistant:")
    'User: hi\\nAssistant: yo\\nUser: bye\\nAssistant:'
    """
    messages = transcript_messages(prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
             for m in messages]
    return "\n".join([*turns, "Assistant:"])


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts BEFORE a text (a BOS, BERT's [CLS]); never the ones
    after it (BERT's [SEP] is our tiny model's EOS: a prompt must not end with it)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                   max_prompt_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Render, tokenize, cut from the LEFT and left-pad P prompts.

    A chat template supplies its own special tokens; otherwise the tokenizer's prefix specials
    (`special_prefix`) come first.

    Returns:
        `input_ids` `(P, Tp)` int64 padded with the pad token, `attention_mask` `(P, Tp)` int64.
    """
    templated = bool(getattr(tokenizer, "chat_template", None))
    prefix = [] if templated else special_prefix(tokenizer)
    texts = [render_prompt(tokenizer, p) for p in prompts]
    rows = [prefix + ids for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    if max_prompt_tokens is not None:
        rows = [row[-max_prompt_tokens:] for row in rows]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
    return ids, mask


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """EOS ids: the tokenizer's EOS plus those of the model's generation config."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list | tuple) else [configured])
    return tuple(sorted(i for i in ids if i is not None))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] along the last axis: `(..., V)`, `(...)` → `(...)` float32."""
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """`scores` `(N, V)` with every token outside the top-p nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches `top_p`: a
    token is dropped when the tokens ranked above it already hold `top_p` of the mass.
    """
    if top_p >= 1.0:
        return scores
    ranked, order = scores.sort(-1, descending=True)  # (N, V)
    probs = ranked.softmax(-1)
    mass_above = probs.cumsum(-1) - probs  # (N, V), 0 for the top token: it always stays
    drop = (mass_above >= top_p).scatter(-1, order, mass_above >= top_p)
    return scores.masked_fill(drop, float("-inf"))


def _response_mask(response: torch.Tensor, eos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # 1 up to and including the first EOS. By position, not by pad id: pad may equal EOS.
    is_eos = torch.isin(response, eos).long()  # (N, Tr)
    mask = (is_eos.cumsum(1) - is_eos) == 0
    return mask.long(), is_eos.any(1).bool()


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
             samples_per_prompt: int, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, *, max_prompt_tokens: int | None = None,
             eos_token_ids: Sequence[int] | None = None) -> RolloutBatch:
    """Sample K responses per prompt (see the module docstring for the exact distribution).

    Args:
        model: Any HF causal LM (eval mode: dropout would make the logprobs noisy).
        tokenizer: Its tokenizer, with a pad token.
        prompts: P prompt strings (HH transcripts or plain questions).
        samples_per_prompt: K.
        max_new_tokens: Response token budget (EOS included).
        temperature: T > 0.
        top_p: Nucleus mass in (0, 1].
        seed: Seed of the draws; the same seed, model, prompts and thread count give the same
            batch.
        max_prompt_tokens: Keep at most this many prompt tokens (the last ones); None: all.
        eos_token_ids: Tokens that end a response; None: `stop_token_ids(model, tokenizer)`.

    Returns:
        A `RolloutBatch` of N = P·K rows.
    """
    if not prompts or samples_per_prompt < 1 or max_new_tokens < 1 or temperature <= 0 \
            or not 0 < top_p <= 1:
        raise ValueError(f"generate needs prompts, samples_per_prompt >= 1, max_new_tokens >= 1, "
                         f"temperature > 0 and 0 < top_p <= 1; got {len(prompts)} prompts, "
                         f"{samples_per_prompt}, {max_new_tokens}, {temperature}, {top_p}")
    device = next(model.parameters()).device
    eos = torch.tensor(stop_token_ids(model, tokenizer) if eos_token_ids is None
                       else tuple(eos_token_ids), dtype=torch.long, device=device)
    ids, mask = (t.to(device) for t in encode_prompts(tokenizer, prompts, max_prompt_tokens))
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        response, logprobs = _decode(model, ids, mask, samples_per_prompt, max_new_tokens,
                                     temperature, top_p, eos, tokenizer.pad_token_id)
    response_mask, ended = _response_mask(response, eos)
    texts = tuple(tokenizer.decode(row[m.bool()], skip_special_tokens=True).strip()
                  for row, m in zip(response.cpu(), response_mask.cpu(), strict=True))
    k = samples_per_prompt
    return RolloutBatch(
        prompts=tuple(prompts),
        prompt_index=torch.arange(len(prompts)).repeat_interleave(k),
        sample_index=torch.arange(k).repeat(len(prompts)),
        prompt_ids=ids.repeat_interleave(k, 0).cpu(),
        prompt_mask=mask.repeat_interleave(k, 0).cpu(),
        response_ids=response.cpu(), response_mask=response_mask.cpu(),
        logprobs=(logprobs * response_mask).cpu(), ended=ended.cpu(), texts=texts,
        temperature=float(temperature), top_p=float(top_p),
        pad_token_id=int(tokenizer.pad_token_id))


def _cache_kwarg(model: PreTrainedModel) -> str:
    # transformers 5 renamed `past_key_values` to `cache` (the old name is deprecated).
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output) -> object:
    cache = output.get("cache")
    return output.get("past_key_values") if cache is None else cache


@torch.no_grad()
def _decode(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, k: int,
            max_new_tokens: int, temperature: float, top_p: float, eos: torch.Tensor,
            pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The KV-cache loop. `ids`, `mask` `(P, Tp)` → tokens and logprobs `(P·K, Tr)`."""
    cache_kw = _cache_kwarg(model)
    keep_last = ({"logits_to_keep": 1}
                 if "logits_to_keep" in inspect.signature(model.forward).parameters else {})
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (P, Tp): left padding shifts nothing
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **keep_last)
    cache, logits = _cache_of(out), out.logits[:, -1].float()  # logits (P, V)
    if k > 1:
        cache.batch_repeat_interleave(k)  # the K samples share their prompt's prefill
        logits, mask, positions = (t.repeat_interleave(k, 0) for t in (logits, mask, positions))
    n = logits.shape[0]
    position = positions[:, -1:]  # (N, 1)
    running = torch.ones(n, dtype=torch.bool, device=ids.device)  # (N,)
    tokens, logprobs = [], []
    for step in range(max_new_tokens):
        scaled = logits / temperature  # (N, V): π_T's logits
        token = torch.multinomial(nucleus(scaled, top_p).softmax(-1), 1).squeeze(1)  # (N,)
        token = torch.where(running, token, pad_token_id)
        tokens.append(token)
        logprobs.append(token_logprobs(scaled, token))  # (N,)
        running &= ~torch.isin(token, eos)
        if not running.any() or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(n, 1)], 1)  # (N, Tp + step + 1)
        position = position + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                    use_cache=True, **{cache_kw: cache})
        cache, logits = _cache_of(out), out.logits[:, -1].float()
    return torch.stack(tokens, 1), torch.stack(logprobs, 1)


@torch.no_grad()
def recompute_logprobs(model: PreTrainedModel, batch: RolloutBatch) -> torch.Tensor:
    """log π_T of the batch's response tokens from one full forward pass (no cache).

    What a trainer computes for PPO's ratio; equal to `batch.logprobs` up to float noise when
    the weights are those that sampled. Returns `(N, Tr)` float32, 0 on padding.
    """
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in batch.sequences())  # (N, Tp + Tr)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    start = batch.prompt_ids.shape[1]
    logits = logits[:, start - 1:-1].float() / batch.temperature  # (N, Tr, V): predicts y_t
    response = batch.response_ids.to(device)
    return (token_logprobs(logits, response) * batch.response_mask.to(device)).cpu()
