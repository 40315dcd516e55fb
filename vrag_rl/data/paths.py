"""Where things are by default: the corpus bundled with the repository and the local cache of built artifacts."""

from __future__ import annotations

import os
from pathlib import Path

# The synthetic corpus shipped in data/: the tiny recipe's corpus and the tests' documents.
BUNDLED_CORPUS = Path(__file__).resolve().parents[2] / "data" / "synthetic-small"


def cache_dir() -> Path:
    """Built artifacts (tiny kit, warm policy, page indexes): ``$VRAG_RL_CACHE``, else ``.cache`` here."""
    return Path(os.environ.get("VRAG_RL_CACHE", ".cache"))
