"""How does CDL rank images for a user?

Comparative Deep Learning (Lei et al., CVPR 2016): a dual-net network maps a
user u and an image x into one 1024-d space (ReLU networks with linear
outputs, not normalised), and a distance sub-network learns a weighted squared
L2 distance

  D(u, x) = sum_k w_k * dropout((u_k - x_k)^2) + c,   w_k = softplus(v_k) >= 0

(the paper's element-wise squared difference and one fully connected layer to
a scalar; w is kept non-negative via softplus so D stays a distance; c cancels
in the comparative loss). A training triplet is (u, x+, x-): the user acted on
x+, not on x-. With D+ = D(u, x+) and D- = D(u, x-):

  Eq. 3-5 ("cdl")  P(x+ preferred over x- | u) = sigmoid(D- - D+),
                   loss = -log sigmoid(D- - D+)
  "hinge"          loss = max(0, margin + D+ - D-)
  "twonets"        the paper's non-comparative baseline on pairs:
                   P(u likes x) = sigmoid(-D(u, x)) (the bias -c of the distance
                   layer is the pair model's bias b), binary cross-entropy on
                   (u, x+, 1) and (u, x-, 0), summed per triplet.

score(u, x) = -D(u, x) without dropout: higher is more preferred.
"""

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sempre_jax.models import encoders, triplets


VARIANTS = ("cdl", "hinge", "twonets")
# AlexNet's convolutions (features, kernel, stride) and which are followed by a
# 3x3 / stride-2 max-pool; SAME padding, so 32-px images reach the dense layers.
ALEXNET_CONVS = ((96, 11, 4), (256, 5, 1), (384, 3, 1), (384, 3, 1), (256, 3, 1))
ALEXNET_POOLED = (0, 1, 4)
ALEXNET_DENSE = (4096, 4096)
# He initialisation keeps the scale of activations through the ReLU stacks.
RELU_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def check_variant(variant: str) -> None:
  """Raises ValueError unless variant is one of VARIANTS."""
  if variant not in VARIANTS:
    raise ValueError(f"loss.variant must be one of {VARIANTS}, got {variant!r}")


def scaled(width: int, factor: float) -> int:
  """A layer width times the config's width factor, at least 1."""
  return max(1, round(width * factor))


def dense_stack(x: jnp.ndarray, hidden, out_dim: int, dtype, first: int) -> jnp.ndarray:
  """Dense layers of widths `hidden` (ReLU), then a linear one to out_dim, named
  fc{first}, fc{first + 1}, ...; called inside a compact method. [B, out_dim] float32."""
  for i, features in enumerate(hidden):
    x = nn.relu(nn.Dense(features, kernel_init=RELU_INIT, dtype=dtype,
                         name=f"fc{first + i}")(x))
  x = nn.Dense(out_dim, kernel_init=RELU_INIT, dtype=dtype, name=f"fc{first + len(hidden)}")(x)
  return x.astype(jnp.float32)


class ImageSubnet(nn.Module):
  """The image sub-network: uint8 pixels [B, H, W, 3] through AlexNet's 5
  convolutions (ReLU) and 3 max-pools ("pixels"), or frozen-CNN features [B, F]
  ("features"), then fc6, fc7 (ReLU) and a linear fc8 -> [B, D] float32."""
  embed_dim: int
  width: float = 1.0
  image_input: str = "pixels"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, image: jnp.ndarray) -> jnp.ndarray:
    x = image.astype(self.dtype)
    if self.image_input == "pixels":
      x = x / 127.5 - 1.0
      for i, (features, kernel, stride) in enumerate(ALEXNET_CONVS):
        x = nn.relu(nn.Conv(scaled(features, self.width), (kernel, kernel), (stride, stride),
                            kernel_init=RELU_INIT, dtype=self.dtype, name=f"conv{i + 1}")(x))
        if i in ALEXNET_POOLED:
          x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
      x = x.reshape(x.shape[0], -1)
    hidden = [scaled(features, self.width) for features in ALEXNET_DENSE]
    return dense_stack(x, hidden, self.embed_dim, self.dtype, first=6)


class UserSubnet(nn.Module):
  """The user sub-network: bag of clusters [B, K] -> Dense layers (ReLU) -> a
  linear one -> [B, D] float32."""
  embed_dim: int
  hidden: tuple = (1024,)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, bag: jnp.ndarray) -> jnp.ndarray:
    return dense_stack(bag.astype(self.dtype), self.hidden, self.embed_dim, self.dtype, first=1)


class WeightedSquaredDistance(nn.Module):
  """The distance sub-network: u, x [B, D] -> D(u, x) [B] float32.

  Parameters: kernel v [D] (the weights are softplus(v), initialised to 1/D so
  D starts as the mean squared difference) and bias c [].
  """
  dropout: float = 0.5

  @nn.compact
  def __call__(self, u: jnp.ndarray, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    dim = u.shape[-1]
    init = jnp.log(jnp.expm1(1.0 / dim))              # softplus(init) = 1 / D
    kernel = self.param("kernel", nn.initializers.constant(init), (dim,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (), jnp.float32)
    z = jnp.square(u.astype(jnp.float32) - x.astype(jnp.float32))
    z = nn.Dropout(self.dropout)(z, deterministic=not train)
    return z @ jax.nn.softplus(kernel) + bias


class CDL(nn.Module):
  """User and image sub-networks and the learned distance.

  num_users and vocab_size are unused (users enter as bags of clusters, posts
  as images); axis_name is unused (no BatchNorm).
  """
  num_users: int
  vocab_size: int
  embed_dim: int = 1024
  image_width: float = 1.0
  user_hidden: tuple = (1024,)
  dropout: float = 0.5
  image_input: str = "pixels"     # or "features"
  dtype: jnp.dtype = jnp.float32  # compute dtype; parameters stay float32
  axis_name: str | None = None

  def setup(self):
    encoders.check_image_input(self.image_input)
    self.image = ImageSubnet(self.embed_dim, self.image_width, self.image_input, self.dtype)
    self.user = UserSubnet(self.embed_dim, tuple(self.user_hidden), self.dtype)
    self.distance = WeightedSquaredDistance(self.dropout)

  def embed_users(self, users: Mapping[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """{"user_bag": [n, K], ...} -> {"user": [n, D]}."""
    return {"user": self.user(users["user_bag"])}

  def embed_posts(self, posts: Mapping[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """Post fields -> {"image": [n, D]} (posts without an image embed zeros)."""
    return {"image": self.image(posts[encoders.image_key(self.image_input)])}

  def score(self, user_repr, post_repr) -> jnp.ndarray:
    """-D(u_i, x_i) [n] without dropout: higher = more preferred."""
    return -self.distance(user_repr["user"], post_repr["image"], train=False)

  def __call__(self, batch: Mapping[str, jnp.ndarray], train: bool) -> dict[str, jnp.ndarray]:
    """Triplet batch -> {"user", "pos", "neg": [b, D]; "d_pos", "d_neg": [b]}.

    x+ and x- go through the image sub-network as one [2b] batch; each distance
    draws its own dropout mask.
    """
    key = encoders.image_key(self.image_input)
    images = jnp.concatenate([batch["pos"][key], batch["neg"][key]])
    pos, neg = jnp.split(self.embed_posts({key: images})["image"], 2)
    user = self.embed_users(batch)["user"]
    return {"user": user, "pos": pos, "neg": neg,
            "d_pos": self.distance(user, pos, train), "d_neg": self.distance(user, neg, train)}


def per_example_loss(out: Mapping[str, jnp.ndarray], batch: Mapping[str, jnp.ndarray],
                     config: ml_collections.ConfigDict):
  """The loss per triplet [b] and its terms {name: [b]}.

  out: CDL.__call__'s output; config: the job's config (reads
  config.model.loss.variant and .margin). Triplets whose x+ or x- has no image
  give 0 (loss and terms). Terms: the variant's loss ("cdl", "hinge", or
  "bce_pos" + "bce_neg"), "d_pos", "d_neg" and "correct" (1 where D+ < D-).
  """
  d_pos, d_neg = out["d_pos"], out["d_neg"]
  loss_config = config.model.loss
  check_variant(loss_config.variant)
  if loss_config.variant == "cdl":
    terms = {"cdl": jax.nn.softplus(d_pos - d_neg)}            # -log sigmoid(D- - D+)
  elif loss_config.variant == "hinge":
    terms = {"hinge": jax.nn.relu(loss_config.margin + d_pos - d_neg)}
  else:                                                        # twonets
    terms = {"bce_pos": jax.nn.softplus(d_pos),                # -log sigmoid(-D+)
             "bce_neg": jax.nn.softplus(-d_neg)}               # -log (1 - sigmoid(-D-))
  loss = sum(terms.values())
  terms.update(d_pos=d_pos, d_neg=d_neg, correct=(d_pos < d_neg).astype(jnp.float32))
  valid = batch["pos"]["image_mask"].astype(bool) & batch["neg"]["image_mask"].astype(bool)
  zero = lambda x: jnp.where(valid, x, 0.0).astype(jnp.float32)
  return zero(loss), {name: zero(x) for name, x in terms.items()}




def build(config: ml_collections.ConfigDict, sizes: Mapping[str, int],
          axis_name: str | None = None) -> CDL:
  """CDL from `config.model`-style settings, sized for a dataset (sizes:
  num_users, vocab_size, ...; the bag size K is read from the data)."""
  check_variant(config.loss.variant)
  return CDL(num_users=sizes["num_users"], vocab_size=sizes["vocab_size"],
             embed_dim=config.embed_dim,
             image_width=config.image_width, user_hidden=tuple(config.user_hidden),
             dropout=config.dropout, image_input=config.image_input,
             dtype=jnp.dtype(config.dtype), axis_name=axis_name)


DATA = triplets.DATA
init = triplets.init
loss_fn = triplets.make_loss_fn(per_example_loss)
