"""What does a model learn from, and how is it judged?

Two kinds of task share one trainer (sempre_jax/train.py):
  Retrieval       DU2MCE and its baselines: batches of posts from the shards,
                  the pairwise hinge mixture over the global batch (losses.py),
                  exact retrieval ranks (retrieval.py); model selection by the
                  paper's sum of normalised median ranks.
  Recommendation  D-Sempre, CDL, AMNL (config.model.name, a module of this
                  package): batches of (user, acted post, negative post)
                  triplets from the actions (input_pipeline/interactions.py),
                  the family's per-triplet loss, P@K / R@K / AUC per user
                  (recommendation.py); model selection by config.eval.select.
A task builds the model, the training iterator, the per-device loss of a step
and the evaluators. Training may run in stages (config.stages: the
Bridging-Modality baseline trains text-user, then image-text with the text
and user towers frozen).
"""

import dataclasses
import importlib
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from input_pipeline import interactions, loader, synthetic, word2vec
from sempre_jax import losses, mesh as mesh_lib
from sempre_jax.evals import recommendation, retrieval
from sempre_jax.models import du2mce

FAMILIES = ("dsempre", "cdl", "amnl")
CLUSTERS_FILE = "semantic_clusters.npy"


@dataclasses.dataclass(frozen=True)
class Stage:
  """A phase of training: steps up to `end_step`, these loss weights (l1, l2),
  these towers' parameters frozen."""
  end_step: int
  lambdas: tuple[float, float] = (0.0, 0.0)
  frozen: tuple[str, ...] = ()


def build(config: ml_collections.ConfigDict, data_dir: str, metadata: Mapping,
          workdir: str):
  """The task of config.model.name ("du2mce" or one of FAMILIES)."""
  name = config.model.get("name", "du2mce")
  if name == "du2mce":
    return Retrieval(config, data_dir, metadata)
  if name in FAMILIES:
    return Recommendation(config, data_dir, metadata, workdir)
  raise ValueError(f"model.name must be du2mce or one of {FAMILIES}, got {name!r}")


def _split_config(eval_config: ml_collections.ConfigDict, split: str):
  return ml_collections.ConfigDict({**eval_config.to_dict(), "split": split})


# =============================================================== retrieval ===

def du2mce_loss_fn(model, loss_config, lambdas: tuple[float, float], merged: bool = False):
  """loss_fn(variables, local batch, rng) -> (local share of Eq. 1, metrics, {})."""
  def loss_fn(variables, batch, rng):
    del rng
    loss, metrics = losses.du2mce_loss(
        model.apply(variables, batch), batch, lambdas=lambdas, margin=loss_config.margin,
        mining=loss_config.mining, axis_name=mesh_lib.AXIS,
        candidate_chunk=loss_config.candidate_chunk, content_of_posts=merged)
    return loss, metrics, {}
  return loss_fn


class Retrieval:
  """DU2MCE: posts in, exact retrieval ranks out."""
  unit = "posts"

  def __init__(self, config, data_dir: str, metadata: Mapping):
    self.config, self.data_dir, self.metadata = config, data_dir, metadata
    self.model = du2mce.build_model(config.model, metadata)
    self.num_train = metadata["splits"]["train"]["num_posts"]

  def train_iterator(self, batch_size: int, process_index: int, process_count: int):
    return loader.train_iterator(
        self.data_dir, self.metadata, batch_size=batch_size,
        image_input=self.config.model.image_input,
        image_key=du2mce.image_key(self.config.model.image_input), seed=self.config.seed,
        process_index=process_index, process_count=process_count)

  def init_variables(self, rng, example) -> dict:
    params = jax.jit(self.model.init)(rng, example)["params"]
    if self.config.model.init_from_word2vec and os.path.exists(
        os.path.join(self.data_dir, word2vec.INIT_FILE)):
      params = du2mce.init_from_word2vec(params, self.data_dir)
    return {"params": params}

  def stages(self, steps_per_epoch: int) -> list[Stage]:
    """config.stages ({"share" of num_epochs, "l1", "l2", "frozen"} each), or one stage."""
    loss = self.config.loss
    specs = self.config.get("stages") or [
        {"share": 1.0, "l1": loss.l1, "l2": loss.l2, "frozen": ()}]
    out, end = [], 0
    for s in specs:
      end += int(round(s["share"] * self.config.num_epochs * steps_per_epoch))
      out.append(Stage(end, (s["l1"], s["l2"]), tuple(s.get("frozen", ()))))
    return out

  def loss_fn(self, stage: Stage):
    return du2mce_loss_fn(self.model, self.config.loss, stage.lambdas,
                          self.config.model.get("merge_content", False))

  def evaluator(self, split: str, mesh):
    return retrieval.RetrievalEvaluator(_split_config(self.config.eval, split), self.model,
                                         self.data_dir, self.metadata, mesh)

  def selection_score(self, results: Mapping, stages) -> float:
    """The paper's selection (section 4.3) over the terms trained in any stage."""
    weights = {}
    for s in stages:
      for t, w in losses.term_weights(*s.lambdas).items():
        weights[t] = max(weights.get(t, 0.0), w)
    return retrieval.selection_metric(results, weights)

  def format(self, results: Mapping) -> str:
    return ("ranks are exact; random = the median rank of a random ranking\n"
            + retrieval.format_table(results))

  def scalars(self, results: Mapping) -> dict:
    out = {(t, k): v for t in retrieval.TASKS for k, v in results[t].items()}
    out[("joint_normalised_median_rank",)] = results["joint"]["normalised_median_rank"]
    return out


# ========================================================== recommendation ===

class Recommendation:
  """D-Sempre, CDL, AMNL: triplets in, per-user P@K / R@K / AUC out."""
  unit = "triplets"

  def __init__(self, config, data_dir: str, metadata: Mapping, workdir: str):
    self.config, self.data_dir = config, data_dir
    self.family = importlib.import_module(f"sempre_jax.models.{config.model.name}")
    self.image_key = du2mce.image_key(config.model.image_input)
    self.data = interactions.load(data_dir, metadata, self.image_key)
    ic = config.data.interactions
    self.splits = interactions.split_actions(self.data, ic.test, ic.validation,
                                             ic.images_only, ic.order_by, config.seed)
    self.num_train = len(self.splits["train"])
    self.clusters = self.bags = None
    if ic.semantic_clusters:
      self.clusters = self._clusters(metadata, workdir)
      self.bags = interactions.user_bags(self.data, self.clusters, ic.semantic_clusters)
    sizes = {"num_users": metadata["num_users"], "vocab_size": metadata["vocab_size"],
             "feature_dim": metadata["feature_dim"], "num_clusters": ic.semantic_clusters}
    self.model = self.family.build(config.model, sizes, axis_name=mesh_lib.AXIS)

  def _clusters(self, metadata, workdir: str) -> np.ndarray:
    """Semantic clusters of the posts, computed once per workdir (process 0)."""
    path = os.path.join(workdir, CLUSTERS_FILE)
    if not os.path.exists(path) and jax.process_index() == 0:
      ic = self.config.data.interactions
      np.save(path, interactions.semantic_clusters(
          self.data, metadata["vocab_size"], ic.semantic_clusters, seed=self.config.seed))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("semantic clusters")
    return np.load(path)

  def train_iterator(self, batch_size: int, process_index: int, process_count: int):
    ic = self.config.data.interactions
    negatives = interactions.Negatives(self.data, self.splits["train"], ic.negatives,
                                       ic.window_minutes, ic.images_only)
    return interactions.TripletIterator(
        self.data, self.splits["train"], negatives,
        batch_size=batch_size * process_count, image_key=self.image_key,
        seed=self.config.seed, bags=self.bags,
        clusters=self.clusters if self.config.model.get("semantic_triplets") else None,
        process_index=process_index, process_count=process_count)

  def init_variables(self, rng, example) -> dict:
    init = jax.jit(lambda r, b: self.model.init({"params": r, "dropout": r}, b, train=False))
    return dict(init(rng, example))

  def stages(self, steps_per_epoch: int) -> list[Stage]:
    return [Stage(int(self.config.num_epochs * steps_per_epoch))]

  def loss_fn(self, stage: Stage):
    del stage
    return self._loss

  def _loss(self, variables, batch, rng):
    """(local share of the mean per-triplet loss + L2, metrics, model-state updates)."""
    mutable = [k for k in variables if k != "params"]
    out, updates = self.model.apply(variables, batch, train=True, rngs={"dropout": rng},
                                    mutable=mutable)
    per, terms = self.family.per_example_loss(out, batch, self.config)
    n_dev = jax.lax.psum(1, mesh_lib.AXIS)
    count = per.shape[0] * n_dev
    loss = per.sum() / count
    l2 = self.config.loss.get("l2", 0.0)
    if l2:
      loss += 0.5 * l2 * sum(jnp.sum(p * p) for p in jax.tree.leaves(variables["params"])) / n_dev
    metrics = {"loss": jax.lax.psum(loss, mesh_lib.AXIS)}
    for name, value in terms.items():
      metrics[f"{name}_loss_sum"] = jax.lax.psum(value.sum(), mesh_lib.AXIS)
      metrics[f"{name}_pairs"] = count
    return loss, metrics, updates

  def evaluator(self, split: str, mesh):
    del mesh   # the per-user scoring is small: one device per process
    ic = self.config.data.interactions
    oracle = os.path.join(self.data_dir, synthetic.ORACLE_FILE)
    return recommendation.RecommendationEvaluator(
        _split_config(self.config.eval, split), self.model, self.data, self.splits, split,
        image_key=self.image_key, bags=self.bags, images_only=ic.images_only,
        oracle=synthetic.Oracle.load(oracle) if os.path.exists(oracle) else None)

  def selection_score(self, results: Mapping, stages) -> float:
    del stages
    return -results[self.config.eval.select]

  def format(self, results: Mapping) -> str:
    return recommendation.format_table(results, tuple(self.config.eval.at))

  def scalars(self, results: Mapping) -> dict:
    return {(k,): v for k, v in results.items() if isinstance(v, float)}
