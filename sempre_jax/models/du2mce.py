"""How are the towers wired?

DU2MCE: three independent towers (text, image, user) into one D-dim space.
(The family models, D-Sempre, CDL and AMNL, live in modules of their own.)
"""

import os
from collections.abc import Mapping

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from input_pipeline import word2vec
from sempre_jax.models import encoders

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
        "image": self.embed_image(batch[image_key(self.image_input)]),
        "user": self.embed_user(batch["user"]),
    }
    if self.merge_content:
      has_text = batch["text_mask"].any(axis=-1, keepdims=True)
      has_image = batch["image_mask"].astype(bool)[:, None]
      emb["text"] = encoders.l2_normalize(jnp.where(has_text, emb["text"], 0.0)
                                          + jnp.where(has_image, emb["image"], 0.0))
    return emb


def image_key(image_input: str) -> str:
  """The batch key that holds the image input of this kind."""
  return "image_features" if image_input == "features" else "image"


def build_model(config: ml_collections.ConfigDict, metadata: Mapping) -> DU2MCE:
  """The model of `config.model` sized for a dataset's metadata."""
  return DU2MCE(
      num_users=metadata["num_users"], vocab_size=metadata["vocab_size"],
      embed_dim=config.embed_dim, word_dim=config.word_dim,
      user_dim=config.user_dim, text_widths=tuple(config.text_widths),
      text_filters=tuple(config.text_filters), image_input=config.image_input,
      dtype=jnp.dtype(config.dtype), merge_content=config.get("merge_content", False))


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
