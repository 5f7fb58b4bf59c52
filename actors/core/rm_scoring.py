"""Scoring rollouts with the served reward model: rebuild it from weights, score (K, N).

The RM trainer publishes weights only (`pack_state` of its module's state dict). A consumer
rebuilds the architecture from the RM's `ModelSpec` name — one scalar head (`RewardModel`) or K
heads on one backbone (`MultiHeadRewardModel`), as the state's head says — and loads the state.
Scores are always `(K, N)` (K = 1 for a single RM), combined by the consumer as rm.ensemble says.

>>> reward_members({"heads.weight": torch.zeros(3, 8)}), reward_members({"head.weight": 0})
(3, 1)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from actors.core.ensemble import build_multi_head_reward_model
from actors.core.reward_model import build_reward_model, encode

MULTI_HEAD_KEY = "heads.weight"
"""The `(K, H)` head of a `MultiHeadRewardModel` state dict (a `RewardModel` has `head.weight`)."""


def reward_members(state: Mapping[str, object]) -> int:
    """K of a reward-model state dict: the rows of its multi-head matrix, else 1."""
    heads = state.get(MULTI_HEAD_KEY)
    return int(heads.shape[0]) if heads is not None else 1


def build_scorer(spec_name: str, members: int, seed: int,
                 dtype: str = "float32") -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The reward-model architecture of `spec_name` with `members` heads, frozen, in eval mode
    and `dtype` (its random weights are meant to be replaced by `load_state_dict`)."""
    model, tokenizer = (build_reward_model(spec_name, seed) if members == 1
                        else build_multi_head_reward_model(spec_name, members, seed))
    return model.to(getattr(torch, dtype)).eval().requires_grad_(False), tokenizer


@torch.no_grad()
def score_texts(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                responses: Sequence[str], max_length: int, chunk: int) -> torch.Tensor:
    """`(K, N)` float32 member rewards of N prompt/response pairs, `chunk` pairs per forward.

    Args:
        model: A `RewardModel` (`(B,)` rewards) or `MultiHeadRewardModel` (`(K, B)`).
        tokenizer: Its tokenizer.
        prompts: N prompts.
        responses: N responses.
        max_length: Token budget of one input (cut from the left, as in training).
        chunk: Pairs per forward pass.
    """
    out = []
    for start in range(0, len(prompts), chunk):
        part = slice(start, start + chunk)
        tokens = encode(tokenizer, prompts[part], responses[part], max_length)
        scores = model(tokens.input_ids, tokens.attention_mask).float()
        out.append(scores.view(-1, tokens.input_ids.shape[0]))  # (K, b)
    return torch.cat(out, dim=1) if out else torch.empty(0, 0)
