"""Settings as flat ``{dotted.key: value}`` dictionaries, and what differs between two of them.

A run directory records the settings that change its results (a training checkpoint's fingerprint, an
evaluation's ``settings.json``); a rerun compares its own against them and names every key that differs.
"""

from __future__ import annotations

import json


def flatten(settings: dict) -> dict[str, object]:
    """Nested dicts as one level of dotted keys; values other than JSON scalars become strings."""
    flat: dict[str, object] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)

    walk("", settings)
    return json.loads(json.dumps(flat))  # as it reads back from disk (tuples become lists)


def differences(saved: dict[str, object], current: dict[str, object]) -> list[str]:
    """``key: saved -> current`` for every key whose value differs (or exists on one side only)."""
    keys = sorted(set(saved) | set(current))
    changed = [k for k in keys if saved.get(k) != current.get(k)]
    return [f"{k}: {saved.get(k, '(unset)')!r} -> {current.get(k, '(unset)')!r}" for k in changed]
