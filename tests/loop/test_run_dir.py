"""What a resumed campaign may change, and leases a stopped run left behind."""

from __future__ import annotations

import pytest
import yaml

from loop.campaign import release_stale_leases
from loop.config_load import ConfigError, load_config
from loop.run_dir import CONFIG_FILE, prepare_run_dir
from storage.ledger import Ledger
from storage.records import NewComparison, NewGeneration


def test_resume_allows_keys_added_since_and_reporting_changes_but_not_the_math(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"campaign.run_dir={tmp_path}"])
    run_dir = prepare_run_dir(cfg, None)
    pinned = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    del pinned["rm"]["max_restarts"]  # a campaign started before the key existed
    pinned["rm"]["retired_key"] = 1  # ... and with a key removed since
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(pinned))

    later = load_config("configs/tiny.yaml", [f"campaign.run_dir={tmp_path}",
                                              "metrics.progress=bar", "metrics.tensorboard=true",
                                              "campaign.iterations=9"])
    assert prepare_run_dir(later, run_dir) == run_dir
    assert yaml.safe_load((run_dir / CONFIG_FILE).read_text())["campaign"]["iterations"] == 9

    changed = load_config("configs/tiny.yaml", [f"campaign.run_dir={tmp_path}", "rm.lr=0.5",
                                                "ppo.epochs=7"])
    with pytest.raises(ConfigError, match=r"differs from the one the campaign started with at: "
                                          r"ppo\.epochs, rm\.lr$"):
        prepare_run_dir(changed, run_dir)


def test_leases_of_a_stopped_run_go_back_to_the_queue(tmp_path):
    ledger = Ledger.open(f"sqlite:///{tmp_path}/ledger.sqlite")
    ledger.ensure_campaign("c")
    prompt = ledger.add_prompts("c", ["p"])[0]
    gens = ledger.add_generations("c", [NewGeneration(prompt, f"r{k}", 1, 0, "w", k)
                                        for k in range(4)])
    ledger.add_comparisons("c", [NewComparison(gens[0], gens[k]) for k in (1, 2, 3)])
    ledger.claim("c", "labeler-0", 2, 3600)  # the stopped run's labeler-0 held two
    ledger.claim("c", "alice", 1, 3600)  # a human's lease is not the loop's to give back
    lines: list[str] = []
    assert release_stale_leases(ledger, "c", ["labeler-0", "labeler-1"], lines.append) == 2
    counts = ledger.comparison_counts("c")
    assert (counts.pending, counts.claimed) == (2, 1)
    assert lines == ["released 2 lease(s) that labeler-0 of an earlier run still held"]
