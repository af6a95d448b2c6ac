"""How is one modality embedded?

Each encoder maps its input to the common space [B, D], L2-normalised, so a dot
product is the cosine similarity of the DU2MCE loss. `dtype` is the compute
dtype (bfloat16 for mixed precision); parameters stay float32 and every output
is normalised and returned in float32, so the loss is computed in float32.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


def l2_normalize(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
  """x / ||x|| along the last axis, in float32 (zero vectors stay zero)."""
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class FeatureImageEncoder(nn.Module):
  """Frozen-CNN features [B, F] -> Dense -> [B, D]; F = 0 (data without
  images, e.g. text only) -> zeros, no parameters."""
  embed_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jnp.ndarray) -> jnp.ndarray:
    if features.shape[-1] == 0:
      return jnp.zeros(features.shape[:-1] + (self.embed_dim,), jnp.float32)
    return l2_normalize(nn.Dense(self.embed_dim, dtype=self.dtype, name="proj")(features))


IMAGE_INPUTS = ("features", "pixels")


def check_image_input(image_input: str) -> str:
  """model.image_input, validated: "features" (frozen-CNN vectors) or "pixels"."""
  if image_input not in IMAGE_INPUTS:
    raise ValueError(f"model.image_input must be one of {IMAGE_INPUTS}, got {image_input!r}")
  return image_input


def image_key(image_input: str) -> str:
  """The batch key that holds the image input of this kind."""
  return "image_features" if check_image_input(image_input) == "features" else "image"


class ConvNet(nn.Module):
  """Pixels uint8 [B, H, W, 3] -> conv 3x3 + ReLU per entry of `channels`, a
  2x2 max-pool after the layers listed in `pool_after`, global mean pool:
  [B, channels[-1]]."""
  channels: Sequence[int]
  pool_after: Sequence[int]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jnp.ndarray) -> jnp.ndarray:
    x = pixels.astype(self.dtype) / 127.5 - 1.0
    for i, c in enumerate(self.channels):
      x = nn.relu(nn.Conv(c, (3, 3), dtype=self.dtype, name=f"conv{i}")(x))
      if i in self.pool_after:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    return jnp.mean(x, axis=(1, 2))


class PixelImageEncoder(nn.Module):
  """A small CNN for RGB pixels uint8 [B, H, W, 3] -> Dense -> [B, D] (a
  max-pool after every conv layer but the last)."""
  embed_dim: int
  channels: Sequence[int] = (32, 64, 128)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jnp.ndarray) -> jnp.ndarray:
    x = ConvNet(self.channels, tuple(range(len(self.channels) - 1)), self.dtype,
                name="convnet")(pixels)
    return l2_normalize(nn.Dense(self.embed_dim, dtype=self.dtype, name="proj")(x))


class KimCNNTextEncoder(nn.Module):
  """Kim's sentence CNN: tokens [B, L] -> [B, D].

  Word embeddings [V, word_dim]; parallel 1-D convolutions of the given widths
  (ReLU), max over the time steps that start inside the text, concatenated,
  then a Dense projection. Padding positions contribute zero vectors.
  """
  vocab_size: int
  embed_dim: int
  word_dim: int = 300
  widths: Sequence[int] = (2, 3, 4)
  filters: Sequence[int] = (512, 256, 256)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    x = nn.Embed(self.vocab_size, self.word_dim, dtype=self.dtype, name="word_embed")(tokens)
    x = x * mask[..., None].astype(self.dtype)
    pooled = []
    for width, n in zip(self.widths, self.filters):
      padded = jnp.pad(x, ((0, 0), (0, width - 1), (0, 0)))
      h = nn.relu(nn.Conv(n, (width,), padding="VALID", dtype=self.dtype,
                          name=f"conv{width}")(padded))
      h = jnp.where(mask[..., None], h, -jnp.inf).max(axis=1)       # [B, n]
      pooled.append(jnp.where(jnp.isfinite(h), h, 0.0))            # empty texts -> 0
    h = jnp.concatenate(pooled, axis=-1)
    return l2_normalize(nn.Dense(self.embed_dim, dtype=self.dtype, name="proj")(h))


class UserEncoder(nn.Module):
  """User index [B] -> embedding table [K, user_dim] -> Dense -> [B, D]."""
  num_users: int
  embed_dim: int
  user_dim: int = 300
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, users: jnp.ndarray) -> jnp.ndarray:
    x = nn.Embed(self.num_users, self.user_dim, dtype=self.dtype, name="user_embed")(users)
    return l2_normalize(nn.Dense(self.embed_dim, dtype=self.dtype, name="proj")(x))


class LSTMTextEncoder(nn.Module):
  """An LSTM reading a text: tokens [..., L] -> its last hidden state [..., H].

  Word embeddings [V, word_dim] into flax's LSTM cell. Only the positions of
  `mask` are read, in their order (they are moved to the front first, so where
  the padding sits changes nothing); an empty text gives zeros. The state is
  neither projected nor normalised.
  """
  vocab_size: int
  hidden_dim: int
  word_dim: int = 300
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    lead, length = tokens.shape[:-1], tokens.shape[-1]
    tokens, mask = tokens.reshape(-1, length), mask.reshape(-1, length).astype(bool)
    order = jnp.argsort(~mask, axis=-1, stable=True)              # valid tokens first
    tokens = jnp.take_along_axis(tokens, order, axis=-1)
    lengths = mask.sum(axis=-1)
    x = nn.Embed(self.vocab_size, self.word_dim, dtype=self.dtype, name="word_embed")(tokens)
    cell = nn.OptimizedLSTMCell(self.hidden_dim, dtype=self.dtype, name="lstm")
    # The zero initial state is derived from x, so inside shard_map it varies
    # over the devices like x does (a scan's carry must keep its type).
    zeros = jnp.zeros_like(x[:, 0, :1], jnp.float32) * jnp.zeros([self.hidden_dim])
    (_, h), _ = nn.RNN(cell)(x, initial_carry=(zeros, zeros), seq_lengths=lengths,
                             return_carry=True)
    h = jnp.where(lengths[:, None] > 0, h.astype(jnp.float32), 0.0)
    return h.reshape(lead + (self.hidden_dim,))
