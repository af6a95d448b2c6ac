"""Adding a model or an evaluator is one definition plus one registry line: a toy
model registered from this file trains through the real trainer, and a toy
evaluator runs during training and selects the best checkpoint."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from input_pipeline import records
from sempre_jax import checkpoints, evals, mesh as mesh_lib, models, train
from sempre_jax.models import encoders


class ToyModule(nn.Module):
  """A user table and a bag-of-words text tower."""
  num_users: int
  vocab_size: int
  embed_dim: int = 8

  def setup(self):
    self.user = nn.Embed(self.num_users, self.embed_dim)
    self.word = nn.Embed(self.vocab_size, self.embed_dim)

  def __call__(self, batch):
    words = self.word(batch["tokens"]) * batch["text_mask"][..., None]
    return {"text": encoders.l2_normalize(words.sum(1)),
            "user": encoders.l2_normalize(self.user(batch["user"]))}


class Toy:
  """A ModelDef: pulls each text towards its author (a squared distance)."""
  DATA = "posts"

  @staticmethod
  def build(config, sizes, axis_name):
    del axis_name
    return ToyModule(sizes["num_users"], sizes["vocab_size"], config.embed_dim)

  @staticmethod
  def init(module, rng, example, config, data_dir):
    del config, data_dir
    return module.init(rng, example)

  @staticmethod
  def loss_fn(module, config, loss):
    def fn(variables, batch, rng):
      del rng
      emb = module.apply(variables, batch)
      per = jnp.sum((emb["text"] - emb["user"]) ** 2, -1)
      n = jax.lax.psum(per.shape[0], mesh_lib.AXIS)
      value = loss.weight * per.sum() / n
      return value, {"loss": jax.lax.psum(value, mesh_lib.AXIS)}, {}
    return fn


class CountingEvaluator:
  """An evaluator type: its score falls with each run, so the last run is best."""
  runs = 0

  def __init__(self, config, exp, mesh):
    del exp, mesh
    self.config = config

  def run(self, variables):
    CountingEvaluator.runs += 1
    return {"run": CountingEvaluator.runs,
            "norm": float(sum(np.abs(np.asarray(x)).sum()
                              for x in jax.tree.leaves(variables["params"])))}

  def score(self, results):
    return -float(results["run"])

  def format(self, results):
    return f"run {results['run']}"

  def scalars(self, results):
    return {("norm",): results["norm"]}


def test_a_registered_model_and_evaluator_train_through_the_trainer(tmp_path, toy_data):
  models.register("toy", Toy())
  evals.register("counting", type("Counting", (), {"build": CountingEvaluator}))
  config = ml_collections.ConfigDict({
      "seed": 0, "num_devices": 2, "batch_size": 16, "num_epochs": 2,
      "learning_rate": 0.1, "lr_decay": 1.0, "lr_decay_epochs": 1, "optimizer": "adam",
      "model": {"name": "toy", "embed_dim": 8, "image_input": "features"},
      "data": {"dir": toy_data[0]}, "loss": {"weight": 1.0}, "stages": (),
      "log_every_steps": 1, "checkpoint_every_steps": 100, "keep_checkpoints": 1,
      "evals": {"count": {"type": "counting", "split": "train", "every_steps": 1}},
      "best": "count"})
  workdir = str(tmp_path / "work")
  state, _ = train.train_and_evaluate(config, workdir, *toy_data)
  assert int(state.step) == 4
  # Each step moved the toy's parameters, and the toy evaluator ran at every step:
  # the best checkpoint (the lowest score) is the last one, kept beside the latest.
  assert CountingEvaluator.runs == 4
  assert checkpoints.find_step(workdir, "best") == 4
  before = Toy.init(Toy.build(config.model, toy_data[1], None), jax.random.key(0),
                    {"user": np.zeros(1, np.int32),
                     "tokens": np.zeros([1, records.MAX_LEN], np.int32),
                     "text_mask": np.zeros([1, records.MAX_LEN], bool)}, config, "")
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), state.params,
                       before["params"])
  assert min(jax.tree.leaves(moved)) > 0


def test_an_unknown_model_or_evaluator_is_a_one_line_error():
  with pytest.raises(ValueError, match="model.name must be one of"):
    models.get("nope")
  with pytest.raises(ValueError, match="evaluator type must be one of"):
    evals.get("nope")
