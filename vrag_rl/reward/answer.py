"""Rule-based answer metrics: exact match and token F1 (SQuAD style) and ANLS (DocVQA style).

Every metric takes the prediction and either one reference or a list of acceptable references, and
returns the best score over the references, in [0, 1]. An empty reference list scores 0.0.
"""

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

References = str | Sequence[str]

# Levenshtein is O(n*m) in pure Python; ANLS targets short answers, so strings are cut to this many
# characters first. That bounds one comparison to ~0.1 s and only changes scores of answers longer than this.
ANLS_MAX_CHARS = 512

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation and the articles a/an/the, collapse whitespace (SQuAD)."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_list(refs: References) -> list[str]:
    return [refs] if isinstance(refs, str) else list(refs)


def _best(pred: str, refs: References, metric: Callable[[str, str], float]) -> float:
    return max((metric(pred, ref) for ref in _as_list(refs)), default=0.0)


def _exact_match_one(pred: str, ref: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(ref))


def _token_f1_one(pred: str, ref: str) -> float:
    pred_tokens = normalize_answer(pred).split()
    ref_tokens = normalize_answer(ref).split()
    if not pred_tokens or not ref_tokens:
        # Nothing left after normalisation on one side: right only if both are empty (SQuAD v2 rule).
        return float(pred_tokens == ref_tokens)
    overlap = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(pred: str, refs: References) -> float:
    """1.0 if the normalised prediction equals some normalised reference, else 0.0."""
    return _best(pred, refs, _exact_match_one)


def token_f1(pred: str, refs: References) -> float:
    """Harmonic mean of token precision and recall (token multiset overlap) after normalisation."""
    return _best(pred, refs, _token_f1_one)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute, each cost 1), two rows of O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a  # the shorter string spans the rows
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _anls_normalize(text: str) -> str:
    # DocVQA compares lowercased answers with surrounding whitespace removed; punctuation counts.
    return " ".join(text.lower().split())[:ANLS_MAX_CHARS]


def _anls_one(pred: str, ref: str, threshold: float) -> float:
    pred, ref = _anls_normalize(pred), _anls_normalize(ref)
    longest = max(len(pred), len(ref))
    if longest == 0:
        return 1.0
    # The distance is at least the length difference: skip the quadratic work when that alone fails.
    if abs(len(pred) - len(ref)) / longest >= threshold:
        return 0.0
    distance = levenshtein(pred, ref) / longest
    return 1.0 - distance if distance < threshold else 0.0


def anls(pred: str, refs: References, threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity for one question (DocVQA): for each reference,
    1 - lev(pred, ref) / max(len(pred), len(ref)), set to 0 when the normalised distance is
    >= ``threshold``; the best reference counts. Strings are lowercased, whitespace-collapsed and
    cut to ``ANLS_MAX_CHARS`` characters.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    return _best(pred, refs, lambda p, r: _anls_one(p, r, threshold))
