"""Process reward model: marker positions, aggregation, step-error F1, masked BCE, training."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from actors.core.prm_data import StepExample, load_prmbench
from actors.core.process_rm import (
    ProcessRewardModel,
    aggregate,
    build_process_reward_model,
    encode_steps,
    masked_step_bce,
    step_error_f1,
    step_rewards,
)

SEP = 102  # [SEP] in MiniLM's (bert-base-uncased) vocabulary
EXAMPLES = [StepExample("What is 2+2?", ("two plus two", "is four"), (1, 0)),
            StepExample("q", ("a b c",), (1,))]


@pytest.fixture(scope="module")
def tiny() -> tuple[ProcessRewardModel, object]:
    model, tokenizer = build_process_reward_model("tiny-bert", seed=0)
    return model, tokenizer


def test_markers_close_each_step(tiny):
    _, tokenizer = tiny
    batch = encode_steps(tokenizer, EXAMPLES, max_length=64)
    tokens = tokenizer.convert_ids_to_tokens(batch.input_ids[0])
    assert tokens == ["[CLS]", "what", "is", "2", "+", "2", "?", "[SEP]", "two", "plus", "two",
                      "[SEP]", "is", "four", "[SEP]"]
    assert batch.step_positions.tolist() == [[11, 14], [6, 0]]
    assert batch.step_mask.tolist() == [[True, True], [True, False]]
    assert batch.labels.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert batch.attention_mask.sum(-1).tolist() == [15, 7]
    assert (batch.input_ids[batch.step_mask.nonzero(as_tuple=True)[0],
                            batch.step_positions[batch.step_mask]] == SEP).all()


@pytest.mark.parametrize(("max_length", "tokens", "positions", "mask"), [
    # 14 tokens after [CLS]; keep the last 5: step 1's marker survives at 2, step 2's at 5
    (6, ["[CLS]", "two", "[SEP]", "is", "four", "[SEP]"], [2, 5], [True, True]),
    # keep the last 3: step 1's marker is cut, so step 1 is masked
    (4, ["[CLS]", "is", "four", "[SEP]"], [0, 3], [False, True]),
])
def test_left_truncation_keeps_later_steps(tiny, max_length, tokens, positions, mask):
    _, tokenizer = tiny
    batch = encode_steps(tokenizer, EXAMPLES[:1], max_length=max_length)
    assert tokenizer.convert_ids_to_tokens(batch.input_ids[0]) == tokens
    assert batch.step_positions[0].tolist() == positions
    assert batch.step_mask[0].tolist() == mask
    assert batch.labels[0].tolist() == [1.0 if mask[0] else 0.0, 0.0]


def test_marker_inside_a_step_is_not_scored(tiny):
    _, tokenizer = tiny
    example = StepExample("q", ("x [SEP] y", "z"), (1, 1))
    batch = encode_steps(tokenizer, [example], max_length=64)
    # [CLS] q [SEP] x [SEP] y [SEP] z [SEP]: step 1 closes at 6, not at the [SEP] inside it
    assert batch.step_positions[0].tolist() == [6, 8]


def test_custom_marker_string(tiny):
    _, tokenizer = tiny
    batch = encode_steps(tokenizer, EXAMPLES[1:], max_length=64, marker="ки")
    marker_ids = tokenizer("ки", add_special_tokens=False)["input_ids"]
    n = len(marker_ids)
    length = int(batch.attention_mask.sum())  # [CLS] q M a b c M
    assert length == 1 + 1 + n + 3 + n
    assert batch.step_positions[0].tolist() == [length - 1]
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        encode_steps(tokenizer, EXAMPLES, max_length=64, marker="\n\n")


def test_forward_reads_the_head_at_the_markers(tiny):
    model, tokenizer = tiny
    batch = encode_steps(tokenizer, EXAMPLES, max_length=64)
    with torch.no_grad():
        logits = model(batch.input_ids, batch.attention_mask, batch.step_positions)  # (2, 2)
        hidden = model.backbone(input_ids=batch.input_ids,
                                attention_mask=batch.attention_mask).last_hidden_state
    assert logits.shape == (2, 2)
    expected = model.head(hidden[0, 14]).item()
    assert logits[0, 1].item() == pytest.approx(expected, rel=1e-6)


SCORES = torch.tensor([[0.9, 0.5, 0.8], [0.6, 0.3, 0.01], [0.01, 0.7, 0.2]], dtype=torch.float64)
MASK = torch.tensor([[True, True, True], [True, True, False], [False, True, True]])


@pytest.mark.parametrize(("how", "expected"), [
    ("min", [0.5, 0.3, 0.2]),
    ("product", [0.9 * 0.5 * 0.8, 0.6 * 0.3, 0.7 * 0.2]),  # 0.36, 0.18, 0.14
    ("last", [0.8, 0.3, 0.2]),  # row 2 ends with padding, row 3 starts with a cut step
])
def test_aggregate_by_hand(how, expected):
    got = aggregate(SCORES, MASK, how)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=0)


def test_aggregate_rejects_empty_rows_and_unknown_modes():
    with pytest.raises(ValueError, match="at least one valid step"):
        aggregate(SCORES, torch.zeros_like(MASK), "min")
    with pytest.raises(ValueError, match="'mean'"):
        aggregate(SCORES, MASK, "mean")


def test_step_rewards_are_log_probabilities_summing_to_log_product():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(4.0), 5.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False]])
    rewards = step_rewards(logits, mask)
    expected = torch.tensor([[math.log(0.5), math.log(0.75)], [math.log(0.8), 0.0]],
                            dtype=torch.float64)
    torch.testing.assert_close(rewards, expected, rtol=1e-12, atol=1e-15)
    product = aggregate(torch.sigmoid(logits), mask, "product")
    torch.testing.assert_close(rewards.sum(-1).exp(), product, rtol=1e-12, atol=0)


@pytest.mark.parametrize(("pred", "true", "expected"), [
    ([1, 1, 0, 0, 1, 0], [1, 0, 1, 0, 1, 0], (2 / 3, 2 / 3, 2 / 3, 2, 1, 1)),
    ([1, 1, 1, 0], [1, 0, 0, 0], (1 / 3, 1.0, 0.5, 1, 2, 0)),
    ([0, 0, 0], [1, 0, 1], (0.0, 0.0, 0.0, 0, 0, 2)),  # flags nothing: 0/0 precision → 0
    ([1, 1, 1], [0, 1, 0], (1 / 3, 1.0, 0.5, 1, 2, 0)),  # all-wrong baseline: 2r/(1+r), r=1/3
])
def test_step_error_f1_by_hand(pred, true, expected):
    got = step_error_f1(torch.tensor(pred).bool(), torch.tensor(true).bool())
    assert (got.precision, got.recall, got.f1, got.tp, got.fp, got.fn) == pytest.approx(expected)


def test_step_error_f1_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        step_error_f1(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool))


def test_masked_bce_equals_a_naive_loop():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, generator=generator, dtype=torch.float64) * 3
    labels = (torch.rand(3, 4, generator=generator) > 0.5).double()
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 1]]).bool()
    total, count = 0.0, 0
    for b in range(3):
        for s in range(4):
            if mask[b, s]:
                p = 1.0 / (1.0 + math.exp(-logits[b, s].item()))
                y = labels[b, s].item()
                total += -(y * math.log(p) + (1 - y) * math.log(1 - p))
                count += 1
    assert count == 7
    got = masked_step_bce(logits, labels, mask)
    assert got.item() == pytest.approx(total / count, rel=1e-12)
    # padding logits never matter
    noisy = torch.where(mask, logits, torch.full_like(logits, 1e3))
    assert masked_step_bce(noisy, labels, mask).item() == pytest.approx(total / count, rel=1e-12)


def test_a_few_steps_on_real_prmbench_lower_the_loss(shared_data):
    examples = load_prmbench(shared_data / "prmbench" / "train", limit=32)
    model, tokenizer = build_process_reward_model("tiny-bert", seed=0)
    batch = encode_steps(tokenizer, examples, max_length=128)
    assert int(batch.step_mask.sum()) > 100

    def loss() -> torch.Tensor:
        logits = model(batch.input_ids, batch.attention_mask, batch.step_positions)
        return masked_step_bce(logits, batch.labels, batch.step_mask)

    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = loss().item()
    for _ in range(8):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.8 * before, (before, after)
