"""A scalar reward model: an HF backbone, one pooled token, a linear head (Stiennon et al. 2020).

    r(x, y) = w · h_pool(x ⊕ y)

Encoders pool the first token ([CLS]); decoders pool the last non-pad token, the only one that
has attended to the whole response. Inputs are cut from the LEFT, so the end of the response (the
part where two HH replies differ) always survives truncation.

Dropout is switched off in the backbone: rewards are then deterministic, and a data-parallel group
of W ranks computes exactly the gradient one rank would (no per-rank dropout masks).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from actors.core.backbones import Kind, load_reward_backbone
from actors.core.hh import transcript_messages

Pooling = Literal["first", "last"]
FORMAT_VERSION = 1
META_FILE = "reward_model.json"
HEAD_FILE = "head.safetensors"
BACKBONE_DIR = "backbone"


@dataclass(frozen=True)
class TokenBatch:
    """Tokenized prompt + response inputs.

    Attributes:
        input_ids: `(B, T)` int64 token ids, padded to the longest row (T ≤ max_length).
        attention_mask: `(B, T)` int64, 1 on real tokens, 0 on padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0, in the modules and in the HF config (so it saves)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key, value in list(vars(config).items() if config is not None else []):
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)


def freeze_pooler(backbone: PreTrainedModel) -> None:
    # A BERT-style pooler never gets a gradient (we read the hidden state): freeze it so that
    # optimizers built over the trainable parameters skip it. It is kept so checkpoints round-trip.
    pooler = getattr(backbone, "pooler", None)
    if isinstance(pooler, nn.Module):
        pooler.requires_grad_(False)


def pool_index(attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Index of the pooled token per row: the first or the last position with mask 1.

    Works for left and right padding. `attention_mask` is `(B, T)`; returns `(B,)` int64.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (T,)
    real = attention_mask.bool()  # (B, T)
    if pooling == "first":
        return torch.where(real, -positions, -attention_mask.shape[1]).argmax(-1)
    return torch.where(real, positions, -1).argmax(-1)


class RewardModel(nn.Module):
    """Backbone + scalar head. `forward(input_ids, attention_mask) -> (B,)` rewards."""

    def __init__(self, backbone: PreTrainedModel, kind: Kind):
        super().__init__()
        self.backbone = backbone
        self.kind: Kind = kind
        self.pooling: Pooling = "first" if kind == "encoder" else "last"
        # No bias: Bradley–Terry sees only r_w − r_l, so a bias would get a zero gradient, and
        # Adam would turn float noise in it into O(lr) random-walk steps.
        self.head = nn.Linear(backbone.config.hidden_size, 1, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Score a batch.

        Args:
            input_ids: `(B, T)` token ids.
            attention_mask: `(B, T)`, 1 on real tokens.

        Returns:
            `(B,)` float32 rewards.
        """
        hidden = self.backbone(input_ids=input_ids,
                               attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        rows = torch.arange(hidden.shape[0], device=hidden.device)  # (B,)
        pooled = hidden[rows, pool_index(attention_mask, self.pooling)]  # (B, H)
        return self.head(pooled).squeeze(-1).float()  # (B,)

    def save(self, directory: str | Path,
             tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        """Write `backbone/` (save_pretrained, + tokenizer), `head.safetensors` and metadata."""
        save_parts(directory, self.backbone, self.head, self.kind, self.pooling, tokenizer)

    @classmethod
    def load(cls, directory: str | Path) -> RewardModel:
        """Load what `save` wrote (in the dtype it was saved in)."""
        backbone, head, meta = load_parts(directory)
        if head["weight"].shape[0] != 1:
            raise ValueError(f"{directory} holds a {head['weight'].shape[0]}-member ensemble: "
                             "load it with actors.core.ensemble.load_reward_model")
        model = cls(backbone, meta["kind"]).to(backbone.dtype)
        model.pooling = meta["pooling"]
        model.head.load_state_dict(head)
        return model.eval()


def save_parts(directory: str | Path, backbone: PreTrainedModel, head: nn.Linear, kind: Kind,
               pooling: Pooling, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """The on-disk layout of every reward model: `backbone/` (save_pretrained, + tokenizer),
    `head.safetensors` (the `(K, H)` head weight; K = 1 for a single RM) and `reward_model.json`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    backbone.save_pretrained(out / BACKBONE_DIR)
    if tokenizer is not None:
        tokenizer.save_pretrained(out / BACKBONE_DIR)
    weights = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(weights, out / HEAD_FILE)
    meta = {"format_version": FORMAT_VERSION, "kind": kind, "pooling": pooling,
            "members": head.out_features,
            "dtype": str(head.weight.dtype).removeprefix("torch.")}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def load_parts(directory: str | Path) -> tuple[PreTrainedModel, dict[str, torch.Tensor], dict]:
    """Backbone (pooler frozen, dropout off, in the saved dtype), head tensors and metadata of
    a directory `save_parts` wrote."""
    src = Path(directory)
    if not (src / META_FILE).is_file():
        raise FileNotFoundError(f"{src / META_FILE} is missing: not a saved RewardModel")
    meta = json.loads((src / META_FILE).read_text(encoding="utf-8"))
    backbone = AutoModel.from_pretrained(src / BACKBONE_DIR, dtype=getattr(torch, meta["dtype"]))
    freeze_pooler(backbone)
    disable_dropout(backbone)
    return backbone, load_file(src / HEAD_FILE), meta


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer that `RewardModel.save(directory, tokenizer)` wrote."""
    return AutoTokenizer.from_pretrained(Path(directory) / BACKBONE_DIR)


def build_reward_model(
    spec_name: str, seed: int
) -> tuple[RewardModel, PreTrainedTokenizerBase]:
    """A fresh reward model: a named backbone (see `load_reward_backbone`) + a seeded head.

    The head starts at w ~ N(0, 1/(H+1)) (as in Stiennon et al. 2020), so initial rewards are
    O(1) whatever the hidden size.
    """
    backbone, tokenizer, kind = prepare_backbone(spec_name, seed)
    model = RewardModel(backbone, kind)
    init_head_(model.head, seed)
    return model, tokenizer


def prepare_backbone(spec_name: str, seed: int
                     ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """`load_reward_backbone` with the pooler frozen and dropout off (what every head trains
    on: deterministic forward passes, no parameters that get no gradient)."""
    backbone, tokenizer, kind = load_reward_backbone(spec_name, seed)
    freeze_pooler(backbone)
    disable_dropout(backbone)
    return backbone, tokenizer, kind


def init_head_(head: nn.Linear, seed: int) -> None:
    """In place: w ~ N(0, 1/(H+1)) from a generator seeded with `seed`, bias (if any) 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator)
                          / math.sqrt(head.in_features + 1))
        if head.bias is not None:
            head.bias.zero_()


def join_text(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> str:
    """Prompt + response as one string: the chat template where the tokenizer has one, else the
    plain concatenation `prompt + " " + response` (HH prompts end with "Assistant:")."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(transcript_messages(prompt, response),
                                             tokenize=False)
    return f"{prompt} {response}"


def encode(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int,
) -> TokenBatch:
    """Tokenize prompt + response pairs, cut from the LEFT to `max_length` tokens.

    Special tokens ([CLS] … [SEP]) are added after the cut, so they survive it; with a chat
    template the template supplies them instead.

    Args:
        tokenizer: The backbone's tokenizer.
        prompts: `B` prompts.
        responses: `B` responses, one per prompt.
        max_length: Token budget of one input, special tokens included.

    Returns:
        A `TokenBatch` of shape `(B, T)`, right-padded to the longest row (so decoders'
        position ids need no shift).
    """
    texts = [join_text(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    templated = bool(getattr(tokenizer, "chat_template", None))
    sides = tokenizer.truncation_side, tokenizer.padding_side
    tokenizer.truncation_side, tokenizer.padding_side = "left", "right"
    try:
        batch = tokenizer(texts, max_length=max_length, truncation=True, padding=True,
                          add_special_tokens=not templated, return_tensors="pt")
    finally:
        tokenizer.truncation_side, tokenizer.padding_side = sides
    return TokenBatch(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
