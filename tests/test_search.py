"""The lexical side's own pieces: exact top-k over BM25 scores, and where a phrase occurs."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_sentinel.serving.search import phrase_in, top_k


def _top_k_by_sorting(scores: np.ndarray, k: int) -> list[int]:
    rows = [int(i) for i in np.flatnonzero(scores > 0)]
    return sorted(rows, key=lambda i: (-float(scores[i]), i))[:k]


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(st.sampled_from([0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 7.25]) | st.floats(0, 100, width=32),
                min_size=0, max_size=400),
       st.integers(1, 60), st.sampled_from([1, 2, 16, 64]))
def test_top_k_is_exact_with_ties_zeros_and_any_stride(values, k, stride):
    """The sampled threshold only narrows where to look: the answer is the full sort's,
    ties broken by the lower row, zeros never returned."""
    scores = np.asarray(values, dtype=np.float32)
    assert top_k(scores, k, stride).tolist() == _top_k_by_sorting(scores, k)


def test_top_k_at_scale_matches_a_full_sort():
    rng = np.random.default_rng(3)
    for _ in range(20):
        scores = np.zeros(100_000, dtype=np.float32)
        hit = rng.choice(100_000, int(rng.integers(1, 60_000)), replace=False)
        scores[hit] = rng.gamma(2.0, 1.0, len(hit)).round(1)  # rounded: many ties
        assert top_k(scores, 50).tolist() == _top_k_by_sorting(scores, 50)


def test_top_k_when_the_sample_holds_the_best_rows():
    """Every 16th row is the best: the sampled threshold lets too few rows through, and the
    rest of the top comes from the tied rows below it, lower rows first."""
    scores = np.ones(160, dtype=np.float32)
    scores[::16] = 10.0
    scores[5] = 0.0
    best = top_k(scores, 50)
    assert best.tolist() == _top_k_by_sorting(scores, 50)
    assert best[:10].tolist() == list(range(0, 160, 16)) and 5 not in best.tolist()


def test_a_phrase_is_found_only_on_token_boundaries():
    doc = np.array([7, 3, 9, 3, 9, 4], dtype=np.int32)
    assert phrase_in(doc, [3, 9]) == 1
    assert phrase_in(doc, [9, 4]) == 4
    assert phrase_in(doc, [4, 7]) is None
    # the bytes of [0x201] (01 02 00 00) sit inside [1 << 24, 2] at byte 3, across two tokens
    assert phrase_in(np.array([1 << 24, 2], dtype=np.int32), [0x201]) is None
    assert phrase_in(np.array([1 << 24, 2, 0x201], dtype=np.int32), [0x201]) == 2
