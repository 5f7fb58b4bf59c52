"""Judges: one protocol (`Judge`), many kinds — gold reward, simulated annotator, math verifier,
HTTP LLM judge — and `make_judge`, which builds the one ``labeling.judge`` names."""

from actors.core.judges.factory import make_judge
from actors.core.judges.gold import (
    FunctionScorer,
    GoldJudge,
    LexiconScorer,
    RewardModelScorer,
    Scorer,
    gold_scorer,
)
from actors.core.judges.http_judge import HttpJudge, HttpJudgeError
from actors.core.judges.protocol import Judge, JudgeInput, Judgment
from actors.core.judges.simulated import SimulatedAnnotator
from actors.core.judges.verifier import MathVerifier

__all__ = [
    "FunctionScorer",
    "GoldJudge",
    "HttpJudge",
    "HttpJudgeError",
    "Judge",
    "JudgeInput",
    "Judgment",
    "LexiconScorer",
    "MathVerifier",
    "RewardModelScorer",
    "Scorer",
    "SimulatedAnnotator",
    "gold_scorer",
    "make_judge",
]
