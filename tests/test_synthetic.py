"""The embedded corpus: planted truth, non-trivial identity, leakage-free splits."""

import numpy as np
import pytest

from input_pipeline import records, splits, synthetic
from sempre_jax.evals import ranks

SPEC = synthetic.CorpusSpec(num_users=60, num_topics=12, posts_per_user=30,
                            feature_dim=64, signal=0.6, followees=5,
                            actions_per_user=5, seed=3)


@pytest.fixture(scope="module")
def corpus():
  return synthetic.generate(SPEC)


def test_same_seed_same_corpus(corpus):
  again = synthetic.generate(SPEC)
  np.testing.assert_array_equal(again["tokens"], corpus["tokens"])
  np.testing.assert_array_equal(again["features"], corpus["features"])


def test_no_token_unique_to_a_user_is_in_all_of_its_posts(corpus):
  authors, tokens = corpus["authors"], corpus["tokens"]
  users_of_token = {}
  for u, row in zip(authors, tokens):
    for t in set(row[row != 0]):
      users_of_token.setdefault(t, set()).add(u)
  for u in np.unique(authors):
    rows = tokens[authors == u]
    common = set.intersection(*(set(r[r != 0]) for r in rows))
    assert not [t for t in common if users_of_token[t] == {u}]


def _ranks(scores, gt):
  return ranks.ranks_from_scores(scores, ranks.GroundTruth.single(gt))


def test_oracle_recovers_the_planted_structure(corpus):
  """The true posterior ranks far above chance, and above a wrong model."""
  oracle, authors = corpus["oracle"], corpus["authors"]
  tokens = corpus["tokens"][:500]
  text_user = _ranks(oracle.text_user(tokens, tokens != 0), authors[:500])
  assert np.median(text_user) < 0.15 * SPEC.num_users / 2
  shuffled = synthetic.Oracle(oracle.log_pi, np.random.default_rng(0).permutation(
      oracle.theta), oracle.mu, oracle.log_phi)
  wrong = _ranks(shuffled.text_user(tokens, tokens != 0), authors[:500])
  assert np.median(wrong) > 3 * np.median(text_user)

  with_image = np.flatnonzero(corpus["image_id"] >= 0)[:300]
  feats = corpus["features"][corpus["image_id"][with_image]]
  image_user = _ranks(oracle.image_user(feats), authors[with_image])
  assert np.median(image_user) < 0.15 * SPEC.num_users / 2
  caps = corpus["tokens"][with_image]
  image_text = _ranks(oracle.image_text(feats, caps, caps != 0), np.arange(300))
  assert np.median(image_text) < 0.15 * 300 / 2


def test_images_carry_their_topic_and_reshares_reuse_ids(corpus):
  ids, topics = corpus["image_id"], corpus["topics"]
  for i in np.unique(ids[ids >= 0]):
    assert len(set(topics[ids == i])) == 1
  assert (np.bincount(ids[ids >= 0]) > 1).any()
  share = (ids >= 0).mean()
  assert abs(share - SPEC.image_fraction) < 0.05


def test_follows_and_actions_follow_interests(corpus):
  follows, actions, theta = corpus["follows"], corpus["actions"], corpus["oracle"].theta
  assert len(follows) == SPEC.num_users * SPEC.followees
  assert (follows[:, 0] != follows[:, 1]).all()
  overlap = (theta[follows[:, 0]] * theta[follows[:, 1]]).sum(1).mean()
  rng = np.random.default_rng(0)
  random_pairs = rng.integers(0, SPEC.num_users, [2, 5000])
  assert overlap > 2 * (theta[random_pairs[0]] * theta[random_pairs[1]]).sum(1).mean()
  users, posts, times = actions.T
  assert (corpus["authors"][posts] != users).all()
  assert (times >= corpus["timestamps"][posts] - synthetic._EPOCH_START).all()


def test_written_corpus_splits_by_image_and_keeps_every_post(tmp_path):
  meta = synthetic.write_corpus(SPEC, str(tmp_path), {"test": 0.2, "validation": 0.05})
  parse = records.Parser(feature_dim=SPEC.feature_dim)
  seen = {}
  for split, m in meta["splits"].items():
    reader = records.ShardReader([str(tmp_path / s) for s in m["shards"]])
    seen[split] = [parse(reader[i]) for i in range(len(reader))]
  assert sum(len(v) for v in seen.values()) == round(SPEC.num_users * SPEC.posts_per_user)
  images = {s: {e["image_id"] for e in v if e["image_mask"]} for s, v in seen.items()}
  assert not images["train"] & images["test"] and not images["train"] & images["validation"]
  assert 0.1 < len(seen["test"]) / sum(len(v) for v in seen.values()) < 0.3


def test_split_fractions_are_validated():
  with pytest.raises(ValueError, match="sum < 1"):
    splits.split_by_group(np.arange(10), {"test": 0.6, "validation": 0.5}, 0)


def test_oracle_ranks_texts_and_images_per_user(corpus):
  """user->text / user->image: the per-post posterior P(u | post) beats the joint p(post, u)."""
  oracle, authors = corpus["oracle"], corpus["authors"][:500]
  tokens = corpus["tokens"][:500]
  users = np.unique(authors)
  gts = ranks.GroundTruth.from_pairs(np.searchsorted(users, authors), np.arange(500),
                                     len(users))
  posterior = ranks.ranks_from_scores(oracle.user_text(tokens, tokens != 0)[users], gts)
  joint = ranks.ranks_from_scores(oracle.text_user(tokens, tokens != 0).T[users], gts)
  random = np.median((500 + 1) / (gts.counts() + 1))
  assert np.median(posterior) < 0.2 * random
  assert np.mean(posterior) < np.mean(joint)


def test_written_interests_are_the_planted_topics(tmp_path, corpus):
  synthetic.write_corpus(SPEC, str(tmp_path), {"test": 0.2})
  lines = records.read_lines(str(tmp_path), records.INTERESTS_FILE)
  theta = corpus["oracle"].theta
  assert len(lines) == SPEC.num_users
  for u, line in enumerate(lines):
    topics = [int(name.removeprefix("topic")) for name in line.split("\t")]
    assert topics == list(np.flatnonzero(theta[u] > 0))
    assert SPEC.topics_min <= len(topics) <= SPEC.topics_max
  # Every post's topic is one of its author's interests.
  for u, z in zip(corpus["authors"], corpus["topics"]):
    assert synthetic.topic_name(z) in lines[u].split("\t")
