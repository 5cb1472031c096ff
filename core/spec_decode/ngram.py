"""N-gram prompt lookup (TGI's `--speculate N` on a model without Medusa heads; vLLM's "ngram").

The drafts for the next step are the tokens that followed the most recent earlier occurrence of
the context's last n tokens that has num_drafts tokens after it (else the earliest occurrence),
trying the longest n first. Copy-heavy outputs (code edits, quoting,
extraction, repeated structure) are where it pays; elsewhere it usually finds nothing or a miss,
and a miss costs only the extra positions of one forward.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(tokens: Sequence[int], num_drafts: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to `num_drafts` tokens continuing `tokens`, or [] when no suffix of length
    min_ngram..max_ngram occurred earlier."""
    if num_drafts <= 0 or len(tokens) < min_ngram + 1:
        return []
    context = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        # windows starting at 0 .. len - n - 1: every earlier occurrence, never the suffix itself
        windows = sliding_window_view(context[:-1], n)
        hits = np.flatnonzero((windows == context[-n:]).all(axis=1))
        if hits.size:
            # the latest occurrence followed by num_drafts tokens, else the earliest (the longest
            # continuation): in a cycle the latest one ends right at the context's end
            full = hits[hits + n + num_drafts <= len(context)]
            start = int(full[-1] if full.size else hits[0]) + n
            return context[start:start + num_drafts].tolist()
    return []
