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
    ["label", "serve", "--help"], ["label", "import", "--help"], ["annotators", "--help"],
    ["annotators", "add", "--help"], ["annotators", "revoke", "--help"],
    ["annotators", "list", "--help"], ["db", "--help"], ["db", "upgrade", "--help"],
    ["db", "status", "--help"], ["report", "--help"],
])
def test_every_command_has_help(argv):
    result = prefloop(*argv)
    assert result.returncode == 0, result.stderr
    assert "Usage: prefloop" in result.stdout


@pytest.mark.parametrize(("argv", "what"), [
    (["label", "serve"], "the human label service (prefloop label serve)"),
    (["report", "runs/x"], "the Goodhart report (prefloop report)"),
])
def test_unbuilt_capability_says_so_and_fails(argv, what):
    result = prefloop(*argv)
    assert result.returncode == 3
    assert result.stderr == (
        f"prefloop: error: {what} is not built yet in this version of prefloop\n")
    assert "Traceback" not in result.stderr
