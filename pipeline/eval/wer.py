"""Word error rate, for comparing two transcripts of the same speech (e.g. batched vs sequential ASR)."""
from __future__ import annotations

import re


def words(text: str) -> list[str]:
    """Lower-case words without punctuation (apostrophes kept)."""
    return re.findall(r"[a-z0-9']+", text.lower())


def word_error_rate(ref: list[str], hyp: list[str]) -> float:
    """Levenshtein distance over words (substitutions, insertions, deletions) / len(ref)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / max(1, len(ref))
