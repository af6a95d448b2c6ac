"""DU2MCE loss (sempre_jax/losses.py) against an independent NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sempre_jax import losses

MARGIN = 0.2
TERMS = {"tu": ("text", "user"), "it": ("image", "text"), "iu": ("image", "user")}
KEYS = {"text": "text_hash", "image": "image_id", "user": "user"}
LAMBDAS = [(0.1, 0.45), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.5, 0.5)]
DIRECTIONS = ("one", "both")


# ----------------------------------------------------------------- reference

def ref_direction(emb, batch, anchor, positive, margin=MARGIN, mining="all", groups=None):
  """(sum over posts j of L(anchor_j, positive_j), number of pairs): Eq. 4 by loops.

  L(a_j, b_j) = sum over posts n whose `positive` is no hit of j of
  [m - S(a_j, b_j) + S(a_j, b_n)]_+ (or the max, "hardest"); n is a hit when it
  shares post j's key of either modality (user, text hash, image id).
  groups: [B] labels; when given, a candidate must share the anchor's label
  (negatives restricted to the anchor's shard).
  """
  e = {m: np.asarray(x, np.float64) for m, x in emb.items()}
  n = len(batch["user"])
  has = {"text": np.asarray(batch["text_mask"]).any(axis=-1),
         "image": np.asarray(batch["image_mask"]).astype(bool),
         "user": np.ones(n, bool)}
  key = {m: np.asarray(batch[k]) for m, k in KEYS.items()}
  groups = np.zeros(n, int) if groups is None else np.asarray(groups)
  total, pairs = 0.0, 0
  for j in range(n):
    if not (has[anchor][j] and has[positive][j]):
      continue
    pairs += 1
    pos = e[anchor][j] @ e[positive][j]
    hinges = [max(0.0, margin - pos + e[anchor][j] @ e[positive][c])
              for c in range(n)
              if has[positive][c] and key[anchor][c] != key[anchor][j]
              and key[positive][c] != key[positive][j] and groups[c] == groups[j]]
    total += sum(hinges) if mining == "all" else max(hinges, default=0.0)
  return total, pairs


def ref_terms(emb, batch, margin=MARGIN, mining="all", groups=None, directions="one"):
  """{term: (L_XY, N_XY)}: "one" the paper's direction (anchor = the term's
  first modality), "both" the sum of that and the reverse direction."""
  out = {}
  for term, (x, y) in TERMS.items():
    total, pairs = ref_direction(emb, batch, x, y, margin, mining, groups)
    if directions == "both":
      total += ref_direction(emb, batch, y, x, margin, mining, groups)[0]
    out[term] = (total, pairs)
  return out


def ref_loss(emb, batch, lambdas, margin=MARGIN, mining="all", groups=None,
             directions="one"):
  """Eq. 1 from ref_terms; an empty term contributes 0."""
  l1, l2 = lambdas
  weight = {"tu": l1, "it": l2, "iu": 1.0 - l1 - l2}
  terms = ref_terms(emb, batch, margin, mining, groups, directions)
  return sum(weight[t] * s / n for t, (s, n) in terms.items() if n)


def ref_grad_row(emb, batch, modality, row, eps=1e-6, **kw):
  """Central finite differences of ref_loss wrt emb[modality][row]."""
  grad = np.zeros(emb[modality].shape[1])
  for k in range(len(grad)):
    shifted = []
    for sign in (1, -1):
      e = {m: np.array(x, np.float64) for m, x in emb.items()}
      e[modality][row, k] += sign * eps
      shifted.append(ref_loss(e, batch, **kw))
    grad[k] = (shifted[0] - shifted[1]) / (2 * eps)
  return grad


# ------------------------------------------------------------------ fixtures

def unit(x):
  """Rows of x scaled to unit L2 norm, float32."""
  x = np.asarray(x, np.float64)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_emb(rng, b, d=8):
  """Random L2-normalised embeddings for the three modalities."""
  return {m: unit(rng.normal(size=(b, d))) for m in ("text", "image", "user")}


def make_batch(rng, b, length=4):
  """Batch with missing texts/images, repeated users, shared image ids and hashes."""
  text_mask = rng.random((b, length)) < 0.7
  text_mask[:, 0] = True
  text_mask[2::5] = False                      # posts without text
  image_mask = np.ones(b, bool)
  image_mask[2::4] = False                     # posts without image
  user = np.arange(b) % (b // 2)               # every user twice...
  user[1] = user[0]                            # ...user 0 three times
  image_id = np.where(image_mask, 100 + np.arange(b), -1)
  image_id[3] = image_id[0]                    # same image in two posts
  image_id[b - 1] = image_id[4]
  text_hash = 200 + np.arange(b)
  text_hash[5] = text_hash[0]                  # same text in two posts
  text_hash[b - 2] = text_hash[3]
  text_hash[~text_mask.any(axis=-1)] = 7       # hash of the empty text
  return {"text_mask": text_mask, "image_mask": image_mask,
          "user": user.astype(np.int32), "text_hash": text_hash.astype(np.int32),
          "image_id": image_id.astype(np.int32)}


def to_jnp(tree):
  return jax.tree.map(jnp.asarray, tree)


def loss_fn(emb, batch, lambdas, mining="all", margin=MARGIN, chunk=0, directions="one"):
  """Single-device (loss, metrics) of losses.du2mce_loss."""
  return losses.du2mce_loss(to_jnp(emb), to_jnp(batch), lambdas=lambdas, margin=margin,
                            mining=mining, directions=directions, candidate_chunk=chunk)


def grad_fn(emb, batch, lambdas, mining="all", chunk=0, directions="one"):
  """Single-device gradient of the loss wrt the embeddings."""
  f = lambda e: losses.du2mce_loss(e, to_jnp(batch), lambdas=lambdas, margin=MARGIN,
                                   mining=mining, directions=directions,
                                   candidate_chunk=chunk)[0]
  return jax.grad(f)(to_jnp(emb))


# --------------------------------------------------------------- single device

@pytest.mark.parametrize("directions", DIRECTIONS)
@pytest.mark.parametrize("mining", ["all", "hardest"])
@pytest.mark.parametrize("lambdas", LAMBDAS)
def test_matches_reference(mining, lambdas, directions):
  """Loss and per-term metrics equal the loop reference on an awkward batch."""
  rng = np.random.default_rng(0)
  batch = make_batch(rng, 12)
  emb = make_emb(rng, 12)
  # The batch has every awkward case the loss must handle.
  assert (~batch["text_mask"].any(-1)).any() and (~batch["image_mask"]).any()
  assert np.bincount(batch["user"]).max() >= 3
  with_image = batch["image_id"][batch["image_mask"]]
  assert len(np.unique(with_image)) < len(with_image)
  with_text = batch["text_hash"][batch["text_mask"].any(-1)]
  assert len(np.unique(with_text)) < len(with_text)

  loss, metrics = loss_fn(emb, batch, lambdas, mining, directions=directions)
  expected = ref_loss(emb, batch, lambdas, mining=mining, directions=directions)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  for term, (total, pairs) in ref_terms(emb, batch, mining=mining,
                                        directions=directions).items():
    np.testing.assert_allclose(metrics[f"{term}_loss_sum"], total, rtol=1e-5)
    assert int(metrics[f"{term}_pairs"]) == pairs


def test_hardest_differs_from_all_and_one_direction_from_both():
  """On the random batch the mining modes and the directions are really
  different losses, and "one" is the default."""
  rng = np.random.default_rng(0)
  batch, emb = make_batch(rng, 12), make_emb(rng, 12)
  loss = {(m, d): float(loss_fn(emb, batch, (0.1, 0.45), m, directions=d)[0])
          for m in ("all", "hardest") for d in DIRECTIONS}
  for d in DIRECTIONS:
    assert 0 < loss["hardest", d] < loss["all", d]
  for m in ("all", "hardest"):
    assert 0 < loss[m, "one"] < loss[m, "both"]
  default = losses.du2mce_loss(to_jnp(emb), to_jnp(batch), lambdas=(0.1, 0.45),
                               margin=MARGIN, mining="all")[0]
  assert float(default) == loss["all", "one"]
  with pytest.raises(ValueError, match="loss.directions"):
    loss_fn(emb, batch, (0.1, 0.45), directions="two")


@pytest.mark.parametrize("directions", DIRECTIONS)
@pytest.mark.parametrize("mining", ["all", "hardest"])
def test_hand_computed(mining, directions):
  """Two posts, D=2, margin 0.5: every number below is worked out by hand.

  t0=(1,0) u0=(.6,.8) i0=(0,1);  t1=(0,1) u1=(.8,.6) i1=(1,0).
  Each post is the other's only negative, so both mining modes agree, and
  each direction has 2 hinges (the cross similarities are symmetric here).
  TU: S(t,u)=.6 on both pairs, cross S=.8 -> hinges of .5-.6+.8=.7: 1.4 a direction
  IT: S(i,t)=0 on both pairs, cross S=1  -> hinges of .5-0+1=1.5:   3.0
  IU: S(i,u)=.8 on both pairs, cross S=.6 -> hinges of .5-.8+.6=.3: 0.6
  one:  L = .5*1.4/2 + .25*3/2 + .25*.6/2 = .35 + .375 + .075 = 0.8;  both: 1.6
  """
  emb = {"text": np.array([[1, 0], [0, 1]], np.float32),
         "user": np.array([[.6, .8], [.8, .6]], np.float32),
         "image": np.array([[0, 1], [1, 0]], np.float32)}
  batch = {"text_mask": np.ones((2, 3), bool), "image_mask": np.ones(2, bool),
           "user": np.array([3, 4], np.int32),
           "text_hash": np.array([10, 11], np.int32),
           "image_id": np.array([20, 21], np.int32)}
  factor = {"one": 1, "both": 2}[directions]
  loss, metrics = loss_fn(emb, batch, (0.5, 0.25), mining, margin=0.5,
                          directions=directions)
  np.testing.assert_allclose(loss, 0.8 * factor, rtol=1e-5)
  for term, total in (("tu", 1.4), ("it", 3.0), ("iu", 0.6)):
    np.testing.assert_allclose(metrics[f"{term}_loss_sum"], total * factor, rtol=1e-5)
    assert int(metrics[f"{term}_pairs"]) == 2


@pytest.mark.parametrize("mining", ["all", "hardest"])
def test_hand_computed_directions_differ(mining):
  """Text-user only, margin 0.5, where one hinge of each direction is inactive.

  t0=(1,0) u0=(1,0): S=1;  t1=(0,1) u1=(.6,.8): S=.8.
  Text anchors (Eq. 4): t0 vs u1: .5-1+.6 = .1;  t1 vs u0: .5-.8+0 < 0 -> 0.  Sum .1
  User anchors:         u0 vs t1: .5-1+0 < 0 -> 0;  u1 vs t0: .5-.8+.6 = .3.  Sum .3
  """
  emb = {"text": np.array([[1, 0], [0, 1]], np.float32),
         "user": np.array([[1, 0], [.6, .8]], np.float32),
         "image": np.array([[1, 0], [0, 1]], np.float32)}
  batch = {"text_mask": np.ones((2, 3), bool), "image_mask": np.zeros(2, bool),
           "user": np.array([3, 4], np.int32),
           "text_hash": np.array([10, 11], np.int32),
           "image_id": np.array([-1, -1], np.int32)}
  for directions, total in (("one", 0.1), ("both", 0.4)):
    loss, metrics = loss_fn(emb, batch, (1.0, 0.0), mining, margin=0.5,
                            directions=directions)
    np.testing.assert_allclose(metrics["tu_loss_sum"], total, rtol=1e-5)
    np.testing.assert_allclose(loss, total / 2, rtol=1e-5)


@pytest.mark.parametrize("directions", DIRECTIONS)
def test_same_user_is_never_a_negative(directions):
  """A user's other post is no TU negative, however close its text is."""
  rng = np.random.default_rng(1)
  emb = make_emb(rng, 2)
  emb["user"][1] = emb["user"][0]              # one user, one embedding
  batch = {"text_mask": np.ones((2, 3), bool), "image_mask": np.zeros(2, bool),
           "user": np.array([5, 5], np.int32),
           "text_hash": np.array([10, 11], np.int32),
           "image_id": np.array([-1, -1], np.int32)}
  near = dict(emb, text=emb["text"].copy())
  near["text"][1] = unit(emb["user"][0] + 1e-3 * rng.normal(size=8))
  for e in (emb, near):
    _, metrics = loss_fn(e, batch, (1.0, 0.0), "hardest", directions=directions)
    assert int(metrics["tu_pairs"]) == 2
    assert float(metrics["tu_loss_sum"]) == 0.0
  # Were the two posts by different users, each text would have a hinge of at
  # least the margin (its user's embedding is the other's), and the near text
  # a big one as a user anchor's negative.
  other = dict(batch, user=np.array([5, 6], np.int32))
  _, metrics = loss_fn(near, other, (1.0, 0.0), "hardest", directions=directions)
  assert float(metrics["tu_loss_sum"]) > {"one": 2 * MARGIN - 1e-5, "both": 1.0}[directions]
  np.testing.assert_allclose(
      metrics["tu_loss_sum"],
      ref_terms(near, other, mining="hardest", directions=directions)["tu"][0], rtol=1e-5)


@pytest.mark.parametrize("directions", DIRECTIONS)
@pytest.mark.parametrize("mining", ["all", "hardest"])
def test_repeated_user_in_random_batch(mining, directions):
  """Text of user 0's other post moved onto anchor 0's user: still the reference."""
  rng = np.random.default_rng(0)
  batch, emb = make_batch(rng, 12), make_emb(rng, 12)
  other = 6                                    # user[6] == user[0]
  assert batch["user"][other] == batch["user"][0]
  assert batch["text_mask"][other].any()
  emb["text"][other] = unit(emb["user"][0] + 1e-3 * rng.normal(size=8))
  _, metrics = loss_fn(emb, batch, (1.0, 0.0), mining, directions=directions)
  tu_sum = ref_terms(emb, batch, mining=mining, directions=directions)["tu"][0]
  np.testing.assert_allclose(metrics["tu_loss_sum"], tu_sum, rtol=1e-5)
  # The exclusion matters here: as another user's post it would add hinges.
  relabelled = dict(batch, user=np.where(np.arange(12) == other, 99, batch["user"]))
  assert ref_terms(emb, relabelled, mining=mining,
                   directions=directions)["tu"][0] > tu_sum + 0.1


@pytest.mark.parametrize("directions", DIRECTIONS)
@pytest.mark.parametrize("missing", ["image", "text", "both"])
def test_empty_terms(missing, directions):
  """Terms without positive pairs give 0: finite loss and finite gradients."""
  rng = np.random.default_rng(2)
  batch, emb = make_batch(rng, 8), make_emb(rng, 8)
  if missing in ("image", "both"):
    batch["image_mask"][:] = False
    batch["image_id"][:] = -1
  if missing in ("text", "both"):
    batch["text_mask"][:] = False
  empty = {"image": ("it", "iu"), "text": ("tu", "it"),
           "both": ("tu", "it", "iu")}[missing]
  for mining in ("all", "hardest"):
    for lambdas in ((0.1, 0.45), (0.0, 0.0), (1.0, 0.0)):
      loss, metrics = loss_fn(emb, batch, lambdas, mining, directions=directions)
      assert np.isfinite(loss)
      np.testing.assert_allclose(
          loss, ref_loss(emb, batch, lambdas, mining=mining, directions=directions),
          rtol=1e-5, atol=1e-7)
      for term in empty:
        assert int(metrics[f"{term}_pairs"]) == 0
        assert float(metrics[f"{term}_loss_sum"]) == 0.0
      grads = grad_fn(emb, batch, lambdas, mining, directions=directions)
      assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  if missing == "both":
    assert float(loss_fn(emb, batch, (0.0, 0.0), directions=directions)[0]) == 0.0


@pytest.mark.parametrize("directions", DIRECTIONS)
def test_content_of_posts_matches_reference(directions):
  """Merged content: the "text" row is present when the post has a text or an
  image, which the reference sees as a batch whose every such post has text."""
  rng = np.random.default_rng(6)
  batch, emb = make_batch(rng, 12), make_emb(rng, 12)
  merged = dict(batch, text_mask=batch["text_mask"].copy())
  merged["text_mask"][:, 0] |= batch["image_mask"]
  assert (merged["text_mask"].any(-1) != batch["text_mask"].any(-1)).any()
  expected = ref_terms(emb, merged, directions=directions)
  for chunk in (0, 4):
    _, metrics = losses.du2mce_loss(to_jnp(emb), to_jnp(batch), lambdas=(0.1, 0.45),
                                    margin=MARGIN, mining="all", directions=directions,
                                    candidate_chunk=chunk, content_of_posts=True)
    for term, (total, pairs) in expected.items():
      np.testing.assert_allclose(metrics[f"{term}_loss_sum"], total, rtol=1e-5)
      assert int(metrics[f"{term}_pairs"]) == pairs


def test_term_weights():
  """Valid (l1, l2) give (l1, l2, 1-l1-l2); anything else is refused."""
  w = losses.term_weights(0.1, 0.45)
  assert w["tu"] == 0.1 and w["it"] == 0.45
  np.testing.assert_allclose(w["iu"], 0.45)
  assert losses.term_weights(1, 0) == {"tu": 1, "it": 0, "iu": 0}
  for l1, l2 in ((-0.1, 0.5), (0.2, 1.1), (0.6, 0.5), (1.0, 0.01)):
    with pytest.raises(ValueError):
      losses.term_weights(l1, l2)


# ---------------------------------------------------------------- four devices

@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices (tests/conftest.py sets XLA_FLAGS)")
  return Mesh(np.array(jax.devices()[:4]), ("data",))


def shard(mesh, tree):
  """Places every leaf split along its first axis over the mesh."""
  sharding = NamedSharding(mesh, P("data"))
  return jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), sharding), tree)


def sharded_loss(mesh, emb, batch, lambdas, mining, chunk=0, directions="one"):
  """(per-device local losses [4], psum'ed metrics) under shard_map."""
  def f(e, b):
    loss, metrics = losses.du2mce_loss(e, b, lambdas=lambdas, margin=MARGIN,
                                       mining=mining, directions=directions,
                                       axis_name="data", candidate_chunk=chunk)
    return loss[None], metrics
  f = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("data"), P("data")),
                            out_specs=(P("data"), P())))
  return f(shard(mesh, emb), shard(mesh, batch))


def sharded_grad(mesh, emb, batch, lambdas, mining, chunk=0, directions="one"):
  """Gradient wrt the (sharded) embeddings of the per-device local loss."""
  def f(e, b):
    local = lambda e: losses.du2mce_loss(e, b, lambdas=lambdas, margin=MARGIN,
                                         mining=mining, directions=directions,
                                         axis_name="data", candidate_chunk=chunk)[0]
    return jax.grad(local)(e)
  f = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("data"), P("data")),
                            out_specs=P("data")))
  return f(shard(mesh, emb), shard(mesh, batch))


@pytest.mark.parametrize("directions", DIRECTIONS)
@pytest.mark.parametrize("mining", ["all", "hardest"])
@pytest.mark.parametrize("lambdas", [(0.1, 0.45), (1.0, 0.0)])
def test_four_devices_match_one(mesh, mining, lambdas, directions):
  """Global batch of 16, 4 per device: loss, metrics and gradient as on one."""
  rng = np.random.default_rng(3)
  batch, emb = make_batch(rng, 16), make_emb(rng, 16)
  kw = dict(directions=directions)
  local, metrics = sharded_loss(mesh, emb, batch, lambdas, mining, **kw)
  one_loss, one_metrics = loss_fn(emb, batch, lambdas, mining, **kw)
  expected = ref_loss(emb, batch, lambdas, mining=mining, **kw)
  np.testing.assert_allclose(np.sum(local), expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], one_loss, rtol=1e-5)
  for name, value in one_metrics.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5)

  grads = sharded_grad(mesh, emb, batch, lambdas, mining, **kw)
  one_grads = grad_fn(emb, batch, lambdas, mining, **kw)
  for m in emb:
    assert grads[m].shape == emb[m].shape
    np.testing.assert_allclose(grads[m], one_grads[m], atol=1e-5)


@pytest.mark.parametrize("directions", DIRECTIONS)
def test_remote_hard_negative_is_used(mesh, directions):
  """Anchor 0's hardest negative lives on device 3 (global row 13): for "one"
  text 0's hardest user, for "both" also user 0's hardest text (the reverse
  direction, through the all-to-all)."""
  rng = np.random.default_rng(4)
  batch, emb = make_batch(rng, 16), make_emb(rng, 16)
  remote = 13
  assert batch["text_mask"][remote].any() and batch["text_mask"][0].any()
  assert batch["user"][remote] != batch["user"][0]
  assert batch["text_hash"][remote] != batch["text_hash"][0]
  moved, anchor = {"one": ("user", "text"), "both": ("text", "user")}[directions]
  emb[moved][remote] = unit(emb[anchor][0] + 1e-2 * rng.normal(size=8))
  kw = dict(lambdas=(0.1, 0.45), mining="hardest", directions=directions)
  on_device = np.arange(16) // 4

  _, metrics = sharded_loss(mesh, emb, batch, **kw)
  expected = ref_loss(emb, batch, **kw)
  local_only = ref_loss(emb, batch, groups=on_device, **kw)
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  assert abs(expected - local_only) > 1e-2
  assert not np.isclose(float(metrics["loss"]), local_only, rtol=1e-3)

  row = np.asarray(sharded_grad(mesh, emb, batch, **kw)[moved][remote])
  assert np.abs(row).max() > 1e-3
  np.testing.assert_allclose(row, ref_grad_row(emb, batch, moved, remote, **kw),
                             atol=1e-4)
  local_row = ref_grad_row(emb, batch, moved, remote, groups=on_device, **kw)
  assert np.abs(row - local_row).max() > 1e-3


@pytest.mark.parametrize("directions", DIRECTIONS)
@pytest.mark.parametrize("mining", ["all", "hardest"])
def test_candidate_chunks_match_reference_on_one_and_four_devices(mesh, mining, directions):
  """Scanning candidates in chunks changes memory, not the loss or its gradient."""
  rng = np.random.default_rng(5)
  lambdas = (0.2, 0.5)
  batch, emb = make_batch(rng, 16), make_emb(rng, 16)
  kw = dict(directions=directions)
  expected = ref_loss(emb, batch, lambdas, mining=mining, **kw)
  full_grads = grad_fn(emb, batch, lambdas, mining, **kw)
  loss, _ = loss_fn(emb, batch, lambdas, mining, chunk=4, **kw)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  chunk_grads = grad_fn(emb, batch, lambdas, mining, chunk=4, **kw)
  _, metrics = sharded_loss(mesh, emb, batch, lambdas, mining, chunk=8, **kw)
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  sharded = sharded_grad(mesh, emb, batch, lambdas, mining, chunk=8, **kw)
  for m in emb:
    np.testing.assert_allclose(chunk_grads[m], full_grads[m], atol=1e-5)
    np.testing.assert_allclose(sharded[m], full_grads[m], atol=1e-5)


def test_candidate_chunk_must_divide_the_global_batch():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="candidate_chunk=5"):
    loss_fn(make_emb(rng, 12), make_batch(rng, 12), (0.1, 0.45), chunk=5)


@pytest.mark.parametrize("directions", DIRECTIONS)
def test_candidate_chunks_bound_the_memory(directions):
  """Compiled temp memory of the loss gradient: O(b x G) full, O(b x chunk) chunked."""
  rng = np.random.default_rng(0)
  batch, emb = to_jnp(make_batch(rng, 2048)), to_jnp(make_emb(rng, 2048, 16))
  temp = {}
  for chunk in (0, 128):
    f = lambda e, chunk=chunk: losses.du2mce_loss(
        e, batch, lambdas=(0.1, 0.45), margin=MARGIN, mining="all",
        directions=directions, candidate_chunk=chunk)[0]
    temp[chunk] = jax.jit(jax.grad(f)).lower(emb).compile().memory_analysis() \
        .temp_size_in_bytes
  assert temp[0] > 2048 * 2048 * 4            # at least one [G, G] f32 matrix
  assert temp[128] < temp[0] / 16
