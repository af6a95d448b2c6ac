"""Exact ranks (sempre_jax/ranks.py) against brute-force argsort on 1 and 4 devices."""

import jax
import numpy as np
import pytest

from sempre_jax import mesh as mesh_lib
from sempre_jax.evals import ranks


def argsort_rank(scores, gts, trials=3000, seed=0):
  """Mean 1-based position of the best ground truth when candidates are sorted
  by score with ties broken at random (argsort over many random tie-breaks)."""
  rng = np.random.default_rng(seed)
  out = []
  for s, gt in zip(scores, gts):
    noise = rng.uniform(0, 1e-3, [trials, len(s)])     # below the gap between scores
    order = np.argsort(-(s[None, :] + noise), axis=1)
    position = np.argsort(order, axis=1)
    out.append(1 + position[:, gt].min(axis=1).mean())
  return np.array(out)


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
  ranker = ranks.ExactRanker(mesh_lib.make_mesh(num_devices), c, query_chunk=8,
                             candidate_chunk=4)
  got = ranker(q, ranks.GroundTruth.from_lists(lists))
  np.testing.assert_allclose(got, expected, atol=0.2)
  assert (got != np.round(got)).any()                   # ties were really there
  # The explicit-score path agrees exactly.
  np.testing.assert_array_equal(
      ranks.ranks_from_scores(scores, ranks.GroundTruth.from_lists(lists), chunk=5), got)


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
  ranker = ranks.ExactRanker(mesh_lib.make_mesh(num_devices), c, query_chunk=32,
                             candidate_chunk=8)
  np.testing.assert_array_equal(ranker(q, ranks.GroundTruth.from_lists(lists)), expected)


def test_many_ground_truths_per_query():
  """Queries with 40-60 ground truths (the sorted-search membership path)."""
  rng = np.random.default_rng(2)
  q = rng.integers(-3, 4, [9, 5]).astype(np.float32)
  c = rng.integers(-3, 4, [300, 5]).astype(np.float32)
  lists = [rng.choice(300, rng.integers(40, 61), replace=False) for _ in range(9)]
  scores = q.astype(np.float64) @ c.T.astype(np.float64)
  got = ranks.ExactRanker(mesh_lib.make_mesh(), c, candidate_chunk=32)(
      q, ranks.GroundTruth.from_lists(lists))
  np.testing.assert_allclose(got, argsort_rank(scores, lists), atol=0.2)


def test_ground_truth_layout():
  gts = ranks.GroundTruth.from_pairs([2, 0, 2, 2, 0], [7, 3, 1, 7, 4], num_queries=4)
  np.testing.assert_array_equal(gts.counts(), [2, 0, 2, 0])
  np.testing.assert_array_equal(gts.padded(0, 3, rows=4, width=2),
                                [[3, 4], [-1, -1], [1, 7], [-1, -1]])
  np.testing.assert_array_equal(gts.counts(1, 3), [0, 2])
  with pytest.raises(ValueError, match="at least one ground truth"):
    ranks.ExactRanker(mesh_lib.make_mesh(1), np.eye(8, dtype=np.float32))(
        np.eye(4, 8, dtype=np.float32), gts)
