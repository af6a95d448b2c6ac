"""What does a social network with known truth look like?

The embedded corpus: a seeded generative model of users, posts, images, a follow
graph and actions, written as the raw crawl a user would bring (so it takes the
same road to training, `launch/prepare_data.py`), plus the planted parameters
(`oracle.py`'s truth file) so that an `Oracle` can score every task with the
true posterior of the model.

Generative story (T topics, U users):
  user u:   sparse interests theta_u (k in [topics_min, topics_max] topics,
            Dirichlet(1) weights) and activity pi_u (log-normal, normalised).
  post:     author u ~ pi; topic z ~ theta_u; timestamp ~ U(0, days).
  text:     length L ~ U[min_len, max_len]; each token is a topic word ~ phi_z
            with prob. `topic_word_prob`, else a background word ~ beta.
            phi_z puts (1 - leak) of its mass on z's own words (Zipf) and
            `leak` uniformly on all topic words, so topics overlap softly.
  image:    with prob. `image_fraction`; with prob. `reshare_prob` it re-shares
            an earlier image of topic z (same image), else a new image with
            features x = mu_z + N(0, I) (mu_z ~ N(0, signal^2 I)), and
            optionally RGB pixels: a topic-coloured grating plus noise.
  follows:  each user follows `followees` others, drawn prop. to
            theta_u . theta_v + 0.01.
  actions:  each user likes/re-shares `actions_per_user` posts of others, drawn
            prop. to (theta_u[z_post] + 0.01) x (3 if the author is followed),
            some minutes to hours after the post.
No word or feature belongs to a single user, so identity is never given away by
one token: users are known only through what they talk about.

The crawl (`write_crawl`), in prepare's input formats:
  posts.jsonl         post_id ("p0000042"), user_id ("user00007"), text (the
                      words, e.g. "topic03w01 common042 ..."), image (null, or
                      "img000017", or "images/img000017.png" with pixels),
                      timestamp (unix seconds), topic ("topic03": the planted
                      topic, for --interest_field=topic)
  image_features.npz  image (as in posts.jsonl) -> float32 [feature_dim]
  images/*.png        RGB pixels, image_size x image_size (image_size > 0)
  actions.jsonl       user_id, post_id, timestamp
  follows.jsonl       user_id, followee_id
  oracle.npz          the planted truth keyed by user id, word and post id
"""

import dataclasses
import json
import os

import numpy as np

from input_pipeline import oracle, records

POSTS_FILE = "posts.jsonl"
FEATURES_FILE = "image_features.npz"
ACTIONS_FILE = "actions.jsonl"
FOLLOWS_FILE = "follows.jsonl"
IMAGES_DIR = "images"
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
  """The label of topic z ("topic03"), as in its words' names."""
  return f"topic{z:02d}"


def generate(spec: CorpusSpec) -> dict:
  """Draws a corpus: posts (authors, topics, tokens [N, L] over `vocab`, image_id
  [N], -1 = none, timestamps), images (features [I, F], pixels [I, S, S, 3] or
  None), follows [E, 2], actions [A, 3] (user, post, seconds after the epoch
  start) and the planted parameters (log_pi, theta, mu, log_phi [T, V])."""
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
    w = oracle.action_weight(theta[u, topics], followed[u, authors])
    w[authors == u] = 0
    k = min(spec.actions_per_user, int((w > 0).sum()))
    for p in rng.choice(n_posts, k, replace=False, p=w / w.sum()):
      actions.append([u, p, times[p] + int(rng.exponential(7200))])

  log_phi = np.zeros([T, V])
  log_phi[:, first_topic:first_bg] = np.log(phi)
  return dict(
      authors=authors, topics=topics, tokens=tokens, image_id=image_id,
      timestamps=_EPOCH_START + times,
      features=np.stack(feats) if feats else np.zeros([0, spec.feature_dim], np.float32),
      pixels=np.stack(pixels) if pixels else None,
      follows=follows, actions=np.asarray(actions, np.int64).reshape(-1, 3),
      vocab=vocab, log_pi=np.log(pi), theta=theta, mu=mu, log_phi=log_phi)


def user_id(u: int) -> str:
  return f"user{u:05d}"


def post_id(i: int) -> str:
  return f"p{i:07d}"


def image_name(j: int, pixels: bool) -> str:
  """An image as posts.jsonl names it: its file when it has pixels, else a key."""
  return f"{IMAGES_DIR}/img{j:06d}.png" if pixels else f"img{j:06d}"


def _write_jsonl(path: str, rows) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)


def write_crawl(spec: CorpusSpec, directory: str) -> dict:
  """Generates the corpus and writes it as a raw crawl (module docstring) in
  `directory`; returns counts of what was written."""
  corpus = generate(spec)
  os.makedirs(directory, exist_ok=True)
  vocab, has_pixels = corpus["vocab"], corpus["pixels"] is not None
  names = [image_name(j, has_pixels) for j in range(len(corpus["features"]))]
  _write_jsonl(os.path.join(directory, POSTS_FILE), (
      {"post_id": post_id(i), "user_id": user_id(u),
       "text": " ".join(vocab[t] for t in corpus["tokens"][i] if t != records.PAD_ID),
       "image": names[img] if img >= 0 else None, "timestamp": int(stamp),
       "topic": topic_name(z)}
      for i, (u, z, img, stamp) in enumerate(zip(
          corpus["authors"].tolist(), corpus["topics"].tolist(),
          corpus["image_id"].tolist(), corpus["timestamps"].tolist()))))
  records.save_npz(os.path.join(directory, FEATURES_FILE),
                   **dict(zip(names, corpus["features"])))
  if has_pixels:
    os.makedirs(os.path.join(directory, IMAGES_DIR), exist_ok=True)
    for name, pixels in zip(names, corpus["pixels"]):
      with open(os.path.join(directory, name), "wb") as f:
        f.write(records.encode_png(pixels))
  _write_jsonl(os.path.join(directory, ACTIONS_FILE), (
      {"user_id": user_id(u), "post_id": post_id(p), "timestamp": _EPOCH_START + t}
      for u, p, t in corpus["actions"].tolist()))
  _write_jsonl(os.path.join(directory, FOLLOWS_FILE), (
      {"user_id": user_id(u), "followee_id": user_id(v)}
      for u, v in corpus["follows"].tolist()))
  topic_words = slice(2, 2 + spec.num_topics * spec.words_per_topic)
  n = len(corpus["authors"])
  oracle.write_truth(
      os.path.join(directory, oracle.ORACLE_FILE),
      users=np.array([user_id(u) for u in range(spec.num_users)]),
      log_pi=corpus["log_pi"], theta=corpus["theta"],
      words=np.array(vocab[topic_words]), log_phi=corpus["log_phi"][:, topic_words],
      mu=corpus["mu"], post_ids=np.array([post_id(i) for i in range(n)]),
      post_topics=corpus["topics"])
  return dict(posts=n, users=spec.num_users, images=len(names),
              actions=len(corpus["actions"]), follows=len(corpus["follows"]))
