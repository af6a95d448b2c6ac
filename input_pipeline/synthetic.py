"""What does a social network with known truth look like?

The embedded corpus: a seeded generative model of users, posts, images, a follow
graph and actions, whose planted parameters are kept so that an `Oracle` can
score every retrieval task with the true posterior of the model.

Generative story (T topics, U users):
  user u:   sparse interests theta_u (k in [topics_min, topics_max] topics,
            Dirichlet(1) weights) and activity pi_u (log-normal, normalised).
            The topics with theta_uz > 0 are written as the user's interest
            labels (`interests.txt`, e.g. "topic03").
  post:     author u ~ pi; topic z ~ theta_u; timestamp ~ U(0, days).
  text:     length L ~ U[min_len, max_len]; each token is a topic word ~ phi_z
            with prob. `topic_word_prob`, else a background word ~ beta.
            phi_z puts (1 - leak) of its mass on z's own words (Zipf) and
            `leak` uniformly on all topic words, so topics overlap softly.
  image:    with prob. `image_fraction`; with prob. `reshare_prob` it re-shares
            an earlier image of topic z (same image id), else a new image with
            features x = mu_z + N(0, I) (mu_z ~ N(0, signal^2 I)), and
            optionally RGB pixels: a topic-coloured grating plus noise.
  follows:  each user follows `followees` others, drawn prop. to
            theta_u . theta_v + 0.01.
  actions:  each user likes/re-shares `actions_per_user` posts of others, drawn
            prop. to (theta_u[z_post] + 0.01) x (3 if the author is followed),
            some minutes to hours after the post.
Written as a prepared dataset (records.py) plus `oracle.npz` and `graph.npz`:
follows [E, 2] (user, followee), actions [A, 3] (user, post row, unix time) and
post_ids [N] (post row -> the record's post_id).
No word or feature belongs to a single user, so identity is never given away by
one token: users are known only through what they talk about.
"""

import dataclasses
import os
from collections.abc import Mapping

import numpy as np
from scipy.special import logsumexp

from input_pipeline import records, splits

ORACLE_FILE = "oracle.npz"
GRAPH_FILE = "graph.npz"
FOLLOW_BOOST = 3.0            # actions favour followed authors this much
_EPOCH_START = 1_420_070_400  # 2015-01-01 UTC


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
  num_users: int = 500
  num_topics: int = 64
  topics_min: int = 1
  topics_max: int = 3
  posts_per_user: float = 40.0
  activity_sigma: float = 0.5
  words_per_topic: int = 20
  background_words: int = 300
  topic_word_prob: float = 0.5
  leak: float = 0.1
  min_len: int = 5
  max_len: int = records.MAX_LEN
  image_fraction: float = 0.5
  reshare_prob: float = 0.1
  feature_dim: int = 2048
  signal: float = 0.3
  image_size: int = 0
  followees: int = 10
  actions_per_user: int = 20
  days: float = 60.0
  seed: int = 0


# ------------------------------------------------------------------ oracle --

@dataclasses.dataclass
class Oracle:
  """The planted model's true scores for the retrieval and recommendation tasks.

  Each method returns log-scores whose order is the Bayes-optimal ranking of the
  candidates; ranks computed from them are the best achievable. Scores are
  rounded to 1e-6 nats so that candidates the model cannot tell apart tie
  exactly instead of being ordered by float round-off.
  """
  log_pi: np.ndarray     # [U] author prior
  theta: np.ndarray      # [U, T] user interests
  mu: np.ndarray         # [T, F] image topic means (unit noise)
  log_phi: np.ndarray    # [T, V] topic word log-probs (0 on background words)

  def _text_loglik(self, tokens, mask) -> np.ndarray:
    """log p(topic words of text | z) up to a per-text constant: [Q, T]."""
    onehot_counts = np.zeros([len(tokens), self.log_phi.shape[1]])
    np.add.at(onehot_counts, (np.arange(len(tokens))[:, None], tokens), mask)
    return onehot_counts @ self.log_phi.T

  def _image_loglik(self, features) -> np.ndarray:
    """log N(x; mu_z, I) up to a per-image constant: [Q, T]."""
    return features @ self.mu.T - 0.5 * np.sum(self.mu**2, axis=1)

  def _user_scores(self, topic_loglik) -> np.ndarray:
    """log pi_u + log sum_z theta_uz p(. | z): [Q, U]."""
    m = topic_loglik.max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
      return self.log_pi + m + np.log(np.exp(topic_loglik - m) @ self.theta.T)

  def text_user(self, tokens, mask) -> np.ndarray:
    """P(author | text) scores: tokens/mask [Q, L] -> [Q, U]."""
    return _round(self._user_scores(self._text_loglik(tokens, mask)))

  def image_user(self, features) -> np.ndarray:
    """P(poster | image) scores: features [Q, F] -> [Q, U]."""
    return _round(self._user_scores(self._image_loglik(features)))

  def user_text(self, tokens, mask) -> np.ndarray:
    """log P(author = u | text c), for ranking texts per user: [U, C]."""
    return _round(_posterior(self._user_scores(self._text_loglik(tokens, mask))).T)

  def user_image(self, features) -> np.ndarray:
    """log P(poster = u | image c), for ranking images per user: [U, C]."""
    return _round(_posterior(self._user_scores(self._image_loglik(features))).T)

  def _image_text_terms(self, features, tokens, mask):
    """(log p(t_c | x_q) + k_c [Q, C], log p(t_c) + k_c [C]); k_c: a per-text constant."""
    log_pz = logsumexp(np.log(self.theta + 1e-300) + self.log_pi[:, None], axis=0)
    img = self._image_loglik(features) + log_pz
    log_pz_x = img - logsumexp(img, axis=1, keepdims=True)       # [Q, T]
    txt = self._text_loglik(tokens, mask)                         # [C, T]
    txt = txt - txt.max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
      numer = np.log(np.exp(log_pz_x) @ np.exp(txt).T)            # [Q, C]
    return numer, logsumexp(txt + log_pz, axis=1)

  def image_text(self, features, tokens, mask) -> np.ndarray:
    """Posterior that text c is image q's caption, prop. p(x_q, t_c) / p(t_c): [Q, C]."""
    numer, denom = self._image_text_terms(features, tokens, mask)
    return _round(numer - denom)

  def text_image(self, tokens, mask, features) -> np.ndarray:
    """Posterior that image q is text c's image, prop. p(t_c | x_q): [C, Q]."""
    return _round(self._image_text_terms(features, tokens, mask)[0].T)

  @staticmethod
  def action_weight(theta_uz, followed):
    """The planted odds that a user acts on a post: (theta_u[z_post] + 0.01)
    x FOLLOW_BOOST when the user follows its author (the generator's draw)."""
    return (theta_uz + 0.01) * np.where(followed, FOLLOW_BOOST, 1.0)

  def action_scores(self, users, topics, followed) -> np.ndarray:
    """log odds that each user acts on each post: users, topics, followed [n] -> [n]."""
    return _round(np.log(self.action_weight(self.theta[users, topics], followed)))

  def save(self, path: str) -> None:
    np.savez(path, **dataclasses.asdict(self))

  @classmethod
  def load(cls, path: str) -> "Oracle":
    with np.load(path) as z:
      return cls(**{k: z[k] for k in z.files})


def _posterior(log_joint: np.ndarray) -> np.ndarray:
  """Rows of log p(x, u) -> log p(u | x)."""
  return log_joint - logsumexp(log_joint, axis=1, keepdims=True)


def _round(scores: np.ndarray) -> np.ndarray:
  return np.round(scores, 6)


# --------------------------------------------------------------- generator --

def _zipf(n: int, rng) -> np.ndarray:
  w = 1.0 / np.arange(1, n + 1)
  return rng.permutation(w / w.sum())


def _render(topic_colors, topic_freqs, z, rng, size) -> np.ndarray:
  """A topic-coloured sinusoidal grating with a random phase, plus noise."""
  yy, xx = np.mgrid[0:size, 0:size] / size
  fx, fy = topic_freqs[z]
  wave = np.sin(2 * np.pi * (fx * xx + fy * yy) + rng.uniform(0, 2 * np.pi))
  img = 128 + 90 * wave[..., None] * topic_colors[z] + rng.normal(0, 20, (size, size, 3))
  return np.clip(img, 0, 255).astype(np.uint8)


def topic_name(z: int) -> str:
  """The label of topic z in interests.txt ("topic03"), as in its words' names."""
  return f"topic{z:02d}"


def generate(spec: CorpusSpec) -> dict:
  """Draws a corpus; returns posts, images, graph, vocab and the oracle."""
  rng = np.random.default_rng(spec.seed)
  U, T = spec.num_users, spec.num_topics

  theta = np.zeros([U, T])
  for u in range(U):
    k = rng.integers(spec.topics_min, min(spec.topics_max, T) + 1)
    theta[u, rng.choice(T, k, replace=False)] = rng.dirichlet(np.ones(k))
  activity = rng.lognormal(0.0, spec.activity_sigma, U)
  pi = activity / activity.sum()

  # Vocabulary: <pad>, <unk>, T x W topic words, then background words.
  W, B = spec.words_per_topic, spec.background_words
  first_topic, first_bg = 2, 2 + T * W
  vocab = (["<pad>", "<unk>"]
           + [f"{topic_name(z)}w{i:02d}" for z in range(T) for i in range(W)]
           + [f"common{i:03d}" for i in range(B)])
  V = len(vocab)
  phi = np.full([T, T * W], spec.leak / (T * W))
  for z in range(T):
    phi[z, z * W:(z + 1) * W] += (1 - spec.leak) * _zipf(W, rng)
  beta = _zipf(B, rng)

  n_posts = int(round(U * spec.posts_per_user))
  authors = rng.choice(U, n_posts, p=pi)
  times = np.sort(rng.uniform(0, spec.days * 86400, n_posts)).astype(np.int64)
  topics = np.array([rng.choice(T, p=theta[u]) for u in authors])
  lengths = rng.integers(spec.min_len, spec.max_len + 1, n_posts)
  tokens = np.zeros([n_posts, records.MAX_LEN], np.int64)
  for i in range(n_posts):
    L = lengths[i]
    is_topic = rng.random(L) < spec.topic_word_prob
    tw = first_topic + rng.choice(T * W, L, p=phi[topics[i]])
    bw = first_bg + rng.choice(B, L, p=beta)
    tokens[i, :L] = np.where(is_topic, tw, bw)

  mu = rng.normal(0, spec.signal, [T, spec.feature_dim])
  colors = rng.uniform(-1, 1, [T, 3])
  freqs = rng.uniform(0.5, 4, [T, 2]) * rng.choice([-1, 1], [T, 2])
  image_id = np.full(n_posts, -1, np.int64)
  feats, pixels, images_of_topic = [], [], [[] for _ in range(T)]
  for i in np.flatnonzero(rng.random(n_posts) < spec.image_fraction):
    z = topics[i]
    if images_of_topic[z] and rng.random() < spec.reshare_prob:
      image_id[i] = rng.choice(images_of_topic[z])
      continue
    image_id[i] = len(feats)
    images_of_topic[z].append(len(feats))
    feats.append((mu[z] + rng.normal(0, 1, spec.feature_dim)).astype(np.float32))
    if spec.image_size:
      pixels.append(_render(colors, freqs, z, rng, spec.image_size))

  # Follow graph and actions on others' posts.
  affinity = theta @ theta.T + 0.01
  np.fill_diagonal(affinity, 0)
  follows = np.array([[u, v] for u in range(U) for v in rng.choice(
      U, min(spec.followees, U - 1), replace=False, p=affinity[u] / affinity[u].sum())])
  followed = np.zeros([U, U], bool)
  followed[follows[:, 0], follows[:, 1]] = True
  actions = []
  for u in range(U):
    w = Oracle.action_weight(theta[u, topics], followed[u, authors])
    w[authors == u] = 0
    k = min(spec.actions_per_user, int((w > 0).sum()))
    for p in rng.choice(n_posts, k, replace=False, p=w / w.sum()):
      actions.append([u, p, times[p] + int(rng.exponential(7200))])

  log_phi = np.zeros([T, V])
  log_phi[:, first_topic:first_bg] = np.log(phi)
  oracle = Oracle(log_pi=np.log(pi), theta=theta, mu=mu, log_phi=log_phi)
  return dict(
      authors=authors, topics=topics, tokens=tokens, image_id=image_id,
      timestamps=_EPOCH_START + times,
      features=np.stack(feats) if feats else np.zeros([0, spec.feature_dim], np.float32),
      pixels=np.stack(pixels) if pixels else None,
      follows=follows, actions=np.asarray(actions, np.int64),
      vocab=vocab, oracle=oracle)


def write_corpus(spec: CorpusSpec, directory: str, split_fractions: Mapping[str, float],
                 num_shards: int = 4) -> dict:
  """Generates the corpus and writes it as a prepared dataset; returns metadata."""
  os.makedirs(directory, exist_ok=True)
  corpus = generate(spec)
  n = len(corpus["authors"])
  # Group = the image for posts with one, else the post itself: no image straddles splits.
  groups = np.where(corpus["image_id"] >= 0, corpus["image_id"], n + np.arange(n))
  assignment = splits.split_by_group(groups, split_fractions, spec.seed)
  png = ([records.encode_png(p) for p in corpus["pixels"]]
         if corpus["pixels"] is not None else None)

  def posts(split):
    for i in np.flatnonzero(assignment == split):
      img = corpus["image_id"][i]
      yield dict(post_id=f"p{i:07d}", user=corpus["authors"][i],
                 tokens=corpus["tokens"][i], image_id=img,
                 image_features=corpus["features"][img] if img >= 0 else None,
                 image_encoded=png[img] if png is not None and img >= 0 else None,
                 timestamp=corpus["timestamps"][i], topic=corpus["topics"][i])

  split_meta = {s: records.write_split(directory, s, posts(s), num_shards)
                for s in records.SPLITS}
  records.write_lines(directory, records.VOCAB_FILE, corpus["vocab"])
  records.write_lines(directory, records.USERS_FILE,
                      (f"user{u:05d}" for u in range(spec.num_users)))
  records.write_lines(directory, records.INTERESTS_FILE,    # the planted interests
                      ("\t".join(topic_name(z) for z in np.flatnonzero(row > 0))
                       for row in corpus["oracle"].theta))
  corpus["oracle"].save(os.path.join(directory, ORACLE_FILE))
  actions = corpus["actions"].copy()
  actions[:, 2] += _EPOCH_START
  np.savez(os.path.join(directory, GRAPH_FILE), follows=corpus["follows"], actions=actions,
           post_ids=np.array([f"p{i:07d}" for i in range(n)]))
  metadata = dict(
      source="embedded", spec=dataclasses.asdict(spec),
      num_users=spec.num_users, vocab_size=len(corpus["vocab"]),
      max_len=records.MAX_LEN, feature_dim=spec.feature_dim,
      image_size=spec.image_size, num_images=int(len(corpus["features"])),
      splits=split_meta)
  records.write_metadata(directory, metadata)
  return metadata
