"""Exact ranks (sempre_jax/evals/ranks.py) against brute-force argsort on 1 and 4 devices."""

import jax
import numpy as np
import pytest

from sempre_jax import mesh as mesh_lib
from sempre_jax.evals import ranks


def argsort_positions(scores, gts, trials=3000, seed=0):
  """[Q, trials] 1-based position of the best ground truth when candidates are
  sorted by score with ties broken at random, one random tie-break per trial
  (integer-valued scores: the noise stays below the gap between scores)."""
  rng = np.random.default_rng(seed)
  out = []
  for s, gt in zip(scores, gts):
    noise = rng.uniform(0, 1e-3, [trials, len(s)])
    order = np.argsort(-(s[None, :] + noise), axis=1)
    position = np.argsort(order, axis=1)
    out.append(1 + position[:, gt].min(axis=1))
  return np.array(out)


def argsort_rank(scores, gts, trials=3000, seed=0):
  """Mean position of the best ground truth over random tie-breaks: [Q]."""
  return argsort_positions(scores, gts, trials, seed).mean(axis=1)


def assert_same_ranks(a, b):
  for field in ("above", "tied", "tied_gts"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def tied_case(seed, num_queries=37, num_candidates=53, dim=6):
  """Small-integer embeddings (exact float32 scores, many ties), duplicated
  candidates, 1 to 3 ground truths per query."""
  rng = np.random.default_rng(seed)
  q = rng.integers(-2, 3, [num_queries, dim]).astype(np.float32)
  c = rng.integers(-2, 3, [num_candidates, dim]).astype(np.float32)
  c[10:20] = c[0]
  lists = [rng.choice(num_candidates, rng.integers(1, 4), replace=False)
           for _ in range(num_queries)]
  return q, c, lists


@pytest.mark.parametrize("num_devices", [1, 4])
def test_ranks_with_ties_and_several_ground_truths_match_argsort(num_devices):
  if jax.device_count() < num_devices:
    pytest.skip(f"needs {num_devices} devices")
  q, c, lists = tied_case(0)
  scores = q.astype(np.float64) @ c.T.astype(np.float64)
  expected = argsort_rank(scores, lists)
  ranker = ranks.ExactRanker(mesh_lib.make_mesh(num_devices), query_chunk=8, candidate_chunk=4)
  got = ranker(q, c, ranks.GroundTruth.from_lists(lists))
  np.testing.assert_allclose(got.rank, expected, atol=0.2)
  assert (got.rank != np.round(got.rank)).any()         # ties were really there
  # The explicit-score path agrees exactly.
  assert_same_ranks(
      ranks.ranks_from_scores(scores, ranks.GroundTruth.from_lists(lists), chunk=5), got)


@pytest.mark.parametrize("num_devices", [1, 4])
def test_candidates_ranked_among_the_queries(num_devices):
  """`both`'s second half is the transposed score matrix ranked with the
  transposed ground truths (a candidate's: the queries that have it as one);
  candidates that are no query's ground truth get zeros. Device arrays as
  candidates, one ranker for two candidate sets."""
  if jax.device_count() < num_devices:
    pytest.skip(f"needs {num_devices} devices")
  ranker = ranks.ExactRanker(mesh_lib.make_mesh(num_devices), query_chunk=8, candidate_chunk=4)
  for seed in (5, 6):
    q, c, lists = tied_case(seed)
    scores = q.astype(np.float64) @ c.T.astype(np.float64)
    gts = ranks.GroundTruth.from_lists(lists)
    queries, candidates = ranker.both(q, jax.numpy.asarray(c), gts)
    assert_same_ranks(queries, ranks.ranks_from_scores(scores, gts))
    owners = [[i for i, gt in enumerate(lists) if j in gt] for j in range(len(c))]
    some = np.array([j for j, o in enumerate(owners) if o])
    assert 0 < len(some) < len(c) and max(map(len, owners)) > 1
    assert_same_ranks(candidates[some], ranks.ranks_from_scores(
        scores.T[some], ranks.GroundTruth.from_lists([owners[j] for j in some])))
    none = np.setdiff1d(np.arange(len(c)), some)
    assert not np.concatenate([candidates.above[none], candidates.tied[none],
                               candidates.tied_gts[none]]).any()


@pytest.mark.parametrize("num_devices", [1, 4])
def test_ranks_without_ties_are_argsort_positions(num_devices):
  if jax.device_count() < num_devices:
    pytest.skip(f"needs {num_devices} devices")
  rng = np.random.default_rng(1)
  q = rng.normal(size=[70, 16]).astype(np.float32)
  c = rng.normal(size=[45, 16]).astype(np.float32)
  c /= np.linalg.norm(c, axis=1, keepdims=True)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  lists = [rng.choice(45, rng.integers(1, 3), replace=False) for _ in range(70)]
  scores = q.astype(np.float64) @ c.T.astype(np.float64)
  expected = [1 + min(list(np.argsort(-s)).index(g) for g in gt) for s, gt in zip(scores, lists)]
  ranker = ranks.ExactRanker(mesh_lib.make_mesh(num_devices), query_chunk=32, candidate_chunk=8)
  got = ranker(q, c, ranks.GroundTruth.from_lists(lists))
  np.testing.assert_array_equal(got.rank, expected)
  for k in (1, 3, 10):                                  # without ties R@K is 0 or 1
    np.testing.assert_array_equal(got.recall_at(k), np.array(expected) <= k)


def test_many_ground_truths_per_query():
  """Queries with 40-60 ground truths (the sorted-search membership path)."""
  rng = np.random.default_rng(2)
  q = rng.integers(-3, 4, [9, 5]).astype(np.float32)
  c = rng.integers(-3, 4, [300, 5]).astype(np.float32)
  lists = [rng.choice(300, rng.integers(40, 61), replace=False) for _ in range(9)]
  scores = q.astype(np.float64) @ c.T.astype(np.float64)
  got = ranks.ExactRanker(mesh_lib.make_mesh(), candidate_chunk=32)(
      q, c, ranks.GroundTruth.from_lists(lists))
  np.testing.assert_allclose(got.rank, argsort_rank(scores, lists), atol=0.2)


@pytest.mark.parametrize("num_devices", [1, 4])
def test_recall_at_k_is_the_expectation_under_random_tie_breaking(num_devices):
  """Big tie blocks (scores in -3..3 over 150 candidates) and 1-6 ground truths:
  P(rank <= K) per query against argsort with random tie-breaks over 4,000 draws."""
  if jax.device_count() < num_devices:
    pytest.skip(f"needs {num_devices} devices")
  rng = np.random.default_rng(3)
  q = rng.integers(-1, 2, [40, 3]).astype(np.float32)
  c = rng.integers(-1, 2, [150, 3]).astype(np.float32)
  lists = [rng.choice(150, rng.integers(1, 7), replace=False) for _ in range(40)]
  gts = ranks.GroundTruth.from_lists(lists)
  scores = q.astype(np.float64) @ c.T.astype(np.float64)
  positions = argsort_positions(scores, lists, trials=4000, seed=1)
  got = ranks.ExactRanker(mesh_lib.make_mesh(num_devices), query_chunk=16,
                          candidate_chunk=8)(q, c, gts)
  assert_same_ranks(got, ranks.ranks_from_scores(scores, gts))
  assert np.median(got.tied) >= 15 and (got.tied_gts > 1).any()
  for k in (1, 5, 10, 30):
    expected = (positions <= k).mean(axis=1)
    np.testing.assert_allclose(got.recall_at(k), expected, atol=0.04, err_msg=f"R@{k}")
    assert abs(got.recall_at(k).mean() - expected.mean()) < 0.01
    # Thresholding the expected rank is another number (what R@K used to be).
    assert np.abs((got.rank <= k) - expected).max() > 0.2
  error = np.abs(got.rank - positions.mean(axis=1))
  assert (error <= 5 * positions.std(axis=1) / np.sqrt(4000) + 1e-9).all()


def test_recall_hand_cases():
  """Worked out by hand from the positions of g ground truths among t + g tied."""
  r = ranks.Ranks.of(above=[0, 0, 2, 7, 0], tied=[3, 3, 29, 0, 0], tied_gts=[2, 2, 1, 1, 1])
  # t=3, g=2: the first slot is a ground truth w.p. 2/5; one of two: 1 - (3/5)(2/4) = 7/10.
  # above 2 then 29 + 1 tied: R@10 = P(position <= 8 of 30) = 8/30.  above 7, no tie.
  np.testing.assert_allclose(r.recall_at(1), [2 / 5, 2 / 5, 0, 0, 1])
  np.testing.assert_allclose(r.recall_at(2), [7 / 10, 7 / 10, 0, 0, 1])
  np.testing.assert_allclose(r.recall_at(10), [1, 1, 8 / 30, 1, 1])
  np.testing.assert_allclose(r.recall_at(3), [9 / 10, 9 / 10, 1 / 30, 0, 1])   # 1 - (3/5)(2/4)(1/3)
  np.testing.assert_allclose(r.recall_at(4), [1, 1, 2 / 30, 0, 1])
  np.testing.assert_allclose(r.rank, [2, 2, 3 + 29 / 2, 8, 1])
  assert len(r[np.array([True, False, True, False, False])]) == 2
  assert_same_ranks(ranks.Ranks.concatenate([r[:2], r[2:]]), r)


def test_ground_truth_layout():
  gts = ranks.GroundTruth.from_pairs([2, 0, 2, 2, 0], [7, 3, 1, 7, 4], num_queries=4)
  np.testing.assert_array_equal(gts.counts(), [2, 0, 2, 0])
  np.testing.assert_array_equal(gts.padded(0, 3, rows=4, width=2),
                                [[3, 4], [-1, -1], [1, 7], [-1, -1]])
  np.testing.assert_array_equal(gts.counts(1, 3), [0, 2])
  with pytest.raises(ValueError, match="at least one ground truth"):
    ranks.ExactRanker(mesh_lib.make_mesh(1))(
        np.eye(4, 8, dtype=np.float32), np.eye(8, dtype=np.float32), gts)
