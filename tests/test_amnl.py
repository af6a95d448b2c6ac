"""AMNL (sempre_jax/models/amnl.py) against a NumPy implementation of the paper's equations."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import amnl as amnl_config
from sempre_jax.models import amnl

USERS, VOCAB, D, H, WORD, FEAT, LENGTH, FOLLOWEES, N = 7, 30, 6, 5, 4, 8, 6, 4, 8


# ----------------------------------------------------------------- reference

def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def f64(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def ref_lstm(text, tokens, mask):
  """Last state of the LSTM over the valid words of one sentence, in order."""
  cell, words = text["lstm"], text["word_embed"]["embedding"]
  c, h = np.zeros(H), np.zeros(H)
  gate = lambda g, x: x @ cell["i" + g]["kernel"] + h @ cell["h" + g]["kernel"] \
      + cell["h" + g]["bias"]
  for token in tokens[mask]:
    x = words[token]
    i, f, g, o = (sigmoid(gate("i", x)), sigmoid(gate("f", x)), np.tanh(gate("g", x)),
                  sigmoid(gate("o", x)))
    c = f * c + i * g
    h = o * np.tanh(c)
  return h


def ref_text(p, tokens, mask):
  """y: max over the non-empty sentences [S, L] of their LSTM state; 0 if none."""
  states = [ref_lstm(p["text"], t, m) for t, m in zip(tokens, mask) if m.any()]
  return np.max(states, axis=0) if states else np.zeros(H)


def ref_post(p, post, modalities):
  """z = 1.7159 tanh(2/3 (W_i x + W_d y)) for one post (dict of its fields)."""
  pre = np.zeros(D)
  if modalities != "text" and post["image_features"].size:
    x = post["image_features"] if post["image_mask"] else 0 * post["image_features"]
    pre += x @ p["image_proj"]["kernel"]
  if modalities != "image":
    tokens, mask = post["tokens"], post["text_mask"]
    if tokens.ndim == 1:
      tokens, mask = tokens[None], mask[None]
    pre += ref_text(p, tokens, mask) @ p["text_proj"]["kernel"]
  return 1.7159 * np.tanh(2.0 / 3.0 * pre)


def ref_attention(p, user, followees):
  """a_q = softmax over the valid q of h . tanh(W_s u_p + W_n u_q + b); 0 on padding."""
  table = p["user_embed"]["embedding"]
  weights = np.zeros(len(followees))
  valid = [k for k, q in enumerate(followees) if q >= 0]
  scores = [p["att_h"]["kernel"][:, 0] @ np.tanh(
      table[user] @ p["att_user"]["kernel"] + table[followees[k]] @ p["att_followee"]["kernel"]
      + p["att_followee"]["bias"]) for k in valid]
  if valid:
    e = np.exp(np.array(scores) - max(scores))
    weights[valid] = e / e.sum()
  return weights


def ref_rank(p, user, followees, z):
  """F_p(z) = (u_p . z) sum_q a_q (u_q . z); u_p . z for a user without followees."""
  table = p["user_embed"]["embedding"]
  a = ref_attention(p, user, followees)
  if not (followees >= 0).any():
    return table[user] @ z
  return (table[user] @ z) * sum(a[k] * (table[q] @ z)
                                 for k, q in enumerate(followees) if q >= 0)


def row(posts, i):
  return {k: v[i] for k, v in posts.items()}


# ------------------------------------------------------------------ fixtures

def make_posts(rng, n, sentences=0, feature_dim=FEAT):
  """Posts with padding anywhere in the text, empty texts, missing images.

  sentences: 0 -> tokens [n, L]; S -> [n, S, L] with empty sentences.
  Images that are absent carry garbage features: the mask must hide them.
  """
  shape = (n, sentences, LENGTH) if sentences else (n, LENGTH)
  mask = rng.random(shape) < 0.6
  mask[..., 1] = True
  mask[1] = False                             # a post without text
  if sentences:
    mask[2, 0] = False                        # an empty first sentence
  tokens = rng.integers(1, VOCAB, shape)
  tokens[~mask] = rng.integers(0, VOCAB, (~mask).sum())
  image_mask = np.arange(n) % 3 != 0
  return {"tokens": tokens.astype(np.int32), "text_mask": mask, "image_mask": image_mask,
          "image_features": rng.normal(size=(n, feature_dim)).astype(np.float32)}


def make_users(rng, n):
  """Users with -1 padding at any slot, one user without followees."""
  followees = rng.integers(0, USERS, (n, FOLLOWEES))
  followees[rng.random((n, FOLLOWEES)) < 0.3] = -1
  followees[0] = -1                           # no followee
  followees[1] = [-1, 3, -1, 5]               # padding before and between
  followees[2] = [4, -1, -1, -1]              # one followee
  return {"user": rng.integers(0, USERS, n).astype(np.int32),
          "followees": followees.astype(np.int32)}


def make_batch(rng, b, **kw):
  return {**make_users(rng, b), "pos": make_posts(rng, b, **kw),
          "neg": make_posts(rng, b, **kw)}


def make_model(modalities="both", dtype="float32"):
  return amnl.AMNL(num_users=USERS, vocab_size=VOCAB, embed_dim=D, lstm_dim=H,
                   word_dim=WORD, modalities=modalities, dtype=jnp.dtype(dtype))


def param_shapes(model, feature_dim=FEAT):
  """The parameter tree init would give (traced, not run)."""
  batch = make_batch(np.random.default_rng(0), N, feature_dim=feature_dim)
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, jax.random.key(0), batch)["params"]


@functools.cache
def full_params():
  """Parameters of the "both" model, initialised once (compiling is slow)."""
  batch = make_batch(np.random.default_rng(0), N)
  params = jax.jit(make_model().init, static_argnames="train")(
      jax.random.key(0), batch, train=False)["params"]
  # Larger user vectors: scores of a useful size, attention far from uniform.
  return {**params, "user_embed": {"embedding": params["user_embed"]["embedding"] * 20.0}}


def model_and_params(modalities="both", dtype="float32"):
  """A model and the subset of full_params() that its init would create."""
  model = make_model(modalities, dtype)
  shapes = param_shapes(model)
  params = {k: v for k, v in full_params().items() if k in shapes}
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, shapes)
  return model, params


@functools.cache
def compiled(model):
  return jax.jit(model.apply, static_argnames=("method", "train"))


def apply(model, params, *args, **kw):
  """model.apply (jitted); method by name."""
  return compiled(model)({"params": params}, *args, **kw)


def config(margin):
  return ml_collections.ConfigDict({"model": {"margin": margin}})


# ----------------------------------------------------------------------- tests

@pytest.mark.parametrize("modalities", amnl.MODALITIES)
@pytest.mark.parametrize("sentences", [0, 3])
def test_posts_match_reference(modalities, sentences):
  """z (scaled tanh of the image and LSTM text terms) equals the NumPy loops."""
  rng = np.random.default_rng(1)
  model, params = model_and_params(modalities)
  posts = make_posts(rng, N, sentences)
  z = apply(model, params, posts, method="embed_posts")
  assert z.shape == (N, D) and z.dtype == jnp.float32
  p = f64(params)
  for i in range(N):
    np.testing.assert_allclose(z[i], ref_post(p, row(posts, i), modalities),
                               rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(z)).max() > 0.1


def test_posts_without_image_features():
  """Data without images (F = 0): z is the text term alone."""
  rng = np.random.default_rng(2)
  posts = make_posts(rng, N, feature_dim=0)
  model, params = model_and_params("both")
  assert "image_proj" not in param_shapes(model, feature_dim=0)
  z = apply(model, params, posts, method="embed_posts")
  for i in range(N):
    np.testing.assert_allclose(z[i], ref_post(f64(params), row(posts, i), "text"),
                               rtol=1e-5, atol=1e-6)


def test_padding_does_not_change_the_text():
  """Where padding sits and what it holds change nothing; the valid words do."""
  rng = np.random.default_rng(3)
  model, params = model_and_params("text")
  words = np.array([5, 9, 2], np.int32)
  layouts = [[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1], [1, 0, 1, 0, 0, 1], [0, 1, 0, 1, 1, 0]]
  tokens, masks = [], []
  for layout in layouts:
    mask = np.array(layout, bool)
    t = rng.integers(0, VOCAB, LENGTH).astype(np.int32)
    t[mask] = words
    tokens.append(t)
    masks.append(mask)
  # The LSTM reads words in order, and every valid word counts.
  changed, reordered = tokens[0].copy(), tokens[0].copy()
  changed[1] = 11
  reordered[:3] = words[::-1]
  y = np.asarray(apply(model, params, np.stack(tokens + [changed, reordered]),
                       np.stack(masks + masks[:1] * 2), method="embed_text"))
  for k in range(1, len(layouts)):
    np.testing.assert_allclose(y[k], y[0], atol=1e-6)
  np.testing.assert_allclose(y[0], ref_lstm(f64(params)["text"], words, np.ones(3, bool)),
                             rtol=1e-5, atol=1e-6)
  for y_other in y[len(layouts):]:
    assert np.abs(y_other - y[0]).max() > 1e-3


def test_attention_matches_reference():
  """a_q over the valid followees (padding anywhere, none, one) and v = sum a_q u_q."""
  rng = np.random.default_rng(4)
  model, params = model_and_params()
  users = make_users(rng, N)
  out = apply(model, params, users, method="embed_users")
  p = f64(params)
  table = p["user_embed"]["embedding"]
  for i in range(N):
    f = users["followees"][i]
    a = ref_attention(p, users["user"][i], f)
    np.testing.assert_allclose(out["attention"][i], a, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["facet"][i], a @ table[np.maximum(f, 0)],
                               rtol=1e-5, atol=1e-5)
    assert bool(out["has_followees"][i]) == (f >= 0).any()
  a = np.asarray(out["attention"])
  assert (a[0] == 0).all() and (np.asarray(out["facet"][0]) == 0).all()
  np.testing.assert_allclose(a[1:].sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(a[2], [1, 0, 0, 0], atol=1e-7)
  assert a[1].max() - a[1][a[1] > 0].min() > 0.05     # the attention is not uniform
  # Padding slots and their order carry no information.
  moved = dict(users, followees=np.array([[3, 5, -1, -1]] * N, np.int32))
  moved_out = apply(model, params, moved, method="embed_users")
  np.testing.assert_allclose(moved_out["facet"][1], out["facet"][1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("modalities", amnl.MODALITIES)
def test_scores_and_hinge_match_reference(modalities):
  """F_p(z+), F_p(z-) and max(0, c - F_p(z+) + F_p(z-)) equal the NumPy loops."""
  rng = np.random.default_rng(5)
  batch = make_batch(rng, N)
  model, params = model_and_params(modalities)
  out = apply(model, params, batch, train=True)
  p = f64(params)
  ref = {}
  for side in ("pos", "neg"):
    ref[side] = np.array([
        ref_rank(p, batch["user"][i], batch["followees"][i],
                 ref_post(p, row(batch[side], i), modalities)) for i in range(N)])
    np.testing.assert_allclose(out[f"{side}_score"], ref[side], rtol=1e-4, atol=1e-5)
    assert out[f"{side}_score"].dtype == jnp.float32
  margin = float(np.median(ref["pos"] - ref["neg"]))   # some hinges active, some not
  loss, terms = amnl.per_example_loss(out, batch, config(margin))
  expected = np.array([max(0.0, margin - ref["pos"][i] + ref["neg"][i]) for i in range(N)])
  np.testing.assert_allclose(loss, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(terms["rank"], expected, rtol=1e-4, atol=1e-5)
  assert loss.shape == (N,) and (expected == 0).any() and (expected > 0).any()


def test_modalities_select_the_inputs():
  """image: no text network, tokens ignored; text: no W_i, features ignored."""
  rng = np.random.default_rng(6)
  posts = make_posts(rng, N)
  other = dict(posts, tokens=np.roll(posts["tokens"], 1, axis=0),
               image_features=rng.normal(size=(N, FEAT)).astype(np.float32))
  changes = {}
  for modalities in amnl.MODALITIES:
    model, params = model_and_params(modalities)
    shapes = param_shapes(model)
    assert ("image_proj" in shapes) == (modalities != "text")
    assert ("text" in shapes and "text_proj" in shapes) == (modalities != "image")
    embed = lambda x: np.asarray(apply(model, params, x, method="embed_posts"))
    for name, swapped in (("text", dict(posts, tokens=other["tokens"])),
                          ("image", dict(posts, image_features=other["image_features"]))):
      changes[modalities, name] = np.abs(embed(swapped) - embed(posts)).max()
  assert changes["image", "text"] == 0 and changes["text", "image"] == 0
  for key in (("both", "text"), ("both", "image"), ("image", "image"), ("text", "text")):
    assert changes[key] > 1e-3, key


def test_unknown_modality_is_refused():
  with pytest.raises(ValueError, match="modalities"):
    param_shapes(make_model("audio"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_evaluation_matches_training(dtype):
  """score(embed_users, embed_posts) (train=False) equals __call__'s scores."""
  rng = np.random.default_rng(7)
  batch = make_batch(rng, N)
  model, params = model_and_params("both", dtype)
  out = apply(model, params, batch, train=True)
  users = apply(model, params, {k: batch[k] for k in ("user", "followees")},
                method="embed_users")
  shapes = {"user": (N, D), "facet": (N, D), "attention": (N, FOLLOWEES),
            "has_followees": (N,)}
  for name, shape in shapes.items():
    assert users[name].shape == shape
  assert users["has_followees"].dtype == jnp.bool_ and users["user"].dtype == jnp.float32
  for side in ("pos", "neg"):
    z = apply(model, params, batch[side], method="embed_posts")
    assert z.shape == (N, D) and z.dtype == jnp.float32
    score = apply(model, params, users, z, method="score")
    assert score.shape == (N,) and score.dtype == jnp.float32
    np.testing.assert_allclose(score, out[f"{side}_score"], rtol=1e-6, atol=1e-6)


def test_training_lowers_the_loss():
  """Adam on one toy batch: finite gradients, the mean hinge goes down."""
  rng = np.random.default_rng(8)
  batch = jax.tree.map(jnp.asarray, make_batch(rng, N))
  model, params = model_and_params("both")
  cfg = config(1.0)

  def loss_fn(params):
    out = apply(model, params, batch, train=True)
    return amnl.per_example_loss(out, batch, cfg)[0].mean()

  optimizer = optax.adam(0.01)
  state = optimizer.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = optimizer.update(grads, state)
    return optax.apply_updates(params, updates), state, loss, grads

  params, state, first, grads = step(params, state)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.abs(grads["text"]["lstm"]["ii"]["kernel"]).max() > 0
  assert np.abs(grads["att_h"]["kernel"]).max() > 0
  for _ in range(30):
    params, state, loss, _ = step(params, state)
  assert first > 0.5 and loss < 0.5 * first


def test_build_from_default_config():
  cfg = amnl_config.get_config().model
  assert cfg.modalities == "both" and cfg.margin > 0
  model = amnl.build(cfg, {"num_users": USERS, "vocab_size": VOCAB}, axis_name="data")
  assert (model.embed_dim, model.lstm_dim, model.word_dim) == \
      (cfg.embed_dim, cfg.lstm_dim, cfg.word_dim)
  assert model.num_users == USERS and model.vocab_size == VOCAB
  assert model.axis_name == "data" and model.dtype == jnp.float32
