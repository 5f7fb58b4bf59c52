"""Project-level contracts: the README's commands, CI's entry point, the Docker image."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    assert "```bash\nbash .ci/test\n```" in readme
    run = [line for line in (REPO / ".ci/run").read_text().splitlines()
           if line.strip() and not line.startswith("#")]
    assert run == ["set -euo pipefail", 'exec bash "$(dirname "$0")/test" "$@"']


def test_readme_run_command_uses_a_shipped_config():
    readme = (REPO / "README.md").read_text()
    assert "```bash\nbash .ci/setup && .venv/bin/prefloop run configs/demo.yaml\n```" in readme
    assert (REPO / "configs/demo.yaml").is_file()


def test_ci_test_fails_when_pytest_collects_nothing():
    script = (REPO / ".ci/test").read_text()
    assert 'if [ "$rc" = 5 ]; then' in script and "exit 1" in script


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "prefloop"
    assert exe.is_file(), f"{exe}: `pip install -e .` did not install the prefloop command"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "Usage: prefloop" in result.stdout


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(REPO / "docker/Dockerfile")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_lint_can_fail(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install g++\n")
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "DL3007" in result.stdout  # `latest` tag
