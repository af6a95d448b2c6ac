"""D-Sempre (sempre_jax/models/dsempre.py) against a NumPy reference of Eq. 2-4."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from configs import dsempre as dsempre_config
from sempre_jax.models import dsempre

K, VOCAB, LENGTH, SIDE, FEATURES = 6, 30, 5, 8, 7   # clusters, words, tokens, pixels


# ----------------------------------------------------------------- reference

def ref_distance(x, y):
  """Euclidean distance of two vectors, by a loop in float64."""
  return np.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(x, y)))


def ref_loss(emb, margin, weight):
  """(loss, cross, semantic) [b] by loops over the triplets (Eq. 2, 3, 4)."""
  cross, semantic = [], []
  for i in range(len(emb["user"])):
    d = lambda a, b: ref_distance(emb[a][i], emb[b][i])
    cross.append(max(0.0, margin + d("user", "pos") - d("user", "neg")))
    semantic.append(max(0.0, margin + d("sem_anchor", "sem_pos") - d("sem_anchor", "sem_neg")))
  cross, semantic = np.array(cross), np.array(semantic)
  return cross + weight * semantic, cross, semantic


# ------------------------------------------------------------------ fixtures

def unit(x):
  """Rows of x scaled to unit L2 norm, float32."""
  x = np.asarray(x, np.float64)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def loss_config(margin=1.0, semantic_weight=0.3):
  """A job config as per_example_loss reads it (config.model)."""
  return ml_collections.ConfigDict(
      {"model": {"margin": margin, "semantic_weight": semantic_weight}})


def make_posts(rng, n):
  """Post fields with posts lacking an image (every 3rd) or a text (every 4th)."""
  lengths = rng.integers(1, LENGTH + 1, n)
  lengths[3::4] = 0
  text_mask = np.arange(LENGTH)[None, :] < lengths[:, None]
  image_mask = np.arange(n) % 3 != 2
  image = rng.integers(0, 256, (n, SIDE, SIDE, 3)).astype(np.uint8)
  features = rng.normal(size=(n, FEATURES)).astype(np.float32)
  return {"tokens": np.where(text_mask, rng.integers(1, VOCAB, (n, LENGTH)), 0).astype(np.int32),
          "text_mask": text_mask, "image_mask": image_mask,
          "image": image * image_mask[:, None, None, None],
          "image_features": features * image_mask[:, None]}


def make_batch(rng, b):
  """A training batch of b triplets of each kind."""
  bag = rng.random((b, K)) * (rng.random((b, K)) < 0.6)
  bag[:, 0] += 0.1
  batch = {"user": np.arange(b, dtype=np.int32),
           "user_bag": (bag / bag.sum(-1, keepdims=True)).astype(np.float32),
           "followees": np.full((b, 3), -1, np.int32)}
  batch.update({role: make_posts(rng, b) for role in dsempre.POST_ROLES})
  return batch


def tiny_model(**kw):
  """D-Sempre of the default config at toy sizes, `kw` overriding the config."""
  config = dsempre_config.get_config().model
  config.update({"embed_dim": 8, "user_hidden": 16, "word_dim": 8, "branch_dim": 8,
                 "conv_channels": (4, 4, 4, 4, 4), **kw})
  return dsempre.build(config, {"num_users": 10, "vocab_size": VOCAB})


@functools.partial(jax.jit, static_argnums=0)
def init(model, batch):
  """The model's variables (an "rbg" key: threefry initialisers compile slowly)."""
  return model.init({"params": jax.random.key(0, impl="rbg")}, batch, train=False)


@functools.partial(jax.jit, static_argnums=0)
def train_apply(model, variables, batch, key=0):
  """__call__ in train mode: (out, updated batch_stats)."""
  out, updates = model.apply(variables, batch, train=True,
                             rngs={"dropout": jax.random.key(key)}, mutable=["batch_stats"])
  return out, updates["batch_stats"]


@functools.partial(jax.jit, static_argnums=(0, 1))
def run(model, method, variables, *args):
  """A method of the model in eval mode ("__call__": with train=False)."""
  if method == "__call__":
    return model.apply(variables, *args, train=False)
  return model.apply(variables, *args, method=method)


def random_emb(rng, b, d=5):
  return {k: unit(rng.normal(size=(b, d))) for k in ("user",) + dsempre.POST_ROLES}


# ----------------------------------------------------------------- the loss

@pytest.mark.parametrize("margin,weight", [(1.0, 0.3), (0.2, 1.0), (2.5, 0.0)])
def test_loss_matches_reference(margin, weight):
  """Loss and both terms equal the loop reference, zero distances included."""
  rng = np.random.default_rng(0)
  emb = random_emb(rng, 16)
  emb["pos"][0] = emb["user"][0]               # d(u, p+) = 0: with d(u, p-) = 2,
  emb["neg"][0] = -emb["user"][0]              # cross is 0 for m < 2
  emb["sem_pos"][1] = emb["sem_anchor"][1]     # the same for semantic
  emb["sem_neg"][1] = -emb["sem_anchor"][1]
  loss, terms = dsempre.per_example_loss(jax.tree.map(jnp.asarray, emb), {},
                                         loss_config(margin, weight))
  expected, cross, semantic = ref_loss(emb, margin, weight)
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(terms["cross"], cross, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(terms["semantic"], semantic, rtol=1e-5, atol=1e-5)
  assert loss.shape == (16,) and loss.dtype == jnp.float32
  if margin == 1.0:                            # both hinges are active and inactive
    for t in (cross, semantic):
      assert (t == 0).any() and (t > 0).any()


def test_hand_computed():
  """D = 2, m = 1, lambda = 0.3; every number worked out by hand.

  Row 0: u=(1,0) p+=(0,1) p-=(-1,0): d+ = sqrt2, d- = 2 -> cross = sqrt2 - 1;
         a=(1,0) s=(1,0) o=(0,1): d = 0, sqrt2 -> semantic = max(0, 1 - sqrt2) = 0.
  Row 1: u=(0,1) p+=(0,-1) p-=(0,1): d+ = 2, d- = 0 -> cross = 3;
         a=(0,1) s=(1,0) o=(0,1): d = sqrt2, 0 -> semantic = 1 + sqrt2.
  """
  emb = {"user": [[1, 0], [0, 1]], "pos": [[0, 1], [0, -1]], "neg": [[-1, 0], [0, 1]],
         "sem_anchor": [[1, 0], [0, 1]], "sem_pos": [[1, 0], [1, 0]],
         "sem_neg": [[0, 1], [0, 1]]}
  emb = {k: jnp.asarray(v, jnp.float32) for k, v in emb.items()}
  loss, terms = dsempre.per_example_loss(emb, {}, loss_config())
  r2 = np.sqrt(2.0)
  np.testing.assert_allclose(terms["cross"], [r2 - 1, 3.0], rtol=1e-5)
  np.testing.assert_allclose(terms["semantic"], [0.0, 1 + r2], rtol=1e-5)
  np.testing.assert_allclose(loss, [r2 - 1, 3.0 + 0.3 * (1 + r2)], rtol=1e-5)


def test_score_is_negative_euclidean_distance():
  """score(u, p) = -||u - p||, so the nearer post scores higher."""
  rng = np.random.default_rng(1)
  score = lambda u, p: run(tiny_model(), "score", {}, {"user": u}, p)
  u, p = unit(rng.normal(size=(9, 8))), unit(rng.normal(size=(9, 8)))
  p[0] = u[0]
  s = score(u, p)
  expected = [-ref_distance(a, b) for a, b in zip(u, p)]
  assert s.shape == (9,) and s.dtype == jnp.float32
  np.testing.assert_allclose(s, expected, rtol=1e-5, atol=1e-5)
  near, far = score(u[:1], unit(u[:1] + 0.1)), score(u[:1], -u[:1])
  assert float(near[0]) > float(far[0])
  np.testing.assert_allclose(far, [-2.0], rtol=1e-6)


def test_config_keeps_the_papers_settings():
  """Dropout 0.5, lambda 0.3, margin 1, a 5-layer ConvNet (narrowed widths); build
  sizes the module from the dataset and the config."""
  config = dsempre_config.get_config().model
  assert (config.dropout, config.semantic_weight, config.margin) == (0.5, 0.3, 1.0)
  assert len(config.conv_channels) == 5 and config.semantic_triplets
  model = dsempre.build(config, {"num_users": 3, "vocab_size": 11, "feature_dim": 0},
                        axis_name="data")
  assert (model.embed_dim, model.vocab_size, model.axis_name) == (config.embed_dim, 11, "data")


# ---------------------------------------------------------------- BatchNorm

def test_masked_batchnorm_against_numpy():
  """Train: statistics of the valid rows only, running stats moved by 1 - momentum,
  other rows zero; eval: the running statistics; no valid row: stats kept."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(7, 3)).astype(np.float32) * 3 + 1
  mask = np.array([1, 1, 0, 1, 0, 1, 1], bool)
  bn = dsempre.MaskedBatchNorm(momentum=0.9)
  variables = bn.init(jax.random.key(0), x, mask, False)
  y, upd = bn.apply(variables, x, mask, True, mutable=["batch_stats"])
  xv = x[mask].astype(np.float64)
  mean, var = xv.mean(0), xv.var(0)
  expected = np.where(mask[:, None], (x - mean) / np.sqrt(var + 1e-5), 0.0)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
  stats = upd["batch_stats"]
  np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var, rtol=1e-5)

  y_eval = bn.apply({**variables, "batch_stats": stats}, x, mask, False)
  expected = (x - stats["mean"]) / np.sqrt(np.asarray(stats["var"]) + 1e-5)
  np.testing.assert_allclose(y_eval, np.where(mask[:, None], expected, 0.0), rtol=1e-5,
                             atol=1e-6)

  none = np.zeros(7, bool)
  y, upd = bn.apply(variables, x, none, True, mutable=["batch_stats"])
  assert not np.asarray(y).any()
  np.testing.assert_array_equal(upd["batch_stats"]["mean"], np.zeros(3))
  np.testing.assert_array_equal(upd["batch_stats"]["var"], np.ones(3))


def test_masked_batchnorm_across_devices():
  """On 4 devices (one without a valid row) the output and the running stats
  are those of the whole batch on one device."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(8, 3)).astype(np.float32)
  mask = np.array([0, 0, 1, 0, 1, 1, 1, 1], bool)
  local = dsempre.MaskedBatchNorm()
  variables = local.init(jax.random.key(0), x, mask, False)
  y1, upd1 = local.apply(variables, x, mask, True, mutable=["batch_stats"])

  sharded = dsempre.MaskedBatchNorm(axis_name="data")
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  step = jax.shard_map(
      lambda x, m: sharded.apply(variables, x, m, True, mutable=["batch_stats"]),
      mesh=mesh, in_specs=(P("data"), P("data")), out_specs=(P("data"), P()))
  y4, upd4 = step(x, mask)
  np.testing.assert_allclose(y4, y1, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), upd4, upd1)


def test_model_batchnorm_train_updates_eval_uses():
  """Train mode moves every BatchNorm's running stats and normalises by the
  batch (a post's embedding depends on the other posts); eval mode uses the
  stored stats (it does not, and other stored stats change it)."""
  rng = np.random.default_rng(4)
  model = tiny_model(dropout=0.0)
  batch = make_batch(rng, 6)
  variables = init(tiny_model(), batch)
  _, stats = train_apply(model, variables, batch)
  for name in ("user_bn", "image_bn", "text_bn"):
    old, new = variables["batch_stats"][name], stats[name]
    assert not np.allclose(old["mean"], new["mean"]) and not np.allclose(old["var"], new["var"])

  trained = {**variables, "batch_stats": stats}
  other = make_batch(np.random.default_rng(40), 6)
  mixed = jax.tree.map(lambda a, b: np.concatenate([a[:2], b[2:]]), batch, other)
  evals = [run(model, "__call__", v, b) for v, b in ((trained, batch), (trained, mixed))]
  trains = [train_apply(model, variables, b)[0] for b in (batch, mixed)]
  before = run(model, "__call__", variables, batch)
  for k in ("user", "pos"):
    np.testing.assert_allclose(evals[0][k][:2], evals[1][k][:2], atol=1e-6)
    assert not np.allclose(trains[0][k][:2], trains[1][k][:2], atol=1e-3)
    assert not np.allclose(evals[0][k], before[k], atol=1e-3)


# ------------------------------------------------------------------ the model

def test_dropout_only_in_train():
  """Train mode: two dropout keys give two embeddings, one key gives one, and
  without dropout the key does not matter; eval mode needs no key."""
  rng = np.random.default_rng(5)
  batch = make_batch(rng, 6)
  model = tiny_model()
  variables = init(tiny_model(), batch)
  a, _ = train_apply(model, variables, batch, key=1)
  b, _ = train_apply(model, variables, batch, key=2)
  c, _ = train_apply(model, variables, batch, key=1)
  for k in ("user", "pos"):
    assert not np.allclose(a[k], b[k], atol=1e-3)
    np.testing.assert_array_equal(a[k], c[k])
  no_drop = tiny_model(dropout=0.0)
  a, _ = train_apply(no_drop, variables, batch, key=1)
  b, _ = train_apply(no_drop, variables, batch, key=2)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  e1, e2 = (run(model, "__call__", variables, batch) for _ in range(2))
  jax.tree.map(np.testing.assert_array_equal, e1, e2)


def test_missing_modality_is_ignored():
  """A post without an image (text) embeds the same whatever its pixels (tokens)."""
  rng = np.random.default_rng(6)
  batch = make_batch(rng, 6)
  model = tiny_model()
  variables = init(tiny_model(), batch)
  posts = batch["pos"]
  noisy = dict(posts, image=np.where(posts["image_mask"][:, None, None, None],
                                     posts["image"], 255).astype(np.uint8),
               tokens=np.where(posts["text_mask"], posts["tokens"], 7).astype(np.int32))
  assert (noisy["image"] != posts["image"]).any() and (noisy["tokens"] != posts["tokens"]).any()
  embed = lambda p: run(model, "embed_posts", variables, p)
  np.testing.assert_allclose(embed(noisy), embed(posts), atol=1e-6)


@pytest.mark.parametrize("image_input,dtype", [("pixels", "float32"), ("features", "bfloat16")])
def test_shapes_and_train_eval_consistency(image_input, dtype):
  """embed_users / embed_posts / score give [n, D] unit rows and [n] float32
  scores, and agree with __call__ in eval mode."""
  rng = np.random.default_rng(7)
  batch = make_batch(rng, 6)
  model = tiny_model(image_input=image_input, dtype=dtype)
  variables = init(model, batch)
  _, stats = train_apply(model, variables, batch)
  variables = {**variables, "batch_stats": stats}
  out = run(model, "__call__", variables, batch)
  users = run(model, "embed_users", variables,
              {k: batch[k] for k in ("user", "user_bag", "followees")})
  assert users["user"].shape == (6, 8) and users["user"].dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(users["user"], axis=-1), 1.0, atol=1e-2)  # eps
  np.testing.assert_allclose(users["user"], out["user"], atol=1e-6)
  for role in dsempre.POST_ROLES:
    posts = run(model, "embed_posts", variables, batch[role])
    assert posts.shape == (6, 8) and posts.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(posts, axis=-1), 1.0, atol=1e-2)
    np.testing.assert_allclose(posts, out[role], atol=2e-2 if dtype == "bfloat16" else 1e-6)
  s = run(model, "score", variables, users, run(model, "embed_posts", variables, batch["pos"]))
  assert s.shape == (6,) and s.dtype == jnp.float32
  np.testing.assert_allclose(s, -dsempre.distance(out["user"], out["pos"]), atol=1e-5)


def test_data_without_images():
  """image_features [n, 0] (a text-only corpus): no image parameters, and the
  posts embed by their text."""
  rng = np.random.default_rng(10)
  batch = make_batch(rng, 6)
  for role in dsempre.POST_ROLES:
    batch[role].update(image_features=np.zeros((6, 0), np.float32),
                       image_mask=np.zeros(6, bool))
  model = tiny_model(image_input="features")
  variables = init(model, batch)
  assert "image_proj" not in variables["params"] and "image_bn" not in variables["params"]
  out, _ = train_apply(model, variables, batch)
  assert all(np.isfinite(x).all() for x in out.values())
  posts = run(model, "embed_posts", variables, batch["pos"])
  other = dict(batch["pos"], tokens=(batch["pos"]["tokens"] + 1) % VOCAB)
  assert not np.allclose(run(model, "embed_posts", variables, other), posts, atol=1e-3)


def test_loss_gradient_finite_at_zero_distance():
  """d(a, s) = 0 (a post and its copy) still gives a finite gradient."""
  rng = np.random.default_rng(8)
  emb = jax.tree.map(jnp.asarray, random_emb(rng, 4))
  emb["sem_pos"] = emb["sem_anchor"]
  emb["pos"] = emb["user"]
  grads = jax.grad(lambda e: dsempre.per_example_loss(e, {}, loss_config(2.5))[0].sum())(emb)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.abs(grads["sem_neg"]).sum() > 0


def test_training_lowers_the_loss():
  """The paper's optimizer (SGD, momentum 0.9, lr 0.01, weight decay 1e-5) on
  a fixed toy batch with a fixed dropout key lowers the loss; the gradient
  reaches every parameter."""
  rng = np.random.default_rng(9)
  batch = jax.tree.map(jnp.asarray, make_batch(rng, 6))
  model = tiny_model()
  variables = init(tiny_model(), batch)
  config = loss_config()
  tx = optax.chain(optax.add_decayed_weights(1e-5), optax.sgd(0.01, momentum=0.9))

  def loss(params, stats):
    out, stats = train_apply(model, {"params": params, "batch_stats": stats}, batch)
    return dsempre.per_example_loss(out, batch, config)[0].mean(), stats

  @jax.jit
  def step(params, stats, opt_state):
    (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params, stats)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, value, grads

  params, stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  values = []
  for i in range(30):
    params, stats, opt_state, value, grads = step(params, stats, opt_state)
    values.append(float(value))
    if i == 0:                    # every parameter gets a finite, non-zero gradient
      leaves = jax.tree_util.tree_leaves_with_path(grads)
      assert all(np.isfinite(g).all() for _, g in leaves)
      assert all(np.abs(g).sum() > 0 for _, g in leaves), [
          jax.tree_util.keystr(p) for p, g in leaves if not np.abs(g).any()]
  assert values[-1] < 0.7 * values[0], values
