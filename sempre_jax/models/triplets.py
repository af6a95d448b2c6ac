"""How does a triplet model's per-triplet loss become the loss of a step?

D-Sempre, CDL and AMNL train on batches of triplets (user, acted post,
negative post) and define a loss per triplet. A step minimises their mean
over the global batch plus an optional L2 penalty on the parameters:

  L = 1/B * sum_{triplets t} loss_t  +  l2/2 * ||params||^2

Each device computes its share of L (its triplets' sum over B, and 1/n_dev of
the penalty), so the shares sum to L over the mesh. BatchNorm statistics (the
"batch_stats" collection) are the model-state updates of the step; dropout
draws from the step's rng.
"""

from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sempre_jax import mesh as mesh_lib

DATA = "triplets"

# per_example_loss(module outputs, local batch, config) -> (loss [b], {term: [b]})
PerExampleLoss = Callable[[Mapping, Mapping, ml_collections.ConfigDict],
                          tuple[jnp.ndarray, dict]]


def init(module: nn.Module, rng, example: Mapping, config: ml_collections.ConfigDict,
         data_dir: str) -> dict:
  """Variables of a triplet model (params, and batch_stats where it has BatchNorm)."""
  del config, data_dir
  return dict(jax.jit(lambda r, b: module.init({"params": r, "dropout": r}, b,
                                                train=False))(rng, example))


def make_loss_fn(per_example_loss: PerExampleLoss):
  """The ModelDef.loss_fn of a triplet model from its per-triplet loss."""
  def loss_fn(module: nn.Module, config: ml_collections.ConfigDict,
              loss_config: ml_collections.ConfigDict):
    l2 = loss_config.get("l2", 0.0)

    def fn(variables, batch, rng):
      """(local share of L, psum'ed metrics, model-state updates)."""
      mutable = [k for k in variables if k != "params"]
      out, updates = module.apply(variables, batch, train=True, rngs={"dropout": rng},
                                  mutable=mutable)
      per, terms = per_example_loss(out, batch, config)
      n_dev = jax.lax.psum(1, mesh_lib.AXIS)
      count = per.shape[0] * n_dev
      loss = per.sum() / count
      if l2:
        loss += 0.5 * l2 * sum(jnp.sum(p * p) for p in jax.tree.leaves(variables["params"])) \
            / n_dev
      metrics = {"loss": jax.lax.psum(loss, mesh_lib.AXIS)}
      for name, value in terms.items():
        metrics[f"{name}_loss_sum"] = jax.lax.psum(value.sum(), mesh_lib.AXIS)
        metrics[f"{name}_pairs"] = count
      return loss, metrics, updates
    return fn
  return loss_fn
