"""recall@k against a brute-force reference, clip_benchmark key names, ranked-list agreement."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from retrieval.eval.recall import (
    RecallReport,
    clip_benchmark_metrics,
    evaluate_embeddings,
    recall_at_k,
    recall_from_ranked,
)


def brute_recall(scores, positives, ks):
    """Reference, written as plainly as possible.

    Tie rule (optimistic): rank(c) = 1 + #{candidates scoring strictly more than c}; a query hits at k when
    some positive has rank <= k. Queries with no positive are misses.
    """
    scores = np.asarray(scores).tolist()
    positives = np.asarray(positives).tolist()
    out = {}
    for k in ks:
        hits = 0
        for row, pos in zip(scores, positives):
            for p in range(len(row)):
                if not pos[p]:
                    continue
                better = 0
                for c in range(len(row)):
                    if row[c] > row[p]:
                        better += 1
                if better + 1 <= k:
                    hits += 1
                    break
        out[k] = hits / len(scores)
    return out


def ranked_positives_first(scores, positives):
    """Full ranking by score, ties broken with positives first (the order the optimistic rule assumes)."""
    out = []
    for row, pos in zip(np.asarray(scores).tolist(), np.asarray(positives).tolist()):
        order = sorted(range(len(row)), key=lambda c: (-row[c], not pos[c], c))
        out.append(np.array(order))
    return out


def random_case(rng, q, n, score_range, pos_rate):
    scores = rng.integers(0, score_range, size=(q, n))
    positives = rng.random((q, n)) < pos_rate
    return scores, positives


@pytest.mark.parametrize("seed", range(20))
def test_recall_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    q, n = int(rng.integers(1, 15)), int(rng.integers(1, 12))
    scores, positives = random_case(rng, q, n, score_range=int(rng.integers(1, 5)), pos_rate=0.25)
    ks = (1, 2, 3, 5, 10, 50)  # includes k > n
    expected = brute_recall(scores, positives, ks)
    assert recall_at_k(scores, positives, ks) == pytest.approx(expected)
    # same numbers with float scores (ties preserved exactly)
    assert recall_at_k(scores.astype(np.float32), positives, ks) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(10))
def test_recall_from_ranked_agrees_with_dense(seed):
    rng = np.random.default_rng(100 + seed)
    q, n = 12, 9
    scores, positives = random_case(rng, q, n, score_range=3, pos_rate=0.3)
    ks = (1, 3, 5, 20)
    ranked = ranked_positives_first(scores, positives)
    pos_sets = [set(np.flatnonzero(p).tolist()) for p in positives]
    dense = recall_at_k(scores, positives, ks)
    assert recall_from_ranked(ranked, pos_sets, ks) == pytest.approx(dense)
    # as a 2-D array, and truncated to the deepest k as a search would return it (with FAISS -1 padding)
    arr = np.stack(ranked)
    assert recall_from_ranked(arr, pos_sets, ks) == pytest.approx(dense)
    padded = np.full((q, 25), -1)
    padded[:, :n] = arr
    assert recall_from_ranked(padded, pos_sets, ks) == pytest.approx(dense)


def test_continuous_scores_multiple_positives():
    rng = np.random.default_rng(7)
    scores = rng.standard_normal((40, 30))
    positives = np.zeros((40, 30), dtype=bool)
    for i in range(40):
        positives[i, rng.choice(30, size=int(rng.integers(1, 5)), replace=False)] = True
    ks = (1, 5, 10, 30, 31)
    got = recall_at_k(scores, positives, ks)
    assert got == pytest.approx(brute_recall(scores, positives, ks))
    assert got[30] == got[31] == 1.0


def test_small_hand_examples():
    scores = np.array([[3.0, 2.0, 1.0], [1.0, 1.0, 1.0], [5.0, 5.0, 4.0], [0.0, 0.0, 0.0]])
    positives = np.array([[False, False, True], [False, False, True], [False, False, True], [False, False, False]])
    # q0: positive ranked 3rd; q1: all tied -> rank 1; q2: positive below two tied -> rank 3; q3: no positive.
    assert recall_at_k(scores, positives, (1, 2, 3)) == {1: 0.25, 2: 0.25, 3: 0.75}


def test_block_processing_matches(monkeypatch):
    import retrieval.eval.recall as ev

    rng = np.random.default_rng(3)
    scores, positives = random_case(rng, 50, 20, score_range=4, pos_rate=0.2)
    whole = recall_at_k(scores, positives, (1, 5))
    monkeypatch.setattr(ev, "_BLOCK_ELEMENTS", 7)  # forces many tiny blocks
    assert recall_at_k(scores, positives, (1, 5)) == whole


def test_bad_inputs():
    with pytest.raises(ValueError):
        recall_at_k(np.zeros((2, 3)), np.zeros((2, 2), dtype=bool))
    with pytest.raises(ValueError):
        recall_at_k(np.zeros((2, 3)), np.zeros((2, 3), dtype=bool), ks=(0,))
    with pytest.raises(ValueError):
        recall_at_k(np.full((1, 2), np.nan), np.ones((1, 2), dtype=bool))
    with pytest.raises(ValueError):
        recall_from_ranked([[1]], [{1}, {2}])


def test_metric_key_names_and_report():
    metrics = clip_benchmark_metrics({1: 0.5, 5: 0.75, 10: 1.0}, {1: 0.25, 5: 0.5, 10: 0.75})
    assert list(metrics) == [
        "image_retrieval_recall@1",
        "text_retrieval_recall@1",
        "image_retrieval_recall@5",
        "text_retrieval_recall@5",
        "image_retrieval_recall@10",
        "text_retrieval_recall@10",
    ]
    assert metrics["image_retrieval_recall@5"] == 0.75
    assert metrics["text_retrieval_recall@10"] == 0.75
    report = RecallReport(metrics, n_images=4, n_captions=8)
    data = json.loads(report.to_json())
    assert data["image_retrieval_recall@1"] == 0.5
    assert data["n_images"] == 4 and data["n_captions"] == 8


def test_evaluate_embeddings_matches_clip_benchmark_pairing(monkeypatch):
    import retrieval.eval.recall as ev

    rng = np.random.default_rng(11)
    n_images, d = 10, 8
    image_emb = rng.standard_normal((n_images, d)).astype(np.float32)
    idx = np.repeat(np.arange(n_images), rng.integers(1, 4, size=n_images))
    text_emb = (image_emb[idx] + 1.5 * rng.standard_normal((len(idx), d))).astype(np.float32)
    ks = (1, 5, 10)

    scores = text_emb @ image_emb.T
    positives = np.zeros(scores.shape, dtype=bool)
    positives[np.arange(len(idx)), idx] = True
    t2i = brute_recall(scores, positives, ks)
    i2t = brute_recall(scores.T, positives.T, ks)
    expected = clip_benchmark_metrics(t2i, i2t)

    report = evaluate_embeddings(image_emb, text_emb, idx, ks)
    assert report.metrics == pytest.approx(expected)
    assert (report.n_images, report.n_captions) == (n_images, len(idx))
    assert report.metrics["image_retrieval_recall@10"] == 1.0  # k >= n_images

    monkeypatch.setattr(ev, "_BLOCK_ELEMENTS", 5)
    assert evaluate_embeddings(image_emb, text_emb, idx, ks).metrics == pytest.approx(expected)


def test_no_torch_import():
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = "import sys, retrieval.eval.recall, retrieval.datasets; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"
