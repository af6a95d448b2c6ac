"""Metrics: hand cases, the exact random baseline against simulation."""

import numpy as np
import pytest

from sempre_jax.evals import retrieval as evaluation


def test_rank_metrics_hand_case():
  m = evaluation.rank_metrics(np.array([1, 2, 6, 20]), num_candidates=100)
  assert m["median_rank"] == 4.0 and m["mean_rank"] == 7.25
  assert (m["R@1"], m["R@5"], m["R@10"], m["R@50"]) == (0.25, 0.5, 0.75, 1.0)
  assert m["random_median_rank"] == 50 and m["random_mean_rank"] == 50.5
  assert m["random_R@10"] == pytest.approx(0.1)


def test_random_baseline_matches_simulation():
  """Best of g ground truths shuffled among C candidates, g from 1 to 30."""
  rng = np.random.default_rng(0)
  c, gts = 200, rng.integers(1, 31, 4000)
  simulated = np.array([rng.permutation(c)[:g].min() + 1 for g in gts])
  m = evaluation.random_metrics(gts, c)
  assert abs(m["random_median_rank"] - np.median(simulated)) <= 1
  assert abs(m["random_mean_rank"] - simulated.mean()) < 0.05 * simulated.mean()
  for k in evaluation.RECALL_AT:
    assert abs(m[f"random_R@{k}"] - np.mean(simulated <= k)) < 0.02


def test_joint_metric_sums_normalised_medians_of_tasks_with_queries():
  results = {"text->user": {"queries": 3, "median_rank": 5.0, "candidates": 500},
             "image->text": {"queries": 0, "candidates": 0},
             "image->user": {"queries": 2, "median_rank": 50.0, "candidates": 500}}
  joint = evaluation.with_joint_metric(results)["joint"]
  assert joint["normalised_median_rank"] == 5 / 500 + 50 / 500
  assert joint["tasks"] == ["text->user", "image->user"]
  # Model selection counts only the tasks whose loss weight is non-zero.
  assert evaluation.selection_metric(results, {"tu": 0.0, "it": 0.5, "iu": 0.5}) == 50 / 500
