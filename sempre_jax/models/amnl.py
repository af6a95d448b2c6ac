"""How does AMNL rank the posts a user may re-share?

AMNL (Zhao et al., IJCAI 2018, "Attentional Image Retweet Modeling via
Multi-Faceted Ranking Network Learning"): a post is one multimodal vector z, a
user p is a vector u_p, and p's followees q vote on p's taste with attention:

  post       z = 1.7159 tanh(2/3 (W_i x + W_d y))
             x: image features (zeros without an image); y: each sentence
             through word embeddings and an LSTM (last state), max-pooled over
             the sentences
  attention  s_pq = h . tanh(W_s u_p + W_n u_q + b),
             a_pq = softmax of s_pq over p's followees q
  ranking    F_p(z) = (u_p . z) sum_q a_pq (u_q . z) = (u_p . z)(v_p . z),
             v_p = sum_q a_pq u_q  (a_pq does not depend on z)
  loss       max(0, c - F_p(z+) + F_p(z-)) per (user, re-shared post z+,
             followee's post not re-shared z-); L2 is left to the trainer

Where this departs from or fills in the paper: our records hold one 20-token
text without sentence boundaries, so a post is one sentence (tokens [n, L]; [n, S, L] is
max-pooled over its non-empty sentences, and a post without text has y = 0).
A user without followees has no attention term: F_p(z) = u_p . z. The
attention's hidden size is D. `modalities` "image" drops W_d y and "text" drops
W_i x (the paper's single-modality variants).
"""

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sempre_jax.models import triplets, encoders


MODALITIES = ("both", "image", "text")
POST_KEYS = ("tokens", "text_mask", "image_features", "image_mask")
TANH_SCALE, TANH_SLOPE = 1.7159, 2.0 / 3.0    # LeCun's scaled tanh
NO_ATTENTION = -1e9                            # attention score of a padding slot


class AMNL(nn.Module):
  """User table, followee attention and the multimodal post network."""
  num_users: int
  vocab_size: int
  embed_dim: int = 256
  lstm_dim: int = 256
  word_dim: int = 300
  modalities: str = "both"
  dtype: jnp.dtype = jnp.float32   # compute dtype; parameters stay float32
  axis_name: str | None = None     # unused: AMNL has no BatchNorm

  def setup(self):
    if self.modalities not in MODALITIES:
      raise ValueError(f"model.modalities must be one of {MODALITIES}, "
                       f"got {self.modalities!r}")
    dense = lambda n, bias=False: nn.Dense(n, use_bias=bias, dtype=self.dtype)
    self.user_embed = nn.Embed(self.num_users, self.embed_dim, dtype=self.dtype)
    self.att_user = dense(self.embed_dim)                 # W_s
    self.att_followee = dense(self.embed_dim, bias=True)  # W_n, b
    self.att_h = dense(1)                                 # h
    if self.modalities != "text":
      self.image_proj = dense(self.embed_dim)             # W_i
    if self.modalities != "image":
      self.text = encoders.LSTMTextEncoder(self.vocab_size, self.lstm_dim,
                                           self.word_dim, dtype=self.dtype)
      self.text_proj = dense(self.embed_dim)              # W_d

  def embed_text(self, tokens: jnp.ndarray, text_mask: jnp.ndarray) -> jnp.ndarray:
    """y [n, lstm_dim]: tokens/text_mask [n, L] or [n, S, L], max over sentences."""
    if tokens.ndim == 2:
      tokens, text_mask = tokens[:, None], text_mask[:, None]
    h = self.text(tokens, text_mask)                      # [n, S, H]
    present = text_mask.any(axis=-1)[..., None]           # [n, S, 1]
    y = jnp.where(present, h, -jnp.inf).max(axis=1)
    return jnp.where(present.any(axis=1), y, 0.0)

  def embed_posts(self, posts: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
    """z [n, D] float32 from the post fields."""
    pre = jnp.zeros((posts["tokens"].shape[0], self.embed_dim), jnp.float32)
    if self.modalities != "text" and posts["image_features"].shape[-1]:
      x = jnp.where(posts["image_mask"][:, None], posts["image_features"], 0.0)
      pre = pre + self.image_proj(x)
    if self.modalities != "image":
      pre = pre + self.text_proj(self.embed_text(posts["tokens"], posts["text_mask"]))
    return TANH_SCALE * jnp.tanh(TANH_SLOPE * pre)

  def embed_users(self, users: Mapping[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """{"user": u [n, D], "facet": v [n, D], "attention": a [n, Fq],
    "has_followees": [n] bool} from "user" [n] and "followees" [n, Fq] (-1 pads)."""
    followees = users["followees"]
    valid = followees >= 0
    u = self.user_embed(users["user"])
    u_q = self.user_embed(jnp.maximum(followees, 0))                  # [n, Fq, D]
    hidden = jnp.tanh(self.att_user(u)[:, None, :] + self.att_followee(u_q))
    s = jnp.where(valid, self.att_h(hidden)[..., 0].astype(jnp.float32), NO_ATTENTION)
    a = jax.nn.softmax(s, axis=-1) * valid                            # 0 on padding
    u_q = u_q.astype(jnp.float32)
    return {"user": u.astype(jnp.float32),
            "facet": jnp.einsum("nq,nqd->nd", a, u_q),
            "attention": a, "has_followees": valid.any(axis=-1)}

  def score(self, user_repr: Mapping[str, jnp.ndarray], post_repr: jnp.ndarray) -> jnp.ndarray:
    """F_p(z) [n] of aligned rows: (u . z)(v . z), or u . z without followees."""
    uz = jnp.sum(user_repr["user"] * post_repr, axis=-1)
    vz = jnp.sum(user_repr["facet"] * post_repr, axis=-1)
    return uz * jnp.where(user_repr["has_followees"], vz, 1.0)

  def __call__(self, batch: Mapping, train: bool) -> dict[str, jnp.ndarray]:
    """{"pos_score", "neg_score"}: F_p of each triplet's posts [b]. `train` is
    unused (no dropout, no BatchNorm)."""
    users = self.embed_users(batch)
    b = batch["user"].shape[0]
    posts = {k: jnp.concatenate([batch["pos"][k], batch["neg"][k]])
             for k in POST_KEYS if k in batch["pos"]}
    z = self.embed_posts(posts)                                       # one pass
    return {"pos_score": self.score(users, z[:b]), "neg_score": self.score(users, z[b:])}


def per_example_loss(out: Mapping[str, jnp.ndarray], batch: Mapping,
                     config: ml_collections.ConfigDict):
  """Hinge max(0, c - F(z+) + F(z-)) [b] with c = config.model.margin;
  terms {"rank": the same [b]}."""
  del batch
  rank = jax.nn.relu(config.model.margin - out["pos_score"] + out["neg_score"])
  return rank, {"rank": rank}




def build(config: ml_collections.ConfigDict, sizes: Mapping[str, int],
          axis_name: str | None = None) -> AMNL:
  """AMNL from `config.model`-style settings, sized for a dataset (sizes:
  num_users, vocab_size, ...)."""
  return AMNL(num_users=sizes["num_users"], vocab_size=sizes["vocab_size"],
              embed_dim=config.embed_dim,
              lstm_dim=config.lstm_dim, word_dim=config.word_dim,
              modalities=config.modalities, dtype=jnp.dtype(config.dtype),
              axis_name=axis_name)


DATA = triplets.DATA
init = triplets.init
loss_fn = triplets.make_loss_fn(per_example_loss)
