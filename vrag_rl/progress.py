"""Progress bars that suit where the output goes: live on a terminal, plain lines in a log file.

On a terminal a tqdm bar redraws one line in place. Sent to a file or a pipe (Slurm's output file, ``make demo >
log``), every redraw would stay in the file as a carriage-return update: thousands per job. There the bar writes
one plain line when it starts, then at most one every ``VRAG_RL_PROGRESS_S`` seconds (30 by default), and a last
one when it ends.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm import tqdm


def log_interval_s() -> float:
    return float(os.environ.get("VRAG_RL_PROGRESS_S", "30"))


class _Lines:
    """A file for tqdm that turns each redraw into a line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").replace("\x1b[A", "").strip()  # tqdm's in-place redraw codes
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """A bar for log files: a new postfix waits for the next timed line instead of forcing one."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def progress_bar(iterable: Iterable | None = None, *, stream=None, **kwargs) -> tqdm:
    """A tqdm bar over ``iterable`` (tqdm's own keyword arguments pass through) on ``stream`` (stderr)."""
    stream = stream or sys.stderr
    if stream.isatty():
        return tqdm(iterable, file=stream, **kwargs)
    interval = log_interval_s()
    # maxinterval: tqdm's monitor thread forces a redraw after it; not sooner than the interval either
    options = {"mininterval": interval, "maxinterval": interval, "ascii": True, "dynamic_ncols": False}
    return _LogBar(iterable, file=_Lines(stream), **(options | kwargs))
