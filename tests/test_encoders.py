"""Do the text convolutions and projections compute what flax's layers do?

On CPU in bfloat16 the encoders compute Kim's convolutions as dots over
unfolded windows and the projections with their own VJPs (bfloat16 products
summed in float32); these tests hold them to flax's nn.Conv / nn.Dense in
float32, and to float32 on bfloat16-rounded operands in bfloat16.
"""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from sempre_jax.models import encoders

BF16 = jnp.bfloat16


def _inputs(widths, filters, batch=6, length=9, dim=10, seed=0):
  """Word vectors [B, L, E] with an empty and a full text, valid [B, L], and
  random kernels [w, E, n] and biases [n]."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, length, batch)
  lengths[:2] = 0, length
  valid = np.arange(length)[None] < lengths[:, None]
  x = rng.normal(size=(batch, length, dim)).astype(np.float32) * valid[..., None]
  kernels = [rng.normal(size=(w, dim, n)).astype(np.float32) / np.sqrt(w * dim)
             for w, n in zip(widths, filters)]
  biases = [0.3 * rng.normal(size=n).astype(np.float32) for n in filters]
  return jnp.asarray(x), jnp.asarray(valid), kernels, biases


def _flax_conv_max(x, valid, kernels, biases):
  """The reference: per width, flax nn.Conv (VALID) over x padded with w - 1 zero
  vectors, ReLU, max over the valid positions (0 if none), concatenated."""
  pooled = []
  for k, b in zip(kernels, biases):
    padded = jnp.pad(x, ((0, 0), (0, k.shape[0] - 1), (0, 0)))
    conv = nn.Conv(k.shape[-1], (k.shape[0],), padding="VALID")
    h = nn.relu(conv.apply({"params": {"kernel": k, "bias": b}}, padded))
    h = jnp.where(valid[..., None], h, -jnp.inf).max(axis=1)
    pooled.append(jnp.where(jnp.isfinite(h), h, 0.0))
  return jnp.concatenate(pooled, axis=-1)


def _grads(f, x, kernels, biases, weights):
  return jax.grad(lambda *a: jnp.sum(f(*a) * weights), argnums=(0, 1, 2))(x, kernels, biases)


@pytest.mark.parametrize("widths,filters", [((2, 3, 4), (8, 5, 5)), ((3, 1, 2), (4, 6, 5))])
def test_unfolded_window_conv_equals_flax_conv_in_float32(widths, filters):
  x, valid, kernels, biases = _inputs(widths, filters)
  ours = lambda x, k, b: encoders.kim_conv_max(x, valid, k, b, jnp.float32)
  ref = lambda x, k, b: _flax_conv_max(x, valid, k, b)
  out = jax.jit(ours)(x, kernels, biases)
  assert out.dtype == jnp.float32 and out.shape == (x.shape[0], sum(filters))
  np.testing.assert_allclose(out, ref(x, kernels, biases), atol=1e-5, rtol=1e-5)
  assert np.all(np.asarray(out)[0] == 0)                       # the empty text
  weights = jnp.asarray(np.random.default_rng(1).normal(size=out.shape), jnp.float32)
  for g, g_ref in zip(jax.tree.leaves(_grads(jax.jit(ours), x, kernels, biases, weights)),
                      jax.tree.leaves(_grads(ref, x, kernels, biases, weights))):
    np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-5)


def test_bfloat16_conv_is_float32_of_bfloat16_operands():
  """bfloat16: the products of bfloat16-rounded words and kernels summed in
  float32; gradients within bfloat16 rounding of the cotangent, in float32."""
  x, valid, kernels, biases = _inputs((2, 3, 4), (8, 5, 5))
  rounded = lambda t: jax.tree.map(lambda a: a.astype(BF16).astype(jnp.float32), t)
  ours = lambda x, k, b: encoders.kim_conv_max(x, valid, k, b, BF16)
  ref = lambda x, k, b: _flax_conv_max(rounded(x), valid, rounded(k), b)
  out = jax.jit(ours)(x, kernels, biases)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref(x, kernels, biases), atol=1e-5, rtol=1e-5)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=out.shape), jnp.float32)
  for g, g_ref in zip(jax.tree.leaves(_grads(jax.jit(ours), x, kernels, biases, weights)),
                      jax.tree.leaves(_grads(ref, x, kernels, biases, weights))):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, g_ref, atol=1e-2 * np.abs(g_ref).max())


def test_dense_equals_flax_dense_and_keeps_its_parameters():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 7)), jnp.float32)
  ours, ref = encoders.Dense(5), nn.Dense(5)
  params = ours.init(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, params, ref.init(jax.random.key(0), x))
  params = jax.tree.map(lambda a: a + 0.1, params)
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=1e-6)
  g = jax.grad(lambda p, x: jnp.sum(jnp.sin(ours.apply(p, x))), argnums=(0, 1))(params, x)
  g_ref = jax.grad(lambda p, x: jnp.sum(jnp.sin(ref.apply(p, x))), argnums=(0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g, g_ref)


def test_pixel_conv_equals_flax_conv_and_keeps_its_parameters():
  """The unfolded-window 3x3 convolution: flax's nn.Conv (SAME) in float32,
  forward and gradients; in bfloat16, float32 on bfloat16-rounded operands."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 4, 3)), jnp.float32)
  ours, ref = encoders.Conv(6), nn.Conv(6, (3, 3))
  params = ours.init(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, params, ref.init(jax.random.key(0), x))
  params = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), params)
  out = jax.jit(ours.apply)(params, x)
  assert out.dtype == jnp.float32 and out.shape == (2, 5, 4, 6)
  np.testing.assert_allclose(out, ref.apply(params, x), atol=1e-5)
  loss = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x)))
  g = jax.grad(loss(ours.apply), argnums=(0, 1))(params, x)
  g_ref = jax.grad(loss(ref.apply), argnums=(0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g, g_ref)

  rounded = lambda t: jax.tree.map(lambda a: a.astype(BF16).astype(jnp.float32), t)
  bf16 = ours.clone(dtype=BF16)
  kernel_rounded = {"params": {**params["params"], "kernel": rounded(params["params"]["kernel"])}}
  np.testing.assert_allclose(jax.jit(bf16.apply)(params, x),
                             ref.apply(kernel_rounded, rounded(x)), atol=1e-5)
  g = jax.grad(loss(bf16.apply))(params, x)
  g_ref = jax.grad(loss(ref.apply))(kernel_rounded, rounded(x))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-2 * np.abs(b).max()),
               g, g_ref)


class _FlaxKimCNN(nn.Module):
  """The text encoder written with flax's layers (the reference)."""
  vocab_size: int
  embed_dim: int
  word_dim: int
  widths: tuple
  filters: tuple

  @nn.compact
  def __call__(self, tokens, mask):
    x = nn.Embed(self.vocab_size, self.word_dim, name="word_embed")(tokens) * mask[..., None]
    pooled = []
    for w, n in zip(self.widths, self.filters):
      h = nn.relu(nn.Conv(n, (w,), padding="VALID", name=f"conv{w}")(
          jnp.pad(x, ((0, 0), (0, w - 1), (0, 0)))))
      h = jnp.where(mask[..., None], h, -jnp.inf).max(axis=1)
      pooled.append(jnp.where(jnp.isfinite(h), h, 0.0))
    return encoders.l2_normalize(nn.Dense(self.embed_dim, name="proj")(
        jnp.concatenate(pooled, -1)))


def test_text_encoder_keeps_flax_parameter_tree_and_outputs():
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, 30, (5, 8)))
  mask = jnp.asarray(np.arange(8)[None] < np.array([0, 3, 8, 5, 1])[:, None])
  args = dict(vocab_size=30, embed_dim=6, word_dim=10, widths=(2, 3, 4), filters=(8, 4, 4))
  ours, ref = encoders.KimCNNTextEncoder(**args, dtype=BF16), _FlaxKimCNN(**args)
  assert encoders.uses_dots(BF16) and not encoders.uses_dots(jnp.float32)   # on CPU
  params = ours.init(jax.random.key(0), tokens, mask)
  jax.tree.map(np.testing.assert_array_equal, params, ref.init(jax.random.key(0), tokens, mask))
  params = jax.tree.map(lambda a: a + 0.05 * rng.normal(size=a.shape).astype(np.float32), params)
  expected = ref.apply(params, tokens, mask)
  np.testing.assert_allclose(ours.apply(params, tokens, mask), expected, atol=2e-2)
  np.testing.assert_allclose(ours.clone(dtype=jnp.float32).apply(params, tokens, mask), expected,
                             atol=1e-6)


def _equations(jaxpr, primitive: str):
  """The equations of `primitive` in jaxpr and its sub-jaxprs."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == primitive:
      yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _equations(sub, primitive)


def test_bfloat16_towers_take_only_bfloat16_products():
  """Every product of the text tower and a projection, forward and backward,
  has bfloat16 operands and a float32 result."""
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, 30, (4, 6)))
  mask = jnp.asarray(np.arange(6)[None] < np.array([2, 6, 3, 4])[:, None])
  model = encoders.KimCNNTextEncoder(30, 6, word_dim=10, filters=(8, 4, 4), dtype=BF16)
  params = model.init(jax.random.key(0), tokens, mask)
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(model.apply(p, tokens, mask) ** 3)))(params)
  found = list(_equations(jaxpr.jaxpr, "dot_general"))
  assert len(found) == 3 + 3 + 4 + 3     # widths x (forward, dW), dX per shift, the Dense
  for eqn in found:
    assert [v.aval.dtype for v in eqn.invars] == [BF16, BF16], eqn
    assert eqn.outvars[0].aval.dtype == jnp.float32, eqn


def test_bfloat16_pixel_tower_takes_only_bfloat16_products():
  """The pixel CNN in bfloat16 on CPU: no convolution left, every product
  (3 layers x forward, dX, dW; the Dense's three) bfloat16 x bfloat16 -> float32."""
  pixels = jnp.asarray(np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3)), jnp.uint8)
  model = encoders.PixelImageEncoder(6, channels=(4, 5, 6), dtype=BF16)
  params = model.init(jax.random.key(0), pixels)
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(model.apply(p, pixels) ** 3)))(params)
  assert not list(_equations(jaxpr.jaxpr, "conv_general_dilated"))
  found = list(_equations(jaxpr.jaxpr, "dot_general"))
  assert len(found) == 3 * 3 + 3
  for eqn in found:
    assert [v.aval.dtype for v in eqn.invars] == [BF16, BF16], eqn
    assert eqn.outvars[0].aval.dtype == jnp.float32, eqn
