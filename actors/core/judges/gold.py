"""Gold judges: a reference reward the loop never trains on, used to measure Goodhart.

A gold judge compares two responses by a programmatic `Scorer`'s rewards r(x, y) and picks the
higher one (Gao et al. 2022 measure over-optimization against such a "gold" reward):

    Δ = r(x, y_a) − r(x, y_b),   choice = a if Δ > 0, b if Δ < 0, tie if Δ = 0,
    confidence = σ(|Δ|)   (the Bradley–Terry probability that the chosen response wins)

Built-in scorers: `RewardModelScorer`, a reward model saved once (`RewardModel.save`) and frozen;
`LexiconScorer`, a transparent toy task; `FunctionScorer`, any Python function.

>>> judge = GoldJudge(FunctionScorer(lambda prompt, response: float(len(response))))
>>> judge.judge([JudgeInput("q", "long answer", "short")])[0].choice
'a'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from actors.core.judges.protocol import JudgeInput, JudgeKind, Judgment
from actors.core.text_features import words


def sigmoid(x: float) -> float:
    """σ(x) = 1 / (1 + e^−x), without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


@runtime_checkable
class Scorer(Protocol):
    """A reward r(prompt, response); larger is better."""

    def reward(self, prompt: str, response: str) -> float: ...


@runtime_checkable
class BatchScorer(Scorer, Protocol):
    """A `Scorer` that also scores many pairs at once (a neural RM batches its forward)."""

    def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...


def score_all(scorer: Scorer, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Rewards of N prompt/response pairs (one batch call where the scorer has one).

    Raises:
        ValueError: A reward that is not a finite number (naming the pair's index).
    """
    if isinstance(scorer, BatchScorer):
        values = [float(r) for r in scorer.rewards(prompts, responses)]
    else:
        values = [float(scorer.reward(p, r)) for p, r in zip(prompts, responses, strict=True)]
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{type(scorer).__name__} returned non-finite rewards at pairs {bad}")
    return values


class FunctionScorer:
    """Wraps a plain function ``f(prompt, response) -> float`` as a `Scorer`.

    The function must be picklable (a module-level function) to travel to a Ray actor.
    """

    def __init__(self, fn: Callable[[str, str], float]):
        self.fn = fn

    def reward(self, prompt: str, response: str) -> float:
        return float(self.fn(prompt, response))


POSITIVE_WORDS = frozenset({
    "good", "great", "excellent", "helpful", "happy", "wonderful", "love", "best", "clear",
    "kind", "thanks", "thank", "glad", "nice", "safe", "correct",
})
NEGATIVE_WORDS = frozenset({
    "bad", "terrible", "awful", "hate", "worst", "wrong", "sad", "useless", "stupid", "harm",
    "poor", "angry",
})


class LexiconScorer:
    """A toy gold reward: positive sentiment, with a penalty for running long.

        r(x, y) = #positive words − #negative words − penalty · max(0, #words − max_words)

    With ``max_positive`` set, praise saturates: positive words past the first
    ``max_positive`` count −1 each (gushing reads worse, not better), so
    r = min(p, m) − max(0, p − m) − #negative − … for p positive words.

    The analogue of the "write positive movie reviews" task (Ziegler et al. 2019) with an
    explicit length budget, so that an annotator biased toward length is measurably wrong
    against gold once responses run past ``max_words``. Words are matched lower-cased (see
    `actors.core.text_features.words`); the prompt is ignored.

    >>> scorer = LexiconScorer(max_words=4, overlength_penalty=0.5)
    >>> scorer.reward("", "Good, great: not bad at all")  # (2 − 1) − 0.5 · (6 − 4)
    0.0
    """

    def __init__(self, positive: frozenset[str] = POSITIVE_WORDS,
                 negative: frozenset[str] = NEGATIVE_WORDS, max_words: int = 40,
                 overlength_penalty: float = 0.1, max_positive: int | None = None):
        self.positive, self.negative = positive, negative
        self.max_words, self.overlength_penalty = max_words, overlength_penalty
        self.max_positive = max_positive

    def reward(self, prompt: str, response: str) -> float:
        tokens = [w.lower() for w in words(response)]
        positive = sum(w in self.positive for w in tokens)
        negative = sum(w in self.negative for w in tokens)
        if self.max_positive is not None and positive > self.max_positive:
            positive = 2 * self.max_positive - positive  # m − (p − m)
        return positive - negative - self.overlength_penalty * max(0, len(tokens) - self.max_words)


class RewardModelScorer:
    """A frozen reward model read from a directory that `RewardModel.save` wrote.

    The model is loaded on first use (so the scorer pickles cheaply into a Ray actor) and runs
    in eval mode without gradients, ``batch_size`` pairs per forward.
    """

    def __init__(self, directory: str | Path, max_length: int = 512, batch_size: int = 32):
        self.directory = Path(directory)
        self.max_length, self.batch_size = max_length, batch_size
        self._loaded: tuple[Any, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_loaded": None}

    def _model(self) -> tuple[Any, Any]:
        if self._loaded is None:
            from actors.core.reward_model import RewardModel, load_tokenizer

            self._loaded = RewardModel.load(self.directory), load_tokenizer(self.directory)
        return self._loaded

    def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        import torch

        from actors.core.reward_model import encode

        model, tokenizer = self._model()
        out: list[float] = []
        with torch.no_grad():
            for s in range(0, len(prompts), self.batch_size):
                batch = encode(tokenizer, prompts[s:s + self.batch_size],
                               responses[s:s + self.batch_size], self.max_length)
                out += model(batch.input_ids, batch.attention_mask).tolist()  # (B,)
        return out

    def reward(self, prompt: str, response: str) -> float:
        return self.rewards([prompt], [response])[0]


def gold_scorer(spec: str) -> Scorer:
    """A built-in scorer by name: ``lexicon``, ``lexicon:OPTION=VALUE,…`` (the `LexiconScorer`
    with other ``max_words``, ``overlength_penalty`` or ``max_positive``), or the directory of a
    saved reward model.

    Raises:
        ValueError: ``spec`` is none of these (the message names the forms, or the bad option).
    """
    if spec == "lexicon" or spec.startswith("lexicon:"):
        return LexiconScorer(**_lexicon_options(spec))
    path = Path(spec)
    if (path / "reward_model.json").is_file():
        return RewardModelScorer(path)
    raise ValueError(f"gold scorer {spec!r}: expected 'lexicon', 'lexicon:max_words=N,"
                     f"overlength_penalty=X,max_positive=M' or a directory written by "
                     f"RewardModel.save (with reward_model.json); {path} is neither")


def _lexicon_options(spec: str) -> dict[str, float]:
    """``max_words``, ``max_positive`` (int ≥ 0) and ``overlength_penalty`` (float ≥ 0) of a
    lexicon spec."""
    _, _, rest = spec.partition(":")
    options: dict[str, float] = {}
    kinds = {"max_words": int, "overlength_penalty": float, "max_positive": int}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in kinds:
            raise ValueError(f"gold scorer {spec!r}: option {item!r} is not one of "
                             f"{', '.join(f'{k}=…' for k in kinds)}")
        try:
            number = kinds[key](value)
        except ValueError:
            raise ValueError(f"gold scorer {spec!r}: {key} must be {kinds[key].__name__}, "
                             f"got {value!r}") from None
        if number < 0:
            raise ValueError(f"gold scorer {spec!r}: {key} must be ≥ 0, got {value!r}")
        options[key] = number
    return options


class GoldJudge:
    """Picks the response with the higher gold reward (see the module docstring).

    Labels are of kind ``gold``: the RM does not train on them by default
    (``storage.records.TRAINING_KINDS``), they measure it.
    """

    kind: JudgeKind = "gold"

    def __init__(self, scorer: Scorer):
        self.scorer = scorer

    def judge(self, items: Sequence[JudgeInput]) -> list[Judgment]:
        n = len(items)
        rewards = score_all(self.scorer, [it.prompt for it in items] * 2,
                            [it.response_a for it in items] + [it.response_b for it in items])
        out = []
        for r_a, r_b in zip(rewards[:n], rewards[n:], strict=True):
            delta = r_a - r_b
            choice = "a" if delta > 0 else "b" if delta < 0 else "tie"
            out.append(Judgment(choice, sigmoid(abs(delta)),
                                f"gold reward a={r_a:.4g} b={r_b:.4g}"))
        return out
