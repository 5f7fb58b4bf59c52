"""Campaign progress: a bar on terminals, plain lines in job logs."""

from __future__ import annotations

import io

import pytest

from loop.progress import CampaignProgress, wants_bar


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_job_logs_get_one_plain_line_per_iteration():
    out = io.StringIO()  # not a terminal: what `ray job logs` captures
    with CampaignProgress("auto", total=3, done=1, stream=out) as progress:
        assert progress.bar is None
        progress.advance(2, "iteration 2/3: reward 0.5", "reward 0.5")
        progress.advance(3, "iteration 3/3: reward 0.7", "reward 0.7")
    assert out.getvalue() == "iteration 2/3: reward 0.5\niteration 3/3: reward 0.7\n"
    assert progress.done == 3


def test_a_terminal_gets_a_bar_with_the_count_and_the_latest_numbers():
    out = Tty()
    with CampaignProgress("auto", total=4, done=1, stream=out) as progress:
        assert progress.bar is not None
        progress.advance(2, "iteration 2/4: reward 0.25", "reward 0.25")
        assert progress.bar.tasks[0].completed == 2
    text = out.getvalue()
    assert "iteration 2/4: reward 0.25" in text  # the line scrolls above the bar
    assert "2/4" in text and "reward 0.25" in text and "iterations" in text
    assert "\x1b[" in text  # drawn with terminal control codes


def test_lines_on_a_terminal_and_a_forced_bar_in_a_file():
    assert not wants_bar("lines", Tty())
    assert wants_bar("bar", io.StringIO())
    assert not wants_bar("auto", io.StringIO()) and wants_bar("auto", Tty())
    with pytest.raises(ValueError, match=r"metrics\.progress: expected auto, bar or lines"):
        wants_bar("fancy", io.StringIO())
