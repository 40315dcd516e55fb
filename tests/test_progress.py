"""Progress bars: live redraws on a terminal, a few plain lines in a log file."""

import io
import time

from vrag_rl.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_plain_lines_not_thousands_of_redraws(monkeypatch):
    monkeypatch.setenv("VRAG_RL_PROGRESS_S", "30")
    log = io.StringIO()
    for _ in progress_bar(range(5000), desc="index pages", unit="page", stream=log):
        pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and 1 <= len(lines) <= 3, lines
    assert lines[-1].startswith("index pages: 100%") and "5000/5000" in lines[-1]


def test_a_log_file_gets_a_line_per_interval_with_the_latest_postfix(monkeypatch):
    monkeypatch.setenv("VRAG_RL_PROGRESS_S", "0.05")
    log = io.StringIO()
    bar = progress_bar(total=4, desc="grpo", unit="step", stream=log)
    for step in range(4):
        time.sleep(0.06)
        bar.set_postfix(reward=f"{step / 10:.3f}")  # no line of its own: it rides on the next timed one
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert 4 <= len(lines) <= 6, lines
    assert "reward=0.300" in lines[-1] and "4/4" in lines[-1]


def test_a_terminal_gets_tqdms_live_bar():
    term = Terminal()
    for _ in progress_bar(range(3), desc="sft", stream=term):
        pass
    assert "\r" in term.getvalue()
