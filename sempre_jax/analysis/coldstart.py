"""How does a user the model never saw get a vector, with no retraining?

Fold-in: the user's row r of the user table [user_dim] is optimised against
the frozen towers with the training loss's user terms, the user's posts as
anchors (Eq. 4 with the text, or the image, as the anchor) and every known
user's vector v_n as a negative:

  L(r) = sum_t  w_t / N_t  sum_{anchors a of term t}  mean_n [m - S(a, u(r)) + S(a, v_n)]_+
  u(r) = normalize(W r + b)      (the user tower's frozen projection)

t ranges over text-user and image-user, w_t is the term's weight in training
(a term that never trained is left out), N_t the user's anchors of term t,
m the training margin. The mean over the known users instead of Eq. 4's sum
only rescales L, which Adam ignores. Each user's loss depends on their own row
only: users fold in independently (together or one at a time, the same
vectors). r starts where DU2MCE starts a training user, at the mean Word2Vec
vector of their training words (the data's word2vec_init.npz row,
input_pipeline/word2vec.py), or at the mean known row when the data has none;
then `steps` full-batch Adam steps at the rate the rows trained with (the
config's learning_rate; on Newsgroups 30 to 300 steps rank alike, a 10x
larger rate worse: docs/new_data.md).

Avg-Text, the baseline and the fallback for a user with no anchor of a
trained term: normalize(sum of the embeddings of the user's post texts).
A user with neither (no post that a trained term reads) gets no vector.

`with_new_users` gives DU2MCE the new users' vectors [K, D] after its known
users (index >= num_users reads them), so the retrieval evaluator, the
export writer and the analysis tools treat them like any user.
"""

import dataclasses
import os
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from input_pipeline import word2vec
from sempre_jax.analysis import space as space_lib
from sempre_jax.models import du2mce, encoders

METHODS = ("none", "avg_text", "fold_in")
MAX_SCORES = 1 << 24        # anchors x known users scored at once (a chunk of new users)


@dataclasses.dataclass
class Evidence:
  """The embedded posts of K new users (numbered 0..K-1)."""
  texts: np.ndarray        # [T, D]
  text_user: np.ndarray    # [T] in [0, K)
  images: np.ndarray       # [I, D]
  image_user: np.ndarray   # [I] in [0, K)
  num_users: int           # K

  def text_counts(self) -> np.ndarray:
    return np.bincount(self.text_user, minlength=self.num_users)


def evidence(space: space_lib.Space, split: str, num_known: int) -> Evidence:
  """The texts and images of the posts of `split` by users >= num_known (the
  new users of a dataset prepared with --vocab_from), user u as u - num_known."""
  k = space.metadata["num_users"] - num_known
  parts = {"texts": [], "text_user": [], "images": [], "image_user": []}
  if space.metadata["splits"][split]["num_posts"]:
    for posts in space.posts(splits=[split], label=f"{split} posts of new users"):
      new = posts.user >= num_known
      parts["texts"].append(posts.texts[new[posts.has_text]])
      parts["text_user"].append(posts.user[posts.has_text & new] - num_known)
      parts["images"].append(posts.images[new[posts.new_image]])
      parts["image_user"].append(posts.user[posts.new_image & new] - num_known)
  d = space.model.embed_dim
  cat = lambda xs, shape, dtype: np.concatenate(xs) if xs else np.zeros(shape, dtype)
  return Evidence(cat(parts["texts"], [0, d], np.float32),
                  cat(parts["text_user"], [0], np.int64),
                  cat(parts["images"], [0, d], np.float32),
                  cat(parts["image_user"], [0], np.int64), k)


def avg_text(ev: Evidence) -> np.ndarray:
  """[K, D] each user's normalised mean text embedding (zeros: no text)."""
  sums = np.zeros([ev.num_users, ev.texts.shape[1]], np.float64)
  np.add.at(sums, ev.text_user, ev.texts)
  return np.array(encoders.l2_normalize(sums))


def init_rows(data_dir: str, num_known: int, num_users: int, known_rows: np.ndarray
              ) -> np.ndarray:
  """[K, user_dim] the new users' starting rows: their word2vec_init.npz rows
  (mean Word2Vec vector of their training words), else the mean known row."""
  path = os.path.join(data_dir, word2vec.INIT_FILE)
  if os.path.exists(path):
    with np.load(path) as z:
      rows = z["users"]
    if rows.shape == (num_users, known_rows.shape[1]):
      return rows[num_known:].astype(np.float32)
  return np.repeat(known_rows.mean(0, keepdims=True), num_users - num_known, 0)


def fold_in(module: du2mce.DU2MCE, user_params: Mapping, known: np.ndarray, ev: Evidence,
            weights: Mapping[str, float], rows: np.ndarray, *, margin: float,
            steps: int = 100, learning_rate: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
  """(vectors [K, D], folded [K] bool): the fold-in of the module docstring.

  user_params: the user tower's parameters; known: [U, D] the known users'
  vectors; weights: the training term weights {"tu", "iu"}; rows: [K, user_dim]
  starting rows. A user without an anchor of a trained term is not folded
  (zero vector, folded False).
  """
  anchors, owner, weight = [], [], []
  for term, (vectors, users) in {"tu": (ev.texts, ev.text_user),
                                 "iu": (ev.images, ev.image_user)}.items():
    if weights.get(term, 0.0) > 0 and len(users):
      n = np.bincount(users, minlength=ev.num_users)
      anchors.append(vectors)
      owner.append(users)
      weight.append(weights[term] / n[users])
  out = np.zeros([ev.num_users, module.embed_dim], np.float32)
  folded = np.zeros([ev.num_users], bool)
  if not anchors:
    return out, folded
  anchors, owner, weight = map(np.concatenate, (anchors, owner, weight))
  folded[owner] = True
  tower = encoders.UserEncoder(1, module.embed_dim, module.user_dim, dtype=module.dtype)
  # Each row as a 1-row table through the tower's own Embed -> Dense -> normalise.
  project = jax.vmap(lambda r: tower.apply(
      {"params": {"user_embed": {"embedding": r[None]}, "proj": user_params["proj"]}},
      jnp.zeros([1], jnp.int32))[0])
  run = _fold_in_fn(project, margin, steps, learning_rate)
  known = jnp.asarray(known)
  per_chunk = max(1, MAX_SCORES // max(len(known), 1))
  users = np.flatnonzero(folded)
  counts = np.bincount(owner, minlength=ev.num_users)[users]
  start = 0
  while start < len(users):     # chunks of users with at most per_chunk anchors (or one user)
    end = start + max(1, int(np.searchsorted(np.cumsum(counts[start:]), per_chunk, "right")))
    chunk = users[start:end]
    sel = np.flatnonzero(np.isin(owner, chunk))
    local = np.searchsorted(chunk, owner[sel])
    a = _pad(anchors[sel], _bucket(len(sel)))
    w = _pad(weight[sel], _bucket(len(sel)))
    o = _pad(local, _bucket(len(sel)))
    r = _pad(rows[chunk], _bucket(len(chunk)))
    out[chunk] = np.asarray(run(r, jnp.asarray(a), jnp.asarray(o), jnp.asarray(w),
                                known))[:len(chunk)]
    start = end
  return out, folded


def _bucket(n: int) -> int:
  """n rounded up to a power of two (>= 8): few distinct shapes to compile."""
  return max(8, 1 << (int(n) - 1).bit_length())


def _pad(x: np.ndarray, n: int) -> np.ndarray:
  return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)])


def _fold_in_fn(project, margin: float, steps: int, learning_rate: float):
  """jit(run(rows [K, R], anchors [A, D], owner [A], weight [A] (0: padding),
  known [U, D]) -> vectors [K, D])."""
  tx = optax.adam(learning_rate)

  @jax.jit
  def run(rows, anchors, owner, weight, known):
    negatives = anchors @ known.T                                   # [A, U]: S(a, v_n)

    def loss(rows):
      users = project(rows)                                         # [K, D]
      positive = jnp.sum(anchors * users[owner], axis=-1)           # [A]: S(a, u(r))
      hinge = jax.nn.relu(margin - positive[:, None] + negatives).mean(axis=1)
      return jnp.sum(weight * hinge)

    def step(_, carry):
      rows, opt = carry
      updates, opt = tx.update(jax.grad(loss)(rows), opt)
      return optax.apply_updates(rows, updates), opt

    rows, _ = jax.lax.fori_loop(0, steps, step, (rows, tx.init(rows)))
    return project(rows)

  return run


# ------------------------------------------------------- the model's view --

class WithNewUsers(du2mce.DU2MCE):
  """DU2MCE with `num_new_users` more users after its num_users: their
  vectors are the parameter "new_users" [K, D] (normalised when read)."""
  num_new_users: int = 0

  def setup(self):
    super().setup()
    self.new_users = self.param("new_users", nn.initializers.zeros,
                                (self.num_new_users, self.embed_dim))

  def embed_user(self, users):
    known = users < self.num_users
    old = self.user(jnp.where(known, users, 0))
    new = self.new_users[jnp.clip(users - self.num_users, 0, self.num_new_users - 1)]
    return jnp.where(known[:, None], old, encoders.l2_normalize(new))


def with_new_users(module: du2mce.DU2MCE, params: Mapping, vectors: np.ndarray
                   ) -> tuple[du2mce.DU2MCE, dict]:
  """(module, params) that embed the users of `module` and then `vectors` [K, D]."""
  if not len(vectors):
    return module, dict(params)
  fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(du2mce.DU2MCE)
            if f.init and f.name not in ("parent", "name")}
  return (WithNewUsers(**fields, num_new_users=len(vectors)),
          {**params, "new_users": jnp.asarray(vectors, jnp.float32)})


def new_user_vectors(space: space_lib.Space, params: Mapping, data_dir: str, split: str,
                     num_known: int, method: str, weights: Mapping[str, float], *,
                     margin: float, steps: int, learning_rate: float
                     ) -> tuple[np.ndarray, dict]:
  """(vectors [K, D], {user k: how}) of the users >= num_known of `space`'s
  dataset from their posts of `split`: `method` "fold_in" (Avg-Text where it
  cannot) or "avg_text"; how is "fold_in" or "avg_text", absent: no vector."""
  if method not in METHODS[1:]:
    raise ValueError(f"cold start must be one of {METHODS}, got {method!r}")
  ev = evidence(space, split, num_known)
  vectors = avg_text(ev)
  how = {int(k): "avg_text" for k in np.flatnonzero(ev.text_counts())}
  if method == "fold_in":
    known_rows = np.asarray(params["user"]["user_embed"]["embedding"])
    rows = init_rows(data_dir, num_known, space.metadata["num_users"], known_rows)
    known = space.users(np.arange(num_known))
    folded_vectors, folded = fold_in(space.model, params["user"], known, ev, weights, rows,
                                     margin=margin, steps=steps, learning_rate=learning_rate)
    vectors[folded] = folded_vectors[folded]
    how.update({int(k): "fold_in" for k in np.flatnonzero(folded)})
  return vectors, how
