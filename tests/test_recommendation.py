"""Per-user P@K, R@K, AUC against sklearn and sorting; the candidate protocols."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from input_pipeline import embedded, interactions, records
from sempre_jax.evals import recommendation


def tied_lists(seed=0, num_users=8):
  """Users with 5-40 candidates, scores on a coarse grid (big tie blocks), a
  positive and a negative each."""
  rng = np.random.default_rng(seed)
  users = np.repeat(np.arange(num_users), rng.integers(5, 41, num_users))
  scores = rng.integers(0, 5, len(users)) / 4.0
  labels = rng.random(len(users)) < 0.3
  for u in range(num_users):
    rows = np.flatnonzero(users == u)
    labels[rows[:2]] = [True, False]
  perm = rng.permutation(len(users))                            # rows in any order
  return users[perm], scores[perm], labels[perm]


def test_user_metrics_are_expectations_under_random_tie_breaking():
  """P@K, R@K against sorting with random tie-breaks (3,000 draws a user),
  AUC against sklearn (ties count 1/2)."""
  users, scores, labels = tied_lists()
  at, trials = (1, 3, 5, 10), 3000
  rng = np.random.default_rng(1)
  got = recommendation.user_metrics(users, scores, labels, at=at)
  sim = {f"{m}@{k}": [] for m in "PR" for k in at}
  auc, errors = [], []
  for u in np.unique(users):
    s, lab = scores[users == u], labels[users == u]
    order = np.argsort(-(s[None, :] + rng.uniform(0, 0.1, [trials, len(s)])), axis=1)
    for k in at:
      hits = lab[order[:, :k]].sum(axis=1)
      sim[f"P@{k}"].append(hits.mean() / k)
      sim[f"R@{k}"].append(hits.mean() / lab.sum())
      errors.append(hits.std() / np.sqrt(trials) / k)
    auc.append(roc_auc_score(lab, s))
  assert got["users"] == 8
  assert got["AUC"] == pytest.approx(np.mean(auc), abs=1e-12)
  for name, values in sim.items():
    assert abs(got[name] - np.mean(values)) < 5 * max(errors) + 1e-9, name
  # The ties matter: sorting once with a fixed tie-break gives other numbers.
  one_draw = [lab[np.argsort(-s, kind="stable")[:3]].sum() / 3
              for u in np.unique(users)
              for s, lab in [(scores[users == u], labels[users == u])]]
  assert abs(np.mean(one_draw) - got["P@3"]) > 0.01
  assert got["random_AUC"] == 0.5


def test_hand_case():
  users = np.zeros(5, int)
  scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
  labels = np.array([False, True, False, True, False])
  m = recommendation.user_metrics(users, scores, labels, at=(1, 2))
  assert (m["P@1"], m["P@2"], m["R@1"], m["R@2"]) == (0.0, 0.5, 0.0, 0.5)
  assert m["AUC"] == pytest.approx(3 / 6)        # pairs (pos > neg): 0.8>0.7,0.5; 0.6>0.5
  assert m["random_P@2"] == pytest.approx(2 / 5) and m["random_R@2"] == pytest.approx(2 / 5)


def test_hand_case_with_a_tie_across_the_cut():
  """Scores .9 | .5 .5 .5 | .1, labels F | T F F | T: with K = 2 one of the 3
  tied candidates gets the last slot, a positive w.p. 1/3; with K = 3, 2/3.
  AUC over the 2 x 3 (positive, negative) pairs: (.5, .9) 0, (.5, .5) 1/2 twice,
  (.1, .9) 0, (.1, .5) 0 twice -> 1 / 6."""
  users = np.zeros(5, int)
  scores = np.array([0.9, 0.5, 0.5, 0.5, 0.1])
  labels = np.array([False, True, False, False, True])
  m = recommendation.user_metrics(users, scores, labels, at=(1, 2, 3, 4))
  assert m["P@1"] == 0.0
  assert m["P@2"] == pytest.approx(1 / 3 / 2) and m["R@2"] == pytest.approx(1 / 3 / 2)
  assert m["P@3"] == pytest.approx(2 / 3 / 3) and m["R@3"] == pytest.approx(2 / 3 / 2)
  assert m["P@4"] == pytest.approx(1 / 4) and m["R@4"] == pytest.approx(1 / 2)
  assert m["AUC"] == pytest.approx(1 / 6)


def tiny_interactions():
  """Users 0, 1, 2; posts 0-5 by user 1, 6-9 and 11 by user 2, 10 by user 0,
  published at 10 x their row; user 0 follows 1 and 2, user 1 follows 2.
  User 0 acts on post 1 (train), 9 (validation), 7 and 8 (test); user 1 on 6 (test)."""
  authors = np.array([1] * 6 + [2] * 4 + [0, 2])
  posts = {"user": authors, "timestamp": 10 * np.arange(12),
           "image_mask": np.ones(12, bool)}
  actions = np.array([[0, 1, 15], [0, 9, 95], [0, 7, 75], [0, 8, 85], [1, 6, 65]])
  data = interactions.Interactions(posts=posts, follows=np.array([[0, 1], [0, 2], [1, 2]]),
                                   actions=actions, num_users=3,
                                   post_ids=np.array([f"p{i}" for i in range(12)]))
  splits = {"train": np.array([0]), "validation": np.array([1]), "test": np.array([2, 3, 4])}
  return data, splits


@pytest.mark.parametrize("protocol", recommendation.PROTOCOLS)
def test_known_positives_are_never_negatives(protocol):
  """Each split's candidates: its own held-out actions as positives, and no
  post the user acted on in any other split (nor wrote) among the negatives."""
  data, splits = tiny_interactions()
  every = {("test", 0): ({7, 8}, {0, 2, 3, 4, 5, 6, 11}),   # (split, user): (positives,
           ("test", 1): ({6}, {7, 8, 9, 10, 11}),             # eligible negatives), by hand
           ("validation", 0): ({9}, {0, 2, 3, 4, 5, 6, 11})}
  expected = {
      "all": every,
      "sampled": every,      # 4 negatives a positive drawn from these
      # Followees' posts published from the first held-out action on.
      "followees": {("test", 0): ({7, 8}, {11}),
                    ("test", 1): ({6}, {7, 8, 9, 11}),
                    ("validation", 0): ({9}, {11})},
  }[protocol]
  for split in ("test", "validation"):
    lists = recommendation.candidate_lists(data, splits, split, protocol,
                                           max_candidates=50, negatives_per_positive=4)
    for u in (0, 1):
      rows = lists["user"] == u
      if (split, u) not in expected:
        assert not rows.any()
        continue
      pos, neg = expected[split, u]
      assert set(lists["post"][rows & lists["label"]].tolist()) == pos
      got_neg = set(lists["post"][rows & ~lists["label"]].tolist())
      if protocol == "sampled":
        assert len(got_neg) == min(4 * len(pos), len(neg)) and got_neg <= neg
      else:
        assert got_neg == neg


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
  acted = set(map(tuple, data.actions[:, :2].tolist()))
  follows = set(map(tuple, data.follows.tolist()))
  for u in np.unique(lists["user"]):
    rows = lists["user"] == u
    pos, neg = lists["post"][rows & lists["label"]], lists["post"][rows & ~lists["label"]]
    np.testing.assert_array_equal(np.sort(pos), np.unique(held[held[:, 0] == u, 1]))
    assert not set(pos) & set(neg)
    assert (data.posts["user"][neg] != u).all()
    assert not any((u, p) in acted for p in neg)                # any split's action
    if protocol == "all":
      assert len(neg) == 50
    if protocol == "sampled":
      assert len(neg) == 4 * len(pos)
    if protocol == "followees":
      assert all((u, a) in follows for a in data.posts["user"][neg])
      assert (data.posts["timestamp"][neg] >= held[held[:, 0] == u, 2].min()).all()
