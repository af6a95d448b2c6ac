"""How does DU2MCE embed a post's text, its image and its author?

Three independent towers (text, image, user) into one D-dim space, trained on
batches of posts with the pairwise hinge mixture of sempre_jax/losses.py over
the global batch (the ModelDef of sempre_jax/models/__init__.py).
"""

import os
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from input_pipeline import word2vec
from sempre_jax import losses, mesh as mesh_lib
from sempre_jax.models import encoders

DATA = "posts"
MODALITIES = ("text", "image", "user")


class DU2MCE(nn.Module):
  """Text, image and user towers; `__call__` embeds every modality of a batch."""
  num_users: int
  vocab_size: int
  embed_dim: int = 1024
  word_dim: int = 300
  user_dim: int = 300
  text_widths: tuple = (2, 3, 4)
  text_filters: tuple = (512, 256, 256)
  image_input: str = "features"   # or "pixels"
  dtype: jnp.dtype = jnp.float32  # compute dtype; parameters stay float32
  merge_content: bool = False     # Merged-Modality baseline: "text" = the post's content

  def setup(self):
    self.text = encoders.KimCNNTextEncoder(
        self.vocab_size, self.embed_dim, self.word_dim, self.text_widths,
        self.text_filters, dtype=self.dtype)
    if encoders.check_image_input(self.image_input) == "features":
      self.image = encoders.FeatureImageEncoder(self.embed_dim, dtype=self.dtype)
    else:
      self.image = encoders.PixelImageEncoder(self.embed_dim, dtype=self.dtype)
    self.user = encoders.UserEncoder(self.num_users, self.embed_dim, self.user_dim,
                                     dtype=self.dtype)

  def embed_text(self, tokens, text_mask):
    return self.text(tokens, text_mask)

  def embed_image(self, image):
    return self.image(image)

  def embed_user(self, users):
    return self.user(users)

  def __call__(self, batch: Mapping[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """Batch dict -> {"text", "image", "user"}: [B, D] each.

    With merge_content, "text" is the post's content vector: the normalised
    sum of its text and image embeddings (a missing modality adds zeros).
    """
    emb = {
        "text": self.embed_text(batch["tokens"], batch["text_mask"]),
        "image": self.embed_image(batch[encoders.image_key(self.image_input)]),
        "user": self.embed_user(batch["user"]),
    }
    if self.merge_content:
      has_text = batch["text_mask"].any(axis=-1, keepdims=True)
      has_image = batch["image_mask"].astype(bool)[:, None]
      emb["text"] = encoders.l2_normalize(jnp.where(has_text, emb["text"], 0.0)
                                          + jnp.where(has_image, emb["image"], 0.0))
    return emb


def build(config: ml_collections.ConfigDict, sizes: Mapping[str, int],
          axis_name: str | None = None) -> DU2MCE:
  """The model of `config.model` sized for a dataset (sizes: num_users,
  vocab_size); the towers need no collectives (`axis_name` unused)."""
  del axis_name
  return DU2MCE(
      num_users=sizes["num_users"], vocab_size=sizes["vocab_size"],
      embed_dim=config.embed_dim, word_dim=config.word_dim,
      user_dim=config.user_dim, text_widths=tuple(config.text_widths),
      text_filters=tuple(config.text_filters), image_input=config.image_input,
      dtype=jnp.dtype(config.dtype), merge_content=config.get("merge_content", False))


def init(module: DU2MCE, rng, example: Mapping, config: ml_collections.ConfigDict,
         data_dir: str) -> dict:
  """Random towers; with config.model.init_from_word2vec (the paper, section
  4.3) the word and user tables come from the data's word2vec_init.npz, which
  must exist."""
  params = jax.jit(module.init)(rng, example)["params"]
  if config.model.init_from_word2vec:
    if not os.path.exists(os.path.join(data_dir, word2vec.INIT_FILE)):
      raise FileNotFoundError(
          f"{os.path.join(data_dir, word2vec.INIT_FILE)} not found, but "
          "model.init_from_word2vec=True: prepare the data with --word2vec_dim="
          f"{config.model.word_dim}, or set --config.model.init_from_word2vec=False")
    params = init_from_word2vec(params, data_dir)
  return {"params": params}


def loss_fn(module: DU2MCE, config: ml_collections.ConfigDict,
            loss: ml_collections.ConfigDict):
  """loss_fn(variables, local batch, rng) -> (local share of Eq. 1, metrics, {})."""
  def fn(variables, batch, rng):
    del rng
    value, metrics = losses.du2mce_loss(
        module.apply(variables, batch), batch, lambdas=(loss.l1, loss.l2),
        margin=loss.margin, mining=loss.mining, directions=loss.directions,
        axis_name=mesh_lib.AXIS,
        candidate_chunk=loss.candidate_chunk, content_of_posts=module.merge_content)
    return value, metrics, {}
  return fn


def init_from_word2vec(params: Mapping, data_dir: str) -> dict:
  """Params with word and user embeddings from `data_dir`/word2vec_init.npz.

  words [V, word_dim] -> params["text"]["word_embed"]["embedding"] and users
  [U, user_dim] -> params["user"]["user_embed"]["embedding"]; the rest is kept.
  """
  path = os.path.join(data_dir, word2vec.INIT_FILE)
  with np.load(path) as z:
    tables = {("text", "word_embed"): z["words"], ("user", "user_embed"): z["users"]}
  out = {k: dict(v) for k, v in params.items()}
  for (tower, name), table in tables.items():
    old = params[tower][name]["embedding"]
    if table.shape != old.shape:
      raise ValueError(
          f"{path}: {name} is {list(table.shape)} but the model's is {list(old.shape)}: "
          "set model.word_dim/user_dim to the Word2Vec size (launch/prepare_data.py "
          "--word2vec_dim) or model.init_from_word2vec=False")
    out[tower][name] = {**params[tower][name], "embedding": jnp.asarray(table, old.dtype)}
  return out
