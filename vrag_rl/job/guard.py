"""Stops a run whose optimizer updates keep being skipped (the GRPO loop and the SFT loop both use it)."""

from __future__ import annotations


class SkipGuard:
    """Stops a run whose optimizer updates keep being skipped (non-finite loss or gradients): ``limit`` in a row."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def record(self, skipped: bool, where: str) -> None:
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.in_a_row >= self.limit:
            raise FloatingPointError(
                f"{self.in_a_row} optimizer updates in a row had a non-finite loss or gradient norm (last at {where}) "
                "and were skipped: stopping. Lower the learning rate or look for NaN in the inputs."
            )
