"""ORM step judgments (prefix drops), threshold picking, per-class step-error F1."""

from __future__ import annotations

import pytest
import torch

from actors.core.prm_metrics import per_class_f1, pick_threshold, prefix_drops, quantile_grid


def test_prefix_drops_by_hand():
    # r_0 (question only) = 1.0, then 0.5, 0.75, -1.0 after steps 1, 2, 3
    drops = prefix_drops(torch.tensor([1.0, 0.5, 0.75, -1.0], dtype=torch.float64))
    assert drops.tolist() == [0.5, -0.25, 1.75]


@pytest.mark.parametrize("shape", [(1,), (0,), (2, 3)])
def test_prefix_drops_needs_one_step(shape):
    with pytest.raises(ValueError, match="prefix scores"):
        prefix_drops(torch.zeros(shape))


def test_quantile_grid_by_hand():
    # quartiles of 0 … 4 with linear interpolation: 1, 2, 3; duplicates collapse
    assert quantile_grid(torch.tensor([4.0, 0.0, 2.0, 1.0, 3.0]), n=3) == [1.0, 2.0, 3.0]
    assert quantile_grid(torch.tensor([5.0, 5.0]), n=3) == [5.0]


def test_pick_threshold_by_hand():
    scores = torch.tensor([0.9, 0.6, 0.4, 0.2, 0.1])
    truth = torch.tensor([True, False, True, False, False])
    # τ=0.5: tp 1 fp 1 fn 1 → F1 2/4 = 0.5; τ=0.3: tp 2 fp 1 fn 0 → 4/5 = 0.8;
    # τ=0.05: tp 2 fp 3 → 4/7 ≈ 0.571; τ=0.95: nothing flagged → 0
    assert pick_threshold(scores, truth, [0.95, 0.5, 0.3, 0.05]) == 0.3
    # ties keep the first candidate: τ=0.7 and τ=0.8 both flag only the 0.9 step (F1 2/3)
    assert pick_threshold(scores, truth, [0.8, 0.7]) == 0.8


def test_per_class_f1_by_hand():
    pred = torch.tensor([True, True, False, False, True, False])
    true = torch.tensor([True, False, True, False, True, True])
    classes = ["b", "b", "b", "a", "a", "a"]
    out = per_class_f1(pred, true, classes)
    assert list(out) == ["a", "b"]
    # a: steps 3..5 → tp 1 (step 4), fp 0, fn 1 (step 5): P 1, R 1/2, F1 2/3
    assert (out["a"].tp, out["a"].fp, out["a"].fn) == (1, 0, 1)
    assert out["a"].precision == 1.0 and out["a"].recall == 0.5
    assert out["a"].f1 == pytest.approx(2 / 3, rel=1e-12)
    # b: steps 0..2 → tp 1, fp 1, fn 1: F1 2/4
    assert (out["b"].tp, out["b"].fp, out["b"].fn, out["b"].f1) == (1, 1, 1, 0.5)


def test_per_class_f1_lengths_must_match():
    with pytest.raises(ValueError, match="lengths differ"):
        per_class_f1(torch.tensor([True]), torch.tensor([True]), ["a", "b"])
