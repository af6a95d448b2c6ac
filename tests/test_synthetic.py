"""The embedded corpus: planted truth, non-trivial identity, leakage-free splits,
its crawl surviving prepare, and the oracle on the prepared data."""

import dataclasses
import json
import os

import numpy as np
import pytest

from input_pipeline import embedded, loader, oracle, records, splits, synthetic, text
from sempre_jax.evals import ranks

SPEC = synthetic.CorpusSpec(num_users=60, num_topics=12, posts_per_user=30,
                            feature_dim=64, signal=0.6, followees=5,
                            actions_per_user=5, seed=3)
FRACTIONS = {"test": 0.2, "validation": 0.05}


@pytest.fixture(scope="module")
def corpus():
  return synthetic.generate(SPEC)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """The corpus through prepare: (data dir, crawl dir, {split: records with features})."""
  root = str(tmp_path_factory.mktemp("embedded"))
  data_dir = embedded.ensure(dataclasses.asdict(SPEC), FRACTIONS, num_shards=2,
                             word2vec_dim=0, seed=0, root=root, log=lambda *a: None)
  meta = records.read_metadata(data_dir)
  posts = {s: {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
           for s in records.SPLITS
           if (batches := list(loader.eval_batches(data_dir, meta, s, 4096, "features")))}
  return data_dir, os.path.join(root, embedded.CRAWL_DIR), posts


def test_same_seed_same_corpus_and_crawl(corpus, tmp_path):
  again = synthetic.generate(SPEC)
  np.testing.assert_array_equal(again["tokens"], corpus["tokens"])
  np.testing.assert_array_equal(again["features"], corpus["features"])
  small = dataclasses.replace(SPEC, num_users=8, image_size=4)
  for d in ("a", "b"):
    synthetic.write_crawl(small, str(tmp_path / d))
  names = sorted(os.listdir(tmp_path / "a"))
  assert names == sorted(os.listdir(tmp_path / "b")) and "images" in names
  for name in names:
    if name != "images":
      assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_synthetic_words_survive_cleaning(corpus):
  words = corpus["vocab"][2:]         # "topic03w01", "common042", ...
  assert text.clean_text(" ".join(words)) == words


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
  return ranks.ranks_from_scores(scores, ranks.GroundTruth.single(gt)).rank


def test_oracle_recovers_the_planted_structure(prepared):
  """The true posterior ranks far above chance, and above a wrong model, on the
  prepared records (its vocabulary and user index)."""
  data_dir, _, posts = prepared
  o = oracle.load(data_dir)
  tokens, mask, users = (posts["train"][k][:500] for k in ("tokens", "text_mask", "user"))
  U = len(o.log_pi)
  text_user = _ranks(o.text_user(tokens, mask), users)
  assert np.median(text_user) < 0.15 * U / 2
  wrong = dataclasses.replace(o, theta=np.random.default_rng(0).permutation(o.theta))
  assert np.median(_ranks(wrong.text_user(tokens, mask), users)) > 3 * np.median(text_user)

  with_image = np.flatnonzero(posts["train"]["image_mask"])[:300]
  feats = posts["train"]["image_features"][with_image]
  image_user = _ranks(o.image_user(feats), posts["train"]["user"][with_image])
  assert np.median(image_user) < 0.15 * U / 2
  caps, cap_mask = posts["train"]["tokens"][with_image], posts["train"]["text_mask"][with_image]
  image_text = _ranks(o.image_text(feats, caps, cap_mask), np.arange(300))
  assert np.median(image_text) < 0.15 * 300 / 2


def test_images_carry_their_topic_and_reshares_reuse_ids(corpus):
  ids, topics = corpus["image_id"], corpus["topics"]
  for i in np.unique(ids[ids >= 0]):
    assert len(set(topics[ids == i])) == 1
  assert (np.bincount(ids[ids >= 0]) > 1).any()
  share = (ids >= 0).mean()
  assert abs(share - SPEC.image_fraction) < 0.05


def test_follows_and_actions_follow_interests(corpus):
  follows, actions, theta = corpus["follows"], corpus["actions"], corpus["theta"]
  assert len(follows) == SPEC.num_users * SPEC.followees
  assert (follows[:, 0] != follows[:, 1]).all()
  overlap = (theta[follows[:, 0]] * theta[follows[:, 1]]).sum(1).mean()
  rng = np.random.default_rng(0)
  random_pairs = rng.integers(0, SPEC.num_users, [2, 5000])
  assert overlap > 2 * (theta[random_pairs[0]] * theta[random_pairs[1]]).sum(1).mean()
  users, posts, times = actions.T
  assert (corpus["authors"][posts] != users).all()
  assert (times >= corpus["timestamps"][posts] - synthetic._EPOCH_START).all()


def test_prepared_corpus_splits_by_image_and_keeps_every_post(prepared):
  data_dir, _, posts = prepared
  report = json.load(open(os.path.join(data_dir, "prepare_report.json")))
  n = round(SPEC.num_users * SPEC.posts_per_user)
  assert report["problems"] == {} and report["posts_written"] == n
  assert sum(len(p["user"]) for p in posts.values()) == n
  images = {s: set(p["image_id"][p["image_mask"]]) for s, p in posts.items()}
  assert not images["train"] & images["test"] and not images["train"] & images["validation"]
  assert 0.1 < len(posts["test"]["user"]) / n < 0.3
  assert report["actions"]["written"] == SPEC.num_users * SPEC.actions_per_user
  assert report["follows"]["written"] == SPEC.num_users * SPEC.followees


def test_split_fractions_are_validated():
  with pytest.raises(ValueError, match="sum < 1"):
    splits.split_by_group(np.arange(10), {"test": 0.6, "validation": 0.5}, 0)


def test_oracle_ranks_texts_and_images_per_user(prepared):
  """user->text / user->image: the per-post posterior P(u | post) beats the joint p(post, u)."""
  data_dir, _, posts = prepared
  o = oracle.load(data_dir)
  tokens, mask, authors = (posts["train"][k][:500] for k in ("tokens", "text_mask", "user"))
  users = np.unique(authors)
  gts = ranks.GroundTruth.from_pairs(np.searchsorted(users, authors), np.arange(500),
                                     len(users))
  posterior = ranks.ranks_from_scores(o.user_text(tokens, mask)[users], gts).rank
  joint = ranks.ranks_from_scores(o.text_user(tokens, mask).T[users], gts).rank
  random = np.median((500 + 1) / (gts.counts() + 1))
  assert np.median(posterior) < 0.2 * random
  assert np.mean(posterior) < np.mean(joint)


def test_interests_are_the_planted_topics_each_user_posted_about(prepared, corpus):
  data_dir, crawl, _ = prepared
  names = records.read_lines(data_dir, records.USERS_FILE)
  lines = records.read_lines(data_dir, records.INTERESTS_FILE)
  posted = {}
  with open(os.path.join(crawl, synthetic.POSTS_FILE)) as f:
    for line in f:
      post = json.loads(line)
      posted.setdefault(post["user_id"], set()).add(post["topic"])
  for name, line in zip(names, lines):
    assert line.split("\t") == sorted(posted[name])
    u = int(name.removeprefix("user"))
    planted = {synthetic.topic_name(z) for z in np.flatnonzero(corpus["theta"][u] > 0)}
    assert posted[name] <= planted and len(planted) <= SPEC.topics_max
