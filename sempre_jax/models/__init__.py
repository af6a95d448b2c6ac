"""Which models exist, and what must a model provide?

A model is one module of this package, registered by one line in REGISTRY
(`config.model.name` -> its import path; imported on first use). It
satisfies the `ModelDef` protocol below: what it trains on (DATA), how its
Flax module is built and initialised, and the per-device loss of a training
step. The trainer (sempre_jax/train.py) and the evaluators
(sempre_jax/evals/) use nothing else. Adding a model: a file here, a line in
REGISTRY, a config file in configs/ (docs/models.md walks through it).

  du2mce    DU2MCE (Sikka et al. 2019): text, image and user towers into one
            space, the pairwise hinge mixture over the global batch. DATA = "posts".
  dsempre   D-Sempre (Ma & Chen 2018): bag-of-clusters users and ConvNet+text
            posts in a Euclidean space, triplet hinges. DATA = "triplets".
  cdl       CDL (Lei et al. 2016): comparative deep learning of preferred
            images, a learned weighted distance. DATA = "triplets".
  amnl      AMNL (Zhao et al. 2018): followee attention, multi-faceted
            ranking of re-shares. DATA = "triplets".

Shared building blocks live in encoders.py (text, image and user encoders)
and triplets.py (the step loss of the triplet models).
"""

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import flax.linen as nn
import jax
import ml_collections

REGISTRY: dict[str, Any] = {
    "du2mce": "sempre_jax.models.du2mce",
    "dsempre": "sempre_jax.models.dsempre",
    "cdl": "sempre_jax.models.cdl",
    "amnl": "sempre_jax.models.amnl",
}

# loss_fn(variables, local batch, rng) -> (this device's share of the global
# loss, metrics psum'ed over the mesh, updates of non-parameter variables).
LossFn = Callable[[Mapping, Mapping, jax.Array], tuple[jax.Array, dict, dict]]


class ModelDef(Protocol):
  """What a registered model module provides.

  DATA    "posts": batches of posts from the shards (input_pipeline/loader.py:
          user, tokens, text_mask, text_hash, image_mask, image_id and
          image_features or image); the module's `embed_text(tokens, mask)`,
          `embed_image(image)` and `embed_user(users)` -> [N, D] serve the
          retrieval evaluator.
          "triplets": batches of (user, acted post, negative post) from the
          actions (input_pipeline/interactions.py); the module's
          `embed_users(users)`, `embed_posts(posts)` and `score(user_repr,
          post_repr) -> [n]` serve the recommendation evaluator.
  build   (config.model, sizes {num_users, vocab_size, feature_dim,
          num_clusters}, axis_name of the mesh for collectives) -> module.
  init    (module, rng, example batch [1, ...], config, data_dir) ->
          variables {"params": ..., maybe "batch_stats": ...}.
  loss_fn (module, config, stage loss settings: config.loss updated by the
          training stage) -> LossFn, run per device inside shard_map.
  """
  DATA: str

  def build(self, config: ml_collections.ConfigDict, sizes: Mapping[str, int],
            axis_name: str | None) -> nn.Module: ...

  def init(self, module: nn.Module, rng: jax.Array, example: Mapping,
           config: ml_collections.ConfigDict, data_dir: str) -> dict: ...

  def loss_fn(self, module: nn.Module, config: ml_collections.ConfigDict,
              loss: ml_collections.ConfigDict) -> LossFn: ...


DATA_KINDS = ("posts", "triplets")


def get(name: str) -> ModelDef:
  """The model registered as `name` (config.model.name)."""
  if name not in REGISTRY:
    raise ValueError(f"model.name must be one of {sorted(REGISTRY)}, got {name!r}")
  definition = REGISTRY[name]
  if isinstance(definition, str):
    definition = REGISTRY[name] = importlib.import_module(definition)
  if getattr(definition, "DATA", None) not in DATA_KINDS:
    raise TypeError(f"model {name!r} must set DATA to one of {DATA_KINDS}")
  return definition


def register(name: str, definition: ModelDef) -> None:
  """Adds a model under `name` (a module object or any object with the
  ModelDef attributes), e.g. from a test or a user's own package."""
  REGISTRY[name] = definition
