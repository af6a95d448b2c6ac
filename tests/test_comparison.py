"""DU2MCE's baselines as configs (merged, bridging, average users) and the comparison table."""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import du2mce
from sempre_jax import losses, mesh as mesh_lib, train
from sempre_jax.analysis import comparison
from sempre_jax.experiment import Experiment
from tests import conftest

TINY = {"data.embedded.num_users": 30, "data.embedded.num_topics": 6,
        "data.embedded.posts_per_user": 30, "data.embedded.feature_dim": 16,
        "data.embedded.signal": 1.0, "model.embed_dim": 16, "model.word_dim": 8,
        "model.user_dim": 8, "model.text_filters": (8, 8, 8), "batch_size": 64,
        "num_epochs": 10, "learning_rate": 0.01, "log_every_steps": 1000,
        "evals.val.batch_size": 128, "evals.test.batch_size": 128, "evals.val.every_steps": 0}


def _experiment(tmp_path, variant):
  """(experiment of a tiny `variant` config, one training batch)."""
  config = du2mce.get_config(variant)
  config.data.embedded.update(num_users=10, num_topics=3, posts_per_user=8, feature_dim=8)
  config.model.update(embed_dim=8, word_dim=4, user_dim=4, text_filters=(4, 4, 4))
  exp = Experiment(config, *conftest.prepared(config, tmp_path), str(tmp_path))
  return exp, exp.data.host_inputs(next(iter(exp.data.train_dataset(16, 0, 1))))


def test_frozen_towers_do_not_move(tmp_path):
  exp, batch = _experiment(tmp_path, "bridging")
  stage = exp.stages(10)[1]                   # image-text, text and user frozen
  mesh = mesh_lib.make_mesh(1)
  state = jax.device_put(train.create_train_state(
      exp.init_variables(jax.random.key(0), batch),
      train.make_optimizer(exp.config, 10, stage.frozen)), NamedSharding(mesh, P()))
  before = jax.tree.map(np.asarray, state.params)
  step, zero_sums = train.make_train_step(exp.loss_fn(stage), mesh)
  sums = zero_sums(state, mesh_lib.shard_batch(mesh, batch))
  for _ in range(2):
    state, sums = step(state, sums, mesh_lib.shard_batch(mesh, batch))
  after = jax.tree.map(np.asarray, state.params)
  for tower in ("text", "user"):
    jax.tree.map(np.testing.assert_array_equal, after[tower], before[tower])
  assert np.abs(after["image"]["proj"]["kernel"] - before["image"]["proj"]["kernel"]).max() > 0


def test_merged_content_pairs_every_post_with_its_user(tmp_path):
  exp, batch = _experiment(tmp_path, "merged")
  model = exp.module
  variables = model.init(jax.random.key(0), batch)
  emb = model.apply(variables, batch)
  plain = model.clone(merge_content=False).apply(variables, batch)
  has_t, has_i = batch["text_mask"].any(1), batch["image_mask"].astype(bool)
  want = np.where(has_t[:, None], plain["text"], 0) + np.where(has_i[:, None], plain["image"], 0)
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  np.testing.assert_allclose(emb["text"], want, atol=1e-5)
  _, metrics = losses.du2mce_loss(emb, batch, lambdas=(1.0, 0.0), margin=0.2, mining="all",
                                  content_of_posts=True)
  assert int(metrics["tu_pairs"]) == int((has_t | has_i).sum())


def test_compare_lays_out_blocks_and_marks_zero_shot(tmp_path, capsys):
  specs = ["configs/du2mce.py:tu", "configs/du2mce.py:avg_text"]
  runs = comparison.run_all(specs, str(tmp_path), TINY)
  table = comparison.format_tables(runs)
  lines = {l.split()[0]: l for l in table.splitlines() if l.split()}
  assert "*" not in lines["du2mce:tu"].split()[1]            # text->user trained
  assert lines["du2mce:tu"].split()[3].endswith("*")         # image->user zero-shot
  assert lines["du2mce:avg_text"].split()[1].endswith("+")   # users averaged from texts
  assert len(list(tmp_path.glob("corpus*"))) == 1            # one shared corpus
  tu, avg = runs[0].results, runs[1].results
  # Each beats random on the pair it trained: text->user for tu, image->text for avg_text.
  assert tu["text->user"]["median_rank"] < 0.5 * tu["text->user"]["random_median_rank"]
  assert avg["image->text"]["median_rank"] < 0.5 * avg["image->text"]["random_median_rank"]
  # Average-of-texts users reach text->user without a user tower.
  assert avg["text->user"]["median_rank"] < 0.5 * avg["text->user"]["random_median_rank"]
