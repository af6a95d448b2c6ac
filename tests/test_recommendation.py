"""Per-user P@K, R@K, AUC against sklearn and sorting; the candidate protocols."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from input_pipeline import embedded, interactions, records
from sempre_jax.evals import recommendation


def test_user_metrics_match_sorting_and_sklearn():
  rng = np.random.default_rng(0)
  users = np.repeat(np.arange(6), rng.integers(5, 30, 6))
  scores = rng.normal(size=len(users)).round(1)                 # some ties
  labels = rng.random(len(users)) < 0.3
  for u in range(6):                                            # a positive and a negative each
    rows = np.flatnonzero(users == u)
    labels[rows[:2]] = [True, False]
  got = recommendation.user_metrics(users, scores, labels, at=(1, 3, 5))
  auc, p3 = [], []
  for u in range(6):
    s, lab = scores[users == u], labels[users == u]
    auc.append(roc_auc_score(lab, s))                           # ties count 1/2
    order = np.argsort(-s, kind="stable")
    p3.append(lab[order[:3]].sum() / 3)
  assert got["AUC"] == pytest.approx(np.mean(auc))
  assert got["users"] == 6
  # P@3 up to tie-breaking at the cut; exact when the top is tie-free.
  assert abs(got["P@3"] - np.mean(p3)) <= 1 / 3
  assert got["random_AUC"] == 0.5


def test_hand_case():
  users = np.zeros(5, int)
  scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
  labels = np.array([False, True, False, True, False])
  m = recommendation.user_metrics(users, scores, labels, at=(1, 2))
  assert (m["P@1"], m["P@2"], m["R@1"], m["R@2"]) == (0.0, 0.5, 0.0, 0.5)
  assert m["AUC"] == pytest.approx(3 / 6)        # pairs (pos > neg): 0.8>0.7,0.5; 0.6>0.5
  assert m["random_P@2"] == pytest.approx(2 / 5) and m["random_R@2"] == pytest.approx(2 / 5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  spec = dict(num_users=20, num_topics=4, posts_per_user=30, feature_dim=4,
              actions_per_user=30, followees=5, seed=2)
  d = embedded.ensure(spec, {"test": 0.2}, num_shards=4, word2vec_dim=0, seed=0,
                      root=str(tmp_path_factory.mktemp("corpus")), log=lambda *a: None)
  data = interactions.load(d, records.read_metadata(d), "image_features")
  return data, interactions.split_actions(data, 0.3, 0.0)


@pytest.mark.parametrize("protocol", recommendation.PROTOCOLS)
def test_candidate_protocols(corpus, protocol):
  data, splits = corpus
  lists = recommendation.candidate_lists(data, splits, "test", protocol,
                                         max_candidates=50, negatives_per_positive=4)
  held = data.actions[splits["test"]]
  train = set(map(tuple, data.actions[splits["train"], :2].tolist()))
  follows = set(map(tuple, data.follows.tolist()))
  for u in np.unique(lists["user"]):
    rows = lists["user"] == u
    pos, neg = lists["post"][rows & lists["label"]], lists["post"][rows & ~lists["label"]]
    np.testing.assert_array_equal(np.sort(pos), np.unique(held[held[:, 0] == u, 1]))
    assert not set(pos) & set(neg)
    assert (data.posts["user"][neg] != u).all()
    assert not any((u, p) in train for p in neg)
    if protocol == "all":
      assert len(neg) == 50
    if protocol == "sampled":
      assert len(neg) == 4 * len(pos)
    if protocol == "followees":
      assert all((u, a) in follows for a in data.posts["user"][neg])
      assert (data.posts["timestamp"][neg] >= held[held[:, 0] == u, 2].min()).all()
