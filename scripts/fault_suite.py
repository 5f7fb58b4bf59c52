"""Fault-tolerance suite (issue #9): run every test of tests/fault, the `slow` ones included, and
print what held.

Each test injects one fault (a SIGKILL mid-checkpoint, a labeler process dying after its
commit, a poisoning annotator, an UPDATE/DELETE of a fact, a node lost with its rollout
objects, 3× the object store in rollouts) or is the negative control that shows its check can
fail. PostgreSQL cases use ``$PREFLOOP_TEST_PG_URL``, else a throwaway
server started here with ``.ci/postgres.sh`` (stopped at the end).

Usage: ``python scripts/fault_suite.py [-k EXPR] [--no-pg-start]``. Prints a table (test ->
held / failed / skipped, seconds) and ends with ``RESULT held=<n> failed=<m>``; exits 1 when a
test failed or none ran.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PG_ENV = "PREFLOOP_TEST_PG_URL"


@contextmanager
def postgres(start: bool) -> Iterator[str | None]:
    """``$PREFLOOP_TEST_PG_URL``, else a server from .ci/postgres.sh for the suite's duration."""
    if os.environ.get(PG_ENV) or not start:
        yield os.environ.get(PG_ENV)
        return
    script = 'source .ci/postgres.sh && pg_start >&2 && echo "$PREFLOOP_TEST_PG_URL" && read _; ' \
             "pg_stop"
    proc = subprocess.Popen(["bash", "-c", script], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip() if proc.stdout else ""
        if not url:
            raise RuntimeError("could not start PostgreSQL with .ci/postgres.sh (see stderr)")
        yield url
    finally:
        if proc.stdin:
            proc.stdin.write("\n")
            proc.stdin.close()
        proc.wait(timeout=60)


def outcomes(junit: Path) -> list[tuple[str, str, float]]:
    """(test id, held|failed|skipped, seconds) per test case of a JUnit XML report."""
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        verdict = "held"
        if case.find("failure") is not None or case.find("error") is not None:
            verdict = "failed"
        elif case.find("skipped") is not None:
            verdict = "skipped"
        rows.append((f"{module}::{case.get('name')}", verdict, float(case.get("time", 0.0))))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default=None, help="pytest -k expression (a subset of the suite)")
    parser.add_argument("--no-pg-start", action="store_true",
                        help=f"do not start PostgreSQL when ${PG_ENV} is unset")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, postgres(not args.no_pg_start) as pg_url:
        junit = Path(tmp) / "fault.xml"
        env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
        if pg_url:
            env[PG_ENV] = pg_url
        cmd = [sys.executable, "-m", "pytest", "-m", "slow or not slow", "tests/fault", "-q",
               "-p", "no:cacheprovider", f"--junitxml={junit}"]
        if args.k:
            cmd += ["-k", args.k]
        subprocess.run(cmd, cwd=REPO, env=env, check=False)
        rows = outcomes(junit) if junit.is_file() else []
    width = max([len(name) for name, _, _ in rows] + [4])
    print(f"\n{'test':<{width}}  {'outcome':<7}  {'s':>6}")
    for name, verdict, seconds in rows:
        print(f"{name:<{width}}  {verdict:<7}  {seconds:6.1f}")
    held = sum(v == "held" for _, v, _ in rows)
    failed = sum(v == "failed" for _, v, _ in rows)
    skipped = sum(v == "skipped" for _, v, _ in rows)
    print(f"RESULT held={held} failed={failed}" + (f" skipped={skipped}" if skipped else ""))
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
