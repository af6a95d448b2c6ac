"""Actions -> time splits, negatives, semantic triplets and resumable batches."""

import dataclasses

import numpy as np
import pytest

from input_pipeline import embedded, interactions, records, synthetic

SPEC = synthetic.CorpusSpec(num_users=30, num_topics=6, posts_per_user=40, feature_dim=8,
                            image_size=8, actions_per_user=30, followees=4, seed=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = embedded.ensure(dataclasses.asdict(SPEC), {"test": 0.2, "validation": 0.05},
                      num_shards=4, word2vec_dim=0, seed=0,
                      root=str(tmp_path_factory.mktemp("corpus")), log=lambda *a: None)
  meta = records.read_metadata(d)
  return interactions.load(d, meta, "image"), meta, d


def test_post_table_follows_the_graph(data):
  """The prepared post table and graph are the generator's, through prepare's ids."""
  data, meta, d = data
  corpus = synthetic.generate(SPEC)
  users = np.array(records.read_lines(d, records.USERS_FILE))
  vocab = np.array(records.read_lines(d, records.VOCAB_FILE))
  post = np.array([int(p.removeprefix("p")) for p in data.post_ids])   # generator index
  assert sorted(post) == list(range(len(corpus["authors"])))
  np.testing.assert_array_equal(users[data.posts["user"]],
                                [synthetic.user_id(u) for u in corpus["authors"][post]])
  words = np.array(corpus["vocab"])[corpus["tokens"][post]]
  kept = np.isin(words, vocab[2:])                      # the others became <unk>
  np.testing.assert_array_equal(vocab[data.posts["tokens"]][kept], words[kept])
  assert data.posts["image"].shape[1:] == (8, 8, 3)
  acted = {(synthetic.user_id(u), synthetic.post_id(p), t + synthetic._EPOCH_START)
           for u, p, t in corpus["actions"].tolist()}
  assert acted == {(users[u], data.post_ids[p], t) for u, p, t in data.actions.tolist()}
  follows = {tuple(synthetic.user_id(u) for u in e) for e in corpus["follows"].tolist()}
  assert follows == {(users[u], users[v]) for u, v in data.follows.tolist()}
  assert (data.actions[:, 2] >= data.posts["timestamp"][data.actions[:, 1]]).all()


@pytest.mark.parametrize("test,validation", [(0.2, 0.1), (5, 2)])
def test_each_users_most_recent_actions_are_held_out(data, test, validation):
  data = data[0]
  splits = interactions.split_actions(data, test, validation)
  assert sum(len(v) for v in splits.values()) == len(data.actions)
  for u in range(data.num_users):
    times = {s: data.actions[v][data.actions[v][:, 0] == u, 2] for s, v in splits.items()}
    n = sum(len(t) for t in times.values())
    want = int(test * n) if test < 1 else test
    assert len(times["test"]) == want
    big = np.iinfo(np.int64).max
    assert times["train"].max() <= times["validation"].min(initial=big)
    assert max(times["train"].max(), times["validation"].max(initial=0)) <= times["test"].min()


def test_images_only_split_keeps_preferred_images(data):
  data = data[0]
  splits = interactions.split_actions(data, 3, 1, images_only=True)
  for v in splits.values():
    assert data.posts["image_mask"][data.actions[v, 1]].all()


@pytest.mark.parametrize("kind", ["time_window", "random", "followee"])
def test_negatives_are_valid_and_follow_their_rule(data, kind):
  data = data[0]
  train = interactions.split_actions(data, 0.2, 0.0)["train"]
  acts = data.actions[train]
  negatives = interactions.Negatives(data, train, kind, window_minutes=60)
  neg = negatives(acts[:, 0], acts[:, 2], np.random.default_rng(0))
  acted = set(map(tuple, acts[:, :2].tolist()))
  assert not any((u, p) in acted for u, p in zip(acts[:, 0], neg))
  assert (data.posts["user"][neg] != acts[:, 0]).all()
  gap = np.abs(data.posts["timestamp"][neg] - acts[:, 2])
  if kind == "time_window":     # near the action, far nearer than a random post
    random = interactions.Negatives(data, train, "random")(acts[:, 0], acts[:, 2],
                                                           np.random.default_rng(0))
    assert np.median(gap) < 0.05 * np.median(
        np.abs(data.posts["timestamp"][random] - acts[:, 2]))
  if kind == "followee":        # by a followee of the user
    follows = set(map(tuple, data.follows.tolist()))
    by_followee = [(u, a) in follows for u, a in zip(acts[:, 0], data.posts["user"][neg])]
    assert np.mean(by_followee) > 0.95


def test_triplets_resume_and_split_over_processes(data):
  data, meta, _ = data
  train = interactions.split_actions(data, 0.2, 0.0)["train"]
  clusters = interactions.semantic_clusters(data, meta["vocab_size"], num_clusters=12, dim=16)
  bags = interactions.user_bags(data, clusters, 12)
  np.testing.assert_allclose(bags.sum(1)[np.unique(data.posts["user"][clusters >= 0])], 1,
                             rtol=1e-6)

  def make(pi=0, pc=1):
    neg = interactions.Negatives(data, train, "time_window")
    return interactions.TripletIterator(data, train, neg, batch_size=64, image_key="image",
                                        seed=3, bags=bags, clusters=clusters,
                                        process_index=pi, process_count=pc)

  it = make()
  batches = [next(it) for _ in range(it.steps_per_epoch + 2)]    # into the 2nd epoch
  b = batches[0]
  assert b["pos"]["image"].shape == (64, 8, 8, 3) and b["user_bag"].shape == (64, 12)
  assert (clusters[_rows(data, b["sem_anchor"])] == clusters[_rows(data, b["sem_pos"])]).all()
  assert (clusters[_rows(data, b["sem_anchor"])] != clusters[_rows(data, b["sem_neg"])]).all()
  again = make()
  again.set_state({"epoch": 0, "step": it.steps_per_epoch - 1})
  for want in batches[-3:]:
    got = next(again)
    np.testing.assert_array_equal(got["user"], want["user"])
    np.testing.assert_array_equal(got["neg"]["tokens"], want["neg"]["tokens"])
  halves = [next(make(p, 2)) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["user"] for h in halves]), b["user"])


def _rows(data, posts):
  """Post rows of gathered posts (tokens + image identify a post here)."""
  key = lambda t, i: hash((t.tobytes(), i.tobytes()))
  index = {key(t, i): r for r, (t, i) in enumerate(zip(data.posts["tokens"],
                                                       data.posts["image"]))}
  return np.array([index[key(t, i)] for t, i in zip(posts["tokens"], posts["image"])])
