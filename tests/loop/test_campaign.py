"""`prefloop run` end to end on the tiny config: real Ray, a real SQLite ledger, the real
shipped HH pairs; the run directory, resume rules and idempotent seeding."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from actors.core.metrics import read_jsonl
from loop.config_load import load_config
from loop.seed import seed_pairs
from storage.ledger import Ledger

REPO = Path(__file__).resolve().parents[2]


def prefloop(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "loop.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    result = prefloop("run", "configs/tiny.yaml", f"campaign.run_dir={run_dir}")
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir, result.stdout


def test_run_seeds_the_ledger_and_says_what_it_did(tiny_run):
    run_dir, out = tiny_run
    assert "seeded the ledger from" in out
    assert "64 pairs, 64 new preferences (0 skipped" in out
    assert "iteration 2/2: reward" in out
    ledger = Ledger.open(f"sqlite:///{run_dir}/ledger.sqlite")
    snap = ledger.snapshot("tiny", kinds=("human",))
    assert len(snap.rows) == 64
    assert {r.labeler_id for r in snap.rows} == {"dataset:hh-rlhf"}
    # both sides carry labels: the seeded a/b assignment is shuffled, not all "a"
    choices = [r.choice for r in snap.rows]
    assert 16 < choices.count("a") < 48 and choices.count("a") + choices.count("b") == 64
    assert f"sha256 {snap.sha256[:16]}" in out


def test_run_trains_and_registers_rm_v1(tiny_run):
    run_dir, out = tiny_run
    ledger = Ledger.open(f"sqlite:///{run_dir}/ledger.sqlite")
    rm = ledger.model_versions("tiny", "rm")[0]
    assert (rm.version, rm.status) == (1, "promoted")
    snap = ledger.snapshot("tiny", watermark=64)  # the seed pairs, before the loop's labels
    assert rm.snapshot.watermark == 64
    assert rm.snapshot.sha256 == snap.sha256
    assert ledger.training_set("tiny", 1).sha256 == snap.sha256  # rebuilt from the ledger
    assert rm.weight_uri == str(run_dir / "weights/rm/v1")
    assert (run_dir / "weights/rm/v1/COMPLETE").is_file()
    assert rm.metrics["rm/train_pairs"] == 64 and rm.metrics["rm/steps"] == 16  # 64 / batch 4
    assert 0.0 <= rm.metrics["rm/reference_accuracy"] <= 1.0
    assert f"reference-pair accuracy {rm.metrics['rm/reference_accuracy']:.3f}" in out
    assert "RM v1 promoted: no serving RM to compare with" in out
    assert rm.parent_version is None and rm.metrics["rm/train_fresh"] == 64
    from actors.core.reward_model import RewardModel

    model = RewardModel.load(run_dir / "weights/rm/v1")
    assert model.head.weight.shape == (1, model.backbone.config.hidden_size)
    assert torch.isfinite(model.head.weight).all() and model.head.weight.abs().sum() > 0


def test_the_loop_leaves_a_consistent_ledger(tiny_run):
    run_dir, _ = tiny_run
    ledger = Ledger.open(f"sqlite:///{run_dir}/ledger.sqlite")
    assert [v.version for v in ledger.model_versions("tiny", "policy")] == [0, 1, 2]
    per_version = ledger.generations_per_policy_version("tiny")
    assert set(per_version) == {0, 1} and per_version[1] > 0  # iteration 1 sampled with v1
    labels = ledger.snapshot("tiny", kinds=("ai",)).rows
    assert labels, "the simulated annotator labeled the loop's comparisons"
    assert {r.labeler_id for r in labels} == {"labeler-0"}
    assert all({r.policy_version_a, r.policy_version_b} <= {0, 1} for r in labels)
    assert len({(r.comparison_id, r.labeler_id) for r in labels}) == len(labels)
    rms = ledger.model_versions("tiny", "rm")
    assert len(rms) >= 2 and rms[0].status == "promoted"  # v1 + at least one refresh
    for rm in rms:  # every RM's training set rebuilds from the ledger with the same hash
        assert ledger.training_set("tiny", rm.version).sha256 == rm.snapshot.sha256
        assert rm.status in {"promoted", "rejected"}
    assert (run_dir / "checkpoints/it-000002/COMPLETE").is_file()
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    stages = {"rollout", "pair", "label", "rm_refresh", "ppo", "publish", "monitors"}
    for row in rows[1:]:
        assert {f"timing/{s}" for s in stages} <= set(row)
        assert {"ppo/approx_kl", "ppo/mean_kl", "monitor/proxy_mean", "monitor/gold_mean",
                "rollout/samples", "label/labeled"} <= set(row)
        assert row["rollout/samples"] == 8  # 4 prompts × 2 samples


def test_run_dir_holds_the_resolved_config_and_metrics(tiny_run):
    run_dir, _ = tiny_run
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    expected = load_config(REPO / "configs/tiny.yaml", [f"campaign.run_dir={run_dir}"])
    assert saved == expected.model_dump(mode="json")
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert rows[0]["label/seed_pairs"] == 64 and rows[0]["label/seed_created"] == 64
    assert rows[0]["timing/seed"] > 0 and rows[0]["timing/rm_refresh"] > 0
    assert rows[0]["rm/train_pairs"] == 64


def test_second_run_into_the_same_dir_is_refused(tiny_run):
    run_dir, _ = tiny_run
    result = prefloop("run", "configs/tiny.yaml", f"campaign.run_dir={run_dir}")
    assert result.returncode == 2
    assert result.stderr == (f"prefloop: error: {run_dir} already holds a campaign: continue it "
                             f"with --resume {run_dir}, or pick another campaign.name or "
                             "campaign.run_dir\n")


def test_resume_continues_from_the_checkpoint_and_duplicates_nothing(tiny_run):
    run_dir, _ = tiny_run
    ledger = Ledger.open(f"sqlite:///{run_dir}/ledger.sqlite")
    before = ledger.snapshot("tiny")
    result = prefloop("run", "configs/tiny.yaml", f"campaign.run_dir={run_dir}",
                      "campaign.iterations=3", "--resume", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "64 pairs, 0 new preferences" in out
    assert "the first RM exists already (resumed campaign): not retrained" in out
    assert f"resumed from {run_dir / 'checkpoints/it-000002'}: iteration 2, policy v2" in out
    assert "iteration 3/3" in out and "iteration 1/3" not in out  # only the remaining one
    after = ledger.snapshot("tiny")
    assert len(after.rows) >= len(before.rows)
    assert after.rows[:len(before.rows)] == before.rows  # nothing rewritten
    keys = [(r.comparison_id, r.labeler_id) for r in after.rows]
    assert len(keys) == len(set(keys))
    assert [v.version for v in ledger.model_versions("tiny", "policy")] == [0, 1, 2, 3]
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")][-1] == 3


def test_resume_with_a_changed_config_names_the_keys(tiny_run):
    run_dir, _ = tiny_run
    result = prefloop("run", "configs/tiny.yaml", f"campaign.run_dir={run_dir}",
                      "ppo.lr=0.5", "rollout.workers=2", "--resume", str(run_dir))
    assert result.returncode == 2
    assert result.stderr == (f"prefloop: error: --resume {run_dir}: the config differs from the "
                             "one the campaign started with at: ppo.lr, rollout.workers\n")


def test_resume_into_a_non_run_dir(tmp_path):
    result = prefloop("run", "configs/tiny.yaml", "--resume", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr == (f"prefloop: error: --resume {tmp_path}: no config.yaml there; "
                             "not a run directory\n")


def test_seeding_is_idempotent(tmp_path, shared_data):
    from actors.core.hh import load_hh_jsonl

    pairs = load_hh_jsonl(shared_data / "hh-rlhf/train.jsonl.gz", limit=40)
    ledger = Ledger.open(f"sqlite:///{tmp_path}/l.sqlite")
    ledger.ensure_campaign("c")
    first = seed_pairs(ledger, "c", pairs, source="hh-rlhf", seed=3)
    second = seed_pairs(ledger, "c", pairs, source="hh-rlhf", seed=3)
    assert (first.created, second.created) == (40, 0)
    assert first.watermark == second.watermark
    snap = ledger.snapshot("c")
    assert len(snap.rows) == 40
    # the preferred text is the HH `chosen` reply, whichever side it was put on
    for row, pair in zip(snap.rows, pairs, strict=True):
        assert (row.text_a if row.choice == "a" else row.text_b) == pair.chosen


def test_seeding_skips_pairs_with_nothing_to_learn(tmp_path):
    from actors.core.hh import PreferencePair

    pairs = [PreferencePair("\n\nHuman: hi\n\nAssistant:", "Hello!", "Go away."),
             PreferencePair("\n\nHuman: hi\n\nAssistant:", "Same.", "Same."),
             PreferencePair("\n\nHuman: yo\n\nAssistant:", "", "Hey.")]
    ledger = Ledger.open(f"sqlite:///{tmp_path}/l.sqlite")
    ledger.ensure_campaign("c")
    result = seed_pairs(ledger, "c", pairs, source="test")
    assert (result.pairs, result.skipped, result.created) == (3, 2, 1)


def test_seed_from_another_format_keeps_kind_and_margin(tmp_path):
    from loop.seed import load_seed_pairs

    fixture = REPO / "tests/actors/core/fixtures/ultrafeedback.jsonl"
    cfg = load_config(REPO / "configs/tiny.yaml", [f"rm.seed_pairs={fixture}",
                                                   "rm.seed_format=ultrafeedback-binarized"])
    loaded = load_seed_pairs(cfg, fixture)
    assert loaded.labeler_kind == "ai"
    ledger = Ledger.open(f"sqlite:///{tmp_path}/l.sqlite")
    ledger.ensure_campaign("c")
    result = seed_pairs(ledger, "c", loaded.pairs, source="uf", labeler_kind=loaded.labeler_kind)
    assert result.created == len(loaded.pairs)
    rows = ledger.snapshot("c").rows
    assert {r.labeler_kind for r in rows} == {"ai"}
    assert [r.strength for r in rows] == [p.margin or None for p in loaded.pairs]
    assert any(r.strength for r in rows)


def test_a_seed_file_in_the_wrong_schema_is_a_config_error(tmp_path):
    from loop.config_load import ConfigError
    from loop.seed import load_seed_pairs

    fixture = REPO / "tests/actors/core/fixtures/tldr.jsonl"
    cfg = load_config(REPO / "configs/tiny.yaml", [f"rm.seed_pairs={fixture}"])  # hh-rlhf schema
    with pytest.raises(ConfigError, match=r"^rm.seed_pairs: .*tldr.jsonl: row 1: "):
        load_seed_pairs(cfg, fixture)


def test_an_orphaned_weight_version_is_never_overwritten(tmp_path):
    """A run killed after publishing rm v1 but before the ledger recorded it: the rerun
    publishes v2 and the ledger points there; the orphan's bytes stay untouched."""
    from storage.weights import open_weight_store

    run_dir = tmp_path / "tiny"
    orphan = open_weight_store(run_dir / "weights").publish("rm", 1, {"model.bin": b"orphan"})
    result = prefloop("run", "configs/tiny.yaml", f"campaign.run_dir={run_dir}",
                      "rm.seed_max_pairs=16", "rm.eval_pairs=null", "campaign.iterations=1")
    assert result.returncode == 0, result.stdout + result.stderr
    rms = Ledger.open(f"sqlite:///{run_dir}/ledger.sqlite").model_versions("tiny", "rm")
    rm = rms[0]  # the first RM; the loop's refreshes follow as v3, v4, …
    assert (rm.version, rm.status) == (2, "promoted")
    assert [r.version for r in rms[1:]] == list(range(3, 3 + len(rms) - 1))
    assert rm.weight_uri == str(run_dir / "weights/rm/v2")
    assert (run_dir / "weights/rm/v1/model.bin").read_bytes() == b"orphan"
    assert orphan.version == 1
