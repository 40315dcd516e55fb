"""Indices into a fixed list in a fresh seeded order each epoch; the position is part of a checkpoint."""

from __future__ import annotations

import random


class EpochSampler:
    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("nothing to sample from")
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._order_of: tuple[int, list[int]] | None = None  # (epoch, its permutation)

    def _order(self) -> list[int]:
        if self._order_of is None or self._order_of[0] != self.epoch:
            self._order_of = (
                self.epoch,
                random.Random(self.seed * 1_000_003 + self.epoch).sample(range(self.n), self.n),
            )
        return self._order_of[1]

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
            take = min(k - len(out), self.n - self.pos)
            out += self._order()[self.pos : self.pos + take]
            self.pos += take
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def restore(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
