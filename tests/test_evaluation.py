"""Exact ranks against brute-force sorting, ties and several ground truths."""

import numpy as np

from sempre_jax import evaluation


def _brute_force_rank(scores, gts):
  """Position of the best ground truth in a sort that breaks ties in its favour."""
  ranks = []
  for s, gt in zip(scores, gts):
    order = sorted(range(len(s)), key=lambda c: (-s[c], c not in gt))
    ranks.append(1 + min(order.index(g) for g in gt))
  return np.array(ranks)


def test_ranks_match_sorting_with_ties_and_several_ground_truths():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 5, [40, 30]).astype(np.float32)   # many ties
  gts = [rng.choice(30, rng.integers(1, 4), replace=False) for _ in range(40)]
  ranks = evaluation.exact_ranks(lambda a, b: scores[a:b], 40, gts, 30, chunk=7)
  np.testing.assert_array_equal(ranks, _brute_force_rank(scores, gts))


def test_rank_metrics_hand_case():
  m = evaluation.rank_metrics(np.array([1, 2, 6, 20]), num_candidates=100)
  assert m["median_rank"] == 4.0 and m["mean_rank"] == 7.25
  assert (m["R@1"], m["R@5"], m["R@10"]) == (0.25, 0.5, 0.75)
  assert m["random_median_rank"] == 50
