"""The PPO actor-critic: a causal LM policy and a scalar value head, in one module.

    logits_t = LM(x ⊕ y)_{start-1+t}            (predicts y_t)
    V_t      = w · h_{start-1+t} + b            (the state before y_t: V(x, y_<t))

where `start` is the column of the first response token. By default the value head reads the
policy's own last hidden state (one backbone, one forward pass: the shared critic of Ziegler et
al. 2019 and OpenAI's summarization work); with `separate_critic` it reads a copy of the policy's
base transformer instead, so value gradients never touch the policy (the TRL/OpenRLHF default).
The value head starts at zero, so V ≡ 0 before the first update (the critic then learns the
returns from scratch instead of from an arbitrary offset).

Only the response columns are computed by the LM head (`logits_to_keep`): with a 30k vocabulary
and a small model the LM head is most of the compute, and the prompt's logits are never used.

One module holds everything the optimizer trains, which is what a DeepSpeed engine wraps; the
policy inside it (`.policy`) is a plain HF model whose `state_dict()` a rollout worker loads.
"""

from __future__ import annotations

import copy
import inspect
from typing import NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel


class PolicyValueOutput(NamedTuple):
    """Response-frame outputs of one forward pass (a NamedTuple: DeepSpeed ZeRO-3 finds the
    tensors of a module's output only in tuples, lists and dicts).

    Attributes:
        logits: `(B, Tr, V)` raw logits (temperature NOT applied); `logits[:, t]` predicts
            response token t.
        values: `(B, Tr)` float32 V(x, y_<t).
    """

    logits: torch.Tensor
    values: torch.Tensor


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, `(B, T)`: what `actors.core.sampling` feeds the
    model, so left padding shifts nothing and recomputed logprobs match the sampler's."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _keeps_logits(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def response_logits(model: PreTrainedModel, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, response_start: int,
                    hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits of the response columns and, with `hidden`, the matching last hidden states.

    Args:
        model: A HF causal LM.
        input_ids: `(B, T)` prompt ⊕ response (prompt left-padded, response right-padded).
        attention_mask: `(B, T)`.
        response_start: Column of the first response token (the prompt width Tp ≥ 1).
        hidden: Also return the final hidden states (after the final norm) of those columns.

    Returns:
        `(logits (B, Tr, V), hidden (B, Tr, H) or None)` with Tr = T − response_start.
    """
    width = input_ids.shape[1] - response_start  # Tr
    keep = {"logits_to_keep": width + 1} if _keeps_logits(model) else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids(attention_mask), use_cache=False,
                output_hidden_states=hidden, **keep)
    logits = out.logits[:, -(width + 1):-1]  # (B, Tr, V): column start-1+t predicts y_t
    states = out.hidden_states[-1][:, response_start - 1:-1] if hidden else None  # (B, Tr, H)
    return logits, states


class PolicyWithValue(nn.Module):
    """A causal LM policy plus a scalar value head (shared backbone or a separate critic).

    Args:
        policy: The HF causal LM being trained (its `state_dict()` is what gets published).
        separate_critic: Give the value head its own copy of the policy's base transformer.
    """

    def __init__(self, policy: PreTrainedModel, separate_critic: bool = False):
        super().__init__()
        self.policy = policy
        self.critic = copy.deepcopy(policy.base_model) if separate_critic else None
        self.value_head = nn.Linear(policy.config.hidden_size, 1, dtype=policy.dtype)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_start: int) -> PolicyValueOutput:
        """Policy logits and values on the response columns.

        Args:
            input_ids: `(B, T)` prompt ⊕ response.
            attention_mask: `(B, T)`.
            response_start: Column of the first response token.

        Returns:
            `PolicyValueOutput` with `(B, Tr, V)` logits and `(B, Tr)` values.
        """
        shared = self.critic is None
        logits, hidden = response_logits(self.policy, input_ids, attention_mask, response_start,
                                         hidden=shared)
        if not shared:
            full = self.critic(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids(attention_mask),
                               use_cache=False).last_hidden_state  # (B, T, H)
            hidden = full[:, response_start - 1:-1]  # (B, Tr, H)
        values = self.value_head(hidden).squeeze(-1).float()  # (B, Tr)
        return PolicyValueOutput(logits=logits, values=values)

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's own state dict (the keys `load_policy`'s model has), detached."""
        return {k: v.detach() for k, v in self.policy.state_dict().items()}
