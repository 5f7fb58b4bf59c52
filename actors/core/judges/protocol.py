"""The one judge protocol: a comparison in, a choice with confidence and rationale out.

Every judge — gold reward, simulated annotator, math verifier, HTTP LLM judge — implements
`Judge`. A judge may abstain (``choice=None``): the labeler then records nothing and gives the
comparison back to the queue for another judge or a human.

>>> Judgment("a", 0.9, "a is correct").abstained
False
>>> Judgment(None, 0.0, "unparseable").abstained
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

Choice = Literal["a", "b", "tie"]
CHOICES: tuple[str, ...] = ("a", "b", "tie")
JudgeKind = Literal["gold", "ai"]


@dataclass(frozen=True)
class JudgeInput:
    """One comparison to judge.

    Attributes:
        prompt: The prompt both responses answer.
        response_a: The first response.
        response_b: The second response.
        steps_a: The reasoning steps of ``response_a`` where the generator split them (None:
            unknown); a process verifier can judge them one by one.
        steps_b: Likewise for ``response_b``.
    """

    prompt: str
    response_a: str
    response_b: str
    steps_a: tuple[str, ...] | None = None
    steps_b: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Judgment:
    """A judge's verdict on one `JudgeInput`.

    Attributes:
        choice: ``a``, ``b``, ``tie``, or None when the judge abstains.
        confidence: The judge's probability, in [0, 1], that its choice is right (each judge
            documents how it computes it; 0 for an abstention).
        rationale: A short human-readable reason.
    """

    choice: Choice | None
    confidence: float
    rationale: str

    def __post_init__(self) -> None:
        if self.choice is not None and self.choice not in CHOICES:
            raise ValueError(f"Judgment.choice must be one of {CHOICES} or None, got "
                             f"{self.choice!r}")
        if not (isinstance(self.confidence, int | float) and math.isfinite(self.confidence)
                and 0.0 <= self.confidence <= 1.0):
            raise ValueError(f"Judgment.confidence must be a number in [0, 1], got "
                             f"{self.confidence!r}")

    @property
    def abstained(self) -> bool:
        """True when the judge gave no verdict."""
        return self.choice is None


def abstain(reason: str) -> Judgment:
    """A `Judgment` with no verdict."""
    return Judgment(None, 0.0, reason)


@runtime_checkable
class Judge(Protocol):
    """Judges comparisons in a batch (one verdict per input, in order).

    ``kind`` is the ledger's labeler kind of the verdicts: ``gold`` (a reference the RM never
    trains on, only measures with) or ``ai``.
    """

    kind: JudgeKind

    def judge(self, items: Sequence[JudgeInput]) -> list[Judgment]: ...
