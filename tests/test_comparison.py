"""DU2MCE's baselines as configs (merged, bridging, average users) and the comparison table."""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import du2mce
from input_pipeline import embedded, loader, records
from sempre_jax import losses, mesh as mesh_lib, tasks, train
from sempre_jax.analysis import comparison
from sempre_jax.models import du2mce as models

TINY = {"data.embedded.num_users": 30, "data.embedded.num_topics": 6,
        "data.embedded.posts_per_user": 30, "data.embedded.feature_dim": 16,
        "data.embedded.signal": 1.0, "model.embed_dim": 16, "model.word_dim": 8,
        "model.user_dim": 8, "model.text_filters": (8, 8, 8), "batch_size": 64,
        "num_epochs": 10, "learning_rate": 0.01, "log_every_steps": 1000,
        "eval.batch_size": 128, "eval.every_steps": 0}


def _batch(tmp_path):
  spec = dict(num_users=10, num_topics=3, posts_per_user=8, feature_dim=8)
  d = embedded.ensure(spec, {"test": 0.1}, num_shards=4, word2vec_dim=0, seed=0,
                      root=str(tmp_path), log=lambda *a: None)
  meta = records.read_metadata(d)
  it = loader.train_iterator(d, meta, batch_size=16, image_input="features",
                             image_key="image_features", seed=0)
  return next(it), meta


def test_frozen_towers_do_not_move(tmp_path):
  batch, meta = _batch(tmp_path)
  config = du2mce.get_config("bridging")
  config.model.update(embed_dim=8, word_dim=4, user_dim=4, text_filters=(4, 4, 4))
  model = models.build_model(config.model, meta)
  mesh = mesh_lib.make_mesh(1)
  state = jax.device_put(train.create_train_state(
      model.init(jax.random.key(0), batch), train.make_optimizer(config, 10)),
      NamedSharding(mesh, P()))
  before = jax.tree.map(np.asarray, state.params)
  step = train.make_train_step(tasks.du2mce_loss_fn(model, config.loss, (0.0, 1.0)), mesh,
                               frozen=("text", "user"))
  for _ in range(2):
    state, _ = step(state, mesh_lib.shard_batch(mesh, batch))
  after = jax.tree.map(np.asarray, state.params)
  for tower in ("text", "user"):
    jax.tree.map(np.testing.assert_array_equal, after[tower], before[tower])
  assert np.abs(after["image"]["proj"]["kernel"] - before["image"]["proj"]["kernel"]).max() > 0


def test_merged_content_pairs_every_post_with_its_user(tmp_path):
  batch, meta = _batch(tmp_path)
  config = du2mce.get_config("merged")
  config.model.update(embed_dim=8, word_dim=4, user_dim=4, text_filters=(4, 4, 4))
  model = models.build_model(config.model, meta)
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
