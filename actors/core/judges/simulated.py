"""A simulated annotator: the gold reward, plus human-like biases, plus Bradley–Terry noise.

The annotator's utility of response y to prompt x is the gold reward plus the biases that the
known reward hacks exploit (weights from `loop.config.SimulatedBiases`, features from
`actors.core.text_features`):

    u(x, y) = r_gold(x, y) + w_len · chars(y)/100 + w_fmt · markers(y)
              + w_conf · (confident(y) − hedges(y)) + w_syc · agreement(x, y)

and it prefers a to b with the Bradley–Terry probability at temperature T (Bradley & Terry
1952; T plays the role of annotator noise):

    P(a) = σ((u_a − u_b) / T),   T = 0: always the higher utility (tie on exactly equal)

The uniform draw of each comparison is the first 64 bits of sha256(seed, prompt, a, b) / 2^64:
a retried or re-claimed comparison gets the same label whichever labeler judges it, and no RNG
state is shared between comparisons. ``confidence`` is σ(|u_a − u_b| / T), the annotator's
certainty about the pair, whichever way the draw fell.

>>> from actors.core.judges.gold import FunctionScorer
>>> zero = FunctionScorer(lambda prompt, response: 0.0)
>>> biased = SimulatedAnnotator(zero, LENGTH_ONLY, temperature=0.0)
>>> biased.judge([JudgeInput("q", "short", "a much longer answer")])[0].choice
'b'
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from actors.core.judges.gold import Scorer, score_all, sigmoid
from actors.core.judges.protocol import JudgeInput, JudgeKind, Judgment
from actors.core.text_features import text_features


class BiasWeights(Protocol):
    """The weights of `loop.config.SimulatedBiases` (any object with these attributes)."""

    length: float
    formatting: float
    confidence: float
    sycophancy: float


@dataclass(frozen=True)
class _Weights:
    length: float = 0.0
    formatting: float = 0.0
    confidence: float = 0.0
    sycophancy: float = 0.0


NO_BIASES: BiasWeights = _Weights()
LENGTH_ONLY: BiasWeights = _Weights(length=1.0)


def bias_term(biases: BiasWeights, prompt: str, response: str) -> float:
    """The bias part of the utility: u − r_gold (see the module docstring)."""
    f = text_features(response, prompt)
    return (biases.length * f.chars / 100.0 + biases.formatting * f.formatting.total
            + biases.confidence * (f.confident - f.hedges) + biases.sycophancy * f.agreement)


def uniform_draw(seed: int, item: JudgeInput) -> float:
    """The comparison's uniform draw in [0, 1): sha256 of (seed, prompt, a, b), first 64 bits."""
    text = "\x1f".join((str(seed), item.prompt, item.response_a, item.response_b))
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def bt_choice(delta: float, temperature: float, u: float) -> tuple[str, float, float]:
    """Bradley–Terry choice ``(choice, P(a), confidence)`` for utility gap ``delta``."""
    if temperature == 0.0:
        p_a = 1.0 if delta > 0 else 0.0 if delta < 0 else 0.5
        choice = "a" if delta > 0 else "b" if delta < 0 else "tie"
        return choice, p_a, 0.5 if delta == 0 else 1.0
    p_a = sigmoid(delta / temperature)
    return ("a" if u < p_a else "b"), p_a, sigmoid(abs(delta) / temperature)


class SimulatedAnnotator:
    """Gold + biases + Bradley–Terry noise (see the module docstring).

    Args:
        scorer: The gold reward.
        biases: Bias weights (e.g. ``cfg.labeling.biases``); None: no biases.
        temperature: T ≥ 0 (``cfg.labeling.noise_temperature``).
        seed: Seed of the per-comparison draws (the campaign seed).
    """

    kind: JudgeKind = "ai"

    def __init__(self, scorer: Scorer, biases: BiasWeights | None = None,
                 temperature: float = 1.0, seed: int = 0):
        if not (math.isfinite(temperature) and temperature >= 0.0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        self.scorer = scorer
        self.biases = biases if biases is not None else NO_BIASES
        self.temperature, self.seed = float(temperature), seed

    def utilities(self, items: Sequence[JudgeInput]) -> tuple[list[float], list[float]]:
        """``(u_a, u_b)``: the annotator's utilities of both responses of every item."""
        n = len(items)
        prompts = [it.prompt for it in items]
        gold = score_all(self.scorer, prompts * 2,
                         [it.response_a for it in items] + [it.response_b for it in items])
        u_a = [g + bias_term(self.biases, it.prompt, it.response_a)
               for g, it in zip(gold[:n], items, strict=True)]
        u_b = [g + bias_term(self.biases, it.prompt, it.response_b)
               for g, it in zip(gold[n:], items, strict=True)]
        return u_a, u_b

    def judge(self, items: Sequence[JudgeInput]) -> list[Judgment]:
        u_a, u_b = self.utilities(items)
        out = []
        for it, ua, ub in zip(items, u_a, u_b, strict=True):
            choice, p_a, confidence = bt_choice(ua - ub, self.temperature,
                                                uniform_draw(self.seed, it))
            out.append(Judgment(choice, confidence,  # type: ignore[arg-type]
                                f"simulated: utility a={ua:.4g} b={ub:.4g}, P(a)={p_a:.3f}"))
        return out
