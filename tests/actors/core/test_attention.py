"""The reward backbone's attention kernels: `scaled_query` computes what "eager" computes, and
"auto" picks it only for bfloat16 on a CPU."""

from __future__ import annotations

import pytest
import torch

from actors.core.backbones import pick_attention, scaled_query_attention, set_attention
from actors.core.reward_model import build_reward_model, encode

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def reference_attention(query, key, value, additive_mask):
    """softmax(q kᵀ / √d + mask) v, written out, in float64: `(B, T, H, d)` like transformers."""
    q, k, v = (t.double() for t in (query, key, value))
    scores = q @ k.transpose(2, 3) / q.shape[-1] ** 0.5 + additive_mask.double()
    return (scores.softmax(-1) @ v).transpose(1, 2)


def test_scaled_query_equals_written_out_attention_with_padding():
    generator = torch.Generator().manual_seed(3)
    query, key, value = (torch.randn(2, 3, 5, 4, generator=generator) for _ in range(3))
    mask = torch.zeros(2, 1, 5, 5)
    mask[1, :, :, 3:] = torch.finfo(torch.float32).min  # row 1: last 2 keys are padding
    module = torch.nn.Module().eval()
    out, weights = scaled_query_attention(module, query, key, value, mask)
    assert out.shape == (2, 5, 3, 4) and weights.shape == (2, 3, 5, 5)
    torch.testing.assert_close(out.double(), reference_attention(query, key, value, mask),
                               atol=1e-6, rtol=1e-6)
    assert weights[1, :, :, 3:].abs().max() == 0  # no weight on padding
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 5))


def test_scaled_query_gradients_equal_eager_on_a_reward_model():
    model, tokenizer = build_reward_model("tiny-bert", seed=0)
    tokens = encode(tokenizer, ["Human: hi\n\nAssistant:"] * 3,
                    ["hello there, friend", "no", "a much longer reply than the others"], 64)
    grads = {}
    for kernel in ("eager", "scaled_query"):
        set_attention(model.backbone, kernel)
        model.zero_grad()
        rewards = model(tokens.input_ids, tokens.attention_mask)
        rewards.sum().backward()
        grads[kernel] = (rewards.detach(), [p.grad.clone() for p in model.parameters()
                                            if p.grad is not None])
    (r_eager, g_eager), (r_scaled, g_scaled) = grads["eager"], grads["scaled_query"]
    assert model.backbone.config._attn_implementation == "scaled_query"
    torch.testing.assert_close(r_scaled, r_eager, atol=1e-5, rtol=1e-5)
    assert len(g_scaled) == len(g_eager) > 10
    for a, b in zip(g_scaled, g_eager, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("requested", "dtype", "device", "expected"), [
    ("auto", torch.bfloat16, CPU, "scaled_query"),
    ("auto", torch.float32, CPU, "sdpa"),
    ("auto", torch.bfloat16, CUDA, "sdpa"),
    ("eager", torch.bfloat16, CPU, "eager"),
    ("sdpa", torch.bfloat16, CPU, "sdpa"),
])
def test_auto_picks_scaled_query_only_for_bf16_on_cpu(requested, dtype, device, expected):
    assert pick_attention(requested, dtype, device) == expected
