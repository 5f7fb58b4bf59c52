"""Sampling: shapes, seeds, the logprob contract, EOS, top-p and prompt rendering.

The tiny random GPT-2 (vocabulary 30,522, N(0, 0.02) weights) has near-uniform next-token
distributions, so EOS almost never comes by chance: EOS tests declare a token that was sampled
to be the EOS. Tolerances: logprobs from the KV-cache loop vs one full forward pass agree to
~1e-6 in fp32 (measured); we assert 1e-5.
"""

from __future__ import annotations

import copy
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from actors.core.policy import load_policy
from actors.core.sampling import (
    RolloutBatch,
    concat_batches,
    encode_prompts,
    generate,
    nucleus,
    recompute_logprobs,
    render_prompt,
    stop_token_ids,
)

PROMPTS = ["\n\nHuman: What is the capital of France?\n\nAssistant:",
           "Write a haiku about rain.",
           "\n\nHuman: hi\n\nAssistant: hello! how can I help?\n\nHuman: tell me a joke\n\n"
           "Assistant:"]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def policy():
    return load_policy("tiny-gpt2", seed=0)


@pytest.fixture(scope="module")
def batch(policy) -> RolloutBatch:
    return generate(*policy, PROMPTS, samples_per_prompt=2, max_new_tokens=12, temperature=0.7,
                    seed=3)


def naive_logprobs(model, batch: RolloutBatch) -> list[torch.Tensor]:
    """Row by row, the row's real tokens only (no padding at all), one forward pass each."""
    out = []
    for i in range(batch.num_rows):
        prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
        response = batch.response_ids[i][batch.response_mask[i].bool()]
        with torch.no_grad():
            logits = model(input_ids=torch.cat([prompt, response])[None]).logits[0]  # (L, V)
        steps = logits[len(prompt) - 1:-1].double() / batch.temperature  # predicts each y_t
        out.append(torch.log_softmax(steps, -1).gather(1, response[:, None]).squeeze(1))
    return out


def test_k_samples_per_prompt_shapes_and_padding(policy, batch):
    _, tokenizer = policy
    n = len(PROMPTS) * 2
    assert batch.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert batch.sample_index.tolist() == [0, 1, 0, 1, 0, 1]
    assert batch.response_ids.shape == batch.response_mask.shape == batch.logprobs.shape == (n, 12)
    assert not batch.ended.any()  # this seed draws no [SEP]: every row runs to the limit
    assert batch.response_mask.sum().item() == n * 12 == batch.response_tokens
    widths = [len(encode_prompts(tokenizer, [p])[0][0]) for p in PROMPTS]
    assert batch.prompt_ids.shape == (n, max(widths))
    assert batch.prompt_mask.sum(1).tolist() == [w for w in widths for _ in range(2)]
    assert (batch.prompt_mask[:, -1] == 1).all()  # LEFT padding: every prompt ends at the edge
    pads = batch.prompt_mask == 0
    assert (batch.prompt_ids[pads] == tokenizer.pad_token_id).all() and pads.any()
    assert torch.equal(batch.prompt_ids[0], batch.prompt_ids[1])  # K copies of one prompt
    assert not torch.equal(batch.response_ids[0], batch.response_ids[1])  # ... K samples
    assert batch.texts[3] == tokenizer.decode(batch.response_ids[3], skip_special_tokens=True)
    assert batch.prompts == tuple(PROMPTS) and len(batch.texts) == n


def test_same_seed_same_batch_other_seed_other_batch_callers_rng_untouched(policy, batch):
    torch.manual_seed(11)
    expected_draw = torch.rand(2)
    torch.manual_seed(11)
    again = generate(*policy, PROMPTS, 2, 12, temperature=0.7, seed=3)
    assert torch.equal(torch.rand(2), expected_draw)
    assert torch.equal(again.response_ids, batch.response_ids)
    assert torch.equal(again.logprobs, batch.logprobs) and again.texts == batch.texts
    other = generate(*policy, PROMPTS, 2, 12, temperature=0.7, seed=4)
    assert (other.response_ids != batch.response_ids).float().mean() > 0.9


def test_logprobs_equal_a_fresh_forward_pass(policy, batch):
    model, _ = policy
    padded = recompute_logprobs(model, batch)  # one padded forward of the whole batch
    torch.testing.assert_close(padded, batch.logprobs, rtol=0, atol=1e-5)
    for i, row in enumerate(naive_logprobs(model, batch)):  # no padding, float64 softmax
        torch.testing.assert_close(batch.logprobs[i, :len(row)].double(), row, rtol=0, atol=1e-5)
    # Near-uniform over V = 30,522 tokens at T = 0.7: every logprob is close to −log V = −10.33
    assert batch.logprobs.mean().item() == pytest.approx(-math.log(30522), abs=0.2)


def test_tokens_equal_hf_generate_under_the_same_seed(policy):
    model, tokenizer = policy
    ours = generate(model, tokenizer, PROMPTS, 2, 10, temperature=0.9, seed=5)
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0,
                            top_p=1.0, temperature=0.9, num_return_sequences=2,
                            max_new_tokens=10, eos_token_id=list(stop_token_ids(model, tokenizer)),
                            pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(hf[:, ids.shape[1]:], ours.response_ids)


def test_eos_stops_and_masks(policy):
    model, tokenizer = policy
    free = generate(model, tokenizer, PROMPTS, 2, 12, seed=8, eos_token_ids=())
    eos = free.response_ids[0, 2].item()  # row 0 will stop at its third token
    stopped = generate(model, tokenizer, PROMPTS, 2, 12, seed=8, eos_token_ids=(eos,))
    assert stopped.ended[0] and stopped.response_mask[0].tolist() == [1] * 3 + [0] * 9
    for i in range(free.num_rows):
        hits = (free.response_ids[i] == eos).nonzero()
        length = hits[0].item() + 1 if len(hits) else 12
        assert stopped.response_mask[i].sum().item() == length
        assert bool(stopped.ended[i]) == bool(len(hits))
        # the draws of the other rows are untouched by a row that stopped
        assert torch.equal(stopped.response_ids[i, :length], free.response_ids[i, :length])
        assert (stopped.response_ids[i, length:] == tokenizer.pad_token_id).all()
        assert (stopped.logprobs[i, length:] == 0).all()
        assert (stopped.logprobs[i, :length] < 0).all()  # the EOS token has its logprob
        assert stopped.texts[i] == tokenizer.decode(free.response_ids[i, :length],
                                                    skip_special_tokens=True).strip()
    torch.testing.assert_close(recompute_logprobs(model, stopped), stopped.logprobs,
                               rtol=0, atol=1e-5)
    # one row that stops: the loop ends there, the batch is only as wide as the response
    row = generate(model, tokenizer, PROMPTS[:1], 1, 12, seed=8, eos_token_ids=()).response_ids
    alone = generate(model, tokenizer, PROMPTS[:1], 1, 12, seed=8, eos_token_ids=(row[0, 2],))
    assert row[0, 2] not in row[0, :2]
    assert alone.response_ids.shape == (1, 3) and alone.ended.all()
    assert torch.equal(alone.response_ids, row[:, :3])
    assert alone.metrics()["rollout/eos_fraction"] == 1.0


def test_nucleus_on_hand_made_probabilities():
    scores = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = {p: torch.isfinite(nucleus(scores, p)).sum().item() for p in (0.45, 0.79, 0.85, 0.96)}
    assert kept == {0.45: 1, 0.79: 2, 0.85: 3, 0.96: 4}
    assert torch.equal(nucleus(scores, 1.0), scores)
    shuffled = scores[:, [2, 0, 3, 1]]  # order of the vocabulary does not matter
    assert torch.isfinite(nucleus(shuffled, 0.79)).tolist() == [[False, True, False, True]]


def test_top_p_samples_only_inside_the_nucleus(policy):
    model, tokenizer = policy

    def mass_above_sampled(top_p: float) -> torch.Tensor:
        """Per draw, the probability of the tokens strictly likelier than the one drawn."""
        b = generate(model, tokenizer, PROMPTS * 4, 2, 16, temperature=1.0, top_p=top_p,
                     seed=0)
        ids, mask = b.sequences()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask,
                           position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        probs = logits[:, b.prompt_ids.shape[1] - 1:-1].softmax(-1)  # (N, Tr, V)
        chosen = probs.gather(-1, b.response_ids[..., None])  # (N, Tr, 1)
        return (probs * (probs > chosen)).sum(-1).flatten()  # (N·Tr,) = 384 draws

    # A draw from p puts the mass above it ~ Uniform(0, 1); from the 0.3-nucleus ~ U(0, 0.3).
    inside = mass_above_sampled(0.3)
    assert inside.max() < 0.3 and inside.mean().item() == pytest.approx(0.15, abs=0.03)
    free = mass_above_sampled(1.0)
    assert (free >= 0.3).float().mean().item() == pytest.approx(0.7, abs=0.1)  # 0.65 here


def test_plain_format_and_chat_template(policy):
    _, tokenizer = policy
    hh = "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: bye\n\nAssistant:"
    assert render_prompt(tokenizer, hh) == "User: hi\nAssistant: yo\nUser: bye\nAssistant:"
    assert render_prompt(tokenizer, "  Why?  ") == "User: Why?\nAssistant:"
    ids, mask = encode_prompts(tokenizer, [hh])
    assert mask.all()
    plain = tokenizer("User: hi\nAssistant: yo\nUser: bye\nAssistant:",
                      add_special_tokens=False)["input_ids"]
    assert ids[0].tolist() == [tokenizer.cls_token_id, *plain]  # prefix special, no [SEP]
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = TEMPLATE
    text = render_prompt(templated, hh)
    assert text == "<user>hi<assistant>yo<user>bye<assistant>"
    ids, _ = encode_prompts(templated, [hh])
    assert ids[0].tolist() == templated(text, add_special_tokens=False)["input_ids"]
    cut, cut_mask = encode_prompts(templated, [hh, "x"], max_prompt_tokens=3)
    assert cut[0].tolist() == ids[0, -3:].tolist()  # cut from the LEFT
    x_ids = templated("<user>x<assistant>", add_special_tokens=False)["input_ids"]
    assert len(x_ids) > 3 and cut[1].tolist() == x_ids[-3:] and cut_mask.sum().item() == 6


def test_concat_batches_repads_and_reindexes(policy):
    model, tokenizer = policy
    a = generate(model, tokenizer, PROMPTS[:1], 2, 4, seed=1)
    b = generate(model, tokenizer, PROMPTS[1:], 2, 6, seed=2)
    joined = concat_batches([a, b])
    assert joined.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert joined.response_ids.shape == (6, 6) and joined.texts == a.texts + b.texts
    assert joined.response_mask[:2].sum().item() == a.response_tokens
    torch.testing.assert_close(recompute_logprobs(model, joined), joined.logprobs,
                               rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        concat_batches([a, generate(model, tokenizer, PROMPTS[:1], 2, 4, temperature=0.5)])


def test_metrics(batch):
    m = batch.metrics()
    assert m["rollout/samples"] == 6 and m["rollout/response_tokens_mean"] == 12
    assert m["rollout/eos_fraction"] == 0.0
    assert m["rollout/logprob_mean"] == pytest.approx(batch.logprobs.mean().item(), rel=1e-6)
