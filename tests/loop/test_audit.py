"""The annotator audit against a real ledger: `loop.audit.audit_campaign`, the campaign's audit
stage (`CampaignLoop.audit_annotators`) and `prefloop annotators audit`.

The crowd (`crowd`): 7 human annotators label 300 two-way comparisons, each comparison by 6 of
them drawn at random (~257 labels each), honest noise 0.10 (a noisy label is the opposite of the
gold preference). With `poison`, ``ann-6`` answers against gold on that share of its labels on
top of its noise: at 0.3 it disagrees with the others' majority on ~0.36 of its scored labels
against ~0.11 for the pool, far past the margin; with poison 0 it is as honest as the rest.
"""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from loop.audit import audit_campaign
from loop.cli import app
from loop.config import AuditConfig
from loop.config_load import load_config
from loop.iteration import CampaignLoop
from storage.ledger import Ledger
from storage.records import NewComparison, NewGeneration, NewPreference

POISONER = "ann-6"
COMPARISONS = 300


def crowd(url: str, poison: float, seed: int = 0) -> tuple[Ledger, list[int]]:
    """Campaign c1 with the crowd's labels (module docstring); returns the ledger and the
    comparison ids (one more, unlabeled, at the end)."""
    rng = np.random.default_rng(seed)
    ledger = Ledger.open(url)
    ledger.ensure_campaign("c1")
    prompts = ledger.add_prompts("c1", [f"prompt {i}" for i in range(COMPARISONS + 1)])
    gens = ledger.add_generations("c1", [NewGeneration(p, f"answer {p}.{k}", 2, 0, "w0", k)
                                         for p in prompts for k in range(2)])
    comparisons = ledger.add_comparisons(
        "c1", [NewComparison(gens[2 * i], gens[2 * i + 1]) for i in range(len(prompts))])
    who = np.argsort(rng.random((COMPARISONS, 7)), axis=1)[:, :6]
    gold = rng.integers(0, 2, COMPARISONS)[:, None]
    wrong = (rng.random(who.shape) < 0.10) | ((who == 6) & (rng.random(who.shape) < poison))
    choice = np.where(wrong, 1 - gold, gold)
    ledger.record_preferences("c1", [
        NewPreference(comparisons[c], "ab"[x], "human", f"ann-{w}")
        for c in range(COMPARISONS) for w, x in zip(who[c], choice[c], strict=True)])
    return ledger, comparisons


def labelers_in(ledger: Ledger) -> set[str]:
    return {row.labeler_id for row in ledger.snapshot("c1", kinds=("human",)).rows}


def test_the_poisoner_is_flagged_quarantined_once_and_left_out_of_training(db_url):
    ledger, comparisons = crowd(db_url, poison=0.3)
    dry = audit_campaign(ledger, "c1", AuditConfig(), apply=False)
    assert [a.labeler_id for a in dry.flagged] == [POISONER]
    assert dry.quarantined == [] and ledger.quarantines("c1") == []  # a dry run writes nothing
    assert dry.labels == COMPARISONS * 6 and len(dry.audits) == 7
    assert dry.watermark == ledger.watermark("c1")
    poisoner = next(a for a in dry.audits if a.labeler_id == POISONER)
    assert 0.25 < poisoner.rate < 0.5 and 0.05 < poisoner.pool_rate < 0.17
    assert poisoner.p_value < 1e-9
    honest = [a for a in dry.audits if a.labeler_id != POISONER]
    assert all(a.rate < 0.25 and a.p_value > AuditConfig().alpha / 7 for a in honest)

    done = audit_campaign(ledger, "c1", AuditConfig(), apply=True)
    assert done.quarantined == [POISONER]
    [row] = ledger.quarantines("c1")
    assert (row.labeler_id, row.watermark) == (POISONER, dry.watermark)
    assert row.evidence["disagreed"] == poisoner.disagreed
    assert row.evidence["scored"] == poisoner.scored

    # The quarantine binds snapshots above its watermark: the next label lifts the watermark.
    assert POISONER in labelers_in(ledger)
    ledger.record_preference("c1", NewPreference(comparisons[-1], "a", "human", "ann-0"))
    assert labelers_in(ledger) == {f"ann-{i}" for i in range(6)}

    again = audit_campaign(ledger, "c1", AuditConfig(), apply=True)
    assert again.quarantined == [] and [q.labeler_id for q in again.earlier] == [POISONER]
    assert POISONER not in {a.labeler_id for a in again.audits}  # its labels are out
    assert [q.labeler_id for q in ledger.quarantines("c1")] == [POISONER]


def test_negative_control_an_honest_crowd_has_nobody_to_quarantine(db_url):
    ledger, _ = crowd(db_url, poison=0.0)
    done = audit_campaign(ledger, "c1", AuditConfig(), apply=True)
    assert done.flagged == [] and done.quarantined == [] and ledger.quarantines("c1") == []
    assert len(done.audits) == 7


def test_min_scored_holds_back_a_verdict_on_too_few_labels(tmp_path):
    ledger, _ = crowd(f"sqlite:///{tmp_path / 'l.sqlite'}", poison=0.3)
    done = audit_campaign(ledger, "c1", AuditConfig(min_scored=1000), apply=True)
    assert done.flagged == [] and ledger.quarantines("c1") == []


def _loop(ledger: Ledger, overrides: list[str], said: list[str]) -> CampaignLoop:
    """A CampaignLoop with only what the audit stage uses (config, ledger, log)."""
    cfg = load_config("configs/tiny.yaml", ["campaign.name=c1", *overrides])
    return CampaignLoop(cfg, ledger, prompts=None, rollout=None, labelers=None, rm=None,
                        ppo=None, gold=None, say=said.append)


def test_the_campaign_audits_on_schedule_and_logs_the_quarantine(tmp_path):
    ledger, _ = crowd(f"sqlite:///{tmp_path / 'l.sqlite'}", poison=0.3)
    said: list[str] = []
    loop = _loop(ledger, ["labeling.audit.every=2"], said)
    assert loop.audit_annotators(1) == {}  # not due: nothing read, nothing written
    assert ledger.quarantines("c1") == []
    assert loop.audit_annotators(2) == {"label/audited_annotators": 7.0,
                                        "label/quarantined": 1.0}
    assert [q.labeler_id for q in ledger.quarantines("c1")] == [POISONER]
    assert len(said) == 1 and said[0].startswith(
        f"quarantined annotator {POISONER!r} from RM training: annotator audit: disagrees")
    assert loop.audit_annotators(4) == {"label/audited_annotators": 6.0,
                                        "label/quarantined": 1.0}
    assert len(said) == 1  # nobody new

    off = _loop(ledger, ["labeling.audit.every=0"], said)
    assert off.audit_annotators(0) == {}


def test_prefloop_annotators_audit_dry_run_then_apply(tmp_path):
    url = f"sqlite:///{tmp_path / 'l.sqlite'}"
    crowd(url, poison=0.3)
    runner = CliRunner()
    dry = runner.invoke(app, ["annotators", "audit", "--db-url", url, "--campaign", "c1"])
    assert dry.exit_code == 0, dry.output
    lines = [line.split("\t") for line in dry.stdout.splitlines()]
    assert lines[0] == ["annotator", "labels", "scored", "disagreed", "rate", "others_rate",
                        "p_value", "verdict"]
    verdicts = {cells[0]: cells[-1] for cells in lines[1:]}
    assert verdicts == {**{f"ann-{i}": "ok" for i in range(6)}, POISONER: "flagged"}
    assert sum(int(cells[1]) for cells in lines[1:]) == COMPARISONS * 6
    assert dry.stderr.strip() == (f"audited {COMPARISONS * 6} human label(s) of 7 annotator(s) "
                                  f"of campaign 'c1' at preference {COMPARISONS * 6}: dry run: "
                                  f"pass --apply to quarantine {POISONER}")
    assert Ledger(url).quarantines("c1") == []

    applied = runner.invoke(app, ["annotators", "audit", "--apply", "--db-url", url,
                                  "--campaign", "c1"])
    assert applied.exit_code == 0, applied.output
    assert applied.stderr.strip().endswith(f": quarantined {POISONER}")
    assert f"{POISONER}\t" in applied.stdout and applied.stdout.rstrip().endswith("quarantined")
    assert [q.labeler_id for q in Ledger(url).quarantines("c1")] == [POISONER]

    again = runner.invoke(app, ["annotators", "audit", "--apply", "--db-url", url,
                                "--campaign", "c1"])
    assert again.stdout.splitlines()[-1] == f"{POISONER}\t-\t-\t-\t-\t-\t-\tquarantined earlier"
    assert again.stderr.strip().endswith("nobody flagged")


@pytest.mark.parametrize(("args", "message"), [
    (["--alpha", "1.5"], "prefloop: error: --alpha: Input should be less than 1"),
    (["--min-scored", "0"], "prefloop: error: --min-scored: Input should be greater than or "
                            "equal to 1"),
    (["--campaign", "nope"], "prefloop: error: "),
    ([], "prefloop: error: which campaign? pass --campaign NAME"),
])
def test_bad_audit_arguments_are_one_line_errors(tmp_path, args, message):
    url = f"sqlite:///{tmp_path / 'l.sqlite'}"
    crowd(url, poison=0.3)
    base = ["annotators", "audit", "--db-url", url]
    if "--campaign" not in args and args:
        base += ["--campaign", "c1"]
    result = CliRunner().invoke(app, [*base, *args])
    assert result.exit_code == 2
    assert result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.output
    assert Ledger(url).quarantines("c1") == []
