"""Labeler actors on real Ray with a SQLite ledger: exactly-once labeling across labelers,
idempotent retries, released abstentions, lease fencing, disagreement order."""

from __future__ import annotations

import itertools
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import ray

from actors.core.judges import (
    GoldJudge,
    HttpJudge,
    JudgeInput,
    LexiconScorer,
    MathVerifier,
    SimulatedAnnotator,
)
from actors.labeler import LabelCounts, LabelerGroup
from loop.config import LabelingConfig
from storage.ledger import Ledger
from storage.records import ComparisonCounts, NewComparison, NewGeneration

CAMPAIGN = "lab"
NUM_CPUS = 0.25
_prefixes = itertools.count()


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    opened = Ledger.open(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    opened.ensure_campaign(CAMPAIGN)
    return opened


def seed(ledger: Ledger, prompts: list[str], responses: list[list[str]]) -> list[int]:
    """Prompts, their responses, and every (i < j) pair of responses as a comparison."""
    prompt_ids = ledger.add_prompts(CAMPAIGN, prompts)
    gens = [NewGeneration(pid, text, len(text.split()), 0, "rollout-0", k)
            for pid, texts in zip(prompt_ids, responses, strict=True)
            for k, text in enumerate(texts)]
    gen_ids = iter(ledger.add_generations(CAMPAIGN, gens))
    pairs = []
    for texts in responses:
        ids = [next(gen_ids) for _ in texts]
        pairs += [NewComparison(a, b) for a, b in itertools.combinations(ids, 2)]
    return ledger.add_comparisons(CAMPAIGN, pairs)


@pytest.fixture
def launch(ray_local, ledger):
    """Start labeler groups with session-unique actor names; shut them all down after."""
    groups: list[LabelerGroup] = []

    def _launch(judge, batch_size: int = 4, **cfg) -> LabelerGroup:
        group = LabelerGroup.launch(LabelingConfig(**cfg), ledger.url, CAMPAIGN, judge,
                                    name_prefix=f"labeler-t{next(_prefixes)}",
                                    batch_size=batch_size, num_cpus=NUM_CPUS)
        groups.append(group)
        return group

    yield _launch
    for group in groups:
        group.shutdown()


def lexicon_items(n_prompts: int) -> tuple[list[str], list[list[str]]]:
    prompts = [f"Say something nice, take {i}." for i in range(n_prompts)]
    responses = [[f"good day {i}", f"bad day {i}", f"great good day, thanks {i}"]
                 for i in range(n_prompts)]
    return prompts, responses


def test_two_labelers_label_every_pending_comparison_exactly_once(launch, ledger):
    prompts, responses = lexicon_items(10)
    comparisons = seed(ledger, prompts, responses)  # 10 prompts × 3 pairs = 30
    judge = SimulatedAnnotator(LexiconScorer(), temperature=1.0, seed=0)
    group = launch(judge, labelers=2, lease_seconds=30.0)

    counts = group.label(max_items=30)  # 15 per labeler

    assert counts == LabelCounts(labeled=30)
    assert ledger.comparison_counts(CAMPAIGN) == ComparisonCounts(0, 0, 30)
    rows = ledger.snapshot(CAMPAIGN, kinds=("ai",)).rows
    assert sorted(r.comparison_id for r in rows) == sorted(comparisons)
    by_labeler = {name: sum(r.labeler_id == name for r in rows) for name in group.names}
    assert list(by_labeler.values()) == [15, 15]  # each spent exactly its share
    # Whoever labeled a comparison, its label is the annotator's seeded verdict on its texts.
    local = judge.judge([JudgeInput(r.prompt, r.text_a, r.text_b) for r in rows])
    assert [(r.choice, r.strength) for r in rows] == [(j.choice, j.confidence) for j in local]
    assert {r.labeler_kind for r in rows} == {"ai"}

    assert group.label(max_items=30) == LabelCounts()  # nothing left to label
    assert ledger.row_counts()["preference"] == 30


def test_a_retried_claim_records_no_duplicate_rows(launch, ledger):
    prompts, responses = lexicon_items(2)
    seed(ledger, prompts, responses)  # 6 comparisons
    group = launch(GoldJudge(LexiconScorer()), labelers=1)
    [actor], [name] = group.actors, group.names
    claims = ledger.claim(CAMPAIGN, name, 4, lease_s=30.0)

    first = ray.get(actor.label_claims.remote(claims))
    retry = ray.get(actor.label_claims.remote(claims))  # e.g. the reply to the first was lost

    assert first == LabelCounts(labeled=4)
    assert retry == LabelCounts(repeated=4)
    assert ledger.row_counts()["preference"] == 4
    assert ledger.label_counts(CAMPAIGN) == {"gold": 4}
    assert ledger.comparison_counts(CAMPAIGN) == ComparisonCounts(2, 0, 4)


def test_abstentions_are_released_and_judged_once_per_call(launch, ledger):
    prompts = [f"What is {i} + 1?" for i in range(6)]
    responses = [[f"\\boxed{{{i + 1}}}", "\\boxed{0}", f"The answer is {i + 1}."]
                 for i in range(6)]
    seed(ledger, prompts, responses)  # 18 comparisons, 3 per prompt
    answers = {p: str(i + 1) for i, p in enumerate(prompts) if i % 2 == 0}  # 3 of 6 prompts
    group = launch(MathVerifier(answers), labelers=1)

    # Comparisons 3k+1..3k+3 belong to prompt k; prompts 1, 3, 5 have no answer. Batches of 4:
    # [1-4] 3 labels, 4 abstains; [5-8] 5, 6 abstain, 2 labels; [9-12] 1 label, 10-12 abstain;
    # [13-15] 3 labels: the budget of 9 is reached and 16-18 are never claimed. Abstentions
    # do not use the budget (9 labels recorded), and each is judged once.
    assert group.label(max_items=9) == LabelCounts(labeled=9, abstained=6)
    assert ledger.comparison_counts(CAMPAIGN) == ComparisonCounts(9, 0, 9)
    rows = ledger.snapshot(CAMPAIGN).rows
    # answered prompts: (right, wrong) → a, (right, right) → tie, (wrong, right) → b
    assert sorted(r.choice for r in rows) == ["a"] * 3 + ["b"] * 3 + ["tie"] * 3
    # the next call judges each of the 9 unanswerable comparisons once and gives them back
    assert group.label(max_items=100) == LabelCounts(abstained=9)
    assert ledger.comparison_counts(CAMPAIGN) == ComparisonCounts(9, 0, 9)


def test_a_lost_lease_is_counted_and_nothing_is_written(launch, ledger):
    prompts, responses = lexicon_items(1)
    seed(ledger, prompts, responses)  # 3 comparisons
    group = launch(GoldJudge(LexiconScorer()), labelers=1)
    [actor], [name] = group.actors, group.names
    claims = ledger.claim(CAMPAIGN, name, 3, lease_s=0.05)
    time.sleep(0.1)
    assert len(ledger.claim(CAMPAIGN, "someone-else", 3, lease_s=30.0)) == 3

    assert ray.get(actor.label_claims.remote(claims)) == LabelCounts(lease_lost=3)
    assert ledger.row_counts()["preference"] == 0
    assert ledger.comparison_counts(CAMPAIGN) == ComparisonCounts(0, 3, 0)


def test_disagreement_selection_labels_the_most_disputed_first(launch, ledger):
    prompts, responses = lexicon_items(4)
    comparisons = seed(ledger, prompts, responses)  # 12 comparisons
    scores = {cid: float((7 * k) % 12) for k, cid in enumerate(comparisons)}  # a permutation
    group = launch(GoldJudge(LexiconScorer()), labelers=1, selection="disagreement")

    assert group.label(max_items=5, disagreement=scores) == LabelCounts(labeled=5)

    labeled = {r.comparison_id for r in ledger.snapshot(CAMPAIGN, kinds=("gold",)).rows}
    assert labeled == set(sorted(scores, key=scores.get, reverse=True)[:5])
    # the claim windows were released: nothing is left leased
    assert ledger.comparison_counts(CAMPAIGN) == ComparisonCounts(7, 0, 5)


class _Unauthorized(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_a_failing_judge_gives_its_claims_back(launch, ledger):
    prompts, responses = lexicon_items(2)
    seed(ledger, prompts, responses)  # 6 comparisons
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorized)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    try:
        judge = HttpJudge(f"http://127.0.0.1:{server.server_address[1]}/v1", "m", "bad-key")
        group = launch(judge, labelers=1)
        with pytest.raises(Exception, match="returned HTTP 401"):
            group.label(max_items=6)
    finally:
        server.shutdown()
        server.server_close()
    assert ledger.comparison_counts(CAMPAIGN) == ComparisonCounts(6, 0, 0)


