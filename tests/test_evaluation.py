"""Exact ranks against brute-force sorting, ties and several ground truths."""

import numpy as np

from sempre_jax import evaluation


def _sorted_position(scores, gts, trials=4000, seed=0):
  """Mean position of the best ground truth after sorting with random tie-breaks."""
  rng = np.random.default_rng(seed)
  out = []
  for s, gt in zip(scores, gts):
    noisy = s[None, :] + rng.uniform(0, 0.5, [trials, len(s)])  # scores are integers
    order = np.argsort(-noisy, axis=1)
    position = np.argsort(order, axis=1)                        # 0-based positions
    out.append(1 + position[:, gt].min(axis=1).mean())
  return np.array(out)


def test_ranks_match_sorting_with_ties_and_several_ground_truths():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 5, [40, 30]).astype(np.float32)   # many ties
  gts = [rng.choice(30, rng.integers(1, 4), replace=False) for _ in range(40)]
  ranks = evaluation.exact_ranks(lambda a, b: scores[a:b], 40, gts, 30, chunk=7)
  np.testing.assert_allclose(ranks, _sorted_position(scores, gts), atol=0.25)


def test_ranks_without_ties_are_sorted_positions():
  rng = np.random.default_rng(1)
  scores = rng.normal(size=[50, 20])
  gts = [rng.choice(20, rng.integers(1, 3), replace=False) for _ in range(50)]
  ranks = evaluation.exact_ranks(lambda a, b: scores[a:b], 50, gts, 20, chunk=16)
  expected = [1 + min(list(np.argsort(-s)).index(g) for g in gt) for s, gt in zip(scores, gts)]
  np.testing.assert_array_equal(ranks, expected)


def test_rank_metrics_hand_case():
  m = evaluation.rank_metrics(np.array([1, 2, 6, 20]), num_candidates=100)
  assert m["median_rank"] == 4.0 and m["mean_rank"] == 7.25
  assert (m["R@1"], m["R@5"], m["R@10"], m["R@50"]) == (0.25, 0.5, 0.75, 1.0)
  assert m["random_median_rank"] == 50


def test_joint_metric_sums_normalised_medians_of_tasks_with_queries():
  results = {"text->user": {"queries": 3, "median_rank": 5.0, "candidates": 500},
             "image->text": {"queries": 0, "candidates": 0},
             "image->user": {"queries": 2, "median_rank": 50.0, "candidates": 500}}
  joint = evaluation.with_joint_metric(results)["joint"]
  assert joint["normalised_median_rank"] == 5 / 500 + 50 / 500
  assert joint["tasks"] == ["text->user", "image->user"]
