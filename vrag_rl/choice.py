"""``Choice``: a string enum whose values are what configs, requests and records carry.

Members compare equal to their strings (``SearchMode.TEXT == "text"``), so YAML, JSON and logs keep plain
strings; ``Choice.parse`` is the one place a string becomes a member, with an error that names the setting.
"""

from __future__ import annotations

from enum import StrEnum


class Choice(StrEnum):
    @classmethod
    def parse(cls, value: str, key: str):
        """The member whose value is ``value``; ValueError naming ``key`` and the allowed values otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{key} must be one of {[m.value for m in cls]}, got {value!r}") from None
