"""`make_judge`: the judge that ``labeling.judge`` names, built from its sub-config."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from actors.core.judges.gold import GoldJudge, Scorer, gold_scorer
from actors.core.judges.http_judge import HttpJudge
from actors.core.judges.protocol import Judge
from actors.core.judges.simulated import SimulatedAnnotator
from actors.core.judges.verifier import MathVerifier

if TYPE_CHECKING:
    from loop.config import LabelingConfig


def make_judge(
    cfg: LabelingConfig,
    *,
    gold: Scorer | str | None = None,
    answers: Mapping[str, str] | Callable[[str], str | None] | None = None,
    seed: int = 0,
    env: Mapping[str, str] | None = None,
) -> Judge:
    """The judge of ``cfg.judge``.

    Args:
        cfg: The ``labeling`` section.
        gold: The gold reward of the ``gold`` and ``simulated`` judges: a `Scorer`, or a name
            for `gold_scorer` (``lexicon`` or a saved reward-model directory).
        answers: Reference answers of the ``verifier`` judge (prompt → answer).
        seed: Seed of the simulated annotator's per-comparison draws (the campaign seed).
        env: Environment of the ``http`` judge (default ``os.environ``).

    Raises:
        ValueError: A judge that needs ``gold`` or ``answers`` did not get it.
    """
    if cfg.judge in ("gold", "simulated"):
        if gold is None:
            raise ValueError(f"labeling.judge={cfg.judge!r} needs a gold reward: pass gold= "
                             "a Scorer, 'lexicon', or a saved reward-model directory")
        scorer = gold_scorer(gold) if isinstance(gold, str) else gold
        if cfg.judge == "gold":
            return GoldJudge(scorer)
        return SimulatedAnnotator(scorer, cfg.biases, cfg.noise_temperature, seed)
    if cfg.judge == "verifier":
        if answers is None:
            raise ValueError("labeling.judge='verifier' needs reference answers: pass answers= "
                             "a mapping or function from prompt text to the final answer")
        return MathVerifier(answers)
    if cfg.judge == "http":
        return HttpJudge.from_config(cfg.http, env)
    raise ValueError(f"labeling.judge={cfg.judge!r}: expected gold, simulated, verifier or http")
