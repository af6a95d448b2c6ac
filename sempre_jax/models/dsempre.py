"""How does D-Sempre rank a post for a user?

D-Sempre (Ma & Chen 2018, "D-Sempre: Learning Deep Semantic-Preserving
Embeddings for User interests-Social Contents Modeling"): a user branch and a
post branch map users and posts into one D-dim Euclidean space, and a post is
ranked for a user by their distance there.

  user   u = norm(drop(BN(W2 relu(W1 bag))))          bag: [K] clusters of own posts
  post   p = norm(drop(Wf [BN(Wi gpool(convnet(pixels))) ; BN(Wt mean(words))]))
  d(x, y) = ||x - y||_2                                plain, not squared: in [0, 2]
  Eq. 2  cross-instance:  [m + d(u, p+) - d(u, p-)]_+  user, acted post, other post
  Eq. 3  within-instance: [m + d(a, s) - d(a, o)]_+    post, same-cluster post,
                                                       other-cluster post
  Eq. 4  L = Eq. 2 + lambda * Eq. 3, per triplet       (m = 1.0, lambda = 0.3)
  score(u, p) = -d(u, p)

The text branch is a Dense layer over the mean word embedding of the post's
tokens. A branch the post lacks (no image: image_mask False; no text: empty
text_mask) is a zero vector, and its BatchNorm statistics are taken over the
posts that have it, summed across devices over `axis_name`.
"""

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sempre_jax.models import encoders, triplets


POST_ROLES = ("pos", "neg", "sem_anchor", "sem_pos", "sem_neg")


def distance(x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """Euclidean distance of aligned rows [n, D], [n, D] -> [n] float32 (its
  gradient stays finite at x = y)."""
  diff = x.astype(jnp.float32) - y.astype(jnp.float32)
  return jnp.sqrt(jnp.maximum(jnp.sum(diff * diff, axis=-1), 1e-12))


def triplet_hinge(anchor, near, far, margin: float) -> jnp.ndarray:
  """[m + d(anchor, near) - d(anchor, far)]_+ per row: [n]."""
  return jax.nn.relu(margin + distance(anchor, near) - distance(anchor, far))


class MaskedBatchNorm(nn.Module):
  """BatchNorm of the rows of x [n, F] where mask [n] is True (None: all rows);
  the other rows come out as zeros.

  Train: normalises with the mean and (biased) variance of the valid rows of the
  global batch (sums psum'ed over `axis_name`) and moves the running statistics
  towards them, leaving them as they are when no row is valid. Eval: uses the
  running statistics.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None, train: bool) -> jnp.ndarray:
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
    scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
    valid = jnp.ones(x.shape[:1], bool) if mask is None else mask.astype(bool)
    x = x.astype(jnp.float32)
    if train:
      w = valid.astype(jnp.float32)[:, None]
      sums, count = jnp.stack([jnp.sum(w * x, 0), jnp.sum(w * x * x, 0)]), jnp.sum(w)
      if self.axis_name is not None and not self.is_initializing():
        sums, count = jax.lax.psum((sums, count), self.axis_name)
      mean, mean_sq = sums / jnp.maximum(count, 1.0)
      var = jnp.maximum(mean_sq - mean * mean, 0.0)
      if not self.is_initializing():
        for stat, new in ((ra_mean, mean), (ra_var, var)):
          moved = self.momentum * stat.value + (1.0 - self.momentum) * new
          stat.value = jnp.where(count > 0, moved, stat.value)
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return jnp.where(valid[:, None], y, 0.0).astype(self.dtype)


class DSempre(nn.Module):
  """User and post branches into one Euclidean space.

  User branch: bag of clusters [n, K] -> Dense, ReLU, Dense, BN. Post branch:
  an image branch (ConvNet on "image" pixels, or the "image_features" as they
  are with image_input="features"; Dense, BN) and a text branch (mean word
  embedding of "tokens" under "text_mask"; Dense, BN), concatenated -> Dense.
  Both end with dropout and L2 normalisation. Users are encoded by their bag,
  not by index: num_users is part of the family's interface only.
  """
  num_users: int
  vocab_size: int
  embed_dim: int = 256
  user_hidden: int = 512
  word_dim: int = 300
  branch_dim: int = 512
  conv_channels: tuple = (32, 64, 128, 128, 256)
  pool_after: tuple = (0, 1)
  image_input: str = "pixels"     # or "features"
  dropout: float = 0.5
  bn_momentum: float = 0.9
  dtype: jnp.dtype = jnp.float32  # compute dtype; parameters stay float32
  axis_name: str | None = None

  def setup(self):
    encoders.check_image_input(self.image_input)
    dense = lambda n: nn.Dense(n, dtype=self.dtype)
    bn = lambda: MaskedBatchNorm(self.bn_momentum, axis_name=self.axis_name, dtype=self.dtype)
    self.user_hidden_proj, self.user_proj, self.user_bn = (
        dense(self.user_hidden), dense(self.embed_dim), bn())
    if self.image_input == "pixels":
      self.convnet = encoders.ConvNet(self.conv_channels, self.pool_after, self.dtype)
    self.image_proj, self.image_bn = dense(self.branch_dim), bn()
    self.word_embed = nn.Embed(self.vocab_size, self.word_dim, dtype=self.dtype)
    self.text_proj, self.text_bn = dense(self.branch_dim), bn()
    self.fuse = dense(self.embed_dim)
    self.drop = nn.Dropout(self.dropout)

  def _head(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    """Dropout (train mode only), then L2 normalisation: [n, D] unit rows."""
    return encoders.l2_normalize(self.drop(x, deterministic=not train))

  def _users(self, bag: jnp.ndarray, train: bool) -> jnp.ndarray:
    """Bag of clusters [n, K] -> [n, D]."""
    h = nn.relu(self.user_hidden_proj(bag.astype(self.dtype)))
    return self._head(self.user_bn(self.user_proj(h), None, train), train)

  def _posts(self, posts: Mapping[str, jnp.ndarray], train: bool) -> jnp.ndarray:
    """Post fields [n, ...] -> [n, D]; a missing branch is zeros, and so is
    the image branch of data without images (image_features [n, 0])."""
    if self.image_input == "pixels":
      image = self.convnet(posts["image"])
    else:
      image = posts["image_features"].astype(self.dtype)
    if image.shape[-1]:
      image = self.image_bn(self.image_proj(image), posts["image_mask"], train)
    else:
      image = jnp.zeros(image.shape[:-1] + (self.branch_dim,), self.dtype)
    mask = posts["text_mask"]
    w = mask[..., None].astype(self.dtype)
    words = jnp.sum(self.word_embed(posts["tokens"]) * w, axis=1)
    text = self.text_proj(words / jnp.maximum(jnp.sum(w, axis=1), 1.0))
    text = self.text_bn(text, mask.any(axis=-1), train)
    return self._head(self.fuse(jnp.concatenate([image, text], axis=-1)), train)

  def __call__(self, batch: Mapping, train: bool) -> dict[str, jnp.ndarray]:
    """Training batch -> {"user", *POST_ROLES}: [b, D] each.

    The posts of all roles go through the post branch together, so its
    BatchNorm statistics are those of every post of the batch.
    """
    keys = ("tokens", "text_mask", "image_mask", encoders.image_key(self.image_input))
    joined = {k: jnp.concatenate([batch[r][k] for r in POST_ROLES]) for k in keys}
    posts = jnp.split(self._posts(joined, train), len(POST_ROLES))
    return {"user": self._users(batch["user_bag"], train), **dict(zip(POST_ROLES, posts))}

  def embed_users(self, users: Mapping) -> dict[str, jnp.ndarray]:
    """{"user_bag": [n, K], ...} -> {"user": [n, D]} (eval mode)."""
    return {"user": self._users(users["user_bag"], False)}

  def embed_posts(self, posts: Mapping) -> jnp.ndarray:
    """Post fields [n, ...] -> [n, D] (eval mode)."""
    return self._posts(posts, False)

  def score(self, user_repr: Mapping, post_repr: jnp.ndarray) -> jnp.ndarray:
    """Aligned rows -> -d(u, p): [n] float32, higher = more preferred."""
    return -distance(user_repr["user"], post_repr)


def per_example_loss(out: Mapping, batch: Mapping, config: ml_collections.ConfigDict):
  """Eq. 4 per triplet: (loss [b], {"cross", "semantic"}: [b] each).

  out: DSempre.__call__'s embeddings; config: the job's config (reads
  config.model.margin and .semantic_weight). `batch` is not needed: every
  triplet counts.
  """
  del batch
  margin = config.model.margin
  cross = triplet_hinge(out["user"], out["pos"], out["neg"], margin)
  semantic = triplet_hinge(out["sem_anchor"], out["sem_pos"], out["sem_neg"], margin)
  return cross + config.model.semantic_weight * semantic, {"cross": cross, "semantic": semantic}




def build(config: ml_collections.ConfigDict, sizes: Mapping[str, int],
          axis_name: str | None = None) -> DSempre:
  """D-Sempre from `config.model`-style settings, sized for a dataset (sizes:
  num_users, vocab_size, ...)."""
  return DSempre(
      num_users=sizes["num_users"], vocab_size=sizes["vocab_size"],
      embed_dim=config.embed_dim,
      user_hidden=config.user_hidden, word_dim=config.word_dim,
      branch_dim=config.branch_dim, conv_channels=tuple(config.conv_channels),
      pool_after=tuple(config.pool_after), image_input=config.image_input,
      dropout=config.dropout, bn_momentum=config.bn_momentum,
      dtype=jnp.dtype(config.dtype), axis_name=axis_name)


DATA = triplets.DATA
init = triplets.init
loss_fn = triplets.make_loss_fn(per_example_loss)
