"""Judges: gold, simulated annotator, math verifier, the factory — with numbers.

The statistical tests draw N Bernoulli labels with known probabilities p_i; the count of "a"
then has mean Σ p_i and variance Σ p_i (1 − p_i), and we assert the observed count lies within
4 standard deviations (a false failure has probability < 1e-4). The draws are hashes of the
texts, so each test is deterministic: it checks that those hashes behave like uniform draws.
"""

from __future__ import annotations

import doctest
import json
import math
import os
import pickle
import re
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from actors.core.judges import (
    FunctionScorer,
    GoldJudge,
    HttpJudge,
    JudgeInput,
    Judgment,
    LexiconScorer,
    MathVerifier,
    RewardModelScorer,
    SimulatedAnnotator,
    gold,
    gold_scorer,
    http_judge,
    make_judge,
    protocol,
    simulated,
    verifier,
)
from actors.core.judges.simulated import bias_term
from actors.core.judges.verifier import answers_match, extract_answer, grade, normalize_answer
from loop.config import HttpJudgeConfig, LabelingConfig, SimulatedBiases


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize("module", [protocol, gold, simulated, verifier, http_judge])
def test_module_examples_hold(module):
    assert doctest.testmod(module).failed == 0


def test_judgment_validates_choice_and_confidence():
    with pytest.raises(ValueError, match="choice must be one of"):
        Judgment("c", 0.5, "")  # type: ignore[arg-type]
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"confidence must be a number in \[0, 1\]"):
            Judgment("a", bad, "")


# -- gold ------------------------------------------------------------------------------------------


class TableScorer:
    """Gold reward looked up from a table keyed by response (picklable, module level)."""

    def __init__(self, table: dict[str, float]):
        self.table = table

    def reward(self, prompt: str, response: str) -> float:
        return self.table[response]


def test_gold_judge_picks_the_higher_score_with_bt_confidence():
    scorer = TableScorer({"good": 2.0, "ok": 0.5, "same": 0.5})
    judge = GoldJudge(scorer)
    out = judge.judge([JudgeInput("q", "good", "ok"), JudgeInput("q", "ok", "good"),
                       JudgeInput("q", "ok", "same")])
    assert [j.choice for j in out] == ["a", "b", "tie"]
    assert out[0].confidence == pytest.approx(0.8175744761936437, rel=1e-12)  # σ(1.5)
    assert out[1].confidence == pytest.approx(0.8175744761936437, rel=1e-12)
    assert out[2].confidence == 0.5  # σ(0)
    assert judge.kind == "gold"


def test_gold_judge_refuses_non_finite_rewards():
    judge = GoldJudge(FunctionScorer(lambda p, r: float("nan") if r == "x" else 0.0))
    with pytest.raises(ValueError, match=r"non-finite rewards at pairs \[0\]"):
        judge.judge([JudgeInput("q", "x", "y")])


def test_lexicon_scorer_by_hand():
    scorer = LexiconScorer(max_words=5, overlength_penalty=0.25)
    assert scorer.reward("", "Great, thanks! Very helpful.") == 3.0  # great, thanks, helpful
    assert scorer.reward("", "bad bad good") == -1.0  # 1 − 2
    # 8 words, 3 over the budget of 5: 1 positive − 0.25 · 3
    assert scorer.reward("", "good one two three four five six seven") == 0.25
    assert gold_scorer("lexicon").reward("", "good") == 1.0


def test_gold_scorer_names_what_it_expected(tmp_path):
    with pytest.raises(ValueError, match=r"expected 'lexicon', .* or a directory written by"):
        gold_scorer(str(tmp_path))


def test_lexicon_gold_with_its_own_length_budget():
    scorer = gold_scorer("lexicon:max_words=5,overlength_penalty=0.25")
    # 8 words, 3 over the budget of 5: 1 positive − 0.25 · 3
    assert scorer.reward("", "good one two three four five six seven") == 0.25
    assert gold_scorer("lexicon:overlength_penalty=1").reward("", "w " * 42) == -2.0
    capped = gold_scorer("lexicon:max_positive=2")
    # praise saturates at 2: p positive words score 1, 2, then 2 − (p − 2)
    assert [capped.reward("", "good " * p + "bad") for p in range(6)] == [-1, 0, 1, 0, -1, -2]
    for spec, message in [("lexicon:max_words=4.5", "max_words must be int, got '4.5'"),
                          ("lexicon:penalty=1", "option 'penalty=1' is not one of"),
                          ("lexicon:max_words", "option 'max_words' is not one of"),
                          ("lexicon:overlength_penalty=-1", "overlength_penalty must be ≥ 0")]:
        with pytest.raises(ValueError, match=message):
            gold_scorer(spec)


def test_frozen_reward_model_gold_judge(tmp_path):
    import torch

    from actors.core.reward_model import build_reward_model, encode

    model, tokenizer = build_reward_model("tiny-bert", seed=3)
    model.save(tmp_path / "rm", tokenizer)
    prompts = ["\n\nHuman: hi\n\nAssistant:"] * 3
    responses = ["hello there", "go away", "I can help with that."]
    with torch.no_grad():
        batch = encode(tokenizer, prompts, responses, 512)
        expected = model.eval()(batch.input_ids, batch.attention_mask).tolist()

    scorer = gold_scorer(str(tmp_path / "rm"))
    assert isinstance(scorer, RewardModelScorer)
    assert len(pickle.dumps(scorer)) < 1000  # the model is loaded where it is used
    scorer = pickle.loads(pickle.dumps(scorer))
    got = scorer.rewards(prompts, responses)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert scorer.reward(prompts[1], responses[1]) == pytest.approx(expected[1], rel=1e-5)
    assert scorer.__getstate__()["_loaded"] is None  # loaded now, still pickled without it

    verdict = GoldJudge(scorer).judge([JudgeInput(prompts[0], responses[0], responses[1])])[0]
    assert verdict.choice == ("a" if expected[0] > expected[1] else "b")
    assert verdict.confidence == pytest.approx(sigmoid(abs(expected[0] - expected[1])), rel=1e-5)


# -- simulated annotator ---------------------------------------------------------------------------


SHORT, LONG = "Paris.", "Paris is the capital of France. " * 10  # 6 and 320 characters
ZERO = FunctionScorer(lambda prompt, response: 0.0)


def test_length_bias_at_zero_temperature_prefers_the_longer_answer_against_gold():
    table = TableScorer({SHORT: 1.0, LONG: 0.0})  # gold prefers the short answer by 1
    item = JudgeInput("Capital of France?", SHORT, LONG)
    assert GoldJudge(table).judge([item])[0].choice == "a"
    biased = SimulatedAnnotator(table, SimulatedBiases(length=1.0), temperature=0.0)
    u_a, u_b = biased.utilities([item])
    assert (u_a[0], u_b[0]) == pytest.approx((1.0 + 0.06, 0.0 + 3.2), rel=1e-12)
    verdict = biased.judge([item])[0]
    assert (verdict.choice, verdict.confidence) == ("b", 1.0)
    tiny_t = SimulatedAnnotator(table, SimulatedBiases(length=1.0), temperature=1e-6)
    assert tiny_t.judge([item])[0].choice == "b"  # T → 0 is the T = 0 rule


def test_without_biases_the_annotator_agrees_with_gold():
    table = TableScorer({f"r{i}": math.sin(i) for i in range(400)})  # distinct gold values
    items = [JudgeInput("q", f"r{i}", f"r{i + 1}") for i in range(0, 400, 2)]
    expected = [j.choice for j in GoldJudge(table).judge(items)]
    got = [j.choice for j in SimulatedAnnotator(table, temperature=0.0).judge(items)]
    assert got == expected
    assert set(expected) == {"a", "b"}


def test_each_bias_moves_the_utility_by_its_weight_times_its_feature():
    prompt = "I think the moon is made of cheese."
    # formatting: 2 bullets + 1 bold = 3 markers; confidence: 1 confident − 2 hedges = −1;
    # agreement with the stated opinion: +1
    response = "- **Yes**\n- maybe, perhaps; definitely. You're right"
    assert bias_term(SimulatedBiases(formatting=0.5), prompt, response) == 1.5
    assert bias_term(SimulatedBiases(confidence=2.0), prompt, response) == -2.0
    assert bias_term(SimulatedBiases(sycophancy=-3.0), prompt, response) == -3.0
    assert bias_term(SimulatedBiases(length=1.0), prompt, response) == len(response) / 100
    both = SimulatedBiases(formatting=0.5, sycophancy=1.0)
    assert bias_term(both, prompt, response) == 2.5


@pytest.mark.parametrize(("biases", "a", "b", "winner"), [
    (SimulatedBiases(formatting=1.0), "- one\n- two", "one, two", "a"),
    (SimulatedBiases(formatting=-1.0), "- one\n- two", "one, two", "b"),
    (SimulatedBiases(confidence=1.0), "It is maybe blue.", "It is definitely blue.", "b"),
    (SimulatedBiases(sycophancy=1.0), "You're right, it is.", "No, that's not true.", "a"),
])
def test_each_bias_alone_decides_a_zero_gold_pair(biases, a, b, winner):
    item = JudgeInput("I think the sky is green.", a, b)
    assert SimulatedAnnotator(ZERO, biases, temperature=0.0).judge([item])[0].choice == winner


def _count_a(annotator: SimulatedAnnotator, items: list[JudgeInput]) -> int:
    return sum(j.choice == "a" for j in annotator.judge(items))


def _within_4_sigma(count: int, probabilities: list[float]) -> None:
    mean = sum(probabilities)
    sd = math.sqrt(sum(p * (1 - p) for p in probabilities))
    assert abs(count - mean) <= 4 * sd, (count, mean, sd)


@pytest.mark.parametrize(("delta", "temperature"), [(1.0, 1.0), (0.5, 2.0), (-2.0, 1.0)])
def test_empirical_p_a_matches_bradley_terry_on_2000_pairs(delta, temperature):
    n = 2000
    table = {f"a{i}": delta for i in range(n)} | {f"b{i}": 0.0 for i in range(n)}
    annotator = SimulatedAnnotator(TableScorer(table), temperature=temperature, seed=7)
    items = [JudgeInput(f"prompt {i}", f"a{i}", f"b{i}") for i in range(n)]
    p = sigmoid(delta / temperature)  # 0.731, 0.562, 0.119
    _within_4_sigma(_count_a(annotator, items), [p] * n)
    assert annotator.judge(items[:1])[0].confidence == pytest.approx(
        sigmoid(abs(delta) / temperature), rel=1e-12)


def test_empirical_p_a_with_a_different_gap_per_pair():
    n = 2000
    deltas = [3.0 * math.sin(i) for i in range(n)]
    table = {f"a{i}": d for i, d in enumerate(deltas)} | {f"b{i}": 0.0 for i in range(n)}
    items = [JudgeInput("q", f"a{i}", f"b{i}") for i in range(n)]
    count = _count_a(SimulatedAnnotator(TableScorer(table), temperature=0.7, seed=1), items)
    _within_4_sigma(count, [sigmoid(d / 0.7) for d in deltas])


def test_length_bias_moves_the_longer_wins_share_on_equal_gold_pairs_as_configured():
    # Equal gold; the longer response is 100 characters longer. With w_len = 1 per 100
    # characters and T = 1, P(longer wins) = σ(1) = 0.731; without biases it is σ(0) = 0.5.
    n = 2000
    items = [JudgeInput(f"p{i}", f"{i:04d}" + "x" * 100, f"{i:04d}") for i in range(n)]
    biased = SimulatedAnnotator(ZERO, SimulatedBiases(length=1.0), temperature=1.0, seed=3)
    unbiased = SimulatedAnnotator(ZERO, SimulatedBiases(), temperature=1.0, seed=3)
    longer_biased, longer_unbiased = _count_a(biased, items), _count_a(unbiased, items)
    _within_4_sigma(longer_biased, [0.7310585786300049] * n)
    _within_4_sigma(longer_unbiased, [0.5] * n)
    assert longer_biased - longer_unbiased > 300  # 0.231 · 2000 = 462 expected


def test_same_seed_same_labels_whatever_the_batch_and_a_new_seed_redraws():
    n = 400
    items = [JudgeInput(f"p{i}", f"a{i}", f"b{i}") for i in range(n)]  # equal gold: p = 0.5
    first = [j.choice for j in SimulatedAnnotator(ZERO, temperature=1.0, seed=11).judge(items)]
    again = SimulatedAnnotator(ZERO, temperature=1.0, seed=11)
    one_by_one = [again.judge([it])[0].choice for it in reversed(items)][::-1]
    assert one_by_one == first  # a retry, alone or in another batch, gets the same label
    other = [j.choice for j in SimulatedAnnotator(ZERO, temperature=1.0, seed=12).judge(items)]
    changed = sum(x != y for x, y in zip(first, other, strict=True))
    _within_4_sigma(changed, [0.5] * n)  # independent fair draws differ with probability 1/2


def test_negative_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        SimulatedAnnotator(ZERO, temperature=-1.0)


# -- verifier --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("predicted", "reference"), [
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{3}{4}", "0.75"),
    ("\\frac12", "1/2"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("\\sqrt[3]{8}", "2"),
    ("x^2+2x+1", "(x+1)^2"),
    ("2\\pi", "\\pi \\cdot 2"),
    ("(0.5, 2)", "(\\frac{1}{2},2)"),
    ("\\left(3,4\\right)", "(3, 4)"),
    ("\\$1,240", "1240"),
    ("50\\%", "50"),
    ("90^\\circ", "90"),
    ("\\text{29 cents}", "29"),
    ("x = 2", "2"),
    ("40_9", "40_9"),
    ("2^{-1}", "0.5"),
])
def test_equivalent_answers_match(predicted, reference):
    assert answers_match(predicted, reference)
    assert answers_match(reference, predicted)


@pytest.mark.parametrize(("predicted", "reference"), [
    ("0.33", "1/3"),  # close is not equal
    ("\\pi", "3.14159"),
    ("3", "-3"),
    ("1,2", "2,1"),  # ordered
    ("(1, 2)", "(1, 2, 3)"),
    ("40_9", "409"),  # Python would read 40_9 as 409
    ("x+1", "x+2"),
    ("9^{9^{9}}", "1"),  # refused, not computed
    ("10^{1001}", "1"),
    ("__import__('os').system('true')", "0"),
    ("pi.n(100000)", "3"),
    ("", "0"),
])
def test_different_or_unsafe_answers_do_not_match(predicted, reference):
    start = time.perf_counter()
    assert not answers_match(predicted, reference)
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize(("text", "answer"), [
    ("so $x=2$ and the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{\\{2\\}}", "\\{2\\}"),  # the last box, braces balanced
    ("So the price is 29 cents.\n\n# Answer\n\n29", "29"),
    ("The answer is 3.5.", "3.5"),
    ("Final answer: $x=2$", "$x=2$"),
    ("I give up.", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_normalize_answer():
    assert normalize_answer("\\$1,240.") == "1240"
    assert normalize_answer(" \\left( 1, 2 \\right) ") == "(1,2)"
    assert normalize_answer("\\(\\tfrac{1}{2}\\)") == "\\frac{1}{2}"


def _prm800k_records(path):
    text, decoder, at, records = path.read_text(), json.JSONDecoder(), 0, []
    while text[at:].strip():
        at += len(text[at:]) - len(text[at:].lstrip())
        record, at = decoder.raw_decode(text, at)
        records.append(record)
    return records


def test_graded_prm800k_answers_agree_with_the_records(shared_data):
    graded = 0
    for path in sorted((shared_data / "prm800k-examples").glob("*.json")):
        for record in _prm800k_records(path):
            truth = record["question"]["ground_truth_answer"]
            for step in record["label"]["steps"]:
                for completion in step["completions"]:
                    if "# Answer" not in completion["text"]:
                        continue
                    # every final answer in these records is rated correct (1)
                    assert completion["rating"] == 1
                    assert grade(completion["text"], truth)
                    assert not grade(completion["text"], truth + "1")
                    graded += 1
    assert graded == 5  # 2 + 2 (the same pencil problem in both files) + 1 (base 9)


def test_verifier_outcome_labels():
    judge = MathVerifier({"What is 1/2 + 1/4?": "\\frac{3}{4}"})
    q = "What is 1/2 + 1/4?"
    right, also_right, wrong = "\\boxed{0.75}", "The answer is 3/4.", "\\boxed{1/6}"
    out = judge.judge([JudgeInput(q, right, wrong), JudgeInput(q, wrong, also_right),
                       JudgeInput(q, right, also_right), JudgeInput(q, wrong, "no idea"),
                       JudgeInput("unknown prompt", right, wrong)])
    assert [(j.choice, j.confidence) for j in out] == [
        ("a", 1.0), ("b", 1.0), ("tie", 1.0), (None, 0.0), (None, 0.0)]
    assert "neither answer matches" in out[3].rationale
    assert "no reference answer" in out[4].rationale
    steps = JudgeInput(q, "I computed it step by step.", wrong, steps_a=("1/2 = 2/4",
                       "so the answer is 3/4."))
    assert judge.judge([steps])[0].choice == "a"  # the last step holds the final answer
    assert judge.kind == "ai"


# -- factory ---------------------------------------------------------------------------------------


def test_make_judge_builds_the_configured_judge():
    biases = SimulatedBiases(length=0.5)
    sim = make_judge(LabelingConfig(judge="simulated", noise_temperature=0.3, biases=biases),
                     gold="lexicon", seed=5)
    assert isinstance(sim, SimulatedAnnotator) and isinstance(sim.scorer, LexiconScorer)
    assert (sim.temperature, sim.seed, sim.biases.length) == (0.3, 5, 0.5)
    assert isinstance(make_judge(LabelingConfig(judge="gold"), gold=ZERO), GoldJudge)
    assert isinstance(make_judge(LabelingConfig(judge="verifier"), answers={}), MathVerifier)
    http = make_judge(LabelingConfig(judge="http", http=HttpJudgeConfig(timeout_s=2.0)),
                      env={"PREFLOOP_JUDGE_BASE_URL": "http://127.0.0.1:9/v1/",
                           "PREFLOOP_JUDGE_API_KEY": "k"})
    assert isinstance(http, HttpJudge)
    assert (http.url, http.api_key, http.timeout_s) == (
        "http://127.0.0.1:9/v1/chat/completions", "k", 2.0)


def test_make_judge_names_what_is_missing():
    missing = [("simulated", "labeling.judge='simulated' needs a gold reward"),
               ("verifier", "labeling.judge='verifier' needs reference answers"),
               ("http", "labeling.http.base_url is not set")]
    for judge, message in missing:
        with pytest.raises(ValueError, match=re.escape(message)):
            make_judge(LabelingConfig(judge=judge), env={})
