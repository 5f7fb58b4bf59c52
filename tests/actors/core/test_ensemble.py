"""Reward-model ensembles: combine, disagreement, bootstrap, the multi-head loss, with numbers."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from types import SimpleNamespace

import pytest
import torch

from actors.core.bradley_terry import bradley_terry_loss
from actors.core.ensemble import (
    EnsembleScores,
    MultiHeadRewardModel,
    bootstrap_bradley_terry_losses,
    bootstrap_counts,
    bootstrap_indices,
    build_multi_head_reward_model,
    combine,
    disagreement,
    ensemble_scores,
    load_reward_model,
    pair_disagreement,
    score_members,
)
from actors.core.hh import load_hh_jsonl
from actors.core.reward_model import RewardModel, build_reward_model, encode


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# Three members on three samples. Column means 2, 0, 1; population stds √(8/3), 0, √(2/3).
SCORES = t64([[0.0, 0.0, 1.0],
              [2.0, 0.0, 0.0],
              [4.0, 0.0, 2.0]])


def test_combine_hand_numbers():
    torch.testing.assert_close(combine(SCORES, "mean"), t64([2.0, 0.0, 1.0]), rtol=1e-12, atol=0)
    torch.testing.assert_close(combine(SCORES, "min"), t64([0.0, 0.0, 0.0]), rtol=0, atol=0)
    expected = t64([2.0 - 0.5 * math.sqrt(8 / 3), 0.0, 1.0 - 0.5 * math.sqrt(2 / 3)])
    torch.testing.assert_close(combine(SCORES, "mean_minus_std", k=0.5), expected, rtol=1e-12,
                               atol=1e-15)
    # k = 0 is the mean; the default k is 1.
    torch.testing.assert_close(combine(SCORES, "mean_minus_std", k=0.0), combine(SCORES, "mean"))
    torch.testing.assert_close(combine(SCORES, "mean_minus_std")[0], t64(2.0 - math.sqrt(8 / 3)))
    with pytest.raises(ValueError, match="combine must be one of"):
        combine(SCORES, "median")  # type: ignore[arg-type]


@pytest.mark.parametrize("how", ["mean", "min", "mean_minus_std"])
def test_one_member_is_the_single_model_under_every_combine(how):
    scores = t64([[0.3, -1.5, 2.0]])  # (K=1, N=3)
    out = combine(scores, how, k=3.0)
    assert not torch.isnan(out).any()  # population std: 0, not NaN, for K = 1
    torch.testing.assert_close(out, scores[0], rtol=0, atol=0)
    torch.testing.assert_close(disagreement(scores), torch.zeros(3, dtype=torch.float64))


def test_disagreement_matches_a_naive_loop():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 7, dtype=torch.float64, generator=gen)
    naive = []
    for j in range(7):
        column = [float(scores[k, j]) for k in range(5)]
        mean = sum(column) / 5
        naive.append(math.sqrt(sum((x - mean) ** 2 for x in column) / 5))
    torch.testing.assert_close(disagreement(scores), t64(naive), rtol=1e-12, atol=0)
    assert disagreement(SCORES).tolist() == pytest.approx(
        [math.sqrt(8 / 3), 0.0, math.sqrt(2 / 3)], rel=1e-12)


def test_pair_disagreement_hand_numbers_and_ranking():
    # Pair 0: members split, gaps +1 and −1: p = σ(1), σ(−1); std = |σ(1) − σ(−1)| / 2.
    # Pair 1: members agree a ≫ b, gaps 3 and 9, far larger raw gap spread, small std of p.
    # Pair 2: identical gaps: no disagreement.
    a = t64([[1.0, 3.0, 0.5], [0.0, 9.0, 0.5]])
    b = t64([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    sig = torch.sigmoid
    expected = t64([(sig(t64(1.0)) - sig(t64(-1.0))).item() / 2,
                    (sig(t64(9.0)) - sig(t64(3.0))).item() / 2, 0.0])
    out = pair_disagreement(a, b)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-15)
    assert out.argsort(descending=True).tolist() == [0, 1, 2]  # the split vote ranks first
    assert disagreement(a - b).argmax().item() == 1  # the raw-gap std would rank it last of two
    # Symmetric in a ↔ b.
    torch.testing.assert_close(pair_disagreement(b, a), out, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="same"):
        pair_disagreement(a, b[:, :2])


def test_bootstrap_is_seeded_independent_and_sums_to_n():
    first = bootstrap_indices(50, members=4, seed=7)
    again = bootstrap_indices(50, members=4, seed=7)
    assert len(first) == 4 and all(idx.shape == (50,) and idx.dtype == torch.int64
                                   for idx in first)
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert all(not torch.equal(first[i], first[j]) for i in range(4) for j in range(i + 1, 4))
    assert not torch.equal(first[0], bootstrap_indices(50, members=1, seed=8)[0])
    # A member's resample depends on (seed, k) only: growing the ensemble keeps the old ones.
    assert all(torch.equal(x, y) for x, y in zip(first, bootstrap_indices(50, 6, seed=7)[:4],
                                                 strict=True))
    assert all(int(idx.min()) >= 0 and int(idx.max()) < 50 for idx in first)
    counts = bootstrap_counts(first, 50)  # (4, 50)
    assert counts.shape == (4, 50) and counts.sum(dim=1).tolist() == [50] * 4
    for k in range(4):
        assert counts[k].tolist() == [int((first[k] == i).sum()) for i in range(50)]
    # A bootstrap leaves out ~ (1 − 1/n)^n ≈ e^−1 of the pairs: between 10 and 30 of 50 here.
    assert all(10 <= int((row == 0).sum()) <= 30 for row in counts)


@pytest.mark.parametrize(("margin", "eps"), [(None, 0.0), (0.25, 0.1)])
def test_weighted_loss_equals_bradley_terry_on_each_resampled_batch(margin, eps):
    # The key invariance: count-weighting on the shared batch == the loss on member k's
    # explicitly resampled batch, summed over members.
    members, n = 3, 12
    gen = torch.Generator().manual_seed(1)
    r_chosen = torch.randn(members, n, dtype=torch.float64, generator=gen)
    r_rejected = torch.randn(members, n, dtype=torch.float64, generator=gen)
    indices = bootstrap_indices(n, members, seed=3)
    counts = bootstrap_counts(indices, n)  # (K, n)
    per_member = bootstrap_bradley_terry_losses(r_chosen, r_rejected, counts, margin, eps)
    reference = torch.stack([
        bradley_terry_loss(r_chosen[k, idx], r_rejected[k, idx], margin, eps)
        for k, idx in enumerate(indices)])  # (K,)
    torch.testing.assert_close(per_member, reference, rtol=1e-6, atol=0)
    # Uniform counts reduce to the plain loss; the weighting is not a no-op.
    plain = bootstrap_bradley_terry_losses(r_chosen, r_rejected, torch.ones(members, n),
                                           margin, eps)
    torch.testing.assert_close(plain[0], bradley_terry_loss(r_chosen[0], r_rejected[0], margin,
                                                            eps), rtol=1e-12, atol=0)
    assert not torch.allclose(plain, per_member)
    # The model's loss is the sum, and its gradient is the sum of the members' gradients.
    rc = r_chosen.clone().requires_grad_(True)
    total = MultiHeadRewardModel.loss(rc, r_rejected, counts, margin, eps)
    torch.testing.assert_close(total, reference.sum(), rtol=1e-6, atol=0)
    total.backward()
    rc_ref = r_chosen.clone().requires_grad_(True)
    sum(bradley_terry_loss(rc_ref[k, idx], r_rejected[k, idx], margin, eps)
        for k, idx in enumerate(indices)).backward()
    torch.testing.assert_close(rc.grad, rc_ref.grad, rtol=1e-6, atol=1e-15)


def test_weighted_loss_on_a_mini_batch_is_the_mean_over_the_draws_that_fall_in_it():
    # On a mini-batch of the first 5 of 12 pairs, member k's loss is the mean over its draws
    # that land in those 5 (normalized by Σ_i c_ki, not by the batch size B).
    members, n, batch = 3, 12, 5
    gen = torch.Generator().manual_seed(2)
    r_chosen = torch.randn(members, batch, dtype=torch.float64, generator=gen)
    r_rejected = torch.randn(members, batch, dtype=torch.float64, generator=gen)
    indices = bootstrap_indices(n, members, seed=2)  # draws in batch: 6, 7, 3
    counts = bootstrap_counts(indices, n)[:, :batch]  # (K, B)
    assert all(0 < int(c) != batch for c in counts.sum(dim=1))  # the normalizer matters here
    reference = torch.stack([
        bradley_terry_loss(r_chosen[k, idx[idx < batch]], r_rejected[k, idx[idx < batch]])
        for k, idx in enumerate(indices)])  # (K,)
    torch.testing.assert_close(bootstrap_bradley_terry_losses(r_chosen, r_rejected, counts),
                               reference, rtol=1e-6, atol=0)


def test_a_member_that_drew_nothing_in_the_batch_has_zero_loss():
    counts = torch.tensor([[0, 0], [2, 0]])
    losses = bootstrap_bradley_terry_losses(t64([[1.0, 2.0], [0.0, 0.0]]),
                                            t64([[0.0, 0.0], [0.0, 0.0]]), counts)
    assert losses.tolist() == [0.0, pytest.approx(math.log(2.0), rel=1e-12)]


def test_ensemble_scores_from_a_config():
    config = SimpleNamespace(members=3, combine="min", k=2.0)
    out = ensemble_scores(SCORES, config)
    assert isinstance(out, EnsembleScores)
    assert out.combined.tolist() == [0.0, 0.0, 0.0]
    assert out.disagreement.tolist() == pytest.approx([math.sqrt(8 / 3), 0.0, math.sqrt(2 / 3)])
    torch.testing.assert_close(out.members, SCORES)
    pessimistic = ensemble_scores(SCORES, SimpleNamespace(members=3, combine="mean_minus_std",
                                                          k=2.0))
    assert pessimistic.combined[1].item() == 0.0
    assert pessimistic.combined[2].item() == pytest.approx(1.0 - 2.0 * math.sqrt(2 / 3))
    with pytest.raises(ValueError, match=r"ensemble\.members is 2"):
        ensemble_scores(SCORES, SimpleNamespace(members=2, combine="mean", k=1.0))


@pytest.fixture(scope="module")
def hh_batches(shared_data):
    pairs = load_hh_jsonl(shared_data / "hh-rlhf" / "train.jsonl.gz", limit=32)
    _, tokenizer = build_reward_model("tiny-bert", seed=0)
    prompts = [p.prompt for p in pairs]
    chosen = encode(tokenizer, prompts, [p.chosen for p in pairs], 64)
    rejected = encode(tokenizer, prompts, [p.rejected for p in pairs], 64)
    return pairs, chosen, rejected


def test_multi_head_shapes_heads_and_agreement_with_single_models(hh_batches):
    _, chosen, _ = hh_batches
    model, _ = build_multi_head_reward_model("tiny-bert", members=3, seed=0)
    model.eval()
    single, _ = build_reward_model("tiny-bert", seed=0)
    single.eval()
    # Head k is what build_reward_model(seed + k) draws; head 0 is the single model's head.
    torch.testing.assert_close(model.heads.weight[0:1], single.head.weight, rtol=0, atol=0)
    other, _ = build_reward_model("tiny-bert", seed=2)
    torch.testing.assert_close(model.heads.weight[2:3], other.head.weight, rtol=0, atol=0)
    assert model.members == 3 and model.heads.bias is None
    assert not torch.equal(model.heads.weight[0], model.heads.weight[1])
    ids, mask = chosen.input_ids[:5], chosen.attention_mask[:5]
    with torch.no_grad():
        scores = model(ids, mask)  # (K, B)
        # A K-head model is K single models sharing one backbone: same pooled state, own head.
        singles = []
        for k in range(3):
            single.head.weight.copy_(model.heads.weight[k:k + 1])
            singles.append(score_members([single], ids, mask)[0])  # (B,)
    assert scores.shape == (3, 5) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.stack(singles), rtol=1e-5, atol=1e-6)


def test_save_load_round_trip_of_single_and_multi_head_models(hh_batches, tmp_path):
    _, chosen, _ = hh_batches
    ids, mask = chosen.input_ids[:4], chosen.attention_mask[:4]
    multi, tok = build_multi_head_reward_model("tiny-bert", members=3, seed=1)
    single, _ = build_reward_model("tiny-bert", seed=1)
    multi.save(tmp_path / "multi", tok)
    single.save(tmp_path / "single", tok)
    loaded_multi = load_reward_model(tmp_path / "multi")
    loaded_single = load_reward_model(tmp_path / "single")
    assert isinstance(loaded_multi, MultiHeadRewardModel) and loaded_multi.members == 3
    assert type(loaded_single) is RewardModel
    with torch.no_grad():
        torch.testing.assert_close(loaded_multi(ids, mask), multi.eval()(ids, mask),
                                   rtol=0, atol=0)
        torch.testing.assert_close(loaded_single(ids, mask), single.eval()(ids, mask),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="3-member ensemble"):
        RewardModel.load(tmp_path / "multi")


def test_training_a_few_steps_lowers_every_members_loss(hh_batches):
    pairs, chosen, rejected = hh_batches
    n, members = len(pairs), 3
    assert n == 32
    torch.manual_seed(0)
    model, _ = build_multi_head_reward_model("tiny-bert", members=members, seed=0)
    counts = bootstrap_counts(bootstrap_indices(n, members, seed=0), n)  # (K, n)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3)

    def member_losses() -> torch.Tensor:
        r_c = model(chosen.input_ids, chosen.attention_mask)  # (K, n)
        r_r = model(rejected.input_ids, rejected.attention_mask)  # (K, n)
        return bootstrap_bradley_terry_losses(r_c, r_r, counts)  # (K,)

    with torch.no_grad():
        before = member_losses()
    for _ in range(3):
        optimizer.zero_grad()
        r_c = model(chosen.input_ids, chosen.attention_mask)
        r_r = model(rejected.input_ids, rejected.attention_mask)
        model.loss(r_c, r_r, counts).backward()
        optimizer.step()
    with torch.no_grad():
        after = member_losses()
    assert (after < before - 0.02).all(), (before, after)
