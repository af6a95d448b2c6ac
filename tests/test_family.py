"""The family models through the shared trainer: 4 devices = 1 device, and each
config trains end to end on the embedded corpus and beats random."""

import chex
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import amnl, cdl, dsempre
from sempre_jax import mesh as mesh_lib, train
from sempre_jax.experiment import Experiment
from tests import conftest

CONFIGS = {"dsempre": dsempre, "cdl": cdl, "amnl": amnl}


def tiny(name: str):
  """A family config small enough for seconds on a CPU."""
  config = CONFIGS[name].get_config()
  config.data.embedded.update(num_users=60, num_topics=6, posts_per_user=30,
                              feature_dim=32, signal=1.0, followees=6)
  if config.data.embedded.image_size:
    config.data.embedded.image_size = 16
  config.data.interactions.update(semantic_clusters=24 if config.data.interactions.semantic_clusters
                                  else 0)
  model = {"dsempre": dict(embed_dim=32, word_dim=16, user_hidden=32, branch_dim=32,
                           conv_channels=(8, 8, 16, 16, 16)),
           "cdl": dict(embed_dim=32, image_width=1 / 16, user_hidden=(32,)),
           "amnl": dict(embed_dim=32, lstm_dim=16, word_dim=16)}[name]
  config.model.update(model)
  config.update(batch_size=64, log_every_steps=1000, checkpoint_every_steps=1000)
  if name == "amnl":
    config.learning_rate = 0.01      # a few steps on a tiny corpus
  for block in config.evals.values():
    block.update(batch_size=256, max_candidates=200)
  return config


@pytest.mark.parametrize("name", ["dsempre", "amnl"])
def test_four_devices_match_one_device(tmp_path, name):
  """Gradients summed over the mesh, BatchNorm statistics synchronised."""
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices")
  config = tiny(name)
  if name == "dsempre":
    config.model.dropout = 0.0           # dropout masks differ per device by design
  exp = Experiment(config, *conftest.prepared(config, tmp_path), str(tmp_path))
  batch = next(iter(exp.data.train_dataset(32, 0, 1)))
  variables = exp.init_variables(jax.random.key(0), batch)
  tx = train.make_optimizer(config, 10)
  out = {}
  for n in (1, 4):
    mesh = mesh_lib.make_mesh(n)
    state = jax.device_put(train.create_train_state(jax.tree.map(np.array, variables), tx),
                           NamedSharding(mesh, P()))
    step, zero_sums = train.make_train_step(exp.loss_fn(exp.stages(10)[0]), mesh)
    sums = zero_sums(state, mesh_lib.shard_batch(mesh, batch))
    for _ in range(2):
      state, sums = step(state, sums, mesh_lib.shard_batch(mesh, batch))
    out[n] = (float(sums["loss"]) / 2, mesh_lib.to_host(state.variables()))
  assert out[1][0] > 0
  np.testing.assert_allclose(out[4][0], out[1][0], rtol=1e-4)
  chex.assert_trees_all_close(out[4][1], out[1][1], atol=2e-4)


@pytest.mark.parametrize("name", ["dsempre", "cdl", "amnl"])
def test_config_trains_end_to_end(tmp_path, name):
  """launch/train.py's path on a tiny corpus: triplets, validation, best checkpoint,
  test metrics; the model ranks the held-out actions above random."""
  config = tiny(name)
  config.num_epochs = 6
  if "val" in config.evals:
    config.evals.val.every_steps = 10
  state, results = conftest.run(config, tmp_path)
  results = results["test"]
  assert int(state.step) > 0 and results["users"] > 10
  assert results["AUC"] > 0.55, results
  assert results["oracle"]["AUC"] > 0.5         # the planted odds, ranked the same way
  if name != "amnl":
    # AMNL's candidates are the followees' posts, which share the user's topics: on
    # this corpus even the planted odds rank no better than random at the top (test
    # R@3 0.077 against 0.085), so AMNL is judged by its AUC, above the oracle's.
    at = config.evals.test.at[-1]
    assert results[f"R@{at}"] > results[f"random_R@{at}"], results
  else:
    assert results["AUC"] > results["oracle"]["AUC"], results
