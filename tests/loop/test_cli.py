"""The `prefloop` CLI as a person runs it: real processes, exit codes, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def prefloop(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "loop.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bad_override_is_one_line_naming_key_file_and_type():
    result = prefloop("run", "configs/tiny.yaml", "ppo.lr=abc")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == ("prefloop: error: configs/tiny.yaml, override 'ppo.lr=abc': "
                             "ppo.lr: expected a valid number, got 'abc'\n")


def test_check_prints_the_resolved_config():
    result = prefloop("check", "configs/tiny.yaml", "ppo.kl.target=2.5")
    assert result.returncode == 0, result.stderr
    assert "  kl:\n    controller: adaptive\n    init_coef: 0.1\n    target: 2.5\n" in result.stdout


@pytest.mark.parametrize("argv", [
    ["--help"], ["run", "--help"], ["check", "--help"], ["label", "--help"],
    ["label", "serve", "--help"], ["label", "import", "--help"], ["label", "export", "--help"],
    ["annotators", "--help"],
    ["annotators", "add", "--help"], ["annotators", "revoke", "--help"],
    ["annotators", "list", "--help"], ["annotators", "audit", "--help"], ["db", "--help"],
    ["db", "upgrade", "--help"],
    ["db", "status", "--help"], ["report", "--help"],
])
def test_every_command_has_help(argv):
    result = prefloop(*argv)
    assert result.returncode == 0, result.stderr
    assert "Usage: prefloop" in result.stdout


def test_db_upgrade_then_status(tmp_path):
    up = prefloop("db", "upgrade", "--db-url", f"sqlite:///{tmp_path}/l.sqlite")
    assert up.returncode == 0, up.stderr
    assert up.stdout.startswith("ledger schema at revision ")
    head = up.stdout.split()[-1]
    fresh = tmp_path / "run"
    fresh.mkdir()
    st = prefloop("db", "status", "--run-dir", str(fresh))  # no ledger.sqlite there yet
    assert st.returncode == 0, st.stderr
    assert f"revision None (head {head}): needs `prefloop db upgrade`" in st.stdout
    st = prefloop("db", "status", "--db-url", f"sqlite:///{tmp_path}/l.sqlite")
    assert f"revision {head} (head {head}): up to date" in st.stdout
    assert "  preference                    0\n" in st.stdout


def test_db_needs_to_know_which_ledger(tmp_path):
    env_free = {k: v for k, v in os.environ.items() if k != "PREFLOOP_DB_URL"}
    result = subprocess.run([sys.executable, "-m", "loop.main", "db", "status"], cwd=REPO,
                            env=env_free, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == ("prefloop: error: which ledger? pass --db-url URL or --run-dir "
                             "DIR, or set PREFLOOP_DB_URL\n")


def test_annotator_lifecycle(tmp_path):
    url = ["--db-url", f"sqlite:///{tmp_path}/l.sqlite"]
    added = prefloop("annotators", "add", "alice", *url)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert len(token) >= 43  # token_urlsafe(32): 256 random bits
    assert "shown only now" in added.stderr
    again = prefloop("annotators", "add", "alice", *url)
    assert again.returncode == 2
    assert again.stderr == ("prefloop: error: add_annotator: name 'alice' is taken "
                            "(annotator id 1)\n")
    bad_role = prefloop("annotators", "add", "bob", "--role", "boss", *url)
    assert bad_role.returncode == 2 and "'role' must be one of ['annotator', 'admin']" in \
        bad_role.stderr
    assert prefloop("annotators", "add", "root", "--role", "admin", *url).returncode == 0
    assert prefloop("annotators", "revoke", "alice", *url).returncode == 0
    listed = prefloop("annotators", "list", *url).stdout.splitlines()
    assert [line.split("\t")[:2] for line in listed] == [["alice", "annotator"],
                                                         ["root", "admin"]]
    assert listed[0].split("\t")[2].startswith("revoked ")
    assert listed[1].split("\t")[2] == "active"
    from storage.ledger import Ledger

    assert Ledger.open(f"sqlite:///{tmp_path}/l.sqlite").authenticate(token) is None  # revoked


def _pin_campaign(run_dir: Path, *overrides: str) -> None:
    """A run directory that holds the tiny campaign (its pinned config), without running it."""
    from loop.config_load import load_config
    from loop.run_dir import prepare_run_dir

    prepare_run_dir(load_config(REPO / "configs/tiny.yaml",
                                [f"campaign.run_dir={run_dir}", *overrides]), None)


def test_auto_resume_starts_a_campaign_then_continues_it(tmp_path):
    """The same command twice: the first starts the campaign, the second continues it (where
    `run` without the flag refuses: test_campaign.py). Both stop at the ledger, which refuses
    connections, right after the run-directory decision under test: no Ray, no models."""
    run_dir = tmp_path / "tiny"
    argv = ["run", "configs/tiny.yaml", f"campaign.run_dir={run_dir}",
            "storage.db_url=postgresql+psycopg://prefloop@127.0.0.1:1/none", "--auto-resume"]
    first = prefloop(*argv)
    assert first.returncode == 2, first.stdout + first.stderr
    assert first.stderr.startswith(
        f"prefloop: --auto-resume: no campaign in {run_dir} yet: starting one\n"
        "prefloop: error: database error: OperationalError: ")
    assert (run_dir / "config.yaml").is_file()  # the campaign exists: the next run continues it

    second = prefloop(*argv)
    assert second.returncode == 2, second.stdout + second.stderr
    assert second.stderr.startswith(
        f"prefloop: --auto-resume: continuing the campaign in {run_dir}\n"
        "prefloop: error: database error: OperationalError: ")


def test_auto_resume_refuses_a_changed_config(tmp_path):
    run_dir = tmp_path / "tiny"
    _pin_campaign(run_dir)
    result = prefloop("run", "configs/tiny.yaml", f"campaign.run_dir={run_dir}", "ppo.lr=0.5",
                      "rollout.workers=2", "--auto-resume")
    assert result.returncode == 2
    assert result.stderr == (f"prefloop: error: --auto-resume {run_dir}: the config differs from "
                             "the one the campaign started with at: ppo.lr, rollout.workers\n")


def test_resume_may_change_iterations_and_placement_only(tmp_path):
    from loop.config_load import ConfigError, load_config
    from loop.run_dir import auto_resume_dir, prepare_run_dir

    run_dir = tmp_path / "tiny"

    def cfg(*overrides: str):
        return load_config(REPO / "configs/tiny.yaml",
                           [f"campaign.run_dir={run_dir}", *overrides])

    assert auto_resume_dir(cfg()) is None  # nothing there yet: --auto-resume starts one
    _pin_campaign(run_dir)
    moved = cfg("campaign.iterations=7", "resources.placement_strategy=SPREAD",
                "resources.placement_timeout_s=9")
    assert auto_resume_dir(moved) == run_dir
    assert prepare_run_dir(moved, run_dir) == run_dir
    pinned = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (pinned["campaign"]["iterations"], pinned["resources"]["placement_strategy"],
            pinned["resources"]["placement_timeout_s"]) == (7, "SPREAD", 9.0)
    with pytest.raises(ConfigError, match=r"^--auto-resume .*: the config differs from the one "
                                          r"the campaign started with at: "
                                          r"resources.cpus_per_actor$"):
        auto_resume_dir(cfg("campaign.iterations=7", "resources.placement_strategy=SPREAD",
                            "resources.placement_timeout_s=9", "resources.cpus_per_actor=2"))


def test_resume_and_auto_resume_together_are_refused(tmp_path):
    result = prefloop("run", "configs/tiny.yaml", "--resume", str(tmp_path), "--auto-resume")
    assert result.returncode == 2
    assert result.stderr == "prefloop: error: pass --resume RUN_DIR or --auto-resume, not both\n"
