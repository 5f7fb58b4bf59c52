"""Rebuilding a served reward model from packed weights scores exactly like the original."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from actors.core.ensemble import build_multi_head_reward_model
from actors.core.reward_model import build_reward_model, encode
from actors.core.rm_scoring import build_scorer, reward_members, score_texts
from actors.core.weight_transport import pack_state, unpack_state

PROMPTS = ["\n\nHuman: hi\n\nAssistant:", "Name a color.", "Why?", "Count to three.", "Hm."]
RESPONSES = ["hello there", "blue", "because the sky scatters blue light", "1 2 3", ""]


@pytest.mark.parametrize("members", [1, 3])
def test_rebuilt_scorer_matches_the_trained_model_in_chunks(members):
    original, tokenizer = (build_reward_model("tiny-bert", seed=11) if members == 1
                           else build_multi_head_reward_model("tiny-bert", members, seed=11))
    original.eval()
    state = unpack_state(pack_state(original.state_dict()))
    assert reward_members(state) == members
    scorer, scorer_tokenizer = build_scorer("tiny-bert", members, seed=0)  # other random init
    scorer.load_state_dict(state)
    got = score_texts(scorer, scorer_tokenizer, PROMPTS, RESPONSES, max_length=32, chunk=2)
    tokens = encode(tokenizer, PROMPTS, RESPONSES, 32)
    with torch.no_grad():
        want = original(tokens.input_ids, tokens.attention_mask).view(members, -1)
    assert got.shape == (members, len(PROMPTS))
    # chunks of 2 pad differently from one batch of 5; padding is masked, so only float noise
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not scorer.training and not any(p.requires_grad for p in scorer.parameters())
