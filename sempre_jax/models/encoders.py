"""How is one modality embedded?

Each encoder maps its input to the common space [B, D], L2-normalised, so a dot
product is the cosine similarity of the DU2MCE loss. `dtype` is the compute
dtype (bfloat16 for mixed precision); parameters stay float32 and every output
is normalised and returned in float32, so the loss is computed in float32.

On CPU with a dtype narrower than float32 (`uses_dots`), the text and pixel
convolutions and the projections are matrix products of operands rounded to
`dtype`, summed in float32 (`kim_conv_max`, `Conv`, `Dense`), forward and backward:
CPUs with bfloat16 dot instructions (avx512_bf16, through XLA:CPU's YNNPACK
kernels) run those up to 3x faster than float32, while XLA:CPU's bfloat16
convolutions and bfloat16-output dots run slower than float32. Those kernels
take a dot only when the contracted axis of its left operand is innermost in
memory (otherwise XLA computes it in float32), so the convolutions contract
windows [positions, w * E] on their last axis into feature-major outputs
[filters, positions], and a weight gradient contracted over the batch first
stores one operand transposed. Elsewhere (float32, where XLA:CPU's own convolution is
fastest; GPUs and TPUs, whose narrow convolutions are native) the encoders use
flax's layers. Both have the same parameters.
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def l2_normalize(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
  """x / ||x|| along the last axis, in float32 (zero vectors stay zero)."""
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def uses_dots(dtype) -> bool:
  """Whether the encoders compute in `dtype` with `kim_conv_max` and `Dense`
  rather than flax's nn.Conv and nn.Dense: dtypes narrower than float32, on CPU."""
  return jnp.dtype(dtype) != jnp.float32 and jax.default_backend() == "cpu"


def _dot(a: jnp.ndarray, b: jnp.ndarray, contract: tuple[int, int]) -> jnp.ndarray:
  """2-D a . b summed over a's axis contract[0] and b's axis contract[1], in float32."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                             preferred_element_type=jnp.float32)


def _transposed(x: jnp.ndarray) -> jnp.ndarray:
  """x [M, K] -> x^T [K, M], stored row-major (a plain transpose stays a layout
  change that XLA folds into the consuming dot, whose left operand then has its
  contracted axis outermost)."""
  barrier = jax.lax.optimization_barrier
  return barrier(barrier(x).T.reshape(-1)).reshape(x.shape[::-1])


def _varying_like(param: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """param cast to vary over the mesh axes x varies over (inside shard_map), as
  a custom VJP's gradient of it must; the cast's transpose sums the gradients."""
  varying = lambda a: jax.typeof(a).manual_axis_type.varying
  axes = tuple(sorted(varying(x) - varying(param)))
  return jax.lax.pcast(param, axes, to="varying") if axes else param


@jax.custom_vjp
def matmul(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """x [M, K] @ kernel [K, N] -> float32 [M, N], in x's dtype summed in float32.

  kernel (float32) is rounded to x's dtype. The gradient takes the same kind
  of products, the cotangent rounded to x's dtype; kernel's comes out float32.
  """
  return _dot(x, kernel.astype(x.dtype), (1, 0))


def _matmul_fwd(x, kernel):
  kernel = kernel.astype(x.dtype)
  return _dot(x, kernel, (1, 0)), (x, kernel)


def _matmul_bwd(residuals, g):
  x, kernel = residuals
  g = g.astype(x.dtype)
  return _dot(g, kernel, (1, 1)).astype(x.dtype), _dot(_transposed(x), g, (1, 0))


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _dense(features: int, dtype, name: str) -> nn.Module:
  """A projection: `Dense` where `uses_dots(dtype)`, else flax's nn.Dense."""
  if uses_dots(dtype):
    return Dense(features, dtype, name=name)
  return nn.Dense(features, dtype=dtype, name=name)


class Dense(nn.Module):
  """x [..., K] -> x @ kernel + bias [..., N] in float32, the product by
  `matmul` in `dtype`; parameters as flax's nn.Dense (kernel [K, N], bias [N])."""
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    y = matmul(x.reshape(-1, x.shape[-1]).astype(self.dtype), _varying_like(kernel, x))
    return y.reshape(x.shape[:-1] + (self.features,)) + bias


def kim_conv_max(x: jnp.ndarray, valid: jnp.ndarray, kernels: Sequence[jnp.ndarray],
                 biases: Sequence[jnp.ndarray], dtype) -> jnp.ndarray:
  """Kim's convolutions, max-pooled over the valid start positions: [B, sum n].

  x [B, L, E] float32 word vectors; valid [B, L] bool; per width w, kernel
  [w, E, n] and bias [n] (windows that run past the end see zero vectors).
  Each filter gives ReLU(max over valid t of sum_i x[t + i] . kernel[i] + bias),
  0 where no position is valid: the max of the ReLU'd convolution, as ReLU is
  monotone, so the backward pass keeps only the argmax. Products in `dtype`,
  summed in float32.
  """
  order = sorted(range(len(kernels)), key=lambda j: kernels[j].shape[0])
  pooled = _kim_conv_max(x, valid, tuple(_varying_like(kernels[j], x) for j in order),
                         tuple(_varying_like(biases[j], x) for j in order), jnp.dtype(dtype))
  blocks, start = {}, 0
  for j in order:
    blocks[j] = pooled[:, start:start + kernels[j].shape[-1]]
    start += kernels[j].shape[-1]
  return jnp.concatenate([blocks[j] for j in range(len(kernels))], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _kim_conv_max(x, valid, kernels, biases, dtype):
  """kim_conv_max with the kernels sorted by width."""
  return _kim_conv_max_fwd(x, valid, kernels, biases, dtype)[0]


def _kim_conv_max_fwd(x, valid, kernels, biases, dtype):
  (b, length, e), width = x.shape, kernels[-1].shape[0]
  x = jnp.pad(x.astype(dtype), ((0, 0), (0, width - 1), (0, 0)))
  # Column i * E + e of window (b, t) is x[b, t + i, e]; width w reads the first w * E.
  # (Stacked, not concatenated: XLA:CPU concatenates bfloat16 through float32, 3x slower.)
  windows = jnp.stack([x[:, i:i + length] for i in range(width)], axis=2)
  windows = windows.reshape(b * length, width * e)
  kernels = tuple(k.astype(dtype) for k in kernels)
  pooled, argmax = [], []
  for kernel, bias in zip(kernels, biases):
    w, _, n = kernel.shape
    h = _dot(_transposed(kernel.reshape(w * e, n)), windows[:, :w * e], (1, 1))
    h = jnp.where(valid, h.reshape(n, b, length), -jnp.inf)           # [n, B, L]
    argmax.append(jnp.argmax(h, axis=-1))
    top = jnp.take_along_axis(h, argmax[-1][..., None], axis=-1)[..., 0]
    pooled.append(jax.nn.relu(top + bias[:, None]))                     # [n, B]
  pooled = jnp.concatenate(pooled, 0)
  return _transposed(pooled), (windows, kernels, jnp.concatenate(argmax, 0), pooled > 0)


def _kim_conv_max_bwd(dtype, residuals, d_pooled):
  windows, kernels, argmax, active = residuals
  (_, b), (_, e, _), width = argmax.shape, kernels[0].shape, kernels[-1].shape[0]
  length = windows.shape[0] // b
  d = jnp.where(active, d_pooled.T, 0.0)                                 # [N, B]
  g = jnp.where(jnp.arange(length) == argmax[..., None], d[..., None], 0.0)
  g = g.astype(dtype).reshape(d.shape[0], -1)                            # [N, B L]
  starts = [0]
  for k in kernels:
    starts.append(starts[-1] + k.shape[-1])
  d_kernels = tuple(_transposed(_dot(g[s:s + k.shape[-1]], windows[:, :k.shape[0] * e], (1, 0)))
                    .reshape(k.shape) for k, s in zip(kernels, starts))
  d_biases = tuple(d[s:s + k.shape[-1]].sum(axis=1) for k, s in zip(kernels, starts))
  d_xt = 0.0
  for i in range(width):          # shift i: the kernels wider than i, a suffix of g's rows
    first = next(j for j, k in enumerate(kernels) if k.shape[0] > i)
    part = _dot(jnp.concatenate([k[i] for k in kernels[first:]], axis=1), g[starts[first]:],
                (1, 0)).reshape(e, b, length)
    d_xt = d_xt + jnp.pad(part, ((0, 0), (0, 0), (i, 0)))[..., :length]
  d_x = _transposed(d_xt.reshape(e, b * length)).reshape(b, length, e)
  return d_x, None, d_kernels, d_biases


_kim_conv_max.defvjp(_kim_conv_max_fwd, _kim_conv_max_bwd)


class _ConvParams(nn.Module):
  """The parameters of one width of Kim's convolutions, as flax's nn.Conv
  names and initialises them: kernel [width, E, n], bias [n]."""
  width: int
  features: int

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    return (self.param("kernel", nn.initializers.lecun_normal(),
                       (self.width, in_features, self.features)),
            self.param("bias", nn.initializers.zeros_init(), (self.features,)))


class FeatureImageEncoder(nn.Module):
  """Frozen-CNN features [B, F] -> Dense -> [B, D]; F = 0 (data without
  images, e.g. text only) -> zeros, no parameters."""
  embed_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jnp.ndarray) -> jnp.ndarray:
    if features.shape[-1] == 0:
      return jnp.zeros(features.shape[:-1] + (self.embed_dim,), jnp.float32)
    return l2_normalize(_dense(self.embed_dim, self.dtype, "proj")(features))


IMAGE_INPUTS = ("features", "pixels")


def check_image_input(image_input: str) -> str:
  """model.image_input, validated: "features" (frozen-CNN vectors) or "pixels"."""
  if image_input not in IMAGE_INPUTS:
    raise ValueError(f"model.image_input must be one of {IMAGE_INPUTS}, got {image_input!r}")
  return image_input


def image_key(image_input: str) -> str:
  """The batch key that holds the image input of this kind."""
  return "image_features" if check_image_input(image_input) == "features" else "image"


class Conv(nn.Module):
  """x [B, H, W, C] -> a size x size convolution, SAME padding, + bias
  [B, H, W, N] in float32, as one `matmul` of the unfolded windows
  [B * H * W, size * size * C] (ordered row, column, channel) by the kernel in
  `dtype`; parameters as flax's nn.Conv (kernel [size, size, C, N], bias [N])."""
  features: int
  size: int = 3
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, h, w, c = x.shape
    k = self.size
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, c, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    x = x.astype(self.dtype)
    padded = jnp.pad(x, ((0, 0), (k // 2, (k - 1) // 2), (k // 2, (k - 1) // 2), (0, 0)))
    windows = jnp.concatenate([padded[:, i:i + h, j:j + w] for i in range(k) for j in range(k)],
                              axis=-1)
    y = matmul(windows.reshape(-1, k * k * c), _varying_like(kernel.reshape(k * k * c, -1), x))
    return y.reshape(b, h, w, self.features) + bias


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
      conv = Conv(c, 3, self.dtype, name=f"conv{i}") if uses_dots(self.dtype) else \
          nn.Conv(c, (3, 3), dtype=self.dtype, name=f"conv{i}")
      x = nn.relu(conv(x).astype(self.dtype))
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
    return l2_normalize(_dense(self.embed_dim, self.dtype, "proj")(x))


class KimCNNTextEncoder(nn.Module):
  """Kim's sentence CNN: tokens [B, L] -> [B, D].

  Word embeddings [V, word_dim]; parallel 1-D convolutions of the given widths
  (ReLU), max over the time steps that start inside the text, concatenated,
  then a Dense projection. Padding positions contribute zero vectors.
  Parameters as flax's nn.Conv names them: conv{w}/kernel [w, word_dim, n].
  """
  vocab_size: int
  embed_dim: int
  word_dim: int = 300
  widths: Sequence[int] = (2, 3, 4)
  filters: Sequence[int] = (512, 256, 256)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    x = nn.Embed(self.vocab_size, self.word_dim, name="word_embed")(tokens) * mask[..., None]
    if uses_dots(self.dtype):
      params = [_ConvParams(w, n, name=f"conv{w}")(self.word_dim)
                for w, n in zip(self.widths, self.filters)]
      h = kim_conv_max(x, mask.astype(bool), [k for k, _ in params], [b for _, b in params],
                       self.dtype)
    else:
      pooled = []
      for width, n in zip(self.widths, self.filters):
        padded = jnp.pad(x, ((0, 0), (0, width - 1), (0, 0)))
        h = nn.relu(nn.Conv(n, (width,), padding="VALID", dtype=self.dtype,
                            name=f"conv{width}")(padded))
        h = jnp.where(mask[..., None], h, -jnp.inf).max(axis=1)     # [B, n]
        pooled.append(jnp.where(jnp.isfinite(h), h, 0.0))          # empty texts -> 0
      h = jnp.concatenate(pooled, axis=-1)
    return l2_normalize(_dense(self.embed_dim, self.dtype, "proj")(h))


class UserEncoder(nn.Module):
  """User index [B] -> embedding table [K, user_dim] -> Dense -> [B, D]."""
  num_users: int
  embed_dim: int
  user_dim: int = 300
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, users: jnp.ndarray) -> jnp.ndarray:
    x = nn.Embed(self.num_users, self.user_dim, name="user_embed")(users)
    return l2_normalize(_dense(self.embed_dim, self.dtype, "proj")(x))


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
