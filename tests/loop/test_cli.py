"""The `prefloop` CLI as a person runs it: real processes, exit codes, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    ["annotators", "list", "--help"], ["db", "--help"], ["db", "upgrade", "--help"],
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
