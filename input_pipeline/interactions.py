"""Which interactions train and test the user-content ranking models?

The family models (D-Sempre, CDL, AMNL) learn from actions: user u acted on
(liked, re-shared) post p at time t, read from a dataset's `graph.npz`
(written by `launch/prepare_data.py --actions=... --follows=...`):
  follows [E, 2]      (user index, followee index)
  actions [A, 3]      (user index, post row, unix time)
  action_kinds [A]    str, e.g. "like", "reshare" ("" when the crawl gives none)
  post_ids [N]        str: post row -> the post_id of its record (every record).
This module turns a dataset into
  - the post table: the content of every post of every split, row = post row;
  - per-user splits of the actions: each user's most recent actions are held
    out (test), the ones just before them validate, the rest train (or the
    same counts in a random order: CDL's held-out preferred images);
  - semantic clusters of posts (k-means over the mean Word2Vec vector of a
    post's text) and each user's bag-of-clusters vector (D-Sempre, CDL);
  - an epoch-seeded, resumable iterator of training triplets (user, acted
    post, negative post) with the negatives each paper prescribes:
      time_window  a post the user did not act on, published near the action
                   (triangular density over +-window: closer is likelier);
      random       a post the user did not act on (CDL: among image posts);
      followee     a post by one of the user's followees that the user did not
                   re-share (AMNL).
    D-Sempre also gets semantic triplets: (acted post, a post of the same
    cluster, a post of another cluster).
Negatives never are the user's own posts or posts the user acted on in training.
"""

import dataclasses
import functools
import os
from collections.abc import Mapping

import grain
import numpy as np

from input_pipeline import loader, records, word2vec

POST_FIELDS = ("tokens", "text_mask", "image_mask")
SPLITS = ("train", "validation", "test")


# -------------------------------------------------------------- post table --

@dataclasses.dataclass
class Interactions:
  """The posts, the follow graph and the actions of a dataset."""
  posts: dict              # {field: [N, ...]}: POST_FIELDS, image input, user, timestamp
  follows: np.ndarray      # [E, 2] (user, followee)
  actions: np.ndarray      # [A, 3] (user, post row, unix time)
  num_users: int
  post_ids: np.ndarray     # [N] str: the post_id of each post row

  @property
  def num_posts(self) -> int:
    return len(self.posts["user"])

  @functools.cached_property
  def followees(self) -> np.ndarray:
    """[U, F] each user's followees, -1 padded."""
    n = np.bincount(self.follows[:, 0], minlength=self.num_users)
    out = np.full([self.num_users, max(int(n.max(initial=0)), 1)], -1, np.int64)
    order = np.argsort(self.follows[:, 0], kind="stable")
    u = self.follows[order, 0]
    out[u, np.arange(len(u)) - np.r_[0, np.cumsum(n)][u]] = self.follows[order, 1]
    return out


def load(data_dir: str, metadata: Mapping, image_key: str) -> Interactions:
  """Reads graph.npz and every record into a post table ordered by post row."""
  path = os.path.join(data_dir, records.GRAPH_FILE)
  actions = np.zeros([0, 3], np.int64)
  if os.path.exists(path):
    with np.load(path) as g:
      follows, actions, post_ids = g["follows"], g["actions"], g["post_ids"]
  if not len(actions):
    raise FileNotFoundError(
        f"{data_dir} has no actions ({records.GRAPH_FILE}): D-Sempre, CDL and AMNL train on "
        "who acted on which post; prepare the crawl with launch/prepare_data.py "
        "--actions=actions.jsonl (AMNL also --follows=follows.jsonl)")
  row_of = {pid: i for i, pid in enumerate(post_ids.tolist())}
  image_input = "pixels" if image_key == "image" else "features"
  keys = POST_FIELDS + (image_key, "user", "timestamp")
  posts, filled = None, np.zeros(len(post_ids), bool)
  for split in metadata["splits"]:
    for batch in loader.eval_batches(data_dir, metadata, split, 4096, image_input):
      rows = np.array([row_of[p.decode()] for p in batch["post_id"]])
      if posts is None:
        posts = {k: np.zeros((len(post_ids),) + batch[k].shape[1:], batch[k].dtype)
                 for k in keys}
      for k in keys:
        posts[k][rows] = batch[k]
      filled[rows] = True
  if posts is None or not filled.all():
    raise ValueError(f"{data_dir}: {int((~filled).sum())} posts of graph.npz have no record")
  return Interactions(posts, follows, actions, metadata["num_users"], post_ids)


def require_follows(data: Interactions, needs: str) -> None:
  """ValueError naming --follows when the dataset has no follow edge."""
  if not len(data.follows):
    raise ValueError(f"{needs} need the follow graph, and the dataset has none: prepare "
                     "the crawl with launch/prepare_data.py --follows=follows.jsonl")


# ------------------------------------------------------------------ splits --

def split_actions(data: Interactions, test: float, validation: float,
                  images_only: bool = False, order_by: str = "time",
                  seed: int = 0) -> dict[str, np.ndarray]:
  """Per-user split: {split: indices into data.actions}.

  test, validation: a fraction of each user's actions (< 1) or a count (>= 1),
  taken from the most recent ones (test last), or, with order_by="random",
  from a seeded random order of each user's actions. images_only: only
  actions on posts with an image count (CDL's preferred images).
  """
  if order_by not in ("time", "random"):
    raise ValueError(f"order_by must be time or random, got {order_by!r}")
  keep = np.flatnonzero(data.posts["image_mask"][data.actions[:, 1]]) if images_only \
      else np.arange(len(data.actions))
  user = data.actions[keep, 0]
  key = data.actions[keep, 2] if order_by == "time" else \
      np.random.default_rng(seed).permutation(len(keep))
  order = keep[np.lexsort((key, user))]                     # by user, then time
  user = data.actions[order, 0]
  n = np.bincount(user, minlength=data.num_users)
  first = np.r_[0, np.cumsum(n)][user]
  age = np.arange(len(order)) - first                       # 0 = the user's oldest
  size = lambda x: np.floor(x * n).astype(int) if x < 1 else np.minimum(int(x), n)
  n_test, n_val = size(test), size(validation)
  n_test = np.minimum(n_test, n - 1)                        # keep one training action
  n_val = np.minimum(n_val, n - 1 - n_test)
  from_end = n[user] - 1 - age                              # 0 = the user's newest
  split = np.where(from_end < n_test[user], 2, np.where(from_end < (n_test + n_val)[user], 1, 0))
  return {s: order[split == i] for i, s in enumerate(SPLITS)}


# ------------------------------------------------------- semantic clusters --

def semantic_clusters(data: Interactions, vocab_size: int, num_clusters: int,
                      dim: int = 64, seed: int = 0) -> np.ndarray:
  """[N] k-means cluster of each post's mean Word2Vec vector (-1: no text)."""
  from sklearn.cluster import MiniBatchKMeans
  tokens, mask = data.posts["tokens"], data.posts["text_mask"]
  has_text = np.flatnonzero(mask.any(1))
  sentences = [[str(t) for t in tokens[i][mask[i]]] for i in has_text]
  model = word2vec.train(sentences, dim=dim, epochs=5, seed=seed)
  words = word2vec.word_matrix(model, [str(i) for i in range(vocab_size)])
  vectors = (words[tokens[has_text]] * mask[has_text, :, None]).sum(1) \
      / mask[has_text].sum(1, keepdims=True)
  k = min(num_clusters, len(has_text))
  labels = MiniBatchKMeans(k, random_state=seed, n_init=3, batch_size=4096).fit_predict(vectors)
  out = np.full(data.num_posts, -1, np.int64)
  out[has_text] = labels
  return out


def user_bags(data: Interactions, clusters: np.ndarray, num_clusters: int) -> np.ndarray:
  """[U, K] each user's normalised histogram of the clusters of their own posts."""
  ok = clusters >= 0
  bags = np.zeros([data.num_users, num_clusters], np.float32)
  np.add.at(bags, (data.posts["user"][ok], clusters[ok]), 1.0)
  return bags / np.maximum(bags.sum(1, keepdims=True), 1.0)


# ---------------------------------------------------------------- triplets --

class Negatives:
  """Draws negative posts for (user, acted post, time) triples."""

  def __init__(self, data: Interactions, train_actions: np.ndarray, kind: str,
               window_minutes: float = 60.0, images_only: bool = False):
    if kind not in ("time_window", "random", "followee"):
      raise ValueError(f"negatives must be time_window, random or followee, got {kind!r}")
    if kind == "followee":
      require_follows(data, "followee negatives (AMNL)")
    self.kind, self.window = kind, window_minutes * 60.0
    self.n = data.num_posts
    acted = data.actions[train_actions]
    self.forbidden = np.unique(acted[:, 0] * self.n + acted[:, 1])
    self.author = data.posts["user"]
    self.pool = np.flatnonzero(data.posts["image_mask"]) if images_only \
        else np.arange(self.n)
    self.by_time = np.argsort(data.posts["timestamp"], kind="stable")
    self.times = data.posts["timestamp"][self.by_time]
    self.followees = data.followees
    by_author = np.argsort(self.author, kind="stable")
    counts = np.bincount(self.author, minlength=data.num_users)
    self.author_posts, self.author_start, self.author_count = (
        by_author, np.r_[0, np.cumsum(counts)[:-1]], counts)

  def _valid(self, users, posts):
    return (self.author[posts] != users) & ~np.isin(users * self.n + posts, self.forbidden)

  def _draw(self, users, times, rng):
    if self.kind == "time_window":
      target = times + rng.triangular(-self.window, 0.0, self.window, len(users))
      i = np.clip(np.searchsorted(self.times, target), 0, self.n - 1)
      return self.by_time[i]
    if self.kind == "followee":
      f = self.followees[users, rng.integers(0, self.followees.shape[1], len(users))]
      has = (f >= 0) & (self.author_count[np.maximum(f, 0)] > 0)
      f = np.maximum(f, 0)
      k = (rng.random(len(users)) * self.author_count[f]).astype(np.int64)
      post = self.author_posts[np.minimum(self.author_start[f] + k, self.n - 1)]
      return np.where(has, post, self.pool[rng.integers(0, len(self.pool), len(users))])
    return self.pool[rng.integers(0, len(self.pool), len(users))]

  def __call__(self, users, times, rng, tries: int = 20) -> np.ndarray:
    """[n] negatives: the prescribed draw, re-drawn while invalid; after `tries`,
    uniform from the pool (still valid for all but pathological users)."""
    out = self._draw(users, times, rng)
    bad = ~self._valid(users, out)
    for t in range(tries):
      if not bad.any():
        break
      redraw = self._draw(users[bad], times[bad], rng) if t < tries // 2 else \
          self.pool[rng.integers(0, len(self.pool), int(bad.sum()))]
      out[bad] = redraw
      bad[bad] = ~self._valid(users[bad], redraw)
    return out


class TripletIterator(grain.DatasetIterator):
  """Resumable iterator of this process's part of each global batch.

  Each epoch shuffles the training actions and draws their negatives (and
  semantic triplets) from a generator seeded by (seed, epoch), so a run that
  restores {"epoch", "step"} sees the same batches as an uninterrupted one.
  """

  def __init__(self, data: Interactions, train_actions: np.ndarray, negatives: Negatives,
               *, batch_size: int, image_key: str, seed: int, bags: np.ndarray | None = None,
               clusters: np.ndarray | None = None, process_index: int = 0,
               process_count: int = 1):
    super().__init__()
    self.data, self.train, self.negatives = data, train_actions, negatives
    self.batch_size, self.seed = batch_size, seed
    self.fields = POST_FIELDS + (image_key,)
    self.bags, self.clusters = bags, clusters
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
    per = batch_size // process_count
    self.rows = slice(process_index * per, (process_index + 1) * per)
    self.steps_per_epoch = len(train_actions) // batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"{len(train_actions)} training actions, fewer than one batch "
                       f"of {batch_size}")
    if clusters is not None:
      clustered = np.flatnonzero(clusters >= 0)
      self._by_cluster = clustered[np.argsort(clusters[clustered], kind="stable")]
      sizes = np.bincount(clusters[clustered])
      self._cluster_start, self._cluster_size = np.r_[0, np.cumsum(sizes)[:-1]], sizes
    self.epoch, self.step, self._plan = 0, 0, None

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "step": self.step}

  def set_state(self, state: Mapping) -> None:
    self.epoch, self.step, self._plan = int(state["epoch"]), int(state["step"]), None

  def _epoch_plan(self) -> dict:
    """The epoch's shuffled triplets (row arrays over the whole epoch)."""
    rng = np.random.default_rng([self.seed, self.epoch])
    acts = self.data.actions[rng.permutation(self.train)]
    users, pos = acts[:, 0], acts[:, 1]
    plan = {"user": users, "pos": pos, "neg": self.negatives(users, acts[:, 2], rng)}
    if self.clusters is not None:
      plan.update(self._semantic(pos, rng))
    return plan

  def _semantic(self, anchors, rng) -> dict:
    """(anchor, same-cluster post, other-cluster post) rows; anchors without a
    cluster are replaced by a random clustered post."""
    c = self.clusters[anchors]
    lone = c < 0
    anchors = anchors.copy()
    anchors[lone] = self._by_cluster[rng.integers(0, len(self._by_cluster), int(lone.sum()))]
    c = self.clusters[anchors]
    same = self._by_cluster[self._cluster_start[c]
                            + (rng.random(len(c)) * self._cluster_size[c]).astype(np.int64)]
    other = self._by_cluster[rng.integers(0, len(self._by_cluster), len(c))]
    for _ in range(20):
      bad = self.clusters[other] == c
      if not bad.any():
        break
      other[bad] = self._by_cluster[rng.integers(0, len(self._by_cluster), int(bad.sum()))]
    return {"sem_anchor": anchors, "sem_pos": same, "sem_neg": other}

  def posts(self, rows: np.ndarray) -> dict:
    """Post-field dict of some post rows."""
    return {k: self.data.posts[k][rows] for k in self.fields}

  def __next__(self) -> dict:
    if self.step == self.steps_per_epoch:
      self.epoch, self.step, self._plan = self.epoch + 1, 0, None
    if self._plan is None:
      self._plan = self._epoch_plan()
    start = self.step * self.batch_size
    take = {k: v[start:start + self.batch_size][self.rows] for k, v in self._plan.items()}
    self.step += 1
    users = take.pop("user").astype(np.int32)
    batch = {"user": users, "followees": self.data.followees[users].astype(np.int32)}
    if self.bags is not None:
      batch["user_bag"] = self.bags[users]
    batch.update({k: self.posts(v) for k, v in take.items()})
    return batch
