"""Test session set-up: 4 host CPU devices, and one tiny trained workdir shared
by the tests of the analysis tools (evaluate, export, interests, clusters, query)."""

import os
import sys
import tempfile

# One persistent compilation cache for every process of the run (the xdist workers
# and the training subprocesses the tests start, which inherit the environment; set
# before JAX is imported): a program many tests compile, such as a tiny train step,
# is compiled once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"sempre-jax-tests-{os.getuid()}", "jit-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import chex  # noqa: E402  (after the cache settings: JAX reads them at import)
import pytest  # noqa: E402

# Before JAX initialises its backends; sets XLA_FLAGS, which subprocesses inherit.
chex.set_n_cpu_devices(4)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config():
  """DU2MCE on a 40-user embedded corpus with 16-px pictures, trained in seconds."""
  from configs import du2mce
  config = du2mce.get_config()
  config.data.embedded.update(num_users=40, num_topics=8, posts_per_user=30,
                              feature_dim=32, signal=1.0, image_size=16)
  config.model.update(embed_dim=32, word_dim=16, user_dim=16, text_filters=(16, 16, 16))
  config.update(batch_size=64, num_epochs=6, learning_rate=0.003, log_every_steps=1000,
                checkpoint_every_steps=1000)
  config.evals.val.update(batch_size=128, every_steps=40)
  config.evals.test.batch_size = 128
  return config


def prepared(config, workdir) -> tuple[str, dict]:
  """(data dir, metadata): config.data.dir, or the embedded corpus under workdir
  (generated and prepared as launch/train.py does)."""
  from input_pipeline import embedded, records
  data_dir = config.data.dir or embedded.for_config(config, str(workdir))
  return data_dir, records.read_metadata(data_dir)


def run(config, workdir):
  """launch/train.py's job in this process: (final state, {evaluator: results})."""
  from sempre_jax import train
  return train.train_and_evaluate(config, str(workdir), *prepared(config, workdir))


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """A workdir written by the trainer (config.json, checkpoints, data, eval JSON)."""
  workdir = tmp_path_factory.mktemp("trained")
  run(tiny_config(), workdir)
  return workdir


@pytest.fixture
def toy_data(tmp_path):
  """(data dir, metadata) of 32 five-word posts of 4 users, train split only."""
  import numpy as np
  from input_pipeline import records
  rng = np.random.default_rng(0)
  posts = [dict(post_id=f"p{i}", user=i % 4, tokens=rng.integers(2, 12, 5)) for i in range(32)]
  meta = {"num_users": 4, "vocab_size": 12, "max_len": records.MAX_LEN, "feature_dim": 0,
          "image_size": 0, "num_images": 0,
          "splits": {"train": records.write_split(str(tmp_path), "train",
                                                  [records.rows_of(posts)], 2, block_posts=4)}}
  records.write_metadata(str(tmp_path), meta)
  return str(tmp_path), meta
