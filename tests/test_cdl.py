"""CDL (sempre_jax/models/cdl.py) against NumPy references written from the paper's equations."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import cdl as cdl_config
from sempre_jax.models import cdl

B = 8
DIM = 16
SIZE = 32
BAG = 4
MARGIN = 0.5
SIZES = {"num_users": 8, "vocab_size": 10, "feature_dim": 12, "num_clusters": BAG}


# ----------------------------------------------------------------- reference

def ref_distance(u, x, kernel, bias):
  """D(u_i, x_i) = sum_k softplus(v_k) (u_ik - x_ik)^2 + c by loops, float64."""
  weights = [math.log1p(math.exp(v)) for v in np.asarray(kernel, np.float64)]
  u, x = np.asarray(u, np.float64), np.asarray(x, np.float64)
  return np.array([sum(w * (a - b) ** 2 for w, a, b in zip(weights, ui, xi)) + float(bias)
                   for ui, xi in zip(u, x)])


def sigmoid(t):
  return 1.0 / (1.0 + math.exp(-t))


def ref_loss(variant, d_pos, d_neg, valid, margin=MARGIN):
  """Per-triplet loss by loops: Eq. 3-5 (cdl), the hinge, or the TwoNets pairs."""
  out = []
  for dp, dn, ok in zip(d_pos, d_neg, valid):
    if variant == "cdl":
      loss = -math.log(sigmoid(dn - dp))
    elif variant == "hinge":
      loss = max(0.0, margin + dp - dn)
    else:
      loss = -math.log(sigmoid(-dp)) - math.log(1.0 - sigmoid(-dn))
    out.append(loss if ok else 0.0)
  return np.array(out)


# ------------------------------------------------------------------ fixtures

def config(variant="cdl", **model):
  """A job config whose model is a tiny CDL: 1/16 of AlexNet's widths, a 16-d space."""
  c = cdl_config.get_config().model
  c.update(name="cdl", embed_dim=DIM, image_width=1 / 16, user_hidden=(24,), **model)
  c.loss.update(variant=variant, margin=MARGIN)
  return ml_collections.ConfigDict({"model": c, "loss": {"l2": 0.0}})


def build(c):
  """The CDL module of a job config."""
  return cdl.build(c.model, SIZES)


def make_batch(rng, b=B, size=SIZE, missing=True):
  """Random triplets; with `missing`, some x+ / x- have no image (zero pixels)."""
  def posts():
    mask = np.ones(b, bool)
    if missing:
      mask[rng.choice(b, 2, replace=False)] = False
    image = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
    return {"image": np.where(mask[:, None, None, None], image, 0).astype(np.uint8),
            "image_mask": mask, "image_features": rng.normal(size=(b, 12)).astype(np.float32)}
  bag = rng.random((b, BAG))
  return {"user": np.arange(b, dtype=np.int32), "user_bag": (bag / bag.sum(1, keepdims=True))
          .astype(np.float32), "pos": posts(), "neg": posts()}


@functools.cache
def tiny(image_input="pixels", dtype="float32"):
  """(model, init(seed, batch) -> params, apply(params, batch, key | None) -> out),
  jitted once for every test (the loss variant does not change the module); init
  draws from an "rbg" key, whose sampler compiles faster than threefry's."""
  model = build(config(image_input=image_input, dtype=dtype))
  init = jax.jit(lambda seed, batch: model.init(
      {"params": jax.random.key(seed, impl="rbg")}, batch, train=False)["params"])
  evaluate = jax.jit(lambda p, batch: model.apply({"params": p}, batch, train=False))
  train = jax.jit(lambda p, batch, key: model.apply({"params": p}, batch, train=True,
                                                    rngs={"dropout": key}))
  apply = lambda p, batch, key=None: (evaluate(p, batch) if key is None
                                      else train(p, batch, key))
  return model, init, apply


# --------------------------------------------------------------------- tests

@pytest.mark.parametrize("variant", cdl.VARIANTS)
def test_matches_reference(variant):
  """Distances from the Dense weights by hand, then each variant's loss, with
  missing images; the distance layer's bias is moved off zero so TwoNets sees it."""
  rng = np.random.default_rng(0)
  batch = make_batch(rng)
  _, init, apply = tiny()
  params = init(0, batch)
  params["distance"] = {"kernel": jnp.asarray(rng.normal(size=DIM), jnp.float32),
                        "bias": jnp.float32(-0.3)}
  out = apply(params, batch)
  d_pos = ref_distance(out["user"], out["pos"], **params["distance"])
  d_neg = ref_distance(out["user"], out["neg"], **params["distance"])
  np.testing.assert_allclose(out["d_pos"], d_pos, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["d_neg"], d_neg, rtol=1e-5, atol=1e-5)
  valid = batch["pos"]["image_mask"] & batch["neg"]["image_mask"]
  assert 0 < valid.sum() < len(valid)
  assert np.abs(d_pos - d_neg)[valid].min() > 1e-2     # the images really differ
  loss, terms = cdl.per_example_loss(out, batch, config(variant))
  expected = ref_loss(variant, d_pos, d_neg, valid)
  assert loss.shape == (B,) and loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
  assert (expected[valid] > 0).any() and (variant != "hinge" or (expected[valid] == 0).any())
  named = {"cdl": ["cdl"], "hinge": ["hinge"], "twonets": ["bce_pos", "bce_neg"]}[variant]
  assert set(terms) == set(named) | {"d_pos", "d_neg", "correct"}
  np.testing.assert_allclose(sum(terms[n] for n in named), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(terms["d_pos"], np.where(valid, d_pos, 0), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(terms["correct"], valid & (d_pos < d_neg))


@pytest.mark.parametrize("variant", cdl.VARIANTS)
def test_loss_on_extreme_distances(variant):
  """Large distance gaps give the reference's finite values, not inf or nan."""
  d_pos = np.array([0.0, 40.0, 3.0, 80.0, 1.0])
  d_neg = np.array([0.0, 0.5, 3.5, 2.0, 90.0])
  out = {"d_pos": jnp.asarray(d_pos, jnp.float32), "d_neg": jnp.asarray(d_neg, jnp.float32)}
  mask = np.ones(5, bool)
  batch = {"pos": {"image_mask": mask}, "neg": {"image_mask": mask}}
  loss, _ = cdl.per_example_loss(out, batch, config(variant))
  np.testing.assert_allclose(loss, ref_loss(variant, d_pos, d_neg, mask), rtol=1e-5, atol=1e-6)


def test_distance_is_a_weighted_squared_distance():
  """Whatever the kernel, the weights are >= 0: D(u, u) = c and D(u, x) > c;
  the default weights are 1 / D."""
  rng = np.random.default_rng(1)
  u = jnp.asarray(rng.normal(size=(5, DIM)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(5, DIM)), jnp.float32)
  layer = cdl.WeightedSquaredDistance()
  params = {"kernel": jnp.asarray(5 * rng.normal(size=DIM), jnp.float32),
            "bias": jnp.float32(0.7)}
  dist = lambda a, b: layer.apply({"params": params}, a, b, train=False)
  np.testing.assert_allclose(dist(u, u), 0.7, rtol=1e-6)
  assert (np.asarray(dist(u, x)) > 0.7).all()
  default = layer.init(jax.random.key(0), u, x, train=False)["params"]
  np.testing.assert_allclose(jax.nn.softplus(default["kernel"]), 1 / DIM, rtol=1e-5)


def test_dropout_only_in_train():
  """Eval is deterministic and needs no rng; training drops (u - x)^2 entries
  with inverted scaling (unbiased over masks); the sub-networks have no dropout."""
  batch = make_batch(np.random.default_rng(2), missing=False)
  _, init, apply = tiny()
  params = init(0, batch)
  ev = apply(params, batch)
  np.testing.assert_array_equal(ev["d_pos"], apply(params, batch)["d_pos"])
  tr = [apply(params, batch, jax.random.key(s)) for s in (1, 2)]
  assert np.abs(tr[0]["d_pos"] - tr[1]["d_pos"]).max() > 1e-4
  assert np.abs(tr[0]["d_pos"] - tr[0]["d_neg"] - ev["d_pos"] + ev["d_neg"]).max() > 1e-4
  for name in ("user", "pos", "neg"):
    np.testing.assert_allclose(tr[0][name], ev[name], rtol=1e-6)

  u, x = ev["user"][:2], ev["pos"][:2]
  def distance(rate, key):
    return cdl.WeightedSquaredDistance(rate).apply(
        {"params": params["distance"]}, u, x, train=True, rngs={"dropout": key})
  samples = jax.vmap(lambda k: distance(0.5, k))(jax.random.split(jax.random.key(3), 4000))
  np.testing.assert_allclose(samples.mean(0), ev["d_pos"][:2], rtol=0.05)
  np.testing.assert_allclose(distance(0.0, jax.random.key(4)), ev["d_pos"][:2], rtol=1e-6)


@pytest.mark.parametrize("image_input,dtype", [("pixels", "float32"), ("features", "bfloat16")])
def test_shapes_and_eval_consistency(image_input, dtype):
  """embed_users / embed_posts / score: shapes, float32 (parameters too, whatever
  the compute dtype), and score = -D of __call__."""
  batch = make_batch(np.random.default_rng(3))
  model, init, apply = tiny(image_input, dtype)
  params = init(0, batch)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  out = apply(params, batch)
  for name in ("user", "pos", "neg"):
    assert out[name].shape == (B, DIM) and out[name].dtype == jnp.float32

  @jax.jit
  def evaluate(v, users, posts):
    users = model.apply(v, users, method="embed_users")
    posts = model.apply(v, posts, method="embed_posts")
    return users, posts, model.apply(v, users, posts, method="score")

  users, posts, score = evaluate(
      {"params": params}, {"user": batch["user"], "user_bag": batch["user_bag"],
                           "followees": np.full((B, 3), -1, np.int32)}, batch["neg"])
  assert users["user"].shape == (B, DIM) and users["user"].dtype == jnp.float32
  assert posts["image"].shape == (B, DIM) and posts["image"].dtype == jnp.float32
  assert score.shape == (B,) and score.dtype == jnp.float32
  np.testing.assert_allclose(users["user"], out["user"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(posts["image"], out["neg"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(score, -out["d_neg"], rtol=1e-5, atol=1e-6)


def test_paper_shape_and_small_images():
  """The paper's network: AlexNet's layers to 1024-d; 224-px and 32-px images fit."""
  c = cdl_config.get_config().model
  c.update(embed_dim=1024, image_width=1.0, user_hidden=(1024,))
  assert c.dropout == 0.5 and c.loss.variant == "cdl"
  model = cdl.build(c, SIZES)
  for size, flat in ((224, 7 * 7 * 256), (32, 256)):
    batch = make_batch(np.random.default_rng(0), b=2, size=size)
    shapes = jax.eval_shape(lambda b=batch: model.init(jax.random.key(0), b, train=False))
    p = jax.tree.map(lambda s: s.shape, shapes["params"])
    assert [p["image"][f"conv{i}"]["kernel"] for i in range(1, 6)] == [
        (11, 11, 3, 96), (5, 5, 96, 256), (3, 3, 256, 384), (3, 3, 384, 384), (3, 3, 384, 256)]
    assert [p["image"][f"fc{i}"]["kernel"] for i in (6, 7, 8)] == [
        (flat, 4096), (4096, 4096), (4096, 1024)]
    assert p["user"]["fc2"]["kernel"] == (1024, 1024) and p["distance"]["kernel"] == (1024,)


def test_training_lowers_the_loss():
  """Users of two groups prefer reddish or bluish images: 40 Adam steps with
  dropout learn it under each variant (one copy of the model per variant, all
  stepped by one compiled function); gradients stay finite, and eval then
  ranks every x+ above its x-."""
  rng = np.random.default_rng(4)
  group = np.arange(B) % 2
  batch = make_batch(rng, missing=False)
  batch["user_bag"] = np.eye(BAG, dtype=np.float32)[group * 2 + rng.integers(0, 2, B)]
  tint = lambda g: np.where(g[:, None] == 0, [200, 40, 40], [40, 40, 200])[:, None, None]
  noisy = lambda x: (x + rng.integers(-30, 30, (B, SIZE, SIZE, 3))).astype(np.uint8)
  batch["pos"]["image"] = noisy(tint(group))
  batch["neg"]["image"] = noisy(tint(1 - group))
  configs = {v: config(v) for v in cdl.VARIANTS}
  model, init, apply = tiny()
  opt = optax.adam(3e-3)

  def mean_loss(p, key, c):
    out = model.apply({"params": p}, batch, train=True, rngs={"dropout": key})
    return cdl.per_example_loss(out, batch, c)[0].mean()

  @jax.jit
  def step(params, states, key):
    out = {}
    for v, c in configs.items():
      grads = jax.grad(lambda p, c=c: mean_loss(p, key, c))(params[v])
      updates, state = opt.update(grads, states[v], params[v])
      out[v] = (optax.apply_updates(params[v], updates), state, grads)
    return tuple({v: o[i] for v, o in out.items()} for i in range(3))

  eval_loss = lambda p, c: float(cdl.per_example_loss(apply(p, batch), batch, c)[0].mean())
  params = dict.fromkeys(configs, init(0, batch))
  states = {v: opt.init(p) for v, p in params.items()}
  before = {v: eval_loss(params[v], c) for v, c in configs.items()}
  for i in range(40):
    params, states, grads = step(params, states, jax.random.key(i))
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  for v, c in configs.items():
    after = eval_loss(params[v], c)
    assert after < 0.6 * before[v], (v, before[v], after)
    out = apply(params[v], batch)
    assert (np.asarray(out["d_pos"]) < np.asarray(out["d_neg"])).all(), v


def test_unknown_variant_or_input_is_refused():
  batch = make_batch(np.random.default_rng(0), b=2)
  with pytest.raises(ValueError, match="loss.variant"):
    build(config("bpr"))
  with pytest.raises(ValueError, match="loss.variant"):
    cdl.per_example_loss({"d_pos": jnp.zeros(2), "d_neg": jnp.zeros(2)}, batch, config("bpr"))
  model = build(config(image_input="text"))
  with pytest.raises(ValueError, match="image_input"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), batch, train=False))
