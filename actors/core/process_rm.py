"""A process reward model (PRM): one score per solution step (Lightman et al. 2023).

    z_s = w · h(t_s) + b,      p_s = σ(z_s) = P(step s is correct)

where t_s is the position of the marker token that closes step s. The input is

    [CLS] question M step_1 M step_2 M … step_S M          (M = the step marker)

built from token ids, piece by piece, so the marker positions are recorded, never searched for:
a step's own text may contain the marker's token and no step is mis-scored. On BERT-like
tokenizers the default marker is the separator token ([SEP]), which the encoder already reads as
a boundary; on decoders it is "\\n\\n" (tokenized on its own). Inputs are cut from the LEFT (after
the leading [CLS]/BOS), so the LATER steps survive; a step whose marker was cut gets mask 0.

Training is masked binary cross-entropy on the step labels. A solution score aggregates the
step probabilities (`min`, `product`, or `last`). PPO gets `step_rewards` = log p_s: their sum
over a solution is log of the `product` score, and a confident correct step costs ≈ 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from actors.core.backbones import Kind
from actors.core.prm_data import StepExample
from actors.core.reward_model import init_head_, prepare_backbone

Aggregation = Literal["min", "product", "last"]


@dataclass(frozen=True)
class StepBatch:
    """Tokenized question + steps, with the position of each step's marker.

    Attributes:
        input_ids: `(B, T)` int64, right-padded.
        attention_mask: `(B, T)` int64, 1 on real tokens.
        step_positions: `(B, S)` int64, position of the marker closing step s (0 where masked).
        step_mask: `(B, S)` bool, True where step s exists and its marker survived truncation.
        labels: `(B, S)` float32 step labels (1 correct, 0 wrong; 0 where masked).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    step_positions: torch.Tensor
    step_mask: torch.Tensor
    labels: torch.Tensor


def default_marker(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's separator token if it has one (BERT: "[SEP]"), else "\\n\\n"."""
    return tokenizer.sep_token if tokenizer.sep_token is not None else "\n\n"


def _prefix_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    for token_id in (tokenizer.cls_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return [token_id]
    return []


def _row_ids(tokenizer: PreTrainedTokenizerBase, question: str, steps: Sequence[str],
             marker_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """One row: `(ids, marker position per step, -1 where cut)` after left truncation."""
    prefix = _prefix_ids(tokenizer)
    pieces = tokenizer([question, *steps], add_special_tokens=False)["input_ids"]
    ids, ends = [], []
    for piece in pieces:
        ids += piece + marker_ids
        ends.append(len(ids) - 1)  # the last marker token closes the piece
    cut = max(0, len(ids) - (max_length - len(prefix)))
    positions = [end - cut + len(prefix) if end >= cut else -1 for end in ends[1:]]
    return prefix + ids[cut:], positions


def encode_steps(tokenizer: PreTrainedTokenizerBase, examples: Sequence[StepExample],
                 max_length: int, marker: str | None = None) -> StepBatch:
    """Tokenize step examples for a `ProcessRewardModel`, cut from the left.

    Args:
        tokenizer: The backbone's tokenizer.
        examples: `B` step examples.
        max_length: Token budget per row, the leading [CLS]/BOS included.
        marker: Text closing every piece (question and each step); default `default_marker`.
            The score of step s is read at the last token of the marker after it.

    Returns:
        A `StepBatch` of shape `(B, T)` tokens and `(B, S_max)` steps.
    """
    marker_ids = tokenizer(marker if marker is not None else default_marker(tokenizer),
                           add_special_tokens=False)["input_ids"]
    if not marker_ids:
        raise ValueError(f"marker {marker!r} tokenizes to no tokens")
    rows = [_row_ids(tokenizer, ex.question, ex.steps, marker_ids, max_length)
            for ex in examples]
    width = max(len(ids) for ids, _ in rows)  # T
    steps = max(max((len(ex.steps) for ex in examples), default=0), 1)  # S_max
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.full((len(rows), steps), -1, dtype=torch.long)
    labels = torch.zeros((len(rows), steps), dtype=torch.float32)
    for b, ((ids, pos), ex) in enumerate(zip(rows, examples, strict=True)):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        attention_mask[b, :len(ids)] = 1
        positions[b, :len(pos)] = torch.tensor(pos, dtype=torch.long)
        labels[b, :len(ex.labels)] = torch.tensor(ex.labels, dtype=torch.float32)
    step_mask = positions >= 0  # (B, S)
    return StepBatch(input_ids, attention_mask, positions.clamp(min=0), step_mask,
                     labels * step_mask)


class ProcessRewardModel(nn.Module):
    """Backbone + a linear head read at every step marker: `forward -> (B, S)` logits."""

    def __init__(self, backbone: PreTrainedModel, kind: Kind):
        super().__init__()
        self.backbone = backbone
        self.kind: Kind = kind
        # A bias, unlike the Bradley–Terry RM: BCE sees absolute logits, so it learns the base rate.
        self.head = nn.Linear(backbone.config.hidden_size, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                step_positions: torch.Tensor) -> torch.Tensor:
        """Per-step logits z_s = log-odds that step s is correct.

        Args:
            input_ids: `(B, T)` token ids.
            attention_mask: `(B, T)`, 1 on real tokens.
            step_positions: `(B, S)` marker positions (any valid index where masked).

        Returns:
            `(B, S)` float32 logits; entries outside the step mask are meaningless.
        """
        hidden = self.backbone(input_ids=input_ids,
                               attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        index = step_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # (B, S, H)
        at_markers = hidden.gather(1, index)  # (B, S, H)
        return self.head(at_markers).squeeze(-1).float()  # (B, S)


def build_process_reward_model(
    spec_name: str, seed: int
) -> tuple[ProcessRewardModel, PreTrainedTokenizerBase]:
    """A fresh PRM on a named backbone (`minilm`, `tiny-bert`, …) with a seeded head.

    The head starts at w ~ N(0, 1/(H+1)), b = 0, so initial logits are O(1).
    """
    backbone, tokenizer, kind = prepare_backbone(spec_name, seed)
    model = ProcessRewardModel(backbone, kind)
    init_head_(model.head, seed)
    return model, tokenizer


def masked_step_bce(logits: torch.Tensor, labels: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the valid steps of the batch.

        L = − Σ_{b,s} m_bs [y_bs log σ(z_bs) + (1 − y_bs) log(1 − σ(z_bs))] / Σ m_bs

    Args:
        logits: `(B, S)` step logits.
        labels: `(B, S)` 1 correct / 0 wrong.
        mask: `(B, S)` bool, True on valid steps (at least one).

    Returns:
        Scalar loss.
    """
    per_step = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype),
                                                  reduction="none")  # (B, S)
    weight = mask.to(logits.dtype)  # (B, S)
    return (per_step * weight).sum() / weight.sum()


def step_rewards(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PPO's per-step rewards: log p_s = log σ(z_s) ≤ 0, and 0 on padding.

    Args:
        logits: `(B, S)` step logits.
        mask: `(B, S)` bool.

    Returns:
        `(B, S)` rewards; a row sums to log of its `product` aggregate.
    """
    return torch.where(mask, F.logsigmoid(logits), torch.zeros_like(logits))  # (B, S)


def aggregate(step_scores: torch.Tensor, mask: torch.Tensor, how: Aggregation) -> torch.Tensor:
    """Solution score from step probabilities: their min, product, or the last valid one.

    Args:
        step_scores: `(B, S)` step probabilities p_s.
        mask: `(B, S)` bool; every row needs at least one valid step.
        how: `"min"`, `"product"` or `"last"`.

    Returns:
        `(B,)` solution scores.
    """
    if not bool(mask.any(-1).all()):
        raise ValueError("every row needs at least one valid step to aggregate")
    if how == "min":
        return torch.where(mask, step_scores, torch.inf).amin(-1)  # (B,)
    if how == "product":
        return torch.where(mask, step_scores, torch.ones_like(step_scores)).prod(-1)  # (B,)
    if how == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)  # (S,)
        last = torch.where(mask, positions, -1).argmax(-1)  # (B,)
        return step_scores.gather(1, last.unsqueeze(-1)).squeeze(-1)  # (B,)
    raise ValueError(f"how must be 'min', 'product' or 'last', got {how!r}")


@dataclass(frozen=True)
class StepErrorF1:
    """Precision, recall and F1 of the "wrong step" class (a 0/0 ratio counts as 0).

    Attributes:
        precision: tp / (tp + fp).
        recall: tp / (tp + fn).
        f1: 2 tp / (2 tp + fp + fn).
        tp: Wrong steps flagged wrong.
        fp: Correct steps flagged wrong.
        fn: Wrong steps missed.
    """

    precision: float
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int


def step_error_f1(pred_wrong: torch.Tensor, true_wrong: torch.Tensor) -> StepErrorF1:
    """Step-error metrics over valid steps.

    Args:
        pred_wrong: `(N,)` bool, the model flags the step as wrong.
        true_wrong: `(N,)` bool, the step is labelled wrong.
    """
    pred, true = pred_wrong.bool().flatten(), true_wrong.bool().flatten()
    if pred.shape != true.shape:
        raise ValueError(f"shapes differ: {tuple(pred.shape)} vs {tuple(true.shape)}")
    tp = int((pred & true).sum())
    fp = int((pred & ~true).sum())
    fn = int((~pred & true).sum())

    def ratio(num: int, den: int) -> float:
        return num / den if den else 0.0

    return StepErrorF1(ratio(tp, tp + fp), ratio(tp, tp + fn), ratio(2 * tp, 2 * tp + fp + fn),
                       tp, fp, fn)
