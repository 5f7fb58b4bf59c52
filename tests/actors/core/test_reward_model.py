"""Reward model: backbones by name, pooling, left truncation, save/load — with numbers."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2Model

from actors.core.backbones import (
    TINY_BERT,
    BackboneLoadError,
    load_reward_backbone,
    minilm_dir,
)
from actors.core.hh import load_hh_jsonl
from actors.core.reward_model import (
    RewardModel,
    build_reward_model,
    encode,
    join_text,
    load_tokenizer,
    pool_index,
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_dir())


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_reward_model("tiny-bert", seed=0)
    return model.eval(), tok


def test_pool_index_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0],    # right-padded
                         [0, 0, 1, 1, 1],    # left-padded
                         [1, 1, 1, 1, 1]])
    assert pool_index(mask, "first").tolist() == [0, 2, 0]
    assert pool_index(mask, "last").tolist() == [2, 4, 4]


def test_encode_cuts_from_the_left_and_keeps_special_tokens(tokenizer):
    prompt = "\n\nHuman: " + " ".join(f"word{i}" for i in range(40)) + "\n\nAssistant:"
    response = "the very end survives"
    batch = encode(tokenizer, [prompt, "\n\nHuman: hi\n\nAssistant:"], [response, "yo"], 16)
    body = tokenizer(f"{prompt} {response}", add_special_tokens=False)["input_ids"]
    expected = [tokenizer.cls_token_id, *body[-14:], tokenizer.sep_token_id]
    assert batch.input_ids.shape == (2, 16)
    assert batch.input_ids[0].tolist() == expected
    assert tokenizer.decode(batch.input_ids[0, -5:-1]) == "the very end survives"
    short = tokenizer("\n\nHuman: hi\n\nAssistant: yo")["input_ids"]  # right padding
    assert batch.input_ids[1, :len(short)].tolist() == short
    assert batch.attention_mask[1].tolist() == [1] * len(short) + [0] * (16 - len(short))
    assert tokenizer.truncation_side == "right"  # the caller's tokenizer is left as it was


def identical_rows(chosen: dict, rejected: dict) -> int:
    """Pairs whose chosen and rejected inputs are the same token sequence."""
    return sum(torch.equal(c[mc.bool()], r[mr.bool()]) for c, mc, r, mr in zip(
        chosen["input_ids"], chosen["attention_mask"], rejected["input_ids"],
        rejected["attention_mask"], strict=True))


def test_left_truncation_keeps_every_real_hh_pair_distinct(tokenizer, shared_data):
    # RECIPES.md: cutting HH inputs from the right at 256 MiniLM tokens makes 195 of the 1,879
    # pairs identical; from the left, none.
    pairs = load_hh_jsonl(shared_data / "hh-rlhf" / "train.jsonl.gz")
    prompts = [p.prompt for p in pairs]
    left = [vars(encode(tokenizer, prompts, responses, 256))
            for responses in ([p.chosen for p in pairs], [p.rejected for p in pairs])]
    assert tokenizer.truncation_side == "right"
    joined = [[join_text(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
              for responses in ([p.chosen for p in pairs], [p.rejected for p in pairs])]
    right = [tokenizer(texts, max_length=256, truncation=True, padding=True, return_tensors="pt")
             for texts in joined]
    assert (identical_rows(*left), identical_rows(*right)) == (0, 195)


def test_chat_template_is_used_where_the_tokenizer_has_one(tokenizer):
    templated = AutoTokenizer.from_pretrained(minilm_dir())
    templated.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    text = join_text(templated, "\n\nHuman: hi\n\nAssistant:", "yo")
    assert text == "<user>hi<assistant>yo"
    assert join_text(tokenizer, "\n\nHuman: hi\n\nAssistant:", "yo") == (
        "\n\nHuman: hi\n\nAssistant: yo")
    batch = encode(templated, ["\n\nHuman: hi\n\nAssistant:"], ["yo"], 32)
    assert batch.input_ids[0].tolist() == templated(text, add_special_tokens=False)["input_ids"]


def test_tiny_bert_shape_seed_and_dropout(tiny, tokenizer):
    model, tok = tiny
    config = model.backbone.config
    assert {k: getattr(config, k) for k in TINY_BERT} == TINY_BERT
    assert config.vocab_size == len(tokenizer) and model.kind == "encoder"
    again, _ = build_reward_model("tiny-bert", seed=0)
    other, _ = build_reward_model("tiny-bert", seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values(), strict=True))
    assert not torch.equal(model.head.weight, other.head.weight)
    # Head init N(0, 1/(H+1)): 64 draws, std within sampling error of 1/sqrt(65) = 0.124.
    assert model.head.weight.std().item() == pytest.approx(65 ** -0.5, rel=0.25)
    assert model.head.bias is None
    # Dropout is off: two forwards in train mode agree exactly.
    batch = encode(tok, ["\n\nHuman: a b c\n\nAssistant:"] * 2, ["yes", "no"], 32)
    model.train()
    first = model(batch.input_ids, batch.attention_mask)
    assert torch.equal(first, model(batch.input_ids, batch.attention_mask))
    model.eval()


def test_forward_is_the_head_on_the_cls_state_and_ignores_padding(tiny):
    model, tok = tiny
    batch = encode(tok, ["\n\nHuman: hello there\n\nAssistant:", "\n\nHuman: a\n\nAssistant:"],
                   ["a long answer with many words in it", "b"], 64)
    with torch.no_grad():
        rewards = model(batch.input_ids, batch.attention_mask)  # (2,)
        hidden = model.backbone(input_ids=batch.input_ids,
                                attention_mask=batch.attention_mask).last_hidden_state
        alone = model(batch.input_ids[1:, :int(batch.attention_mask[1].sum())],
                      batch.attention_mask[1:, :int(batch.attention_mask[1].sum())])
    assert rewards.shape == (2,) and rewards.dtype == torch.float32
    torch.testing.assert_close(rewards, hidden[:, 0] @ model.head.weight[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(alone, rewards[1:], rtol=1e-5, atol=1e-5)  # padding is inert


def test_decoder_from_a_local_path_pools_the_last_real_token(tmp_path, tokenizer):
    torch.manual_seed(0)
    gpt = GPT2Model(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2,
                               n_head=2))
    gpt.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    backbone, tok, kind = load_reward_backbone(str(tmp_path), seed=0)
    assert kind == "decoder"
    model = RewardModel(backbone, kind).eval()
    assert model.pooling == "last"
    batch = encode(tok, ["\n\nHuman: hi\n\nAssistant:"] * 2, ["short", "a much longer reply"], 32)
    n_short = int(batch.attention_mask[0].sum())
    with torch.no_grad():
        rewards = model(batch.input_ids, batch.attention_mask)
        hidden = backbone(input_ids=batch.input_ids[:1, :n_short]).last_hidden_state  # unpadded
    torch.testing.assert_close(rewards[0], hidden[0, -1] @ model.head.weight[0],
                               rtol=1e-5, atol=1e-5)


def test_minilm_loads_offline():
    backbone, tok, kind = load_reward_backbone("minilm", seed=0)
    assert kind == "encoder"
    assert backbone.config.hidden_size == 384 and backbone.config.num_hidden_layers == 6
    assert sum(p.numel() for p in backbone.parameters()) == 22_713_216  # 22.7M, pooler included
    assert tok.cls_token == "[CLS]"


def test_unknown_backbone_names_the_model(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(BackboneLoadError, match=f"cannot load reward backbone '{missing}'"):
        load_reward_backbone(str(missing), seed=0)


def test_save_load_round_trip(tiny, tmp_path):
    model, tok = tiny
    model.save(tmp_path / "rm", tok)
    meta = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    assert meta == {"format_version": 1, "kind": "encoder", "pooling": "first",
                    "members": 1, "dtype": "float32"}
    loaded = RewardModel.load(tmp_path / "rm")
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 loaded.state_dict().values(), strict=True))
    batch = encode(load_tokenizer(tmp_path / "rm"), ["\n\nHuman: x\n\nAssistant:"] * 2,
                   ["y", "z"], 32)
    with torch.no_grad():
        assert torch.equal(loaded(batch.input_ids, batch.attention_mask),
                           model(batch.input_ids, batch.attention_mask))
    with pytest.raises(FileNotFoundError, match="not a saved RewardModel"):
        RewardModel.load(tmp_path)
