"""The shared cases of the multi-process tests: a train step on a fixed global
batch, exact ranks with candidates split over the devices of both processes,
and a few steps of the training loop on prepared data."""

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import du2mce
from input_pipeline import embedded, records
from sempre_jax import mesh as mesh_lib, train
from sempre_jax.evals import ranks
from sempre_jax.models import du2mce as du2mce_model

GLOBAL_BATCH = 8


def global_batch() -> dict:
  rng = np.random.default_rng(0)
  has_image = np.arange(GLOBAL_BATCH) % 3 != 0
  return {
      "user": rng.integers(0, 5, GLOBAL_BATCH).astype(np.int32),
      "tokens": rng.integers(2, 20, [GLOBAL_BATCH, 20]).astype(np.int32),
      "text_mask": np.arange(20)[None] < rng.integers(1, 20, [GLOBAL_BATCH, 1]),
      "text_hash": rng.integers(1, 2**30, GLOBAL_BATCH).astype(np.int32),
      "image_mask": has_image,
      "image_id": np.where(has_image, np.arange(GLOBAL_BATCH) % 4, -1).astype(np.int32),
      "image_features": rng.normal(size=[GLOBAL_BATCH, 6]).astype(np.float32),
  }


def one_step(process_index: int, process_count: int):
  """(loss, flat params) after one step; each process feeds its slice of the batch."""
  config = du2mce.get_config()
  config.model.update(embed_dim=8, word_dim=4, user_dim=4, text_filters=(4, 4, 4))
  model = du2mce_model.build(config.model, {"num_users": 5, "vocab_size": 20})
  batch = global_batch()
  tx = train.make_optimizer(config, steps_per_epoch=10)
  state = train.create_train_state(model.init(jax.random.key(0), batch), tx)
  mesh = mesh_lib.make_mesh()
  state = jax.device_put(state, NamedSharding(mesh, P()))
  per = GLOBAL_BATCH // process_count
  local = jax.tree.map(lambda x: x[process_index * per:(process_index + 1) * per], batch)
  step, zero_sums = train.make_train_step(du2mce_model.loss_fn(model, config, config.loss),
                                         mesh)
  batch = mesh_lib.shard_batch(mesh, local)
  state, sums = step(state, zero_sums(state, batch), batch)
  flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
  params = {jax.tree_util.keystr(k): np.asarray(v.addressable_data(0)) for k, v in flat}
  return float(sums["loss"].addressable_data(0)), params


def rank_case() -> tuple[np.ndarray, np.ndarray, ranks.GroundTruth]:
  """Queries [30, 4], candidates [21, 4] with tied scores, 1-3 ground truths each."""
  rng = np.random.default_rng(1)
  queries = rng.integers(-2, 3, [30, 4]).astype(np.float32)
  cands = rng.integers(-2, 3, [21, 4]).astype(np.float32)
  gts = ranks.GroundTruth.from_lists([rng.choice(21, rng.integers(1, 4), replace=False)
                                      for _ in range(30)])
  return queries, cands, gts


def global_ranks() -> np.ndarray:
  """rank_case ranked on every device of the job: [3, Q] above, tied, tied_gts."""
  queries, cands, gts = rank_case()
  return rank_counts(ranks.ExactRanker(mesh_lib.make_mesh(), query_chunk=16,
                                       candidate_chunk=4)(queries, cands, gts))


def rank_counts(r: ranks.Ranks) -> np.ndarray:
  return np.stack([r.above, r.tied, r.tied_gts])


def prepared(root: str) -> str:
  """A small embedded corpus: 119 train posts in 8 blocks of 16 over 2 shard files."""
  spec = dict(num_users=12, num_topics=3, posts_per_user=11, feature_dim=8, seed=2)
  return embedded.ensure(spec, {"test": 0.1}, num_shards=2, word2vec_dim=0, seed=0,
                         root=root, log=lambda *a: None, block_posts=16)


def train_run(data_dir: str, workdir: str, num_devices: int = 0) -> dict:
  """Flat parameters after the training loop's 2 epochs of batches of 12 over 3
  data streams (no evaluators)."""
  config = du2mce.get_config()
  config.model.update(embed_dim=8, word_dim=4, user_dim=4, text_filters=(4, 4, 4),
                      init_from_word2vec=False)
  config.data.update(dir=data_dir, streams=3)
  config.update(batch_size=12, num_epochs=2, log_every_steps=1000, num_devices=num_devices,
                checkpoint_every_steps=1000, best="")
  config.evals = ml_collections.ConfigDict()
  state, _ = train.train_and_evaluate(config, workdir, data_dir, records.read_metadata(data_dir))
  flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
  return {jax.tree_util.keystr(k): np.asarray(v.addressable_data(0)) for k, v in flat}
