"""`prefloop label import|export|serve` as a person runs them: real processes, exit codes,
messages that name the file and line, and what lands in the ledger."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from storage.db import engine_for
from storage.ledger import Ledger
from storage.records import NewComparison, NewGeneration, NewPreference

REPO = Path(__file__).resolve().parents[2]
PAIR = {"prompt": "What is 2+2?", "response_a": "4", "response_b": "5", "choice": "a",
        "annotator": "alice"}
COLOUR = {"prompt": "Name a colour.", "response_a": "Red.", "response_b": "<b>Blue</b>\n",
          "choice": "b", "annotator": "carol", "strength": 1.5}


def prefloop(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("PREFLOOP_DB_URL", None)
    return subprocess.run([sys.executable, "-m", "loop.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def db(tmp_path: Path):
    """A ledger file with campaign c1 holding two pending comparisons; yields (url, ids)."""
    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    ledger = Ledger.open(url)
    ledger.ensure_campaign("c1")
    prompts = ledger.add_prompts("c1", ["seeded 0", "seeded 1"])
    gens = ledger.add_generations("c1", [NewGeneration(p, f"gen {p}.{k}", 2, 0, "w0", k)
                                         for p in prompts for k in range(2)])
    ids = ledger.add_comparisons("c1", [NewComparison(gens[0], gens[1]),
                                        NewComparison(gens[2], gens[3])])
    yield url, ids
    engine_for(url).dispose()


def counts(url: str) -> dict[str, int]:
    rows = Ledger(url).row_counts()
    return {k: rows[k] for k in ("prompt", "generation", "comparison", "preference")}


def labels(url: str, campaign: str = "c1") -> list[tuple]:
    snap = Ledger(url).snapshot(campaign, kinds=("human",))
    return sorted((r.prompt, r.text_a, r.text_b, r.choice, r.labeler_id, r.strength)
                  for r in snap.rows)


def write_lines(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines),
                    encoding="utf-8")
    return path


def messy_file(tmp_path: Path, c0: int, c1: int) -> Path:
    """Lines 1, 5 and 9 are good; 3 is blank; the other seven are bad."""
    return write_lines(tmp_path / "labels.jsonl", [
        PAIR,                                                                  # 1
        {**PAIR, "prompt": "p", "choice": "x"},                                # 2
        "   ",                                                                 # 3
        '{"prompt": "p",',                                                     # 4
        {"comparison_id": c0, "choice": "tie", "annotator": "bob"},           # 5
        {"comparison_id": c1, "choice": "a", "color": "red"},                 # 6
        '{"prompt": "q", "response_a": "1", "response_b": "2", "choice": "b", '
        '"annotator": "carol", "strength": NaN}',                             # 7
        {**PAIR, "response_b": "4"},                                          # 8
        COLOUR,                                                                # 9
        "[1, 2]",                                                              # 10
        {**PAIR, "choice": "b"},                                               # 11
    ])


def test_a_file_with_bad_lines_reports_each_and_imports_nothing(tmp_path, db):
    url, (c0, c1) = db
    path = messy_file(tmp_path, c0, c1)
    before = counts(url)
    result = prefloop("label", "import", str(path), "--db-url", url, "--campaign", "c1")
    assert result.returncode == 2
    assert result.stdout == ""
    err = result.stderr.splitlines()
    assert len(err) == 8
    assert err[0] == (f"prefloop: error: {path}:2: choice: Input should be 'a', 'b' or 'tie'; "
                      "got 'x'")
    assert err[1].startswith(f"prefloop: error: {path}:4: not valid JSON (Expecting ")
    assert err[2] == (f"prefloop: error: {path}:6: annotator: Field required; color: Extra "
                      "inputs are not permitted")
    assert err[3] == f"prefloop: error: {path}:7: not valid JSON (NaN is not a number JSON allows)"
    assert err[4] == (f"prefloop: error: {path}:8: Value error, response_a and response_b are "
                      "the same text: nothing to compare")
    assert err[5] == f"prefloop: error: {path}:10: expected a JSON object; got a list"
    assert err[6] == (f"prefloop: error: {path}:11: annotator 'alice' labeled this comparison "
                      "differently on line 1")
    assert err[7] == (f"prefloop: error: {path}: 7 bad line(s) of 10; nothing imported (fix "
                      "them, or pass --skip-bad to import the rest)")
    assert counts(url) == before  # not even the pairs' prompts


def test_skip_bad_imports_the_good_lines_and_a_second_import_adds_nothing(tmp_path, db):
    url, (c0, c1) = db
    path = messy_file(tmp_path, c0, c1)
    args = ("label", "import", str(path), "--skip-bad", "--db-url", url, "--campaign", "c1")
    before = counts(url)
    first = prefloop(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == ("imported 3 label(s) into campaign 'c1': 3 new, 0 already in the "
                            "ledger; skipped 7 bad line(s)\n")
    warned = [line.split(": ")[2] for line in first.stderr.splitlines()]
    assert warned == [f"{path}:{n}" for n in (2, 4, 6, 7, 8, 10, 11)]
    assert all(line.startswith("prefloop: warning: ") for line in first.stderr.splitlines())
    assert labels(url) == sorted([
        ("What is 2+2?", "4", "5", "a", "alice", None),
        ("seeded 0", "gen 1.0", "gen 1.1", "tie", "bob", None),
        ("Name a colour.", "Red.", "<b>Blue</b>\n", "b", "carol", 1.5),
    ])
    after = counts(url)
    assert after == {"prompt": before["prompt"] + 2, "generation": before["generation"] + 4,
                     "comparison": before["comparison"] + 2, "preference": 3}

    again = prefloop(*args)
    assert again.returncode == 0, again.stderr
    assert again.stdout == ("imported 3 label(s) into campaign 'c1': 0 new, 3 already in the "
                            "ledger; skipped 7 bad line(s)\n")
    assert counts(url) == after


def test_a_line_that_contradicts_the_ledger_is_named_and_nothing_is_imported(tmp_path, db):
    url, (c0, _) = db
    first = write_lines(tmp_path / "first.jsonl", [PAIR])
    assert prefloop("label", "import", str(first), "--db-url", url, "--campaign", "c1"
                    ).returncode == 0
    before = counts(url)
    changed = write_lines(tmp_path / "changed.jsonl", [
        COLOUR, {"comparison_id": c0, "choice": "a", "annotator": "bob"}, {**PAIR, "choice": "b"},
    ])
    result = prefloop("label", "import", str(changed), "--db-url", url, "--campaign", "c1")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"prefloop: error: {changed}:3: labeler 'alice' already labeled comparison 3 "
        "(preference 1, choice 'a'); to change it record a correction with supersedes=1",
        f"prefloop: error: {changed}: 1 bad line(s) of 3; nothing imported (fix them, or pass "
        "--skip-bad to import the rest)",
    ]
    assert counts(url)["preference"] == before["preference"] == 1


def test_a_refused_label_leaves_no_new_pair_behind(tmp_path, db):
    url, (c0, _) = db
    Ledger(url).record_preference("c1", NewPreference(c0, "a", "human", "bob"))
    before = counts(url)
    path = write_lines(tmp_path / "refused.jsonl", [
        PAIR, COLOUR, {"comparison_id": c0, "choice": "b", "annotator": "bob"},
    ])
    result = prefloop("label", "import", str(path), "--db-url", url, "--campaign", "c1")
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == (
        f"prefloop: error: {path}:3: labeler 'bob' already labeled comparison {c0} (preference "
        "1, choice 'a'); to change it record a correction with supersedes=1")
    assert counts(url) == before  # the two new pairs' prompts, generations, comparisons: gone
    queue = Ledger(url).comparison_counts("c1")
    assert (queue.pending, queue.labeled) == (1, 1)


def test_export_round_trips_through_import_into_another_ledger(tmp_path, db):
    url, (c0, c1) = db
    prefloop("label", "import", str(messy_file(tmp_path, c0, c1)), "--skip-bad", "--db-url", url,
             "--campaign", "c1")
    out = tmp_path / "export.jsonl"
    exported = prefloop("label", "export", "--out", str(out), "--db-url", url, "--campaign", "c1")
    assert exported.returncode == 0, exported.stderr
    assert exported.stderr == f"exported 3 preference(s) of campaign 'c1' (human) to {out}\n"
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [(x["annotator"], x["choice"], x["labeler_kind"]) for x in lines] == [
        ("alice", "a", "human"), ("bob", "tie", "human"), ("carol", "b", "human")]
    assert lines[1]["provenance"]["comparison_id"] == c0
    assert lines[2]["strength"] == 1.5 and lines[2]["response_b"] == "<b>Blue</b>\n"

    other = f"sqlite:///{tmp_path / 'other.sqlite'}"
    into = ("label", "import", str(out), "--db-url", other, "--campaign", "c9")
    moved = prefloop(*into)
    assert moved.returncode == 0, moved.stderr
    assert moved.stderr == "campaign 'c9' did not exist in this ledger: created it\n"
    assert moved.stdout == ("imported 3 label(s) into campaign 'c9': 3 new, 0 already in the "
                            "ledger\n")
    assert labels(other, "c9") == labels(url, "c1")
    assert prefloop(*into).stdout == ("imported 3 label(s) into campaign 'c9': 0 new, 3 already "
                                      "in the ledger\n")

    back = prefloop("label", "export", "--db-url", other, "--campaign", "c9")
    assert back.returncode == 0, back.stderr
    relabeled = [json.loads(x) for x in back.stdout.splitlines()]
    assert [x.pop("provenance")["campaign"] for x in relabeled] == ["c9"] * 3
    assert relabeled == [{k: v for k, v in x.items() if k != "provenance"} for x in lines]
    engine_for(other).dispose()


def test_label_commands_say_which_campaign_is_missing(tmp_path, db):
    url, _ = db
    result = prefloop("label", "import", str(write_lines(tmp_path / "x.jsonl", [PAIR])),
                      "--db-url", url)
    assert result.returncode == 2
    assert result.stderr == ("prefloop: error: which campaign? pass --campaign NAME (or "
                             "--run-dir of a run, whose config.yaml names it)\n")
    unknown = prefloop("label", "serve", "--db-url", url, "--campaign", "nope")
    assert unknown.returncode == 2
    assert unknown.stderr == ("prefloop: error: campaign 'nope' does not exist; create it with "
                              "ensure_campaign()\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("campaign:\n  name: c1\n", encoding="utf-8")
    from_run = prefloop("label", "export", "--run-dir", str(run_dir), "--db-url", url)
    assert from_run.returncode == 0
    assert from_run.stderr == "exported 0 preference(s) of campaign 'c1' (human)\n"


def test_serve_refuses_a_non_loopback_bind_without_tokens(db):
    url, _ = db
    result = prefloop("label", "serve", "--host", "0.0.0.0", "--db-url", url, "--campaign", "c1")
    assert result.returncode == 2
    assert result.stderr.startswith("prefloop: error: refusing to bind the label service to "
                                    "'0.0.0.0': it is not a loopback address and the ledger has "
                                    "no live annotator token")
    assert "Traceback" not in result.stderr


def test_serve_serves_the_page_and_the_api_until_interrupted(db):
    url, _ = db
    token = Ledger(url).add_annotator("alice")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "loop.main", "label", "serve", "--db-url", url,
                             "--campaign", "c1", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.2)
        assert "prefloop labeling" in httpx.get(f"{base}/").text
        shown = httpx.get(f"{base}/api/next", headers={"Authorization": f"Bearer {token}"})
        assert shown.json()["remaining"] == 1
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"serving campaign 'c1' at {base}/ (Ctrl-C stops)" in err


def test_export_has_help():
    result = prefloop("label", "export", "--help")
    assert result.returncode == 0 and "Usage: prefloop label export" in result.stdout
